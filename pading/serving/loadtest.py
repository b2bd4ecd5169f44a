"""The load generator of pipelines/loadtest.py, without Ray: ``concurrency`` threads send
good ``POST /v1/segment`` requests to a running endpoint, optionally mixed with garbage
requests (each must be refused with a 4xx) and with a class added and removed in every
vocabulary meanwhile (each change read back: a *stale read* is an answer older than the
client's own last write); :func:`failed` says whether the run broke the endpoint's promise
(docs/serving.md). The command line and its printed summary are pipelines/loadtest.py.

httpx is a test extra (pyproject.toml), not a runtime dependency: :func:`run_load` imports
it when called, so this module imports without it."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

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
