"""Shared plumbing of the Ray entry points: arguments, config, Ray start-up, stage
markers. Thin on purpose: the work is in ``pading``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pading.config import ExperimentConfig, load_config
from pading.errors import ConfigError
from pading.io import write_json_atomic
from pading.run import tracking
from pading.run.layout import SUCCESS_FILE, WORKERS_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
#: How long a Ray Data actor pool whose resources are free may take to start all its actors.
ACTOR_START_TIMEOUT_S = 300
#: How long a stage that starts an actor pool whole waits for a finished stage's workers to give their CPUs back.
RELEASE_GRACE_S = 60.0

logger = logging.getLogger("pipelines")


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PADING_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "filelock", "httpx", "alembic", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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


def init_ray(config: ExperimentConfig | None = None) -> None:
    """Join the cluster under ``ray job submit`` (or ``RAY_ADDRESS``), else start a local one
    with ``ray.local_cpus`` CPUs (default: every core)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
        num_cpus = config.ray.local_cpus if config is not None else None
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, include_dashboard=None)
    try:
        logger.info("Ray: %s (dashboard: %s)", ray.get_runtime_context().gcs_address, _dashboard_url())
    except Exception:  # noqa: BLE001 - informational only
        pass


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


class ClusterTooSmall(RuntimeError):
    """The cluster can never run what a stage asks for (Ray would wait forever)."""


def check_resources(what: str, setting: str, count: int, cpus: float, gpus: float = 0.0,
                    wait_s: float = 0.0) -> bool:
    """Stop with :class:`ClusterTooSmall` when ``count`` actors or workers of ``cpus`` CPUs and
    ``gpus`` GPUs each can never be placed on the cluster's alive nodes (Ray would wait
    without saying so; a 0-CPU head node offers nothing). Only warn when they fit but are
    not free now (another job or a Serve deployment holds them; the autoscaler may add nodes).
    Returns whether they are free now, after waiting up to ``wait_s`` for them: callers that
    start an actor pool whole when they are free pass ``RELEASE_GRACE_S``, because a Train
    stage that just ended gives its workers' CPUs back a little late."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    capacity = sorted(((r.get("CPU", 0.0), r.get("GPU", 0.0)) for r in nodes), reverse=True)
    placed = 0
    for node_cpus, node_gpus in capacity:  # how many fit, one node after another
        per_node = [node_cpus // cpus if cpus > 0 else count, node_gpus // gpus if gpus > 0 else count]
        placed += int(min(per_node))
    if placed < count:
        listing = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in capacity) or "none"
        raise ClusterTooSmall(
            f"{what}: {count} x ({cpus:g} CPU, {gpus:g} GPU) cannot be placed on this cluster's nodes ({listing}); "
            f"only {placed} fit. Lower {setting} or add nodes.")

    def short(free):
        return free.get("CPU", 0.0) + 1e-9 < count * cpus or free.get("GPU", 0.0) + 1e-9 < count * gpus

    free = ray.available_resources()
    deadline = time.monotonic() + wait_s
    while short(free) and time.monotonic() < deadline:
        time.sleep(0.5)
        free = ray.available_resources()
    if short(free):
        logger.warning(
            "%s need %g CPU and %g GPU; %g CPU and %g GPU are free now. Ray will wait until other work (another "
            "job, a Serve deployment) releases them or the autoscaler adds nodes.",
            what, count * cpus, count * gpus, free.get("CPU", 0.0), free.get("GPU", 0.0))
        return False
    return True


def shard_work(items: list, whole_pool: bool):
    """A dataset of one block per item (a shard of images), so each shard is its own task
    and goes to whichever actor is free (Ray Data's own block count may pack several shards
    into one task, and so onto one actor).

    ``whole_pool``: Ray Data starts every actor of the pool that maps this dataset before
    handing out work, so the work spreads over all of them (and their nodes) instead of
    the first one to be ready. Pass True only when :func:`check_resources` said the actors
    are free now; otherwise Ray Data starts what fits and adds the rest as resources free
    up. The setting lives in this dataset's own context: a dataset keeps a copy of the
    context that was current when it was made, so changing the global one later does
    nothing to it."""
    import ray

    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if whole_pool:
        dataset.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return dataset


def fixed_actor_pool(size: int):
    """A pool of ``size`` actors that each hold one shard at a time: a shard waits for a free
    actor instead of queueing behind a busy one, so when the pool is whole the first
    ``size`` shards go one to each actor (and its node). Ray Data does not balance the rest
    evenly: in tests/test_tune_tables.py's 8 shards on 2 actors, the split was 6/2."""
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def train_scaling(config: ExperimentConfig, num_workers: int | None = None):
    """The Ray Train ScalingConfig of ``config.ray`` (``num_workers`` workers, default
    ``ray.num_workers``), after checking that the cluster can place the workers."""
    import ray.train

    settings = config.ray
    workers = num_workers or settings.num_workers
    check_resources(f"{workers} Ray Train worker(s)", "ray.num_workers / ray.cpus_per_worker",
                    workers, settings.cpus_per_worker, 1.0 if settings.use_gpu else 0.0)
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=settings.use_gpu,
                                   resources_per_worker={"CPU": settings.cpus_per_worker},
                                   placement_strategy=settings.placement_strategy)


