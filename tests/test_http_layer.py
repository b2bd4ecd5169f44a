"""The endpoint's Ray-free layers: pading.serving.http's routes over a fake model replica
(installed through the dependency the Serve ingress overrides), EndpointMetrics over a fake
metrics backend, and Replica's per-item error isolation over fake services. No Ray, no model."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from pading.config import ServeConfig
from pading.errors import ConfigError, CorruptImageError, DataError, UnknownClassError
from pading.serving import http
from pading.serving.metrics import LATENCY_BOUNDARIES_MS, OTHER, EndpointMetrics
from pading.serving.replica import Replica
from pading.serving.service import (
    BusyError,
    ClassConflictError,
    ImageTooLargeError,
    RequestError,
    UnprocessableError,
    http_status,
)
from pading.serving.vocabularies import BASE, UnknownVocabularyError

MAX_BODY = 1000
REPLICA = "node:1234"
SEGMENT_RESULT = {
    "width": 4, "height": 3, "task": "instance", "vocabulary": "street", "vocabulary_version": 7,
    "replica": REPLICA,
    "instance": [{"id": 1, "class_name": "car", "unseen": False, "added": False},
                 {"id": 2, "class_name": "kite", "unseen": True, "added": False},
                 {"id": 3, "class_name": "teapot", "unseen": True, "added": True}],
}


# ---- fakes ----------------------------------------------------------------------------


class FakeMetric:
    def __init__(self, name: str, *, description: str, tag_keys: tuple, boundaries: list | None = None):
        self.name, self.description, self.tag_keys, self.boundaries = name, description, tag_keys, boundaries
        self.calls: list[tuple] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.calls.append(("inc", value, tags))

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.calls.append(("observe", value, tags))

    def set(self, value: float, tags: dict | None = None) -> None:
        self.calls.append(("set", value, tags))


class FakeBackend:
    """``ray.serve.metrics``'s shape: Counter/Histogram/Gauge classes; keeps what was made."""

    def __init__(self) -> None:
        self.made: dict[str, tuple[str, FakeMetric]] = {}

    def _maker(self, kind: str):
        def make(name: str, **options) -> FakeMetric:
            assert name not in self.made, f"{name} made twice"
            metric = FakeMetric(name, **options)
            self.made[name] = (kind, metric)
            return metric
        return make

    @property
    def Counter(self):
        return self._maker("Counter")

    @property
    def Histogram(self):
        return self._maker("Histogram")

    @property
    def Gauge(self):
        return self._maker("Gauge")

    def calls(self, name: str) -> list[tuple]:
        return self.made[name][1].calls


