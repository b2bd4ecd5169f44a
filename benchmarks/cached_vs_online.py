"""The cached-feature design against the authors' design, at the paper's sizes.

The authors' release runs the frozen segmenter on the step's images in *every* generator
iteration (forward + Hungarian matching of 12 images), then one generator step and one
classifier step. This project runs the segmenter once per training image (stage 2, the
features Parquet) and trains from those rows. Both loops below do the same generator math
(pading.training.generator.GeneratorTrainer.step): d = 256, K = 400 primitives, 3 layers, the 133
COCO panoptic classes + "no object" (ZSP split), 12 images x 100 queries a step; the
segmenter is the R50 preset (ResNet-50, 100 queries, 10 decoder layers) at ``--image-size``.

    python benchmarks/cached_vs_online.py [--iterations 1000] [--online-iterations 20] [--image-size 128]

Prints seconds per iteration of each design, their ratio, the one-time extraction cost per
image of the cached design and the totals for ``--iterations``. The online design is timed
over ``--online-iterations`` (it is the slow one) and its total extrapolated, as printed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pading.classes import ClassTable
from pading.config import tiny_config
from pading.model.matching import assign_query_labels
from pading.model.segmenter import Segmenter, prepare_batch
from pading.training.generator import GeneratorTrainer

IMAGES_PER_STEP = 12
MATCHED_PER_IMAGE = 8  # segments per COCO image, roughly


def synthetic_images(count: int, size: int, num_classes: int, rng: np.random.Generator):
    """Random RGB images with MATCHED_PER_IMAGE rectangular segments of random classes."""
    images, targets = [], []
    for _ in range(count):
        images.append(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        masks = np.zeros((MATCHED_PER_IMAGE, size, size), dtype=bool)
        for m in range(MATCHED_PER_IMAGE):
            y, x = rng.integers(0, size // 2, 2)
            masks[m, y : y + size // 4, x : x + size // 4] = True
        targets.append((masks, rng.integers(0, num_classes, MATCHED_PER_IMAGE)))
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000, help="cached-design iterations (timed in full)")
    parser.add_argument("--online-iterations", type=int, default=20, help="online-design iterations timed")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    table = ClassTable.from_split("zsp_coco_panoptic_14")
    config = tiny_config(segmenter={"preset": "r50"},
                         generator={"num_primitives": 400, "num_layers": 3, "num_heads": 8, "feedforward_dim": 1024},
                         generator_training={"iterations": args.iterations, "batch_images": IMAGES_PER_STEP})
    queries, dim = config.segmenter.num_queries, config.segmenter.hidden_dim
    semantics = torch.randn(table.num_classes, 512)  # CLIP-sized class embeddings
    segmenter = Segmenter(config.segmenter, table.num_classes).eval()
    seen = torch.tensor(table.seen_indices)

    def matched_labels(images, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """The authors' per-iteration work: segmenter forward + Hungarian matching."""
        batch = prepare_batch(images, args.image_size, targets)
        with torch.no_grad():
            output = segmenter(batch["pixel_values"])
            labels = [assign_query_labels(output.class_logits[i], output.mask_logits[i], batch["class_labels"][i],
                                          batch["mask_labels"][i], class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                                          no_object_index=table.no_object_index, num_points=12544)
                      for i in range(len(images))]
        return output.query_embeddings.reshape(-1, dim), torch.cat(labels)

    # cached design: rows as stage 2 writes them, one trainer step per iteration
    rows = IMAGES_PER_STEP * queries
    labels = torch.full((rows,), table.no_object_index)
    labels[torch.randperm(rows)[: IMAGES_PER_STEP * MATCHED_PER_IMAGE]] = seen[
        torch.randint(0, len(seen), (IMAGES_PER_STEP * MATCHED_PER_IMAGE,))]
    embeddings = torch.nn.functional.layer_norm(torch.randn(rows, dim), (dim,))
    trainer = GeneratorTrainer(table, semantics, dim, config)
    trainer.step(embeddings, labels)  # warm-up
    started = time.perf_counter()
    for _ in range(args.iterations):
        trainer.step(embeddings, labels)
    cached = (time.perf_counter() - started) / args.iterations

    # one-time extraction cost of the cached design, per image
    images, targets = synthetic_images(IMAGES_PER_STEP, args.image_size, len(seen), rng)
    targets = [(m, seen[torch.as_tensor(c)].numpy()) for m, c in targets]
    matched_labels(images, targets)  # warm-up
    started = time.perf_counter()
    matched_labels(images, targets)
    extraction_per_image = (time.perf_counter() - started) / IMAGES_PER_STEP

    # online design: segmenter forward + matching on 12 images every iteration, then the same step
    trainer = GeneratorTrainer(table, semantics, dim, config)
    started = time.perf_counter()
    for _ in range(args.online_iterations):
        step_embeddings, step_labels = matched_labels(images, targets)
        trainer.step(step_embeddings, step_labels)
    online = (time.perf_counter() - started) / args.online_iterations

    print(f"R50 Mask2Former at {args.image_size} px, {IMAGES_PER_STEP} images x {queries} queries a step, "
          f"d={dim}, K=400, 3 layers, {table.num_classes} classes + no object, {args.threads} torch threads")
    print("| design | s / iteration | iterations timed | total for %d iterations |" % args.iterations)
    print("|---|---|---|---|")
    print(f"| cached features (this project) | {cached:.4f} | {args.iterations} | {cached * args.iterations:.0f} s "
          f"+ extraction {extraction_per_image:.3f} s per training image, once |")
    print(f"| segmenter every step (authors) | {online:.4f} | {args.online_iterations} | "
          f"{online * args.iterations:.0f} s (extrapolated) |")
    print(f"ratio (per iteration): {online / cached:.1f}x")


if __name__ == "__main__":
    main()
