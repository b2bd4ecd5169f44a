"""The segmenter's forward pass on eager torch against ONNX Runtime on CPU, as
pading.model.runtime exports and runs it (docs/performance.md, "The inference runtime").

Loads a bundle, exports its segmenter once the way extraction, evaluation, the endpoint and
pipelines/segment.py do (pixels -> last-layer mask logits and query embeddings, a dynamic
batch dimension; the class head stays in torch), and times both runtimes on the same random
batch at the bundle's input size, one thread each, for each batch size given. Also times
``SegmentationService.segment`` on one image on each runtime (decode, forward,
post-processing, encoding). Prints a Markdown table, the export time, the time to open the
same model from the export cache in a fresh copy of the bundle (a temporary cache, so the
first export is a real one), and the largest output difference.

    python benchmarks/onnx_forward.py --bundle outputs/demo/generator/bundle [--batch-sizes 1 8 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def median_ms(work, repeats: int) -> float:
    for _ in range(3):
        work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    from PIL import Image

    from pading.bundle import Bundle
    from pading.model import runtime
    from pading.serving.service import SegmentationService

    torch.set_num_threads(1)
    cache = tempfile.TemporaryDirectory()
    os.environ[runtime.CACHE_ENV] = cache.name  # empty: the first export below is a real one
    size = Bundle.load(args.bundle).config.data.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG")
    path_ms, services = {}, {}
    for name in ("torch", "onnxruntime"):
        bundle = Bundle.load(args.bundle, map_location="cpu")
        started = time.perf_counter()
        service = services[name] = SegmentationService(bundle, dataclasses.replace(bundle.config.serve, runtime=name))
        if name == "onnxruntime":
            export_s = time.perf_counter() - started
        path_ms[name] = median_ms(lambda service=service: service.segment([service.decode(encoded.getvalue())],
                                                                           ["panoptic"], ["json"]), args.repeats)
    fresh = Bundle.load(args.bundle, map_location="cpu")  # another process over the same weights
    started = time.perf_counter()
    runtime.use_runtime(fresh.segmenter, "onnxruntime", size)
    cached_s = time.perf_counter() - started
    cache.cleanup()
    eager = services["torch"].bundle.segmenter
    exported = services["onnxruntime"].bundle.segmenter.inference_runtime
    layer = runtime._LastLayer(eager).eval()
    rows = []
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            pixels = torch.randn(batch_size, 3, size, size)
            difference = max(float((a - b).abs().max()) for a, b in zip(exported(pixels), layer(pixels)))
            rows.append((batch_size, median_ms(lambda pixels=pixels: layer(pixels), args.repeats),
                         median_ms(lambda pixels=pixels: exported(pixels), args.repeats), difference))
    print(f"\nsegmenter forward at {size} px, one thread ({args.bundle}); the export, its probe and the session: "
          f"{export_s:.2f} s (from the export cache in a fresh copy of the bundle: {cached_s:.2f} s); the whole per-image path (SegmentationService.segment, one {size} px JPEG): "
          f"{path_ms['torch']:.1f} ms on torch, {path_ms['onnxruntime']:.1f} ms on ONNX Runtime\n")
    print("| batch | torch ms | ONNX Runtime ms | speed-up | largest difference |")
    print("|---|---|---|---|---|")
    for batch_size, eager_ms, runtime_ms, difference in rows:
        print(f"| {batch_size} | {eager_ms:.2f} | {runtime_ms:.2f} | {eager_ms / runtime_ms:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
