"""Ray Serve application: the universal zero-shot segmentation endpoint.

    serve run pipelines.serve:app bundle=outputs/demo/generator/bundle [config=F.yaml] [max_batch_size=4 ...]
    python pipelines/serve.py --bundle outputs/demo/generator/bundle [--config F] [--set serve.port=8001]
    python pipelines/serve.py --bundle runs:/<run_id>/bundle          # or models:/<name>/<version>
    python pipelines/full.py --serve                                  # deploys the run's bundle at the end

``serve run`` listens where Serve's own HTTP options say (default 127.0.0.1:8000);
``serve.host``/``serve.port`` apply to ``python pipelines/serve.py`` and ``full.py --serve``.
Endpoints (OpenAPI at /docs and /openapi.json): POST /v1/segment, GET/POST /v1/classes,
DELETE /v1/classes/{name}, GET /healthz and a page to try it at GET /. Binds 127.0.0.1
unless serve.host says otherwise. The logic lives in pading.serving.service; this file is HTTP.
"""

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from starlette.datastructures import UploadFile

from pading.config import ExperimentConfig, ServeConfig, from_dict, load_config, to_dict
from pading.errors import ConfigError, PadingError
from pading.serving.service import (
    OUTPUT_FORMATS,
    TASK_CHOICES,
    ImageTooLargeError,
    RequestError,
    SegmentationService,
    check_request,
    http_status,
)
from pipelines import common

logger = logging.getLogger("pipelines.serve")

APP_NAME = "pading"
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
JSON_SEPARATORS = (",", ":")

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


def _error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": kind, "detail": detail})


@api.exception_handler(PadingError)
async def _library_error(request: Request, error: PadingError) -> JSONResponse:
    return _error(http_status(error), type(error).__name__, str(error))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in error.errors())
    return _error(422, "ValidationError", problems or "invalid request")


class NewClasses(BaseModel):
    """Classes to add: names (free text, encoded by the model's text encoder) and whether
    each is a countable thing (instances) or amorphous stuff."""

    names: list[str] = Field(..., description="class names", examples=[["zebra crossing"]])
    isthing: bool | list[bool] = Field(True, description="one value for all names, or one per name")


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


