"""The Ray Tune search's driver side without Ray (pipelines/tune.py builds the Tuner and runs
it; the trials' training and scoring are :mod:`pading.run.search`): the split the trials
score on, one MLflow run per trial nested under the search's run, the trials' summary, what
a finished search records (``tune/best.yaml``, ``tune/trials.json``, the parent run's
metrics) and the report the command prints (docs/experiments.md)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml

from pading.config import ExperimentConfig, TuneConfig, apply_overrides, save_config, setting_changes
from pading.data.features import FeatureArrays
from pading.errors import ConfigError
from pading.io import write_json_atomic
from pading.run import tracking
from pading.run.inputs import GeneratorInputs
from pading.run.layout import RunLayout
from pading.run.reports import format_trials
from pading.run.search import SearchSplit, best_config, best_trial, paper_split, pseudo_unseen_split

#: The name the search's log lines have always carried (tests/test_tune_tables.py reads it).
logger = logging.getLogger("pipelines.tune")

#: Ray Tune's own state file of a search (what ``Tuner.can_restore`` looks for).
RAY_TUNER_STATE = "tuner.pkl"

PAPER_WARNING = ("protocol=paper: settings were selected on the real unseen classes of the val images; "
                 "unseen numbers of the chosen config are optimistic (not a zero-shot result)")


def build_split(config: ExperimentConfig, inputs: GeneratorInputs,
                val_features: Callable[[], FeatureArrays]) -> SearchSplit:
    """The split of ``tune.protocol``; ``val_features()`` (the val images' matched query
    embeddings, a Ray task in pipelines/tune.py) is called for the paper protocol only."""
    settings = config.tune
    if settings.protocol == "paper":
        logger.warning(PAPER_WARNING)
        return paper_split(inputs.features(), val_features(), inputs.table)
    return pseudo_unseen_split(inputs.features(), inputs.table, count=settings.pseudo_unseen_count,
                               holdout_fraction=settings.holdout_fraction, seed=config.seed)


def extract_val_features(config: ExperimentConfig, rows: list[dict], inputs: GeneratorInputs) -> FeatureArrays:
    """The matched query embeddings of the val images (``rows``: the val manifest; the paper
    protocol's validation set), with the pretrained segmenter; rejected images are logged
    (pipelines/tune.py runs this as a Ray task)."""
    from pading.data.features import features_from_rows
    from pading.model.segmenter import Segmenter
    from pading.run.extraction import extract_features

    device = "cuda" if torch.cuda.is_available() and config.tune.gpus_per_trial > 0 else "cpu"
    segmenter = Segmenter.load(inputs.segmenter_dir, map_location=device)
    found, rejects = extract_features(segmenter, rows, inputs.table, config, checkpoint_id="val",
                                      batch_size=config.ray.extract_batch_size)
    for reject in rejects:
        logger.warning("val image rejected: %s [%s]: %s", reject["source"], reject["key"], reject["reason"])
    return features_from_rows(found)


def trial_config(params: dict, base_config: ExperimentConfig) -> tuple[ExperimentConfig, torch.device]:
    """A trial's config (``base_config`` with the sampled ``params``) and device; the trial's
    torch threads are its reserved CPUs."""
    config = apply_overrides(base_config, params)
    settings = config.tune
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    device = torch.device("cuda" if settings.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")
    return config, device


def experiment_dir(config: ExperimentConfig, output: Path) -> Path:
    """Where Ray Tune keeps the search's state (``<output>/tune/ray/<name>-tune``)."""
    return RunLayout(output).ray_storage("tune") / f"{config.name}-tune"


#: What a search's trials depend on: a search resumes only with the same values of these.
SEARCH_SECTIONS = ("seed", "data", "semantics", "segmenter", "pretrain", "generator", "generator_training", "losses",
                   "vocabulary", "tune")
#: The settings a search was started with, beside Tune's state (``<output>/tune/``).
SEARCH_CONFIG_FILE = "search_config.json"


def search_settings(config: ExperimentConfig) -> dict:
    """``{"section.key": value}`` of the settings a search depends on (:data:`SEARCH_SECTIONS`),
    as JSON gives them back (tuples as lists), so a recorded copy compares equal."""
    settings = {key: value for key, value in config.flat().items() if key.split(".")[0] in SEARCH_SECTIONS}
    return json.loads(json.dumps(settings, default=str))


def record_search_settings(config: ExperimentConfig, output: Path) -> None:
    """Write the settings a new search starts with (checked by :func:`check_resume`)."""
    write_json_atomic(RunLayout(output).tune / SEARCH_CONFIG_FILE, search_settings(config))


def check_resume(config: ExperimentConfig, output: Path) -> None:
    """Refuse to resume a search started with other settings: Tune restores the old search
    space and sample count while the trials would train with the new split, seed and
    iterations, and the MLflow runs keep the old tags. ConfigError names what differs."""
    recorded = RunLayout(output).tune / SEARCH_CONFIG_FILE
    if not recorded.is_file():  # a search of an earlier version: nothing to compare
        logger.warning("tune: %s has no record of its settings; resuming as it is", recorded.parent)
        return
    changed = setting_changes(json.loads(recorded.read_text()), search_settings(config))
    if changed:
        shown = "; ".join(changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise ConfigError(f"the interrupted search in {recorded.parent} was started with other settings ({shown}{more}); "
                          "resume it with the same settings, or start a new one with --fresh")


def prepare_restart(config: ExperimentConfig, output: Path, fresh: bool, resume: bool) -> None:
    """``--fresh``: remove an earlier search of ``output``; ``--resume``: warn when there is no
    interrupted search to resume."""
    if fresh and (RunLayout(output).tune).exists():
        shutil.rmtree(RunLayout(output).tune)
    state_dir = experiment_dir(config, output)
    if resume and not (state_dir / RAY_TUNER_STATE).is_file():
        logger.warning("--resume: no interrupted search in %s; starting a new one", state_dir)


def search_tags(settings: TuneConfig) -> dict:
    """The MLflow tags of the search's run and of every trial's run."""
    tags = {"pipeline": "tune", "protocol": settings.protocol}
    if settings.protocol == "paper":
        tags["warning"] = PAPER_WARNING
    return tags


def parent_run_id(output: Path) -> str | None:
    """The MLflow run of an earlier, interrupted search of ``output`` (None: a new search)."""
    parent_file = RunLayout(output).tune_parent_run
    return json.loads(parent_file.read_text())["run_id"] if parent_file.is_file() else None


def start_parent_run(config: ExperimentConfig, output: Path, run_id: str, resumed: bool, split: SearchSplit,
                     iterations: int) -> None:
    """Record the search's MLflow run (so an interrupted search resumes it) and, for a new one,
    log the config, the iterations and the validation classes as its params."""
    RunLayout(output).tune_parent_run.write_text(json.dumps({"run_id": run_id}))
    if not resumed:
        tracking.log_params({**config.flat(), "tune.iterations": iterations, "tune.validation_classes":
                             ", ".join(split.table[i].name for i in split.unseen_indices)})


@dataclass(frozen=True)
class SearchRun:
    """The search's MLflow run: its id, its experiment and its tags (each trial's run gets them)."""

    run_id: str
    experiment_id: str
    tags: dict


@contextmanager
def search_run(config: ExperimentConfig, output: Path, split: SearchSplit, iterations: int) -> Iterator[SearchRun]:
    """The search's MLflow run, active inside the block: the run of an interrupted search of
    ``output`` (resumed), else a new one, tagged and with its params."""
    import mlflow

    tags = search_tags(config.tune)
    tracking.setup(config.tracking)
    experiment_id = mlflow.get_experiment_by_name(config.tracking.experiment).experiment_id
    parent_id = parent_run_id(output)
    name = f"{config.name}-tune"
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else name, tags=None if parent_id else tags) as parent:
        start_parent_run(config, output, parent.info.run_id, parent_id is not None, split, iterations)
        yield SearchRun(parent_id or parent.info.run_id, experiment_id, tags)


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


def summarize_trials(grid, iterations: int) -> list[dict]:
    """One dict per trial of a Tune result grid: params, last metrics, whether it finished all
    iterations, error."""
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


def record_results(config: ExperimentConfig, output: Path, trials: list[dict], iterations: int, run_id: str) -> dict:
    """Inside the search's MLflow run: warn of failed trials, write ``tune/best.yaml`` (the
    best trial's full config) and ``tune/trials.json``, log the best numbers, tags and both
    files to the run. Returns the search's record (without its seconds)."""
    import mlflow

    for failed in (t for t in trials if t["error"]):
        logger.warning("tune: trial %s failed: %s", failed["trial_id"], failed["error"].splitlines()[0][:300])
    best = best_trial(trials)
    layout = RunLayout(output)
    best_path = layout.tune_best_config
    save_config(best_config(config, best["params"], layout.tune / "best_run"), best_path)
    layout.tune_trials.write_text(json.dumps(trials, indent=1, default=str))
    tracking.log_metrics({"best_score": best["score"], "best_seen_accuracy": best["seen_accuracy"],
                          "best_unseen_accuracy": best["unseen_accuracy"], "trials": len(trials),
                          "failed_trials": sum(1 for t in trials if t["error"])})
    mlflow.set_tags({f"best.{k}": str(v) for k, v in best["params"].items()})  # tags: a resumed search may change them
    mlflow.log_artifact(str(best_path))
    mlflow.log_artifact(str(layout.tune_trials))
    return {"best": best, "best_config": str(best_path), "protocol": config.tune.protocol, "trials": len(trials),
            "failed": sum(1 for t in trials if t["error"]), "iterations": iterations, "mlflow_run_id": run_id}


def format_report(info: dict, output: Path) -> str:
    """What ``pipelines/tune.py`` prints after a search: the trials table, the best config's
    params and the best config file itself."""
    lines = ["", f"Ray Tune search ({info['protocol']} protocol, {info['trials']} trials, {info['failed']} failed) — "
             "score = HM of seen / unseen per-class accuracy (percent)"]
    if info["protocol"] == "paper":
        lines.append(f"WARNING: {PAPER_WARNING}")
    lines += [format_trials(json.loads(RunLayout(output).tune_trials.read_text())),
              "(stopped) = ASHA ended the trial early; the best config is chosen among trials that ran every step.",
              "",
              f"best config ({info['best_config']}); run it with: python pipelines/full.py --config {info['best_config']}",
              yaml.safe_dump({k: v for k, v in info["best"]["params"].items()}, sort_keys=True).rstrip(),
              "---",
              Path(info["best_config"]).read_text()]
    return "\n".join(lines)
