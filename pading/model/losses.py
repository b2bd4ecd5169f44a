"""Generator-side loss terms (docs/method.md "Losses"), computed in bounded memory.

- :func:`mmd_loss`: multi-kernel maximum mean discrepancy L_G.
- :func:`relationship_kl` / :func:`relationship_alignment_loss` / :func:`composed_alignment_loss`:
  KL between the row-softmaxed semantic and visual similarity matrices (intra- and inter-group).
- :class:`Disentangler`: semantic-related / -unrelated encoders, decoder and relation
  network, with :meth:`Disentangler.reconstruction_loss`, :func:`unrelated_noise_loss`
  and :func:`relation_loss`.

Every batch-global term is a sum over rows, so it is computed in row blocks (and the relation
network in (row, column) blocks) of at most ``chunk_size`` pairs, and a block's activations are
recomputed in the backward pass instead of being kept (:func:`chunked_row_sum`, the custom
autograd function behind :class:`RelationNetwork`): memory grows with the rows and columns,
never with rows x columns x D (docs/method.md, "Large vocabularies"). The ``*_sum`` functions
return the un-normalised sum over their rows, the form the sharded objective
(:mod:`pading.training.objective`) adds up across workers; the classic mean-valued functions
are built on them. The total loss lives in :class:`pading.training.objective.PadingLoss`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pading.errors import DataError
from pading.model.dropout import Dropout

#: Seen features the alignment/disentanglement terms use (``LossConfig.alignment_seen_features``).
ALIGNMENT_SEEN_SOURCES = ("synthetic", "real")
#: Chunk size meaning "one chunk" (the classic dense computation).
UNCHUNKED = 2**62


# ---- chunking -----------------------------------------------------------------------------


def row_blocks(num_rows: int, num_columns: int, chunk_size: Optional[int]) -> list[slice]:
    """Row slices of at most ``chunk_size`` (row, column) pairs each (at least one row)."""
    rows = max(1, (chunk_size or UNCHUNKED) // max(1, num_columns))
    return [slice(start, min(start + rows, num_rows)) for start in range(0, num_rows, rows)] or [slice(0, 0)]


def chunked_row_sum(
    function: Callable[..., torch.Tensor],
    row_tensors: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    num_columns: int,
    chunk_size: Optional[int],
) -> torch.Tensor:
    """Σ over row blocks of ``function(*row_block_tensors, *shared)`` (a scalar per block).

    With more than one block, each block runs under activation checkpointing: its (rows x
    columns) intermediates are freed after the forward and recomputed in the backward, so
    memory holds one block at a time. One block is computed directly (same numbers).
    """
    blocks = row_blocks(int(row_tensors[0].shape[0]), num_columns, chunk_size)
    if len(blocks) == 1:
        return function(*row_tensors, *shared)
    total = None
    for block in blocks:
        part = checkpoint(function, *[t[block] for t in row_tensors], *shared, use_reentrant=False)
        total = part if total is None else total + part
    return total


# ---- MMD --------------------------------------------------------------------------------


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances (clamped at 0)."""
    x_norm = (x * x).sum(dim=1, keepdim=True)  # (N, 1)
    y_norm = (y * y).sum(dim=1, keepdim=True)  # (M, 1)
    return (x_norm + y_norm.t() - 2.0 * x @ y.t()).clamp_min(0.0)  # (N, M)


