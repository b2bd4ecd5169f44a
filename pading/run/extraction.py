"""Stage 2: query embeddings of the frozen segmenter, matched to ground truth, as rows
of the features table (docs/architecture.md "Stages and their products"). :class:`FeatureExtractor` is the
callable class that pipelines/extract.py hands to Ray Data ``map_batches``."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pading.classes import ClassTable
from pading.config import ExperimentConfig
from pading.data.manifest import REJECTS_SCHEMA, load_sample
from pading.errors import DataError
from pading.io import write_parquet_atomic
from pading.model.matching import assign_query_labels
from pading.model.runtime import use_runtime
from pading.model.segmenter import Segmenter, prepare_batch

logger = logging.getLogger(__name__)


def features_schema(embed_dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("query", pa.int32()),
            ("embedding", pa.list_(pa.float32(), embed_dim)),
            ("label", pa.int32()),
            ("checkpoint", pa.string()),
        ]
    )


@torch.no_grad()
def extract_features(
    segmenter: Segmenter,
    rows: Sequence[dict],
    table: ClassTable,
    config: ExperimentConfig,
    checkpoint_id: str,
    batch_size: int = 8,
) -> tuple[list[dict], list[dict]]:
    """Query embeddings and matched labels of every query of every image in ``rows``.

    Returns ``(feature rows, reject rows)``: Q feature rows per image that loaded
    (``label`` = matched class index or ``table.no_object_index``), one reject per
    image that did not.
    """
    segmenter.eval()
    device = next(segmenter.parameters()).device
    seg = config.segmenter
    features, rejects = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images, targets, ids, sources = [], [], [], []
        for row in chunk:
            try:
                image, target = load_sample(row, table, config.data.format)
            except DataError as err:
                rejects.append({"source": err.source, "key": f"image_id={row.get('image_id')}", "reason": err.reason})
                continue
            target = target.without_crowd()
            images.append(image)
            targets.append((target.masks, target.labels))
            ids.append(int(row["image_id"]))
            sources.append(str(row.get("image_path")))
        if not images:
            continue
        batch = prepare_batch(images, config.data.image_size, targets, sources=sources)
        output = segmenter(batch["pixel_values"].to(device))
        for i, image_id in enumerate(ids):
            generator = torch.Generator().manual_seed(int(image_id))
            labels = assign_query_labels(
                output.class_logits[i],  # (Q, C+1)
                output.mask_logits[i],  # (Q, S/4, S/4)
                batch["class_labels"][i].to(device),  # (N,)
                batch["mask_labels"][i].to(device),  # (N, S, S)
                class_weight=seg.class_weight,
                mask_weight=seg.mask_weight,
                dice_weight=seg.dice_weight,
                num_points=seg.train_num_points,
                generator=generator,
                no_object_index=table.no_object_index,
            )  # (Q,)
            embeddings = output.query_embeddings[i].float().cpu().numpy()  # (Q, D)
            for q in range(embeddings.shape[0]):
                features.append(
                    {
                        "image_id": image_id,
                        "query": q,
                        "embedding": embeddings[q],
                        "label": int(labels[q]),
                        "checkpoint": checkpoint_id,
                    }
                )
    return features, rejects


def shard_rows_blob(rows: Sequence[dict]) -> bytes:
    """One shard's manifest rows as the ``"rows"`` value of a :class:`FeatureExtractor` batch."""
    return pickle.dumps(list(rows), protocol=pickle.HIGHEST_PROTOCOL)


class FeatureExtractor:
    """Holds the frozen segmenter; each call extracts whole shards and writes one
    Parquet file per shard (``shard-00012.parquet``), skipping shards already written.
    Images that fail to load go to ``<output_dir>_rejects/``.

    Input batch: ``{"shard": [int], "image_ids": [[int, ...]]}``, and with ``"rows"``
    (:func:`shard_rows_blob` of each shard's manifest rows) when the extractor was made
    without ``manifest_rows``: a stage at scale hands each actor its shards' rows, not the
    whole manifest. Output batch: one row per shard with its row and reject counts.
    Idempotent: a shard file exists only once complete, so re-running after an
    interruption redoes only missing shards.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        segmenter_dir: str,
        table_records: list[dict],
        manifest_rows: list[dict] | None,
        output_dir: str,
        checkpoint_id: str,
        device: str | None = None,
        images: int | None = None,
    ):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = config
        self.table = ClassTable.from_records(table_records)
        self.segmenter = Segmenter.load(segmenter_dir, map_location=self.device).to(self.device).eval()
        # images: this actor's share of the stage, when known (auto stays on torch for a small one)
        self.runtime = use_runtime(self.segmenter, config.inference.runtime, config.data.image_size, images)
        self.rows = {int(r["image_id"]): r for r in manifest_rows or ()}
        self.output_dir = Path(output_dir)
        self.rejects_dir = self.output_dir.parent / f"{self.output_dir.name}_rejects"
        self.checkpoint_id = checkpoint_id
        self.schema = features_schema(config.segmenter.hidden_dim)

    def shard_path(self, shard: int) -> Path:
        return self.output_dir / f"shard-{shard:05d}.parquet"

    def __call__(self, batch: dict) -> dict:
        shards, counts, reject_counts = [], [], []
        for k, (shard, image_ids) in enumerate(zip(batch["shard"], batch["image_ids"])):
            shard = int(shard)
            path = self.shard_path(shard)
            if path.is_file():
                shards.append(shard)
                counts.append(pq.ParquetFile(path).metadata.num_rows)
                reject_counts.append(0)
                continue
            rows = pickle.loads(batch["rows"][k]) if "rows" in batch else [self.rows[int(i)] for i in image_ids]
            features, rejects = extract_features(
                self.segmenter, rows, self.table, self.config, self.checkpoint_id,
                batch_size=self.config.ray.extract_batch_size,
            )
            if rejects:
                write_parquet_atomic(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
                                     self.rejects_dir / f"shard-{shard:05d}.parquet")
            columns = {name: [f[name] for f in features] for name in self.schema.names}
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(columns["embedding"]) if features else np.zeros(0, np.float32)),
                self.config.segmenter.hidden_dim,
            )
            write_parquet_atomic(pa.Table.from_pydict(columns, schema=self.schema), path)
            logger.info("shard %d: %d images -> %d feature rows", shard, len(rows), len(features))
            shards.append(shard)
            counts.append(len(features))
            reject_counts.append(len(rejects))
        return {"shard": np.array(shards), "rows": np.array(counts), "rejects": np.array(reject_counts)}
