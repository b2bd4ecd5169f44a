"""LVIS v1 reader: LVIS-format instance JSON -> the :class:`~pading.data.coco.ImageRecord` /
:class:`~pading.data.coco.Reject` rows the COCO readers give (docs/lvis.md).

LVIS v1 differs from COCO instances in four ways this reader handles:

- images name their file by ``coco_url`` (``http://images.cocodataset.org/train2017/000000155379.jpg``)
  and usually have no ``file_name``. LVIS v1 train and val both draw from COCO 2017 train and
  val images, so the folder comes from the URL: the image is
  ``<image_dir>/../<folder of the URL>/<last part of the URL>``, detectron2's layout
  (``datasets/coco/{train2017,val2017}``). An image with ``file_name`` and no ``coco_url`` is
  read from ``image_dir`` as in COCO;
- categories carry ``frequency`` (``r``/``c``/``f``), which the open-vocabulary split reads
  (:meth:`pading.classes.ClassTable.from_split`); a category without a valid one makes the file
  unusable (:class:`~pading.errors.AnnotationError`);
- images carry ``neg_category_ids`` (verified absent) and ``not_exhaustive_category_ids``
  (possibly unlabelled instances), which only the evaluator reads (from the GT JSON itself,
  :func:`pading.evaluation.metrics.evaluate_lvis`); here they are checked to be lists of known
  category ids (absent lists count as empty);
- annotations are polygons with no ``iscrowd``.

The checks are those of :func:`pading.data.coco.read_instances_index` (its helpers, imported):
an image entry without an integer id, a positive integer size and a file, or whose id occurs
more than once, is a Reject; a bad annotation (missing key, non-integer or repeated id, unknown
image or category, bad bbox, area or segmentation, a category the image lists as negative)
is a Reject and so is its image (a partly labelled image would teach "background" on the lost
object); images without annotations are kept with no segments.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from pading.classes import LVIS_FREQUENCIES
from pading.data.coco import (
    ImageRecord,
    Reject,
    Segment,
    _as_int,
    _category_ids,
    _file_name_problem,
    _id_and_size_problem,
    instance_annotation_problem,
    read_coco_json,
    unicode_problem,
)
from pading.errors import AnnotationError

logger = logging.getLogger(__name__)

#: Keys every LVIS image entry must have (plus ``coco_url`` or ``file_name``).
LVIS_IMAGE_KEYS = ("id", "height", "width")
#: Per-image category lists of the LVIS federated annotation.
LVIS_IMAGE_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


def lvis_image_location(image: dict, image_dir: str | Path) -> tuple[str, Path]:
    """``(file_name, image_path)`` of an LVIS image entry.

    ``coco_url`` wins when present: its last part is the file name and the folder before it
    (``train2017``/``val2017``) a sibling of ``image_dir``; without a folder in the URL the
    file is looked up in ``image_dir``. Otherwise ``file_name`` is relative to ``image_dir``.

    Raises:
        ValueError: the entry has neither a usable ``coco_url`` nor a ``file_name``, or its
            file would lie outside the image folders (absolute, ``..``).
    """
    url = image.get("coco_url")
    if isinstance(url, str) and url.strip():
        problem = unicode_problem(url)
        if problem:
            raise ValueError(f"coco_url {url!r} {problem}")
        path = PurePosixPath(urlparse(url.strip()).path)
        if path.name in ("", ".", "..") or path.parent.name in (".", ".."):
            raise ValueError(f"coco_url {url!r} does not end in a folder and a file name")
        folder = path.parent.name
        return path.name, (Path(image_dir).parent / folder if folder else Path(image_dir)) / path.name
    if "file_name" in image:
        problem = _file_name_problem(image["file_name"])
        if problem:
            raise ValueError(problem)
        return PurePosixPath(image["file_name"]).name, Path(image_dir) / image["file_name"]
    raise ValueError("has neither 'coco_url' nor 'file_name'")


def _check_categories(data: dict, source: str) -> set[int]:
    """Known category ids; AnnotationError when a category lacks a name or a valid frequency."""
    known = _category_ids(data, source)
    for position, category in enumerate(data["categories"]):
        if "name" not in category:
            raise AnnotationError(source, f"categories[{position}] has no 'name'")
        if category.get("frequency") not in LVIS_FREQUENCIES:
            raise AnnotationError(source, f"categories[{position}] ({category['name']!r}) has frequency "
                                  f"{category.get('frequency')!r}, expected one of {', '.join(LVIS_FREQUENCIES)}")
    return known


def _negative_category_problem(category_id: int, image: dict) -> str | None:
    if category_id in {_as_int(v) for v in image.get("neg_category_ids", [])}:
        return f"category id {category_id} is in the image's neg_category_ids"
    return None


def _image_problem(image, known_categories: set[int]) -> str | None:
    problem = _id_and_size_problem(image, LVIS_IMAGE_KEYS)
    if problem:
        return problem
    for key in LVIS_IMAGE_LISTS:
        values = image.get(key, [])
        if not isinstance(values, list) or any(_as_int(v) is None for v in values):
            return f"{key} is not a list of category ids"
        unknown = sorted({_as_int(v) for v in values} - known_categories)
        if unknown:
            return f"{key} has unknown category id {unknown[0]}"
    return None


def read_lvis_index(
    json_path: str | Path, image_dir: str | Path, split: str
) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Read an LVIS v1 JSON (``lvis_v1_{train,val}.json``) -> (records sorted by image id,
    categories, rejects).

    Args:
        json_path: the LVIS annotation file.
        image_dir: the split's COCO image folder (``datasets/coco/train2017``); images whose
            ``coco_url`` names another COCO folder are read from that sibling folder.
        split: ``"train"`` or ``"val"`` (stored in the records).

    Raises:
        AnnotationError: the file cannot be read, lacks a top-level key, or a category lacks
            an id, a name or a frequency tag.
    """
    source = str(json_path)
    data = read_coco_json(json_path)
    known_categories = _check_categories(data, source)
    rejects: list[Reject] = []
    image_ids = [_as_int(i.get("id")) if isinstance(i, dict) else None for i in data["images"]]
    occurrences = Counter(i for i in image_ids if i is not None)
    images: dict[int, dict] = {}
    locations: dict[int, tuple[str, Path]] = {}
    for position, (image, image_id) in enumerate(zip(data["images"], image_ids)):
        key = f"image_id={image_id}" if image_id is not None else f"images[{position}]"
        problem = _image_problem(image, known_categories)
        if problem is None and occurrences[image_id] > 1:  # which entry the annotations mean is unknowable
            problem = f"repeats image id {image_id} ({occurrences[image_id]} entries of 'images' have it)"
        if problem is None:
            try:
                locations[image_id] = lvis_image_location(image, image_dir)
            except ValueError as err:
                problem = str(err)
        if problem:
            rejects.append(Reject(source, key, f"image entry {problem}"))
            continue
        images[image_id] = image

    annotation_ids = Counter(_as_int(a.get("id")) for a in data["annotations"] if isinstance(a, dict))
    by_image: dict[int, list[dict]] = defaultdict(list)
    bad_images: set[int] = set()
    for position, ann in enumerate(data["annotations"]):
        ann_id = _as_int(ann.get("id")) if isinstance(ann, dict) else None
        image_id = _as_int(ann.get("image_id")) if isinstance(ann, dict) else None
        key = f"annotation id={ann_id}" if ann_id is not None else f"annotations[{position}]"
        problem = instance_annotation_problem(ann, ann_id, annotation_ids, image_id, images, known_categories,
                                              _negative_category_problem)
        if problem:
            rejects.append(Reject(source, key, f"instance annotation {problem}"))
            if image_id in images:
                bad_images.add(image_id)
            continue
        by_image[image_id].append(ann)
    for image_id in sorted(bad_images):
        rejects.append(Reject(source, f"image_id={image_id}", "image has an unusable instance annotation"))

    records = []
    for image_id in sorted(set(images) - bad_images):
        image = images[image_id]
        file_name, image_path = locations[image_id]
        record = ImageRecord(image_id=image_id, file_name=file_name, image_path=str(image_path),
                             height=int(image["height"]), width=int(image["width"]), split=split)
        for ann in sorted(by_image.get(image_id, []), key=lambda a: _as_int(a["id"])):
            segment = Segment.from_dict(ann)
            segment.segmentation = json.dumps(ann["segmentation"], sort_keys=True)
            record.segments.append(segment)
        records.append(record)
    logger.info("%s: %d records, %d rejects", source, len(records), len(rejects))
    return records, list(data["categories"]), rejects
