"""The endpoint's per-image work for each task, at the demo's size and at COCO's
(docs/performance.md, "Resizing only the queries a task uses").

Loads a run's bundle into :class:`pading.serving.service.SegmentationService` on one torch
thread (as a replica runs) and times ``segment`` (forward pass + post-processing + RLE, no
HTTP) for each task of ``--tasks`` on the run's val images as they are and resized to each
size of ``--sizes`` px on the long side. Prints the median ms per image. It re-runs itself
with the malloc settings the endpoint's replicas start with (``pading.allocator``) unless the
environment already sets a ``MALLOC_*`` variable or ``PADING_MALLOC=default``.

    python benchmarks/postprocess_tasks.py --output outputs/demo
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="a finished run's output directory")
    parser.add_argument("--sizes", default="demo,640", help="'demo' (the val images as they are) or a long side in px")
    parser.add_argument("--tasks", default="panoptic,instance,semantic,all")
    parser.add_argument("--images", type=int, default=30, help="val images per size (repeated when the run has fewer)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time spent on each task and size")
    args = parser.parse_args()

    from pading.allocator import allocator_env

    settings = allocator_env()
    if settings:  # the replicas' allocator: it must be set before the process starts
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **settings})

    import torch
    from stage_overhead import resized_bytes, val_image_bytes

    import pading
    from pading.bundle import Bundle
    from pading.run import RunLayout
    from pading.serving.service import SegmentationService

    torch.set_num_threads(1)
    trained = Bundle.load(RunLayout(args.output).bundle)
    service = SegmentationService(trained, trained.config.serve)
    originals = val_image_bytes(args.output, args.images)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"pading from {Path(pading.__file__).parent}; runtime {service.runtime}; one thread; malloc {malloc or 'default'}",
          flush=True)
    print("| size | " + " | ".join(args.tasks.split(",")) + " |")
    print("|---|" + "---|" * len(args.tasks.split(",")))
    for size in args.sizes.split(","):
        images = [service.decode(data) for data in resized_bytes(originals, None if size == "demo" else int(size))]
        cells = []
        for task in args.tasks.split(","):
            for image in images[:3]:  # warm-up
                service.segment([image], task, "json")
            times, deadline, k = [], time.perf_counter() + args.seconds, 0
            while time.perf_counter() < deadline or len(times) < len(images):
                started = time.perf_counter()
                service.segment([images[k % len(images)]], task, "json")
                times.append(1000 * (time.perf_counter() - started))
                k += 1
            cells.append(f"{statistics.median(times):.1f} ms")
        label = "demo (as stored)" if size == "demo" else f"{size} px"
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
