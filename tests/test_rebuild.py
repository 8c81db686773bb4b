"""The reconstructors safe mode resolves: what the encoder reduces to them, and what each one
refuses when a hostile pickle calls it.

Round trips go through ``streampickle.dumps``/``loads`` and are also unpickled with an
unpickler that resolves nothing but ``_rebuild.NAMES``, which proves the encoder wrote only
reconstructor calls (the default allowlist may still hold other names)."""

from __future__ import annotations

import array
import collections
import datetime as dt
import decimal
import enum
import fractions
import io
import math
import pickle
import struct
import subprocess
import sys
import uuid
import zoneinfo
from typing import Any

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import ForbiddenGlobalError, MalformedPickleError, _encoder, _kinds, _rebuild

R = _rebuild
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
NAN = float("nan")
INF = float("inf")


# -- helpers --------------------------------------------------------------------------------


class _OnlyReconstructors(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in R.NAMES:
            raise AssertionError(f"the encoder wrote the global {full}, not a reconstructor")
        return R.NAMES[full]


def load_reconstructors_only(message: bytes) -> Any:
    """Unpickle a message's pickle part, resolving only streampickle's reconstructors."""
    _, _, _, _, count, plen = struct.unpack_from("<4sBBHIQ", message)
    lengths = struct.unpack_from(f"<{count}Q", message, 20)
    start = 20 + 8 * count
    buffers, pos = [], start + plen
    for n in lengths:
        buffers.append(memoryview(message)[pos : pos + n])
        pos += n
    return _OnlyReconstructors(io.BytesIO(message[start : start + plen]), buffers=buffers).load()


def round_trip(obj: Any) -> Any:
    """``obj`` through dumps and loads (safe mode); checks that the pickle needs nothing but
    reconstructors and that both ways of loading give the same type."""
    message = streampickle.dumps(obj)
    strict = load_reconstructors_only(message)
    out = streampickle.loads(message)
    assert type(out) is type(obj) and type(strict) is type(obj)
    return out


def refuses(rebuilder: R.Rebuilder, *args: Any) -> str:
    """Call a reconstructor as a hostile pickle would; it must refuse, briefly."""
    with pytest.raises(MalformedPickleError) as info:
        rebuilder(*args)
    message = str(info.value)
    assert len(message) < 400, message
    return message


def self_referencing_list() -> list[Any]:
    x: list[Any] = []
    x.append(x)
    return x


def shared_bomb(levels: int = 40) -> list[Any]:
    """A list whose tree has 2**levels leaves, made of ``levels`` small lists: repr() of it
    would never finish."""
    x: list[Any] = [0, 0]
    for _ in range(levels):
        x = [x, x]
    return x


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1 + 2j, complex(NAN, -INF), complex(INF, NAN), 0j, complex(-0.0, -0.0)])
def test_complex_round_trip(value: complex) -> None:
    out = round_trip(value)
    assert repr(out) == repr(value)
    assert math.copysign(1, out.real) == math.copysign(1, value.real)
    assert math.copysign(1, out.imag) == math.copysign(1, value.imag)


@pytest.mark.parametrize(
    "value", [slice(None, None, None), slice(1, None, -2), slice(None, 5), slice(-(2**63), 2**63 - 1, 0)]
)
def test_slice_round_trip(value: slice) -> None:
    out = round_trip(value)
    assert (out.start, out.stop, out.step) == (value.start, value.stop, value.step)


@pytest.mark.parametrize("value", [range(10, -10, -3), range(0), range(-(2**63), 2**63 - 1, 7), range(5, 1)])
def test_range_round_trip(value: range) -> None:
    out = round_trip(value)
    assert (out.start, out.stop, out.step) == (value.start, value.stop, value.step)


def test_singletons_round_trip() -> None:
    assert round_trip(Ellipsis) is Ellipsis
    assert round_trip(NotImplemented) is NotImplemented
    assert round_trip([Ellipsis, NotImplemented, Ellipsis]) == [Ellipsis, NotImplemented, Ellipsis]


