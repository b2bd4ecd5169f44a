"""Batch segmentation of image collections: the library side of pipelines/segment.py
(docs/architecture.md "Batch segmentation").

- The vocabulary: :func:`prepare_bundle` extends a bundle with classes named at the command
  line (:meth:`~pading.serving.service.SegmentationService.add_classes`, once) and saves it
  under ``<output>/bundle/`` for the workers; :func:`select_classes` resolves
  ``--only-classes``; :func:`coco_categories` is the ``categories.json`` of the output.
- The job: :func:`job_spec` / :func:`check_output` record what an output directory holds and
  refuse to mix a different request into it; :func:`plan_shards` cuts the sorted input list
  into shards (image ids = 1 + the position in that list).
- :class:`ShardSegmenter` (the callable class Ray Data's ``map_batches`` runs) reads and
  decodes the images of a shard, segments them in batches and writes
  ``shards/segments-NNNNN.parquet`` (one row per segment) and, last, as the shard's
  completion marker, ``shards/images-NNNNN.parquet`` (one row per image, rejects with
  their reason); PNGs the format needs are written before them. Every file appears only
  once complete (temporary name, then rename).
- :func:`assemble` turns the shard files into the requested format (idempotent).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pading.bundle import (
    CLASSES_FILE,
    CLASSIFIER_META_FILE,
    CLASSIFIER_WEIGHTS_FILE,
    GENERATOR_WEIGHTS_FILE,
    SEGMENTER_DIR,
    SEMANTICS_FILE,
    Bundle,
)
from pading.classes import TASKS, ClassInfo, ClassTable
from pading.config import SEGMENT_FORMATS, ExperimentConfig
from pading.errors import ConfigError, CorruptImageError, DataError, UnknownClassError
from pading.evaluation.inference import panoptic_to_rgb
from pading.io import atomic_path, write_bytes_atomic, write_json_atomic, write_json_streamed, write_parquet_atomic
from pading.serving.inputs import FileTooLargeError, MissingImageError, read_image_bytes
from pading.serving.service import (
    ImageTooLargeError,
    RequestError,
    SegmentationService,
    TruncatedImageError,
    decode_image,
)

logger = logging.getLogger(__name__)

#: The task each format needs; parquet holds any (default: panoptic, things and stuff).
FORMAT_TASK = {"parquet": "panoptic", "coco-panoptic": "panoptic", "coco-instance": "instance", "semantic": "semantic"}
assert set(FORMAT_TASK) == set(SEGMENT_FORMATS)

JOB_FILE = "job.json"
#: The job's counts and throughput, written last (pading.run.batch_job.finish).
SUMMARY_FILE = "summary.json"
SHARDS_DIR = "shards"
BUNDLE_DIR = "bundle"
PNG_DIRS = {"coco-panoptic": "panoptic", "semantic": "semantic"}
OVERLAYS_DIR = "overlays"
#: Everything a job writes in its output directory (``--force`` removes exactly these).
PRODUCTS = (SHARDS_DIR, BUNDLE_DIR, "panoptic", "semantic", OVERLAYS_DIR, "categories.json", "images.json",
            "images.parquet", "segments.parquet", "panoptic.json", "instances_results.json", "rejects.parquet",
            "rejects.csv", SUMMARY_FILE, JOB_FILE)
#: Request fields that decide the vocabulary (named in the refusal message).
VOCABULARY_KEYS = ("bundle", "add_classes", "only_classes")

SEGMENTS_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("task", pa.string()), ("segment_id", pa.int32()),
    ("class_id", pa.int32()), ("class_name", pa.string()), ("isthing", pa.bool_()), ("unseen", pa.bool_()),
    ("added", pa.bool_()), ("score", pa.float32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float32(), 4)),
    ("rle_size", pa.list_(pa.int32(), 2)), ("rle_counts", pa.string()),
])
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("status", pa.string()), ("kind", pa.string()), ("reason", pa.string()), ("segments", pa.int32()),
])
REJECTS_SCHEMA = pa.schema([("file", pa.string()), ("image_id", pa.int64()), ("kind", pa.string()),
                            ("reason", pa.string())])


# ---- requests ----------------------------------------------------------------------------


def resolve_task(output_format: str, task: str | None) -> str:
    """The task to run: ``task`` (``panoptic``/``instance``/``semantic``/``all``) or the
    format's own. ConfigError when the format cannot hold ``task``."""
    if output_format not in FORMAT_TASK:
        raise ConfigError(f"unknown format {output_format!r} (expected one of {', '.join(SEGMENT_FORMATS)})")
    own = FORMAT_TASK[output_format]
    if task is None:
        return own
    if task not in TASKS + ("all",):
        raise ConfigError(f"unknown task {task!r} (expected one of {', '.join(TASKS + ('all',))})")
    if output_format != "parquet" and task not in (own, "all"):
        raise ConfigError(f"--format {output_format} holds {own} results; it cannot be made with --task {task}")
    return task


