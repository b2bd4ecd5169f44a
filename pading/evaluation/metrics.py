"""GZSL evaluators: panoptic PQ/SQ/RQ, instance mAP@0.5 + Recall@100, semantic mIoU, and
LVIS mask AP / AP_r / AP_c / AP_f (:func:`evaluate_lvis`, docs/lvis.md).

Every evaluator reports values in percent, grouped as ``"All"``, ``"Seen"``, ``"Unseen"``
(panoptic adds ``"Things"``/``"Stuff"``), each with ``"n"`` = the number of classes averaged,
``"HM"`` = harmonic mean of Seen and Unseen, and ``"per_class"`` keyed by COCO category id.

Panoptic follows panopticapi's ``pq_compute``: a GT and a predicted segment of the same
category match when IoU > 0.5, where the union leaves out the predicted pixels that fall on
GT VOID (id 0); GT crowd segments never match and are never FN; an unmatched predicted
segment whose pixels lie more than half on VOID + crowd regions of its class is not an FP.

The accumulators (:class:`PanopticEvaluator`, :class:`SemanticEvaluator`) hold plain numpy
arrays: they pickle, and ``merge`` reduces partial results from several workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pading.classes import PERCENT, SEMANTIC_IGNORE_LABEL, ClassTable, cocostuff_categories
from pading.data.targets import read_label_png, read_panoptic_png
from pading.errors import AnnotationError, UnknownClassError

logger = logging.getLogger(__name__)

#: Panoptic PNG ids: id = R + 256 * G + 256**2 * B.
RGB_ID_BASE = 256
#: Pixel id of unlabeled (VOID) pixels in panoptic PNGs.
VOID_ID = 0
#: Segment ids are < 256**3, so ``gt_id * PAIR_OFFSET + pred_id`` encodes a pair uniquely.
PAIR_OFFSET = RGB_ID_BASE**3
#: A GT/predicted segment pair matches when IoU is strictly above this.
MATCH_IOU_THRESHOLD = 0.5
#: An unmatched prediction lying more than this fraction on VOID + crowd is not an FP.
IGNORED_FRACTION_THRESHOLD = 0.5
#: COCOeval settings of the instance metrics.
INSTANCE_IOU_THRESHOLD = 0.5
INSTANCE_MAX_DETECTIONS = 100
#: LVIS evaluation: detections kept per image (the LVIS API's limit, detectron2's LVIS default).
LVIS_MAX_DETECTIONS = 300
#: LVIS frequency groups, in the order the evaluator reports them.
LVIS_GROUPS = {"ap_r": "r", "ap_c": "c", "ap_f": "f"}
#: Semantic label PNGs store ``category_id - SEMANTIC_LABEL_SHIFT``.
SEMANTIC_LABEL_SHIFT = 1
DEFAULT_IGNORE_LABEL = SEMANTIC_IGNORE_LABEL


def harmonic_mean(seen: float, unseen: float) -> float:
    """2ab / (a + b); 0 when either is 0."""
    if seen <= 0 or unseen <= 0:
        return 0.0
    return 2.0 * seen * unseen / (seen + unseen)


def _group_means(values: dict[str, np.ndarray], members: np.ndarray) -> dict:
    """Means of each metric over the classes where ``members`` is True, plus ``n``."""
    count = int(members.sum())
    out = {name: (float(v[members].mean()) if count else 0.0) for name, v in values.items()}
    out["n"] = count
    return out


def _seen_unseen_report(
    table: ClassTable, values: dict[str, np.ndarray], present: np.ndarray, with_things_stuff: bool = False
) -> dict:
    """The grouped report. ``values``: metric name -> (K,) percent; ``present``: (K,) bool."""
    unseen = np.array([c.unseen for c in table.classes], dtype=bool)  # (K,)
    report = {"All": _group_means(values, present)}
    if with_things_stuff:
        thing = np.array([c.isthing for c in table.classes], dtype=bool)  # (K,)
        report["Things"] = _group_means(values, present & thing)
        report["Stuff"] = _group_means(values, present & ~thing)
    report["Seen"] = _group_means(values, present & ~unseen)
    report["Unseen"] = _group_means(values, present & unseen)
    report["HM"] = {name: harmonic_mean(report["Seen"][name], report["Unseen"][name]) for name in values}
    report["per_class"] = {
        table[k].id: {name: float(v[k]) for name, v in values.items()} for k in np.flatnonzero(present)
    }
    return report


def _table(categories: Sequence[dict], unseen_ids: Iterable[int]) -> ClassTable:
    """The class table of ``categories`` with ``unseen_ids`` marked unseen."""
    for index, category in enumerate(categories):
        _check_keys(category, ("id", "name"), f"categories[{index}]")
    unseen_ids = {int(i) for i in unseen_ids}
    known = {int(c["id"]) for c in categories}
    unknown = sorted(unseen_ids - known)
    if unknown:
        raise UnknownClassError(f"category id {unknown[0]}", sorted(known))
    names = [c["name"] for c in categories if int(c["id"]) in unseen_ids]
    return ClassTable.from_categories(categories, unseen=names)


def resolve_unseen_ids(categories: Sequence[dict], names: Iterable[str]) -> set[int]:
    """Category ids of class ``names`` (raw or cleaned, ``"tree"`` -> ``"tree-merged"``).

    Raises:
        UnknownClassError: naming the first name not in ``categories``.
    """
    table = ClassTable.from_categories(categories)
    return {table[table.index_of_name(name)].id for name in names}


# ---------------------------------------------------------------------------- panoptic
class PanopticEvaluator:
    """Accumulates per-class PQ statistics image by image (panopticapi definition).

    Args:
        categories: COCO category dicts (``id``, ``name``, ``isthing``).
        unseen_ids: category ids of the unseen classes.
    """

    def __init__(self, categories: Sequence[dict], unseen_ids: Iterable[int] = ()):
        self.table = _table(categories, unseen_ids)
        num_classes = self.table.num_classes
        self.true_positives = np.zeros(num_classes, dtype=np.int64)  # (K,)
        self.false_positives = np.zeros(num_classes, dtype=np.int64)  # (K,)
        self.false_negatives = np.zeros(num_classes, dtype=np.int64)  # (K,)
        self.matched_iou_sum = np.zeros(num_classes, dtype=np.float64)  # (K,)

    def _class_index(self, category_id, source: str) -> int:
        if not self.table.has_id(category_id):
            raise AnnotationError(source, f"unknown category_id {category_id}")
        return self.table.index_of_id(category_id)

    def add(
        self,
        gt_ids: np.ndarray,
        gt_segments: Sequence[dict],
        pred_ids: np.ndarray,
        pred_segments: Sequence[dict],
        image_id: int | str | None = None,
    ) -> None:
        """Add one image.

        Args:
            gt_ids: (H, W) int segment ids of the ground truth, 0 = VOID.
            gt_segments: dicts ``id``, ``category_id``, optional ``iscrowd``.
            pred_ids: (H, W) int segment ids of the prediction, 0 = unlabeled.
            pred_segments: dicts ``id``, ``category_id``.
            image_id: only used to name the image in errors.
        """
        where = f"image {image_id}"
        gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
        if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
            raise AnnotationError(where, f"GT ids {gt_ids.shape} and prediction ids {pred_ids.shape} differ")
        gt_info = {int(s["id"]): s for s in gt_segments}
        pred_info = {int(s["id"]): s for s in pred_segments}
        gt_class = {i: self._class_index(s["category_id"], f"{where} GT segment {i}") for i, s in gt_info.items()}
        pred_class = {
            i: self._class_index(s["category_id"], f"{where} predicted segment {i}") for i, s in pred_info.items()
        }
        crowd = {i for i, s in gt_info.items() if int(s.get("iscrowd", 0)) == 1}

        pairs = gt_ids.astype(np.uint64).ravel() * np.uint64(PAIR_OFFSET) + pred_ids.astype(np.uint64).ravel()  # (H*W,)
        pair_codes, pair_counts = np.unique(pairs, return_counts=True)
        overlap: dict[tuple[int, int], int] = {}
        gt_area: dict[int, int] = {}
        pred_area: dict[int, int] = {}
        for code, count in zip(pair_codes.tolist(), pair_counts.tolist()):
            gt_id, pred_id = divmod(code, PAIR_OFFSET)
            overlap[(gt_id, pred_id)] = count
            gt_area[gt_id] = gt_area.get(gt_id, 0) + count
            pred_area[pred_id] = pred_area.get(pred_id, 0) + count
        for gt_id in gt_area:
            if gt_id != VOID_ID and gt_id not in gt_info:
                raise AnnotationError(where, f"GT segment id {gt_id} is in the PNG but not in segments_info")
        for pred_id in pred_area:
            if pred_id != VOID_ID and pred_id not in pred_info:
                raise AnnotationError(where, f"predicted segment id {pred_id} is in the PNG but not in segments_info")
        for pred_id in set(pred_info) - set(pred_area):
            logger.warning("%s: predicted segment %d has no pixels; ignored", where, pred_id)
            del pred_info[pred_id]

        gt_matched, pred_matched = set(), set()
        for (gt_id, pred_id), intersection in overlap.items():
            if gt_id not in gt_info or pred_id not in pred_info or gt_id in crowd:
                continue
            if gt_class[gt_id] != pred_class[pred_id]:
                continue
            union = pred_area[pred_id] + gt_area[gt_id] - intersection - overlap.get((VOID_ID, pred_id), 0)
            iou = intersection / union
            if iou > MATCH_IOU_THRESHOLD:
                self.true_positives[gt_class[gt_id]] += 1
                self.matched_iou_sum[gt_class[gt_id]] += iou
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)

        for gt_id in gt_info:
            if gt_id not in gt_matched and gt_id not in crowd:
                self.false_negatives[gt_class[gt_id]] += 1
        for pred_id in pred_info:
            if pred_id in pred_matched:
                continue
            ignored = overlap.get((VOID_ID, pred_id), 0)
            ignored += sum(overlap.get((c, pred_id), 0) for c in crowd if gt_class[c] == pred_class[pred_id])
            if ignored / pred_area[pred_id] > IGNORED_FRACTION_THRESHOLD:
                continue
            self.false_positives[pred_class[pred_id]] += 1

    def add_missing(self, gt_segments: Sequence[dict], image_id: int | str | None = None) -> None:
        """An image without prediction: every non-crowd GT segment is a false negative."""
        for s in gt_segments:
            if int(s.get("iscrowd", 0)) != 1:
                self.false_negatives[self._class_index(s["category_id"], f"image {image_id} GT segment {s['id']}")] += 1

    def merge(self, other: "PanopticEvaluator") -> "PanopticEvaluator":
        """Add ``other``'s statistics (same categories) into this one; returns self."""
        if other.table.ids != self.table.ids:
            raise ValueError("cannot merge panoptic evaluators over different categories")
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives
        self.matched_iou_sum += other.matched_iou_sum
        return self

    def summarize(self) -> dict:
        """The report: groups All/Things/Stuff/Seen/Unseen ``{"pq","sq","rq","n"}``, HM, per_class."""
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        present = (tp + fp + fn) > 0  # (K,)
        rq_denominator = np.maximum(tp + 0.5 * fp + 0.5 * fn, 1e-12)  # (K,)
        values = {
            "pq": PERCENT * self.matched_iou_sum / rq_denominator,
            "sq": PERCENT * np.where(tp > 0, self.matched_iou_sum / np.maximum(tp, 1), 0.0),
            "rq": PERCENT * tp / rq_denominator,
        }
        return _seen_unseen_report(self.table, values, present, with_things_stuff=True)


