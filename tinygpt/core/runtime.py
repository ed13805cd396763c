"""Three process-wide settings that make NumPy, OpenBLAS and numba share 2 cores well.

Both were found by profiling a training step of the 124M model on a 2-core machine; neither changes
a single number tinygpt computes, only how fast it gets there.

1. OpenBLAS's worker threads spin after every matmul, for 2^28 cycles (~0.1 s) by default, waiting
   for the next one. In tinygpt the next thing is usually a numba kernel on both cores, which then
   shares them with a spinning thread: causal attention ran at 20-26 ms right after a matmul and
   14 ms without one. `OPENBLAS_THREAD_TIMEOUT=20` (2^20 cycles, ~0.4 ms) still spans the gaps
   between the matrix-vector products of one decoding step. OpenBLAS reads the variable when it
   is loaded, so `tinygpt/__init__.py` calls `set_blas_spin()` before anything imports NumPy; if
   NumPy was imported first it has no effect. A value already in the environment is kept.

2. numba's parallel loops run on OpenMP threads (its "omp" layer; "workqueue" where there is no
   OpenMP), which libgomp lets spin for a while after each loop. Its default spin starved the
   OpenBLAS call that followed (attention forward 4.6 s against 0.26 s), which is why tinygpt used
   the "workqueue" layer; but workqueue starts its threads anew for every loop, ~150 us, and
   decoding one token runs ~50 loops (a GPT-2 token's products: 17 ms against 12 ms, measured on a
   2-core Xeon). `GOMP_SPINCOUNT=10000` keeps OpenMP's start cost (~3 us) and stops the spin
   within microseconds: a gpt-mini training step went from 981 to 1,077 tokens/s. Set with point 1,
   before numba loads OpenMP; a value already in the environment is kept.

3. glibc serves every allocation over 128 KiB-32 MiB with a fresh mmap and unmaps it on free, so
   each step's activations (GPT-2 124M: ~3 GB) are page-faulted in anew: 1.04 million page faults
   and 15 s of kernel time in five 124M steps. `keep_freed_memory()` tells glibc to keep freed
   memory for reuse instead (0.38 million faults, 4 s). The cost: the process keeps its peak
   memory until it exits. `train()` calls it; `TINYGPT_KEEP_MEMORY=0` turns it off.

    python -m tinygpt.bench train       # the step time both settings were measured with
"""
from __future__ import annotations

import ctypes
import os
import sys

BLAS_SPIN_LOG2_CYCLES = "20"   # OpenBLAS's unit: the spin lasts 2^n cycles (its default n: 28)
OMP_SPIN_COUNT = "10000"       # libgomp's unit: spin iterations before a thread sleeps

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4   # mallopt's, from <malloc.h>
_kept = False


def set_blas_spin() -> None:
    """Shorten OpenBLAS's and OpenMP's spin after each parallel call, unless the user has chosen
    values (see points 1 and 2)."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", BLAS_SPIN_LOG2_CYCLES)
    os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)


def _mallopt():
    """glibc's mallopt, or None (other C libraries and platforms)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt          # glibc only; musl has no mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def return_freed_memory() -> bool:
    """The opposite of `keep_freed_memory`, for loading weights to pack them for generation.

    Packing reads each float32 tensor, packs it and frees it. glibc raises its mmap threshold to
    the size of the last large block freed (up to 32 MiB), so every later tensor of GPT-2's comes
    from the heap and stays resident when freed: 124M in int8 peaked at 736 MB for 125 MB of
    weights. A fixed threshold (128 KiB) keeps large blocks mmapped, so a freed tensor goes back
    to the OS at once. No effect once `keep_freed_memory` is in force (a training process).
    """
    mallopt = _mallopt()
    if _kept or mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024))


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS (see point 3).

    Idempotent. Returns True if the setting is in force: False on other C libraries and
    platforms (nothing happens there), or with TINYGPT_KEEP_MEMORY=0.
    """
    global _kept
    if _kept:
        return True
    mallopt = _mallopt()
    if os.environ.get("TINYGPT_KEEP_MEMORY", "1") == "0" or mallopt is None:
        return False
    # no mmap for large blocks: they come from the heap and go back to it when freed ...
    # ... and -1 (as size_t: the largest value) never trims the heap's free top back to the OS
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _kept
