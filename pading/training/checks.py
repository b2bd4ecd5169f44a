"""Checks of a generator run's inputs that must pass before any work starts (docs/bad_inputs.md):
each failure is a :class:`~pading.errors.ConfigError` naming the setting or the product at fault."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig
from pading.errors import ConfigError
from pading.training.objective import relation_chunk_bytes, resolve_chunk_size

#: The share of the device's memory one relation-network block may take.
CHUNK_MEMORY_SHARE = 0.25


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or this machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_chunk_size(config: ExperimentConfig, embed_dim: int, device: torch.device) -> None:
    """``losses.chunk_size`` must leave a relation-network block (and so the KL and MMD blocks, which
    hold as many floats) within a quarter of the device's memory."""
    pairs = resolve_chunk_size(config.losses.chunk_size, device)
    needed = relation_chunk_bytes(pairs, embed_dim)
    available = device_memory_bytes(device)
    if needed > CHUNK_MEMORY_SHARE * available:
        raise ConfigError(
            f"losses.chunk_size={config.losses.chunk_size} does not fit: a relation block of {pairs:,} pairs x "
            f"{embed_dim} holds about {needed / 1e9:.1f} GB, more than {CHUNK_MEMORY_SHARE:.0%} of the "
            f"{available / 1e9:.1f} GB on {device}; lower it (0 = the device's default)")


def check_features_cover(table: ClassTable, base_classes: int, files: Sequence[str | Path]) -> None:
    """The features (labels 0..C-1 of the dataset's ``base_classes`` classes, ``base_classes`` =
    no object) must fit the vocabulary and hold a matched query of a seen class."""
    from pading.data.features import label_range

    rows, low, high = label_range(files)
    if rows == 0:
        raise ConfigError(f"the features shards ({Path(files[0]).parent}) hold no rows; rerun the extract stage")
    if low < 0 or high > base_classes:
        raise ConfigError(
            f"the features' labels run from {low} to {high}, but the run's dataset has {base_classes} classes "
            f"(no object = {base_classes}): they were extracted for another vocabulary; rerun extract with --force")
    if table.num_classes < base_classes:
        raise ConfigError(f"the vocabulary has {table.num_classes} classes, fewer than the {base_classes} the "
                          "features were extracted for")
    seen = [i for i in table.seen_indices if i < base_classes]
    if not seen:
        raise ConfigError("no seen class of the vocabulary has features: the generator has nothing to match; "
                          "check data.split and vocabulary.extra_unseen")
