"""Stage 3, extract: Ray Data ``map_batches`` with an actor class holding the frozen
segmenter writes the features Parquet (query embeddings + matched labels) of the train
manifest, one file per shard of images. Fewer images than ``ray.driver_max_images``, on a Ray
the run started itself, are extracted in the driver by the same class (pipelines.common.segment_in_driver).

Idempotent: a shard file appears only once complete (atomic rename), finished shards are
skipped, so re-running over complete output does nothing and re-running after an
interruption finishes the missing shards without duplicate rows. Finished shards are kept
only while they belong to the same plan (``_PLAN.json``: the segmenter's checksum, the shard
size and the manifest's shards); after pretraining again, or with another
``ray.extract_shard_size`` or manifest, the stage's earlier shards are deleted and extracted again.

    python pipelines/extract.py [--config ...] [--force]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pading import allocator
from pading.config import ExperimentConfig, computed_settings
from pading.data.manifest import shard_rows
from pading.io import write_json_atomic
from pading.run import RunLayout, count_manifest, load_table, read_manifest
from pading.run.extraction import FeatureExtractor, shard_rows_blob
from pading.serving.batch import steady_throughput
from pipelines import common

logger = logging.getLogger("pipelines.extract")


def checkpoint_id(segmenter_dir: Path) -> str:
    """Content hash of the segmenter weights: recorded in every feature row."""
    digest = hashlib.sha256()
    for path in sorted(segmenter_dir.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


PLAN_FILE = "_PLAN.json"  # "_": readers of the folder as a Parquet dataset skip it, as _SUCCESS.json


def extraction_plan(checkpoint: str, shard_size: int, shards: list[list[int]]) -> dict:
    """What a finished shard must have been extracted for to be kept (:func:`drop_stale_shards`)."""
    digest = hashlib.sha256(json.dumps(shards, separators=(",", ":")).encode()).hexdigest()[:16]
    return {"checkpoint": checkpoint, "shard_size": int(shard_size), "shards": len(shards), "image_ids": digest}


def drop_stale_shards(stage_dir: Path, rejects_dir: Path, plan: dict, shards: list[list[int]]) -> list[Path]:
    """Delete the finished shards (and their rejects) that another plan wrote, record ``plan``
    and return what was deleted. Without a recorded plan (an output of an earlier version), a
    shard is kept when its rows name this checkpoint and only its own shard's images."""
    import pyarrow.parquet as pq

    plan_file = stage_dir / PLAN_FILE
    existing = sorted(stage_dir.glob("shard-*.parquet"))
    recorded = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if recorded == plan or not existing:
        stale = []
    elif recorded is not None:
        stale = existing
    else:
        stale = []
        for path in existing:
            index = int(path.stem.split("-")[1])
            table = pq.read_table(path, columns=["image_id", "checkpoint"])
            if index >= len(shards) or set(table["checkpoint"].to_pylist()) - {plan["checkpoint"]} or \
                    set(table["image_id"].to_pylist()) - set(shards[index]):
                stale.append(path)
    if stale:
        logger.warning("extract: %d finished shard(s) were extracted for another plan (recorded %s, now %s); "
                       "extracting them again", len(stale), recorded or "none", plan)
    for path in stale:
        path.unlink()
        (rejects_dir / path.name).unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_file, plan)
    return stale


class NodeRecordingExtractor(FeatureExtractor):
    """The library's extractor, with one torch thread per reserved CPU, and the node and the
    inference runtime of each actor in its output rows (the stage record lists them)."""

    def __init__(self, *args, **kwargs):
        import ray
        import torch

        # before the model loads: its ONNX Runtime session takes the thread count then
        torch.set_num_threads(max(1, int(kwargs["config"].ray.cpus_per_worker)))
        common.require_shared(Path(kwargs["output_dir"]) / PLAN_FILE, "the features folder")
        super().__init__(*args, **kwargs)
        self.node_id = ray.get_runtime_context().get_node_id()
        logger.info("extract: process %d on node %s, segmenter on %s", os.getpid(), self.node_id, self.runtime)

    def __call__(self, batch: dict) -> dict:
        started = time.time()
        out = super().__call__(batch)
        out["node_id"] = np.array([self.node_id] * len(out["shard"]))
        out["runtime"] = np.array([self.runtime] * len(out["shard"]))
        out["started_at"] = np.full(len(out["shard"]), started)
        out["finished_at"] = np.full(len(out["shard"]), time.time())
        out["actor_pid"] = np.full(len(out["shard"]), os.getpid())
        return out


