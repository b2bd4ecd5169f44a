"""The embedded default dataset: synthetic images written in the real COCO formats.

``write_synthetic_dataset`` writes, under ``out_dir``, the same layout as a detectron2
``datasets/coco`` tree::

    train2017/, val2017/                              JPEG, 12-digit COCO file names
    annotations/panoptic_{train,val}2017.json         + panoptic_{train,val}2017/ RGB-id PNGs
    annotations/instances_{train,val}2017.json        polygons, RLE, uncompressed RLE (crowd)
    stuffthingmaps/{train,val}2017/*.png              category_id - 1, 255 = void

with real COCO panoptic category ids and names. A class's look (colour, texture,
shape) is a fixed, smooth function of its name's sentence embedding, through fixed
seeded random projections, so similar names look alike and what is learnt on seen
classes transfers to unseen ones. Same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

import numpy as np
from PIL import Image
from scipy.special import ndtr

from pading.classes import ClassTable, clean_name, coco_panoptic_categories
from pading.config import DataConfig, SemanticsConfig, SyntheticConfig
from pading.data.coco import SEMANTIC_CATEGORIES_FILE
from pading.data.targets import (
    decode_segmentation,
    mask_bbox,
    mask_to_rle,
    panoptic_to_semantic,
)
from pading.errors import ConfigError

logger = logging.getLogger(__name__)

#: The vocabulary: things and stuff; cow, giraffe, grass, road and tree are unseen in
#: zsp_coco_panoptic_14, each with semantically close seen classes.
SYNTHETIC_THING_NAMES = ("person", "car", "bird", "dog", "horse", "sheep", "cow", "zebra", "elephant", "giraffe")
SYNTHETIC_STUFF_NAMES = (
    "flower", "sand", "sea", "dirt-merged", "pavement-merged", "mountain-merged",
    "rock-merged", "grass-merged", "road", "tree-merged",
)
#: Seed of the fixed projections semantics -> appearance (never the dataset seed).
APPEARANCE_SEED = 20230618
#: Decimals kept of the embeddings, so tiny float noise does not change a colour.
EMBEDDING_DECIMALS = 4
COLOUR_RANGE = (20.0, 235.0)
TEXTURE_CYCLES_RANGE = (1.5, 8.0)  # pattern periods per image width
TEXTURE_CONTRAST_RANGE = (0.1, 0.45)
TEXTURE_AMPLITUDE = 110.0  # pixel levels at contrast 1
ASPECT_LOG_SPREAD = 0.9  # aspect = exp(spread * (u - 0.5) * 2)
SQUARENESS_RANGE = (1.4, 6.0)  # superellipse exponent: 2 = ellipse, large = rectangle
BLOB_AMPLITUDE_MAX = 0.3
BLOB_LOBES_RANGE = (3, 6)
SIZE_FACTOR_RANGE = (0.8, 1.25)
THING_RADIUS_RANGE = (0.12, 0.24)  # fraction of the image size
CROWD_BLOB_RADIUS_RANGE = (0.05, 0.09)
CROWD_BLOBS_RANGE = (2, 4)
STUFF_REGIONS_RANGE = (1, 2)  # stuff classes tiling the background
THINGS_RANGE = (1, 3)  # thing instances per image
THING_CENTRE_RANGE = (0.15, 0.85)  # fraction of the image size
BOUNDARY_OFFSET_MAX = 0.2  # stuff boundary: distance of the line from the centre
BOUNDARY_WAVE_AMPLITUDE_MAX = 0.06
BOUNDARY_WAVE_CYCLES_RANGE = (1.0, 3.0)
VOID_WIDTH_RANGE = (0.06, 0.14)  # unlabeled edge strip, fraction of the image size
VOID_GREY_RANGE = (40.0, 200.0)
MAX_LAYOUT_ATTEMPTS = 100  # redraws until a forced unseen class is visible enough
ROTATION_JITTER = 0.3  # radians, per instance
POLYGON_VERTICES = 24
POLYGON_DECIMALS = 2
SEGMENT_ID_STRIDE = 1000  # panoptic id = category_id * stride + k
VAL_IMAGE_ID_OFFSET = 1_000_000
JPEG_QUALITY = 95
_FACTORS = ("red", "green", "blue", "cycles", "angle", "contrast", "checker", "aspect", "squareness", "blob",
            "lobes", "rotation", "size")


@dataclass(frozen=True)
class ClassAppearance:
    """How a class is drawn; every field is a function of its name embedding."""

    colour: tuple[float, float, float]
    cycles: float
    angle: float
    contrast: float
    checker: float
    aspect: float
    squareness: float
    blob: float
    lobes: int
    rotation: float
    size: float


def synthetic_categories() -> list[dict]:
    """COCO panoptic category dicts of the synthetic vocabulary, in id order."""
    names = set(SYNTHETIC_THING_NAMES) | set(SYNTHETIC_STUFF_NAMES)
    return [c for c in coco_panoptic_categories() if c["name"] in names]


def synthetic_table(split: str = "zsp_coco_panoptic_14") -> ClassTable:
    """The ClassTable of the synthetic vocabulary under ``split``."""
    table = ClassTable.from_split(split, categories=synthetic_categories())
    if not table.unseen_indices:
        raise ConfigError(f"split {split!r} has no unseen class in the synthetic vocabulary")
    return table


@lru_cache(maxsize=4)
def reference_embeddings(encoder: str = "minilm") -> tuple[tuple[str, ...], np.ndarray]:
    """(names, (N, S) float64 embeddings rounded to EMBEDDING_DECIMALS) of the 133 COCO
    panoptic class names, encoded in one call."""
    return _rounded_embeddings(tuple(c["name"] for c in coco_panoptic_categories()), encoder)


def _rounded_embeddings(names: tuple[str, ...], encoder: str) -> tuple[tuple[str, ...], np.ndarray]:
    from pading.model.semantics import embed_names

    vectors = embed_names([clean_name(n) for n in names], SemanticsConfig(encoder=encoder))  # packaged for minilm
    embeddings = np.round(vectors.astype(np.float64), EMBEDDING_DECIMALS)
    embeddings.setflags(write=False)
    return names, embeddings


@lru_cache(maxsize=4)
def class_appearances(encoder: str = "minilm") -> Mapping[str, ClassAppearance]:
    """Appearance of every COCO panoptic class from its sentence embedding
    (:func:`appearances_from_embeddings` over the 133 names)."""
    return appearances_from_embeddings(*reference_embeddings(encoder))


def appearances_from_embeddings(names: tuple[str, ...], embeddings: np.ndarray) -> Mapping[str, ClassAppearance]:
    """Appearance of each name from its sentence embedding.

    Embeddings (N, S) are centred on the names' mean, projected by a fixed seeded (S, F)
    Gaussian matrix, standardised over the names and squashed by the normal CDF to u in
    (0, 1)^F, which is mapped linearly to each factor's range.
    """
    projection = np.random.default_rng(APPEARANCE_SEED).standard_normal((embeddings.shape[1], len(_FACTORS)))
    projected = (embeddings - embeddings.mean(axis=0)) @ projection  # (N, F)
    unit = ndtr(projected / projected.std(axis=0))  # (N, F) in (0, 1)

    def span(value, bounds):
        return float(bounds[0] + value * (bounds[1] - bounds[0]))

    out = {}
    for name, u in zip(names, unit):
        f = dict(zip(_FACTORS, u))
        out[name] = ClassAppearance(
            colour=tuple(span(f[c], COLOUR_RANGE) for c in ("red", "green", "blue")),
            cycles=span(f["cycles"], TEXTURE_CYCLES_RANGE),
            angle=float(np.pi * f["angle"]),
            contrast=span(f["contrast"], TEXTURE_CONTRAST_RANGE),
            checker=float(f["checker"]),
            aspect=float(np.exp(ASPECT_LOG_SPREAD * (2.0 * f["aspect"] - 1.0))),
            squareness=span(f["squareness"], SQUARENESS_RANGE),
            blob=float(BLOB_AMPLITUDE_MAX * f["blob"]),
            lobes=int(round(span(f["lobes"], BLOB_LOBES_RANGE))),
            rotation=float(np.pi * f["rotation"]),
            size=span(f["size"], SIZE_FACTOR_RANGE),
        )
    return MappingProxyType(out)  # cached: read-only


def _texture(look: ClassAppearance, grid_x, grid_y, centre, angle) -> np.ndarray:
    """(H, W, 3) float pixels of a class's textured colour, pattern centred at ``centre``."""
    dx, dy = grid_x - centre[0], grid_y - centre[1]  # (H, W), in image widths
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    stripes = np.sin(2 * np.pi * look.cycles * along)
    checker = stripes * np.sin(2 * np.pi * look.cycles * across)
    pattern = (1 - look.checker) * stripes + look.checker * checker  # (H, W) in [-1, 1]
    return np.asarray(look.colour)[None, None, :] + (look.contrast * TEXTURE_AMPLITUDE * pattern)[:, :, None]


