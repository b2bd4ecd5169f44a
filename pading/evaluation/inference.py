"""Mask2Former post-processing with any classifier (docs/method.md "Inference").

Inputs per image: ``mask_logits`` (Q, H, W), already at the output size (see
:func:`pading.model.segmenter.postprocess_mask_logits`), as a tensor or as an
:class:`~pading.model.segmenter.OriginalSizeMaskLogits` that resizes only the queries a task
uses, and ``class_logits`` (Q, C+1) from the classifier in use, whose C columns follow ``table``
(which may hold more classes than the segmenter was pretrained with). p_q =
softmax(class_logits_q), m_q = sigmoid(mask_logits_q).

Outputs are NumPy arrays on the CPU (ready for PNG/JSON writing and the evaluators).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from pading.classes import SEMANTIC_IGNORE_LABEL, ClassTable
from pading.config import InferenceConfig
from pading.errors import ConfigError, DataError

if TYPE_CHECKING:
    from pading.model.segmenter import OriginalSizeMaskLogits

__all__ = [
    "semantic_inference",
    "semantic_to_label_map",
    "panoptic_inference",
    "instance_inference",
    "instances_to_coco_results",
    "panoptic_to_rgb",
    "rgb_to_ids",
]

MASK_SCORE_EPS = 1e-6  # guards the mean mask probability of an empty mask
RGB_BASE = 256  # panoptic PNG ids: id = R + 256 G + 256² B


#: (Q, H, W) mask logits: a tensor, or one that makes only the rows asked for.
MaskLogits = Union[Tensor, "OriginalSizeMaskLogits"]


def _class_probabilities(mask_logits: MaskLogits, class_logits: Tensor, table: ClassTable) -> Tensor:
    """Validated (Q, C+1) class probabilities."""
    if mask_logits.dim() != 3 or class_logits.dim() != 2 or mask_logits.shape[0] != class_logits.shape[0]:
        raise DataError(
            "predictions",
            f"expected mask logits (Q, H, W) and class logits (Q, C+1), got {tuple(mask_logits.shape)} "
            f"and {tuple(class_logits.shape)}",
        )
    if class_logits.shape[1] != table.num_classes + 1:
        raise ConfigError(
            f"the classifier gives {class_logits.shape[1] - 1} classes + no object but the class table "
            f"has {table.num_classes} classes"
        )
    return class_logits.float().softmax(-1)


def _mask_probabilities(mask_logits: MaskLogits, index: Optional[Tensor] = None) -> Tensor:
    """(len(index), H, W) mask probabilities of the queries ``index`` (1-D long; None: all)."""
    if isinstance(mask_logits, Tensor):
        logits = mask_logits if index is None else mask_logits[index]
    else:
        logits = mask_logits.rows(index)
    return logits.float().sigmoid()


@torch.no_grad()
def semantic_inference(mask_logits: MaskLogits, class_logits: Tensor, *, table: ClassTable) -> np.ndarray:
    """(H, W) int64 class indices: argmax_c Σ_q p_q[c] · m_q (no-object column dropped)."""
    class_probs = _class_probabilities(mask_logits, class_logits, table)
    mask_probs = _mask_probabilities(mask_logits)
    probs = class_probs[:, :-1]  # (Q, C)
    if probs.shape[1] <= SEMANTIC_DENSE_CLASSES:
        scores = torch.einsum("qc,qhw->chw", probs, mask_probs)  # (C, H, W)
        _, labels = _leading_max(scores.shape[0], lambda c: scores[c])  # = scores.argmax(0)
        return labels.cpu().numpy().astype(np.int64)
    return _semantic_large_vocabulary(probs, mask_probs).cpu().numpy().astype(np.int64)


#: Up to this many classes the (C, H, W) score volume is built at once; above it,
#: :func:`_semantic_large_vocabulary` avoids it (10,000 classes x 640x480 would be 12 GB).
SEMANTIC_DENSE_CLASSES = 256
_SEMANTIC_CHUNK = 512


def _semantic_large_vocabulary(probs: Tensor, mask_probs: Tensor) -> Tensor:
    """The exact argmax_c Σ_q p_qc m_q(x) for a large vocabulary, in (H, W).

    Score only the K = SEMANTIC_DENSE_CLASSES classes of largest mass M_c = Σ_q p_qc first.
    Any other class c has s_c(x) <= M_c · max_q m_q(x) <= M_(K+1) · max_q m_q(x), so a pixel
    whose best candidate score beats that bound is decided; the (usually few) others are
    scored against every class in chunks. Same labels as the dense volume (docs/method.md
    "Inference")."""
    masks = mask_probs.flatten(1)  # (Q, P)
    mass = probs.sum(0)  # (C,)
    order = mass.argsort(descending=True)
    chosen = order[:SEMANTIC_DENSE_CLASSES].sort().values
    candidates = probs[:, chosen].t() @ masks  # (K, P)
    best, index = _leading_max(candidates.shape[0], lambda k: candidates[k])  # = candidates.max(0), (P,)
    labels = chosen[index]
    bound = mass[order[SEMANTIC_DENSE_CLASSES]] * masks.max(0).values
    undecided = torch.nonzero(best <= bound).squeeze(1)
    if undecided.numel():
        sub = masks[:, undecided]  # (Q, U)
        top = torch.full((sub.shape[1],), -1.0, dtype=sub.dtype, device=sub.device)
        arg = torch.zeros(sub.shape[1], dtype=torch.long, device=sub.device)
        for start in range(0, probs.shape[1], _SEMANTIC_CHUNK):
            values, where = (probs[:, start:start + _SEMANTIC_CHUNK].t() @ sub).max(0)
            better = values > top  # strict: the lowest index wins ties, as argmax does
            top, arg = torch.where(better, values, top), torch.where(better, where + start, arg)
        labels[undecided] = arg
    return labels.view(mask_probs.shape[1:])


def semantic_to_label_map(index_map: np.ndarray, table: ClassTable) -> np.ndarray:
    """Class indices (H, W) -> COCO-Stuff label PNG values (H, W) uint8: category_id - 1,
    255 where the index is not a class (negative or >= C)."""
    ids = np.asarray(table.ids, dtype=np.int64)
    if ids.size and (ids.min() < 1 or ids.max() > SEMANTIC_IGNORE_LABEL):
        raise ConfigError(
            f"semantic label PNGs hold category_id - 1 in [0, {SEMANTIC_IGNORE_LABEL - 1}]; "
            f"the class table has ids from {ids.min()} to {ids.max()}"
        )
    index_map = np.asarray(index_map)
    valid = (index_map >= 0) & (index_map < table.num_classes)
    labels = np.full(index_map.shape, SEMANTIC_IGNORE_LABEL, dtype=np.uint8)
    labels[valid] = (ids[index_map[valid]] - 1).astype(np.uint8)
    return labels


def _leading_max(count: int, plane: Callable[[int], Tensor]) -> tuple[Tensor, Tensor]:
    """The maximum over k of ``plane(k)`` (``count`` tensors of one shape) and the first k
    that reaches it, per element: ``torch.stack(planes).max(0)``, computed as a running
    maximum over k.

    The same values and indices (the first index wins ties; the probabilities are never NaN),
    2-8x faster on CPU at 640x480: torch's max and argmax over the leading dimension of a
    (K, H, W) tensor do not vectorise there. In the panoptic merge it was half of the
    endpoint's whole per-image time at that size, in the semantic answer 52 of its 93 ms
    (docs/performance.md)."""
    best = plane(0).clone()
    owner = torch.zeros(best.shape, dtype=torch.long, device=best.device)
    for k in range(1, count):
        value = plane(k)
        owner.masked_fill_(value > best, k)  # strict: an earlier k keeps a tie
        torch.maximum(best, value, out=best)
    return best, owner


def _first_argmax(scores: Tensor, masks: Tensor) -> Tensor:
    """``(scores[:, None, None] * masks).argmax(0)``: for each pixel the first k of largest
    score_k · m_k(x), (K, H, W) -> (H, W) int64, without the (K, H, W) product."""
    return _leading_max(masks.shape[0], lambda k: scores[k] * masks[k])[1]


@torch.no_grad()
def panoptic_inference(
    mask_logits: MaskLogits,
    class_logits: Tensor,
    *,
    table: ClassTable,
    config: Optional[InferenceConfig] = None,
) -> tuple[np.ndarray, list[dict]]:
    """Mask2Former's panoptic merge.

    Keeps queries whose top class is not "no object" and whose probability exceeds
    ``object_mask_threshold``; assigns each pixel to the kept query maximising score · m_q;
    drops a query when its kept area / its own area (m_q >= ``mask_threshold``) is below
    ``overlap_threshold``; stuff queries of one class merge into one segment.

    Returns:
        segment_ids: (H, W) int32, 0 = void, segments numbered from 1.
        segments: dicts ``id, category_id, class_index, isthing, score, area``.
    """
    config = config or InferenceConfig()
    class_probs = _class_probabilities(mask_logits, class_logits, table)
    scores, labels = class_probs.max(-1)  # (Q,), (Q,)
    keep = torch.nonzero((labels != table.no_object_index) & (scores > config.object_mask_threshold)).squeeze(1)
    kept_scores, kept_labels = scores[keep], labels[keep]  # (K,), (K,)
    kept_masks = _mask_probabilities(mask_logits, keep)  # (K, H, W): only the kept queries' maps
    segment_ids = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device)  # (H, W)
    segments: list[dict] = []
    if kept_masks.shape[0] > 0:
        owner = _first_argmax(kept_scores, kept_masks)  # (H, W)
        stuff_segment_of_class: dict[int, dict] = {}
        for k in range(kept_masks.shape[0]):
            class_index = int(kept_labels[k])
            isthing = bool(table[class_index].isthing)
            own = kept_masks[k] >= config.mask_threshold  # (H, W)
            won = owner == k
            won_area = int(won.sum())
            own_area = int(own.sum())
            mask = won & own
            area = int(mask.sum())
            if won_area == 0 or own_area == 0 or area == 0:
                continue
            if won_area / own_area < config.overlap_threshold:
                continue
            score = float(kept_scores[k])
            if not isthing and class_index in stuff_segment_of_class:
                merged = stuff_segment_of_class[class_index]
                segment_ids[mask] = merged["id"]
                merged["area"] += area
                merged["score"] = max(merged["score"], score)
                continue
            segment = {
                "id": len(segments) + 1,
                "category_id": int(table[class_index].id),
                "class_index": class_index,
                "isthing": isthing,
                "score": score,
                "area": area,
            }
            segment_ids[mask] = segment["id"]
            segments.append(segment)
            if not isthing:
                stuff_segment_of_class[class_index] = segment
    return segment_ids.cpu().numpy(), segments


@torch.no_grad()
def instance_inference(
    mask_logits: MaskLogits,
    class_logits: Tensor,
    *,
    table: ClassTable,
    config: Optional[InferenceConfig] = None,
) -> list[dict]:
    """Top-``instance_top_k`` (query, thing class) pairs by class probability.

    mask = m_q > ``mask_threshold``; score = p_q[c] × mean of m_q inside the mask.
    Returns dicts ``category_id, class_index, score, query, mask (H, W) bool`` sorted by
    score, highest first; the pairs of one query share one mask array.
    """
    config = config or InferenceConfig()
    class_probs = _class_probabilities(mask_logits, class_logits, table)
    thing_indices = torch.as_tensor(table.thing_indices, dtype=torch.long, device=class_probs.device)
    if thing_indices.numel() == 0:
        return []
    pair_probs = class_probs[:, thing_indices]  # (Q, T)
    num_things = thing_indices.numel()
    top_k = min(config.instance_top_k, pair_probs.numel())
    top_probs, flat_index = pair_probs.flatten().topk(top_k)  # (k,), (k,)
    query_index = flat_index // num_things
    class_index = thing_indices[flat_index % num_things]
    # A query pairs with several classes (the demo's 100 pairs come from its 16 queries): its
    # mask and mean probability are computed once, at the original size only for these queries.
    queries, row = query_index.unique(return_inverse=True)  # (U,), (k,)
    query_mask_probs = _mask_probabilities(mask_logits, queries)  # (U, H, W)
    query_masks = query_mask_probs > config.mask_threshold  # (U, H, W)
    mask_probs_inside = (query_mask_probs * query_masks).flatten(1).sum(1)  # (U,)
    mean_mask_prob = mask_probs_inside / (query_masks.flatten(1).sum(1) + MASK_SCORE_EPS)
    scores = top_probs * mean_mask_prob[row]  # (k,)
    order = scores.argsort(descending=True, stable=True)
    masks_np = query_masks.cpu().numpy()
    return [
        {
            "category_id": int(table[int(class_index[i])].id),
            "class_index": int(class_index[i]),
            "score": float(scores[i]),
            "query": int(query_index[i]),
            "mask": masks_np[int(row[i])],  # the same array for every pair of one query
        }
        for i in order.tolist()
    ]


def instances_to_coco_results(instances: list[dict], image_id: int) -> list[dict]:
    """COCO results entries (``image_id, category_id, segmentation`` as RLE with str
    counts, ``bbox`` XYWH, ``score``) for :func:`instance_inference` output (a query's mask is
    encoded once for all its classes)."""
    results = []
    encoded: dict = {}
    for instance in instances:
        query = instance.get("query")
        if query is None or query not in encoded:
            rle = mask_utils.encode(np.asfortranarray(instance["mask"].astype(np.uint8)))
            bbox = [float(v) for v in mask_utils.toBbox(rle).tolist()]
            rle["counts"] = rle["counts"].decode("ascii")
            encoded[query] = rle, bbox
        rle, bbox = encoded[query]
        results.append(
            {
                "image_id": int(image_id),
                "category_id": int(instance["category_id"]),
                "segmentation": dict(rle),
                "bbox": list(bbox),
                "score": float(instance["score"]),
            }
        )
    return results


def panoptic_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 COCO panoptic PNG colours (id = R + 256 G + 256² B)."""
    ids = np.asarray(segment_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= RGB_BASE**3):
        raise DataError("segment_ids", f"ids must lie in [0, {RGB_BASE ** 3}), got {ids.min()}..{ids.max()}")
    channels = [(ids // RGB_BASE**power) % RGB_BASE for power in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic PNG colours -> (H, W) int64 ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise DataError("panoptic png", f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + RGB_BASE * rgb[..., 1] + RGB_BASE**2 * rgb[..., 2]
