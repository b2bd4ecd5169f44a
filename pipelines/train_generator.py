"""Stage 4, generator: Ray Train trains the generator and the classifier (docs/method.md
stages 3 and 4, one generator step then one classifier step per batch; the ablation variant
in ``losses.variant``) with the library's one loop, :func:`pading.training.generator.fit_generator`.

Worker r of W reads the features shards ``r, r + W, ...`` (on storage every node sees) and
draws its batches from them (seeded epochs); the trainer synchronises every step so the W
workers take the step one worker takes on the union of their batches
(:mod:`pading.training.distributed`). Checkpoints every ``generator_training.checkpoint_every``
steps and resumes; the result is the model bundle ``<output>/generator/bundle``.

    python pipelines/train_generator.py [--config ...] [--set losses.variant=gmmn] [--force]
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig, computed_settings
from pading.run import RunLayout
from pading.run.checkpoint import read_checkpoint, write_checkpoint
from pading.run.layout import HISTORY_FILE
from pipelines import common

logger = logging.getLogger("pipelines.train_generator")

REFERENCE_ROWS = 4096  # real query embeddings kept in the bundle for run-time class fitting


def generator_workers(config: ExperimentConfig, table: ClassTable) -> int:
    """``ray.generator_workers``, else ``ray.num_workers`` when a step has enough work to divide
    (:func:`pading.training.distributed.worth_dividing`), else 1."""
    from pading.training.distributed import worth_dividing

    if config.ray.generator_workers:
        return config.ray.generator_workers
    workers = config.ray.num_workers
    rows = config.generator_training.batch_images * config.segmenter.num_queries
    if workers > 1 and not worth_dividing(rows, table.num_classes, config.segmenter.hidden_dim):
        logger.info("generator: one worker (a step of %d rows x %d classes is too small to divide; "
                    "--set ray.generator_workers=%d to divide it anyway)", rows, table.num_classes, workers)
        return 1
    return workers


def reference_rows(count: int, seed: int) -> np.ndarray:
    """Which of a worker's ``count`` features rows the bundle keeps for fitting classes added at
    run time: up to :data:`REFERENCE_ROWS`, drawn with ``seed`` over all of them (in row
    order), not the first ones, which are the first few images' queries, most of them "no
    object"."""
    if count <= REFERENCE_ROWS:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=REFERENCE_ROWS, replace=False))


