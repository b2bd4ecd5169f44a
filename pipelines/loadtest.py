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
import io
import json
import sys
import threading
import time
from collections import Counter
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
CHURN_PAUSE_S = 0.5
READS_AFTER_WRITE = 2  # read-backs by the churning client after each of its changes
LOAD_VOCABULARY = "load-{}"  # names of the named vocabularies --vocabularies creates


def _encode(pixels: np.ndarray, image_format: str, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def default_image() -> bytes:
    """A 640x480 JPEG with smooth structure (so every request is the same work)."""
    height, width = DEFAULT_IMAGE_SIZE
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) * 255 // (height + width)], -1)
    return _encode(pixels.astype(np.uint8), "JPEG", quality=90)


def garbage_requests(good: bytes) -> dict[str, dict]:
    """Kinds of bad request -> httpx request arguments (method, path, params, content or
    files, headers). Every one must be answered with a 4xx."""
    jpeg = {"content-type": "image/jpeg"}
    small = np.zeros((8, 8, 3), np.uint8)
    png = _encode(small, "PNG")
    huge = _encode(np.zeros((4100, 4100), np.uint8), "PNG")  # 16.8 M pixels: above the default limit
    segment = "v1/segment"
    return {
        "empty body": {"path": segment, "content": b"", "headers": jpeg},
        "text as jpeg": {"path": segment, "content": b"this is not an image\n" * 20, "headers": jpeg},
        "random bytes": {"path": segment, "content": np.random.default_rng(0).bytes(4096), "headers": jpeg},
        "truncated jpeg": {"path": segment, "content": good[: len(good) // 3], "headers": jpeg},
        "corrupt png": {"path": segment, "content": png[:40] + b"\x00" * 32 + png[72:],
                        "headers": {"content-type": "image/png"}},
        "gif": {"path": segment, "content": _encode(small, "GIF"), "headers": {"content-type": "image/gif"}},
        "too many pixels": {"path": segment, "content": huge, "headers": {"content-type": "image/png"}},
        "unknown task": {"path": segment, "params": {"task": "depth"}, "content": good, "headers": jpeg},
        "unknown format": {"path": segment, "params": {"format": "tiff"}, "content": good, "headers": jpeg},
        "png with all tasks": {"path": segment, "params": {"task": "all", "format": "png"}, "content": good,
                               "headers": jpeg},
        "min_score above 1": {"path": segment, "params": {"min_score": "2"}, "content": good, "headers": jpeg},
        "min_score not a number": {"path": segment, "params": {"min_score": "high"}, "content": good,
                                   "headers": jpeg},
        "multipart without file": {"path": segment, "content": _multipart_without_file({"note": "no file"}),
                                   "headers": {"content-type": "multipart/form-data; boundary=x"}},
        "GET on segment": {"method": "GET", "path": segment},
        "class with empty name": {"path": "v1/classes", "json": {"names": [" "]}},
        "classes not a list": {"path": "v1/classes", "json": {"names": "zebra"}},
    }


def _send(client, base: str, spec: dict):
    spec = dict(spec)
    method = spec.pop("method", "POST")
    return client.request(method, base + spec.pop("path"), **spec)


def _multipart_without_file(fields: dict) -> bytes:
    parts = [f'--x\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + "--x--\r\n").encode()


def _churn(client, base: str, name: str, vocabularies: list[str], body: bytes, stop: threading.Event, log: list,
           stale: list) -> None:
    """Add and remove the class ``name`` in each vocabulary, again and again, until ``stop``;
    after each change, read back and record (in ``stale``) any answer older than that change."""
    while not stop.is_set():
        for vocabulary in vocabularies:
            for method, args in (("POST", {"json": {"names": [name]}}), ("DELETE", {})):
                path = "v1/classes" if method == "POST" else f"v1/classes/{name}"
                try:
                    response = client.request(method, base + path, params={"vocabulary": vocabulary}, **args)
                    status = response.status_code
                except Exception:  # noqa: BLE001 - a transport failure counts as a failed change
                    status, response = 0, None
                log.append((method, status))
                if response is not None and status in (200, 201):
                    version = response.json()["vocabulary_version"]
                    stale.extend(_read_back(client, base, vocabulary, body, version, name, present=method == "POST"))
        stop.wait(CHURN_PAUSE_S)


def _read_back(client, base: str, vocabulary: str, body: bytes, version: int, name: str, present: bool) -> list:
    """Reads after a write of ``version``: the problems found (older version, class missing or still there)."""
    problems = []
    for _ in range(READS_AFTER_WRITE):
        try:
            listing = client.get(base + "v1/classes", params={"vocabulary": vocabulary})
            answer = client.post(base + "v1/segment", params={"vocabulary": vocabulary}, content=body,
                                 headers={"content-type": "image/jpeg"})
        except Exception:  # noqa: BLE001 - counted by the status checks of the load itself
            continue
        for response in (listing, answer):
            if response.status_code == 200 and response.json()["vocabulary_version"] < version:
                problems.append(f"{vocabulary}: version {response.json()['vocabulary_version']} after writing {version}")
        if listing.status_code == 200:
            names = {c["name"] for c in listing.json()["classes"]}
            if (name in names) != present:
                problems.append(f"{vocabulary}: {name!r} {'missing' if present else 'still listed'} at version "
                                f"{listing.json()['vocabulary_version']} after writing {version}")
    return problems


def ensure_vocabularies(client, base: str, count: int) -> list[str]:
    """``base`` plus ``count`` named vocabularies (``load-1`` ...), created when missing."""
    names = ["base"] + [LOAD_VOCABULARY.format(k + 1) for k in range(count)]
    existing = {v["name"] for v in client.get(base + "v1/vocabularies").json()["vocabularies"]} if count else set()
    for name in names[1:]:
        if name not in existing:
            response = client.post(base + "v1/vocabularies", json={"name": name})
            if response.status_code != 201:
                raise RuntimeError(f"cannot create vocabulary {name!r}: {response.status_code} {response.text}")
    return names


def run_load(url: str, body: bytes, *, concurrency: int, requests: int, task: str, warmup: int,
             garbage: float = 0.0, churn: str | None = None, vocabularies: int = 0) -> dict:
    """Send ``requests`` requests from ``concurrency`` threads: good POST /v1/segment (over the
    base vocabulary and ``vocabularies`` named ones, in turn), and a ``garbage`` fraction of
    bad ones cycling through :func:`garbage_requests`; with ``churn`` (a class name) that class
    is added and removed in every vocabulary meanwhile, each change read back. Latency stats
    (ms) of the good ones; statuses of every kind."""
    import httpx

    base = url.rstrip("/") + "/"
    kinds = garbage_requests(body) if garbage > 0 else {}
    names = list(kinds)
    every = max(1, round(1 / garbage)) if garbage > 0 else 0
    plan = [names[(i // every) % len(names)] if every and i % every == every - 1 else "good" for i in range(requests)]
    local = threading.local()
    replicas: set = set()

    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as control:
        targets = ensure_vocabularies(control, base, vocabularies)
        good_specs = [{"path": "v1/segment", "params": {"task": task, "vocabulary": v}, "content": body,
                       "headers": {"content-type": "image/jpeg"}} for v in targets]

        def one(item: tuple[int, str]) -> tuple[str, float, int]:
            index, kind = item
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
            started = time.perf_counter()
            try:
                response = _send(local.client, base, kinds.get(kind, good_specs[index % len(good_specs)]))
                status = response.status_code
                if status == 200 and "x-replica" in response.headers:
                    replicas.add(response.headers["x-replica"])
            except httpx.HTTPError:
                status = 0
            return kind, 1000 * (time.perf_counter() - started), status

        before = _replicas(control, base)
        stop, churn_log, stale = threading.Event(), [], []
        churner = (threading.Thread(target=_churn, args=(control, base, churn, targets, body, stop, churn_log, stale))
                   if churn else None)
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, enumerate(["good"] * warmup)))
            if churner:
                churner.start()
            started = time.perf_counter()
            results = list(pool.map(one, enumerate(plan)))
            wall = time.perf_counter() - started
        stop.set()
        if churner:
            churner.join()
        after = _replicas(control, base)
    good = [(latency, status) for kind, latency, status in results if kind == "good"]
    latencies = np.array([latency for latency, status in good if status == 200])
    statuses = Counter(status for _, _, status in results)
    stats = {
        "requests": requests, "concurrency": concurrency, "task": task, "good_requests": len(good),
        "good_failed": sum(status != 200 for _, status in good),
        "server_errors": sum(n for status, n in statuses.items() if status >= 500 or status == 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall, 3), "throughput_rps": round(len(latencies) / wall, 3),
        "vocabularies": targets, "replicas": sorted(replicas | before),
        "replica_alive": bool(before) and bool(after) and after <= (replicas | before),
    }
    if kinds:
        by_kind: dict[str, Counter] = {}
        for kind, _, status in results:
            if kind != "good":
                by_kind.setdefault(kind, Counter())[status] += 1
        stats["garbage"] = {kind: {str(k): v for k, v in sorted(c.items())} for kind, c in by_kind.items()}
        stats["garbage_not_4xx"] = sum(n for c in by_kind.values() for status, n in c.items()
                                       if not 400 <= status < 500)
    if churn:
        stats["class_changes"] = {f"{method} {status}": n for (method, status), n in sorted(Counter(churn_log).items())}
        stats["stale_reads"] = len(stale)
        stats["stale_examples"] = stale[:5]
    if latencies.size:
        stats.update({f"p{p}_ms": round(float(np.percentile(latencies, p)), 1) for p in PERCENTILES})
        stats["mean_ms"] = round(float(latencies.mean()), 1)
    return stats


def _replicas(client, base: str, polls: int = 6) -> set:
    """The replicas (``X-Replica``) that answer ``polls`` health checks."""
    seen = set()
    for _ in range(polls):
        try:
            response = client.get(base + "healthz")
        except Exception:  # noqa: BLE001 - no answer: no replica
            continue
        if response.status_code == 200:
            seen.add(response.json().get("replica") or str(response.json().get("replica_pid")))
    return seen


def failed(stats: dict) -> bool:
    """The run broke the endpoint's promise: a 5xx / no answer, a good request failing, a
    garbage request not refused with a 4xx, a failed class change, a stale read or a replaced replica."""
    churn_failed = any(not key.endswith(("200", "201")) for key in stats.get("class_changes", {}))
    return bool(stats["server_errors"] or stats["good_failed"] or stats.get("garbage_not_4xx")
                or churn_failed or stats.get("stale_reads") or not stats["replica_alive"])


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
