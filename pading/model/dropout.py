"""Inverted dropout with a cheaper mask on CPU, and its uniforms drawn ahead.

``F.dropout`` draws its mask with ``bernoulli_``, which on CPU costs about twice a plain
uniform draw. The generator and its losses run dropout on every step over tens of thousands
of elements (the cross-attention weights alone are heads x rows x primitives), so they draw
the mask as floor(u + 1 - p) for u uniform in [0, 1): 1 exactly when u >= p, so each
element is kept with probability 1 - p, as in ``F.dropout`` (docs/performance.md, "The
generator step"). The draw comes from torch's default generator, like ``F.dropout``'s.

Inside :func:`drawing_from`, the uniforms of CPU masks come instead from a
:class:`UniformTape`: one seeded stream whose first values a helper thread has already drawn,
while the caller was busy with something else. The generator's training step uses it to draw a
step's masks during the step before (docs/performance.md, "Dropout drawn ahead"). The masks are
bitwise those that the default generator, seeded alike, would give.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Optional

import torch
from torch import nn

#: Most uniforms a :class:`UniformTape` draws ahead (16 MB of float32); a step that needs more
#: draws the rest when it needs it.
MAX_AHEAD = 1 << 22

_active = threading.local()
_helper: tuple[int, Optional[ThreadPoolExecutor]] = (-1, None)
_helper_lock = threading.Lock()


def _draw_helper() -> ThreadPoolExecutor:
    """This process's one helper thread for draws ahead (a new one after a fork)."""
    global _helper
    with _helper_lock:
        pid, executor = _helper
        if executor is None or pid != os.getpid():
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pading-draws-ahead")
            _helper = (os.getpid(), executor)
        return executor


class UniformTape:
    """The float32 uniforms in [0, 1) of one seeded CPU stream, the first ``ahead`` of them drawn
    on a helper thread as soon as the tape is made.

    ``torch.rand`` makes each float32 from one 32-bit word of the CPU generator, in element
    order, so consecutive slices of one long draw are bitwise the tensors that consecutive
    draws of their shapes would give, from a generator (or the default one) seeded with
    ``seed``. Past the drawn-ahead block the stream goes on from the same generator.

    Args:
        seed: the stream's seed.
        ahead: uniforms to draw ahead (at most :data:`MAX_AHEAD`); 0 draws each when taken.
    Attributes:
        used: uniforms taken so far.
    """

    def __init__(self, seed: int, ahead: int = 0):
        self.seed = seed
        self.used = 0
        self._pid = os.getpid()
        self._generator = torch.Generator().manual_seed(seed)
        self._block = torch.empty(0)
        self._position = 0
        self._pending: Optional[Future] = None
        ahead = min(int(ahead), MAX_AHEAD)
        if ahead > 0:
            try:
                self._pending = _draw_helper().submit(_uniforms, ahead, self._generator)
            except RuntimeError:  # the interpreter is shutting its executors down: draw when taken
                self._pending = None

    def take(self, shape: torch.Size) -> torch.Tensor:
        """The stream's next ``prod(shape)`` uniforms, shaped ``shape``. They may be a view of the
        drawn-ahead block, which later takes view too: do not write to them."""
        if self._pid != os.getpid():
            self._restart()
        if self._pending is not None:
            self._block, self._pending = self._pending.result(), None
        count = math.prod(shape)
        available = self._block.numel() - self._position
        if count <= available:
            values = self._block[self._position:self._position + count]
            self._position += count
        else:  # past the block: the generator goes on where the block ended
            values = _uniforms(count - available, self._generator)
            if available:
                values = torch.cat([self._block[self._position:], values])
            self._block, self._position = torch.empty(0), 0
        self.used += count
        return values.view(shape)

    def _restart(self) -> None:
        """In a forked child: the parent's helper thread (and its draw) did not come along, so the
        stream is drawn again from the seed up to where the parent's takes had left it."""
        self._pid, self._pending, self._block, self._position = os.getpid(), None, torch.empty(0), 0
        self._generator = torch.Generator().manual_seed(self.seed)
        if self.used:
            _uniforms(self.used, self._generator)


def _uniforms(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` float32 uniforms from ``generator``, whatever torch's default dtype."""
    return torch.rand(count, generator=generator, dtype=torch.float32, device="cpu")


@contextlib.contextmanager
def drawing_from(tape: UniformTape) -> Iterator[UniformTape]:
    """In the body, :func:`dropout_mask` takes the uniforms of float32 and lower-precision CPU
    tensors drawn in this thread from ``tape`` (float64 and accelerator tensors still use the
    default generators). The masks are those the default generator, seeded with the tape's seed at
    the start of the body, would give as long as nothing else in the body draws from it. Not for
    code that activation checkpointing recomputes: it restores the default generator, not the tape."""
    previous = getattr(_active, "tape", None)
    _active.tape = tape
    try:
        yield tape
    finally:
        _active.tape = previous


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Multipliers shaped and typed like ``like``: 0 with probability ``p``, else 1 / (1 - p).
    Drawn in at least float32: in half precision u + 1 - p would round to 1 for u a little
    below ``p``. Inside :func:`drawing_from`, the uniforms come from its tape."""
    keep = 1.0 - p
    draw_dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    tape = getattr(_active, "tape", None)
    if tape is not None and draw_dtype == torch.float32 and like.device.type == "cpu":
        # out of place: the uniforms may be a view of the tape's block, which later masks view too
        return tape.take(like.shape).add(keep).floor_().mul_(1.0 / keep).to(like.dtype)
    mask = torch.rand(like.shape, dtype=draw_dtype, device=like.device).add_(keep).floor_().mul_(1.0 / keep)
    return mask.to(like.dtype)


class Dropout(nn.Module):
    """``nn.Dropout`` (the same arguments, no state) drawing its mask with :func:`dropout_mask`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
