"""The verifier's plain mode (the fast path in front of the full typed walk), bound to both
implementations (C and the pure-Python reference), and the two fuzzed against each other: they
must admit, defer and refuse exactly the same pickles, with the same position and reason."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streampickle import _scan
from test_safe import test_malformed_pickles_are_refused_by_the_scan as _malformed

# every malformed case of test_safe except the one that is well formed and refused later, by
# the unpickler (READONLY_BUFFER applied to a non-buffer)
MALFORMED = [case for case in _malformed.pytestmark[0].args[1] if case[0] != "READONLY_BUFFER on a non-buffer"]
IMPLEMENTATIONS = {"python": _scan.scan_py, "c": _scan.scan_c}
# Without the C extension (not built, or STREAMPICKLE_PURE_PYTHON=1) there is no C twin to test.
needs_c = pytest.mark.skipif(_scan.scan_c is None, reason="the C extension is not in use: no C scan")


def _impls() -> list[object]:
    return ["python", pytest.param("c", marks=needs_c)]


@needs_c
def test_the_c_scan_is_the_one_in_use() -> None:
    # with the C extension, the verifier's fast path is the C scan, not the reference
    assert _scan.scan is _scan.scan_c


def valid_pickles() -> list[tuple[bytes, int]]:
    objects = [
        None, 1, -5, 2**100, 1.5, "x", "é" * 100, b"b" * 300, bytearray(b"ba"), (), (1,), (1, 2), (1, 2, 3),
        (1, 2, 3, 4), [1, [2, [3]]], {"a": {1, 2}}, frozenset({1}), {i: str(i) for i in range(3000)},
        [np.arange(3), np.arange(3)], list(range(10_000)), "y" * 100_000,
    ]
    shared: list = [1]
    rec: list = [shared, shared]
    rec.append(rec)
    objects.append(rec)
    out = []
    for obj in objects:
        buffers: list = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        out.append((data, len(buffers)))
    return out


@pytest.mark.parametrize("impl", _impls())
def test_plain_data_is_admitted_and_anything_to_judge_deferred(impl: str) -> None:
    scan = IMPLEMENTATIONS[impl]
    # keys whose hash plain mode computes, counting equal ones, are admitted: tuples (their
    # strings hashed too) and big ints
    admitted = [{"a": [1, (2, 3)]}, {"k": 1, b"b": 2, 3: 4, 5.5: 6, None: 7, True: 8}, {2**50: 1}, [[1], [2]],
                set(), frozenset(), [("a", 1), frozenset({"a"})], {(1, 2): 3}, {(): 1}, {2**70: 1}, {("a", 1): 2},
                {(1.5, None, True, b"b", "\u0101", -1): 1}]
    for obj in admitted:
        assert scan(pickle.dumps(obj, protocol=5), 0) == 0, obj
    # a frozenset's hash is not computed: the full walk counts such keys against the limit
    deferred = [[complex(1, 2)], (range(2), slice(1)), {frozenset({1})}, {frozenset({"a"}): 1},
                {("x" * 300, 1): 2}]
    for obj in deferred:
        assert scan(pickle.dumps(obj, protocol=5), 0) == _scan.DEFER, obj


@pytest.mark.parametrize("impl", _impls())
def test_plain_mode_defers_mutation_of_what_it_cannot_see_is_the_right_container(impl: str) -> None:
    scan = IMPLEMENTATIONS[impl]
    assert scan(b"\x80\x05)Na.", 0) == _scan.DEFER  # APPEND into a tuple
    assert scan(b"\x80\x05]NNs.", 0) == _scan.DEFER  # SETITEM into a list
    assert scan(b"\x80\x05}]Ns.", 0) == _scan.DEFER  # a list as a key
    assert scan(b"\x80\x05N\x98.", 0) == _scan.DEFER  # READONLY_BUFFER of None


@pytest.mark.parametrize("impl", _impls())
def test_bounds_are_refused_alike(impl: str) -> None:
    scan = IMPLEMENTATIONS[impl]
    assert scan(b"\x80\x05" + b"(" * 1025 + b"N" + b"1" * 1025 + b".", 0)[1] == "more than 1024 MARKs open at once"
    deep = b"\x8c\x01a" + b"\x85" * 65  # a str in 65 nested 1-tuples
    assert "nested 65 deep" in scan(b"\x80\x05}" + deep + b"Ns.", 0)[1]
    # a 60-level tuple DAG shared through the memo: hashing it visits 2**60 leaves
    dag = b"\x8c\x01a\x940" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86\x940" for i in range(60)) + b"h<"
    assert "out of proportion" in scan(b"\x80\x05}" + dag + b"Ns.", 0)[1]
    assert scan(b"\x80\x05}(NNNu.", 0)[1] == "SETITEMS with an odd number of items"


@needs_c
def test_the_c_scan_has_the_verifiers_bounds() -> None:
    from streampickle import _verify
    from streampickle._accel import speedups as _speedups

    for name in ("MAX_OPEN_MARKS", "MAX_KEY_DEPTH", "MAX_TUPLE_DEPTH", "WORK_PER_BYTE", "WORK_BASE"):
        assert getattr(_speedups, name) == getattr(_verify, name), name


@pytest.mark.parametrize("impl", _impls())
def test_valid_pickles_are_accepted(impl: str) -> None:
    for data, nbuf in valid_pickles():
        assert IMPLEMENTATIONS[impl](data, nbuf) in (0, _scan.DEFER)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize(("name", "payload"), MALFORMED)
def test_malformed_pickles_are_refused(impl: str, name: str, payload: bytes) -> None:
    refused = IMPLEMENTATIONS[impl](payload, 0)
    assert type(refused) is tuple, name
    assert refused == _scan.scan_py(payload, 0)


@needs_c
@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 8))
def test_c_and_python_agree_on_mutated_pickles(seed: int, mutations: int) -> None:
    rng = random.Random(seed)
    data, nbuf = rng.choice(valid_pickles()[:18])
    mutated = bytearray(data)
    for _ in range(mutations):
        action = rng.random()
        if not mutated:
            break
        i = rng.randrange(len(mutated))
        if action < 0.6:
            mutated[i] = rng.randrange(256)
        elif action < 0.8:
            del mutated[i]
        else:
            mutated.insert(i, rng.randrange(256))
    data = bytes(mutated)
    for count in (nbuf, nbuf + 1):
        assert _scan.scan_c(data, count) == _scan.scan_py(data, count)


@needs_c
@given(st.binary(max_size=64), st.integers(0, 3))
def test_c_and_python_agree_on_random_bytes(data: bytes, count: int) -> None:
    data = b"\x80\x05" + data
    assert _scan.scan_c(data, count) == _scan.scan_py(data, count)
