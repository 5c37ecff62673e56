"""The C allocator's policy for large blocks, on Linux with glibc.

PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB) with their own mappings, returned to the system when freed, but it raises the
threshold to the size of every such block freed, up to 32 MiB: after one prompt, tensors of a
few MiB come from the heap, which keeps pages resident when they are freed. A fixed threshold
keeps every prompt-sized activation in its own mapping (measured on a 1000-token prompt of the
full-size int4 model: 56 MiB less peak RSS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it disables the dynamic threshold
THRESHOLD = 1 << 20  # decode-step tensors (<= 0.5 MiB for one row's logits) stay below it


@functools.cache
def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD for this process (the first call does it).
    False where the C library is not glibc (macOS, Windows, musl) or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
