"""glibc malloc settings for CPU tensor work: keep freed activation memory for the next batch.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap``
and returns it to the kernel on ``free``. A CPU forward pass of a batch allocates activations
far larger than that (ResNet-18 at 160 px, batch 32: 52 MB for the first stage alone), so every
batch page-faults and zero-fills them again: measured here, 4.3 million minor page faults and
7.8 s of kernel time for 2,048 images, and 84 instead of 103 images/s
(``benchmarks/allocator.py`` measures both settings in one run). :func:`tune_allocator` turns
mmap allocation off (``M_MMAP_MAX = 0``; glibc still falls back to mmap when the heap cannot
grow) and keeps up to :data:`TRIM_THRESHOLD` of free memory at the top of the heap, so freed
blocks are reused. Raising only the trim threshold makes it worse (more faults, not fewer).

The cost: memory freed by a large batch stays with the process (up to the threshold at the
top of the heap, and below the highest block in use) until it exits. Set
``RADLENS_MALLOC=default`` to leave glibc's settings alone. Other C libraries (musl, macOS)
are left untouched. The ``radlens`` command applies this at start; library users call it.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "RADLENS_MALLOC"
M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept (mallopt takes a C int)


@dataclass(frozen=True)
class AllocatorTuning:
    applied: bool
    reason: str


def tune_allocator(environ: Mapping[str, str] | None = None) -> AllocatorTuning:
    """Apply the settings above to this process (idempotent); says whether and why not."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV, "").strip().lower()
    if choice in ("default", "off", "0", "no"):
        return AllocatorTuning(False, f"{ENV}={choice}: glibc defaults kept")
    if choice not in ("", "tuned", "on", "1", "yes"):
        return AllocatorTuning(False, f"{ENV}={choice!r} not understood (use 'default' or "
                                      "'tuned'): glibc defaults kept")
    libc_name, _version = platform.libc_ver()
    if libc_name != "glibc":
        return AllocatorTuning(False, f"C library {libc_name or 'unknown'}, not glibc: untouched")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return AllocatorTuning(False, "glibc without mallopt: untouched")
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return AllocatorTuning(False, "mallopt refused the settings")
    return AllocatorTuning(True, "mmap allocation off, 1 GiB heap-top trim threshold")
