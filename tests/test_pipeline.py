"""End-to-end runs of the Ray pipeline on the smoke config (marked slow; run in CI).

One module fixture writes a small synthetic dataset with one corrupt image and one
broken annotation, then runs ``python pipelines/full.py`` on it through a local Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pading.bundle import CLASSIFIER_WEIGHTS_FILE, SEGMENTER_DIR

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
# The module's run: enough pretraining steps that a SIGINT can land in the middle of them
# (test_interrupted_full_run_resumes_and_repeats_exactly). A checkpoint costs about 2 s (Ray
# Train's report), 30 steps of the smoke model about 2 s: checkpoints are kept few. The stage
# saves a weight average (pretrain.ema_decay), so the resumed runs below also show that the
# average survives a failure exactly.
RUN_SETTINGS = ["--set", "pretrain.iterations=60", "--set", "pretrain.checkpoint_every=30",
                "--set", "pretrain.ema_decay=0.5"]

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args: list[str], tmp: Path, timeout: int = 900, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = _env(tmp)
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-8000:])
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """The smoke dataset with a corrupt val image and an unknown category in one train annotation."""
    from pading.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("data") / "coco"
    write_synthetic_dataset(root, num_train=40, num_val=16, image_size=64, seed=0)
    val_images = sorted((root / "val2017").glob("*.jpg"))
    corrupt = val_images[3]
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated JPEG
    train_json = root / "annotations" / "panoptic_train2017.json"
    data = json.loads(train_json.read_text())
    broken = data["annotations"][5]
    broken["segments_info"][0]["category_id"] = 9999
    train_json.write_text(json.dumps(data))
    return {"root": root, "corrupt": corrupt, "broken_image_id": broken["image_id"]}


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("run")
    output = tmp / "out"
    started = time.time()
    # A one-CPU Ray: every stage must run while its actor or worker holds the only CPU (prepare's
    # and evaluate's Ray Data repartition task once waited forever for a second one).
    proc = _run(["pipelines/full.py", "--config", str(SMOKE), "--output", str(output), "--set", f"data.root={dataset['root']}",
                 *RUN_SETTINGS, "--set", "ray.local_cpus=1"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "output": output, "stdout": proc.stdout, "stderr": proc.stderr, "seconds": time.time() - started}


def test_results_json_has_finite_tables(full_run):
    results = json.loads((full_run["output"] / "results.json").read_text())
    for task, metrics in (("panoptic", ("pq", "sq", "rq")), ("instance", ("map50", "recall100")), ("semantic", ("miou",))):
        for group in ("seen", "unseen", "hm"):
            for metric in metrics:
                value = results[task][group][metric]
                assert math.isfinite(value) and 0.0 <= value <= 100.0, (task, group, metric, value)
    assert set(results["wall_seconds"]) == {"prepare", "pretrain", "extract", "generator", "evaluate"}
    assert "ZSP" in full_run["stdout"] and "HM" in full_run["stdout"]  # the printed table
    bundle = full_run["output"] / "generator" / "bundle"
    assert (bundle / CLASSIFIER_WEIGHTS_FILE).is_file() and (bundle / SEGMENTER_DIR / "segmenter.safetensors").is_file()
    assert list((full_run["output"] / "evaluate" / "overlays").glob("*.png"))


def test_bad_inputs_are_rejected_and_nothing_else_is_lost(full_run, dataset):
    output = full_run["output"]
    rejects = pq.read_table(output / "manifest" / "rejects.parquet").to_pylist()
    sources = " ".join(r["source"] + " " + r["key"] + " " + r["reason"] for r in rejects)
    assert dataset["corrupt"].name in sources
    assert f"{dataset['broken_image_id']}" in sources and "9999" in sources
    assert len(rejects) == 2, rejects
    info = json.loads((output / "manifest" / "_SUCCESS.json").read_text())["counts"]
    assert info["val"]["images"] == 15  # 16 - the corrupt one
    assert info["train"]["images"] + info["train"]["seen_only_filtered"] == 39  # 40 - the broken one
    assert info["train"]["seen_only_filtered"] > 0


def test_mlflow_has_parent_and_stage_runs(full_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{full_run['tmp'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pading-smoke"], output_format="list")
    names = {r.info.run_name for r in runs}
    assert {"pading-smoke", "prepare", "pretrain", "extract", "generator", "evaluate"} <= names
    parent = next(r for r in runs if r.info.run_name == "pading-smoke")
    assert "panoptic.hm.pq" in parent.data.metrics and parent.data.params["generator.num_primitives"] == "32"
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    history = mlflow.tracking.MlflowClient().get_metric_history(pretrain.info.run_id, "loss")
    assert len(history) == 60  # one point per pretraining step (RUN_SETTINGS)


def test_the_pretraining_stage_computes_what_the_library_loop_computes(full_run, dataset):
    """The Ray Train stage on one worker and :func:`pading.training.pretrain.fit_segmenter` in
    this process, from the same manifest and seed: the same history and the same weights."""
    from pading.config import load_config
    from pading.model.segmenter import Segmenter
    from pading.run import load_table, read_manifest
    from pading.training.pretrain import SegmenterTrainer, fit_segmenter

    output = full_run["output"]
    config = load_config(SMOKE, [f"data.root={dataset['root']}", *RUN_SETTINGS[1::2]])
    table = load_table(output)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the stage's one-CPU worker
    try:
        torch.manual_seed(config.seed)
        trainer = SegmenterTrainer(Segmenter(config.segmenter, table.num_classes), config)
        fit_segmenter(trainer, read_manifest(output, "train"), table)
    finally:
        torch.set_num_threads(threads)
    stage = [json.loads(line) for line in (output / "pretrain" / "history.jsonl").read_text().splitlines()]
    assert len(stage) == len(trainer.history) == config.pretrain.iterations
    for ours, theirs in zip(trainer.history, stage):
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - {"elapsed_s"}:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (ours["step"], key)
    saved = Segmenter.load(output / "pretrain" / "segmenter").state_dict()
    for key, value in trainer.result().state_dict().items():  # the weight average (RUN_SETTINGS)
        assert torch.allclose(value.float(), saved[key].float(), rtol=1e-5, atol=1e-7), key


def test_the_driver_imports_extractions_model_code_while_pretraining_trains(full_run):
    """pipelines/full.py hands the extract stage's warm-up to the pretraining stage's fit: the
    driver imports the segmenter's modules while the pretraining trains (it extracts the smoke
    run's few images itself), and starts Ray before the first stage."""
    log = full_run["stderr"]
    line = log.index("while it trains, the driver runs import_backend")
    assert log.index("=== stage pretrain ===") < line < log.index("=== stage extract ===")
    assert log.count("while it trains, the driver runs") == 1
    assert log.index("Started a local Ray instance") < log.index("=== stage prepare ===")