def task_names(task: str) -> tuple[str, ...]:
    return TASKS if task == "all" else (task,)


def parse_class_names(text: str | None) -> list[str]:
    """``"a, b ,c"`` -> ``["a", "b", "c"]`` (inner whitespace collapsed, empties dropped)."""
    return [" ".join(part.split()) for part in (text or "").split(",") if part.strip()]


def read_class_file(path: str | os.PathLike) -> list[str]:
    """One class name per line (blank lines and ``#`` comments skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--add-classes-file {path}: no such file")
    lines = [" ".join(line.split()) for line in file.read_text(encoding="utf-8-sig").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def merge_names(*groups: Iterable[str]) -> list[str]:
    """The names of all groups in order, each once (case-insensitive)."""
    seen, out = set(), []
    for group in groups:
        for name in group:
            if name.lower() not in seen:
                seen.add(name.lower())
                out.append(name)
    return out


def preview_table(table: ClassTable, added: Sequence[str]) -> ClassTable:
    """``table`` with ``added`` appended as placeholder classes, to check the names before
    any class is fitted. ConfigError for a name already in ``table``."""
    known = {key.lower(): info for info in table for key in (info.name, info.text)}
    for name in added:
        if name.lower() in known:
            info = known[name.lower()]
            raise ConfigError(f"--add-classes: {name!r} is already in the vocabulary as {info.name!r} (id {info.id})")
    start = max(table.ids) + 1
    return table.with_classes([ClassInfo(id=start + k, name=name, isthing=True, unseen=True, added=True)
                               for k, name in enumerate(added)])


def select_classes(table: ClassTable, names: Sequence[str]) -> list[int]:
    """The category ids of ``names`` (raw or cleaned names, any case). ConfigError for a
    name not in ``table``, naming close matches (or the vocabulary's size)."""
    by_lower = {}
    for info in table:
        by_lower.setdefault(info.name.lower(), info)
        by_lower.setdefault(info.text.lower(), info)
    ids = []
    for name in names:
        try:
            info = table[table.index_of_name(name)]
        except UnknownClassError:
            info = by_lower.get(name.lower())
        if info is None:
            close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
            hint = (f"close matches: {', '.join(repr(by_lower[c].name) for c in close)}" if close else
                    f"the vocabulary has {table.num_classes} classes (categories.json lists them); "
                    "add new ones with --add-classes")
            raise ConfigError(f"--only-classes: unknown class {name!r}; {hint}")
        if info.id not in ids:
            ids.append(info.id)
    return ids


def coco_categories(table: ClassTable) -> list[dict]:
    """COCO ``categories`` of ``table``: id, name, isthing, supercategory, plus the
    ``unseen`` and ``added`` flags (added = named at run time, not trained)."""
    return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "supercategory": "added" if c.added else "",
             "unseen": bool(c.unseen), "added": bool(c.added)} for c in table]


# ---- the job record ----------------------------------------------------------------------


