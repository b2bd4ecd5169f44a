"""pading.serving.service: request decoding, segmentation output, run-time classes (no Ray, no HTTP)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers.tiny_bundle import EXTRA_NAMES, build_tiny_bundle
from PIL import Image
from pycocotools import mask as mask_utils

from pading.bundle import Bundle
from pading.errors import CorruptImageError, UnknownClassError
from pading.evaluation.inference import rgb_to_ids
from pading.serving.service import (
    ClassConflictError,
    ImageTooLargeError,
    RequestError,
    SegmentationService,
    TruncatedImageError,
    UnprocessableError,
    check_request,
    decode_image,
    http_status,
)

HEIGHT, WIDTH = 40, 56
LIMIT = 10_000


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundle_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    build_tiny_bundle(root / "linear")
    build_tiny_bundle(root / "projection", projection=True)
    return {"linear": root / "linear", "projection": root / "projection"}


@pytest.fixture
def service(bundle_dirs) -> SegmentationService:
    return SegmentationService(Bundle.load(bundle_dirs["linear"]))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


# ---- decoding -------------------------------------------------------------------------


def test_decode_converts_every_mode_to_rgb():
    gray = Image.new("L", (5, 3), color=77)
    out = decode_image(encode(gray, "PNG"), max_pixels=LIMIT)
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8 and (out == 77).all()
    rgba = Image.new("RGBA", (4, 2), color=(10, 20, 30, 0))
    assert (decode_image(encode(rgba, "PNG"), max_pixels=LIMIT) == [10, 20, 30]).all()
    cmyk = Image.new("CMYK", (4, 4), color=(0, 0, 0, 0))  # no ink = white
    assert (decode_image(encode(cmyk, "JPEG"), max_pixels=LIMIT) == 255).all()
    deep = Image.fromarray(np.array([[1000, 65535, 0]], dtype=np.uint16))  # 16-bit PNG: a fixed 65535 -> 255
    assert (decode_image(encode(deep, "PNG"), max_pixels=LIMIT)[..., 0] == [[4, 255, 0]]).all()
    webp = decode_image(encode(Image.new("RGB", (6, 6), (200, 0, 0)), "WEBP", lossless=True), max_pixels=LIMIT)
    assert (webp == [200, 0, 0]).all()


@pytest.mark.parametrize(
    "data, error, status",
    [
        (b"", RequestError, 400),
        (b"this is not an image at all", CorruptImageError, 400),
        (encode(Image.new("RGB", (4, 4)), "GIF"), CorruptImageError, 400),  # decodable, but not JPEG/PNG/WebP
        (encode(Image.new("RGB", (200, 100)), "PNG"), ImageTooLargeError, 413),  # 20 000 > 10 000 pixels
    ],
)
def test_decode_refuses_bad_bodies(data, error, status):
    with pytest.raises(error) as caught:
        decode_image(data, max_pixels=LIMIT)
    assert http_status(caught.value) == status
    assert "request body" in str(caught.value)


def test_decode_refuses_truncated_image():
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    with pytest.raises(TruncatedImageError, match="truncated") as caught:
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)
    assert http_status(caught.value) == 422


def test_check_request():
    assert check_request("all") == ("panoptic", "instance", "semantic")
    assert check_request("semantic", "png") == ("semantic",)
    with pytest.raises(RequestError, match="unknown task 'depth'"):
        check_request("depth")
    with pytest.raises(RequestError, match="unknown format 'tiff'"):
        check_request("panoptic", "tiff")
    with pytest.raises(RequestError, match="single task"):
        check_request("all", "png")


def test_http_status_of_other_errors():
    assert http_status(UnknownClassError("x")) == 404
    assert http_status(ClassConflictError("x", "exists")) == 409
    assert http_status(UnprocessableError("x", "no vector")) == 422
    assert http_status(RuntimeError("bug")) == 500


# ---- segmentation ---------------------------------------------------------------------


def _decoded(entry: dict) -> np.ndarray:
    rle = {"size": entry["mask"]["size"], "counts": entry["mask"]["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def test_segment_schema_and_rle(service, image):
    (result,) = service.segment([image], "all")
    assert (result["height"], result["width"], result["task"], result["vocabulary_version"]) == (HEIGHT, WIDTH, "all", 0)
    ids = set(service.bundle.table.ids)
    assert result["panoptic"] and result["instance"] and result["semantic"]
    covered = np.zeros((HEIGHT, WIDTH), dtype=int)
    for entry in result["panoptic"]:
        mask = _decoded(entry)
        assert mask.shape == (HEIGHT, WIDTH) and entry["area"] == mask.sum() > 0
        assert entry["class_id"] in ids and 0.0 <= entry["score"] <= 1.0
        assert {"class_name", "isthing", "unseen", "added", "bbox", "id"} <= set(entry)
        rows, cols = np.nonzero(mask)
        assert entry["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
        covered += mask
    assert covered.max() <= 1  # panoptic segments do not overlap
    scores = [e["score"] for e in result["instance"]]
    assert scores == sorted(scores, reverse=True)
    semantic_area = sum(_decoded(e).sum() for e in result["semantic"])
    assert semantic_area == HEIGHT * WIDTH  # one class per pixel
    assert all("score" not in e for e in result["semantic"])


def test_segment_png_matches_json(service, image):
    (as_json,) = service.segment([image], "semantic")
    (as_png,) = service.segment([image], "semantic", "png")
    class_ids = np.asarray(Image.open(io.BytesIO(as_png["png"])))
    assert class_ids.shape == (HEIGHT, WIDTH)
    assert {e["class_id"]: e["area"] for e in as_json["semantic"]} == dict(zip(*np.unique(class_ids, return_counts=True)))
    assert all("mask" not in e for e in as_png["semantic"])
    (panoptic,) = service.segment([image], "panoptic", "png")
    segment_ids = rgb_to_ids(np.asarray(Image.open(io.BytesIO(panoptic["png"])).convert("RGB")))
    for entry in panoptic["panoptic"]:
        assert (segment_ids == entry["id"]).sum() == entry["area"]


def test_segment_per_image_tasks_and_min_score(service, image):
    results = service.segment([image, image[:20]], ["semantic", "instance"], min_score=[0.0, 1.1])
    assert set(results[0]) >= {"semantic"} and "instance" not in results[0]
    assert results[1]["instance"] == [] and results[1]["height"] == 20  # nothing scores above 1.1
    with pytest.raises(RequestError, match="unknown task"):
        service.segment([image], "everything")


# ---- run-time classes -----------------------------------------------------------------


def test_add_classes_refits_and_swaps(service, image):
    before = service.state
    old_count = before.bundle.table.num_classes
    result = service.add_classes([EXTRA_NAMES[0], EXTRA_NAMES[1]], isthing=[False, True])
    after = service.state
    assert result["vocabulary_version"] == after.version == 1 and result["num_classes"] == old_count + 2
    assert result["fit_steps"] == service.config.fit_steps and result["seconds"] > 0
    added = after.bundle.table[old_count:]
    assert [c.name for c in added] == list(EXTRA_NAMES[:2]) and [c.isthing for c in added] == [False, True]
    assert all(c.added and c.unseen for c in added) and added[0].id > max(before.bundle.table.ids)
    listing = service.classes()
    assert listing["vocabulary_version"] == 1 and listing["classes"][-1]["name"] == EXTRA_NAMES[1]
    embed_dim = after.bundle.config.segmenter.hidden_dim
    probe = torch.zeros(3, embed_dim)
    assert after.bundle.segmenter.classify(probe).shape == (3, old_count + 3)
    # the re-fit classifier recognises generator features of a new class
    semantic = torch.as_tensor(after.bundle.class_semantics[old_count + 1]).expand(64, -1)
    with torch.no_grad():
        synthetic = after.bundle.generator(semantic, generator=torch.Generator().manual_seed(5))  # (64, D)
        predicted = after.bundle.classifier(synthetic).argmax(-1)
    assert (predicted == old_count + 1).float().mean() > 0.5
    # the old state is untouched and still serves with the old vocabulary
    assert before.bundle.segmenter.classify(probe).shape == (3, old_count + 1)
    (old_answer,) = service.segment([image], "semantic", state=before)
    assert old_answer["vocabulary_version"] == 0
    assert {e["class_id"] for e in old_answer["semantic"]} <= set(before.bundle.table.ids)
    (new_answer,) = service.segment([image], "semantic")
    assert new_answer["vocabulary_version"] == 1


@pytest.mark.parametrize(
    "names, isthing, error, match",
    [
        ([], True, RequestError, "at least one"),
        (["  "], True, RequestError, "empty"),
        ([EXTRA_NAMES[0], EXTRA_NAMES[0].upper()], True, RequestError, "twice"),
        ([EXTRA_NAMES[0], EXTRA_NAMES[1]], [True], RequestError, "isthing"),
        (["unicorn"], True, UnprocessableError, "cannot encode"),
    ],
)
def test_add_classes_refuses_bad_names(service, names, isthing, error, match):
    with pytest.raises(error, match=match):
        service.add_classes(names, isthing)
    assert service.state.version == 0


def test_add_existing_class_conflicts(service):
    trained = service.bundle.table[0]
    for name in (trained.name, trained.text.upper()):
        with pytest.raises(ClassConflictError, match="already in the vocabulary"):
            service.add_classes([name])
    service.add_classes([EXTRA_NAMES[2]])
    with pytest.raises(ClassConflictError):
        service.add_classes([EXTRA_NAMES[2]])


def test_delete_class(service):
    count = service.bundle.table.num_classes
    service.add_classes([EXTRA_NAMES[0], EXTRA_NAMES[1]])
    first_id = service.bundle.table[count].id
    weights = service.bundle.classifier.linear.weight.detach().clone()  # (C+3, D)
    result = service.delete_class(EXTRA_NAMES[0])
    assert result["removed"]["name"] == EXTRA_NAMES[0] and result["vocabulary_version"] == 2
    table = service.bundle.table
    assert table.num_classes == count + 1 and table[count].name == EXTRA_NAMES[1]
    kept = torch.cat([weights[:count], weights[count + 1 :]])
    assert torch.equal(service.bundle.classifier.linear.weight, kept)
    with pytest.raises(ClassConflictError, match="trained vocabulary"):
        service.delete_class(table[0].name)
    with pytest.raises(UnknownClassError):
        service.delete_class(EXTRA_NAMES[0])
    service.add_classes([EXTRA_NAMES[3]])  # ids are not reused after a removal
    assert service.bundle.table[-1].id == first_id + 2


def test_projection_bundle_adds_without_fit(bundle_dirs):
    service = SegmentationService(Bundle.load(bundle_dirs["projection"]))
    count = service.bundle.table.num_classes
    result = service.add_classes([EXTRA_NAMES[3]], isthing=False)
    assert result["fit_steps"] == 0
    classifier = service.bundle.classifier
    assert torch.allclose(classifier.class_semantics[-1], torch.as_tensor(service.bundle.class_semantics[-1]))
    assert classifier.num_classes == count + 1
    service.delete_class(EXTRA_NAMES[3])
    assert service.bundle.classifier.num_classes == count


def test_bundle_without_reference_features_refuses(bundle_dirs):
    bundle = Bundle.load(bundle_dirs["linear"])
    bundle.reference_embeddings = bundle.reference_labels = None
    with pytest.raises(UnprocessableError, match="reference features"):
        SegmentationService(bundle).add_classes([EXTRA_NAMES[0]])


# ---- health, batching choice, safe loading ----------------------------------------------


def test_health_check_runs_the_model_and_catches_broken_weights(bundle_dirs):
    from pading.serving.service import UnhealthyError

    service = SegmentationService(Bundle.load(bundle_dirs["linear"]))
    service.health_check()  # a healthy model passes
    with torch.no_grad():
        next(service.bundle.segmenter.parameters()).fill_(float("nan"))
    with pytest.raises(UnhealthyError, match="non-finite"):
        service.health_check()


def test_batching_auto_is_on_only_with_a_gpu():
    from pading.config import ServeConfig, load_config
    from pading.serving.service import resolve_batching

    assert ServeConfig().batching == "auto"
    assert resolve_batching("auto", "cpu") is False and resolve_batching("auto", torch.device("cuda")) is True
    assert resolve_batching("on", "cpu") is True and resolve_batching("off", "cuda") is False
    # YAML's on/off/true/false all mean on/off
    assert [load_config(None, [f"serve.batching={v}"]).serve.batching for v in ("on", "false", "auto")] == [
        "on", "off", "auto"]


class Payload:
    """Unpickling this would create a file: the marker that pickled code ran."""

    marker = None

    def __reduce__(self):
        return (open, (str(Payload.marker), "w"))


def test_pickled_weights_are_refused_and_never_run(bundle_dirs, tmp_path):
    import shutil

    from pading.errors import DataError, MissingWeightsError
    from pading.model.segmenter import _read_state_dict

    Payload.marker = tmp_path / "pickle-ran"
    checkpoint = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload()}, checkpoint)
    with pytest.raises(MissingWeightsError, match="weights_only=True"):
        _read_state_dict(checkpoint)  # the path of segmenter.weights / backbone_weights
    assert not Payload.marker.exists()
    # A bundle whose safetensors file is replaced by a pickle.
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dirs["linear"], bundle)
    torch.save({"payload": Payload()}, bundle / "classifier.safetensors")
    with pytest.raises(DataError, match="classifier.safetensors.*not a safetensors"):
        Bundle.load(bundle)
    assert not Payload.marker.exists()


def test_every_torch_load_is_weights_only():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in [*root.glob("pading/**/*.py"), *root.glob("pipelines/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), calls
