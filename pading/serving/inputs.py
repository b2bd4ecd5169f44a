"""Where the images of a batch segmentation job come from (pipelines/segment.py;
docs/architecture.md "Batch segmentation").

:func:`list_inputs` turns one ``--input`` into a sorted list of image paths:

- a folder: every image file under it (recursive; ``.jpg .jpeg .png .webp``, any case;
  hidden files and folders are skipped);
- a glob (``photos/*.jpg``, ``data/**/*.png``): every file it matches (``**`` crosses
  folders);
- a text file (``.txt``, ``.lst``, ``.list``): one path per line (blank lines and ``#``
  comments skipped);
- a Parquet or CSV file: the paths in one column (default ``path``);
- one image file.

Paths are local, or URIs of any file system pyarrow supports (``s3://``, ``gs://``,
``hdfs://``, ``file://``; :func:`pyarrow.fs.FileSystem.from_uri`); relative paths inside a
list or table are relative to the folder that holds it. :func:`read_image_bytes` reads one
file through the same file system, refusing missing files and files above a size limit.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pading.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
TABLE_EXTENSIONS = (".parquet", ".csv")
GLOB_CHARS = "*?["


class InputError(ConfigError):
    """An ``--input`` that names nothing usable (missing, empty, unknown kind, no such column)."""


class MissingImageError(DataError):
    """A listed image file that does not exist."""


class FileTooLargeError(DataError):
    """A listed file above the size limit (not read)."""


# ---- file systems ------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """One path on one file system: ``fs`` and the path inside it (``inner``), plus what is
    needed to turn other paths of that file system back into URIs (:meth:`uri_of`)."""

    fs: pafs.FileSystem
    inner: str
    scheme: str = ""  # "" = a local path
    netloc: str = ""
    query: str = ""
    netloc_in_path: bool = False  # s3/gs: the inner path starts with the bucket

    def uri_of(self, inner: str) -> str:
        """The path or URI of ``inner``, another path on this file system."""
        if not self.scheme:
            return inner
        query = f"?{self.query}" if self.query else ""
        if self.netloc_in_path:
            return f"{self.scheme}://{inner.lstrip('/')}{query}"
        return f"{self.scheme}://{self.netloc}/{inner.lstrip('/')}{query}"


_LOCAL = pafs.LocalFileSystem()
_CACHE: dict[str, tuple[pafs.FileSystem, bool]] = {}
_CACHE_LOCK = threading.Lock()


def is_uri(path: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def locate(path: str) -> Location:
    """The file system and inner path of a local path or URI. File systems are cached per
    scheme, host and query, so reading many files of one bucket builds one client."""
    path = str(path)
    if not is_uri(path):
        return Location(_LOCAL, os.path.abspath(os.path.expanduser(path)))
    parts = urlsplit(path)
    key = f"{parts.scheme}://{parts.netloc}?{parts.query}"
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        fs, netloc_in_path = cached
        inner = f"{parts.netloc}{parts.path}" if netloc_in_path else parts.path
        return Location(fs, inner, parts.scheme, parts.netloc, parts.query, netloc_in_path)
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{path}: cannot open this URI's file system ({err})") from None
    with_netloc = inner.strip("/") == f"{parts.netloc}{parts.path}".strip("/")
    path_only = inner.strip("/") == parts.path.strip("/")
    if with_netloc or path_only:  # the mapping is known: remember the file system
        with _CACHE_LOCK:
            _CACHE[key] = (fs, with_netloc and not path_only)
    return Location(fs, inner, parts.scheme, parts.netloc, parts.query, with_netloc and not path_only)


def _join(parent: Location, entry: str) -> str:
    """``entry`` (a path inside a list or table) resolved against the folder ``parent``:
    URIs as they are, absolute paths on the list's own file system, relative ones below
    ``parent``."""
    if is_uri(entry):
        return entry
    if not parent.scheme:
        return os.path.normpath(os.path.join(parent.inner, os.path.expanduser(entry)))
    if entry.startswith("/"):
        return parent.uri_of(entry)
    return parent.uri_of(posixpath.normpath(posixpath.join(parent.inner, entry)))


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.replace("\\", "/").split("/") if part)


def _list_files(location: Location, recursive: bool = True) -> list[tuple[str, str]]:
    """(relative path, path or URI) of every file under the folder ``location``."""
    base = location.inner.rstrip("/")
    selector = pafs.FileSelector(location.inner, recursive=recursive)
    files = []
    for info in location.fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(base):].lstrip("/\\") if info.path.startswith(base) else info.base_name
        files.append((relative.replace("\\", "/"), location.uri_of(info.path)))
    return files


# ---- globs -------------------------------------------------------------------------------


def has_glob(spec: str) -> bool:
    path = urlsplit(spec).path if is_uri(spec) else spec
    return any(c in path for c in GLOB_CHARS)


def glob_regex(pattern: str) -> re.Pattern:
    """A glob over ``/``-separated relative paths: ``*`` and ``?`` stay inside one folder,
    ``**`` crosses folders (``a/**/b`` matches ``a/b`` too), ``[...]`` / ``[!...]`` sets."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _glob(spec: str) -> list[str]:
    if is_uri(spec):
        parts = urlsplit(spec)
        head, path = f"{parts.scheme}://{parts.netloc}", parts.path
        query = f"?{parts.query}" if parts.query else ""
    else:
        head, path, query = "", os.path.abspath(os.path.expanduser(spec)), ""
    segments = path.split("/")
    first = next(k for k, s in enumerate(segments) if any(c in s for c in GLOB_CHARS))
    base = "/".join(segments[:first]) or "/"
    pattern = "/".join(segments[first:])
    location = locate(f"{head}{base}{query}")
    info = location.fs.get_file_info(location.inner)
    if info.type != pafs.FileType.Directory:
        raise InputError(f"--input {spec}: the folder {head}{base} does not exist")
    recursive = "/" in pattern or "**" in pattern
    regex = glob_regex(pattern)
    return [uri for relative, uri in _list_files(location, recursive) if regex.match(relative)
            and (not _hidden(relative) or pattern.startswith("."))]