def _shape_polygon(look: ClassAppearance, rng, size: int, radius_range) -> list[float]:
    """A thing outline: a blobby superellipse, as a flat COCO polygon clamped to the image."""
    radius = size * look.size * rng.uniform(*radius_range)
    centre = rng.uniform(THING_CENTRE_RANGE[0] * size, THING_CENTRE_RANGE[1] * size, size=2)
    rotation = look.rotation + rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
    phase = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 2 * np.pi, POLYGON_VERTICES, endpoint=False)  # (V,)
    p = look.squareness
    rho = (np.abs(np.cos(t)) ** p + np.abs(np.sin(t)) ** p) ** (-1.0 / p) * (1 + look.blob * np.sin(look.lobes * t + phase))
    x = radius * np.sqrt(look.aspect) * rho * np.cos(t)
    y = radius / np.sqrt(look.aspect) * rho * np.sin(t)
    px = centre[0] + x * np.cos(rotation) - y * np.sin(rotation)
    py = centre[1] + x * np.sin(rotation) + y * np.cos(rotation)
    points = np.stack([np.clip(px, 0, size), np.clip(py, 0, size)], axis=1)  # (V, 2)
    return [round(float(v), POLYGON_DECIMALS) for v in points.reshape(-1)]


def _rasterise(polygons: list[list[float]], size: int) -> np.ndarray:
    return decode_segmentation(polygons, size, size)  # (H, W) bool


