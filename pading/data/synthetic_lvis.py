"""The large-vocabulary embedded default: synthetic images in the LVIS v1 format over the
1,203 LVIS class names (docs/lvis.md, "The synthetic LVIS run").

``write_synthetic_lvis_dataset`` writes detectron2's LVIS layout::

    <root>/train2017/, <root>/val2017/         JPEG, 12-digit COCO file names
    <root>/../lvis/lvis_v1_{train,val}.json    LVIS v1 instance annotations (polygons)

with the real LVIS v1 categories (ids, names, synonyms, frequency tags ``f``/``c``/``r``,
synsets, definitions). As in the synthetic COCO dataset (:mod:`pading.data.synthetic`), a
class's look is a fixed function of its cleaned name's sentence embedding, so similar names
look alike and what is learnt on seen classes can transfer to unseen (rare) ones.

What mimics LVIS: class frequencies follow the tags (frequent classes are drawn most often in
training, rare ones seldom; the open-vocabulary protocol removes the rare annotations from
training anyway), images have no stuff (a random textured background that is no class),
objects do not overlap (every annotation is a whole polygon), and images carry
``neg_category_ids``. Since a synthetic image is labelled exhaustively, every category absent
from a val image is listed as negative, so the LVIS evaluation scores every detection (as
COCO's does). Val images are forced, in turn, to hold a rare class, so AP_r has ground truth.
Same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image

from pading.classes import clean_name, lvis_v1_categories
from pading.data.synthetic import (
    _FACTORS,
    JPEG_QUALITY,
    THING_RADIUS_RANGE,
    VAL_IMAGE_ID_OFFSET,
    ClassAppearance,
    _rasterise,
    _rounded_embeddings,
    _shape_polygon,
    _texture,
    appearances_from_embeddings,
)
from pading.data.targets import mask_bbox
from pading.errors import ConfigError

logger = logging.getLogger(__name__)

#: Drawing weight of a class by its frequency tag in training images (LVIS: frequent > 100
#: images, common 11-100, rare 1-10).
TRAIN_FREQUENCY_WEIGHTS = {"f": 1.0, "c": 0.3, "r": 0.05}
#: In val images every class is equally likely (besides the forced rare one).
VAL_FREQUENCY_WEIGHTS = {"f": 1.0, "c": 1.0, "r": 1.0}
OBJECTS_RANGE = (1, 4)  # object instances per image
PLACEMENT_ATTEMPTS = 30  # redraws of an object that would overlap another
BACKGROUND_NOISE_STD = 6.0
COCO_URL = "http://images.cocodataset.org/{folder}/{file_name}"


@lru_cache(maxsize=2)
def lvis_appearances(encoder: str = "minilm") -> Mapping[str, ClassAppearance]:
    """Appearance of each of the 1,203 LVIS classes, by raw name, from its cleaned name's embedding."""
    categories = lvis_v1_categories()
    texts = tuple(clean_name(c["name"]) for c in categories)
    _, embeddings = _rounded_embeddings(texts, encoder)
    by_text = appearances_from_embeddings(texts, embeddings)
    return {c["name"]: by_text[text] for c, text in zip(categories, texts)}


def _background_look(rng) -> ClassAppearance:
    """A random look that belongs to no class (the unlabelled background)."""
    unit = dict(zip(_FACTORS, rng.uniform(0.0, 1.0, len(_FACTORS))))
    look = next(iter(lvis_appearances().values()))  # a template; every field is replaced
    return replace(look, colour=tuple(20.0 + 215.0 * unit[c] for c in ("red", "green", "blue")),
                   cycles=1.5 + 6.5 * unit["cycles"], angle=float(np.pi * unit["angle"]),
                   contrast=0.1 + 0.35 * unit["contrast"], checker=float(unit["checker"]))


def _render(rng, size: int, names: list[str], weights: np.ndarray, looks, forced: str | None):
    """One image: (H, W, 3) uint8 and its objects [(name, polygon, mask)], none overlapping."""
    grid_y, grid_x = (np.mgrid[0:size, 0:size] + 0.5) / size  # (H, W) each
    background = _background_look(rng)
    pixels = _texture(background, grid_x, grid_y, (0.0, 0.0), background.angle)  # (H, W, 3)
    count = int(rng.integers(OBJECTS_RANGE[0], OBJECTS_RANGE[1] + 1))
    chosen = [names[i] for i in rng.choice(len(names), size=count, p=weights / weights.sum())]
    if forced is not None:
        chosen[0] = forced  # placed first: always fits
    occupied = np.zeros((size, size), dtype=bool)
    objects = []
    for name in chosen:
        for _ in range(PLACEMENT_ATTEMPTS):
            polygon = _shape_polygon(looks[name], rng, size, THING_RADIUS_RANGE)
            mask = _rasterise([polygon], size)
            if mask.any() and not (mask & occupied).any():
                break
        else:
            continue  # no room left for this object
        occupied |= mask
        ys, xs = np.nonzero(mask)
        centre = (xs.mean() / size, ys.mean() / size)
        pixels[mask] = _texture(looks[name], grid_x, grid_y, centre, looks[name].angle)[mask]
        objects.append((name, polygon, mask))
    pixels += rng.normal(0.0, BACKGROUND_NOISE_STD, size=pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), objects


