"""Stage 1: segmenter pretraining on the seen-only manifest: the step (:func:`pretrain_step`)
and the loop (:func:`fit_segmenter`, state in :class:`SegmenterTrainer`), without Ray; the
Ray Train stage (pipelines/pretrain.py) runs the same loop on every worker."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pading.classes import ClassTable
from pading.config import ExperimentConfig, PretrainConfig
from pading.data.features import epoch_indices
from pading.data.manifest import load_sample
from pading.errors import ConfigError, DataError
from pading.model.segmenter import prepare_batch
from pading.training.distributed import LocalCollective, default_collective
from pading.training.heap import frozen_heap

logger = logging.getLogger(__name__)

#: Loss terms :func:`pretrain_step` returns (``loss`` is the weighted total).
LOGGED_TERMS = ("loss", "loss_cross_entropy", "loss_mask", "loss_dice")


class DecodedSamples:
    """Decoded images and crowd-free targets of manifest rows, kept up to a byte budget.

    Pretraining draws every image once per epoch, so decoding it again in every epoch is
    host-side work the step waits for. Rows are kept in the order they are first loaded until
    ``budget_mb`` is used, then the rest is decoded each time (with random epochs any row is
    as likely as another, so no eviction beats filling once). The arrays are handed out, never
    changed: a cached row gives exactly what decoding it again would. Failures are not kept:
    a bad row is reported each time it is drawn."""

    def __init__(self, table: ClassTable, data_format: str, *, budget_mb: float):
        self.table, self.data_format = table, data_format
        self.budget = int(budget_mb * (1 << 20))
        self.used = 0
        self.samples: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def load(self, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, masks (N, H, W) bool, labels (N,)) of ``row``; raises
        DataError like :func:`pading.data.manifest.load_sample`."""
        key = (row.get("image_id"), row.get("image_path"))
        sample = self.samples.get(key)
        if sample is None:
            image, target = load_sample(row, self.table, self.data_format)
            target = target.without_crowd()
            sample = (image, target.masks, target.labels)
            size = sum(array.nbytes for array in sample)
            if self.used + size <= self.budget:
                self.samples[key] = sample
                self.used += size
        return sample


def load_training_batch(
    rows: Sequence[dict], table: ClassTable, data_format: str, image_size: int,
    *, samples: Optional[DecodedSamples] = None,
) -> tuple[dict | None, list[dict]]:
    """Images and crowd-free targets of manifest ``rows`` as a segmenter batch.

    Rows that fail to load are returned as reject rows (``source``, ``key``, ``reason``)
    instead of stopping the step. Returns ``(None, rejects)`` when no row loads. ``samples``
    keeps decoded rows for later epochs (default: decode every row now).
    """
    samples = samples if samples is not None else DecodedSamples(table, data_format, budget_mb=0)
    images, targets, sources, rejects = [], [], [], []
    for row in rows:
        try:
            image, masks, labels = samples.load(row)
        except DataError as err:
            logger.warning("skipping %s: %s", err.source, err.reason)
            rejects.append({"source": err.source, "key": f"image_id={row.get('image_id')}", "reason": err.reason})
            continue
        except Exception as err:  # noqa: BLE001 - a file that breaks a decoder is a reject, as in validation
            source, reason = str(row.get("image_path")), f"cannot load: {type(err).__name__}: {err}"
            logger.warning("skipping %s: %s", source, reason)
            rejects.append({"source": source, "key": f"image_id={row.get('image_id')}", "reason": reason})
            continue
        images.append(image)
        targets.append((masks, labels))
        sources.append(str(row.get("image_path")))
    if not images:
        return None, rejects
    return prepare_batch(images, image_size, targets, sources=sources), rejects