@dataclass
class _Options:
    size: int
    crowd_probability: float
    void_probability: float
    noise_std: float
    min_forced_fraction: float


def _pick(rng, names: list[str], weights: np.ndarray, count: int, replace: bool) -> list[str]:
    chosen = rng.choice(len(names), size=count, replace=replace, p=weights / weights.sum())
    return [names[i] for i in np.atleast_1d(chosen)]


def _render(rng, table: ClassTable, looks, options: _Options, forced: str | None, unseen_weight: float):
    """One image: (H, W, 3) uint8, (H, W) int32 panoptic ids, segments [(id, name, crowd, polygon)]."""
    size = options.size
    grid_y, grid_x = (np.mgrid[0:size, 0:size] + 0.5) / size  # (H, W) each
    weight = {c.name: (unseen_weight if c.unseen else 1.0) for c in table}
    things = [c.name for c in table if c.isthing]
    stuff = [c.name for c in table if not c.isthing]
    num_stuff = int(rng.integers(STUFF_REGIONS_RANGE[0], STUFF_REGIONS_RANGE[1] + 1))
    num_things = int(rng.integers(THINGS_RANGE[0], THINGS_RANGE[1] + 1))
    stuff_names = _pick(rng, stuff, np.array([weight[n] for n in stuff]), num_stuff, replace=False)
    thing_names = _pick(rng, things, np.array([weight[n] for n in things]), num_things, replace=True)
    if forced in stuff and forced not in stuff_names:
        stuff_names[0] = forced
    elif forced in things:
        thing_names[-1] = forced  # drawn last: never occluded
    ids = np.zeros((size, size), dtype=np.int32)  # (H, W)
    pixels = np.zeros((size, size, 3), dtype=np.float64)
    segments, counter = [], 0

    def new_id(name):
        nonlocal counter
        counter += 1
        return table[table.index_of_name(name)].id * SEGMENT_ID_STRIDE + counter

    regions = [np.ones((size, size), dtype=bool)]
    if len(stuff_names) == 2:  # split by a wavy line
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-BOUNDARY_OFFSET_MAX, BOUNDARY_OFFSET_MAX)
        cycles, phase = rng.uniform(*BOUNDARY_WAVE_CYCLES_RANGE), rng.uniform(0, 2 * np.pi)
        wave = rng.uniform(0.0, BOUNDARY_WAVE_AMPLITUDE_MAX) * np.sin(2 * np.pi * cycles * grid_x + phase)
        side = (grid_x - 0.5) * np.cos(angle) + (grid_y - 0.5) * np.sin(angle) + wave < offset  # (H, W)
        regions = [side, ~side]
    for name, region in zip(stuff_names, regions):
        segment_id = new_id(name)
        ids[region] = segment_id
        pixels[region] = _texture(looks[name], grid_x, grid_y, (0.0, 0.0), looks[name].angle)[region]
        segments.append((segment_id, name, False, None))
    if rng.random() < options.void_probability:
        width = int(max(1, round(size * rng.uniform(*VOID_WIDTH_RANGE))))
        edge = ("top", "bottom", "left", "right")[int(rng.integers(0, 4))]
        strip = {"top": grid_y * size < width, "bottom": grid_y * size > size - width,
                 "left": grid_x * size < width, "right": grid_x * size > size - width}[edge]  # (H, W)
        ids[strip] = 0
        pixels[strip] = rng.uniform(*VOID_GREY_RANGE)
    if rng.random() < options.crowd_probability:
        name = _pick(rng, things, np.array([weight[n] for n in things]), 1, replace=False)[0]
        blobs = [_shape_polygon(looks[name], rng, size, CROWD_BLOB_RADIUS_RANGE)
                 for _ in range(int(rng.integers(CROWD_BLOBS_RANGE[0], CROWD_BLOBS_RANGE[1] + 1)))]
        mask = _rasterise(blobs, size)
        segment_id = new_id(name)
        ids[mask] = segment_id
        pixels[mask] = _texture(looks[name], grid_x, grid_y, (0.5, 0.5), looks[name].angle)[mask]
        segments.append((segment_id, name, True, None))
    for name in thing_names:
        polygon = _shape_polygon(looks[name], rng, size, THING_RADIUS_RANGE)
        mask = _rasterise([polygon], size)
        if not mask.any():
            continue
        segment_id = new_id(name)
        ys, xs = np.nonzero(mask)
        centre = (xs.mean() / size, ys.mean() / size)
        ids[mask] = segment_id
        pixels[mask] = _texture(looks[name], grid_x, grid_y, centre, looks[name].angle)[mask]
        segments.append((segment_id, name, False, polygon))
    pixels += rng.normal(0.0, options.noise_std, size=pixels.shape)
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)  # (H, W, 3)
    return image, ids, [s for s in segments if (ids == s[0]).any()]


