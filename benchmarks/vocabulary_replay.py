"""How long a replica takes to start on a long vocabulary chain, with and without snapshots.

Commits ``--versions`` one-class additions (random vectors and classifier rows of the bundle's
sizes) to a fresh directory store, then times a replica's construction
(``SegmentationService(Bundle.load(...), store=...)``), which replays the chain:

- ``no snapshot``: the whole chain from version 1, as a store without snapshots replays it;
- ``snapshot``: after the replica commits a snapshot of the whole vocabulary (what
  ``serve.vocabulary_snapshot_every`` does every that many versions) and ``--after`` more
  one-class versions are committed, a new replica reads the snapshot and those versions only.

Both replicas must end with the same classes and classifier rows; the script checks it.

    python benchmarks/vocabulary_replay.py --bundle outputs/demo/generator/bundle [--versions 3000] [--after 999]

Prints one line per case and a last line of JSON ``{"no snapshot": s, "snapshot": s,
"snapshot write": s}`` (seconds: the median of ``--repeats`` constructions, and the one
snapshot's commit).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pading.bundle import Bundle
from pading.serving.service import SegmentationService
from pading.serving.vocabularies import BASE, Change, VocabularyStore


def commit_additions(store: VocabularyStore, bundle: Bundle, first: int, count: int, seed: int) -> None:
    """``count`` one-class ``add`` versions on top of version ``first``."""
    semantics_size = bundle.class_semantics.shape[1]
    rows = bundle.classifier.linear.weight.shape[1]
    record = bundle.table.to_records()[0]
    rng = np.random.default_rng(seed)
    for k in range(count):
        class_id = 100_000 + first + k
        store.commit(BASE, first + k, Change(
            "add", classes=[{**record, "id": class_id, "name": f"class {class_id}", "unseen": True, "added": True}],
            semantics=rng.normal(size=(1, semantics_size)).astype(np.float32),
            weight=rng.normal(size=(1, rows)).astype(np.float32), bias=np.zeros(1, np.float32)))


def start(bundle_dir: str, store: VocabularyStore, repeats: int) -> tuple[float, SegmentationService]:
    times, service = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        service = SegmentationService(Bundle.load(bundle_dir), store=store)
        times.append(time.perf_counter() - started)
    return statistics.median(times), service


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="outputs/demo/generator/bundle")
    parser.add_argument("--versions", type=int, default=3000, help="one-class versions before the snapshot")
    parser.add_argument("--after", type=int, default=999, help="one-class versions after the snapshot")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    bundle = Bundle.load(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        store = VocabularyStore(Path(tmp) / "vocabularies")
        commit_additions(store, bundle, 0, args.versions, seed=0)
        full, writer = start(args.bundle, store, args.repeats)
        print(f"no snapshot: {full:.2f} s to start on {args.versions} versions "
              f"({writer.bundle.table.num_classes} classes)")
        started = time.perf_counter()  # what the change that triggers a snapshot pays on top
        snapshot = store.commit(BASE, writer.state.version, writer._snapshot(writer.state))
        writing = time.perf_counter() - started
        print(f"snapshot written in {writing:.2f} s ({len(snapshot.classes)} run-time classes)")
        commit_additions(store, bundle, snapshot.version, args.after, seed=1)
        store.snapshots = False  # the replica below must not add snapshots of its own
        replay_all = store.snapshot_version
        store.snapshot_version = lambda name, upto: 0
        _, whole = start(args.bundle, store, 1)  # the whole chain: the reference state
        store.snapshot_version = replay_all
        with_snapshot, reader = start(args.bundle, store, args.repeats)
        same = (reader.bundle.table.to_records() == whole.bundle.table.to_records()
                and torch.equal(reader.bundle.classifier.linear.weight, whole.bundle.classifier.linear.weight)
                and np.array_equal(reader.bundle.class_semantics, whole.bundle.class_semantics))
        if not same:
            raise SystemExit("the replica started from the snapshot differs from the whole chain's replay")
        print(f"snapshot: {with_snapshot:.2f} s to start on a snapshot at version {snapshot.version} and "
              f"{args.after} versions after it ({reader.bundle.table.num_classes} classes; the same classes and "
              "rows as replaying the whole chain)")
    print(json.dumps({"no snapshot": round(full, 3), "snapshot": round(with_snapshot, 3),
                      "snapshot write": round(writing, 3)}))


if __name__ == "__main__":
    main()
