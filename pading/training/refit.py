"""Re-fitting the classifier for classes added after training (the endpoint's and batch
segmentation's run-time classes, docs/serving.md): a few SGD steps on real reference
embeddings plus synthetic embeddings of the added classes from the trained generator."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pading.config import GeneratorTrainingConfig
from pading.errors import DataError
from pading.model.classifier import Classifier, classifier_step, make_classifier_optimizer

#: ``(class_indices (M,), per_class) -> (M * per_class, D)`` synthetic embeddings, class-major.
SynthesizeFn = Callable[[torch.Tensor, int], torch.Tensor]


def fit_classifier(
    classifier: nn.Module,
    real_embeddings: torch.Tensor,
    real_labels: torch.Tensor,
    synthesize_fn: Optional[SynthesizeFn],
    synthetic_class_indices: torch.Tensor,
    *,
    steps: int,
    weights: torch.Tensor,
    config: GeneratorTrainingConfig,
    per_class: int,
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> list[float]:
    """Re-fit ``classifier`` quickly (e.g. after :func:`~pading.model.classifier.expand_classifier`
    when classes are added at run time).

    Each step takes a random batch of real embeddings (all of them when ``batch_size`` is
    None) plus ``per_class`` synthetic embeddings of each of ``config.unseen_classes_per_step``
    classes drawn from ``synthetic_class_indices``, and does one weighted cross-entropy SGD step.

    Args:
        classifier: maps (N, D) -> (N, C+1); trained in place.
        real_embeddings: (N, D) real query embeddings; real_labels: (N,) their labels.
        synthesize_fn: ``(class_indices (M,), per_class) -> (M*per_class, D)`` (class-major
            order), e.g. :meth:`GeneratorTrainer.synthesize`; None for real data only.
        synthetic_class_indices: (U,) classes to synthesise (e.g. unseen + run-time classes).
        steps: number of SGD steps.
        weights: (C+1,) class weights of the cross-entropy.
        config: optimiser settings and ``unseen_classes_per_step``.
        per_class: synthetic samples per chosen class.
        batch_size: real samples per step.
        seed: seeds the choice of real samples and classes.
    Returns:
        the loss of every step.
    """
    _check_real("fit_classifier", real_embeddings, real_labels)
    optimizer = make_classifier_optimizer(classifier, config)
    weights = weights.to(real_embeddings.device)
    losses = []
    for rows, synthetic, synthetic_labels in _refit_draws(real_embeddings, synthesize_fn, synthetic_class_indices,
                                                          steps, config, per_class, batch_size, seed):
        features, targets = real_embeddings, real_labels.to(torch.long)
        if rows is not None:
            features, targets = features[rows], targets[rows]
        if synthetic is not None:
            features = torch.cat([features, synthetic], dim=0)
            targets = torch.cat([targets, synthetic_labels], dim=0)
        losses.append(classifier_step(classifier, optimizer, features, targets, weights))
    return losses


def _check_real(name: str, real_embeddings: torch.Tensor, real_labels: torch.Tensor) -> None:
    if real_embeddings.dim() != 2 or real_labels.shape != real_embeddings.shape[:1]:
        raise DataError(name, f"expected embeddings (N, D) and labels (N,), got {tuple(real_embeddings.shape)} "
                        f"and {tuple(real_labels.shape)}")


def _refit_draws(real_embeddings: torch.Tensor, synthesize_fn: Optional[SynthesizeFn],
                 synthetic_class_indices: torch.Tensor, steps: int, config: GeneratorTrainingConfig, per_class: int,
                 batch_size: Optional[int], seed: int):
    """The seeded draws of a classifier re-fit, per step: ``(rows, synthetic, labels)`` =
    the real samples' row indices (None: all), (M, D) synthetic embeddings of
    ``config.unseen_classes_per_step`` chosen classes and their (M,) labels (None, None
    without a generator)."""
    device = real_embeddings.device
    chooser = torch.Generator().manual_seed(seed)
    synthetic_class_indices = synthetic_class_indices.to(torch.long).cpu()
    for _ in range(steps):
        rows = synthetic = labels = None
        if batch_size is not None and batch_size < real_embeddings.shape[0]:
            rows = torch.randperm(real_embeddings.shape[0], generator=chooser)[:batch_size].to(device)
        if synthesize_fn is not None and synthetic_class_indices.numel() > 0 and per_class > 0:
            count = min(config.unseen_classes_per_step, synthetic_class_indices.numel())
            chosen = synthetic_class_indices[torch.randperm(synthetic_class_indices.numel(), generator=chooser)[:count]]
            with torch.no_grad():
                synthetic = synthesize_fn(chosen, per_class).to(device)  # (count*per_class, D)
            labels = chosen.to(device).repeat_interleave(per_class)
        yield rows, synthetic, labels


def fit_added_classes(
    classifier: Classifier,
    num_trained: int,
    real_embeddings: torch.Tensor,
    real_labels: torch.Tensor,
    synthesize_fn: Optional[SynthesizeFn],
    synthetic_class_indices: torch.Tensor,
    *,
    steps: int,
    weights: torch.Tensor,
    config: GeneratorTrainingConfig,
    per_class: int,
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> list[float]:
    """:func:`fit_classifier` for classes appended by :func:`~pading.model.classifier.expand_classifier`
    (run-time classes): only the rows of classes ``num_trained .. C-1`` are trained; the rows
    of the first ``num_trained`` classes and of "no object" stay as they are, so adding a class
    leaves the logits of every existing class unchanged.

    The same batches as :func:`fit_classifier` (same seed, same draws) and the same weighted
    cross-entropy over all C+1 logits, computed without the (rows, C+1) logits: with the
    frozen rows fixed, a row's cross-entropy is logaddexp(lse_frozen, lse(added logits)) minus
    its target's logit, and the frozen part (the log-sum-exp over the T+1 frozen logits, and the
    frozen target's logit) is computed once for the real embeddings. A step then costs
    O(batch x added x D) plus O(synthetic x C x D), and memory holds two numbers per reference
    row, not C+1: adding a class at 20,000 classes stays within seconds
    (benchmarks/vocab_scaling.py, docs/lvis.md).

    Args:
        classifier: the expanded classifier (C classes + no object); its added rows are
            trained in place.
        num_trained: classes before the added ones.
        Others: as :func:`fit_classifier`.
    Returns:
        the loss of every step.
    """
    if not isinstance(classifier, Classifier):
        raise DataError("fit_added_classes", f"expected a Classifier, got {type(classifier).__name__}")
    _check_real("fit_added_classes", real_embeddings, real_labels)
    num_classes = classifier.num_classes
    if not 0 <= num_trained <= num_classes:
        raise DataError("fit_added_classes", f"num_trained={num_trained} outside [0, {num_classes}]")
    device = real_embeddings.device
    weight, bias = classifier.linear.weight, classifier.linear.bias  # (C+1, D), (C+1,)
    frozen = torch.cat([torch.arange(num_trained), torch.tensor([num_classes])]).to(weight.device)  # old + no object
    frozen_weight, frozen_bias = weight.detach()[frozen], bias.detach()[frozen]  # (T+1, D), (T+1,)
    added = nn.Linear(classifier.embed_dim, num_classes - num_trained).to(weight.device)

    def frozen_terms(features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-sum-exp of the frozen logits (n,), the frozen logit of each target (n,); 0 for an added target)."""
        logits = features @ frozen_weight.t() + frozen_bias  # (n, T+1)
        is_frozen = (targets < num_trained) | (targets == num_classes)
        column = torch.where(targets == num_classes, torch.full_like(targets, num_trained), targets)
        column = torch.where(is_frozen, column, torch.zeros_like(column))
        return torch.logsumexp(logits, dim=1), torch.where(is_frozen, logits.gather(1, column[:, None])[:, 0],
                                                           torch.zeros_like(logits[:, 0]))

    with torch.no_grad():
        added.weight.copy_(weight[num_trained:num_classes])
        added.bias.copy_(bias[num_trained:num_classes])
        real_labels = real_labels.to(torch.long)
        real_lse, real_target = frozen_terms(real_embeddings, real_labels)  # (N,) each, once
    optimizer = make_classifier_optimizer(added, config)
    weights = weights.to(device)
    losses = []
    for rows, synthetic, synthetic_labels in _refit_draws(real_embeddings, synthesize_fn, synthetic_class_indices,
                                                          steps, config, per_class, batch_size, seed):
        features, frozen_lse, frozen_target, targets = real_embeddings, real_lse, real_target, real_labels
        if rows is not None:
            features, frozen_lse, frozen_target, targets = (features[rows], frozen_lse[rows], frozen_target[rows],
                                                             targets[rows])
        if synthetic is not None:
            with torch.no_grad():
                synthetic_lse, synthetic_target = frozen_terms(synthetic, synthetic_labels)  # (M,) each
            features = torch.cat([features, synthetic], dim=0)
            frozen_lse = torch.cat([frozen_lse, synthetic_lse])
            frozen_target = torch.cat([frozen_target, synthetic_target])
            targets = torch.cat([targets, synthetic_labels], dim=0)
        added_logits = added(features)  # (n, A)
        total = torch.logaddexp(frozen_lse, torch.logsumexp(added_logits, dim=1))  # (n,) log-sum-exp of all C+1
        is_added = (targets >= num_trained) & (targets < num_classes)
        position = torch.where(is_added, targets - num_trained, torch.zeros_like(targets))
        target_logit = torch.where(is_added, added_logits.gather(1, position[:, None])[:, 0], frozen_target)
        target_weights = weights[targets]  # (n,)
        loss = (target_weights * (total - target_logit)).sum() / target_weights.sum()  # = F.cross_entropy(weight=)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        weight[num_trained:num_classes] = added.weight
        bias[num_trained:num_classes] = added.bias
    return losses