def _write_split(out_dir: Path, split_name: str, count: int, first_id: int, rng, table, looks, options,
                 forced_unseen_fraction: float, unseen_weight: float, log_every: int) -> dict:
    image_dir, panoptic_dir = out_dir / f"{split_name}2017", out_dir / f"panoptic_{split_name}2017"
    semantic_dir = out_dir / "stuffthingmaps" / f"{split_name}2017"
    for folder in (image_dir, panoptic_dir, semantic_dir, out_dir / "annotations"):
        folder.mkdir(parents=True, exist_ok=True)
    unseen_names = [table[i].name for i in table.unseen_indices]
    images, panoptic_anns, instance_anns = [], [], []
    with_unseen, per_unseen = 0, {n: 0 for n in unseen_names}
    for position in range(count):
        image_id = first_id + position
        forced = None
        forced_so_far = int(np.floor(position * forced_unseen_fraction))
        if int(np.floor((position + 1) * forced_unseen_fraction)) > forced_so_far:
            forced = unseen_names[forced_so_far % len(unseen_names)]
        for _ in range(MAX_LAYOUT_ATTEMPTS):
            image, ids, segments = _render(rng, table, looks, options, forced, unseen_weight)
            forced_pixels = sum(int((ids == s[0]).sum()) for s in segments if s[1] == forced)
            if forced is None or forced_pixels >= options.min_forced_fraction * ids.size:
                break
        else:
            raise ConfigError(f"synthetic: {forced!r} never covered min_forced_fraction="
                              f"{options.min_forced_fraction} of an image in {MAX_LAYOUT_ATTEMPTS} draws")
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
        colour = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)  # (H, W, 3)
        Image.fromarray(colour).save(panoptic_dir / f"{stem}.png")
        infos = []
        for segment_id, name, crowd, polygon in segments:
            mask = ids == segment_id  # (H, W)
            category_id = table[table.index_of_name(name)].id
            infos.append({"id": int(segment_id), "category_id": category_id, "iscrowd": int(crowd),
                          "area": int(mask.sum()), "bbox": mask_bbox(mask)})
            if table[table.index_of_name(name)].isthing:
                if crowd:
                    segmentation = mask_to_rle(mask, compressed=False)
                elif polygon is not None and np.array_equal(mask, _rasterise([polygon], options.size)):
                    segmentation = [polygon]
                else:
                    segmentation = mask_to_rle(mask)  # occluded: the visible part
                instance_anns.append(dict(infos[-1], id=len(instance_anns) + 1, image_id=image_id,
                                          segmentation=segmentation))
        semantic = panoptic_to_semantic(ids, infos, table)  # (H, W) uint8
        Image.fromarray(semantic).save(semantic_dir / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": options.size, "width": options.size})
        panoptic_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos})
        present = {table[table.index_of_id(s["category_id"])].name for s in infos}
        with_unseen += bool(present & set(unseen_names))
        for name in present & set(unseen_names):
            per_unseen[name] += 1
        if (position + 1) % log_every == 0 or position + 1 == count:
            logger.info("synthetic %s: %d/%d images", split_name, position + 1, count)
    categories = [dict(c, supercategory="") for c in synthetic_categories()]
    (out_dir / "stuffthingmaps" / SEMANTIC_CATEGORIES_FILE).write_text(
        json.dumps(categories, sort_keys=True, separators=(",", ":")), encoding="utf-8")
    info = {"description": "pading synthetic COCO-format dataset", "version": "1"}
    for stem, anns, cats in (("panoptic", panoptic_anns, categories),
                             ("instances", instance_anns, [c for c in categories if c["isthing"]])):
        payload = {"info": info, "licenses": [], "images": images, "annotations": anns, "categories": cats}
        path = out_dir / "annotations" / f"{stem}_{split_name}2017.json"
        path.write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")), encoding="utf-8")
    return {"images": count, "with_unseen": with_unseen, "images_per_unseen_class": per_unseen}


