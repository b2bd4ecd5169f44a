"""Readers of what earlier stages wrote (the manifest, the rejects, the class table, loss
histories), and the writer of the manifest next to its reader. The features table has its
own module, :mod:`pading.data.features`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pading.classes import ClassTable
from pading.data.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, rejects_to_table, rows_to_table
from pading.io import write_parquet_atomic, write_text_atomic
from pading.run.layout import RunLayout

#: Rows per manifest Parquet file.
MANIFEST_ROWS_PER_FILE = 10000


def write_manifest(output: str | Path, table: ClassTable, splits: dict[str, list[dict]],
                   rejects: list[dict]) -> None:
    """What prepare writes: each split's rows (sorted by image_id, in parts of
    :data:`MANIFEST_ROWS_PER_FILE`; an empty split is one empty part), the rejects and the
    class table; :func:`read_manifest`, :func:`read_rejects` and :func:`load_table` read them."""
    layout = RunLayout(output)
    for split, rows in splits.items():
        rows = sorted(rows, key=lambda r: r["image_id"])
        layout.manifest_split(split).mkdir(parents=True, exist_ok=True)
        for part, first in enumerate(range(0, max(1, len(rows)), MANIFEST_ROWS_PER_FILE)):
            write_parquet_atomic(rows_to_table(rows[first:first + MANIFEST_ROWS_PER_FILE]),
                                 layout.manifest_part(split, part))
    write_parquet_atomic(rejects_to_table(rejects), layout.rejects)
    write_text_atomic(layout.classes, json.dumps(table.to_records(), indent=1))


def load_table(output: str | Path) -> ClassTable:
    """The class table prepare wrote."""
    return ClassTable.from_records(json.loads(RunLayout(output).classes.read_text()))


def read_manifest(output: str | Path, split: str) -> list[dict]:
    """The manifest rows of ``split`` (train: seen-only), sorted by image_id."""
    return pq.read_table(RunLayout(output).manifest_split(split), schema=MANIFEST_SCHEMA).to_pylist()


def count_manifest(output: str | Path, split: str) -> int:
    """The number of manifest rows of ``split``, from one column (no row is decoded)."""
    return pq.read_table(RunLayout(output).manifest_split(split), columns=["image_id"],
                         schema=MANIFEST_SCHEMA).num_rows


def read_rejects(output: str | Path) -> list[dict]:
    """Every reject row of the run: prepare's and extract's."""
    layout = RunLayout(output)
    rows = pq.read_table(layout.rejects, schema=REJECTS_SCHEMA).to_pylist()
    for extra in sorted(layout.features_rejects.glob("*.parquet")):
        rows.extend(pq.read_table(extra, schema=REJECTS_SCHEMA).to_pylist())
    return rows


def read_history(path: str | Path) -> list[dict]:
    """A JSONL loss history (empty when the file is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
