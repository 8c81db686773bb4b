"""The fast paths of arrays, which a message of many arrays spends most of its time in.

Each one must answer exactly as the general path it shortcuts: the encoder's remembered dtype
descriptors and its export of an array's own memory, the safe loader's one-call build of the
common array (``_rebuild.plain_ndarray``, charged as ``ndarray`` charges, in Python and in C
alike), and the sender's
search for the shared files of all of a message's buffers at once (``_shm.find``)."""

from __future__ import annotations

import pickle
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streampickle
from streampickle import _encoder, _rebuild, _safe, _shm
from streampickle._accel import speedups
from streampickle._errors import MalformedPickleError

ARRAYS = [
    np.arange(12.0),
    np.arange(12, dtype=np.int32).reshape(3, 4),
    np.arange(12, dtype=">i2").reshape(3, 4).T,  # Fortran-ordered, big-endian
    np.array([True, False, True]),
    np.arange(6, dtype=np.complex128).reshape(2, 3),
    np.array([b"ab", b"cde"], dtype="S3"),
    np.zeros(3, dtype="V4"),
    np.array(["2020-01-01", "2021-06-30"], dtype="M8[ns]"),  # no buffer-protocol format
    np.array(3.5),  # 0-d
    np.zeros((0, 5)),
    np.array(["ab", "c"]),  # text: the general path checks its code points
    np.arange(24.0).reshape(2, 3, 4)[:, ::2],  # strided: one contiguous copy
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype.str}-{a.shape}")
def test_arrays_round_trip_with_their_dtype_shape_order_and_bytes(array: np.ndarray[Any, Any]) -> None:
    for _ in range(2):  # the second time, the encoder's remembered descriptor is used
        got = streampickle.loads(streampickle.dumps(array))
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()  # every element, in C order
        fortran = array.flags.f_contiguous and not array.flags.c_contiguous
        assert (got.flags.f_contiguous if fortran else got.flags.c_contiguous)
        assert got.flags.writeable


def test_the_remembered_descriptor_is_the_dtypes_own() -> None:
    # Equal dtypes that differ in metadata must not share a remembered descriptor: the one
    # with metadata keeps numpy's own pickling (descr_of refuses it).
    plain = np.dtype(np.float64)
    with_metadata = np.dtype(np.float64, metadata={"unit": "m"})
    assert plain == with_metadata
    assert _encoder._plain_descr(plain) == "<f8"
    assert _encoder._plain_descr(with_metadata) is None
    assert _encoder._plain_descr(plain) == "<f8"


def fast_and_general(args: tuple[Any, ...]) -> tuple[Any, Any]:
    fast = _rebuild.plain_ndarray(*args)
    try:
        general = _rebuild.ndarray(*args)
    except MalformedPickleError as exc:
        general = exc
    return fast, general


def side_chunk(array: np.ndarray[Any, Any]) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).cast("B")


@pytest.mark.parametrize("array", [a for a in ARRAYS if a.dtype.kind not in "UM"], ids=lambda a: a.dtype.str)
@pytest.mark.parametrize("fortran", [False, True])
def test_plain_ndarray_builds_what_ndarray_builds(array: np.ndarray[Any, Any], fortran: bool) -> None:
    source = np.asfortranarray(array) if fortran else np.ascontiguousarray(array)
    args = (array.dtype.str, list(array.shape), fortran, memoryview(source.reshape(-1, order="A").view(np.uint8)))
    _rebuild.ndarray(*args)  # the dtype is now known
    fast, general = fast_and_general(args)
    assert fast is not None
    assert fast.dtype == general.dtype and fast.shape == general.shape and fast.strides == general.strides
    assert fast.tobytes() == general.tobytes()
    if fast.nbytes:  # a view of the side chunk, never a copy
        assert np.shares_memory(fast, np.frombuffer(args[3], np.uint8))
    assert _rebuild.plain_ndarray_cost(fast) == _rebuild.ndarray.cost(*args)


