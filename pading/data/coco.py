"""COCO readers in the real formats and detectron2's layout (see ``DataConfig``).

Three annotation forms, one record type:

- panoptic: ``panoptic_{split}2017.json`` + RGB-id PNGs (id = R + 256 G + 256² B),
- instances: ``instances_{split}2017.json`` (polygons, RLE, uncompressed RLE for crowd),
- semantic: COCO-Stuff label PNGs (value = category_id - 1, 255 = ignore).

Each reader returns :class:`ImageRecord` rows (the manifest Parquet) and a list of
:class:`Reject` for records that could not be used; a file that cannot be read at all
raises :class:`~pading.errors.AnnotationError`. Pixel-level loading (images, targets,
derived targets) lives in :mod:`pading.data.targets`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pading.classes import ClassTable, cocostuff_categories
from pading.errors import AnnotationError, DataError

logger = logging.getLogger(__name__)

#: Label value of "ignore" in COCO-Stuff semantic PNGs.
#: Categories file beside the label folders (``stuffthingmaps/categories.json``).
SEMANTIC_CATEGORIES_FILE = "categories.json"
#: Top-level keys every COCO annotation JSON must have.
REQUIRED_JSON_KEYS = ("images", "annotations", "categories")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_PANOPTIC_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area", "bbox")
_INSTANCE_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox")


@dataclass
class Segment:
    """One segment of an image.

    Attributes:
        id: panoptic segment id (PNG colour id), COCO annotation id (instances), or the
            category id (semantic).
        category_id: dataset category id.
        iscrowd: a crowd region (ignored in training, kept for evaluation).
        area: pixel count.
        bbox: ``[x, y, w, h]`` in pixels.
        segmentation: JSON of the polygon list / RLE dict (instances), ``""`` otherwise.
    """

    id: int
    category_id: int
    iscrowd: bool
    area: int
    bbox: list[float]
    segmentation: str = ""

    @classmethod
    def from_dict(cls, row: dict) -> "Segment":
        return cls(
            id=int(row["id"]),
            category_id=int(row["category_id"]),
            iscrowd=bool(row.get("iscrowd", False)),
            area=int(round(float(row.get("area", 0)))),
            bbox=[float(v) for v in row.get("bbox", [0.0, 0.0, 0.0, 0.0])],
            segmentation=str(row.get("segmentation") or ""),
        )


@dataclass
class ImageRecord:
    """One image and its annotation; ``to_row`` gives the manifest Parquet row."""

    image_id: int
    file_name: str
    image_path: str
    height: int
    width: int
    split: str
    panoptic_path: str = ""
    semantic_path: str = ""
    segments: list[Segment] = field(default_factory=list)

    def to_row(self, table: ClassTable | None = None) -> dict:
        """Plain dict (segments as a list of dicts); with ``table`` adds ``has_unseen``."""
        row = asdict(self)
        if table is not None:
            row["has_unseen"] = has_unseen(self, table)
        return row

    @classmethod
    def from_row(cls, row: dict) -> "ImageRecord":
        segments = row.get("segments")
        return cls(
            image_id=int(row["image_id"]),
            file_name=str(row["file_name"]),
            image_path=str(row["image_path"]),
            height=int(row["height"]),
            width=int(row["width"]),
            split=str(row["split"]),
            panoptic_path=str(row.get("panoptic_path") or ""),
            semantic_path=str(row.get("semantic_path") or ""),
            segments=[s if isinstance(s, Segment) else Segment.from_dict(s) for s in list(segments or [])],
        )


@dataclass
class Reject:
    """An input that could not be used: ``source`` file, ``key`` (image id / record), why."""

    source: str
    key: str
    reason: str

    @classmethod
    def from_error(cls, error: DataError, key: str | int) -> "Reject":
        return cls(source=error.source, key=str(key), reason=error.reason)

    def to_row(self) -> dict:
        return asdict(self)


def has_unseen(record: ImageRecord, table: ClassTable) -> bool:
    """Whether any segment (crowd included) is of an unseen class of ``table``."""
    unseen = table.unseen_ids
    return any(s.category_id in unseen for s in record.segments)


def seen_only_filter(
    records: Iterable[ImageRecord], table: ClassTable
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split into (kept, dropped): an image with even one unseen segment is dropped."""
    kept, dropped = [], []
    for record in records:
        (dropped if has_unseen(record, table) else kept).append(record)
    logger.info("seen-only filter: kept %d, dropped %d images with unseen classes", len(kept), len(dropped))
    return kept, dropped


