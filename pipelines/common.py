"""Shared plumbing of the Ray entry points: arguments, config, Ray start-up, stage
markers. Thin on purpose: the work is in ``pading``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python pipelines/x.py` puts pipelines/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

from pading.config import ExperimentConfig, load_config  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
SUCCESS = "_SUCCESS.json"

logger = logging.getLogger("pipelines")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PADING_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx", "alembic", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_module(name: str):
    """The pipeline module of stage ``name`` ("generator" is train_generator.py), imported
    as ``pipelines.X`` or, when run as a script, as ``X``."""
    import importlib

    module = {"generator": "train_generator"}.get(name, name)
    try:
        return importlib.import_module(f"pipelines.{module}")
    except ImportError:
        return importlib.import_module(module)


def copy_from_checkpoint(result, name: str, history_file: str, stage_dir: Path) -> Path:
    """Copy directory ``name`` and the loss history out of a Ray Train result's final
    checkpoint into ``stage_dir`` (replacing an older copy); returns the copied directory."""
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (no {name} to copy)")
    target = stage_dir / name
    with result.checkpoint.as_directory() as directory:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(directory) / name, target)
        shutil.copy(Path(directory) / history_file, stage_dir / history_file)
    return target


def worker_logger(name: str) -> logging.Logger:
    """A logger for progress lines inside Ray Train workers. Ray Train echoes a worker's
    ``print`` twice to the driver, its log records once; without any handler (Ray Train
    v1 workers) the records get this module's format."""
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


def load(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    config = load_config(args.config, args.overrides)
    output = Path(args.output or config.output_dir).resolve()
    config.output_dir = str(output)
    # Ray workers run elsewhere: every path they read must be absolute.
    config.data.root = str(Path(config.data.root).expanduser().resolve())
    for section, key in (("semantics", "clip_weights"), ("semantics", "file"), ("semantics", "cache_dir"),
                         ("segmenter", "weights"), ("segmenter", "backbone_weights")):
        value = getattr(getattr(config, section), key)
        if value:
            setattr(getattr(config, section), key, str(Path(value).expanduser().resolve()))
    output.mkdir(parents=True, exist_ok=True)
    return config, output


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster under ``ray job submit`` (or ``RAY_ADDRESS``), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, include_dashboard=None)
    try:
        ctx = ray.get_runtime_context()
        logger.info("Ray: %s (dashboard: %s)", ctx.gcs_address, getattr(ray, "_private", None) and _dashboard_url())
    except Exception:  # pragma: no cover - informational only
        pass


def warn_if_short(what: str, cpus: float, gpus: float = 0.0) -> None:
    """Log a warning when the cluster has fewer free CPUs/GPUs than ``what`` asks for:
    Ray then waits (for other work to finish or the autoscaler to add nodes) without
    saying so, which looks like a hang."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    if free.get("CPU", 0.0) + 1e-9 >= cpus and free.get("GPU", 0.0) + 1e-9 >= gpus:
        return
    logger.warning(
        "%s need %g CPU and %g GPU; the cluster has %g of %g CPU and %g of %g GPU free. Ray will wait until "
        "other work (another job, a Serve deployment) releases them or the autoscaler adds nodes; on a fixed "
        "cluster lower ray.num_workers / ray.cpus_per_worker (or tune.cpus_per_trial).",
        what, cpus, gpus, free.get("CPU", 0.0), total.get("CPU", 0.0), free.get("GPU", 0.0), total.get("GPU", 0.0))


def train_scaling(config: ExperimentConfig):
    """The Ray Train ScalingConfig of ``config.ray`` (both training stages use it)."""
    import ray.train

    settings = config.ray
    warn_if_short(f"{settings.num_workers} Ray Train worker(s)", settings.num_workers * settings.cpus_per_worker,
                  settings.num_workers if settings.use_gpu else 0)
    return ray.train.ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                   resources_per_worker={"CPU": settings.cpus_per_worker})


def _dashboard_url() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().worker.node.address_info.get("webui_url")  # type: ignore[attr-defined]
    except Exception:
        return None


def stage_done(stage_dir: Path) -> dict | None:
    """The stage's success record, or None if it has not finished."""
    marker = Path(stage_dir) / SUCCESS
    if marker.is_file():
        try:
            return json.loads(marker.read_text())
        except json.JSONDecodeError:
            return None
    return None


def mark_done(stage_dir: Path, info: dict[str, Any]) -> None:
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / (SUCCESS + ".tmp")
    tmp.write_text(json.dumps({**info, "finished_at": time.time()}, indent=2, default=str))
    tmp.replace(stage_dir / SUCCESS)


def clear_done(stage_dir: Path) -> None:
    (Path(stage_dir) / SUCCESS).unlink(missing_ok=True)


def begin_stage(name: str, stage_dir: Path, force: bool, clean: bool = False) -> dict | None:
    """The finished stage's record if it can be skipped; otherwise None after removing
    the stage's old output (always when ``clean``, else only under ``force``)."""
    import shutil

    done = stage_done(stage_dir)
    if done and not force:
        logger.info("%s: already done (%s), skipping", name, stage_dir)
        return done
    if stage_dir.exists() and (force or clean):
        shutil.rmtree(stage_dir)
    return None


def stage_main(run, description: str, configure=None) -> dict:
    """The command line of one stage: parse, load the config, ``run(config, output, force)``,
    print its record as JSON. ``configure(parser)`` adds stage options; they are passed to run."""
    setup_logging()
    parser = base_parser(description)
    extra = configure(parser) if configure else {}
    args = parser.parse_args()
    config, output = load(args)
    info = run(config, output, force=args.force, **{k: getattr(args, k) for k in (extra or {})})
    print(json.dumps(info, indent=2, default=str))
    return info


ORDER_KEYS = ("image_id", "query")  # the manifest's and the features' row identity


def epoch_batches(shard, batch_size: int, seed: int, cache: bool = True):
    """Endless pyarrow batches from a Ray Train dataset shard.

    With ``cache`` (the default) the worker reads its shard once, keeps it in memory, sorts
    it by :data:`ORDER_KEYS` and serves every epoch, the first included, as a permutation
    drawn from ``seed``: Ray Data's streaming order changes from run to run, so without the
    sort a one-worker run would not be repeatable (and re-reading per epoch costs seconds,
    which dominates small datasets). Without ``cache`` every epoch streams from Ray Data in
    its own order, with a local shuffle buffer.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not cache:
        while True:
            empty = True
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                            local_shuffle_buffer_size=4 * batch_size):
                empty = False
                yield batch
            if empty:
                return
    batches = [b for b in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow") if b.num_rows]
    if not batches:
        return
    table = pa.concat_tables(batches)
    keys = [(name, "ascending") for name in ORDER_KEYS if name in table.column_names]
    if keys:
        table = table.take(pc.sort_indices(table, sort_keys=keys))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(table.num_rows)
        for begin in range(0, table.num_rows, batch_size):
            yield table.take(pa.array(order[begin : begin + batch_size]))
