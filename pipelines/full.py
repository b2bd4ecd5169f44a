"""The whole PADing pipeline: prepare -> pretrain -> extract -> generator -> evaluate,
under one MLflow parent run (one nested run per stage).

    python pipelines/full.py                       # embedded default: configs/demo.yaml
    python pipelines/full.py --config configs/zsp_coco.yaml --set ray.num_workers=8
    ray job submit --working-dir . -- python pipelines/full.py --config ...
    python pipelines/full.py --serve               # then serve the bundle (pipelines/serve.py)

Finished stages are skipped (``--force`` redoes them). Prints the Seen/Unseen/HM table
and writes ``<output>/results.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from pading.config import ExperimentConfig, computed_settings, load_config, save_config, setting_changes
from pading.run import RunLayout, tracking
from pading.run.reports import format_results_table
from pading.run.stage import SETTINGS_KEY, recorded_changes
from pading.training.heap import frozen_heap
from pipelines import common, evaluate, extract, prepare, pretrain, train_generator

logger = logging.getLogger("pipelines.full")

#: The stages in order, each a module with ``run(config, output, force=False) -> dict`` and optionally
#: ``track(info, output)`` (what it adds to its MLflow run) and ``warm_up(config, output, force=False)``
#: (called when the stage before it starts: work the driver can do ahead, see :func:`_warm_up`).
STAGE_MODULES = {"prepare": prepare, "pretrain": pretrain, "extract": extract, "generator": train_generator,
                 "evaluate": evaluate}
STAGES = tuple(STAGE_MODULES)


def run_stages(config: ExperimentConfig, output: Path, names=STAGES, force: bool = False) -> dict[str, dict]:
    """Run (or skip, when finished) the named stages in order, without MLflow runs."""
    return {name: STAGE_MODULES[name].run(config, output, force=force) for name in names}


def _log_stage(name: str, info: dict, output: Path, skipped: bool) -> None:
    """A stage's MLflow run: whether it was skipped, its record's numbers, and what the stage's
    own ``track(info, output)`` adds (histories, artifacts)."""
    tracking.log_params({"stage": name, "skipped": skipped})
    tracking.log_metrics({k: v for k, v in info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    track = getattr(STAGE_MODULES[name], "track", None)
    if track is not None:
        track(info, output)


def _warm_up(name: str | None, config: ExperimentConfig, output: Path, force: bool) -> None:
    """Let stage ``name`` (the next one; None: none) prepare while the current one runs: its
    module's ``warm_up``, if any (extraction queues its imports for the pretraining stage's wait,
    pipelines.common.during_next_fit)."""
    warm_up = getattr(STAGE_MODULES[name], "warm_up", None) if name else None
    if warm_up is not None:
        warm_up(config, output, force=force)


def _start(config: ExperimentConfig, output: Path, force: bool, stages) -> tuple:
    """The MLflow store (and the synthetic dataset, when prepare will run) is set up on a thread
    while Ray starts on the main thread, as Ray must. On the demo that took 3 s of MLflow and 5 s
    of prepare down to about 5 s (docs/performance.md, "The driver's waits put to use"). Ray
    starts here only when some stage will run. Returns the ``mlflow`` module and the error the
    dataset's writing raised, if any, which :func:`run_all` raises inside the prepare stage."""
    pending = [name for name in stages if force or common.stage_done(RunLayout(output).stage(name)) is None]
    if not pending:
        return tracking.setup(config.tracking), None

    def store_and_dataset():
        mlflow = tracking.setup(config.tracking)
        if "prepare" in pending:
            try:
                prepare.ensure_dataset(config)
            except Exception as error:  # noqa: BLE001 - raised in the prepare stage, see run_all
                return mlflow, error
        return mlflow, None

    return common.init_ray_while(config, store_and_dataset)


def changed_settings(config: ExperimentConfig, output: Path, stages=STAGES, force: bool = False) -> list[str]:
    """The settings (``key: old -> new``) in which ``config`` differs from those this run's
    finished stages were made with, logged as a warning naming the stages: they will be skipped,
    and their products are kept and do not follow the new settings (``--force`` redoes them).
    Each stage's success record keeps its own settings (pading.run.stage.Stage), so the warning
    comes back on every rerun until the stage is redone; a record from before that is compared
    with the run's ``config.yaml``. Settings of where the run executes are not compared."""
    done = {name: common.stage_done(RunLayout(output).stage(name)) for name in stages}
    done = {name: record for name, record in done.items() if record is not None}
    if force or not done:
        return []
    new = computed_settings(config)
    from_run_config = None  # read once, for the records from before stages kept their settings
    by_stage: dict[str, list[str]] = {}
    for name, record in done.items():
        if isinstance(record.get(SETTINGS_KEY), dict):
            by_stage[name] = recorded_changes(record, new)
        else:  # no settings in the record: the run's config.yaml, if it can be read
            if from_run_config is None:
                from_run_config = _changes_from_run_config(RunLayout(output).config, new)
            by_stage[name] = from_run_config
    changed = sorted({change for changes in by_stage.values() for change in changes})
    if changed:
        stale = [name for name, changes in by_stage.items() if changes]
        logger.warning("finished stage(s) %s of %s were made with other settings (%s); they are kept and do not "
                       "follow the new ones: --force redoes every stage", ", ".join(stale), output, "; ".join(changed))
    return changed