class SegmenterLoss(nn.Module):
    """``forward`` = the segmenter's training loss, so DistributedDataParallel can wrap it
    (DDP synchronises gradients through ``forward``)."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values, mask_labels, class_labels, num_masks=None) -> dict[str, torch.Tensor]:
        return self.segmenter.compute_loss(pixel_values, mask_labels, class_labels, num_masks=num_masks)


def build_pretrain_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW (docs/method.md "Optimisation": lr 1e-4, weight decay 0.05); no decay on norms and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or "norm" in name else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        fused=True,  # one fused kernel over the ~160 tensors: 4.6 ms a step with foreach, 1.2 ms fused (CPU)
    )


def learning_rate(config: PretrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): a linear warm-up over ``warmup_steps``,
    then ``lr * (1 - step / iterations) ** lr_power`` (poly, Mask2Former's) or ``lr``. A
    function of the step only, so a resumed run continues the schedule exactly."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.lr_schedule == "constant":
        return config.lr * warmup
    return config.lr * warmup * max(0.0, 1.0 - step / config.iterations) ** config.lr_power


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The RNG seed of global micro-batch ``index`` of step ``step`` (point sampling and
    dropout in the loss). A function of the global index only, so rank r of W workers with M
    micro-batches each (indices r*M .. r*M+M-1) draws what one worker accumulating W*M
    micro-batches draws for the same rows."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def pretrain_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: dict | Sequence[dict],
    grad_clip: float | None = None,
    seeds: Optional[Sequence[int]] = None,
    num_masks: Optional[float] = None,
) -> dict[str, float]:
    """One optimisation step of the segmenter on one batch or on micro-batches whose
    gradients are averaged (gradient accumulation), each from :func:`load_training_batch`.

    ``model`` is a :class:`SegmenterLoss` or a DistributedDataParallel wrapper of one: DDP
    averages the gradients over the workers in the last micro-batch's ``backward`` (the
    others run under ``no_sync``), so W workers with M micro-batches each take the step one
    worker takes accumulating the W*M micro-batches (BatchNorm statistics are per
    micro-batch in both). ``seeds[m]`` seeds micro-batch m's randomness (see
    :func:`micro_batch_seed`). ``num_masks`` divides every micro-batch's mask and dice terms
    (default: each micro-batch's own target count); :func:`fit_segmenter` passes the step's
    count over all workers and micro-batches over their number, so those terms are the mean
    over every target of the global batch, as in Mask2Former. Returns the loss terms averaged
    over the micro-batches (``loss`` is the weighted total).
    """
    micro_batches = [batches] if isinstance(batches, dict) else list(batches)
    if not micro_batches:
        raise DataError("pretrain_step", "no micro-batch")
    if seeds is not None and len(seeds) != len(micro_batches):
        raise DataError("pretrain_step", f"{len(seeds)} seeds for {len(micro_batches)} micro-batches")
    device = next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        rng = _seeded(seeds[index], device) if seeds is not None else contextlib.nullcontext()
        with sync, rng:
            pixel_values = batch["pixel_values"].to(device)  # (B, 3, S, S)
            mask_labels = [m.to(device) for m in batch["mask_labels"]]  # B x (N_i, S, S)
            class_labels = [c.to(device) for c in batch["class_labels"]]  # B x (N_i,)
            losses = model(pixel_values, mask_labels, class_labels, num_masks=num_masks)
            (losses["loss"] / len(micro_batches)).backward()
        for key, value in losses.items():
            if key in LOGGED_TERMS:
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / len(micro_batches)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return totals


class WeightAverage:
    """An exponential moving average of a model's floating-point state (weights and
    BatchNorm statistics); integer buffers are copied. ``update`` after each optimiser step
    ``t`` (1-based) uses ``min(decay, (1 + t) / (10 + t))``, so early steps, when the
    average would mostly remember the random initialisation, count more. The average is
    what the pretraining stage saves when ``pretrain.ema_decay`` > 0, in place of the last
    step's weights (one noisy point of a constant-rate trajectory). On the demo it did not
    make the unseen score steadier over seeds (docs/experiments.md, "What makes the
    demo's numbers move"), so it is off by default."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        for key, value in model.state_dict().items():
            average = self.state[key]
            if average.is_floating_point():
                average.mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) ^ set(state)
        if missing:
            raise DataError("weight average", f"keys differ from the model's: {sorted(missing)[:5]}")
        for key, value in state.items():
            self.state[key].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        """Loads the average into ``model``."""
        model.load_state_dict(self.state)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


#: Consecutive global batches with no loadable image before :func:`fit_segmenter` gives up.
MAX_EMPTY_BATCHES = 50


def micro_batch_rows(config: ExperimentConfig, world: int) -> int:
    """Images per micro-batch: the global ``pretrain.batch_size`` over ``world`` workers x
    ``pretrain.grad_accumulation`` micro-batches (must divide evenly)."""
    parts = world * config.pretrain.grad_accumulation
    if config.pretrain.batch_size % parts:
        raise ConfigError(
            f"pretrain.batch_size={config.pretrain.batch_size} does not split into ray.num_workers={world} x "
            f"pretrain.grad_accumulation={config.pretrain.grad_accumulation} equal micro-batches")
    return config.pretrain.batch_size // parts


class SegmenterTrainer:
    """The state of a pretraining run: the segmenter, the module that computes its loss (the
    segmenter's :class:`SegmenterLoss`, or a DistributedDataParallel wrapper of it on W
    workers), the optimiser, the optional weight average, the step count and the history.

    Args:
        segmenter: the model to train (its initial weights must be equal on every worker).
        config: the experiment's settings (``pretrain``, ``seed``).
        model: what ``pretrain_step`` calls; default ``SegmenterLoss(segmenter)`` (one process).
    """

    def __init__(self, segmenter: nn.Module, config: ExperimentConfig, *, model: Optional[nn.Module] = None):
        self.segmenter = segmenter
        self.config = config
        self.model = model if model is not None else SegmenterLoss(segmenter)
        self.optimizer = build_pretrain_optimizer(self.model, config.pretrain)
        self.average = WeightAverage(segmenter, config.pretrain.ema_decay) if config.pretrain.ema_decay else None
        self.step_count = 0
        self.batches_drawn = 0  # global batches drawn, including skipped ones (where to resume the order)
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        """Everything a resumed run needs, tensors and numbers only (``torch.load(weights_only=True)``)."""
        state = {"model": self.segmenter.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step_count, "batches_drawn": self.batches_drawn}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def load_state_dict(self, state: dict, history: Sequence[dict] = ()) -> None:
        self.segmenter.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        self.step_count = int(state["step"])
        self.batches_drawn = int(state.get("batches_drawn", state["step"]))
        self.history = list(history)

    def result(self) -> nn.Module:
        """The segmenter the stage saves: the weight average when ``pretrain.ema_decay`` > 0,
        else the segmenter itself."""
        if self.average is None:
            return self.segmenter
        saved = copy.deepcopy(self.segmenter)
        self.average.copy_to(saved)
        return saved


