"""Shared plumbing of the Ray entry points: Ray start-up, resource checks, Ray Data and Ray
Train helpers. Thin on purpose: the Ray-free part (arguments, config, stage markers, the
stage lifecycle) is ``pading.run.cli`` and ``pading.run.stage``, re-exported here."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pading.config import ExperimentConfig
from pading.run.cli import (  # noqa: F401 - re-exported: the entry points, tests and benchmarks use common.*
    DEFAULT_CONFIG,
    MLFLOW_SCHEMES,
    REPO_ROOT,
    _absolute,
    base_parser,
    in_ray_job,
    load,
    resolve_bundle,
    setup_logging,
    worker_logger,
)
from pading.run.stage import (  # noqa: F401 - re-exported, as above
    ClusterTooSmall,
    Stage,
    check_capacity,
    clear_done,
    copy_from_checkpoint,
    mark_done,
    record_worker_node,
    short_of,
    stage_done,
    worker_nodes,
)

#: How long a Ray Data actor pool whose resources are free may take to start all its actors.
ACTOR_START_TIMEOUT_S = 300
#: How long a stage that starts an actor pool whole waits for a finished stage's workers to give their CPUs back.
RELEASE_GRACE_S = 60.0

logger = logging.getLogger("pipelines")


#: The node ID of the Ray that :func:`init_ray` started in this process (one machine's, not a cluster's).
_own_ray_node: str | None = None
#: Seconds the processes of a Ray this process started get to end after it shut down, before they are killed.
LEFTOVER_GRACE_S = 2.0


def owns_local_ray() -> bool:
    """Whether this process started the Ray it runs on now (:func:`init_ray` without a cluster to join)."""
    import ray

    return ray.is_initialized() and _own_ray_node is not None and ray.get_runtime_context().get_node_id() == _own_ray_node


def init_ray(config: ExperimentConfig | None = None) -> None:
    """Join the cluster under ``ray job submit`` (or ``RAY_ADDRESS``), else start a local one
    with ``ray.local_cpus`` CPUs (default: every core)."""
    import ray

    global _own_ray_node
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
        # Ray Train's preemption watcher (one more actor process per training run) follows node drains
        # of an autoscaling cluster; a Ray of one machine started here has none
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
        num_cpus = config.ray.local_cpus if config is not None else None
        dashboard = None if config is None or config.ray.local_dashboard else False  # None: when installed
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env_vars}, include_dashboard=dashboard)
        _own_ray_node = ray.get_runtime_context().get_node_id()
        raylet = child_pid("raylet")
        if raylet is not None:  # runs before Ray's own exit handler, which Ray registered when imported
            atexit.register(shutdown_own_ray, raylet)
    try:
        logger.info("Ray: %s (dashboard: %s)", ray.get_runtime_context().gcs_address, _dashboard_url())
    except Exception:  # noqa: BLE001 - informational only
        pass


def child_pid(name: str) -> int | None:
    """The PID of a child of this process whose command is ``name`` (from Linux's /proc); None
    when there is none, or no /proc."""
    me = os.getpid()
    for entry in _proc_pids():
        stat = _read_proc(entry, "stat")
        if stat is None:
            continue
        command, fields = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:].split()
        if command == name and len(fields) > 1 and fields[1] == str(me):
            return entry
    return None


def ray_processes(raylet_pid: int) -> list[tuple[int, str]]:
    """(PID, command) of the live processes started under the raylet ``raylet_pid``: Ray puts
    ``RAY_RAYLET_PID`` in the environment of every worker it starts, and the processes they
    start (HAProxy, for one) inherit it. This process is left out."""
    marker = f"RAY_RAYLET_PID={raylet_pid}".encode()
    found = []
    for entry in _proc_pids():
        environ = _read_proc(entry, "environ", binary=True)
        if entry != os.getpid() and environ is not None and marker in environ.split(b"\0"):
            found.append((entry, (_read_proc(entry, "comm") or "?").strip()))
    return found


def shutdown_own_ray(raylet_pid: int, grace_s: float | None = None) -> list[tuple[int, str]]:
    """Shut down the Ray this process started (whose raylet is ``raylet_pid``), then kill what is
    left of it ``grace_s`` (default :data:`LEFTOVER_GRACE_S`) seconds later; returns what was killed.

    Ray's shutdown stops its own processes and leaves the workers to end themselves, and a worker
    can hang in its exit: Ray 2.60's core worker sometimes deadlocks in its exit handler (a Ray
    Train controller was found sleeping on a lock in ``CoreWorkerProcess::HandleAtExit`` an hour
    after its run, holding 0.8 GB), and such a process outlives its Ray. :func:`init_ray`
    registers this to run at exit, before Ray's own handler (docs/architecture.md, "Processes
    left behind")."""
    import ray

    ray.shutdown()
    deadline = time.monotonic() + (LEFTOVER_GRACE_S if grace_s is None else grace_s)
    left = ray_processes(raylet_pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = ray_processes(raylet_pid)
    for pid, command in left:
        logger.warning("process %d (%s) of this run's Ray was still running after Ray shut down; killing it",
                       pid, command)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return left


def _proc_pids() -> list[int]:
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:  # no /proc (not Linux)
        return []


def _read_proc(pid: int, name: str, binary: bool = False):
    try:
        with open(f"/proc/{pid}/{name}", "rb" if binary else "r") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):  # gone, or not ours to read
        return None


