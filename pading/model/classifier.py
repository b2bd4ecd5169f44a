"""Retrained classifiers (docs/method.md "Classifier retraining").

- :class:`Classifier`: the linear |C|+1-way head that replaces the segmenter's class head,
  initialised from it (:meth:`Classifier.from_class_head`).
- :class:`ProjectionClassifier`: the projection baseline of the paper's ablation (visual
  features projected to the semantic space, cosine logits to frozen text embeddings, plus
  a learned "no object" logit).
- :func:`class_weights`: the cross-entropy weights (seen / no object / unseen).
- :func:`expand_classifier`: add rows for classes added at run time.
- :func:`classifier_step` / :func:`make_classifier_optimizer`: one weighted CE step, SGD.

Both classifiers map query embeddings (N, D) to logits (N, C+1); column C is "no object".
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from pading.classes import ClassTable
from pading.config import GeneratorTrainingConfig
from pading.errors import DataError


class Classifier(nn.Module):
    """Linear(D, C+1) over query embeddings; the last output is "no object"."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.linear = nn.Linear(embed_dim, num_classes + 1)

    @classmethod
    def from_class_head(cls, linear: nn.Linear) -> "Classifier":
        """A classifier whose weights are a copy of the segmenter's class head ``linear``
        (``Linear(D, C+1)``); the head itself is left untouched."""
        if not isinstance(linear, nn.Linear):
            raise DataError("class_head", f"expected an nn.Linear class head, got {type(linear).__name__}")
        if linear.bias is None:
            raise DataError("class_head", "the class head has no bias")
        if linear.out_features < 2:
            raise DataError(
                "class_head", f"expected at least 2 outputs (a class and no object), got {linear.out_features}"
            )
        classifier = cls(linear.in_features, linear.out_features - 1)
        with torch.no_grad():
            classifier.linear.weight.copy_(linear.weight)
            classifier.linear.bias.copy_(linear.bias)
        return classifier.to(linear.weight.device)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C+1) logits."""
        return self.linear(embeddings)


class ProjectionClassifier(nn.Module):
    """Projection baseline: logits_c = cos(W x, a_c) / temperature.

    The class semantics a_c are frozen (a buffer); the trained parts are the visual →
    semantic projection W (D → S) and a "no object" embedding in the semantic space whose
    cosine gives the last logit.

    Args:
        embed_dim: D.
        class_semantics: (C, S) semantic embeddings of the classes, in table order.
        temperature: divides the cosine similarities.
    """

    def __init__(self, embed_dim: int, class_semantics: torch.Tensor, *, temperature: float = 0.05):
        super().__init__()
        if class_semantics.dim() != 2 or class_semantics.shape[0] < 1:
            raise DataError(
                "class_semantics", f"expected a non-empty (C, S) tensor, got {tuple(class_semantics.shape)}"
            )
        if temperature <= 0:
            raise DataError("ProjectionClassifier", f"temperature must be > 0, got {temperature}")
        self.embed_dim = embed_dim
        self.semantic_dim = int(class_semantics.shape[1])
        self.temperature = float(temperature)
        self.register_buffer("class_semantics", class_semantics.detach().clone().float())  # (C, S)
        self.visual_projection = nn.Linear(embed_dim, self.semantic_dim)
        self.no_object_embedding = nn.Parameter(torch.randn(self.semantic_dim) / self.semantic_dim**0.5)  # (S,)

    @property
    def num_classes(self) -> int:
        return int(self.class_semantics.shape[0])

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C+1) logits."""
        projected = F.normalize(self.visual_projection(embeddings), dim=1)  # (N, S)
        targets = torch.cat([self.class_semantics, self.no_object_embedding.unsqueeze(0)], dim=0)  # (C+1, S)
        return projected @ F.normalize(targets, dim=1).t() / self.temperature  # (N, C+1)


def class_weights(table: ClassTable, config: GeneratorTrainingConfig) -> torch.Tensor:
    """Cross-entropy weights (C+1,): seen classes ``seen_class_weight``, unseen classes
    ``unseen_class_weight``, "no object" (last) ``no_object_class_weight``."""
    weights = torch.full((table.num_classes + 1,), float(config.seen_class_weight))
    unseen = table.unseen_indices
    if unseen:
        weights[torch.tensor(unseen, dtype=torch.long)] = float(config.unseen_class_weight)
    weights[table.no_object_index] = float(config.no_object_class_weight)
    return weights