def fit_segmenter(
    trainer: SegmenterTrainer,
    rows: Sequence[dict],
    table: ClassTable,
    *,
    rank: int = 0,
    world: int = 1,
    collective: Optional[LocalCollective] = None,
    before_step: Optional[Callable[[SegmenterTrainer], None]] = None,
    on_step: Optional[Callable[[SegmenterTrainer, dict], None]] = None,
) -> dict[str, float]:
    """The pretraining loop: ``pretrain_step`` on global batches of the train manifest until
    ``trainer.step_count == pretrain.iterations`` (a resumed trainer continues from its
    count), without Ray: the Ray Train stage (pipelines/pretrain.py) calls it on every worker.

    Every worker draws the same global batch of ``pretrain.batch_size`` images per step
    (seeded epochs, :func:`pading.data.features.epoch_indices`); worker ``rank`` of ``world``
    trains on its slice, ``pretrain.grad_accumulation`` micro-batches of it, and the model's
    DDP wrapper averages the gradients. So the steps do not depend on the number of workers
    (docs/architecture.md, "Distributed training"). A global batch in which some worker has no
    loadable image is skipped by every worker (decided through ``collective``); more than
    :data:`MAX_EMPTY_BATCHES` in a row stop the run.

    Args:
        rows: the train manifest's rows (:func:`pading.run.read_manifest`).
        table: the run's class table.
        collective: how the workers agree on skipping a batch; default
            :func:`pading.training.distributed.default_collective`.
        before_step: called before each step is taken (test hooks).
        on_step: called after each step with its history row (logging, checkpoints).
    Returns:
        the last step's history row (empty when there was nothing left to do).
    """
    config = trainer.config
    collective = collective if collective is not None else default_collective()
    accumulation = config.pretrain.grad_accumulation
    per_micro = micro_batch_rows(config, world)
    iterations = config.pretrain.iterations
    started, first_step, last = time.time(), trainer.step_count, {}
    if trainer.step_count >= iterations:
        return last
    empty_in_a_row = 0
    samples = DecodedSamples(table, config.data.format, budget_mb=config.pretrain.decoded_cache_mb)
    with frozen_heap():  # full collections skip the process's modules (pading.training.heap)
        for global_batch in epoch_indices(len(rows), config.pretrain.batch_size, seed=config.seed,
                                          start_step=trainer.batches_drawn, drop_last=True):
            trainer.batches_drawn += 1
            mine = global_batch[rank * accumulation * per_micro:][: accumulation * per_micro]
            micro = [load_training_batch([rows[i] for i in mine[m * per_micro:][:per_micro]], table,
                                         config.data.format, config.data.image_size, samples=samples)[0]
                     for m in range(accumulation)]
            # one collective: whether every worker has images, and the step's target count over all of them
            usable = torch.tensor([float(all(b is not None for b in micro)),
                                   float(sum(len(labels) for b in micro if b is not None for labels in b["class_labels"]))])
            usable = collective.all_reduce_sum(usable)
            if float(usable[0].item()) < collective.world_size:  # some worker has none
                empty_in_a_row += 1
                if empty_in_a_row > MAX_EMPTY_BATCHES:
                    raise DataError("pretrain", f"no usable image in the last {MAX_EMPTY_BATCHES} batches "
                                                "(see the log for the reasons)")
                continue
            empty_in_a_row = 0
            if before_step is not None:
                before_step(trainer)
            step = trainer.step_count
            seeds = [micro_batch_seed(config.seed, step, rank * accumulation + m) for m in range(accumulation)]
            set_learning_rate(trainer.optimizer, learning_rate(config.pretrain, step))
            # the mask terms' divisor: every target of the global batch counts once (DDP then averages
            # the W workers' gradients of M micro-batches each), as Mask2Former all-reduces num_masks
            num_masks = max(float(usable[1].item()) / (collective.world_size * accumulation), 1.0)
            losses = pretrain_step(trainer.model, trainer.optimizer, micro, grad_clip=config.pretrain.grad_clip,
                                   seeds=seeds, num_masks=num_masks)
            trainer.step_count = step + 1
            if trainer.average is not None:
                trainer.average.update(trainer.segmenter, trainer.step_count)
            last = {"step": trainer.step_count, **losses, "lr": learning_rate(config.pretrain, step),
                    "elapsed_s": round(time.time() - started, 3)}
            trainer.history.append(last)
            if on_step is not None:
                on_step(trainer, last)
            if trainer.step_count >= iterations:
                break
    logger.debug("pretrain: %d steps in %.1f s", trainer.step_count - first_step, time.time() - started)
    return last
