"""Data: COCO readers in the real formats (panoptic, instances, semantic), the LVIS v1
reader, per-image targets, the seen-only filter, and the synthetic embedded-default dataset."""

from pading.data.coco import (
    ImageRecord,
    Reject,
    Segment,
    has_unseen,
    read_coco_json,
    read_instances_index,
    read_panoptic_index,
    seen_only_filter,
    semantic_categories,
)
from pading.data.lvis import read_lvis_index
from pading.data.synthetic import add_data_cli, synthetic_table, write_synthetic_dataset
from pading.data.targets import (
    Targets,
    decode_segmentation,
    load_image,
    load_instance_targets,
    load_panoptic_targets,
    load_semantic_targets,
    mask_bbox,
    mask_to_rle,
    panoptic_to_instances,
    panoptic_to_semantic,
    read_label_png,
    read_panoptic_png,
    read_semantic_index,
    semantic_segments,
    to_rgb,
)

__all__ = [
    "ImageRecord",
    "Reject",
    "Segment",
    "Targets",
    "add_data_cli",
    "decode_segmentation",
    "has_unseen",
    "load_image",
    "load_instance_targets",
    "load_panoptic_targets",
    "load_semantic_targets",
    "mask_bbox",
    "mask_to_rle",
    "panoptic_to_instances",
    "panoptic_to_semantic",
    "read_coco_json",
    "read_instances_index",
    "read_label_png",
    "read_lvis_index",
    "read_panoptic_index",
    "read_panoptic_png",
    "read_semantic_index",
    "seen_only_filter",
    "semantic_categories",
    "semantic_segments",
    "to_rgb",
    "synthetic_table",
    "write_synthetic_dataset",
]

