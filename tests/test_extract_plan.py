"""The extract stage keeps a finished features shard only for the plan that wrote it
(pipelines/extract.py: the segmenter's checksum, the shard size, the manifest's shards), so
resuming after pretraining again, or with another shard size, never mixes two segmenters'
features or leaves images out or in twice. No Ray: the stage's own helper on files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.extract import PLAN_FILE, drop_stale_shards, extraction_plan

DIM = 4


def _shard(stage, rejects, index: int, image_ids: list[int], checkpoint: str) -> None:
    from pading.run.extraction import features_schema

    stage.mkdir(parents=True, exist_ok=True)
    rows = len(image_ids)
    columns = {"image_id": image_ids, "query": list(range(rows)), "label": [0] * rows, "checkpoint": [checkpoint] * rows,
               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * DIM, np.float32)), DIM)}
    pq.write_table(pa.Table.from_pydict(columns, schema=features_schema(DIM)), stage / f"shard-{index:05d}.parquet")
    rejects.mkdir(parents=True, exist_ok=True)
    (rejects / f"shard-{index:05d}.parquet").write_bytes(b"rejects")


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "features", tmp_path / "features_rejects"


SHARDS = [[1, 2], [3, 4], [5]]


def _names(stage) -> list[str]:
    return sorted(p.name for p in stage.glob("shard-*.parquet"))


def test_shards_of_the_same_plan_are_kept(dirs):
    stage, rejects = dirs
    plan = extraction_plan("ckpt-a", 2, SHARDS)
    assert drop_stale_shards(stage, rejects, plan, SHARDS) == []  # nothing yet: the plan is recorded
    assert json.loads((stage / PLAN_FILE).read_text()) == plan
    _shard(stage, rejects, 0, [1, 1, 2], "ckpt-a")
    assert drop_stale_shards(stage, rejects, plan, SHARDS) == [] and _names(stage) == ["shard-00000.parquet"]


@pytest.mark.parametrize("change", ["segmenter", "shard size", "manifest"])
def test_shards_of_another_plan_are_extracted_again(dirs, change):
    stage, rejects = dirs
    drop_stale_shards(stage, rejects, extraction_plan("ckpt-a", 2, SHARDS), SHARDS)
    _shard(stage, rejects, 0, [1, 2], "ckpt-a")
    _shard(stage, rejects, 1, [3], "ckpt-a")
    shards = {"segmenter": SHARDS, "shard size": [[1, 2, 3], [4, 5]], "manifest": [[1, 2], [3, 4], [6]]}[change]
    plan = extraction_plan("ckpt-b" if change == "segmenter" else "ckpt-a", 3 if change == "shard size" else 2, shards)
    dropped = drop_stale_shards(stage, rejects, plan, shards)
    assert sorted(p.name for p in dropped) == ["shard-00000.parquet", "shard-00001.parquet"]
    assert _names(stage) == [] and not list(rejects.iterdir())
    assert json.loads((stage / PLAN_FILE).read_text()) == plan


def test_without_a_recorded_plan_each_shard_is_checked(dirs):
    """An output written before plans were recorded: a shard naming another checkpoint, or
    images of another shard, goes; a matching one stays."""
    stage, rejects = dirs
    _shard(stage, rejects, 0, [1, 2], "ckpt-a")  # matches
    _shard(stage, rejects, 1, [3, 4], "ckpt-old")  # another segmenter
    _shard(stage, rejects, 2, [4, 5], "ckpt-a")  # image 4 is shard 1's
    _shard(stage, rejects, 3, [6], "ckpt-a")  # no such shard now
    dropped = drop_stale_shards(stage, rejects, extraction_plan("ckpt-a", 2, SHARDS), SHARDS)
    assert sorted(p.name for p in dropped) == ["shard-00001.parquet", "shard-00002.parquet", "shard-00003.parquet"]
    assert _names(stage) == ["shard-00000.parquet"] and sorted(p.name for p in rejects.iterdir()) == ["shard-00000.parquet"]
