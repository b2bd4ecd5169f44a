"""The serving logic behind the HTTP endpoint (pipelines/serve.py), without Ray or HTTP.

:class:`SegmentationService` wraps a :class:`~pading.bundle.Bundle`:

- :func:`decode_image` turns request bytes into an (H, W, 3) uint8 RGB array (JPEG, PNG,
  WebP; any mode), refusing empty bodies, non-images, truncated files and images above
  the pixel limit with errors that :func:`http_status` maps to 4xx codes.
- :meth:`SegmentationService.segment` runs the segmenter once per batch and returns, per
  image, JSON-able segments (class id/name/thing/unseen/added, score, area, bbox, COCO
  RLE mask) or an id PNG.
- :meth:`SegmentationService.add_classes` / :meth:`~SegmentationService.delete_class`
  change the vocabulary at run time: new names are encoded, the classifier is expanded
  and re-fitted on the bundle's reference embeddings plus generator features of the
  unseen and new classes, and a *new* bundle is swapped in under a lock. A request holds
  the state it started with, so it is never served by a half-updated model.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch import nn

from pading.bundle import Bundle
from pading.classes import TASKS, ClassInfo, ClassTable, clean_name
from pading.config import ServeConfig
from pading.data import to_rgb
from pading.errors import (
    ConfigError,
    CorruptImageError,
    DataError,
    MissingWeightsError,
    PadingError,
    UnknownClassError,
)
from pading.evaluation.inference import panoptic_to_rgb
from pading.evaluation.predict import postprocess
from pading.model.classifier import (
    Classifier,
    ProjectionClassifier,
    class_weights,
    expand_classifier,
)
from pading.model.runtime import use_runtime
from pading.model.segmenter import OriginalSizeMaskLogits, prepare_batch
from pading.model.semantics import encode_with_config
from pading.serving.vocabularies import (
    BASE,
    Change,
    StoreUnavailableError,
    UnknownVocabularyError,
    VersionTakenError,
    VocabularyStore,
    appended_classifier,
    check_name,
    class_infos,
)
from pading.training.refit import fit_added_classes

logger = logging.getLogger(__name__)

TASK_CHOICES = TASKS + ("all",)
#: Attempts at committing a vocabulary change while other replicas keep committing theirs first.
MAX_COMMIT_ATTEMPTS = 8
#: The longest class name accepted (after collapsing whitespace); it is stored and repeated in answers.
MAX_NAME_CHARS = 200
OUTPUT_FORMATS = ("json", "png")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_EIGHT_BIT_MAX = 255
_SIXTEEN_BIT_MAX = 65535


class RequestError(DataError):
    """A request parameter or body that is invalid (HTTP 400)."""


class ImageTooLargeError(DataError):
    """An image or body above the configured limits (HTTP 413)."""


class TruncatedImageError(CorruptImageError):
    """An image whose header is valid but whose data ends early or is corrupt (HTTP 422)."""


class UnprocessableError(DataError):
    """A valid request the model cannot carry out (HTTP 422): e.g. a name without a vector."""


class BusyError(PadingError):
    """The service cannot answer in time (request timeout): HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnhealthyError(RuntimeError):
    """The model's health check failed: its forward pass errs or gives non-finite output."""


class ClassConflictError(DataError):
    """A class that already exists, or that may not be removed (HTTP 409)."""


#: First match wins: subclasses before their bases.
_STATUS_BY_ERROR = ((BusyError, 503), (StoreUnavailableError, 503), (ImageTooLargeError, 413), (TruncatedImageError, 422), (UnprocessableError, 422),
                    (ClassConflictError, 409), (UnknownClassError, 404), (UnknownVocabularyError, 404), (DataError, 400),
                    (ConfigError, 422))


def http_status(error: Exception) -> int:
    """The HTTP status of a library error (500 for anything that is not bad input)."""
    for error_type, status in _STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return status
    return 500