def _kernel_sum(rows: torch.Tensor, columns: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Σ_ij Σ_σ exp(−scale_σ ‖r_i − c_j‖²) for (r, D) rows and (M, D) columns."""
    distances = _squared_distances(rows, columns)  # (r, M)
    return sum(torch.exp(-scale * distances).sum() for scale in scales)


def mmd_squared_sum(
    rows_x: torch.Tensor,
    rows_y: torch.Tensor,
    columns_x: torch.Tensor,
    columns_y: torch.Tensor,
    sigmas_squared: Sequence[float],
    *,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The rows' share of Σ_σ MMD²_σ between the sets X = ``columns_x`` and Y = ``columns_y``.

    Σ_σ [Σ_{i∈rows} Σ_j k(x_i, x_j) / N² + Σ_{i∈rows} Σ_j k(y_i, y_j) / M² − 2 Σ_{i∈rows} Σ_j k(x_i, y_j) / (N·M)]:
    summed over a partition of X's rows (``rows_x``) and Y's rows (``rows_y``) this is Σ_σ MMD²_σ.
    The Y×Y part (real embeddings, constants) is computed without a gradient.

    Args:
        rows_x: (n, D) this share's rows of X; rows_y: (m, D) its rows of Y.
        columns_x: (N, D) all of X; columns_y: (M, D) all of Y.
        sigmas_squared: the kernel bandwidths σ².
        chunk_size: (row, column) pairs per block (None: one block).
    """
    scales = tuple(1.0 / (2.0 * float(s)) for s in sigmas_squared)
    big_n, big_m = int(columns_x.shape[0]), int(columns_y.shape[0])

    def x_part(rows):
        return (_kernel_sum(rows, columns_x, scales) / (big_n * big_n)
                - 2.0 * _kernel_sum(rows, columns_y, scales) / (big_n * big_m))

    total = chunked_row_sum(x_part, [rows_x], [], big_n + big_m, chunk_size) if rows_x.shape[0] else columns_x.sum() * 0
    if rows_y.shape[0]:
        with torch.no_grad():  # constants: only the value matters (the square root's derivative)
            yy = sum(_kernel_sum(rows_y[block], columns_y, scales)
                     for block in row_blocks(int(rows_y.shape[0]), big_m, chunk_size))
        total = total + yy / (big_m * big_m)
    return total


def mmd_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas_squared: Sequence[float],
    *,
    min_squared: float = 1e-12,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Multi-kernel MMD: sqrt(Σ_σ MMD²_σ) with Gaussian kernels exp(−‖f−f'‖² / (2σ²)).

    MMD²_σ = mean k(x, x) + mean k(y, y) − 2 mean k(x, y) (the biased V-statistic, ≥ 0).

    Args:
        x: (N, D) one sample set (e.g. synthetic embeddings).
        y: (M, D) the other (e.g. real embeddings; treated as constants).
        sigmas_squared: the kernel bandwidths σ².
        min_squared: the sum is clamped to this before the square root, so the gradient
            stays finite when the two sets coincide.
        chunk_size: (row, column) pairs per block (None: one block).
    Returns:
        scalar tensor.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise DataError("mmd_loss", f"expected (N, D) and (M, D) inputs, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise DataError("mmd_loss", "both sample sets must be non-empty")
    return mmd_squared_sum(x, y, x, y, sigmas_squared, chunk_size=chunk_size).clamp_min(min_squared).sqrt()


# ---- relationship alignment --------------------------------------------------------------


def _kl_per_element(*, log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ input) from row log-probabilities (N, M): Σ p_t (log p_t − log p_i) / (N·M)."""
    return _kl_sum(log_target=log_target, log_input=log_input) / log_target.numel()


def _kl_sum(*, log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    return (log_target.exp() * (log_target - log_input)).sum()


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


def _kl_block(rows: torch.Tensor, row_semantic: torch.Tensor, columns_unit: torch.Tensor,
              column_semantic_unit: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over a block of rows of KL(softmax(A_i/τ) ‖ softmax(V_i/τ)); columns already unit-length."""
    visual = F.normalize(rows, dim=1) @ columns_unit.t() / temperature  # (r, M)
    semantic = F.normalize(row_semantic, dim=1) @ column_semantic_unit.t() / temperature  # (r, M)
    return _kl_sum(log_target=F.log_softmax(semantic, dim=1), log_input=F.log_softmax(visual, dim=1))


def relationship_kl_sum(
    rows: torch.Tensor,
    row_semantic: torch.Tensor,
    columns: torch.Tensor,
    column_semantic: torch.Tensor,
    temperature: float,
    *,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Σ over ``rows`` of KL(softmax_row(A/τ) ‖ softmax_row(V/τ)) (not divided by anything).

    V_ij = cos(h_i, h_j) between ``rows`` (n, D) and ``columns`` (M, D); A_ij = cos(ã_i, ã_j)
    between the rows' class embeddings ``row_semantic`` (n, D) and the columns'
    ``column_semantic`` (M, D). Row blocks of at most ``chunk_size`` pairs, recomputed in the
    backward pass.
    """
    columns_unit = F.normalize(columns, dim=1)  # (M, D)
    column_semantic_unit = F.normalize(column_semantic, dim=1)  # (M, D)
    if rows.shape[0] == 0:
        return columns_unit.sum() * 0 + column_semantic_unit.sum() * 0
    return chunked_row_sum(lambda r, s, c, cs: _kl_block(r, s, c, cs, temperature), [rows, row_semantic],
                           [columns_unit, column_semantic_unit], int(columns.shape[0]), chunk_size)


def relationship_kl(
    features_a: torch.Tensor,
    labels_a: torch.Tensor,
    features_b: torch.Tensor,
    labels_b: torch.Tensor,
    class_embeddings: torch.Tensor,
    temperature: float,
    *,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """L_KL(V, A) between two feature sets (a rows, b columns).

    V_ij = cos(h^a_i, h^b_j), A_ij = cos(ã_{y^a_i}, ã_{y^b_j});
    KL(softmax_row(A/τ) ‖ softmax_row(V/τ)) summed and divided by the element count N·M.

    Args:
        features_a: (N, D), labels_a: (N,) class indices into ``class_embeddings``.
        features_b: (M, D), labels_b: (M,).
        class_embeddings: (C, D) projected class embeddings ã.
        temperature: τ.
        chunk_size: (row, column) pairs per block (None: one block).
    Returns:
        scalar tensor.
    """
    total = relationship_kl_sum(features_a, class_embeddings[labels_a], features_b, class_embeddings[labels_b],
                                temperature, chunk_size=chunk_size)
    return total / (features_a.shape[0] * features_b.shape[0])


def relationship_alignment_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    temperature: float,
    *,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Intra-set alignment: :func:`relationship_kl` of ``features`` (N, D) with themselves."""
    return relationship_kl(features, labels, features, labels, class_embeddings, temperature, chunk_size=chunk_size)


def composed_alignment_loss(
    *,
    seen_features: torch.Tensor,
    seen_labels: torch.Tensor,
    unseen_features: torch.Tensor,
    unseen_labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    temperature: float,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """L_align = mean of seen×seen, unseen×unseen and seen×unseen terms.

    A term whose group is empty is left out of the mean (e.g. a batch without matched seen
    queries, or a vocabulary without unseen classes).
    """
    kl = dict(class_embeddings=class_embeddings, temperature=temperature, chunk_size=chunk_size)
    terms = []
    if seen_features.shape[0] > 0:
        terms.append(relationship_alignment_loss(seen_features, seen_labels, **kl))
    if unseen_features.shape[0] > 0:
        terms.append(relationship_alignment_loss(unseen_features, unseen_labels, **kl))
    if seen_features.shape[0] > 0 and unseen_features.shape[0] > 0:
        terms.append(relationship_kl(seen_features, seen_labels, unseen_features, unseen_labels, **kl))
    if not terms:
        return class_embeddings.new_zeros(())
    return torch.stack(terms).mean()


# ---- disentanglement ---------------------------------------------------------------------


def _pair_blocks(num_rows: int, num_columns: int, chunk_size: int) -> list[tuple[slice, slice]]:
    """(row slice, column slice) blocks of at most ``chunk_size`` pairs covering an (N, M) grid."""
    columns = max(1, min(num_columns, chunk_size))
    rows = max(1, chunk_size // columns)
    return [(slice(r, min(r + rows, num_rows)), slice(c, min(c + columns, num_columns)))
            for r in range(0, num_rows, rows) for c in range(0, num_columns, columns)]


class _RelationScores(torch.autograd.Function):
    """sigmoid(w · ReLU(a_i + b_j) + β) for every pair (i, j), in blocks of pairs, keeping only
    the (N, M) output: the backward pass recomputes each block's (rows, columns, D) hidden layer.

    The backward uses ∂/∂a_i = w ⊙ Σ_j g_ij 1[h_ij > 0] (a batched matrix product) and
    ∂/∂b_j = w ⊙ Σ_i g_ij 1[h_ij > 0], with the ReLU's mask made in place from the hidden layer
    (sign of a non-negative number), so a block costs a few passes over (r, c, D) floats.
    """

    @staticmethod
    def _hidden(from_rows, from_columns, rows, columns):
        return torch.add(from_rows[rows].unsqueeze(1), from_columns[columns].unsqueeze(0)).relu_()  # (r, c, D)

    @staticmethod
    def forward(ctx, from_rows, from_columns, score_weight, score_bias, chunk_size):
        num_rows, num_columns = from_rows.shape[0], from_columns.shape[0]
        out = from_rows.new_empty((num_rows, num_columns))  # (N, M)
        for rows, columns in _pair_blocks(num_rows, num_columns, chunk_size):
            hidden = _RelationScores._hidden(from_rows, from_columns, rows, columns)  # (r, c, D)
            out[rows, columns] = torch.sigmoid(hidden @ score_weight + score_bias)  # (r, c)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(from_rows, from_columns, score_weight, score_bias, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from_rows, from_columns, score_weight, score_bias, out = ctx.saved_tensors
        grad_logit = grad_out * out * (1.0 - out)  # (N, M) through the sigmoid
        grad_rows = torch.zeros_like(from_rows)
        grad_columns = torch.zeros_like(from_columns)
        grad_weight = torch.zeros_like(score_weight)
        for rows, columns in _pair_blocks(from_rows.shape[0], from_columns.shape[0], ctx.chunk_size):
            hidden = _RelationScores._hidden(from_rows, from_columns, rows, columns)  # (r, c, D)
            block = grad_logit[rows, columns]  # (r, c)
            grad_weight += block.reshape(-1) @ hidden.reshape(-1, hidden.shape[-1])
            active = hidden.sign_()  # (r, c, D): 1 where the ReLU passed, else 0 (in place)
            grad_rows[rows] += torch.bmm(block.unsqueeze(1), active).squeeze(1) * score_weight  # (r, D)
            grad_columns[columns] += (block.unsqueeze(-1) * active).sum(dim=0) * score_weight  # (c, D)
        grad_bias = grad_logit.sum().reshape(score_bias.shape)
        return grad_rows, grad_columns, grad_weight, grad_bias, None


class RelationNetwork(nn.Module):
    """R(h, ã) = sigmoid(Linear(D→1)(ReLU(Linear(2D→D)([h, ã]))))."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.hidden = nn.Linear(2 * embed_dim, embed_dim)
        self.score = nn.Linear(embed_dim, 1)

    def forward(self, features: torch.Tensor, class_embeddings: torch.Tensor,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """Score every feature against every class.

        Args:
            features: (N, D) related features h.
            class_embeddings: (M, D) candidate class embeddings ã.
            chunk_size: (feature, class) pairs whose (pairs, D) hidden layer exists at once; it
                is recomputed in the backward pass (None: all pairs in one block).
        Returns:
            (N, M) scores in (0, 1).
        """
        # Linear([h, ã]) = W_h h + W_a ã + b, computed per side then broadcast (no (N·M, 2D) concat).
        weight_features = self.hidden.weight[:, : self.embed_dim]  # (D, D)
        weight_classes = self.hidden.weight[:, self.embed_dim :]  # (D, D)
        from_features = features @ weight_features.t()  # (N, D)
        from_classes = class_embeddings @ weight_classes.t() + self.hidden.bias  # (M, D)
        return _RelationScores.apply(from_features, from_classes, self.score.weight[0], self.score.bias,
                                     int(chunk_size or UNCHUNKED))  # (N, M)


def _encoder(embed_dim: int, negative_slope: float, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, embed_dim),
        nn.Linear(embed_dim, embed_dim),
        nn.LeakyReLU(negative_slope),
        Dropout(dropout),
    )


class Disentangler(nn.Module):
    """Feature disentanglement: x -> (h = E_r(x), u = E_u(x)), D([h, u]) ≈ x, R(h, ã).

    E_r, E_u: Linear(D,D) → Linear(D,D) → LeakyReLU → Dropout.
    D: Linear(2D,D) → LeakyReLU → Dropout → Linear(D,D) → LeakyReLU → Dropout.
    """

    def __init__(self, embed_dim: int, *, negative_slope: float = 0.2, dropout: float = 0.1):
        super().__init__()
        self.embed_dim = embed_dim
        self.related_encoder = _encoder(embed_dim, negative_slope, dropout)
        self.unrelated_encoder = _encoder(embed_dim, negative_slope, dropout)
        self.decoder = nn.Sequential(
            nn.Linear(2 * embed_dim, embed_dim),
            nn.LeakyReLU(negative_slope),
            Dropout(dropout),
            nn.Linear(embed_dim, embed_dim),
            nn.LeakyReLU(negative_slope),
            Dropout(dropout),
        )
        self.relation_network = RelationNetwork(embed_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> (related (N, D), unrelated (N, D))."""
        return self.related_encoder(features), self.unrelated_encoder(features)

    def reconstruction_loss(
        self, features: torch.Tensor, related: torch.Tensor, unrelated: torch.Tensor
    ) -> torch.Tensor:
        """L_rec = mean |D([h, u]) − x| (L1); all inputs (N, D)."""
        reconstructed = self.decoder(torch.cat([related, unrelated], dim=1))  # (N, D)
        return (reconstructed - features).abs().mean()

    def relation_scores(self, related: torch.Tensor, class_embeddings: torch.Tensor,
                        chunk_size: Optional[int] = None) -> torch.Tensor:
        """(N, D), (M, D) -> (N, M) relation scores (:class:`RelationNetwork`)."""
        return self.relation_network(related, class_embeddings, chunk_size)


def unrelated_noise_loss(
    unrelated: torch.Tensor,
    temperature: float,
    *,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """L_unrel = KL(softmax(ε/T) ‖ softmax(u/T)), ε ~ N(0, I), summed / element count.

    Args:
        unrelated: (N, D) semantic-unrelated features u = E_u(x).
        temperature: T.
        noise: optional (N, D) ε; drawn from the global RNG when None.
    """
    if noise is None:
        noise = torch.randn_like(unrelated)
    return _kl_per_element(
        log_target=F.log_softmax(noise / temperature, dim=1), log_input=F.log_softmax(unrelated / temperature, dim=1)
    )


def relation_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_rel: cross-entropy of the relation scores (N, M), used as logits, against the
    true class's column ``targets`` (N,) (as the authors' release does)."""
    return F.cross_entropy(scores, targets)


