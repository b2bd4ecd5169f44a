"""Throughput of batch segmentation (pipelines/segment.py) with 1 and 2 actors.

Runs ``pipelines.segment.run`` in this process (the same code as the command line) over N
images, once per actor count, each into a fresh output directory, all on one local Ray
started here. The images are the coco-tiny val images (``../shared/data/coco-tiny/val2017``)
repeated to N, or synthetic 480x640 images when that folder is absent. The model is
``--bundle`` or, by default, the tiny random bundle of the tests (tests/helpers/tiny_bundle.py).

Reported per actor count: wall seconds of the whole run (listing, bundle, Ray Data, assembly),
images/s of the segmentation phase including actor start-up, and images/s once the actors
are up (each actor's first-shard-start to last-shard-end window, docs/architecture.md
"Batch segmentation").

    python benchmarks/segment_throughput.py [--images 64] [--actors 1 2] [--shard-size 8]
        [--bundle DIR] [--format parquet] [--cpus 2]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COCO_VAL = Path(os.environ.get("PADING_SHARED_DATA", REPO.parent / "shared" / "data")) / "coco-tiny" / "val2017"


def make_images(directory: Path, count: int) -> str:
    """``count`` images in ``directory`` (coco-tiny val repeated, else synthetic); its source."""
    directory.mkdir(parents=True, exist_ok=True)
    real = sorted(COCO_VAL.glob("*.jpg")) if COCO_VAL.is_dir() else []
    rng = np.random.default_rng(0)
    for k in range(count):
        target = directory / f"{k:06d}.jpg"
        if real:
            shutil.copy(real[k % len(real)], target)
        else:
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(target, quality=90)
    return f"coco-tiny val2017 ({len(real)} images repeated)" if real else "synthetic 480x640"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--bundle", default=None, help="a bundle directory (default: the tests' tiny bundle)")
    parser.add_argument("--format", default="parquet")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: every core)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from pipelines import segment

    work = Path(tempfile.mkdtemp(prefix="pading-segment-bench-"))
    try:
        source = make_images(work / "images", args.images)
        bundle = args.bundle
        if bundle is None:
            sys.path.insert(0, str(REPO / "tests"))
            from helpers.tiny_bundle import build_tiny_bundle

            build_tiny_bundle(work / "bundle")
            bundle = str(work / "bundle")
        try:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        except Exception as err:  # a busy machine can miss Ray's fixed raylet start-up wait once
            if "timed out during startup" not in str(err):
                raise
            ray.shutdown()
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        rows = []
        for actors in args.actors:
            started = time.time()
            summary = segment.run(segment.parse_args([
                "--bundle", bundle, "--input", str(work / "images"), "--output", str(work / f"out-{actors}"),
                "--format", args.format, "--concurrency", str(actors), "--shard-size", str(args.shard_size)]))
            rows.append((actors, summary, time.time() - started))
        print(f"\n{args.images} images ({source}), shards of {args.shard_size}, format {args.format}, "
              f"{ray.cluster_resources().get('CPU', 0):g} CPUs, bundle {'tiny (tests)' if args.bundle is None else bundle}\n")
        print("| actors | images | segments | wall s | images/s (with actor start-up) | images/s (actors up) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for actors, summary, wall in rows:
            print(f"| {actors} | {summary['segmented']} | {summary['segments']} | {wall:.1f} | "
                  f"{summary['images_per_second']:.2f} | {summary['steady_images_per_second']:.2f} |")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
