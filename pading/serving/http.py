"""The endpoint's HTTP side without Ray (docs/serving.md, "What a client sees"): the FastAPI
app :data:`api` with its routes (OpenAPI at /docs and /openapi.json), its JSON errors
``{"error": <kind>, "detail": <what is wrong>}``, the request models, reading a size-limited
upload (413 as soon as it passes ``serve.max_body_bytes``) and the answers' headers.

The routes reach the model replicas through an :class:`HttpFront`, the dependency
:func:`current_front`: pipelines/serve.py's Serve ingress overrides it with its own front,
whose ``call`` goes through a Serve handle and turns an absent or busy replica into 503 +
Retry-After. Without Ray, any ``call`` does (a test can pass a fake)."""

import inspect
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from pading.config import ServeConfig
from pading.errors import PadingError
from pading.serving.metrics import EndpointMetrics
from pading.serving.service import (
    OUTPUT_FORMATS,
    TASK_CHOICES,
    ImageTooLargeError,
    RequestError,
    check_request,
    http_status,
)
from pading.serving.vocabularies import BASE, check_name

JSON_SEPARATORS = (",", ":")

#: ``call(method, *args, timeout=None, vocabulary=BASE)``: ``method`` of a model replica that
#: serves ``vocabulary``, given up after ``timeout`` seconds (None: no limit).
ReplicaCall = Callable[..., Awaitable]

api = FastAPI(
    title="PADing universal zero-shot segmentation",
    version="1.0",
    description=(
        "Panoptic, instance and semantic segmentation of seen and unseen classes (PADing, CVPR 2023). "
        "Classes can be added at run time by name: the service encodes the names, synthesises their "
        "features with the trained generator and re-fits the classifier. Errors are JSON "
        '`{"error": <kind>, "detail": <what is wrong>}` with a 4xx status.'
    ),
)


def error_response(status: int, kind: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


@api.exception_handler(PadingError)
async def _library_error(request: Request, error: PadingError) -> JSONResponse:
    status = http_status(error)
    retry = getattr(error, "retry_after_s", None)
    headers = {"Retry-After": str(math.ceil(retry))} if status == 503 and retry is not None else None
    return error_response(status, type(error).__name__, str(error), headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in error.errors())
    return error_response(422, "ValidationError", problems or "invalid request")


class NewClasses(BaseModel):
    """Classes to add: names (free text, encoded by the model's text encoder) and whether
    each is a countable thing (instances) or amorphous stuff."""

    names: list[str] = Field(..., description="class names", examples=[["zebra crossing"]])
    isthing: bool | list[bool] = Field(True, description="one value for all names, or one per name")


class NewVocabulary(BaseModel):
    """A named vocabulary: the trained classes (or the subset ``only``) plus new classes ``add``."""

    name: str = Field(..., description="1-64 letters, digits, '_', '.' or '-'", examples=["street-scenes"])
    add: list[str] = Field([], description="new class names (encoded and fitted now)", examples=[["traffic cone"]])
    isthing: bool | list[bool] = Field(True, description="for the added names: one value for all, or one per name")
    only: list[str] | None = Field(None, description="keep only these trained classes (default: all of them)",
                                   examples=[["person", "car"]])


VOCABULARY_QUERY = Query(BASE, description="the vocabulary to use (GET /v1/vocabularies lists them)")

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "A JPEG, PNG or WebP image: the raw body, or a multipart form with one file field.",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "image/webp")},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (``serve.max_body_bytes``;
    by its Content-Length, or while it streams in), before anything is decoded."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageTooLargeError("request body", f"{declared} bytes, above the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageTooLargeError("request body", f"more than {limit} bytes (the limit) sent")
        chunks.append(chunk)
    return b"".join(chunks)


#: The largest JSON body (a class list or a vocabulary): 1 MiB holds tens of thousands of names.
MAX_JSON_BYTES = 1 << 20


