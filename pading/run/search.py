"""Hyper-parameter search without peeking at unseen classes (library side of pipelines/tune.py).

A trial re-trains only the generator and the classifier on the cached query embeddings
(the features table of stage 2), so it is cheap. Its score comes from a validation
protocol:

- ``pseudo_unseen`` (default): ``tune.pseudo_unseen_count`` seen classes, chosen from the
  seed, play "unseen". Every training image with a query matched to one of them is
  withheld from generator and classifier training (the seen-only filter of stage 1, applied
  to the pseudo-unseen classes), and so is a ``tune.holdout_fraction`` of the other images
  (stable hash of ``image_id``). The matched queries of the withheld images are the
  validation set. Real unseen classes stay unseen (synthesised, never read: the training
  features contain none, and any image that has one is dropped).
- ``paper``: the paper's protocol, train on all features and validate on the matched
  queries of the val images, real unseen classes included. It peeks at unseen labels.

The score is the harmonic mean of the mean per-class accuracy (percent) over the scored
seen classes and over the scored (pseudo-)unseen classes; a query counts as correct when
the classifier's best class (the "no object" column left out) is its matched class.

Caveat: the segmenter was pretrained with the pseudo-unseen classes labelled, so their
query embeddings are more separable than a truly unseen class's; the pseudo-unseen
accuracy is optimistic in absolute terms, and the protocol ranks settings, it does not
predict the test numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pading.classes import PERCENT, ClassTable
from pading.config import ExperimentConfig, apply_overrides, to_dict
from pading.data.features import FeatureArrays, feature_batches
from pading.errors import ConfigError, DataError
from pading.evaluation.metrics import harmonic_mean
from pading.training.generator import GeneratorTrainer, fit_generator

logger = logging.getLogger(__name__)

PROTOCOLS = ("pseudo_unseen", "paper")
#: Rows per forward pass when scoring the classifier.
SCORE_BATCH_ROWS = 8192
#: Divisor mapping a 64-bit hash to [0, 1).
_HASH_RANGE = float(2**64)

TrialCallback = Callable[[dict, GeneratorTrainer], None]


@dataclass
class SearchSplit:
    """What a trial trains on and is scored on.

    Attributes:
        protocol: ``pseudo_unseen`` or ``paper``.
        table: the vocabulary trials train with (pseudo-unseen classes marked unseen).
        train: rows the generator and classifier see.
        validation: matched query rows the score is computed on.
        seen_indices / unseen_indices: the classes averaged into the seen / unseen accuracy.
    """

    protocol: str
    table: ClassTable
    train: FeatureArrays
    validation: FeatureArrays
    seen_indices: tuple
    unseen_indices: tuple


# ---- the pseudo-unseen protocol ---------------------------------------------------------


def stable_fraction(image_id: int, seed: int) -> float:
    """A number in [0, 1) fixed by ``(seed, image_id)`` (same on every machine and run)."""
    digest = hashlib.blake2b(f"{seed}:{int(image_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _HASH_RANGE


def holdout_rows(image_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the rows of the images held out for validation (about ``fraction`` of them)."""
    unique = np.unique(image_ids)
    held = np.array([stable_fraction(i, seed) < fraction for i in unique], dtype=bool)
    return np.isin(image_ids, unique[held])


def choose_pseudo_unseen(table: ClassTable, labels: np.ndarray, count: int, seed: int) -> list[int]:
    """``count`` seen classes that occur in ``labels``, chosen by ``seed`` (sorted indices)."""
    matched = labels[labels < table.no_object_index]
    present = set(np.unique(matched).tolist())
    candidates = [i for i in table.seen_indices if i in present]
    if count >= len(candidates):
        raise ConfigError(
            f"tune.pseudo_unseen_count={count} but only {len(candidates)} seen classes occur in the features; "
            "at least one must stay seen"
        )
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return sorted(candidates[int(i)] for i in chosen)


def _rows_of_images_with(features: FeatureArrays, classes: Sequence[int]) -> np.ndarray:
    """(N,) bool: rows of images that have at least one query matched to ``classes``."""
    images = np.unique(features.image_ids[np.isin(features.labels, np.asarray(list(classes), dtype=np.int64))])
    return np.isin(features.image_ids, images)


