"""The command line every entry point of pipelines/ shares, without Ray: logging, the base
argument parser, the config with every path absolute, and ``--bundle`` references
(docs/architecture.md "Layers"). pipelines/common.py re-exports all of it."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

from pading.config import ExperimentConfig, load_config
from pading.errors import ConfigError
from pading.run import tracking

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

#: URI schemes of a bundle stored in MLflow (``--bundle runs:/<id>/bundle``, ``models:/...``).
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PADING_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx", "alembic", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_logger(name: str) -> logging.Logger:
    """A logger for progress lines inside Ray Train workers. Ray Train echoes a worker's
    ``print`` twice to the driver, its log records once; without any handler (Ray Train
    v1 workers) the records get :func:`setup_logging`'s format."""
    log = logging.getLogger(name)
    if not log.hasHandlers():
        setup_logging()
    log.setLevel(os.environ.get("PADING_LOG_LEVEL", "INFO"))
    return log


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML experiment config (default: configs/demo.yaml)")
    parser.add_argument("--output", default=None, help="output directory (default: the config's output_dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set generator.num_primitives=200 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="redo stages that already finished")
    return parser


def in_ray_job() -> bool:
    """True in the driver of a ``ray job submit`` (its working directory is a temporary copy
    that Ray deletes, on the head node's local disk)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _absolute(value: str, setting: str, *, base: Path | None = None) -> str:
    """``value`` as an absolute path (relative to ``base``, else the working directory).
    Inside a Ray job a path relative to the working directory is refused: it would land in
    the job's temporary copy, which other nodes cannot see and Ray deletes."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if base is not None:
        return str((base / path).resolve())
    if in_ray_job():
        raise ConfigError(
            f"{setting}={value!r} is a relative path: under `ray job submit` it would resolve inside the job's "
            f"temporary working directory ({Path.cwd()}), which other nodes do not see and Ray deletes. "
            f"Give an absolute path on storage every node sees, e.g. --set {setting}=/shared/...")
    return str(path.resolve())


def load(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    """The config with every path absolute (Ray workers run elsewhere): ``--output`` (else
    ``output_dir``) against the working directory, a synthetic dataset's relative
    ``data.root`` under the output directory (so every node that sees the outputs sees the
    data), other relative paths against the working directory."""
    config = load_config(args.config, args.overrides)
    if args.output:
        output = Path(_absolute(args.output, "--output"))
    else:
        output = Path(_absolute(config.output_dir, "output_dir (or --output)"))
    config.output_dir = str(output)
    data_base = output if config.data.synthetic is not None else None
    config.data.root = _absolute(config.data.root, "data.root", base=data_base)
    for section, key in (("semantics", "clip_weights"), ("semantics", "file"), ("semantics", "cache_dir"),
                         ("segmenter", "weights"), ("segmenter", "backbone_weights")):
        value = getattr(getattr(config, section), key)
        if value:
            setattr(getattr(config, section), key, _absolute(value, f"{section}.{key}"))
    if config.tracking.tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        config.tracking.tracking_uri = tracking.default_tracking_uri(output)
    output.mkdir(parents=True, exist_ok=True)
    return config, output


def resolve_bundle(reference: str, config: ExperimentConfig | None = None) -> Path:
    """A bundle directory, or an MLflow ``runs:/<id>/bundle`` / ``models:/...`` URI
    downloaded into a temporary directory. ConfigError when it is not a bundle.
    (Used by pipelines/serve.py and pipelines/segment.py.)"""
    if str(reference).startswith(MLFLOW_SCHEMES):
        import mlflow

        mlflow.set_tracking_uri(tracking.tracking_uri((config or ExperimentConfig()).tracking))
        target = tempfile.mkdtemp(prefix="pading-bundle-")
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(reference), dst_path=target))
    else:
        path = Path(reference).expanduser().resolve()
    from pading.bundle import CLASSES_FILE  # here: it imports the model code (transformers), which other stages skip

    if not (path / CLASSES_FILE).is_file():
        raise ConfigError(f"{reference}: not a model bundle (no {CLASSES_FILE} in {path})")
    return path