class FakeReplica:
    """A :data:`pading.serving.http.ReplicaCall`: records each call and answers from ``answers``
    (a value, or an exception to raise)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.answers: dict[str, object] = {
            "segment": SEGMENT_RESULT,
            "classes": {"classes": ["car", "kite"], "vocabulary": "street", "vocabulary_version": 7,
                        "replica": REPLICA},
            "info": {"vocabulary_version": 7, "num_classes": 2, "replica": REPLICA},
            "vocabularies": {"vocabularies": {BASE: 0}, "replica": REPLICA},
        }

    async def __call__(self, method: str, *args, timeout: float | None = None, vocabulary: str = BASE):
        self.calls.append((method, args, timeout, vocabulary))
        answer = self.answers[method]
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)  # the route may pop from it (format=png)


@pytest.fixture
def replica() -> FakeReplica:
    return FakeReplica()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(replica, backend, tmp_path, monkeypatch) -> Iterator[TestClient]:
    page = tmp_path / "index.html"
    page.write_text("<html>try it</html>", encoding="utf-8")
    config = ServeConfig(max_body_bytes=MAX_BODY, request_timeout_s=7.0, health_check_timeout_s=3.0)
    front = http.HttpFront(call=replica, config=config, page=page,
                           metrics=EndpointMetrics(backend=backend, vocabulary=False))
    # what pipelines/serve.py does with its own front; monkeypatch restores any earlier override
    monkeypatch.setitem(http.api.dependency_overrides, http.current_front, lambda: front)
    with TestClient(http.api) as test_client:
        yield test_client


def post_image(client: TestClient, body, **params):
    return client.post("/v1/segment", params=params, content=body, headers={"content-type": "image/png"})


# ---- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("error, status", [
    (RequestError("names", "give at least one class name"), 400),
    (CorruptImageError("request body", "not a JPEG, PNG or WebP image (9 bytes)"), 400),
    (UnknownClassError("zebra", ["car", "kite"]), 404),
    (UnknownVocabularyError("street", "no such vocabulary"), 404),
    (ClassConflictError("names[0]", "class 'car' already exists"), 409),
    (UnprocessableError("names", "cannot encode the class names"), 422),
    (ConfigError("serve.fit_steps must be positive"), 422),
    (ImageTooLargeError("request body", "image is 9000x9000"), 413),
])
def test_library_error_is_json_with_its_status(client, replica, error, status):
    replica.answers["classes"] = error
    response = client.get("/v1/classes", params={"vocabulary": "street"})
    assert response.status_code == status, response.text
    assert response.json() == {"error": type(error).__name__, "detail": str(error)}
    assert "retry-after" not in response.headers


def test_busy_replica_is_503_with_retry_after_rounded_up(client, replica):
    replica.answers["info"] = BusyError("every model replica is busy; retry later", 2.2)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"error": "BusyError", "detail": "every model replica is busy; retry later"}
    assert response.headers["retry-after"] == "3"


def test_an_unexpected_replica_error_is_not_turned_into_a_client_error(client, replica):
    replica.answers["info"] = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):  # not a PadingError: no JSON 4xx answer for it
        client.get("/healthz")


def test_bad_task_is_refused_before_the_replica_and_counted(client, replica, backend):
    response = post_image(client, b"png bytes", task="everything")
    assert response.status_code == 400
    assert response.json()["error"] == "RequestError" and "unknown task 'everything'" in response.json()["detail"]
    assert replica.calls == []
    assert backend.calls("pading_requests") == [("inc", 1.0, {"task": "invalid", "status": "400", "vocabulary": BASE})]


def test_png_with_every_task_is_refused(client, replica):
    response = post_image(client, b"png bytes", task="all", format="png")
    assert response.status_code == 400 and "pick a single task" in response.json()["detail"]
    assert replica.calls == []


@pytest.mark.parametrize("method, path, kwargs, where", [
    ("post", "/v1/segment", {"params": {"min_score": 2}, "content": b"x"}, "query.min_score"),
    ("post", "/v1/classes", {"json": {"isthing": True}}, "body.names"),
    ("post", "/v1/classes", {"json": {"names": "teapot"}}, "body.names"),
    ("post", "/v1/vocabularies", {"json": {"add": ["teapot"]}}, "body.name"),
])
def test_validation_error_is_422_json_naming_the_field(client, replica, method, path, kwargs, where):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == "ValidationError"
    assert body["detail"].startswith(where + ": "), body["detail"]
    assert replica.calls == []


def test_bad_vocabulary_name_is_400_before_the_replica(client, replica):
    response = client.post("/v1/vocabularies", json={"name": "../etc", "add": ["teapot"]})
    assert response.status_code == 400
    assert response.json()["error"] == "DataError" and "vocabulary name '../etc'" in response.json()["detail"]
    assert client.delete("/v1/vocabularies/-bad").status_code == 400
    assert replica.calls == []


# ---- upload limit ---------------------------------------------------------------------


def test_upload_over_the_limit_is_413_by_content_length(client, replica, backend):
    response = post_image(client, b"\0" * (MAX_BODY + 1))
    assert response.status_code == 413, response.text
    assert response.json() == {"error": "ImageTooLargeError",
                               "detail": f"request body: {MAX_BODY + 1} bytes, above the limit of {MAX_BODY}"}
    assert replica.calls == []
    assert backend.calls("pading_requests")[0][2]["status"] == "413"


def test_streamed_upload_over_the_limit_is_413_without_content_length(client, replica):
    def chunks():
        for _ in range(4):
            yield b"\0" * 300  # 1200 bytes in all, no Content-Length (chunked)

    response = post_image(client, chunks())
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == f"request body: more than {MAX_BODY} bytes (the limit) sent"
    assert replica.calls == []


@pytest.mark.parametrize("path", ["/v1/classes", "/v1/vocabularies"])
def test_a_json_body_over_its_limit_is_413_before_it_is_parsed(client, replica, path):
    names = json.dumps({"name": "big", "names": ["x" * 1000] * (http.MAX_JSON_BYTES // 1000)}).encode()
    response = client.post(path, content=names, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert str(http.MAX_JSON_BYTES) in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(http.MAX_JSON_BYTES // 65536 + 1):
            yield b" " * 65536

    assert client.post(path, content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    assert replica.calls == []


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1, 2]"])
def test_a_json_body_that_is_not_the_object_is_422(client, replica, body):
    response = client.post("/v1/classes", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "ValidationError" and response.json()["detail"].startswith("body")
    assert replica.calls == []


def test_the_json_routes_keep_their_documented_bodies(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, field in (("/v1/classes", "names"), ("/v1/vocabularies", "name")):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in schema["properties"] and field in schema["required"]


def test_upload_at_the_limit_reaches_the_replica_whole(client, replica):
    body = bytes(range(256)) * 3 + b"\x07" * (MAX_BODY - 768)
    assert post_image(client, body).status_code == 200
    assert replica.calls[0][1][0] == body


def test_multipart_upload_forwards_the_file(client, replica):
    response = client.post("/v1/segment", files={"file": ("a.png", b"\x89PNG image bytes", "image/png")},
                           data={"note": "ignored"})
    assert response.status_code == 200, response.text
    assert replica.calls[0][1][0] == b"\x89PNG image bytes"


def test_multipart_form_without_a_file_is_400(client, replica):
    body = b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--XyZ--\r\n'
    response = client.post("/v1/segment", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert response.status_code == 400
    assert response.json() == {"error": "RequestError", "detail": "request body: the multipart form has no file field"}
    assert replica.calls == []


# ---- answers --------------------------------------------------------------------------


def test_vocabulary_headers():
    assert http.vocabulary_headers({"replica": REPLICA, "vocabulary_version": 7, "vocabulary": "street", "x": 1}) == {
        "X-Replica": REPLICA, "X-Vocabulary-Version": "7", "X-Vocabulary": "street"}
    assert http.vocabulary_headers({"replica": REPLICA}) == {"X-Replica": REPLICA}
    assert http.vocabulary_headers({"vocabulary_version": 0}) == {"X-Replica": "", "X-Vocabulary-Version": "0"}


def test_segment_forwards_the_request_and_answers_with_headers(client, replica, backend):
    body = b"\x89PNG pretend image"
    response = post_image(client, body, task="instance", format="json", min_score=0.25, vocabulary="street")
    assert response.status_code == 200, response.text
    assert response.json() == SEGMENT_RESULT
    assert replica.calls == [("segment", (body, "instance", "json", 0.25), 7.0, "street")]
    headers = response.headers
    assert (headers["x-replica"], headers["x-vocabulary-version"], headers["x-vocabulary"]) == (REPLICA, "7", "street")
    assert float(headers["x-process-time-ms"]) >= 0 and headers["server-timing"].startswith("segment;dur=")
    assert backend.calls("pading_requests") == [("inc", 1.0, {"task": "instance", "status": "200",
                                                              "vocabulary": "street"})]
    (kind, latency, tags), = backend.calls("pading_request_latency_ms")
    assert kind == "observe" and latency >= 0 and tags == {"task": "instance", "vocabulary": "street"}
    assert sorted(backend.calls("pading_segments"), key=lambda call: call[2]["kind"]) == [
        ("inc", 1, {"kind": kind, "vocabulary": "street"}) for kind in ("added", "seen", "unseen")]


def test_segment_defaults(client, replica):
    assert post_image(client, b"img").status_code == 200
    assert replica.calls == [("segment", (b"img", "panoptic", "json", 0.0), 7.0, BASE)]


def test_png_answer_carries_the_segments_in_a_header(client, replica):
    replica.answers["segment"] = {**SEGMENT_RESULT, "png": b"\x89PNG ids"}
    response = post_image(client, b"img", task="instance", format="png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png" and response.content == b"\x89PNG ids"
    assert json.loads(response.headers["x-segments"]) == SEGMENT_RESULT
    assert response.headers["x-vocabulary"] == "street"


@pytest.mark.parametrize("query, expected", [
    (b"", {"task": "panoptic", "format": "json", "min_score": 0.0, "vocabulary": BASE}),
    (b"task=instance&format=png&min_score=0.25&vocabulary=street",
     {"task": "instance", "format": "png", "min_score": 0.25, "vocabulary": "street"}),
    (b"task=all&min_score=1", {"task": "all", "format": "json", "min_score": 1.0, "vocabulary": BASE}),
    (b"task=no%20such+task&min_score=.5", {"task": "no such task", "format": "json", "min_score": 0.5,
                                           "vocabulary": BASE}),
    (b"min_score=1.5", None), (b"min_score=-0", None), (b"min_score=1e-1", None), (b"min_score=nan", None),
    (b"min_score=", None), (b"task=instance&task=semantic", None), (b"task=instance&extra=1", None),
])
def test_plain_segment_query_takes_only_what_the_route_takes_as_it_is(query, expected):
    assert http.plain_segment_query(query) == expected


# (the params of each request, the answer of the replica (None: its usual one), the status)
SAME_ANSWER_CASES = {
    "json": ({"task": "instance", "min_score": "0.25", "vocabulary": "street"}, None, 200),
    "png": ({"task": "instance", "format": "png"}, {**SEGMENT_RESULT, "png": b"\x89PNG ids"}, 200),
    "bad task": ({"task": "everything"}, None, 400),
    "png of every task": ({"task": "all", "format": "png"}, None, 400),
    "busy": ({}, BusyError("every model replica is busy; retry later", 2.2), 503),
    "corrupt": ({}, CorruptImageError("request body", "not a JPEG, PNG or WebP image (3 bytes)"), 400),
    "unknown vocabulary": ({"vocabulary": "street"}, UnknownVocabularyError("street", "no such vocabulary"), 404),
}


@pytest.mark.parametrize("case", list(SAME_ANSWER_CASES))
def test_the_fast_path_answers_as_the_route_does(client, replica, backend, monkeypatch, case):
    """A plain query is answered by SegmentFastPath, one with a parameter the route ignores by
    FastAPI's route: the same status, body, headers (but the timings), replica call and metrics."""
    params, answer, status = SAME_ANSWER_CASES[case]
    if answer is not None:
        replica.answers["segment"] = answer
    taken = []
    plain = http.plain_segment_query
    monkeypatch.setattr(http, "plain_segment_query", lambda query: taken.append(plain(query)) or taken[-1])
    answers = []
    for extra in ({}, {"ignored": "1"}):
        replica.calls.clear()
        for _, metric in backend.made.values():
            metric.calls.clear()
        response = post_image(client, b"img", **params, **extra)
        headers = {k: v for k, v in response.headers.items()
                   if k not in ("x-process-time-ms", "server-timing", "content-length")}
        counted = {name: [call[2] for call in metric.calls] for name, (_, metric) in backend.made.items()}
        answers.append((response.status_code, response.content, headers, list(replica.calls), counted))
    assert taken[0] is not None and taken[1] is None  # the first took the fast path, the second the route
    assert answers[0][0] == status, answers[0][1]
    assert answers[0] == answers[1]


