"""Mask2Former's pretraining loss over every decoder layer and image at once.

transformers' criterion (``Mask2FormerLoss``) matches and scores one decoder layer at a
time, and its matcher one image at a time: at the demo's size (8 images, 4 decoder layers)
that is 32 matcher passes and 4 loss passes of small operations per step, 15-20 % of a
pretraining step on a CPU (docs/performance.md, "The pretraining loss"). :func:`mask2former_loss`
computes the same loss with batched operations:

- the random points are drawn exactly as transformers draws them (same shapes, same order:
  the last layer, then the auxiliary layers 0, 1, ...; per layer the matcher's points image by
  image, then the oversampled and the random points of the mask loss), so the same seed gives
  the same points;
- the matching cost of every (layer, image) pair comes from one ``grid_sample`` of the
  predicted masks, one of the targets and batched matrix products, then one copy to the CPU
  and scipy's ``linear_sum_assignment`` per pair;
- the mask loss samples the matched masks of every layer in one call each (uncertainty
  points, target points, predicted points);
- the cross-entropy of every layer is one weighted ``cross_entropy``.

What it computes is transformers' loss (the same terms, weights, normalisation by the
number of target masks and key names); only the float summation order differs
(``tests/test_segmenter.py`` compares both). The transformers criterion module stays on the
model: its settings and its no-object weight are read from it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pading.model.matching import _pairwise_dice, _pairwise_sigmoid_bce

__all__ = ["mask2former_loss"]


def _sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps`` (M, C, H, W) at per-map ``points`` (M, P, 2) in [0, 1]²
    -> (M, C, P): transformers' own ``sample_point`` (imported here: the model that calls this
    has loaded transformers already; this module is imported by processes that never do)."""
    from transformers.models.mask2former.modeling_mask2former import sample_point

    return sample_point(maps, points, align_corners=False)


def _match_targets(mask_labels: Sequence[Tensor], padded: Tensor, points: Tensor) -> Tensor:
    """Targets at the matcher's points: ``points`` (L, B, P, 2) -> (L, B, T, P). The matcher
    samples each image's own (unpadded) masks; when every image has the same size that is
    the padded stack, sampled for all layers in one call."""
    layers, batch, num_points, _ = points.shape
    if all(tuple(m.shape[1:]) == tuple(padded.shape[2:]) for m in mask_labels):
        per_image = points.transpose(0, 1).reshape(batch, layers * num_points, 2)  # (B, L*P, 2)
        sampled = _sample(padded, per_image)  # (B, T, L*P)
        return sampled.view(batch, -1, layers, num_points).permute(2, 0, 1, 3)
    sampled = padded.new_zeros((layers, batch, padded.shape[1], num_points))
    for index, masks in enumerate(mask_labels):
        if masks.shape[0]:
            values = _sample(masks.to(padded.dtype)[None].expand(layers, -1, -1, -1), points[:, index])  # (L, N_i, P)
            sampled[:, index, : masks.shape[0]] = values
    return sampled


@torch.no_grad()
def _match(criterion, masks: Tensor, classes: Tensor, mask_labels: Sequence[Tensor], padded: Tensor,
           labels: Tensor, counts: list[int], points: Tensor) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Hungarian matching of every (layer, image): masks (L, B, Q, h, w), classes (L, B, Q, C+1),
    labels (B, T) zero-padded, points (L, B, P, 2). Returns [layer][image] (query indices,
    target indices), as transformers' matcher returns them."""
    layers, batch, queries = masks.shape[:3]
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if not any(counts):
        return [[empty] * batch for _ in range(layers)]
    num_points = points.shape[2]
    matcher = criterion.matcher
    predicted = _sample(masks.flatten(0, 1), points.flatten(0, 1)).view(layers, batch, queries, num_points)
    targets = _match_targets(mask_labels, padded, points)  # (L, B, T, P)
    probabilities = classes.softmax(-1)  # (L, B, Q, C+1)
    index = labels[None, :, None, :].expand(layers, batch, queries, labels.shape[-1])
    cost = (matcher.cost_mask * _pairwise_sigmoid_bce(predicted, targets)
            - matcher.cost_class * probabilities.gather(-1, index)
            + matcher.cost_dice * _pairwise_dice(predicted, targets))  # (L, B, Q, T)
    largest = torch.finfo(cost.dtype).max
    cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=largest).cpu().numpy()
    return [[linear_sum_assignment(cost[layer, image, :, :count]) if count else empty
             for image, count in enumerate(counts)] for layer in range(layers)]


def _draw_points(criterion, layers: int, batch: int, matched: int, device: torch.device):
    """The random points of every layer, drawn as transformers draws them: for each layer the
    matcher's (1, P, 2) per image, then the mask loss's (N, P * oversample, 2) and
    (N, P - P * importance, 2). Returns (L, B, P, 2), (L * N, S, 2), (L * N, R, 2) or None."""
    num_points = criterion.num_points
    oversampled = int(num_points * criterion.oversample_ratio)
    uniform = num_points - int(criterion.importance_sample_ratio * num_points)
    match, over, rest = [], [], []
    for _ in range(layers):
        match.append(torch.cat([torch.rand(1, num_points, 2, device=device) for _ in range(batch)]))
        over.append(torch.rand(matched, oversampled, 2, device=device))
        if uniform > 0:
            rest.append(torch.rand(matched, uniform, 2, device=device))
    return torch.stack(match), torch.cat(over), (torch.cat(rest) if rest else None)


