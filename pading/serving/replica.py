"""A model replica of the endpoint without Ray (docs/serving.md, "Two deployments"): the
bundle, the :class:`~pading.serving.service.SegmentationService` of the base vocabulary and
of named ones, per-item error isolation, a batch's requests grouped by vocabulary, and every
answer tagged with the replica that made it. pipelines/serve.py wraps it in a Serve
deployment (multiplexing by vocabulary, batching, health checks, the handle calls)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from typing import Any

import torch

from pading.bundle import Bundle
from pading.config import ServeConfig
from pading.errors import PadingError
from pading.serving.metrics import EndpointMetrics
from pading.serving.service import BusyError, SegmentationService, resolve_batching
from pading.serving.vocabularies import BASE, check_name, open_store

logger = logging.getLogger(__name__)

#: One image to segment: (image, task, output format, min_score).
Item = tuple
#: One batch entry: (the service of its vocabulary, its item).
Entry = tuple[SegmentationService, Item]


#: The vocabulary of the request that :meth:`Replica.call` is answering.
_request_vocabulary: contextvars.ContextVar[str] = contextvars.ContextVar("pading_request_vocabulary", default=BASE)


def timed_out(timeout: float | None, retry: float) -> BusyError:
    """The 503 of a request not answered within ``timeout`` seconds."""
    return BusyError(f"no answer within {timeout} s (serve.request_timeout_s for segmentation); retry later", retry)


class Replica:
    """A bundle loaded on this process's device (CUDA when ``config.num_gpus`` > 0 and there
    is one) and the services that answer from it. Every service reads and writes the shared
    vocabulary store (``store_spec``), so any replica answers with the newest version;
    ``metrics`` gets the vocabulary version and class count after each change. Its async
    methods are what the HTTP front calls (pipelines/serve.py's model deployment subclasses it
    and overrides :meth:`vocabulary_service` and :meth:`batched`)."""

    def __init__(self, *, bundle_dir: str, config: ServeConfig, store_spec: str, tracking_uri: str | None,
                 store_key: str, metrics: EndpointMetrics) -> None:
        self.config = config
        torch.set_num_threads(max(1, int(config.num_cpus)))
        device = "cuda" if config.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.trained = Bundle.load(bundle_dir, map_location=device)
        self.store = open_store(store_spec, tracking_uri, store_key)
        self.service = SegmentationService(self.trained, config, store=self.store)
        self.batching = resolve_batching(config.batching, device)
        self.metrics = metrics
        self.replica = f"{os.uname().nodename}:{os.getpid()}"
        self.publish(self.service)
        logger.info("model replica %s ready: %s on %s (%s), batching %s (serve.batching=%s), vocabularies in %s",
                    self.replica, bundle_dir, device, self.service.runtime, "on" if self.batching else "off",
                    config.batching, self.store.root)

    async def load_vocabulary(self, name: str) -> SegmentationService:
        """The service of the named vocabulary ``name`` (loaded from the store)."""
        return await asyncio.to_thread(SegmentationService, self.trained, self.config, store=self.store,
                                       vocabulary=name)

    def publish(self, service: SegmentationService) -> None:
        state = service.state
        self.metrics.vocabulary(service.vocabulary, state.version, state.bundle.table.num_classes)

    async def check_health(self) -> None:
        """A real forward pass; raises when the model is broken."""
        await asyncio.to_thread(self.service.health_check)

    def segment_items(self, service: SegmentationService, items: list[Item]) -> list:
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
                results.extend(self.segment_items(service, [item]))
            except PadingError as error:
                results.append(error)
        return results

    async def segment_batch(self, entries: list[Entry]) -> list:
        """entries: (service, item) pairs; each vocabulary's items are segmented together."""
        results: list = [None] * len(entries)
        groups: dict[int, list[int]] = {}
        for position, (service, _) in enumerate(entries):
            groups.setdefault(id(service), []).append(position)
        for positions in groups.values():
            service = entries[positions[0]][0]
            answers = await asyncio.to_thread(self.segment_items, service, [entries[k][1] for k in positions])
            for k, answer in zip(positions, answers):
                results[k] = answer
        return results

    def tag(self, result: dict) -> dict:
        return {**result, "replica": self.replica}

    async def vocabulary_service(self) -> SegmentationService:
        """The service of the request's vocabulary: here always the base one; a deployment that
        routes named vocabularies to replicas (pipelines/serve.py) overrides it."""
        return self.service

    async def batched(self, entry: Entry) -> Any:
        """One entry's answer from :meth:`segment_batch`: here a batch of one; a deployment that
        queues requests into batches (pipelines/serve.py) overrides it."""
        (result,) = await self.segment_batch([entry])
        return result

    async def segment(self, data: bytes, task: str, output_format: str, min_score: float) -> dict:
        """Decode ``data`` and segment it (in a batch when batching); raises the library's
        error for bad input."""
        service = await self.vocabulary_service()
        if self.batching:
            image = await asyncio.to_thread(service.decode, data)
            result = await self.batched((service, (image, task, output_format, min_score)))
        else:  # decode and segment in one trip to a worker thread
            (result,) = await asyncio.to_thread(
                lambda: self.segment_items(service, [(service.decode(data), task, output_format, min_score)]))
        if isinstance(result, Exception):
            raise result
        return self.tag(result)

    async def call(self, method: str, *args, timeout: float | None = None, vocabulary: str = BASE) -> Any:
        """``self.<method>(*args)`` for ``vocabulary`` (:meth:`request_vocabulary` while it runs),
        given up with a 503 after ``timeout`` seconds (None: no limit): the call of an HTTP front
        in this replica's own process (pipelines/serve.py's ``serve.ingress=replica``)."""
        token = _request_vocabulary.set(vocabulary if vocabulary == BASE else check_name(vocabulary))
        try:
            async with asyncio.timeout(timeout):
                return await getattr(self, method)(*args)
        except TimeoutError:
            raise timed_out(timeout, self.config.retry_after_s) from None
        finally:
            _request_vocabulary.reset(token)

    @staticmethod
    def request_vocabulary() -> str:
        """The vocabulary of the :meth:`call` being answered (base outside one)."""
        return _request_vocabulary.get()

    async def classes(self) -> dict:
        service = await self.vocabulary_service()
        result = await asyncio.to_thread(service.classes)
        self.publish(service)
        return self.tag(result)

    async def add_classes(self, names: list[str], isthing) -> dict:
        service = await self.vocabulary_service()
        result = await asyncio.to_thread(service.add_classes, names, isthing)
        self.publish(service)
        return self.tag(result)

    async def delete_class(self, name: str) -> dict:
        service = await self.vocabulary_service()
        result = await asyncio.to_thread(service.delete_class, name)
        self.publish(service)
        return self.tag(result)

    async def vocabularies(self) -> dict:
        return self.tag(await asyncio.to_thread(self.service.vocabularies))

    async def create_vocabulary(self, name: str, add: list[str], isthing, only) -> dict:
        return self.tag(await asyncio.to_thread(self.service.create_vocabulary, name, add, isthing, only))

    async def delete_vocabulary(self, name: str) -> dict:
        return self.tag(await asyncio.to_thread(self.service.delete_vocabulary, name))

    async def info(self) -> dict:
        state = await asyncio.to_thread(self.service.sync)  # store I/O, and it may wait for a re-fit's lock
        return {"vocabulary_version": state.version, "num_classes": state.bundle.table.num_classes,
                "device": str(state.bundle.device), "batching": self.batching, "replica": self.replica,
                "replica_pid": os.getpid(), "vocabulary_store": str(self.store.root)}
