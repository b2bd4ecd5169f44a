"""The Ray-free pieces the pipeline stages call: manifest, pretraining step, feature
extraction, bundle, universal prediction and the evaluation summary."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pading.bundle import SEGMENTER_DIR, Bundle, write_bundle
from pading.config import DataConfig, tiny_config
from pading.data import write_synthetic_dataset
from pading.data.manifest import (
    apply_seen_only_filter,
    class_table_for,
    read_split_index,
    rows_to_table,
    shard_rows,
    to_rows,
    validate_rows,
)
from pading.evaluation.predict import EvaluationPredictor, predict_images, summarize
from pading.model.classifier import Classifier
from pading.model.generator import build_generator
from pading.model.segmenter import Segmenter
from pading.model.semantics import class_embeddings
from pading.run.extraction import FeatureExtractor, extract_features
from pading.training.pretrain import (
    SegmenterLoss,
    build_pretrain_optimizer,
    load_training_batch,
    pretrain_step,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_train=12, num_val=6, image_size=48, seed=3)
    data = DataConfig(root=str(root), image_size=48)
    records, categories, _ = read_split_index(data, "train")
    table = class_table_for(data, categories)
    train = to_rows(records, table)
    val = to_rows(read_split_index(data, "val")[0], table)
    return {"root": root, "data": data, "table": table, "train": train, "val": val}


@pytest.fixture(scope="module")
def bundle_dir(synthetic, tmp_path_factory):
    config = tiny_config(data={"root": str(synthetic["root"]), "image_size": 48})
    table = synthetic["table"]
    torch.manual_seed(0)
    segmenter = Segmenter(config.segmenter, table.num_classes)
    semantics = class_embeddings(table, config.semantics)
    generator = build_generator(config.generator, semantics.shape[1], config.segmenter.hidden_dim)
    labels = np.arange(40) % (table.num_classes + 1)
    bundle = Bundle(config, table, semantics, "minilm", segmenter, Classifier.from_class_head(segmenter.class_head),
                    generator, config.generator, np.random.randn(40, config.segmenter.hidden_dim).astype(np.float32), labels)
    return bundle.save(tmp_path_factory.mktemp("bundle") / "bundle")


def test_manifest_rows_validate_and_filter(synthetic, tmp_path):
    rows, table = synthetic["train"], synthetic["table"]
    import pyarrow as pa

    assert pq.read_table(pa.BufferReader(_to_parquet(rows_to_table(rows)))).num_rows == len(rows)
    kept, dropped = apply_seen_only_filter(rows, table)
    assert len(kept) + len(dropped) == len(rows)
    assert all(not r["has_unseen"] for r in kept) and all(r["has_unseen"] for r in dropped)
    broken = dict(rows[0], image_path=str(tmp_path / "missing.jpg"))
    good, bad = validate_rows([broken] + rows[1:3], table, "panoptic")
    assert len(good) == 2 and len(bad) == 1 and "missing.jpg" in bad[0]["source"]
    assert shard_rows(rows, 5) == [sorted(r["image_id"] for r in rows)[i : i + 5] for i in range(0, len(rows), 5)]


def _to_parquet(table):
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


def test_manifest_on_real_coco_samples(coco_samples):
    data = DataConfig(root=str(coco_samples), val_images="val2017", val_panoptic_json="panoptic_val2017.json",
                      val_panoptic_dir="panoptic_val2017")
    records, categories, rejects = read_split_index(data, "val")
    table = class_table_for(data, categories)
    rows = to_rows(records, table)
    assert len(rows) == 2 and not rejects and all(r["has_unseen"] for r in rows)
    good, bad = validate_rows(rows, table, "panoptic")
    assert len(good) == 2 and not bad
    assert apply_seen_only_filter(rows, table)[0] == []  # both contain ZSP unseen classes


def test_pretrain_step_reduces_loss_on_one_batch(synthetic):
    config = tiny_config()
    table = synthetic["table"]
    batch, rejects = load_training_batch(synthetic["train"][:2], table, "panoptic", 48)
    assert not rejects and batch["pixel_values"].shape == (2, 3, 48, 48)
    torch.manual_seed(0)
    model = SegmenterLoss(Segmenter(config.segmenter, table.num_classes))
    optimizer = build_pretrain_optimizer(model, config.pretrain)
    losses = [pretrain_step(model, optimizer, batch, grad_clip=1.0)["loss"] for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_extract_features_rows_and_idempotent_shards(synthetic, bundle_dir, tmp_path):
    config = tiny_config(data={"image_size": 48})
    table = synthetic["table"]
    segmenter = Segmenter.load(bundle_dir / SEGMENTER_DIR)
    rows = synthetic["train"][:3]
    features, rejects = extract_features(segmenter, rows, table, config, "ckpt", batch_size=2)
    queries = config.segmenter.num_queries
    assert len(features) == 3 * queries and not rejects
    labels = np.array([f["label"] for f in features])
    assert labels.min() >= 0 and labels.max() <= table.no_object_index
    assert (labels < table.no_object_index).any()  # some queries matched a segment
    for image_rows in np.array_split(labels, 3):  # each GT segment gets exactly one query
        matched = image_rows[image_rows < table.no_object_index]
        assert len(matched) > 0
    extractor = FeatureExtractor(config, str(bundle_dir / SEGMENTER_DIR), table.to_records(), rows, str(tmp_path / "f"), "ckpt", "cpu")
    out = extractor({"shard": [0], "image_ids": [[r["image_id"] for r in rows]]})
    path = tmp_path / "f" / "shard-00000.parquet"
    written = pq.read_table(path)
    assert written.num_rows == 3 * queries and int(out["rows"][0]) == written.num_rows
    assert written.schema.field("embedding").type.list_size == config.segmenter.hidden_dim
    mtime = path.stat().st_mtime_ns
    extractor({"shard": [0], "image_ids": [[r["image_id"] for r in rows]]})
    assert path.stat().st_mtime_ns == mtime  # a finished shard is not redone


def test_bundle_roundtrip_and_prediction(synthetic, bundle_dir):
    bundle = Bundle.load(bundle_dir)
    again = Bundle.load(bundle_dir)
    from pading.data import load_image

    image = load_image(synthetic["val"][0]["image_path"])
    first = predict_images(bundle, [image])[0]
    second = predict_images(again, [image])[0]
    np.testing.assert_array_equal(first.semantic, second.semantic)
    assert first.semantic.shape == image.shape[:2] and first.panoptic_ids.shape == image.shape[:2]
    assert bundle.reference_embeddings.shape == (40, bundle.config.segmenter.hidden_dim)
    with pytest.raises(ValueError, match="unknown task"):
        predict_images(bundle, [image], tasks=("depth",))


def test_a_bundle_written_from_a_saved_segmenter_is_the_loaded_ones(synthetic, tmp_path):
    """The generator stage writes its bundle from the pretrained segmenter's directory, without
    building the model: the same files as the bundle of the loaded segmenter, for a table with
    a class more than the segmenter's (the stage's added unseen names). A bundle of the
    earlier format, with the loss's class weights saved, still loads."""
    from safetensors.torch import load_file, save_file

    config = tiny_config(data={"root": str(synthetic["root"]), "image_size": 48})
    table = synthetic["table"]
    torch.manual_seed(0)
    Segmenter(config.segmenter, table.num_classes - 1).save(tmp_path / "pretrained")
    semantics = np.random.default_rng(0).standard_normal((table.num_classes, 384)).astype(np.float32)
    generator = build_generator(config.generator, semantics.shape[1], config.segmenter.hidden_dim)
    parts = dict(config=config, table=table, class_semantics=semantics, encoder="minilm",
                 classifier=Classifier(config.segmenter.hidden_dim, table.num_classes), generator=generator,
                 generator_config=config.generator)
    Bundle(segmenter=Segmenter.load(tmp_path / "pretrained"), **parts).save(tmp_path / "loaded")
    write_bundle(tmp_path / "copied", segmenter=tmp_path / "pretrained", **parts)
    files = sorted(p.relative_to(tmp_path / "loaded") for p in (tmp_path / "loaded").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "copied") for p in (tmp_path / "copied").rglob("*") if p.is_file())
    for name in files:
        a, b = tmp_path / "loaded" / name, tmp_path / "copied" / name
        if name.suffix == ".safetensors":
            left, right = load_file(str(a)), load_file(str(b))
            assert sorted(left) == sorted(right) and all(torch.equal(left[k], right[k]) for k in left), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
    weights = tmp_path / "copied" / SEGMENTER_DIR / "segmenter.safetensors"
    state = load_file(str(weights))
    assert not any(k.startswith(("mask2former.class_predictor.", "mask2former.criterion.")) for k in state)
    image = synthetic["train"][0]
    from pading.data import load_image

    pixels = load_image(image["image_path"])
    expected = predict_images(Bundle.load(tmp_path / "loaded"), [pixels])[0]
    weights_loss = torch.ones(table.num_classes + 1)
    save_file({**state, "mask2former.criterion.empty_weight": weights_loss}, str(weights), metadata={"format": "pt"})
    got = predict_images(Bundle.load(tmp_path / "copied"), [pixels])[0]
    np.testing.assert_array_equal(got.panoptic_ids, expected.panoptic_ids)
    np.testing.assert_array_equal(got.semantic, expected.semantic)


