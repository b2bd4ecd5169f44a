"""The segmenter's forward pass in torch against ONNX Runtime on CPU: is a faster inference
runtime worth adopting for extraction, evaluation, the endpoint and pipelines/segment.py?

Exports a bundle's segmenter once (pixel values -> mask logits and query embeddings, with a
dynamic batch dimension; the class head stays in torch, because added classes replace it at
run time) with ``torch.onnx.export`` and times both runtimes on the same random batch at the bundle's input size, one thread each,
for each batch size given. Also times ``SegmentationService.segment`` on one image (decode,
forward, post-processing, encoding) to show the forward pass's share of the per-image path.
Prints a Markdown table and the largest output difference.

Needs ``pip install onnxruntime onnxscript`` (not dependencies of the project).

    python benchmarks/onnx_forward.py --bundle outputs/demo/generator/bundle [--batch-sizes 1 8 32]
"""

from __future__ import annotations

import argparse
import io
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


class _Forward(torch.nn.Module):
    """The part of the segmenter that ONNX Runtime would run: (B, 3, S, S) -> mask logits, queries."""

    def __init__(self, segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values):
        queries, masks = self.segmenter._decode(pixel_values, None)
        return masks[-1], queries[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    try:
        import onnxruntime
    except ImportError as error:
        raise SystemExit("needs onnxruntime and onnxscript: pip install onnxruntime onnxscript") from error
    from PIL import Image

    from pading.bundle import Bundle
    from pading.serving.service import SegmentationService

    torch.set_num_threads(1)
    bundle = Bundle.load(args.bundle, map_location="cpu")
    service = SegmentationService(bundle)
    size = bundle.config.data.image_size
    forward = _Forward(bundle.segmenter).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    encoded = io.BytesIO()
    image.save(encoded, format="JPEG")
    path_ms = median_ms(lambda: service.segment([service.decode(encoded.getvalue())], ["panoptic"], ["json"]),
                        args.repeats)

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        # one export for every batch size (a dynamic batch dimension), as a bundle would store it
        model_path = Path(directory) / "segmenter.onnx"
        started = time.perf_counter()
        torch.onnx.export(forward, (torch.randn(2, 3, size, size),), str(model_path), input_names=["pixel_values"],
                          output_names=["mask_logits", "query_embeddings"], dynamo=True,
                          dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}})
        export_s = time.perf_counter() - started
        session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for batch_size in args.batch_sizes:
            pixels = torch.randn(batch_size, 3, size, size)
            feed = {"pixel_values": pixels.numpy()}
            reference = [tensor.numpy() for tensor in forward(pixels)]
            difference = max(float(np.abs(a - b).max()) for a, b in zip(session.run(None, feed), reference))
            eager = median_ms(lambda pixels=pixels: forward(pixels), args.repeats)
            runtime = median_ms(lambda feed=feed: session.run(None, feed), args.repeats)
            rows.append((batch_size, eager, runtime, difference))
    print(f"\nsegmenter forward at {size} px, one thread ({args.bundle}); "
          f"the whole per-image path (SegmentationService.segment, one {size} px JPEG): {path_ms:.1f} ms; "
          f"one export with a dynamic batch dimension: {export_s:.1f} s\n")
    print("| batch | torch ms | ONNX Runtime ms | speed-up | largest difference |")
    print("|---|---|---|---|---|")
    for batch_size, eager, runtime, difference in rows:
        print(f"| {batch_size} | {eager:.2f} | {runtime:.2f} | {eager / runtime:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