def test_the_fast_path_takes_the_route_below_a_mount_point(replica, backend, tmp_path, monkeypatch):
    """Under a route prefix (``root_path``, as ``serve.route_prefix`` gives) the fast path still
    answers POST <prefix>/v1/segment, and nothing else."""
    config = ServeConfig(max_body_bytes=MAX_BODY, request_timeout_s=7.0)
    front = http.HttpFront(call=replica, config=config, page=tmp_path, metrics=EndpointMetrics(backend=backend))
    monkeypatch.setitem(http.api.dependency_overrides, http.current_front, lambda: front)
    taken = []
    plain = http.plain_segment_query
    monkeypatch.setattr(http, "plain_segment_query", lambda query: taken.append(plain(query)) or taken[-1])
    with TestClient(http.api, root_path="/pading") as test_client:
        # the path as a proxy passes it on: the prefix in it, and in root_path
        response = test_client.post("/pading/v1/segment", params={"task": "semantic"}, content=b"img",
                                    headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        assert test_client.get("/pading/healthz").status_code == 200
    assert taken == [{"task": "semantic", "format": "json", "min_score": 0.0, "vocabulary": BASE}]
    assert [call[0] for call in replica.calls] == ["segment", "info"]


def test_the_fast_path_uses_the_running_apps_front(replica, backend, tmp_path, monkeypatch):
    """Serve runs a copy of the app, with the overrides it had: the fast path takes the front
    from the app that runs the request, not from the module's app (which has none there)."""
    config = ServeConfig(max_body_bytes=MAX_BODY, request_timeout_s=7.0)
    front = http.HttpFront(call=replica, config=config, page=tmp_path, metrics=EndpointMetrics(backend=backend))

    async def own_front() -> http.HttpFront:  # a coroutine, as pipelines/serve.py's
        return front

    monkeypatch.delitem(http.api.dependency_overrides, http.current_front, raising=False)
    running = copy.copy(http.api)
    running.dependency_overrides = {http.current_front: own_front}
    with TestClient(running) as test_client:
        assert post_image(test_client, b"img", task="semantic").status_code == 200
    assert replica.calls == [("segment", (b"img", "semantic", "json", 0.0), 7.0, BASE)]


def test_class_and_vocabulary_routes_forward_their_arguments(client, replica):
    replica.answers.update({
        "add_classes": {"added": ["teapot"], "seconds": 0.5, "vocabulary_version": 8, "replica": REPLICA},
        "delete_class": {"deleted": "lamp post", "vocabulary_version": 9, "replica": REPLICA},
        "create_vocabulary": {"name": "street", "replica": REPLICA},
        "delete_vocabulary": {"deleted": "street", "replica": REPLICA},
    })
    listed = client.get("/v1/classes", params={"vocabulary": "street"})
    assert listed.status_code == 200 and listed.json()["classes"] == ["car", "kite"]
    assert listed.headers["x-vocabulary-version"] == "7"
    added = client.post("/v1/classes", json={"names": ["teapot"], "isthing": [False]}, params={"vocabulary": "street"})
    assert added.status_code == 201 and added.headers["x-process-time-ms"] == "500.0"
    assert added.headers["x-vocabulary-version"] == "8"
    assert client.delete("/v1/classes/lamp post").json()["deleted"] == "lamp post"
    assert client.post("/v1/vocabularies", json={"name": "street", "add": ["teapot"], "only": ["car"]}).status_code == 201
    assert client.get("/v1/vocabularies").json() == {"vocabularies": {BASE: 0}, "replica": REPLICA}
    assert client.delete("/v1/vocabularies/street").json()["deleted"] == "street"
    health = client.get("/healthz")
    assert health.json() == {"status": "ok", "vocabulary_version": 7, "num_classes": 2, "replica": REPLICA}
    assert replica.calls == [
        ("classes", (), 3.0, "street"),
        ("add_classes", (["teapot"], [False]), None, "street"),
        ("delete_class", ("lamp post",), None, BASE),
        ("create_vocabulary", ("street", ["teapot"], True, ["car"]), None, BASE),
        ("vocabularies", (), 3.0, BASE),
        ("delete_vocabulary", ("street",), None, BASE),
        ("info", (), 3.0, BASE),
    ]
    assert client.get("/").text == "<html>try it</html>"


def test_openapi_lists_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/segment", "/v1/classes", "/v1/vocabularies", "/healthz"):
        assert path in paths
    assert set(paths["/v1/classes"]) == {"get", "post"} and set(paths["/v1/vocabularies"]) == {"get", "post"}
    assert "delete" in paths["/v1/classes/{name}"] and "delete" in paths["/v1/vocabularies/{name}"]
    assert "/" not in paths  # the page is left out of the schema
    content = paths["/v1/segment"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "image/png", "image/webp", "multipart/form-data"} <= set(content)


def test_without_a_front_the_routes_say_what_to_override(monkeypatch):
    monkeypatch.delitem(http.api.dependency_overrides, http.current_front, raising=False)
    with TestClient(http.api) as test_client, pytest.raises(RuntimeError, match="current_front"):
        test_client.get("/healthz")


# ---- metrics --------------------------------------------------------------------------


def test_endpoint_metrics_names_tags_and_values(backend):
    metrics = EndpointMetrics(backend=backend)
    kinds = {name: kind for name, (kind, _) in backend.made.items()}
    assert kinds == {"pading_requests": "Counter", "pading_request_latency_ms": "Histogram",
                     "pading_segments": "Counter", "pading_vocabulary_version": "Gauge", "pading_classes": "Gauge"}
    made = {name: metric for name, (_, metric) in backend.made.items()}
    assert made["pading_requests"].tag_keys == ("task", "status", "vocabulary")
    assert made["pading_request_latency_ms"].boundaries == LATENCY_BOUNDARIES_MS
    assert made["pading_segments"].tag_keys == ("kind", "vocabulary")
    assert made["pading_classes"].tag_keys == ("vocabulary",)

    metrics.request("semantic", 200, 0.0125, "street")
    metrics.request("../../etc", 404, 0.5)  # an unknown task is one bounded tag value
    assert backend.calls("pading_requests") == [
        ("inc", 1.0, {"task": "semantic", "status": "200", "vocabulary": "street"}),
        ("inc", 1.0, {"task": "invalid", "status": "404", "vocabulary": BASE})]
    assert backend.calls("pading_request_latency_ms") == [
        ("observe", pytest.approx(12.5), {"task": "semantic", "vocabulary": "street"}),
        ("observe", pytest.approx(500.0), {"task": "invalid", "vocabulary": BASE})]
    # failures keep the name of a vocabulary that has answered; any other name is one bounded value
    for name in ("street", "typo-1", "typo-2", "../x"):
        metrics.request("panoptic", 503, 0.1, name)
    assert [tags["vocabulary"] for _, _, tags in backend.calls("pading_requests")[2:]] == \
        ["street", OTHER, OTHER, OTHER]

    metrics.result({"panoptic": [{"unseen": False}, {"unseen": False}, {"unseen": True, "added": True}],
                    "semantic": [{"unseen": True}]})
    assert backend.calls("pading_segments") == [  # no count for a kind with none (added once, not as unseen)
        ("inc", 2, {"kind": "seen", "vocabulary": BASE}), ("inc", 1, {"kind": "unseen", "vocabulary": BASE}),
        ("inc", 1, {"kind": "added", "vocabulary": BASE})]
    metrics.result({"instance": [], "vocabulary": "street"})
    assert len(backend.calls("pading_segments")) == 3

    metrics.vocabulary("street", 4, 21)
    assert backend.calls("pading_vocabulary_version") == [("set", 4, {"vocabulary": "street"})]
    assert backend.calls("pading_classes") == [("set", 21, {"vocabulary": "street"})]


def test_front_metrics_have_no_vocabulary_gauges(backend):
    EndpointMetrics(backend=backend, vocabulary=False)
    assert set(backend.made) == {"pading_requests", "pading_request_latency_ms", "pading_segments"}


# ---- the replica's error isolation ----------------------------------------------------


class FakeService:
    """What Replica.segment_items needs of a SegmentationService: ``sync`` and a batched ``segment``
    that fails as a whole when any item is bad (as check_request does); ``bad`` images raise."""

    def __init__(self, name: str, bad=(), crash=()):
        self.name, self.bad, self.crash = name, set(bad), set(crash)
        self.batches: list[list] = []
        self.synced = 0

    def sync(self):
        self.synced += 1
        return f"{self.name}-state"

    def segment(self, images, tasks, formats, *, min_score, state):
        assert state == f"{self.name}-state"
        self.batches.append(list(images))
        if self.crash & set(images):
            raise RuntimeError("segmenter crashed")
        if self.bad & set(images):
            raise CorruptImageError(str(sorted(self.bad & set(images))), "bad item")
        return [{"image": image, "task": task, "format": fmt, "min_score": score, "service": self.name}
                for image, task, fmt, score in zip(images, tasks, formats, min_score)]


def bare_replica() -> Replica:
    """A Replica without a bundle: segment_items and segment_batch use no loaded state."""
    return Replica.__new__(Replica)


def test_one_bad_item_fails_alone_and_the_others_are_answered():
    service = FakeService("base", bad={"b"})
    items = [("a", "panoptic", "json", 0.0), ("b", "instance", "png", 0.5), ("c", "semantic", "json", 0.9)]
    results = bare_replica().segment_items(service, items)
    assert [r["image"] if isinstance(r, dict) else type(r) for r in results] == ["a", CorruptImageError, "c"]
    assert results[2] == {"image": "c", "task": "semantic", "format": "json", "min_score": 0.9, "service": "base"}
    assert service.batches == [["a", "b", "c"], ["a"], ["b"], ["c"]]  # the batch, then each item alone


def test_a_good_batch_is_one_segment_call():
    service = FakeService("base")
    results = bare_replica().segment_items(service, [("a", "panoptic", "json", 0.0), ("b", "panoptic", "json", 0.0)])
    assert [r["image"] for r in results] == ["a", "b"] and service.batches == [["a", "b"]]


def test_a_single_bad_item_raises_and_a_crash_is_not_isolated():
    with pytest.raises(CorruptImageError):
        bare_replica().segment_items(FakeService("base", bad={"a"}), [("a", "panoptic", "json", 0.0)])
    service = FakeService("base", crash={"b"})
    with pytest.raises(RuntimeError, match="crashed"):  # not bad input: the replica's health is in question
        bare_replica().segment_items(service, [("a", "panoptic", "json", 0.0), ("b", "panoptic", "json", 0.0)])
    assert service.batches == [["a", "b"]]


def test_a_batch_is_grouped_by_vocabulary_and_answered_in_order():
    base, street = FakeService("base"), FakeService("street", bad={"s2"})
    entries = [(base, ("b1", "panoptic", "json", 0.0)), (street, ("s1", "instance", "json", 0.0)),
               (base, ("b2", "semantic", "json", 0.0)), (street, ("s2", "panoptic", "json", 0.0))]
    results = asyncio.run(bare_replica().segment_batch(entries))
    assert [(r["image"], r["service"]) for r in results[:3]] == [("b1", "base"), ("s1", "street"), ("b2", "base")]
    assert isinstance(results[3], CorruptImageError)
    assert base.batches == [["b1", "b2"]] and street.batches == [["s1", "s2"], ["s1"], ["s2"]]


class CallingReplica(Replica):
    """A Replica without a bundle whose ``slow`` and ``whose`` methods stand in for its answers."""

    def __init__(self, retry_after_s: float = 4.0):
        self.config = ServeConfig(retry_after_s=retry_after_s)
        self.finished: list[str] = []

    async def whose(self, tag: str) -> tuple[str, str]:
        await asyncio.sleep(0.01)  # another call runs meanwhile
        return tag, self.request_vocabulary()

    async def slow(self) -> None:
        await asyncio.sleep(5)
        self.finished.append("slow")


def test_call_gives_each_request_its_own_vocabulary():
    """``serve.ingress=replica``: the routes call the replica in its own process; each call sees its
    own vocabulary while it runs, even with others in flight, and none after it."""
    replica = CallingReplica()

    async def main():
        calls = [replica.call("whose", f"r{k}", vocabulary=name) for k, name in enumerate(["base", "street", "farm"])]
        return await asyncio.gather(*calls), replica.request_vocabulary()

    answers, after = asyncio.run(main())
    assert answers == [("r0", "base"), ("r1", "street"), ("r2", "farm")] and after == "base"


def test_call_refuses_a_bad_vocabulary_name_and_times_out_with_a_503():
    replica = CallingReplica(retry_after_s=4.0)
    with pytest.raises(DataError, match="vocabulary name '../etc'"):
        asyncio.run(replica.call("whose", "r", vocabulary="../etc"))
    with pytest.raises(BusyError, match="no answer within 0.05 s") as busy:
        asyncio.run(replica.call("slow", timeout=0.05))
    assert busy.value.retry_after_s == 4.0 and replica.finished == []
    assert http_status(busy.value) == 503


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_the_endpoint_command_stops_on_its_signals_even_started_in_the_background(signal_name):
    """pipelines/serve.py blocks in ``launch.wait_until_interrupted``. A background job of a
    non-interactive shell starts with SIGINT ignored; it must still stop on SIGINT (Ctrl-C,
    ``kill -INT``) and on SIGTERM, and return so that Serve is shut down."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "from pading.serving.launch import wait_until_interrupted\n"
            "print('waiting', flush=True); wait_until_interrupted(); print('returned', flush=True)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "waiting"
        time.sleep(0.2)  # inside the wait
        process.send_signal(getattr(signal, signal_name))
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert output.strip() == "returned" and process.returncode == 0