def shard_files_of(features_dir: Path, rank: int, world: int) -> list[Path]:
    """The features shards worker ``rank`` of ``world`` trains on. Each worker draws the same
    number of rows a step, so the shards are dealt out by their row counts (Parquet metadata
    only): the largest first, each to the worker with the fewest rows so far (ties to the lower
    rank), which gives every row about the same chance per step and is the same on every
    worker. One worker takes them all. A worker left without rows (more workers than shards
    with rows, e.g. shards whose images were all rejected) stops the stage with a message."""
    import pyarrow.parquet as pq

    from pading.data.features import feature_files

    files = feature_files(features_dir)
    if world == 1:
        return files
    rows = [pq.ParquetFile(path).metadata.num_rows for path in files]
    loads, mine = [0] * world, []
    for index in sorted(range(len(files)), key=lambda k: (-rows[k], k)):
        worker = min(range(world), key=lambda w: (loads[w], w))
        loads[worker] += rows[index]
        if worker == rank:
            mine.append(files[index])
    if min(loads) == 0:
        raise RuntimeError(f"generator: {sum(r > 0 for r in rows)} features shard(s) with rows for {world} workers; "
                           "lower ray.extract_shard_size (and rerun extract with --force) or ray.num_workers")
    return sorted(mine)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    log = common.worker_logger("pipelines.train_generator")
    import ray.train
    import ray.train.torch

    from pading.bundle import write_bundle
    from pading.data.features import feature_batches, read_features, with_no_object_index
    from pading.model.segmenter import Segmenter
    from pading.training.generator import GeneratorTrainer, fit_generator

    config: ExperimentConfig = loop_config["config"]
    table = ClassTable.from_records(loop_config["table"])
    base_classes = loop_config["base_classes"]  # the dataset's classes, which the features' labels index
    stage_dir = Path(loop_config["stage_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    common.log_worker_node(stage_dir, "generator", rank, world, log)
    device = ray.train.torch.get_device()
    segmenter_dir = Path(loop_config["segmenter_dir"])  # only its class head is needed here, not the model
    semantics = torch.tensor(np.asarray(loop_config["semantics"], dtype=np.float32))
    trainer = GeneratorTrainer(table, semantics.to(device), config.segmenter.hidden_dim, config,
                               class_head=Segmenter.load_class_head(segmenter_dir, map_location=device), device=device)
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state, history = read_checkpoint(directory, map_location=device)
            trainer.load_state_dict(state)
        if rank == 0:
            log.info(f"[generator] resumed from checkpoint at step {trainer.step_count}")

    training = config.generator_training
    features = with_no_object_index(read_features(shard_files_of(Path(loop_config["features_dir"]), rank, world)),
                                    base_classes, table.no_object_index)
    rows_per_step = max(1, training.batch_images * config.segmenter.num_queries // world)
    started, first_step = time.time(), trainer.step_count

    def save_and_report(metrics: dict, final: bool = False) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint(tmp, trainer.state_dict(), history)
                if final:
                    generator = trainer.generator
                    reference = features.select(reference_rows(len(features), config.seed))
                    write_bundle(Path(tmp) / "bundle", config=config, table=table, class_semantics=semantics.numpy(),
                                 encoder=loop_config["encoder"], segmenter=segmenter_dir,
                                 classifier=trainer.classifier.cpu(),
                                 generator=generator.cpu() if generator is not None else None,
                                 generator_config=trainer.generator_config(config) if generator is not None else None,
                                 reference_embeddings=reference.embeddings, reference_labels=reference.labels)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def on_step(trainer: GeneratorTrainer, metrics: dict) -> None:
        step = trainer.step_count
        if step % training.log_every == 0 or step == 1:
            history.append({**metrics, "elapsed_s": round(time.time() - started, 3)})
            if rank == 0:
                log.info(f"[generator] step {step}/{training.iterations} mmd {metrics.get('generator/mmd', float('nan')):.4f} "
                         f"total {metrics.get('generator/total', float('nan')):.4f} "
                         f"classifier {metrics['classifier/loss']:.4f} "
                         f"({(time.time() - started) / max(1, step - first_step):.3f}s/step)")
        if step % training.checkpoint_every == 0 and step < training.iterations:
            save_and_report({k.replace("/", "_"): v for k, v in metrics.items()})

    batches = feature_batches(features, rows_per_step, seed=config.seed, start_step=trainer.step_count, rank=rank)
    fit_generator(trainer, batches, training.iterations, on_step=on_step)
    save_and_report({"step": trainer.step_count}, final=True)


def run(config: ExperimentConfig, output: Path, force: bool = False, stage_name: str = "generator") -> dict:
    import ray.train

    from pading.data.features import feature_files
    from pading.run.inputs import load_generator_inputs
    from pading.training.checks import check_chunk_size, check_features_cover


    stage_dir = output / stage_name
    stage = common.Stage(stage_name, stage_dir, force, settings=computed_settings(config))
    if stage.done:
        return stage.done
    # every check before the stage's old output is removed or any work starts
    inputs = load_generator_inputs(config, output, extend_vocabulary=True)
    table, base_classes = inputs.table, inputs.base_classes
    if table.num_classes > base_classes:
        logger.info("generator: %d classes (%d of the dataset + %d from %s), %d unseen", table.num_classes,
                    base_classes, table.num_classes - base_classes, config.vocabulary.extra_unseen,
                    len(table.unseen_indices))
    workers = generator_workers(config, table)
    shard_files_of(RunLayout(output).features, 0, workers)  # enough shards for the workers?
    check_features_cover(table, base_classes, feature_files(RunLayout(output).features))
    check_chunk_size(config, config.segmenter.hidden_dim, torch.device("cuda" if config.ray.use_gpu else "cpu"))
    stage.start()
    common.init_ray(config)
    trainer = common.torch_trainer(
        train_loop,
        train_loop_config={
            "config": config, "table": table.to_records(), "semantics": inputs.semantics(), "base_classes": base_classes,
            "segmenter_dir": str(inputs.segmenter_dir), "encoder": inputs.encoder,
            "features_dir": str(inputs.features_dir), "stage_dir": str(stage_dir),
        },
        scaling_config=common.train_scaling(config, workers),
        run_config=ray.train.RunConfig(
            name=stage_name, storage_path=str(RunLayout(output).ray_storage(stage_name)),
            failure_config=ray.train.FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = common.fit(trainer)
    common.copy_from_checkpoint(result, "bundle", HISTORY_FILE, stage_dir)
    info = {"bundle": str(RunLayout(output).bundle), "variant": config.losses.variant,
            "workers": common.worker_nodes(stage_dir)}
    return stage.finish(info)


def track(info: dict, output: Path) -> None:
    """The loss history as MLflow metric curves ("generator/mmd" logged as "generator.mmd")."""
    from pading.run import read_history, tracking

    rows = [{k.replace("/", "."): v for k, v in row.items()} for row in read_history(RunLayout(output).history("generator"))]
    tracking.log_metric_history(rows)



if __name__ == "__main__":
    common.stage_main(run, __doc__)