async def read_json(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as ``model``, refused with 413 past :data:`MAX_JSON_BYTES` before it is parsed
    (FastAPI would read a body of any size into memory), and with the usual 422 naming the field
    when it does not fit ``model``."""
    body = await read_body(request, MAX_JSON_BYTES)
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]) \
            from None


def json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI description of a route that reads ``model`` with :func:`read_json`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def read_image(request: Request, limit: int) -> bytes:
    """The image bytes: the raw body, or the first file of a multipart form (at most ``limit`` bytes sent)."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay() -> dict:  # the form parser reads the (already size-checked) body again
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form()
    files = [value for value in form.values() if isinstance(value, UploadFile)]
    if not files:
        raise RequestError("request body", "the multipart form has no file field")
    return await files[0].read()


def vocabulary_headers(result: dict) -> dict:
    """Which vocabulary, version and replica made an answer."""
    headers = {"X-Replica": str(result.get("replica", ""))}
    if "vocabulary_version" in result:
        headers["X-Vocabulary-Version"] = str(result["vocabulary_version"])
    if "vocabulary" in result:
        headers["X-Vocabulary"] = str(result["vocabulary"])
    return headers


class HttpFront:
    """What the routes need from the deployment that serves them: ``call`` reaches a model
    replica (see :data:`ReplicaCall`), ``config`` has the limits and timeouts, ``metrics``
    counts segmentation requests, ``page`` is the HTML page served at ``/``. The routes get
    it from the dependency :func:`current_front`."""

    def __init__(self, *, call: ReplicaCall, config: ServeConfig, metrics: EndpointMetrics, page: Path) -> None:
        self.call = call
        self.config = config
        self.metrics = metrics
        self.page = page


def current_front() -> HttpFront:
    """The front of the replica serving the request: the deployment sets
    ``api.dependency_overrides[current_front]`` (pipelines/serve.py)."""
    raise RuntimeError("no HttpFront: override the dependency pading.serving.http.current_front")


FRONT = Depends(current_front)


@api.post("/v1/segment", summary="Segment an image", openapi_extra=IMAGE_BODY,
          response_description="JSON segments with COCO RLE masks, or an id PNG with format=png")
async def segment(
    request: Request,
    task: str = Query("panoptic", description="panoptic, instance, semantic or all",
                      json_schema_extra={"enum": list(TASK_CHOICES)}),
    format: str = Query("json", description="json (RLE masks) or png (an id image; segments in the "
                        "X-Segments header)", json_schema_extra={"enum": list(OUTPUT_FORMATS)}),
    min_score: float = Query(0.0, ge=0.0, le=1.0, description="drop panoptic/instance segments scoring less"),
    vocabulary: str = VOCABULARY_QUERY,
    front: HttpFront = FRONT,
) -> Response:
    return await answer_segment(front, request, task, format, min_score, vocabulary)


async def answer_segment(front: HttpFront, request: Request, task: str, output_format: str, min_score: float,
                         vocabulary: str) -> Response:
    """The answer of POST /v1/segment (the route above, or :class:`SegmentFastPath`); raises the
    library's error for a bad request."""
    started = time.perf_counter()
    status = 500
    try:
        check_request(task, output_format)
        result = await front.call("segment", await read_image(request, front.config.max_body_bytes), task,
                                  output_format, min_score, timeout=front.config.request_timeout_s,
                                  vocabulary=vocabulary)
        status = 200
    except PadingError as error:
        status = http_status(error)
        raise
    finally:
        front.metrics.request(task, status, time.perf_counter() - started, vocabulary)
    front.metrics.result(result)
    elapsed_ms = 1000 * (time.perf_counter() - started)
    headers = {"X-Process-Time-Ms": f"{elapsed_ms:.1f}", "Server-Timing": f"segment;dur={elapsed_ms:.1f}",
               **vocabulary_headers(result)}
    if output_format == "png":
        png = result.pop("png")
        headers["X-Segments"] = json.dumps(result, separators=JSON_SEPARATORS)
        return Response(content=png, media_type="image/png", headers=headers)
    return JSONResponse(content=result, headers=headers)


#: What :class:`SegmentFastPath` takes as ``min_score``: a plain decimal, as FastAPI reads it too.
_PLAIN_SCORE = re.compile(r"\d{1,3}(\.\d{0,12})?|\.\d{1,12}")

#: The query parameters of POST /v1/segment and their defaults (those of the route above).
_SEGMENT_DEFAULTS = {"task": "panoptic", "format": "json", "min_score": "0", "vocabulary": BASE}


def plain_segment_query(query_string: bytes) -> dict | None:
    """The parameters of a POST /v1/segment query string when FastAPI's route would take every one
    of them as it is (each known and given at most once, ``min_score`` a plain decimal in [0, 1]),
    with the route's defaults for the rest; None for anything else (the route itself answers it)."""
    params = dict(_SEGMENT_DEFAULTS)
    seen = set()
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key not in params or key in seen:
            return None
        seen.add(key)
        params[key] = value
    if not _PLAIN_SCORE.fullmatch(params["min_score"]):
        return None
    min_score = float(params["min_score"])
    if not 0.0 <= min_score <= 1.0:
        return None
    return {**params, "min_score": min_score}


class SegmentFastPath:
    """ASGI middleware: a POST /v1/segment whose query FastAPI would take as it is
    (:func:`plain_segment_query`) is answered by :func:`answer_segment` directly, without
    FastAPI's routing, dependency solving and parameter validation: about 0.3 ms less of a
    64 px image's 7-15 ms behind HAProxy (docs/performance.md, "The segmentation route").
    Everything else, and any query it does not read the same way, goes to the app: the answer
    is the route's either way, errors included (the app's handler for the library's errors
    makes them the same JSON)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        params = None
        if scope["type"] == "http" and scope["method"] == "POST" and _route_path(scope) == "/v1/segment":
            params = plain_segment_query(scope.get("query_string", b""))
        if params is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            front = await _resolve_front(request)
            response = await answer_segment(front, request, params["task"], params["format"], params["min_score"],
                                            params["vocabulary"])
        except PadingError as error:
            response = await _library_error(request, error)
        await response(scope, receive, send)


def _route_path(scope) -> str:
    """The request's path below the app's mount point (``root_path``), as Starlette routes it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _resolve_front(request: Request) -> "HttpFront":
    """The dependency :func:`current_front`, as FastAPI resolves it: the override set on the app
    that runs (Serve runs a copy of :data:`api`, with the overrides it had)."""
    provider = request.app.dependency_overrides.get(current_front, current_front)
    front = provider()
    return await front if inspect.isawaitable(front) else front


api.add_middleware(SegmentFastPath)


# ---- vocabulary -----------------------------------------------------------------------
@api.get("/v1/classes", summary="List a vocabulary's classes")
async def list_classes(vocabulary: str = VOCABULARY_QUERY, front: HttpFront = FRONT) -> JSONResponse:
    result = await front.call("classes", timeout=front.config.health_check_timeout_s, vocabulary=vocabulary)
    return JSONResponse(content=result, headers=vocabulary_headers(result))


@api.post("/v1/classes", summary="Add classes by name (re-fits the classifier; durable once answered)",
          status_code=201, openapi_extra=json_body(NewClasses))
async def add_classes(request: Request, vocabulary: str = VOCABULARY_QUERY, front: HttpFront = FRONT) -> JSONResponse:
    body = await read_json(request, NewClasses)
    result = await front.call("add_classes", body.names, body.isthing, vocabulary=vocabulary)
    return JSONResponse(status_code=201, content=result,
                        headers={"X-Process-Time-Ms": f"{1000 * result['seconds']:.1f}", **vocabulary_headers(result)})


@api.delete("/v1/classes/{name:path}", summary="Remove a class added at run time")
async def delete_class(name: str, vocabulary: str = VOCABULARY_QUERY, front: HttpFront = FRONT) -> JSONResponse:
    result = await front.call("delete_class", name, vocabulary=vocabulary)
    return JSONResponse(content=result, headers=vocabulary_headers(result))


@api.get("/v1/vocabularies", summary="List the vocabularies and their versions")
async def list_vocabularies(front: HttpFront = FRONT) -> dict:
    return await front.call("vocabularies", timeout=front.config.health_check_timeout_s)


@api.post("/v1/vocabularies", summary="Create a named vocabulary", status_code=201,
          openapi_extra=json_body(NewVocabulary))
async def create_vocabulary(request: Request, front: HttpFront = FRONT) -> JSONResponse:
    body = await read_json(request, NewVocabulary)
    check_name(body.name)
    result = await front.call("create_vocabulary", body.name, body.add, body.isthing, body.only)
    return JSONResponse(status_code=201, content=result)


@api.delete("/v1/vocabularies/{name}", summary="Delete a named vocabulary")
async def delete_vocabulary(name: str, front: HttpFront = FRONT) -> dict:
    return await front.call("delete_vocabulary", check_name(name))


# ---- health and page --------------------------------------------------------------------
@api.get("/healthz", summary="Liveness and the model in use")
async def healthz(front: HttpFront = FRONT) -> dict:
    return {"status": "ok", **await front.call("info", timeout=front.config.health_check_timeout_s)}


@api.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(front: HttpFront = FRONT) -> HTMLResponse:
    return HTMLResponse(front.page.read_text(encoding="utf-8"))
