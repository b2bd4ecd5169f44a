"""The endpoint's per-image work on the calling thread and on a worker thread, with the page
faults each request takes (docs/performance.md, "Page faults on large images").

Loads a run's bundle into :class:`pading.serving.service.SegmentationService` (one torch
thread, as a replica runs) and segments ``--requests`` of the run's val images, resized to
``--size`` px on the long side, in blocks that take turns between this process's main
thread and a worker thread (a Serve replica runs each call on a worker thread). Prints each
block's median ms per request and minor page faults per request (``getrusage``).

The allocator's settings come from the environment, so compare runs like:

    python benchmarks/page_faults.py --output outputs/demo --size 640
    MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=536870912 \\
        python benchmarks/page_faults.py --output outputs/demo --size 640
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # stage_overhead's image helpers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="a finished run (its bundle and val images)")
    parser.add_argument("--size", type=int, default=640, help="long side of the images sent, px")
    parser.add_argument("--requests", type=int, default=30, help="requests per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per thread, taking turns")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime"])
    args = parser.parse_args()

    from stage_overhead import resized_bytes, val_image_bytes

    from pading.bundle import Bundle
    from pading.run import RunLayout
    from pading.serving.service import SegmentationService

    torch.set_num_threads(1)
    images = resized_bytes(val_image_bytes(args.output, args.requests), args.size)
    trained = Bundle.load(RunLayout(args.output).bundle)
    service = SegmentationService(trained, dataclasses.replace(trained.config.serve, runtime=args.runtime))

    def block() -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for data in images:
            started = time.perf_counter()
            service.segment([service.decode(data)], ["panoptic"], ["json"])
            times.append(time.perf_counter() - started)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return 1000 * statistics.median(times), faults / len(images)

    block()  # warm-up: the runtime's first calls, the allocator's first growth
    results: dict[str, list[tuple[float, float]]] = {"main thread": [], "worker thread": []}
    with ThreadPoolExecutor(1) as worker:
        for _ in range(args.rounds):
            results["main thread"].append(block())
            results["worker thread"].append(worker.submit(block).result())
    print(f"{args.size} px, segmenter on {service.runtime}; each block: median ms per request / minor page faults per request")
    for where, blocks in results.items():
        print(f"  {where}: " + ", ".join(f"{ms:.1f} / {faults:.0f}" for ms, faults in blocks))


if __name__ == "__main__":
    main()