BYTES_8 = memoryview(bytearray(8))
WIDE = 2**63


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("<U1", [2], False, BYTES_8), id="text-dtype"),
        pytest.param(("<f8", (1,), False, BYTES_8), id="shape-tuple"),
        pytest.param(("<f8", [True], False, BYTES_8), id="bool-entry"),
        pytest.param(("<f8", [-1], False, BYTES_8), id="negative-entry"),
        pytest.param(("<f8", [0, WIDE], False, memoryview(b"")), id="entry-past-int64"),
        pytest.param(("<f8", [2], False, BYTES_8), id="buffer-too-small"),
        pytest.param(("<f8", [1], 0, BYTES_8), id="order-not-bool"),
        pytest.param(("<f8", [1], False, b"\0" * 8), id="bytes-literal"),
        pytest.param(("<f8", [1], False, memoryview(np.zeros(1))), id="typed-buffer"),
        pytest.param(("<f8", [1] * 33, False, BYTES_8), id="33-dims"),
        pytest.param((["<f8"], [1], False, BYTES_8), id="structured-descr"),
        pytest.param(("<q9", [1], False, BYTES_8), id="unknown-descr"),
    ],
)
def test_plain_ndarray_leaves_every_other_case_to_the_general_path(args: tuple[Any, ...]) -> None:
    for warm in (args, ("<f8", [1], False, BYTES_8)):  # its dtype is known: only the case declines
        try:
            _rebuild.ndarray(*warm)
        except MalformedPickleError:
            pass
    fast, general = fast_and_general(args)
    assert fast is None, "the fast path must decline what it doesn't check fully"
    assert general is not None  # built or refused by the general path, which has the words


def test_a_shape_past_numpys_own_limit_is_the_peers_error() -> None:
    # numpy 1 makes arrays of at most 32 dimensions, numpy 2 of 64: one more is refused as a
    # malformed pickle on either, never a ValueError from numpy.
    limit = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
    assert _rebuild.ndarray("<f8", [1] * limit, False, BYTES_8).ndim == limit
    with pytest.raises(MalformedPickleError, match="at most"):
        _rebuild.ndarray("<f8", [1] * (limit + 1), False, BYTES_8)


def test_the_metered_fast_path_charges_as_the_general_path_and_refuses_past_the_budget() -> None:
    data = memoryview(bytearray(1 << 16))
    args = ("<f8", [1 << 13], False, data)
    _rebuild.ndarray(*args)
    cost = _rebuild.ndarray.cost(*args)
    fast_meter, general_meter = _safe._Meter(10 * cost), _safe._Meter(10 * cost)
    fast = _safe._MeteredArray(_rebuild.ndarray, fast_meter)
    general = _safe._Metered(_rebuild.ndarray, general_meter)
    for _ in range(3):
        fast(*args)
        general(*args)
    assert (fast_meter.calls, fast_meter.left) == (general_meter.calls, general_meter.left) == (3, 7 * cost)
    broke = _safe._MeteredArray(_rebuild.ndarray, _safe._Meter(cost - 1))
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        broke(*args)


def test_a_trusted_load_builds_the_common_array_in_one_call_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # A trusted load calls the reconstructor itself, unmetered: it takes the same one-call
    # build as the safe loader for the common array, and the general path for anything else.
    calls: list[Any] = []

    def counted(*args: Any) -> Any:
        array = plain(*args)
        calls.append(array is not None)
        return array

    plain = _rebuild.plain_ndarray_in
    monkeypatch.setattr(_rebuild, "plain_ndarray_in", counted)
    arrays = [np.arange(12.0).reshape(3, 4), np.array(["ab", "c"])]  # the second is text
    data = streampickle.dumps(arrays)
    streampickle.loads(data, trusted=True)  # the first "<f8" the process meets takes the general path
    calls.clear()
    got = streampickle.loads(data, trusted=True)
    assert [g.tolist() for g in got] == [a.tolist() for a in arrays]
    assert calls == [True, False]


@pytest.mark.skipif(not _shm.AVAILABLE, reason="no sealable shared-memory files (memfd) here")
def test_find_answers_each_buffer_of_a_mixed_list() -> None:
    one = streampickle.shared_empty(4096, np.uint8)
    two = streampickle.shared_empty(8192, np.uint8)
    ordinary = np.zeros(100, np.uint8)
    views = [memoryview(v) for v in (one[:10], two[100:200], ordinary, one[4000:], two[0:0], two[8000:], one[:0])]
    found = _shm.find(views)
    assert [f is None for f in found] == [False, False, True, False, True, False, True]
    fd_one, fd_two = found[0][0], found[1][0]  # type: ignore[index]
    assert fd_one != fd_two
    places = [(f[0], f[1]) for f in found if f is not None]
    assert places == [(fd_one, 0), (fd_two, 100), (fd_one, 4000), (fd_two, 8000)]
    # The whole array, as the encoder exports it (pickle.PickleBuffer(...).raw()), lies in its file.
    assert _shm.find([pickle.PickleBuffer(one).raw()])[0] == (fd_one, 0, found[0][2])  # type: ignore[index]