def test_second_run_skips_finished_stages(full_run, dataset):
    before = (full_run["output"] / "results.json").read_text()
    proc = _run(["pipelines/full.py", "--config", str(SMOKE), "--output", str(full_run["output"]),
                 "--set", f"data.root={dataset['root']}", *RUN_SETTINGS], full_run["tmp"])
    assert proc.returncode == 0
    log = proc.stdout + proc.stderr
    for stage in ("prepare", "pretrain", "extract", "generator", "evaluate"):
        assert f"{stage}: already done" in log, stage
    assert "Started a local Ray instance" not in log  # nothing to run: full.py starts no Ray
    assert "stage wall seconds: start-up " in proc.stdout  # the start-up is reported apart from the stages
    after = json.loads((full_run["output"] / "results.json").read_text())
    assert {k: v for k, v in after.items() if k != "wall_seconds"} == {
        k: v for k, v in json.loads(before).items() if k != "wall_seconds"}


def test_the_driver_runs_every_stage_in_a_frozen_heap(full_run, tmp_path, monkeypatch):
    """run_all freezes the driver's start-up objects for the stages (pading.training.heap: a full
    collection of them took 0.2 s, once landing in prepare) and unfreezes them after."""
    import gc

    from pading.config import load_config
    from pading.run import RunLayout
    from pipelines import full

    output = tmp_path / "out"
    shutil.copytree(full_run["output"], output, ignore=shutil.ignore_patterns("mlruns"))
    config = load_config(RunLayout(output).config)
    config.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    frozen = {}
    for name, module in full.STAGE_MODULES.items():
        def run(config, output, force=False, _name=name, _run=module.run):
            frozen[_name] = gc.get_freeze_count() > 0
            return _run(config, output, force=force)
        monkeypatch.setattr(module, "run", run)
    full.run_all(config, output)  # every stage done before: no Ray, each stage's run returns its record
    assert frozen == {name: True for name in full.STAGES}
    assert gc.get_freeze_count() == 0


