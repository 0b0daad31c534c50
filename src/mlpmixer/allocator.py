"""glibc malloc settings for training: freed tensors' pages are kept for the next step.

By default glibc returns large freed blocks to the operating system (blocks above a dynamic mmap
threshold are unmapped, and the heap's top is trimmed), so every training step faults the same
activations' pages in again and the kernel zeroes them: 3-10 k page faults per step of the MLM seed
configuration (docs/benchmarks.md). `keep_freed_memory` tells malloc to serve blocks below 32 MiB
(its largest threshold) from the heap and never to trim it, so a step reuses the previous step's
pages. The process's resident size then stays at its high-water mark, which is what a training run
reaches every step anyway. `mlpmixer train` calls it at the start (an application's choice, not the
library's); it changes nothing where the C library is not glibc, where ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` is set (the user's choice wins), or under an ``LD_PRELOAD``ed allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = (1 << 31) - 1  # int: never trim in practice
_done: str | None = None
_keeping = False


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory (once per process); returns what was done, for the log."""
    global _done
    if _done is None:
        _done = _apply()
    return _done


def keeping() -> bool:
    """Whether `keep_freed_memory` set malloc to keep freed memory in this process (what makes keeping a
    small σ(h) for backward pay, `fused.KEEP_ACTIVATION_BYTES`: without it, the extra tensor's fresh
    pages cost more than the recomputation it saves)."""
    return _keeping


def _apply() -> str:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return "malloc as set by MALLOC_*_THRESHOLD_"
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return "malloc from LD_PRELOAD"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        gnu_version = libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return "malloc unchanged (not glibc)"
    gnu_version.restype = ctypes.c_char_p
    global _keeping
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _keeping = ok
    return (f"glibc {gnu_version().decode()} malloc keeps freed memory (blocks < 32 MiB from the heap, no trim)"
            if ok else "malloc unchanged (mallopt refused)")