def bundle_fingerprint(bundle_dir: str | os.PathLike) -> str:
    """Content hash of a bundle's vocabulary and weights (not its config)."""
    directory = Path(bundle_dir)
    digest = hashlib.sha256()
    files = [directory / name for name in (CLASSES_FILE, SEMANTICS_FILE, CLASSIFIER_WEIGHTS_FILE, GENERATOR_WEIGHTS_FILE)]
    files += sorted((directory / SEGMENTER_DIR).glob("*"))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def job_spec(*, bundle: str, add_classes: Sequence[str], only_classes: Sequence[str], task: str, paths: Sequence[str],
             shard_size: int, config: ExperimentConfig, vocabulary: dict | None = None) -> dict:
    """What an output directory's results depend on (``job.json``); ``vocabulary``: the named
    vocabulary and version used, if any."""
    listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    settings = config.segment
    return {
        "bundle": bundle, "add_classes": list(add_classes), "only_classes": list(only_classes), "task": task,
        "vocabulary": vocabulary,
        "inputs": {"count": len(paths), "sha256": listing}, "shard_size": int(shard_size),
        "min_score": float(settings.min_score), "inference": dict(vars(config.inference)),
        "limits": {"max_image_bytes": settings.max_image_bytes, "max_image_pixels": settings.max_image_pixels},
    }


def _describe(key: str, old, new) -> str:
    if key == "inputs":
        return f"inputs: {old.get('count') if isinstance(old, dict) else old} -> {new['count']} images (another list)"
    if key == "bundle":
        return "bundle: another model"
    return f"{key}: {old!r} -> {new!r}"


def clear_output(output: Path) -> None:
    """Remove what a job wrote in ``output`` (only the job's own names)."""
    for name in PRODUCTS + (".bundle.tmp",):
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_output(output: Path, spec: dict, force: bool) -> bool:
    """True when ``output`` already holds (part of) this very job, to be resumed. With
    ``force`` the old results are removed first. ConfigError when it holds another
    request's results (a different vocabulary, input list, task...)."""
    output = Path(output)
    if force:
        clear_output(output)
        return False
    record = output / JOB_FILE
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{record} cannot be read ({err}): it records the job this output holds. Re-run with "
                              "--force to redo the job there, or choose another --output.") from None
        changed = [key for key in spec if old.get(key) != spec[key]]
        if changed:
            what = "vocabulary request" if set(changed) & set(VOCABULARY_KEYS) else "request"
            details = "; ".join(_describe(k, old.get(k), spec[k]) for k in changed)
            raise ConfigError(f"{output} holds the results of a different {what} ({details}). Re-run with --force to "
                              "redo it there, or choose another --output.")
        return True
    shards = output / SHARDS_DIR
    if shards.is_dir() and any(shards.iterdir()):
        raise ConfigError(f"{output} holds shard files but no {JOB_FILE}; re-run with --force to redo it there, or "
                          "choose another --output.")
    return False


def vocabulary_state(source: str | os.PathLike, config: ExperimentConfig, store, name: str):
    """The named vocabulary ``name`` of ``store`` (:mod:`pading.serving.vocabularies`) over the
    bundle ``source``, exactly as the endpoint serves it: ``(bundle, version, visible class ids or None)``."""
    service = SegmentationService(Bundle.load(source), config.serve, store=store, vocabulary=name)
    state = service.sync(force=True)
    return state.bundle, state.version, (None if state.visible is None else sorted(state.visible))


def prepare_bundle(source: str | os.PathLike, output: Path, config: ExperimentConfig, add_classes: Sequence[str],
                   reuse: bool, bundle: Bundle | None = None) -> ClassTable:
    """The bundle the workers load, ``<output>/bundle/``: ``source`` (or ``bundle``, e.g. a
    named vocabulary's) with ``config`` (the effective settings) and ``add_classes`` added
    once (things, fitted here). When ``reuse`` and it exists, it is kept as it is. Returns its
    vocabulary."""
    target = Path(output) / BUNDLE_DIR
    if reuse and (target / CLASSIFIER_META_FILE).is_file():
        logger.info("vocabulary: reusing %s", target)
        return ClassTable.from_records(json.loads((target / CLASSES_FILE).read_text()))
    bundle = bundle if bundle is not None else Bundle.load(source)
    bundle.config = config
    if add_classes:
        service = SegmentationService(bundle, config.serve)
        added = service.add_classes(list(add_classes), True)
        logger.info("vocabulary: added %s (%d classes now)", [r["name"] for r in added["added"]], added["num_classes"])
        bundle = service.bundle
    tmp = Path(output) / ".bundle.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    bundle.save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return bundle.table