def test_a_rerun_with_other_settings_is_warned_that_finished_stages_are_kept(full_run, caplog):
    """Finished stages are skipped on a rerun whatever the settings: a rerun that changes what
    they compute says so, naming the settings; one that changes only where the run executes
    (or nothing) does not."""
    from pading.config import apply_overrides, load_config
    from pading.run import RunLayout
    from pipelines import full

    output = full_run["output"]
    config = load_config(RunLayout(output).config)
    assert full.changed_settings(config, output) == []
    assert full.changed_settings(apply_overrides(config, {"ray.local_cpus": 2, "tracking.experiment": "x"}), output) == []
    changed = apply_overrides(config, {"segmenter.num_queries": config.segmenter.num_queries + 8})
    with caplog.at_level(logging.WARNING, logger="pipelines.full"):
        assert full.changed_settings(changed, output) == [
            f"segmenter.num_queries: {config.segmenter.num_queries} -> {config.segmenter.num_queries + 8}"]
    assert "were made with other settings" in caplog.text and "--force" in caplog.text
    assert full.changed_settings(changed, output, force=True) == []  # --force redoes them


def test_the_warning_comes_back_after_a_rerun_rewrote_the_runs_config(full_run, tmp_path):
    """A rerun writes its own settings to the run's config.yaml; each stage's success record
    keeps the settings it was made with, so the next rerun is still told."""
    from pading.config import apply_overrides, computed_settings, load_config, save_config
    from pading.run import RunLayout
    from pipelines import common, full

    output = tmp_path / "run"
    shutil.copytree(full_run["output"], output, ignore=shutil.ignore_patterns("mlruns"))
    config = load_config(RunLayout(output).config)
    for name in full.STAGES:
        assert common.stage_done(RunLayout(output).stage(name))["settings"] == computed_settings(config)
    changed = apply_overrides(config, {"segmenter.num_queries": config.segmenter.num_queries + 8})
    save_config(changed, RunLayout(output).config)  # what full.run_all does before its stages
    assert full.changed_settings(changed, output) == [
        f"segmenter.num_queries: {config.segmenter.num_queries} -> {config.segmenter.num_queries + 8}"]
    assert full.changed_settings(config, output) == []
    for name in full.STAGES:  # records from before stages kept their settings: the run's config.yaml decides
        record = common.stage_done(RunLayout(output).stage(name))
        del record["settings"]
        common.mark_done(RunLayout(output).stage(name), record)
    assert full.changed_settings(changed, output) == []
    assert full.changed_settings(config, output) == [
        f"segmenter.num_queries: {config.segmenter.num_queries + 8} -> {config.segmenter.num_queries}"]


def test_a_small_extraction_stays_on_torch(full_run):
    """``inference.runtime: auto`` with an actor's share far below pading.model.runtime's
    AUTO_MIN_IMAGES: the stage told its actor the share, and the actor did not export."""
    from pading.model.runtime import AUTO_MIN_IMAGES

    record = json.loads((full_run["output"] / "features" / "_SUCCESS.json").read_text())
    assert record["runtimes"] == ["torch"]
    assert record["where"] == "driver"  # 40 images, under ray.driver_max_images
    assert pq.read_table(full_run["output"] / "features").num_rows < AUTO_MIN_IMAGES * 16


