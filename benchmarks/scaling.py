"""Scaling on one machine: 1 vs 2 Ray Data extraction actors, 1 vs 2 Ray Train workers.

Runs the pipeline's own stages (pipelines/extract.py, pretrain.py, train_generator.py) on a
synthetic dataset in a scratch output directory, on a local Ray with ``--cpus`` CPUs; every
actor and worker reserves one CPU and runs one torch thread. Training compares equal
*global* batches (the same steps, split over the workers), timed from the workers' own
step clocks (``elapsed_s`` in the stage's history), so Ray start-up is left out;
extraction is timed over the whole stage (actor start and model load included).

    python benchmarks/scaling.py [--images 320] [--image-size 128] [--cpus 2] [--output /tmp/pading-scaling]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from pading.config import load_config
from pading.run import RunLayout, read_history, read_manifest
from pipelines import common, extract, prepare, pretrain, train_generator

REPO = Path(__file__).resolve().parents[1]


def rate(history: list[dict], skip: int = 1) -> float:
    """Steps per second between history row ``skip`` and the last (rows carry ``step`` and
    ``elapsed_s``, the worker's clock)."""
    first, last = history[skip], history[-1]
    return (last["step"] - first["step"]) / max(1e-9, last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320, help="synthetic training images")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--pretrain-steps", type=int, default=40)
    parser.add_argument("--generator-steps", type=int, default=300)
    parser.add_argument("--pretrain-batch", type=int, default=16, help="global pretraining batch (images)")
    parser.add_argument("--only", choices=("pretrain", "extract", "generator"), action="append",
                        help="run only these benchmarks (repeatable; default: all)")
    parser.add_argument("--output", default="/tmp/pading-scaling")
    args = parser.parse_args()
    common.setup_logging()
    logging.getLogger("pipelines").setLevel(logging.WARNING)
    output = Path(args.output)
    shutil.rmtree(output, ignore_errors=True)
    size = args.image_size
    config = load_config(REPO / "configs" / "smoke.yaml", [
        f"data.root={output / 'data'}", f"data.image_size={size}", f"data.synthetic.image_size={size}",
        f"data.synthetic.num_train={args.images}", "data.synthetic.num_val=8", f"ray.local_cpus={args.cpus}",
        "ray.cpus_per_worker=1", "ray.extract_shard_size=16", f"pretrain.batch_size={args.pretrain_batch}",
        f"pretrain.iterations={args.pretrain_steps}", "pretrain.log_every=1000",
        f"pretrain.checkpoint_every={args.pretrain_steps}", f"generator_training.iterations={args.generator_steps}",
        "generator_training.batch_images=12", "generator_training.log_every=10",
        f"generator_training.checkpoint_every={args.generator_steps}", "generator.num_primitives=400"])
    config.output_dir = str(output)
    prepare.run(config, output)
    images = len(read_manifest(output, "train"))
    wanted = set(args.only or ("pretrain", "extract", "generator"))
    rows = []
    for workers in (1, 2) if "pretrain" in wanted else (1,):
        config.ray.num_workers = workers
        info = pretrain.run(config, output, force=True)
        if "pretrain" in wanted:
            rows.append((f"pretraining steps/s (global batch {args.pretrain_batch})", workers,
                         rate(read_history(RunLayout(output).history("pretrain"))), info["seconds"]))
    for actors in (1, 2) if wanted & {"extract", "generator"} else ():
        config.ray.extract_concurrency = actors
        info = extract.run(config, output, force=True)
        if "extract" in wanted:
            rows.append((f"extraction images/s ({images} images, whole stage)", actors, images / info["seconds"],
                         info["seconds"]))
            rows.append((f"extraction images/s ({images} images, steady state: each actor's first shard to last)",
                         actors, info["steady_images_per_second"], info["seconds"]))
    for workers in (1, 2) if "generator" in wanted else ():
        config.ray.num_workers = config.ray.generator_workers = workers  # no auto choice: measure both
        info = train_generator.run(config, output, force=True)
        rows.append(("generator iterations/s (12 images x 16 queries a step)", workers,
                     rate(read_history(RunLayout(output).history("generator"))), info["seconds"]))
    print(f"\n{args.cpus} CPUs, tiny Mask2Former at {size} px, one torch thread per actor/worker")
    print("| what | actors/workers | rate | stage wall s | speed-up |")
    print("|---|---|---|---|---|")
    for what, n, value, seconds in rows:
        base = next(v for w, k, v, _ in rows if w == what and k == 1)
        print(f"| {what} | {n} | {value:.2f} | {seconds:.1f} | {value / base:.2f}x |")


if __name__ == "__main__":
    main()
