"""glibc malloc settings for training: freed tensors' pages are kept for the next step.

By default glibc returns large freed blocks to the operating system (blocks above a dynamic mmap
threshold are unmapped, and the heap's top is trimmed), so every training step faults the same
activations' pages in again and the kernel zeroes them: 3-10 k page faults per step of the MLM seed
configuration (docs/benchmarks.md). `keep_freed_memory` tells malloc to serve blocks below 32 MiB
(its largest threshold) from the heap and never to trim it, so a step reuses the previous step's
pages. The process's resident size then stays at its high-water mark, which is what a training run
reaches every step anyway. It also reserves address space at the heap's top in transparent huge pages
(`_huge_page_heap`; ``MLPMIXER_HUGE_PAGES=0`` leaves the pages alone). `mlpmixer train` calls it at the
start (an application's choice, not the library's); it changes nothing where the C library is not
glibc, where ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set (the user's choice wins),
or under an ``LD_PRELOAD``ed allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = (1 << 31) - 1  # int: never trim in practice
HEAP_RESERVE = 1 << 30  # address space the heap grows by at once, in transparent huge pages (untouched: no memory)
DEFAULT_TOP_PAD = 128 << 10  # glibc's M_TOP_PAD default
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h>
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
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
    if not ok:
        return "malloc unchanged (mallopt refused)"
    kept = f"glibc {gnu_version().decode()} malloc keeps freed memory (blocks < 32 MiB from the heap, no trim)"
    huge = _huge_page_heap(libc)
    return f"{kept}, {huge}"


def _huge_page_heap(libc: ctypes.CDLL) -> str:
    """Grow the heap by `HEAP_RESERVE` of untouched address space and ask the kernel for transparent huge
    pages there (``madvise(MADV_HUGEPAGE)``, as glibc's own ``glibc.malloc.hugetlb=1`` tunable does, which
    only an environment variable at start-up can set): the step's tensors then sit on 2 MiB pages, so
    first touches and streaming passes walk 512 times fewer page-table entries (issue 17: about 1 ms off
    the MLM seed step at 2 threads, docs/benchmarks.md). Where the kernel's setting is ``never`` or the
    heap does not grow, nothing changes. Returns what was done, in words."""
    if os.environ.get("MLPMIXER_HUGE_PAGES", "1") == "0":
        return "heap pages unchanged (MLPMIXER_HUGE_PAGES=0)"
    try:
        with open(THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return "no transparent huge pages here"
    if "[never]" in setting:
        return "transparent huge pages off in this kernel"
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = libc.sbrk(0)
    if not before or libc.mallopt(M_TOP_PAD, HEAP_RESERVE) != 1:
        return "heap pages unchanged"
    blocks = []
    for _ in range(8):  # the heap grows (by the pad) once a block does not fit its free space
        blocks.append(libc.malloc(MMAP_THRESHOLD - HUGE_PAGE))
        if libc.sbrk(0) - before >= HEAP_RESERVE:
            break
    for block in blocks:
        libc.free(block)
    libc.mallopt(M_TOP_PAD, DEFAULT_TOP_PAD)  # later growth as usual (where a big one would fail, e.g.
    # under strict overcommit, glibc falls back to mmap for that block and nothing was reserved)
    start = -(-before // HUGE_PAGE) * HUGE_PAGE
    end = libc.sbrk(0) // HUGE_PAGE * HUGE_PAGE
    if end - start < HEAP_RESERVE // 2 or libc.madvise(start, end - start, MADV_HUGEPAGE) != 0:
        return "heap pages unchanged"
    return f"its heap in transparent huge pages ({(end - start) >> 20} MiB reserved)"