def test_evaluation_predictor_and_summary(synthetic, bundle_dir, tmp_path):
    predictor = EvaluationPredictor(str(bundle_dir), str(tmp_path / "pred"), "panoptic", device="cpu")
    rows = synthetic["val"]
    bad = dict(rows[0], image_id=999999, image_path=str(tmp_path / "nope.jpg"), file_name="nope.jpg")
    out = predictor(rows_to_table(rows + [bad]))
    result_rows = [dict(zip(out, values)) for values in zip(*out.values())]
    assert sum(1 for r in result_rows if r["error"]) == 1 and "nope.jpg" in [r for r in result_rows if r["error"]][0]["error"]
    data = synthetic["data"]
    results = summarize(result_rows, synthetic["table"], "panoptic", tmp_path / "pred",
                        gt_panoptic_json=synthetic["root"] / data.val_panoptic_json,
                        gt_panoptic_dir=synthetic["root"] / data.val_panoptic_dir, images=rows)
    for task, metric in (("panoptic", "pq"), ("instance", "map50"), ("semantic", "miou")):
        for group in ("seen", "unseen", "hm"):
            assert np.isfinite(results[task][group][metric])
    panoptic = json.loads((tmp_path / "pred" / "panoptic_predictions.json").read_text())
    assert len(panoptic["annotations"]) == len(rows)


