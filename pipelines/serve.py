"""Ray Serve application: the universal zero-shot segmentation endpoint.

    serve run pipelines.serve:app bundle=outputs/demo/generator/bundle [config=F.yaml] [max_batch_size=4 ...]
    python pipelines/serve.py --bundle outputs/demo/generator/bundle [--config F] [--set serve.port=8001]
    python pipelines/serve.py --bundle runs:/<run_id>/bundle          # or models:/<name>/<version>
    python pipelines/full.py --serve                                  # deploys the run's bundle at the end

``serve run`` listens where Serve's own HTTP options say (default 127.0.0.1:8000);
``serve.host``/``serve.port`` apply to ``python pipelines/serve.py`` and ``full.py --serve``.
Endpoints (OpenAPI at /docs and /openapi.json): POST /v1/segment, GET/POST /v1/classes,
DELETE /v1/classes/{name}, GET/POST /v1/vocabularies, DELETE /v1/vocabularies/{name},
GET /healthz and a page to try it at GET /; ``vocabulary=<name>`` picks a named vocabulary. Binds 127.0.0.1
unless serve.host says otherwise. The logic lives in pading.serving.service; this file is HTTP.

Production behaviour (settings in the ``serve`` config section, docs/serving.md):

- backpressure: beyond ``max_ongoing_requests`` per replica and ``max_queued_requests``
  waiting, requests get 503 with ``Retry-After`` at once;
- a request not answered within ``request_timeout_s`` gets 503 with ``Retry-After``;
- uploads are cut off at ``max_body_bytes`` while they are read, before any decoding;
- Serve calls ``check_health`` (a real forward pass) every ``health_check_period_s`` and
  replaces a replica that fails it or does not answer within ``health_check_timeout_s``;
- vocabularies are durable (docs/serving.md, "Vocabularies"): a class change is committed to
  the vocabulary store (``serve.vocabulary_store``) before it is answered, and every replica
  catches up with the store before it answers, so all replicas, new and restarted ones too,
  serve the newest version;
- metrics through ``ray.serve.metrics`` (Ray's Prometheus endpoint): ``pading_requests``
  by task, status and vocabulary, ``pading_request_latency_ms``, ``pading_segments`` by
  class kind, ``pading_vocabulary_version`` and ``pading_classes`` by vocabulary.
"""

import argparse
import asyncio
import json
import logging
import math
import os
import time
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import BackpressureConfig
from starlette.datastructures import UploadFile

from pading.bundle import CONFIG_FILE
from pading.config import ExperimentConfig, ServeConfig, from_dict, load_config, to_dict
from pading.errors import ConfigError, PadingError
from pading.serving.service import (
    OUTPUT_FORMATS,
    TASK_CHOICES,
    BusyError,
    ImageTooLargeError,
    RequestError,
    SegmentationService,
    check_request,
    http_status,
    resolve_batching,
    segment_counts,
)
from pading.serving.vocabularies import BASE, check_name, default_store, open_store, store_key
from pipelines import common
from pipelines.common import MLFLOW_SCHEMES, resolve_bundle

logger = logging.getLogger("pipelines.serve")

APP_NAME = "pading"
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
JSON_SEPARATORS = (",", ":")
LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]

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


def _error(status: int, kind: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail}, headers=headers)


@api.exception_handler(PadingError)
async def _library_error(request: Request, error: PadingError) -> JSONResponse:
    status = http_status(error)
    retry = getattr(error, "retry_after_s", None)
    headers = {"Retry-After": str(math.ceil(retry))} if status == 503 and retry is not None else None
    return _error(status, type(error).__name__, str(error), headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in error.errors())
    return _error(422, "ValidationError", problems or "invalid request")


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


