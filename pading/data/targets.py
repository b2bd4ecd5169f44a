"""Pixels: images, panoptic/label PNGs, per-image training targets and the targets
derived from a panoptic ground truth (semantic label map, COCO instance dicts).

Everything takes plain records and paths, so it runs unchanged in Ray workers. Bad
files raise :class:`~pading.errors.CorruptImageError` (cannot decode) or
:class:`~pading.errors.AnnotationError` (decodes, but disagrees with its annotation),
both naming the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pading.classes import SEMANTIC_IGNORE_LABEL, ClassTable
from pading.data.coco import ImageRecord, Reject, Segment, segmentation_problem, semantic_categories
from pading.errors import AnnotationError, CorruptImageError, DataError

logger = logging.getLogger(__name__)

#: Panoptic PNG colour -> id weights (COCO panoptic format: id = R + 256 G + 256² B).
PANOPTIC_ID_WEIGHTS = np.array([1, 256, 256 * 256], dtype=np.int32)
_EIGHT_BIT_MAX = 255
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
_SIXTEEN_BIT_MAX = 65535


def _open_decoded(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise CorruptImageError naming it."""
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise CorruptImageError(str(path), "is not a regular file (a directory or device)")
        raise CorruptImageError(str(path), "file does not exist")
    if path.stat().st_size == 0:
        raise CorruptImageError(str(path), "file is empty")
    try:
        image = Image.open(path)
        image.load()  # force a full decode: truncated files fail here, not later
    except UnidentifiedImageError:
        raise CorruptImageError(str(path), "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(str(path), f"cannot be decoded ({err})") from None
    return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB: grayscale, RGBA, CMYK and palette images are
    converted; 16-bit integer grayscale maps by a fixed factor (65535 -> 255, so a dark image
    stays dark), float grayscale is taken as 0..1 when it fits there, else as 0..255."""
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        if image.mode == "F":
            scale = _EIGHT_BIT_MAX if values.size and float(values.max()) <= 1.0 else 1.0
        else:
            scale = _EIGHT_BIT_MAX / _SIXTEEN_BIT_MAX
        gray = np.clip(np.rint(values * scale), 0, _EIGHT_BIT_MAX).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()  # (H, W, 3)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB (any mode, see ``to_rgb``). Raises
    CorruptImageError for missing/empty/truncated/non-images."""
    return to_rgb(_open_decoded(path))


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """COCO panoptic PNG -> (H, W) int32 segment ids (id = R + 256 G + 256² B; 0 = void)."""
    image = _open_decoded(path)
    if image.mode not in ("RGB", "RGBA"):
        raise AnnotationError(str(path), f"panoptic PNG must be RGB, not mode {image.mode}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)  # (H, W, 3)
    return rgb @ PANOPTIC_ID_WEIGHTS  # (H, W)


def read_label_png(path: str | Path) -> np.ndarray:
    """Semantic label PNG (one channel, value = category_id - 1, 255 ignore) -> (H, W) uint8."""
    image = _open_decoded(path)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise AnnotationError(str(path), f"label PNG must have one channel, not mode {image.mode}")
    labels = np.asarray(image)
    if labels.size and int(labels.max()) > _EIGHT_BIT_MAX:
        raise AnnotationError(str(path), f"label value {int(labels.max())} exceeds {_EIGHT_BIT_MAX}")
    return labels.astype(np.uint8)  # (H, W)


def mask_bbox(mask: np.ndarray) -> list[float]:
    """(H, W) bool -> ``[x, y, w, h]`` of its pixels (zeros when empty)."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return [0.0, 0.0, 0.0, 0.0]
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def semantic_segments(label_map: np.ndarray) -> list[Segment]:
    """(H, W) label map (category_id - 1, 255 ignore) -> one Segment per class present."""
    segments = []
    for value in np.unique(label_map):
        if value == SEMANTIC_IGNORE_LABEL:
            continue
        mask = label_map == value  # (H, W)
        category_id = int(value) + 1
        segments.append(
            Segment(id=category_id, category_id=category_id, iscrowd=False, area=int(mask.sum()), bbox=mask_bbox(mask))
        )
    return segments


def _check_size(source: str, array: np.ndarray, record: ImageRecord) -> None:
    if array.shape[:2] != (record.height, record.width):
        raise AnnotationError(
            source,
            f"size {array.shape[1]}x{array.shape[0]} differs from the annotation's "
            f"{record.width}x{record.height} (image_id={record.image_id})",
        )


@dataclass
class Targets:
    """Training/evaluation targets of one image (N segments).

    Attributes:
        masks: (N, H, W) bool.
        labels: (N,) int64 class indices of the ClassTable.
        category_ids: (N,) int64 dataset category ids.
        iscrowd: (N,) bool (training drops crowd segments; evaluation ignores them).
        segment_ids: (N,) int64 panoptic ids / annotation ids / category ids (semantic).
    """

    masks: np.ndarray
    labels: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    segment_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def build(cls, height: int, width: int, items: Sequence[tuple]) -> "Targets":
        """From ``(mask, label, category_id, iscrowd, segment_id)`` tuples."""
        if not items:
            masks = np.zeros((0, height, width), dtype=bool)
        else:
            masks = np.stack([item[0] for item in items]).astype(bool)  # (N, H, W)
        return cls(
            masks=masks,
            labels=np.array([item[1] for item in items], dtype=np.int64),
            category_ids=np.array([item[2] for item in items], dtype=np.int64),
            iscrowd=np.array([item[3] for item in items], dtype=bool),
            segment_ids=np.array([item[4] for item in items], dtype=np.int64),
        )

    def without_crowd(self) -> "Targets":
        keep = ~self.iscrowd  # (N,)
        return Targets(self.masks[keep], self.labels[keep], self.category_ids[keep], self.iscrowd[keep],
                       self.segment_ids[keep])


def load_panoptic_targets(record: ImageRecord, table: ClassTable) -> Targets:
    """Masks of a record's panoptic PNG; segments of classes outside ``table`` are left out.

    Raises AnnotationError if the PNG's size differs from the record's, the PNG holds an
    id that is not among the record's segments, or a segment has no pixel in the PNG
    (COCO's panoptic evaluation refuses both mismatches; docs/bad_inputs.md).
    """
    if not record.panoptic_path:
        raise AnnotationError(f"image_id={record.image_id}", "record has no panoptic PNG path")
    segment_id_map = read_panoptic_png(record.panoptic_path)  # (H, W)
    _check_size(record.panoptic_path, segment_id_map, record)
    known = {s.id for s in record.segments}
    present = set(np.unique(segment_id_map).tolist())
    for segment_id in sorted(present):
        if segment_id != 0 and segment_id not in known:
            raise AnnotationError(
                record.panoptic_path,
                f"segment id {segment_id} is not in the annotation's segments_info (image_id={record.image_id})",
            )
    for segment in record.segments:
        if segment.id not in present:
            raise AnnotationError(
                record.panoptic_path,
                f"segments_info has segment id {segment.id} with no pixel in the PNG (image_id={record.image_id})",
            )
    items = []
    for segment in record.segments:
        if not table.has_id(segment.category_id):
            continue
        mask = segment_id_map == segment.id  # (H, W)
        items.append((mask, table.index_of_id(segment.category_id), segment.category_id, segment.iscrowd, segment.id))
    return Targets.build(record.height, record.width, items)


def decode_segmentation(segmentation, height: int, width: int, source: str = "segmentation") -> np.ndarray:
    """COCO polygons / RLE / uncompressed RLE (or their JSON) -> (H, W) bool mask.

    The segmentation is checked first (``pading.data.coco.segmentation_problem``): a
    polygon with a NaN or far-away vertex would hang pycocotools, a short RLE would decode
    uninitialised memory. Raises AnnotationError naming ``source``.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, str):
        try:
            segmentation = json.loads(segmentation)
        except json.JSONDecodeError as err:
            raise AnnotationError(source, f"segmentation is not valid JSON ({err})") from None
    problem = segmentation_problem(segmentation, height, width)
    if problem:
        raise AnnotationError(source, problem)
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        rle = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
    else:
        raise AnnotationError(source, "segmentation is neither polygons nor RLE")
    if list(rle["size"]) != [height, width]:
        raise AnnotationError(source, f"RLE size {list(rle['size'])} differs from the image's {[height, width]}")
    return mask_utils.decode(rle).astype(bool)  # (H, W)


def mask_to_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """(H, W) bool -> COCO RLE: compressed (``counts`` a string) or uncompressed (``counts``
    the column-major run lengths, zeros first, as COCO crowd regions are stored)."""
    from pycocotools import mask as mask_utils

    size = [int(mask.shape[0]), int(mask.shape[1])]
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": size, "counts": rle["counts"].decode("ascii")}
    flat = mask.reshape(-1, order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": size, "counts": [int(c) for c in counts]}


def load_instance_targets(record: ImageRecord, table: ClassTable) -> Targets:
    """Decode each instance annotation at the record's size; classes outside ``table``
    are left out. Instances may overlap (unlike panoptic segments)."""
    items = []
    for segment in record.segments:
        if not table.has_id(segment.category_id):
            continue
        source = f"image_id={record.image_id} annotation id={segment.id}"
        if not segment.segmentation:
            raise AnnotationError(source, "instance segment has no segmentation")
        mask = decode_segmentation(segment.segmentation, record.height, record.width, source=source)
        items.append((mask, table.index_of_id(segment.category_id), segment.category_id, segment.iscrowd, segment.id))
    return Targets.build(record.height, record.width, items)


def load_semantic_targets(record: ImageRecord, table: ClassTable) -> Targets:
    """One mask per class of ``table`` present in the record's label PNG."""
    if not record.semantic_path:
        raise AnnotationError(f"image_id={record.image_id}", "record has no semantic label PNG path")
    labels = read_label_png(record.semantic_path)  # (H, W)
    _check_size(record.semantic_path, labels, record)
    items = []
    for value in np.unique(labels).tolist():
        category_id = value + 1
        if value == SEMANTIC_IGNORE_LABEL or not table.has_id(category_id):
            continue
        items.append((labels == value, table.index_of_id(category_id), category_id, False, category_id))
    return Targets.build(record.height, record.width, items)


def _as_segments(segments: Sequence) -> list[Segment]:
    return [s if isinstance(s, Segment) else Segment.from_dict(s) for s in segments]


def panoptic_to_semantic(segment_id_map: np.ndarray, segments: Sequence, table: ClassTable) -> np.ndarray:
    """(H, W) panoptic ids -> (H, W) uint8 semantic labels (category_id - 1; 255 for void
    and for classes outside ``table``). Crowd regions keep their class, as in COCO-Stuff."""
    semantic = np.full(segment_id_map.shape, SEMANTIC_IGNORE_LABEL, dtype=np.uint8)  # (H, W)
    for segment in _as_segments(segments):
        if not table.has_id(segment.category_id):
            continue
        if not 1 <= segment.category_id <= SEMANTIC_IGNORE_LABEL:
            raise AnnotationError(f"segment {segment.id}", f"category id {segment.category_id} does not fit a label PNG")
        semantic[segment_id_map == segment.id] = segment.category_id - 1
    return semantic


def panoptic_to_instances(
    segment_id_map: np.ndarray, segments: Sequence, table: ClassTable, image_id: int | None = None
) -> list[dict]:
    """(H, W) panoptic ids -> COCO instance annotation dicts (thing classes of ``table``,
    compressed RLE, area and bbox from the mask), for instance evaluation on panoptic GT."""
    instances = []
    for segment in _as_segments(segments):
        if not table.has_id(segment.category_id) or not table[table.index_of_id(segment.category_id)].isthing:
            continue
        mask = segment_id_map == segment.id  # (H, W)
        if not mask.any():
            continue
        instance = {
            "id": segment.id,
            "category_id": segment.category_id,
            "iscrowd": int(segment.iscrowd),
            "area": int(mask.sum()),
            "bbox": mask_bbox(mask),
            "segmentation": mask_to_rle(mask),
        }
        if image_id is not None:
            instance["image_id"] = int(image_id)
        instances.append(instance)
    return instances


def read_semantic_index(
    image_dir: str | Path,
    label_dir: str | Path,
    split: str,
    categories: Sequence[dict] | None = None,
    image_suffix: str = ".jpg",
) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Pair COCO-Stuff label PNGs with images by file stem -> (records, categories, rejects).

    Segments are derived from the classes present in each PNG (id = category id). A PNG
    with a value whose category (value + 1) is not in ``categories`` (default:
    :func:`semantic_categories`) is rejected, as is one without an image.
    """

    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise AnnotationError(str(label_dir), "semantic label directory does not exist")
    categories = list(categories) if categories is not None else semantic_categories(label_dir)
    known_categories = {int(c["id"]) for c in categories}
    records, rejects = [], []
    for png in sorted(label_dir.glob("*.png")):
        if not png.stem.isdigit():
            rejects.append(Reject(str(png), png.stem, "label file name is not a numeric COCO image id"))
            continue
        image_path = Path(image_dir) / f"{png.stem}{image_suffix}"
        if not image_path.is_file():
            rejects.append(Reject(str(png), png.stem, f"no image {image_path} for this label PNG"))
            continue
        try:
            label_map = read_label_png(png)  # (H, W) uint8
        except DataError as err:
            rejects.append(Reject.from_error(err, png.stem))
            continue
        segments = semantic_segments(label_map)
        unknown = [s.category_id for s in segments if s.category_id not in known_categories]
        if unknown:
            rejects.append(Reject(str(png), png.stem, f"label value {unknown[0] - 1} (category id {unknown[0]}) "
                                                      "is not a known category"))
            continue
        records.append(
            ImageRecord(
                image_id=int(png.stem),
                file_name=image_path.name,
                image_path=str(image_path),
                height=int(label_map.shape[0]),
                width=int(label_map.shape[1]),
                split=split,
                semantic_path=str(png),
                segments=segments,
            )
        )
    logger.info("%s: %d records, %d rejects", label_dir, len(records), len(rejects))
    return records, categories, rejects

