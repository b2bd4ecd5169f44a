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
unless serve.host says otherwise.

Production behaviour (docs/serving.md; ``serve`` settings): 503 + ``Retry-After`` under backpressure
and timeouts, uploads cut off at ``max_body_bytes``, health checks that replace a broken replica,
durable vocabularies, ``ray.serve.metrics``. Two deployments, an HTTP front and the model
replicas (``serve.ingress=replica``: the model replicas alone, taking HTTP themselves). The
Ray-free logic is in pading.serving (``http``: the routes; ``replica``: a model replica;
``launch``: options and arguments); this file is the Ray wiring.
"""

import asyncio
import logging
import os
from pathlib import Path

from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import BackpressureConfig

from pading.bundle import CONFIG_FILE
from pading.config import ExperimentConfig, ServeConfig, from_dict, load_config, to_dict
from pading.errors import ConfigError, PadingError
from pading.serving import http, launch
from pading.serving.metrics import EndpointMetrics
from pading.serving.replica import Replica, timed_out
from pading.serving.service import BusyError, SegmentationService
from pading.serving.vocabularies import BASE, check_name
from pipelines import common
from pipelines.common import resolve_bundle

logger = logging.getLogger("pipelines.serve")

APP_NAME = "pading"
PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class _ModelReplica(Replica):
    """A model replica (:class:`~pading.serving.replica.Replica`, whose methods the HTTP front
    calls through a handle) plus what Serve adds: named vocabularies multiplexed by name (at
    most ``serve.max_vocabularies_per_replica`` per replica, least recently used out), the
    batching queue, and ``check_health`` (a real forward pass) every ``serve.health_check_period_s``."""

    def __init__(self, bundle_dir: str, serve_config: dict, store_spec: str, tracking_uri: str | None = None,
                 store_key_: str = "bundle"):
        common.setup_logging()
        config: ServeConfig = from_dict(ServeConfig, serve_config, prefix="serve")
        self.batched.set_max_batch_size(config.max_batch_size)
        self.batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        super().__init__(bundle_dir=bundle_dir, config=config, store_spec=store_spec, tracking_uri=tracking_uri,
                         store_key=store_key_, metrics=EndpointMetrics(backend=serve_metrics))

        async def load_vocabulary(name: str) -> SegmentationService:
            return await self.load_vocabulary(name)

        self._load_vocabulary = serve.multiplexed(max_num_models_per_replica=config.max_vocabularies_per_replica)(
            load_vocabulary)

    def vocabulary_name(self) -> str:
        """The request's vocabulary: the multiplexed model id the front called with (none: base)."""
        return serve.get_multiplexed_model_id()

    async def vocabulary_service(self) -> SegmentationService:
        """The service of the request's vocabulary."""
        name = self.vocabulary_name()
        return self.service if not name or name == BASE else await self._load_vocabulary(name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def batched(self, entries: list) -> list:
        return await self.segment_batch(entries)


#: The model deployment behind the HTTP front (``serve.ingress=front``).
ModelDeployment = serve.deployment(name="PadingModel")(_ModelReplica)


async def _replica_front() -> http.HttpFront:
    """The front of the replica serving the request. A coroutine, so that FastAPI runs it on the
    event loop: a plain function would go to AnyIO's worker threads, and under Serve those are
    tied to the request's task, so every request started a thread of its own (docs/performance.md,
    "A thread per request")."""
    return serve.get_replica_context().servable_object.front


# the routes of pading.serving.http get this replica's front (set before serve.ingress copies the app)
http.api.dependency_overrides[http.current_front] = _replica_front


@serve.deployment(name="PadingSegmenter")
@serve.ingress(http.api)
class SegmentationDeployment:
    """The HTTP front (the routes of :mod:`pading.serving.http`): reads and size-checks requests,
    forwards them to the model replicas (:class:`ModelDeployment`) and turns their absence
    (killed, restarting, backlogged, too slow) into 503 + Retry-After, so clients never see a
    500 or a hang for it."""

    def __init__(self, model, serve_config: dict):
        common.setup_logging()
        self.config: ServeConfig = from_dict(ServeConfig, serve_config, prefix="serve")
        self.model = model
        self.front = http.HttpFront(call=self._call, config=self.config, page=PAGE,
                                    metrics=EndpointMetrics(backend=serve_metrics, vocabulary=False))

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
            raise timed_out(timeout, retry) from None
        except BackPressureError:
            raise BusyError("every model replica is busy and the queue (serve.max_queued_requests) is full; "
                            "retry later", retry) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as error:
            logger.warning("model replica lost during a request: %s", type(error).__name__)
            raise BusyError("the model replica serving this request stopped; it is being replaced, retry later",
                            retry) from None
        except Exception as error:
            # Ray re-raises a model replica's error as RayTaskError(<its class>), an instance of both:
            # answer with the library's error itself, not the wrapper's name and the replica's traceback
            cause = getattr(error, "cause", None)
            if not isinstance(cause, PadingError):
                raise
            raise cause from None


@serve.deployment(name="PadingModel")
@serve.ingress(http.api)
class ModelIngressDeployment(_ModelReplica):
    """``serve.ingress=replica``: the model replicas take HTTP themselves (the routes of
    :mod:`pading.serving.http`), with no front deployment and no hop to reach a model: about
    4 ms less per request (docs/performance.md, "The model replicas as the ingress"). What the
    front gave and this does not (docs/serving.md, "Two deployments"): a replica that dies
    mid-request leaves its client the proxy's 500, not a 503 with Retry-After; a named
    vocabulary's requests go to any replica (each loads it from the store) rather than to
    those that have it loaded. Backpressure (503 + Retry-After), timeouts and health checks
    are the same."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.front = http.HttpFront(call=self.call, config=self.config, page=PAGE, metrics=self.metrics)

    def vocabulary_name(self) -> str:
        return self.request_vocabulary()


#: The environment of the Serve instance that :func:`deploy` started in this process (the proxy's,
#: :func:`pading.serving.launch.proxy_env`): applications added to it later start their replicas with it too.
_serve_env: dict[str, str] = {}


def build_application(bundle_dir: str | Path, config: ServeConfig, reference: str | None = None,
                      tracking_uri: str | None = None, env: dict[str, str] | None = None):
    """The Serve application over a local bundle directory: the HTTP front and the model deployment
    (``serve.ingress=replica``: the model deployment alone, taking HTTP itself),
    with the options and arguments of :mod:`pading.serving.launch` (``reference``: the bundle as
    given, a directory or an MLflow URI, which picks the default vocabulary store; ``env``: the
    replicas' proxy environment, by default that of the Serve instance :func:`deploy` started)."""
    env = _serve_env if env is None else env
    busy = BackpressureConfig(status_code=503, retry_after_s=config.retry_after_s)
    arguments = launch.model_arguments(bundle_dir, config, reference=reference, tracking_uri=tracking_uri)
    if config.ingress == "replica":
        return ModelIngressDeployment.options(**launch.model_options(config, env), backpressure_config=busy).bind(
            *arguments)
    model = ModelDeployment.options(**launch.model_options(config, env))
    front = SegmentationDeployment.options(**launch.front_options(config, env), backpressure_config=busy)
    return front.bind(model.bind(*arguments), to_dict(config))


def _load(reference: str, config_path: str | None, overrides: list[str]) -> tuple[Path, ExperimentConfig]:
    """The bundle directory of ``reference`` and the config (``config_path``, else the bundle's own)."""
    bundle_dir = resolve_bundle(reference, load_config(config_path) if config_path else None)
    return bundle_dir, load_config(config_path or bundle_dir / CONFIG_FILE, overrides)


def app(args: dict):
    """Application builder for ``serve run pipelines.serve:app bundle=PATH [config=YAML] [KEY=VALUE ...]``
    (:func:`pading.serving.launch.app_arguments`)."""
    reference, config_path, overrides = launch.app_arguments(args)
    bundle_dir, config = _load(reference, config_path, overrides)
    if config.serve.proxy == "haproxy" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        raise ConfigError("serve.proxy=haproxy under `serve run`: Serve's controller is started before this "
                          "application, so give the whole Ray the switch: RAY_SERVE_ENABLE_HA_PROXY=1 serve run ... "
                          "(or python pipelines/serve.py --set serve.proxy=haproxy, which sets it)")
    return build_application(bundle_dir, config.serve, reference, launch.bundle_tracking_uri(config, reference))


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
    env = start_serve(settings)
    application = build_application(bundle_path, settings, str(bundle_dir),
                                    launch.bundle_tracking_uri(config, str(bundle_dir)), env=env)
    serve.run(application, name=APP_NAME, route_prefix=settings.route_prefix)
    url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}/"
    logger.info("serving %s at %s (OpenAPI: %sdocs; proxy: %s)", bundle_path, url, url,
                "HAProxy" if env else "Ray Serve's")
    if blocking:
        block_until_interrupted()
    return url


def start_serve(settings: ServeConfig) -> dict[str, str]:
    """Start Serve on ``serve.host:port`` behind the proxy that ``serve.proxy`` picks; returns the
    environment its replicas start with. A Serve instance that already runs keeps its proxy
    (and the environment this process gave it, if this process started it)."""
    import ray

    global _serve_env
    if serve_running():
        serve.start(http_options={"host": settings.host, "port": settings.port})
        return _serve_env
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    env = launch.proxy_env(settings, nodes, own_ray=common.owns_local_ray())
    if nodes == 1:
        launch.check_port_free(settings.host, settings.port)
    options = {"controller_options": {"runtime_env": {"env_vars": env}}} if env else {}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port}, **options)
    except Exception as error:  # Ray raises its task error when HAProxy does not come up
        if not env or settings.proxy != "auto":
            raise
        logger.warning("HAProxy did not start (%s); serving behind Ray Serve's own proxy instead "
                       "(serve.proxy=ray; docs/serving.md, 'The proxy')", str(error).strip().splitlines()[-1])
        serve.shutdown()
        env = {}
        serve.start(http_options={"host": settings.host, "port": settings.port})
    _serve_env = env
    return env


def serve_running() -> bool:
    """Whether Serve already runs on this Ray (its controller, a named actor in namespace "serve")."""
    import ray

    return any(actor.get("namespace") == "serve" and "CONTROLLER" in actor.get("name", "")
               for actor in ray.util.list_named_actors(all_namespaces=True))


def block_until_interrupted() -> None:
    """Sleep until Ctrl-C or SIGTERM (e.g. `kill`, a container stop), then shut Serve down."""
    launch.wait_until_interrupted()
    serve.shutdown()


def main() -> None:
    common.setup_logging()
    args = launch.parse_command_line(__doc__)
    bundle_dir, config = _load(args.bundle, args.config, args.overrides)
    url = deploy(bundle_dir, config, blocking=False, num_cpus=args.num_cpus)
    print(f"PADing segmentation endpoint: {url}  (API docs: {url}docs; Ctrl-C to stop)", flush=True)
    if not args.no_block:
        block_until_interrupted()


if __name__ == "__main__":
    main()
