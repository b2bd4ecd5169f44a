"""Does channels-last memory pay for the segmenter on CPU? (docs/performance.md, "Channels-last")

Builds the segmenter of a config (default configs/demo.yaml) twice from the same seed, one
left in torch's default (contiguous) layout and one moved to ``torch.channels_last`` with
its inputs, and times on ``--threads`` torch threads:

1. whole pretraining steps (forward, loss, backward, AdamW) on one random batch of
   ``--batch`` images at the config's image size, the layout drawn at random per step, so
   both see the same machine;
2. inference forward passes (eval mode, no autograd), the same way, at the config's image
   size (a batch, as extraction and evaluation run it) and at ``--large`` px (one image: a
   model trained at a real size; the demo's endpoint resizes uploads to the model's 64 px).

Prints the medians and the largest difference between the two layouts' outputs. Needs no
run output.

    python benchmarks/memory_format.py [--config configs/demo.yaml] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

LAYOUTS = ("contiguous", "channels_last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps in all (both layouts)")
    parser.add_argument("--forwards", type=int, default=120, help="forward passes in all, per input size")
    parser.add_argument("--large", type=int, default=640, help="the single large image's side, px")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from pading.config import load_config
    from pading.model.segmenter import Segmenter
    from pading.training.pretrain import SegmenterLoss, build_pretrain_optimizer, pretrain_step

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    num_classes, size = 20, config.data.image_size
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 7, (args.batch,), generator=generator).tolist()
    pixels = torch.randn(args.batch, 3, size, size, generator=generator)
    masks = [(torch.rand(n, size, size, generator=generator) > 0.7).float() for n in counts]
    labels = [torch.randint(0, num_classes, (n,), generator=generator) for n in counts]
    large = torch.randn(1, 3, args.large, args.large, generator=generator)

    def layout(tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor.contiguous(memory_format=torch.channels_last) if name == "channels_last" else tensor

    models, optimizers, batches = {}, {}, {}
    for name in LAYOUTS:
        torch.manual_seed(0)
        segmenter = Segmenter(config.segmenter, num_classes)
        if name == "channels_last":
            segmenter = segmenter.to(memory_format=torch.channels_last)
        models[name] = SegmenterLoss(segmenter)
        optimizers[name] = build_pretrain_optimizer(models[name], config.pretrain)
        batches[name] = {"pixel_values": layout(pixels, name), "mask_labels": masks, "class_labels": labels}

    # 1. pretraining steps, the layout drawn at random per step
    choice = random.Random(0)
    steps = {name: [] for name in LAYOUTS}
    for step in range(args.steps):
        name = choice.choice(LAYOUTS)
        started = time.perf_counter()
        pretrain_step(models[name], optimizers[name], batches[name], seeds=[step])
        if step >= 10:  # after the allocator and caches settle
            steps[name].append(time.perf_counter() - started)

    # 2. inference forward passes on fresh copies of the same weights
    forwards = {}
    difference = {}
    for label, inputs in ((f"{args.batch} x {size} px", pixels), (f"1 x {args.large} px", large)):
        torch.manual_seed(0)
        reference = Segmenter(config.segmenter, num_classes).eval()
        segmenters = {"contiguous": reference,
                      "channels_last": copy.deepcopy(reference).to(memory_format=torch.channels_last)}
        times = {name: [] for name in LAYOUTS}
        with torch.inference_mode():
            outputs = {name: segmenters[name](layout(inputs, name)).mask_logits for name in LAYOUTS}
            difference[label] = float((outputs["contiguous"] - outputs["channels_last"]).abs().max())
            for _ in range(args.forwards):
                name = choice.choice(LAYOUTS)
                started = time.perf_counter()
                segmenters[name](layout(inputs, name))
                times[name].append(time.perf_counter() - started)
        forwards[label] = times

    def median_ms(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.1f} ({len(values)})" if values else "-"

    print(f"{args.threads} torch thread(s); median ms (n)")
    print("| layout | pretraining step | " + " | ".join(f"forward, {label}" for label in forwards) + " |")
    print("|---|---|" + "---|" * len(forwards))
    for name in LAYOUTS:
        print(f"| {name} | {median_ms(steps[name])} | "
              + " | ".join(median_ms(times[name]) for times in forwards.values()) + " |")
    print("largest difference between the layouts' mask logits: "
          + ", ".join(f"{label} {value:.1e}" for label, value in difference.items()))


if __name__ == "__main__":
    main()