# ---- lists and tables --------------------------------------------------------------------


def _parent(location: Location) -> Location:
    if location.scheme:
        return Location(location.fs, str(PurePosixPath(location.inner).parent), location.scheme, location.netloc,
                        location.query, location.netloc_in_path)
    return Location(location.fs, os.path.dirname(location.inner))


def _read_text_list(location: Location) -> list[str]:
    with location.fs.open_input_stream(location.inner) as stream:
        text = stream.read().decode("utf-8-sig")
    entries = [line.strip() for line in text.splitlines()]
    return [e for e in entries if e and not e.startswith("#")]


def _read_column(location: Location, spec: str, column: str, suffix: str) -> list[str]:
    if suffix == ".parquet":
        schema = pq.read_schema(location.inner, filesystem=location.fs)
        names = schema.names
        if column not in names:
            raise InputError(f"--input {spec}: no column {column!r} (columns: {', '.join(names)}); "
                             "name the column of paths with --input-column")
        values = pq.read_table(location.inner, columns=[column], filesystem=location.fs).column(column)
    else:
        with location.fs.open_input_stream(location.inner) as stream:
            table = pacsv.read_csv(stream, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        if column not in table.column_names:
            raise InputError(f"--input {spec}: no column {column!r} (columns: {', '.join(table.column_names)}); "
                             "name the column of paths with --input-column")
        values = table.column(column)
    entries = [str(v).strip() for v in values.to_pylist() if v is not None and str(v).strip()]
    skipped = len(values) - len(entries)
    if skipped:
        logger.warning("%s: %d empty value(s) in column %r skipped", spec, skipped, column)
    return entries


def list_inputs(spec: str, column: str = "path") -> list[str]:
    """The images ``spec`` names (folder, glob, text list, Parquet/CSV column, one image),
    as sorted, distinct local paths or URIs. Listed files are not opened here: a missing
    or unreadable one becomes a reject when the job reads it. Raises :class:`InputError`
    when ``spec`` does not exist, is of an unknown kind, lacks ``column`` or names no image."""
    spec = str(spec).strip()
    if not spec:
        raise InputError("--input is empty: give a folder, a glob, a text file of paths or a Parquet/CSV file")
    if has_glob(spec) and (is_uri(spec) or not os.path.exists(os.path.expanduser(spec))):
        entries, kind = _glob(spec), "glob"
        return _finish(spec, entries, kind)
    try:
        return _list_spec(spec, column)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:  # a list or folder that cannot be read
        raise InputError(f"--input {spec}: cannot be read ({type(err).__name__}: {err})") from None


def _list_spec(spec: str, column: str) -> list[str]:
    location = locate(spec)
    info = location.fs.get_file_info(location.inner)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"--input {spec}: no such file or folder")
    elif info.type == pafs.FileType.Directory:
        entries = [uri for relative, uri in _list_files(location)
                   if relative.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(relative)]
        kind = "folder"
    else:
        suffix = PurePosixPath(location.inner.replace("\\", "/")).suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            entries, kind = [location.uri_of(location.inner)], "image"
        elif suffix in LIST_EXTENSIONS:
            parent = _parent(location)
            entries, kind = [_join(parent, e) for e in _read_text_list(location)], "list"
        elif suffix in TABLE_EXTENSIONS:
            parent = _parent(location)
            entries = [_join(parent, e) for e in _read_column(location, spec, column, suffix)]
            kind = f"{suffix[1:]} column {column!r}"
        else:
            raise InputError(
                f"--input {spec}: unknown kind of file {suffix or '(no extension)'!r}; give a folder, a glob, an image "
                f"({', '.join(IMAGE_EXTENSIONS)}), a list of paths ({', '.join(LIST_EXTENSIONS)}) or a "
                f"Parquet/CSV file with a column of paths")
    return _finish(spec, entries, kind)


def _finish(spec: str, entries: list[str], kind: str) -> list[str]:
    paths = sorted(set(entries))
    if not paths:
        raise InputError(f"--input {spec}: no images found ({kind})")
    if len(paths) < len(entries):
        logger.info("%s: %d duplicate path(s) listed once", spec, len(entries) - len(paths))
    logger.info("input %s (%s): %d image(s)", spec, kind, len(paths))
    return paths


def read_image_bytes(path: str, max_bytes: int) -> bytes:
    """The bytes of one listed file. MissingImageError when it does not exist,
    FileTooLargeError above ``max_bytes`` (not read), DataError when it cannot be read."""
    try:
        location = locate(path)
        info = location.fs.get_file_info(location.inner)
        if info.type == pafs.FileType.NotFound:
            raise MissingImageError(path, "no such file")
        if info.type != pafs.FileType.File:
            raise DataError(path, f"not a file ({info.type.name.lower()})")
        if info.size is not None and info.size > max_bytes:
            raise FileTooLargeError(path, f"file is {info.size} bytes, above the limit of {max_bytes} "
                                    "(segment.max_image_bytes)")
        with location.fs.open_input_stream(location.inner) as stream:
            return stream.read()
    except (OSError, ConfigError) as err:
        raise DataError(path, f"cannot read the file ({err})") from None