def mask2former_loss(
    criterion,
    weight_dict: dict[str, float],
    mask_logits: Sequence[Tensor],
    class_logits: Sequence[Tensor],
    mask_labels: Sequence[Tensor],
    class_labels: Sequence[Tensor],
    num_masks: float | None = None,
) -> dict[str, Tensor]:
    """Mask2Former's weighted training loss, as transformers' ``get_loss_dict`` returns it.

    Args:
        criterion: the model's transformers ``Mask2FormerLoss`` (settings and no-object weight).
        weight_dict: the model's loss weights (``loss_cross_entropy``, ``loss_mask``, ``loss_dice``).
        mask_logits: per decoder layer, first to last, (B, Q, h, w).
        class_logits: per decoder layer, (B, Q, C+1).
        mask_labels: B float tensors (N_i, H, W) of {0, 1}.
        class_labels: B long tensors (N_i,).
        num_masks: what the mask and dice terms are divided by; default this batch's target
            count (at least 1). Data-parallel training passes the count over every worker and
            micro-batch of the step divided by their number, as Mask2Former all-reduces it
            (:func:`pading.training.pretrain.fit_segmenter`).
    Returns:
        ``loss_mask``, ``loss_dice``, ``loss_cross_entropy`` of the last layer, then the same
        with suffix ``_i`` for auxiliary layer i, each multiplied by its weight.
    """
    layers = len(mask_logits)
    order = [layers - 1] + list(range(layers - 1))  # transformers: the last layer, then the auxiliary ones
    masks = torch.stack([mask_logits[layer] for layer in order])  # (L, B, Q, h, w)
    classes = torch.stack([class_logits[layer] for layer in order])  # (L, B, Q, C+1)
    batch, queries = masks.shape[1:3]
    device = masks.device
    counts = [int(labels.shape[0]) for labels in class_labels]
    matched = sum(min(queries, count) for count in counts)
    match_points, over_points, uniform_points = _draw_points(criterion, layers, batch, matched, device)

    # zero-padded to the batch's largest count and size, as transformers pads them for the mask loss
    padded = criterion._pad_images_to_max_in_batch([m.to(masks.dtype) for m in mask_labels])[0]  # (B, T, H, W)
    labels = torch.zeros((batch, padded.shape[1]), dtype=torch.long, device=device)
    for image, image_labels in enumerate(class_labels):
        labels[image, : image_labels.shape[0]] = image_labels
    indices = _match(criterion, masks.detach(), classes.detach(), mask_labels, padded, labels, counts, match_points)

    # (layer, image, query) of every matched prediction and (image, target) of its target
    layer_index = torch.tensor([layer for layer in range(layers) for image in range(batch)
                                for _ in indices[layer][image][0]], dtype=torch.long, device=device)
    image_index = torch.tensor([image for layer in range(layers) for image in range(batch)
                                for _ in indices[layer][image][0]], dtype=torch.long, device=device)
    query_index = torch.as_tensor(np.concatenate([indices[layer][image][0] for layer in range(layers)
                                                  for image in range(batch)]), dtype=torch.long, device=device)
    target_index = torch.as_tensor(np.concatenate([indices[layer][image][1] for layer in range(layers)
                                                   for image in range(batch)]), dtype=torch.long, device=device)
    num_masks = torch.clamp(torch.as_tensor(float(sum(counts) if num_masks is None else num_masks), device=device),
                            min=1)

    # the cross-entropy of every layer: unmatched queries are "no object" (column C)
    num_classes = classes.shape[-1] - 1
    target_classes = torch.full((layers, batch, queries), num_classes, dtype=torch.long, device=device)
    target_classes[layer_index, image_index, query_index] = labels[image_index, target_index]
    weight = criterion.empty_weight
    per_query = F.cross_entropy(classes.reshape(-1, num_classes + 1), target_classes.reshape(-1),
                                weight=weight, reduction="none").view(layers, -1)
    cross_entropy = per_query.sum(1) / weight[target_classes].view(layers, -1).sum(1)  # weighted mean per layer

    # the mask terms on points, most of them where the prediction is least certain
    if matched:
        predicted = masks[layer_index, image_index, query_index][:, None]  # (L*N, 1, h, w)
        targets = padded[image_index, target_index][:, None]  # (L*N, 1, H, W)
        with torch.no_grad():
            uncertainty = -_sample(predicted, over_points).abs()[:, 0]  # (L*N, S)
            keep = int(criterion.importance_sample_ratio * criterion.num_points)
            chosen = torch.topk(uncertainty, k=keep, dim=1)[1]  # (L*N, keep)
            points = over_points.gather(1, chosen[..., None].expand(-1, -1, 2))
            if uniform_points is not None:
                points = torch.cat([points, uniform_points], dim=1)  # (L*N, P, 2)
            point_labels = _sample(targets, points)[:, 0]  # (L*N, P)
        point_logits = _sample(predicted, points)[:, 0]  # (L*N, P)
        bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(1)
        probabilities = point_logits.sigmoid()
        dice = 1 - (2 * (probabilities * point_labels).sum(-1) + 1) / (
            probabilities.sum(-1) + point_labels.sum(-1) + 1)
        mask_loss = bce.view(layers, matched).sum(1) / num_masks
        dice_loss = dice.view(layers, matched).sum(1) / num_masks
    else:  # no target in the batch: zero mask terms that still reach every mask logit
        mask_loss = dice_loss = masks.flatten(1).sum(1) * 0.0

    losses: dict[str, Tensor] = {}
    for position in range(layers):
        suffix = "" if position == 0 else f"_{position - 1}"
        losses[f"loss_mask{suffix}"] = mask_loss[position] * weight_dict["loss_mask"]
        losses[f"loss_dice{suffix}"] = dice_loss[position] * weight_dict["loss_dice"]
        losses[f"loss_cross_entropy{suffix}"] = cross_entropy[position] * weight_dict["loss_cross_entropy"]
    return losses
