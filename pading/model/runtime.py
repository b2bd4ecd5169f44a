"""Where the segmenter's inference forward pass runs: eager torch or ONNX Runtime
(docs/performance.md, "The inference runtime").

At the sizes this project runs on CPU, most of an eager Mask2Former forward pass is Python
and dispatch overhead over many small operations; ONNX Runtime runs the same graph 1.4-2.5x
faster on one thread. :func:`use_runtime` exports the part of the segmenter that does not
change at run time (pixels -> last-layer mask logits and query embeddings; the class head
stays in torch, because classes added by name replace it) once per process, in about 2 s,
checks the exported graph against torch on a probe batch and attaches it to the segmenter.
:meth:`pading.model.segmenter.Segmenter.forward` then uses it for every call it can answer
(eval mode, no autograd, CPU float32 input of the exported size, weights unchanged since the
export) and eager torch for everything else, so training and GPU inference are untouched.

``runtime``: ``auto`` (ONNX Runtime on CPU when it is installed, its export passes the probe
and the process has enough images ahead to pay the export back, else torch, with the reason
logged), ``onnxruntime`` (ONNX Runtime whatever the workload; a failure is an error) or ``torch``.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor, nn

from pading.errors import ConfigError

if TYPE_CHECKING:
    from pading.model.segmenter import Segmenter

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
OPSET = 17
PROBE_BATCH = 2
# The exported graph must give torch's outputs within this on the probe batch (float32
# rounding in another operation order gives ~5e-5 on the demo's model).
PROBE_TOLERANCE = 1e-3
# ``auto`` exports only in a process that has at least this many images ahead (a stage's actor
# is told its share). The imports, the export and the probe take 2-4 s of CPU; ONNX Runtime
# saves about 2 ms an image at extraction's batch of 8 on the demo's model, so a few hundred
# images would not pay it back (docs/performance.md, "The inference runtime"). A service
# (the endpoint) has no end and always exports.
AUTO_MIN_IMAGES = 1000


class RuntimeUnavailable(ConfigError):
    """``runtime: onnxruntime`` was asked for and cannot be used (names why)."""


class _LastLayer(nn.Module):
    """pixel values (B, 3, S, S) -> last-layer mask logits (B, Q, S/4, S/4), query embeddings (B, Q, D)."""

    def __init__(self, segmenter: "Segmenter"):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        queries, masks = self.segmenter._decode(pixel_values, None)
        return masks[-1], queries[-1]


def weights_key(segmenter: "Segmenter") -> int:
    """Changes when any tensor of the exported part is replaced or modified in place (an
    optimiser step, ``load_state_dict``, a training-mode BatchNorm update), so a stale export
    is never used. About 0.1 ms: it walks a cached list of the body's modules, not the module
    tree (``parameters()`` took 2.5 ms a call on the demo's model)."""
    body = segmenter.mask2former.model
    modules = body.__dict__.get("_pading_module_list")
    if modules is None:
        modules = body.__dict__["_pading_module_list"] = tuple(body.modules())
    return hash(tuple((id(t), t._version) for m in modules for t in (*m._parameters.values(), *m._buffers.values())
                      if t is not None))


class OnnxForward:
    """An ONNX Runtime session of :class:`_LastLayer` for one segmenter at one input size."""

    name = "onnxruntime"

    def __init__(self, model_bytes: bytes, image_size: int, key: int, threads: int):
        import onnxruntime

        self.image_size, self.key, self.threads = int(image_size), key, int(threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # idle threads sleep instead of spinning: actors and replicas share their node's cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the session keeps its own copy of the weights; the serialised model is not kept
        self.session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def __getstate__(self) -> dict:
        # A session does not pickle, and a copied segmenter has other tensors than the ones
        # exported: the copy runs on torch (use_runtime on it exports again).
        return {**self.__dict__, "session": None}

    def accepts(self, segmenter: "Segmenter", pixel_values: Tensor) -> bool:
        """Whether this call can run here (else eager torch runs it)."""
        if segmenter.training or torch.is_grad_enabled():
            return False
        if pixel_values.device.type != "cpu" or pixel_values.dtype != torch.float32:
            return False
        if tuple(pixel_values.shape[1:]) != (3, self.image_size, self.image_size) or pixel_values.shape[0] == 0:
            return False
        if self.session is None:  # an unpickled copy
            segmenter.inference_runtime = None
            return False
        if weights_key(segmenter) != self.key:
            logger.warning("the segmenter's weights changed after its ONNX export; it runs on torch from now on")
            segmenter.inference_runtime = None
            return False
        return True

    def __call__(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        masks, queries = self.session.run(None, {"pixel_values": pixel_values.contiguous().numpy()})
        return torch.from_numpy(masks), torch.from_numpy(queries)


def _export(segmenter: "Segmenter", image_size: int) -> bytes:
    buffer = io.BytesIO()
    # A trace records the operations one input takes. Zeros would take Mask2Former's rare
    # branches (every mask empty); normalised noise takes the ones real images take.
    probe = torch.randn(PROBE_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter-deprecation warnings, one per traced branch
        # in eval mode: the exporter puts the module back into the mode it found it in, and a new
        # module's is training (which would switch the segmenter's dropout on)
        torch.onnx.export(_LastLayer(segmenter).eval(), (probe,), buffer, input_names=["pixel_values"],
                          output_names=["mask_logits", "query_embeddings"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in ("pixel_values", "mask_logits",
                                                                        "query_embeddings")})
    return buffer.getvalue()


def _largest_difference(segmenter: "Segmenter", runtime: OnnxForward, image_size: int) -> float:
    """Largest |ONNX Runtime - torch| over both outputs of a seeded probe batch, relative to
    the outputs' scale."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(PROBE_BATCH + 1, 3, image_size, image_size, generator=generator)  # not the export's batch
    with torch.no_grad():
        expected = _LastLayer(segmenter).eval()(probe)
    got = runtime(probe)
    return max(float((a - b).abs().max()) / (1.0 + float(b.abs().max())) for a, b in zip(got, expected))


def use_runtime(segmenter: "Segmenter", runtime: str, image_size: int, images: Optional[int] = None) -> str:
    """Attach the inference runtime ``runtime`` to ``segmenter`` (see the module doc) and
    return the one in use, ``"torch"`` or ``"onnxruntime"``. Call it once the weights are
    final (an inference process: extraction, evaluation, a replica, a segmentation actor);
    a second call for the same weights and size keeps the export it made.

    ``images``: how many images this process will run, when known; under ``auto`` fewer than
    :data:`AUTO_MIN_IMAGES` stay on torch. None (a service, or not known): no limit."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown inference runtime {runtime!r} (expected one of {', '.join(RUNTIMES)})")
    current = segmenter.inference_runtime
    if (runtime != "torch" and current is not None and current.image_size == image_size
            and current.key == weights_key(segmenter)):
        return current.name  # already exported for these weights (another service over the same model)
    segmenter.inference_runtime = None
    if runtime == "torch":
        return "torch"
    device = next(segmenter.parameters()).device
    reason: Optional[str] = None
    if device.type != "cpu":
        reason = f"the segmenter is on {device} (ONNX Runtime is used on CPU only)"
    elif runtime == "auto" and images is not None and images < AUTO_MIN_IMAGES:
        reason = (f"{images} image(s) in this process, fewer than the {AUTO_MIN_IMAGES} that pay back the ONNX "
                  "export (runtime: onnxruntime exports anyway)")
    else:
        try:
            import onnx  # noqa: F401 - the exporter writes through it
            import onnxruntime  # noqa: F401
        except ImportError as err:
            reason = f"onnxruntime is not installed ({err}); pip install onnxruntime onnx"
    if reason is None:
        started = time.perf_counter()
        was_training = segmenter.training
        segmenter.eval()
        try:
            exported = OnnxForward(_export(segmenter, image_size), image_size, weights_key(segmenter),
                                   torch.get_num_threads())
            difference = _largest_difference(segmenter, exported, image_size)
        except Exception as err:  # noqa: BLE001 - any exporter or session failure means: stay on torch
            reason = f"the ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        else:
            if not np.isfinite(difference) or difference > PROBE_TOLERANCE:
                reason = f"the ONNX export differs from torch by {difference:.2e} on a probe batch"
        finally:
            segmenter.train(was_training)
    if reason is not None:
        if runtime == "onnxruntime":
            raise RuntimeUnavailable(f"inference runtime onnxruntime: {reason}")
        logger.info("segmenter forward on torch: %s", reason)
        return "torch"
    segmenter.inference_runtime = exported
    logger.info("segmenter forward on ONNX Runtime, %d thread(s) (exported in %.1f s; probe batch within %.1e of "
                "torch)", exported.threads, time.perf_counter() - started, difference)
    return "onnxruntime"
