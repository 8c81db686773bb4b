"""Red-team regression tests: attacks on the safe loader, each kept with the exact outcome.

Every attack arrives as a well-framed message. Each test asserts what must happen: the error
class (always a StreamPickleError), that a Decoder fed the attack followed by another message
drops the attack and still decodes the next one, that no code ran (a canary file), or that a
result is refused or bounded. No test asserts timing: inputs are made big enough that the old
behaviour (quadratic, exponential, unbounded) would never finish in a test run.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import fractions
import pickle
import struct
import subprocess
import sys
import zoneinfo
from typing import Any

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import (
    Decoder,
    ForbiddenGlobalError,
    MalformedPickleError,
    StreamPickleError,
    UsageError,
    _scan,
    _verify,
)
from streampickle import _rebuild as R

P5 = b"\x80\x05"
HASH_MODULUS = (1 << 61) - 1


# -- building hostile pickles ----------------------------------------------------------------


def s(text: str | bytes) -> bytes:  # SHORT_BINUNICODE (or BINUNICODE when long)
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + struct.pack("<I", len(raw)) + raw


def glob(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return s(module) + s(name) + b"\x93"


def rb(name: str) -> bytes:  # a reconstructor, by its wire name
    return glob("streampickle._rebuild", name)


def long1(value: int) -> bytes:  # LONG1 (LONG4 when long)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


def binint(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def binfloat(value: float) -> bytes:
    return b"G" + struct.pack(">d", value)


def memo_get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


class Call:
    """Pickles as ``func(*args)``, then optionally BUILD with ``state``, and SETITEMS/APPENDS
    into the result: lets a test write any reduce tuple without a real object behind it."""

    def __init__(self, func: Any, *args: Any, state: Any = None, items: Any = None, dictitems: Any = None) -> None:
        self.func, self.args, self.state, self.items, self.dictitems = func, args, state, items, dictitems

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            self.func, self.args, self.state,
            iter(self.items) if self.items is not None else None,
            iter(self.dictitems) if self.dictitems is not None else None,
        )


def dumps5(obj: Any) -> tuple[bytes, list[bytes]]:
    """Protocol 5 with every PickleBuffer out of band: the pickle part and the side chunks."""
    chunks: list[bytes] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=lambda b: chunks.append(bytes(b.raw())) or False)
    return data, chunks


def refuse(pickle_bytes: bytes, chunks: list[bytes] = (), exc: type = MalformedPickleError, **options: Any) -> Any:  # type: ignore[assignment]
    """The message is refused with ``exc`` (a StreamPickleError), by loads and by a Decoder,
    and the Decoder goes on to decode the message after it."""
    assert issubclass(exc, StreamPickleError)
    with pytest.raises(exc):
        streampickle.loads(make_message(pickle_bytes, list(chunks)), **options)
    decoder = Decoder(**options)
    decoder.feed(make_message(pickle_bytes, list(chunks)) + streampickle.dumps("after"))
    with pytest.raises(exc) as info:
        next(decoder)
    assert next(decoder) == "after"
    return info.value


def refuse_obj(obj: Any, exc: type = MalformedPickleError, **options: Any) -> Any:
    data, chunks = dumps5(obj)
    return refuse(data, chunks, exc, **options)


def load(pickle_bytes: bytes, chunks: list[bytes] = (), **options: Any) -> Any:  # type: ignore[assignment]
    return streampickle.loads(make_message(pickle_bytes, list(chunks)), **options)


def twins_agree(pickle_bytes: bytes, chunk_count: int = 0) -> None:
    if _scan.scan_c is not None:
        assert _scan.scan_c(pickle_bytes, chunk_count) == _scan.scan_py(pickle_bytes, chunk_count)


@pytest.fixture()
def canary(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the attack ran code"


# -- classes a user might allow --------------------------------------------------------------


class Point:
    def __init__(self, x: int = 0, y: int = 0) -> None:
        self.x, self.y = x, y

    @classmethod
    def origin(cls) -> Point:
        return cls(0, 0)

    @classmethod
    def touch(cls, path: str) -> None:  # a method nobody allowed
        open(path, "w").close()


class ConstantHash:
    """A user class whose instances all hash alike: a hash flood if a peer may use many."""

    def __init__(self, v: int = 0) -> None:
        self.v = v

    def __hash__(self) -> int:
        return 7

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConstantHash) and self.v == other.v


class PointDict(dict):  # type: ignore[type-arg]
    pass


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: Any = None


# -- 7a: BUILD on what a reconstructor returned ----------------------------------------------


def test_build_on_dtype_result_setting_a_huge_itemsize_is_refused() -> None:
    # numpy's dtype.__setstate__ with a |V8 dtype's state changed to itemsize 1 MiB
    state = (3, "|", None, None, None, 1 << 20, 1, 0)
    err = refuse_obj(Call(R.dtype, "|V8", state=state))
    assert "BUILD on a reconstructed value" in str(err)


def test_build_on_dtype_result_moving_fields_out_of_bounds_is_refused() -> None:
    fields = {"a": (Call(R.dtype, "<f8"), 1 << 30)}
    state = (3, "|", None, ("a",), fields, 8, 1, 16)
    err = refuse_obj(Call(R.dtype, [["a", "<f8", []]], state=state))
    assert "BUILD" in str(err)


def test_build_on_ndarray_result_is_refused() -> None:
    # ndarray.__setstate__ with a state claiming far more data than the buffer holds
    state = (1, (1 << 20,), Call(R.dtype, "<f8"), False, b"\x00" * 8)
    err = refuse_obj(Call(R.ndarray, "<f8", [1], False, b"\x00" * 8, state=state))
    assert "BUILD on a reconstructed value" in str(err)


def test_build_with_slot_state_on_a_reconstructor_itself_is_refused() -> None:
    payload = P5 + rb("scalar") + b"N}" + s("_func") + glob("os", "system") + b"s\x86b."
    refuse(payload, exc=ForbiddenGlobalError)
    payload = P5 + rb("scalar") + b"N}" + s("_func") + b"Ns\x86b."
    assert "BUILD on a global" in str(refuse(payload))


# -- 7b: arrays over what isn't a byte buffer, and writes into arrays ------------------------


def test_ndarray_over_an_object_ndarray_is_refused() -> None:
    objs = Call(R.object_ndarray, [2], False, True, [1, 2])
    err = refuse_obj(Call(R.ndarray, "<i8", [2], False, objs))
    assert "argument 3 of streampickle._rebuild.ndarray" in str(err)


def test_setitem_into_an_array_is_refused() -> None:
    objs = Call(R.object_ndarray, [2], False, True, [1, 2])
    err = refuse_obj(Call(R.ndarray, "<i8", [1], False, pickle.PickleBuffer(b"\x00" * 8), dictitems=[(0, objs)]))
    assert "into a reconstructed value: only into a dict this pickle made" in str(err)
    err = refuse_obj(Call(R.object_ndarray, [2], False, True, [1, 2], dictitems=[(0, 5)]))
    assert "into a reconstructed value: only into a dict this pickle made" in str(err)


def test_setitem_on_an_array_with_a_range_index_is_refused() -> None:
    arr = Call(R.ndarray, "<i8", [4], False, pickle.PickleBuffer(b"\x00" * 32))
    err = refuse_obj(Call(R.object_ndarray, [1], False, True, [arr], dictitems=[(Call(R.range_, 0, 2**62, 1), 1)]))
    assert "into a reconstructed value" in str(err)


def test_appends_into_a_deque_result_are_refused() -> None:
    err = refuse_obj(Call(R.deque, [1], None, items=list(range(10))))
    assert "APPENDS into a reconstructed value" in str(err)


def test_ndarray_over_a_bytearray_literal_is_refused() -> None:
    err = refuse_obj(Call(R.ndarray, "<i8", [1], False, bytearray(8)))
    assert "argument 3" in str(err) and "bytearray" in str(err)


def test_ndarray_over_a_reconstructed_value_or_a_list_is_refused() -> None:
    refuse_obj(Call(R.ndarray, "<i8", [1], False, Call(R.uuid, 5)))
    refuse_obj(Call(R.ndarray, "|u1", [3], False, [1, 2, 3]))


def test_arrays_over_bytes_literals_and_readonly_buffers_are_readonly() -> None:
    arr = load(*dumps5(Call(R.ndarray, "<i4", [2], False, b"\x01\x00\x00\x00\x02\x00\x00\x00")))
    assert arr.tolist() == [1, 2] and not arr.flags.writeable
    # READONLY_BUFFER on an out-of-band buffer: the array can't write into the chunk
    payload = P5 + rb("ndarray") + b"(" + s("<i4") + b"]K\x02a\x89\x97\x98tR."
    twins_agree(payload, 1)
    arr = load(payload, [struct.pack("<ii", 3, 4)])
    assert arr.tolist() == [3, 4] and not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0] = 1


def test_readonly_buffer_on_anything_but_a_buffer_is_refused() -> None:
    for target in (b"C\x01x", b"\x96" + struct.pack("<Q", 1) + b"x", rb("ellipsis") + b")R"):
        err = refuse(P5 + target + b"\x98.")
        assert "READONLY_BUFFER" in str(err)


def test_mutating_the_bytearray_behind_a_loaded_array_is_impossible() -> None:
    # the same side chunk viewed twice, once as text: both views come from the one buffer the
    # decoder made for this message, never from memory the caller still holds
    payload = (
        P5 + rb("ndarray") + b"(" + s("<U1") + b"]K\x01a\x89\x97\x94tR"
        + rb("ndarray") + b"(" + s("<u4") + b"]K\x01a\x89h\x00tR\x86."
    )
    chunk = bytearray(struct.pack("<I", 0x41))
    text, units = load(payload, [bytes(chunk)])
    chunk[0] = 0xFF
    assert text.tolist() == ["A"] and units.tolist() == [0x41]


# -- 7c: reconstructors given what would never return, or a type's out-of-range state -------


def test_deque_of_a_range_is_refused() -> None:
    err = refuse_obj(Call(R.deque, Call(R.range_, 0, 10**6, 1), None))
    assert "argument 0 of streampickle._rebuild.deque must be a list" in str(err)
    err = refuse_obj(Call(R.deque, Call(R.range_, 0, 2**62, 1), 0))
    assert "must be a list" in str(err)


@pytest.mark.parametrize(
    "target",
    [
        Call(R.uuid, 5),
        Call(R.fraction, 1, 3),
        Call(R.counter, {"a": 1}),
        Call(R.ordered_dict, {"a": 1}),
        Call(R.decimal, 0, "1", 0),
        Call(R.deque, [1], None),
        Call(R.zoneinfo, "UTC"),
        Call(R.timezone, 3_600_000_000, None),
        Call(R.datetime, 2000, 1, 1, 0, 0, 0, 0, None, 0),
    ],
    ids=lambda c: c.func._name,
)
def test_build_setting_attributes_on_reconstructed_values_is_refused(target: Call) -> None:
    target.state = ({"int": 1 << 200, "_numerator": 0}, {"int": 5, "maxlen": 0, "key": "x"})
    err = refuse_obj(target)
    assert "BUILD on a reconstructed value" in str(err) or "BUILD on a time zone" in str(err)


@pytest.mark.parametrize(
    "call",
    [
        Call(R.date, 2000, 2, 30),
        Call(R.date, 0, 1, 1),
        Call(R.date, 10000, 1, 1),
        Call(R.date, 2001, 2, 29),
        Call(R.time, 24, 0, 0, 0, None, 0),
        Call(R.time, 0, 60, 0, 0, None, 0),
        Call(R.time, 0, 0, 0, 1_000_000, None, 0),
        Call(R.time, 0, 0, 0, 0, None, 2),
        Call(R.datetime, 2000, 13, 1, 0, 0, 0, 0, None, 0),
        Call(R.datetime, 2000, 1, 1, 0, 0, 60, 0, None, 0),
        Call(R.datetime, 2000, 1, 1, 0, 0, 0, -1, None, 0),
        Call(R.datetime, 2000, 1, 1, 0, 0, 0, 0, None, True),
        Call(R.timedelta, 10**9, 0, 0),
        Call(R.timedelta, 0, 86_400, 0),
        Call(R.timezone, 86_400_000_000, None),
        Call(R.fraction, 1 << (1 << 16), 3),
        Call(R.fraction, 3, 1 << (1 << 16)),
        Call(R.fraction, 1, 0),
        Call(R.decimal, 0, "1" * 5000, 0),
        Call(R.decimal, 0, "1", 10**6),
        Call(R.uuid, 1 << 128),
        Call(R.range_, 0, 1 << 64, 1),
        Call(R.range_, 0, 10, 0),
        Call(R.slice_, 1 << 64, None, None),
        Call(R.deque, [1], 1 << 63),
        Call(R.zoneinfo, "../../../etc/passwd"),
        Call(R.zoneinfo, "Not/A_Zone"),
    ],
    ids=lambda c: c.func._name,
)
def test_out_of_range_fields_are_refused_by_the_reconstructor(call: Call) -> None:
    err = refuse_obj(call)
    assert "invalid data in the pickle" in str(err) or "REDUCE: argument" in str(err)
    assert len(str(err)) < 1000


def test_int_and_bool_confusion_in_reconstructor_arguments_is_refused() -> None:
    refuse_obj(Call(R.date, True, 1, 1))
    refuse_obj(Call(R.fraction, 1.5, 2))  # a float where an int is declared: the verifier's
    refuse_obj(Call(R.date, "2000", 1, 1))


# -- 7d: shared structure in errors and descriptors ------------------------------------------


def shared_bomb_pickle(levels: int) -> bytes:
    """A list whose every level holds the level below twice, through the memo: 2**levels
    leaves, a few bytes per level."""
    body = b"]K\x01a\x940"  # memo 0: [1]
    for i in range(levels):
        body += b"](" + memo_get(i) + memo_get(i) + b"e\x940"
    return body + memo_get(levels)


def test_failing_reconstructor_given_a_memo_shared_list_40_deep_does_not_walk_it() -> None:
    bomb = shared_bomb_pickle(40)
    for call in (
        rb("deque") + b"(" + bomb + binfloat(1.0) + b"tR",  # verifier: maxlen must be an int
        rb("deque") + b"(" + bomb + binint(-1) + b"tR",  # reconstructor: maxlen out of range
        rb("object_ndarray") + b"(]K\x03a\x89\x88" + bomb + b"tR",  # 3 items wanted
        rb("ndarray") + b"(" + bomb + b"]K\x01a\x89C\x01xtR",  # a descriptor of 2**40 nodes
        rb("dtype") + b"(" + bomb + b"tR",
        rb("ordered_dict") + b"(" + bomb + b"tR",
        rb("zoneinfo") + b"(" + bomb + b"tR",
    ):
        err = refuse(P5 + call + b".")
        assert len(str(err)) < 1000


def test_structured_dtype_reusing_one_memoized_sublist_at_every_level_is_refused() -> None:
    # level 0: [["a", "<f8", []]]; level i: 16 fields that are all level i-1, 8 levels deep
    body = b"](](" + s("a") + s("<f8") + b"]ee\x940"  # memo 0: [["a", "<f8", []]]
    for level in range(7):
        fields = b"".join(b"](" + s(f"f{k}") + memo_get(level) + b"]e" for k in range(16))
        body += b"](" + fields + b"e\x940"
    descriptor = memo_get(7)  # 16**7 leaves, 300 bytes
    err = refuse(P5 + body + rb("dtype") + descriptor + b"\x85R.")
    assert "nodes" in str(err)
    bomb = P5 + body + rb("ndarray") + b"(" + descriptor + b"]K\x00a\x89C\x00tR."
    assert "nodes" in str(refuse(bomb))
    assert load(P5 + body + rb("dtype") + memo_get(1) + b"\x85R.").itemsize == 16 * 8


# -- 7e: text arrays with code units above U+10FFFF ------------------------------------------


@pytest.mark.parametrize("descr", ["<U1", ">U1", "<U3"])
def test_text_array_with_code_unit_above_max_is_refused(descr: str) -> None:
    width = int(descr[2:])
    fmt = "<I" if descr[0] == "<" else ">I"
    chunk = b"".join(struct.pack(fmt, u) for u in ([0x41] * (width - 1) + [0x110000]))
    data, chunks = dumps5(Call(R.ndarray, descr, [1], False, pickle.PickleBuffer(chunk)))
    err = refuse(data, chunks)
    assert "U+10FFFF" in str(err)
    data, _ = dumps5(Call(R.ndarray, descr, [1], False, chunk))  # in-band bytes, same check
    refuse(data)
    refuse_obj(Call(R.scalar, descr, chunk))


def test_nested_structured_text_field_with_bad_code_unit_is_refused() -> None:
    descr = [["outer", [["pad", "|u1", []], ["txt", "<U2", [2]]], [3]]]
    itemsize = 3 * (1 + 2 * 2 * 4)
    chunk = bytearray(itemsize)
    struct.pack_into("<I", chunk, itemsize - 4, 0xFFFFFFFF)
    refuse_obj(Call(R.ndarray, descr, [1], False, pickle.PickleBuffer(bytes(chunk))))
    refuse_obj(Call(R.scalar, descr, bytes(chunk)))
    chunk[-4:] = struct.pack("<I", 0x10FFFF)  # the largest code point is fine
    arr = load(*dumps5(Call(R.ndarray, descr, [1], False, pickle.PickleBuffer(bytes(chunk)))))
    assert arr["outer"]["txt"][0, 2, 1] == "\x00\U0010ffff"


# -- 7f: getattr, ZoneInfo, classmethods ---------------------------------------------------


def test_allow_builtins_getattr_is_a_usage_error() -> None:
    for allow in (["builtins.getattr"], [getattr], ["builtins.setattr"], ["test_attacks.Point.__init__.__globals__"],
                  ["collections.OrderedDict.__init__.__globals__"], ["builtins.object.__subclasses__"]):
        with pytest.raises(UsageError, match="can never be allowed"):
            streampickle.loads(streampickle.dumps(1), allow=allow)


def test_tz_aware_datetime_with_zoneinfo_loads_by_default_without_getattr() -> None:
    value = dt.datetime(2026, 3, 29, 2, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    data = streampickle.dumps(value)
    assert b"getattr" not in data
    assert streampickle.loads(data) == value
    assert streampickle.loads(data).tzinfo is zoneinfo.ZoneInfo("Europe/Paris")
    # the stdlib way of pickling a ZoneInfo (a classmethod through getattr) needs a name
    refuse(
        P5 + glob("builtins", "getattr") + glob("zoneinfo", "ZoneInfo") + s("_unpickle") + b"\x86R"
        + s("UTC") + b"K\x01\x86R.",
        exc=ForbiddenGlobalError,
    )


def classmethod_pickle(attr: str, args: bytes = b")") -> bytes:
    return P5 + glob("builtins", "getattr") + glob("test_attacks", "Point") + s(attr) + b"\x86R" + args + b"R."


def test_classmethod_through_getattr_loads_only_when_its_dotted_name_is_allowed(canary) -> None:
    payload = classmethod_pickle("origin")
    refuse(payload, exc=ForbiddenGlobalError, allow=[Point])  # getattr itself is not admitted
    point = load(payload, allow=[Point, "test_attacks.Point.origin"])
    assert (type(point), point.x) == (Point, 0)
    # another method of the same class, with origin allowed: refused
    touch = classmethod_pickle("touch", s(str(canary)) + b"\x85")
    err = refuse(touch, exc=ForbiddenGlobalError, allow=[Point, "test_attacks.Point.origin"])
    assert "touch" in str(err)
    # getattr on a global that is not allowed itself
    payload = P5 + glob("builtins", "getattr") + glob("os", "system") + s("x") + b"\x86R."
    refuse(payload, exc=ForbiddenGlobalError, allow=[Point, "test_attacks.Point.origin"])


def test_getattr_chains_need_every_link_allowed(canary) -> None:
    allow = [Point, "test_attacks.Point.origin"]
    inner = glob("builtins", "getattr") + glob("test_attacks", "Point") + s("origin") + b"\x86R"
    for attr in ("__func__", "__globals__", "__self__", "touch"):
        payload = P5 + glob("builtins", "getattr") + inner + s(attr) + b"\x86R."
        refuse(payload, exc=ForbiddenGlobalError, allow=allow)
    # getattr of a reconstructor's attribute, or of getattr itself: a reconstructor is only called
    getattr_ = P5 + glob("builtins", "getattr")
    for owner in (rb("ndarray"), glob("builtins", "getattr")):
        error = refuse(getattr_ + owner + s("_func") + b"\x86R.", allow=allow)
        assert "named and not called" in str(error)
    # getattr with anything but (global, str literal)
    refuse(P5 + glob("builtins", "getattr") + glob("test_attacks", "Point") + b"C\x06origin\x86R.", allow=allow)
    refuse(getattr_ + glob("test_attacks", "Point") + s("origin") + s("x") + b"\x87R.", allow=allow)


def test_getattr_as_a_reduce_callable_result_is_not_callable_on_values() -> None:
    allow = [Point, "test_attacks.Point.origin"]
    # REDUCE whose callable is what a call returned (a Point): refused, only globals are called
    payload = P5 + glob("test_attacks", "Point") + b")R" + b")R."
    assert "REDUCE calls a" in str(refuse(payload, allow=allow))


# -- globals: memo and FRAME games -------------------------------------------------------------


def test_stack_global_names_from_memo_through_a_frame_are_the_names_verified(canary) -> None:
    body = s("streampickle._rebuild") + b"\x94" + s("ellipsis") + b"\x940" + b"0"
    body += b"h\x00h\x01\x93)R" + b"0"  # a fine call of a reconstructor, through the memo
    body += glob("os", "system") + s(f"touch {canary}") + b"\x85R."
    framed = P5 + b"\x95" + struct.pack("<Q", len(body) - 1) + body
    refuse(framed, exc=ForbiddenGlobalError)
    twins_agree(framed)


def test_stack_global_on_a_non_literal_is_refused() -> None:
    for module, name in (
        (rb("ellipsis") + b")R", s("x")),
        (b"C\x02os", b"C\x06system"),
        (b"N", s("x")),
        (s("os") + s("system") + b"\x86", s("x")),
    ):
        err = refuse(P5 + module + name + b"\x93.")
        assert "STACK_GLOBAL needs two str literals" in str(err)


def test_stack_global_split_differently_resolves_the_same_reconstructor() -> None:
    # "streampickle" + "_rebuild.ellipsis" names the same object: no way round the table
    assert load(P5 + glob("streampickle", "_rebuild.ellipsis") + b")R.") is Ellipsis
    refuse(P5 + glob("streampickle", "_rebuild.np.ctypeslib") + b".", exc=ForbiddenGlobalError)
    refuse(P5 + glob("streampickle._rebuild", "np.empty") + b")R.", exc=ForbiddenGlobalError)
    refuse(P5 + glob("streampickle._rebuild", "pickle.loads") + b".", exc=ForbiddenGlobalError)


@pytest.mark.parametrize(
    "payload",
    [
        P5 + b"\x95" + struct.pack("<Q", 3) + b"\x8c\x02os" + s("system") + b"\x93.",  # straddle
        P5 + b"\x95" + struct.pack("<Q", 2**64 - 1) + b"N.",
        P5 + b"\x95" + struct.pack("<Q", 1) + b"N" + b"\x95" + struct.pack("<Q", 1) + b"\x95",
        P5 + b"\x95" + struct.pack("<Q", 2) + b"\x95" + struct.pack("<Q", 2) + b"N.",
        P5 + b"N\x95" + struct.pack("<Q", 1) + b"." + b"\x95",
        P5 + b"\x95" + struct.pack("<Q", 5),
    ],
)
def test_frame_games_are_refused(payload: bytes) -> None:
    refuse(payload)
    twins_agree(payload)


def test_empty_and_adjacent_frames_are_fine() -> None:
    payload = (
        P5 + b"\x95" + struct.pack("<Q", 0) + b"\x95" + struct.pack("<Q", 1) + b"N"
        + b"\x95" + struct.pack("<Q", 1) + b"."
    )
    assert load(payload) is None
    twins_agree(payload)


# -- NEXT_BUFFER kinds and counts --------------------------------------------------------------


def test_out_of_band_buffers_as_keys_or_call_arguments_are_refused() -> None:
    refuse(P5 + b"}\x97Ns.", [b"ab"])  # a buffer as a dict key
    refuse(P5 + b"\x8f(\x97\x98\x90.", [b"ab"])  # a read-only buffer as a set item (hashable at runtime)
    refuse(P5 + b"(\x97\x91.", [b"ab"])
    refuse_obj(Call(R.scalar, "<i2", pickle.PickleBuffer(b"ab")))  # a scalar's data is bytes only
    refuse_obj(Call(R.dtype, pickle.PickleBuffer(b"<i2")))
    refuse_obj(Call(R.zoneinfo, pickle.PickleBuffer(b"UTC")))


def test_buffer_counts_must_match() -> None:
    refuse(P5 + b"\x97\x97\x86.", [b"a"])
    refuse(P5 + b"\x97\x94h\x00\x86.", [b"a", b"b"])  # one NEXT_BUFFER used twice, two chunks
    refuse(P5 + rb("ellipsis") + b")R.", [b"a"])
    refuse(P5 + rb("ellipsis") + b"\x97\x85R.", [b"a"])  # and ellipsis takes no argument


def test_one_buffer_viewed_by_two_arrays_is_consistent() -> None:
    payload = P5 + b"(" + rb("ndarray") + b"(" + s("|u1") + b"]K\x04a\x89\x97\x94tR"
    payload += rb("ndarray") + b"(" + s("<i4") + b"]K\x01a\x89h\x00tRt."
    a, b = load(payload, [b"\x01\x00\x00\x00"])
    assert a.tolist() == [1, 0, 0, 0] and b.tolist() == [1]


# -- NEWOBJ, NEWOBJ_EX, REDUCE on things that aren't allowed globals ----------------------


@pytest.mark.parametrize("name", ["ellipsis", "uuid", "ndarray", "deque"])
def test_newobj_on_a_reconstructor_is_refused(name: str) -> None:
    assert "NEWOBJ instantiates" in str(refuse(P5 + rb(name) + b")\x81."))
    assert "NEWOBJ_EX instantiates" in str(refuse(P5 + rb(name) + b")}\x92."))


def test_newobj_on_a_reconstructed_value_or_an_allowed_function_is_refused() -> None:
    refuse(P5 + rb("dtype") + s("<f8") + b"\x85R)\x81.")
    refuse(P5 + glob("test_attacks", "Point") + b")R)\x81.", allow=[Point])
    refuse(P5 + glob("test_attacks", "Point.origin") + b")\x81.", allow=["test_attacks.Point.origin"])
    refuse(P5 + glob("test_attacks", "Point") + b"N\x81.", allow=[Point])  # arguments not a tuple
    refuse(P5 + glob("test_attacks", "Point") + b")N\x92.", allow=[Point])  # kwargs not a dict


def test_newobj_on_an_allowed_class_builds_it_without_init() -> None:
    point = load(P5 + glob("test_attacks", "Point") + b")\x81}" + s("x") + b"K\x05sb.", allow=[Point])
    assert point.x == 5 and not hasattr(point, "y")


def test_reduce_on_a_reconstructor_result_is_refused(canary) -> None:
    # a reconstructor's result as a REDUCE callable (a dtype, a zone, a deque...)
    for value in (rb("dtype") + s("<f8") + b"\x85R", rb("zoneinfo") + s("UTC") + b"\x85R", rb("deque") + b"]N\x86R"):
        err = refuse(P5 + value + s(f"touch {canary}") + b"\x85R.")
        assert "REDUCE calls a" in str(err)
    # a REDUCE whose callable came through the memo as a value, and a list, a str, a buffer
    refuse(P5 + b"]\x94)R.")
    refuse(P5 + s("os.system") + b")R.")
    refuse(P5 + b"\x97)R.", [b"x"])


def test_reduce_arity_and_kinds_are_checked_before_the_call() -> None:
    refuse(P5 + rb("ellipsis") + b"N\x85R.")
    refuse(P5 + rb("uuid") + b"K\x01K\x02\x86R.")
    refuse(P5 + rb("uuid") + b"]\x85R.")
    refuse(P5 + rb("uuid") + b"]R.")  # arguments not a tuple


# -- BUILD on allowed classes: what it may and may not reach ------------------------------


def test_build_state_cannot_change_an_instance_into_a_dict_subclass() -> None:
    # BUILD with slot state setting __class__ to an allowed dict subclass, then SETITEMS:
    # the verifier still sees an instance of Point, not a dict
    payload = (
        P5 + glob("test_attacks", "Point") + b")\x81N}" + s("__class__") + glob("test_attacks", "PointDict")
        + b"s\x86b"
    )
    payload += b"(" + s("k") + b"Nu."
    err = refuse(payload, allow=[Point, PointDict])
    assert "SETITEMS into a instance of an allowed class" in str(err)


def test_build_cannot_set_class_to_a_non_allowed_type(canary) -> None:
    payload = (
        P5 + glob("test_attacks", "Point") + b")\x81N}" + s("__class__") + glob("subprocess", "Popen")
        + b"s\x86b."
    )
    refuse(payload, exc=ForbiddenGlobalError, allow=[Point])


def test_setitems_into_an_allowed_dict_subclass_counts_its_keys() -> None:
    payload = P5 + glob("test_attacks", "PointDict") + b")\x81("
    payload += b"".join(long1(7 + k * HASH_MODULUS) + b"N" for k in range(1, 20)) + b"u."
    assert "hash flood" in str(refuse(payload, allow=[PointDict]))
    ok = P5 + glob("test_attacks", "PointDict") + b")\x81(" + s("a") + b"K\x01u."
    assert load(ok, allow=[PointDict]) == {"a": 1}


# -- hash flooding ------------------------------------------------------------------------


def test_int_keys_equal_modulo_the_hash_modulus_are_refused() -> None:
    keys = b"".join(long1(k * HASH_MODULUS) + b"N" for k in range(1, 2000))
    err = refuse(P5 + b"}(" + keys + b"u.")
    assert "hash flood" in str(err)
    refuse(P5 + b"\x8f(" + b"".join(long1(k * HASH_MODULUS) for k in range(1, 2000)) + b"\x90.")
    refuse(P5 + b"(" + b"".join(long1(k * HASH_MODULUS) for k in range(1, 2000)) + b"\x91.")
    # negative ones too (hash(-x) == -hash(x)), and big multiples
    refuse(P5 + b"}(" + b"".join(long1(-k * HASH_MODULUS * (1 << 200)) + b"N" for k in range(1, 50)) + b"u.")


def test_a_few_colliding_ints_are_fine() -> None:
    keys = b"".join(long1(k * HASH_MODULUS) + b"N" for k in range(1, 9))
    assert len(load(P5 + b"}(" + keys + b"u.")) == 8


def _tuple_lane(acc: int, h: int) -> int:
    m64 = (1 << 64) - 1
    acc = (acc + (h & m64) * 14029467366897019727) & m64
    acc = ((acc << 31) | (acc >> 33)) & m64
    return (acc * 11400714785074694791) & m64


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """Pairs (a, b) of small ints whose tuples all hash alike: the first lane is free, the
    second is solved for (the multiply by an odd prime is invertible mod 2**64)."""
    m64 = (1 << 64) - 1
    p2_inverse = pow(14029467366897019727, -1, 1 << 64)
    # (a, b) collides with (1, 1) when lane1(a) + hash(b) * P2 == lane1(1) + 1 * P2 (mod 2**64)
    want = (_tuple_lane(2870177450012600261, 1) + 14029467366897019727) & m64
    pairs = []
    a = 2
    while len(pairs) < count:
        acc = _tuple_lane(2870177450012600261, a)
        hb = ((want - acc) * p2_inverse) & m64
        b = hb if hb < HASH_MODULUS else (hb - (1 << 64) if hb > (1 << 64) - HASH_MODULUS else None)
        if b is not None and b != -1 and hash(b) == b:
            pairs.append((a, b))
        a += 1
    assert len({hash(p) for p in pairs}) == 1 and hash(pairs[0]) == hash((1, 1))
    return pairs


def test_tuple_keys_crafted_to_collide_are_refused() -> None:
    pairs = colliding_pairs(40)
    keys = b"".join(long1(a) + long1(b) + b"\x86N" for a, b in pairs)
    err = refuse(P5 + b"}(" + keys + b"u.")
    assert "hash flood" in str(err)
    twins_agree(P5 + b"}(" + keys + b"u.")
    refuse(P5 + b"\x8f(" + b"".join(long1(a) + long1(b) + b"\x86" for a, b in pairs) + b"\x90.")
    # up to MAX_EQUAL_HASHES of them are fine
    assert len(load(P5 + b"}(" + b"".join(long1(a) + long1(b) + b"\x86N" for a, b in pairs[:8]) + b"u.")) == 8


def test_colliding_float_keys_are_counted() -> None:
    # floats m * 2**e hash to m * 2**(e mod 61) mod (2**61 - 1): one hash has a few hundred
    # float preimages. Few enough to compare among themselves, but each key of another type
    # with that hash (a Fraction, 6 us a compare with a float) would be compared with all of
    # them: their equal hashes are counted as any computed hash is.
    import math

    target = 1 | 1 << 10 | 1 << 20 | 1 << 30 | 1 << 40 | 1 << 50
    floats = set()
    for e in range(-1100, 1030):
        m = target * pow(2, -e % 61, HASH_MODULUS) % HASH_MODULUS
        if m < 1 << 53:
            try:
                x = math.ldexp(m, e)
            except OverflowError:
                continue
            if x and hash(x) == target:
                floats.add(x)
    assert 100 < len(floats) < 400
    keys = sorted(floats)
    assert len(load(P5 + b"}(" + b"".join(binfloat(x) + b"N" for x in keys[:8]) + b"u.")) == 8
    with pytest.raises(MalformedPickleError, match="same hash"):
        load(P5 + b"}(" + b"".join(binfloat(x) + b"N" for x in keys) + b"u.")


def reconstructed_keys(count: int, make: bytes, args: Any) -> bytes:
    """A dict of ``count`` keys each made by the reconstructor ``make`` (memo 0)."""
    body = make + b"\x940}("
    for i in range(count):
        body += b"h\x00" + args(i) + b"RN"
    return P5 + body + b"u."


@pytest.mark.parametrize(
    ("make", "args"),
    [
        (rb("fraction"), lambda i: long1(1 + i * HASH_MODULUS) + b"K\x01\x86"),
        (rb("uuid"), lambda i: long1(1 + i * HASH_MODULUS) + b"\x85"),
        (rb("decimal"), lambda i: b"K\x00" + s(str(1 + i * HASH_MODULUS)) + b"K\x00\x87"),
        (rb("complex_"), lambda i: binfloat(float(10**6 - 1000003 * i)) + binfloat(float(i)) + b"\x86"),
        (rb("scalar"), lambda i: s("<u8") + b"C\x08" + struct.pack("<Q", 1 + (i % 8) * HASH_MODULUS) + b"\x86"),
        (rb("timedelta"), lambda i: binint(i) + binint(0) + binint(0) + b"\x87"),
    ],
    ids=["fraction", "uuid", "decimal", "complex", "numpy-scalar", "timedelta"],
)
def test_reconstructed_keys_beyond_max_opaque_keys_are_refused(make: bytes, args: Any) -> None:
    err = refuse(reconstructed_keys(1100, make, args))
    assert "max_opaque_keys" in str(err)
    # the limit is the caller's to set
    refuse(reconstructed_keys(20, make, args), limits=streampickle.Limits(max_opaque_keys=10))


def test_instances_with_a_constant_hash_beyond_max_opaque_keys_are_refused() -> None:
    body = glob("test_attacks", "ConstantHash") + b"\x940}("
    body += b"".join(b"h\x00" + binint(i) + b"\x85RN" for i in range(1100))
    err = refuse(P5 + body + b"u.", allow=[ConstantHash])
    assert "max_opaque_keys" in str(err)
    items = b"".join(b"h\x00" + binint(i) + b"\x85RN" for i in range(10))
    small = glob("test_attacks", "ConstantHash") + b"\x940}(" + items + b"u."
    assert len(load(P5 + small, allow=[ConstantHash])) == 10


def test_frozenset_keys_count_as_opaque() -> None:
    body = b"}(" + b"".join(b"(" + binint(i) + b"\x91N" for i in range(1100)) + b"u"
    assert "max_opaque_keys" in str(refuse(P5 + body + b"."))


def test_opaque_keys_are_counted_across_the_whole_message() -> None:
    one = rb("uuid") + b"\x940"
    body = one + b"(" + b"".join(b"}h\x00" + binint(i) + b"\x85RNs" for i in range(1100)) + b"t."
    assert "max_opaque_keys" in str(refuse(P5 + body))


# -- recursion and deep nesting ----------------------------------------------------------------


def test_deep_tuples_are_refused_since_hashing_one_would_overflow_the_c_stack() -> None:
    payload = P5 + b")" + b"\x85" * 100_000 + b"."
    twins_agree(payload)
    assert "a tuple nested more than 1000 deep" in str(refuse(payload))


@pytest.mark.parametrize("kind", ["list", "dict-value", "set-in-list"])
def test_deep_nesting_loads_and_repr_raises_recursion_error(kind: str) -> None:
    n = 100_000
    payload = {
        "list": P5 + b"]" * (n + 1) + b"a" * n + b".",
        "dict-value": P5 + b"}" + b"\x8c\x01k}" * n + b"s" * n + b".",
        "set-in-list": P5 + b"]" * n + b"\x8f" + b"a" * n + b".",
    }[kind]
    twins_agree(payload)
    result = load(payload)
    with pytest.raises(RecursionError):
        repr(result)
    del result  # deallocation of a 10**5-deep structure must not crash either


def test_tuple_key_nested_deeper_than_the_limit_is_refused() -> None:
    deep = b")" + b"\x85" * (_verify.MAX_KEY_DEPTH + 1)
    for payload in (P5 + b"}" + deep + b"Ns.", P5 + b"\x8f(" + deep + b"\x90.", P5 + b"(" + deep + b"\x91."):
        assert "nested" in str(refuse(payload))
        twins_agree(payload)
    frozen = b"(" * 70 + b"\x91" * 70  # frozensets of frozensets, 70 deep
    assert "nested" in str(refuse(P5 + b"}" + frozen + b"Ns."))


def test_exponential_tuple_key_through_the_memo_is_refused() -> None:
    body = s("a") + b"\x85\x940"
    for i in range(60):
        body += memo_get(i) + memo_get(i) + b"\x86\x940"
    payload = P5 + body + b"}" + memo_get(60) + b"Ns."
    assert "out of proportion" in str(refuse(payload))
    twins_agree(payload)


def test_a_reconstructor_given_one_memoized_container_many_times_is_refused() -> None:
    big = b"](" + b"N" * 5000 + b"e\x94"
    calls = b"".join(rb("deque") + b"h\x00N\x86R" for _ in range(2000))
    err = refuse(P5 + b"(" + big + calls + b"t.")
    assert "out of proportion" in str(err)


# -- work in proportion to the input: pathological but accepted ----------------------------


@pytest.mark.parametrize("op", [b"\x8f", b"}", b"]", b")", b"(\x91", b"N\x94"])
def test_a_megabyte_of_empty_containers_loads(op: bytes) -> None:
    count = (1 << 20) // len(op)
    payload = P5 + b"(" + op * count + b"t."
    twins_agree(payload)
    assert len(load(payload)) == count


def test_a_megabyte_of_empty_containers_with_a_global_goes_through_the_full_verifier() -> None:
    count = 1 << 19
    payload = P5 + b"(" + b"\x8f" * count + rb("ellipsis") + b")Rt."
    result = load(payload)
    assert len(result) == count + 1 and result[-1] is Ellipsis


def test_many_memoized_tuple_keys_in_many_dicts_are_charged() -> None:
    # one 2**20-leaf tuple (20 levels of sharing), used as a key in 10,000 dicts
    body = b"K\x01\x85\x94"
    for i in range(20):
        body += memo_get(i) + memo_get(i) + b"\x86\x94" + b"0"
    key = memo_get(20)
    payload = P5 + body + b"(" + (b"}" + key + b"Ns") * 10_000 + b"t."
    assert "out of proportion" in str(refuse(payload))


# -- reconstructor calls are charged what they do ------------------------------------------
#
# A memoized argument costs the peer a few bytes per call, however much work the call does
# with it. Each test below makes one call that loads, then the same call repeated until the
# work per pickle byte is far beyond the budget: refused, and named as such. Without the
# charge, every one of these loads (slowly), so the test fails.


KEEP = b"\x940"  # MEMOIZE, POP: into the next memo slot, off the stack


def repeated(setup: bytes, call: bytes, times: int) -> bytes:
    return P5 + setup + b"(" + call * times + b"t."


def out_of_proportion(err: Exception, name: str) -> None:
    assert f"REDUCE: {name}: the reconstructor calls would take work out of proportion" in str(err)


def shared_descriptor(levels: int, fields: int) -> bytes:
    """A descriptor of ``fields`` fields per level that all reuse the level below, in memo
    slot ``levels`` (slots 0..levels are defined)."""
    body = s("<f8") + KEEP
    for level in range(levels):
        body += b"](" + b"".join(b"](" + s(f"f{k}") + memo_get(level) + b"]e" for k in range(fields)) + b"e" + KEEP
    return body


def test_a_memoized_structured_descriptor_rebuilt_again_and_again_is_charged_per_node() -> None:
    setup = shared_descriptor(6, 3) + rb("dtype") + KEEP  # 1,093 nodes, within the node bound
    call = memo_get(7) + memo_get(6) + b"\x85R"
    assert load(repeated(setup, call, 1))[0].itemsize == 3**6 * 8
    out_of_proportion(refuse(repeated(setup, call, 20)), "dtype")


def test_a_memoized_bytes_literal_copied_into_scalars_again_and_again_is_charged_per_byte() -> None:
    setup = rb("scalar") + KEEP + s("|S65536") + KEEP + b"B" + struct.pack("<I", 65536) + b"s" * 65536 + KEEP
    call = memo_get(0) + memo_get(1) + memo_get(2) + b"\x86R"
    assert load(repeated(setup, call, 10))[9] == b"s" * 65536
    out_of_proportion(refuse(repeated(setup, call, 400)), "scalar")


def test_a_memoized_side_chunk_rescanned_by_text_arrays_again_and_again_is_charged() -> None:
    chunk = "x".encode("utf-32-le") * (1 << 18)  # 1 MiB: its code points are checked per array
    setup = rb("ndarray") + KEEP + s("<U1") + KEEP + b"]" + long1(1 << 18) + b"a" + KEEP + b"\x97" + KEEP
    call = memo_get(0) + b"(" + memo_get(1) + memo_get(2) + b"\x89" + memo_get(3) + b"tR"
    assert load(repeated(setup, call, 1), [chunk])[0][-1] == "x"
    out_of_proportion(refuse(repeated(setup, call, 100), [chunk]), "ndarray")


def test_memoized_big_ints_made_into_fractions_again_and_again_are_charged_for_the_gcd() -> None:
    numerator, denominator = (1 << 16_382) + 12345, (1 << 16_382) + 67891  # odd, coprime-ish
    setup = rb("fraction") + KEEP + long1(numerator) + KEEP + long1(denominator) + KEEP
    call = memo_get(0) + memo_get(1) + memo_get(2) + b"\x86R"
    assert load(repeated(setup, call, 1))[0] == fractions.Fraction(numerator, denominator)
    out_of_proportion(refuse(repeated(setup, call, 100)), "fraction")


def test_a_dict_of_colliding_reconstructed_keys_copied_again_and_again_is_charged_per_pair() -> None:
    # 64 Fraction keys whose hashes are all 0: every copy compares each pair with __eq__
    keys = b"".join(memo_get(0) + long1(k * HASH_MODULUS) + b"K\x01\x86RN" for k in range(1, 65))
    setup = rb("fraction") + KEEP + rb("ordered_dict") + KEEP + b"}(" + keys + b"u" + KEEP
    call = memo_get(1) + memo_get(2) + b"\x85R"
    assert len(load(repeated(setup, call, 1))[0]) == 64
    out_of_proportion(refuse(repeated(setup, call, 10)), "ordered_dict")


def test_a_memoized_dict_copied_into_counters_is_charged_what_a_counter_costs_per_item() -> None:
    # within what the verifier charges for walking the dict (a unit per key per call), beyond
    # what building a Counter item by item costs
    setup = rb("counter") + KEEP + b"}(" + b"".join(long1(i) + b"K\x01" for i in range(1000)) + b"u" + KEEP
    call = memo_get(0) + memo_get(1) + b"\x85R"
    assert load(repeated(setup, call, 2))[1][999] == 1
    out_of_proportion(refuse(repeated(setup, call, 60)), "counter")


def test_a_time_zone_is_loaded_once_and_shared() -> None:
    setup = rb("zoneinfo") + KEEP + s("Europe/Paris") + KEEP
    zones = load(repeated(setup, memo_get(0) + memo_get(1) + b"\x85R", 1000))
    assert zones[0] is zones[999] is zoneinfo.ZoneInfo("Europe/Paris")
    assert R.zoneinfo.cost("Europe/Paris") == 1  # kept: charged as a lookup from now on


def _legit_workloads() -> dict[str, Any]:
    import random

    rng = random.Random(1)
    record = np.dtype([(f"f{i}", "<f8" if i % 2 else "<i4") for i in range(12)])
    nested = np.dtype([("a", [("b", [("c", "<f8", (4,))])])])
    return {
        "a Counter of 20,000 bigram tuples": collections.Counter(
            {(f"w{rng.randrange(5000)}", f"w{i}"): i for i in range(20_000)}
        ),
        "an OrderedDict of 10,000 items": collections.OrderedDict((i, str(i)) for i in range(10_000)),
        "2,000 arrays of one 12-field dtype": [np.zeros(3, dtype=record) for _ in range(2000)],
        "2,000 scalars of that dtype": list(np.zeros(2000, dtype=record)),
        "1,000 arrays of a 3-level nested dtype": [np.zeros(2, dtype=nested) for _ in range(1000)],
        "300 Fractions of 4,096-bit parts": [
            fractions.Fraction(rng.getrandbits(4096), rng.getrandbits(4096) | 1) for _ in range(300)
        ],
        "200 Decimals of 3,900 digits": [decimal.Decimal(str(rng.getrandbits(13_000))) for _ in range(200)],
        "300 datetimes in 3 zones": [
            dt.datetime(2020, 1, 1, tzinfo=zoneinfo.ZoneInfo(z)) for z in ("Europe/Paris", "UTC", "Asia/Tokyo") * 100
        ],
        "1,000 numpy bytes scalars of 1 KB": [np.bytes_(b"x" * 1000) for _ in range(1000)],
        "100 text arrays": [np.array(["abc"] * 1000) for _ in range(100)],
    }


@pytest.mark.parametrize("name", list(_legit_workloads()))
def test_real_data_heavy_in_reconstructor_work_loads_within_the_budget(name: str) -> None:
    obj = _legit_workloads()[name]
    back = streampickle.loads(streampickle.dumps(obj))
    assert type(back) is type(obj) and len(back) == len(obj)
    if isinstance(obj, list) and isinstance(obj[0], (np.ndarray, np.generic)):
        assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(obj, back, strict=True))
    else:
        assert back == obj


def test_a_message_loading_every_time_zone_at_once_is_refused_until_they_are_loaded() -> None:
    # each zone's first load reads its file (45-70 us): 599 of them from 12 KB is over the
    # budget in a fresh process; once they were loaded by smaller messages, the same is cheap
    code = """if True:
        import zoneinfo, streampickle
        from streampickle import MalformedPickleError
        keys = sorted(zoneinfo.available_timezones())
        everything = streampickle.dumps([zoneinfo.ZoneInfo(k) for k in keys])
        import streampickle._rebuild as r
        assert not r._zones
        try:
            streampickle.loads(everything)
        except MalformedPickleError as exc:
            assert "REDUCE: zoneinfo: the reconstructor calls would take work" in str(exc), exc
        else:
            raise AssertionError("loaded")
        for i in range(0, len(keys), 20):
            streampickle.loads(streampickle.dumps([zoneinfo.ZoneInfo(k) for k in keys[i:i + 20]]))
        assert len(streampickle.loads(everything)) == len(keys)
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_every_cost_function_is_total_over_what_the_verifier_admits() -> None:
    # a cost is computed before the reconstructor checks its arguments: it must never raise
    released = memoryview(b"abc")
    released.release()
    oddities = [None, True, -1, 1 << 20_000, 1.5, "x" * 10_000, b"", released, pickle.PickleBuffer(b"ab"),
                np.zeros(3), [], [[]], [["a"]], [["a", [["b", 7, 8]], []]], {}, {1: 2}, {(1, "a"): 0},
                {fractions.Fraction(1, 2): 0, fractions.Fraction(2, 4): 1}]
    for rebuilder in R.NAMES.values():
        for value in oddities:
            cost = rebuilder.cost(*[value] * len(rebuilder.args))
            assert type(cost) is int and cost >= 1


