"""The segmenter's inference runtimes (pading.model.runtime): ONNX Runtime, the CPU default,
gives what eager torch gives, in the forward pass and in every path that uses it (extraction,
evaluation, the service), and every call it cannot answer runs on torch."""

from __future__ import annotations

import json
import logging
import pickle
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.tiny_bundle import build_tiny_bundle
from PIL import Image

from pading.bundle import SEGMENTER_DIR, Bundle
from pading.config import ConfigError, DataConfig, InferenceConfig, ServeConfig, tiny_config
from pading.data import write_synthetic_dataset
from pading.data.manifest import read_split_index, to_rows
from pading.evaluation.predict import EvaluationPredictor
from pading.model import runtime as runtimes
from pading.model.runtime import AUTO_MIN_IMAGES, RuntimeUnavailable, use_runtime
from pading.model.segmenter import prepare_batch
from pading.run.extraction import FeatureExtractor
from pading.serving.service import SegmentationService

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random bundle (64 px) and a few synthetic images of other sizes."""
    root = tmp_path_factory.mktemp("runtime")
    bundle_dir = root / "bundle"
    build_tiny_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (50, 80), (97, 31), (20, 20))]
    return {"bundle_dir": bundle_dir, "images": images}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """The exported models of this module go to its own cache directory (one per module, so a
    test may read what an earlier one exported), not to the user's ~/.cache."""
    monkeypatch.setenv(runtimes.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "onnx-cache"))


class Calls:
    """Counts the calls that reach the attached ONNX Runtime session."""

    def __init__(self, segmenter):
        self.count = 0
        runtime = segmenter.inference_runtime
        original = runtime.__call__
        calls = self

        class Counting(type(runtime)):
            def __call__(self, pixel_values):
                calls.count += 1
                return original(pixel_values)

        runtime.__class__ = Counting


def _both(bundle_dir):
    """The same bundle twice, one on each runtime."""
    on_torch, on_onnx = Bundle.load(bundle_dir), Bundle.load(bundle_dir)
    size = on_torch.config.data.image_size
    assert use_runtime(on_torch.segmenter, "torch", size) == "torch" and on_torch.segmenter.inference_runtime is None
    assert use_runtime(on_onnx.segmenter, "onnxruntime", size) == "onnxruntime"
    return on_torch, on_onnx


@torch.no_grad()
def test_the_onnx_forward_pass_gives_the_torch_outputs_at_every_batch_size(tiny):
    on_torch, on_onnx = _both(tiny["bundle_dir"])
    calls = Calls(on_onnx.segmenter)
    size = on_torch.config.data.image_size
    for count in (1, 2, 5):  # the export traced a batch of 2
        pixels = prepare_batch(tiny["images"][:count] * 2, size)["pixel_values"][:count]
        expected, got = on_torch.segmenter(pixels), on_onnx.segmenter(pixels)
        for name in ("mask_logits", "query_embeddings", "class_logits"):
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-4, rtol=1e-4)
    assert calls.count == 3


def test_the_service_answers_the_same_segments_on_both_runtimes(tiny):
    on_torch, on_onnx = _both(tiny["bundle_dir"])
    torch_service = SegmentationService(on_torch, ServeConfig(runtime="torch"))
    onnx_service = SegmentationService(on_onnx, ServeConfig(runtime="onnxruntime"))
    assert (torch_service.runtime, onnx_service.runtime) == ("torch", "onnxruntime")
    calls = Calls(on_onnx.segmenter)
    images = tiny["images"]
    expected, got = torch_service.segment(images, "all"), onnx_service.segment(images, "all")
    assert calls.count == 1
    segments = 0
    for a, b in zip(expected, got):
        for task in ("panoptic", "instance", "semantic"):
            assert len(a[task]) == len(b[task])
            for x, y in zip(a[task], b[task]):
                assert {k: v for k, v in x.items() if k != "score"} == {k: v for k, v in y.items() if k != "score"}
                assert x.get("score", 0.0) == pytest.approx(y.get("score", 0.0), abs=1e-5)
                segments += 1
    assert segments > 10
    for task in ("panoptic", "instance", "semantic"):  # the id images too
        assert [r["png"] for r in torch_service.segment(images, task, "png")] == \
            [r["png"] for r in onnx_service.segment(images, task, "png")]


