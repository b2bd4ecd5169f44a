"""End to end through a local Ray (marked slow): a tiny Tune search (with a failing trial,
then a restore) and a tiny tables run, on a pipeline output built once per module with the
stages' run() (smoke config, synthetic data in tmp)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from pading.config import apply_overrides, load_config
from pading.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    """This module's own 2-CPU Ray. The session's Serve deployment (test_page, test_serve)
    holds a CPU for its replica; on a 2-core machine the pipeline's Train workers and the
    Tune trials would wait for it forever, so that deployment is stopped first (a later
    module that needs it starts it again)."""
    import ray
    from helpers import serve_app

    serve_app.stop()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline_output(tmp_path_factory, ray_session):
    from pading.data import write_synthetic_dataset
    from pipelines import extract, prepare, pretrain

    tmp = tmp_path_factory.mktemp("tune")
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    root = tmp / "coco"
    write_synthetic_dataset(root, num_train=40, num_val=16, image_size=64)
    output = tmp / "out"
    output.mkdir()
    config = load_config(SMOKE, [f"data.root={root}", f"output_dir={output}", "pretrain.iterations=2",
                                 "pretrain.checkpoint_every=2"])
    for stage in (prepare, pretrain, extract):
        stage.run(config, output)
    yield {"config": config, "output": output, "tmp": tmp}
    if previous_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous_uri


def test_pipeline_output_has_features_of_seen_classes_only(pipeline_output):
    from pading.data.features import read_features
    from pading.run import load_table

    features = read_features(pipeline_output["output"] / "features")
    table = load_table(pipeline_output["output"])
    assert len(features) > 0 and features.embeddings.shape[1] == pipeline_output["config"].segmenter.hidden_dim
    assert not set(features.labels.tolist()) & set(table.unseen_indices)


def test_the_generator_inputs_load_one_way(pipeline_output, tmp_path):
    """pading.run.inputs: what the generator stage, the search and the tables start from."""
    import numpy as np

    from pading.config import apply_overrides
    from pading.data.features import read_features
    from pading.run import load_table
    from pading.run.inputs import load_generator_inputs

    output, config = pipeline_output["output"], pipeline_output["config"]
    inputs = load_generator_inputs(config, output)
    table = load_table(output)
    assert inputs.table.to_records() == table.to_records() and inputs.base_classes == table.num_classes
    semantics = inputs.semantics()
    assert semantics.dtype == np.float32 and semantics.shape[0] == table.num_classes
    assert inputs.class_head().out_features == table.num_classes + 1
    assert len(inputs.features()) == len(read_features(output / "features"))

    names = tmp_path / "names.txt"
    names.write_text("lunar rover\nsea urchin\n")
    extended = apply_overrides(config, {"vocabulary.extra_unseen": str(names)})
    wider = load_generator_inputs(extended, output, extend_vocabulary=True)
    assert wider.table.num_classes == table.num_classes + 2 and wider.base_classes == table.num_classes
    assert wider.semantics().shape[0] == table.num_classes + 2
    assert load_generator_inputs(extended, output).table.num_classes == table.num_classes  # not asked to extend


def _mlflow_runs(tmp: Path, experiment: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.fixture(scope="module")
def search(pipeline_output):
    from pipelines import tune as tune_pipeline

    def never(*args, **kwargs):  # the default protocol must not read the val images
        raise AssertionError("pseudo_unseen protocol read val features")

    original = tune_pipeline.val_features
    tune_pipeline.val_features = never
    config = apply_overrides(pipeline_output["config"], {
        "tune.num_samples": 1, "tune.max_iterations": 20, "tune.report_every": 10, "tune.grace_period": 10,
        "tune.max_failures": 0,
        "tune.search_space": {"generator.num_primitives": {"grid": [0, 8, 16]},  # 0 is invalid: that trial fails
                              "losses.disentangle_weight": {"loguniform": [1e-5, 1e-2]}},
    })
    try:
        info = tune_pipeline.run(config, pipeline_output["output"])
    finally:
        tune_pipeline.val_features = original
    return {**pipeline_output, "info": info, "config": config}  # the search's config, not the pipeline's


def test_search_survives_a_failed_trial_and_writes_the_best_config(search):
    info, tune_dir = search["info"], search["output"] / "tune"
    trials = json.loads((tune_dir / "trials.json").read_text())
    assert len(trials) == 3 and info["trials"] == 3 and info["failed"] == 1
    failed = [t for t in trials if t["error"]]
    assert failed[0]["params"]["generator.num_primitives"] == 0 and "num_primitives" in failed[0]["error"]
    healthy = [t for t in trials if not t["error"]]
    for trial in healthy:  # ASHA (grace 10, reduction 2) may stop one of the two at step 10
        assert trial["step"] in (10, 20) and math.isfinite(trial["score"]) and 0.0 <= trial["score"] <= 100.0
        assert 0.0 <= trial["seen_accuracy"] <= 100.0 and 0.0 <= trial["unseen_accuracy"] <= 100.0
    assert any(t["step"] == 20 for t in healthy)
    best = info["best"]
    assert best["params"]["generator.num_primitives"] in (8, 16)
    assert best["score"] == max(t["score"] for t in trials if not t["error"])


def test_best_yaml_loads_into_full_py(search):
    from pipelines import common

    path = search["output"] / "tune" / "best.yaml"
    best = search["info"]["best"]["params"]
    args = argparse.Namespace(config=str(path), output=str(search["tmp"] / "best_out"), overrides=[])
    config, output = common.load(args)  # exactly how pipelines/full.py reads --config
    assert config.generator.num_primitives == best["generator.num_primitives"]
    assert config.losses.disentangle_weight == pytest.approx(best["losses.disentangle_weight"])
    assert config.data.root == search["config"].data.root and output.is_dir()
    assert load_config(path).name.endswith("-tuned")


def test_every_trial_is_a_nested_mlflow_run(search):
    runs = _mlflow_runs(search["tmp"], search["config"].tracking.experiment)
    parent = next(r for r in runs if r.info.run_id == search["info"]["mlflow_run_id"])
    assert parent.data.tags["protocol"] == "pseudo_unseen" and "warning" not in parent.data.tags
    assert math.isfinite(parent.data.metrics["best_score"])
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 3
    assert sorted(r.info.status for r in trials) == ["FAILED", "FINISHED", "FINISHED"]
    import mlflow

    client = mlflow.tracking.MlflowClient()
    for run in (r for r in trials if r.info.status == "FINISHED"):
        assert "generator.num_primitives" in run.data.params
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] in ([10], [10, 20])


def test_an_unfinished_search_is_restored(search, caplog):
    from pipelines import common
    from pipelines import tune as tune_pipeline

    tune_dir = search["output"] / "tune"
    before = {t["trial_id"] for t in json.loads((tune_dir / "trials.json").read_text())}
    common.clear_done(tune_dir)  # as if the search had been interrupted
    # other settings are refused before any work, naming what differs (Tune would restore the
    # old search space while the trials trained with the new split, and the runs kept old tags)
    other = apply_overrides(search["config"], {"tune.protocol": "paper"})
    with pytest.raises(ConfigError, match=r"tune.protocol: 'pseudo_unseen' -> 'paper'.*--fresh"):
        tune_pipeline.run(other, search["output"])
    assert not (tune_dir / "_SUCCESS.json").exists()
    with caplog.at_level(logging.INFO, logger="pipelines.tune"):
        info = tune_pipeline.run(search["config"], search["output"])
    assert "resuming the search" in caplog.text
    assert {t["trial_id"] for t in json.loads((tune_dir / "trials.json").read_text())} == before
    assert info["best"]["trial_id"] == search["info"]["best"]["trial_id"]
    runs = _mlflow_runs(search["tmp"], search["config"].tracking.experiment)
    assert sum(r.data.tags.get("mlflow.parentRunId") == info["mlflow_run_id"] for r in runs) == 3  # no duplicates


def test_tiny_tables_run(pipeline_output):
    from pipelines import tables as tables_pipeline

    config = apply_overrides(pipeline_output["config"], {"tables.iterations": 4, "tables.tsne_per_class": 6})
    info = tables_pipeline.run(config, pipeline_output["output"], seeds=(0, 1, 2), variants=("gmmn", "full"),
                               primitive_counts=(8, 32))
    out = pipeline_output["output"] / "tables"
    assert not info["failures"]
    for name, labels in (("ablation", ["GMMN generator", "+ alignment and disentanglement"]),
                         ("primitives", ["K = 8", "K = 32"])):
        markdown = (out / f"{name}.md").read_text()
        body = [line for line in markdown.splitlines() if line.startswith("| ") and "±" in line]
        assert [line.split(" | ")[0][2:] for line in body] == labels
        assert "ZSP HM PQ" in markdown and "ZSI HM mAP@0.5" in markdown and "ZSS HM mIoU" in markdown
        lines = (out / f"{name}.csv").read_text().splitlines()
        assert len(lines) == 3 and "panoptic.hm.pq_mean" in lines[0]
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 4
    for row in results["rows"]:
        assert row["seeds_done"] == [0, 1, 2] and len(row["per_seed"]) == 3
        assert len(row["metrics"]) == 15  # 5 metrics x seen/unseen/HM
        for stats in row["metrics"].values():
            assert math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and 0.0 <= stats["mean"] <= 100.0
    for figure in ("tsne.png", "ablation_hm_pq.png"):
        with Image.open(out / figure) as image:
            assert image.format == "PNG"
    runs = _mlflow_runs(pipeline_output["tmp"], config.tracking.experiment)
    parent = next(r for r in runs if r.info.run_id == info["mlflow_run_id"])
    rows = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(rows) == 4 and all("panoptic.hm.pq.mean" in r.data.metrics for r in rows)


def test_paper_protocol_is_tagged_in_mlflow(pipeline_output):
    import shutil

    from pipelines import tune as tune_pipeline

    output = pipeline_output["tmp"] / "out_paper"
    shutil.copytree(pipeline_output["output"], output, ignore=shutil.ignore_patterns("tune", "tables"))
    config = apply_overrides(pipeline_output["config"], {
        "tune.protocol": "paper", "tune.num_samples": 1, "tune.max_iterations": 10, "tune.report_every": 10,
        "tune.grace_period": 10, "tune.search_space": {"losses.alignment_temperature": {"uniform": [0.05, 0.5]}},
    })
    info = tune_pipeline.run(config, output)
    assert info["protocol"] == "paper" and math.isfinite(info["best"]["score"])
    runs = _mlflow_runs(pipeline_output["tmp"], config.tracking.experiment)
    mine = [r for r in runs if info["mlflow_run_id"] in (r.info.run_id, r.data.tags.get("mlflow.parentRunId"))]
    assert len(mine) == 2  # the search and its one trial
    for run in mine:
        assert run.data.tags["protocol"] == "paper" and "optimistic" in run.data.tags["warning"]


def test_a_request_the_cluster_cannot_meet_is_refused(ray_session, caplog):
    """A trial or task that no node can ever hold stops with the setting to change, instead
    of Ray waiting forever; one that fits passes without a warning."""
    from pipelines import common

    with caplog.at_level(logging.WARNING, logger="pipelines"):
        common.check_resources("a Tune trial", "tune.cpus_per_trial", 1, 0.0)
    assert not caplog.records
    with pytest.raises(common.ClusterTooSmall, match="tune.cpus_per_trial") as error:
        common.check_resources("a Tune trial", "tune.cpus_per_trial / tune.gpus_per_trial", 1, 64.0, 1.0)
    assert "only 0 fit" in str(error.value)


def test_a_whole_actor_pool_spreads_shards_over_a_late_starting_actor(ray_session, tmp_path):
    """The extract and segment stages' pool: every actor is up before shards are handed out
    and each holds one shard at a time, so a slow-starting actor (on another node) still
    gets work instead of the first actor up taking every shard (~2.4 s of work; the second
    actor is 4 s late)."""
    from pipelines import common

    class LateActor:  # defined here so Ray ships it by value (workers cannot import this test module)
        """Takes a shard, returns the pid that took it; the second actor built starts 4 s
        late (who came first is decided by creating a file)."""

        def __init__(self, marker: str):
            import time

            try:
                Path(marker).open("x").close()
            except FileExistsError:
                time.sleep(4.0)

        def __call__(self, batch: dict) -> dict:
            import time

            time.sleep(0.3)
            return {"shard": batch["shard"], "pid": [os.getpid()] * len(batch["shard"])}

    assert common.check_resources("2 actors", "ray.extract_concurrency", 2, 1.0, wait_s=common.RELEASE_GRACE_S)
    rows = common.shard_work([{"shard": i} for i in range(8)], whole_pool=True).map_batches(
        LateActor, fn_constructor_kwargs={"marker": str(tmp_path / "first")}, batch_size=1,
        compute=common.fixed_actor_pool(2), num_cpus=1).take_all()
    assert sorted(r["shard"] for r in rows) == list(range(8))
    per_actor = [sum(r["pid"] == pid for r in rows) for pid in {r["pid"] for r in rows}]
    assert len(per_actor) == 2, per_actor  # without the whole pool: one actor, all 8 shards
