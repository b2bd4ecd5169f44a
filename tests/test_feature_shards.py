"""The features shards between the stages, on files, without Ray.

- The extract stage keeps a finished shard only for the plan that wrote it (pipelines/extract.py:
  the segmenter's checksum, the shard size, the manifest's shards), so resuming after
  pretraining again, or with another shard size, never mixes two segmenters' features or
  leaves images out or in twice.
- The generator stage's workers share the shards out by rows (pipelines/train_generator.py):
  every shard to exactly one worker, the same split on every worker, balanced rows, and a
  clear stop when a worker would have none."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.extract import PLAN_FILE, drop_stale_shards, extraction_plan
from pipelines.train_generator import shard_files_of

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


# ---- the generator's workers ------------------------------------------------------------------


def test_the_generator_workers_share_the_shards_out_by_rows(dirs):
    stage, rejects = dirs
    sizes = [9, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # dealt by index (r, r+W, ...) worker 0 would get 13 rows, worker 1 only 5
    for index, size in enumerate(sizes):
        _shard(stage, rejects, index, list(range(100 * index, 100 * index + size)), "ckpt")
    everything = sorted(stage.glob("shard-*.parquet"))
    assert shard_files_of(stage, 0, 1) == everything
    split = [shard_files_of(stage, rank, 2) for rank in range(2)]
    assert sorted(split[0] + split[1]) == everything and not set(split[0]) & set(split[1])
    rows = [sum(pq.ParquetFile(path).metadata.num_rows for path in part) for part in split]
    assert rows == [9, 9]
    assert [shard_files_of(stage, rank, 2) for rank in range(2)] == split  # the same on every worker
    three = [shard_files_of(stage, rank, 3) for rank in range(3)]
    assert sorted(sum(three, [])) == everything and max(map(len, three)) - min(map(len, three)) <= 6


def test_a_generator_worker_without_rows_stops_the_stage_with_a_message(dirs):
    stage, rejects = dirs
    _shard(stage, rejects, 0, [1, 2, 3], "ckpt")
    _shard(stage, rejects, 1, [], "ckpt")  # every image of this shard was rejected
    with pytest.raises(RuntimeError, match="1 features shard.s. with rows for 2 workers"):
        shard_files_of(stage, 0, 2)
    assert shard_files_of(stage, 0, 1) == sorted(stage.glob("shard-*.parquet"))


def test_the_bundles_reference_rows_are_drawn_over_all_rows():
    from pipelines.train_generator import REFERENCE_ROWS, reference_rows

    assert reference_rows(10, seed=0).tolist() == list(range(10))
    drawn = reference_rows(10 * REFERENCE_ROWS, seed=0)
    assert len(drawn) == len(set(drawn.tolist())) == REFERENCE_ROWS and (drawn[1:] > drawn[:-1]).all()
    assert drawn.max() > 5 * REFERENCE_ROWS  # not the first rows only
    assert drawn.tolist() == reference_rows(10 * REFERENCE_ROWS, seed=0).tolist()  # the same for a seed