def plan_shards(paths: Sequence[str], shard_size: int) -> list[dict]:
    """``{"shard", "paths", "image_ids"}`` per shard of the sorted ``paths``; image id =
    1 + the position in the sorted list (stable for the same input)."""
    ordered = sorted(paths)
    return [{"shard": k, "paths": ordered[start:start + shard_size],
             "image_ids": list(range(start + 1, start + 1 + len(ordered[start:start + shard_size])))}
            for k, start in enumerate(range(0, len(ordered), shard_size))]


def shard_files(output: Path, shard: int) -> tuple[Path, Path]:
    """(segments file, images file = the shard's completion marker)."""
    directory = Path(output) / SHARDS_DIR
    return directory / f"segments-{shard:05d}.parquet", directory / f"images-{shard:05d}.parquet"


def pending_shards(output: Path, shards: Sequence[dict]) -> list[dict]:
    return [s for s in shards if not shard_files(output, s["shard"])[1].is_file()]


def png_name(image_id: int) -> str:
    return f"{int(image_id):012d}.png"


# ---- masks and pictures ------------------------------------------------------------------


def _decode_rle(size: Sequence[int], counts: str) -> np.ndarray:
    return mask_utils.decode({"size": [int(size[0]), int(size[1])], "counts": counts.encode("ascii")}).astype(bool)


def id_map(segments: Sequence[dict], height: int, width: int, value: str = "segment_id") -> np.ndarray:
    """(H, W) int64 map of segment rows: ``value`` (``segment_id`` or ``class_id``) where
    each mask is, 0 elsewhere; overlapping masks (instances) keep the higher score on top."""
    ids = np.zeros((height, width), dtype=np.int64)
    ordered = sorted(segments, key=lambda s: -np.inf if s.get("score") is None else s["score"])
    for segment in ordered:
        ids[_decode_rle(segment["rle_size"], segment["rle_counts"])] = int(segment[value])
    return ids


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def render_png(output_format: str, segments: Sequence[dict], height: int, width: int, sixteen_bit: bool) -> bytes:
    """The PNG of one image: ``coco-panoptic`` = COCO RGB segment ids (0 = void);
    ``semantic`` = category ids (0 = none), 16-bit when ``sixteen_bit``."""
    if output_format == "coco-panoptic":
        return _png(panoptic_to_rgb(id_map(segments, height, width)))
    ids = id_map(segments, height, width, value="class_id")
    return _png(ids.astype(np.uint16 if sixteen_bit else np.uint8))


# ---- the worker --------------------------------------------------------------------------


def reject_kind(error: Exception) -> str:
    """A short word for a reader's reject: missing, too_large, truncated, corrupt or unreadable
    (an image that decodes but cannot be segmented is ``failed``, :meth:`ShardSegmenter._segment`)."""
    if isinstance(error, MissingImageError):
        return "missing"
    if isinstance(error, (FileTooLargeError, ImageTooLargeError)):
        return "too_large"
    if isinstance(error, TruncatedImageError):
        return "truncated"
    if isinstance(error, (CorruptImageError, RequestError)):
        return "corrupt"
    return "unreadable"


