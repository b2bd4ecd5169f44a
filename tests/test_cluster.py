"""A Ray cluster shaped like a production one, on this machine, and the README's job
submitted to it as typed (marked slow; run in CI).

- a head node that offers no CPUs (the job's driver runs there) and two worker nodes of 3
  CPUs, each node with its own temp dir and ports (``ray start``);
- token authentication with a token this module makes (nothing read from ``~/.ray``);
- ``ray job submit --working-dir . -- python pipelines/full.py ...`` exactly as the README's
  "Running on a cluster" section types it: no ``MLFLOW_TRACKING_URI``, no ``PYTHONPATH``,
  no ``data.root``; only ``--output`` on storage every node sees.

It checks that the job succeeds with its Ray Train workers and extraction actors on two
distinct worker nodes, that the results equal a one-node run of the same settings, that
the MLflow run is found afterwards in the documented store (``<output>/mlruns``), and that
a request the cluster can never place is refused with a clear message.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WORKER_NODE_CPUS = 3
# The README's command (section "Running on a cluster"), after `--output`.
JOB_SETTINGS = ["--config", "configs/smoke.yaml", "--set", "ray.num_workers=2", "--set", "ray.cpus_per_worker=2",
                "--set", "ray.extract_concurrency=2", "--set", "ray.generator_workers=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Own ports for every per-node service: two raylets share 127.0.0.1."""
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]


def _clean_env(home: Path, token: str) -> dict:
    """The environment of a user's shell: the interpreter's bin directory first on PATH (the
    job runs `python ...`), the cluster's token, and nothing that would hide a missing step."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HOME=str(home),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="pc", dir="/tmp"))  # AF_UNIX socket paths must stay < 108 bytes
    home = base / "home"
    home.mkdir()
    env = _clean_env(home, secrets.token_hex(32))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    ports = {}

    def start(args, temp: str) -> None:
        """``ray start`` one node; ``args()`` picks its ports. Another test process's Ray may take a
        port between the pick and ``ray start`` (the suite runs in two processes): then that node is
        stopped and started again on new ports, up to three times, and the reason is printed."""
        failures = []
        for _ in range(3):
            (base / temp).mkdir()
            proc = subprocess.run([ray_bin, "start", "--node-ip-address=127.0.0.1", f"--temp-dir={base / temp}",
                                   *args(), *_node_ports()], env=env, capture_output=True, text=True, timeout=180)
            if proc.returncode == 0:
                return
            failures.append(proc.stdout[-2000:] + proc.stderr[-3000:])
            print(f"`ray start` of node {temp} failed; retrying on new ports:\n{failures[-1]}")
            subprocess.run(["pkill", "-9", "-f", str(base / temp)], capture_output=True, timeout=60)
            shutil.rmtree(base / temp, ignore_errors=True)
        pytest.fail(f"`ray start` of node {temp} failed 3 times; last output:\n{failures[-1]}")

    def head_args() -> list[str]:
        ports.update(gcs=_free_port(), dashboard=_free_port())
        return ["--head", f"--port={ports['gcs']}", "--num-cpus=0", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={_free_port()}"]

    try:
        start(head_args, "head")
        gcs, dashboard = ports["gcs"], ports["dashboard"]
        for name in ("w1", "w2"):
            start(lambda: [f"--address=127.0.0.1:{gcs}", f"--num-cpus={WORKER_NODE_CPUS}"], name)
        yield {"base": base, "env": env, "ray": ray_bin, "gcs": f"127.0.0.1:{gcs}",
               "dashboard": f"http://127.0.0.1:{dashboard}", "shared": base / "shared"}
    finally:  # stop this cluster only (its processes name its temp dirs), not every Ray on the machine
        subprocess.run(["pkill", "-f", str(base)], capture_output=True, timeout=60)
        time.sleep(3)
        subprocess.run(["pkill", "-9", "-f", str(base)], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _submit(cluster, output: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    command = [cluster["ray"], "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--",
               "python", "pipelines/full.py", "--output", str(output), *JOB_SETTINGS, *extra]
    for _ in range(24):  # the job agent comes up a little after `ray start` returns
        proc = subprocess.run(command, env=cluster["env"], capture_output=True, text=True, timeout=1200, cwd=REPO)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


@pytest.fixture(scope="module")
def two_node_job(cluster):
    output = cluster["shared"] / "out"
    proc = _submit(cluster, output)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return {"output": output, "log": proc.stdout + proc.stderr}


def test_the_job_succeeds_with_work_on_two_worker_nodes(two_node_job):
    assert "succeeded" in two_node_job["log"].lower()
    output = two_node_job["output"]
    results = json.loads((output / "results.json").read_text())
    for task in ("panoptic", "instance", "semantic"):
        assert all(math.isfinite(v) for group in results[task].values() for v in group.values())
    for stage in ("pretrain", "generator"):
        workers = json.loads((output / stage / "_SUCCESS.json").read_text())["workers"]
        assert [w["rank"] for w in workers] == [0, 1]
        assert len({w["node_id"] for w in workers}) == 2, (stage, workers)  # one Train worker per node
    extract = json.loads((output / "features" / "_SUCCESS.json").read_text())
    if len(extract["actor_nodes"]) != 2:  # shown with the failure: where the actors started, waits, warnings
        print("\n".join(line for line in two_node_job["log"].splitlines() if "extract" in line or "actor" in line))
    assert len(extract["actor_nodes"]) == 2, extract  # extraction actors on both nodes
    pretrain_nodes = {w["node_id"] for w in json.loads((output / "pretrain" / "_SUCCESS.json").read_text())["workers"]}
    assert set(extract["actor_nodes"]) == pretrain_nodes  # the two worker nodes (the head offers no CPU)
    assert (output / "datasets" / "synthetic-coco-smoke" / "annotations").is_dir()  # data where every node sees it


def test_the_mlflow_run_is_in_the_documented_store_after_the_job(two_node_job):
    import mlflow

    store = two_node_job["output"] / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("pading-smoke").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"pading-smoke", "prepare", "pretrain", "extract", "generator", "evaluate"} <= names
    parent = next(r for r in runs if r.info.run_name == "pading-smoke")
    assert parent.info.status == "FINISHED" and "panoptic.hm.pq" in parent.data.metrics
    assert "working_dir_files" not in parent.info.artifact_uri  # not in the job's temporary copy


def test_two_nodes_compute_what_one_node_computes(two_node_job, tmp_path):
    """The same settings on a local one-node Ray (6 CPUs declared): same global batches, same
    per-worker seeds, so the same training histories and the same results."""
    reference = tmp_path / "one-node"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "pipelines/full.py", "--output", str(reference), *JOB_SETTINGS,
                           "--set", "ray.local_cpus=6"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two_nodes = two_node_job["output"]
    for stage in ("pretrain", "generator"):
        ours = [json.loads(line) for line in (two_nodes / stage / "history.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (reference / stage / "history.jsonl").read_text().splitlines()]
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            for key, value in b.items():
                if key == "elapsed_s":
                    continue
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (stage, key)
    ours = json.loads((two_nodes / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    assert {k: v for k, v in ours.items() if k != "wall_seconds"} == {k: v for k, v in theirs.items()
                                                                      if k != "wall_seconds"}


CHECK = """
import json, sys, ray
from pipelines.common import ClusterTooSmall, check_resources
ray.init(address=sys.argv[1], log_to_driver=False)
outcomes = {}
for name, count, cpus in (("fits", 2, 2.0), ("too_big", 2, 4.0), ("too_many", 3, 2.0)):
    try:
        check_resources(name, "ray.num_workers / ray.cpus_per_worker", count, cpus)
        outcomes[name] = "ok"
    except ClusterTooSmall as error:
        outcomes[name] = str(error)