def decode_image(data: bytes, *, max_pixels: int, source: str = "request body") -> np.ndarray:
    """JPEG/PNG/WebP bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises RequestError (empty), CorruptImageError (not a JPEG/PNG/WebP image),
    ImageTooLargeError (more than ``max_pixels`` pixels; checked before decoding the
    pixels) or TruncatedImageError (the data ends early or is corrupt)."""
    if not data:
        raise RequestError(source, "empty body: send a JPEG, PNG or WebP image")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise CorruptImageError(source, f"not a JPEG, PNG or WebP image ({len(data)} bytes)") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(source, f"image too large ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise CorruptImageError(source, f"cannot read the image header ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(source, f"image is {width}x{height} = {width * height} pixels, above the limit of "
                                 f"{max_pixels}")
    if width == 0 or height == 0:
        raise RequestError(source, f"image has no pixels ({width}x{height})")
    try:
        image.load()  # full decode: truncated data fails here
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise TruncatedImageError(source, f"{image.format} image is truncated or corrupt ({err})") from None
    return to_rgb(image)


def resolve_batching(setting: str, device: torch.device | str) -> bool:
    """``serve.batching``: ``on``/``off``, or ``auto`` = batch on a GPU only. On CPU the
    unbatched replica measured faster at every concurrency (docs/serving.md, "Load test"): requests run
    side by side on threads, while a batch waits for its slowest image."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def segment_counts(result: dict) -> dict[str, int]:
    """Segments of one :meth:`SegmentationService.segment` result by kind of class:
    ``{"seen", "unseen", "added"}`` (an added class counts as added only)."""
    counts = {"seen": 0, "unseen": 0, "added": 0}
    for task in TASKS:
        for entry in result.get(task, ()):
            kind = "added" if entry.get("added") else "unseen" if entry.get("unseen") else "seen"
            counts[kind] += 1
    return counts


def check_request(task: str, output_format: str = "json") -> tuple[str, ...]:
    """The tasks ``task`` names; RequestError for an unknown task or format, or for
    ``format=png`` with more than one task."""
    if task not in TASK_CHOICES:
        raise RequestError("task", f"unknown task {task!r} (expected one of {', '.join(TASK_CHOICES)})")
    if output_format not in OUTPUT_FORMATS:
        raise RequestError("format", f"unknown format {output_format!r} (expected one of {', '.join(OUTPUT_FORMATS)})")
    if output_format == "png" and task == "all":
        raise RequestError("format", "format=png gives one id image: pick a single task, not 'all'")
    return TASKS if task == "all" else (task,)


def _class_fields(info: ClassInfo) -> dict:
    return {"class_id": info.id, "class_name": info.name, "isthing": info.isthing, "unseen": info.unseen,
            "added": info.added}


def _mask_fields(mask: np.ndarray, with_rle: bool) -> dict:
    """Area, XYWH bbox and (``with_rle``) the COCO RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(mask.astype(np.uint8, order="F"))  # one copy: Fortran order, as RLE needs
    fields = {"area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}
    if with_rle:
        fields["mask"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return fields


def _png_bytes(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB or (H, W) non-negative ids (8-bit when they fit, else 16-bit) -> PNG."""
    if array.ndim == 2:
        peak = int(array.max()) if array.size else 0
        if peak > _SIXTEEN_BIT_MAX:
            raise DataError("id png", f"ids up to {peak} do not fit a 16-bit PNG")
        array = array.astype(np.uint8 if peak <= _EIGHT_BIT_MAX else np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class ServiceState:
    """What one request is served by: a bundle, its vocabulary version, the class ids a named
    vocabulary shows (None: every class of the bundle), the next id for a run-time class and
    whether the named vocabulary was deleted."""

    bundle: Bundle
    version: int
    visible: frozenset | None = None
    next_id: int = 0
    deleted: bool = False

    def shows(self, class_id: int) -> bool:
        return self.visible is None or int(class_id) in self.visible


EncodeFn = Callable[[Sequence[str]], np.ndarray]


class SegmentationService:
    """Segmentation and vocabulary changes for one vocabulary of one bundle.

    Args:
        bundle: the trained model (on the device it should run on): version 0 of every vocabulary.
        config: request limits, re-fit and store settings (default: ``bundle.config.serve``).
        encode_fn: class names (M,) -> (M, S) semantic embeddings; default: the bundle's
            encoder (:func:`pading.model.semantics.encode_with_config`).
        store: where vocabulary changes are kept (:class:`~pading.serving.vocabularies.VocabularyStore`).
            With a store, every change is committed there before it is acknowledged, and the
            service catches up with the store's newest version before it answers (at most
            ``serve.vocabulary_refresh_s`` old). Without one, changes live in this object only.
        vocabulary: the vocabulary this service serves (``base``: the default).
    """

    def __init__(self, bundle: Bundle, config: ServeConfig | None = None, *, encode_fn: EncodeFn | None = None,
                 store: VocabularyStore | None = None, vocabulary: str = BASE, images: int | None = None):
        self.config = config or bundle.config.serve
        self._encode_fn = encode_fn
        self._trained = bundle
        self._store = store
        self.vocabulary = check_name(vocabulary)
        # the segmenter's forward pass on ONNX Runtime (CPU) or torch; services over one bundle share it;
        # ``images``: how many this service will segment, when known (a batch job's actor), else no end
        self.runtime = use_runtime(bundle.segmenter, self.config.runtime, bundle.config.data.image_size, images)
        self._state = ServiceState(bundle=bundle, version=0, next_id=max(bundle.table.ids) + 1)
        self._update_lock = threading.RLock()
        self._checked_at = -math.inf
        if store is None and vocabulary != BASE:
            raise UnknownVocabularyError(vocabulary, "named vocabularies need a vocabulary store")
        if store is not None:
            self.sync(force=True)

    # ---- state ----------------------------------------------------------------------
    @property
    def state(self) -> ServiceState:
        """The current state (no store check); read once per request and keep using it."""
        return self._state

    bundle = property(lambda self: self._state.bundle, doc="The current bundle.")

    def sync(self, force: bool = False) -> ServiceState:
        """Catch up with the store's newest version of this vocabulary (checked at most every
        ``serve.vocabulary_refresh_s``; always when ``force``) and return the state to serve.
        UnknownVocabularyError for a named vocabulary that does not exist (or was deleted)."""
        if self._store is not None:
            now = time.monotonic()
            if force or now - self._checked_at >= self.config.vocabulary_refresh_s:
                latest = self._store.latest(self.vocabulary, known=self._state.version)
                self._checked_at = now
                if latest > self._state.version:
                    with self._update_lock:
                        state = self._state
                        if state.version == 0:  # starting: from the newest snapshot, not from version 1
                            state = self._from_snapshot(state, latest)
                        self._state = self._apply_all(state, self._store.changes(
                            self.vocabulary, after=state.version, upto=max(latest, state.version)))
        state = self._state
        if self.vocabulary != BASE and (state.version == 0 or state.deleted):
            raise UnknownVocabularyError(self.vocabulary, "no such vocabulary (GET /v1/vocabularies lists them)")
        return state

    def _from_snapshot(self, state: ServiceState, latest: int) -> ServiceState:
        """``state`` (version 0) moved to the store's newest snapshot of this vocabulary not newer
        than ``latest``, or left as it is when there is none."""
        version = self._store.snapshot_version(self.vocabulary, latest)
        if version <= 1:
            return state
        try:
            change = self._store.snapshot(self.vocabulary, version)
        except StoreUnavailableError as err:  # e.g. pruned after a newer one came: the whole chain gives the same
            logger.info("vocabulary %r: snapshot %d not read (%s); replaying from version 1", self.vocabulary,
                        version, err)
            return state
        if change.kind != "snapshot":
            return state
        logger.info("vocabulary %r: starting from the snapshot at version %d of %d", self.vocabulary, version, latest)
        return self._apply(dataclasses.replace(state, version=version - 1), dataclasses.replace(change, kind="create"))

    def _snapshot(self, state: ServiceState) -> Change:
        """The ``snapshot`` change holding ``state`` whole: the trained classes it shows and every
        run-time class with its vector and classifier rows (the trained classes are the table's
        first rows; run-time classes are appended after them and only they are removed)."""
        trained, bundle = self._trained, state.bundle
        first = trained.table.num_classes
        if bundle.table.ids[:first] != trained.table.ids:
            raise PadingError(f"vocabulary {self.vocabulary!r}: the trained classes are not the table's first rows")
        only = None if state.visible is None else [c.name for c in trained.table if c.id in state.visible]
        records = bundle.table.to_records()[first:]
        return Change("snapshot", only=only, classes=records, next_id=state.next_id,
                      semantics=np.asarray(bundle.class_semantics, np.float32)[first:],
                      **_added_rows(bundle.classifier, first, len(records)))

    def _maybe_snapshot(self, state: ServiceState) -> None:
        """Every ``serve.vocabulary_snapshot_every`` versions, commit a snapshot on top of
        ``state`` (just committed by this replica). Best effort: when another replica committed
        first or the store fails, the next multiple tries again."""
        every = self.config.vocabulary_snapshot_every
        if self._store is None or not self._store.snapshots or not every or state.version % every:
            return
        started = time.perf_counter()
        try:
            change = self._store.commit(self.vocabulary, state.version, self._snapshot(state))
        except Exception as err:  # noqa: BLE001 - the change is committed: a failed snapshot must not fail it
            logger.warning("vocabulary %r: no snapshot after version %d (%s: %s)", self.vocabulary, state.version,
                           type(err).__name__, err)
            return
        self._state = dataclasses.replace(state, version=change.version)  # the same classes, one version on
        logger.info("vocabulary %r: snapshot at version %d (%d run-time classes) in %.2f s", self.vocabulary,
                    change.version, len(change.classes), time.perf_counter() - started)

    def _apply_all(self, state: ServiceState, changes: Sequence[Change]) -> ServiceState:
        """The state after ``changes``, in order. Consecutive additions are applied as one: the
        classes, vectors and classifier rows of a run of N ``add`` changes are appended in one
        concatenation, not N (each copies the whole classifier), so replaying a chain of
        classes added one at a time costs time linear in its length, not quadratic; the result
        is the same, row for row."""
        run: list[Change] = []

        def flush(state: ServiceState) -> ServiceState:
            if len(run) <= 1:
                state = self._apply(state, run[0]) if run else state
                run.clear()
                return state
            for k, change in enumerate(run):
                if change.version != state.version + 1 + k:
                    raise StoreUnavailableError(f"vocabulary {self.vocabulary!r}: version {change.version} follows "
                                                f"{state.version + k}; the store's chain has a gap")
            rows = [c.weight for c in run]
            merged = Change("add", classes=[r for c in run for r in c.classes], version=state.version + 1,
                            semantics=np.concatenate([np.asarray(c.semantics, np.float32) for c in run], axis=0),
                            weight=None if any(w is None for w in rows) else np.concatenate(rows, axis=0),
                            bias=None if any(c.bias is None for c in run) else np.concatenate([c.bias for c in run]))
            state = dataclasses.replace(self._apply(state, merged), version=run[-1].version)
            run.clear()
            return state

        for change in changes:
            if change.kind == "add" and change.classes:
                run.append(change)
                continue
            state = flush(state)
            state = self._apply(state, change)
        return flush(state)

    def _apply(self, state: ServiceState, change: Change) -> ServiceState:
        """The state after ``change`` (no fitting: added classes bring their classifier rows)."""
        if change.version != state.version + 1:
            raise StoreUnavailableError(f"vocabulary {self.vocabulary!r}: version {change.version} follows "
                                        f"{state.version}; the store's chain has a gap")
        if change.kind == "delete":
            return ServiceState(bundle=self._trained, version=change.version, next_id=state.next_id, deleted=True)
        if change.kind == "snapshot":  # replaying past it: it holds the state before it (_from_snapshot starts on one)
            return dataclasses.replace(state, version=change.version, next_id=max(state.next_id, change.next_id or 0))
        if change.kind == "create":  # from the trained classes again
            trained = self._trained
            visible = None
            if change.only is not None:
                visible = frozenset(trained.table[trained.table.index_of_name(name)].id for name in change.only)
            state = ServiceState(bundle=trained, version=state.version, visible=visible,
                                 next_id=max(state.next_id, max(trained.table.ids) + 1, change.next_id or 0))
        bundle, visible = state.bundle, state.visible
        if change.kind == "remove":
            for name in change.removed:
                index = bundle.table.index_of_name(name)
                keep = [i for i in range(bundle.table.num_classes) if i != index]
                semantics = np.asarray(bundle.class_semantics, np.float32)[keep]
                removed_id = bundle.table[index].id
                bundle = bundle.with_classifier(bundle.table.without(bundle.table[index].name), semantics,
                                                _drop_class_row(bundle.classifier, index))
                visible = None if visible is None else visible - {removed_id}
        elif change.classes:  # create or add: append the stored classes and rows
            infos = class_infos(change.classes)
            semantics = np.concatenate([np.asarray(bundle.class_semantics, np.float32), change.semantics], axis=0)
            classifier = appended_classifier(bundle.classifier, change.weight, change.bias, change.semantics)
            bundle = bundle.with_classifier(bundle.table.with_classes(infos), semantics, classifier)
            visible = None if visible is None else visible | {i.id for i in infos}
        bundle.segmenter.eval()
        added_ids = [int(r["id"]) for r in change.classes]
        return ServiceState(bundle=bundle, version=change.version, visible=visible,
                            next_id=max([state.next_id] + [i + 1 for i in added_ids]))

    def decode(self, data: bytes, source: str = "request body") -> np.ndarray:
        return decode_image(data, max_pixels=self.config.max_image_pixels, source=source)

    @torch.no_grad()
    def health_check(self, size: int = 32) -> None:
        """One real forward pass and post-processing on a small synthetic image; raises
        :class:`UnhealthyError` when it fails or the logits are not finite (e.g. corrupted
        weights), so the endpoint's replica is replaced (pipelines/serve.py)."""
        rows, cols = np.mgrid[0:size, 0:size]
        image = np.stack([rows * 255 // size, cols * 255 // size, np.full_like(rows, 128)], -1).astype(np.uint8)
        bundle = self._state.bundle
        try:
            batch = prepare_batch([image], bundle.config.data.image_size)
            output = bundle.segmenter(batch["pixel_values"].to(bundle.device))
            finite = bool(torch.isfinite(output.mask_logits).all() and torch.isfinite(output.class_logits).all())
            if finite:  # the state this replica has: a store it cannot read now does not make it unhealthy
                self.segment([image], "all", state=self._state)
        except Exception as err:
            raise UnhealthyError(f"health check forward pass failed: {type(err).__name__}: {err}") from err
        if not finite:
            raise UnhealthyError("health check forward pass gave non-finite logits (corrupted weights?)")

    def classes(self) -> dict:
        """``{"vocabulary", "vocabulary_version", "num_classes", "classes": [{index, id, name,
        isthing, unseen, added}, ...]}`` (a named vocabulary's classes only)."""
        state = self.sync()
        records = [r for r in state.bundle.table.to_records() if state.shows(r["id"])]
        return {"vocabulary": self.vocabulary, "vocabulary_version": state.version, "num_classes": len(records),
                "classes": records}

    # ---- segmentation ---------------------------------------------------------------
    @torch.no_grad()
    def segment(
        self,
        images: Sequence[np.ndarray],
        task: str | Sequence[str] = "panoptic",
        output_format: str | Sequence[str] = "json",
        *,
        min_score: float | Sequence[float] = 0.0,
        state: ServiceState | None = None,
    ) -> list[dict]:
        """Segment a batch of (H, W, 3) uint8 RGB images with one segmenter pass.

        ``task``, ``output_format`` and ``min_score`` are one value for all images or one
        per image. Returns per image ``{"width", "height", "task", "vocabulary_version",
        <task>: [...]}``; panoptic/instance entries are segments with ``id``, class fields,
        ``score``, ``area``, ``bbox`` and ``mask`` (COCO RLE), semantic entries one per
        class present. With ``format=png`` the masks are left out and ``png`` holds an id
        image: panoptic = COCO RGB segment ids, instance = instance ids (0 = none),
        semantic = class ids.
        """
        count = len(images)
        tasks, formats, scores = (
            [value] * count if isinstance(value, (str, int, float)) else list(value)
            for value in (task, output_format, min_score))
        if not (len(tasks) == len(formats) == len(scores) == count):
            raise RequestError("segment", f"{count} images but {len(tasks)} tasks, {len(formats)} formats")
        wanted = [check_request(t, f) for t, f in zip(tasks, formats)]
        state = state or self.sync()
        if count == 0:
            return []
        bundle = state.bundle
        batch = prepare_batch(list(images), bundle.config.data.image_size)
        output = bundle.segmenter(batch["pixel_values"].to(bundle.device))

        @torch.no_grad()  # grad mode is per thread
        def one_image(i: int) -> dict:
            meta = batch["meta"][i]
            mask_logits = OriginalSizeMaskLogits(output.mask_logits[i], meta)  # (Q, H, W), resized as tasks ask
            class_logits = output.class_logits[i]  # (Q, C+1)
            result = {"height": int(meta["original_size"][0]), "width": int(meta["original_size"][1]),
                      "task": tasks[i], "vocabulary": self.vocabulary, "vocabulary_version": state.version}
            for name in wanted[i]:
                result.update(self._postprocess(name, mask_logits, class_logits, state, formats[i], float(scores[i])))
            return result

        # The per-image work (upsampling to the original size, the panoptic merge, RLE) is
        # most of a request's time with a small network; torch and pycocotools release the
        # GIL there, so the images of a batch are post-processed on parallel threads.
        workers = min(count, os.cpu_count() or 1)
        if workers <= 1:
            return [one_image(i) for i in range(count)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pading-post") as pool:
            return list(pool.map(one_image, range(count)))

    def _postprocess(self, task: str, mask_logits: OriginalSizeMaskLogits, class_logits: torch.Tensor, state: ServiceState,
                     output_format: str, min_score: float) -> dict:
        """One task's answer for one image, from :func:`pading.evaluation.predict.postprocess`
        (a named vocabulary's answer keeps its own classes only, like ``segment.py --only-classes``)."""
        bundle = state.bundle
        table = bundle.table
        prediction = postprocess(mask_logits, class_logits, table=table, inference=bundle.config.inference,
                                 tasks=(task,))
        with_rle = output_format == "json"
        if task == "panoptic":
            segment_ids = prediction.panoptic_ids
            entries = [{"id": s["id"], **_class_fields(table[s["class_index"]]), "score": float(s["score"]),
                        **_mask_fields(segment_ids == s["id"], with_rle)}
                       for s in prediction.segments if s["score"] >= min_score and state.shows(table[s["class_index"]].id)]
            png = None
            if not with_rle:  # the id image keeps the segments answered
                png = panoptic_to_rgb(np.where(np.isin(segment_ids, [e["id"] for e in entries]), segment_ids, 0))
        elif task == "instance":
            instances = [d for d in prediction.instances
                         if d["score"] >= min_score and state.shows(table[d["class_index"]].id)]
            fields: dict[int, dict] = {}  # a query's mask, encoded once for all its classes
            for d in instances:
                if d["query"] not in fields:
                    fields[d["query"]] = _mask_fields(d["mask"], with_rle)
            entries = [{"id": k + 1, **_class_fields(table[d["class_index"]]), "score": float(d["score"]),
                        **fields[d["query"]]} for k, d in enumerate(instances)]
            png = None
            if not with_rle:
                ids = np.zeros(mask_logits.shape[-2:], dtype=np.int64)  # (H, W)
                for k in reversed(range(len(instances))):  # highest score painted last, on top
                    ids[instances[k]["mask"]] = k + 1
                png = ids
        else:
            index_map = prediction.semantic  # (H, W)
            classes = np.flatnonzero(np.bincount(index_map.ravel()))  # np.unique, without sorting every pixel
            present = [int(c) for c in classes if state.shows(table[int(c)].id)]
            entries = [{**_class_fields(table[c]), **_mask_fields(index_map == c, with_rle)} for c in present]
            png = None
            if not with_rle:  # class ids; pixels of classes the vocabulary does not show are 0
                shown = np.asarray([table[i].id if state.shows(table[i].id) else 0 for i in range(table.num_classes)],
                                   dtype=np.int64)
                png = shown[index_map]
        return {task: entries, **({"png": _png_bytes(png)} if png is not None else {})}

    # ---- run-time classes -----------------------------------------------------------
    def _encode(self, names: Sequence[str], bundle: Bundle) -> np.ndarray:
        """(M,) names -> (M, S) float32 with the bundle's encoder (or ``encode_fn``)."""
        encode = self._encode_fn or (lambda texts: encode_with_config(texts, bundle.config.semantics))
        try:
            vectors = np.asarray(encode(list(names)), dtype=np.float32)
        except (UnknownClassError, MissingWeightsError, ValueError) as err:
            raise UnprocessableError("names", f"cannot encode the class names: {err}") from None
        if vectors.shape != (len(names), bundle.class_semantics.shape[1]):
            raise UnprocessableError("names", f"the encoder gave {vectors.shape} for {len(names)} names; the bundle's "
                                     f"semantics are {bundle.class_semantics.shape[1]}-d ({bundle.encoder})")
        return vectors

    def _check_new_names(self, names: Sequence[str], isthing: bool | Sequence[bool], table: ClassTable,
                         shows: Callable[[int], bool] = lambda class_id: True) -> list[tuple[str, bool]]:
        """(name, isthing) of each new name, cleaned; ``shows`` says which of ``table``'s classes the
        vocabulary shows (a trained class it leaves out cannot be added by name)."""
        names = list(names) if not isinstance(names, str) else [names]
        if not names:
            raise RequestError("names", "give at least one class name")
        if len(names) > self.config.max_new_classes:
            raise RequestError("names", f"{len(names)} names; at most {self.config.max_new_classes} per request")
        things = [bool(isthing)] * len(names) if isinstance(isthing, bool) else [bool(t) for t in isthing]
        if len(things) != len(names):
            raise RequestError("isthing", f"{len(things)} isthing values for {len(names)} names")
        known = {key.lower(): c for c in table for key in (c.name, c.text)}
        seen: set[str] = set()
        cleaned = []
        for i, raw in enumerate(names):
            name = " ".join(raw.split()) if isinstance(raw, str) else ""
            if not clean_name(name):
                raise RequestError(f"names[{i}]", f"class name {raw!r} is empty")
            if len(name) > MAX_NAME_CHARS:
                raise RequestError(f"names[{i}]", f"class name of {len(name)} characters; at most {MAX_NAME_CHARS}")
            key = clean_name(name).lower()
            if key in seen or name.lower() in seen:
                raise RequestError(f"names[{i}]", f"class name {name!r} is given twice")
            existing = known.get(key) or known.get(name.lower())
            if existing is not None and not shows(existing.id):
                raise ClassConflictError(name, f"is the trained class {existing.name!r} (id {existing.id}), which "
                                         "this vocabulary leaves out: a trained class is not added by name but "
                                         "listed in 'only' when a vocabulary is created")
            if existing is not None:
                raise ClassConflictError(name, f"already in the vocabulary as {existing.name!r} (id {existing.id})")
            seen.update((key, name.lower()))
            cleaned.append((name, things[i]))
        return cleaned

    def _refit(self, bundle: Bundle, table: ClassTable, semantics: np.ndarray) -> tuple[nn.Module, int]:
        """The bundle's classifier expanded to ``table`` and its added rows fitted; (classifier, steps)."""
        old = bundle.classifier
        device = bundle.device
        semantic_tensor = torch.as_tensor(semantics, dtype=torch.float32, device=device)  # (C', S)
        if isinstance(old, ProjectionClassifier):  # projection baseline: new rows are the semantics
            new_rows = semantic_tensor[old.num_classes:]  # (added, S)
            return expand_classifier(old, table.num_classes, new_class_semantics=new_rows).eval(), 0
        if bundle.generator is None or bundle.reference_embeddings is None or bundle.reference_labels is None:
            raise UnprocessableError(
                "bundle", "cannot add classes: re-fitting the classifier needs the bundle's generator and "
                "reference features (reference_features.safetensors)")
        seed = bundle.config.seed
        expanded = expand_classifier(old, table.num_classes, generator=torch.Generator().manual_seed(seed))
        real_embeddings = torch.as_tensor(bundle.reference_embeddings, dtype=torch.float32, device=device)  # (N, D)
        real_labels = torch.as_tensor(bundle.reference_labels, dtype=torch.long, device=device)  # (N,)
        real_labels = torch.where(real_labels == bundle.table.no_object_index, table.no_object_index, real_labels)
        generator = bundle.generator
        noise = torch.Generator(device=device).manual_seed(seed)

        def synthesize(class_indices: torch.Tensor, per_class: int) -> torch.Tensor:
            semantic = semantic_tensor[class_indices.to(device)].repeat_interleave(per_class, dim=0)  # (M*k, S)
            return generator(semantic, generator=noise)  # (M*k, D)

        # Only the added rows are fitted (the trained classes' and no object's rows stay): the
        # frozen logits of the reference rows are computed once, which keeps adding a class
        # fast at 10,000 classes (benchmarks/vocab_scaling.py).
        fit_added_classes(
            expanded, old.num_classes, real_embeddings, real_labels, synthesize, torch.as_tensor(table.unseen_indices),
            steps=self.config.fit_steps, weights=class_weights(table, bundle.config.generator_training),
            config=bundle.config.generator_training, per_class=self.config.fit_per_class,
            batch_size=self.config.fit_batch_size, seed=seed,
        )
        return expanded.eval(), self.config.fit_steps

    def _commit(self, state: ServiceState, change: Change) -> ServiceState:
        """Commit ``change`` on top of ``state`` (to the store first, when there is one) and
        swap the new state in; VersionTakenError when the store moved on meanwhile."""
        if self._store is not None:
            change = self._store.commit(self.vocabulary, state.version, change)
        else:
            change.version = state.version + 1
        new_state = self._apply(state, change)
        self._state = new_state  # one atomic assignment
        self._maybe_snapshot(new_state)
        return new_state

    def _change_with_retries(self, make_change: Callable[[ServiceState], tuple[Change, dict]]) -> tuple[ServiceState, dict]:
        """Run ``make_change(state) -> (change, facts)`` on the newest state and commit it;
        when another replica committed first, catch up and make the change again on top of
        that (compare-and-swap), so concurrent changes all land."""
        with self._update_lock:
            for _ in range(MAX_COMMIT_ATTEMPTS):
                state = self.sync(force=True)
                change, facts = make_change(state)
                try:
                    return self._commit(state, change), facts
                except VersionTakenError:
                    logger.info("vocabulary %r changed while this change was made; redoing it on top", self.vocabulary)
        raise BusyError(f"vocabulary {self.vocabulary!r} kept changing under {MAX_COMMIT_ATTEMPTS} attempts; retry later",
                        self.config.retry_after_s)

    def add_classes(self, names: Sequence[str], isthing: bool | Sequence[bool] = True) -> dict:
        """Add run-time classes (unseen, ``added``), re-fit the classifier and swap it in;
        with a store, the new classes and their classifier rows are committed there first.

        Returns ``{"added": [records], "seconds", "fit_steps", "vocabulary", "vocabulary_version",
        "num_classes"}``. RequestError for empty/duplicate names, ClassConflictError for
        names already in the vocabulary, UnprocessableError when they cannot be encoded,
        StoreUnavailableError when the store cannot be written (nothing changes)."""
        started = time.perf_counter()

        def make_change(state: ServiceState) -> tuple[Change, dict]:
            bundle = state.bundle
            new = self._check_new_names(names, isthing, bundle.table, state.shows)
            vectors = self._encode([name for name, _ in new], bundle)  # (M, S)
            infos = [ClassInfo(id=state.next_id + k, name=name, isthing=thing, unseen=True, added=True)
                     for k, (name, thing) in enumerate(new)]
            table = bundle.table.with_classes(infos)
            semantics = np.concatenate([np.asarray(bundle.class_semantics, np.float32), vectors], axis=0)  # (C', S)
            classifier, steps = self._refit(bundle, table, semantics)
            change = Change("add", classes=table.to_records()[bundle.table.num_classes:], semantics=vectors,
                            **_added_rows(classifier, bundle.table.num_classes, len(infos)))
            return change, {"steps": steps, "records": change.classes}

        state, facts = self._change_with_retries(make_change)
        seconds = time.perf_counter() - started
        logger.info("vocabulary %r: added %s in %.2f s (%d fit steps); version %d, %d classes", self.vocabulary,
                    [r["name"] for r in facts["records"]], seconds, facts["steps"], state.version,
                    state.bundle.table.num_classes)
        return {"added": facts["records"], "seconds": round(seconds, 4), "fit_steps": facts["steps"],
                "vocabulary": self.vocabulary, "vocabulary_version": state.version,
                "num_classes": self._visible_count(state)}

    def delete_class(self, name: str) -> dict:
        """Remove a run-time class (its classifier row is dropped; no re-fit).
        UnknownClassError when absent, ClassConflictError for a trained class."""
        started = time.perf_counter()

        def make_change(state: ServiceState) -> tuple[Change, dict]:
            table = state.bundle.table
            index = table.index_of_name(" ".join(str(name).split()))
            info = table[index]
            if not state.shows(info.id):
                raise UnknownClassError(str(name), [c.name for c in table if state.shows(c.id)])
            if not info.added:
                raise ClassConflictError(info.name, "is part of the trained vocabulary; only classes added at run "
                                         "time can be removed")
            return Change("remove", removed=[info.name]), {"record": table.to_records()[index]}

        state, facts = self._change_with_retries(make_change)
        seconds = time.perf_counter() - started
        logger.info("vocabulary %r: removed %r in %.3f s; version %d", self.vocabulary, facts["record"]["name"],
                    seconds, state.version)
        return {"removed": facts["record"], "seconds": round(seconds, 4), "vocabulary": self.vocabulary,
                "vocabulary_version": state.version, "num_classes": self._visible_count(state)}

    @staticmethod
    def _visible_count(state: ServiceState) -> int:
        return sum(1 for c in state.bundle.table if state.shows(c.id))

    # ---- named vocabularies ----------------------------------------------------------
    def _require_store(self) -> VocabularyStore:
        if self._store is None:
            raise UnprocessableError("vocabularies", "named vocabularies need a vocabulary store "
                                     "(serve.vocabulary_store)")
        return self._store

    def vocabularies(self) -> dict:
        """``{"vocabularies": [{"name", "version"}, ...]}`` of the store (``base`` first)."""
        names = self._require_store().names() if self._store is not None else {BASE: self._state.version}
        return {"vocabularies": [{"name": n, "version": v} for n, v in names.items()]}

    def create_vocabulary(self, name: str, add: Sequence[str] = (), isthing: bool | Sequence[bool] = True,
                          only: Sequence[str] | None = None) -> dict:
        """Create the named vocabulary ``name``: the trained classes (or the subset ``only``)
        plus the classes ``add`` (encoded and fitted now). ClassConflictError when it exists,
        RequestError for an empty or too large vocabulary or a bad name."""
        store = self._require_store()
        check_name(name)
        if name == BASE:
            raise ClassConflictError(name, "is the default vocabulary; it always exists")
        trained = self._trained
        add = [] if add is None else ([add] if isinstance(add, str) else list(add))
        kept = None
        if only is not None:
            only = [only] if isinstance(only, str) else list(only)
            kept = []
            for raw in only:
                try:
                    info = trained.table[trained.table.index_of_name(" ".join(str(raw).split()))]
                except UnknownClassError:
                    raise UnknownClassError(str(raw), trained.table.names) from None
                if info.name in kept:
                    raise RequestError("only", f"class {raw!r} is listed twice")
                kept.append(info.name)
        if not add and kept is not None and not kept:
            raise RequestError("vocabulary", "a vocabulary needs at least one class: give 'only' or 'add' names")
        started = time.perf_counter()
        facts: dict = {}
        with self._update_lock:
            for _ in range(MAX_COMMIT_ATTEMPTS):
                latest = store.latest(name)
                if store.exists(name):
                    raise ClassConflictError(name, "a vocabulary of that name exists; DELETE it first or pick another "
                                             "name")
                change = Change("create", only=kept)
                if add:
                    base_state = ServiceState(bundle=trained, version=0, next_id=max(trained.table.ids) + 1)
                    kept_ids = None if kept is None else {info.id for info in trained.table if info.name in kept}
                    new = self._check_new_names(add, isthing, trained.table,
                                                lambda class_id: kept_ids is None or class_id in kept_ids)
                    vectors = self._encode([n for n, _ in new], trained)
                    infos = [ClassInfo(id=base_state.next_id + k, name=n, isthing=t, unseen=True, added=True)
                             for k, (n, t) in enumerate(new)]
                    table = trained.table.with_classes(infos)
                    semantics = np.concatenate([np.asarray(trained.class_semantics, np.float32), vectors], axis=0)
                    classifier, facts["steps"] = self._refit(trained, table, semantics)
                    change = Change("create", only=kept, classes=table.to_records()[trained.table.num_classes:],
                                    semantics=vectors, **_added_rows(classifier, trained.table.num_classes, len(infos)))
                try:
                    change = store.commit(name, latest, change)
                    break
                except VersionTakenError:
                    continue
            else:
                raise BusyError(f"vocabulary {name!r} kept changing; retry later", self.config.retry_after_s)
        size = (len(kept) if kept is not None else trained.table.num_classes) + len(change.classes)
        seconds = time.perf_counter() - started
        logger.info("created vocabulary %r (version %d, %d classes) in %.2f s", name, change.version, size, seconds)
        return {"name": name, "vocabulary_version": change.version, "num_classes": size,
                "added": change.classes, "seconds": round(seconds, 4)}

    def delete_vocabulary(self, name: str) -> dict:
        """Delete the named vocabulary ``name`` (its chain keeps a tombstone; versions go on).
        UnknownVocabularyError when it does not exist, ClassConflictError for ``base``."""
        store = self._require_store()
        check_name(name)
        if name == BASE:
            raise ClassConflictError(name, "is the default vocabulary; it cannot be deleted")
        with self._update_lock:
            for _ in range(MAX_COMMIT_ATTEMPTS):
                if not store.exists(name):
                    raise UnknownVocabularyError(name, "no such vocabulary")
                try:
                    change = store.commit(name, store.latest(name), Change("delete"))
                    break
                except VersionTakenError:
                    continue
            else:
                raise BusyError(f"vocabulary {name!r} kept changing; retry later", self.config.retry_after_s)
        logger.info("deleted vocabulary %r (version %d)", name, change.version)
        return {"deleted": name, "vocabulary_version": change.version}


def _added_rows(classifier: nn.Module, first: int, count: int) -> dict:
    """The classifier rows of classes ``first .. first + count - 1`` (none for a projection classifier)."""
    if not isinstance(classifier, Classifier):
        return {}
    weight = classifier.linear.weight.detach()[first:first + count].cpu().numpy()  # (M, D)
    bias = classifier.linear.bias.detach()[first:first + count].cpu().numpy()  # (M,)
    return {"weight": weight, "bias": bias}


def _drop_class_row(classifier: nn.Module, index: int) -> nn.Module:
    """A copy of ``classifier`` without class ``index`` (other logits unchanged)."""
    keep = [i for i in range(classifier.num_classes + 1) if i != index]  # classes + no object
    if isinstance(classifier, ProjectionClassifier):
        smaller = copy.deepcopy(classifier)
        smaller.class_semantics = classifier.class_semantics[keep[:-1]].clone()  # (C-1, S) buffer
        return smaller.eval()
    if not isinstance(classifier, Classifier):
        raise UnprocessableError("classifier", f"cannot remove a class from a {type(classifier).__name__}")
    weight = classifier.linear.weight.detach()  # (C+1, D)
    smaller = Classifier(classifier.embed_dim, classifier.num_classes - 1).to(weight.device)
    with torch.no_grad():
        smaller.linear.weight.copy_(weight[keep])
        smaller.linear.bias.copy_(classifier.linear.bias.detach()[keep])
    return smaller.eval()