def pseudo_unseen_split(
    features: FeatureArrays, table: ClassTable, *, count: int, holdout_fraction: float, seed: int
) -> SearchSplit:
    """The default protocol (module docstring). ``features``: the training features table."""
    real_unseen = table.unseen_indices
    with_real_unseen = _rows_of_images_with(features, real_unseen)
    if with_real_unseen.any():
        logger.warning("%d feature rows belong to images with real unseen classes; they are not used",
                       int(with_real_unseen.sum()))
    usable = features.select(~with_real_unseen)
    pseudo = choose_pseudo_unseen(table, usable.labels, count, seed)
    search_table = table.with_unseen([table[i].name for i in real_unseen + pseudo])
    withheld = _rows_of_images_with(usable, pseudo) | holdout_rows(usable.image_ids, holdout_fraction, seed)
    train = usable.select(~withheld)
    candidates = usable.select(withheld)
    validation = candidates.select(candidates.labels < table.no_object_index)
    seen = tuple(sorted(set(validation.labels.tolist()) - set(pseudo)))
    if len(train) == 0 or not seen:
        raise DataError("features", f"too few images to split: {len(train)} training rows, "
                                    f"{len(seen)} seen classes in the validation images")
    logger.info("pseudo-unseen protocol: classes %s play unseen; %d training rows, %d validation queries",
                [table[i].name for i in pseudo], len(train), len(validation))
    return SearchSplit("pseudo_unseen", search_table, train, validation, seen, tuple(pseudo))


def search_class_head(class_head: nn.Linear, split: SearchSplit, table: ClassTable) -> nn.Linear:
    """The class head a trial's classifier starts from. Under the pseudo-unseen protocol the
    pretrained head has rows trained on the pseudo-unseen classes' real labels (they were seen
    in pretraining), which a real unseen class never has: left in, the search would score how
    little a trial disturbs those rows rather than what its generator gives. So those rows
    start as the real unseen classes' rows do on average (``table``: the run's vocabulary),
    or at zero when it has none. The paper protocol's head is returned as it is."""
    if split.protocol != "pseudo_unseen" or not split.unseen_indices:
        return class_head
    head = copy.deepcopy(class_head)
    pseudo = sorted(set(split.unseen_indices) - set(table.unseen_indices))
    real = list(table.unseen_indices)
    with torch.no_grad():
        weight = head.weight[real].mean(0) if real else torch.zeros_like(head.weight[0])
        bias = head.bias[real].mean() if real else torch.zeros_like(head.bias[0])
        head.weight[pseudo] = weight
        head.bias[pseudo] = bias
    return head


def paper_split(train: FeatureArrays, validation: FeatureArrays, table: ClassTable) -> SearchSplit:
    """The paper's protocol: all training features; the val images' matched queries,
    scored over the real seen and unseen classes. Selecting on it peeks at unseen labels."""
    matched = validation.select(validation.labels < table.no_object_index)
    present = set(matched.labels.tolist())
    seen = tuple(i for i in table.seen_indices if i in present)
    unseen = tuple(i for i in table.unseen_indices if i in present)
    if not seen or not unseen:
        raise DataError("val features", f"the val images must contain seen and unseen classes "
                                        f"({len(seen)} seen, {len(unseen)} unseen found)")
    return SearchSplit("paper", table, train, matched, seen, unseen)


# ---- scoring ------------------------------------------------------------------------------


