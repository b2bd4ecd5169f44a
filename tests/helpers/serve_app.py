"""One Ray + Serve deployment of a tiny bundle per pytest session, shared by
tests/test_serve.py and tests/test_page.py (each wraps :func:`start` in a session fixture
and calls :func:`stop` at the end; the second call of either is a no-op)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from helpers.tiny_bundle import build_tiny_bundle
from pading.bundle import CONFIG_FILE
from pading.serving.launch import free_port

REPO = Path(__file__).resolve().parents[2]

READY_TIMEOUT_S = 120
MAX_IMAGE_PIXELS = 400_000  # the COCO samples (640x480) fit, a 1000x500 image does not
MAX_BODY_BYTES = 4 * 1024 * 1024

_running: dict = {}


def listener(port: int) -> str:
    """The command line of the process listening on TCP ``port`` here ("" for none), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours to read
            continue
    return ""


def wait_until_healthy(url: str, timeout_s: float = READY_TIMEOUT_S, check=None) -> None:
    """Until ``GET {url}healthz`` answers 200; ``check()`` runs between tries (to fail early,
    e.g. when the server process died); TimeoutError after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(url + "healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if check is not None:
            check()
        if time.time() > deadline:
            raise TimeoutError(f"{url}healthz did not answer within {timeout_s} s")
        time.sleep(0.5)


def start(workdir: Path) -> dict:
    """``{"url", "bundle_dir", "metrics_url", "config"}`` of the running app, starting Ray (own local instance,
    2 CPUs) and Serve on a free 127.0.0.1 port the first time."""
    if _running:
        return _running
    import ray

    from pading.config import load_config
    from pipelines import serve as serve_module

    bundle_dir = Path(workdir) / "bundle"
    build_tiny_bundle(bundle_dir)
    overrides = [f"serve.port={free_port()}", "serve.num_cpus=1", f"serve.max_image_pixels={MAX_IMAGE_PIXELS}",
                 f"serve.max_body_bytes={MAX_BODY_BYTES}", "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.02",
                 "serve.batching=on"]  # auto would turn it off on CPU; this app tests the batching path
    config = load_config(bundle_dir / CONFIG_FILE, overrides)
    env_vars = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    metrics_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_vars},
             log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        url = serve_module.deploy(bundle_dir, config)
        wait_until_healthy(url)
    except BaseException:
        stop(force=True)
        raise
    _running.update(url=url, bundle_dir=bundle_dir, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                    config=config)
    return _running


def stop(force: bool = False) -> None:
    """Shut Serve and this process's Ray down (only what :func:`start` started)."""
    if not _running and not force:
        return
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        _running.clear()


def deploy_extra(app_info: dict, name: str, **serve_settings) -> str:
    """Deploy the shared bundle again as application ``name`` at ``/<name>`` with other
    ``serve`` settings (0 CPUs reserved, so it fits beside the shared app; its own vocabulary
    store unless ``vocabulary_store`` is given); its URL once it answers."""
    from ray import serve

    from pading.config import load_config
    from pipelines import serve as serve_module

    settings = {"num_cpus": 0, "vocabulary_store": app_info["bundle_dir"].parent / f"vocabularies-{name}",
                **serve_settings}
    overrides = [f"serve.{key}={value}" for key, value in settings.items()]
    config = load_config(app_info["bundle_dir"] / CONFIG_FILE,
                         [f"serve.port={app_info['config'].serve.port}", *overrides])
    serve.run(serve_module.build_application(app_info["bundle_dir"], config.serve), name=name,
              route_prefix=f"/{name}")
    url = app_info["url"] + f"{name}/"
    wait_until_healthy(url)
    return url


def remove(name: str) -> None:
    from ray import serve

    serve.delete(name)
