"""Stage 4, generator: Ray Train reads the features Parquet as a Ray Dataset (sharded to
the workers) and trains the generator and the classifier (METHOD.md stages 3 and 4,
one generator step then one classifier step per batch) for the ablation variant in
``losses.variant``. Checkpoints every ``generator_training.checkpoint_every`` steps and
resumes; the result is the model bundle ``<output>/bundle``.

    python pipelines/train_generator.py [--config ...] [--set losses.variant=gmmn] [--force]
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

try:
    from pipelines import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

import numpy as np
import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig

logger = logging.getLogger("pipelines.train_generator")

STATE_FILE = "generator_state.pt"
REFERENCE_ROWS = 4096  # real query embeddings kept in the bundle for run-time class fitting
HISTORY_FILE = "history.jsonl"


def arrow_to_tensors(batch, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A features Arrow batch -> embeddings (N, D) float32 and labels (N,) long."""
    flat = batch.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    embeddings = torch.from_numpy(np.array(flat, dtype=np.float32).reshape(-1, embed_dim))  # (N, D), a writable copy
    labels = torch.from_numpy(batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
    return embeddings, labels


def _all_reduce_mean(parameters) -> None:
    import torch.distributed as dist

    world = dist.get_world_size()
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    log = common.worker_logger("pipelines.train_generator")
    import ray.train
    import ray.train.torch

    from pading.bundle import Bundle
    from pading.segmenter import Segmenter
    from pading.training import GeneratorTrainer

    config: ExperimentConfig = loop_config["config"]
    table = ClassTable.from_records(loop_config["table"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    segmenter = Segmenter.load(loop_config["segmenter_dir"], map_location="cpu")
    semantics = torch.tensor(np.asarray(loop_config["semantics"], dtype=np.float32))
    embed_dim = config.segmenter.hidden_dim
    trainer = GeneratorTrainer(table, semantics.to(device), embed_dim, config, class_head=segmenter.class_head.to(device),
                               device=device)
    if world > 1:
        trainer.gradient_hook = _all_reduce_mean
    history: list[dict] = []
    reference: list[tuple[torch.Tensor, torch.Tensor]] = []
    kept_rows = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_state_dict(torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True))
            history_path = Path(directory) / HISTORY_FILE
            if history_path.is_file():
                history = [json.loads(line) for line in history_path.read_text().splitlines() if line]
        if rank == 0:
            log.info(f"[generator] resumed from checkpoint at step {trainer.step_count}")

    training = config.generator_training
    rows_per_step = max(1, training.batch_images * config.segmenter.num_queries // world)
    shard = ray.train.get_dataset_shard("train")
    started = time.time()

    def save_and_report(metrics: dict, final: bool = False) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(trainer.state_dict(), Path(tmp) / STATE_FILE)
                (Path(tmp) / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
                if final:
                    generator = trainer.generator
                    Bundle(config=config, table=table, class_semantics=semantics.numpy(), encoder=loop_config["encoder"],
                           segmenter=segmenter, classifier=trainer.classifier.cpu(),
                           generator=generator.cpu() if generator is not None else None,
                           generator_config=trainer.generator_config(config) if generator is not None else None,
                           reference_embeddings=torch.cat([e for e, _ in reference]).numpy() if reference else None,
                           reference_labels=torch.cat([lab for _, lab in reference]).numpy() if reference else None,
                           ).save(Path(tmp) / "bundle")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    for batch in common.epoch_batches(shard, rows_per_step, seed=config.seed + rank + trainer.step_count,
                                      cache=training.cache_features):
        if trainer.step_count >= training.iterations:
            break
        embeddings, labels = arrow_to_tensors(batch, embed_dim)
        if kept_rows < REFERENCE_ROWS:
            reference.append((embeddings[: REFERENCE_ROWS - kept_rows], labels[: REFERENCE_ROWS - kept_rows]))
            kept_rows += len(reference[-1][1])
        metrics = trainer.step(embeddings.to(device), labels.to(device))
        step = trainer.step_count
        if step % training.log_every == 0 or step == 1:
            history.append(metrics)
            if rank == 0:
                log.info(f"[generator] step {step}/{training.iterations} mmd {metrics.get('generator/mmd', float('nan')):.4f} "
                         f"total {metrics.get('generator/total', float('nan')):.4f} "
                         f"classifier {metrics['classifier/loss']:.4f} "
                         f"({(time.time() - started) / max(1, step):.3f}s/step)")
        if step % training.checkpoint_every == 0 and step < training.iterations:
            save_and_report({k.replace("/", "_"): v for k, v in metrics.items()})
    if trainer.step_count < training.iterations:
        raise RuntimeError(f"generator: the features shard is empty (stopped at step {trainer.step_count})")
    save_and_report({"step": trainer.step_count}, final=True)


def run(config: ExperimentConfig, output: Path, force: bool = False, stage_name: str = "generator") -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from pading.semantics import class_embeddings, encoder_id

    prepare = common.stage_module("prepare")

    stage_dir = output / stage_name
    done = common.begin_stage(stage_name, stage_dir, force)
    if done:
        return done
    started = time.time()
    common.init_ray()
    table = prepare.load_table(output)
    semantics = class_embeddings(table, config.semantics, cache_dir=config.semantics.cache_dir or output / "cache")
    dataset = ray.data.read_parquet(str(output / "features"), file_extensions=["parquet"])
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config, "table": table.to_records(), "semantics": semantics.tolist(),
            "segmenter_dir": str(output / "pretrain" / "segmenter"), "encoder": encoder_id(config.semantics),
        },
        scaling_config=common.train_scaling(config),
        run_config=ray.train.RunConfig(
            name=stage_name, storage_path=str(stage_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    common.copy_from_checkpoint(result, "bundle", HISTORY_FILE, stage_dir)
    info = {"bundle": str(stage_dir / "bundle"), "variant": config.losses.variant, "seconds": time.time() - started}
    common.mark_done(stage_dir, info)
    return info


if __name__ == "__main__":
    common.stage_main(run, __doc__)