from pading.config import load_config
from pipelines.common import train_scaling
for cpus in (2, 4):  # pretraining's own CPU count; the generator stage keeps ray.cpus_per_worker (1)
    config = load_config("configs/smoke.yaml", [f"ray.pretrain_cpus_per_worker={cpus}", "ray.num_workers=2"])
    try:
        pretrain = train_scaling(config, cpus_per_worker=config.ray.pretrain_cpus_per_worker)
        outcomes[f"pretrain_{cpus}"] = [pretrain.resources_per_worker, train_scaling(config).resources_per_worker]
    except ClusterTooSmall as error:
        outcomes[f"pretrain_{cpus}"] = str(error)
print(json.dumps(outcomes))
"""


def test_a_request_the_cluster_cannot_place_is_refused(cluster):
    """Workers that never fit on 3-CPU nodes (the head offers none) stop the stage with a
    message naming the setting instead of waiting forever."""
    proc = subprocess.run([sys.executable, "-c", CHECK, cluster["gcs"]], env=cluster["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes["fits"] == "ok"  # one 2-CPU worker per worker node
    assert "ray.cpus_per_worker" in outcomes["too_big"] and "only 0 fit" in outcomes["too_big"]
    assert "0 CPU" in outcomes["too_big"] and "3 CPU" in outcomes["too_big"]  # it lists the nodes
    assert "only 2 fit" in outcomes["too_many"]
    assert outcomes["pretrain_2"] == [{"CPU": 2.0}, {"CPU": 1.0}]  # ray.pretrain_cpus_per_worker, pretraining only
    assert "ray.pretrain_cpus_per_worker" in outcomes["pretrain_4"] and "only 0 fit" in outcomes["pretrain_4"]
