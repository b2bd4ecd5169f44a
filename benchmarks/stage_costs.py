"""Wall time and peak memory of every stage of a whole pipeline run.

Runs ``python pipelines/full.py --config CONFIG --output DIR [--set ...]`` from scratch and,
meanwhile, samples the machine's used memory (``MemTotal - MemAvailable`` from
/proc/meminfo) every ``--interval`` seconds. Stage boundaries come from the run's own
``=== stage NAME ===`` log lines. For each stage it prints the wall time (``results.json``)
and the peak of used memory during the stage above what was used before the run started:
the driver, Ray's processes, the workers and actors and the object store together, which
is what the machine must have. Run it on an otherwise quiet machine.

    python benchmarks/stage_costs.py --config configs/lvis_synthetic.yaml --output /tmp/lvis-costs
    python benchmarks/stage_costs.py --output /tmp/demo-costs          # configs/demo.yaml

Prints a Markdown table and writes ``<output>/stage_costs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"=== stage (\w+)")


def used_memory_gb() -> float:
    """Used memory of the machine (MemTotal - MemAvailable), GB."""
    fields = {}
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0])  # kB
    return (fields["MemTotal"] - fields["MemAvailable"]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--output", required=True, help="run directory (removed first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    args = parser.parse_args()
    output = Path(args.output)
    shutil.rmtree(output, ignore_errors=True)
    baseline = used_memory_gb()
    samples: list[tuple[float, float]] = []
    marks: list[tuple[float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), used_memory_gb()))
            done.wait(args.interval)

    command = [sys.executable, str(REPO / "pipelines" / "full.py"), "--config", args.config, "--output", str(output)]
    for override in args.overrides:
        command += ["--set", override]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = STAGE_LINE.search(line)
        if match:
            marks.append((time.time(), match.group(1)))
            print(f"  {time.time() - started:7.1f} s  stage {match.group(1)}", flush=True)
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"the run failed with exit status {proc.returncode}")
    ends = [t for t, _ in marks[1:]] + [time.time()]
    results = json.loads((output / "results.json").read_text())
    rows = []
    for (start, stage), end in zip(marks, ends):
        during = [used for t, used in samples if start <= t <= end] or [baseline]
        rows.append({"stage": stage, "wall_s": results["wall_seconds"].get(stage),
                     "peak_gb": round(max(during) - baseline, 2)})
    record = {"config": args.config, "overrides": args.overrides, "baseline_gb": round(baseline, 2),
              "total_s": round(time.time() - started, 1), "stages": rows, "cpus": os.cpu_count()}
    (output / "stage_costs.json").write_text(json.dumps(record, indent=1))
    print(f"\n{Path(args.config).name} {' '.join(args.overrides)}: {record['total_s']:.0f} s in all; memory above the "
          f"{baseline:.1f} GB used before the run")
    print("| stage | wall s | peak memory (GB) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['wall_s']:.0f} | {row['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