class EndpointMetrics:
    """Application metrics (``ray.serve.metrics``; Ray exports them on its Prometheus
    endpoint with a ``ray_`` prefix, see docs/serving.md). Requests and segments are
    counted by the HTTP front, the vocabulary by each model replica."""

    def __init__(self, vocabulary: bool = True):
        self.requests = serve_metrics.Counter(
            "pading_requests", description="POST /v1/segment requests by task, HTTP status and vocabulary",
            tag_keys=("task", "status", "vocabulary"))
        self.latency = serve_metrics.Histogram(
            "pading_request_latency_ms", description="POST /v1/segment latency in the replica (ms)",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("task", "vocabulary"))
        self.segments = serve_metrics.Counter(
            "pading_segments", description="segments returned, by kind of class: seen, unseen or added at run time",
            tag_keys=("kind", "vocabulary"))
        if vocabulary:
            self.vocabulary_version = serve_metrics.Gauge(
                "pading_vocabulary_version", description="vocabulary version served (+1 per change)",
                tag_keys=("vocabulary",))
            self.classes = serve_metrics.Gauge("pading_classes", description="classes in the vocabulary",
                                               tag_keys=("vocabulary",))

    def request(self, task: str, status: int, seconds: float, vocabulary: str = BASE) -> None:
        task = task if task in TASK_CHOICES else "invalid"  # bounded tag values
        self.requests.inc(tags={"task": task, "status": str(status), "vocabulary": vocabulary})
        self.latency.observe(1000 * seconds, tags={"task": task, "vocabulary": vocabulary})

    def result(self, result: dict) -> None:
        vocabulary = result.get("vocabulary", BASE)
        for kind, count in segment_counts(result).items():
            if count:
                self.segments.inc(count, tags={"kind": kind, "vocabulary": vocabulary})

    def vocabulary(self, name: str, version: int, num_classes: int) -> None:
        self.vocabulary_version.set(version, tags={"vocabulary": name})
        self.classes.set(num_classes, tags={"vocabulary": name})


