"""Generator-side losses (docs/method.md "Losses").

- :func:`mmd_loss`: multi-kernel maximum mean discrepancy L_G.
- :func:`relationship_alignment_loss` / :func:`composed_alignment_loss`: KL between the
  row-softmaxed semantic and visual similarity matrices (intra- and inter-group).
- :class:`Disentangler`: semantic-related / -unrelated encoders, decoder and relation
  network, with :meth:`Disentangler.reconstruction_loss`, :func:`unrelated_noise_loss`
  and :func:`relation_loss`.
- :class:`PadingLoss`: the total
  L = L_G + aux·L_cls + λ·[w1·(L_align + u·L_unrel) + w2·r·L_rel + w3·L_rec]
  for the ablation variant in :class:`~pading.config.LossConfig`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pading.config import LossConfig
from pading.errors import ConfigError, DataError

#: Variants whose generator loss is MMD + auxiliary classification only (λ = 0).
#: Seen features the alignment/disentanglement terms use (``LossConfig.alignment_seen_features``).
ALIGNMENT_SEEN_SOURCES = ("synthetic", "real")


# ---- MMD --------------------------------------------------------------------------------


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances (clamped at 0)."""
    x_norm = (x * x).sum(dim=1, keepdim=True)  # (N, 1)
    y_norm = (y * y).sum(dim=1, keepdim=True)  # (M, 1)
    return (x_norm + y_norm.t() - 2.0 * x @ y.t()).clamp_min(0.0)  # (N, M)


def mmd_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas_squared: Sequence[float],
    *,
    min_squared: float = 1e-12,
) -> torch.Tensor:
    """Multi-kernel MMD: sqrt(Σ_σ MMD²_σ) with Gaussian kernels exp(−‖f−f'‖² / (2σ²)).

    MMD²_σ = mean k(x, x) + mean k(y, y) − 2 mean k(x, y) (the biased V-statistic, ≥ 0).

    Args:
        x: (N, D) one sample set (e.g. synthetic embeddings).
        y: (M, D) the other (e.g. real embeddings).
        sigmas_squared: the kernel bandwidths σ².
        min_squared: the sum is clamped to this before the square root, so the gradient
            stays finite when the two sets coincide.
    Returns:
        scalar tensor.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise DataError("mmd_loss", f"expected (N, D) and (M, D) inputs, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise DataError("mmd_loss", "both sample sets must be non-empty")
    xx = _squared_distances(x, x)  # (N, N)
    yy = _squared_distances(y, y)  # (M, M)
    xy = _squared_distances(x, y)  # (N, M)
    total = x.new_zeros(())
    for sigma_squared in sigmas_squared:
        scale = 1.0 / (2.0 * float(sigma_squared))
        total = total + (
            torch.exp(-scale * xx).mean() + torch.exp(-scale * yy).mean() - 2.0 * torch.exp(-scale * xy).mean()
        )
    return total.clamp_min(min_squared).sqrt()


# ---- relationship alignment --------------------------------------------------------------


def _kl_per_element(*, log_target: torch.Tensor, log_input: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ input) from row log-probabilities (N, M): Σ p_t (log p_t − log p_i) / (N·M)."""
    return (log_target.exp() * (log_target - log_input)).sum() / log_target.numel()


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


