"""Pieces of the run layer that need no Ray: paths resolved at load, the batch regime of
the training stages, the features reader."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pading.config import load_config
from pading.data.features import epoch_indices, read_features
from pading.errors import ConfigError
from pipelines import common
from pipelines.pretrain import micro_batch_rows

SMOKE = common.REPO_ROOT / "configs" / "smoke.yaml"


def _args(output=None, overrides=()):
    return argparse.Namespace(config=str(SMOKE), output=output, overrides=list(overrides))


def test_synthetic_data_and_mlflow_store_live_under_the_output(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, output = common.load(_args(str(tmp_path / "out")))
    assert output == tmp_path / "out"
    assert config.data.root == str(tmp_path / "out" / "datasets" / "synthetic-coco-smoke")  # every node sees it
    assert config.tracking.tracking_uri == f"sqlite:///{tmp_path / 'out' / 'mlruns' / 'mlflow.db'}"


def test_relative_paths_are_refused_inside_a_ray_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what the job supervisor sets for the driver
    with pytest.raises(ConfigError, match="--output"):
        common.load(_args("outputs/x"))
    with pytest.raises(ConfigError, match="output_dir"):
        common.load(_args())  # smoke.yaml's output_dir is relative
    with pytest.raises(ConfigError, match="data.root"):
        common.load(_args(str(tmp_path / "out"), ["data.synthetic=null", "data.root=datasets/coco"]))
    config, _ = common.load(_args(str(tmp_path / "out")))  # synthetic data under the absolute output: fine
    assert config.data.root.startswith(str(tmp_path / "out"))


def test_an_actor_that_does_not_see_the_drivers_output_stops_with_a_message(tmp_path, monkeypatch):
    """Actors check the file the driver wrote before starting them (segment.py's job.json,
    extraction's _PLAN.json): on a node that does not share the output they would write
    results the driver never reads."""
    import threading

    from pipelines.segment import SegmenterActor

    marker = tmp_path / "job.json"
    monkeypatch.setattr(common, "SHARED_WAIT_S", 0.3)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"the --output folder .* is not shared with this node"):
        SegmenterActor(bundle_dir=str(tmp_path / "bundle"), output_dir=str(tmp_path), task="panoptic")
    assert time.monotonic() - started >= 0.3  # it waited for a listing to catch up
    threading.Timer(0.2, lambda: marker.write_text("{}")).start()
    common.require_shared(marker, "the --output folder", wait_s=5.0)  # seen once it appears
    common.require_shared(marker, "the --output folder", wait_s=0.0)


def test_epochs_with_full_batches_only():
    batches = list(itertools.islice(epoch_indices(10, 4, seed=0, drop_last=True), 4))
    assert [len(b) for b in batches] == [4, 4, 4, 4]  # 2 full batches an epoch, the 2 left-over rows dropped
    assert len(set(np.concatenate(batches[:2]).tolist())) == 8
    with pytest.raises(Exception, match="cannot make batches"):
        next(epoch_indices(3, 4, seed=0, drop_last=True))


def test_the_global_pretraining_batch_must_split_evenly():
    config = load_config(SMOKE, ["pretrain.batch_size=4"])
    assert micro_batch_rows(config, 2) == 2
    assert micro_batch_rows(load_config(SMOKE, ["pretrain.batch_size=4", "pretrain.grad_accumulation=2"]), 2) == 1
    with pytest.raises(ConfigError, match="does not split"):
        micro_batch_rows(config, 3)


def test_features_are_read_in_image_query_order_whatever_the_files(tmp_path):
    def shard(path, image_ids, queries):
        n = len(image_ids)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * n, dtype=np.float32)), 2)
        pq.write_table(pa.table({"image_id": image_ids, "query": queries, "embedding": embedding,
                                 "label": np.arange(n, dtype=np.int32)}), path)

    shard(tmp_path / "shard-00000.parquet", [5, 5, 1], [1, 0, 0])
    shard(tmp_path / "shard-00001.parquet", [3, 1], [0, 1])
    features = read_features(tmp_path)
    assert features.image_ids.tolist() == [1, 1, 3, 5, 5]
    assert features.labels.tolist() == [2, 1, 0, 1, 0]  # (1,0), (1,1), (3,0), (5,0), (5,1)
    reversed_files = read_features([tmp_path / "shard-00001.parquet", tmp_path / "shard-00000.parquet"])
    assert np.array_equal(reversed_files.embeddings, features.embeddings)


def test_one_data_order_seed_for_the_stage_and_the_search():
    """Worker r of the generator stage and the search draw their batches through
    ``feature_batches(..., rank=r)``: rank 0 (a one-worker stage, the search) in the run
    seed's order, other ranks in their own."""
    import torch

    from pading.data.features import FeatureArrays, data_order_seed, feature_batches

    arrays = FeatureArrays(embeddings=np.arange(40, dtype=np.float32).reshape(20, 2),
                           labels=np.arange(20, dtype=np.int64), image_ids=np.zeros(20, dtype=np.int64))
    first = lambda rank: next(feature_batches(arrays, 5, seed=7, rank=rank))[1]  # noqa: E731
    assert torch.equal(first(0), torch.from_numpy(np.sort(next(epoch_indices(20, 5, 7)))))
    assert not torch.equal(first(0), first(1))
    assert data_order_seed(7) == 7 and data_order_seed(7, 1) != data_order_seed(7, 0)
    with pytest.raises(ValueError):
        data_order_seed(7, -1)

    from pading.run import search

    names = search.train_generator.__code__.co_names
    assert "feature_batches" in names and "epoch_indices" not in names  # the search has no order of its own


def test_the_manifest_is_written_next_to_its_reader(tmp_path, monkeypatch):
    """pading.run.readers: what write_manifest writes, read_manifest / read_rejects / load_table
    read back; a split larger than a part is written in parts; an empty split is readable."""
    from pading.classes import ClassTable
    from pading.data.manifest import MANIFEST_SCHEMA
    from pading.run import readers

    table = ClassTable.from_records([{"id": 1, "name": "cat", "unseen": False, "isthing": True},
                                     {"id": 2, "name": "tree", "unseen": True, "isthing": False}])
    row = {name: None for name in MANIFEST_SCHEMA.names}
    rows = [{**row, "image_id": i, "split": "train", "image_path": f"{i}.jpg"} for i in (5, 3, 9)]
    rejects = [{"source": "a.json", "key": "image_id=7", "reason": "truncated"}]
    monkeypatch.setattr(readers, "MANIFEST_ROWS_PER_FILE", 2)
    readers.write_manifest(tmp_path, table, {"train": rows, "val": []}, rejects)
    assert [r["image_id"] for r in readers.read_manifest(tmp_path, "train")] == [3, 5, 9]
    assert len(list((tmp_path / "manifest" / "train").glob("part-*.parquet"))) == 2
    assert readers.read_manifest(tmp_path, "val") == []
    assert readers.load_table(tmp_path).to_records() == table.to_records()
    assert [r["reason"] for r in readers.read_rejects(tmp_path)] == ["truncated"]


def test_the_overlays_show_the_evaluated_predictions(tmp_path):
    """pipelines/evaluate.py draws its overlays from the panoptic PNGs and segments the
    evaluation wrote (no second forward pass): a segment's pixels get its class colour, void
    stays the image, and an image without a prediction is passed over."""
    import json

    from PIL import Image

    from pading.classes import ClassTable
    from pading.evaluation.inference import panoptic_to_rgb
    from pading.serving.visualize import OVERLAY_ALPHA, class_colour
    from pipelines.evaluate import write_overlays

    table = ClassTable.from_records([{"id": 1, "name": "cat", "unseen": False, "isthing": True},
                                     {"id": 2, "name": "tree", "unseen": True, "isthing": False}])
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / "1.png")
    segment_ids = np.zeros((8, 8), np.int32)
    segment_ids[:, :4] = 3  # left half: segment 3 (a tree); right half void
    (tmp_path / "predictions" / "panoptic").mkdir(parents=True)
    Image.fromarray(panoptic_to_rgb(segment_ids)).save(tmp_path / "predictions" / "panoptic" / "1.png")
    panoptic = {"image_id": 1, "file_name": "1.png", "segments_info": [{"id": 3, "category_id": 2, "isthing": 0}]}
    rows = [{"image_id": 1, "image_path": str(tmp_path / "1.png"), "has_unseen": False},
            {"image_id": 2, "image_path": str(tmp_path / "missing.png"), "has_unseen": True}]
    result_rows = [{"image_id": 1, "panoptic": json.dumps(panoptic)}, {"image_id": 2, "panoptic": ""}]
    paths = write_overlays(rows, result_rows, tmp_path / "predictions", table, tmp_path / "overlays")
    assert [p.name for p in paths] == ["1.png"]
    picture = np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.int32)
    expected = (1 - OVERLAY_ALPHA) * 100 + OVERLAY_ALPHA * np.array(class_colour(table.index_of_id(2)))
    assert np.abs(picture[0, 0] - expected).max() <= 1  # the segment (drawn 4x: pixel (0, 0) is image pixel (0, 0))
    assert picture[0, 31].tolist() == [100, 100, 100]  # void: the image itself