def write_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int = 0,
    split: str = "zsp_coco_panoptic_14",
    encoder: str = "minilm",
    train_unseen_weight: float = 0.35,
    val_unseen_fraction: float = 0.75,
    crowd_probability: float = 0.1,
    void_probability: float = 0.2,
    noise_std: float = 6.0,
    min_forced_fraction: float = 0.04,
    log_every: int = 100,
) -> dict:
    """Write the synthetic dataset; return a summary dict.

    Args:
        train_unseen_weight: sampling weight of unseen classes in train images (seen = 1);
            train images with unseen classes are written and left to the seen-only filter.
        val_unseen_fraction: share of val images forced to hold an unseen class (taken
            round-robin, so every unseen class appears in about the same number).
        min_forced_fraction: least share of pixels the forced unseen class must cover.
    """
    if num_train < 1 or num_val < 1 or num_train >= VAL_IMAGE_ID_OFFSET:
        raise ConfigError(f"synthetic: need 1 <= num_train < {VAL_IMAGE_ID_OFFSET} and num_val >= 1")
    if image_size < 16:
        raise ConfigError("synthetic: image_size must be >= 16")
    out_dir = Path(out_dir)
    table = synthetic_table(split)
    looks = class_appearances(encoder)
    options = _Options(size=int(image_size), crowd_probability=crowd_probability, void_probability=void_probability,
                       noise_std=noise_std, min_forced_fraction=min_forced_fraction)
    common = dict(table=table, looks=looks, options=options, log_every=max(1, log_every))
    train = _write_split(out_dir, "train", num_train, 1, np.random.default_rng([seed, 0]),
                         forced_unseen_fraction=0.0, unseen_weight=train_unseen_weight, **common)
    val = _write_split(out_dir, "val", num_val, VAL_IMAGE_ID_OFFSET + 1, np.random.default_rng([seed, 1]),
                       forced_unseen_fraction=val_unseen_fraction, unseen_weight=1.0, **common)
    summary = {
        "out_dir": str(out_dir), "split": split, "seed": seed, "image_size": image_size,
        "classes": table.names, "unseen_classes": [table[i].name for i in table.unseen_indices],
        "num_train": num_train, "num_val": num_val,
        "train_with_unseen": train["with_unseen"], "train_seen_only": num_train - train["with_unseen"],
        "val_with_unseen": val["with_unseen"], "val_images_per_unseen_class": val["images_per_unseen_class"],
    }
    logger.info("synthetic dataset in %s: %d train (%d dropped by the seen-only filter), %d val (%d with unseen)",
                out_dir, num_train, train["with_unseen"], num_val, val["with_unseen"])
    return summary


