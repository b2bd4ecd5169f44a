"""The endpoint under stress, over real HTTP: backpressure (503 + Retry-After), request
timeout, streamed-upload limit, Prometheus metrics, batching by device, a replica killed
with SIGKILL mid-load, and the load test with garbage and class churn.

Extra applications with their own limits run beside the shared one (helpers/serve_app.py)
in the same Ray + Serve instance, each under its own route prefix."""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import serve_app
from helpers.serve_app import deploy_extra, remove
from PIL import Image

pytestmark = pytest.mark.slow



@pytest.fixture(scope="session")
def app_info(tmp_path_factory):
    pytest.importorskip("ray.serve")
    yield serve_app.start(tmp_path_factory.mktemp("serve"))
    serve_app.stop()


def big_jpeg(height: int = 480, width: int = 640) -> bytes:
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([rows * 255 // height, cols * 255 // width, (rows + cols) % 256], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def post_image(client: httpx.Client, url: str, body: bytes, **params) -> httpx.Response:
    return client.post(url + "v1/segment", params=params, content=body, headers={"content-type": "image/jpeg"})


# ---- backpressure, timeout, upload limit, batching -------------------------------------


@pytest.mark.parametrize("ingress", ["front", "replica"])
def test_full_queue_gets_503_with_retry_after(app_info, ingress):
    url = deploy_extra(app_info, "tight", max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2,
                       max_image_pixels=1_000_000, ingress=ingress)
    try:
        body = big_jpeg()
        with httpx.Client(timeout=60) as client:
            assert client.get(url + "healthz").json()["batching"] is False  # auto on CPU
            with ThreadPoolExecutor(16) as pool:
                started = time.perf_counter()
                responses = list(pool.map(lambda _: (post_image(client, url, body), time.perf_counter()), range(16)))
        statuses = [r.status_code for r, _ in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        for response, finished in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "2"
        # Refused requests are answered at once, not after waiting in a queue.
        fastest_503 = min(t for r, t in responses if r.status_code == 503) - started
        slowest_200 = max(t for r, t in responses if r.status_code == 200) - started
        assert fastest_503 < slowest_200
    finally:
        remove("tight")


@pytest.mark.parametrize("ingress", ["front", "replica"])
def test_request_timeout_gets_clean_503(app_info, ingress):
    url = deploy_extra(app_info, "slow", request_timeout_s=0.001, retry_after_s=3, max_image_pixels=1_000_000,
                       ingress=ingress)
    try:
        with httpx.Client(timeout=60) as client:
            response = post_image(client, url, big_jpeg())
            assert response.status_code == 503
            assert response.json()["error"] == "BusyError" and "request_timeout_s" in response.json()["detail"]
            assert response.headers["retry-after"] == "3"
            assert client.get(url + "healthz").status_code == 200  # the replica goes on
    finally:
        remove("slow")


def test_streamed_upload_is_cut_at_the_limit(app_info):
    limit = app_info["config"].serve.max_body_bytes
    sent = {"bytes": 0}

    def chunks():  # no Content-Length: the replica must count while reading
        for _ in range(limit // 65536 + 8):
            sent["bytes"] += 65536
            yield b"\xff" * 65536

    with httpx.Client(timeout=60) as client:
        response = client.post(app_info["url"] + "v1/segment", content=chunks(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "ImageTooLargeError" and str(limit) in response.json()["detail"]


# ---- metrics --------------------------------------------------------------------------


def scrape(url: str) -> str:
    try:
        return httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return ""


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_metrics_reach_prometheus(app_info):
    url = app_info["url"]
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            assert post_image(client, url, big_jpeg(64, 64), task="semantic").status_code == 200
        assert client.post(url + "v1/segment", params={"task": "semantic"}, content=b"not an image",
                           headers={"content-type": "image/jpeg"}).status_code == 400
    deadline = time.time() + 90  # Ray exports application metrics every few seconds
    while True:
        text = scrape(app_info["metrics_url"])
        ok = metric_value(text, "ray_pading_requests_total", task="semantic", status="200") >= 3
        bad = metric_value(text, "ray_pading_requests_total", task="semantic", status="400") >= 1
        latency = metric_value(text, "ray_pading_request_latency_ms_count", task="semantic") >= 4
        if ok and bad and latency and "ray_pading_vocabulary_version" in text and "ray_pading_classes" in text:
            break
        if time.time() > deadline:
            pytest.fail("pading metrics not exported in time; found: "
                        + ", ".join(sorted(set(re.findall(r"^(ray_pading\w+)", text, re.M)))))
        time.sleep(2)
    assert metric_value(text, "ray_pading_segments_total") > 0


# ---- a replica killed for real --------------------------------------------------------


def replica_pid(url: str) -> int | None:
    """The process id of the (single) replica answering at ``url``, None while none does."""
    try:
        response = httpx.get(url + "healthz", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json()["replica_pid"] if response.status_code == 200 else None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the replica's environment from /proc")
def test_the_model_replica_runs_with_the_allocator_settings(app_info):
    """The replica's process was started with pading.allocator's malloc settings (through its
    Ray runtime_env), next to the job's own variables, which Ray merges in."""
    from pading import allocator

    pid = replica_pid(app_info["url"])
    assert pid is not None
    with open(f"/proc/{pid}/environ", "rb") as handle:
        environ = dict(item.split("=", 1) for item in handle.read().decode().split("\0") if "=" in item)
    expected = allocator.allocator_env()
    assert expected, "this test process opts out of the settings (PADING_MALLOC or MALLOC_* set)"
    assert {key: environ.get(key) for key in expected} == expected
    assert environ.get("HF_HUB_OFFLINE") == "1"  # the job's runtime_env, merged with the replica's


@pytest.mark.parametrize("ingress", ["front", "replica"])
def test_sigkilled_replica_is_replaced_and_clients_see_no_hang(app_info, ingress):
    """Whichever takes HTTP, no client hangs and the replacement answers; the requests of the
    killed replica get the front's 503, or with ``serve.ingress=replica`` the proxy's 500
    (docs/serving.md, "Two deployments")."""
    url = deploy_extra(app_info, "victim", max_image_pixels=1_000_000, retry_after_s=1, ingress=ingress)
    try:
        victim = replica_pid(url)
        body = big_jpeg(240, 320)
        statuses: list[int] = []
        stop = threading.Event()

        def client_loop():
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        statuses.append(post_image(client, url, body).status_code)
                    except httpx.TimeoutException:
                        statuses.append(-1)  # a hang: the test fails below
                    except httpx.HTTPError:
                        statuses.append(0)
        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        before_kill = len(statuses)
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 90
        while time.time() < deadline:
            time.sleep(1)
            pid = replica_pid(url)
            if pid not in (None, victim) and statuses[-4:] == [200] * 4:
                break
        time.sleep(2)
        stop.set()
        for thread in threads:
            thread.join(60)
        after = statuses[before_kill:]
        failed = [s for s in after if s != 200]
        assert before_kill > 0 and all(s == 200 for s in statuses[:before_kill])
        assert replica_pid(url) not in (None, victim), "replica not replaced"
        assert statuses[-1] == 200, after[-10:]
        assert -1 not in after, "a client hung until its timeout"
        allowed = {503} if ingress == "front" else {500, 503}
        assert set(failed) <= allowed, f"clients saw {failed} while the replica was down ({len(after)} after the kill)"
    finally:
        remove("victim")


# ---- load with garbage and class churn ------------------------------------------------


def test_load_with_garbage_and_class_churn(app_info):
    from pipelines import loadtest

    body = loadtest.default_image()
    stats = loadtest.run_load(app_info["url"], body, concurrency=32, requests=320, task="panoptic", warmup=4,
                              garbage=0.2, churn="teapot")
    assert stats["server_errors"] == 0 and stats["good_failed"] == 0, stats["statuses"]
    assert stats["good_requests"] == 256 and stats["replica_alive"]
    kinds = loadtest.garbage_requests(body)
    assert len(kinds) >= 10 and set(stats["garbage"]) == set(kinds)  # every kind was sent
    assert stats["garbage_not_4xx"] == 0, stats["garbage"]
    assert stats["garbage"]["too many pixels"] == {"413": 4} and stats["garbage"]["GET on segment"] == {"405": 4}
    changes = stats["class_changes"]
    assert changes.get("POST 201", 0) >= 1 and changes.get("DELETE 200", 0) >= 1 and set(changes) <= {"POST 201",
                                                                                                      "DELETE 200"}
    assert not loadtest.failed(stats) and stats["p99_ms"] >= stats["p50_ms"] > 0
    with httpx.Client(timeout=60) as client:  # the churn left the vocabulary as it found it
        assert not [c for c in client.get(app_info["url"] + "v1/classes").json()["classes"] if c["added"]]