def test_pretraining_learning_rate_schedule():
    from pading.config import PretrainConfig
    from pading.training.pretrain import learning_rate

    poly = PretrainConfig(iterations=100, lr=1e-3, warmup_steps=10)
    assert learning_rate(poly, 0) == pytest.approx(1e-4)  # warm-up: 1/10 of the rate
    assert learning_rate(poly, 9) == pytest.approx(1e-3 * (1 - 9 / 100) ** 0.9)
    assert learning_rate(poly, 50) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert learning_rate(poly, 100) == 0.0
    constant = PretrainConfig(iterations=100, lr=1e-3, warmup_steps=0, lr_schedule="constant")
    assert {learning_rate(constant, s) for s in (0, 50, 99)} == {1e-3}


def test_weight_average_follows_the_ema_recurrence_and_copies_integer_buffers():
    from pading.config import PretrainConfig
    from pading.errors import ConfigError
    from pading.training.pretrain import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.clone() for k, v in initial.items() if v.is_floating_point()}
    for step in range(1, 31):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        model.train()
        model(torch.randn(4, 3))  # moves the BatchNorm statistics and its integer step count
        decay = min(0.9, (1 + step) / (10 + step))  # 2/11 at step 1: early steps count more
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = decay * expected[key] + (1 - decay) * value
        average.update(model, step)
    for key, value in average.state_dict().items():
        if key in expected:
            assert torch.allclose(value, expected[key], atol=1e-6), key
            assert not torch.allclose(value, model.state_dict()[key]), key  # it is not the last weights
        else:
            assert torch.equal(value, model.state_dict()[key]), key  # num_batches_tracked is copied
    copy = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average.copy_to(copy)
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in average.state_dict().items())
    restored = WeightAverage(copy, decay=0.9)
    restored.load_state_dict({k: v.clone() for k, v in average.state_dict().items()})
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in average.state_dict().items())
    with pytest.raises(ConfigError, match="ema_decay"):
        PretrainConfig(ema_decay=1.0)