@serve.deployment(name="PadingModel")
class ModelDeployment:
    """A model replica: a bundle, the SegmentationService of the base vocabulary, those of the
    named vocabularies it was asked for (Serve model multiplexing keyed by the vocabulary name,
    at most ``serve.max_vocabularies_per_replica``, least recently used out) and (when
    batching) a batching queue. Every service reads and writes the shared vocabulary store,
    so any replica answers with the newest version. Called by the HTTP front
    (:class:`SegmentationDeployment`) through a handle."""

    def __init__(self, bundle_dir: str, serve_config: dict, store_spec: str, tracking_uri: str | None = None,
                 store_key_: str = "bundle"):
        import torch

        from pading.bundle import Bundle

        common.setup_logging()
        self.config: ServeConfig = from_dict(ServeConfig, serve_config, prefix="serve")
        torch.set_num_threads(max(1, int(self.config.num_cpus)))
        device = "cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.trained = Bundle.load(bundle_dir, map_location=device)
        self.store = open_store(store_spec, tracking_uri, store_key_)
        self.service = SegmentationService(self.trained, self.config, store=self.store)
        self.batching = resolve_batching(self.config.batching, device)
        self._segment_batch.set_max_batch_size(self.config.max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.metrics = EndpointMetrics()
        self.replica = f"{os.uname().nodename}:{os.getpid()}"

        async def load_vocabulary(name: str) -> SegmentationService:
            return await asyncio.to_thread(SegmentationService, self.trained, self.config, store=self.store,
                                           vocabulary=name)

        self._load_vocabulary = serve.multiplexed(max_num_models_per_replica=self.config.max_vocabularies_per_replica)(
            load_vocabulary)
        self._publish(self.service)
        logger.info("model replica %s ready: %s on %s, batching %s (serve.batching=%s), vocabularies in %s",
                    self.replica, bundle_dir, device, "on" if self.batching else "off", self.config.batching,
                    self.store.root)

    def _publish(self, service: SegmentationService) -> None:
        state = service.state
        self.metrics.vocabulary(service.vocabulary, state.version, state.bundle.table.num_classes)

    async def _service(self) -> SegmentationService:
        """The service of the request's vocabulary (the multiplexed model id; none: base)."""
        name = serve.get_multiplexed_model_id()
        if not name or name == BASE:
            return self.service
        return await self._load_vocabulary(name)

    async def check_health(self) -> None:
        """Called by Serve every ``serve.health_check_period_s``: a real forward pass; an
        exception (or no answer within ``serve.health_check_timeout_s``) gets the replica
        replaced."""
        await asyncio.to_thread(self.service.health_check)

    def _segment_items(self, service: SegmentationService, items: list) -> list:
        """items: (image, task, format, min_score) tuples -> results, or the error of one item."""
        state = service.sync()  # the newest version before answering
        try:
            return service.segment([i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                                   min_score=[i[3] for i in items], state=state)
        except PadingError:
            if len(items) == 1:
                raise
        results = []
        for item in items:  # isolate the item that failed; the others still get answers
            try:
                results.extend(self._segment_items(service, [item]))
            except PadingError as error:
                results.append(error)
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _segment_batch(self, entries: list) -> list:
        """entries: (service, item) pairs; each vocabulary's items are segmented together."""
        results: list = [None] * len(entries)
        groups: dict[int, list[int]] = {}
        for position, (service, _) in enumerate(entries):
            groups.setdefault(id(service), []).append(position)
        for positions in groups.values():
            service = entries[positions[0]][0]
            answers = await asyncio.to_thread(self._segment_items, service, [entries[k][1] for k in positions])
            for k, answer in zip(positions, answers):
                results[k] = answer
        return results

    def _tag(self, result: dict) -> dict:
        return {**result, "replica": self.replica}

    async def segment(self, data: bytes, task: str, output_format: str, min_score: float) -> dict:
        """Decode ``data`` and segment it; raises the library's error for bad input."""
        service = await self._service()
        image = await asyncio.to_thread(service.decode, data)
        item = (image, task, output_format, min_score)
        if self.batching:
            result = await self._segment_batch((service, item))
        else:
            (result,) = await asyncio.to_thread(self._segment_items, service, [item])
        if isinstance(result, Exception):
            raise result
        return self._tag(result)

    async def classes(self) -> dict:
        service = await self._service()
        result = await asyncio.to_thread(service.classes)
        self._publish(service)
        return self._tag(result)

    async def add_classes(self, names: list[str], isthing) -> dict:
        service = await self._service()
        result = await asyncio.to_thread(service.add_classes, names, isthing)
        self._publish(service)
        return self._tag(result)

    async def delete_class(self, name: str) -> dict:
        service = await self._service()
        result = await asyncio.to_thread(service.delete_class, name)
        self._publish(service)
        return self._tag(result)

    async def vocabularies(self) -> dict:
        return self._tag(await asyncio.to_thread(self.service.vocabularies))

    async def create_vocabulary(self, name: str, add: list[str], isthing, only) -> dict:
        return self._tag(await asyncio.to_thread(self.service.create_vocabulary, name, add, isthing, only))

    async def delete_vocabulary(self, name: str) -> dict:
        return self._tag(await asyncio.to_thread(self.service.delete_vocabulary, name))

    async def info(self) -> dict:
        state = self.service.sync()
        return {"vocabulary_version": state.version, "num_classes": state.bundle.table.num_classes,
                "device": str(state.bundle.device), "batching": self.batching, "replica": self.replica,
                "replica_pid": os.getpid(), "vocabulary_store": str(self.store.root)}


def _vocabulary_headers(result: dict) -> dict:
    """Which vocabulary, version and replica made an answer."""
    headers = {"X-Replica": str(result.get("replica", ""))}
    if "vocabulary_version" in result:
        headers["X-Vocabulary-Version"] = str(result["vocabulary_version"])
    if "vocabulary" in result:
        headers["X-Vocabulary"] = str(result["vocabulary"])
    return headers


def _library_cause(error: BaseException) -> BaseException:
    """The library error a model replica raised, from the error its handle re-raises."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, PadingError) else error


@serve.deployment(name="PadingSegmenter")
@serve.ingress(api)
class SegmentationDeployment:
    """The HTTP front: reads and size-checks requests, forwards them to the model replicas
    (:class:`ModelDeployment`) and turns their absence (killed, restarting, backlogged,
    too slow) into 503 + Retry-After, so clients never see a 500 or a hang for it."""

    def __init__(self, model, serve_config: dict):
        common.setup_logging()
        self.config: ServeConfig = from_dict(ServeConfig, serve_config, prefix="serve")
        self.model = model
        self.metrics = EndpointMetrics(vocabulary=False)

    async def _call(self, method: str, *args, timeout: float | None = None, vocabulary: str = BASE):
        """``model.<method>(*args)`` on a replica for ``vocabulary`` (Serve routes a named
        vocabulary to replicas that have it loaded), given up after ``timeout`` seconds (None: no limit)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        retry = self.config.retry_after_s
        handle = self.model if vocabulary == BASE else self.model.options(multiplexed_model_id=check_name(vocabulary))
        response = getattr(handle, method).remote(*args)
        try:
            async with asyncio.timeout(timeout):
                return await response
        except TimeoutError:
            response.cancel()
            raise BusyError(f"no answer within {timeout} s (serve.request_timeout_s for segmentation); retry later",
                            retry) from None
        except BackPressureError:
            raise BusyError("every model replica is busy and the queue (serve.max_queued_requests) is full; "
                            "retry later", retry) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as error:
            logger.warning("model replica lost during a request: %s", type(error).__name__)
            raise BusyError("the model replica serving this request stopped; it is being replaced, retry later",
                            retry) from None
        except PadingError:
            raise
        except Exception as error:
            cause = _library_cause(error)
            if cause is error:
                raise
            raise cause from None

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes ``serve.max_body_bytes`` (by its
        Content-Length, or while it streams in), before anything is decoded."""
        limit = self.config.max_body_bytes
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

    async def _read_image(self, request: Request) -> bytes:
        body = await self._read_body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return body

        async def replay() -> dict:  # the form parser reads the (already size-checked) body again
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form()
        files = [value for value in form.values() if isinstance(value, UploadFile)]
        if not files:
            raise RequestError("request body", "the multipart form has no file field")
        return await files[0].read()

    @api.post("/v1/segment", summary="Segment an image", openapi_extra=IMAGE_BODY,
              response_description="JSON segments with COCO RLE masks, or an id PNG with format=png")
    async def segment(
        self,
        request: Request,
        task: str = Query("panoptic", description="panoptic, instance, semantic or all",
                          json_schema_extra={"enum": list(TASK_CHOICES)}),
        format: str = Query("json", description="json (RLE masks) or png (an id image; segments in the "
                            "X-Segments header)", json_schema_extra={"enum": list(OUTPUT_FORMATS)}),
        min_score: float = Query(0.0, ge=0.0, le=1.0, description="drop panoptic/instance segments scoring less"),
        vocabulary: str = VOCABULARY_QUERY,
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            check_request(task, format)
            result = await self._call("segment", await self._read_image(request), task, format, min_score,
                                      timeout=self.config.request_timeout_s, vocabulary=vocabulary)
            status = 200
        except PadingError as error:
            status = http_status(error)
            raise
        finally:
            self.metrics.request(task, status, time.perf_counter() - started,
                                 vocabulary if status != 404 else "unknown")
        self.metrics.result(result)
        elapsed_ms = 1000 * (time.perf_counter() - started)
        headers = {"X-Process-Time-Ms": f"{elapsed_ms:.1f}", "Server-Timing": f"segment;dur={elapsed_ms:.1f}",
                   **_vocabulary_headers(result)}
        if format == "png":
            png = result.pop("png")
            headers["X-Segments"] = json.dumps(result, separators=JSON_SEPARATORS)
            return Response(content=png, media_type="image/png", headers=headers)
        return JSONResponse(content=result, headers=headers)

    # ---- vocabulary -----------------------------------------------------------------
    @api.get("/v1/classes", summary="List a vocabulary's classes")
    async def list_classes(self, vocabulary: str = VOCABULARY_QUERY) -> JSONResponse:
        result = await self._call("classes", timeout=self.config.health_check_timeout_s, vocabulary=vocabulary)
        return JSONResponse(content=result, headers=_vocabulary_headers(result))

    @api.post("/v1/classes", summary="Add classes by name (re-fits the classifier; durable once answered)",
              status_code=201)
    async def add_classes(self, body: NewClasses, vocabulary: str = VOCABULARY_QUERY) -> JSONResponse:
        result = await self._call("add_classes", body.names, body.isthing, vocabulary=vocabulary)
        return JSONResponse(status_code=201, content=result,
                            headers={"X-Process-Time-Ms": f"{1000 * result['seconds']:.1f}",
                                     **_vocabulary_headers(result)})

    @api.delete("/v1/classes/{name:path}", summary="Remove a class added at run time")
    async def delete_class(self, name: str, vocabulary: str = VOCABULARY_QUERY) -> JSONResponse:
        result = await self._call("delete_class", name, vocabulary=vocabulary)
        return JSONResponse(content=result, headers=_vocabulary_headers(result))

    @api.get("/v1/vocabularies", summary="List the vocabularies and their versions")
    async def list_vocabularies(self) -> dict:
        return await self._call("vocabularies", timeout=self.config.health_check_timeout_s)

    @api.post("/v1/vocabularies", summary="Create a named vocabulary", status_code=201)
    async def create_vocabulary(self, body: NewVocabulary) -> JSONResponse:
        check_name(body.name)
        result = await self._call("create_vocabulary", body.name, body.add, body.isthing, body.only)
        return JSONResponse(status_code=201, content=result)

    @api.delete("/v1/vocabularies/{name}", summary="Delete a named vocabulary")
    async def delete_vocabulary(self, name: str) -> dict:
        return await self._call("delete_vocabulary", check_name(name))

    # ---- health and page ------------------------------------------------------------
    @api.get("/healthz", summary="Liveness and the model in use")
    async def healthz(self) -> dict:
        return {"status": "ok", **await self._call("info", timeout=self.config.health_check_timeout_s)}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


# ---- building and deploying -------------------------------------------------------------


def build_application(bundle_dir: str | Path, config: ServeConfig, reference: str | None = None,
                      tracking_uri: str | None = None):
    """The Serve application over a local bundle directory: the HTTP front (no CPUs
    reserved) and the model deployment, with autoscaling, resources, backpressure and
    health checking from ``config``; the vocabulary store is ``serve.vocabulary_store``, else
    the default for the bundle ``reference`` (a directory or an MLflow URI, docs/serving.md)."""
    reference = reference or str(bundle_dir)
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    store_spec = default_store(reference, bundle_dir, config.vocabulary_store, tracking_uri)
    model = ModelDeployment.options(
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,  # per caller: the front gets BackPressureError -> 503
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
    )
    queue = config.max_queued_requests if config.max_queued_requests > 0 else 1000
    front = SegmentationDeployment.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_replicas * config.max_ongoing_requests + queue,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s),
    )
    return front.bind(model.bind(str(bundle_dir), to_dict(config), store_spec, tracking_uri,
                                 store_key(reference) or "bundle"), to_dict(config))


def app(args: dict):
    """Application builder for ``serve run pipelines.serve:app bundle=PATH [config=YAML] [KEY=VALUE ...]``;
    KEY is a ``serve`` setting (``max_batch_size=4``) or any ``section.key``. Without
    ``config`` the bundle's own config.yaml is used. ``PADING_BUNDLE`` may name the bundle."""
    args = dict(args)
    reference = args.pop("bundle", None) or os.environ.get("PADING_BUNDLE")
    if not reference:
        raise ConfigError("give the model bundle: serve run pipelines.serve:app bundle=PATH (or PADING_BUNDLE=PATH)")
    config_path = args.pop("config", None)
    overrides = [f"{key if '.' in key else 'serve.' + key}={value}" for key, value in args.items()]
    bundle_dir = resolve_bundle(reference, load_config(config_path) if config_path else None)
    config = load_config(config_path or bundle_dir / CONFIG_FILE, overrides)
    return build_application(bundle_dir, config.serve, reference, _tracking_uri(config, reference))


build_app = app


def deploy(bundle_dir: str | Path, config: ExperimentConfig, blocking: bool = False,
           num_cpus: int | None = None) -> str:
    """Start Serve on ``config.serve.host:port`` (starting or joining Ray), deploy the bundle
    and return the URL; with ``blocking`` wait until Ctrl-C, then shut Serve down."""
    settings = config.serve
    bundle_path = resolve_bundle(str(bundle_dir), config)
    if num_cpus is not None:
        config.ray.local_cpus = num_cpus
    common.init_ray(config)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(bundle_path, settings, str(bundle_dir), _tracking_uri(config, str(bundle_dir))),
              name=APP_NAME, route_prefix=settings.route_prefix)
    url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}/"
    logger.info("serving %s at %s (OpenAPI: %sdocs)", bundle_path, url, url)
    if blocking:
        block_until_interrupted()
    return url