def mean_class_accuracy(predictions: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> float:
    """Mean over ``classes`` that occur in ``labels`` of the fraction (percent) of their rows
    predicted correctly; 0 when none occurs."""
    accuracies = [float((predictions[labels == c] == c).mean()) for c in classes if (labels == c).any()]
    return PERCENT * float(np.mean(accuracies)) if accuracies else 0.0


@torch.no_grad()
def score_classifier(classifier: nn.Module, split: SearchSplit) -> dict[str, float]:
    """``{"seen_accuracy", "unseen_accuracy", "score"}`` (percent; score = their HM)."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    predictions = []
    embeddings = split.validation.embeddings
    for start in range(0, embeddings.shape[0], SCORE_BATCH_ROWS):
        batch = torch.as_tensor(np.array(embeddings[start : start + SCORE_BATCH_ROWS]), device=device)  # (n, D)
        logits = classifier(batch)[:, :-1]  # (n, C): "no object" left out
        predictions.append(logits.argmax(1).cpu().numpy())
    classifier.train(was_training)
    predicted = np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
    seen = mean_class_accuracy(predicted, split.validation.labels, split.seen_indices)
    unseen = mean_class_accuracy(predicted, split.validation.labels, split.unseen_indices)
    return {"seen_accuracy": seen, "unseen_accuracy": unseen, "score": harmonic_mean(seen, unseen)}


# ---- training -----------------------------------------------------------------------------


def train_generator(
    features: FeatureArrays,
    table: ClassTable,
    class_semantics: np.ndarray,
    config: ExperimentConfig,
    *,
    iterations: int,
    class_head: Optional[nn.Linear] = None,
    device: Optional[torch.device] = None,
    callback: Optional[Callable[[GeneratorTrainer, dict], None]] = None,
    callback_every: int = 0,
    resume_state: Optional[dict] = None,
) -> GeneratorTrainer:
    """Train a :class:`~pading.training.generator.GeneratorTrainer` for ``iterations`` steps in one
    process, with the pipeline's loop and batch regime (:func:`~pading.training.generator.fit_generator`
    over :func:`~pading.data.features.feature_batches`: ``generator_training.batch_images ×
    segmenter.num_queries`` rows a step, seeded epochs). The learning-rate schedule is laid
    over ``iterations``. ``callback(trainer, last_step_metrics)`` runs every ``callback_every``
    steps (0: never) and after the last one.

    Args:
        features: training rows; class_semantics: (C, S) table-order semantic embeddings.
        class_head: the segmenter's pretrained ``Linear(D, C+1)`` to start the classifier from.
        resume_state: a :meth:`GeneratorTrainer.state_dict` to continue from.
    """
    if len(features) == 0:
        raise DataError("features", "no training rows")
    config = apply_overrides(config, {"generator_training.iterations": iterations})
    device = torch.device(device) if device is not None else torch.device("cpu")
    semantics = torch.tensor(np.asarray(class_semantics, dtype=np.float32), device=device)  # (C, S), a copy
    trainer = GeneratorTrainer(table, semantics, int(features.embeddings.shape[1]), config,
                               class_head=class_head, device=device)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
    rows_per_step = config.generator_training.batch_images * config.segmenter.num_queries

    def on_step(trainer: GeneratorTrainer, metrics: dict) -> None:
        last = trainer.step_count == iterations
        if callback is not None and ((callback_every and trainer.step_count % callback_every == 0) or last):
            callback(trainer, metrics)

    batches = feature_batches(features, rows_per_step, seed=config.seed, start_step=trainer.step_count)
    fit_generator(trainer, batches, iterations, on_step=on_step)
    return trainer


def train_and_score(
    split: SearchSplit,
    class_semantics: np.ndarray,
    config: ExperimentConfig,
    *,
    iterations: int,
    report_every: int,
    callback: Optional[TrialCallback] = None,
    class_head: Optional[nn.Linear] = None,
    device: Optional[torch.device] = None,
    resume_state: Optional[dict] = None,
) -> dict[str, float]:
    """One trial: train on ``split.train`` and score on ``split.validation`` every
    ``report_every`` steps and at the end. ``callback(metrics, trainer)`` receives
    ``{"step", "score", "seen_accuracy", "unseen_accuracy", "classifier_loss", ...}``
    (ASHA stops a trial by not returning from it). Returns the last metrics."""
    if split.train.embeddings.shape[0] and split.validation.embeddings.shape[1] != split.train.embeddings.shape[1]:
        raise DataError("features", "training and validation embeddings differ in size")
    last: dict[str, float] = {}

    def report(trainer: GeneratorTrainer, step_metrics: dict) -> None:
        metrics = {"step": float(trainer.step_count), **score_classifier(trainer.classifier, split)}
        metrics.update({k.replace("/", "_"): float(v) for k, v in step_metrics.items() if k != "step"})
        last.clear()
        last.update(metrics)
        logger.info("step %d: score %.2f (seen %.2f, unseen %.2f)", trainer.step_count, metrics["score"],
                    metrics["seen_accuracy"], metrics["unseen_accuracy"])
        if callback is not None:
            callback(metrics, trainer)

    train_generator(split.train, split.table, class_semantics, config, iterations=iterations,
                    class_head=class_head, device=device, callback=report, callback_every=report_every,
                    resume_state=resume_state)
    return last


# ---- configs ------------------------------------------------------------------------------


def validate_search_space(space: Mapping[str, Any]) -> None:
    """Every ``"section.key"`` of a search space must name a config field."""
    defaults = to_dict(ExperimentConfig())
    for key in space:
        section, _, name = key.partition(".")
        if not isinstance(defaults.get(section), dict) or name not in defaults[section]:
            raise ConfigError(f"tune.search_space: {key!r} is not a config key (section.key)")


def replace_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """``config`` with another ``seed`` (a shallow copy; sections are shared, read-only)."""
    return dataclasses.replace(config, seed=int(seed))


def best_trial(trials: Sequence[dict]) -> dict:
    """The best finite score among trials (``tune/trials.json`` rows) that ran every iteration
    (else among all); ties go to the first trial id, which is stable across restores."""
    scored = sorted((t for t in trials if not t["error"] and isinstance(t["score"], (int, float))
                     and math.isfinite(t["score"])), key=lambda t: t["trial_id"])
    if not scored:
        raise DataError("tune", "no trial reported a score (all failed?); see the trial errors above")
    complete = [t for t in scored if t["completed"]] or scored
    return max(complete, key=lambda t: t["score"])  # ties: the first trial id (stable across restores)


def best_config(config: ExperimentConfig, params: dict, output_dir: str | Path) -> ExperimentConfig:
    """The experiment config with the best params and its own ``output_dir``, so a full run
    of it does not skip the stages of the run that searched."""
    best = apply_overrides(config, params)
    best.name = f"{config.name}-tuned"
    best.output_dir = str(output_dir)
    return best