def init_ray_while(config: ExperimentConfig, work):
    """:func:`init_ray` on this (the main) thread, as Ray must start, while ``work()`` runs on
    another: Ray's start is mostly waiting for its own processes. Returns what ``work`` returns
    and raises what it raises. Ray is imported first, so no module's first import happens on
    the two threads at once (pipelines/prepare.py: the synthetic dataset; pipelines/full.py: the
    MLflow store too)."""
    import ray  # noqa: F401 - see above

    with ThreadPoolExecutor(1, thread_name_prefix="while-ray-starts") as pool:
        result = pool.submit(work)
        init_ray(config)
        return result.result()


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
    check_capacity(what, setting, count, cpus, gpus, nodes)
    free = ray.available_resources()
    deadline = time.monotonic() + wait_s
    while short_of(free, count, cpus, gpus) and time.monotonic() < deadline:
        time.sleep(0.5)
        free = ray.available_resources()
    if short_of(free, count, cpus, gpus):
        logger.warning(
            "%s need %g CPU and %g GPU; %g CPU and %g GPU are free now. Ray will wait until other work (another "
            "job, a Serve deployment) releases them or the autoscaler adds nodes.",
            what, count * cpus, count * gpus, free.get("CPU", 0.0), free.get("GPU", 0.0))
        return False
    return True


def shard_work(items: list, whole_pool: bool):
    """A dataset of one block per item (a shard of images), so each shard is its own task
    and goes to whichever actor is free (Ray Data's own block count may pack several shards
    into one task, and so onto one actor). Ray Data's helper actors start now
    (:func:`start_data_helpers`).

    ``whole_pool``: Ray Data starts every actor of the pool that maps this dataset before
    handing out work, so the work spreads over all of them (and their nodes) instead of
    the first one to be ready. Pass True only when :func:`check_resources` said the actors
    are free now; otherwise Ray Data starts what fits and adds the rest as resources free
    up. The setting lives in this dataset's own context: a dataset keeps a copy of the
    context that was current when it was made, so changing the global one later does
    nothing to it."""
    import ray

    start_data_helpers()
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if whole_pool:
        dataset.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return dataset


def start_data_helpers() -> None:
    """Start Ray Data's two per-cluster helper actors (its statistics actor and its autoscaling
    coordinator) now, without waiting for them. Ray Data creates them only when its first shard
    is handed out, and a new Python process each takes about 0.5 s of CPU to start: on a small
    machine they then share the cores with the first shards' work (docs/performance.md, "The
    per-image paths"). Asked for before an actor pool starts, they start while the pool's actors
    load their models. Both are private to Ray Data; where a Ray version lacks them, nothing
    happens and Ray Data starts them itself, as before."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    try:
        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as error:  # noqa: BLE001 - an optimisation only: Ray Data makes them when it needs them
        logger.debug("Ray Data's helper actors not started early: %s", error)


def row_blocks(rows: list[dict], blocks: int):
    """A dataset of manifest ``rows`` in ``blocks`` blocks cut on the driver. Ray Data's
    ``repartition`` would cut them in a task, which needs a free CPU: on a machine whose CPUs
    the stage's actors hold (``ray.cpus_per_worker`` = every CPU) it never ran, and the
    stage waited forever. ``from_blocks`` also takes the blocks' sizes and schema on the
    driver, where ``from_arrow`` runs a task per block for them: right after a training
    stage those tasks took 1.9-2.5 s of the evaluation stage (docs/performance.md)."""
    import ray

    from pading.data.manifest import rows_to_table

    start_data_helpers()
    table = rows_to_table(rows)
    size = -(-len(rows) // max(1, blocks))
    return ray.data.from_blocks([table.slice(start, size) for start in range(0, max(1, len(rows)), size or 1)])


def fixed_actor_pool(size: int):
    """A pool of ``size`` actors that each hold one shard at a time: a shard waits for a free
    actor instead of queueing behind a busy one, so when the pool is whole the first
    ``size`` shards go one to each actor (and its node). Ray Data does not balance the rest
    evenly: in tests/test_tune_tables.py's 8 shards on 2 actors, the split was 6/2."""
    import ray

    return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1)