def relationship_kl(
    features_a: torch.Tensor,
    labels_a: torch.Tensor,
    features_b: torch.Tensor,
    labels_b: torch.Tensor,
    class_embeddings: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """L_KL(V, A) between two feature sets (a rows, b columns).

    V_ij = cos(h^a_i, h^b_j), A_ij = cos(ã_{y^a_i}, ã_{y^b_j});
    KL(softmax_row(A/τ) ‖ softmax_row(V/τ)) summed and divided by the element count N·M.

    Args:
        features_a: (N, D), labels_a: (N,) class indices into ``class_embeddings``.
        features_b: (M, D), labels_b: (M,).
        class_embeddings: (C, D) projected class embeddings ã.
        temperature: τ.
    Returns:
        scalar tensor.
    """
    visual = _cosine_matrix(features_a, features_b) / temperature  # (N, M)
    semantic = _cosine_matrix(class_embeddings[labels_a], class_embeddings[labels_b]) / temperature  # (N, M)
    return _kl_per_element(log_target=F.log_softmax(semantic, dim=1), log_input=F.log_softmax(visual, dim=1))


def relationship_alignment_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Intra-set alignment: :func:`relationship_kl` of ``features`` (N, D) with themselves."""
    return relationship_kl(features, labels, features, labels, class_embeddings, temperature)


def composed_alignment_loss(
    *,
    seen_features: torch.Tensor,
    seen_labels: torch.Tensor,
    unseen_features: torch.Tensor,
    unseen_labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """L_align = mean of seen×seen, unseen×unseen and seen×unseen terms.

    A term whose group is empty is left out of the mean (e.g. a batch without matched seen
    queries, or a vocabulary without unseen classes).
    """
    terms = []
    if seen_features.shape[0] > 0:
        terms.append(relationship_alignment_loss(seen_features, seen_labels, class_embeddings, temperature))
    if unseen_features.shape[0] > 0:
        terms.append(relationship_alignment_loss(unseen_features, unseen_labels, class_embeddings, temperature))
    if seen_features.shape[0] > 0 and unseen_features.shape[0] > 0:
        terms.append(
            relationship_kl(seen_features, seen_labels, unseen_features, unseen_labels, class_embeddings, temperature)
        )
    if not terms:
        return class_embeddings.new_zeros(())
    return torch.stack(terms).mean()


# ---- disentanglement ---------------------------------------------------------------------


class RelationNetwork(nn.Module):
    """R(h, ã) = sigmoid(Linear(D→1)(ReLU(Linear(2D→D)([h, ã]))))."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.hidden = nn.Linear(2 * embed_dim, embed_dim)
        self.score = nn.Linear(embed_dim, 1)

    def forward(self, features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Score every feature against every class.

        Args:
            features: (N, D) related features h.
            class_embeddings: (M, D) candidate class embeddings ã.
        Returns:
            (N, M) scores in (0, 1).
        """
        # Linear([h, ã]) = W_h h + W_a ã + b, computed per side then broadcast (no (N·M, 2D) concat).
        weight_features = self.hidden.weight[:, : self.embed_dim]  # (D, D)
        weight_classes = self.hidden.weight[:, self.embed_dim :]  # (D, D)
        from_features = features @ weight_features.t()  # (N, D)
        from_classes = class_embeddings @ weight_classes.t() + self.hidden.bias  # (M, D)
        hidden = torch.relu(from_features.unsqueeze(1) + from_classes.unsqueeze(0))  # (N, M, D)
        return torch.sigmoid(self.score(hidden).squeeze(-1))  # (N, M)


def _encoder(embed_dim: int, negative_slope: float, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(embed_dim, embed_dim),
        nn.Linear(embed_dim, embed_dim),
        nn.LeakyReLU(negative_slope),
        nn.Dropout(dropout),
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
            nn.Dropout(dropout),
            nn.Linear(embed_dim, embed_dim),
            nn.LeakyReLU(negative_slope),
            nn.Dropout(dropout),
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

    def relation_scores(self, related: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D), (M, D) -> (N, M) relation scores."""
        return self.relation_network(related, class_embeddings)


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


# ---- total --------------------------------------------------------------------------------


def _mean_of(terms: list) -> torch.Tensor:
    return torch.stack(terms).mean()


class PadingLoss(nn.Module):
    """The generator-side objective for one batch; holds the :class:`Disentangler`.

    Variants (``LossConfig.variant``): ``gmmn``/``primitive`` use L_G + aux·L_cls only;
    ``alignment`` adds λ·w1·L_align on raw features (h = x); ``full`` adds alignment on
    h = E_r(x) plus the disentanglement terms. ``projection`` has no generator and is
    rejected.
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
        self.uses_alignment = config.variant in ("alignment", "full")
        self.uses_disentanglement = config.variant == "full"
        self.disentangler = (
            Disentangler(embed_dim, dropout=config.disentangler_dropout) if self.uses_disentanglement else None
        )

    def forward(
        self,
        *,
        real_seen: torch.Tensor,
        synthetic_seen: torch.Tensor,
        seen_labels: torch.Tensor,
        synthetic_seen_logits: Optional[torch.Tensor],
        synthetic_unseen: torch.Tensor,
        unseen_labels: torch.Tensor,
        unseen_indices: torch.Tensor,
        class_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """
        Args:
            real_seen: (N, D) real matched embeddings of seen classes.
            synthetic_seen: (N, D) synthetic embeddings for the same labels.
            seen_labels: (N,) their class indices.
            synthetic_seen_logits: (N, C+1) classifier logits of ``synthetic_seen`` (for
                the auxiliary loss), or None to leave it out.
            synthetic_unseen: (U', D) synthetic embeddings of unseen classes.
            unseen_labels: (U',) their class indices (each in ``unseen_indices``).
            unseen_indices: (U,) every unseen class index (the relation set of unseen samples).
            class_embeddings: (C, D) projected class embeddings ã.
        Returns:
            ``(total, terms)``: the scalar loss to back-propagate and a dict of floats
            (``mmd``, ``classification``, ``alignment``, ``unrelated``, ``relation``,
            ``reconstruction``, ``total``); disabled terms are 0.0.
        """
        cfg = self.config
        mmd = mmd_loss(synthetic_seen, real_seen, cfg.mmd_sigmas_squared)
        zero = mmd.new_zeros(())
        classification = zero
        if synthetic_seen_logits is not None:
            classification = F.cross_entropy(synthetic_seen_logits, seen_labels)
        total = mmd + cfg.auxiliary_classification_weight * classification
        alignment = unrelated = relation = reconstruction = zero

        if self.uses_alignment:
            seen_features = synthetic_seen if cfg.alignment_seen_features == "synthetic" else real_seen  # (N, D)
            unseen_features = synthetic_unseen  # (U', D)
            if self.uses_disentanglement:
                groups = [(seen_features, seen_labels, None), (unseen_features, unseen_labels, unseen_indices)]
                related_parts, unrelated_terms, relation_terms, reconstruction_terms = [], [], [], []
                for features, labels, candidate_classes in groups:
                    related, unrelated_part = self.disentangler(features)  # (n, D) each
                    related_parts.append(related)
                    if features.shape[0] == 0:
                        continue
                    reconstruction_terms.append(
                        self.disentangler.reconstruction_loss(features, related, unrelated_part)
                    )
                    unrelated_terms.append(unrelated_noise_loss(unrelated_part, cfg.unrelated_temperature))
                    if candidate_classes is None:  # seen samples: over all |C| classes
                        scores = self.disentangler.relation_scores(related, class_embeddings)  # (n, C)
                        targets = labels
                    else:  # unseen samples: over the unseen set
                        scores = self.disentangler.relation_scores(
                            related, class_embeddings[candidate_classes]
                        )  # (n, U)
                        targets = _positions_in(labels, candidate_classes)
                    relation_terms.append(relation_loss(scores, targets))
                seen_features, unseen_features = related_parts
                if reconstruction_terms:
                    reconstruction = _mean_of(reconstruction_terms)
                    unrelated = _mean_of(unrelated_terms)
                    relation = _mean_of(relation_terms)
            alignment = composed_alignment_loss(
                seen_features=seen_features,
                seen_labels=seen_labels,
                unseen_features=unseen_features,
                unseen_labels=unseen_labels,
                class_embeddings=class_embeddings,
                temperature=cfg.alignment_temperature,
            )
            regulariser = (
                cfg.alignment_weight * (alignment + cfg.unrelated_weight * unrelated)
                + cfg.relation_weight * cfg.relation_scale * relation
                + cfg.reconstruction_weight * reconstruction
            )
            total = total + cfg.disentangle_weight * regulariser

        terms = {
            "mmd": float(mmd.detach()),
            "classification": float(classification.detach()),
            "alignment": float(alignment.detach()),
            "unrelated": float(unrelated.detach()),
            "relation": float(relation.detach()),
            "reconstruction": float(reconstruction.detach()),
            "total": float(total.detach()),
        }
        return total, terms


def _positions_in(labels: torch.Tensor, candidate_classes: torch.Tensor) -> torch.Tensor:
    """Position of each label (N,) within ``candidate_classes`` (U,); error if absent."""
    matches = labels.unsqueeze(1) == candidate_classes.unsqueeze(0)  # (N, U)
    if not bool(matches.any(dim=1).all()):
        missing = labels[~matches.any(dim=1)].tolist()
        raise DataError(
            "PadingLoss unseen_labels", f"classes {missing} are not in the unseen set {candidate_classes.tolist()}"
        )
    return matches.to(torch.long).argmax(dim=1)  # (N,)
