"""The query-embedding table (stage 2's product) as arrays, and the one batch regime that
every generator training run uses: the Ray Train stage, every Tune trial and every tables
row (docs/architecture.md, "Distributed training").

Batches are *epochs of seeded permutations* of the rows sorted by ``(image_id, query)``:
the order is a function of ``(seed, step)`` only, so a run repeats exactly, a resumed run
sees the batches the uninterrupted run would have seen, and Ray Data's streaming order
(which changes from run to run) never matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from pading.errors import DataError

FEATURE_FILES = "shard-*.parquet"


@dataclass
class FeatureArrays:
    """Rows of a features table as arrays (picklable; zero-copy in Ray's object store).

    Attributes:
        embeddings: (N, D) float32 query embeddings.
        labels: (N,) int64 matched class index, ``table.no_object_index`` for no object.
        image_ids: (N,) int64 image of each row.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray

    def __post_init__(self):
        if self.embeddings.ndim != 2 or self.labels.shape != self.embeddings.shape[:1] or \
                self.image_ids.shape != self.labels.shape:
            raise DataError("features", f"expected embeddings (N, D), labels (N,) and image_ids (N,), got "
                                        f"{self.embeddings.shape}, {self.labels.shape}, {self.image_ids.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, rows: np.ndarray) -> "FeatureArrays":
        """The rows where the boolean mask (N,) (or index array) ``rows`` selects."""
        return FeatureArrays(self.embeddings[rows], self.labels[rows], self.image_ids[rows])


def feature_files(directory: str | Path) -> list[Path]:
    """The features shards of ``directory``, sorted by name."""
    files = sorted(Path(directory).glob(FEATURE_FILES))
    if not files:
        raise DataError(str(directory), "no features shards (shard-*.parquet); run the extract stage first")
    return files


def read_features(source: str | Path | Sequence[str | Path]) -> FeatureArrays:
    """Read a features directory (every shard) or a list of shard files, rows sorted by
    ``(image_id, query)`` (pading.run.extraction's schema)."""
    files = feature_files(source) if isinstance(source, (str, Path)) else [Path(f) for f in source]
    if not files:
        raise DataError("features", "no features shards to read")
    table = pq.read_table(files, columns=["image_id", "query", "embedding", "label"])
    order = np.lexsort((table.column("query").to_numpy(), table.column("image_id").to_numpy()))
    embedding_column = table.column("embedding").combine_chunks()
    embed_dim = embedding_column.type.list_size
    flat = embedding_column.flatten().to_numpy(zero_copy_only=False)
    return FeatureArrays(
        embeddings=np.asarray(flat, dtype=np.float32).reshape(-1, embed_dim)[order],  # (N, D)
        labels=table.column("label").to_numpy().astype(np.int64)[order],
        image_ids=table.column("image_id").to_numpy().astype(np.int64)[order],
    )


def features_from_rows(rows: Sequence[dict]) -> FeatureArrays:
    """Feature rows of :func:`pading.run.extraction.extract_features` -> arrays."""
    if not rows:
        raise DataError("features", "no feature rows")
    return FeatureArrays(
        embeddings=np.stack([np.asarray(r["embedding"], dtype=np.float32) for r in rows]),
        labels=np.asarray([r["label"] for r in rows], dtype=np.int64),
        image_ids=np.asarray([r["image_id"] for r in rows], dtype=np.int64),
    )


def epoch_indices(num_rows: int, batch_size: int, seed: int, start_step: int = 0,
                  drop_last: bool = False) -> Iterator[np.ndarray]:
    """Endless batches of row indices: every epoch is a permutation of ``range(num_rows)``
    drawn from ``seed`` and cut into ``ceil(num_rows / batch_size)`` batches (the last may
    be shorter; with ``drop_last`` it is left out, every batch is full). Starts at batch
    ``start_step`` of that sequence (for resuming)."""
    if num_rows < 1 or batch_size < 1 or (drop_last and num_rows < batch_size):
        raise DataError("batches", f"{num_rows} rows cannot make batches of {batch_size}")
    rng = np.random.default_rng(seed)
    per_epoch = num_rows // batch_size if drop_last else -(-num_rows // batch_size)
    step = 0
    while True:
        order = rng.permutation(num_rows)
        for begin in range(0, per_epoch * batch_size if drop_last else num_rows, batch_size):
            if step >= start_step:
                yield order[begin : begin + batch_size]
            step += 1
        if step < start_step:  # skip whole epochs quickly (the permutation must still be drawn)
            skip = (start_step - step) // per_epoch
            for _ in range(skip):
                rng.permutation(num_rows)
            step += skip * per_epoch


def data_order_seed(seed: int, rank: int = 0) -> int:
    """The seed of worker ``rank``'s batch order in generator training: the run's ``seed`` for
    rank 0 (a one-worker stage and the search draw the same batches), ``seed + rank`` for the
    others (each worker shuffles its own shards differently). The one place this is decided."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return seed + rank


def feature_batches(features: FeatureArrays, rows_per_step: int, seed: int, start_step: int = 0, *,
                    rank: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(embeddings (n, D) float32, labels (n,) int64)`` batches of :func:`epoch_indices`,
    in worker ``rank``'s order (:func:`data_order_seed`)."""
    if len(features) == 0:
        raise DataError("features", "no training rows")
    for rows in epoch_indices(len(features), rows_per_step, data_order_seed(seed, rank), start_step):
        rows = np.sort(rows)
        yield torch.from_numpy(features.embeddings[rows]), torch.from_numpy(features.labels[rows])


def label_range(files: Sequence[str | Path]) -> tuple[int, int, int]:
    """(rows, smallest label, largest label) of features shards, reading only their label column."""
    rows, low, high = 0, None, None
    for path in files:
        labels = pq.read_table(path, columns=["label"]).column("label").to_numpy()
        if labels.size:
            rows += int(labels.size)
            low = int(labels.min()) if low is None else min(low, int(labels.min()))
            high = int(labels.max()) if high is None else max(high, int(labels.max()))
    return rows, (0 if low is None else low), (0 if high is None else high)


def with_no_object_index(features: FeatureArrays, old: int, new: int) -> FeatureArrays:
    """``features`` with the "no object" label ``old`` renamed ``new`` (classes appended to the
    vocabulary after extraction move the no-object index; the class labels stay)."""
    if old == new:
        return features
    labels = np.where(features.labels == old, new, features.labels)
    return FeatureArrays(features.embeddings, labels, features.image_ids)
