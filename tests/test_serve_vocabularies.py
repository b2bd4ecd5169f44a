"""Live vocabularies on a real Serve application with 2 model replicas, over HTTP: a class
added through one replica is served by every replica, survives SIGKILL of that replica and a
restart of the whole application; two adds at once through different replicas both land;
named vocabularies are served side by side; bad requests get their 4xx, and a store that
cannot be written gets 503 with nothing changed (docs/serving.md, "Vocabularies")."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import serve_app
from helpers.serve_app import deploy_extra, remove
from helpers.tiny_bundle import EXTRA_NAMES
from PIL import Image

pytestmark = pytest.mark.slow

APP = "live"
# batching on: a batch may hold requests of several vocabularies, each must get its own
REPLICAS = {"min_replicas": 2, "max_replicas": 2, "retry_after_s": 1, "batching": "on", "batch_wait_timeout_s": 0.05}


def _png() -> bytes:
    import io

    pixels = np.random.default_rng(5).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    pytest.importorskip("ray.serve")
    info = serve_app.start(tmp_path_factory.mktemp("serve"))
    store = tmp_path_factory.mktemp("store") / "vocabularies"
    url = deploy_extra(info, APP, vocabulary_store=store, **REPLICAS)
    with httpx.Client(base_url=url, timeout=60) as client:
        wait_for_replicas(client, 2)
        yield {"info": info, "url": url, "client": client, "store": store}
    remove(APP)


def wait_for_replicas(client: httpx.Client, count: int, exclude: str | None = None, timeout: float = 120) -> set:
    """Poll until ``count`` distinct replicas (none of them ``exclude``) have answered."""
    seen: set = set()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            response = client.get("/v1/classes")
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 200:
            replica = response.headers["x-replica"]
            if replica != exclude:
                seen.add(replica)
            if len(seen) >= count:
                return seen
        time.sleep(0.2)
    raise TimeoutError(f"only replicas {seen} answered within {timeout} s")


def call(client: httpx.Client, method: str, path: str, attempts: int = 60, **kwargs) -> httpx.Response:
    """A request retried while the endpoint answers 503 (a replica being replaced)."""
    for _ in range(attempts):
        response = client.request(method, path, **kwargs)
        if response.status_code != 503:
            return response
        time.sleep(float(response.headers.get("retry-after", 1)))
    return response


def classes(client: httpx.Client, vocabulary: str = "base") -> tuple[int, list[str], str]:
    response = call(client, "GET", "/v1/classes", params={"vocabulary": vocabulary})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["vocabulary_version"], [c["name"] for c in body["classes"]], response.headers["x-replica"]


def segment(client: httpx.Client, vocabulary: str = "base", task: str = "all") -> httpx.Response:
    return call(client, "POST", "/v1/segment", params={"vocabulary": vocabulary, "task": task}, content=PNG,
                headers={"content-type": "image/png"})


def test_a_class_added_through_one_replica_is_known_to_every_replica(live):
    client = live["client"]
    added = call(client, "POST", "/v1/classes", json={"names": [EXTRA_NAMES[0]]})
    assert added.status_code == 201, added.text
    version = added.json()["vocabulary_version"]
    live["added_by"] = added.headers["x-replica"]
    replicas = set()
    for k in range(40):
        if k % 2:
            seen_version, names, replica = classes(client)
            assert EXTRA_NAMES[0] in names
        else:
            response = segment(client)
            assert response.status_code == 200
            seen_version, replica = response.json()["vocabulary_version"], response.headers["x-replica"]
        assert seen_version >= version
        replicas.add(replica)
    assert len(replicas) == 2, replicas  # both replicas answered, and both knew the class


def test_the_class_survives_sigkill_of_its_replica_and_an_application_restart(live):
    client = live["client"]
    victim = live.get("added_by") or classes(client)[2]
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    survivors = wait_for_replicas(client, 2, exclude=victim)
    assert victim not in survivors
    for _ in range(10):
        _, names, replica = classes(client)
        assert EXTRA_NAMES[0] in names and replica != victim
    remove(APP)  # the whole application goes away and comes back
    url = deploy_extra(live["info"], APP, vocabulary_store=live["store"], **REPLICAS)
    assert url == live["url"]
    wait_for_replicas(client, 2)
    for _ in range(10):
        assert EXTRA_NAMES[0] in classes(client)[1]


def test_two_adds_at_once_through_different_replicas_both_land(live):
    client = live["client"]
    first, second = EXTRA_NAMES[1], EXTRA_NAMES[2]
    for _ in range(4):
        before = classes(client)[0]
        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(lambda name: call(client, "POST", "/v1/classes", json={"names": [name]}),
                                      (first, second)))
        assert [r.status_code for r in responses] == [201, 201], [r.text for r in responses]
        if responses[0].headers["x-replica"] != responses[1].headers["x-replica"]:
            break
        for name in (first, second):  # both went to one replica: undo and try again
            assert call(client, "DELETE", f"/v1/classes/{name}").status_code == 200
    else:
        pytest.fail("both adds went to one replica every time")
    version, names, _ = classes(client)
    assert {first, second} <= set(names)
    assert version == before + 2
    assert sorted(r.json()["vocabulary_version"] for r in responses) == [before + 1, before + 2]


def test_named_vocabularies_are_served_side_by_side(live):
    client = live["client"]
    spec = {"street": {"only": ["person", "car", "road"], "add": ["zebra crossing"]},
            "farm": {"only": ["cow", "sheep", "horse", "grass-merged"], "add": []}}
    for name, body in spec.items():
        created = call(client, "POST", "/v1/vocabularies", json={"name": name, **body})
        assert created.status_code == 201, created.text
    listed = {v["name"] for v in client.get("/v1/vocabularies").json()["vocabularies"]}
    assert {"base", "street", "farm"} <= listed
    allowed = {name: set(body["only"]) | set(body["add"]) for name, body in spec.items()}

    def check(k: int) -> str:
        name = ("street", "farm")[k % 2]
        if k % 3 == 0:
            _, names, _ = classes(client, name)
            assert set(names) == allowed[name], (name, names)
        else:
            response = segment(client, name)
            assert response.status_code == 200 and response.headers["x-vocabulary"] == name
            body = response.json()
            found = {e["class_name"] for task in ("panoptic", "instance", "semantic") for e in body[task]}
            assert found <= allowed[name], (name, found - allowed[name])
        return name

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(check, range(36))) == {"street", "farm"}


def test_the_model_replicas_as_ingress_serve_the_same_store(live):
    """``serve.ingress=replica`` (no front deployment; docs/serving.md, "Two deployments") beside
    the live application, on the same vocabulary store: a named vocabulary created through one
    application is served by the other, by each of this application's two replicas (which load
    it themselves: no routing by name here), and both answer the same image alike."""
    url = deploy_extra(live["info"], "direct", vocabulary_store=live["store"], ingress="replica", **REPLICAS)
    try:
        with httpx.Client(base_url=url, timeout=60) as direct:
            replicas = wait_for_replicas(direct, 2)
            spec = {"name": "orchard", "only": ["person", "sheep", "road"], "add": ["kite surfer"]}
            assert call(direct, "POST", "/v1/vocabularies", json=spec).status_code == 201
            allowed = set(spec["only"]) | set(spec["add"])
            assert set(classes(live["client"], "orchard")[1]) == allowed
            seen = set()
            for _ in range(24):
                _, names, replica = classes(direct, "orchard")
                assert set(names) == allowed
                seen.add(replica)
                answer = segment(direct, "orchard")
                assert answer.status_code == 200 and answer.headers["x-vocabulary"] == "orchard"
                found = {e["class_name"] for task in ("panoptic", "instance", "semantic") for e in answer.json()[task]}
                assert found <= allowed, found - allowed
            assert seen == replicas, seen
            for vocabulary in ("base", "orchard"):
                one, other = segment(direct, vocabulary), segment(live["client"], vocabulary)
                assert one.headers["x-vocabulary-version"] == other.headers["x-vocabulary-version"]
                strip = {"replica"}
                assert ({k: v for k, v in one.json().items() if k not in strip}
                        == {k: v for k, v in other.json().items() if k not in strip}), vocabulary
            assert segment(direct, "nowhere").status_code == 404
            assert direct.get("/v1/classes", params={"vocabulary": "../etc"}).status_code == 400
    finally:
        remove("direct")


def test_bad_vocabulary_requests_get_their_4xx(live):
    client = live["client"]
    assert segment(client, "nowhere").status_code == 404
    assert client.get("/v1/classes", params={"vocabulary": "nowhere"}).status_code == 404
    assert client.get("/v1/classes", params={"vocabulary": "../etc"}).status_code == 400
    call(client, "POST", "/v1/vocabularies", json={"name": "twice", "only": ["person"]})
    duplicate = client.post("/v1/vocabularies", json={"name": "twice", "only": ["car"]})
    assert duplicate.status_code == 409 and "exists" in duplicate.json()["detail"]
    empty = client.post("/v1/vocabularies", json={"name": "empty", "only": []})
    assert empty.status_code == 400 and "at least one class" in empty.json()["detail"]
    huge = client.post("/v1/vocabularies", json={"name": "huge", "add": [f"class {i}" for i in range(65)]})
    assert huge.status_code == 400 and "at most" in huge.json()["detail"]
    assert client.delete("/v1/vocabularies/base").status_code == 409
    assert call(client, "DELETE", "/v1/vocabularies/twice").status_code == 200
    assert client.get("/v1/classes", params={"vocabulary": "twice"}).status_code == 404


def test_a_store_that_cannot_be_written_gets_503_and_changes_nothing(live):
    client = live["client"]
    version, names, _ = classes(client)
    base = live["store"] / "base"
    files = sorted(p.name for p in base.iterdir())
    staging = base / "staging"
    staging.rmdir()
    staging.write_text("the staging area is not a directory")
    try:
        refused = client.post("/v1/classes", json={"names": [EXTRA_NAMES[3]]})
        assert refused.status_code == 503 and "nothing was changed" in refused.json()["detail"]
        assert "retry-after" in refused.headers
        assert sorted(p.name for p in base.iterdir()) == files  # nothing half written
        for _ in range(6):  # every replica still serves the version before
            assert classes(client)[:2] == (version, names)
    finally:
        staging.unlink()
    assert call(client, "POST", "/v1/classes", json={"names": [EXTRA_NAMES[3]]}).status_code == 201


def test_load_with_class_churn_over_two_replicas_and_two_named_vocabularies(live):
    from pipelines import loadtest

    if "teapot" in classes(live["client"])[1]:  # an earlier test added it to the base vocabulary
        assert call(live["client"], "DELETE", "/v1/classes/teapot").status_code == 200
    stats = loadtest.run_load(live["url"], PNG, concurrency=6, requests=48, task="panoptic", warmup=2,
                              churn="teapot", vocabularies=2)
    assert stats["server_errors"] == 0 and stats["good_failed"] == 0, stats["statuses"]
    assert stats["stale_reads"] == 0, stats["stale_examples"]
    assert stats["vocabularies"] == ["base", "load-1", "load-2"] and len(stats["replicas"]) == 2
    changes = stats["class_changes"]
    assert changes.get("POST 201", 0) >= 3 and set(changes) <= {"POST 201", "DELETE 200"}, changes
    assert not loadtest.failed(stats)


def test_segment_py_uses_the_same_named_vocabulary(live, tmp_path):
    import json
    import subprocess
    import sys

    import ray

    client = live["client"]
    trained = [c["name"] for c in client.get("/v1/classes").json()["classes"] if not c["added"]]
    spec = {"name": "segment-job", "only": trained[::2], "add": ["zebra crossing"]}
    assert call(client, "POST", "/v1/vocabularies", json=spec).status_code == 201
    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        (images / f"{k}.png").write_bytes(PNG)
    output = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, HF_HUB_OFFLINE="1",
               PYTHONPATH=str(serve_app.REPO), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "pipelines/segment.py", "--bundle", str(live["info"]["bundle_dir"]),
                           "--vocabulary", "segment-job", "--vocabulary-store", str(live["store"]),
                           "--input", str(images), "--output", str(output), "--task", "all"],
                          cwd=serve_app.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads((output / "job.json").read_text())
    assert job["vocabulary"]["name"] == "segment-job" and job["vocabulary"]["version"] == 1
    import pyarrow.parquet as pq

    segments = pq.read_table(output / "segments.parquet").to_pylist()
    allowed = set(spec["only"]) | set(spec["add"])
    assert segments and {row["class_name"] for row in segments} <= allowed
    unfiltered = segment(client, "base").json()  # the same image in the base vocabulary has other classes too
    assert {e["class_name"] for task in ("panoptic", "instance", "semantic") for e in unfiltered[task]} - allowed
    # a trained class the vocabulary leaves out is refused by name, not answered with no segments
    refused = subprocess.run([sys.executable, "pipelines/segment.py", "--bundle", str(live["info"]["bundle_dir"]),
                              "--vocabulary", "segment-job", "--vocabulary-store", str(live["store"]),
                              "--only-classes", f"{trained[0]},{trained[1]}", "--input", str(images),
                              "--output", str(tmp_path / "refused")],
                             cwd=serve_app.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"does not have [{trained[1]!r}]" in refused.stderr, refused.stderr[-3000:]