def test_ordered_dict_keeps_its_order() -> None:
    od = collections.OrderedDict([("b", 1), ("a", [2]), (3, None)])
    od.move_to_end("b")
    out = round_trip(od)
    assert list(out.items()) == [("a", [2]), (3, None), ("b", 1)]


@pytest.mark.parametrize(
    "value",
    [
        collections.deque([1, "x", None], maxlen=5), collections.deque(), collections.deque([1, 2, 3], maxlen=2),
        collections.deque(maxlen=0),
    ],
)
def test_deque_round_trip(value: collections.deque[Any]) -> None:
    out = round_trip(value)
    assert list(out) == list(value) and out.maxlen == value.maxlen


def test_counter_round_trip() -> None:
    value = collections.Counter("hello world")
    value["neg"] = -3
    value["zero"] = 0
    out = round_trip(value)
    assert out == value and list(out.items()) == list(value.items())


DECIMALS = [
    "NaN", "-NaN", "sNaN", "-sNaN12", "NaN123", "Infinity", "-Infinity", "0", "-0", "0E-7", "-0E+3",
    "1.23E+40", "1.23E-40", "123456789.987654321", "9" * R.DECIMAL_MAX_DIGITS, f"1E{R.DECIMAL_MAX_EXPONENT}",
    f"-5E-{R.DECIMAL_MAX_EXPONENT}",
]


@pytest.mark.parametrize("text", DECIMALS)
def test_decimal_round_trip(text: str) -> None:
    value = decimal.Decimal(text)
    out = round_trip(value)
    assert out.as_tuple() == value.as_tuple() and str(out) == str(value)


@pytest.mark.parametrize(
    "value", [fractions.Fraction(-3, 7), fractions.Fraction(0), fractions.Fraction(2**16384 - 1, 3**5000)]
)
def test_fraction_round_trip(value: fractions.Fraction) -> None:
    assert round_trip(value) == value


def test_uuid_round_trip() -> None:
    for value in (uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4()):
        assert round_trip(value) == value


@pytest.mark.parametrize("value", [dt.date.min, dt.date.max, dt.date(2024, 2, 29), dt.date(2000, 12, 31)])
def test_date_round_trip(value: dt.date) -> None:
    assert round_trip(value) == value


@pytest.mark.parametrize("value", [
    dt.time(), dt.time.max, dt.time(1, 2, 3, 456789, fold=1),
    dt.time(12, 0, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30), "NST")),
    dt.time(12, 0, tzinfo=PARIS),
])
def test_time_round_trip(value: dt.time) -> None:
    out = round_trip(value)
    assert out == value and out.fold == value.fold
    assert out.tzname() == value.tzname() and out.utcoffset() == value.utcoffset()


@pytest.mark.parametrize("value", [
    dt.datetime.min, dt.datetime.max, dt.datetime(2026, 11, 27, 15, 0, 0, 1),
    dt.datetime(2026, 11, 27, 15, 0, tzinfo=dt.UTC),
    dt.datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30), "IST")),
    dt.datetime(2021, 10, 31, 2, 30, tzinfo=PARIS),
    dt.datetime(2021, 10, 31, 2, 30, tzinfo=PARIS, fold=1),  # the second 02:30 that night
    dt.datetime(2024, 2, 29, 12, fold=1),
])
def test_datetime_round_trip(value: dt.datetime) -> None:
    out = round_trip(value)
    assert out == value and out.fold == value.fold and out.microsecond == value.microsecond
    assert out.tzname() == value.tzname() and out.utcoffset() == value.utcoffset()


def test_zoneinfo_datetimes_share_the_cached_zone() -> None:
    a, b = round_trip([dt.datetime(2021, 3, 28, 1, tzinfo=PARIS), dt.datetime(2021, 3, 28, 3, tzinfo=PARIS)])
    assert a.tzinfo is PARIS and b.tzinfo is PARIS
    assert a.utcoffset() == dt.timedelta(hours=1) and b.utcoffset() == dt.timedelta(hours=2)
    assert round_trip(PARIS) is PARIS


