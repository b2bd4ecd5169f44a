"""Hungarian matching of queries to ground-truth segments (docs/method.md "Stages").

The cost is Mask2Former's: ``class_weight * (-p_q[gt class]) + mask_weight * BCE(mask) +
dice_weight * dice(mask)``, the mask terms averaged over ``num_points`` points sampled
uniformly in the image (the same points for predictions and ground truth, as
Mask2Former's matcher does) or over every pixel when ``num_points`` is None. The
assignment is :func:`scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pading.errors import AnnotationError

__all__ = ["matching_cost", "hungarian_match", "assign_query_labels"]


def _sample_points(maps: Tensor, coordinates: Tensor) -> Tensor:
    """Bilinear values of ``maps`` (M, H, W) at ``coordinates`` (P, 2) in [0, 1]² (x, y) -> (M, P)."""
    grid = (2.0 * coordinates - 1.0).view(1, 1, -1, 2).expand(maps.shape[0], 1, -1, 2)  # (M, 1, P, 2)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0, 0]  # (M, P)


def _pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over points of BCE(sigmoid(logits_q), target_n): (..., Q, P), (..., N, P) -> (..., Q, N)."""
    positive = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")  # (..., Q, P)
    negative = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")  # (..., Q, P)
    return (positive @ targets.transpose(-1, -2) + negative @ (1.0 - targets).transpose(-1, -2)) / logits.shape[-1]


def _pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - (2|p∩t| + 1) / (|p| + |t| + 1) for every (query, segment): (..., Q, P), (..., N, P) -> (..., Q, N)."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.transpose(-1, -2)  # (..., Q, N)
    denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]  # (..., Q, N)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def _check_inputs(class_logits: Tensor, mask_logits: Tensor, gt_labels: Tensor, gt_masks: Tensor) -> None:
    if class_logits.dim() != 2 or mask_logits.dim() != 3 or class_logits.shape[0] != mask_logits.shape[0]:
        raise AnnotationError(
            "predictions", f"class logits {tuple(class_logits.shape)} / mask logits {tuple(mask_logits.shape)} "
            "must be (Q, C+1) and (Q, h, w)"
        )
    if gt_labels.dim() != 1 or gt_masks.dim() != 3 or gt_masks.shape[0] != gt_labels.shape[0]:
        shapes = f"labels {tuple(gt_labels.shape)} / masks {tuple(gt_masks.shape)}"
        raise AnnotationError("ground truth", f"{shapes} must be (N,) and (N, H, W)")
    num_classes = class_logits.shape[1] - 1
    if gt_labels.numel() and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
        raise AnnotationError("ground truth", f"labels must lie in [0, {num_classes}), got {gt_labels.tolist()}")


@torch.no_grad()
def matching_cost(
    class_logits: Tensor,
    mask_logits: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    *,
    class_weight: float,
    mask_weight: float,
    dice_weight: float,
    num_points: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The (Q, N) matching cost of every query against every ground-truth segment.

    Args:
        class_logits: (Q, C+1); the last column is "no object".
        mask_logits: (Q, h, w) mask logits (any resolution covering the same frame as gt).
        gt_labels: (N,) class indices in [0, C).
        gt_masks: (N, H, W) {0, 1} masks.
        num_points: sample this many uniform points (shared by predictions and gt);
            None -> every gt pixel, with mask logits upsampled (bilinear) to (H, W).
        generator: random source for the points (determinism); its device is used to draw.
    """
    _check_inputs(class_logits, mask_logits, gt_labels, gt_masks)
    device = mask_logits.device
    gt_labels = gt_labels.to(device=device, dtype=torch.long)
    targets = gt_masks.to(device=device, dtype=torch.float32)  # (N, H, W)
    logits = mask_logits.float()  # (Q, h, w)
    class_cost = -class_logits.float().softmax(-1)[:, gt_labels]  # (Q, N)
    if num_points is None:
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits[None], size=targets.shape[-2:], mode="bilinear", align_corners=False)[0]
        point_logits, point_targets = logits.flatten(1), targets.flatten(1)  # (Q, P), (N, P)
    else:
        draw_device = generator.device if generator is not None else device
        coordinates = torch.rand(num_points, 2, generator=generator, device=draw_device).to(device)  # (P, 2)
        point_logits = _sample_points(logits, coordinates)  # (Q, P)
        point_targets = _sample_points(targets, coordinates)  # (N, P)
    cost = (
        class_weight * class_cost
        + mask_weight * _pairwise_sigmoid_bce(point_logits, point_targets)
        + dice_weight * _pairwise_dice(point_logits, point_targets)
    )
    largest = torch.finfo(cost.dtype).max  # invalid entries are matched only as a last resort
    return torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest)


@torch.no_grad()
def hungarian_match(
    class_logits: Tensor,
    mask_logits: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    *,
    class_weight: float,
    mask_weight: float,
    dice_weight: float,
    num_points: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Optimal one-to-one assignment of queries to ground-truth segments.

    Shapes as in :func:`matching_cost`. Returns ``(query_idx (K,), gt_idx (K,))`` long
    tensors on the CPU, K = min(Q, N), sorted by query index; N = 0 gives two empty tensors.
    """
    if gt_labels.numel() == 0:
        _check_inputs(class_logits, mask_logits, gt_labels.reshape(0), gt_masks.reshape(0, *gt_masks.shape[-2:]))
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    cost = matching_cost(
        class_logits,
        mask_logits,
        gt_labels,
        gt_masks,
        class_weight=class_weight,
        mask_weight=mask_weight,
        dice_weight=dice_weight,
        num_points=num_points,
        generator=generator,
    )
    query_idx, gt_idx = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(query_idx, dtype=torch.long), torch.as_tensor(gt_idx, dtype=torch.long)


@torch.no_grad()
def assign_query_labels(
    class_logits: Tensor,
    mask_logits: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    *,
    class_weight: float,
    mask_weight: float,
    dice_weight: float,
    no_object_index: int,
    num_points: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """(Q,) long labels: a matched query gets its segment's class, the others ``no_object_index``."""
    labels = torch.full((class_logits.shape[0],), no_object_index, dtype=torch.long)
    query_idx, gt_idx = hungarian_match(
        class_logits,
        mask_logits,
        gt_labels,
        gt_masks,
        class_weight=class_weight,
        mask_weight=mask_weight,
        dice_weight=dice_weight,
        num_points=num_points,
        generator=generator,
    )
    labels[query_idx] = gt_labels.detach().to("cpu", torch.long)[gt_idx]
    return labels