def test_a_metric_history_is_logged_in_batches_with_every_step(tmp_path, monkeypatch):
    """Each row's finite numbers arrive at their step, across the batch limit (2,499 values in
    batches of at most 1,000), and no batch is over it."""
    import mlflow

    from pading.config import TrackingConfig
    from pading.run import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    batches = []
    real_log_batch = mlflow.tracking.MlflowClient.log_batch

    def counting_log_batch(self, run_id, metrics=(), **kwargs):
        batches.append(len(metrics))
        return real_log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_batch", counting_log_batch)
    tracking.setup(TrackingConfig(experiment="history"))
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.5, "bad": float("nan"), "nested": {"a": s}} for s in range(1, 834)]
    with pytest.raises(RuntimeError, match="active MLflow run"):
        tracking.log_metric_history(rows)
    with tracking.run("stage") as active:
        assert tracking.log_metric_history(rows) == 833
    assert sum(batches) == 3 * 833 and max(batches) <= tracking.METRICS_PER_BATCH and len(batches) == 3
    client = mlflow.tracking.MlflowClient()
    loss = sorted((m.step, m.value) for m in client.get_metric_history(active.info.run_id, "loss"))
    assert loss == [(s, 1.0 / s) for s in range(1, 834)]
    assert sorted(m.step for m in client.get_metric_history(active.info.run_id, "nested.a")) == list(range(1, 834))
    assert client.get_metric_history(active.info.run_id, "bad") == []


