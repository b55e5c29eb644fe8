"""Keep glibc's allocator from holding on to freed image buffers.

Each 1920x1080 request allocates tens of MB of short-lived buffers. glibc raises its mmap
threshold after such buffers are freed, after which they come from per-thread heap arenas
that are rarely returned to the OS: RSS ratchets up under concurrency. A fixed threshold
keeps big buffers mmapped (returned on free), and two arenas bound the per-thread heaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def limit_allocator_growth(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """Best effort, glibc only; MALLOC_* environment variables set by an operator win."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        applied &= bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if "MALLOC_ARENA_MAX" not in os.environ:
        applied &= bool(mallopt(_M_ARENA_MAX, arena_max))
    return applied
