"""Does a second torch thread (or a second process) pay for the demo's training steps?

Times the library's generator step (``GeneratorTrainer.step`` on a finished run's features)
or pretraining step (``pretrain_step`` on its manifest) in blocks of ``--steps`` steps with a
fixed torch thread count, the counts taking turns (``--threads 1,2`` and ``--rounds 3`` give
1, 2, 1, 2, 1, 2), and prints each block's median ms per step. Fixed blocks, not a count
drawn per step: on a machine whose speed drifts, the spread between blocks of the same
count is the number to read (docs/performance.md, "Two threads").

``--where`` runs the blocks in this process (``bare``), in a Ray task (``task``) or in a
Ray Train worker, which calls the training function on a thread of its own (``train``);
the Ray places reserve as many CPUs as the largest thread count. ``--processes N`` runs N
copies of the one-thread blocks at once, in separate processes, to see whether the machine
gives each process a whole core.

    python benchmarks/threads.py --output outputs/demo                    # generator, in this process
    python benchmarks/threads.py --output outputs/demo --step pretrain --where train
    python benchmarks/threads.py --output outputs/demo --processes 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # stage_overhead's set-up


def generator_stepper(config, output: Path):
    """A function doing one generator step of the demo's loop per call."""
    from stage_overhead import generator_setup

    trainer, batches = generator_setup(config, output)
    return lambda: trainer.step(*next(batches))


def pretrain_stepper(config, output: Path):
    """A function doing one pretraining step of the demo's loop per call (batches decoded once, up front)."""
    from pading.model.segmenter import Segmenter
    from pading.run import load_table, read_manifest
    from pading.training.pretrain import (
        DecodedSamples,
        SegmenterTrainer,
        load_training_batch,
        micro_batch_seed,
        pretrain_step,
    )

    table, rows = load_table(output), read_manifest(output, "train")
    torch.manual_seed(config.seed)
    trainer = SegmenterTrainer(Segmenter(config.segmenter, table.num_classes), config)
    samples = DecodedSamples(table, config.data.format, budget_mb=512)
    size, count = config.pretrain.batch_size, 32
    batches = [load_training_batch([rows[(i * size + j) % len(rows)] for j in range(size)], table, config.data.format,
                                   config.data.image_size, samples=samples)[0] for i in range(count)]
    state = {"step": 0}

    def step():
        i = state["step"]
        pretrain_step(trainer.model, trainer.optimizer, [batches[i % count]], seeds=[micro_batch_seed(config.seed, i, 0)])
        state["step"] = i + 1

    return step


def blocks(config_path: str, output: str, kind: str, counts: list[int], steps: int, warmup: int) -> list[tuple]:
    """(threads, median ms per step) for each block, in order."""
    from pading.config import load_config

    config = load_config(config_path)
    step = (generator_stepper if kind == "generator" else pretrain_stepper)(config, Path(output))
    results = []
    for threads in counts:
        torch.set_num_threads(threads)
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        results.append((threads, round(1000 * statistics.median(times), 1)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--output", default=str(REPO / "outputs" / "demo"), help="a finished run of --config")
    parser.add_argument("--step", choices=("generator", "pretrain"), default="generator")
    parser.add_argument("--threads", default="1,2", help="thread counts taking turns")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (300 generator, 60 pretrain)")
    parser.add_argument("--where", choices=("bare", "task", "train"), default="bare")
    parser.add_argument("--processes", type=int, default=0, help="N one-thread copies at once (ignores --threads)")
    args = parser.parse_args()
    steps = args.steps or (300 if args.step == "generator" else 60)
    warmup = 20 if args.step == "generator" else 5
    counts = [int(c) for c in args.threads.split(",")] * args.rounds
    args.config, args.output = str(Path(args.config).resolve()), str(Path(args.output).resolve())  # Ray workers' cwd differs
    job = (args.config, args.output, args.step, counts, steps, warmup)

    if args.processes:
        one = (args.config, args.output, args.step, [1] * args.rounds, steps, warmup)
        print(f"alone: {blocks(*one)}", flush=True)
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            for index, result in enumerate(pool.starmap(blocks, [one] * args.processes)):
                print(f"process {index + 1} of {args.processes} at once: {result}")
        return
    if args.where == "bare":
        result = blocks(*job)
    else:
        import ray

        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
        if args.where == "task":
            result = ray.get(ray.remote(num_cpus=max(counts))(blocks).remote(*job))
        else:
            import ray.train
            from ray.train.torch import TorchTrainer

            with tempfile.TemporaryDirectory() as scratch:  # the worker shares this machine's disk (one node)
                result_file = Path(scratch) / "blocks.json"

                def loop(_):
                    result_file.write_text(json.dumps(blocks(*job)))

                TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1,
                                                                          resources_per_worker={"CPU": max(counts)}),
                             run_config=ray.train.RunConfig(storage_path=str(Path(scratch) / "ray"))).fit()
                result = [tuple(pair) for pair in json.loads(result_file.read_text())]
    print(f"{args.step} step, {args.where}, median ms per step of each {steps}-step block (threads, ms): {result}")
    for threads in sorted(set(counts)):
        values = [ms for count, ms in result if count == threads]
        print(f"  {threads} thread(s): {min(values)}-{max(values)} ms, median {statistics.median(values):.1f}")


if __name__ == "__main__":
    main()
