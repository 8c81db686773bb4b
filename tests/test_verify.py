"""The typed verifier's own machinery: the hashes it computes are CPython's, its walks don't
recurse, and what a user allows (classes, classmethods) loads while nothing else does."""

from __future__ import annotations

import pickle
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streampickle
from streampickle import ForbiddenGlobalError, MalformedPickleError, _verify

leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**130), 2**130), st.floats(allow_nan=False),
                   st.text(max_size=8), st.binary(max_size=8))
nested = st.recursive(
    leaves,
    lambda inner: st.tuples(inner) | st.tuples(inner, inner) | st.lists(inner, max_size=5).map(tuple),
    max_leaves=20,
)


def abstract(value: object, data: bytearray) -> _verify._V:
    """The verifier's view of a literal value, built as its walk builds it; str and bytes are
    appended to ``data`` as the pickle would hold them."""
    if value is None:
        return _verify._NONE
    if value is True or value is False:
        return _verify._TRUE if value else _verify._FALSE
    if type(value) is int:
        return _verify._int_value(value)
    if type(value) is float:
        return _verify._V(_verify.K.FLOAT, hkind=_verify._FREE, hval=hash(value))
    if type(value) is str or type(value) is bytes:
        raw = value.encode("utf-8", "surrogatepass") if type(value) is str else value
        data += raw
        kind = _verify.K.STR if type(value) is str else _verify.K.BYTES
        return _verify._V(kind, (len(data) - len(raw), len(data)), _verify._TEXT)
    return _verify._tuple_value([abstract(item, data) for item in value], 0, 0, data)  # type: ignore[union-attr]


@settings(max_examples=500, deadline=None)
@given(nested.filter(lambda v: type(v) is tuple))
def test_the_tuple_hash_the_verifier_computes_is_cpythons(value: tuple) -> None:
    view = abstract(value, bytearray())
    _verify._settle(view)
    assert view.hkind == "computed"
    assert view.hval == hash(value)


def test_a_million_deep_tuple_is_refused_at_its_thousand_and_first_level() -> None:
    # hashing it (as a key here, or later by the application) would overflow the C stack
    for deep in (b"\x80\x05}" + b"N" + b"\x85" * 1_000_000 + b"Ns.", b"\x80\x05)" + b"\x85" * 1_000_000 + b"."):
        with pytest.raises(MalformedPickleError, match="TUPLE1: a tuple nested more than 1000 deep"):
            streampickle.loads(make(deep))
    assert streampickle.loads(make(b"\x80\x05)" + b"\x85" * 999 + b".")) is not None  # 1,000 deep: loads
    nested: tuple = ()
    for _ in range(300):
        nested = (nested,)
    assert streampickle.loads(streampickle.dumps(nested)) == nested


def make(pickled: bytes, chunks: int = 0) -> bytes:
    return streampickle._wire.HEADER_STRUCT.pack(b"\x93SPK", 1, 0, 0, chunks, len(pickled)) + pickled


