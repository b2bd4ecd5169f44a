"""The manifest: one row per image (docs/architecture.md "Stages and their products"), read from a COCO-layout
dataset, validated image by image, split into train (seen-only) and val, plus the
rejects table. Ray-free: pipelines/prepare.py maps :func:`validate_rows` over shards.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from pading.classes import ClassTable
from pading.config import DataConfig
from pading.data import (
    ImageRecord,
    Reject,
    Targets,
    load_image,
    load_instance_targets,
    load_panoptic_targets,
    load_semantic_targets,
    read_instances_index,
    read_lvis_index,
    read_panoptic_index,
    read_semantic_index,
    seen_only_filter,
)
from pading.errors import DataError

logger = logging.getLogger(__name__)

SEGMENT_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("category_id", pa.int64()),
        ("iscrowd", pa.bool_()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
        ("segmentation", pa.string()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("image_path", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("split", pa.string()),
        ("panoptic_path", pa.string()),
        ("semantic_path", pa.string()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        ("has_unseen", pa.bool_()),
    ]
)

REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("key", pa.string()), ("reason", pa.string())])


def resolve(root: str | Path, relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else Path(root) / path


def read_split_index(data: DataConfig, split: str) -> tuple[list[ImageRecord], list[dict], list[Reject]]:
    """Read the annotation index of ``split`` ("train" or "val") in ``data.format``."""
    root = Path(data.root)
    images = resolve(root, data.train_images if split == "train" else data.val_images)
    if data.format == "panoptic":
        json_path = resolve(root, data.train_panoptic_json if split == "train" else data.val_panoptic_json)
        png_dir = resolve(root, data.train_panoptic_dir if split == "train" else data.val_panoptic_dir)
        records, categories, rejects = read_panoptic_index(json_path, images, png_dir, split)
    elif data.format == "instances":
        json_path = resolve(root, data.train_instances_json if split == "train" else data.val_instances_json)
        records, categories, rejects = read_instances_index(json_path, images, split)
    elif data.format == "lvis":
        records, categories, rejects = read_lvis_index(resolve(root, data.instances_json(split)), images, split)
    else:
        label_dir = resolve(root, data.train_semantic_dir if split == "train" else data.val_semantic_dir)
        records, categories, rejects = read_semantic_index(images, label_dir, split)
    limit = data.max_train_images if split == "train" else data.max_val_images
    if limit is not None:
        records = sorted(records, key=lambda r: r.image_id)[:limit]
    return records, categories, rejects


def class_table_for(data: DataConfig, categories: Sequence[dict]) -> ClassTable:
    """The vocabulary of the configured split over the dataset's own categories."""
    return ClassTable.from_split(data.split, categories=categories)


def load_targets(record: ImageRecord, table: ClassTable, data_format: str) -> Targets:
    if data_format == "panoptic":
        return load_panoptic_targets(record, table)
    if data_format in ("instances", "lvis"):
        return load_instance_targets(record, table)
    return load_semantic_targets(record, table)


def load_sample(row: dict, table: ClassTable, data_format: str) -> tuple[np.ndarray, Targets]:
    """(image (H,W,3) uint8, targets) of a manifest row; raises DataError on bad input."""
    record = ImageRecord.from_row(row)
    image = load_image(record.image_path)
    if image.shape[:2] != (record.height, record.width):
        raise DataError(record.image_path, f"image is {image.shape[1]}x{image.shape[0]} but the annotation says "
                        f"{record.width}x{record.height}")
    targets = load_targets(record, table, data_format)
    return image, targets


def validate_rows(rows: Iterable[dict], table: ClassTable, data_format: str) -> tuple[list[dict], list[dict]]:
    """Try to load every row's image and targets. Returns (good rows, reject rows)."""
    good, bad = [], []
    for row in rows:
        try:
            load_sample(row, table, data_format)
        except DataError as err:
            bad.append({"source": err.source, "key": f"image_id={row.get('image_id')}", "reason": err.reason})
            continue
        except Exception as err:  # noqa: BLE001 - an unexpected failure is still a reject, not a crash
            bad.append({"source": str(row.get("image_path")), "key": f"image_id={row.get('image_id')}",
                        "reason": f"{type(err).__name__}: {err}"})
            continue
        good.append(row)
    return good, bad


def to_rows(records: Iterable[ImageRecord], table: ClassTable) -> list[dict]:
    unseen = table.unseen_ids
    rows = []
    for record in records:
        row = record.to_row()
        row["has_unseen"] = any(s["category_id"] in unseen for s in row["segments"])
        rows.append(row)
    return rows


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=MANIFEST_SCHEMA)


def rejects_to_table(rejects: Sequence[Reject | dict]) -> pa.Table:
    rows = [asdict(r) if isinstance(r, Reject) else dict(r) for r in rejects]
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def apply_seen_only_filter(rows: Sequence[dict], table: ClassTable,
                           rule: str = "drop_images") -> tuple[list[dict], list[dict]]:
    """Train rows without any unseen segment; the dropped ones as reject-like rows.

    ``rule`` (``data.unseen_in_train``): ``drop_images`` drops every row with an unseen
    segment (docs/method.md "Setting"); ``drop_annotations`` keeps every row and removes its
    unseen segments (docs/lvis.md), so nothing is dropped."""
    if rule == "drop_annotations":
        unseen = table.unseen_ids
        kept = [{**r, "segments": [s for s in r["segments"] if s["category_id"] not in unseen], "has_unseen": False}
                for r in rows]
        removed = sum(len(r["segments"]) for r in rows) - sum(len(r["segments"]) for r in kept)
        logger.info("unseen annotations removed from %d training images: %d", len(rows), removed)
        return kept, []
    if rule != "drop_images":
        raise ValueError(f"unknown data.unseen_in_train rule {rule!r}")
    kept_records, dropped = seen_only_filter([ImageRecord.from_row(r) for r in rows], table)
    kept_ids = {r.image_id for r in kept_records}
    kept = [r for r in rows if r["image_id"] in kept_ids]
    dropped_rows = [r for r in rows if r["image_id"] not in kept_ids]
    return kept, dropped_rows


def shard_rows(rows: Sequence[dict], shard_size: int) -> list[list[int]]:
    """Deterministic shards of image ids (sorted), the unit of idempotent work."""
    ids = sorted(int(r["image_id"]) for r in rows)
    return [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]
