"""Stage 2, pretrain: Ray Train (TorchTrainer) trains the segmenter on the seen-only
manifest. Checkpoints every ``pretrain.checkpoint_every`` steps; a restarted run (same
output directory) resumes from the last one; ``FailureConfig`` restarts failed workers
from it.

    python pipelines/pretrain.py [--config ...] [--set pretrain.iterations=500] [--force]
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig
from pading.errors import ConfigError
from pading.run import RunLayout, load_table, read_history, read_manifest
from pading.run.layout import HISTORY_FILE
from pipelines import common

logger = logging.getLogger("pipelines.pretrain")

STATE_FILE = "train_state.pt"
#: Test hook: a worker raises once at this step (to exercise FailureConfig + resume).
FAIL_AT_STEP_ENV = "PADING_TEST_FAIL_AT_STEP"
MAX_EMPTY_BATCHES = 50  # consecutive batches with no loadable image before giving up


def _maybe_fail(step: int, storage: Path) -> None:
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    marker = storage / "injected_failure_done"
    if fail_at and step == int(fail_at) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")


def micro_batch_rows(config: ExperimentConfig, world: int) -> int:
    """Images per micro-batch: the global ``pretrain.batch_size`` over ``world`` workers x
    ``pretrain.grad_accumulation`` micro-batches (must divide evenly)."""
    parts = world * config.pretrain.grad_accumulation
    if config.pretrain.batch_size % parts:
        raise ConfigError(
            f"pretrain.batch_size={config.pretrain.batch_size} does not split into ray.num_workers={world} x "
            f"pretrain.grad_accumulation={config.pretrain.grad_accumulation} equal micro-batches")
    return config.pretrain.batch_size // parts


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker.

    Every worker reads the (small) train manifest from the output directory and draws the
    same global batch of images per step (seeded epochs, :func:`pading.data.features.epoch_indices`);
    worker r trains on its slice, M micro-batches of it, and DDP averages the gradients. So
    the global batches, and the step, do not depend on the number of workers
    (docs/architecture.md, "Distributed training"; tests/test_distributed.py)."""
    log = common.worker_logger("pipelines.pretrain")
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from pading.data.features import epoch_indices
    from pading.model.segmenter import Segmenter
    from pading.training.pretrain import (
        SegmenterLoss,
        WeightAverage,
        build_pretrain_optimizer,
        learning_rate,
        load_training_batch,
        micro_batch_seed,
        pretrain_step,
        set_learning_rate,
    )

    config: ExperimentConfig = loop_config["config"]
    table = ClassTable.from_records(loop_config["table"])
    storage = Path(loop_config["storage"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    accumulation = config.pretrain.grad_accumulation
    rows_per_micro_batch = micro_batch_rows(config, world)
    common.log_worker_node(storage, "pretrain", rank, world, log)
    torch.manual_seed(config.seed)  # the same initial weights on every worker

    segmenter = Segmenter(config.segmenter, table.num_classes)
    model = common.prepare_model(SegmenterLoss(segmenter), world)
    optimizer = build_pretrain_optimizer(model, config.pretrain)
    average = WeightAverage(segmenter, config.pretrain.ema_decay) if config.pretrain.ema_decay else None
    step, drawn, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
            segmenter.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if average is not None:
                average.load_state_dict(state["average"])
            step, drawn = int(state["step"]), int(state.get("batches_drawn", state["step"]))
            history = read_history(Path(directory) / HISTORY_FILE)
        if rank == 0:
            log.info(f"[pretrain] resumed from checkpoint at step {step}")

    iterations = config.pretrain.iterations
    rows = read_manifest(Path(loop_config["output"]), "train")
    started = time.time()

    def save_and_report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"model": segmenter.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "batches_drawn": drawn}
                if average is not None:
                    state["average"] = average.state_dict()
                torch.save(state, Path(tmp) / STATE_FILE)
                (Path(tmp) / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
                saved = segmenter
                if average is not None:  # the checkpoint's segmenter/ is the average (the stage's output)
                    saved = copy.deepcopy(segmenter)
                    average.copy_to(saved)
                saved.save(Path(tmp) / "segmenter")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    failures_in_a_row = 0
    for global_batch in epoch_indices(len(rows), config.pretrain.batch_size, seed=config.seed, start_step=drawn,
                                      drop_last=True):
        if step >= iterations:
            break
        drawn += 1
        mine = global_batch[rank * accumulation * rows_per_micro_batch:][: accumulation * rows_per_micro_batch]
        micro = [load_training_batch([rows[i] for i in mine[m * rows_per_micro_batch:][:rows_per_micro_batch]],
                                     table, config.data.format, config.data.image_size)[0] for m in range(accumulation)]
        usable = torch.tensor([float(all(b is not None for b in micro))])
        if world > 1:  # every worker must take (or skip) the same steps
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item() == 0:
            failures_in_a_row += 1
            if failures_in_a_row > MAX_EMPTY_BATCHES:
                raise RuntimeError("pretrain: no usable image in the last batches (see the worker log for reasons)")
            continue
        failures_in_a_row = 0
        _maybe_fail(step, storage)
        seeds = [micro_batch_seed(config.seed, step, rank * accumulation + m) for m in range(accumulation)]
        set_learning_rate(optimizer, learning_rate(config.pretrain, step))
        losses = pretrain_step(model, optimizer, micro, grad_clip=config.pretrain.grad_clip, seeds=seeds)
        step += 1
        if average is not None:
            average.update(segmenter, step)
        history.append({"step": step, **losses, "lr": learning_rate(config.pretrain, step - 1), "elapsed_s": round(time.time() - started, 3)})
        if rank == 0 and (step % config.pretrain.log_every == 0 or step == 1):
            rate = (time.time() - started) / max(1, len(history))
            log.info(f"[pretrain] step {step}/{iterations} loss {losses['loss']:.4f} "
                     f"(ce {losses.get('loss_cross_entropy', 0):.3f} mask {losses.get('loss_mask', 0):.3f} "
                     f"dice {losses.get('loss_dice', 0):.3f}) {rate:.2f}s/step")
        if step % config.pretrain.checkpoint_every == 0 or step == iterations:
            save_and_report({"step": step, **losses})


def run(config: ExperimentConfig, output: Path, force: bool = False) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    stage_dir = RunLayout(output).pretrain
    done = common.begin_stage("pretrain", stage_dir, force)
    if done:
        return done
    started = time.time()
    micro_batch_rows(config, config.ray.num_workers)  # a batch that does not split is an error now, not in a worker
    common.init_ray(config)
    table = load_table(output)
    storage = RunLayout(output).ray_storage("pretrain")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "table": table.to_records(), "storage": str(stage_dir),
                           "output": str(output)},
        scaling_config=common.train_scaling(config),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="pretrain", storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    common.copy_from_checkpoint(result, "segmenter", HISTORY_FILE, stage_dir)
    info = {"segmenter": str(RunLayout(output).segmenter), "final_metrics": result.metrics,
            "checkpoint": result.checkpoint.path, "workers": common.worker_nodes(stage_dir),
            "seconds": time.time() - started}
    common.mark_done(stage_dir, info)
    return info


if __name__ == "__main__":
    common.stage_main(run, __doc__)
