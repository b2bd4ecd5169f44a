"""The generator-side objective of one step, as this worker's share of the global batch.

L = L_G + aux·L_cls + λ·[w1·(L_align + u·L_unrel) + w2·r·L_rel + w3·L_rec]
(docs/method.md "Losses"; the ablation variant in :class:`~pading.config.LossConfig`).

Every term T is a sum over rows divided by a global count, so with W workers each worker
computes only its own rows' part s_r of every term, against the columns gathered from all
workers (the way a sharded contrastive loss is computed): T = Σ_r s_r. The total is a
non-linear function L = f(T_1, ..., T_k) of the terms (the square root of the MMD, the mean
over the groups present), so a worker back-propagates Σ_t ∂f/∂T_t · s_{r,t}, with the
derivatives taken at the global terms; the gradients of those surrogates, summed over the
workers, are exactly the gradient of L (docs/architecture.md, "Distributed training").

The gradient that crosses workers flows through the gathered columns. They enter the loss as
leaves; after the local backward their gradients are summed over the workers in one
all-reduce (every worker calls it, whatever its row count) and each worker pushes the slice of
its own rows back into its own graph. With one worker the gather is the identity and the same
code gives the plain gradient.

Memory: the relation network runs in blocks of at most ``losses.chunk_size`` (row, column)
pairs, and the alignment KL and the MMD kernels in row blocks of the same number of floats
(:func:`matrix_block_pairs`), all recomputed in the backward pass (:mod:`pading.model.losses`),
so no (samples x classes x D) tensor exists at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pading.config import LossConfig
from pading.errors import ConfigError, DataError
from pading.model.losses import (
    ALIGNMENT_SEEN_SOURCES,
    Disentangler,
    mmd_squared_sum,
    relationship_kl_sum,
)
from pading.training.distributed import LocalCollective

#: The global terms, in the order of the all-reduced vector.
TERMS = ("mmd_squared", "classification", "align_seen", "align_unseen", "align_cross", "unrelated_seen",
         "unrelated_unseen", "relation_seen", "relation_unseen", "reconstruction_seen", "reconstruction_unseen")
#: The terms :meth:`PadingLoss.forward` reports (``generator/<name>`` in the training history).
REPORTED = ("mmd", "classification", "alignment", "unrelated", "relation", "reconstruction", "total")
#: Floats of the relation network's hidden layer alive per chunk pair (forward sum, ReLU, gradient, mask).
RELATION_COPIES = 4
#: ``losses.chunk_size: 0`` (auto): pairs per relation block on the CPU (a block's (pairs, D) hidden layer
#: stays in cache: 4,096 was 2.4x faster than 65,536 at D = 256, benchmarks/generator_scaling.py) and on a GPU.
AUTO_CHUNK_CPU = 4096
AUTO_CHUNK_GPU = 1 << 20


def resolve_chunk_size(chunk_size: int, device: torch.device) -> int:
    """Pairs per relation-network block: ``chunk_size``, or the device's default when it is 0."""
    if chunk_size:
        return int(chunk_size)
    return AUTO_CHUNK_GPU if torch.device(device).type == "cuda" else AUTO_CHUNK_CPU