# -- exceptions inside reconstructors -----------------------------------------------------


def test_exceptions_inside_reconstructors_are_library_errors_with_bounded_messages() -> None:
    huge = "x" * 10**6
    for call in (
        Call(R.zoneinfo, huge),
        Call(R.dtype, huge),
        Call(R.decimal, 0, huge, 0),
        Call(R.timezone, 0, 5),
        Call(R.dtype, [[huge, "<f8", []], [huge, "<f8", []]]),  # a duplicate field name, numpy's error
        Call(R.object_ndarray, [10**6], False, True, list(range(10))),
    ):
        err = refuse_obj(call)
        assert len(str(err)) < 1000


def test_an_allowed_class_raising_with_huge_args_is_a_library_error() -> None:
    payload = P5 + glob("test_attacks", "Point") + s("x" * 100_000) + b"K\x01K\x02\x87R."
    err = refuse(payload, allow=[Point])
    assert "TypeError" in str(err) and len(str(err)) < 1000


# -- arbitrary code: the canary stays untouched -------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda c: glob("os", "system") + s(f"touch {c}") + b"\x85R",
        lambda c: glob("posix", "system") + s(f"touch {c}") + b"\x85R",
        lambda c: glob("subprocess", "check_call") + s("touch") + s(str(c)) + b"\x86\x85R",
        lambda c: glob("builtins", "eval") + s(f"open({str(c)!r}, 'w')") + b"\x85R",
        lambda c: glob("builtins", "getattr") + glob("os", "system") + s("x") + b"\x86R",
        lambda c: glob("numpy", "save") + s(str(c)) + b"K\x01\x86R",
        lambda c: glob("numpy.lib.npyio", "save") + s(str(c)) + b"K\x01\x86R",
        lambda c: glob("test_attacks", "Point.touch") + s(str(c)) + b"\x85R",
        lambda c: glob("test_attacks", "Point") + b")\x81" + glob("os", "system") + b"b",
    ],
)
def test_no_code_runs(canary, make) -> None:
    payload = P5 + make(canary) + b"."
    refuse(payload, exc=ForbiddenGlobalError, allow=[Point, "test_attacks.Point.origin"])
    refuse(payload, exc=ForbiddenGlobalError)


