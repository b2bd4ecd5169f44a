"""Every path of a run's output directory, defined once (docs/architecture.md, "Stages and
their products")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The marker a finished stage writes last (its record: counts, seconds, nodes).
SUCCESS_FILE = "_SUCCESS.json"
#: A training stage's loss history, one JSON object a line.
HISTORY_FILE = "history.jsonl"
#: Sub-directory of a training stage with one ``rank-<r>.json`` per worker.
WORKERS_DIR = "workers"


@dataclass(frozen=True)
class RunLayout:
    """The products of one run under ``root`` (the ``--output`` directory)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # ---- prepare ---------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        """Stage directory of prepare: ``train/``, ``val/`` Parquet, rejects, classes."""
        return self.root / "manifest"

    def manifest_split(self, split: str) -> Path:
        return self.manifest / split

    def manifest_part(self, split: str, part: int) -> Path:
        """Part ``part`` of a split's manifest (a split is written in parts of at most
        :data:`pading.run.readers.MANIFEST_ROWS_PER_FILE` rows)."""
        return self.manifest_split(split) / f"part-{part:05d}.parquet"

    @property
    def rejects(self) -> Path:
        return self.manifest / "rejects.parquet"

    @property
    def classes(self) -> Path:
        return self.manifest / "classes.json"

    # ---- pretrain ----------------------------------------------------------------------
    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def segmenter(self) -> Path:
        return self.pretrain / "segmenter"

    # ---- extract -----------------------------------------------------------------------
    @property
    def features(self) -> Path:
        """Stage directory of extract: ``shard-*.parquet``."""
        return self.root / "features"

    @property
    def features_rejects(self) -> Path:
        return self.root / "features_rejects"

    # ---- generator ---------------------------------------------------------------------
    @property
    def generator(self) -> Path:
        return self.root / "generator"

    @property
    def bundle(self) -> Path:
        """The trained model: what evaluate, serve and segment load."""
        return self.generator / "bundle"

    # ---- evaluate and the run's summary -----------------------------------------------------
    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    # ---- shared ------------------------------------------------------------------------
    @property
    def cache(self) -> Path:
        """Class-name embeddings and other caches."""
        return self.root / "cache"

    @property
    def datasets(self) -> Path:
        """Where a synthetic dataset with a relative ``data.root`` is written."""
        return self.root / "datasets"

    @property
    def mlruns(self) -> Path:
        """The run's MLflow store (``mlflow.db`` and ``artifacts/``)."""
        return self.root / "mlruns"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    # ---- inside a stage directory --------------------------------------------------------
    def ray_storage(self, stage: str) -> Path:
        """Ray Train / Tune's ``storage_path`` of a stage (checkpoints, experiment state)."""
        return self.stage(stage) / "ray"

    def workers(self, stage: str) -> Path:
        """``rank-<r>.json`` records of which node each training worker ran on."""
        return self.stage(stage) / WORKERS_DIR

    def predictions(self, stage: str = "evaluate") -> Path:
        """COCO-format predictions of an evaluation stage (``panoptic/``, ``semantic/``, JSON)."""
        return self.stage(stage) / "predictions"

    def overlays(self, stage: str = "evaluate") -> Path:
        return self.stage(stage) / "overlays"

    def reports(self, stage: str = "evaluate") -> Path:
        """Full evaluator reports (per class) of an evaluation stage."""
        return self.stage(stage) / "reports.json"

    @property
    def tune_best_config(self) -> Path:
        return self.tune / "best.yaml"

    @property
    def tune_trials(self) -> Path:
        return self.tune / "trials.json"

    @property
    def tune_parent_run(self) -> Path:
        """The search's MLflow run id, so a resumed search logs into the same run."""
        return self.tune / "mlflow_parent.json"

    @property
    def tables_results(self) -> Path:
        return self.tables / "results.json"

    def stage(self, name: str) -> Path:
        """The directory of stage ``name`` (prepare, pretrain, extract, generator, evaluate,
        tune, tables); its :data:`SUCCESS_FILE` marks it finished."""
        directories = {"prepare": self.manifest, "extract": self.features}
        return directories.get(name, self.root / name)

    def history(self, stage: str) -> Path:
        return self.stage(stage) / HISTORY_FILE
