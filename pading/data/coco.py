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
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable, Sequence

import numpy as np

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
#: How far (as a share of the image's width / height) a polygon vertex may lie outside the
#: image. A little overshoot is clipped when rasterised; farther is an error, because
#: pycocotools walks every pixel along every edge (a vertex at 1e30 or NaN never finishes).
POLYGON_MARGIN = 1.0


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


def _as_int(value) -> int | None:
    """A JSON id or size as an int, or None when it is not one: integers (and floats without
    a fraction) count; strings, booleans and null do not (``"7"`` would index a different
    key than ``7`` in every dict keyed by id)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _loose_id(value) -> int | None:
    """:func:`_as_int`, or the integer a numeric string spells (to tell which image a bad
    annotation belongs to, never to accept it)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return _as_int(value)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as UTF-8 (a JSON ``\\udc80`` escape decodes to a lone
    surrogate, which no file system path, Parquet column or log line can hold), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"is not valid Unicode (character {err.start}: a lone surrogate {text[err.start]!r})"
    if "\x00" in text:
        return "is not valid Unicode (contains a NUL character)"
    return None


def _file_name_problem(name) -> str | None:
    """A ``file_name`` must be valid Unicode and a relative path that stays inside its folder."""
    if not isinstance(name, str) or not name.strip():
        return f"file_name {name!r} is not a file name"
    problem = unicode_problem(name)
    if problem:
        return f"file_name {name!r} {problem}"
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or PureWindowsPath(name).drive:
        return f"file_name {name!r} leaves the image folder (absolute or '..')"
    return None


def _id_and_size_problem(image: dict, keys: Sequence[str]) -> str | None:
    """An image record needs ``keys``, an integer ``id`` and positive integer sizes."""
    problem = _missing(image, keys)
    if problem:
        return problem
    if _as_int(image["id"]) is None:
        return f"has id {image['id']!r}, not an integer"
    for key in ("height", "width"):
        value = _as_int(image[key])
        if value is None or value < 1:
            return f"has {key} {image[key]!r}, not a positive integer"
    return None


def _image_problem(image) -> str | None:
    return _id_and_size_problem(image, _IMAGE_KEYS) or _file_name_problem(image["file_name"])


def instance_annotation_problem(ann: dict, ann_id: int | None, id_counts: Counter, image_id: int | None,
                                images: dict[int, dict], known_categories: set[int],
                                category_problem: Callable[[int, dict], str | None] | None = None) -> str | None:
    """What is wrong with one instance annotation (COCO or LVIS), or None: its keys, an
    integer id used once, an image among the usable ``images``, a known category (and
    ``category_problem(category_id, image)``, e.g. LVIS's negative categories), its box and
    area, and a segmentation that fits the image."""
    problem = _missing(ann, _INSTANCE_KEYS)
    if problem:
        return problem
    category_id = _as_int(ann["category_id"])
    if ann_id is None:
        return f"has id {ann['id']!r}, not an integer"
    if id_counts[ann_id] > 1:
        return f"repeats annotation id {ann_id} ({id_counts[ann_id]} annotations have it)"
    if image_id is None:
        return f"has image_id {ann['image_id']!r}, not an integer"
    if image_id not in images:
        return f"image id {image_id} has no usable entry in 'images'"
    if category_id is None:
        return f"has category_id {ann['category_id']!r}, not an integer"
    if category_id not in known_categories:
        return f"unknown category id {category_id}"
    image = images[image_id]
    return ((category_problem(category_id, image) if category_problem else None) or _box_area_problem(ann)
            or segmentation_problem(ann["segmentation"], int(image["height"]), int(image["width"])))


