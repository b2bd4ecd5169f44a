"""MLflow tracking helpers (no Ray here: pipelines call these from the driver).

The tracking store is ``$MLFLOW_TRACKING_URI`` if set, else ``tracking.tracking_uri``
from the config. The pipelines set the latter, when it is empty, to the run's own store
:func:`default_tracking_uri`: ``<output>/mlruns/mlflow.db`` (SQLite) with artifacts under
``<output>/mlruns/artifacts``, so the record of a run lives with its outputs, on storage
every node sees, and outlives a ``ray job submit`` working directory. View it with
``mlflow ui --backend-store-uri sqlite:///<output>/mlruns/mlflow.db``. Without either
(a notebook), ``./mlruns/mlflow.db``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from pading.config import TrackingConfig
from pading.run.layout import RunLayout

logger = logging.getLogger(__name__)

DEFAULT_STORE_DIR = "mlruns"


def default_tracking_uri(output: str | Path) -> str:
    """The run's own store: ``sqlite:///<output>/mlruns/mlflow.db``."""
    return f"sqlite:///{RunLayout(Path(output).resolve()).mlruns / 'mlflow.db'}"


def _artifact_root(uri: str) -> Optional[Path]:
    """``<store dir>/artifacts`` for a local SQLite store, else None (the server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent / "artifacts"


def tracking_uri(config: TrackingConfig) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if config.tracking_uri:
        return config.tracking_uri
    store = Path(DEFAULT_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def setup(config: TrackingConfig):
    """Point MLflow at the store and select (creating if needed) the experiment.

    Returns the ``mlflow`` module so callers need not import it themselves."""
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "0")
    import mlflow

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    root = _artifact_root(uri)
    if root is not None:
        root.parent.mkdir(parents=True, exist_ok=True)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        mlflow.create_experiment(config.experiment, artifact_location=root.as_uri() if root is not None else None)
    mlflow.set_experiment(config.experiment)
    logger.info("MLflow store %s, experiment %r", uri, config.experiment)
    return mlflow


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        out[key] = text[:6000]
    return out


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    items = list(_clean_params(params).items())
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[start : start + 100]))


def _flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of ``metrics``; nested dicts become ``a.b`` keys."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any):
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix.replace(" ", "_")] = float(value)

    walk("", metrics)
    return flat


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the finite numeric values of ``metrics`` (nested dicts become ``a.b`` keys)."""
    import mlflow

    flat = _flat_metrics(metrics)
    if flat:
        mlflow.log_metrics(flat, step=step)


#: MLflow takes at most 1,000 metric values in one ``log_batch`` call.
METRICS_PER_BATCH = 1000


def log_metric_history(rows: Iterable[Mapping[str, Any]], step_key: str = "step") -> int:
    """Log per-step rows (e.g. a train loop's JSONL losses) to the active run; returns the
    number of rows. The values go in batches of :data:`METRICS_PER_BATCH`, not a call per
    step: the demo's 1,000 pretraining steps took 5.5 s to log one step at a time into the
    SQLite store, and 0.4-0.7 s batched (docs/performance.md, "Fixed costs taken out")."""
    import mlflow
    from mlflow.entities import Metric

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("log_metric_history needs an active MLflow run (tracking.run(...))")
    client = mlflow.tracking.MlflowClient()
    timestamp = int(time.time() * 1000)
    pending: list = []
    count = 0
    for row in rows:
        step = int(row.get(step_key, count))
        flat = _flat_metrics({k: v for k, v in row.items() if k != step_key})
        pending.extend(Metric(key, value, timestamp, step) for key, value in flat.items())
        count += 1
        while len(pending) >= METRICS_PER_BATCH:
            client.log_batch(active.info.run_id, metrics=pending[:METRICS_PER_BATCH], synchronous=True)
            del pending[:METRICS_PER_BATCH]
    if pending:
        client.log_batch(active.info.run_id, metrics=pending, synchronous=True)
    return count


@contextlib.contextmanager
def run(name: str, nested: bool = False, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """``with run("pretrain", nested=True) as active:`` — a (nested) MLflow run."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=nested, tags=dict(tags or {})) as active:
        yield active
