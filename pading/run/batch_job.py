"""The driver side of a batch segmentation job (pipelines/segment.py), without Ray: its
command line, the plan of a job (the bundle, the config, the inputs, the vocabulary, the
output directory's checks, the shards still to run) and its summary (docs/architecture.md
"Batch segmentation"). The shards themselves and the output formats are
:mod:`pading.serving.batch`; pipelines/segment.py runs the pending shards on a Ray Data
actor pool between :func:`plan` and :func:`finish`."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pading.bundle import CONFIG_FILE, Bundle
from pading.classes import ClassTable
from pading.config import SEGMENT_FORMATS, ExperimentConfig, load_config
from pading.errors import ConfigError
from pading.io import write_json_atomic
from pading.run.cli import _absolute, in_ray_job, resolve_bundle
from pading.serving import batch
from pading.serving.inputs import is_uri, list_inputs
from pading.serving.vocabularies import default_store, open_store, store_key

#: The name the command's log lines have always carried.
logger = logging.getLogger("pipelines.segment")

#: command-line flag -> config key (the flag wins over --set and the config file)
FLAG_SETTINGS = {"format": "format", "task": "task", "concurrency": "concurrency", "num_gpus": "num_gpus",
                 "num_cpus": "num_cpus", "shard_size": "shard_size", "batch_size": "batch_size",
                 "min_score": "min_score", "input_column": "input_column"}


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """pipelines/segment.py's arguments (``description``: its help text)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


@dataclass
class Job:
    """A planned job: what the actors run (the pending shards of ``shards``) and what its
    summary reports."""

    started: float
    config: ExperimentConfig
    output: Path
    task: str
    table: ClassTable
    added: list[str]
    only: list[str]
    only_ids: list[int] | None
    categories: list[dict]
    shards: list[dict]
    pending: list[dict]
    overlays: bool


def plan(args: argparse.Namespace) -> Job:
    """Resolve the bundle and the config (flags over ``--set`` over the config file), list the
    inputs, settle the vocabulary (added classes, ``--only-classes``, a named vocabulary of
    the endpoint's store), check the output directory against the request (refused unless
    ``--force`` when it holds another), save the bundle the actors load, write
    ``categories.json`` and ``job.json``, and cut the shards (finished ones are not pending)."""
    started = time.time()
    source = resolve_bundle(args.bundle, load_config(args.config) if args.config else None)
    overrides = list(args.overrides) + [f"segment.{key}={getattr(args, flag)}" for flag, key in FLAG_SETTINGS.items()
                                        if getattr(args, flag) is not None]
    config = load_config(args.config or source / CONFIG_FILE, overrides)
    output = Path(_absolute(args.output, "--output"))  # workers may run on other nodes
    output.mkdir(parents=True, exist_ok=True)
    settings = config.segment
    task = batch.resolve_task(settings.format, settings.task)
    spec = args.input
    if in_ray_job() and not is_uri(spec):  # other nodes would read the job's temporary working directory
        spec = _absolute(spec, "--input")
    paths = list_inputs(spec, settings.input_column)
    added = batch.merge_names(batch.parse_class_names(args.add_classes),
                              batch.read_class_file(args.add_classes_file) if args.add_classes_file else [])
    only = batch.parse_class_names(args.only_classes)
    source_table = Bundle.read_table(source)
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
        hidden = [name for name in only if visible is not None and batch.select_classes(preview, [name])[0] not in visible]
        if hidden:  # a trained class the named vocabulary leaves out: its answers would hold none of it
            raise ConfigError(f"--only-classes: vocabulary {args.vocabulary!r} does not have {hidden} (its 'only' list "
                              f"leaves them out); it has {len(visible)} classes (GET /v1/classes?vocabulary="
                              f"{args.vocabulary} lists them)")
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
    return Job(started, config, output, task, table, added, only, only_ids, categories, shards, pending, args.overlays)


def finish(job: Job, new_images: int | float, segment_seconds: float, steady: float) -> dict:
    """Assemble the format's files from the shard files and write ``summary.json``:
    ``new_images`` were segmented in ``segment_seconds`` (``steady`` images/s once the
    actors were up) by this run."""
    settings = job.config.segment
    counts = batch.assemble(job.output, settings.format, job.task, len(job.shards), job.categories,
                            overlays=job.overlays)
    seconds = time.time() - job.started
    summary = {
        "images": counts["images"], "segmented": counts["segmented"], "rejected": counts["rejected"],
        "segments": counts["segments"], "seconds": round(seconds, 2), "new_images": int(new_images),
        "segment_seconds": round(segment_seconds, 2),
        "images_per_second": round(new_images / segment_seconds, 3) if segment_seconds else 0.0,
        "steady_images_per_second": round(steady, 3),
        "shards": len(job.shards), "shards_run": len(job.pending), "format": settings.format, "task": job.task,
        "concurrency": settings.concurrency, "classes": job.table.num_classes, "added_classes": job.added,
        "only_classes": job.only, "output": str(job.output), "products": counts["products"],
    }
    write_json_atomic(job.output / batch.SUMMARY_FILE, summary)
    logger.info("segment: %d images segmented, %d rejected, %d segments; %.1f s (%d new images at %.2f images/s, "
                "%.2f once the actors were up)", summary["segmented"], summary["rejected"], summary["segments"],
                seconds, new_images, summary["images_per_second"], steady)
    return summary