def test_calls_the_export_cannot_answer_run_on_torch(tiny, caplog):
    on_torch, on_onnx = _both(tiny["bundle_dir"])
    calls = Calls(on_onnx.segmenter)
    size = on_torch.config.data.image_size
    pixels = prepare_batch(tiny["images"][:2], size)["pixel_values"]
    with torch.no_grad():  # another input size than the export's
        other = torch.nn.functional.interpolate(pixels, size=(size // 2, size // 2))
        torch.testing.assert_close(on_onnx.segmenter(other).mask_logits, on_torch.segmenter(other).mask_logits)
    with torch.enable_grad():  # autograd needs torch's graph
        output = on_onnx.segmenter(pixels)
        assert output.mask_logits.requires_grad
    assert calls.count == 0
    with torch.no_grad():
        on_onnx.segmenter(pixels)
    assert calls.count == 1
    # a training-mode call runs on torch and updates the backbone's BatchNorm statistics: the
    # export is stale from then on and never used again
    for segmenter in (on_onnx.segmenter, on_torch.segmenter):
        segmenter.train()
        with torch.no_grad():
            segmenter(pixels)
        segmenter.eval()
    assert calls.count == 1
    with caplog.at_level(logging.WARNING, logger="pading.model.runtime"), torch.no_grad():
        got, expected = on_onnx.segmenter(pixels), on_torch.segmenter(pixels)
    assert calls.count == 1 and on_onnx.segmenter.inference_runtime is None
    assert "weights changed" in caplog.text
    torch.testing.assert_close(got.mask_logits, expected.mask_logits)


def test_a_second_service_over_the_same_model_keeps_its_export(tiny):
    bundle = Bundle.load(tiny["bundle_dir"])
    SegmentationService(bundle)
    first = bundle.segmenter.inference_runtime
    assert first is not None  # auto on CPU with onnxruntime installed
    SegmentationService(bundle)
    assert bundle.segmenter.inference_runtime is first


def test_a_copied_segmenter_runs_on_torch_and_can_export_again(tiny):
    bundle = Bundle.load(tiny["bundle_dir"])
    size = bundle.config.data.image_size
    use_runtime(bundle.segmenter, "auto", size)
    pixels = prepare_batch(tiny["images"][:3], size)["pixel_values"]
    with torch.no_grad():
        expected = bundle.segmenter(pixels).mask_logits
        copy = pickle.loads(pickle.dumps(bundle.segmenter))  # a session does not pickle
        torch.testing.assert_close(copy(pixels).mask_logits, expected, atol=1e-4, rtol=1e-4)
        assert copy.inference_runtime is None
        assert use_runtime(copy, "auto", size) == "onnxruntime"
        calls = Calls(copy)
        torch.testing.assert_close(copy(pixels).mask_logits, expected, atol=1e-4, rtol=1e-4)
    assert calls.count == 1


def test_without_onnxruntime_auto_uses_torch_and_onnxruntime_is_a_clear_error(tiny, monkeypatch, caplog):
    bundle = Bundle.load(tiny["bundle_dir"])
    size = bundle.config.data.image_size
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO, logger="pading.model.runtime"):
        assert use_runtime(bundle.segmenter, "auto", size) == "torch"
    assert "onnxruntime is not installed" in caplog.text and bundle.segmenter.inference_runtime is None
    with pytest.raises(RuntimeUnavailable, match="onnxruntime is not installed"):
        use_runtime(bundle.segmenter, "onnxruntime", size)
    with pytest.raises(ConfigError, match="unknown inference runtime 'tvm'"):
        use_runtime(bundle.segmenter, "tvm", size)


def test_an_export_that_disagrees_with_torch_is_not_used(tiny, monkeypatch):
    bundle = Bundle.load(tiny["bundle_dir"])
    size = bundle.config.data.image_size
    monkeypatch.setattr(runtimes, "_largest_difference", lambda *args: 0.5)
    assert use_runtime(bundle.segmenter, "auto", size) == "torch" and bundle.segmenter.inference_runtime is None
    with pytest.raises(RuntimeUnavailable, match="differs from torch by 5.00e-01"):
        use_runtime(bundle.segmenter, "onnxruntime", size)
    monkeypatch.setattr(runtimes, "_export", lambda *args: (_ for _ in ()).throw(RuntimeError("no GridSample")))
    assert use_runtime(bundle.segmenter, "auto", size) == "torch"
    with pytest.raises(RuntimeUnavailable, match="export failed .RuntimeError: no GridSample"):
        use_runtime(bundle.segmenter, "onnxruntime", size)


def test_auto_keeps_a_process_with_few_images_on_torch(tiny, caplog):
    """``auto`` exports only for a workload that pays the export back; ``onnxruntime`` always
    exports; a service without a known workload (the endpoint) exports under ``auto``."""
    size = Bundle.load(tiny["bundle_dir"]).config.data.image_size
    few, enough = AUTO_MIN_IMAGES - 1, AUTO_MIN_IMAGES
    bundle = Bundle.load(tiny["bundle_dir"])
    with caplog.at_level(logging.INFO, logger="pading.model.runtime"):
        assert use_runtime(bundle.segmenter, "auto", size, images=few) == "torch"
    assert bundle.segmenter.inference_runtime is None
    assert f"{few} image(s) in this process" in caplog.text
    assert use_runtime(bundle.segmenter, "auto", size, images=enough) == "onnxruntime"
    assert use_runtime(Bundle.load(tiny["bundle_dir"]).segmenter, "onnxruntime", size, images=1) == "onnxruntime"
    service = SegmentationService(Bundle.load(tiny["bundle_dir"]), ServeConfig(runtime="auto"))
    assert service.runtime == "onnxruntime"
    small_job = SegmentationService(Bundle.load(tiny["bundle_dir"]), ServeConfig(runtime="auto"), images=few)
    assert small_job.runtime == "torch"


def test_the_stage_classes_pass_their_share_of_images_on(synthetic_run, tmp_path):
    """Extraction's and evaluation's actors are told their share (pipelines/ pass it): a small
    one stays on torch under ``auto``, an unknown one exports."""
    bundle, rows = synthetic_run["bundle"], synthetic_run["train"]
    config = tiny_config(data={"image_size": 64})  # inference.runtime: auto
    for images, expected in ((len(rows), "torch"), (None, "onnxruntime")):
        extractor = FeatureExtractor(config, str(synthetic_run["bundle_dir"] / SEGMENTER_DIR), bundle.table.to_records(),
                                     rows, str(tmp_path / f"x{images}"), "ckpt", "cpu", images=images)
        assert extractor.runtime == expected
        predictor = EvaluationPredictor(str(synthetic_run["bundle_dir"]), str(tmp_path / f"e{images}"), "panoptic",
                                        device="cpu", images=images)
        assert predictor.runtime == expected


def _no_export(*args):
    raise AssertionError("exported although the cache holds this model")


def test_a_second_process_over_the_same_weights_reads_the_cached_export(tiny, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(runtimes.CACHE_ENV, str(tmp_path / "cache"))
    first = Bundle.load(tiny["bundle_dir"])
    size = first.config.data.image_size
    assert use_runtime(first.segmenter, "onnxruntime", size) == "onnxruntime"
    (cached,) = (tmp_path / "cache").glob("segmenter-*.onnx")
    assert runtimes.content_key(first.segmenter, size) in cached.name
    monkeypatch.setattr(runtimes, "_export", _no_export)
    again = Bundle.load(tiny["bundle_dir"])  # a new segmenter, the same weights (another process)
    with caplog.at_level(logging.INFO, logger="pading.model.runtime"):
        assert use_runtime(again.segmenter, "onnxruntime", size) == "onnxruntime"
    assert f"read from {cached}" in caplog.text
    pixels = prepare_batch(tiny["images"][:1], size)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(again.segmenter(pixels).mask_logits, first.segmenter(pixels).mask_logits)
    changed = Bundle.load(tiny["bundle_dir"])
    with torch.no_grad():
        next(changed.segmenter.mask2former.model.parameters()).add_(1e-3)  # other weights: another key
    assert runtimes.content_key(changed.segmenter, size) != runtimes.content_key(again.segmenter, size)
    with pytest.raises(RuntimeUnavailable, match="exported although the cache holds"):
        use_runtime(changed.segmenter, "onnxruntime", size)


def test_a_damaged_cached_model_is_exported_again(tiny, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(runtimes.CACHE_ENV, str(tmp_path / "cache"))
    bundle = Bundle.load(tiny["bundle_dir"])
    size = bundle.config.data.image_size
    use_runtime(bundle.segmenter, "onnxruntime", size)
    (cached,) = (tmp_path / "cache").glob("segmenter-*.onnx")
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # cut short
    with caplog.at_level(logging.WARNING, logger="pading.model.runtime"):
        assert use_runtime(Bundle.load(tiny["bundle_dir"]).segmenter, "onnxruntime", size) == "onnxruntime"
    assert "is unusable" in caplog.text and "exporting again" in caplog.text
    assert cached.read_bytes() == good  # replaced by the new export (the exporter is deterministic)


def test_without_a_usable_cache_every_process_exports(tiny, monkeypatch, tmp_path):
    size = Bundle.load(tiny["bundle_dir"]).config.data.image_size
    monkeypatch.setenv(runtimes.CACHE_ENV, "")
    assert runtimes.cache_dir() is None
    assert use_runtime(Bundle.load(tiny["bundle_dir"]).segmenter, "onnxruntime", size) == "onnxruntime"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(runtimes.CACHE_ENV, str(blocker / "cache"))  # cannot be created
    assert use_runtime(Bundle.load(tiny["bundle_dir"]).segmenter, "onnxruntime", size) == "onnxruntime"
    assert list(tmp_path.iterdir()) == [blocker]


def test_the_cache_keeps_the_most_recently_used_models(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv(runtimes.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(runtimes, "CACHE_KEEP", 2)
    segmenters = {size: Bundle.load(tiny["bundle_dir"]).segmenter for size in (64, 96, 128)}
    files = {}
    for size, segmenter in segmenters.items():  # three input sizes: three models
        use_runtime(segmenter, "onnxruntime", size)
        (files[size],) = (tmp_path / "cache").glob(f"segmenter-{size}px-*.onnx")
        time.sleep(0.05)  # distinct modification times
        if size == 96:  # 64 used again after 96 was written: 96 is now the least recently used
            use_runtime(Bundle.load(tiny["bundle_dir"]).segmenter, "onnxruntime", 64)
            time.sleep(0.05)
    assert sorted((tmp_path / "cache").glob("segmenter-*.onnx")) == sorted([files[64], files[128]])


def test_the_runtime_settings_accept_only_the_three_runtimes():
    assert tiny_config().inference.runtime == tiny_config().serve.runtime == tiny_config().segment.runtime == "auto"
    for section in ("inference", "serve", "segment"):
        with pytest.raises(ConfigError, match="runtime"):
            tiny_config(**{section: {"runtime": "tensorrt"}})


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_train=6, num_val=6, image_size=64, seed=5)
    data = DataConfig(root=str(root), image_size=64)
    bundle_dir = tmp_path_factory.mktemp("bundle") / "bundle"
    bundle = build_tiny_bundle(bundle_dir, data={"root": str(root)})
    train = to_rows(read_split_index(data, "train")[0], bundle.table)
    val = to_rows(read_split_index(data, "val")[0], bundle.table)
    return {"bundle_dir": bundle_dir, "bundle": bundle, "train": train, "val": val}


def test_extraction_writes_the_same_features_on_both_runtimes(synthetic_run, tmp_path):
    bundle, rows = synthetic_run["bundle"], synthetic_run["train"]
    written = {}
    for runtime in ("torch", "onnxruntime"):
        config = tiny_config(data={"image_size": 64}, inference={"runtime": runtime})
        extractor = FeatureExtractor(config, str(synthetic_run["bundle_dir"] / SEGMENTER_DIR),
                                     bundle.table.to_records(), rows, str(tmp_path / runtime), "ckpt", "cpu")
        assert extractor.runtime == runtime
        extractor({"shard": [0], "image_ids": [[r["image_id"] for r in rows]]})
        written[runtime] = pq.read_table(tmp_path / runtime / "shard-00000.parquet").to_pydict()
    assert written["torch"]["image_id"] == written["onnxruntime"]["image_id"]
    # every ground-truth segment is matched to one query in both; which of two near-identical
    # queries of this random model gets it can swap (the demo's trained segmenter: 0 of 1,536
    # query labels differ, docs/performance.md)
    labels = {runtime: np.array(rows["label"]).reshape(len(rows_), -1) for runtime, rows in written.items()
              for rows_ in [synthetic_run["train"]]}
    np.testing.assert_array_equal(np.sort(labels["torch"], axis=1), np.sort(labels["onnxruntime"], axis=1))
    assert (labels["torch"] < bundle.table.no_object_index).sum() > 0
    np.testing.assert_allclose(np.array(written["onnxruntime"]["embedding"]), np.array(written["torch"]["embedding"]),
                               atol=1e-4)


def test_evaluation_predicts_the_same_images_on_both_runtimes(synthetic_run, tmp_path):
    rows = synthetic_run["val"]
    outputs = {}
    for runtime in ("torch", "onnxruntime"):
        inference = InferenceConfig(**{**synthetic_run["bundle"].config.inference.__dict__, "runtime": runtime})
        predictor = EvaluationPredictor(str(synthetic_run["bundle_dir"]), str(tmp_path / runtime), "panoptic",
                                        device="cpu", inference=inference)
        assert predictor.runtime == runtime
        outputs[runtime] = predictor(rows)
    assert not any(outputs["torch"]["error"])
    for row in rows:  # the written panoptic PNGs, pixel for pixel
        name = row["file_name"].rsplit(".", 1)[0] + ".png"
        for kind in ("panoptic", "semantic"):
            a = np.asarray(Image.open(tmp_path / "torch" / kind / name))
            np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "onnxruntime" / kind / name)))
    def without_scores(segments):
        return [{k: v for k, v in segment.items() if k != "score"} for segment in segments]

    for a, b in zip(outputs["torch"]["panoptic"], outputs["onnxruntime"]["panoptic"]):
        assert without_scores(json.loads(a)["segments_info"]) == without_scores(json.loads(b)["segments_info"])
    for a, b in zip(outputs["torch"]["instances"], outputs["onnxruntime"]["instances"]):
        assert without_scores(json.loads(a)) == without_scores(json.loads(b))