@dataclass
class LossInputs:
    """One worker's rows of a step, and what the step ranges over.

    Seen rows are matched queries of seen classes: ``real_seen`` and ``synthetic_seen`` (n, D)
    with their table class indices ``seen_labels`` (n,). Unseen rows are one synthetic sample
    per class of the step's unseen set that this worker holds: ``synthetic_unseen`` (u, D).

    Class embeddings: ``class_embeddings`` (P, D) are the projected embeddings ã of the step's
    classes; ``seen_positions`` (n,) and ``unseen_positions`` (u,) are the rows' places in it.
    The relation scores of a seen row range over ``seen_candidates`` (positions; None = all P),
    those of an unseen row over ``unseen_candidates`` (the step's whole unseen set).

    Globals: ``num_seen_total`` / ``num_unseen_total`` are the rows of all workers; the terms
    are divided by them. ``seen_positions_total`` (N,) are every worker's seen positions in rank
    order and ``seen_rows_per_worker`` / ``unseen_rows_per_worker`` the row counts in rank
    order (gathered when None). With ``class_rows_per_worker`` set, ``class_embeddings`` is
    this worker's slice of the (P, D) rows (they are gathered, and their gradient returned to the
    workers that projected them). ``unrelated_noise_*`` (rows, D) is ε of L_unrel for these rows
    (drawn when None). ``classify`` maps (n, D) -> (n, C+1) logits for the auxiliary loss (None: off).
    """

    real_seen: torch.Tensor
    synthetic_seen: torch.Tensor
    seen_labels: torch.Tensor
    seen_positions: torch.Tensor
    synthetic_unseen: torch.Tensor
    unseen_positions: torch.Tensor
    unseen_candidates: torch.Tensor
    class_embeddings: torch.Tensor
    num_seen_total: int
    num_unseen_total: int
    seen_candidates: Optional[torch.Tensor] = None
    seen_positions_total: Optional[torch.Tensor] = None
    seen_rows_per_worker: Optional[list[int]] = None
    unseen_rows_per_worker: Optional[list[int]] = None
    class_rows_per_worker: Optional[list[int]] = None
    classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    unrelated_noise_seen: Optional[torch.Tensor] = None
    unrelated_noise_unseen: Optional[torch.Tensor] = None


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy that collects its own gradient (the cut between two backward passes)."""
    return tensor.detach().requires_grad_(tensor.requires_grad)


def _positions_in(positions: torch.Tensor, candidates: torch.Tensor, size: int, source: str) -> torch.Tensor:
    """Where each of ``positions`` (n,) sits in ``candidates`` (M,), through a (size,) lookup."""
    lookup = torch.full((size,), -1, dtype=torch.long, device=candidates.device)
    lookup[candidates] = torch.arange(candidates.numel(), device=candidates.device)
    found = lookup[positions]  # (n,)
    if bool((found < 0).any()):
        raise DataError(source, f"classes at positions {positions[found < 0].tolist()[:10]} are not among the "
                                "relation candidates")
    return found


class _Columns:
    """Gathers column tensors from every worker as leaves and, after the local backward, sends
    each worker the summed gradient of its own rows (one all-reduce for every group)."""

    def __init__(self, collective: LocalCollective):
        self.collective = collective
        self.groups: list[tuple[list[torch.Tensor], list[torch.Tensor], int]] = []

    def gather(self, *local: torch.Tensor, sizes: Optional[list[int]] = None) -> list[torch.Tensor]:
        """Gather tensors with the same rows on this worker (packed along dim 1, one gather);
        ``sizes``: every worker's row count in rank order, if known."""
        widths = [t.shape[1] for t in local]
        packed = torch.cat([t.detach() for t in local], dim=1)
        sizes = list(sizes) if sizes is not None else self.collective.row_counts(packed.shape[0])
        gathered = self.collective.gather(packed, sizes=sizes)  # (N_total, Σ widths)
        offset = sum(sizes[: self.collective.rank])
        leaves = [_leaf_like(part, source) for part, source in zip(gathered.split(widths, dim=1), local)]
        self.groups.append((list(local), leaves, offset))
        return leaves

    def backward(self) -> None:
        """All-reduce every leaf's gradient and back-propagate this worker's rows of it."""
        if not self.groups:
            return
        # a leaf whose source needs no gradient (the real columns) is left out: the same on every worker
        pairs = [(source, leaf, offset) for local, leaves, offset in self.groups
                 for source, leaf in zip(local, leaves) if leaf.requires_grad]
        if not pairs:
            return
        flat = [(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).reshape(-1) for _, leaf, _ in pairs]
        summed = self.collective.all_reduce_sum(torch.cat(flat))
        targets, gradients, start = [], [], 0
        for source, leaf, offset in pairs:
            gradient = summed[start:start + leaf.numel()].view_as(leaf)
            start += leaf.numel()
            if source.shape[0]:
                targets.append(source)
                gradients.append(gradient[offset:offset + source.shape[0]])
        if targets:
            torch.autograd.backward(targets, gradients)