def write_synthetic_from_config(config: SyntheticConfig, out_dir: str | Path, encoder: str = "minilm") -> dict:
    return write_synthetic_dataset(out_dir, num_train=config.num_train, num_val=config.num_val,
                                   image_size=config.image_size, seed=config.seed, split=config.split,
                                   encoder=encoder)


def ensure_synthetic_dataset(data: DataConfig) -> Optional[dict]:
    """Write the synthetic dataset ``data.synthetic`` asks for (COCO formats, or LVIS v1 when
    ``data.format`` is ``lvis``) under ``data.root`` unless its val annotations exist; returns
    the writer's summary, or None when nothing was written."""
    synthetic = data.synthetic
    root = Path(data.root)
    if synthetic is None:
        return None
    if data.format == "lvis":
        if _resolve(root, data.val_lvis_json).is_file():
            return None
        from pading.data.synthetic_lvis import write_synthetic_lvis_dataset

        logger.info("writing the synthetic LVIS dataset to %s", root)
        return write_synthetic_lvis_dataset(root, num_train=synthetic.num_train, num_val=synthetic.num_val,
                                            image_size=synthetic.image_size, seed=synthetic.seed)
    if _resolve(root, data.val_panoptic_json).is_file():
        return None
    logger.info("writing the synthetic dataset to %s", root)
    return write_synthetic_from_config(synthetic, root)


def _resolve(root: Path, relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else root / path


def _run_synth(args) -> int:
    summary = write_synthetic_dataset(args.out, num_train=args.train, num_val=args.val, image_size=args.size,
                                      seed=args.seed, split=args.split)
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
    return 0


def add_data_cli(subparsers) -> None:
    """Add ``data synth`` to an argparse sub-parser set."""
    data = subparsers.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic COCO-format dataset")
    synth.add_argument("--out", required=True, help="output directory (COCO layout)")
    synth.add_argument("--train", type=int, default=SyntheticConfig.num_train, help="train images")
    synth.add_argument("--val", type=int, default=SyntheticConfig.num_val, help="val images")
    synth.add_argument("--size", type=int, default=SyntheticConfig.image_size, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--split", default="zsp_coco_panoptic_14", help="zero-shot split naming the unseen classes")
    synth.set_defaults(func=_run_synth)
