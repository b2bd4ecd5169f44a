"""Readers of what earlier stages wrote (the manifest, the rejects, the class table, loss
histories). The features table has its own module, :mod:`pading.data.features`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pading.classes import ClassTable
from pading.data.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA
from pading.run.layout import RunLayout


def load_table(output: str | Path) -> ClassTable:
    """The class table prepare wrote."""
    return ClassTable.from_records(json.loads(RunLayout(output).classes.read_text()))


def read_manifest(output: str | Path, split: str) -> list[dict]:
    """The manifest rows of ``split`` (train: seen-only), sorted by image_id."""
    return pq.read_table(RunLayout(output).manifest_split(split), schema=MANIFEST_SCHEMA).to_pylist()


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
