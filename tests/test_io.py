"""pading.io: the atomic writers write what they are given, leave no temporary file, and keep
the old file when writing fails."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pading.io import (
    atomic_path,
    write_bytes_atomic,
    write_json_atomic,
    write_json_streamed,
    write_parquet_atomic,
    write_text_atomic,
)


def test_writers_write_the_contents_and_leave_no_temporary(tmp_path):
    data = {"a": [1, 2], "b": tmp_path}  # a Path: written as str()
    write_bytes_atomic(tmp_path / "sub" / "x.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "x.txt", "hello\n")
    write_json_atomic(tmp_path / "x.json", data)
    write_json_atomic(tmp_path / "x2.json", data, indent=2)
    write_json_atomic(tmp_path / "x3.json", data, compact=True)
    table = pa.table({"n": [1, 2, 3]})
    write_parquet_atomic(table, tmp_path / "x.parquet")
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "x.txt").read_text() == "hello\n"
    assert (tmp_path / "x.json").read_text() == json.dumps(data, indent=1, default=str)
    assert (tmp_path / "x2.json").read_text() == json.dumps(data, indent=2, default=str)
    assert (tmp_path / "x3.json").read_text() == json.dumps(data, separators=(",", ":"), default=str)
    assert pq.read_table(tmp_path / "x.parquet").equals(table)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left behind


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"old": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_streamed_json_is_the_json_of_the_whole_value(tmp_path):
    """Iterators are written item by item as arrays; the file parses to what the whole value
    (with lists in their place) would have written, and a failing iterator keeps the old file."""
    target = tmp_path / "big.json"
    items = [{"id": k, "name": f"n\"{k}", "bbox": [0.5, k]} for k in range(5)]
    write_json_streamed(target, {"info": {"a": 1}, "images": iter(items), "empty": iter([]), "categories": [1, 2]})
    assert json.loads(target.read_text()) == {"info": {"a": 1}, "images": items, "empty": [], "categories": [1, 2]}
    write_json_streamed(target, iter(items))
    assert json.loads(target.read_text()) == items

    def failing():
        yield {"id": 0}
        raise RuntimeError("a shard cannot be read")

    with pytest.raises(RuntimeError):
        write_json_streamed(target, {"images": failing()})
    assert json.loads(target.read_text()) == items and sorted(p.name for p in tmp_path.iterdir()) == ["big.json"]


def test_the_rename_is_flushed_with_its_directory(tmp_path, monkeypatch):
    # A rename lives in the directory's entries: the directory is fsynced after it, not only the file before.
    import pading.io as io

    calls = []
    real = io.fsync
    monkeypatch.setattr(io, "fsync", lambda p: (calls.append((str(p), (tmp_path / "x.txt").exists())), real(p)))
    io.write_text_atomic(tmp_path / "x.txt", "hello")
    assert [path.endswith(".tmp") for path, _ in calls] == [True, False]
    assert calls[1] == (str(tmp_path), True)  # the directory, once the file is in place
