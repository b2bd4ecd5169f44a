"""Where the segmenter's inference forward pass runs: eager torch or ONNX Runtime
(docs/performance.md, "The inference runtime").

At the sizes this project runs on CPU, most of an eager Mask2Former forward pass is Python
and dispatch overhead over many small operations; ONNX Runtime runs the same graph 1.4-2.5x
faster on one thread. :func:`use_runtime` exports the part of the segmenter that does not
change at run time (pixels -> last-layer mask logits and query embeddings; the class head
stays in torch, because classes added by name replace it) once per process, in about 2 s,
checks the exported graph against torch on a probe batch and attaches it to the segmenter.
The export is kept in a cache on the machine, keyed by the weights' content, so the next
process over the same model (a restarted replica, a second actor) reads it instead.
:meth:`pading.model.segmenter.Segmenter.forward` then uses it for every call it can answer
(eval mode, no autograd, CPU float32 input of the exported size, weights unchanged since the
export) and eager torch for everything else, so training and GPU inference are untouched.

``runtime``: ``auto`` (ONNX Runtime on CPU when it is installed, its export passes the probe
and the process has enough images ahead to pay the export back, else torch, with the reason
logged), ``onnxruntime`` (ONNX Runtime whatever the workload; a failure is an error) or ``torch``.

The cache: ``$PADING_ONNX_CACHE`` (empty: no cache), else ``$XDG_CACHE_HOME/pading/onnx`` or
``~/.cache/pading/onnx``; the :data:`CACHE_KEEP` most recently used models are kept. A cached
model is checked against torch like a new export, and exported again when it differs; a
cache that cannot be written is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor, nn

from pading.errors import ConfigError
from pading.io import write_bytes_atomic

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
CACHE_ENV = "PADING_ONNX_CACHE"
# exported models kept in the cache (the demo's is 4.0 MB, the smoke config's 1.7 MB)
CACHE_KEEP = 8


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


def cache_dir() -> Optional[Path]:
    """Where exported models are kept (the module doc), or None when caching is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value).expanduser() if value.strip() else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pading" / "onnx"


def content_key(segmenter: "Segmenter", image_size: int) -> str:
    """A digest of everything the export depends on: the exported part's tensors (names,
    shapes, dtypes, bytes), the segmenter's settings, the input size and the exporter's
    versions. About 10 ms for the demo's model (a few MB of weights)."""
    import onnx

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{torch.__version__}|{onnx.__version__}|{OPSET}|{image_size}|{segmenter.config!r}".encode())
    for name, tensor in segmenter.mask2former.model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _store(path: Path, model: bytes) -> None:
    """Write ``model`` to ``path`` atomically (a reader never sees half a file), then drop the
    least recently used models beyond :data:`CACHE_KEEP`. Failures are logged, not raised."""
    try:
        write_bytes_atomic(path, model)
        kept = sorted(path.parent.glob("segmenter-*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError as err:
        logger.info("the ONNX export is not cached (%s)", err)


def _probed(segmenter: "Segmenter", model: bytes, image_size: int) -> tuple[OnnxForward, float]:
    session = OnnxForward(model, image_size, weights_key(segmenter), torch.get_num_threads())
    return session, _largest_difference(segmenter, session, image_size)


def _agrees(difference: float) -> bool:
    return bool(np.isfinite(difference)) and difference <= PROBE_TOLERANCE


def _session(segmenter: "Segmenter", image_size: int) -> tuple[OnnxForward, float, str]:
    """(session, its probe difference, where its model came from): the cached model when there
    is one that agrees with torch, else a new export (cached when it agrees)."""
    directory = cache_dir()
    path = None if directory is None else directory / f"segmenter-{image_size}px-{content_key(segmenter, image_size)}.onnx"
    if path is not None and path.is_file():
        try:
            session, difference = _probed(segmenter, path.read_bytes(), image_size)
        except Exception as err:  # noqa: BLE001 - a damaged file: export again
            logger.warning("the cached ONNX model %s is unusable (%s: %s); exporting again", path, type(err).__name__,
                           str(err).splitlines()[0] if str(err) else "")
        else:
            if _agrees(difference):
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: kept by the pruning in _store
                return session, difference, f"read from {path}"
            logger.warning("the cached ONNX model %s differs from torch by %.2e; exporting again", path, difference)
    model = _export(segmenter, image_size)
    session, difference = _probed(segmenter, model, image_size)
    if path is not None and _agrees(difference):
        _store(path, model)
    return session, difference, "exported"


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
            exported, difference, source = _session(segmenter, image_size)
        except Exception as err:  # noqa: BLE001 - any exporter or session failure means: stay on torch
            reason = f"the ONNX export failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        else:
            if not _agrees(difference):
                reason = f"the ONNX export differs from torch by {difference:.2e} on a probe batch"
        finally:
            segmenter.train(was_training)
    if reason is not None:
        if runtime == "onnxruntime":
            raise RuntimeUnavailable(f"inference runtime onnxruntime: {reason}")
        logger.info("segmenter forward on torch: %s", reason)
        return "torch"
    segmenter.inference_runtime = exported
    logger.info("segmenter forward on ONNX Runtime, %d thread(s) (%s in %.1f s; probe batch within %.1e of torch)",
                exported.threads, source, time.perf_counter() - started, difference)
    return "onnxruntime"
