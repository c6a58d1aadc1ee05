"""Keep a long-running process's freed memory for reuse, instead of handing large blocks back to the OS.

glibc serves an allocation above its mmap threshold (32 MiB at most, by default) with a fresh ``mmap`` and
unmaps it when freed. A CPU forward pass of a batch allocates activations of ~100 MB and frees them every
batch, so every batch pays for mapping, zeroing and faulting in fresh pages: on this project's 2-core VM the
default descriptor ran at ~72 images/s that way and at ~130 images/s with the blocks kept (the same batches,
one stream on 2 threads). ``keep_freed_memory`` raises the mmap and trim thresholds (``mallopt``), so such
blocks come from and go back to the heap; the process keeps its peak working set instead of returning it.
Elsewhere than glibc it does nothing.

That holds for the main thread's heap only. A thread of its own allocates from an arena of its own, made of
heaps of at most 64 MiB that glibc maps as they fill and unmaps as soon as one is wholly free, whatever the
thresholds; a block larger than such a heap is always mapped afresh. An embedding actor that takes
concurrent calls runs each on a thread of Ray's call pool, so its model faulted in every activation again
each batch: on this 2-core VM its forward passes ran at a median of 113–131 images/s (102–151) against
159–166 on its main thread or in a plain process. ``ONE_ARENA_ENV`` in the environment a process starts
with makes every thread allocate from the main heap: 147–151 images/s on the call pool's threads.
(glibc reads it at start; ``mallopt``'s M_ARENA_MAX set in the running actor did not help.)
``tests/unit/test_malloc.py`` counts the page faults of both.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# allocations below this come from the heap: more than any activation of a batch here
KEEP_BELOW_BYTES = 1 << 30
# the environment of a process whose model runs on threads other than its main one (an embedding actor):
# one malloc arena, so that every thread's blocks are kept as the main thread's are
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}


def keep_freed_memory(threshold: int = KEEP_BELOW_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes in this process; whether it did."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt; macOS's libc neither)
        return False
    value = ctypes.c_int(min(threshold, 2**31 - 1))
    return bool(mallopt(M_MMAP_THRESHOLD, value)) and bool(mallopt(M_TRIM_THRESHOLD, value))
