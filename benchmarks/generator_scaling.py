"""The full PADing objective at large vocabularies, on 1 and 2 workers: seconds per iteration
and peak memory per worker.

For each vocabulary size C this times ``GeneratorTrainer.step`` (one generator step with the
full loss, ``losses.variant=full``, then one classifier step) at the r50 sizes: query size
D = 256, CLIP-sized class embeddings S = 512, K = 400 primitives, L = 3 layers, a global batch
of 12 images x 100 queries with 150 matched seen queries, about a quarter of the classes
unseen. ``--demo`` adds the embedded default's size (20 classes, 5 unseen, D = 128, S = 384,
12 images x 16 queries); ``--dims demo`` measures ``--sizes`` at those dimensions (a quarter unseen). The settings are the defaults (``losses.chunk_size`` auto,
``losses.relation_class_sample`` 2,048, ``losses.unseen_class_sample`` 512); ``--every-class``
sets both samples to 0 (the paper's objective over every class).

W workers are W processes joined by a gloo process group on this machine (no Ray), each with
one torch thread and its half of every global batch, synchronised by
:class:`pading.training.distributed.TorchCollective` exactly as in the Ray Train stage. Each
number is the median over ``--steps`` timed steps after ``--warmup`` steps (the step time of
the slowest worker); peak memory is each worker's peak resident set size (``ru_maxrss``),
and "over start" the part above what the process held before it built the trainer.

    python benchmarks/generator_scaling.py [--sizes 133 1203 10000 20000] [--workers 1 2] [--demo]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

R50 = {"embed_dim": 256, "semantic_dim": 512, "queries": 100, "matched": 150}
DEMO = {"embed_dim": 128, "semantic_dim": 384, "queries": 16, "matched": 40}
BATCH_IMAGES = 12


def vocabulary(num_classes: int, demo: bool):
    from pading.classes import ClassInfo, ClassTable

    unseen = (lambda i: i % 4 == 0) if not demo or num_classes > 20 else (lambda i: i < 5)
    return ClassTable(tuple(ClassInfo(id=i + 1, name=f"class {i}", isthing=True, unseen=unseen(i))
                            for i in range(num_classes)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB -> GB (Linux)


def worker(rank: int, world: int, port: int, job: dict, out: str) -> None:
    """One worker: build the trainer, time the steps, write its numbers to ``out``."""
    import torch.distributed as dist

    from pading.config import tiny_config
    from pading.training.distributed import LocalCollective, TorchCollective
    from pading.training.generator import GeneratorTrainer

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sizes = DEMO if job["demo"] else R50
    table = vocabulary(job["classes"], job["demo"])
    losses = {"variant": "full"}
    if job["every_class"]:
        losses.update(relation_class_sample=0, unseen_class_sample=0)
    config = tiny_config(generator={"num_primitives": 400, "num_layers": 3, "num_heads": 8, "feedforward_dim": 1024},
                         losses=losses)
    rng = np.random.default_rng(0)
    semantics = rng.standard_normal((job["classes"], sizes["semantic_dim"])).astype(np.float32)
    semantics /= np.linalg.norm(semantics, axis=1, keepdims=True)
    start_rss = _rss_gb()
    collective = TorchCollective() if world > 1 else LocalCollective()
    trainer = GeneratorTrainer(table, torch.from_numpy(semantics), sizes["embed_dim"], config, collective=collective)
    rows = BATCH_IMAGES * sizes["queries"]
    per_rank = -(-rows // world)
    times = []
    for step in range(job["warmup"] + job["steps"]):
        embeddings = rng.standard_normal((rows, sizes["embed_dim"])).astype(np.float32)
        labels = np.full(rows, table.no_object_index, dtype=np.int64)
        labels[rng.choice(rows, sizes["matched"], replace=False)] = rng.choice(table.seen_indices, sizes["matched"])
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        if world > 1:
            dist.barrier()
        started = time.perf_counter()
        trainer.step(torch.from_numpy(embeddings[mine]), torch.from_numpy(labels[mine]))
        elapsed = torch.tensor([time.perf_counter() - started])
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= job["warmup"]:
            times.append(float(elapsed))
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"seconds": statistics.median(times), "peak_gb": _rss_gb(), "start_gb": start_rss}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure(classes: int, world: int, args, demo: bool = False) -> dict:
    job = {"classes": classes, "demo": demo, "every_class": args.every_class, "warmup": args.warmup,
           "steps": args.steps}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(world, _free_port(), job, out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return {"seconds": ranks[0]["seconds"], "peak_gb": max(r["peak_gb"] for r in ranks),
            "over_start_gb": max(r["peak_gb"] - r["start_gb"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[133, 1203, 10000, 20000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--demo", action="store_true", help="also the embedded default's size (20 classes)")
    parser.add_argument("--dims", choices=("r50", "demo"), default="r50",
                        help="sizes of --sizes: r50 (D 256, 12 x 100 queries) or the demo's (D 128, 12 x 16)")
    parser.add_argument("--every-class", action="store_true",
                        help="relation and alignment over every class (losses.*_class_sample=0)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, one thread per worker, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; median of {args.steps} steps after {args.warmup}; "
          f"{'every class' if args.every_class else 'default class samples'}", flush=True)
    demo_dims = args.dims == "demo"
    cases = ([("20 (demo sizes)", 20, True)] if args.demo else []) + [
        (f"{c:,}" + (" (demo sizes)" if demo_dims else ""), c, demo_dims) for c in args.sizes]
    rows = []
    for label, classes, demo in cases:
        base = None
        for world in args.workers:
            result = measure(classes, world, args, demo)
            base = base or result["seconds"]
            rows.append((label, world, result, base / result["seconds"]))
            print(f"  {label} W={world}: {result['seconds']:.3f} s/iter, peak {result['peak_gb']:.2f} GB "
                  f"(+{result['over_start_gb']:.2f})", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print("| classes | workers | s / iteration | iterations/s | vs 1 worker | peak memory per worker (GB) | "
          "over start (GB) |")
    print("|---|---|---|---|---|---|---|")
    for label, world, result, speedup in rows:
        print(f"| {label} | {world} | {result['seconds']:.3f} | {1 / result['seconds']:.2f} | {speedup:.2f}x | "
              f"{result['peak_gb']:.2f} | {result['over_start_gb']:.2f} |")


if __name__ == "__main__":
    main()
