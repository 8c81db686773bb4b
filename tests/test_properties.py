"""Property tests: arbitrary nested plain data and numpy arrays round-trip under any split."""

from __future__ import annotations

import random

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streampickle
from _util import SPLITTERS, assert_same, decode_all

dtypes = st.one_of(
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness=">"),
    hnp.floating_dtypes(endianness="<"),
    hnp.complex_number_dtypes(),
    hnp.boolean_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
)
arrays = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(), st.binary(), st.complex_numbers()
)
data = st.recursive(
    st.one_of(scalars, arrays),
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=5), children, max_size=5),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data, st.sampled_from(sorted(SPLITTERS)), st.integers(0, 2**32))
def test_roundtrip(obj, split, seed) -> None:
    encoded = streampickle.dumps(obj)
    (out,) = decode_all(encoded, SPLITTERS[split], seed=seed)
    assert_same(obj, out)


@settings(max_examples=50, deadline=None)
@given(arrays, st.booleans())
def test_array_layouts(arr, fortran) -> None:
    if fortran:
        arr = np.asfortranarray(arr)
    out = streampickle.loads(streampickle.dumps(arr))
    assert_same(arr, out)
    assert out.flags.aligned and out.flags.writeable
    if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        assert out.flags.f_contiguous


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**32))
def test_garbage_only_raises_streampickle_errors(junk, seed) -> None:
    """Random bytes, and random mutations of a valid message, never escape as other errors."""
    rng = random.Random(seed)
    valid = bytearray(streampickle.dumps({"a": np.arange(3), "b": [1, "x"]}))
    for _ in range(rng.randint(1, 4)):
        valid[rng.randrange(len(valid))] = rng.randrange(256)
    for candidate in (junk, bytes(valid)):
        decoder = streampickle.Decoder()
        try:
            decoder.feed(candidate)
            list(decoder)
            decoder.feed_eof()
        except streampickle.StreamPickleError:
            pass
