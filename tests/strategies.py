"""Hypothesis strategies shared by the tests: shapes and float64 arrays away from trouble."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 5):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def arrays(shape, lo: float = -3.0, hi: float = 3.0, dtype=np.float64, unique: bool = False):
    return hnp.arrays(dtype, shape, unique=unique,
                      elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                                         width=64 if dtype == np.float64 else 32))


def broadcastable_pair(max_dims: int = 3, max_side: int = 4):
    """Two shapes that broadcast together (either side may be the smaller one)."""
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=max_dims,
                                             max_side=max_side).map(lambda s: s.input_shapes)