def _leaf_like(part: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return part.contiguous().requires_grad_(source.requires_grad)


class LossResult:
    """A step's objective: the global ``terms`` (floats) and :meth:`backward`."""

    def __init__(self, terms: dict[str, float], surrogate: torch.Tensor, columns: _Columns,
                 boundary: list[tuple[torch.Tensor, torch.Tensor]]):
        self.terms = terms
        self._surrogate = surrogate
        self._columns = columns
        self._boundary = boundary

    def backward(self) -> None:
        """Accumulate this worker's share of ∂L/∂θ into ``.grad`` (sum over workers = ∂L/∂θ).

        Every worker must call it (the column gradients are all-reduced)."""
        if self._surrogate.requires_grad:
            self._surrogate.backward(retain_graph=True)
        self._columns.backward()
        sources = [(source, leaf.grad) for source, leaf in self._boundary
                   if source.requires_grad and leaf.grad is not None]
        if sources:
            torch.autograd.backward([s for s, _ in sources], [g for _, g in sources])


def _sum_or_zero(value: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return value if value is not None else like.new_zeros(())


class PadingLoss(nn.Module):
    """The generator-side objective for one step; holds the :class:`~pading.model.losses.Disentangler`.

    Variants (``LossConfig.variant``): ``gmmn``/``primitive`` use L_G + aux·L_cls only;
    ``alignment`` adds λ·w1·L_align on raw features (h = x); ``full`` adds alignment on
    h = E_r(x) plus the disentanglement terms. ``projection`` has no generator and is rejected.
    """

    def __init__(self, config: LossConfig, embed_dim: int):
        super().__init__()
        if config.variant == "projection":
            raise ConfigError("losses.variant=projection trains no generator, so it has no generator loss")
        if config.alignment_seen_features not in ALIGNMENT_SEEN_SOURCES:
            raise ConfigError(
                f"losses.alignment_seen_features must be one of {ALIGNMENT_SEEN_SOURCES}, "
                f"not {config.alignment_seen_features!r}"
            )
        self.config = config
        self.embed_dim = embed_dim
        self.uses_alignment = config.variant in ("alignment", "full")
        self.uses_disentanglement = config.variant == "full"
        self.disentangler = (
            Disentangler(embed_dim, dropout=config.disentangler_dropout) if self.uses_disentanglement else None
        )

    def forward(self, inputs: LossInputs, collective: Optional[LocalCollective] = None) -> LossResult:
        """This worker's share of the objective (module docstring).

        Every worker of a step must call it with the same globals and the same collective.
        Returns:
            a :class:`LossResult`: ``terms`` are the global values of ``mmd``, ``classification``,
            ``alignment``, ``unrelated``, ``relation``, ``reconstruction`` and ``total``
            (disabled terms 0.0); ``backward()`` accumulates the gradients.
        """
        collective = collective or LocalCollective()
        cfg = self.config
        pairs = resolve_chunk_size(cfg.chunk_size, inputs.synthetic_seen.device)
        chunk = matrix_block_pairs(pairs, self.embed_dim, len(cfg.mmd_sigmas_squared))
        n_total, u_total = int(inputs.num_seen_total), int(inputs.num_unseen_total)
        if n_total < 1:
            raise DataError("PadingLoss", "the step has no matched seen query on any worker")
        synthetic_seen = _leaf(inputs.synthetic_seen)  # (n, D): the cut at the generator output
        synthetic_unseen = _leaf(inputs.synthetic_unseen)  # (u, D)
        boundary = [(inputs.synthetic_seen, synthetic_seen), (inputs.synthetic_unseen, synthetic_unseen)]
        columns = _Columns(collective)
        shares: dict[str, torch.Tensor] = {}
        ã = inputs.class_embeddings  # (P, D)
        if inputs.class_rows_per_worker is not None:  # projected in slices: gather them
            ã, = columns.gather(ã, sizes=inputs.class_rows_per_worker)

        seen_features = synthetic_seen if cfg.alignment_seen_features == "synthetic" else inputs.real_seen
        related_seen, related_unseen = seen_features, synthetic_unseen  # h = x without disentanglement
        if self.uses_disentanglement:
            related_seen = self._disentangle(seen_features, inputs.seen_positions, inputs.seen_candidates, ã,
                                             inputs.unrelated_noise_seen, n_total, "seen", shares, pairs)
            if u_total:
                related_unseen = self._disentangle(synthetic_unseen, inputs.unseen_positions,
                                                   inputs.unseen_candidates, ã, inputs.unrelated_noise_unseen,
                                                   u_total, "unseen", shares, pairs)
        # one gather of the seen columns: real and synthetic (MMD) and the alignment's related features
        separate_related = self.uses_alignment and related_seen is not synthetic_seen
        seen_local = [inputs.real_seen, synthetic_seen] + ([related_seen] if separate_related else [])
        seen_columns = columns.gather(*seen_local, sizes=inputs.seen_rows_per_worker)
        real_columns, synthetic_columns = seen_columns[0], seen_columns[1]

        shares["mmd_squared"] = mmd_squared_sum(synthetic_seen, inputs.real_seen, synthetic_columns, real_columns,
                                                cfg.mmd_sigmas_squared, chunk_size=chunk)
        if inputs.classify is not None and cfg.auxiliary_classification_weight > 0:
            logits = inputs.classify(synthetic_seen)  # (n, C+1)
            shares["classification"] = F.cross_entropy(logits, inputs.seen_labels, reduction="sum") / n_total

        if self.uses_alignment:
            seen_related_columns = seen_columns[2] if separate_related else synthetic_columns
            seen_semantic = ã[inputs.seen_positions]  # (n, D)
            positions_total = inputs.seen_positions_total
            if positions_total is None:
                positions_total = collective.gather(inputs.seen_positions)
            seen_columns_semantic = ã[positions_total]  # (N, D)
            kl = dict(temperature=cfg.alignment_temperature, chunk_size=chunk)
            shares["align_seen"] = relationship_kl_sum(related_seen, seen_semantic, seen_related_columns,
                                                       seen_columns_semantic, **kl) / (n_total * n_total)
            if u_total:
                unseen_related_columns, = columns.gather(related_unseen, sizes=inputs.unseen_rows_per_worker)
                unseen_semantic = ã[inputs.unseen_positions]  # (u, D)
                unseen_columns_semantic = ã[inputs.unseen_candidates]  # (U, D): the unseen set in rank order
                shares["align_unseen"] = relationship_kl_sum(related_unseen, unseen_semantic, unseen_related_columns,
                                                             unseen_columns_semantic, **kl) / (u_total * u_total)
                shares["align_cross"] = relationship_kl_sum(related_seen, seen_semantic, unseen_related_columns,
                                                            unseen_columns_semantic, **kl) / (n_total * u_total)

        like = synthetic_columns
        vector = torch.stack([_sum_or_zero(shares.get(name), like) for name in TERMS])  # (k,) this worker's shares
        totals = collective.all_reduce_sum(vector.detach())  # (k,) the global terms
        leaf = totals.clone().requires_grad_(True)
        total = self._combine(dict(zip(TERMS, leaf)), n_total, u_total)
        (coefficients,) = torch.autograd.grad(total["total"], leaf)  # ∂f/∂T_t at the global terms
        surrogate = (coefficients * vector).sum()
        terms = {name: float(value.detach()) for name, value in total.items()}
        return LossResult(terms, surrogate, columns, boundary)

    def _disentangle(self, features, positions, candidates, ã, noise, count_total, group, shares, chunk):
        """E_r/E_u of this worker's rows of ``group`` and their L_rec, L_unrel and L_rel shares
        (relation blocks of ``chunk`` pairs); returns the related features h (rows, D)."""
        cfg = self.config
        related, unrelated = self.disentangler(features)  # (rows, D) each
        reconstructed = self.disentangler.decoder(torch.cat([related, unrelated], dim=1))  # (rows, D)
        elements = count_total * self.embed_dim
        shares[f"reconstruction_{group}"] = (reconstructed - features).abs().sum() / elements
        if noise is None:
            noise = torch.randn_like(unrelated)
        log_target = F.log_softmax(noise / cfg.unrelated_temperature, dim=1)
        log_input = F.log_softmax(unrelated / cfg.unrelated_temperature, dim=1)
        shares[f"unrelated_{group}"] = (log_target.exp() * (log_target - log_input)).sum() / elements
        if candidates is None:  # seen rows against every class of the step
            scores = self.disentangler.relation_scores(related, ã, chunk)  # (rows, P)
            targets = positions
        else:
            scores = self.disentangler.relation_scores(related, ã[candidates], chunk)  # (rows, M)
            targets = _positions_in(positions, candidates, ã.shape[0], f"PadingLoss {group} relation")
        shares[f"relation_{group}"] = F.cross_entropy(scores, targets, reduction="sum") / count_total
        return related

    def _combine(self, t: dict[str, torch.Tensor], n_total: int, u_total: int) -> dict[str, torch.Tensor]:
        """The loss and its reported terms from the global terms ``t`` (differentiable in ``t``)."""
        cfg = self.config
        mmd = t["mmd_squared"].clamp_min(1e-12).sqrt()
        zero = mmd.new_zeros(())
        out = {"mmd": mmd, "classification": t["classification"], "alignment": zero, "unrelated": zero,
               "relation": zero, "reconstruction": zero}
        total = mmd + cfg.auxiliary_classification_weight * t["classification"]
        if self.uses_alignment:
            groups = ["seen"] + (["unseen"] if u_total else [])
            aligned = [t["align_seen"]] + ([t["align_unseen"], t["align_cross"]] if u_total else [])
            out["alignment"] = torch.stack(aligned).mean()
            if self.uses_disentanglement:
                for name in ("unrelated", "relation", "reconstruction"):
                    out[name] = torch.stack([t[f"{name}_{g}"] for g in groups]).mean()
            regulariser = (cfg.alignment_weight * (out["alignment"] + cfg.unrelated_weight * out["unrelated"])
                           + cfg.relation_weight * cfg.relation_scale * out["relation"]
                           + cfg.reconstruction_weight * out["reconstruction"])
            total = total + cfg.disentangle_weight * regulariser
        out["total"] = total
        return out


def matrix_block_pairs(relation_pairs: int, embed_dim: int, num_sigmas: int) -> int:
    """Pairs per block of the alignment KL and the MMD kernels: a pair there costs no D, but
    autograd keeps about ``3 + num_sigmas`` floats of it (an MMD kernel per bandwidth), so the
    block holds as many floats as a relation block of ``relation_pairs`` pairs."""
    return max(1, relation_pairs * embed_dim * RELATION_COPIES // (3 + num_sigmas))


def relation_chunk_bytes(chunk_size: int, embed_dim: int, element_bytes: int = 4) -> int:
    """Bytes of the relation network's live hidden-layer copies for one chunk of pairs."""
    return RELATION_COPIES * chunk_size * embed_dim * element_bytes
