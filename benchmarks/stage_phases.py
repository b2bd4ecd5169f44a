"""Where a stage's time goes outside its work: the pipeline's own phases, timed in place.

Runs ``pipelines/full.py``'s ``run_all`` for the named stages on a run directory, with a
timer around each phase the driver goes through: Ray's start, the MLflow store, each stage's
``run`` and ``track`` (what it adds to its MLflow run), Ray Train's ``fit``, the copy of the
final checkpoint, and Ray Data's dataset building (``row_blocks``) and execution. A stage
that is done is skipped (its ``track`` still runs); ``--force`` redoes the named stages.
Ray starts once, first, as in a whole run where prepare has started it.

    python benchmarks/stage_phases.py --output outputs/demo --stages pretrain      # track only
    python benchmarks/stage_phases.py --output DIR --stages generator,evaluate --force \\
        --set generator_training.iterations=100

Prints one line per phase as it ends and a table at the end (calls, seconds). Work on a copy
of a run when forcing: the named stages are redone in place. docs/performance.md, "Fixed
costs taken out", used it to find the costs listed there.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STARTED = time.perf_counter()
TOTALS: dict[str, list[float]] = collections.defaultdict(list)


def timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a version that records its wall time under ``label``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            took = time.perf_counter() - began
            TOTALS[label].append(took)
            print(f"[{time.perf_counter() - STARTED:8.2f} s] {label}: {took:.2f} s", flush=True)

    setattr(owner, name, wrapper)


def main() -> None:
    from pading.run.cli import base_parser

    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--stages", required=True, help="comma-separated stages, in pipeline order")
    args = parser.parse_args()

    import ray.data
    import ray.train.torch

    from pading.run import tracking
    from pipelines import common, full

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in full.STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; the stages are {', '.join(full.STAGES)}")
    common.setup_logging()
    config, output = common.load(args)
    timed(common, "init_ray", "Ray start (init_ray)")
    timed(tracking, "setup", "MLflow store (tracking.setup)")
    timed(common, "row_blocks", "Ray Data dataset built (row_blocks)")
    timed(common, "copy_from_checkpoint", "copy from the final checkpoint")
    timed(ray.data.Dataset, "take_all", "Ray Data execution (take_all)")
    timed(ray.train.torch.TorchTrainer, "fit", "Ray Train fit")
    for name in stages:
        module = full.STAGE_MODULES[name]
        timed(module, "run", f"{name}: run")
        if hasattr(module, "track"):
            timed(module, "track", f"{name}: track (MLflow)")
    common.init_ray(config)
    full.run_all(config, output, force=args.force, stages=stages)
    print("\n| phase | calls | seconds |\n|---|---|---|")
    for label, times in TOTALS.items():
        print(f"| {label} | {len(times)} | {sum(times):.2f} |")
    print(f"\ntotal {time.perf_counter() - STARTED:.1f} s (imports included)")


if __name__ == "__main__":
    main()
