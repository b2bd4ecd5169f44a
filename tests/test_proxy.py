"""``serve.proxy``: Ray Serve's Python proxy or its HAProxy ingress in front of the endpoint
(docs/serving.md, "The proxy"): the environment each choice gives Serve's processes, the
errors for a setting that cannot work, and the endpoint behind HAProxy end to end."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.serve_app import free_port, listener, wait_until_healthy
from helpers.tiny_bundle import build_tiny_bundle
from PIL import Image

from pading.config import ServeConfig, load_config
from pading.errors import ConfigError
from pading.serving import launch

REPO = Path(__file__).resolve().parents[1]
HAPROXY = launch.haproxy_binary()


def test_the_python_proxy_needs_nothing():
    assert launch.proxy_env(ServeConfig(proxy="ray"), nodes=1, binary="/bin/true") == {}
    assert launch.proxy_env(ServeConfig(proxy="ray"), nodes=8, binary=None) == {}


def test_auto_takes_haproxy_only_on_a_one_machine_ray_of_its_own_with_the_binary(monkeypatch, tmp_path):
    assert ServeConfig().proxy == "auto"
    env = launch.proxy_env(ServeConfig(), nodes=1, own_ray=True, binary="/bin/true")
    assert {key: env[key] for key in launch.HAPROXY_ENV} == launch.HAPROXY_ENV
    assert launch.proxy_env(ServeConfig(), nodes=1, own_ray=False, binary="/bin/true") == {}  # a cluster's Ray
    assert launch.proxy_env(ServeConfig(), nodes=2, own_ray=True, binary="/bin/true") == {}
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(not_executable))
    assert launch.proxy_env(ServeConfig(), nodes=1, own_ray=True) == {}  # no binary: no error, Serve's proxy


def test_haproxy_on_one_machine_gets_the_switch_and_free_listener_ports():
    env = launch.proxy_env(ServeConfig(proxy="haproxy"), nodes=1, own_ray=False, binary="/bin/true")
    assert {key: env[key] for key in launch.HAPROXY_ENV} == launch.HAPROXY_ENV
    ports = [int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]), int(env["RAY_SERVE_HAPROXY_STATS_PORT"])]
    assert ports[0] != ports[1] and all(1024 <= port < 65536 for port in ports)
    for port in ports:  # free now
        with socket.socket() as sock:
            sock.bind(("", port))


def test_haproxy_on_a_cluster_needs_a_reachable_host_and_keeps_rays_listener_ports():
    with pytest.raises(ConfigError, match=r"serve.proxy=haproxy on a Ray of 3 machines.*serve.host=0.0.0.0"):
        launch.proxy_env(ServeConfig(proxy="haproxy"), nodes=3, binary="/bin/true")
    assert launch.proxy_env(ServeConfig(proxy="haproxy", host="0.0.0.0"), nodes=3,
                            binary="/bin/true") == launch.HAPROXY_ENV


def test_haproxy_without_a_binary_says_where_to_get_one(monkeypatch, tmp_path):
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(not_executable))
    assert launch.haproxy_binary() is None
    with pytest.raises(ConfigError, match=r"no HAProxy binary: install ray\[serve\].*serve.proxy=ray"):
        launch.proxy_env(ServeConfig(proxy="haproxy"), nodes=1)


def test_an_unknown_proxy_is_refused():
    with pytest.raises(ConfigError, match="proxy"):
        ServeConfig(proxy="nginx")


def test_both_deployments_get_the_environment_beside_their_own():
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    model = launch.model_options(ServeConfig(), env)["ray_actor_options"]
    assert model["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert set(launch.model_options(ServeConfig())["ray_actor_options"].get("runtime_env", {}).get(
        "env_vars", {})) <= set(model["runtime_env"]["env_vars"])  # the allocator's settings stay
    front = launch.front_options(ServeConfig(), env)["ray_actor_options"]
    assert front == {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    assert launch.front_options(ServeConfig())["ray_actor_options"] == {"num_cpus": 0}


def test_a_taken_port_is_named_before_serve_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"serve.port {port} on 127.0.0.1 is taken.*--port"):
            launch.check_port_free("127.0.0.1", port)
    launch.check_port_free("127.0.0.1", port)  # free again


def test_serve_run_with_haproxy_asks_for_the_switch_in_its_environment(monkeypatch, tmp_path):
    pytest.importorskip("ray.serve")
    from pipelines import serve as serve_module

    bundle = tmp_path / "bundle"
    build_tiny_bundle(bundle)
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    with pytest.raises(ConfigError, match=r"RAY_SERVE_ENABLE_HA_PROXY=1 serve run"):
        serve_module.app({"bundle": str(bundle), "proxy": "haproxy"})


def _png(height: int = 48, width: int = 64) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def endpoint_command(tmp_path: Path, *options: str, env: dict | None = None):
    """``python pipelines/serve.py`` over a tiny bundle on a free port, on the Ray it starts,
    until it answers: yields (url, port, bundle directory, log path); SIGTERM at the end, then
    waits until nothing listens on the port."""
    bundle = tmp_path / "bundle"
    build_tiny_bundle(bundle)
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "pipelines" / "serve.py"), "--bundle", str(bundle), "--port", str(port),
             "--num-cpus", "2", *options], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})})
    url = f"http://127.0.0.1:{port}/"

    def alive():
        assert server.poll() is None, log_path.read_text()[-3000:]

    try:
        wait_until_healthy(url, timeout_s=180, check=alive)
        yield url, port, bundle, log_path
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    deadline = time.time() + 30
    while listener(port) and time.time() < deadline:
        time.sleep(0.5)
    assert listener(port) == "", "something still listens on the endpoint's port"


@pytest.mark.slow
@pytest.mark.skipif(HAPROXY is None or not sys.platform.startswith("linux"),
                    reason="no HAProxy binary (ray[serve] brings one on Linux)")
@pytest.mark.parametrize("ingress", ["front", "replica"])
def test_the_endpoint_command_runs_behind_haproxy_answers_as_the_library_does_and_stops_whole(tmp_path, ingress):
    """``python pipelines/serve.py`` with the default ``serve.proxy`` (auto) on the Ray it starts,
    with an HTTP front or with the model replicas taking HTTP (``serve.ingress``): HAProxy
    listens on serve.port; a segmentation equals the library's on the same bytes; the routes'
    own errors (413 with its JSON) pass through unchanged; SIGTERM stops it all and frees the port."""
    from pading.bundle import Bundle
    from pading.serving.service import SegmentationService

    with endpoint_command(tmp_path, "--set", "serve.max_body_bytes=100000", "--set", "serve.runtime=torch",
                          "--set", f"serve.ingress={ingress}") as (url, port, bundle, _):
        assert "haproxy" in listener(port)
        body = _png()
        response = httpx.post(url + "v1/segment", params={"task": "all"}, content=body,
                              headers={"content-type": "image/png"}, timeout=60)
        assert response.status_code == 200, response.text
        trained = Bundle.load(bundle)
        service = SegmentationService(trained, load_config(bundle / "config.yaml", ["serve.runtime=torch"]).serve)
        (expected,) = service.segment([service.decode(body)], ["all"], ["json"])
        served = response.json()
        for task in ("panoptic", "instance", "semantic"):
            assert json.dumps(served[task], sort_keys=True) == json.dumps(expected[task], sort_keys=True), task

        too_big = httpx.post(url + "v1/segment", content=b"\0" * 200_000, timeout=60)
        assert too_big.status_code == 413 and "above the limit of 100000" in too_big.json()["detail"]


@pytest.mark.slow
def test_when_haproxy_does_not_start_auto_serves_behind_serves_own_proxy(tmp_path):
    """An HAProxy binary that fails at once (here a script that exits 1): with ``serve.proxy=auto``
    the endpoint says so and comes up behind Serve's own proxy, and answers."""
    broken = tmp_path / "haproxy"
    broken.write_text("#!/bin/sh\necho 'not an HAProxy' >&2\nexit 1\n")
    broken.chmod(0o755)
    with endpoint_command(tmp_path, env={"RAY_SERVE_HAPROXY_BINARY_PATH": str(broken)}) as (url, port, _, log):
        assert "ProxyActor" in listener(port)
        response = httpx.post(url + "v1/segment", content=_png(), headers={"content-type": "image/png"}, timeout=60)
        assert response.status_code == 200, response.text
        assert "HAProxy did not start" in log.read_text() and "not an HAProxy" in log.read_text()


def test_free_ports_come_from_outside_the_kernels_ephemeral_range(monkeypatch):
    # a port the kernel hands out can go to another process's socket before HAProxy binds it
    from pading.serving import launch

    low, high = launch._ephemeral_range()
    ports = {launch.free_port() for _ in range(10)}
    assert all(not low <= port <= high for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("", ports.pop()))
        monkeypatch.setattr(launch, "PORT_SEARCH", (held.getsockname()[1],) * 2)  # the one candidate is taken
        fallback = launch.free_port()
        assert fallback != held.getsockname()[1] and low <= fallback <= high  # the kernel's pick, then