def test_dotted_allow_names_reaching_dunders_are_usage_errors() -> None:
    for name in (
        "test_attacks.Point.__init__.__globals__", "test_attacks.Point.__class__", "test_attacks.__builtins__"
    ):
        with pytest.raises(UsageError):
            Decoder(allow=[name])


# -- the C and Python twins ----------------------------------------------------------------


def test_twins_agree_on_every_attack_here() -> None:
    pairs = colliding_pairs(10)
    samples = [
        P5 + b"}(" + b"".join(long1(a) + long1(b) + b"\x86N" for a, b in pairs) + b"u.",
        P5 + b"}(" + b"".join(long1(k * HASH_MODULUS) + b"N" for k in range(1, 20)) + b"u.",
        P5 + b"}(" + b"".join(s(str(k)) + b"N" for k in range(1, 20)) + b"u.",
        P5 + b"}" + b"(\x8c\x01a\x91" + b"Ns.",
        P5 + b"}" + b"(K\x01\x91" + b"Ns.",
        P5 + b"}" + b"(\x91" + b"Ns.",
        P5 + b"\x8f(" + b"\x8a\x07" + b"\xff" * 7 + b"\x8a\x08" + b"\xff" * 8 + b"\x90.",
        P5 + b"}" + b"\x8c\x01a\x8a\x09" + b"\x01" * 9 + b"\x86Ns.",
        P5 + b"\x97\x98\x98.",
        P5 + b"N\x98.",
        P5 + b"(\x97\x98t.",
        P5 + b"]\x94h\x00h\x00a.",
        P5 + b"}\x94h\x00h\x00\x8c\x01as.",
        P5 + b"(((((" + b"1" * 5 + b"N.",
        P5 + b"(0N.",
        P5 + b"N(0.",
    ]
    for chunks in (0, 1, 2):
        for sample in samples:
            twins_agree(sample, chunks)


