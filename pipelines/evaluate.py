"""Stage 5, evaluate: Ray Data runs the bundle (segmenter + retrained classifier) over
the val manifest, writes predictions in COCO formats (panoptic PNG+JSON, instance results
JSON, semantic label PNGs) and computes ZSP / ZSI / ZSS Seen, Unseen and HM from the one
model (the paper's universal setting). Fewer images than ``ray.driver_max_images``, on a Ray the
run started itself, are predicted in the driver by the same class (pipelines.common.segment_in_driver).

    python pipelines/evaluate.py [--config ...] [--bundle DIR] [--force]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pading import allocator
from pading.bundle import Bundle
from pading.config import ExperimentConfig, computed_settings
from pading.data.manifest import resolve
from pading.evaluation.predict import EvaluationPredictor, summarize
from pading.run import RunLayout, load_table, read_manifest
from pading.run.reports import format_results_table
from pipelines import common

logger = logging.getLogger("pipelines.evaluate")

EVAL_BATCH = 16  # manifest rows per call of the evaluation actor

NUM_OVERLAYS = 4


def write_overlays(rows: list[dict], result_rows: list[dict], predictions: Path, table, out_dir: Path,
                   count: int = NUM_OVERLAYS) -> list[Path]:
    """A few qualitative overlays of val images, preferring images with unseen classes, drawn
    from the panoptic predictions the evaluation wrote (no second forward pass, no model here);
    ``table``: the evaluated bundle's classes, which the predictions' category ids name."""
    from pading.data import load_image
    from pading.data.targets import read_panoptic_png
    from pading.serving.visualize import overlay_panoptic

    predicted = {int(r["image_id"]): json.loads(r["panoptic"]) for r in result_rows if r["panoptic"]}
    chosen = sorted((r for r in rows if int(r["image_id"]) in predicted),
                    key=lambda r: (not r.get("has_unseen"), r["image_id"]))[:count]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in chosen:
        panoptic = predicted[int(row["image_id"])]
        segment_ids = read_panoptic_png(predictions / "panoptic" / panoptic["file_name"])
        path = out_dir / f"{row['image_id']}.png"
        overlay_panoptic(load_image(row["image_path"]), segment_ids, panoptic["segments_info"], table).save(path)
        paths.append(path)
    return paths


def run(config: ExperimentConfig, output: Path, force: bool = False, bundle_dir: Path | None = None,
        stage_name: str = "evaluate") -> dict:
    stage_dir = RunLayout(output).stage(stage_name)
    stage = common.Stage(stage_name, stage_dir, force, clean=True, settings=computed_settings(config))
    if stage.done:
        return stage.done
    stage.start()
    import ray

    common.init_ray(config)
    bundle_dir = Path(bundle_dir or RunLayout(output).bundle)
    table = load_table(output)
    rows = read_manifest(output, "val")
    predictions = RunLayout(output).predictions(stage_name)
    predictor = {"bundle_dir": str(bundle_dir), "output_dir": str(predictions), "data_format": config.data.format,
                 "batch_size": config.ray.extract_batch_size, "inference": config.inference}
    workers = 0
    if common.segment_in_driver(config, len(rows)):  # a few images: no actor start (ray.driver_max_images)
        batches = [rows[start:start + EVAL_BATCH] for start in range(0, len(rows), EVAL_BATCH)]
        workers = common.driver_workers(config, len(batches))
        logger.info("evaluate: %d images in the driver (fewer than ray.driver_max_images=%d), %d batch(es) at a time",
                    len(rows), config.ray.driver_max_images, workers)
        with common.actor_threads(config.ray.cpus_per_worker):
            predict = EvaluationPredictor(**predictor, images=len(rows), device="cpu")  # as an actor without GPUs
            result_rows = common.output_rows(common.in_threads(predict, batches, workers))
        del predict
    else:
        # blocks of at most EVAL_BATCH rows (up to 32 blocks), so each block is one whole batch: with
        # 200 rows, 12 blocks of 17 gave a batch of 16 and one of 1 each
        dataset = common.row_blocks(rows, max(1, min(32, -(-len(rows) // EVAL_BATCH))))
        result_rows = dataset.map_batches(
            EvaluationPredictor,
            fn_constructor_kwargs={**predictor,
                                   "images": common.share_per_actor(len(rows), config.ray.extract_concurrency)},
            batch_size=EVAL_BATCH, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.ray.extract_concurrency),
            num_gpus=config.ray.extract_gpus or None, num_cpus=config.ray.cpus_per_worker,
            **allocator.runtime_env(),  # glibc malloc kept from faulting per image
        ).take_all()
    for r in result_rows:
        if r["error"]:
            logger.warning("evaluate: image %s skipped: %s", r["image_id"], r["error"])
    data = config.data
    root = Path(data.root)
    results = summarize(
        result_rows, table, data.format, predictions,
        gt_panoptic_json=resolve(root, data.val_panoptic_json), gt_panoptic_dir=resolve(root, data.val_panoptic_dir),
        gt_instances_json=resolve(root, data.instances_json("val")), gt_semantic_dir=resolve(root, data.val_semantic_dir),
        images=rows,
    )
    reports = results.pop("reports")
    RunLayout(output).reports(stage_name).write_text(json.dumps(reports, indent=1, default=str))
    overlays = []
    if data.format == "panoptic":
        overlays = [str(p) for p in write_overlays(rows, result_rows, predictions, Bundle.read_table(bundle_dir),
                                                   RunLayout(output).overlays(stage_name))]
    info = {"results": results, "images": len(rows), "skipped": sum(1 for r in result_rows if r["error"]),
            "overlays": overlays, "driver_workers": workers}
    return stage.finish(info)


def _options(parser) -> dict:
    parser.add_argument("--bundle", dest="bundle_dir", type=Path, default=None,
                        help="model bundle directory (default: <output>/generator/bundle)")
    return {"bundle_dir": None}


def track(info: dict, output: Path) -> None:
    """The Seen / Unseen / HM metrics, the overlays and the per-class reports."""
    import mlflow

    from pading.run import tracking

    tracking.log_metrics(info.get("results", {}))
    for path in info.get("overlays", []):
        mlflow.log_artifact(path, artifact_path="overlays")
    reports = RunLayout(output).reports()
    if reports.is_file():
        mlflow.log_artifact(str(reports))



def main() -> None:
    info = common.stage_main(run, __doc__, _options)
    print(format_results_table(info["results"]))


if __name__ == "__main__":
    main()