def test_two_driver_workers_extract_what_one_extracts(full_run, dataset, tmp_path):
    """A small extraction in the driver segments its shards on as many threads as the local
    Ray's CPUs hold, each with an actor's one torch thread: two (``ray.local_cpus=2``) write
    the module's run's features (one worker) bit for bit, embeddings included."""
    output = tmp_path / "out"
    _copy_stages(full_run, output, "manifest", "pretrain")
    proc = _run(["pipelines/extract.py", "--config", str(SMOKE), "--output", str(output),
                 "--set", f"data.root={dataset['root']}", "--set", "ray.local_cpus=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((root / "features" / "_SUCCESS.json").read_text()) for root in (full_run["output"], output)]
    assert [(r["where"], r["driver_workers"]) for r in records] == [("driver", 1), ("driver", 2)]
    assert records[1]["shards"] >= 2
    ours, theirs = (pq.read_table(root / "features").sort_by([("image_id", "ascending"), ("query", "ascending")])
                    for root in (output, full_run["output"]))
    assert ours.num_rows > 0 and ours.equals(theirs)


def test_extract_is_idempotent(full_run, dataset):
    features = full_run["output"] / "features"
    before = pq.read_table(features).select(["image_id", "query"]).to_pylist()
    shards = sorted(features.glob("shard-*.parquet"))
    assert len(shards) >= 2
    shards[1].unlink()  # as if interrupted before this shard was written
    (features / "_SUCCESS.json").unlink()
    args = ["pipelines/extract.py", "--config", str(SMOKE), "--output", str(full_run["output"]),
            "--set", f"data.root={dataset['root']}"]
    proc = _run(args, full_run["tmp"])
    assert proc.returncode == 0
    assert f"{len(shards)} shards of 8 images, 1 to do" in proc.stdout + proc.stderr
    after = pq.read_table(features).select(["image_id", "query"]).to_pylist()
    assert sorted((r["image_id"], r["query"]) for r in after) == sorted((r["image_id"], r["query"]) for r in before)
    assert len({(r["image_id"], r["query"]) for r in after}) == len(after)  # no duplicates
    proc = _run(args, full_run["tmp"])  # complete output: nothing to do
    assert "extract: already done" in proc.stdout + proc.stderr


@pytest.mark.xdist_group("prepare-refusal")  # no module fixture: free to run beside the module's run
def test_prepare_refuses_a_split_without_usable_images(tmp_path):
    """Every train image unreadable: prepare exits non-zero with the counts and the most common
    reject reason, and does not mark its manifest finished (the rerun redoes it)."""
    from pading.data import write_synthetic_dataset

    root = tmp_path / "coco"
    write_synthetic_dataset(root, num_train=4, num_val=3, image_size=48, seed=1)
    for image in (root / "train2017").glob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    output = tmp_path / "out"
    proc = _run(["pipelines/prepare.py", "--config", str(SMOKE), "--output", str(output),
                 "--set", f"data.root={root}"], tmp_path, timeout=300)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "no usable image in the train split" in log
    assert "train: 0 usable, 4 rejected" in log and "val: 3 usable" in log
    assert "most common reject reasons: 4 x" in log
    assert not (output / "manifest" / "_SUCCESS.json").exists()


@pytest.mark.xdist_group("coco-tiny-run")  # no module fixture: free to run beside the module's run
def test_zsi_path_on_real_coco_tiny(coco_tiny, tmp_path):
    """configs/zsi_coco_tiny.yaml end to end on 100 real COCO images (crowd, polygons, RLE,
    grayscale): the seen-only filter on instances, every stage, instance Seen/Unseen/HM. The
    segmenter's inference runs on ONNX Runtime in the extraction and evaluation actors
    (``inference.runtime=onnxruntime``: ``auto`` keeps these small shares on torch)."""
    output = tmp_path / "zsi"
    shorter = ["--set", "pretrain.iterations=10", "--set", "pretrain.checkpoint_every=10", "--set",
               "generator_training.iterations=40", "--set", "generator_training.checkpoint_every=40"]
    proc = _run(["pipelines/full.py", "--config", "configs/zsi_coco_tiny.yaml", "--output", str(output),
                 "--set", f"data.root={coco_tiny}", "--set", "data.max_val_images=20", "--set",
                 "ray.local_dashboard=false", "--set", "inference.runtime=onnxruntime", *shorter], tmp_path)
    assert proc.returncode == 0
    results = json.loads((output / "results.json").read_text())
    assert set(results) == {"instance", "wall_seconds"}
    for group in ("seen", "unseen", "hm"):
        assert all(math.isfinite(v) for v in results["instance"][group].values())
    counts = json.loads((output / "manifest" / "_SUCCESS.json").read_text())["counts"]
    assert counts["train"]["seen_only_filtered"] > 0  # 17 unseen classes occur in COCO train images
    assert counts["train"]["images"] + counts["train"]["seen_only_filtered"] + counts["train"]["rejected"] == 50
    grayscale = [p for p in (coco_tiny / "val2017").glob("*.jpg") if _mode(p) == "L"]
    features = pq.read_table(output / "features")
    assert features.num_rows == counts["train"]["images"] * 16  # every usable image, 16 queries each
    assert json.loads((output / "features" / "_SUCCESS.json").read_text())["runtimes"] == ["onnxruntime"]
    if grayscale:
        assert counts["val"]["rejected"] == 0  # grayscale images are converted, not rejected


def _mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.mode


# ---- faults: real SIGKILL / SIGINT of real processes ----------------------------------


def _popen(args: list[str], tmp: Path, extra_env: dict | None = None) -> subprocess.Popen:
    log = open(tmp / "log.txt", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(tmp) | (extra_env or {}), stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _descendants_with(text: str, root: int) -> list[int]:
    """Processes below ``root`` (the run's driver, whose raylet starts Ray's workers) whose
    command line (Ray's process title) has ``text``: another test's Ray on this machine is not
    touched."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def below_root(pid: int) -> bool:
        seen = set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == root:
                return True
        return False

    return [pid for pid, title in titles.items() if text in title and below_root(pid)]


def _finish(proc: subprocess.Popen, tmp: Path, timeout: int = 600) -> str:
    proc.wait(timeout=timeout)
    return (tmp / "log.txt").read_text()


def _copy_stages(full_run, output: Path, *stages: str) -> None:
    for stage in stages:
        shutil.copytree(full_run["output"] / stage, output / stage)


def test_extraction_survives_a_sigkilled_actor(full_run, dataset, tmp_path):
    """One extraction actor is SIGKILLed after some shards: Ray Data restarts it and retries its
    shard; the stage completes with exactly the rows of the undisturbed run, no duplicates."""
    output = tmp_path / "out"
    _copy_stages(full_run, output, "manifest", "pretrain")
    proc = _popen(["pipelines/extract.py", "--config", str(SMOKE), "--output", str(output),
                   "--set", f"data.root={dataset['root']}", "--set", "ray.extract_shard_size=1",
                   "--set", "ray.driver_max_images=0"], tmp_path)  # actors, however few the images
    _wait_for(lambda: len(list((output / "features").glob("shard-*.parquet"))) >= 2, 300, "two shards", proc)
    (victim,) = _descendants_with("NodeRecordingExtractor", proc.pid)
    os.kill(victim, signal.SIGKILL)
    log = _finish(proc, tmp_path)
    assert proc.returncode == 0, log[-3000:]
    keys = ["image_id", "query", "label"]
    after = pq.read_table(output / "features").select(keys).to_pylist()
    before = pq.read_table(full_run["output"] / "features").select(keys).to_pylist()
    assert len({(r["image_id"], r["query"]) for r in after}) == len(after)  # no duplicates
    assert sorted(tuple(r.values()) for r in after) == sorted(tuple(r.values()) for r in before)
    record = json.loads((output / "features" / "_SUCCESS.json").read_text())
    assert record["shards"] == len(list((output / "features").glob("shard-*.parquet")))


def test_evaluation_through_an_actor_gives_what_the_driver_gave(full_run, dataset, tmp_path):
    """The module's run evaluated its val images in the driver (under ray.driver_max_images),
    one batch at a time (a one-CPU Ray); the same stage forced onto an actor pool writes the same
    predictions and results. (Its extraction is compared the same way by the SIGKILL test
    above, which forces actors; two driver workers by the two tests below.)"""
    output = tmp_path / "out"
    _copy_stages(full_run, output, "manifest", "pretrain", "features", "generator")
    proc = _run(["pipelines/evaluate.py", "--config", str(SMOKE), "--output", str(output), "--set",
                 f"data.root={dataset['root']}", *RUN_SETTINGS, "--set", "ray.driver_max_images=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in the driver" not in proc.stdout + proc.stderr
    assert re.search(r"evaluate: \d+ images in the driver", full_run["stdout"] + full_run["stderr"])
    ours = json.loads((output / "evaluate" / "_SUCCESS.json").read_text())
    theirs = json.loads((full_run["output"] / "evaluate" / "_SUCCESS.json").read_text())
    assert (theirs["driver_workers"], ours["driver_workers"]) == (1, 0)
    assert ours["results"] == theirs["results"] and ours["skipped"] == theirs["skipped"]
    theirs_dir, ours_dir = full_run["output"] / "evaluate" / "predictions", output / "evaluate" / "predictions"
    files = sorted(p.relative_to(theirs_dir) for p in theirs_dir.rglob("*.png"))
    assert files and files == sorted(p.relative_to(ours_dir) for p in ours_dir.rglob("*.png"))
    assert all((theirs_dir / f).read_bytes() == (ours_dir / f).read_bytes() for f in files)


def test_two_driver_workers_predict_what_one_predicts(full_run, tmp_path):
    """The evaluation's predictor, as the driver runs it on a small input: the val batches on
    two threads (pipelines.common.in_threads, one torch thread) give the rows and prediction
    PNGs that one thread gives, byte for byte."""
    from pading.config import load_config
    from pading.evaluation.predict import EvaluationPredictor
    from pading.run import read_manifest
    from pipelines.common import actor_threads, in_threads, output_rows

    config = load_config(str(SMOKE))
    rows = read_manifest(full_run["output"], "val")
    batches = [rows[start:start + 4] for start in range(0, len(rows), 4)]
    assert len(batches) >= 2
    written = {}
    for workers in (1, 2):
        out = tmp_path / f"workers-{workers}"
        with actor_threads(1):
            predict = EvaluationPredictor(str(full_run["output"] / "generator" / "bundle"), str(out), "panoptic",
                                          device="cpu", batch_size=config.ray.extract_batch_size,
                                          inference=config.inference, images=len(rows))
            result = output_rows(in_threads(predict, batches, workers))
        files = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
        written[workers] = (result, files)
    assert written[1][1] and written[1] == written[2]


def _registered_checkpoint(stage_dir: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint (its snapshot file lists
    it): a checkpoint directory alone may not be registered yet."""
    snapshots = list((stage_dir / "ray").rglob("checkpoint_manager_snapshot.json"))
    try:
        return bool(snapshots) and bool(json.loads(snapshots[0].read_text()).get("checkpoint_results"))
    except ValueError:  # being written
        return False


def _sigkill_worker_after_a_checkpoint(stage_dir: Path, proc: subprocess.Popen) -> int:
    """SIGKILL the rank-0 Ray Train worker process once a checkpoint is registered; its pid."""
    worker = stage_dir / "workers" / "rank-0.json"
    _wait_for(lambda: worker.is_file() and _registered_checkpoint(stage_dir), 300, "a registered checkpoint", proc)
    victim = json.loads(worker.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    return victim


def _increasing_steps(stage_dir: Path) -> list[int]:
    """The steps of the stage's history, checked to be strictly increasing (no step twice after a resume)."""
    history = [json.loads(line) for line in (stage_dir / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)), steps
    return steps


def test_pretrain_survives_two_worker_failures_and_resumes_its_weight_average(full_run, dataset, tmp_path):
    """One run of the module's settings (checkpoints every 20 steps here) and two failures:
    the Ray Train worker process is SIGKILLed once a checkpoint is registered, and a worker
    raises at step 41 (``PADING_TEST_FAIL_AT_STEP``). Each time FailureConfig restarts the
    worker group and it resumes from the last checkpoint; the history is gap-free, a new
    worker finished the job, and the stage saves exactly the weight average of the module's
    run, which was never interrupted (``pretrain.ema_decay``, RUN_SETTINGS: the average is
    checkpointed with the weights, and is not the last weights)."""
    from pading.model.segmenter import Segmenter
    from pading.run.checkpoint import read_checkpoint

    output = tmp_path / "resumed"
    _copy_stages(full_run, output, "manifest")
    stage_dir = output / "pretrain"
    proc = _popen(["pipelines/pretrain.py", "--config", str(SMOKE), "--output", str(output), "--set",
                   f"data.root={dataset['root']}", *RUN_SETTINGS, "--set", "pretrain.checkpoint_every=20"], tmp_path,
                  extra_env={"PADING_TEST_FAIL_AT_STEP": "41"})
    victim = _sigkill_worker_after_a_checkpoint(stage_dir, proc)
    log = _finish(proc, tmp_path)
    assert proc.returncode == 0, log[-3000:]
    assert "injected failure at step 41" in log
    assert "resumed from checkpoint at step 40" in log  # after the raised error
    assert log.count("resumed from checkpoint at step") >= 2  # and after the SIGKILL
    assert json.loads((stage_dir / "workers" / "rank-0.json").read_text())["pid"] != victim
    assert _increasing_steps(stage_dir) == list(range(1, 61))  # and none missing
    resumed = Segmenter.load(stage_dir / "segmenter").state_dict()
    whole = Segmenter.load(full_run["output"] / "pretrain" / "segmenter").state_dict()
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    info = json.loads((full_run["output"] / "pretrain" / "_SUCCESS.json").read_text())
    last = read_checkpoint(info["checkpoint"])[0]["model"]  # the last weights, not what was saved
    assert last.keys() == whole.keys()
    assert any(not torch.equal(whole[k], v) for k, v in last.items() if v.is_floating_point())


def test_generator_survives_a_sigkilled_train_worker(full_run, dataset, tmp_path):
    """The generator stage's Ray Train worker process is SIGKILLed after a checkpoint:
    FailureConfig restarts the worker group, it resumes from the last checkpoint and reaches
    the same final step with no step recorded twice."""
    output = tmp_path / "out"
    _copy_stages(full_run, output, "manifest", "pretrain", "features")
    stage_dir = output / "generator"
    proc = _popen(["pipelines/train_generator.py", "--config", str(SMOKE), "--output", str(output),
                   "--set", f"data.root={dataset['root']}", "--set", "generator_training.iterations=400",
                   "--set", "generator_training.checkpoint_every=100"], tmp_path)
    victim = _sigkill_worker_after_a_checkpoint(stage_dir, proc)
    log = _finish(proc, tmp_path)
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from checkpoint at step" in log
    assert json.loads((stage_dir / "workers" / "rank-0.json").read_text())["pid"] != victim  # a new worker finished
    assert _increasing_steps(stage_dir)[-1] == 400
    assert (stage_dir / "_SUCCESS.json").is_file()


def test_interrupted_full_run_resumes_and_repeats_exactly(full_run, dataset, tmp_path):
    """SIGINT to ``full.py`` while pretraining: it stops without marking the stage done. The
    rerun skips prepare, finishes pretraining and the other stages, and the whole run equals
    the module's undisturbed run in a fresh directory with the same seed: the same
    results.json (wall times aside) and the same training histories. So a run repeats exactly
    on one machine, and an interruption changes nothing."""
    output = tmp_path / "out"
    args = ["pipelines/full.py", "--config", str(SMOKE), "--output", str(output), "--set",
            f"data.root={dataset['root']}", *RUN_SETTINGS]
    proc = _popen(args, tmp_path)
    _wait_for(lambda: (output / "pretrain" / "workers" / "rank-0.json").is_file(), 300, "pretraining", proc)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    log = _finish(proc, tmp_path, timeout=120)
    assert proc.returncode != 0
    assert (output / "manifest" / "_SUCCESS.json").is_file()
    assert not (output / "pretrain" / "_SUCCESS.json").is_file() and not (output / "results.json").is_file()
    manifest_mtime = (output / "manifest" / "_SUCCESS.json").stat().st_mtime
    rerun = _run(args, tmp_path)
    assert rerun.returncode == 0, log[-2000:]
    text = rerun.stdout + rerun.stderr
    assert "prepare: already done" in text and "seed 0" in rerun.stdout
    assert (output / "manifest" / "_SUCCESS.json").stat().st_mtime == manifest_mtime
    first = json.loads((full_run["output"] / "results.json").read_text())
    again = json.loads((output / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == {k: v for k, v in first.items()
                                                                       if k != "wall_seconds"}
    drop = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    for stage in ("pretrain", "generator"):
        history = [json.loads(line) for line in (output / stage / "history.jsonl").read_text().splitlines()]
        before = [json.loads(line) for line in (full_run["output"] / stage / "history.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == sorted({h["step"] for h in history})  # gap-free, no repeats
        assert drop(history) == drop(before), stage
