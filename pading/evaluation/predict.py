"""Universal inference with a :class:`~pading.bundle.Bundle` and the GZSL evaluation of
a whole split (stage 5). :class:`EvaluationPredictor` is the callable class that
pipelines/evaluate.py hands to Ray Data ``map_batches``; :func:`summarize` turns its
rows into COCO-format prediction files and the Seen/Unseen/HM tables."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pading.bundle import Bundle
from pading.classes import TASKS, ClassTable
from pading.config import InferenceConfig
from pading.data import (
    ImageRecord,
    load_image,
    panoptic_to_instances,
    panoptic_to_semantic,
    read_panoptic_png,
)
from pading.errors import DataError
from pading.evaluation.inference import (
    MaskLogits,
    instance_inference,
    instances_to_coco_results,
    panoptic_inference,
    panoptic_to_rgb,
    semantic_inference,
    semantic_to_label_map,
)
from pading.evaluation.metrics import evaluate_instance, evaluate_lvis, evaluate_panoptic, evaluate_semantic
from pading.model.runtime import use_runtime
from pading.model.segmenter import OriginalSizeMaskLogits, prepare_batch


@dataclass
class Prediction:
    """Universal output for one image.

    Attributes:
        panoptic_ids: (H, W) int32 segment ids, 0 = void.
        segments: panoptic segments (id, category_id, class_index, isthing, score, area).
        instances: thing instances (category_id, class_index, score, mask (H, W) bool).
        semantic: (H, W) int64 class indices.
    """

    panoptic_ids: np.ndarray | None
    segments: list[dict]
    instances: list[dict]
    semantic: np.ndarray | None


@torch.no_grad()
def predict_images(bundle: Bundle, images: Sequence[np.ndarray], tasks: Sequence[str] = TASKS) -> list[Prediction]:
    """Run the segmenter once per batch and post-process each image for ``tasks``."""
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
    device = bundle.device
    batch = prepare_batch(list(images), bundle.config.data.image_size)
    output = bundle.segmenter(batch["pixel_values"].to(device))
    return [postprocess(OriginalSizeMaskLogits(output.mask_logits[i], meta), output.class_logits[i],
                        table=bundle.table, inference=bundle.config.inference, tasks=tasks)
            for i, meta in enumerate(batch["meta"])]


def postprocess(mask_logits: MaskLogits, class_logits: torch.Tensor, *, table: ClassTable,
                inference: InferenceConfig, tasks: Sequence[str] = TASKS) -> Prediction:
    """The one per-image post-processing (evaluation, the tables and the endpoint call it).

    Args:
        mask_logits: (Q, H, W) at the image's original size (a tensor, or an
            :class:`~pading.model.segmenter.OriginalSizeMaskLogits`); class_logits: (Q, C+1).
        tasks: which of panoptic / instance / semantic to compute.
    """
    panoptic_ids, segments, instances, semantic = None, [], [], None
    if "panoptic" in tasks:
        panoptic_ids, segments = panoptic_inference(mask_logits, class_logits, table=table, config=inference)
    if "instance" in tasks:
        instances = instance_inference(mask_logits, class_logits, table=table, config=inference)
    if "semantic" in tasks:
        semantic = semantic_inference(mask_logits, class_logits, table=table)
    return Prediction(panoptic_ids, segments, instances, semantic)


def tasks_for(data_format: str) -> tuple[str, ...]:
    """The tasks a dataset's ground truth scores: panoptic GT all three, instances and LVIS
    instance segmentation, semantic ZSS."""
    if data_format == "panoptic":
        return TASKS
    return ("instance",) if data_format in ("instances", "lvis") else ("semantic",)


def write_prediction(row: dict, prediction: Prediction, table: ClassTable, data_format: str, output: Path) -> dict:
    """Write one image's prediction in COCO formats under ``output`` (``panoptic/`` RGB-id PNG,
    ``semantic/`` label PNG and, for panoptic ground truth, ``gt_semantic/``) and return the
    row :func:`summarize` reads (JSON strings of its panoptic segments, instance results and
    the GT instances derived from the panoptic PNG)."""
    record = ImageRecord.from_row(row)
    name = _png_name(record.file_name)
    out = {"image_id": record.image_id, "file_name": record.file_name, "panoptic": "", "instances": "",
           "gt_instances": "", "error": ""}
    if prediction.panoptic_ids is not None:
        Image.fromarray(panoptic_to_rgb(prediction.panoptic_ids)).save(output / "panoptic" / name)
        segments = [{"id": int(s["id"]), "category_id": int(s["category_id"]), "isthing": int(s["isthing"]),
                     "score": float(s.get("score", 1.0)), "area": int(s.get("area", 0))} for s in prediction.segments]
        out["panoptic"] = json.dumps({"image_id": record.image_id, "file_name": name, "segments_info": segments})
    if prediction.semantic is not None:
        Image.fromarray(semantic_to_label_map(prediction.semantic, table)).save(output / "semantic" / name)
    if "instance" in tasks_for(data_format):
        out["instances"] = json.dumps(instances_to_coco_results(prediction.instances, record.image_id))
    if data_format == "panoptic" and record.panoptic_path:
        gt_ids = read_panoptic_png(record.panoptic_path)
        Image.fromarray(panoptic_to_semantic(gt_ids, record.segments, table)).save(output / "gt_semantic" / name)
        out["gt_instances"] = json.dumps(panoptic_to_instances(gt_ids, record.segments, table, image_id=record.image_id))
    return out


def error_row(row: dict, error: str) -> dict:
    """The :func:`write_prediction` row of an image that could not be used."""
    return {"image_id": int(row["image_id"]), "file_name": str(row["file_name"]), "panoptic": "", "instances": "",
            "gt_instances": "", "error": error}


def _png_name(file_name: str) -> str:
    return Path(file_name).with_suffix(".png").name


class EvaluationPredictor:
    """Predicts manifest rows and writes COCO-format outputs under ``output_dir``:
    ``panoptic/`` (RGB-id PNGs), ``semantic/`` (label PNGs, category_id-1) and, for
    panoptic ground truth, ``gt_semantic/`` (labels derived from it). Returns one row
    per image with JSON strings of its panoptic segments, instance results and derived
    GT instances, or the error that made it unusable."""

    def __init__(self, bundle_dir: str, output_dir: str, data_format: str, device: str | None = None,
                 batch_size: int = 8, inference: InferenceConfig | None = None, images: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.bundle = Bundle.load(bundle_dir, map_location=self.device)
        if inference is not None:  # post-processing settings of this run, not the training run's
            self.bundle.config.inference = inference
        settings = self.bundle.config
        # images: this actor's share of the split, when known (auto stays on torch for a small one)
        self.runtime = use_runtime(self.bundle.segmenter, settings.inference.runtime, settings.data.image_size, images)
        self.output = Path(output_dir)
        self.data_format = data_format
        self.batch_size = batch_size
        self.tasks = tasks_for(data_format)
        for sub in ("panoptic", "semantic", "gt_semantic"):
            (self.output / sub).mkdir(parents=True, exist_ok=True)

    def __call__(self, batch) -> dict:
        """``batch``: a pyarrow Table of manifest rows (or a list of row dicts)."""
        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else list(batch)
        results = []
        for start in range(0, len(rows), self.batch_size):
            chunk, images = [], []
            for row in rows[start : start + self.batch_size]:
                try:
                    images.append(load_image(row["image_path"]))
                    chunk.append(row)
                except DataError as err:
                    results.append(error_row(row, f"{err.source}: {err.reason}"))
            if not chunk:
                continue
            for row, image, prediction in zip(chunk, images, predict_images(self.bundle, images, self.tasks)):
                try:
                    results.append(write_prediction(row, prediction, self.bundle.table, self.data_format, self.output))
                except DataError as err:
                    results.append(error_row(row, f"{err.source}: {err.reason}"))
        keys = ("image_id", "file_name", "panoptic", "instances", "gt_instances", "error")
        return {k: [r[k] for r in results] for k in keys}


def _group(report: dict, keys: Sequence[str]) -> dict:
    return {
        "seen": {k: float(report["Seen"][k]) for k in keys},
        "unseen": {k: float(report["Unseen"][k]) for k in keys},
        "hm": {k: float(report["HM"][k]) for k in keys},
    }


def summarize(
    rows: Sequence[dict],
    table: ClassTable,
    data_format: str,
    output_dir: str | Path,
    gt_panoptic_json: str | Path | None = None,
    gt_panoptic_dir: str | Path | None = None,
    gt_instances_json: str | Path | None = None,
    gt_semantic_dir: str | Path | None = None,
    images: Sequence[dict] | None = None,
) -> dict:
    """Write prediction files and compute ZSP / ZSI / ZSS Seen, Unseen and HM.

    Returns ``{"panoptic": {...}, "instance": {...}, "semantic": {...}, "reports": {...}}``
    (only the tasks the data format supports; values in percent). For ``lvis``,
    ``gt_instances_json`` is the LVIS val JSON and the result is ``{"lvis": {"seen"|"unseen"|"hm":
    {"ap"}, "all": {"ap", "ap50", "ap75", "aps", "apm", "apl", "ap_r", "ap_c", "ap_f", "ar"}}}``
    (mask AP by the LVIS rules on the ``images`` given, else on the predicted ones; an image
    that failed to predict counts as a miss; docs/lvis.md)."""
    output = Path(output_dir)
    good = [r for r in rows if not r["error"]]
    unseen_ids = table.unseen_ids
    # the images scored: those asked for (an image that failed to predict counts as a miss),
    # not every image of the GT files (data.max_val_images, images prepare rejected)
    asked = images if images is not None else good
    evaluated = [int(r["image_id"]) for r in asked]
    results: dict = {"reports": {}}
    if data_format == "panoptic":
        annotations = [json.loads(r["panoptic"]) for r in good]
        categories = table.to_coco_categories()
        pred_json = output / "panoptic_predictions.json"
        pred_json.write_text(json.dumps({"annotations": annotations, "categories": categories}))
        report = evaluate_panoptic(gt_panoptic_json, gt_panoptic_dir, pred_json, output / "panoptic", unseen_ids,
                                   image_ids=evaluated)
        results["panoptic"] = _group(report, ("pq", "sq", "rq"))
        results["reports"]["panoptic"] = report
        gt = {
            "images": [{"id": int(i["image_id"]), "height": int(i["height"]), "width": int(i["width"]),
                        "file_name": str(i["file_name"])} for i in (images or [])],
            "annotations": [a for r in good for a in json.loads(r["gt_instances"] or "[]")],
            "categories": [c for c in categories if c["isthing"]],
        }
        for k, ann in enumerate(gt["annotations"], start=1):
            ann["id"] = k
        gt_instances_json = output / "gt_instances.json"
        gt_instances_json.write_text(json.dumps(gt))
        gt_semantic_dir = output / "gt_semantic"
    if data_format == "lvis":
        detections = [d for r in good for d in json.loads(r["instances"] or "[]")]
        (output / "instance_predictions.json").write_text(json.dumps(detections))
        report = evaluate_lvis(str(gt_instances_json), detections, unseen_ids, image_ids=evaluated)
        lvis = _group(report, ("ap",))
        lvis["all"] = {k: float(v) for k, v in report["LVIS"].items() if not k.startswith("n_")}
        results["lvis"] = lvis
        results["reports"]["lvis"] = report
    if data_format in ("panoptic", "instances"):
        detections = [d for r in good for d in json.loads(r["instances"] or "[]")]
        (output / "instance_predictions.json").write_text(json.dumps(detections))
        thing_ids = [c.id for c in table if c.isthing]
        report = evaluate_instance(str(gt_instances_json), detections, unseen_ids & set(thing_ids), category_ids=thing_ids,
                                   image_ids=evaluated)
        results["instance"] = _group(report, ("map50", "recall100"))
        results["reports"]["instance"] = report
    if data_format in ("panoptic", "semantic"):
        names = None if data_format == "panoptic" else [_png_name(str(r["file_name"])) for r in asked]
        report = evaluate_semantic(gt_semantic_dir, output / "semantic", table.to_coco_categories(), unseen_ids,
                                   names=names)
        results["semantic"] = _group(report, ("miou",))
        results["reports"]["semantic"] = report
    return results