# ---- JSON helpers -----------------------------------------------------------------
def read_coco_json(json_path: str | Path) -> dict:
    """Load a COCO JSON; raise AnnotationError naming the file for unreadable/invalid
    JSON or a missing top-level key."""
    path = Path(json_path)
    try:
        with path.open("r", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise AnnotationError(str(path), "annotation file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(str(path), f"not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AnnotationError(str(path), f"top level is a {type(data).__name__}, expected an object")
    for key in REQUIRED_JSON_KEYS:
        if key not in data:
            raise AnnotationError(str(path), f"missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise AnnotationError(str(path), f"key {key!r} is not a list")
    return data


def _missing(record, keys: Sequence[str]) -> str | None:
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, expected an object"
    absent = [k for k in keys if k not in record]
    return f"missing key(s) {', '.join(map(repr, absent))}" if absent else None


def _index_images(data: dict, source: str, rejects: list[Reject]) -> dict[int, dict]:
    images = {}
    for position, image in enumerate(data["images"]):
        problem = _missing(image, _IMAGE_KEYS)
        if problem:
            rejects.append(Reject(source, f"images[{position}]", f"image entry {problem}"))
            continue
        images[int(image["id"])] = image
    return images


def _category_ids(data: dict, source: str) -> set[int]:
    ids = set()
    for position, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise AnnotationError(source, f"categories[{position}] has no 'id'")
        ids.add(int(category["id"]))
    return ids


def _record(image: dict, image_dir: str | Path, split: str, **paths) -> ImageRecord:
    return ImageRecord(
        image_id=int(image["id"]),
        file_name=str(image["file_name"]),
        image_path=str(Path(image_dir) / image["file_name"]),
        height=int(image["height"]),
        width=int(image["width"]),
        split=split,
        **paths,
    )


# ---- panoptic -----------------------------------------------------------------------
def read_panoptic_index(
    json_path: str | Path, image_dir: str | Path, panoptic_dir: str | Path, split: str
) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Read ``panoptic_*.json`` -> (records sorted by image id, categories, rejects).

    A bad annotation (missing key, no matching image, unknown category id, repeated
    segment id) or an image without an annotation becomes a :class:`Reject`.
    """
    source = str(json_path)
    data = read_coco_json(json_path)
    rejects: list[Reject] = []
    images = _index_images(data, source, rejects)
    known_categories = _category_ids(data, source)
    records: dict[int, ImageRecord] = {}
    for position, ann in enumerate(data["annotations"]):
        key = f"annotations[{position}]"
        problem = _missing(ann, ("image_id", "file_name", "segments_info"))
        if problem:
            rejects.append(Reject(source, key, f"panoptic annotation {problem}"))
            continue
        image_id = int(ann["image_id"])
        key = f"image_id={image_id}"
        if image_id not in images:
            rejects.append(Reject(source, key, "annotation has no matching entry in 'images'"))
            continue
        if image_id in records:
            rejects.append(Reject(source, key, "image has more than one panoptic annotation"))
            continue
        segments, reason = [], None
        for seg_position, info in enumerate(ann["segments_info"]):
            problem = _missing(info, _PANOPTIC_SEGMENT_KEYS)
            if problem:
                reason = f"segments_info[{seg_position}] {problem}"
            elif int(info["category_id"]) not in known_categories:
                reason = f"segments_info[{seg_position}] has unknown category id {info['category_id']}"
            elif any(s.id == int(info["id"]) for s in segments):
                reason = f"segments_info[{seg_position}] repeats segment id {info['id']}"
            if reason:
                break
            segments.append(Segment.from_dict(info))
        if reason:
            rejects.append(Reject(source, key, reason))
            continue
        record = _record(images[image_id], image_dir, split, panoptic_path=str(Path(panoptic_dir) / ann["file_name"]))
        record.segments = segments
        records[image_id] = record
    for image_id in sorted(set(images) - set(records)):
        if not any(r.key == f"image_id={image_id}" for r in rejects):
            rejects.append(Reject(source, f"image_id={image_id}", "image has no panoptic annotation"))
    logger.info("%s: %d records, %d rejects", source, len(records), len(rejects))
    return [records[i] for i in sorted(records)], list(data["categories"]), rejects


# ---- instances ----------------------------------------------------------------------
def _segmentation_problem(segmentation) -> str | None:
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation is an empty polygon list"
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "segmentation polygon needs an even number (>= 6) of coordinates"
        return None
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "segmentation RLE needs 'counts' and 'size'"
        if not isinstance(segmentation["counts"], (str, list)):
            return "segmentation RLE 'counts' must be a string or a list"
        return None
    return f"segmentation is a {type(segmentation).__name__}, expected polygons or RLE"


def read_instances_index(
    json_path: str | Path, image_dir: str | Path, split: str
) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Read ``instances_*.json`` through pycocotools -> (records, categories, rejects).

    One :class:`Segment` per annotation (segmentation kept as JSON). An annotation with a
    missing key, bad segmentation, unknown image or category becomes a Reject, and so does
    its image (a partly labelled image would teach "background" on the lost object).
    Images without annotations are kept with no segments, as in COCO.
    """
    from pycocotools.coco import COCO

    source = str(json_path)
    data = read_coco_json(json_path)
    rejects: list[Reject] = []
    images = _index_images(data, source, rejects)
    known_categories = _category_ids(data, source)
    good_annotations, bad_images = [], set()
    for position, ann in enumerate(data["annotations"]):
        problem = _missing(ann, _INSTANCE_KEYS)
        key = f"annotation id={ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{position}]"
        if problem is None:
            if int(ann["image_id"]) not in images:
                problem = f"image id {ann['image_id']} has no entry in 'images'"
            elif int(ann["category_id"]) not in known_categories:
                problem = f"unknown category id {ann['category_id']}"
            else:
                problem = _segmentation_problem(ann["segmentation"])
        if problem:
            rejects.append(Reject(source, key, f"instance annotation {problem}"))
            if isinstance(ann, dict) and ann.get("image_id") in images:
                bad_images.add(int(ann["image_id"]))
            continue
        good_annotations.append(ann)
    for image_id in sorted(bad_images):
        rejects.append(Reject(source, f"image_id={image_id}", "image has an unusable instance annotation"))
    coco = COCO()
    coco.dataset = {
        "images": list(images.values()),
        "annotations": good_annotations,
        "categories": list(data["categories"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    records = []
    for image_id in sorted(coco.getImgIds()):
        if image_id in bad_images:
            continue
        record = _record(coco.imgs[image_id], image_dir, split)
        for ann in sorted(coco.imgToAnns[image_id], key=lambda a: a["id"]):
            segment = Segment.from_dict(ann)
            segment.segmentation = json.dumps(ann["segmentation"], sort_keys=True)
            record.segments.append(segment)
        records.append(record)
    logger.info("%s: %d records, %d rejects", source, len(records), len(rejects))
    return records, list(data["categories"]), rejects


# ---- semantic (COCO-Stuff label PNGs) ---------------------------------------------------
def semantic_categories(label_dir: str | Path) -> list[dict]:
    """The categories a label-PNG folder follows: ``<label_dir>/../categories.json`` when
    present (the synthetic dataset writes one), else the 171 COCO-Stuff categories."""
    sidecar = Path(label_dir).parent / SEMANTIC_CATEGORIES_FILE
    if not sidecar.is_file():
        return cocostuff_categories()
    try:
        categories = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(str(sidecar), f"not valid JSON ({err})") from None
    if not isinstance(categories, list) or any(_missing(c, ("id", "name")) for c in categories):
        raise AnnotationError(str(sidecar), "expected a list of categories with 'id' and 'name'")
    return categories