@pytest.mark.parametrize(
    "value",
    [dt.timedelta(-1), dt.timedelta(microseconds=-1), dt.timedelta.max, dt.timedelta.min, dt.timedelta(3, 4, 5)],
)
def test_timedelta_round_trip(value: dt.timedelta) -> None:
    assert round_trip(value) == value


@pytest.mark.parametrize("value", [
    dt.UTC, dt.timezone(dt.timedelta(0), "UTC"), dt.timezone(dt.timedelta(hours=5, minutes=30), "IST"),
    dt.timezone(dt.timedelta(days=1, microseconds=-1)), dt.timezone(-dt.timedelta(days=1, microseconds=-1), "far west"),
])
def test_timezone_round_trip(value: dt.timezone) -> None:
    out = round_trip(value)
    assert out.utcoffset(None) == value.utcoffset(None) and out.tzname(None) == value.tzname(None)
    assert out.__getinitargs__() == value.__getinitargs__()


def test_utc_stays_the_singleton() -> None:
    assert round_trip(dt.UTC) is dt.UTC


class _Weekday(enum.IntEnum):
    MON = 1


class _Stamp(dt.datetime):
    pass


class _Ordered(collections.OrderedDict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize("value", [_Weekday.MON, _Stamp(2026, 1, 1), _Ordered(a=1)])
def test_subclasses_keep_their_own_pickling(value: Any) -> None:
    message = streampickle.dumps(value)
    with pytest.raises(AssertionError, match="not a reconstructor"):
        load_reconstructors_only(message)
    with pytest.raises(ForbiddenGlobalError):
        streampickle.loads(message)
    out = streampickle.loads(message, allow=[type(value)])
    assert type(out) is type(value) and out == value


@pytest.mark.parametrize("value", [
    fractions.Fraction(2**16384, 3),  # one bit over
    decimal.Decimal(f"1E{R.DECIMAL_MAX_EXPONENT + 1}"),
    decimal.Decimal("1" * (R.DECIMAL_MAX_DIGITS + 1)),
    slice("a", "b"),
    range(2**63, 2**64),
])
def test_values_outside_the_bounds_keep_their_own_pickling(value: Any) -> None:
    message = streampickle.dumps(value)
    with pytest.raises(AssertionError, match="not a reconstructor"):
        load_reconstructors_only(message)
    assert streampickle.loads(message, trusted=True) == value


def test_datetime_with_another_tzinfo_class_keeps_its_own_pickling() -> None:
    value = dt.datetime(2026, 1, 1, tzinfo=_FixedZone())
    with pytest.raises(AssertionError, match="not a reconstructor"):
        load_reconstructors_only(streampickle.dumps(value))


class _FixedZone(dt.tzinfo):
    def utcoffset(self, when: Any) -> dt.timedelta:
        return dt.timedelta(hours=1)


def test_plain_data_never_reaches_the_reduction_table(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Counting(dict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            calls.append(key)
            return super().get(key, default)

    monkeypatch.setattr(_encoder, "_EXACT", Counting(_encoder._EXACT))
    streampickle.dumps([1, 2.5, "s", b"b", None, True, (1,), {"k": [1]}, {1}, frozenset(), bytearray(2), 2**100])
    assert calls == []
    streampickle.dumps([dt.date(2000, 1, 1)])
    assert dt.date in calls


# -- the declarations -----------------------------------------------------------------------


def test_every_reconstructor_declares_plain_argument_kinds() -> None:
    allowed = _kinds.SCALARS | _kinds.TUPLE | _kinds.LIST | _kinds.DICT | _kinds.BUFFER | _kinds.TZINFO
    for name, rebuilder in R.NAMES.items():
        assert name == f"streampickle._rebuild.{rebuilder._name}"
        assert getattr(R, rebuilder._name) is rebuilder  # the global name pickles resolve
        for mask in rebuilder.args:
            assert mask and not mask & ~allowed, name
            assert not mask & _kinds.TZINFO or mask == _kinds.NONE | _kinds.TZINFO, name
        expected = _kinds.TZINFO if rebuilder._name in ("timezone", "zoneinfo") else _kinds.VALUE
        assert rebuilder.result == expected, name


@pytest.mark.parametrize("name", sorted(R.NAMES))
def test_wrong_arity_is_refused(name: str) -> None:
    rebuilder = R.NAMES[name]
    n = len(rebuilder.args)
    refuses(rebuilder, *([None] * (n + 1)))
    if n:
        refuses(rebuilder, *([None] * (n - 1)))


@pytest.mark.parametrize("name", sorted(R.NAMES))
@pytest.mark.parametrize("hostile", [self_referencing_list, shared_bomb, lambda: {1: shared_bomb()}])
def test_hostile_containers_in_every_position_fail_fast(name: str, hostile: Any) -> None:
    """Each argument in turn replaced by a container whose repr() would not end: every call
    either succeeds or refuses with a short message (a repr of the container would outlast
    the test's timeout)."""
    rebuilder = R.NAMES[name]
    for position in range(len(rebuilder.args)):
        args: list[Any] = [None] * len(rebuilder.args)
        args[position] = hostile()
        try:
            rebuilder(*args)
        except MalformedPickleError as exc:
            assert len(str(exc)) < 400


def test_a_self_referencing_list_in_a_pickle_fails_promptly() -> None:
    # [x] where x = [x], passed to ordered_dict: the error must not repr() the list
    payload = (
        b"\x80\x05" + b"\x8c\x15streampickle._rebuild\x8c\x0cordered_dict\x93"
        + b"]\x94h\x00a\x85R."
    )
    with pytest.raises(MalformedPickleError) as info:
        streampickle.loads(make_message(payload))
    assert len(str(info.value)) < 600


BAD_CALLS: list[tuple[R.Rebuilder, tuple[Any, ...]]] = [
    (R.complex_, (1, 2.0)),
    (R.complex_, (1.0, True)),
    (R.complex_, ("1", 2.0)),
    (R.fraction, (1, 0)),
    (R.fraction, (1, -2)),
    (R.fraction, (True, 2)),
    (R.fraction, (1.5, 2)),
    (R.fraction, (2**16384, 3)),
    (R.fraction, (3, 2**16384)),
    (R.decimal, (2, "1", 0)),
    (R.decimal, (True, "1", 0)),
    (R.decimal, (0, "007", 0)),
    (R.decimal, (0, "", 0)),
    (R.decimal, (0, "\u0661", 0)),  # ARABIC-INDIC DIGIT ONE: a digit to Decimal, not to us
    (R.decimal, (0, "1 ", 0)),
    (R.decimal, (0, "1" * (R.DECIMAL_MAX_DIGITS + 1), 0)),
    (R.decimal, (0, "1", R.DECIMAL_MAX_EXPONENT + 1)),
    (R.decimal, (0, "1", -R.DECIMAL_MAX_EXPONENT - 1)),
    (R.decimal, (0, "1", "F")),
    (R.decimal, (0, "0", "n")),
    (R.decimal, (0, "1", "x")),
    (R.decimal, (0, "1", 1.0)),
    (R.decimal, (0, b"1", 0)),
    (R.slice_, (2**63, None, None)),
    (R.slice_, (None, -(2**63) - 1, None)),
    (R.slice_, ("a", None, None)),
    (R.slice_, (None, None, True)),
    (R.range_, (0, 10, 0)),
    (R.range_, (0, 2**63, 1)),
    (R.range_, (0, 10.0, 1)),
    (R.range_, (None, 10, 1)),
    (R.ellipsis, (None,)),
    (R.ordered_dict, ([("a", 1)],)),
    (R.ordered_dict, (collections.OrderedDict(a=1),)),
    (R.deque, (range(2**62), 0)),  # never returned when deque itself was allowed
    (R.deque, ((1, 2), None)),
    (R.deque, ([1], -1)),
    (R.deque, ([1], True)),
    (R.deque, ([1], 2**63)),
    (R.counter, ([1, 2],)),
    (R.counter, (collections.Counter(a=1),)),
    (R.uuid, (-1,)),
    (R.uuid, (2**128,)),
    (R.uuid, ("0" * 32,)),
    (R.date, (0, 1, 1)),
    (R.date, (10000, 1, 1)),
    (R.date, (2023, 2, 29)),
    (R.date, (2100, 2, 29)),
    (R.date, (2024, 4, 31)),
    (R.date, (2024, 13, 1)),
    (R.date, (2024, 0, 1)),
    (R.date, (2024, 1, 0)),
    (R.date, (2024, True, 1)),
    (R.date, (2024.0, 1, 1)),
    (R.time, (24, 0, 0, 0, None, 0)),
    (R.time, (0, 60, 0, 0, None, 0)),
    (R.time, (0, 0, 60, 0, None, 0)),
    (R.time, (0, 0, 0, 10**6, None, 0)),
    (R.time, (0, 0, 0, -1, None, 0)),
    (R.time, (0, 0, 0, 0, None, 2)),
    (R.time, (0, 0, 0, 0, None, False)),
    (R.time, (0, 0, 0, 0, "UTC", 0)),
    (R.time, (0, 0, 0, 0, _FixedZone(), 0)),
    (R.datetime, (2024, 1, 1, 0, 0, 0, 0, None, 0, None)),
    (R.datetime, (2023, 2, 29, 0, 0, 0, 0, None, 0)),
    (R.datetime, (2024, 6, 31, 0, 0, 0, 0, None, 0)),
    (R.datetime, (2024, 6, 30, 24, 0, 0, 0, None, 0)),
    (R.datetime, (2024, 6, 30, 0, 0, 0, 0, None, -1)),
    (R.datetime, (2024, 6, 30, 0, 0, 0, 0, dt.timedelta(0), 0)),
    (R.datetime, (b"\x07\xe8\x01\x01\x00\x00\x00\x00\x00\x00", None, None, None, None, None, None, None, None)),
    (R.timedelta, (0, 86400, 0)),
    (R.timedelta, (0, -1, 0)),
    (R.timedelta, (0, 0, 10**6)),
    (R.timedelta, (10**9, 0, 0)),
    (R.timedelta, (-(10**9), 0, 0)),
    (R.timezone, (86_400 * 10**6, None)),
    (R.timezone, (-86_400 * 10**6, None)),
    (R.timezone, (0, 5)),
    (R.timezone, (0.0, None)),
    (R.zoneinfo, ("Not/AZone",)),
    (R.zoneinfo, ("../../../etc/passwd",)),
    (R.zoneinfo, ("/usr/share/zoneinfo/UTC",)),
    (R.zoneinfo, (b"UTC",)),
    (R.zoneinfo, ("x" * 100_000,)),
    (R.ndarray, ("<i4", [-1], False, b"")),
    (R.ndarray, ("<i4", [True], False, b"\0" * 4)),
    (R.ndarray, ("<i4", [2**63], False, b"")),
    (R.ndarray, ("<i4", [1], 0, b"\0" * 4)),
    (R.ndarray, ("<i4", [2], False, b"\0" * 4)),
    (R.ndarray, ("|O8", [1], False, b"\0" * 8)),
    (R.ndarray, ("<i1", [1], False, b"\0")),  # not canonical: numpy writes |i1
    (R.ndarray, ("<i4", [1] * 65, False, b"\0" * 4)),
    (R.ndarray, ([], [1], False, b"")),
    (R.ndarray, ([["a", "<i4", []], ["", 0]], [1], False, b"\0" * 4)),
    (R.object_ndarray, ([2], False, True, [1])),
    (R.object_ndarray, ([1], False, True, (1,))),
    (R.object_ndarray, ([1], 1, True, [1])),
    (R.scalar, ("<f8", b"\0" * 7)),
    (R.scalar, ("<f8", bytearray(8))),
    (R.dtype, ([],)),
    (R.dtype, ("i4",)),
    (R.dtype, ([["a", "<i4", []], ["a", "<i4", []]],)),
]


@pytest.mark.parametrize("call", BAD_CALLS, ids=[f"{r._name}-{i}" for i, (r, _) in enumerate(BAD_CALLS)])
def test_bad_arguments_are_refused(call: tuple[R.Rebuilder, tuple[Any, ...]]) -> None:
    rebuilder, args = call
    refuses(rebuilder, *args)


def test_nesting_deeper_than_eight_is_refused() -> None:
    descr: Any = "<i4"
    for _ in range(8):
        descr = [["a", descr, []]]
    assert R.dtype(descr).itemsize == 4
    refuses(R.dtype, [["a", descr, []]])


def test_boundaries_are_accepted() -> None:
    assert R.timezone((86_400 * 10**6) - 1, None).utcoffset(None) == dt.timedelta(days=1, microseconds=-1)
    assert R.timedelta(-999_999_999, 0, 0) == dt.timedelta.min
    assert R.datetime(2024, 2, 29, 23, 59, 59, 999_999, None, 1).fold == 1
    assert R.fraction(2**16384 - 1, 2**16384 - 1) == 1
    assert R.deque([1, 2], 0) == collections.deque(maxlen=0)
    assert R.slice_(None, None, 0) == slice(None, None, 0)


def test_fraction_parts_are_bounded_where_the_gcd_is_still_cheap() -> None:
    a, b = (1 << 16384) - 1, (1 << 16384) - 3  # the most bits accepted: a gcd of about 0.3 ms
    assert R.fraction(a, b) == fractions.Fraction(a, b)
    refuses(R.fraction, 1 << 16384, 1)
    refuses(R.fraction, 1, 1 << 16384)


# -- fresh objects --------------------------------------------------------------------------


def test_given_lists_and_dicts_are_copied() -> None:
    items = [1, 2]
    q = R.deque(items, None)
    items.append(3)
    assert list(q) == [1, 2]
    counts = {"a": 1}
    c = R.counter(counts)
    counts["b"] = 2
    assert c == {"a": 1}
    pairs = {"a": 1}
    od = R.ordered_dict(pairs)
    pairs["b"] = 2
    del pairs["a"]
    assert list(od.items()) == [("a", 1)]
    objects = [1, "x"]
    arr = R.object_ndarray([2], False, True, objects)
    objects[0] = "changed"
    assert arr.tolist() == [1, "x"]


def test_a_memoized_list_changed_after_the_call_does_not_change_the_result() -> None:
    # x = []; d = deque(x); x.append(1); return (d, x): APPEND after the reconstructor ran
    payload = (
        b"\x80\x05]\x940"  # x = [] (memo 0)
        + b"\x8c\x15streampickle._rebuild\x8c\x05deque\x93h\x00N\x86R\x940"  # d = deque(x, None) (memo 1)
        + b"h\x00K\x01a0"  # x.append(1)
        + b"h\x01h\x00\x86."  # (d, x)
    )
    d, x = streampickle.loads(make_message(payload))
    assert x == [1] and list(d) == []


# -- numpy hardening ------------------------------------------------------------------------


def test_descriptor_sharing_one_sub_list_is_refused_quickly() -> None:
    # 16 fields that are all one 16-field list, 7 levels: 16**7 visits if walked naively
    descr: Any = "|i1"
    for _ in range(7):
        descr = [[f"f{i}", descr, []] for i in range(16)]
    for rebuilder, args in ((R.dtype, (descr,)), (R.ndarray, (descr, [0], False, b"")), (R.scalar, (descr, b""))):
        assert "nodes" in refuses(rebuilder, *args)


def test_the_node_budget_counts_every_use() -> None:
    flat = [[f"f{i}", "|i1", []] for i in range(R.MAX_DESCR_NODES - 1)]  # the list + its fields
    assert R.dtype(flat).itemsize == R.MAX_DESCR_NODES - 1
    refuses(R.dtype, [*flat, ["x", "|i1", []]])
    shared = [[f"f{i}", "|i1", []] for i in range(40)]
    two_levels = [[f"g{i}", shared, []] for i in range(40)]  # 1 + 40 * 41 nodes: fits
    assert R.dtype(two_levels).itemsize == 1600
    refuses(R.dtype, [[f"h{i}", two_levels, []] for i in range(3)])  # 1 + 3 * 1641: doesn't


def _ucs4(*code_points: int) -> bytes:
    return b"".join(c.to_bytes(4, "little") for c in code_points)


def test_text_above_u10ffff_is_refused() -> None:
    assert R.ndarray("<U2", [1], False, _ucs4(0x10FFFF, 0x41)).tolist() == ["\U0010ffff" + "A"]
    refuses(R.ndarray, "<U2", [1], False, _ucs4(0x41, 0x110000))
    refuses(R.ndarray, ">U1", [2], False, (0x41).to_bytes(4, "big") + (0xFFFFFFFF).to_bytes(4, "big"))
    refuses(R.scalar, "<U1", _ucs4(0x110000))
    assert R.scalar("<U1", _ucs4(0x263A)) == "\u263a"


def test_text_above_u10ffff_is_refused_in_nested_and_subarray_fields() -> None:
    dtype = np.dtype([("a", "<i4"), ("s", ">U3", (2,)), ("n", [("x", "<U2"), ("y", "<f8")], (3,))])
    descr = R.descr_of(dtype)
    good = bytearray(np.zeros(2, dtype=dtype).tobytes())
    assert R.ndarray(descr, [2], False, bytes(good)).shape == (2,)
    for offset, order in ((4 + 12 + 8, "big"), (dtype.itemsize + dtype.fields["n"][1] + 2 * 16 + 4, "little")):
        bad = bytearray(good)  # item 0's s[1][2]; item 1's n[2].x[1]
        bad[offset : offset + 4] = (0x110000).to_bytes(4, order)
        refuses(R.ndarray, descr, [2], False, bytes(bad))
        if offset < dtype.itemsize:
            refuses(R.scalar, descr, bytes(bad[: dtype.itemsize]))


def test_checking_text_is_linear() -> None:
    data = np.full(1_000_000, "abcdefgh", dtype="<U8").tobytes()  # 32 MB: per element in Python would take seconds
    assert R.ndarray("<U8", [1_000_000], False, data).shape == (1_000_000,)


@pytest.mark.parametrize("buffer", [  # each 32 bytes: only the kind of buffer is wrong
    np.array([1, 2, 3, 4], dtype=object),
    np.arange(4, dtype=np.int64),
    np.zeros((2, 16), dtype=np.uint8),
    np.zeros(64, dtype=np.uint8)[::2],
    memoryview(np.arange(4, dtype=np.int64)),
    memoryview(np.array([1, 2, 3, 4], dtype=object)),
    pickle.PickleBuffer(np.array([1, 2, 3, 4], dtype=object)),
    memoryview(np.zeros((4, 16), dtype=np.uint8)[:, ::2]),
    array.array("q", [0, 0, 0, 0]),
    "\0" * 32,
], ids=lambda b: type(b).__name__)
def test_ndarray_data_must_be_plain_bytes(buffer: Any) -> None:
    refuses(R.ndarray, "|u1", [32], False, buffer)
    refuses(R.ndarray, "<i8", [4], False, buffer)


def test_ndarray_accepts_what_the_decoder_passes() -> None:
    from streampickle._decoder import aligned_empty

    chunk = aligned_empty(16)
    chunk[:] = np.arange(16, dtype=np.uint8)
    for buffer in (chunk, memoryview(chunk), memoryview(chunk).toreadonly(), pickle.PickleBuffer(chunk), bytes(chunk)):
        out = R.ndarray("<u2", [2, 4], True, buffer)
        assert out.tolist() == np.frombuffer(bytes(chunk), "<u2").reshape(2, 4, order="F").tolist()
        assert out.flags.f_contiguous


# -- time zones -----------------------------------------------------------------------------


def test_a_zone_is_found_by_its_key_alone_and_kept() -> None:
    code = (
        "import zoneinfo; zoneinfo.available_timezones = None; "  # listing every zone costs 33 ms
        "import streampickle._rebuild as r; paris = r.zoneinfo('Europe/Paris'); "
        "assert paris is r.zoneinfo('Europe/Paris') is zoneinfo.ZoneInfo('Europe/Paris'); "
        "assert list(r._zones) == ['Europe/Paris']; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("key", ["Europe", "zone.tab", "zone1970.tab", "iso3166.tab", "tzdata.zi", "leapseconds",
                                 "Europe/", "/UTC", "Europe//Paris", "Europe/../UTC", "./UTC", "UTC\0", "UTC ",
                                 "Europe/Paris/x/y/z"])
def test_files_and_paths_in_the_zone_directory_that_are_not_zones_are_refused(key: str) -> None:
    with pytest.raises(MalformedPickleError, match="must name an installed zone"):
        R.zoneinfo(key)
    assert key not in R._zones




# -- numpy's empty flexible scalars ---------------------------------------------------------

FLEXIBLE_SCALARS = {
    "str-empty": np.str_(""),
    "bytes-empty": np.bytes_(b""),
    "void-empty": np.void(b""),
    "str": np.str_("h\u00e9llo \U0001f600"),
    "bytes": np.bytes_(b"a\0b"),
    "void": np.void(b"\0ab"),
}


@pytest.mark.parametrize("value", FLEXIBLE_SCALARS.values(), ids=FLEXIBLE_SCALARS)
def test_flexible_scalars_round_trip_in_safe_mode(value: np.generic) -> None:
    """``np.str_("")`` and its kin have a dtype of item size 0; they travel by the ``scalar``
    reconstructor like any other scalar, not by numpy's pickling, which safe mode refuses."""
    data = streampickle.dumps(value)
    assert b"numpy" not in data  # no numpy global: only streampickle's reconstructors
    for trusted in (False, True):
        out = streampickle.loads(data, trusted=trusted)
        assert type(out) is type(value) and out.dtype == value.dtype and out.tobytes() == value.tobytes()
        assert out == value


@pytest.mark.parametrize("descr", ["|S0", "<U0", "|V0"])
def test_empty_flexible_dtypes_round_trip_in_safe_mode(descr: str) -> None:
    value = np.dtype(descr)
    assert streampickle.loads(streampickle.dumps(value)) == value


@pytest.mark.parametrize(
    "call",
    [
        (R.scalar, ("<U0", b"\0\0\0\0")),  # what np.str_("").tobytes() gives: not the wire's
        (R.scalar, ("|S0", b"x")),
        (R.scalar, ("|V0", bytearray())),
        (R.ndarray, ("|S0", [10**9], False, b"")),  # any length in no bytes
        (R.ndarray, ("<U0", [3], False, b"")),
        (R.ndarray, ([["a", "|S0", []]], [1], False, b"")),  # nor as a field
        (R.dtype, ([["a", "<U0", []]],)),
        (R.scalar, ("<U00", b"")),  # not canonical
    ],
    ids=lambda call: f"{call[0]._name}{call[1][:1]}",
)
def test_item_size_zero_is_refused_outside_a_scalar_or_dtype(call: tuple[R.Rebuilder, tuple[Any, ...]]) -> None:
    rebuilder, args = call
    refuses(rebuilder, *args)