def _box_area_problem(record: dict) -> str | None:
    """``bbox`` (when present) must be 4 finite numbers with width and height >= 0, ``area``
    a finite number >= 0 and ``iscrowd`` 0 or 1 (COCO's data format)."""
    if "bbox" in record:
        bbox = record["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_finite_number(v) for v in bbox):
            return f"bbox {bbox!r} is not 4 finite numbers"
        if bbox[2] < 0 or bbox[3] < 0:
            return f"bbox {bbox!r} has a negative width or height"
    if "area" in record and (not _is_finite_number(record["area"]) or record["area"] < 0):
        return f"area {record['area']!r} is not a finite number >= 0"
    if "iscrowd" in record and (isinstance(record["iscrowd"], float) or record["iscrowd"] not in (0, 1)):
        return f"iscrowd {record['iscrowd']!r} is not 0 or 1"
    return None


def _index_images(data: dict, source: str, rejects: list[Reject]) -> tuple[dict[int, dict], set[int]]:
    """``(usable image entries by id, ids of rejected entries)``. An entry with a missing or
    invalid key is rejected, and so is every entry of an id that occurs more than once
    (which file and size the annotations of that id belong to is unknowable)."""
    parsed = []
    for position, image in enumerate(data["images"]):
        image_id = _as_int(image.get("id")) if isinstance(image, dict) else None
        parsed.append((position, image, image_id))
    occurrences = Counter(image_id for _, _, image_id in parsed if image_id is not None)
    images, unusable = {}, set()
    for position, image, image_id in parsed:
        key = f"image_id={image_id}" if image_id is not None else f"images[{position}]"
        problem = _image_problem(image)
        if problem is None and occurrences[image_id] > 1:
            problem = f"repeats image id {image_id} ({occurrences[image_id]} entries of 'images' have it)"
        if problem:
            rejects.append(Reject(source, key, f"image entry images[{position}] {problem}"))
            if image_id is not None:
                unusable.add(image_id)
            continue
        images[image_id] = image
    return images, unusable


def _category_ids(data: dict, source: str) -> set[int]:
    ids = set()
    for position, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise AnnotationError(source, f"categories[{position}] has no 'id'")
        category_id = _as_int(category["id"])
        if category_id is None:
            raise AnnotationError(source, f"categories[{position}] has id {category['id']!r}, not an integer")
        ids.add(category_id)
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
def _panoptic_segments(segments_info, known_categories: set[int]) -> tuple[list[Segment], str | None]:
    """``(segments, None)`` or ``([], what is wrong)`` for one annotation's ``segments_info``."""
    if not isinstance(segments_info, list):
        return [], f"segments_info is a {type(segments_info).__name__}, expected a list"
    segments, ids = [], set()
    for position, info in enumerate(segments_info):
        problem = _missing(info, _PANOPTIC_SEGMENT_KEYS)
        if problem is None:
            segment_id, category_id = _as_int(info["id"]), _as_int(info["category_id"])
            if segment_id is None or segment_id < 1:
                problem = f"has id {info['id']!r}, not a positive integer (0 is void in the PNG)"
            elif category_id is None:
                problem = f"has category_id {info['category_id']!r}, not an integer"
            elif category_id not in known_categories:
                problem = f"has unknown category id {category_id}"
            elif segment_id in ids:
                problem = f"repeats segment id {segment_id}"
            else:
                problem = _box_area_problem(info)
        if problem:
            return [], f"segments_info[{position}] {problem}"
        ids.add(segment_id)
        segments.append(Segment.from_dict(info))
    return segments, None


def read_panoptic_index(
    json_path: str | Path, image_dir: str | Path, panoptic_dir: str | Path, split: str
) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Read ``panoptic_*.json`` -> (records sorted by image id, categories, rejects).

    A bad image entry (missing or invalid key, repeated id) or annotation (missing key, no
    matching image, more than one for an image, a bad segment: unknown category id,
    repeated or void segment id, invalid bbox/area) becomes a :class:`Reject`, as does an
    image without an annotation (it has no PNG, so no ground truth). docs/bad_inputs.md
    lists each case.
    """
    source = str(json_path)
    data = read_coco_json(json_path)
    rejects: list[Reject] = []
    images, unusable = _index_images(data, source, rejects)
    known_categories = _category_ids(data, source)
    by_image: dict[int, list[tuple[int, dict]]] = {}
    for position, ann in enumerate(data["annotations"]):
        problem = _missing(ann, ("image_id", "file_name", "segments_info"))
        if problem is None and _as_int(ann["image_id"]) is None:
            problem = f"has image_id {ann['image_id']!r}, not an integer"
        if problem is None:
            problem = _file_name_problem(ann["file_name"])
        if problem:
            rejects.append(Reject(source, f"annotations[{position}]", f"panoptic annotation {problem}"))
            continue
        by_image.setdefault(_as_int(ann["image_id"]), []).append((position, ann))
    records: dict[int, ImageRecord] = {}
    for image_id, anns in by_image.items():
        key = f"image_id={image_id}"
        if image_id in unusable:  # rejected with its image entry
            continue
        if image_id not in images:
            rejects.append(Reject(source, key, "annotation has no matching entry in 'images'"))
            continue
        if len(anns) > 1:
            where = ", ".join(f"annotations[{position}]" for position, _ in anns)
            rejects.append(Reject(source, key, f"image has {len(anns)} panoptic annotations ({where})"))
            continue
        segments, reason = _panoptic_segments(anns[0][1]["segments_info"], known_categories)
        if reason:
            rejects.append(Reject(source, key, reason))
            continue
        record = _record(images[image_id], image_dir, split,
                         panoptic_path=str(Path(panoptic_dir) / anns[0][1]["file_name"]))
        record.segments = segments
        records[image_id] = record
    for image_id in sorted(set(images) - set(by_image)):
        rejects.append(Reject(source, f"image_id={image_id}", "image has no panoptic annotation"))
    logger.info("%s: %d records, %d rejects", source, len(records), len(rejects))
    return [records[i] for i in sorted(records)], list(data["categories"]), rejects


# ---- instances ----------------------------------------------------------------------
def _rle_string_total(counts: str) -> int | None:
    """Pixels covered by a compressed COCO RLE string (the sum of its runs, decoded as
    pycocotools' ``rleFrString`` does), or None when the string is malformed (a character
    outside the alphabet, a cut-off number, a negative run)."""
    total, runs, position = 0, [], 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        total += value
    return total


def segmentation_problem(segmentation, height: int | None = None, width: int | None = None) -> str | None:
    """What is wrong with a COCO instance ``segmentation`` (polygons, RLE, uncompressed
    RLE), or None.

    Given the image's ``height`` and ``width`` it also checks that polygon vertices stay
    within :data:`POLYGON_MARGIN` of the image and that an RLE has the image's size. An
    RLE must cover exactly height x width pixels in any case: pycocotools decodes a short
    one into uninitialised memory.
    """
    sized = height is not None and width is not None
    if isinstance(segmentation, list):
        if not segmentation:
            return "segmentation is an empty polygon list"
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "segmentation polygon needs an even number (>= 6) of coordinates"
            try:
                coords = np.asarray(polygon, dtype=np.float64)  # (2V,)
            except (TypeError, ValueError):
                return "segmentation polygon has a coordinate that is not a number"
            if coords.ndim != 1 or not np.isfinite(coords).all():
                return "segmentation polygon has a coordinate that is not a finite number"
            if sized:
                xs, ys = coords[0::2], coords[1::2]
                if (xs.min() < -POLYGON_MARGIN * width or xs.max() > (1 + POLYGON_MARGIN) * width
                        or ys.min() < -POLYGON_MARGIN * height or ys.max() > (1 + POLYGON_MARGIN) * height):
                    return (f"segmentation polygon spans x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}, "
                            f"far outside the {width}x{height} image")
        return None
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            return "segmentation RLE needs 'counts' and 'size'"
        size, counts = segmentation["size"], segmentation["counts"]
        if not isinstance(size, list) or len(size) != 2 or any(_as_int(v) is None or _as_int(v) < 0 for v in size):
            return f"segmentation RLE size {size!r} is not [height, width]"
        rle_height, rle_width = int(size[0]), int(size[1])
        if sized and [rle_height, rle_width] != [height, width]:
            return f"segmentation RLE size {[rle_height, rle_width]} differs from the image's {[height, width]}"
        if isinstance(counts, list):
            try:
                runs = np.asarray(counts)  # (R,); a crowd region has thousands of runs
            except (ValueError, OverflowError):
                runs = np.asarray([None])
            if runs.size and (runs.ndim != 1 or runs.dtype.kind not in "iuf" or not np.isfinite(runs).all()
                              or (runs != np.round(runs)).any() or runs.min() < 0):
                return "segmentation RLE counts must be non-negative integers"
            total = int(runs.sum())
        elif isinstance(counts, str):
            total = _rle_string_total(counts)
            if total is None:
                return "segmentation RLE counts string is malformed"
        else:
            return "segmentation RLE 'counts' must be a string or a list"
        if total != rle_height * rle_width:
            return f"segmentation RLE runs cover {total} pixels, not {rle_height}x{rle_width} = {rle_height * rle_width}"
        return None
    return f"segmentation is a {type(segmentation).__name__}, expected polygons or RLE"


#: The name the LVIS reader imports.
_segmentation_problem = segmentation_problem


def read_instances_index(
    json_path: str | Path, image_dir: str | Path, split: str
) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Read ``instances_*.json`` through pycocotools -> (records, categories, rejects).

    One :class:`Segment` per annotation (segmentation kept as JSON). A bad image entry is a
    Reject (as in :func:`read_panoptic_index`). An annotation with a missing or invalid key
    (non-integer or repeated id, unknown image or category, bad segmentation, bbox, area
    or iscrowd) becomes a Reject, and so does its image (a partly labelled image would
    teach "background" on the lost object). Images without annotations are kept with no
    segments, as in COCO. docs/bad_inputs.md lists each case.
    """
    from pycocotools.coco import COCO

    source = str(json_path)
    data = read_coco_json(json_path)
    rejects: list[Reject] = []
    images, unusable = _index_images(data, source, rejects)
    known_categories = _category_ids(data, source)
    annotation_ids = Counter(_as_int(a.get("id")) for a in data["annotations"] if isinstance(a, dict))
    good_annotations, bad_images = [], set()
    for position, ann in enumerate(data["annotations"]):
        is_dict = isinstance(ann, dict)
        ann_id = _as_int(ann.get("id")) if is_dict else None
        image_id = _as_int(ann.get("image_id")) if is_dict else None
        # the image a bad annotation is charged to: "7" names image 7 even though it is no valid id
        owner = image_id if image_id is not None or not is_dict else _loose_id(ann.get("image_id"))
        key = f"annotation id={ann_id}" if ann_id is not None else f"annotations[{position}]"
        if owner in unusable:  # rejected with its image entry
            continue
        problem = instance_annotation_problem(ann, ann_id, annotation_ids, image_id, images, known_categories)
        if problem:
            rejects.append(Reject(source, key, f"instance annotation {problem}"))
            if owner in images:
                bad_images.add(owner)
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
