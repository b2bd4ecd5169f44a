"""pipelines/common.py pieces that need no Ray: the epoch order of a training shard."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from pipelines.common import epoch_batches


class StreamingShard:
    """Serves ``table`` through ``iter_batches`` the way a Ray Train shard does, in a
    different row order on every call (as Ray Data's streaming execution may)."""

    def __init__(self, table: pa.Table, seed: int):
        self.table, self.rng, self.calls = table, np.random.default_rng(seed), 0

    def iter_batches(self, batch_size: int, batch_format: str = "pyarrow", local_shuffle_buffer_size=None):
        assert batch_format == "pyarrow"
        self.calls += 1
        shuffled = self.table.take(pa.array(self.rng.permutation(self.table.num_rows)))
        for begin in range(0, shuffled.num_rows, batch_size):
            yield shuffled.slice(begin, batch_size)


def rows(n: int = 23) -> pa.Table:
    image_id = np.repeat(np.arange(n // 2 + 1), 2)[:n]
    return pa.table({"image_id": image_id, "query": np.arange(n) % 2, "value": np.arange(n) * 10})


def take(shard, count: int, seed: int, cache: bool = True) -> list[list[int]]:
    return [b.column("value").to_pylist() for b in itertools.islice(epoch_batches(shard, 5, seed=seed, cache=cache), count)]


def test_cached_epochs_do_not_depend_on_the_streaming_order():
    first = take(StreamingShard(rows(), seed=1), 12, seed=7)
    second = take(StreamingShard(rows(), seed=2), 12, seed=7)
    assert first == second
    assert take(StreamingShard(rows(), seed=1), 12, seed=8) != first  # the seed picks the order


def test_every_cached_epoch_is_a_permutation_and_the_shard_is_read_once():
    shard = StreamingShard(rows(23), seed=0)
    batches = take(shard, 15, seed=0)  # 5 per epoch (5+5+5+5+3 rows)
    assert shard.calls == 1
    epochs = [sum(batches[i : i + 5], []) for i in range(0, 15, 5)]
    for epoch in epochs:
        assert sorted(epoch) == [10 * i for i in range(23)]
    assert epochs[0] != epochs[1]


def test_without_cache_every_epoch_streams_again():
    shard = StreamingShard(rows(10), seed=0)
    batches = take(shard, 6, seed=0, cache=False)  # 2 batches per epoch
    assert shard.calls == 3 and sorted(sum(batches, [])) == sorted(3 * [10 * i for i in range(10)])


def test_an_empty_shard_ends_the_iteration():
    empty = rows(0)
    assert take(StreamingShard(empty, seed=0), 3, seed=0) == []
    assert take(StreamingShard(empty, seed=0), 3, seed=0, cache=False) == []
