"""Batch segmentation of image collections with Ray Data (docs/architecture.md "Batch segmentation").

    python pipelines/segment.py --bundle outputs/demo/generator/bundle --input photos/ --output out/
        [--format parquet|coco-panoptic|coco-instance|semantic] [--task panoptic|instance|semantic|all]
        [--add-classes "teapot,lamp post"] [--add-classes-file names.txt] [--only-classes "person,teapot"]
        [--vocabulary NAME [--vocabulary-store DIR]] [--overlays] [--concurrency N] [--num-gpus G] [--shard-size S] [--config F] [--set k=v] [--force]

``--input``: a folder (recursive), a glob, a text file of paths, a Parquet/CSV file with a
column of paths (``--input-column``), local or any pyarrow file system URI (s3://, gs://...).
``--bundle``: a bundle directory or an MLflow ``runs:/<id>/bundle`` / ``models:/...`` URI.
``--vocabulary``: a named vocabulary of the endpoint's vocabulary store, at its newest version,
so a collection is segmented with exactly the classes the endpoint serves for it.

Ray Data ``map_batches`` with an actor pool holding the model runs one shard of images per
task; a shard's files appear only once complete, so a rerun skips finished shards and adds
no duplicate rows. The format's files are assembled from the shard files at the end.
Unreadable images go to ``<output>/rejects.parquet`` / ``rejects.csv``. The logic is in
pading.serving.batch and pading.serving.inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pading import allocator
from pading.config import ExperimentConfig
from pading.errors import PadingError
from pading.run import batch_job
from pading.run.batch_job import FLAG_SETTINGS  # noqa: F401 - re-exported: it was defined here
from pading.serving import batch
from pipelines import common

logger = logging.getLogger("pipelines.segment")

#: Times a shard is handed out again after its actor died (Ray Data's default is without end:
#: an image that kills its actor, e.g. out of memory, would stall the job for ever).
SHARD_RETRIES = 3


class SegmenterActor(batch.ShardSegmenter):
    """The library's shard segmenter with one torch thread per reserved CPU."""

    def __init__(self, *args, num_cpus: float = 1.0, **kwargs):
        import torch

        common.require_shared(Path(kwargs["output_dir"]) / batch.JOB_FILE, "the --output folder")
        torch.set_num_threads(max(1, int(num_cpus)))
        super().__init__(*args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return batch_job.parse_args(argv, description=__doc__)


def run(args: argparse.Namespace) -> dict:
    job = batch_job.plan(args)
    new_images = segment_seconds = steady = 0.0
    if job.pending:
        new_images, segment_seconds, steady = segment_pending(job.config, job.output, job.pending, job.task, job.only_ids,
                                                              args.overlays, len(job.shards))
    return batch_job.finish(job, new_images, segment_seconds, steady)


def segment_pending(config: ExperimentConfig, output: Path, pending: list[dict], task: str, only_ids, overlays: bool,
                    total_shards: int, actor_class: type | None = None) -> tuple[int, float, float]:
    """Run the pending shards on a pool of ``actor_class`` (default :class:`SegmenterActor`);
    (images, seconds, steady images/s)."""
    settings = config.segment
    common.init_ray(config)
    free = common.check_resources(f"{settings.concurrency} segmentation actor(s)",
                                  "--concurrency / --num-gpus / segment.num_cpus",
                                  settings.concurrency, settings.num_cpus, settings.num_gpus)
    started = time.time()
    work = common.shard_work(pending, whole_pool=free)  # all actors up before shards are handed out
    results = work.map_batches(
        actor_class or SegmenterActor,
        fn_constructor_kwargs={
            "bundle_dir": str(output / batch.BUNDLE_DIR), "output_dir": str(output), "task": task,
            "output_format": settings.format, "overlays": overlays, "only_class_ids": only_ids,
            "batch_size": settings.batch_size, "min_score": settings.min_score,
            "max_image_bytes": settings.max_image_bytes, "max_image_pixels": settings.max_image_pixels,
            "read_threads": settings.read_threads, "num_cpus": settings.num_cpus, "runtime": settings.runtime,
            "images": common.share_per_actor(sum(len(shard["paths"]) for shard in pending), settings.concurrency),
        },
        batch_size=1, compute=common.fixed_actor_pool(settings.concurrency), num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus or None, max_task_retries=SHARD_RETRIES,
        **allocator.runtime_env(),  # glibc malloc kept from faulting per image
    )
    rows = []
    finished_before = total_shards - len(pending)
    try:
        for row in results.iter_rows():
            rows.append(row)
            logger.info("segment: shard %d done: %d images, %d rejected, %d segments, %.1f s [%d/%d shards]",
                        int(row["shard"]), int(row["images"]), int(row["rejected"]), int(row["segments"]),
                        float(row["seconds"]), finished_before + len(rows), total_shards)
    except Exception as error:
        from ray.exceptions import RayActorError

        if not isinstance(error, RayActorError) and not isinstance(getattr(error, "cause", None), RayActorError):
            raise
        raise PadingError(
            f"a segmentation actor died on a shard and its {SHARD_RETRIES} retries ran out ({type(error).__name__}: "
            f"{error}); most likely out of memory on a large image. The shards finished so far are kept. Lower "
            "segment.max_image_pixels (or segment.batch_size) and run the job again") from None
    new = sum(int(r["images"]) for r in rows if not r["skipped"])  # shards an earlier attempt finished are not new
    return new, time.time() - started, batch.steady_throughput(rows)


def main(argv: list[str] | None = None) -> int:
    common.setup_logging()
    args = parse_args(argv)
    try:
        summary = run(args)
    except (PadingError, common.ClusterTooSmall) as err:
        logger.error("segment: %s", err)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
