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

from pading.bundle import CLASSES_FILE, CONFIG_FILE
from pading.classes import ClassTable
from pading.config import SEGMENT_FORMATS, ExperimentConfig, load_config
from pading.errors import ConfigError, PadingError
from pading.io import write_json_atomic
from pading.serving import batch
from pading.serving.inputs import list_inputs
from pading.serving.vocabularies import default_store, open_store, store_key
from pipelines import common

logger = logging.getLogger("pipelines.segment")

#: command-line flag -> config key (the flag wins over --set and the config file)
FLAG_SETTINGS = {"format": "format", "task": "task", "concurrency": "concurrency", "num_gpus": "num_gpus",
                 "num_cpus": "num_cpus", "shard_size": "shard_size", "batch_size": "batch_size",
                 "min_score": "min_score", "input_column": "input_column"}


class SegmenterActor(batch.ShardSegmenter):
    """The library's shard segmenter with one torch thread per reserved CPU."""

    def __init__(self, *args, num_cpus: float = 1.0, **kwargs):
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))
        super().__init__(*args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/...")
    parser.add_argument("--input", required=True, help="folder, glob, .txt list, or .parquet/.csv with a path column")
    parser.add_argument("--output", required=True, help="output directory (results, rejects, the vocabulary used)")
    parser.add_argument("--format", choices=SEGMENT_FORMATS, default=None,
                        help="parquet (default: one row per segment), coco-panoptic, coco-instance or semantic")
    parser.add_argument("--task", choices=("panoptic", "instance", "semantic", "all"), default=None,
                        help="what to segment (default: the format's task; parquet: panoptic)")
    parser.add_argument("--add-classes", default=None, help='class names to add, comma separated: "teapot,lamp post"')
    parser.add_argument("--add-classes-file", default=None, help="class names to add, one per line")
    parser.add_argument("--only-classes", default=None, help="keep only segments of these classes (comma separated)")
    parser.add_argument("--vocabulary", default=None,
                        help="a named vocabulary of the endpoint's store: exactly the classes the endpoint serves "
                             "for vocabulary=NAME (docs/serving.md)")
    parser.add_argument("--vocabulary-store", default=None,
                        help="the vocabulary store (default: serve.vocabulary_store, else next to the bundle)")
    parser.add_argument("--overlays", action="store_true", help="also write overlays/<image_id>.png")
    parser.add_argument("--input-column", default=None, help="column of paths in a Parquet/CSV input (default: path)")
    parser.add_argument("--concurrency", type=int, default=None, help="actors holding the model (segment.concurrency)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (segment.num_gpus)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per actor (segment.num_cpus)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (segment.shard_size)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (segment.batch_size)")
    parser.add_argument("--min-score", type=float, default=None, help="drop segments scoring lower")
    parser.add_argument("--config", default=None, help="YAML config (default: the bundle's config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set segment.read_threads=16 (repeatable)")
    parser.add_argument("--force", action="store_true", help="remove this job's earlier results in --output, redo all")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    source = common.resolve_bundle(args.bundle, load_config(args.config) if args.config else None)
    overrides = list(args.overrides) + [f"segment.{key}={getattr(args, flag)}" for flag, key in FLAG_SETTINGS.items()
                                        if getattr(args, flag) is not None]
    config = load_config(args.config or source / CONFIG_FILE, overrides)
    output = Path(common._absolute(args.output, "--output"))  # workers may run on other nodes
    output.mkdir(parents=True, exist_ok=True)
    settings = config.segment
    task = batch.resolve_task(settings.format, settings.task)
    paths = list_inputs(args.input, settings.input_column)
    added = batch.merge_names(batch.parse_class_names(args.add_classes),
                              batch.read_class_file(args.add_classes_file) if args.add_classes_file else [])
    only = batch.parse_class_names(args.only_classes)
    source_table = ClassTable.from_records(json.loads((source / CLASSES_FILE).read_text()))
    named = visible = vocabulary = None
    if args.vocabulary:
        if added:
            raise ConfigError("--vocabulary and --add-classes: add the classes to the vocabulary through the endpoint "
                              "(POST /v1/classes?vocabulary=NAME), so both use the same ones")
        from pading.run import tracking

        uri = tracking.tracking_uri(config.tracking) if store_key(args.bundle) else None
        spec = default_store(args.bundle, source, args.vocabulary_store or config.serve.vocabulary_store, uri)
        store = open_store(spec, uri, store_key(args.bundle) or "bundle")
        named, version, visible = batch.vocabulary_state(source, config, store, args.vocabulary)
        source_table = named.table
        vocabulary = {"name": args.vocabulary, "version": version, "store": str(store.root)}
        logger.info("segment: vocabulary %r version %d from %s", args.vocabulary, version, store.root)
    preview = batch.preview_table(source_table, added)  # names already known stop here
    if only:
        batch.select_classes(preview, only)  # and unknown ones here, before the output is touched
    spec = batch.job_spec(bundle=batch.bundle_fingerprint(source), add_classes=added, only_classes=only, task=task,
                          paths=paths, shard_size=settings.shard_size, config=config, vocabulary=vocabulary)
    resume = batch.check_output(output, spec, args.force)
    table = batch.prepare_bundle(source, output, config, added, reuse=resume, bundle=named)
    only_ids = batch.select_classes(table, only) if only else None
    if visible is not None:  # a named vocabulary's classes only, like the endpoint's answers
        only_ids = [i for i in (only_ids or visible) if i in set(visible)]
    categories = batch.coco_categories(table)
    write_json_atomic(output / "categories.json", categories)
    write_json_atomic(output / batch.JOB_FILE, spec)

    shards = batch.plan_shards(paths, settings.shard_size)
    pending = batch.pending_shards(output, shards)
    logger.info("segment: %d images in %d shards of %d, %d to do (task %s, format %s, %d classes%s)", len(paths),
                len(shards), settings.shard_size, len(pending), task, settings.format, table.num_classes,
                f", only {only}" if only else "")
    new_images = segment_seconds = steady = 0.0
    if pending:
        new_images, segment_seconds, steady = segment_pending(config, output, pending, task, only_ids, args.overlays,
                                                      len(shards))
    counts = batch.assemble(output, settings.format, task, len(shards), categories, overlays=args.overlays)
    seconds = time.time() - started
    summary = {
        "images": counts["images"], "segmented": counts["segmented"], "rejected": counts["rejected"],
        "segments": counts["segments"], "seconds": round(seconds, 2), "new_images": int(new_images),
        "segment_seconds": round(segment_seconds, 2),
        "images_per_second": round(new_images / segment_seconds, 3) if segment_seconds else 0.0,
        "steady_images_per_second": round(steady, 3),
        "shards": len(shards), "shards_run": len(pending), "format": settings.format, "task": task,
        "concurrency": settings.concurrency, "classes": table.num_classes, "added_classes": added,
        "only_classes": only, "output": str(output), "products": counts["products"],
    }
    write_json_atomic(output / "summary.json", summary)
    logger.info("segment: %d images segmented, %d rejected, %d segments; %.1f s (%d new images at %.2f images/s, "
                "%.2f once the actors were up)", summary["segmented"], summary["rejected"], summary["segments"],
                seconds, new_images, summary["images_per_second"], steady)
    return summary


def segment_pending(config: ExperimentConfig, output: Path, pending: list[dict], task: str, only_ids, overlays: bool,
                    total_shards: int) -> tuple[int, float, float]:
    """Run the pending shards on an actor pool; (images, seconds, steady images/s)."""
    settings = config.segment
    common.init_ray(config)
    free = common.check_resources(f"{settings.concurrency} segmentation actor(s)",
                                  "--concurrency / --num-gpus / segment.num_cpus",
                                  settings.concurrency, settings.num_cpus, settings.num_gpus)
    started = time.time()
    work = common.shard_work(pending, whole_pool=free)  # all actors up before shards are handed out
    results = work.map_batches(
        SegmenterActor,
        fn_constructor_kwargs={
            "bundle_dir": str(output / batch.BUNDLE_DIR), "output_dir": str(output), "task": task,
            "output_format": settings.format, "overlays": overlays, "only_class_ids": only_ids,
            "batch_size": settings.batch_size, "min_score": settings.min_score,
            "max_image_bytes": settings.max_image_bytes, "max_image_pixels": settings.max_image_pixels,
            "read_threads": settings.read_threads, "num_cpus": settings.num_cpus,
        },
        batch_size=1, compute=common.fixed_actor_pool(settings.concurrency), num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus or None,
    )
    rows = []
    finished_before = total_shards - len(pending)
    for row in results.iter_rows():
        rows.append(row)
        logger.info("segment: shard %d done: %d images, %d rejected, %d segments, %.1f s [%d/%d shards]",
                    int(row["shard"]), int(row["images"]), int(row["rejected"]), int(row["segments"]),
                    float(row["seconds"]), finished_before + len(rows), total_shards)
    return sum(int(r["images"]) for r in rows), time.time() - started, batch.steady_throughput(rows)


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
