import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PADING_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real COCO samples); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco_samples(shared_data) -> Path:
    path = shared_data / "coco-samples"
    if not (path / "panoptic_val2017.json").is_file():
        pytest.skip(f"{path} has no panoptic_val2017.json")
    return path


@pytest.fixture(scope="session")
def coco_tiny(shared_data) -> Path:
    path = shared_data / "coco-tiny"
    if not (path / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"{path} has no instances annotations")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """2 shared cores: one intra-op thread per test process is much faster for tiny models."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- two test processes (pytest-xdist; pyproject's addopts: -n 2 --dist loadgroup) -------
#
# Most of the suite's wall time is one process starting (imports, Ray, Ray Train's workers)
# while the other core waits, so the modules run in two processes. A module is one unit (its
# module fixtures, e.g. test_pipeline's full run, are computed once); the Serve modules that
# share helpers/serve_app.py's session app are one unit; a test may name its own unit with
# ``@pytest.mark.xdist_group("...")`` when it needs no module fixture. Units start in the order
# below (the longest first: the last unit to start bounds the run), the rest in file order.
# docs/testing.md lists the measured times.
SHARED_APP = {"test_serve", "test_page", "test_serve_production", "test_serve_vocabularies"}  # helpers/serve_app.py
LONGEST_FIRST = ["test_pipeline", "test_cluster", "test_large_vocabulary", "shared-serve-app", "coco-tiny-run",
                 "test_segment", "test_tune_tables", "test_distributed"]


def _unit(item) -> str:
    marker = item.get_closest_marker("xdist_group")
    if marker is not None:
        return str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))
    module = item.module.__name__.rsplit(".", 1)[-1]
    return "shared-serve-app" if module in SHARED_APP else module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_unit(item)))
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))  # stable: file order within a unit


def pytest_configure(config):
    """In the process that starts the test processes: make Ray's default auth token before any
    test starts a cluster. On a fresh HOME the first ``ray.init`` writes ``~/.ray/auth_token``;
    two test processes doing that at once could each start a cluster whose later processes
    read the other's token."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if os.environ.get("RAY_AUTH_MODE") or (Path.home() / ".ray" / "auth_token").is_file():
        return
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "get-auth-token", "--generate"], capture_output=True, timeout=120, check=False)


@pytest.fixture(autouse=True, scope="module")
def _shared_app_only_for_its_modules(request):
    """helpers/serve_app.py's app (its Ray, its replicas' CPUs) is stopped before any other
    module runs in this process: a module that starts or joins Ray here must find the CPUs free."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    app = sys.modules.get("helpers.serve_app")
    if module not in SHARED_APP and app is not None:
        app.stop()
    yield
