"""Handing freed C-heap pages back to the operating system (glibc's `malloc_trim`).

glibc keeps freed memory inside its heaps, between live chunks, so a process's resident size
stays near the high-water mark of its busiest moment: a quantized model's float copies freed
after loading, or the many small pieces a huge text's tokenization allocates. `malloc_trim(0)`
is what glibc offers for exactly this. On a C library without it, nothing happens.
"""

from __future__ import annotations

import ctypes

_libc = None


def trim_heap() -> bool:
    """glibc malloc_trim(0): free heap pages back to the OS. False where there is no such call."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
        except OSError:
            _libc = False
    trim = getattr(_libc, "malloc_trim", None) if _libc else None
    if trim is None:
        return False
    trim(0)
    return True
