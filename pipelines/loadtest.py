"""Load test of the segmentation endpoint: N requests from C concurrent clients, optionally
mixed with garbage requests and with classes added and removed while it runs.

    python pipelines/loadtest.py --url http://127.0.0.1:8000/ --concurrency 8 --requests 200
    python pipelines/loadtest.py --url ... --image ../shared/data/coco-samples/val2017/000000142238.jpg --task semantic
    python pipelines/loadtest.py --url ... --concurrency 32 --requests 1000 --garbage 0.2 --churn "traffic cone"
    python pipelines/loadtest.py --url ... --churn teapot --vocabularies 2   # + 2 named vocabularies

Prints throughput and p50/p95/p99 latency of the good requests, the statuses of every kind
of garbage (each must get its 4xx), the class changes made meanwhile, and whether the
replicas that answered during the run still answer after it (one JSON line with
``--json``). With ``--vocabularies N`` the good requests cycle over the base vocabulary and N
named ones (created if missing), and the churn adds and removes its class in each of them.
After every change the churning client reads back (``GET /v1/classes`` and a segmentation)
and counts a *stale read* when an answer is older than its own last write. Exit status 1 when
any request got a 5xx or no answer, a good request failed, a garbage request was not refused
with a 4xx, a class change failed or a read was stale. Only local endpoints (127.0.0.1,
localhost, ::1) are accepted: this is a test tool, not a flooder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlparse

from pading.serving.loadtest import (  # noqa: F401 - re-exported: tests import them from pipelines.loadtest
    CHURN_PAUSE_S,
    DEFAULT_IMAGE_SIZE,
    LOAD_VOCABULARY,
    LOCAL_HOSTS,
    MAX_CONCURRENCY,
    MAX_REQUESTS,
    PERCENTILES,
    READS_AFTER_WRITE,
    REQUEST_TIMEOUT_S,
    default_image,
    ensure_vocabularies,
    failed,
    garbage_requests,
    run_load,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the app's base URL, e.g. http://127.0.0.1:8000/")
    parser.add_argument("--concurrency", type=int, default=8, help=f"concurrent clients (1..{MAX_CONCURRENCY})")
    parser.add_argument("--requests", type=int, default=100, help=f"measured requests (1..{MAX_REQUESTS})")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests first")
    parser.add_argument("--image", default=None, help="a JPEG/PNG/WebP file (default: a generated 640x480 JPEG)")
    parser.add_argument("--task", default="panoptic", choices=("panoptic", "instance", "semantic", "all"))
    parser.add_argument("--garbage", type=float, default=0.0,
                        help="fraction of requests that are garbage (16 kinds, each must get a 4xx), e.g. 0.2")
    parser.add_argument("--churn", nargs="?", const="traffic cone", default=None, metavar="CLASS",
                        help="add and remove a class by name while the load runs (default name: traffic cone)")
    parser.add_argument("--vocabularies", type=int, default=0,
                        help="also use this many named vocabularies (load-1, ...; created when missing)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in LOCAL_HOSTS:
        parser.error(f"--url must point at this machine ({', '.join(LOCAL_HOSTS)}), not {host!r}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY or not 1 <= args.requests <= MAX_REQUESTS or args.warmup < 0:
        parser.error(f"--concurrency must be 1..{MAX_CONCURRENCY}, --requests 1..{MAX_REQUESTS}, --warmup >= 0")
    if not 0 <= args.garbage < 1:
        parser.error("--garbage must be in [0, 1)")
    body = Path(args.image).read_bytes() if args.image else default_image()
    stats = run_load(args.url, body, concurrency=args.concurrency, requests=args.requests, task=args.task,
                     warmup=args.warmup, garbage=args.garbage, churn=args.churn, vocabularies=args.vocabularies)
    print(f"{stats['requests']} requests ({stats['good_requests']} good), concurrency {stats['concurrency']}, "
          f"task {stats['task']}: {stats['throughput_rps']:.2f} good req/s, wall {stats['wall_s']:.1f} s")
    print(f"statuses {stats['statuses']}; 5xx or no answer: {stats['server_errors']}; good failed: "
          f"{stats['good_failed']}; replicas {stats['replicas']} alive: {stats['replica_alive']}; "
          f"vocabularies {stats['vocabularies']}")
    if "p50_ms" in stats:
        print(f"latency ms: p50 {stats['p50_ms']:.1f}  p95 {stats['p95_ms']:.1f}  p99 {stats['p99_ms']:.1f}  "
              f"mean {stats['mean_ms']:.1f}")
    for kind, counts in stats.get("garbage", {}).items():
        print(f"  garbage {kind!r}: {counts}")
    if "class_changes" in stats:
        print(f"class changes during the run: {stats['class_changes']}; stale reads: {stats['stale_reads']} "
              f"{stats['stale_examples']}")
    if args.json:
        print(json.dumps(stats))
    return 1 if failed(stats) else 0


if __name__ == "__main__":
    sys.exit(main())
