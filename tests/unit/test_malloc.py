"""glibc's thresholds raised in a fresh process: the call says it took, and large blocks then reuse the heap."""

import subprocess
import sys

CODE = """
import ctypes, ctypes.util, json, sys
from copyscan.indexing.runtime.malloc import keep_freed_memory

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

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = maps()
blocks = [libc.malloc(200 << 20) for _ in range(3)]  # 3 × 200 MB, like a batch's activations
during = maps()
for b in blocks:
    libc.free(b)
print(json.dumps({"new_mappings": during - before}))  # MB
"""


def _new_mappings(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    return json.loads(done.stdout)["new_mappings"]


def test_large_blocks_come_from_the_heap_once_kept():
    assert _new_mappings("default") >= 600  # glibc maps each 200 MB block on its own
    assert _new_mappings("keep") < 200  # from the heap instead
