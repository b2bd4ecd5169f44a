"""Ray Tune search over the generator-side settings (λ, τ, primitive count K, generator lr,
or whatever ``tune.search_space`` lists), on the cached features and segmenter.

    python pipelines/tune.py --config configs/demo.yaml [--num-samples 16] [--set tune.protocol=paper]

Each trial re-trains only the generator and the classifier (pading.run.search.train_and_score)
and reports a validation score every ``tune.report_every`` iterations; ASHA stops weak
trials early. The default protocol (``tune.protocol=pseudo_unseen``) never reads a real
unseen class: a few seen classes play unseen. ``tune.protocol=paper`` scores on the val
images' real unseen classes, as the paper does; such runs are tagged ``protocol=paper`` in
MLflow with a warning. Every trial is an MLflow run nested under the search's run.

Writes ``<output>/tune/best.yaml`` (a full experiment config with the best values, for
``pipelines/full.py --config``) and ``<output>/tune/trials.json``, and prints the best config.
An interrupted search resumes from ``<output>/tune/ray/<name>`` (Tune's restore); a
finished one is only re-printed unless ``--force``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from pading.config import ExperimentConfig, apply_overrides, save_config
from pading.run import RunLayout, read_manifest, tracking
from pading.run.checkpoint import read_checkpoint, write_checkpoint
from pading.run.inputs import GeneratorInputs, load_generator_inputs
from pading.run.reports import format_trials
from pading.run.search import SearchSplit, best_config, best_trial, validate_search_space
from pipelines import common

logger = logging.getLogger("pipelines.tune")

#: Ray Tune's own state file of a search (what ``Tuner.can_restore`` looks for).
RAY_TUNER_STATE = "tuner.pkl"

PAPER_WARNING = ("protocol=paper: settings were selected on the real unseen classes of the val images; "
                 "unseen numbers of the chosen config are optimistic (not a zero-shot result)")
PREREQUISITE_STAGES = ("prepare", "pretrain", "extract")


def ensure_features(config: ExperimentConfig, output: Path) -> None:
    """Run prepare, pretrain and extract unless finished (their run() skips when done)."""
    from pipelines.full import run_stages

    run_stages(config, output, PREREQUISITE_STAGES)


def search_space(space: dict) -> dict:
    """``tune.search_space`` of the config -> Ray Tune domains."""
    from ray import tune

    makers = {"loguniform": lambda a: tune.loguniform(a[0], a[1]), "uniform": lambda a: tune.uniform(a[0], a[1]),
              "randint": lambda a: tune.randint(int(a[0]), int(a[1])), "choice": lambda a: tune.choice(list(a)),
              "grid": lambda a: tune.grid_search(list(a))}
    validate_search_space(space)
    return {key: makers[kind](args) for key, spec in space.items() for kind, args in spec.items()}


def val_features(config: ExperimentConfig, output: Path, inputs: GeneratorInputs):
    """Matched query embeddings of the val images (the paper protocol only), as a Ray task."""
    import ray

    from pading.data.features import features_from_rows
    from pading.model.segmenter import Segmenter
    from pading.run.extraction import extract_features

    @ray.remote(num_cpus=config.tune.cpus_per_trial, num_gpus=config.tune.gpus_per_trial)
    def extract(rows: list[dict]):
        device = "cuda" if torch.cuda.is_available() and config.tune.gpus_per_trial > 0 else "cpu"
        segmenter = Segmenter.load(inputs.segmenter_dir, map_location=device)
        found, rejects = extract_features(segmenter, rows, inputs.table, config, checkpoint_id="val",
                                          batch_size=config.ray.extract_batch_size)
        for reject in rejects:
            logger.warning("val image rejected: %s [%s]: %s", reject["source"], reject["key"], reject["reason"])
        return features_from_rows(found)

    rows = read_manifest(output, "val")
    return ray.get(extract.remote(rows))


def build_split(config: ExperimentConfig, output: Path, inputs: GeneratorInputs) -> SearchSplit:
    from pading.run.search import paper_split, pseudo_unseen_split

    settings = config.tune
    if settings.protocol == "paper":
        logger.warning(PAPER_WARNING)
        return paper_split(inputs.features(), val_features(config, output, inputs), inputs.table)
    return pseudo_unseen_split(inputs.features(), inputs.table, count=settings.pseudo_unseen_count,
                               holdout_fraction=settings.holdout_fraction, seed=config.seed)


def trial(params: dict, split: SearchSplit, semantics, base_config: ExperimentConfig, class_head,
          iterations: int) -> None:
    """One Tune trial: a config with ``params`` applied, trained and scored, reporting (with
    a checkpoint, so a restored search continues it) every ``tune.report_every`` steps."""
    from ray import tune

    from pading.run.search import train_and_score

    config = apply_overrides(base_config, params)
    settings = config.tune
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    device = torch.device("cuda" if settings.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state, _ = read_checkpoint(directory, map_location=device)

    def report(metrics: dict, trainer) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, trainer.state_dict())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    train_and_score(split, semantics, config, iterations=iterations, report_every=settings.report_every,
                    callback=report, class_head=class_head, device=device, resume_state=resume_state)


class MlflowTrialRuns:
    """A Tune callback: one MLflow run per trial, nested under the search's run, with the
    trial's sampled params, its metric curve (step = iteration) and its final status.
    Holds only picklable settings (Tune stores callbacks with the experiment)."""

    METRICS = ("score", "seen_accuracy", "unseen_accuracy", "classifier_loss", "generator_total")

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, tags: dict):
        self.tracking_uri, self.experiment_id, self.parent_run_id, self.tags = tracking_uri, experiment_id, parent_run_id, tags
        self._run_ids: dict[str, str] = {}
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id(self, trial) -> str:
        if trial.trial_id not in self._run_ids:
            query = f"tags.`tune.trial_id` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
            found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags={
                    **self.tags, "mlflow.parentRunId": self.parent_run_id, "tune.trial_id": trial.trial_id})
                run_id = run.info.run_id
                for key, value in trial.config.items():
                    self.client.log_param(run_id, key, value)
            self._run_ids[trial.trial_id] = run_id
        return self._run_ids[trial.trial_id]

    def on_result(self, trial, result: dict) -> None:
        step = int(result.get("step", result.get("training_iteration", 0)))
        run_id = self.run_id(trial)
        for key in self.METRICS:
            value = result.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.client.log_metric(run_id, key, float(value), step=step)

    def on_end(self, trial, status: str, error: str = "") -> None:
        run_id = self.run_id(trial)
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.set_terminated(run_id, status=status)


def make_tune_callback(runs: MlflowTrialRuns):
    from ray import tune

    class _Callback(tune.Callback):
        def __init__(self, runs: MlflowTrialRuns):
            self.runs = runs

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.runs.on_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.runs.on_end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.runs.on_end(trial, "FAILED", str(getattr(trial, "error_file", "") or "trial failed"))

    return _Callback(runs)


def summarize_trials(grid, iterations: int) -> list[dict]:
    """One dict per trial: params, last metrics, whether it finished all iterations, error."""
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trials.append({
            "trial_id": metrics.get("trial_id") or Path(str(result.path)).name,
            "params": {k: v for k, v in (result.config or {}).items()},
            "score": metrics.get("score"), "seen_accuracy": metrics.get("seen_accuracy"),
            "unseen_accuracy": metrics.get("unseen_accuracy"), "step": metrics.get("step"),
            "completed": metrics.get("step") == iterations, "error": str(result.error) if result.error else "",
        })
    return trials


def run(config: ExperimentConfig, output: Path, force: bool = False, resume: bool = True) -> dict:
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    settings = config.tune
    stage_dir = RunLayout(output).tune
    stage = common.Stage("tune", stage_dir, force)
    if stage.done:
        return stage.done
    stage.start()
    stage_dir.mkdir(parents=True, exist_ok=True)
    space = search_space(settings.search_space)
    common.init_ray(config)
    ensure_features(config, output)
    inputs = load_generator_inputs(config, output)
    split = build_split(config, output, inputs)
    iterations = settings.max_iterations or config.generator_training.iterations
    trainable = tune.with_resources(
        tune.with_parameters(trial, split=split, semantics=inputs.semantics(), base_config=config,
                             class_head=inputs.class_head(), iterations=iterations),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    common.check_resources("a Tune trial", "tune.cpus_per_trial / tune.gpus_per_trial", 1,
                           settings.cpus_per_trial, settings.gpus_per_trial)
    tags = {"pipeline": "tune", "protocol": settings.protocol}
    if settings.protocol == "paper":
        tags["warning"] = PAPER_WARNING
    tracking.setup(config.tracking)
    experiment_id = mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id
    parent_file = RunLayout(output).tune_parent_run
    parent_id = json.loads(parent_file.read_text())["run_id"] if parent_file.is_file() else None
    name = f"{config.name}-tune"
    experiment_dir = RunLayout(output).ray_storage("tune") / name
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else name, tags=None if parent_id else tags) as parent:
        parent_file.write_text(json.dumps({"run_id": parent.info.run_id}))
        if parent_id is None:
            tracking.log_params({**config.flat(), "tune.iterations": iterations, "tune.validation_classes":
                                 ", ".join(split.table[i].name for i in split.unseen_indices)})
        if resume and tune.Tuner.can_restore(str(experiment_dir)):
            logger.info("tune: resuming the search in %s", experiment_dir)
            tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
        else:
            callback = make_tune_callback(MlflowTrialRuns(tracking.tracking_uri(config.tracking), experiment_id,
                                                          parent.info.run_id, tags))
            scheduler = ASHAScheduler(time_attr="step", max_t=iterations, grace_period=min(settings.grace_period, iterations),
                                      reduction_factor=settings.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, num_samples=settings.num_samples,
                                            max_concurrent_trials=settings.max_concurrent_trials or None),
                run_config=tune.RunConfig(name=name, storage_path=str(RunLayout(output).ray_storage("tune")), callbacks=[callback],
                                          failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1),
            )
        grid = tuner.fit()
        trials = summarize_trials(grid, iterations)
        for failed in (t for t in trials if t["error"]):
            logger.warning("tune: trial %s failed: %s", failed["trial_id"], failed["error"].splitlines()[0][:300])
        best = best_trial(trials)
        best_path = RunLayout(output).tune_best_config
        save_config(best_config(config, best["params"], RunLayout(output).tune / "best_run"), best_path)
        RunLayout(output).tune_trials.write_text(json.dumps(trials, indent=1, default=str))
        tracking.log_metrics({"best_score": best["score"], "best_seen_accuracy": best["seen_accuracy"],
                              "best_unseen_accuracy": best["unseen_accuracy"], "trials": len(trials),
                              "failed_trials": sum(1 for t in trials if t["error"])})
        mlflow.set_tags({f"best.{k}": str(v) for k, v in best["params"].items()})  # tags: a resumed search may change them
        mlflow.log_artifact(str(best_path))
        mlflow.log_artifact(str(RunLayout(output).tune_trials))
    info = {"best": best, "best_config": str(best_path), "protocol": settings.protocol, "trials": len(trials),
            "failed": sum(1 for t in trials if t["error"]), "iterations": iterations,
            "mlflow_run_id": parent_id or parent.info.run_id}
    return stage.finish(info)


def main() -> None:
    common.setup_logging()
    parser = common.base_parser(__doc__)
    parser.add_argument("--num-samples", type=int, default=None, help="trials to sample (default: tune.num_samples)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (the default when one exists)")
    parser.add_argument("--fresh", action="store_true", help="ignore an interrupted search and start a new one")
    args = parser.parse_args()
    if args.num_samples is not None:
        args.overrides.append(f"tune.num_samples={args.num_samples}")
    config, output = common.load(args)
    if args.fresh and (RunLayout(output).tune).exists():
        shutil.rmtree(RunLayout(output).tune)
    experiment_dir = RunLayout(output).ray_storage("tune") / f"{config.name}-tune"
    if args.resume and not (experiment_dir / RAY_TUNER_STATE).is_file():
        logger.warning("--resume: no interrupted search in %s; starting a new one", experiment_dir)
    info = run(config, output, force=args.force, resume=not args.fresh)
    print()
    print(f"Ray Tune search ({info['protocol']} protocol, {info['trials']} trials, {info['failed']} failed) — "
          "score = HM of seen / unseen per-class accuracy (percent)")
    if info["protocol"] == "paper":
        print(f"WARNING: {PAPER_WARNING}")
    print(format_trials(json.loads(RunLayout(output).tune_trials.read_text())))
    print("(stopped) = ASHA ended the trial early; the best config is chosen among trials that ran every step.")
    print()
    print(f"best config ({info['best_config']}); run it with: python pipelines/full.py --config {info['best_config']}")
    print(yaml.safe_dump({k: v for k, v in info["best"]["params"].items()}, sort_keys=True).rstrip())
    print("---")
    print(Path(info["best_config"]).read_text())


if __name__ == "__main__":
    main()