# -- the C build of the common array, held to its Python twin -------------------------------

needs_c = pytest.mark.skipif(speedups is None, reason="the C extension is not in use")


def both_answers(args: tuple[Any, ...]) -> tuple[Any, Any]:
    """``plain_ndarray``'s answer in C and in Python for ``args``: an array, None, or the
    exception's type and text."""
    answers = []
    for build in (speedups.plain_ndarray, _rebuild.plain_ndarray_py):  # type: ignore[union-attr]
        try:
            answers.append(build(_rebuild._PLAIN_DTYPES, *args))
        except Exception as exc:  # noqa: BLE001 - the two must raise alike
            answers.append((type(exc), str(exc)))
    return answers[0], answers[1]


def assert_same(c: Any, py: Any) -> None:
    if isinstance(py, np.ndarray):
        assert isinstance(c, np.ndarray)
        assert (c.dtype, c.shape, c.strides, c.flags.writeable) == (py.dtype, py.shape, py.strides, py.flags.writeable)
        assert c.tobytes() == py.tobytes()
        assert c.nbytes == 0 or np.shares_memory(c, py)  # both views of the side chunk
    else:
        assert c == py


def released() -> memoryview:
    view = memoryview(bytearray(8))
    view.release()
    return view


EDGE_CASES = [
    ("<f8", [1], False, BYTES_8),
    ("<f8", [1, 1], True, BYTES_8),
    ("<f8", [], False, BYTES_8),  # 0-d
    ("<f4", [2], True, BYTES_8),  # 1-D and Fortran: the same array
    ("<i2", [2, 2], True, BYTES_8),
    ("<i2", [2, 2], False, BYTES_8),
    ("<f8", [WIDE - 1, WIDE - 1, 0], False, memoryview(b"")),  # the product overflows 64 bits, then 0
    ("<f8", [WIDE - 1, 2], False, BYTES_8),  # overflows: no buffer that size
    ("<f8", [2**32, 2**32], False, BYTES_8),
    ("<f8", [0, WIDE], False, memoryview(b"")),
    ("<f8", [1], False, released()),  # both raise numpy's or memoryview's ValueError
    ("<f8", [1], False, memoryview(bytearray(16))[::2]),  # not contiguous
    ("<f8", [1], False, memoryview(bytearray(8)).cast("b")),  # format b, not B
    ("<f8", [1], False, memoryview(bytearray(8)).cast("B", (2, 4))),  # 2-D bytes, contiguous
    ("<f8", [1], None, BYTES_8),
    ("<f8", [1.0], False, BYTES_8),
    ("<f8", [1], False, bytearray(8)),
    (b"<f8", [1], False, BYTES_8),
    ("<U1", [2], False, BYTES_8),
    ("<f8", [1] * 32, False, BYTES_8),
    ("<f8", [1] * 33, False, BYTES_8),
    ("|b1", [8], False, BYTES_8),
    ("|S0", [3], False, memoryview(b"")),  # numpy refuses a zero itemsize: the same error from both
]


