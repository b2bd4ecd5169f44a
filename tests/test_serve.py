"""The Ray Serve endpoint (pipelines/serve.py) over real HTTP on 127.0.0.1: every endpoint,
every kind of bad request, run-time classes, and segment requests racing a class update.

One Ray + Serve deployment of a tiny bundle is shared by this module and test_page.py."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from helpers import serve_app
from PIL import Image
from pycocotools import mask as mask_utils

pytestmark = pytest.mark.slow

HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="session")
def serve_url(tmp_path_factory):
    pytest.importorskip("ray.serve")
    yield serve_app.start(tmp_path_factory.mktemp("serve"))["url"]
    serve_app.stop()


@pytest.fixture(scope="module")
def client(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as http:
        yield http


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG")


def vocabulary(client) -> dict:
    listing = client.get("/v1/classes").json()
    return {"version": listing["vocabulary_version"], "names": {c["id"]: c["name"] for c in listing["classes"]},
            "records": {c["name"]: c for c in listing["classes"]}}


def assert_consistent(result: dict, names_by_id: dict) -> None:
    for task in ("panoptic", "instance", "semantic"):
        for entry in result.get(task, []):
            assert names_by_id.get(entry["class_id"]) == entry["class_name"], (task, entry["class_id"])


# ---- endpoints ------------------------------------------------------------------------


def test_health_openapi_and_page(client):
    # serve.proxy=auto on a Ray that the endpoint did not start itself (this session's): Serve's own proxy
    assert "ProxyActor" in serve_app.listener(httpx.URL(str(client.base_url)).port)
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["batching"] is True
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/classes", "/v1/classes/{name}", "/healthz"} <= set(paths)
    assert set(paths["/v1/classes"]) == {"get", "post"} and "image/png" in str(paths["/v1/segment"])
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="overlay"' in page.text


def test_segment_raw_body_all_tasks(client, png_bytes):
    response = client.post("/v1/segment", params={"task": "all"}, content=png_bytes,
                           headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert float(response.headers["x-process-time-ms"]) > 0
    result = response.json()
    assert (result["height"], result["width"]) == (HEIGHT, WIDTH)
    names = vocabulary(client)["names"]
    assert_consistent(result, names)
    assert result["panoptic"] and result["semantic"]
    for entry in result["panoptic"] + result["instance"]:
        mask = mask_utils.decode({"size": entry["mask"]["size"], "counts": entry["mask"]["counts"].encode()})
        assert mask.shape == (HEIGHT, WIDTH) and mask.sum() == entry["area"] and len(entry["bbox"]) == 4
        assert isinstance(entry["unseen"], bool) and 0 <= entry["score"] <= 1
    assert sum(e["area"] for e in result["semantic"]) == HEIGHT * WIDTH


@pytest.mark.parametrize("mode, image_format", [("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP")])
def test_segment_multipart_any_mode(client, mode, image_format):
    image = Image.new(mode, (WIDTH, HEIGHT), color=(90,) * len(mode))
    files = {"file": (f"x.{image_format.lower()}", encode(image, image_format), f"image/{image_format.lower()}")}
    response = client.post("/v1/segment", params={"task": "semantic"}, files=files)
    assert response.status_code == 200, response.text
    assert (response.json()["height"], response.json()["width"]) == (HEIGHT, WIDTH)


def test_segment_png_format(client, png_bytes):
    response = client.post("/v1/segment", params={"task": "semantic", "format": "png"}, content=png_bytes)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    class_ids = np.asarray(Image.open(io.BytesIO(response.content)))
    segments = json.loads(response.headers["x-segments"])["semantic"]
    assert class_ids.shape == (HEIGHT, WIDTH)
    assert {e["class_id"]: e["area"] for e in segments} == dict(zip(*np.unique(class_ids, return_counts=True)))


# ---- bad requests ---------------------------------------------------------------------


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=95)
    return data[: len(data) // 2]


BAD_SEGMENT_REQUESTS = [
    ("empty body", {}, b"", 400, "empty body"),
    ("not an image", {}, b"<html>hello</html>", 400, "not a JPEG, PNG or WebP"),
    ("truncated", {}, _truncated_jpeg(), 422, "truncated"),
    ("too many pixels", {}, encode(Image.new("RGB", (1000, 500)), "PNG"), 413, "above the limit"),
    ("unknown task", {"task": "depth"}, b"x", 400, "unknown task 'depth'"),
    ("unknown format", {"format": "bmp"}, b"x", 400, "unknown format 'bmp'"),
    ("png for all tasks", {"task": "all", "format": "png"}, b"x", 400, "single task"),
    ("score out of range", {"min_score": "2"}, b"x", 422, "min_score"),
    ("body too large", {}, b"\0" * (serve_app.MAX_BODY_BYTES + 1), 413, "bytes, above the limit"),
]


@pytest.mark.parametrize("name, params, body, status, message", BAD_SEGMENT_REQUESTS,
                         ids=[r[0] for r in BAD_SEGMENT_REQUESTS])
def test_bad_segment_requests_get_4xx_json(client, name, params, body, status, message):
    response = client.post("/v1/segment", params=params, content=body)
    assert response.status_code == status, response.text
    error, detail = response.json()["error"], response.json()["detail"]
    assert message in detail
    # the library's error class and its message, not Ray's wrapper of a model replica's error
    assert error.isidentifier() and "RayTaskError" not in error, error
    assert "Traceback" not in detail and "ray::" not in detail and len(detail) < 500, detail
    assert client.get("/healthz").status_code == 200  # the replica is still alive


def test_multipart_without_file(client):
    response = client.post("/v1/segment", content=b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "no file field" in response.json()["detail"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"names": [""]}, 400, "is empty"),
        ({"names": ["teapot", "Teapot"]}, 400, "given twice"),
        ({"names": ["unicorn"]}, 422, "cannot encode"),
        ({"isthing": True}, 422, "names"),
        ({"names": ["teapot", "lamp post"], "isthing": [True]}, 400, "isthing"),
    ],
)
def test_bad_class_requests(client, body, status, message):
    before = vocabulary(client)["version"]
    response = client.post("/v1/classes", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert vocabulary(client)["version"] == before


def test_conflicting_class_changes(client):
    trained = next(iter(vocabulary(client)["records"].values()))
    response = client.post("/v1/classes", json={"names": [trained["name"]]})
    assert response.status_code == 409 and "already in the vocabulary" in response.json()["detail"]
    response = client.delete(f"/v1/classes/{trained['name']}")
    assert response.status_code == 409 and "trained vocabulary" in response.json()["detail"]
    response = client.delete("/v1/classes/no such class")
    assert response.status_code == 404 and "no such class" in response.json()["detail"]


# ---- run-time classes -----------------------------------------------------------------


def test_add_class_then_segment_then_delete(client, png_bytes):
    before = vocabulary(client)
    response = client.post("/v1/classes", json={"names": ["teapot"], "isthing": True})
    assert response.status_code == 201, response.text
    added = response.json()
    assert added["vocabulary_version"] == before["version"] + 1 and 0 < added["seconds"] < 30
    after = vocabulary(client)
    record = after["records"]["teapot"]
    assert record["added"] and record["unseen"] and record["isthing"] and record["id"] not in before["names"]
    result = client.post("/v1/segment", params={"task": "all"}, content=png_bytes).json()
    assert result["vocabulary_version"] == after["version"]
    assert_consistent(result, after["names"])
    assert client.post("/v1/classes", json={"names": ["teapot"]}).status_code == 409
    response = client.delete("/v1/classes/teapot")
    assert response.status_code == 200 and response.json()["removed"]["name"] == "teapot"
    assert "teapot" not in vocabulary(client)["records"]


def test_segments_racing_a_class_update(client, png_bytes):
    """Segment requests in flight while a class is added: all succeed, and each answer
    matches exactly one vocabulary (the one before or the one after)."""
    before = vocabulary(client)
    url = str(client.base_url)

    def one(_):
        with httpx.Client(base_url=url, timeout=60) as http:
            response = http.post("/v1/segment", params={"task": "all"}, content=png_bytes)
        return response.status_code, response.json()

    added = {}

    def add():
        with httpx.Client(base_url=url, timeout=60) as http:
            added["response"] = http.post("/v1/classes", json={"names": ["lamp post"], "isthing": False})

    with ThreadPoolExecutor(max_workers=6) as pool:
        first_wave = [pool.submit(one, i) for i in range(10)]
        adder = threading.Thread(target=add)
        adder.start()
        adder.join()
        second_wave = [pool.submit(one, i) for i in range(6)]
        answers = [f.result() for f in first_wave + second_wave]
    assert added["response"].status_code == 201, added["response"].text
    after = vocabulary(client)
    assert after["version"] == before["version"] + 1
    by_version = {before["version"]: before["names"], after["version"]: after["names"]}
    for status, result in answers:
        assert status == 200, result
        assert result["vocabulary_version"] in by_version
        assert_consistent(result, by_version[result["vocabulary_version"]])
    assert all(result["vocabulary_version"] == after["version"] for _, result in answers[len(first_wave):])
    assert client.delete("/v1/classes/lamp post").status_code == 200