AnyClassifier = Union[Classifier, ProjectionClassifier]


def classifier_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
) -> float:
    """One weighted cross-entropy step: embeddings (N, D), labels (N,), weights (C+1,)."""
    classifier.train()
    logits = classifier(embeddings)  # (N, C+1)
    loss = F.cross_entropy(logits, labels, weight=weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def make_classifier_optimizer(classifier: nn.Module, config: GeneratorTrainingConfig) -> torch.optim.SGD:
    """SGD with the classifier lr, momentum and weight decay of ``config``."""
    return torch.optim.SGD(
        classifier.parameters(),
        lr=config.classifier_lr,
        momentum=config.classifier_momentum,
        weight_decay=config.classifier_weight_decay,
        foreach=True,  # the same numbers as the per-tensor loop (torch's CPU default), one call
    )


def expand_classifier(
    classifier: AnyClassifier,
    new_num_classes: int,
    *,
    new_class_semantics: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> AnyClassifier:
    """A copy of ``classifier`` with ``new_num_classes`` classes (+ no object).

    Rows of the existing classes are kept, new classes go after them, and the last row
    stays "no object", so the logits of existing classes and of "no object" are unchanged.
    For :class:`Classifier` the new rows are drawn like the existing ones (normal with the
    existing rows' weight std, bias = mean existing class bias) and are meant to be fitted
    afterwards (:func:`pading.training.refit.fit_classifier`). For :class:`ProjectionClassifier`
    ``new_class_semantics`` ((new_num_classes - C, S)) must be given.
    """
    old_num_classes = classifier.num_classes
    if new_num_classes < old_num_classes:
        raise DataError("expand_classifier", f"cannot shrink from {old_num_classes} to {new_num_classes} classes")
    added = new_num_classes - old_num_classes
    if isinstance(classifier, ProjectionClassifier):
        if new_class_semantics is None or tuple(new_class_semantics.shape) != (added, classifier.semantic_dim):
            got = None if new_class_semantics is None else tuple(new_class_semantics.shape)
            raise DataError(
                "expand_classifier new_class_semantics",
                f"a projection classifier needs ({added}, {classifier.semantic_dim}) semantics of the "
                f"new classes, got {got}",
            )
        semantics = torch.cat([classifier.class_semantics, new_class_semantics.to(classifier.class_semantics)], dim=0)
        expanded = ProjectionClassifier(classifier.embed_dim, semantics, temperature=classifier.temperature)
        expanded.visual_projection.load_state_dict(classifier.visual_projection.state_dict())
        with torch.no_grad():
            expanded.no_object_embedding.copy_(classifier.no_object_embedding)
        return expanded.to(classifier.class_semantics.device)
    if not isinstance(classifier, Classifier):
        raise DataError("expand_classifier", f"unsupported classifier type {type(classifier).__name__}")
    old_weight = classifier.linear.weight.detach()  # (C+1, D)
    old_bias = classifier.linear.bias.detach()  # (C+1,)
    expanded = Classifier(classifier.embed_dim, new_num_classes).to(old_weight.device)
    with torch.no_grad():
        class_rows = old_weight[:old_num_classes]  # (C, D)
        weight_std = float(class_rows.std()) if class_rows.numel() > 1 else 1.0 / classifier.embed_dim**0.5
        draw = torch.randn(
            (added, classifier.embed_dim), generator=generator, device=generator.device if generator else "cpu"
        )
        new_rows = draw.to(old_weight) * weight_std  # (added, D)
        new_bias = old_bias[:old_num_classes].mean() if old_num_classes else old_bias.new_zeros(())
        expanded.linear.weight.copy_(torch.cat([class_rows, new_rows, old_weight[-1:]], dim=0))
        expanded.linear.bias.copy_(torch.cat([old_bias[:old_num_classes], new_bias.expand(added), old_bias[-1:]]))
    return expanded