def warm_up(config: ExperimentConfig, output: Path, force: bool = False) -> None:
    """Called by pipelines/full.py when the stage before this one starts: when this stage will
    segment in the driver, the driver imports the segmenter's transformers modules while the
    pretraining stage trains (about 2.5 s of this stage's 4 s on the demo; docs/performance.md,
    "The demo's wall time")."""
    if common.stage_done(RunLayout(output).features) is not None and not force:
        return
    if not common.segment_in_driver(config, 0):  # a GPU asked for, a cluster: actors extract, whatever the count
        return
    try:
        images = count_manifest(output, "train")
    except Exception:  # noqa: BLE001 - no manifest yet: run() reports it
        return
    if common.segment_in_driver(config, images):
        from pading.model.segmenter import import_backend

        common.during_next_fit(import_backend)


def run(config: ExperimentConfig, output: Path, force: bool = False) -> dict:
    stage_dir = RunLayout(output).features
    stage = common.Stage("extract", stage_dir, force, settings=computed_settings(config))
    if stage.done:
        return stage.done
    stage.start()
    if force:
        shutil.rmtree(RunLayout(output).features_rejects, ignore_errors=True)
    common.init_ray(config)
    table = load_table(output)
    rows = read_manifest(output, "train")
    segmenter_dir = RunLayout(output).segmenter
    ckpt = checkpoint_id(segmenter_dir)
    shard_size = config.ray.extract_shard_size
    shards = shard_rows(rows, shard_size)
    drop_stale_shards(stage_dir, RunLayout(output).features_rejects, extraction_plan(ckpt, shard_size, shards), shards)
    pending = [i for i in range(len(shards)) if not (stage_dir / f"shard-{i:05d}.parquet").is_file()]
    logger.info("extract: %d shards of %d images, %d to do (segmenter %s)", len(shards), shard_size, len(pending), ckpt)
    total_rows, nodes, runtimes, steady, where, workers = 0, [], [], 0.0, None, 0
    if pending:
        images = sum(len(shards[i]) for i in pending)
        where = "driver" if common.segment_in_driver(config, images) else "actors"
        by_id = {int(r["image_id"]): r for r in rows}
        # each shard carries its own manifest rows: no actor holds the whole manifest
        work_items = [{"shard": i, "image_ids": shards[i], "rows": shard_rows_blob([by_id[j] for j in shards[i]])}
                      for i in pending]
        del by_id
        kwargs = {"config": config, "segmenter_dir": str(segmenter_dir), "table_records": table.to_records(),
                  "manifest_rows": None, "output_dir": str(stage_dir), "checkpoint_id": ckpt,
                  "images": images if where == "driver" else common.share_per_actor(images, config.ray.extract_concurrency)}
        stage_dir.mkdir(parents=True, exist_ok=True)
        if where == "driver":  # a few images: no actor start (ray.driver_max_images)
            workers = common.driver_workers(config, len(pending))
            logger.info("extract: %d images in the driver (fewer than ray.driver_max_images=%d), %d shard(s) at a "
                        "time", images, config.ray.driver_max_images, workers)
            with common.actor_threads(config.ray.cpus_per_worker):
                extractor = NodeRecordingExtractor(**kwargs, device="cpu")  # as an actor without GPUs
                results = common.output_rows(common.in_threads(
                    lambda item: extractor({key: [value] for key, value in item.items()}), work_items, workers))
            del extractor
        else:
            free = common.check_resources(f"{config.ray.extract_concurrency} extraction actor(s)",
                                          "ray.extract_concurrency / ray.cpus_per_worker / ray.extract_gpus",
                                          config.ray.extract_concurrency, config.ray.cpus_per_worker,
                                          config.ray.extract_gpus, wait_s=common.RELEASE_GRACE_S)
            work = common.shard_work(work_items, whole_pool=free)
            results = work.map_batches(
                NodeRecordingExtractor, fn_constructor_kwargs=kwargs,
                batch_size=1, compute=common.fixed_actor_pool(config.ray.extract_concurrency),
                num_gpus=config.ray.extract_gpus or None, num_cpus=config.ray.cpus_per_worker,
                **allocator.runtime_env(),  # glibc malloc kept from faulting per image
            ).take_all()
        total_rows = sum(int(r["rows"]) for r in results)
        nodes = sorted({str(r["node_id"]) for r in results})
        runtimes = sorted({str(r["runtime"]) for r in results})
        # images/s once the actors are up (each actor's first shard start to last shard end)
        steady = steady_throughput([{"pid": r["actor_pid"], "host": r["node_id"], "images": len(shards[int(r["shard"])]),
                                     "skipped": False,
                                     "started_at": r["started_at"], "finished_at": r["finished_at"]} for r in results])
    files = sorted(stage_dir.glob("shard-*.parquet"))
    info = {"shards": len(files), "new_rows": total_rows, "checkpoint": ckpt, "embed_dim": config.segmenter.hidden_dim,
            "actor_nodes": nodes, "runtimes": runtimes, "steady_images_per_second": steady, "where": where,
            "driver_workers": workers}
    if len(files) != len(shards):
        raise RuntimeError(f"extract: {len(files)} of {len(shards)} shards written")
    return stage.finish(info)


if __name__ == "__main__":
    common.stage_main(run, __doc__)