# -- hashing what reconstructors make ----------------------------------------------------------


def _fraction_key_tree(width: int) -> bytes:
    """One Fraction of two 16,383-bit ints (memo 0), in a tuple of ``width`` of it (memo 1),
    in a tuple of ``width`` of that (memo 2), used as one dict key: ``width ** 2`` hashes of a
    Fraction, which Python doesn't cache (11 µs each here)."""
    big = (1 << 16383) - 1
    body = rb("fraction") + long1(big) + long1(big - 2) + b"\x86R\x94"
    body += b"(" + memo_get(0) * width + b"t\x94" + b"(" + memo_get(1) * width + b"t\x94" + b"000"
    return b"\x80\x05" + body + b"}" + memo_get(2) + b"Ns."


def test_a_key_made_of_a_shared_fraction_is_charged_each_hash_it_takes() -> None:
    # Charged 1 unit (60 ns) an element as any reconstructed value was, 380 ** 2 references
    # to one Fraction in 5.7 KB took 1.3 s to hash. Its cost as a key is now its arguments'
    # (the ints' digits, each time), so the tree is refused before anything is hashed.
    error = refuse(_fraction_key_tree(380))
    assert "hashing the keys" in str(error)
    assert len(load(_fraction_key_tree(2))) == 1  # four hashes: within the budget