def load_image(path: str, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Read and decode one listed image to (H, W, 3) uint8 RGB; DataError when it cannot be."""
    data = read_image_bytes(path, max_bytes)
    if not data:
        raise CorruptImageError(path, "empty file")
    return decode_image(data, max_pixels=max_pixels, source=path)


class ShardSegmenter:
    """Holds the model; each call segments whole shards and writes their files, skipping
    shards already written (the callable class of pipelines/segment.py's ``map_batches``).

    Input batch: ``{"shard": [int], "paths": [[str]], "image_ids": [[int]]}``; output: one
    row per shard with its counts (``images``, ``segmented``, ``rejected``, ``segments``,
    ``seconds``, ``skipped``) and when and where it ran (``started_at``, ``finished_at``,
    ``pid``; :func:`steady_throughput`).

    Args:
        bundle_dir: the job's bundle (``<output>/bundle``).
        output_dir: the job's output directory.
        task: ``panoptic``/``instance``/``semantic``/``all``.
        output_format: PNGs this format needs are written here too (coco-panoptic, semantic).
        overlays: also write ``overlays/<id>.png`` (the first task's segments over the image).
        only_class_ids: keep only segments of these categories (None: all).
        runtime: where the segmenter's forward pass runs (``segment.runtime``: auto, torch,
            onnxruntime; pading.model.runtime).
        images: how many images this actor will segment, when known (``auto`` keeps a
            small share on torch: pading.model.runtime.AUTO_MIN_IMAGES).
    """

    def __init__(self, bundle_dir: str, output_dir: str, task: str, output_format: str = "parquet",
                 overlays: bool = False, only_class_ids: Sequence[int] | None = None, batch_size: int = 4,
                 min_score: float = 0.0, max_image_bytes: int = 64 << 20, max_image_pixels: int = 40_000_000,
                 read_threads: int = 8, device: str | None = None, runtime: str = "auto", images: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        bundle = Bundle.load(bundle_dir, map_location=self.device)
        self.service = SegmentationService(bundle, dataclasses.replace(bundle.config.serve, runtime=runtime),
                                           images=images)
        self.table = self.service.bundle.table
        self.output = Path(output_dir)
        self.tasks = task_names(task)
        self.task = task
        self.png_dir = PNG_DIRS.get(output_format)
        self.output_format = output_format
        self.sixteen_bit = max(self.table.ids) > 255
        self.overlays = overlays
        self.only = None if only_class_ids is None else {int(i) for i in only_class_ids}
        self.batch_size = int(batch_size)
        self.min_score = float(min_score)
        self.max_bytes, self.max_pixels = int(max_image_bytes), int(max_image_pixels)
        self.window = max(int(read_threads), self.batch_size)
        self.pool = ThreadPoolExecutor(max_workers=int(read_threads), thread_name_prefix="pading-read")
        logger.info("segmenter ready on %s, %s (%d classes, task %s)", self.device, self.service.runtime,
                    self.table.num_classes, task)

    def __call__(self, batch: dict) -> dict:
        rows = [self.segment_shard(int(s), [str(p) for p in paths], [int(i) for i in ids])
                for s, paths, ids in zip(batch["shard"], batch["paths"], batch["image_ids"])]
        return {key: np.array([r[key] for r in rows]) for key in rows[0]} if rows else {}

    def _loaded(self, paths: Sequence[str]):
        """(image or the error) per path, in order, read and decoded ``window`` ahead on threads."""
        futures: deque = deque()
        queue = iter(paths)
        for path in queue:
            futures.append(self.pool.submit(self._load, path))
            if len(futures) >= self.window:
                break
        while futures:
            yield futures.popleft().result()
            path = next(queue, None)
            if path is not None:
                futures.append(self.pool.submit(self._load, path))

    def _load(self, path: str):
        try:
            return load_image(path, self.max_bytes, self.max_pixels)
        except DataError as err:
            return err
        except Exception as err:  # noqa: BLE001 - a file that breaks the decoder is a reject, not a crash
            return DataError(path, f"cannot decode: {type(err).__name__}: {err}")

    def segment_shard(self, shard: int, paths: Sequence[str], image_ids: Sequence[int]) -> dict:
        segments_file, images_file = shard_files(self.output, shard)
        if images_file.is_file():  # finished by an earlier run or attempt
            done = pq.read_table(images_file)
            ok = int(pc.sum(pc.equal(done["status"], "ok")).as_py() or 0)
            now = time.time()
            return {"shard": shard, "images": done.num_rows, "segmented": ok, "rejected": done.num_rows - ok,
                    "segments": int(pc.sum(done["segments"]).as_py() or 0), "seconds": 0.0, "skipped": True,
                    "started_at": now, "finished_at": now, "pid": os.getpid(), "host": socket.gethostname()}
        started_at = time.time()
        started = time.perf_counter()
        segment_rows: list[dict] = []
        image_rows: list[dict] = []
        chunk: list[tuple[int, str, np.ndarray]] = []
        for image_id, path, loaded in zip(image_ids, paths, self._loaded(paths)):
            if isinstance(loaded, Exception):
                reason = loaded.reason if isinstance(loaded, DataError) else str(loaded)
                image_rows.append({"image_id": image_id, "path": path, "width": None, "height": None,
                                   "status": "rejected", "kind": reject_kind(loaded), "reason": reason, "segments": 0})
                continue
            chunk.append((image_id, path, loaded))
            if len(chunk) == self.batch_size:
                self._segment(chunk, segment_rows, image_rows)
                chunk = []
        if chunk:
            self._segment(chunk, segment_rows, image_rows)
        image_rows.sort(key=lambda r: r["image_id"])
        write_parquet_atomic(pa.Table.from_pylist(segment_rows, schema=SEGMENTS_SCHEMA), segments_file)
        write_parquet_atomic(pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA), images_file)  # the marker: last
        seconds = time.perf_counter() - started
        rejected = sum(r["status"] != "ok" for r in image_rows)
        logger.info("shard %d: %d images (%d rejected) -> %d segments in %.1f s", shard, len(image_rows), rejected,
                    len(segment_rows), seconds)
        return {"shard": shard, "images": len(image_rows), "segmented": len(image_rows) - rejected,
                "rejected": rejected, "segments": len(segment_rows), "seconds": seconds, "skipped": False,
                "started_at": started_at, "finished_at": time.time(), "pid": os.getpid(), "host": socket.gethostname()}

    def _segment(self, chunk, segment_rows: list, image_rows: list) -> None:
        """Segment ``chunk`` in one pass and add its rows. When anything in that fails (the
        model, post-processing, a PNG or overlay write), each image is done again alone, and an
        image that fails alone becomes a reject of kind ``failed`` naming the error: one image
        does not stop its shard, its job or the reruns that would meet it again."""
        try:
            done = self._segment_images(chunk)
        except Exception as err:  # noqa: BLE001 - isolated image by image below
            if len(chunk) > 1:
                logger.warning("a batch of %d images failed (%s: %s); segmenting them one at a time", len(chunk),
                               type(err).__name__, err)
                for item in chunk:
                    self._segment([item], segment_rows, image_rows)
                return
            image_id, path, _ = chunk[0]
            logger.warning("image %s could not be segmented: %s: %s", path, type(err).__name__, err)
            image_rows.append({"image_id": image_id, "path": path, "width": None, "height": None, "status": "rejected",
                               "kind": "failed", "reason": f"segmenting failed: {type(err).__name__}: {err}",
                               "segments": 0})
            return
        for rows, image_row in done:
            segment_rows.extend(rows)
            image_rows.append(image_row)

    def _segment_images(self, chunk) -> list[tuple[list[dict], dict]]:
        """(segment rows, image row) per image of ``chunk``, its files written; nothing is added
        to the shard's rows here, so a failure part-way leaves no row behind."""
        results = self.service.segment([image for _, _, image in chunk], self.task, "json",
                                       min_score=self.min_score)
        done = []
        for (image_id, path, image), result in zip(chunk, results):
            height, width = int(result["height"]), int(result["width"])
            by_task = {task: self._rows(image_id, path, task, result.get(task, [])) for task in self.tasks}
            if self.png_dir:
                rows = by_task[FORMAT_TASK[self.output_format]]
                write_bytes_atomic(self.output / self.png_dir / png_name(image_id),
                                   render_png(self.output_format, rows, height, width, self.sixteen_bit))
            if self.overlays:
                self._overlay(image, image_id, by_task[self.tasks[0]])
            done.append(([row for rows in by_task.values() for row in rows],
                         {"image_id": image_id, "path": path, "width": width, "height": height, "status": "ok",
                          "kind": None, "reason": None, "segments": sum(len(r) for r in by_task.values())}))
        return done

    def _rows(self, image_id: int, path: str, task: str, entries: Sequence[dict]) -> list[dict]:
        rows = []
        for k, entry in enumerate(entries):
            if self.only is not None and int(entry["class_id"]) not in self.only:
                continue
            score = entry.get("score")
            rows.append({
                "image_id": image_id, "path": path, "task": task, "segment_id": int(entry.get("id", k + 1)),
                "class_id": int(entry["class_id"]), "class_name": entry["class_name"], "isthing": bool(entry["isthing"]),
                "unseen": bool(entry["unseen"]), "added": bool(entry["added"]),
                "score": None if score is None else float(score), "area": int(entry["area"]),
                "bbox": [float(v) for v in entry["bbox"]], "rle_size": [int(v) for v in entry["mask"]["size"]],
                "rle_counts": entry["mask"]["counts"],
            })
        return rows

    def _overlay(self, image: np.ndarray, image_id: int, rows: Sequence[dict]) -> None:
        from pading.serving.visualize import overlay_panoptic

        keyed = [{**row, "id": k + 1} for k, row in enumerate(rows)]
        ids = id_map(keyed, image.shape[0], image.shape[1], value="id")
        segments = [{"id": row["id"], "category_id": row["class_id"]} for row in keyed]
        picture = overlay_panoptic(image, ids, segments, self.table, scale=1)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        write_bytes_atomic(self.output / OVERLAYS_DIR / png_name(image_id), buffer.getvalue())


def steady_throughput(rows: Sequence[dict]) -> float:
    """Images per second once the actors are up: each actor's images over its
    first-shard-start to last-shard-end window, summed over the actors (start-up left out).
    An actor is its process id on its machine (``host``): processes in containers on
    different machines often have the same id."""
    def actor(row: dict) -> tuple[str, int]:
        return str(row.get("host", "")), int(row["pid"])

    total = 0.0
    for key in {actor(r) for r in rows}:
        mine = [r for r in rows if actor(r) == key and not r["skipped"]]
        if mine:
            window = max(float(r["finished_at"]) for r in mine) - min(float(r["started_at"]) for r in mine)
            total += sum(int(r["images"]) for r in mine) / max(window, 1e-9)
    return total


# ---- assembling the outputs --------------------------------------------------------------


def _shard_tables(output: Path, num_shards: int, which: int) -> Iterable[tuple[int, pa.Table]]:
    for shard in range(num_shards):
        yield shard, pq.read_table(shard_files(output, shard)[which])


def assemble(output: Path, output_format: str, task: str, num_shards: int, categories: list[dict],
             overlays: bool = False) -> dict:
    """Write the format's files from the shard files (all must be finished); rewritten
    whole each time, so re-assembling is idempotent. Returns the counts. Shard by shard: the
    driver holds one shard's rows at a time and the rejects, whatever the number of images
    (the JSON files are written as they are read, :func:`pading.io.write_json_streamed`)."""
    output = Path(output)
    missing = [s for s in range(num_shards) if not shard_files(output, s)[1].is_file()]
    if missing:
        raise DataError(str(output / SHARDS_DIR), f"{len(missing)} of {num_shards} shards unfinished "
                        f"(first: {missing[0]}); run the job again to finish them")
    counts = {"images": 0, "segments": 0}
    rejected = []
    with atomic_path(output / "images.parquet") as tmp, pq.ParquetWriter(str(tmp), IMAGES_SCHEMA) as writer:
        for _, images in _shard_tables(output, num_shards, 1):
            writer.write_table(images)
            counts["images"] += images.num_rows
            rejected.append(images.filter(pc.not_equal(images["status"], "ok")))
    rejected = pa.concat_tables(rejected) if rejected else IMAGES_SCHEMA.empty_table()
    rejects = pa.table({"file": rejected["path"], "image_id": rejected["image_id"], "kind": rejected["kind"],
                        "reason": rejected["reason"]}, schema=REJECTS_SCHEMA)
    write_parquet_atomic(rejects, output / "rejects.parquet")
    buffer = io.BytesIO()
    pacsv.write_csv(rejects, buffer)
    write_bytes_atomic(output / "rejects.csv", buffer.getvalue())
    write_json_atomic(output / "categories.json", categories)
    write_json_streamed(output / "images.json", {"images": _coco_images(output, num_shards), "categories": categories})
    wanted = task_names(task) if output_format == "parquet" else (FORMAT_TASK[output_format],)
    if output_format == "parquet":
        with atomic_path(output / "segments.parquet") as tmp, pq.ParquetWriter(str(tmp), SEGMENTS_SCHEMA) as writer:
            for _, table in _shard_tables(output, num_shards, 0):
                table = table.filter(pc.is_in(table["task"], pa.array(wanted)))
                counts["segments"] += table.num_rows
                writer.write_table(table)
        products = ["segments.parquet"]
    elif output_format == "coco-instance":
        write_json_streamed(output / "instances_results.json", _instance_results(output, num_shards, counts))
        products = ["instances_results.json"]
    else:
        annotations = _assemble_pngs(output, output_format, num_shards, categories, counts)
        products = [PNG_DIRS[output_format] + "/"]
        if output_format == "coco-panoptic":
            write_json_streamed(output / "panoptic.json", {
                "info": {"description": "PADing batch segmentation (pipelines/segment.py)"},
                "images": _coco_images(output, num_shards), "annotations": annotations, "categories": categories})
            products.insert(0, "panoptic.json")
        else:
            for _ in annotations:  # the PNGs are written as it goes
                pass
    if overlays:
        ids = [i for _, images in _shard_tables(output, num_shards, 1)
               for i in images.filter(pc.equal(images["status"], "ok"))["image_id"].to_pylist()]
        drawn = sum((output / OVERLAYS_DIR / png_name(i)).is_file() for i in ids)
        if drawn < len(ids):
            logger.warning("%d of %d images have no overlay: overlays are drawn while segmenting (--force redoes "
                           "the job)", len(ids) - drawn, len(ids))
    return {"images": counts["images"], "segmented": counts["images"] - rejects.num_rows, "rejected": rejects.num_rows,
            "segments": counts["segments"],
            "products": products + ["images.json", "images.parquet", "categories.json", "rejects.parquet",
                                    "rejects.csv"]}


def _ok_images(output: Path, num_shards: int) -> Iterator[tuple[int, list[dict]]]:
    """(shard, its segmented images' id, path, width and height rows), shard by shard (ids ascending)."""
    for shard, images in _shard_tables(output, num_shards, 1):
        ok = images.filter(pc.equal(images["status"], "ok"))
        yield shard, ok.select(["image_id", "path", "width", "height"]).to_pylist()


def _coco_images(output: Path, num_shards: int) -> Iterator[dict]:
    for _, rows in _ok_images(output, num_shards):
        for r in rows:
            yield {"id": r["image_id"], "file_name": r["path"], "width": r["width"], "height": r["height"]}


def _instance_results(output: Path, num_shards: int, counts: dict) -> Iterator[dict]:
    for _, table in _shard_tables(output, num_shards, 0):
        for row in table.filter(pc.equal(table["task"], "instance")).to_pylist():
            counts["segments"] += 1
            yield {"image_id": row["image_id"], "category_id": row["class_id"],
                   "segmentation": {"size": row["rle_size"], "counts": row["rle_counts"]},
                   "score": row["score"], "bbox": row["bbox"], "area": row["area"]}


def _assemble_pngs(output: Path, output_format: str, num_shards: int, categories: list[dict],
                   counts: dict) -> Iterator[dict]:
    """Per-image PNGs (rendered from the masks where an earlier run did not write them) and
    the COCO panoptic annotation of every segmented image, in image-id order, shard by shard."""
    png_dir = output / PNG_DIRS[output_format]
    task = FORMAT_TASK[output_format]
    sixteen_bit = max((c["id"] for c in categories), default=0) > 255
    rendered = 0
    for shard, images in _ok_images(output, num_shards):
        table = pq.read_table(shard_files(output, shard)[0])
        rows_by_image: dict[int, list[dict]] = {}
        for row in table.filter(pc.equal(table["task"], task)).to_pylist():
            rows_by_image.setdefault(row["image_id"], []).append(row)
        for image in images:
            image_id = image["image_id"]
            rows = rows_by_image.get(image_id, [])
            counts["segments"] += len(rows)
            if not (png_dir / png_name(image_id)).is_file():
                write_bytes_atomic(png_dir / png_name(image_id),
                                   render_png(output_format, rows, image["height"], image["width"], sixteen_bit))
                rendered += 1
            yield {"image_id": image_id, "file_name": png_name(image_id), "segments_info": [
                {"id": r["segment_id"], "category_id": r["class_id"], "iscrowd": 0, "bbox": r["bbox"],
                 "area": r["area"], "score": r["score"]} for r in rows]}
    if rendered:
        logger.info("%s: %d PNG(s) rendered from the shard files", png_dir, rendered)