def _changes_from_run_config(recorded: Path, new: dict) -> list[str]:
    if not recorded.is_file():
        return []
    try:
        old = computed_settings(load_config(recorded))
    except Exception as err:  # noqa: BLE001 - a record from another version: nothing to compare
        logger.warning("cannot compare with %s (%s)", recorded, err)
        return []
    return setting_changes(old, new)


def run_all(config: ExperimentConfig, output: Path, force: bool = False, stages=STAGES) -> dict:
    changed_settings(config, output, stages, force)
    starting = time.time()
    mlflow, dataset_error = _start(config, output, force, stages)
    start_seconds = round(time.time() - starting, 2)
    save_config(config, RunLayout(output).config)
    wall: dict[str, float] = {}
    infos: dict[str, dict] = {}
    # the driver's full collections skip Ray's, MLflow's and torch's modules (pading.training.heap)
    with frozen_heap(), tracking.run(config.name, tags={"pipeline": "full", "output": str(output)}) as parent:
        tracking.log_params(config.flat())
        mlflow.log_artifact(str(RunLayout(output).config))
        for position, name in enumerate(stages):
            stage_dir = RunLayout(output).stage(name)
            skipped = common.stage_done(stage_dir) is not None and not force
            started = time.time()
            with tracking.run(name, nested=True):
                logger.info("=== stage %s%s ===", name, " (done before, skipping)" if skipped else "")
                if name == "prepare" and dataset_error is not None:
                    raise dataset_error  # the synthetic dataset's writing in _start failed
                if not skipped:
                    _warm_up(stages[position + 1] if position + 1 < len(stages) else None, config, output, force)
                info = STAGE_MODULES[name].run(config, output, force=force)
                common.drop_queued_work()
                _log_stage(name, info, output, skipped)
            wall[name] = round(time.time() - started, 2)
            infos[name] = info
        results = dict(infos.get("evaluate", {}).get("results", {}))
        results["wall_seconds"] = wall
        (RunLayout(output).results).write_text(json.dumps(results, indent=2))
        mlflow.log_artifact(str(RunLayout(output).results))
        tracking.log_metrics({k: v for k, v in results.items() if k != "wall_seconds"})
        tracking.log_metrics({"wall_seconds": wall})
        bundle = RunLayout(output).bundle
        if bundle.is_dir():
            mlflow.log_artifacts(str(bundle), artifact_path="bundle")
        results["mlflow_run_id"] = parent.info.run_id
        results["start_seconds"] = start_seconds  # Ray's start and the MLflow store (not in results.json)
    return results


def main() -> None:
    common.setup_logging()
    parser = common.base_parser(__doc__)
    parser.add_argument("--serve", action="store_true",
                        help="after the run, deploy its bundle with Ray Serve (pipelines/serve.py), print the URL "
                             "and serve until Ctrl-C")
    args = parser.parse_args()
    config, output = common.load(args)
    logger.info("seed %d, output %s", config.seed, output)
    started = time.time()
    results = run_all(config, output, force=args.force)
    print()
    print(f"PADing ({config.losses.variant}) on {config.data.root}, seed {config.seed} "
          f"(--set seed=N for another) — Seen / Unseen / HM (percent)")
    print(format_results_table(results))
    # start-up: Ray's start, the MLflow store and a synthetic dataset's writing, side by side (_start)
    print(f"stage wall seconds: start-up {results['start_seconds']:.0f}, "
          + ", ".join(f"{k} {v:.0f}" for k, v in results["wall_seconds"].items()))
    print(f"total {time.time() - started:.0f} s; results: {RunLayout(output).results}; "
          f"MLflow run {results['mlflow_run_id']} at {tracking.tracking_uri(config.tracking)}")
    bad = [k for k, v in json.loads((RunLayout(output).results).read_text()).items()
           if k != "wall_seconds" and any(not math.isfinite(x) for g in v.values() for x in g.values())]
    if bad:
        logger.warning("non-finite results in %s", bad)
    if args.serve:
        from pipelines import serve as serving

        url = serving.deploy(RunLayout(output).bundle, config)
        print(f"PADing segmentation endpoint: {url}  (API docs: {url}docs; Ctrl-C to stop)", flush=True)
        serving.block_until_interrupted()
    common.freeze_for_exit()


if __name__ == "__main__":
    main()
