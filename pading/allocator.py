"""glibc malloc settings for the processes that segment images: the endpoint's model
replicas and the extraction, evaluation and ``segment.py`` actors (docs/performance.md,
"Page faults on large images").

With glibc's defaults, a process that segments a 640 px image takes thousands of page
faults per image: the buffers of each call are returned to the kernel when they are freed
(a thread's own arena shrinks or unmaps them; large ones are mapped and unmapped each time)
and fault in again at the next call. One arena, no mapping below 32 MB and no trimming below
512 MB keep them in the process instead: no page faults after the first images, and the same
work in 32-34 ms instead of 34-63 ms on ONNX Runtime, one thread, on this project's 2-core
machine (``python benchmarks/page_faults.py``). The cost is
memory: a process keeps its largest call's buffers (up to 512 MB of freed memory at the top
of its heap) instead of handing them back.

The settings are environment variables, read by glibc when a process starts, so they go to
Ray as the actors' ``runtime_env``. Other allocators (jemalloc, tcmalloc through
``LD_PRELOAD``) and other C libraries ignore them. Set ``PADING_MALLOC=default`` to leave the
allocator as the machine has it; any ``MALLOC_*`` variable of your own also leaves these out,
so that your settings are not mixed with them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: ``PADING_MALLOC=default`` turns the settings off.
OPT_OUT = "PADING_MALLOC"

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread in one arena: a worker thread's arena shrank after each call
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # buffers up to 32 MB from the heap, not mapped per call
    "MALLOC_TRIM_THRESHOLD_": str(512 << 20),  # keep up to 512 MB of freed memory instead of returning it
}


def allocator_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment variables for a process that segments images: :data:`SETTINGS`, or
    nothing when ``environ`` opts out or sets any ``MALLOC_*`` variable itself."""
    if environ.get(OPT_OUT, "").strip().lower() == "default":
        return {}
    if any(key.startswith("MALLOC_") for key in environ):
        return {}
    return dict(SETTINGS)


def runtime_env(environ: Mapping[str, str] = os.environ) -> dict:
    """Ray ``.options()`` for such an actor: ``{"runtime_env": {"env_vars": ...}}``, or ``{}``
    (Ray merges an actor's ``env_vars`` with the job's own)."""
    env = allocator_env(environ)
    return {"runtime_env": {"env_vars": env}} if env else {}