def _write_split(root: Path, lvis_dir: Path, split: str, count: int, first_id: int, rng, categories: list[dict],
                 looks, size: int, weights: dict, forced_fraction: float, log_every: int) -> dict:
    folder = f"{split}2017"
    (root / folder).mkdir(parents=True, exist_ok=True)
    names = [c["name"] for c in categories]
    by_name = {c["name"]: c for c in categories}
    class_weights = np.array([weights[c["frequency"]] for c in categories], dtype=np.float64)
    rare = [c["name"] for c in categories if c["frequency"] == "r"]
    all_ids = [c["id"] for c in categories]
    images, annotations, per_frequency = [], [], {"f": 0, "c": 0, "r": 0}
    forced_order = list(rng.permutation(rare)) if rare else []
    for position in range(count):
        image_id = first_id + position
        forced = None
        if int(np.floor((position + 1) * forced_fraction)) > int(np.floor(position * forced_fraction)):
            forced = forced_order[int(np.floor(position * forced_fraction)) % len(forced_order)]
        image, objects = _render(rng, size, names, class_weights, looks, forced)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(image).save(root / folder / file_name, quality=JPEG_QUALITY)
        present = set()
        for name, polygon, mask in objects:
            category = by_name[name]
            present.add(category["id"])
            per_frequency[category["frequency"]] += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                                "segmentation": [polygon], "area": int(mask.sum()), "bbox": mask_bbox(mask)})
        negatives = [i for i in all_ids if i not in present] if split == "val" else []
        images.append({"id": image_id, "height": size, "width": size, "license": 1,
                       "coco_url": COCO_URL.format(folder=folder, file_name=file_name),
                       "neg_category_ids": negatives, "not_exhaustive_category_ids": []})
        if (position + 1) % log_every == 0 or position + 1 == count:
            logger.info("synthetic LVIS %s: %d/%d images", split, position + 1, count)
    payload = {"info": {"description": "pading synthetic LVIS v1-format dataset", "version": "1"},
               "licenses": [{"id": 1, "name": "synthetic", "url": ""}], "images": images,
               "annotations": annotations, "categories": categories}
    lvis_dir.mkdir(parents=True, exist_ok=True)
    (lvis_dir / f"lvis_v1_{split}.json").write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")),
                                                     encoding="utf-8")
    return {"images": count, "objects": len(annotations), "objects_by_frequency": per_frequency}


def write_synthetic_lvis_dataset(
    root: str | Path,
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int = 0,
    encoder: str = "minilm",
    val_rare_fraction: float = 0.5,
    log_every: int = 200,
) -> dict:
    """Write the synthetic LVIS dataset: images under ``root`` (``train2017``, ``val2017``) and
    the annotations in ``root/../lvis``; return a summary dict.

    Args:
        val_rare_fraction: share of val images forced to hold a rare class (taken in a seeded
            order of the 337 rare classes, so each appears about equally often).
    """
    if num_train < 1 or num_val < 1 or num_train >= VAL_IMAGE_ID_OFFSET:
        raise ConfigError(f"synthetic: need 1 <= num_train < {VAL_IMAGE_ID_OFFSET} and num_val >= 1")
    if image_size < 32:
        raise ConfigError("synthetic: image_size must be >= 32")
    root = Path(root)
    categories = [{k: c[k] for k in ("id", "name", "synonyms", "frequency", "synset", "def")}
                  for c in lvis_v1_categories()]
    looks = lvis_appearances(encoder)
    common = dict(categories=categories, looks=looks, size=int(image_size), log_every=max(1, log_every))
    train = _write_split(root, root.parent / "lvis", "train", num_train, 1, np.random.default_rng([seed, 0]),
                         weights=TRAIN_FREQUENCY_WEIGHTS, forced_fraction=0.0, **common)
    val = _write_split(root, root.parent / "lvis", "val", num_val, VAL_IMAGE_ID_OFFSET + 1,
                       np.random.default_rng([seed, 1]), weights=VAL_FREQUENCY_WEIGHTS,
                       forced_fraction=val_rare_fraction, **common)
    summary = {"root": str(root), "seed": seed, "image_size": image_size, "classes": len(categories),
               "train": train, "val": val}
    logger.info("synthetic LVIS dataset in %s: %d train images (%s objects), %d val images (%s objects)",
                root, num_train, train["objects_by_frequency"], num_val, val["objects_by_frequency"])
    return summary
