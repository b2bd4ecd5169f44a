"""Atomic file writers: a reader (or a re-run after a crash) sees the old file or the whole new
one, never a half-written one. Each writes to a temporary name in the same directory
(``.<name>.<unique>.tmp``, hidden, so globs of the products skip it), flushes and fsyncs it,
then ``os.replace``-s it onto the name and fsyncs the directory, so the rename outlives a power
loss too. Standard library only; pyarrow is imported by the
Parquet writer alone."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for the caller to write; on success it is
    fsynced and renamed onto ``path``, on an error removed. The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync(path: str | os.PathLike) -> None:
    """Flush ``path``'s data (a file or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or link into it); some file systems cannot fsync a
    directory, and there the rename is durable by itself, so their refusal is ignored."""
    with contextlib.suppress(OSError):
        fsync(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        handle.write(data)
        handle.flush()


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically (``encoding`` as ``Path.write_text``'s)."""
    with atomic_path(path) as tmp, open(tmp, "x", encoding=encoding) as handle:
        handle.write(text)
        handle.flush()


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 1, compact: bool = False) -> None:
    """JSON to ``path`` atomically: indented by ``indent``, or with ``compact`` no whitespace at
    all (for the large result files). Values JSON cannot hold are written as ``str()``."""
    if compact:
        text = json.dumps(data, separators=(",", ":"), default=str)
    else:
        text = json.dumps(data, indent=indent, default=str)
    write_text_atomic(path, text)


def write_json_streamed(path: str | os.PathLike, value: Any) -> None:
    """Compact JSON to ``path`` atomically, where ``value`` (or a value of the dict ``value``)
    may be an iterator: it is written as a JSON array item by item, so a list of millions of
    items is never held whole. Other values are written as :func:`write_json_atomic` writes them."""
    import collections.abc

    def dumps(item: Any) -> str:
        return json.dumps(item, separators=(",", ":"), default=str)

    def write(handle, item: Any) -> None:
        if isinstance(item, collections.abc.Iterator):
            handle.write("[")
            for k, element in enumerate(item):
                handle.write("," + dumps(element) if k else dumps(element))
            handle.write("]")
        else:
            handle.write(dumps(item))

    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as handle:
        if isinstance(value, dict):
            handle.write("{")
            for k, (key, item) in enumerate(value.items()):
                handle.write(("," if k else "") + dumps(str(key)) + ":")
                write(handle, item)
            handle.write("}")
        else:
            write(handle, value)
        handle.flush()


def write_parquet_atomic(table, path: str | os.PathLike) -> None:
    """Write the pyarrow ``table`` as Parquet to ``path`` atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