def _tracking_uri(config: ExperimentConfig, reference: str) -> str | None:
    """The MLflow tracking URI that an MLflow bundle reference resolves against (None otherwise)."""
    if not str(reference).startswith(MLFLOW_SCHEMES):
        return None
    from pading.run import tracking

    return tracking.tracking_uri(config.tracking)


def block_until_interrupted() -> None:
    """Sleep until Ctrl-C or SIGTERM (e.g. `kill`, a container stop), then shut Serve down."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        logger.info("stopping Serve")
        serve.shutdown()


def main() -> None:
    common.setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/...")
    parser.add_argument("--config", default=None, help="YAML config (default: the bundle's config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set serve.max_batch_size=4 (repeatable)")
    parser.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    parser.add_argument("--no-block", action="store_true",
                        help="return after deploying (for a running cluster: RAY_ADDRESS or `ray start`)")
    args = parser.parse_args()
    overrides = list(args.overrides)
    overrides += [f"serve.host={args.host}"] if args.host else []
    overrides += [f"serve.port={args.port}"] if args.port else []
    bundle_dir = resolve_bundle(args.bundle, load_config(args.config) if args.config else None)
    config = load_config(args.config or bundle_dir / CONFIG_FILE, overrides)
    url = deploy(bundle_dir, config, blocking=False, num_cpus=args.num_cpus)
    print(f"PADing segmentation endpoint: {url}  (API docs: {url}docs; Ctrl-C to stop)", flush=True)
    if not args.no_block:
        block_until_interrupted()


if __name__ == "__main__":
    main()
