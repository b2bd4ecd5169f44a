import os
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
