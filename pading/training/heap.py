"""Python's garbage collector during long loops (docs/performance.md, "Full collections").

A process that has imported torch, Ray and MLflow tracks about 300,000-500,000 container
objects, almost all of them modules, functions and classes that live as long as the process.
Python's full (generation 2) collection walks every one of them: about 0.2 s on this project's
2-core machine. A process meets a few of them early in its life, while what its imports made
still counts as new, wherever it happens to be: once in the middle of the prepare stage, twice
in a generator loop's first 400 steps. :func:`frozen_heap` moves what is alive
when a loop starts into the collector's permanent generation for the loop's duration, so those
collections walk only what the loop itself made, and puts it back afterwards, so nothing that
dies later stays uncollected. It changes when memory of reference cycles is freed, never what
is computed.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_depth = 0
_froze = False  # whether the outermost block froze (and so unfreezes)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within the block, full collections skip the objects alive when the outermost such block
    began (``gc.freeze``); on leaving the outermost one they are collectable again
    (``gc.unfreeze``). Nested and concurrent blocks (threads) share one freeze. A no-op while
    the collector is disabled, and when the process froze objects itself (a server that froze
    before forking keeps its freeze)."""
    global _depth, _froze
    with _lock:
        _depth += 1
        if _depth == 1:
            _froze = gc.isenabled() and gc.get_freeze_count() == 0
            if _froze:
                gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _froze:
                _froze = False
                gc.unfreeze()
