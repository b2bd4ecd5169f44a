"""The stage lifecycle of a run, without Ray (docs/architecture.md "Layers"): the success
record a finished stage writes (``_SUCCESS.json``) and :class:`Stage`, the one lifecycle of
the five stages, the Tune search and the tables; the records of the nodes a stage's workers
ran on; and whether a cluster's nodes can ever hold what a stage asks for
(:class:`ClusterTooSmall`). pipelines/common.py re-exports all of it and adds the Ray calls."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from pading.config import setting_changes
from pading.io import write_json_atomic
from pading.run.layout import SUCCESS_FILE, WORKERS_DIR

#: The name the stages' log lines have always carried (benchmarks/scaling.py quiets it).
logger = logging.getLogger("pipelines")


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


#: The key of a success record that holds the settings its stage was made with.
SETTINGS_KEY = "settings"


def recorded_changes(record: Mapping[str, Any], settings: Mapping[str, Any] | None) -> list[str]:
    """How ``settings`` differ from those a stage's success record ``record`` was made with
    (``"key: old -> new"``); none when either is unknown (a record from before they were kept)."""
    recorded = record.get(SETTINGS_KEY)
    if settings is None or not isinstance(recorded, Mapping):
        return []
    return setting_changes(recorded, settings)


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

    A stage that raises before ``finish`` is not marked done, so the next run redoes it.
    ``settings`` (:func:`pading.config.computed_settings` of the run's config) are kept in the
    success record; a stage found done with other settings is still skipped (its products are
    kept), and ``changed`` lists the differences, which are logged as a warning each time: the
    record says what the products were made with, whatever the later runs were given."""

    def __init__(self, name: str, stage_dir: Path, force: bool = False, *, clean: bool = False,
                 settings: Mapping[str, Any] | None = None):
        self.name, self.dir, self.force, self.clean = name, Path(stage_dir), force, clean
        self.settings = dict(settings) if settings is not None else None
        self.done = None if force else stage_done(self.dir)
        self.changed: list[str] = []
        if self.done is not None:
            self.changed = recorded_changes(self.done, self.settings)
            if self.changed:
                logger.warning("%s: already done (%s) with other settings (%s); skipping it, its products are kept "
                               "and do not follow the new settings: --force redoes it", name, self.dir,
                               "; ".join(self.changed))
            else:
                logger.info("%s: already done (%s), skipping", name, self.dir)
        self.started: float | None = None

    def start(self) -> "Stage":
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
        mark_done(self.dir, info if self.settings is None else {**info, SETTINGS_KEY: self.settings})
        return info


def copy_from_checkpoint(result, name: str, history_file: str, stage_dir: Path) -> Path:
    """Copy directory ``name`` and the loss history out of a Ray Train result's final
    checkpoint (``result.checkpoint.as_directory()``) into ``stage_dir`` (replacing an older
    copy); returns the copied directory."""
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (no {name} to copy)")
    target = stage_dir / name
    with result.checkpoint.as_directory() as directory:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(directory) / name, target)
        shutil.copy(Path(directory) / history_file, stage_dir / history_file)
    return target


# ---- the nodes a stage's workers ran on ---------------------------------------------------


def record_worker_node(stage_dir: Path, stage: str, rank: int, world: int, node: str, log: logging.Logger) -> None:
    """Log that worker ``rank`` runs on ``node`` (a Ray node id) and record it in
    ``<stage_dir>/workers/`` (:func:`worker_nodes` reads it back into the stage's record)."""
    import torch

    record = {"rank": rank, "world_size": world, "node_id": node, "hostname": socket.gethostname(), "pid": os.getpid(),
              "torch_threads": torch.get_num_threads()}  # Ray sets OMP_NUM_THREADS to the worker's CPUs
    log.info(f"[{stage}] worker {rank}/{world} on node {node} ({record['hostname']}, pid {record['pid']}, "
             f"{record['torch_threads']} torch threads)")
    directory = Path(stage_dir) / WORKERS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / f"rank-{rank}.json", record)  # read while the stage runs (tests)


def worker_nodes(stage_dir: Path) -> list[dict]:
    """The records :func:`record_worker_node` wrote, by rank."""
    files = sorted((Path(stage_dir) / WORKERS_DIR).glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(p.read_text()) for p in files]


# ---- what a stage asks of the cluster -----------------------------------------------------


class ClusterTooSmall(RuntimeError):
    """The cluster can never run what a stage asks for (Ray would wait forever)."""


def check_capacity(what: str, setting: str, count: int, cpus: float, gpus: float,
                   nodes: Iterable[Mapping[str, float]]) -> None:
    """Raise :class:`ClusterTooSmall` when ``count`` actors or workers of ``cpus`` CPUs and
    ``gpus`` GPUs each can never be placed on ``nodes`` (each alive node's resources, as
    Ray lists them; a 0-CPU head node offers nothing)."""
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


def short_of(free: Mapping[str, float], count: int, cpus: float, gpus: float) -> bool:
    """Whether the ``free`` resources lack ``count`` x (``cpus`` CPU, ``gpus`` GPU) now."""
    return free.get("CPU", 0.0) + 1e-9 < count * cpus or free.get("GPU", 0.0) + 1e-9 < count * gpus