class Registry:
    """A user class with a classmethod constructor."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def named(cls, name: str) -> Registry:
        return cls(name)


def test_a_classmethod_loads_only_when_its_dotted_name_is_allowed() -> None:
    data = streampickle.dumps(Registry.named)  # pickled as getattr(Registry, "named")
    assert b"getattr" in data
    with pytest.raises(ForbiddenGlobalError):
        streampickle.loads(data)
    with pytest.raises(ForbiddenGlobalError, match=r"builtins\.getattr"):
        streampickle.loads(data, allow=[Registry])  # the class alone doesn't admit its attributes
    assert streampickle.loads(data, allow=["test_verify.Registry.named", Registry]) == Registry.named


def test_getattr_can_reach_only_the_allowed_dotted_name() -> None:
    # getattr(Registry, "__init__") with only Registry.named allowed: refused before any call
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    payload = (b"\x80\x05" + s("builtins") + s("getattr") + b"\x93" + s("test_verify") + s("Registry")
               + b"\x93" + s("__init__") + b"\x86R.")
    with pytest.raises(ForbiddenGlobalError):
        streampickle.loads(make(payload), allow=["test_verify.Registry.named", Registry])


def test_an_allowed_class_gets_build_and_its_instances_only() -> None:
    obj = Registry("a")
    data = streampickle.dumps(obj)
    assert streampickle.loads(data, allow=[Registry]).name == "a"
    # the same BUILD aimed at a reconstructor's result is refused
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    payload = b"\x80\x05" + s("streampickle._rebuild") + s("uuid") + b"\x93K\x05\x85R}" + s("int") + s("x") + b"sb."
    with pytest.raises(MalformedPickleError, match="BUILD on a reconstructed value"):
        streampickle.loads(make(payload), allow=[Registry])


def test_a_reconstructor_argument_of_the_wrong_kind_is_refused_before_any_call() -> None:
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    rebuild = lambda name: s("streampickle._rebuild") + s(name) + b"\x93"  # noqa: E731
    # ndarray('<i8', [1], False, <an object array>): the data must be a buffer or bytes
    objects = rebuild("object_ndarray") + b"(]K\x01a\x89\x88]Nat" + b"R"
    payload = b"\x80\x05" + rebuild("ndarray") + b"(" + s("<i8") + b"]K\x01a\x89" + objects + b"tR."
    with pytest.raises(MalformedPickleError, match=r"argument 3 of streampickle\._rebuild\.ndarray must be"):
        streampickle.loads(make(payload))


def test_setitem_into_anything_but_a_dict_the_pickle_made_is_refused() -> None:
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    counter = s("streampickle._rebuild") + s("counter") + b"\x93}\x85R"
    with pytest.raises(MalformedPickleError, match="SETITEM into a reconstructed value"):
        streampickle.loads(make(b"\x80\x05" + counter + s("k") + b"K\x01s."))


def test_the_verifier_counts_work_not_bytes_for_shared_containers() -> None:
    # one memoized 20,000-item list handed to the deque reconstructor 3,000 times: 60M items walked
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    items = b"](" + b"N" * 20_000 + b"e\x94"
    call = b"h\x00h\x01N\x86R0"
    payload = (
        b"\x80\x05" + s("streampickle._rebuild") + s("deque") + b"\x93\x94" + b"0" + items + b"0"
        + b"h\x00" + b"0" + call * 3000 + b"N."
    )
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        streampickle.loads(make(payload))


def test_a_reconstructor_refusing_a_value_names_its_reduce_and_offset() -> None:
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    uuid_call = s("streampickle._rebuild") + s("uuid") + b"\x93"
    good = uuid_call + b"\x8a\x01\x05\x85R"
    bad = uuid_call + b"\x8a\x11" + b"\xff" * 17 + b"\x85R"  # UUID(int=-1)
    payload = b"\x80\x05" + good + bad + b"\x86."
    reduce_at = 2 + len(good) + len(bad) - 1
    with pytest.raises(MalformedPickleError, match=rf"at byte {reduce_at}: REDUCE: .*UUID"):
        streampickle.loads(make(payload))


def test_getattr_with_a_name_that_is_not_utf8_is_refused_by_both_twins() -> None:
    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    payload = (b"\x80\x05" + s("builtins") + s("getattr") + b"\x93" + s("test_verify") + s("Registry")
               + b"\x93\x8c\x01\xff\x86R)R.")
    with pytest.raises(MalformedPickleError, match="not valid UTF-8"):
        streampickle.loads(make(payload), allow=["test_verify.Registry.named", Registry])


def test_a_big_int_key_is_charged_its_digits_each_time_it_is_hashed() -> None:
    # one 200 KB int, memoized, put into 50,000 frozensets: 10 GB of digits hashed
    big = (1 << (8 * 200_000 - 2)) + 12345
    payload = (b"\x80\x05\x8b" + struct.pack("<i", 200_000) + big.to_bytes(200_000, "little", signed=True)
               + b"\x940](" + b"(h\x00\x91" * 50_000 + b"e.")
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        streampickle.loads(make(payload))
    assert len(streampickle.loads(streampickle.dumps({big: 1, big + 1: 2}))) == 2  # charged once each


def test_nan_in_a_tuple_key_is_hashed_as_the_object_it_will_be() -> None:
    # A NaN hashes by address: distinct NaNs differ, but one NaN (a memo copy) hashes alike in
    # every tuple. Both modes stand each NaN in with its opcode's offset and count equal hashes.
    from streampickle import _scan

    scans = [_scan.scan_py] + ([_scan.scan_c] if _scan.scan_c is not None else [])
    data = pickle.dumps({(float("nan"), i): i for i in range(20)}, protocol=5)  # twenty NaNs
    assert [scan(data, 0) for scan in scans] == [0] * len(scans)
    assert sorted(key[1] for key in streampickle.loads(make(data))) == list(range(20))
    one_nan = b"G" + struct.pack(">d", float("nan")) + b"\x94"
    for count, admitted in ((8, True), (9, False)):
        keys = b"".join(b"\x8a\x09" + (k * (2**61 - 1)).to_bytes(9, "little") + (one_nan if k == 1 else b"h\x00")
                        + b"\x86N" for k in range(1, count + 1))
        flood = b"\x80\x05}(" + keys + b"u."
        for scan in scans:
            got = scan(flood, 0)
            assert got == 0 if admitted else got[1].startswith("more than 8 keys with the same hash"), (scan, got)


def test_collision_records_of_freed_containers_do_not_merge() -> None:
    # two dicts of 5 colliding big-int keys each, the first popped before the second is made
    p = 2**61 - 1
    keys = lambda start: b"".join(b"\x8a\x09" + (k * p).to_bytes(9, "little") + b"N" for k in range(start, start + 5))  # noqa: E731
    payload = b"\x80\x05}(" + keys(1) + b"u0}(N}u0}(" + keys(6) + b"u."
    assert len(streampickle.loads(make(payload))) == 5


def test_a_datetime_unit_multiplier_of_zero_is_refused() -> None:
    from streampickle import _rebuild

    with pytest.raises(MalformedPickleError):
        _rebuild.dtype("<M8[0s]")
    assert _rebuild.dtype("<M8[10s]") == "<M8[10s]"


# -- the standard walk's work is linear in the pickle's size -----------------------------------

_DTYPE_CALL = b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"  # numpy.dtype("f8", False, True): pending
_DTYPE_STATE = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
_P4 = b"\x80\x04"


def _shared_dtype_pickle(levels: int) -> bytes:
    """A dtype whose every level uses the level below twice (one object, memoized): the
    pickle grows with ``levels``, the tree it describes with 2**levels."""
    import numpy as np

    dt = np.dtype("i1")
    for _ in range(levels):
        dt = np.dtype({"names": ["a", "b"], "formats": [dt, dt], "offsets": [0, dt.itemsize],
                       "itemsize": 2 * dt.itemsize})
    return pickle.dumps(dt, protocol=2)


#: Adversarial shapes of standard pickles, each made with about ``n`` repetitions.
_SHAPES = {
    "nested lists": lambda n: _P4 + b"]" * n + b"a" * (n - 1) + b".",
    "nested tuples": lambda n: _P4 + b")" + b"\x85" * 990 + b"N0" * n + b".",
    "many BINGET": lambda n: _P4 + b"]\x94(" + b"h\x00" * n + b"e.",
    "many MEMOIZE": lambda n: _P4 + b"N" + b"\x94" * n + b".",
    "PUT lines": lambda n: b"N" + b"".join(b"p%d\n" % i for i in range(n)) + b".",
    "GET lines": lambda n: b"(lp0\n" + b"g0\n" * n + b"a" * n + b".",
    "MARK, POP_MARK": lambda n: _P4 + b"N" + b"(1" * n + b".",
    "runs of MARKs": lambda n: _P4 + b"N" + (b"(" * 1000 + b"N" * 10 + b"1" * 1000) * (n // 1000) + b".",
    "a pending value alive": lambda n: (b"\x80\x02" + _DTYPE_CALL + b"(" + b"N" * n + b"t0" + b"N\x850" * n
                                        + _DTYPE_STATE + b"b."),
    "a shared dtype graph": lambda n: _shared_dtype_pickle(n // 300),  # 3 and 26 levels
    "one deep tuple as every key": lambda n: _P4 + b"})" + b"\x85" * 60 + b"\x940(" + b"h\x00N" * n + b"u.",
    "many GLOBALs": lambda n: b"\x80\x02" + b"cnumpy\ndtype\n0" * n + b"N.",
    "set items": lambda n: _P4 + b"\x8f(" + b"".join(b"J" + i.to_bytes(4, "little") for i in range(n)) + b"\x90.",
}


def _walk_work(data: bytes) -> int:
    """Python lines and calls that verify_standard runs on ``data`` (its helpers and the
    resolver included): a count of work, not a time."""
    loader = streampickle._safe.Loader()
    count = 0

    def tracer(frame: object, event: str, arg: object) -> object:
        nonlocal count
        count += 1
        return tracer

    sys.settrace(tracer)
    try:
        _verify.verify_standard(data, loader.resolve_standard, 1000)
    except (_verify.Refused, streampickle.StreamPickleError):
        pass  # a refusal late in the pickle: the work up to it is what counts
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("shape", _SHAPES)
def test_the_standard_walk_does_work_linear_in_the_pickles_size(shape: str) -> None:
    # Measured at the time of writing: 8 to 35 lines per byte, the same at every size.
    per_byte = []
    for n in (1000, 8000):
        data = _SHAPES[shape](n)
        work = _walk_work(data)
        assert work <= 48 * len(data) + 5000, (shape, n, len(data), work)
        per_byte.append(work / len(data))
    assert per_byte[1] <= 1.25 * per_byte[0] + 1, per_byte  # eight times the bytes: no more per byte