def on_cluster() -> bool:
    """Whether this driver joined a cluster (under ``ray job submit`` or with ``RAY_ADDRESS``)
    rather than starting a Ray of its own."""
    return bool(os.environ.get("RAY_ADDRESS")) or in_ray_job()


def segment_in_driver(config: ExperimentConfig, images: int) -> bool:
    """Whether extraction or evaluation segments its ``images`` images in the driver instead of
    an actor pool: fewer than ``ray.driver_max_images``, no GPU asked for, and a Ray the run
    started itself. On a cluster (under ``ray job submit`` or ``RAY_ADDRESS``) the driver's node
    may offer no CPU, so the work always goes to actors there. The driver then runs on the CPU,
    as such an actor would (Ray hides the GPUs from a process that reserved none)."""
    settings = config.ray
    return (images < settings.driver_max_images and not settings.extract_gpus
            and not on_cluster())


def driver_workers(config: ExperimentConfig, shards: int) -> int:
    """How many shards the driver segments at once when it stands in for an actor pool
    (:func:`segment_in_driver`): as many actors of ``ray.cpus_per_worker`` CPUs as the local
    Ray's CPUs hold (``ray.local_cpus``, else every core), at most one per shard. Each runs on
    a thread of its own with an actor's torch threads (:func:`actor_threads`), so each shard's
    numbers are an actor's, bit for bit (docs/performance.md, "Extraction on every core")."""
    cpus = config.ray.local_cpus or os.cpu_count() or 1
    return max(1, min(shards, int(cpus // max(1, int(config.ray.cpus_per_worker)))))


def in_threads(work, items: list, threads: int) -> list:
    """``[work(item) for item in items]``, up to ``threads`` items at a time on helper threads;
    the results in the items' order, the first error raised."""
    if threads <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="driver-shard") as pool:
        return list(pool.map(work, items))


#: How long an actor waits to see a file the driver wrote (NFS may hold a stale listing briefly).
SHARED_WAIT_S = 30.0


def require_shared(marker: Path, what: str, wait_s: float | None = None) -> None:
    """Stop an actor whose node does not see ``marker``, a file the driver wrote into the
    output before starting it: its results would land on this node's own disk, which the
    driver never reads (a job that then reports its shards unfinished run after run). Waits
    up to ``wait_s`` seconds first (default :data:`SHARED_WAIT_S`), listing the folder again,
    for a shared file system that caches listings."""
    from pading.errors import ConfigError

    deadline = time.monotonic() + (SHARED_WAIT_S if wait_s is None else wait_s)
    while not marker.is_file():
        if time.monotonic() >= deadline:
            import socket

            raise ConfigError(f"{what} {marker.parent} is not shared with this node ({socket.gethostname()}): the "
                              f"driver wrote {marker.name} there and this node does not see it. Give a path on "
                              "storage every node mounts at the same place (NFS, a cluster file system)")
        try:
            os.listdir(marker.parent)
        except OSError:
            pass
        time.sleep(0.5)


@contextlib.contextmanager
def actor_threads(cpus: float):
    """Run the block on the torch threads an actor of ``cpus`` CPUs runs (Ray gives it
    ``max(1, int(cpus))``), so the driver computes what the actor would, bit for bit; the
    driver's count is restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def output_rows(batches: list[dict]) -> list[dict]:
    """The rows of UDF outputs (dicts of equal-length columns), as Ray Data's ``take_all`` gives them."""
    return [dict(zip(batch, values)) for batch in batches for values in zip(*batch.values())]


def share_per_actor(images: int, actors: int) -> int:
    """The most images one of ``actors`` actors gets: what each is told of its workload (its
    inference runtime, pading.model.runtime, exports only for a large enough share)."""
    return -(-int(images) // max(1, int(actors)))


#: Ray Train's preemption watcher: off on the local Ray a run starts (:func:`init_ray`).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
#: Ray Train's poll interval of its workers (``ray.train_poll_s``).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def train_scaling(config: ExperimentConfig, num_workers: int | None = None, cpus_per_worker: float | None = None):
    """The Ray Train ScalingConfig of ``config.ray`` (``num_workers`` workers, default
    ``ray.num_workers``, of ``cpus_per_worker`` CPUs each, default ``ray.cpus_per_worker``),
    after checking that the cluster can place the workers."""
    import ray.train

    settings = config.ray
    workers = num_workers or settings.num_workers
    cpus = settings.cpus_per_worker if cpus_per_worker is None else cpus_per_worker
    # Ray Train's controller reads this when the trainer starts; its 2 s default adds up to 2 s
    # at the start and the end of every stage (docs/performance.md)
    os.environ.setdefault(TRAIN_POLL_ENV, str(settings.train_poll_s))
    setting = "ray.num_workers / ray.cpus_per_worker" if cpus_per_worker is None else \
        "ray.num_workers / ray.pretrain_cpus_per_worker"
    check_resources(f"{workers} Ray Train worker(s)", setting, workers, cpus, 1.0 if settings.use_gpu else 0.0)
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=settings.use_gpu, resources_per_worker={"CPU": cpus},
                                   placement_strategy=settings.placement_strategy)


def torch_trainer(train_loop, **kwargs):
    """``TorchTrainer(train_loop, **kwargs)`` without two of the helper actors Ray Train starts
    for every run, each a new Python process: the dataset manager, which serves Ray Datasets
    passed as ``datasets=`` (the stages pass none), and, unless the driver runs on a cluster
    (under ``ray job submit`` or ``RAY_ADDRESS``), the placement-group cleaner, which frees a
    run's CPUs if its controller dies while the driver goes on. On a Ray this driver started,
    a dead controller fails the stage and the driver exits, which frees them anyway. Without
    the two, a run that only reports once took 6.2-6.7 s instead of 7.5-8.2 and 3.3 s less
    CPU (docs/performance.md, "Ray Train's helper actors"). Ray Train chooses its helpers in a
    private method; where a Ray version lacks it, this is a plain ``TorchTrainer``."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray Train: its own helpers
        return TorchTrainer(train_loop, **kwargs)
    if not callable(getattr(TorchTrainer, "_create_default_callbacks", None)):
        return TorchTrainer(train_loop, **kwargs)
    unused: tuple = (DatasetsCallback,) if not kwargs.get("datasets") else ()
    if not on_cluster():
        unused += (PlacementGroupCleanerCallback,)

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, unused)]

    return LeanTorchTrainer(train_loop, **kwargs)


#: Work queued by :func:`during_next_fit` for the next :func:`fit` of this process.
_DURING_NEXT_FIT: list = []


def during_next_fit(work) -> None:
    """Queue ``work()`` to run on a daemon thread of the driver while the next Ray Train run of
    this process (:func:`fit`) trains. The driver only waits there: pipelines/full.py queues the
    next stage's imports (``warm_up`` of a stage module), so they cost that stage nothing. The
    thread starts after the training stage's driver has imported what it needs, so the two
    threads never import the same modules at once. A failure of ``work`` is logged, not raised:
    the stage that needs it imports again and reports the error itself."""
    _DURING_NEXT_FIT.append(work)


def _quietly(work) -> None:
    try:
        work()
    except Exception:  # see during_next_fit
        logger.warning("work run during training failed (the stage that needs it tries again): %r", work,
                       exc_info=True)


#: How long :func:`fit` waits, after the training, for work that is still running.
DURING_FIT_JOIN_S = 120.0


def fit(trainer):
    """``trainer.fit()``, with the work queued by :func:`during_next_fit` running meanwhile. The
    work is waited for after the training (up to :data:`DURING_FIT_JOIN_S`), so nothing the
    stage after imports is still being imported by the thread when a short training ends."""
    threads = []
    while _DURING_NEXT_FIT:
        work = _DURING_NEXT_FIT.pop(0)
        logger.info("while it trains, the driver runs %s", getattr(work, "__qualname__", work))
        threads.append(threading.Thread(target=_quietly, args=(work,), name="pading-during-fit", daemon=True))
        threads[-1].start()
    try:
        return trainer.fit()
    finally:
        deadline = time.time() + DURING_FIT_JOIN_S
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.time()))


def drop_queued_work() -> None:
    """Forget work queued by :func:`during_next_fit` that no training has run (its stage was
    skipped), so it does not run in a later, unrelated one."""
    _DURING_NEXT_FIT.clear()


def freeze_for_exit() -> None:
    """The command lines call this last: every object left then moves to the garbage collector's
    permanent generation, which the interpreter's collections at exit skip. A demo's driver
    holds about 800,000 objects (torch, transformers, Ray, MLflow); collecting them took 2.1 s
    at exit, 0.3 s frozen (docs/performance.md, "The demo's wall time"). Objects freed by their
    reference counts are still freed; only a cycle made garbage after this call is not
    collected, and the process ends anyway."""
    gc.freeze()


def _dashboard_url() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().worker.node.address_info.get("webui_url")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a private attribute of Ray's; no dashboard URL is not an error
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
    freeze_for_exit()
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

    record_worker_node(stage_dir, stage, rank, world, ray.get_runtime_context().get_node_id(), log)
