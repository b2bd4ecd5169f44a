"""Load test of the segmentation endpoint: N requests from C concurrent clients.

    python pipelines/loadtest.py --url http://127.0.0.1:8000/ --concurrency 8 --requests 200
    python pipelines/loadtest.py --url ... --image ../shared/data/coco-samples/val2017/000000142238.jpg --task semantic

Prints throughput and p50/p95/p99 latency (and one JSON line with ``--json``). Only local
endpoints (127.0.0.1, localhost, ::1) are accepted: this is a test tool, not a flooder.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256
DEFAULT_IMAGE_SIZE = (480, 640)  # (H, W) of the generated test image
PERCENTILES = (50, 95, 99)
REQUEST_TIMEOUT_S = 120.0


def default_image() -> bytes:
    """A 640x480 JPEG with smooth structure (so every request is the same work)."""
    from PIL import Image

    height, width = DEFAULT_IMAGE_SIZE
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) * 255 // (height + width)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def run_load(url: str, body: bytes, *, concurrency: int, requests: int, task: str, warmup: int) -> dict:
    """Send ``requests`` POST /v1/segment from ``concurrency`` threads; latency stats in ms."""
    import httpx

    endpoint = url.rstrip("/") + "/v1/segment"
    local = threading.local()

    def one(_: int) -> tuple[float, int]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
        started = time.perf_counter()
        try:
            status = local.client.post(endpoint, params={"task": task}, content=body,
                                       headers={"content-type": "image/jpeg"}).status_code
        except httpx.HTTPError:
            status = 0
        return 1000 * (time.perf_counter() - started), status

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(warmup)))
        started = time.perf_counter()
        results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    latencies = np.array([latency for latency, status in results if status == 200])
    errors = sum(status != 200 for _, status in results)
    stats = {"requests": requests, "concurrency": concurrency, "task": task, "errors": int(errors),
             "wall_s": round(wall, 3), "throughput_rps": round((requests - errors) / wall, 3)}
    if latencies.size:
        stats.update({f"p{p}_ms": round(float(np.percentile(latencies, p)), 1) for p in PERCENTILES})
        stats["mean_ms"] = round(float(latencies.mean()), 1)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the app's base URL, e.g. http://127.0.0.1:8000/")
    parser.add_argument("--concurrency", type=int, default=8, help=f"concurrent clients (1..{MAX_CONCURRENCY})")
    parser.add_argument("--requests", type=int, default=100, help=f"measured requests (1..{MAX_REQUESTS})")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests first")
    parser.add_argument("--image", default=None, help="a JPEG/PNG/WebP file (default: a generated 640x480 JPEG)")
    parser.add_argument("--task", default="panoptic", choices=("panoptic", "instance", "semantic", "all"))
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    args = parser.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in LOCAL_HOSTS:
        parser.error(f"--url must point at this machine ({', '.join(LOCAL_HOSTS)}), not {host!r}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY or not 1 <= args.requests <= MAX_REQUESTS or args.warmup < 0:
        parser.error(f"--concurrency must be 1..{MAX_CONCURRENCY}, --requests 1..{MAX_REQUESTS}, --warmup >= 0")
    body = Path(args.image).read_bytes() if args.image else default_image()
    stats = run_load(args.url, body, concurrency=args.concurrency, requests=args.requests, task=args.task,
                     warmup=args.warmup)
    print(f"{stats['requests']} requests, concurrency {stats['concurrency']}, task {stats['task']}: "
          f"{stats['throughput_rps']:.2f} req/s, {stats['errors']} errors, wall {stats['wall_s']:.1f} s")
    if "p50_ms" in stats:
        print(f"latency ms: p50 {stats['p50_ms']:.1f}  p95 {stats['p95_ms']:.1f}  p99 {stats['p99_ms']:.1f}  "
              f"mean {stats['mean_ms']:.1f}")
    if args.json:
        print(json.dumps(stats))
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
