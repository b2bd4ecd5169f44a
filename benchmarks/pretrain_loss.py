"""Mask2Former's pretraining loss: transformers' criterion (one decoder layer and one image
at a time) against pading.model.criterion (every layer and image at once), at the demo's
sizes (docs/performance.md, "The pretraining loss").

Builds the segmenter of a config (default configs/demo.yaml: the 128-wide tiny Mask2Former,
16 queries, 4 decoder layers, 256 points) with random weights and a random batch of
``--batch`` images with 1-6 random segments each, then on one torch thread:

1. the loss alone (forward and backward through the decoder outputs), each criterion
   ``--repeats`` times, taking turns;
2. whole pretraining steps (forward, loss, backward, AdamW), each step using one criterion
   or the other at random, so both see the same machine and the same weights' history.

Prints the medians and the largest difference between the two criteria's terms from the
same seed. Needs no run output.

    python benchmarks/pretrain_loss.py [--config configs/demo.yaml] [--steps 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    import pading.model.segmenter as segmenter_module
    from pading.config import load_config
    from pading.model.criterion import mask2former_loss
    from pading.model.segmenter import Segmenter
    from pading.training.pretrain import SegmenterLoss, build_pretrain_optimizer, pretrain_step

    torch.set_num_threads(1)
    config = load_config(args.config)
    num_classes, size = 20, config.data.image_size
    torch.manual_seed(0)
    segmenter = Segmenter(config.segmenter, num_classes)
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 7, (args.batch,), generator=generator).tolist()
    batch = {
        "pixel_values": torch.randn(args.batch, 3, size, size, generator=generator),
        "mask_labels": [(torch.rand(n, size, size, generator=generator) > 0.7).float() for n in counts],
        "class_labels": [torch.randint(0, num_classes, (n,), generator=generator) for n in counts],
    }
    model = segmenter.mask2former

    def transformers_loss(criterion, weight_dict, mask_logits, class_logits, mask_labels, class_labels):
        auxiliary = [{"masks_queries_logits": m, "class_queries_logits": c}
                     for m, c in zip(mask_logits[:-1], class_logits[:-1])]
        return model.get_loss_dict(masks_queries_logits=mask_logits[-1], class_queries_logits=class_logits[-1],
                                   mask_labels=mask_labels, class_labels=class_labels,
                                   auxiliary_predictions=auxiliary)

    criteria = {"transformers": transformers_loss, "batched": mask2former_loss}

    # 1. the loss alone, on fixed decoder outputs
    segmenter.eval()
    queries, mask_logits = segmenter._decode(batch["pixel_values"], None)
    class_logits = [segmenter.classify(q) for q in queries]
    outputs = [*mask_logits, *class_logits]
    terms = {}
    for name, criterion in criteria.items():
        torch.manual_seed(7)
        terms[name] = criterion(model.criterion, model.weight_dict, mask_logits, class_logits,
                                batch["mask_labels"], batch["class_labels"])
    difference = max(float((terms["batched"][key] - terms["transformers"][key]).detach().abs()) for key in terms["transformers"])
    alone = {name: [] for name in criteria}
    for _ in range(args.repeats):
        for name, criterion in criteria.items():
            started = time.perf_counter()
            losses = criterion(model.criterion, model.weight_dict, mask_logits, class_logits,
                               batch["mask_labels"], batch["class_labels"])
            torch.autograd.grad(sum(losses.values()), outputs, retain_graph=True, allow_unused=True)
            alone[name].append(time.perf_counter() - started)

    # 2. whole steps, the criterion drawn at random per step
    loss_model = SegmenterLoss(segmenter)
    optimizer = build_pretrain_optimizer(loss_model, config.pretrain)
    steps = {name: [] for name in criteria}
    choice = random.Random(0)
    for step in range(args.steps):
        name = choice.choice(list(criteria))
        segmenter_module.mask2former_loss = criteria[name]
        started = time.perf_counter()
        pretrain_step(loss_model, optimizer, batch, seeds=[step])
        if step >= 10:  # after the allocator and caches settle
            steps[name].append(time.perf_counter() - started)
    segmenter_module.mask2former_loss = mask2former_loss

    print(f"| criterion | loss forward + backward, median ms ({args.repeats}) | pretraining step, median ms (n) |")
    print("|---|---|---|")
    for name in criteria:
        print(f"| {name} | {1000 * statistics.median(alone[name]):.1f} | "
              f"{1000 * statistics.median(steps[name]):.1f} ({len(steps[name])}) |")
    print(f"largest difference between the two criteria's terms (same seed): {difference:.2e}")


if __name__ == "__main__":
    main()
