"""A process-wide setting of glibc's malloc that spares CPU forwards most of their page faults.

A forward allocates and frees the same few-megabyte temporaries in every layer (the scan's
chunk matrices, activations). By default glibc gives such freed blocks back to the kernel (it trims
the top of the heap, and maps blocks above its threshold separately), so the next layer's
temporaries are faulted in again page by page (the README's Performance section gives what that
cost on the development machine). PyTorch's CPU tuning guide answers the same problem with a caching allocator
(jemalloc, tcmalloc) loaded at start-up; this does the equivalent with the allocator already there.

`twotower`'s commands call `keep_freed_memory()` when they start; a program that imports the
library decides for itself, since the setting is process-wide.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 256 << 20) -> bool:
    """Serve blocks up to `mmap_threshold` bytes from the heap and keep up to `trim_threshold`
    bytes of freed heap for reuse instead of returning them to the kernel.

    Larger blocks (weights, long caches) are still mapped and unmapped on their own. Returns True
    when glibc took both settings; False, changing nothing, on other C libraries and systems.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: fixing the trim threshold alone turns off glibc's adaptive mmap
    # threshold, and every block above 128 KiB would then be mapped and faulted in afresh
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


def add_malloc_option(parser) -> None:
    """`--default-malloc` for a benchmark's command line: measure without `keep_freed_memory`."""
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (by default the script, like the twotower command, "
                             "applies twotower.cpu_memory.keep_freed_memory, for every model it runs)")


def apply_malloc_option(args) -> str:
    """Apply the choice of `add_malloc_option`; returns it in words for the benchmark's output."""
    return "glibc default" if args.default_malloc else f"keep_freed_memory: {keep_freed_memory()}"