@needs_c
@pytest.mark.parametrize("args", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_the_c_build_answers_as_its_python_twin_on_edge_cases(args: tuple[Any, ...]) -> None:
    for descr in ("<f8", "<f4", "<i2", "<U1", "|b1", "|S0"):
        try:
            _rebuild._plain_dtype(descr)  # known, so that only the case decides
        except MalformedPickleError:
            pass
    assert_same(*both_answers(args))


@needs_c
@settings(max_examples=400, deadline=None)
@given(
    descr=st.sampled_from(["<f8", "<i4", "|u1", ">i2", "<c16", "|b1", "<U2", "<q9", "<f8 "]),
    shape=st.one_of(
        st.lists(st.integers(-2, 2**64), max_size=4),
        st.lists(st.integers(0, 5), max_size=34),
        st.tuples(st.integers(0, 4)),
        st.lists(st.one_of(st.integers(0, 4), st.booleans(), st.floats(0, 4)), max_size=3),
    ),
    fortran=st.one_of(st.booleans(), st.integers(0, 1), st.none()),
    size=st.integers(0, 130),
    form=st.sampled_from(["view", "bytes", "bytearray", "strided", "signed", "readonly"]),
)
def test_the_c_build_answers_as_its_python_twin(
    descr: str, shape: Any, fortran: Any, size: int, form: str
) -> None:
    try:
        _rebuild._plain_dtype(descr)
    except MalformedPickleError:
        pass
    raw = bytearray(range(256))[: 2 * size]
    buffer: Any = {
        "view": lambda: memoryview(raw)[:size],
        "bytes": lambda: bytes(raw[:size]),
        "bytearray": lambda: raw[:size],
        "strided": lambda: memoryview(raw)[::2],
        "signed": lambda: memoryview(raw)[:size].cast("b"),
        "readonly": lambda: memoryview(bytes(raw[:size])),
    }[form]()
    assert_same(*both_answers((descr, shape, fortran, buffer)))


# -- the C reduction of the common array, held to its Python twin ---------------------------


def reductions(array: np.ndarray[Any, Any]) -> tuple[Any, Any]:
    """The reduction of ``array`` by the encoder's Python reducer and by its C twin."""
    python = _encoder._reduce_ndarray(array)
    c = speedups.reduce_ndarray(  # type: ignore[union-attr]
        _encoder._PLAIN_DESCRS, _rebuild.ndarray, _encoder._reduce_ndarray, array
    )
    return python, c


def assert_same_reduction(python: Any, c: Any, copied: bool) -> None:
    if python is NotImplemented:
        assert c is NotImplemented
        return
    (py_func, py_args), (c_func, c_args) = python, c
    assert c_func is py_func and len(c_args) == len(py_args)
    assert c_args[:-1] == py_args[:-1] and [type(x) for x in c_args] == [type(x) for x in py_args]
    py_buf, c_buf = py_args[-1], c_args[-1]
    if isinstance(py_buf, pickle.PickleBuffer):
        py_view, c_view = memoryview(py_buf), memoryview(c_buf)
        assert (c_view.format, c_view.shape, c_view.strides, c_view.readonly) == (
            py_view.format, py_view.shape, py_view.strides, py_view.readonly)
        if not copied:  # the array's own memory (or a byte view of it), not a copy
            assert speedups.address(c_buf.raw()) == speedups.address(py_buf.raw())  # type: ignore[union-attr]
        assert c_buf.raw().tobytes() == py_buf.raw().tobytes()
    else:
        assert type(c_buf) is type(py_buf)


LAYOUTS = [
    lambda a: a,
    lambda a: a.T,
    lambda a: a[::2] if a.ndim else a,
    lambda a: np.asfortranarray(a),
    lambda a: a[..., :1] if a.ndim else a,
    lambda a: a.reshape(-1)[::-1] if a.size else a,
]


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.one_of(
            hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes(),
            hnp.array_dtypes(max_size=2),
        ),  # object arrays: the test after this one
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3),
        elements=None, fill=st.nothing(),
    ),
    layout=st.integers(0, len(LAYOUTS) - 1),
    readonly=st.booleans(),
    twice=st.booleans(),
)
def test_the_c_reduction_is_the_python_one(
    array: np.ndarray[Any, Any], layout: int, readonly: bool, twice: bool
) -> None:
    view = LAYOUTS[layout](array)
    if readonly:
        view.flags.writeable = False
    if twice:  # the dtype's descriptor is remembered by the first, the C path takes the second
        reductions(view)
    copied = not (view.flags.c_contiguous or view.flags.f_contiguous)
    assert_same_reduction(*reductions(view), copied)


@needs_c
def test_the_c_reduction_takes_the_python_path_for_object_and_exotic_arrays() -> None:
    objects = np.array([1, "a", None], dtype=object)
    python, c = reductions(objects)
    assert c[0] is _rebuild.object_ndarray and c[1] == python[1]
    dates = np.array(["2020-01-01"], dtype="M8[D]")  # no buffer format: a uint8 view of it
    reductions(dates)
    python, c = reductions(dates)
    assert memoryview(c[1][3]).format == "B" and c[1][0] == python[1][0] == "<M8[D]"
    voids = np.zeros(4, dtype="V3")
    reductions(voids)
    assert_same_reduction(*reductions(voids), False)
