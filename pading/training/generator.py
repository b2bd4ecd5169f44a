"""Stages 3 and 4: generator training and classifier retraining, interleaved.

:class:`GeneratorTrainer` holds the generator, the generator-side loss (with the
disentangler), the retrained classifier and both optimisers. Each :meth:`~GeneratorTrainer.step`
does one generator step and then one classifier step on the same batch of precomputed query
embeddings, as the authors' release does (docs/method.md "Stages").

Everything here is plain PyTorch: the trainer is built from picklable arguments inside a
Ray worker, and its :meth:`~GeneratorTrainer.state_dict` (tensors, numbers and dicts only,
loadable with ``weights_only=True``) is the checkpoint. Randomness comes from one
``torch.Generator`` seeded from ``config.seed``: it draws a seed per step, from which the
step's noise and class choices are drawn (dedicated generators, so they do not depend on how
many rows a worker holds) and under which dropout runs with the global RNG forked and
restored, so a run repeats exactly and resumes identically from a checkpoint. On the CPU the
dropout masks' uniforms come from a :class:`~pading.model.dropout.UniformTape` seeded alike,
which (from a run's third step on) the step before drew ahead on a helper thread: the same masks,
drawn while the step before computed (docs/performance.md, "Dropout drawn ahead").

:func:`fit_generator` is *the* training loop: the Ray Train stage, Tune trials and the
tables rows all call it. With W > 1 workers (a ``torch.distributed`` process group, e.g.
Ray Train's), every step is synchronised through :mod:`pading.training.distributed` so that W
workers compute exactly what one worker computes on the union of their batches (dropout
masks aside, which each worker draws for its own rows from the step's seed plus its rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pading.classes import ClassTable
from pading.config import ExperimentConfig, GeneratorConfig
from pading.errors import ConfigError, DataError
from pading.model.classifier import (
    Classifier,
    ProjectionClassifier,
    class_weights,
    expand_classifier,
    make_classifier_optimizer,
)
from pading.model.dropout import UniformTape, drawing_from
from pading.model.generator import GMMNGenerator, build_generator
from pading.training.distributed import LocalCollective, PendingSum, default_collective
from pading.training.heap import frozen_heap
from pading.training.objective import LossInputs, PadingLoss

logger = logging.getLogger(__name__)

#: Exclusive upper bound of the per-step seeds drawn from the trainer's generator.
_SEED_BOUND = 2**62
#: With W > 1 workers, a step that needs at least this many class embeddings has each worker project
#: its slice and gathers them (fewer classes: every worker projects all, cheaper than the gather).
SHARDED_PROJECTION_CLASSES = 1024
#: On the CPU each step draws the next step's dropout uniforms ahead, this many times as many as the
#: step before it took (steps vary in rows; a step that needs more draws the rest when it needs it).
AHEAD_MARGIN = 1.25



@dataclasses.dataclass
class _GlobalBatch:
    """Every worker's labels of a step, in rank order, and what follows from them."""

    labels: torch.Tensor  # (N_global,)
    rows_per_worker: list[int]
    seen: torch.Tensor  # (N_global,) bool: matched queries of seen classes

    def seen_per_worker(self) -> list[int]:
        """Matched seen queries of each worker, rank order."""
        return [int(part.sum()) for part in self.seen.split(self.rows_per_worker)]


