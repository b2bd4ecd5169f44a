"""The endpoint's application metrics (docs/serving.md, "Metrics"): their names, tags and
what is counted, over any backend with ``Counter``, ``Histogram`` and ``Gauge`` classes.
pipelines/serve.py passes ``ray.serve.metrics`` (Ray exports the metrics on its Prometheus
endpoint with a ``ray_`` prefix); this module never imports Ray."""

from __future__ import annotations

from typing import Any, Protocol

from pading.serving.service import TASK_CHOICES, segment_counts
from pading.serving.vocabularies import BASE

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
#: The ``vocabulary`` tag of a failed request for a vocabulary not served here before (never a vocabulary's name).
OTHER = "(other)"


class MetricsBackend(Protocol):
    """What :class:`EndpointMetrics` needs: metric classes called as
    ``Counter(name, description=..., tag_keys=...)`` (``Histogram`` also with ``boundaries``)."""

    Counter: Any
    Histogram: Any
    Gauge: Any


class EndpointMetrics:
    """Application metrics. Requests and segments are counted by the HTTP front, the
    vocabulary (``vocabulary=True``) by each model replica."""

    def __init__(self, *, backend: MetricsBackend, vocabulary: bool = True) -> None:
        self._served: set[str] = {BASE}
        self.requests = backend.Counter(
            "pading_requests", description="POST /v1/segment requests by task, HTTP status and vocabulary",
            tag_keys=("task", "status", "vocabulary"))
        self.latency = backend.Histogram(
            "pading_request_latency_ms", description="POST /v1/segment latency in the replica (ms)",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("task", "vocabulary"))
        self.segments = backend.Counter(
            "pading_segments", description="segments returned, by kind of class: seen, unseen or added at run time",
            tag_keys=("kind", "vocabulary"))
        if vocabulary:
            self.vocabulary_version = backend.Gauge(
                "pading_vocabulary_version", description="vocabulary version served (+1 per change)",
                tag_keys=("vocabulary",))
            self.classes = backend.Gauge("pading_classes", description="classes in the vocabulary",
                                         tag_keys=("vocabulary",))

    def request(self, task: str, status: int, seconds: float, vocabulary: str = BASE) -> None:
        """Count a request. Tag values stay bounded whatever clients send: a task that is not one
        of the tasks is ``invalid``; a vocabulary that has not answered a request here yet (a
        typo, a random name, one deleted before it was used) is :data:`OTHER`."""
        task = task if task in TASK_CHOICES else "invalid"
        if status == 200:
            self._served.add(vocabulary)  # it exists: at most the store's vocabularies
        elif vocabulary != BASE and vocabulary not in self._served:
            vocabulary = OTHER
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
