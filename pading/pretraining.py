"""Stage 1: segmenter pretraining on the seen-only manifest, as plain functions that a
Ray Train worker (or a notebook loop) calls step by step."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from pading.classes import ClassTable
from pading.config import PretrainConfig
from pading.errors import DataError
from pading.manifest import load_sample
from pading.segmenter import prepare_batch

logger = logging.getLogger(__name__)


def load_training_batch(
    rows: Sequence[dict], table: ClassTable, data_format: str, image_size: int
) -> tuple[dict | None, list[dict]]:
    """Images and crowd-free targets of manifest ``rows`` as a segmenter batch.

    Rows that fail to load are returned as reject rows (``source``, ``key``, ``reason``)
    instead of stopping the step. Returns ``(None, rejects)`` when no row loads.
    """
    images, targets, sources, rejects = [], [], [], []
    for row in rows:
        try:
            image, target = load_sample(row, table, data_format)
        except DataError as err:
            logger.warning("skipping %s: %s", err.source, err.reason)
            rejects.append({"source": err.source, "key": f"image_id={row.get('image_id')}", "reason": err.reason})
            continue
        target = target.without_crowd()
        images.append(image)
        targets.append((target.masks, target.labels))
        sources.append(str(row.get("image_path")))
    if not images:
        return None, rejects
    return prepare_batch(images, image_size, targets, sources=sources), rejects


class SegmenterLoss(nn.Module):
    """``forward`` = the segmenter's training loss, so DistributedDataParallel can wrap it
    (DDP synchronises gradients through ``forward``)."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values, mask_labels, class_labels) -> dict[str, torch.Tensor]:
        return self.segmenter.compute_loss(pixel_values, mask_labels, class_labels)


def build_pretrain_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW (METHOD.md: lr 1e-4, weight decay 0.05); no decay on norms and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or "norm" in name else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def pretrain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """One optimisation step of the segmenter on ``batch`` (from :func:`load_training_batch`).

    ``model`` is a :class:`SegmenterLoss` (or a DDP wrapper of one). Returns the loss
    terms as floats (``loss`` is the weighted total).
    """
    device = next(model.parameters()).device
    model.train()
    pixel_values = batch["pixel_values"].to(device)  # (B, 3, S, S)
    mask_labels = [m.to(device) for m in batch["mask_labels"]]  # B x (N_i, S, S)
    class_labels = [c.to(device) for c in batch["class_labels"]]  # B x (N_i,)
    losses = model(pixel_values, mask_labels, class_labels)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {"loss": float(losses["loss"].detach()), **{
        k: float(v.detach()) for k, v in losses.items() if k in ("loss_cross_entropy", "loss_mask", "loss_dice")
    }}
