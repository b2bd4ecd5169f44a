"""Stage 2, pretrain: Ray Train (TorchTrainer) trains the segmenter on the seen-only
manifest. Checkpoints every ``pretrain.checkpoint_every`` steps; a restarted run (same
output directory) resumes from the last one; ``FailureConfig`` restarts failed workers
from it.

    python pipelines/pretrain.py [--config ...] [--set pretrain.iterations=500] [--force]
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

try:
    from pipelines import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig

logger = logging.getLogger("pipelines.pretrain")

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.jsonl"
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


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    log = common.worker_logger("pipelines.pretrain")
    import ray.train
    import ray.train.torch

    from pading.pretraining import SegmenterLoss, build_pretrain_optimizer, load_training_batch, pretrain_step
    from pading.segmenter import Segmenter

    config: ExperimentConfig = loop_config["config"]
    table = ClassTable.from_records(loop_config["table"])
    storage = Path(loop_config["storage"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed + rank)

    segmenter = Segmenter(config.segmenter, table.num_classes)
    model = SegmenterLoss(segmenter)
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    else:
        model = model.to(ray.train.torch.get_device())
    optimizer = build_pretrain_optimizer(model, config.pretrain)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
            segmenter.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
            history_path = Path(directory) / HISTORY_FILE
            if history_path.is_file():
                history = [json.loads(line) for line in history_path.read_text().splitlines() if line]
        if rank == 0:
            log.info(f"[pretrain] resumed from checkpoint at step {step}")

    iterations = config.pretrain.iterations
    per_worker = max(1, config.pretrain.batch_size // world)
    shard = ray.train.get_dataset_shard("train")
    started = time.time()

    def save_and_report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": segmenter.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                           Path(tmp) / STATE_FILE)
                (Path(tmp) / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
                segmenter.save(Path(tmp) / "segmenter")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    batches = common.epoch_batches(shard, per_worker, seed=config.seed + rank + step)
    failures_in_a_row = 0
    for arrow_batch in batches:
        if step >= iterations:
            break
        batch, rejects = load_training_batch(arrow_batch.to_pylist(), table, config.data.format, config.data.image_size)
        if batch is None:
            failures_in_a_row += 1
            if failures_in_a_row > MAX_EMPTY_BATCHES:
                raise RuntimeError("pretrain: no usable image in the last batches (see the worker log for reasons)")
            continue
        failures_in_a_row = 0
        _maybe_fail(step, storage)
        losses = pretrain_step(model, optimizer, batch, grad_clip=config.pretrain.grad_clip)
        step += 1
        history.append({"step": step, **losses})
        if rank == 0 and (step % config.pretrain.log_every == 0 or step == 1):
            rate = (time.time() - started) / max(1, len(history))
            log.info(f"[pretrain] step {step}/{iterations} loss {losses['loss']:.4f} "
                     f"(ce {losses.get('loss_cross_entropy', 0):.3f} mask {losses.get('loss_mask', 0):.3f} "
                     f"dice {losses.get('loss_dice', 0):.3f}) {rate:.2f}s/step")
        if step % config.pretrain.checkpoint_every == 0 or step == iterations:
            save_and_report({"step": step, **losses})
    if step < iterations:
        raise RuntimeError(f"pretrain: the training shard is empty (stopped at step {step})")


def run(config: ExperimentConfig, output: Path, force: bool = False) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    prepare = common.stage_module("prepare")

    stage_dir = output / "pretrain"
    done = common.begin_stage("pretrain", stage_dir, force)
    if done:
        return done
    started = time.time()
    common.init_ray()
    table = prepare.load_table(output)
    dataset = ray.data.read_parquet(str(output / "manifest" / "train"))
    storage = stage_dir / "ray"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "table": table.to_records(), "storage": str(stage_dir)},
        scaling_config=common.train_scaling(config),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="pretrain", storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    common.copy_from_checkpoint(result, "segmenter", HISTORY_FILE, stage_dir)
    info = {"segmenter": str(stage_dir / "segmenter"), "final_metrics": result.metrics,
            "checkpoint": result.checkpoint.path, "seconds": time.time() - started}
    common.mark_done(stage_dir, info)
    return info


if __name__ == "__main__":
    common.stage_main(run, __doc__)
