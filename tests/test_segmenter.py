import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pading.config import tiny_config
from pading.errors import AnnotationError, DataError, MissingWeightsError
from pading.model.segmenter import (
    Segmenter,
    _to_backbone_keys,
    postprocess_mask_logits,
    prepare_batch,
)

NUM_CLASSES = 5
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run far faster on one thread when CPU cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config():
    return tiny_config().segmenter


@pytest.fixture()
def segmenter(config):
    torch.manual_seed(0)
    return Segmenter(config, num_classes=NUM_CLASSES)


def _pixels(batch=2):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _targets():
    left = torch.zeros(SIZE, SIZE)
    left[:, : SIZE // 2] = 1
    masks = [torch.stack([left, 1 - left]), left[None]]
    labels = [torch.tensor([1, 4]), torch.tensor([0])]
    return masks, labels


def test_forward_shapes_and_query_embeddings_feed_the_class_head(segmenter, config):
    segmenter.eval()
    pixels = _pixels()
    with torch.no_grad():
        out = segmenter(pixels)
        reference = segmenter.mask2former(pixel_values=pixels)  # transformers' own head
    q, d = config.num_queries, config.hidden_dim
    assert out.mask_logits.shape == (2, q, SIZE // 4, SIZE // 4)
    assert out.query_embeddings.shape == (2, q, d)
    assert out.class_logits.shape == (2, q, NUM_CLASSES + 1)
    # query_embeddings are exactly what transformers' class predictor reads (LayerNorm-ed)
    torch.testing.assert_close(out.class_logits, reference.class_queries_logits)
    torch.testing.assert_close(out.mask_logits, reference.masks_queries_logits)
    torch.testing.assert_close(out.query_embeddings.mean(-1), torch.zeros(2, q), atol=1e-4, rtol=0)


def test_compute_loss_is_finite_and_backpropagates(segmenter, config):
    segmenter.train()
    masks, labels = _targets()
    losses = segmenter.compute_loss(_pixels(), masks, labels)
    aux_layers = config.decoder_layers - 1
    assert {"loss", "loss_cross_entropy", "loss_mask", "loss_dice", f"loss_dice_{aux_layers - 1}"} <= set(losses)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    parts = sum(v for k, v in losses.items() if k != "loss")
    torch.testing.assert_close(losses["loss"], parts)
    losses["loss"].backward()
    backbone_grad = segmenter.backbone.embedder.embedder.convolution.weight.grad
    decoder_grad = segmenter.mask2former.model.transformer_module.decoder.layers[-1].cross_attn.in_proj_weight.grad
    head_grad = segmenter.class_head.weight.grad
    for grad in (backbone_grad, decoder_grad, head_grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_mask_terms_divide_by_the_given_target_count(segmenter):
    """``num_masks`` (the count over every worker and micro-batch of a step) replaces the
    batch's own count in the mask and dice terms only; the classification term keeps its own
    weighting."""
    segmenter.eval()  # no dropout: the two passes see the same network
    masks, labels = _targets()
    own = sum(len(label) for label in labels)
    with torch.no_grad():
        torch.manual_seed(0)
        default = segmenter.compute_loss(_pixels(), masks, labels)
        torch.manual_seed(0)  # the same sampled points
        given = segmenter.compute_loss(_pixels(), masks, labels, num_masks=4.0 * own)
        torch.manual_seed(0)
        same = segmenter.compute_loss(_pixels(), masks, labels, num_masks=float(own))
    for key in default:
        if key == "loss":
            continue
        scale = 0.25 if key.startswith(("loss_mask", "loss_dice")) else 1.0
        torch.testing.assert_close(given[key], default[key] * scale)
        assert torch.equal(same[key], default[key])


def test_images_without_segments(segmenter):
    segmenter.train()
    empty_masks, empty_labels = torch.zeros(0, SIZE, SIZE), torch.zeros(0, dtype=torch.long)
    masks, labels = _targets()
    mixed = segmenter.compute_loss(_pixels(), [empty_masks, masks[1]], [empty_labels, labels[1]])
    assert torch.isfinite(mixed["loss"])
    none = segmenter.compute_loss(_pixels(), [empty_masks, empty_masks], [empty_labels, empty_labels])
    assert torch.isfinite(none["loss"])
    none["loss"].backward()  # only the no-object classification term remains
    assert segmenter.class_head.bias.grad[NUM_CLASSES] != 0


def _random_targets(counts, sizes, seed=2):
    generator = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(n, *size, generator=generator) > 0.6).float() for n, size in zip(counts, sizes)]
    labels = [torch.randint(0, NUM_CLASSES, (n,), generator=generator) for n in counts]
    return masks, labels


@pytest.mark.parametrize("counts, sizes", [
    ((0, 3, 1), ((SIZE, SIZE),) * 3),  # an image without segments among others
    ((2, 19), ((SIZE, SIZE),) * 2),  # more segments than the 16 queries
    ((0, 0), ((SIZE, SIZE),) * 2),  # no segment in the whole batch
    ((2, 3), ((SIZE, SIZE), (48, 40))),  # targets of different sizes: each image sampled on its own
], ids=["mixed", "crowded", "empty", "sizes"])
def test_the_batched_loss_is_transformers_loss(segmenter, counts, sizes):
    """pading.model.criterion computes transformers' Mask2Former loss (every layer's matching,
    mask terms on uncertainty-sampled points, weighted cross-entropy) with batched operations:
    from the same seed it draws the same points, so the terms and their gradients agree."""
    from pading.model.criterion import mask2former_loss

    segmenter.eval()  # the same decoder outputs for both criteria
    masks, labels = _random_targets(counts, sizes)
    queries, mask_logits = segmenter._decode(_pixels(len(counts)), None)
    class_logits = [segmenter.classify(q) for q in queries]
    model = segmenter.mask2former
    torch.manual_seed(7)
    expected = model.get_loss_dict(
        masks_queries_logits=mask_logits[-1], class_queries_logits=class_logits[-1], mask_labels=masks,
        class_labels=labels, auxiliary_predictions=[{"masks_queries_logits": m, "class_queries_logits": c}
                                                    for m, c in zip(mask_logits[:-1], class_logits[:-1])])
    torch.manual_seed(7)
    batched = mask2former_loss(model.criterion, model.weight_dict, mask_logits, class_logits, masks, labels)
    assert list(batched) == list(expected)  # same terms, same order
    for key in expected:
        torch.testing.assert_close(batched[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    outputs = [*mask_logits, *class_logits]
    wanted = torch.autograd.grad(sum(expected.values()), outputs, retain_graph=True, allow_unused=True)
    got = torch.autograd.grad(sum(batched.values()), outputs, allow_unused=True)
    for want, have in zip(wanted, got):
        if want is None:
            assert have is None or not have.any()
        else:
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-7)


def test_bad_class_label_is_rejected(segmenter):
    masks, labels = _targets()
    with pytest.raises(AnnotationError, match="class labels"):
        segmenter.compute_loss(_pixels(), masks, [torch.tensor([1, NUM_CLASSES]), labels[1]])
    with pytest.raises(DataError, match="pixel_values"):
        segmenter(torch.zeros(2, 1, SIZE, SIZE))


def test_replace_class_head_changes_classes_not_masks(segmenter, config):
    segmenter.eval()
    pixels = _pixels()
    with torch.no_grad():
        before = segmenter(pixels)
        new_head = nn.Linear(config.hidden_dim, 9 + 1)
        segmenter.replace_class_head(new_head)
        after = segmenter(pixels)
    assert segmenter.num_classes == 9 and segmenter.class_head is new_head
    assert after.class_logits.shape == (2, config.num_queries, 10)
    torch.testing.assert_close(after.class_logits, new_head(before.query_embeddings))
    torch.testing.assert_close(after.mask_logits, before.mask_logits)
    torch.testing.assert_close(segmenter.classify(before.query_embeddings), after.class_logits)
    # the loss follows the new class count (label 8 exists only in the new head)
    segmenter.train()
    loss = segmenter.compute_loss(pixels, [torch.ones(1, SIZE, SIZE)] * 2, [torch.tensor([8])] * 2)["loss"]
    assert torch.isfinite(loss)


def test_save_load_round_trip(segmenter, tmp_path):
    segmenter.eval()
    pixels = _pixels()
    segmenter.save(tmp_path / "seg")
    loaded = Segmenter.load(tmp_path / "seg", map_location="cpu").eval()
    assert loaded.num_classes == NUM_CLASSES and loaded.config == segmenter.config
    with torch.no_grad():
        a, b = segmenter(pixels), loaded(pixels)
    assert torch.equal(a.mask_logits, b.mask_logits)
    assert torch.equal(a.class_logits, b.class_logits)
    assert torch.equal(a.query_embeddings, b.query_embeddings)
    # a saved directory is also accepted as config.weights
    via_config = Segmenter(dataclasses.replace(segmenter.config, weights=str(tmp_path / "seg")), NUM_CLASSES).eval()
    with torch.no_grad():
        assert torch.equal(via_config(pixels).mask_logits, a.mask_logits)


def test_the_class_head_reads_alone_as_the_loaded_segmenter_has_it(segmenter, config, tmp_path):
    """``Segmenter.load_class_head`` gives the head ``Segmenter.load`` would, without the model;
    a segmenter saved without its head, or a file without one, is refused by name."""
    segmenter.save(tmp_path / "seg")
    head = Segmenter.load_class_head(tmp_path / "seg")
    assert isinstance(head, nn.Linear) and head.out_features == NUM_CLASSES + 1
    assert torch.equal(head.weight, segmenter.class_head.weight) and torch.equal(head.bias, segmenter.class_head.bias)
    features = torch.randn(5, config.hidden_dim)
    with torch.no_grad():
        assert torch.equal(head(features), Segmenter.load(tmp_path / "seg").class_head(features))
    segmenter.replace_class_head(nn.Sequential(nn.Linear(config.hidden_dim, 8), nn.Tanh()))
    segmenter.save(tmp_path / "headless")
    with pytest.raises(DataError, match="class head was not saved"):
        Segmenter.load_class_head(tmp_path / "headless")
    (tmp_path / "seg" / "segmenter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="no readable class head"):
        Segmenter.load_class_head(tmp_path / "seg")
    with pytest.raises(MissingWeightsError, match="not a saved segmenter"):
        Segmenter.load_class_head(tmp_path / "nothing")


def test_save_with_a_replaced_non_linear_head(segmenter, config, tmp_path):
    segmenter.eval()
    head = nn.Sequential(nn.Linear(config.hidden_dim, 8), nn.Tanh())  # 7 classes + no object
    segmenter.replace_class_head(head)
    pixels = _pixels()
    segmenter.save(tmp_path / "seg")
    loaded = Segmenter.load(tmp_path / "seg").eval()
    assert loaded.num_classes == 7 and isinstance(loaded.class_head, nn.Linear)
    loaded.replace_class_head(head)
    with torch.no_grad():
        a, b = segmenter(pixels), loaded(pixels)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.class_logits, b.class_logits)


def test_transformers_save_pretrained_weights_load_with_new_class_count(segmenter, tmp_path):
    segmenter.eval()
    segmenter.mask2former.save_pretrained(tmp_path / "hf")
    other = Segmenter(dataclasses.replace(segmenter.config, weights=str(tmp_path / "hf")), num_classes=7).eval()
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(other(pixels).mask_logits, segmenter(pixels).mask_logits)
        assert other(pixels).class_logits.shape[-1] == 8


def test_missing_weights_raise(config, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        Segmenter(dataclasses.replace(config, weights=missing), NUM_CLASSES)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        Segmenter(dataclasses.replace(config, backbone_weights=missing), NUM_CLASSES)
    with pytest.raises(MissingWeightsError):
        Segmenter.load(missing)


def test_backbone_weights_from_transformers_resnet(config, tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    resnet = ResNetForImageClassification(
        ResNetConfig(
            embedding_size=config.backbone_embedding_size,
            hidden_sizes=list(config.backbone_hidden_sizes),
            depths=list(config.backbone_depths),
            num_labels=3,
        )
    )
    resnet.save_pretrained(tmp_path / "resnet")
    segmenter = Segmenter(dataclasses.replace(config, backbone_weights=str(tmp_path / "resnet")), NUM_CLASSES)
    expected = resnet.resnet.encoder.stages[2].layers[0].layer[1].convolution.weight
    assert torch.equal(segmenter.backbone.encoder.stages[2].layers[0].layer[1].convolution.weight, expected)
    # a checkpoint for another architecture is refused, naming the problem
    wrong = dataclasses.replace(
        config, backbone_hidden_sizes=(32, 64, 128, 256), backbone_weights=str(tmp_path / "resnet")
    )
    with pytest.raises(MissingWeightsError, match="wrongly shaped"):
        Segmenter(wrong, NUM_CLASSES)


def test_torchvision_resnet_keys_map_onto_the_backbone():
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet
    from transformers import ResNetBackbone, ResNetConfig

    # ResNet-50's widths with one block per stage (the naming is what is under test)
    torchvision_state = ResNet(Bottleneck, [1, 1, 1, 1]).state_dict()
    backbone = ResNetBackbone(ResNetConfig(depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]))
    mapped = _to_backbone_keys(torchvision_state)
    own = backbone.state_dict()
    assert set(own) <= set(mapped)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert set(mapped) - set(own) == {"fc.weight", "fc.bias"}


def test_prepare_batch_and_postprocess_round_trip_non_square():
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, size=(80, 48, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, size=(30, 60, 3), dtype=np.uint8)
    wide_masks = np.zeros((2, 30, 60), dtype=bool)
    wide_masks[0, :, :30] = True
    wide_masks[1, :, 30:] = True
    targets = [(np.zeros((0, 80, 48), dtype=bool), np.zeros(0, dtype=np.int64)), (wide_masks, np.array([3, 1]))]
    batch = prepare_batch([tall, wide], SIZE, targets)
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["meta"][0] == {"original_size": (80, 48), "resized_size": (64, 38), "input_size": SIZE}
    assert batch["meta"][1]["resized_size"] == (32, 64)
    assert int(batch["pixel_mask"][0].sum()) == 64 * 38 and int(batch["pixel_mask"][1].sum()) == 32 * 64
    assert torch.all(batch["pixel_values"][1, :, 32:, :] == 0)  # padding at the bottom
    mask_labels = batch["mask_labels"]
    assert mask_labels[0].shape == (0, SIZE, SIZE) and mask_labels[1].shape == (2, SIZE, SIZE)
    assert int(mask_labels[1][0].sum()) == 32 * 32 and int(mask_labels[1][1].sum()) == 32 * 32
    assert mask_labels[1][:, 32:].sum() == 0
    assert batch["class_labels"][1].tolist() == [3, 1]
    # a mask-logit map made from the label, at 1/4 res, comes back to the original frame
    quarter = torch.nn.functional.avg_pool2d(mask_labels[1][None] * 20 - 10, 4)[0]  # (2, 16, 16)
    restored = postprocess_mask_logits(quarter, batch["meta"][1])
    assert restored.shape == (2, 30, 60)
    agreement = ((restored > 0).numpy() == wide_masks).mean()
    assert agreement > 0.95


def test_prepare_batch_rejects_bad_input():
    with pytest.raises(DataError, match="img.png"):
        prepare_batch([np.zeros((10, 10), dtype=np.uint8)], SIZE, sources=["img.png"])
    with pytest.raises(AnnotationError, match="batch image 0"):
        prepare_batch([np.zeros((10, 10, 3), dtype=np.uint8)], SIZE, [(np.zeros((1, 5, 5), bool), np.array([1]))])