@serve.deployment(name="PadingSegmenter")
@serve.ingress(api)
class SegmentationDeployment:
    """One replica: a bundle, its SegmentationService and a batching queue."""

    def __init__(self, bundle_dir: str, serve_config: dict):
        import torch

        from pading.serving.bundle import Bundle

        common.setup_logging()
        self.config: ServeConfig = from_dict(ServeConfig, serve_config, prefix="serve")
        torch.set_num_threads(max(1, int(self.config.num_cpus)))
        device = "cuda" if self.config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.service = SegmentationService(Bundle.load(bundle_dir, map_location=device), self.config)
        self._segment_batch.set_max_batch_size(self.config.max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        logger.info("replica ready: %s on %s, batching %s", bundle_dir, device, self.config.batching)

    # ---- segmentation ---------------------------------------------------------------
    def _segment_items(self, items: list) -> list:
        """items: (image, task, format, min_score) tuples -> results, or the error of one item."""
        try:
            return self.service.segment([i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                                        min_score=[i[3] for i in items])
        except PadingError:
            if len(items) == 1:
                raise
        results = []
        for item in items:  # isolate the item that failed; the others still get answers
            try:
                results.extend(self._segment_items([item]))
            except PadingError as error:
                results.append(error)
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _segment_batch(self, items: list) -> list:
        return await asyncio.to_thread(self._segment_items, items)

    async def _read_image(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise ImageTooLargeError("request body", f"{declared} bytes, above the limit of {self.config.max_body_bytes}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            files = [value for value in form.values() if isinstance(value, UploadFile)]
            if not files:
                raise RequestError("request body", "the multipart form has no file field")
            data = await files[0].read()
        else:
            data = await request.body()
        if len(data) > self.config.max_body_bytes:
            raise ImageTooLargeError("request body", f"{len(data)} bytes, above the limit of {self.config.max_body_bytes}")
        return data

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
    ) -> Response:
        started = time.perf_counter()
        check_request(task, format)
        image = await asyncio.to_thread(self.service.decode, await self._read_image(request))
        item = (image, task, format, min_score)
        if self.config.batching:
            result = await self._segment_batch(item)
        else:
            (result,) = await asyncio.to_thread(self._segment_items, [item])
        if isinstance(result, Exception):
            raise result
        elapsed_ms = 1000 * (time.perf_counter() - started)
        headers = {"X-Process-Time-Ms": f"{elapsed_ms:.1f}", "Server-Timing": f"segment;dur={elapsed_ms:.1f}",
                   "X-Vocabulary-Version": str(result["vocabulary_version"])}
        if format == "png":
            png = result.pop("png")
            headers["X-Segments"] = json.dumps(result, separators=JSON_SEPARATORS)
            return Response(content=png, media_type="image/png", headers=headers)
        return JSONResponse(content=result, headers=headers)

    # ---- vocabulary -----------------------------------------------------------------
    @api.get("/v1/classes", summary="List the vocabulary")
    async def list_classes(self) -> dict:
        return self.service.classes()

    @api.post("/v1/classes", summary="Add classes by name (re-fits the classifier)", status_code=201)
    async def add_classes(self, body: NewClasses) -> JSONResponse:
        result = await asyncio.to_thread(self.service.add_classes, body.names, body.isthing)
        return JSONResponse(status_code=201, content=result,
                            headers={"X-Process-Time-Ms": f"{1000 * result['seconds']:.1f}"})

    @api.delete("/v1/classes/{name:path}", summary="Remove a class added at run time")
    async def delete_class(self, name: str) -> dict:
        return await asyncio.to_thread(self.service.delete_class, name)

    # ---- health and page ------------------------------------------------------------
    @api.get("/healthz", summary="Liveness and the model in use")
    async def healthz(self) -> dict:
        state = self.service.state
        return {"status": "ok", "vocabulary_version": state.version, "num_classes": state.bundle.table.num_classes,
                "device": str(state.bundle.device), "batching": self.config.batching}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


# ---- building and deploying -------------------------------------------------------------


def resolve_bundle(reference: str, config: ExperimentConfig | None = None) -> Path:
    """A bundle directory, or an MLflow ``runs:/<id>/bundle`` / ``models:/...`` URI
    downloaded into a temporary directory. ConfigError when it is not a bundle."""
    if str(reference).startswith(MLFLOW_SCHEMES):
        import mlflow

        from pading.run import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri((config or ExperimentConfig()).tracking))
        target = tempfile.mkdtemp(prefix="pading-bundle-")
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(reference), dst_path=target))
    else:
        path = Path(reference).expanduser().resolve()
    if not (path / "classes.json").is_file():
        raise ConfigError(f"{reference}: not a model bundle (no classes.json in {path})")
    return path


def build_application(bundle_dir: str | Path, config: ServeConfig):
    """The Serve application over a local bundle directory, with autoscaling, resources
    and request limits from ``config``."""
    deployment = SegmentationDeployment.options(
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
    )
    return deployment.bind(str(bundle_dir), to_dict(config))


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
    config = load_config(config_path or bundle_dir / "config.yaml", overrides)
    return build_application(bundle_dir, config.serve)


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
    serve.run(build_application(bundle_path, settings), name=APP_NAME, route_prefix=settings.route_prefix)
    url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}/"
    logger.info("serving %s at %s (OpenAPI: %sdocs)", bundle_path, url, url)
    if blocking:
        block_until_interrupted()
    return url


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
    config = load_config(args.config or bundle_dir / "config.yaml", overrides)
    url = deploy(bundle_dir, config, blocking=False, num_cpus=args.num_cpus)
    print(f"PADing segmentation endpoint: {url}  (API docs: {url}docs; Ctrl-C to stop)", flush=True)
    if not args.no_block:
        block_until_interrupted()


if __name__ == "__main__":
    main()
