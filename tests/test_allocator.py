"""glibc malloc settings of the processes that segment images (pading.allocator): what they
are, who can turn them off, and that they do keep a worker thread's convolutions from
faulting their buffers in again at every call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pading import allocator
from pading.config import ServeConfig
from pading.serving.launch import model_options

# a worker thread (as a Serve replica runs each request) repeating a 64-channel 3x3
# convolution on a 320 x 320 map, the size of a 640 px image's first feature maps;
# prints the minor page faults per call after three warm-up calls
PROBE = textwrap.dedent("""
    import resource, threading, torch
    torch.set_num_threads(1)
    def work(out):
        x = torch.randn(1, 64, 320, 320)
        conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        with torch.inference_mode():
            for _ in range(3):
                conv(x).relu().mean()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                conv(x).relu().mean()
            out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 10)
    out = []
    thread = threading.Thread(target=work, args=(out,))
    thread.start()
    thread.join()
    print(out[0])
""")


def _faults_per_call(env: dict[str, str]) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_the_settings_and_who_turns_them_off():
    assert allocator.allocator_env({}) == allocator.SETTINGS
    assert allocator.SETTINGS == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                                  "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20)}
    assert allocator.allocator_env({"PADING_MALLOC": "default"}) == {}
    assert allocator.allocator_env({"PADING_MALLOC": " Default "}) == {}
    # any allocator variable of the user's own: none of ours is mixed in
    assert allocator.allocator_env({"MALLOC_ARENA_MAX": "4"}) == {}
    assert allocator.allocator_env({"PATH": "/bin"}) == allocator.SETTINGS
    assert allocator.runtime_env({}) == {"runtime_env": {"env_vars": allocator.SETTINGS}}
    assert allocator.runtime_env({"PADING_MALLOC": "default"}) == {}


def test_the_model_replicas_get_them(monkeypatch):
    monkeypatch.delenv("PADING_MALLOC", raising=False)
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    options = model_options(ServeConfig())["ray_actor_options"]
    assert options["runtime_env"] == {"env_vars": allocator.SETTINGS}
    assert options["num_cpus"] == ServeConfig().num_cpus
    monkeypatch.setenv("PADING_MALLOC", "default")
    assert "runtime_env" not in model_options(ServeConfig())["ray_actor_options"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_with_the_settings_a_worker_threads_calls_take_no_page_faults():
    """Each call of the probe faults its buffers in again with glibc's defaults (16,000 faults
    a call here); with the settings it takes none after the first calls."""
    default = _faults_per_call({})
    if default < 1000:
        pytest.skip(f"this machine's allocator does not fault here with its defaults ({default:.0f} a call)")
    assert _faults_per_call(allocator.allocator_env({})) < 50
