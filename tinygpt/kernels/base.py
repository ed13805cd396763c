"""What every kernel module shares: the numba-or-twin switch, the compile helper, a vectorisable exp.

Every kernel in this folder comes as a NumPy reference twin `X_ref` (short, vectorised: the
readable definition) and a fast `X_numba`; its public name `X` is bound by `pick` to `X_numba`, or
to `X_ref` when the environment has `TINYGPT_NUMBA=0` (debugging, or to read the math in a
debugger). Kernels take plain contiguous arrays, return new arrays, keep the input dtype (float32
for training, float64 for gradient checks) and never write into their inputs, except
`adamw_update`.

    python -m pytest tests/test_kernels.py -q
"""
import functools
import math
import os
import types as types_

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload


USE_NUMBA = os.environ.get("TINYGPT_NUMBA", "1") != "0"

# NOTE: numba's parallel loops run on OpenMP (libgomp) where it is installed, with the short spin
# runtime.py sets, and on "workqueue" threads otherwise (TBB last). See runtime.py, point 2,
# for why both the layer and the spin matter. NUMBA_THREADING_LAYER chooses another layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def pick(fast, ref):
    """The numba kernel, or its NumPy twin under TINYGPT_NUMBA=0 (every kernel module binds its
    public names through this one switch)."""
    return fast if USE_NUMBA else ref


# Loops may reorder sums (so they vectorise) and fuse a*b+c; no assumption that inputs are finite.
# NOTE: no "nsz" beside "reassoc": together they turn on LLVM's Reassociate pass, which may order
# a product such as c*x*x*x differently in the copy of a prange body that numba links into the
# cached kernel than in the copy that ran when it compiled, so a run with a cold cache and a run
# with a warm one would differ in the last bit (tests/test_determinism.py).
FASTMATH = {"contract", "reassoc", "arcp"}

# A parallel loop costs a start (~3 us, more than a one-row LayerNorm takes) and, right after a
# BLAS call, a wait for OpenBLAS's still-spinning thread to give up its core (70-550 us, runtime.py
# point 1). The serial compile vectorises as well, so it wins up to ~128K elements: GELU of a
# 16-token GPT-2 prompt's 49K, after c_fc's product, 39 us serial against 88 us or more parallel
# (Zen 4). Inputs smaller than this many elements run the serial compile of the same loop.
PARALLEL_MIN_SIZE = 1 << 17


def jit_rows(fn):
    """Compile `fn` twice, parallel over rows (prange) and serial, and pick by input size."""
    parallel = njit(cache=True, parallel=True, fastmath=FASTMATH)(fn)
    # a copy under its own name, so numba's on-disk cache keeps the two compiles apart
    serial_fn = types_.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                    fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    # error_model "numpy", as numba's parallel loops have: x / 0 is inf, not a ZeroDivisionError,
    # whose check per division kept LLVM from vectorising the loop (GELU of 3072 floats: 16.8 us
    # serial against 2.7 us parallel before, Zen 4)
    serial = njit(cache=True, fastmath=FASTMATH, error_model="numpy")(serial_fn)

    @functools.wraps(fn)
    def run(*args):
        return (parallel if args[0].size >= PARALLEL_MIN_SIZE else serial)(*args)

    run.parallel, run.serial = parallel, serial
    return run


# A vectorisable exp. numba has no SVML, so np.exp inside an @njit loop is a scalar libm call
# (slow) and stops the loop from vectorising. This one is only +, *, floor and a bit trick, so
# LLVM turns the loops below into AVX code. Both dtypes are within a few ulp of np.exp
# (tests/test_kernels.py::test_exp_matches_numpy measures it).
#   exp(x) = 2^k * exp(r),  k = round(x / ln 2),  r = x - k ln 2 in [-ln2/2, ln2/2]
# exp(r) is a short polynomial; 2^k is built directly from its IEEE-754 exponent bits.

LOG2E = 1.4426950408889634
# float32: Cephes expf. ln 2 split in two so k * LN2_HI is exact; polynomial error < 1 ulp.
_F32_MAX_X, _F32_MIN_X = np.float32(88.37626), np.float32(-87.33654)  # keeps 2^k a normal float
_F32_LN2_HI, _F32_LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_F32_LOG2E, _F32_HALF, _F32_ONE = np.float32(LOG2E), np.float32(0.5), np.float32(1.0)
_F32_P0, _F32_P1, _F32_P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), \
    np.float32(8.3334519073e-3)
_F32_P3, _F32_P4, _F32_P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), \
    np.float32(5.0000001201e-1)
# float64: Cephes' split of ln 2 and the Taylor series of exp(r) to r^13 (truncation < 1e-17).
_F64_MAX_X, _F64_MIN_X = 709.0, -708.0
_F64_LN2_HI, _F64_LN2_LO = 6.93145751953125e-1, 1.42860682030941723212e-6


def fast_exp(x):
    """exp(x) for one float32 or float64 inside numba code (the overload below picks the body)."""
    return math.exp(x)


@njit(cache=True, fastmath={"contract"})    # no "reassoc": it would undo the split of ln 2
def _exp_f32(x):
    xc = min(max(x, _F32_MIN_X), _F32_MAX_X)
    k = np.floor(xc * _F32_LOG2E + _F32_HALF)
    r = xc - k * _F32_LN2_HI - k * _F32_LN2_LO
    p = ((((_F32_P0 * r + _F32_P1) * r + _F32_P2) * r + _F32_P3) * r + _F32_P4) * r + _F32_P5
    p = p * r * r + r + _F32_ONE
    two_k = np.uint32((np.int32(k) + 127) << 23).view(np.float32)  # exponent field = k + bias
    y = p * two_k if x >= _F32_MIN_X else np.float32(0.0)  # below: under the smallest normal
    return y if x <= _F32_MAX_X else np.float32(np.inf)


@njit(cache=True, fastmath={"contract"})
def _exp_f64(x):
    xc = min(max(x, _F64_MIN_X), _F64_MAX_X)
    k = np.floor(xc * LOG2E + 0.5)
    r = xc - k * _F64_LN2_HI - k * _F64_LN2_LO
    p = 1.0 / 6227020800.0                                  # Horner, from 1/13! down to 1/0!
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    two_k = np.uint64((np.int64(k) + 1023) << 52).view(np.float64)
    y = p * two_k if x >= _F64_MIN_X else 0.0
    return y if x <= _F64_MAX_X else np.inf


@overload(fast_exp)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: _exp_f64(x)


@jit_rows
def exp_numba(x: np.ndarray) -> np.ndarray:
    """Elementwise _exp (for tests and the bench).   x: (N,) -> (N,)"""
    y = np.empty_like(x)
    for i in prange(x.shape[0]):
        y[i] = fast_exp(x[i])
    return y
