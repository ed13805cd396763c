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


# --- JSON schemas (constrained decoding) -------------------------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=5)


@st.composite
def _integer_schema(draw):
    schema = {"type": "integer"}
    lo = draw(st.none() | st.integers(-1000, 1000))
    hi = draw(st.none() | st.integers(-1000, 1000))
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return schema


@st.composite
def _string_schema(draw):
    schema = {"type": "string"}
    lo = draw(st.none() | st.integers(0, 3))
    hi = draw(st.none() | st.integers(lo or 0, 8))
    if lo is not None:
        schema["minLength"] = lo
    if hi is not None:
        schema["maxLength"] = hi
    return schema


_leaves = st.one_of(
    _integer_schema(), _string_schema(),
    st.just({"type": "number"}), st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.lists(st.text(max_size=4) | st.integers(-50, 50) | st.booleans(), min_size=1,
             max_size=4, unique=True).map(lambda vs: {"enum": vs}),
)


def json_schemas(max_leaves: int = 6):
    """Object schemas of the subset constrain.py supports: properties of integers (with ranges),
    numbers, strings (with lengths), booleans, nulls, enums, nested objects and arrays."""
    def extend(children):
        objects = st.dictionaries(_names, children, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props})
        arrays_ = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": min(t[1], t[2]),
                       "maxItems": max(t[1], t[2])})
        return objects | arrays_
    inner = st.recursive(_leaves, extend, max_leaves=max_leaves)
    return st.dictionaries(_names, inner, min_size=1, max_size=4).map(
        lambda props: {"type": "object", "properties": props})
