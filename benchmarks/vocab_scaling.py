"""How cost grows with the vocabulary: 20, 133, 1,203 (LVIS), 10,000 and 20,000 classes.

For each vocabulary size C this builds a random-initialised bundle (the tiny segmenter with
the r50 query count Q = 100 and size D = 256, the paper's primitive generator K = 400, L = 3, 4,096 reference
embeddings as pipelines/train_generator.py keeps, random unit class embeddings of size 512 as
CLIP gives, ~2/7 of the classes unseen as LVIS's rare share) and times, in this process, with
no Ray:

- generator iteration: one ``GeneratorTrainer.step`` (generator step + classifier step) on a
  batch of 12 images x 100 queries with 150 matched queries, with the full loss
  (docs/method.md, in blocks of ``losses.chunk_size`` pairs, over the default per-step class
  samples) and with ``losses.variant=primitive`` (MMD + auxiliary classification only);
- classifier re-fit: ``SegmentationService._refit`` for one added class (``serve.fit_steps``
  SGD steps of the added rows, the serve defaults);
- add one class: ``SegmentationService.add_classes`` end to end (checks, encoding, expansion,
  re-fit, new bundle swapped in);
- latency: ``SegmentationService.segment`` on one 480x640 image, per task (panoptic is the
  endpoint's default). The semantic task builds the (C, H, W) score volume only up to
  ``SEMANTIC_DENSE_CLASSES`` classes; above that ``semantic_inference`` scores candidate
  classes and falls back to all classes only on undecided pixels (same labels).

Each number is the median of ``--repeats`` runs after one warm-up, as wall-clock seconds and
as this process's CPU seconds (with one torch thread, CPU time is the work done; on a shared
machine it moves less than wall time).

    python benchmarks/vocab_scaling.py [--sizes 20 133 1203 10000] [--repeats 3] [--threads 2]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import time

import numpy as np
import torch

from pading.bundle import Bundle
from pading.classes import ClassInfo, ClassTable
from pading.config import tiny_config
from pading.model.classifier import Classifier
from pading.model.generator import build_generator
from pading.model.segmenter import Segmenter
from pading.serving.service import SegmentationService
from pading.training.generator import GeneratorTrainer

SEMANTIC_DIM = 512  # CLIP ViT-B/16
EMBED_DIM = 256  # the r50 Mask2Former's query size
QUERIES = 100  # the r50 query count (the generator batch: queries of 12 images)
BATCH_IMAGES = 12
MATCHED = 150  # matched queries in a batch of 12 images
REFERENCE_ROWS = 4096  # pipelines/train_generator.py
NO_OBJECT_BIAS = -8.0  # every query picks a class, so the random model still yields segments
IMAGE_SHAPE = (480, 640, 3)


def vocabulary(num_classes: int) -> ClassTable:
    """``num_classes`` synthetic classes: 3 of 5 things, 2 of 7 unseen."""
    return ClassTable(tuple(ClassInfo(id=i + 1, name=f"class {i}", isthing=i % 5 < 3, unseen=i % 7 < 2)
                            for i in range(num_classes)))


def unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, SEMANTIC_DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build(num_classes: int, seed: int = 0):
    """(bundle, config, semantics) of a random-initialised model over ``num_classes`` classes."""
    config = tiny_config(
        segmenter={"hidden_dim": EMBED_DIM, "num_queries": QUERIES},
        generator={"num_primitives": 400, "num_layers": 3, "num_heads": 8, "feedforward_dim": 1024},
        inference={"object_mask_threshold": 0.0, "overlap_threshold": 0.0},
        data={"image_size": 256},
    )
    rng = np.random.default_rng(seed)
    table = vocabulary(num_classes)
    semantics = unit_rows(rng, num_classes)  # (C, S)
    torch.manual_seed(seed)
    segmenter = Segmenter(config.segmenter, table.num_classes).eval()
    classifier = Classifier.from_class_head(segmenter.class_head)
    with torch.no_grad():
        classifier.linear.bias[-1] = NO_OBJECT_BIAS
    generator = build_generator(config.generator, SEMANTIC_DIM, EMBED_DIM).eval()
    reference = rng.standard_normal((REFERENCE_ROWS, EMBED_DIM)).astype(np.float32)
    labels = rng.choice(table.seen_indices + [table.no_object_index], size=REFERENCE_ROWS).astype(np.int64)
    bundle = Bundle(config, table, semantics, "random", segmenter, classifier.eval(), generator, config.generator,
                    reference, labels)
    return bundle, config, semantics


def timed(function, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls after one warm-up call."""
    function()
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def cell(seconds: tuple[float, float] | str, scale: float = 1.0, digits: int = 2) -> str:
    """``wall (cpu)`` or the reason a measurement was skipped."""
    if isinstance(seconds, str):
        return seconds
    return f"{seconds[0] * scale:.{digits}f} ({seconds[1] * scale:.{digits}f})"


def generator_iteration(bundle: Bundle, config, semantics: np.ndarray, repeats: int) -> tuple[float, float]:
    table = bundle.table
    trainer = GeneratorTrainer(table, torch.as_tensor(semantics), EMBED_DIM, config,
                               class_head=bundle.classifier.linear)
    rng = np.random.default_rng(1)
    rows = BATCH_IMAGES * QUERIES
    embeddings = torch.as_tensor(rng.standard_normal((rows, EMBED_DIM)).astype(np.float32))
    labels = np.full(rows, table.no_object_index, dtype=np.int64)
    labels[rng.choice(rows, MATCHED, replace=False)] = rng.choice(table.seen_indices, MATCHED)
    labels = torch.as_tensor(labels)
    return timed(lambda: trainer.step(embeddings, labels), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 133, 1203, 10000, 20000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadiest on a shared machine)")
    parser.add_argument("--tasks", nargs="+", default=["panoptic", "instance", "semantic"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(2).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)
    header = ["classes", "generator iter, full (s)", "generator iter, MMD only (s)", "classifier re-fit (s)",
              "add 1 class (s)"]
    header += [f"latency {task} (ms/image)" for task in args.tasks]
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; D={EMBED_DIM}, "
          f"S={SEMANTIC_DIM}, Q={QUERIES}, K=400 primitives, image {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[0]}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    for size in args.sizes:
        bundle, config, semantics = build(size)
        generator_full = generator_iteration(bundle, config, semantics, args.repeats)
        mmd_only = dataclasses.replace(config, losses=dataclasses.replace(config.losses, variant="primitive"))
        generator_mmd = generator_iteration(bundle, mmd_only, semantics, args.repeats)
        rng = np.random.default_rng(3)
        service = SegmentationService(bundle, encode_fn=lambda names: unit_rows(rng, len(names)))
        new_table = bundle.table.with_classes([ClassInfo(id=10**7, name="benchmark class", isthing=True, unseen=True,
                                                         added=True)])
        new_semantics = np.concatenate([semantics, unit_rows(rng, 1)])
        refit_s = timed(lambda: service._refit(bundle, new_table, new_semantics), args.repeats)
        counter = iter(range(10**6))
        add_s = timed(lambda: service.add_classes([f"added class {next(counter)}"]), args.repeats)
        latencies = []
        for task in args.tasks:
            latencies.append(cell(timed(lambda: service.segment([image], task=task), args.repeats), 1000, 0))
        row = [f"{size:,}", cell(generator_full), cell(generator_mmd), cell(refit_s), cell(add_s)] + latencies
        rows.append(row)
        print("  " + " | ".join(row), flush=True)
    print()
    print(f"wall-clock seconds (CPU seconds); load average at the end {os.getloadavg()[0]:.1f}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