def _dashboard_url() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().worker.node.address_info.get("webui_url")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a private attribute of Ray's; no dashboard URL is not an error
        return None


def stage_done(stage_dir: Path) -> dict | None:
    """The stage's success record, or None if it has not finished."""
    marker = Path(stage_dir) / SUCCESS_FILE
    if marker.is_file():
        try:
            return json.loads(marker.read_text())
        except json.JSONDecodeError:
            return None
    return None


def mark_done(stage_dir: Path, info: dict[str, Any]) -> None:
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / SUCCESS_FILE, {**info, "finished_at": time.time()}, indent=2)


def clear_done(stage_dir: Path) -> None:
    (Path(stage_dir) / SUCCESS_FILE).unlink(missing_ok=True)


class Stage:
    """One stage's lifecycle, the same for every stage, the Tune search and the tables:

        stage = common.Stage("pretrain", stage_dir, force)
        if stage.done:                 # finished before (and not --force): its record
            return stage.done
        ...checks that must pass before anything is removed...
        stage.start()                  # removes the old output (under --force, or always with clean)
        ...the work...
        return stage.finish(info)      # adds "seconds", writes _SUCCESS.json

    A stage that raises before ``finish`` is not marked done, so the next run redoes it."""

    def __init__(self, name: str, stage_dir: Path, force: bool = False, *, clean: bool = False):
        self.name, self.dir, self.force, self.clean = name, Path(stage_dir), force, clean
        self.done = None if force else stage_done(self.dir)
        if self.done is not None:
            logger.info("%s: already done (%s), skipping", name, self.dir)
        self.started: float | None = None

    def start(self) -> "Stage":
        import shutil

        if self.done is not None:
            raise RuntimeError(f"{self.name}: finished before; return stage.done instead of starting it")
        if self.dir.exists() and (self.force or self.clean):
            shutil.rmtree(self.dir)
        self.started = time.time()
        return self

    def finish(self, info: dict[str, Any]) -> dict[str, Any]:
        if self.started is None:
            raise RuntimeError(f"{self.name}: finish() before start()")
        info = {**info, "seconds": time.time() - self.started}
        mark_done(self.dir, info)
        return info


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


# ---- inside Ray Train workers -------------------------------------------------------------


def prepare_model(model, world: int):
    """DDP-wrap ``model`` for a multi-worker run (Ray Train's ``prepare_model``: gradients are
    averaged over the workers in ``backward``), or just move it to the worker's device."""
    import ray.train.torch

    if world > 1:
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    return model.to(ray.train.torch.get_device())


def log_worker_node(stage_dir: Path, stage: str, rank: int, world: int, log: logging.Logger) -> None:
    """Log which node worker ``rank`` runs on and record it in ``<stage_dir>/workers/``
    (``worker_nodes`` reads it back into the stage's record)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    record = {"rank": rank, "world_size": world, "node_id": node, "hostname": socket.gethostname(), "pid": os.getpid()}
    log.info(f"[{stage}] worker {rank}/{world} on node {node} ({record['hostname']}, pid {record['pid']})")
    directory = Path(stage_dir) / WORKERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{rank}.json").write_text(json.dumps(record))


def worker_nodes(stage_dir: Path) -> list[dict]:
    """The records :func:`log_worker_node` wrote, by rank."""
    files = sorted((Path(stage_dir) / WORKERS_DIR).glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in files]
