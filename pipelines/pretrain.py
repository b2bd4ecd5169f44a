"""Stage 2, pretrain: Ray Train (TorchTrainer) trains the segmenter on the seen-only
manifest. Checkpoints every ``pretrain.checkpoint_every`` steps; a restarted run (same
output directory) resumes from the last one; ``FailureConfig`` restarts failed workers
from it.

    python pipelines/pretrain.py [--config ...] [--set pretrain.iterations=500] [--force]
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig, computed_settings
from pading.run import RunLayout, load_table, read_manifest
from pading.run.checkpoint import read_checkpoint, write_checkpoint
from pading.run.layout import HISTORY_FILE
from pading.training.pretrain import micro_batch_rows
from pipelines import common

logger = logging.getLogger("pipelines.pretrain")

#: Test hook: a worker raises once at this step (to exercise FailureConfig + resume).
FAIL_AT_STEP_ENV = "PADING_TEST_FAIL_AT_STEP"


def _maybe_fail(step: int, storage: Path) -> None:
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    marker = storage / "injected_failure_done"
    if fail_at and step == int(fail_at) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("1")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the library's loop
    (:func:`pading.training.pretrain.fit_segmenter`) with Ray Train's checkpoints, resume and
    DDP wrapper around it. Every worker draws the same global batch per step and trains on its
    slice, so the steps do not depend on the number of workers (docs/architecture.md,
    "Distributed training"; tests/test_distributed.py)."""
    log = common.worker_logger("pipelines.pretrain")
    import ray.train
    import ray.train.torch

    from pading.model.segmenter import Segmenter
    from pading.training.pretrain import SegmenterLoss, SegmenterTrainer, fit_segmenter

    config: ExperimentConfig = loop_config["config"]
    table = ClassTable.from_records(loop_config["table"])
    storage = Path(loop_config["storage"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    micro_batch_rows(config, world)
    common.log_worker_node(storage, "pretrain", rank, world, log)
    torch.manual_seed(config.seed)  # the same initial weights on every worker
    segmenter = Segmenter(config.segmenter, table.num_classes)
    trainer = SegmenterTrainer(segmenter, config, model=common.prepare_model(SegmenterLoss(segmenter), world))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_state_dict(*read_checkpoint(directory))
        if rank == 0:
            log.info(f"[pretrain] resumed from checkpoint at step {trainer.step_count}")

    iterations = config.pretrain.iterations
    started, first_step = time.time(), trainer.step_count

    def save_and_report(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint(tmp, trainer.state_dict(), trainer.history)
                trainer.result().save(Path(tmp) / "segmenter")  # the weight average with pretrain.ema_decay
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def on_step(trainer: SegmenterTrainer, row: dict) -> None:
        step = trainer.step_count
        if rank == 0 and (step % config.pretrain.log_every == 0 or step == 1):
            rate = (time.time() - started) / max(1, step - first_step)
            log.info(f"[pretrain] step {step}/{iterations} loss {row['loss']:.4f} "
                     f"(ce {row.get('loss_cross_entropy', 0):.3f} mask {row.get('loss_mask', 0):.3f} "
                     f"dice {row.get('loss_dice', 0):.3f}) {rate:.2f}s/step")
        if step % config.pretrain.checkpoint_every == 0 or step == iterations:
            save_and_report({k: v for k, v in row.items() if k not in ("lr", "elapsed_s")})

    rows = read_manifest(Path(loop_config["output"]), "train")
    fit_segmenter(trainer, rows, table, rank=rank, world=world,
                  before_step=lambda trainer: _maybe_fail(trainer.step_count, storage), on_step=on_step)


def run(config: ExperimentConfig, output: Path, force: bool = False) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig

    stage_dir = RunLayout(output).pretrain
    stage = common.Stage("pretrain", stage_dir, force, settings=computed_settings(config))
    if stage.done:
        return stage.done
    micro_batch_rows(config, config.ray.num_workers)  # a batch that does not split is an error now, not in a worker
    stage.start()
    common.init_ray(config)
    table = load_table(output)
    storage = RunLayout(output).ray_storage("pretrain")
    trainer = common.torch_trainer(
        train_loop,
        train_loop_config={"config": config, "table": table.to_records(), "storage": str(stage_dir),
                           "output": str(output)},
        scaling_config=common.train_scaling(config, cpus_per_worker=config.ray.pretrain_cpus_per_worker),
        torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name="pretrain", storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = common.fit(trainer)
    common.copy_from_checkpoint(result, "segmenter", HISTORY_FILE, stage_dir)
    info = {"segmenter": str(RunLayout(output).segmenter), "final_metrics": result.metrics,
            "checkpoint": result.checkpoint.path, "workers": common.worker_nodes(stage_dir)}
    return stage.finish(info)


def track(info: dict, output: Path) -> None:
    """The loss history as MLflow metric curves (step = pretraining step)."""
    from pading.run import read_history, tracking

    tracking.log_metric_history(read_history(RunLayout(output).history("pretrain")))



if __name__ == "__main__":
    common.stage_main(run, __doc__)