def test_only_few_images_on_a_ray_of_our_own_are_segmented_in_the_driver(monkeypatch):
    """Extraction and evaluation segment in the driver only below ray.driver_max_images, without
    GPUs, and never on a cluster (ray job submit or RAY_ADDRESS), whose head may offer no CPU."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.setattr(common, "in_ray_job", lambda: False)
    config = load_config("configs/demo.yaml")
    limit = config.ray.driver_max_images
    assert common.segment_in_driver(config, 249) and common.segment_in_driver(config, limit - 1)
    assert not common.segment_in_driver(config, limit)
    assert not common.segment_in_driver(load_config("configs/demo.yaml", ["ray.driver_max_images=0"]), 1)
    assert not common.segment_in_driver(load_config("configs/demo.yaml", ["ray.extract_gpus=1"]), 1)
    monkeypatch.setattr(common, "in_ray_job", lambda: True)
    assert not common.segment_in_driver(config, 1)
    monkeypatch.setattr(common, "in_ray_job", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not common.segment_in_driver(config, 1)
    with pytest.raises(ConfigError, match="driver_max_images"):
        load_config("configs/demo.yaml", ["ray.driver_max_images=-1"])


def test_the_driver_runs_a_block_on_an_actors_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not what an actor of 0.5 or 2 CPUs gets, whatever this machine's default
    try:
        with common.actor_threads(0.5):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        with common.actor_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert common.output_rows([{"a": [1, 2], "b": ["x", "y"]}, {"a": [3], "b": ["z"]}]) == [
        {"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "z"}]


def test_prepare_adds_validation_actors_only_for_large_inputs():
    """One actor per VALIDATION_IMAGES_PER_ACTOR images, at most twice ray.extract_concurrency:
    the demo's 600 images get none (the driver validates them in less time than an actor takes
    to start), a COCO-sized input gets the configured maximum."""
    from pipelines.prepare import VALIDATION_IMAGES_PER_ACTOR as per_actor
    from pipelines.prepare import validation_actors

    assert validation_actors(1, 1) == validation_actors(600, 1) == validation_actors(per_actor - 1, 4) == 0
    assert validation_actors(per_actor, 1) == 1
    assert validation_actors(2 * per_actor, 1) == 2
    assert validation_actors(3 * per_actor, 1) == 2  # at most twice the extraction actors
    assert validation_actors(123_000, 8) == 16
    assert validation_actors(5 * per_actor, 8) == 5


def test_queued_work_runs_while_the_next_fit_trains(monkeypatch, caplog):
    """pipelines.common.fit starts what during_next_fit queued before it waits for the trainer,
    so the work overlaps the training, and waits for it after: a training shorter than the work
    does not leave it running. A failing piece of work is logged, not raised in its thread nor
    in the stage. The queue is empty after (the next fit runs nothing again)."""
    import threading
    import time

    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    started = threading.Event()
    ran: list[str] = []

    def work():
        ran.append(threading.current_thread().name)
        started.set()

    def slow():
        time.sleep(0.5)
        ran.append("slow")

    def broken():
        raise ImportError("no such module")

    class Trainer:
        def __init__(self, wait: float):
            self.wait = wait

        def fit(self):  # True once the queued work has run: it must run while fit waits
            return started.wait(timeout=self.wait)

    common.during_next_fit(broken)
    common.during_next_fit(work)
    with caplog.at_level("WARNING", logger="pipelines"):
        assert common.fit(Trainer(30)) is True
    assert len(ran) == 1 and ran[0] != threading.main_thread().name
    assert "work run during training failed" in caplog.text and "no such module" in caplog.text
    assert uncaught == []
    started.clear()
    assert common.fit(Trainer(0.2)) is False  # nothing queued any more
    assert len(ran) == 1
    common.during_next_fit(slow)
    common.fit(Trainer(0))  # returns at once; the work takes 0.5 s
    assert ran[-1] == "slow"
    common.during_next_fit(work)
    common.drop_queued_work()
    assert common.fit(Trainer(0.2)) is False


def test_extraction_warms_up_only_when_the_driver_will_segment(tmp_path, monkeypatch):
    """pipelines/full.py asks the extract stage to warm up while pretraining runs: it queues the
    segmenter's import when the driver will extract (few images, a Ray of its own), and nothing
    when actors will, when the stage is done, or before there is a manifest."""
    from pading.classes import ClassTable
    from pading.data.manifest import MANIFEST_SCHEMA
    from pading.model.segmenter import import_backend
    from pading.run import RunLayout, readers
    from pipelines import extract

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(common, "in_ray_job", lambda: False)
    queued = []
    monkeypatch.setattr(common, "during_next_fit", queued.append)
    config = load_config(str(SMOKE))
    extract.warm_up(config, tmp_path)
    assert queued == []  # no manifest yet
    table = ClassTable.from_records([{"id": 1, "name": "cat", "unseen": False, "isthing": True}])
    row = {name: None for name in MANIFEST_SCHEMA.names}
    readers.write_manifest(tmp_path, table, {"train": [{**row, "image_id": i, "split": "train",
                                                        "image_path": f"{i}.jpg"} for i in range(3)], "val": []}, [])
    extract.warm_up(config, tmp_path)
    assert queued == [import_backend]
    extract.warm_up(load_config(str(SMOKE), ["ray.driver_max_images=0"]), tmp_path)
    extract.warm_up(load_config(str(SMOKE), ["ray.extract_gpus=1"]), tmp_path)
    assert queued == [import_backend]  # actors extract: the driver needs no model
    common.mark_done(RunLayout(tmp_path).features, {"rows": 1})
    extract.warm_up(config, tmp_path)
    assert queued == [import_backend]
    extract.warm_up(config, tmp_path, force=True)
    assert queued == [import_backend, import_backend]


def test_a_dataset_that_fails_to_write_at_start_fails_the_prepare_stage(tmp_path, monkeypatch):
    """pipelines/full.py writes the synthetic dataset while Ray starts, before any stage; when
    that fails, the run stops in the prepare stage with the writer's own error, and prepare does
    not run on a dataset half written."""
    from pipelines import full

    def no_space(config):
        raise OSError("No space left on device")

    ran = []
    monkeypatch.setattr(full.prepare, "ensure_dataset", no_space)
    monkeypatch.setattr(full.prepare, "run", lambda *a, **k: ran.append("prepare"))
    monkeypatch.setattr(common, "init_ray", lambda config=None: ran.append("ray"))
    config = load_config(str(SMOKE), [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        full.run_all(config, tmp_path / "out")
    assert ran == ["ray"]


def test_the_driver_segments_as_many_shards_at_once_as_its_cpus_hold_actors():
    """ray.local_cpus (else every core) over ray.cpus_per_worker, at least one, at most one per shard."""
    from pipelines.common import driver_workers

    def workers(shards, *settings):
        return driver_workers(load_config("configs/demo.yaml", list(settings)), shards)

    assert workers(8, "ray.local_cpus=2", "ray.cpus_per_worker=1") == 2
    assert workers(8, "ray.local_cpus=8", "ray.cpus_per_worker=2") == 4
    assert workers(3, "ray.local_cpus=8", "ray.cpus_per_worker=1") == 3
    assert workers(8, "ray.local_cpus=1", "ray.cpus_per_worker=2") == 1
    assert workers(8, "ray.cpus_per_worker=1") == min(8, os.cpu_count() or 1)


def test_in_threads_keeps_the_order_and_raises_the_first_error():
    import threading

    from pipelines.common import in_threads

    seen = set()

    def work(item):
        seen.add(threading.current_thread().name)
        time.sleep(0.01 * (5 - item))  # the first items finish last
        return item * item

    assert in_threads(work, list(range(5)), 3) == [0, 1, 4, 9, 16]
    assert len(seen) > 1 and all(name.startswith("driver-shard") for name in seen)
    assert in_threads(work, [2], 3) == [4]

    def fails(item):
        if item == 1:
            raise ValueError("shard 1")
        return item

    with pytest.raises(ValueError, match="shard 1"):
        in_threads(fails, [0, 1, 2], 2)


def test_a_stage_keeps_its_settings_and_says_when_a_rerun_differs(tmp_path, caplog):
    """The success record keeps the settings the stage was made with; a stage found done with
    other settings is skipped with a warning naming them, every time; a record without settings
    (an older run's) and a stage given none compare nothing."""
    from pading.config import apply_overrides, computed_settings

    config = load_config(common.REPO_ROOT / "configs" / "demo.yaml")
    settings = computed_settings(config)
    assert settings and not any(key.startswith(("ray.", "serve.", "tracking.")) for key in settings)
    stage = common.Stage("pretrain", tmp_path / "pretrain", settings=settings).start()
    info = stage.finish({"steps": 3})
    assert "settings" not in info  # the record keeps them; the stage's info does not carry them
    assert json.loads((tmp_path / "pretrain" / "_SUCCESS.json").read_text())["settings"] == settings

    assert common.Stage("pretrain", tmp_path / "pretrain", settings=settings).changed == []
    runtime_only = computed_settings(apply_overrides(config, {"ray.local_cpus": 1, "serve.port": 9}))
    assert common.Stage("pretrain", tmp_path / "pretrain", settings=runtime_only).changed == []
    other = computed_settings(apply_overrides(config, {"pretrain.iterations": config.pretrain.iterations + 1}))
    for _ in range(2):  # not only the first rerun
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines"):
            again = common.Stage("pretrain", tmp_path / "pretrain", settings=other)
        assert again.done is not None and again.done["steps"] == 3  # still skipped, its record kept
        assert again.changed == [f"pretrain.iterations: {config.pretrain.iterations} -> {config.pretrain.iterations + 1}"]
        assert "other settings (pretrain.iterations" in caplog.text and "--force redoes it" in caplog.text
    assert common.Stage("pretrain", tmp_path / "pretrain", force=True, settings=other).changed == []
    assert common.Stage("pretrain", tmp_path / "pretrain").changed == []

    common.mark_done(tmp_path / "old", {"steps": 3})  # a record from before settings were kept
    assert common.Stage("pretrain", tmp_path / "old", settings=other).changed == []
