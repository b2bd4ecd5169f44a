"""A Ray that a command starts ends with the command: no process of it outlives the driver,
even one stuck in its own exit (docs/architecture.md, "Processes left behind")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipelines import common

# A driver that starts its Ray as the pipelines do and leaves behind an actor process that cannot
# finish exiting: Python's exit waits for a non-daemon thread, as Ray 2.60's core worker once
# waited on a lock in its exit handler. Its PID is printed; the driver then simply ends.
DRIVER = textwrap.dedent("""
    import json, os, threading, time
    import ray
    from pipelines import common

    common.init_ray()

    @ray.remote(num_cpus=0)
    class Stuck:
        def pid(self):
            return os.getpid()

        def leave(self):
            threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
            ray.actor.exit_actor()

    actor = Stuck.remote()
    print("STUCK", ray.get(actor.pid.remote()), flush=True)
    actor.leave.remote()
    time.sleep(1)
    print("LEFT", json.dumps([pid for pid, _ in common.ray_processes(common.child_pid("raylet"))]), flush=True)
""")


def _alive(pid: int) -> bool:
    """Running (a killed process whose parent has not reaped it yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # starts a Ray
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from Linux's /proc")
def test_a_worker_stuck_in_its_exit_does_not_outlive_the_driver(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("STUCK", "LEFT")))
    stuck = int(lines["STUCK"])
    try:
        # the driver's Ray listed the stuck actor among its processes while it ran ...
        assert stuck in json.loads(lines["LEFT"])
        # ... and it is gone once the driver has exited, with a warning naming it
        assert not _alive(stuck), "the stuck actor outlived the driver that started its Ray"
        assert f"process {stuck} (ray::Stuck) of this run's Ray was still running" in done.stderr
    finally:
        if _alive(stuck):
            os.kill(stuck, signal.SIGKILL)


def test_no_process_is_killed_when_ray_ends_cleanly(monkeypatch):
    """Only what is still running after the shutdown and the grace is killed; nothing, normally."""
    calls = {"scans": 0, "killed": []}

    def processes(raylet):
        calls["scans"] += 1
        return [(4242, "ray::Slow")] if calls["scans"] < 3 else []  # ends by itself during the grace

    monkeypatch.setattr(common, "ray_processes", processes)
    monkeypatch.setattr(os, "kill", lambda pid, sig: calls["killed"].append(pid))
    monkeypatch.setattr("ray.shutdown", lambda: None)
    started = time.monotonic()
    assert common.shutdown_own_ray(1, grace_s=5) == []
    assert calls["killed"] == [] and time.monotonic() - started < 2
