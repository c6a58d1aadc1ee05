"""glibc's thresholds raised in a fresh process: the call says it took, and large blocks then reuse the heap."""

import json
import os
import subprocess
import sys

# both scripts allocate through libc itself, so that Python's own allocator does not come between
LIBC = """
import ctypes, ctypes.util, json, sys
from copyscan.indexing.runtime.malloc import keep_freed_memory

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
"""

CODE = (
    LIBC
    + """
def maps():
    # MB of this process's unnamed mappings (where mmap-served allocations live; the heap is "[heap]")
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 5:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                total += hi - lo
    return total >> 20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = maps()
blocks = [libc.malloc(200 << 20) for _ in range(3)]  # 3 × 200 MB, like a batch's activations
during = maps()
for b in blocks:
    libc.free(b)
print(json.dumps({"new_mappings": during - before}))  # MB
"""
)


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """The JSON a script prints, run in a fresh interpreter (glibc reads its settings at start)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _new_mappings(mode: str) -> int:
    return _run(CODE, mode)["new_mappings"]


def test_large_blocks_come_from_the_heap_once_kept():
    assert _new_mappings("default") >= 600  # glibc maps each 200 MB block on its own
    assert _new_mappings("keep") < 200  # from the heap instead


THREAD_CODE = (
    LIBC
    + """
import resource, threading

assert keep_freed_memory()
MB = 1 << 20

def batches(size):
    # like a batch's activations: blocks allocated, written, freed; the faults of 3 more batches after one
    def one():
        blocks = [libc.malloc(size * MB) for _ in range(3)]
        for b in blocks:
            libc.memset(b, 1, size * MB)
        for b in blocks:
            libc.free(b)
    one()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(3):
        one()
    return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) * resource.getpagesize() / (9 * size * MB)

out = {}
def run():  # a thread other than the main one, like an actor's call-pool thread
    out.update({str(size): batches(size) for size in (40, 100)})
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(json.dumps(out))
"""
)


def _thread_faults(env: dict[str, str]) -> dict[str, float]:
    """Pages faulted in per page written, for 40 MB and 100 MB blocks freed and allocated again on a thread."""
    return _run(THREAD_CODE, env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env)


def test_a_thread_reuses_freed_blocks_only_with_one_arena():
    """On a thread of its own, blocks larger than a 64 MiB arena heap are mapped afresh every time and smaller
    ones mostly too (an emptied heap is unmapped): each page faulted in again. With ``ONE_ARENA_ENV`` in the
    process's environment the thread allocates from the main heap and reuses them, as the main thread does."""
    from copyscan.indexing.runtime.malloc import ONE_ARENA_ENV

    own = _thread_faults({})
    assert own["100"] > 0.9 and own["40"] > 0.1
    one = _thread_faults(ONE_ARENA_ENV)
    assert one["100"] < 0.05 and one["40"] < 0.05
