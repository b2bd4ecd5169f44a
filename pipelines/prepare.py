"""Stage 1, prepare: annotation index -> validated, seen-only manifest Parquet + rejects.

Ray Data shards the image records, every shard decodes its images and targets
(``pading.data.manifest.validate_rows``); unusable ones go to ``rejects/`` with the reason.
The seen-only filter then drops every train image with an unseen segment.

    python pipelines/prepare.py [--config configs/demo.yaml] [--set ...] [--force]
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa

from pading.classes import ClassTable
from pading.config import ExperimentConfig, computed_settings
from pading.data.manifest import (
    MANIFEST_SCHEMA,
    apply_seen_only_filter,
    class_table_for,
    read_split_index,
    to_rows,
    validate_rows,
)
from pading.run import RunLayout
from pading.run.readers import write_manifest
from pipelines import common

logger = logging.getLogger("pipelines.prepare")



def ensure_dataset(config: ExperimentConfig) -> None:
    """Write the synthetic dataset if the config asks for one and it is not there yet."""
    from pading.data.synthetic import ensure_synthetic_dataset

    ensure_synthetic_dataset(config.data)


# Images per validation actor: prepare adds an actor (up to twice ``ray.extract_concurrency``)
# only for each this many, and below that many the driver validates them itself. Starting an
# actor is a new Python process, about 3 s on a 2-core machine: the demo's 600 images took
# 3.4-3.7 s through one actor and 0.41 s in the driver (docs/performance.md, "Small inputs
# validated in the driver").
VALIDATION_IMAGES_PER_ACTOR = 1000


def validation_actors(images: int, extract_concurrency: int) -> int:
    """The most actors prepare's validation pass may use for ``images`` images: one for each
    :data:`VALIDATION_IMAGES_PER_ACTOR`, at most ``2 * extract_concurrency``; 0 (the driver
    validates them) for fewer than one actor's worth."""
    return min(2 * extract_concurrency, images // VALIDATION_IMAGES_PER_ACTOR)


class _Validate:
    """Ray Data UDF: keep rows whose image and targets load; the rest become rejects."""

    def __init__(self, table_records: list[dict], data_format: str):
        self.table = ClassTable.from_records(table_records)
        self.data_format = data_format

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            # one row at a time: an image id may occur in both splits, so it cannot key the result
            _, bad = validate_rows([row], self.table, self.data_format)
            reject = bad[0] if bad else None
            rows.append({**row, "reject_source": reject["source"] if reject else "",
                         "reject_reason": reject["reason"] if reject else ""})
        schema = MANIFEST_SCHEMA.append(pa.field("reject_source", pa.string())).append(pa.field("reject_reason", pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)


class EmptySplitError(RuntimeError):
    """A split has no usable image: nothing can be trained or evaluated."""


def empty_split_message(empty: list[str], counts: dict, rejects: list[dict], rejects_file: Path) -> str:
    """What went wrong, with the counts and the most common reject reasons."""
    reasons = Counter(r["reason"].split(":")[0][:120] for r in rejects).most_common(3)
    lines = [f"prepare: no usable image in the {' and '.join(empty)} split(s)."]
    for split, c in counts.items():
        lines.append(f"  {split}: {c['images']} usable, {c['rejected']} rejected"
                     + (f", {c['seen_only_filtered']} dropped by the seen-only filter" if split == "train" else ""))
    if reasons:
        lines.append("  most common reject reasons: " + "; ".join(f"{n} x {reason}" for reason, n in reasons))
    lines.append(f"  every reject with its file: {rejects_file}. Check data.root and the "
                 "annotation paths of the config.")
    return "\n".join(lines)


def _validated_by_actors(rows: list[dict], table: ClassTable, data_format: str,
                         actors: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """:func:`validate_rows`' (good rows, rejects) of each split, computed by a Ray Data pool of
    up to ``actors`` :class:`_Validate` actors."""
    import ray

    blocks = max(1, min(200, -(-len(rows) // 32)))  # blocks of at most one 32-row batch, up to 200
    checked = common.row_blocks(rows, blocks).map_batches(
        _Validate, fn_constructor_kwargs=dict(table_records=table.to_records(), data_format=data_format),
        batch_format="pyarrow", batch_size=32, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
    ).to_arrow_refs()
    checked_rows = pa.concat_tables(ray.get(checked)).to_pylist()
    out = {}
    for split in ("train", "val"):
        mine = [r for r in checked_rows if r["split"] == split]
        out[split] = ([{k: v for k, v in r.items() if not k.startswith("reject_")} for r in mine if not r["reject_reason"]],
                      [{"source": r["reject_source"], "key": f"image_id={r['image_id']}", "reason": r["reject_reason"]}
                       for r in mine if r["reject_reason"]])
    return out


def run(config: ExperimentConfig, output: Path, force: bool = False) -> dict:
    stage_dir = RunLayout(output).manifest
    stage = common.Stage("prepare", stage_dir, force, clean=True, settings=computed_settings(config))
    if stage.done:
        return stage.done
    stage.start()
    # Ray's start (its own processes, ~5 s) overlaps the synthetic dataset's writing
    common.init_ray_while(config, lambda: ensure_dataset(config))
    stage_dir.mkdir(parents=True)

    table = None
    all_rejects, rows_by_split = [], {}
    for split in ("train", "val"):
        records, categories, rejects = read_split_index(config.data, split)
        all_rejects.extend(r.to_row() for r in rejects)
        if table is None:
            table = class_table_for(config.data, categories)
        rows_by_split[split] = to_rows(records, table)
        logger.info("prepare: %s: %d records, %d rejected while indexing", split, len(records), len(rejects))

    # One Ray Data pass decodes every image and its targets, in parallel shards (a small input: the driver)
    everything = rows_by_split["train"] + rows_by_split["val"]
    actors = validation_actors(len(everything), config.ray.extract_concurrency)
    if actors:
        checked = _validated_by_actors(everything, table, config.data.format, actors)
    else:  # straight through validate_rows, split by split: no Arrow round trip (docs/performance.md)
        checked = {split: validate_rows(rows, table, config.data.format) for split, rows in rows_by_split.items()}
    counts, good_by_split = {}, {}
    for split in ("train", "val"):
        good, bad = checked[split]
        all_rejects.extend(bad)
        filtered = 0
        if split == "train":
            good, dropped = apply_seen_only_filter(good, table, config.data.unseen_in_train)
            filtered = len(dropped)
        good_by_split[split] = good
        counts[split] = {"images": len(good), "rejected": len(bad), "seen_only_filtered": filtered}
        logger.info("prepare: %s: %d usable images, %d rejected%s", split, len(good), len(bad),
                    f", {filtered} dropped by the seen-only filter" if split == "train" else "")
    write_manifest(output, table, good_by_split, all_rejects)
    for reject in all_rejects:
        logger.warning("reject: %s [%s]: %s", reject["source"], reject["key"], reject["reason"])
    empty = [split for split in ("train", "val") if counts[split]["images"] == 0]
    if empty:  # the stage is not marked finished: a rerun (after fixing the data) redoes it
        raise EmptySplitError(empty_split_message(empty, counts, all_rejects, RunLayout(output).rejects))
    info = {"counts": counts, "rejects": len(all_rejects), "num_classes": table.num_classes,
            "unseen": [c.name for c in table if c.unseen]}
    return stage.finish(info)


def track(info: dict, output: Path) -> None:
    """What the full run records in this stage's MLflow run besides its numbers: the per-split
    counts and the rejects file."""
    import mlflow

    from pading.run import tracking

    tracking.log_metrics(info.get("counts", {}))
    rejects = RunLayout(output).rejects
    if rejects.is_file():
        mlflow.log_artifact(str(rejects))



if __name__ == "__main__":
    common.stage_main(run, __doc__)