# -- BUILD on instances of classes that never take a state --------------------------------------


def _build(instance: bytes, state: bytes) -> bytes:
    return b"\x80\x05" + instance + state + b"b."


def test_build_cannot_rewrite_an_allowed_enums_shared_member() -> None:
    # Calling an enum class (or NEWOBJ of it) returns its process-wide member; a BUILD then
    # set HTTPStatus.OK.phrase to "PWNED" for the whole process, or renamed SIGTERM.
    import http
    import signal

    phrase = b"}(" + s("phrase") + s("PWNED") + s("_value_") + binint(1) + b"u"
    status = glob("http", "HTTPStatus") + binint(200) + b"\x85R"
    assert load(b"\x80\x05" + status + b".", allow=[http.HTTPStatus]) is http.HTTPStatus.OK  # allowed: still loads
    error = refuse(_build(status, phrase), allow=[http.HTTPStatus])
    assert "BUILD on an instance of http.HTTPStatus" in str(error)
    decoder = streampickle.PickleDecoder(allow=[http.HTTPStatus])
    decoder.feed(b"\x80\x02chttp\nHTTPStatus\nK\xc8\x85R}(X\x06\x00\x00\x00phraseX\x05\x00\x00\x00PWNEDub.")
    with pytest.raises(MalformedPickleError, match="BUILD on an instance"):
        next(decoder)
    renamed = glob("signal", "Signals") + binint(15) + b"\x85\x81"  # NEWOBJ
    refuse(_build(renamed, b"}(" + s("_name_") + s("SIGFOO") + b"u"), allow=[signal.Signals])
    assert http.HTTPStatus.OK.phrase == "OK" and http.HTTPStatus.OK.value == 200
    assert signal.Signals.SIGTERM.name == "SIGTERM"


def test_build_cannot_set_private_fields_of_a_self_reducing_class() -> None:
    # PurePosixPath pickles itself as PurePosixPath(*parts); a BUILD with (None, {"_str": ...})
    # made a path whose str() was /etc/shadow while its parts said uploads/avatar.png.
    import pathlib

    path = glob("pathlib", "PurePosixPath") + s("uploads") + s("avatar.png") + b"\x86R"
    assert load(b"\x80\x05" + path + b".", allow=[pathlib.PurePosixPath]) == pathlib.PurePosixPath("uploads/avatar.png")
    slots = b"N}(" + s("_str") + s("/etc/shadow") + b"u\x86"
    refuse(_build(path, slots), allow=[pathlib.PurePosixPath])


@dataclasses.dataclass
class _Plain:
    x: int = 0


def test_build_still_gives_a_plain_class_its_state() -> None:
    assert streampickle.loads(streampickle.dumps(_Plain(7)), allow=[_Plain]) == _Plain(7)