@dataclasses.dataclass
class StepClasses:
    """What one generator step ranges over (the same on every worker).

    Attributes:
        unseen_set: (U_t,) unseen class indices whose synthetic samples the step uses, in class order.
        seen_candidates: (M,) class indices the seen rows' relation scores range over; None = every class.
        embedded: (P,) class indices whose projected embeddings the step needs, sorted; None = every class.
        num_classes: C.
    """

    unseen_set: torch.Tensor
    seen_candidates: Optional[torch.Tensor]
    embedded: Optional[torch.Tensor]
    num_classes: int

    def positions(self, class_indices: torch.Tensor) -> torch.Tensor:
        """Places of ``class_indices`` in ``embedded`` (the class indices themselves when every class is embedded)."""
        if self.embedded is None:
            return class_indices
        lookup = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.embedded.device)
        lookup[self.embedded] = torch.arange(self.embedded.numel(), device=self.embedded.device)
        positions = lookup[class_indices]
        if bool((positions < 0).any()):
            raise DataError("StepClasses", f"classes {class_indices[positions < 0].tolist()[:10]} are not embedded")
        return positions


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Run the body with the global RNG (CPU, and ``device`` when CUDA) seeded by ``seed``,
    restoring the previous RNG state afterwards."""
    cuda_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda_devices:
            with torch.cuda.device(cuda_devices[0]):
                torch.cuda.manual_seed(seed)
        yield


class GeneratorTrainer:
    """Generator + classifier training state for one experiment.

    Args:
        table: the class vocabulary (seen/unseen membership, no-object index).
        class_semantics: (C, S) semantic embeddings a_c in table order.
        embed_dim: D, size of the query embeddings.
        config: the experiment config (generator, losses, generator_training, seed).
        class_head: the segmenter's pretrained class head ``Linear(D, C'+1)`` to initialise
            the classifier from (C' < C when the table's last classes are ``added`` ones, appended
            after pretraining by ``vocabulary.extra_unseen``: they get new rows); None starts from a
            fresh linear layer.
        device: where to train; default ``class_semantics.device``.
        collective: how workers synchronise (:mod:`pading.training.distributed`); default
            :func:`~pading.training.distributed.default_collective` (the process group, if any).

    The variant (``config.losses.variant``) picks the generator: ``gmmn`` forces the GMMN
    baseline, ``primitive`` the primitive generator, ``alignment``/``full`` use
    ``config.generator.kind``; ``projection`` trains a :class:`ProjectionClassifier` and no
    generator.
    """

    def __init__(
        self,
        table: ClassTable,
        class_semantics: torch.Tensor,
        embed_dim: int,
        config: ExperimentConfig,
        class_head: Optional[nn.Linear] = None,
        *,
        device: Optional[torch.device] = None,
        collective: Optional[LocalCollective] = None,
    ):
        if class_semantics.dim() != 2 or class_semantics.shape[0] != table.num_classes:
            raise DataError(
                "class_semantics",
                f"expected ({table.num_classes}, S) semantic embeddings for the class table, "
                f"got {tuple(class_semantics.shape)}",
            )
        self.table = table
        self.config = config
        self.collective = collective if collective is not None else default_collective()
        self.embed_dim = embed_dim
        self.variant = config.losses.variant
        self.device = torch.device(device) if device is not None else class_semantics.device
        self.num_classes = table.num_classes
        self.class_semantics = class_semantics.detach().to(self.device, torch.float32)  # (C, S)
        training = config.generator_training
        seen_mask = torch.zeros(self.num_classes, dtype=torch.bool)
        seen_mask[torch.tensor(table.seen_indices, dtype=torch.long)] = True
        self.seen_mask = seen_mask.to(self.device)  # (C,)
        self.unseen_indices = torch.tensor(table.unseen_indices, dtype=torch.long, device=self.device)  # (U,)
        self.class_weights = class_weights(table, training).to(self.device)  # (C+1,)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.step_count = 0
        self._next_tape: Optional[UniformTape] = None  # the next step's dropout uniforms, being drawn
        self._last_tape_use = 0

        semantic_dim = int(class_semantics.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(config.seed)  # repeatable initialisation
            if self.variant == "projection":
                self.generator = None
                self.loss = None
                self.classifier = ProjectionClassifier(
                    embed_dim, self.class_semantics.cpu(), temperature=training.projection_temperature
                )
            else:
                self.generator = build_generator(self.generator_config(config), semantic_dim, embed_dim)
                self.loss = PadingLoss(config.losses, embed_dim)
                self.classifier = (
                    Classifier.from_class_head(class_head)
                    if class_head is not None
                    else Classifier(embed_dim, self.num_classes)
                )
                dataset_classes = sum(not c.added for c in table)
                if class_head is not None and self.classifier.num_classes == dataset_classes < self.num_classes:
                    # classes appended to the dataset's after pretraining (vocabulary.extra_unseen): new rows
                    self.classifier = expand_classifier(self.classifier, self.num_classes,
                                                        generator=torch.Generator().manual_seed(config.seed))
        if self.classifier.num_classes != self.num_classes or self.classifier.embed_dim != embed_dim:
            raise DataError(
                "class_head",
                f"expected a head Linear({embed_dim}, {self.num_classes + 1}), got "
                f"Linear({self.classifier.embed_dim}, {self.classifier.num_classes + 1})",
            )
        self.classifier.to(self.device)
        self.classifier_optimizer = make_classifier_optimizer(self.classifier, training)
        self.generator_optimizer = None
        self.generator_scheduler = None
        if self.generator is not None:
            self.generator.to(self.device)
            self.loss.to(self.device)
            parameters = list(self.generator.parameters()) + list(self.loss.parameters())
            self.generator_optimizer = torch.optim.Adam(
                parameters, lr=training.generator_lr, fused=True)  # one fused kernel: 6.6 ms a step with foreach, 1.5 fused (CPU)
            milestones = sorted(
                {max(1, int(round(fraction * training.iterations))) for fraction in training.lr_decay_at}
            )
            self.generator_scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.generator_optimizer, milestones=milestones, gamma=training.lr_decay_factor
            )

    @staticmethod
    def generator_config(config: ExperimentConfig) -> GeneratorConfig:
        """The generator settings with the kind the ablation variant implies."""
        forced = {"gmmn": "gmmn", "primitive": "primitive"}.get(config.losses.variant)
        if forced is not None and forced != config.generator.kind:
            logger.info(
                "losses.variant=%s uses the %s generator (generator.kind=%s ignored)",
                config.losses.variant,
                forced,
                config.generator.kind,
            )
            return dataclasses.replace(config.generator, kind=forced)
        return config.generator

    # ---- training ----------------------------------------------------------------------

    def _check_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        source = f"GeneratorTrainer.step batch (step {self.step_count})"
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise DataError(
                source, f"expected embeddings of shape (N, {self.embed_dim}), got {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise DataError(source, f"expected labels of shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or (labels.numel() and (int(labels.min()) < 0 or
                                                                   int(labels.max()) > self.num_classes)):
            raise DataError(
                source, f"labels must be integers in [0, {self.num_classes}] ({self.num_classes} = no object)"
            )

    def step(self, embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One generator step, then one classifier step, on the same batch.

        With W workers, every worker calls this with its own rows; the step is the one a
        single worker would take on all of them (module docstring).

        Args:
            embeddings: (N, D) query embeddings of the batch's images (all queries).
            labels: (N,) matched class index, or ``table.no_object_index`` for unmatched queries.
        Returns:
            floats for logging: ``generator/<term>`` (see :class:`~pading.training.objective.PadingLoss`),
            ``generator/lr``, ``classifier/loss``, ``classifier/num_synthetic``, ``step``.
        """
        self._check_batch(embeddings, labels)
        embeddings = embeddings.detach().to(self.device, torch.float32)
        labels = labels.to(self.device, torch.long)
        step_seed = int(torch.randint(0, _SEED_BOUND, (1,), generator=self.rng))
        tape = self._dropout_tape(step_seed + self.collective.rank)
        rows_per_worker = self.collective.row_counts(labels.numel())
        if sum(rows_per_worker) == 0:  # decided on every worker alike (a worker may hold no rows)
            raise DataError(f"GeneratorTrainer.step batch (step {self.step_count})", "the batch is empty")
        all_labels = self.collective.gather(labels, sizes=rows_per_worker)  # (N_global,) rank order
        batch = _GlobalBatch(all_labels, rows_per_worker, self._seen_rows(all_labels))
        metrics: dict[str, float] = {}
        with _seeded_global_rng(step_seed + self.collective.rank, self.device), drawing_from(tape):
            pending = None
            if self.generator is not None:
                generator_metrics, pending = self._generator_step(embeddings, labels, batch, step_seed)
                metrics.update(generator_metrics)
            # the classifier's real rows need no generator: their pass runs while the generator's
            # gradients are summed over the workers; its synthetic rows wait for the updated generator
            real = self._classifier_real_rows(embeddings, labels)
            if pending is not None:
                pending.wait()
                self.generator_optimizer.step()
            if self.generator_scheduler is not None:  # counts trainer steps: a step without seen rows too
                self._step_scheduler(updated=pending is not None)
            metrics.update(self._classifier_step(real, batch, step_seed))
        self._last_tape_use = tape.used
        self.step_count += 1
        metrics["step"] = float(self.step_count)
        return metrics

    def _step_scheduler(self, updated: bool) -> None:
        """One step of the generator's learning-rate schedule. Before the optimiser's first
        update (the first steps had no seen rows), torch would warn that the scheduler stepped
        first: that order is meant here, so the warning is silenced for those steps only."""
        if updated or getattr(self.generator_optimizer, "_opt_called", False):
            self.generator_scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`", category=UserWarning)
            self.generator_scheduler.step()

    def _dropout_tape(self, seed: int) -> UniformTape:
        """The step's dropout uniforms, a stream seeded with ``seed`` (this worker's: the step's seed
        plus its rank). On the CPU the step before drew them ahead (from the third step of a run or
        resumed run on: before, no step's use is known yet), and this step starts drawing the next
        step's (``AHEAD_MARGIN`` times what the step before took), whose seed the trainer's
        generator already fixes: peeked here, drawn again by the next step."""
        tape, self._next_tape = self._next_tape, None
        if tape is None or tape.seed != seed:  # the first step, or one after load_state_dict
            tape = UniformTape(seed)
        if self.device.type == "cpu":
            state = self.rng.get_state()
            upcoming = int(torch.randint(0, _SEED_BOUND, (1,), generator=self.rng)) + self.collective.rank
            self.rng.set_state(state)
            self._next_tape = UniformTape(upcoming, ahead=int(self._last_tape_use * AHEAD_MARGIN))
        return tape

    def _seen_rows(self, labels: torch.Tensor) -> torch.Tensor:
        """(N,) bool: matched queries of seen classes."""
        matched = labels < self.num_classes
        seen = matched.clone()
        seen[matched] = self.seen_mask[labels[matched]]
        return seen

    def _draw_noise(self, generator: torch.Generator, num_rows: int, rows: slice) -> torch.Tensor:
        """Standard-normal generator noise for ``num_rows`` samples drawn from ``generator``,
        of which the ``rows`` slice is returned: (L, n, D) for the primitive generator,
        (n, S) for GMMN. Drawing for the global batch and slicing makes a worker's noise the
        noise the one-worker run gives the same rows."""
        if isinstance(self.generator, GMMNGenerator):
            shape = (num_rows, self.generator.semantic_dim)
            return torch.randn(shape, generator=generator)[rows].to(self.device)
        shape = (self.generator.num_layers, num_rows, self.embed_dim)
        return torch.randn(shape, generator=generator)[:, rows].to(self.device)

    def _share(self, num_rows: int) -> tuple[slice, list[int]]:
        """This worker's contiguous slice of ``num_rows`` rows that every worker knows, and
        every worker's row count (rank order)."""
        world, rank = self.collective.world_size, self.collective.rank
        per = -(-num_rows // world)
        counts = [max(0, min(num_rows, (r + 1) * per) - r * per) for r in range(world)]
        start = sum(counts[:rank])
        return slice(start, start + counts[rank]), counts

    def _step_classes(self, all_seen_labels: torch.Tensor, step_seed: int) -> StepClasses:
        """The classes this step's relation and alignment terms range over (identical on every
        worker): the unseen set (``losses.unseen_class_sample``), the seen rows' relation
        candidates (``losses.relation_class_sample``: the batch's classes plus a uniform sample
        of the others) and the classes whose projected embeddings the step needs."""
        cfg = self.config.losses
        device = self.device
        chooser = torch.Generator().manual_seed(step_seed + 2)
        num_unseen = self.unseen_indices.numel()
        unseen_set = self.unseen_indices[:0]
        if self.loss.uses_alignment and num_unseen:
            unseen_set = self.unseen_indices
            if 0 < cfg.unseen_class_sample < num_unseen:
                picked = torch.randperm(num_unseen, generator=chooser)[: cfg.unseen_class_sample]
                unseen_set = self.unseen_indices[picked.sort().values.to(device)]  # (U_t,) in class order
        candidates = None
        if self.loss.uses_disentanglement and 0 < cfg.relation_class_sample < self.num_classes:
            batch_classes = torch.unique(all_seen_labels)  # (b,) sorted
            in_batch = torch.zeros(self.num_classes, dtype=torch.bool)
            in_batch[batch_classes.cpu()] = True
            order = torch.randperm(self.num_classes, generator=chooser)
            others = order[~in_batch[order]][: max(0, cfg.relation_class_sample - batch_classes.numel())]
            candidates = torch.cat([batch_classes, others.to(device)]).sort().values  # (M,) class indices
        if not self.loss.uses_alignment or (self.loss.uses_disentanglement and candidates is None):
            embedded = None  # every class (or, without alignment, none is used): positions are class indices
        else:
            parts = [all_seen_labels, unseen_set] + ([candidates] if candidates is not None else [])
            embedded = torch.unique(torch.cat(parts))
        return StepClasses(unseen_set=unseen_set, seen_candidates=candidates, embedded=embedded,
                           num_classes=self.num_classes)

    def _generator_step(self, embeddings: torch.Tensor, labels: torch.Tensor, batch: "_GlobalBatch",
                        step_seed: int) -> tuple[dict[str, float], Optional[PendingSum]]:
        """The generator's forward and backward passes; returns the metrics and the gradient
        sum in flight (the optimiser steps once it is done)."""
        seen = self._seen_rows(labels)  # (N,)
        all_seen_labels = batch.labels[batch.seen]  # (n_global,)
        metrics = {"generator/lr": float(self.generator_optimizer.param_groups[0]["lr"])}
        if all_seen_labels.numel() == 0:  # the same decision on every worker
            logger.debug("step %d: no matched seen queries, generator step skipped", self.step_count)
            return metrics, None
        self.generator.train()
        self.loss.train()
        seen_labels = labels[seen]  # (n,) this worker's
        seen_counts = batch.seen_per_worker()
        offset = sum(seen_counts[: self.collective.rank])
        own_seen = slice(offset, offset + seen_labels.numel())
        num_seen = all_seen_labels.numel()
        classes = self._step_classes(all_seen_labels, step_seed)
        own_unseen, unseen_counts = self._share(classes.unseen_set.numel())
        noise = torch.Generator().manual_seed(step_seed)
        seen_noise = self._draw_noise(noise, num_seen, own_seen)
        unseen_noise = self._draw_noise(noise, classes.unseen_set.numel(), own_unseen)
        unrelated_seen = unrelated_unseen = None
        if self.loss.uses_disentanglement:  # ε of L_unrel, per global row
            unrelated_seen = torch.randn((num_seen, self.embed_dim), generator=noise)[own_seen].to(self.device)
            unrelated_unseen = torch.randn((classes.unseen_set.numel(), self.embed_dim),
                                           generator=noise)[own_unseen].to(self.device)
        unseen_labels = classes.unseen_set[own_unseen]  # (u,)
        # one generator pass over this worker's seen and unseen rows (the primitives' keys and values once)
        synthetic = self.generator(self.class_semantics[torch.cat([seen_labels, unseen_labels])],
                                   torch.cat([seen_noise, unseen_noise], dim=-2))  # (n + u, D)
        synthetic_seen, synthetic_unseen = synthetic.split([seen_labels.numel(), unseen_labels.numel()])
        embedded = classes.embedded
        semantics = self.class_semantics if embedded is None else self.class_semantics[embedded]  # (P, S)
        if not self.loss.uses_alignment:
            semantics = semantics[:0]  # the MMD-only variants use no class embedding
        class_rows = None
        if self.collective.world_size > 1 and semantics.shape[0] >= SHARDED_PROJECTION_CLASSES:
            own_classes, class_rows = self._share(semantics.shape[0])  # each worker projects its slice
            semantics = semantics[own_classes]
        class_embeddings = self.generator.project(semantics)  # (P, D), or this worker's slice of it
        classify = None
        if self.config.losses.auxiliary_classification_weight > 0:  # the classifier as a constant here
            weight, bias = self.classifier.linear.weight.detach(), self.classifier.linear.bias.detach()
            classify = lambda features: F.linear(features, weight, bias)  # noqa: E731
        result = self.loss(LossInputs(
            real_seen=embeddings[seen], synthetic_seen=synthetic_seen, seen_labels=seen_labels,
            seen_positions=classes.positions(seen_labels), synthetic_unseen=synthetic_unseen,
            unseen_positions=classes.positions(unseen_labels),
            unseen_candidates=classes.positions(classes.unseen_set), class_embeddings=class_embeddings,
            num_seen_total=num_seen, num_unseen_total=classes.unseen_set.numel(),
            seen_candidates=None if classes.seen_candidates is None else classes.positions(classes.seen_candidates),
            seen_positions_total=classes.positions(all_seen_labels), seen_rows_per_worker=seen_counts,
            unseen_rows_per_worker=unseen_counts, class_rows_per_worker=class_rows, classify=classify,
            unrelated_noise_seen=unrelated_seen, unrelated_noise_unseen=unrelated_unseen,
        ), self.collective)
        self.generator_optimizer.zero_grad(set_to_none=True)
        result.backward()
        terms = result.terms
        del result  # frees the retained graph
        pending = self.collective.sum_gradients_async(self._generator_parameters())
        metrics.update({f"generator/{name}": value for name, value in terms.items()})
        metrics["generator/num_real_seen"] = float(num_seen)
        metrics["generator/num_unseen_in_step"] = float(classes.unseen_set.numel())
        return metrics, pending

    def _generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.loss.parameters())

    def _synthetic_per_class(self, all_labels: torch.Tensor) -> int:
        configured = self.config.generator_training.synthetic_per_unseen_class
        if configured > 0:
            return configured
        matched = all_labels[all_labels < self.num_classes]
        if matched.numel() == 0:
            return 1
        return max(1, matched.numel() // int(torch.unique(matched).numel()))

    def _classifier_real_rows(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward pass of Σ_i w_i CE_i over this worker's real rows (not yet divided by the
        global weight); returns (that sum, Σ_i w_i), detached."""
        self.classifier.train()
        self.classifier_optimizer.zero_grad(set_to_none=True)
        weights = self.class_weights[labels]  # (N,)
        numerator = (weights * F.cross_entropy(self.classifier(embeddings), labels, reduction="none")).sum()
        numerator.backward()
        return numerator.detach(), weights.sum()

    def _classifier_step(self, real: tuple[torch.Tensor, torch.Tensor], batch: "_GlobalBatch",
                         step_seed: int) -> dict[str, float]:
        """Weighted cross-entropy over the global batch (real rows of every worker plus the
        synthetic unseen rows of the step's chosen classes, which the workers split between
        them): Σ_i w_i CE_i / Σ_i w_i. A worker's gradient share is its rows' numerator; the
        shares, the numerators and the real weights are summed in one all-reduce and the
        gradient is divided by the global weight."""
        numerator, real_weight = real
        num_unseen = self.unseen_indices.numel()
        count = min(self.config.generator_training.unseen_classes_per_step, num_unseen)
        synthetic_weight_total = self.class_weights.new_zeros(())
        num_synthetic = 0
        if self.generator is not None and count > 0:
            choices = torch.Generator().manual_seed(step_seed + 1)
            chosen = self.unseen_indices[torch.randperm(num_unseen, generator=choices)[:count].to(self.device)]  # (n,)
            per_class = self._synthetic_per_class(batch.labels)
            all_targets = chosen.repeat_interleave(per_class)  # (n*per_class,) every worker's synthetic rows
            own, _ = self._share(all_targets.numel())
            noise = self._draw_noise(choices, all_targets.numel(), own)
            targets = all_targets[own]
            with torch.no_grad():
                synthetic = self.generator(self.class_semantics[targets], noise)  # (m, D)
            if targets.numel():
                weights = self.class_weights[targets]  # (m,)
                part = (weights * F.cross_entropy(self.classifier(synthetic), targets, reduction="none")).sum()
                part.backward()
                numerator = numerator + part.detach()
            synthetic_weight_total = self.class_weights[all_targets].sum()
            num_synthetic = all_targets.numel()
        totals = self.collective.sum_gradients(self.classifier.parameters(), torch.stack([numerator, real_weight]))
        denominator = totals[1] + synthetic_weight_total
        for parameter in self.classifier.parameters():
            if parameter.grad is not None:
                parameter.grad.div_(denominator)
        self.classifier_optimizer.step()
        return {"classifier/loss": float(totals[0] / denominator), "classifier/num_synthetic": float(num_synthetic)}

    # ---- sampling ----------------------------------------------------------------------

    def synthesize_from_semantics(
        self, semantic: torch.Tensor, per_class: int, *, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """``per_class`` synthetic embeddings of each row of ``semantic`` (M, S) ->
        (M*per_class, D), class-major; noise from ``generator`` (default: the global RNG).
        The generator stays in training mode (dropout on, the distribution MMD matched)."""
        if self.generator is None:
            raise ConfigError("losses.variant=projection trains no generator; nothing to synthesise")
        if per_class < 1:
            raise DataError("synthesize", f"per_class must be >= 1, got {per_class}")
        semantic = semantic.to(self.device, torch.float32)
        with torch.no_grad():
            return self.generator(semantic.repeat_interleave(per_class, dim=0), generator=generator)  # (M*per_class, D)

    def synthesize(
        self, class_indices: torch.Tensor, per_class: int, *, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Synthetic embeddings (M*per_class, D) of table classes ``class_indices`` (M,), class-major."""
        class_indices = class_indices.to(self.device, torch.long)
        if class_indices.numel() and (int(class_indices.min()) < 0 or int(class_indices.max()) >= self.num_classes):
            raise DataError(
                "synthesize", f"class indices must be in [0, {self.num_classes - 1}], got {class_indices.tolist()}"
            )
        return self.synthesize_from_semantics(self.class_semantics[class_indices], per_class, generator=generator)

    # ---- checkpointing -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, optimiser/scheduler states, step count and
        RNG state (plain tensors/numbers/dicts; ``torch.load(..., weights_only=True)`` safe)."""
        state = {
            "variant": self.variant,
            "step": self.step_count,
            "rng_state": self.rng.get_state(),
            "classifier": self.classifier.state_dict(),
            "classifier_optimizer": self.classifier_optimizer.state_dict(),
        }
        if self.generator is not None:
            state["generator"] = self.generator.state_dict()
            state["loss"] = self.loss.state_dict()
            state["generator_optimizer"] = self.generator_optimizer.state_dict()
            state["generator_scheduler"] = self.generator_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a trainer built with the same config."""
        if state.get("variant") != self.variant:
            raise DataError(
                "trainer checkpoint",
                f"was saved for variant {state.get('variant')!r}, this trainer is {self.variant!r}",
            )
        self.classifier.load_state_dict(state["classifier"])
        self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
            self.loss.load_state_dict(state["loss"])
            self.generator_optimizer.load_state_dict(state["generator_optimizer"])
            self.generator_scheduler.load_state_dict(state["generator_scheduler"])
        self.rng.set_state(state["rng_state"])
        self.step_count = int(state["step"])


StepCallback = Callable[[GeneratorTrainer, dict], None]


def fit_generator(
    trainer: GeneratorTrainer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    iterations: int,
    *,
    on_step: Optional[StepCallback] = None,
) -> dict[str, float]:
    """The generator/classifier training loop: ``trainer.step`` on each batch until
    ``trainer.step_count == iterations`` (a resumed trainer continues from its count);
    ``on_step(trainer, metrics)`` after every step (logging, checkpoints, Tune reports).

    Args:
        trainer: the state to train; its collective synchronises the workers.
        batches: ``(embeddings (n, D), labels (n,))`` of this worker, e.g.
            :func:`pading.data.features.feature_batches` started at ``trainer.step_count``.
        iterations: the step count to reach.
    Returns:
        the last step's metrics.
    """
    metrics: dict[str, float] = {}
    if trainer.step_count >= iterations:
        return metrics
    with frozen_heap():  # full collections skip the process's modules (pading.training.heap)
        for embeddings, labels in batches:
            metrics = trainer.step(embeddings.to(trainer.device), labels.to(trainer.device))
            if on_step is not None:
                on_step(trainer, metrics)
            if trainer.step_count >= iterations:
                return metrics
    raise DataError("generator training", f"the batches ran out at step {trainer.step_count} of {iterations}")