def _load_json(path, required: Sequence[str]) -> dict:
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise AnnotationError(str(path), f"cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise AnnotationError(str(path), "expected a JSON object")
    for key in required:
        if key not in data:
            raise AnnotationError(str(path), f"missing required key {key!r}")
    return data


def _check_keys(record: dict, required: Sequence[str], source: str) -> None:
    if not isinstance(record, dict):
        raise AnnotationError(source, "expected a JSON object")
    for key in required:
        if key not in record:
            raise AnnotationError(source, f"missing required key {key!r}")


def _annotations_by_image(data: dict, json_path, segment_keys: Sequence[str], keep: set | None = None) -> dict:
    """``{image_id: annotation}``, checked; ``keep``: only these images' annotations are read
    (the others, e.g. records prepare rejected, are not checked either)."""
    by_image = {}
    for index, ann in enumerate(data["annotations"]):
        source = f"{json_path}: annotations[{index}]"
        if keep is not None and isinstance(ann, dict) and ann.get("image_id") not in keep:
            continue
        _check_keys(ann, ("image_id", "file_name", "segments_info"), source)
        for s_index, segment in enumerate(ann["segments_info"]):
            _check_keys(segment, segment_keys, f"{source}.segments_info[{s_index}]")
        if ann["image_id"] in by_image:
            raise AnnotationError(source, f"image_id {ann['image_id']} appears twice")
        by_image[ann["image_id"]] = ann
    return by_image


def evaluate_panoptic(gt_json, gt_dir, pred_json, pred_dir, unseen_ids: Iterable[int] = (),
                      image_ids: Iterable[int] | None = None) -> dict:
    """PQ/SQ/RQ of official COCO panoptic predictions (JSON + PNGs) against GT.

    Annotations are matched by ``image_id``; an image without prediction counts all its GT
    segments as FN (with a warning). Categories come from the GT JSON. ``image_ids``: score
    these GT images only (default: every image of the GT JSON), e.g. the images an
    evaluation was asked to predict (``data.max_val_images``, or the manifest without the
    images prepare rejected).

    Raises:
        AnnotationError: naming the file/record (missing PNG, PNG id not in JSON, missing
            key, unknown category id).
    """
    gt_data = _load_json(gt_json, ("annotations", "categories"))
    pred_data = _load_json(pred_json, ("annotations",))
    for index, category in enumerate(gt_data["categories"]):
        _check_keys(category, ("id", "name"), f"{gt_json}: categories[{index}]")
    evaluator = PanopticEvaluator(gt_data["categories"], unseen_ids=unseen_ids)
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    gt_by_image = _annotations_by_image(gt_data, gt_json, ("id", "category_id"), keep=wanted)
    pred_by_image = _annotations_by_image(pred_data, pred_json, ("id", "category_id"))
    for image_id in set(pred_by_image) - set(gt_by_image):
        logger.warning("%s: prediction for image_id %s has no ground truth; ignored", pred_json, image_id)
    for image_id, gt_ann in gt_by_image.items():
        pred_ann = pred_by_image.get(image_id)
        if pred_ann is None:
            logger.warning("%s: no prediction for image_id %s; its segments count as FN", pred_json, image_id)
            evaluator.add_missing(gt_ann["segments_info"], image_id=image_id)
            continue
        gt_png = Path(gt_dir) / gt_ann["file_name"]
        pred_png = Path(pred_dir) / pred_ann["file_name"]
        gt_ids, pred_ids = read_panoptic_png(gt_png), read_panoptic_png(pred_png)
        try:
            evaluator.add(gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"], image_id=image_id)
        except AnnotationError as err:  # name the files, not only the image id
            raise AnnotationError(f"{pred_png} (GT {gt_png})", f"{err.source}: {err.reason}") from None
    return evaluator.summarize()


# ---------------------------------------------------------------------------- instance
def _load_coco(gt, image_ids: Iterable[int] | None = None):
    """A pycocotools COCO of ``gt``; given ``image_ids``, of those images and their annotations
    only, so records of other images (e.g. ones prepare rejected: a NaN polygon makes
    pycocotools hang) are never indexed."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    data = gt if isinstance(gt, dict) else _load_json(gt, ("images", "annotations", "categories"))
    source = "instances GT" if isinstance(gt, dict) else str(gt)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(source, f"missing required key {key!r}")
    if image_ids is not None:
        wanted = {int(i) for i in image_ids}
        data = {**data, "images": [i for i in data["images"] if isinstance(i, dict) and i.get("id") in wanted],
                "annotations": [a for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in wanted]}
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_results(results, coco) -> list[dict]:
    source = "results"
    if isinstance(results, (str, Path)):
        source = str(results)
        try:
            with Path(results).open("r", encoding="utf-8") as fh:
                results = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise AnnotationError(source, f"cannot read results JSON ({err})") from None
    if not isinstance(results, list):
        raise AnnotationError(source, "expected a list of result records")
    image_ids = set(coco.getImgIds())
    for index, record in enumerate(results):
        _check_keys(record, ("image_id", "category_id", "segmentation", "score"), f"{source}[{index}]")
        if record["image_id"] not in image_ids:
            raise AnnotationError(f"{source}[{index}]", f"image_id {record['image_id']} is not in the GT")
    return [dict(record) for record in results]  # pycocotools' loadRes adds keys to the records it is given


def evaluate_instance(gt, results, unseen_ids: Iterable[int] = (), category_ids: Iterable[int] | None = None,
                      image_ids: Iterable[int] | None = None) -> dict:
    """Instance segmentation mAP@0.5 and Recall@100 per class (pycocotools COCOeval, segm).

    Args:
        gt: GT instances JSON path, a COCO-format dict, or a ``pycocotools.coco.COCO``.
        results: list of ``{image_id, category_id, segmentation (RLE), score}`` or a JSON path.
        unseen_ids: category ids of the unseen classes.
        category_ids: evaluate only these categories (default: all GT categories).
        image_ids: evaluate on these GT images only (default: all), e.g. the images predicted.

    Returns:
        ``{"All"|"Seen"|"Unseen": {"map50","recall100","n"}, "HM": {...}, "per_class": {...}}``;
        classes without (non-crowd) GT are left out of the means.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = _load_coco(gt, image_ids)
    categories = coco_gt.dataset["categories"]
    if category_ids is not None:
        keep = {int(i) for i in category_ids}
        categories = [c for c in categories if int(c["id"]) in keep]
    table = _table(categories, unseen_ids)
    results = _load_results(results, coco_gt)
    evaluated = sorted(coco_gt.getImgIds()) if image_ids is None else \
        sorted({int(i) for i in image_ids} & set(coco_gt.getImgIds()))
    num_classes = table.num_classes
    average_precision = np.zeros(num_classes)  # (K,)
    recall = np.zeros(num_classes)  # (K,)
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(results)
            coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
            coco_eval.params.catIds = table.ids
            coco_eval.params.imgIds = evaluated
            coco_eval.params.iouThrs = np.array([INSTANCE_IOU_THRESHOLD])
            coco_eval.evaluate()
            coco_eval.accumulate()
        max_det_index = coco_eval.params.maxDets.index(INSTANCE_MAX_DETECTIONS)
        precision = coco_eval.eval["precision"][0, :, :, 0, max_det_index]  # (R, K)
        recall = coco_eval.eval["recall"][0, :, 0, max_det_index]  # (K,)
        present = recall > -1  # (K,)  -1: no non-crowd GT for the class
        average_precision = np.array(
            [precision[:, k][precision[:, k] > -1].mean() if present[k] else 0.0 for k in range(num_classes)]
        )
    else:
        logger.warning("instance evaluation: no results; every class scores 0")
        present = np.array(
            [len(coco_gt.getAnnIds(imgIds=evaluated, catIds=[category_id], iscrowd=False)) > 0
             for category_id in table.ids], dtype=bool
        )
    values = {
        "map50": PERCENT * np.where(present, average_precision, 0.0),
        "recall100": PERCENT * np.where(present, recall, 0.0),
    }
    return _seen_unseen_report(table, values, present)


# ---------------------------------------------------------------------------- LVIS
def _top_per_image(results: Sequence[dict], max_detections: int) -> list[dict]:
    """The ``max_detections`` highest-scoring results of every image (as the LVIS API's
    ``LVISResults`` keeps them, over all categories of the image), as copies."""
    by_image: dict = {}
    for record in results:
        by_image.setdefault(record["image_id"], []).append(record)
    kept = []
    for records in by_image.values():
        records = sorted(records, key=lambda r: -float(r["score"]))[:max_detections]
        kept.extend(dict(r) for r in records)
    return kept


def evaluate_lvis(gt, results, unseen_ids: Iterable[int] | None = None, image_ids: Iterable[int] | None = None,
                  max_detections: int = LVIS_MAX_DETECTIONS) -> dict:
    """Mask AP of instance results by the LVIS rules (docs/lvis.md).

    The evaluator is faster-coco-eval's LVIS mode (``COCOeval_faster(..., lvis_style=True)``,
    ``maxDets = [300]``), which reproduces the official lvis-api's numbers: the lvis package
    itself (0.5.3, 2020) uses ``np.float`` and fails on NumPy >= 1.24. LVIS rules: a
    detection of a category neither annotated in the image nor in its ``neg_category_ids``
    is not evaluated; an unmatched detection of a category in ``not_exhaustive_category_ids``
    is not a false positive; at most ``max_detections`` results per image, over all categories.

    Args:
        gt: the LVIS GT JSON path or dict (categories carry ``frequency``).
        results: ``{image_id, category_id, segmentation (RLE), score[, bbox]}`` list or a JSON path.
        unseen_ids: category ids of the unseen classes (default: the rare ones).
        image_ids: evaluate on these GT images only (default: all), e.g. the images predicted.
        max_detections: results kept per image.

    Returns:
        ``{"All"|"Seen"|"Unseen": {"ap", "n"}, "HM": {"ap"}, "per_class": {id: {"ap"}},
        "LVIS": {"ap", "ap50", "ap75", "aps", "apm", "apl", "ap_r", "ap_c", "ap_f", "ar", "n_r", "n_c", "n_f"}}``
        in percent; AP per class is over IoU 0.50:0.95; a class (or frequency group) without
        GT in the evaluated images is left out of the means (a group with none reports 0, n 0).

    Raises:
        AnnotationError: naming the file or record (missing key, unknown image, a category
            without a frequency tag).
    """
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster

    source = "LVIS GT" if isinstance(gt, dict) else str(gt)
    data = gt if isinstance(gt, dict) else _load_json(gt, ("images", "annotations", "categories"))
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(source, f"missing required key {key!r}")
    categories = data["categories"]
    for index, category in enumerate(categories):
        _check_keys(category, ("id", "name", "frequency"), f"{source}: categories[{index}]")
        if category["frequency"] not in LVIS_GROUPS.values():
            raise AnnotationError(f"{source}: categories[{index}]", f"frequency {category['frequency']!r} is not r/c/f")
    if unseen_ids is None:
        unseen_ids = [c["id"] for c in categories if c["frequency"] == "r"]
    table = _table(categories, unseen_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = FastCOCO(data, use_deepcopy=isinstance(gt, dict), print_function=logger.debug)  # caller's dict intact
    results = _load_results(results, coco_gt)
    evaluated = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    unknown = sorted(set(evaluated) - set(coco_gt.getImgIds()))
    if unknown:
        raise AnnotationError(source, f"image id {unknown[0]} to evaluate is not in the GT")
    if not results:
        logger.warning("LVIS evaluation: no results; every class scores 0")
    # The LVIS rule that drops a detection of a category neither annotated nor negative in its
    # image is applied here, after the per-image cap as lvis-api does: faster-coco-eval 1.8 applies
    # it too but fails (IndexError) on an image whose every detection it drops and that has no GT.
    listed = {int(image["id"]): set(image.get("neg_category_ids", [])) for image in data["images"]}
    for annotation in data["annotations"]:
        listed.setdefault(int(annotation["image_id"]), set()).add(annotation["category_id"])
    kept = [r for r in _top_per_image(results, max_detections) if r["category_id"] in listed[int(r["image_id"])]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(kept)
        evaluator = COCOeval_faster(coco_gt, coco_dt, "segm", lvis_style=True, print_function=logger.debug)
        evaluator.params.maxDets = [int(max_detections)]
        evaluator.params.imgIds = evaluated
        evaluator.params.catIds = sorted(table.ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats_as_dict
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, 0]  # (T, R, K) over sorted category ids
    order = {category_id: k for k, category_id in enumerate(sorted(table.ids))}
    columns = precision[:, :, [order[category_id] for category_id in table.ids]]  # (T, R, K) in table order
    present = (columns > -1).any(axis=(0, 1))  # (K,)
    average_precision = np.array([columns[..., k][columns[..., k] > -1].mean() if present[k] else 0.0
                                  for k in range(table.num_classes)])  # (K,)
    report = _seen_unseen_report(table, {"ap": PERCENT * average_precision}, present)
    frequency = np.array([c["frequency"] for c in sorted(categories, key=lambda c: int(c["id"]))])
    lvis = {name: PERCENT * max(0.0, float(stats[key])) for name, key in
            (("ap", "AP_all"), ("ap50", "AP_50"), ("ap75", "AP_75"), ("aps", "AP_small"), ("apm", "AP_medium"),
             ("apl", "AP_large"), ("ap_r", "APr"), ("ap_c", "APc"), ("ap_f", "APf"), ("ar", "AR_all"))}
    lvis.update({f"n_{tag}": int((present & (frequency == tag)).sum()) for tag in LVIS_GROUPS.values()})
    report["LVIS"] = lvis
    return report


# ---------------------------------------------------------------------------- semantic
class SemanticEvaluator:
    """Confusion-matrix accumulator for mIoU over label maps storing ``category_id - 1``.

    Args:
        categories: COCO category dicts (``id``, ``name``).
        unseen_ids: category ids of the unseen classes.
        ignore_label: GT pixels with this value are skipped; a prediction of it is wrong.
    """

    def __init__(
        self, categories: Sequence[dict], unseen_ids: Iterable[int] = (), ignore_label: int = DEFAULT_IGNORE_LABEL
    ):
        self.table = _table(categories, unseen_ids)
        self.ignore_label = int(ignore_label)
        num_classes = self.table.num_classes
        # Rows: GT class; columns: predicted class, the last column = "not a known class".
        self.confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)  # (K, K+1)
        self._label_to_index = np.full(max(self.table.ids) + 1, num_classes, dtype=np.int64)  # (max_label+1,)
        for index, category_id in enumerate(self.table.ids):
            self._label_to_index[category_id - SEMANTIC_LABEL_SHIFT] = index

    def _to_index(self, labels: np.ndarray) -> np.ndarray:
        """Label values -> class index; unknown values (and negatives) -> K."""
        labels = labels.astype(np.int64)
        in_range = (labels >= 0) & (labels < len(self._label_to_index))
        clipped = np.clip(labels, 0, len(self._label_to_index) - 1)
        return np.where(in_range, self._label_to_index[clipped], self.table.num_classes)

    def add(self, gt: np.ndarray, pred: np.ndarray, source: str = "semantic GT") -> None:
        """Add one image. ``gt``, ``pred``: (H, W) labels (``category_id - 1``, ignore_label)."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise AnnotationError(source, f"GT shape {gt.shape} and prediction shape {pred.shape} differ")
        valid = gt != self.ignore_label  # (H, W)
        gt_index = self._to_index(gt[valid])  # (P,)
        num_classes = self.table.num_classes
        unknown = gt_index == num_classes
        if unknown.any():
            raise AnnotationError(source, f"GT label {int(gt[valid][unknown][0])} is not a known category")
        pred_index = self._to_index(pred[valid])  # (P,)
        codes = gt_index * (num_classes + 1) + pred_index  # (P,)
        self.confusion += np.bincount(codes, minlength=num_classes * (num_classes + 1)).reshape(self.confusion.shape)

    def merge(self, other: "SemanticEvaluator") -> "SemanticEvaluator":
        """Add ``other``'s confusion matrix (same categories) into this one; returns self."""
        if other.table.ids != self.table.ids:
            raise ValueError("cannot merge semantic evaluators over different categories")
        self.confusion += other.confusion
        return self

    def summarize(self) -> dict:
        """``{"All"|"Seen"|"Unseen": {"miou","n"}, "HM": {"miou"}, "per_class": {id: {"miou"}}}``."""
        num_classes = self.table.num_classes
        correct = np.diag(self.confusion[:, :num_classes]).astype(np.float64)  # (K,)
        gt_total = self.confusion.sum(axis=1)  # (K,)
        pred_total = self.confusion[:, :num_classes].sum(axis=0)  # (K,)
        union = gt_total + pred_total - correct  # (K,)
        present = union > 0
        values = {"miou": PERCENT * np.where(present, correct / np.maximum(union, 1), 0.0)}
        return _seen_unseen_report(self.table, values, present)


def evaluate_semantic(
    gt_dir,
    pred_dir,
    categories: Sequence[dict] | None = None,
    unseen_ids: Iterable[int] = (),
    ignore_label: int = DEFAULT_IGNORE_LABEL,
    names: Iterable[str] | None = None,
) -> dict:
    """mIoU of the label PNGs in ``pred_dir`` against those in ``gt_dir`` (paired by file name).

    ``names``: score these GT files only (default: every PNG in ``gt_dir``), e.g. those of
    the images an evaluation was asked to predict; a listed image without a prediction (it
    failed) then counts as a miss on every pixel, with a warning.

    Raises:
        AnnotationError: without ``names``, a GT file without prediction (naming the missing
            file); shapes differ.
    """
    categories = cocostuff_categories() if categories is None else categories
    evaluator = SemanticEvaluator(categories, unseen_ids=unseen_ids, ignore_label=ignore_label)
    gt_files = sorted(Path(gt_dir).glob("*.png")) if names is None else [Path(gt_dir) / n for n in sorted(set(names))]
    if not gt_files:
        raise AnnotationError(str(gt_dir), "no label PNGs found")
    for gt_path in gt_files:
        pred_path = Path(pred_dir) / gt_path.name
        if not pred_path.is_file():
            if names is None:
                raise AnnotationError(str(pred_path), f"prediction for {gt_path.name} is missing")
            logger.warning("%s: no prediction for %s; every pixel counts as missed", pred_dir, gt_path.name)
            gt = read_label_png(gt_path)
            evaluator.add(gt, np.full_like(gt, ignore_label), source=str(gt_path))
            continue
        evaluator.add(read_label_png(gt_path), read_label_png(pred_path), source=str(pred_path))
    return evaluator.summarize()
