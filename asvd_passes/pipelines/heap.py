"""glibc heap settings that make the process's memory follow what is alive (one block), not what was.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and unmaps
it on free. The threshold starts at 128 KiB but rises to the size of every such buffer freed (up to
32 MiB), so after the first large temporaries the block-sized activations and SVD pieces of a few MiB
come from the heap instead, where freed space stays in the process. Fixing the threshold at 32 MiB
keeps it from rising past a block's weights and SVD pieces of a large model, while per-window
activations and small models' pieces (a few MiB, allocated and freed thousands of times a run) come
from the heap: mmapping each of them cost a fifth of a SmolLM2 run in page faults (kernel time). The
heap's free pages leave the process at every block's end (``return_freed_memory``). Elsewhere (macOS,
musl) these are no-ops.
"""

from __future__ import annotations

import ctypes
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
LARGE_ALLOCATION = 32 << 20


@functools.lru_cache(maxsize=None)  # loaded once; return_freed_memory runs after every block
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """Serve every allocation of ``threshold`` bytes or more by ``mmap`` from now on (process-wide)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them, so RSS would creep up block after block)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
