"""The full verifier's twins: ``_speedups.verify`` (C) against ``_verify.verify`` (the Python
reference) on every pickle the other tests use, on real messages, on the fuzz grammar's
pickles and on mutations of all of them. Same value, same ``(position, reason)``, same
exception from the resolver, for several ``max_opaque_keys``."""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import inspect
import random
import struct
import sys
import uuid
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streampickle
from streampickle import _kinds, _safe, _verify
from test_verify import Registry  # a user class with a classmethod, as the pickle names it

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the fuzz package lives beside tests/
    sys.path.insert(0, str(ROOT))

from fuzz import grammar, wire  # noqa: E402
from streampickle._accel import speedups as _speedups  # noqa: E402

if _speedups is None:
    pytest.skip("the C extension is not in use (not built, or STREAMPICKLE_PURE_PYTHON=1): "
                "no C verify to compare", allow_module_level=True)
verify_c = _speedups.verify

P5 = b"\x80\x05"
OPAQUE_LIMITS = (0, 3, 1024)


# -- what the tests load: user classes a Loader allows -------------------------------------


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


class Slotted:
    __slots__ = ("a",)

    def __init__(self, a: Any) -> None:
        self.a = a


class Table(dict):  # type: ignore[type-arg]
    pass


class Rows(list):  # type: ignore[type-arg]
    pass


def pair(a: Any, b: Any) -> tuple[Any, Any]:
    return a, b


ALLOW = [Point, Slotted, Registry, Table, Rows, pair, "test_verify.Registry.named", "fractions.Fraction"]


def loader() -> _safe.Loader:
    return _safe.Loader(allow=ALLOW)


# -- the two results, comparable -----------------------------------------------------------


def _call(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except _verify.Refused as refused:
        return refused.pos, refused.reason
    except Exception as exc:  # noqa: BLE001 - the resolver's errors, and what the reference lets out
        return type(exc).__name__, str(exc)


def python_result(data: bytes, count: int, resolver: Any, max_opaque: int) -> Any:
    """The reference's answer. Its collision records name a container by ``id()``; a container
    freed during the walk can hand its id to a later one, merging their records (see the
    report). Keeping every container alive gives each its own id, as the C walk does."""
    alive: list[Any] = []
    key = _verify._key

    def keyed(item: Any, container: Any, *rest: Any) -> Any:
        alive.append(container)
        return key(item, container, *rest)

    _verify._key = keyed
    try:
        return _call(lambda: _verify.verify(data, count, resolver, max_opaque))
    finally:
        _verify._key = key


def c_result(data: bytes, count: int, resolver: Any, max_opaque: int) -> Any:
    return _call(lambda: verify_c(data, count, resolver, max_opaque))


def calls_of(resolver: Callable[..., Any]) -> tuple[Callable[..., Any], list[tuple[Any, ...]]]:
    calls: list[tuple[Any, ...]] = []

    def recording(*args: Any) -> Any:
        calls.append(args)
        return resolver(*args)

    return recording, calls


def assert_twins(data: bytes, count: int, limits: tuple[int, ...] = OPAQUE_LIMITS) -> None:
    resolve = loader().resolve
    for max_opaque in limits:
        py_resolver, py_calls = calls_of(resolve)
        c_resolver, c_calls = calls_of(resolve)
        expected = python_result(data, count, py_resolver, max_opaque)
        got = c_result(data, count, c_resolver, max_opaque)
        assert got == expected, (data[:200], count, max_opaque)
        assert c_calls == py_calls, (data[:200], count, max_opaque)


# -- the pickles ---------------------------------------------------------------------------


def _pickle_part(message: bytes) -> list[tuple[bytes, int]]:
    messages, _ = wire.parse_stream(message, 4)
    return [(m.pickle, m.count) for m in messages]


def real_objects() -> list[Any]:
    point = Point(1, 2)
    shared = [1, (2, 3)]
    rec: list[Any] = [shared, shared]
    rec.append(rec)
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")])
    return [
        None, True, 1, -1, 2**70, -(2**100), 1.5, float("nan"), complex(1, 2), "x", "é" * 50, b"b" * 40,
        bytearray(b"ba"), (), (1,), (1, 2, 3, 4), [1, [2, [3]]], {"a": {1, 2}}, frozenset({1, "a"}),
        {(1, 2.5, None): 1, 3: 4, 5.5: 6, (): 7, (True, (1, (2,))): 8, 2**80: 9, -(2**64): 10},
        {frozenset({1}): 2}, {i * ((1 << 61) - 1): i for i in range(1, 8)},
        np.arange(12, dtype=np.int64).reshape(3, 4), np.ones(5, dtype=np.float32), np.zeros(4, dtype=np.complex128),
        np.array([True, False]), np.arange(6, dtype=">u2"), np.asfortranarray(np.ones((2, 3))), structured,
        np.array(["a", "bc"]), np.datetime64("2020-01-01"), np.float64(2.5),
        datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.UTC),
        datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=-5), "EST")),
        datetime.datetime(2026, 1, 2, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")), datetime.date(2000, 1, 1),
        datetime.time(1, 2, 3), datetime.timedelta(days=1, seconds=2),
        [datetime.datetime(2026, 1, 1) + datetime.timedelta(seconds=i) for i in range(50)],
        decimal.Decimal("1.25"), decimal.Decimal("-Infinity"), fractions.Fraction(3, 7), uuid.UUID(int=12345),
        collections.deque([1, 2, 3], maxlen=5), collections.OrderedDict(a=1, b=[2]), collections.Counter("hello"),
        range(3, 9, 2), slice(1, None, 2), {uuid.UUID(int=i): i for i in range(6)},
        point, [point, point], Slotted([1, 2]), Registry.named, Table(a=1, b=2), Rows([1, 2, 3]), pair,
        {"nested": [{"k": (1, 2.0, "s")}, {(1, 2): [np.arange(3)]}]}, rec,
    ]


_CACHE: dict[str, list[tuple[bytes, int]]] = {}


def collected_payloads() -> list[tuple[bytes, int]]:
    """The pickles the other test files feed the loader: their parametrized payloads, and what
    reaches the verifier while their payload-building tests run; each once (several tests
    send the same megabyte), collected once per session (running those tests takes seconds)."""
    if "collected" not in _CACHE:
        _CACHE["collected"] = list(dict.fromkeys(_collect()))
    return _CACHE["collected"]


def _collect() -> list[tuple[bytes, int]]:
    import test_safe
    import test_scan
    import test_verify

    out: list[tuple[bytes, int]] = []
    for _, payload in test_safe.test_malformed_pickles_are_refused_by_the_scan.pytestmark[0].args[1]:
        out.append((payload, 0))
    for target in test_safe.test_dangerous_globals_are_forbidden.pytestmark[0].args[1]:
        out.append((P5 + test_safe.glob(*target) + b".", 0))
    out.extend(test_scan.valid_pickles())
    modules = [test_safe, test_verify]
    try:
        import test_attacks

        modules.append(test_attacks)
    except ImportError:
        pass
    seen: list[tuple[bytes, int]] = []
    original, inband = _safe.Loader._verify, _safe._load_inband_c

    def recording(self: _safe.Loader, data: Any, chunk_count: int) -> int:
        seen.append((bytes(data), chunk_count))
        return original(self, data, chunk_count)

    _safe.Loader._verify = recording  # type: ignore[method-assign]
    _safe._load_inband_c = None
    try:
        for module in modules:
            for name, func in vars(module).items():
                if not name.startswith("test_") or not callable(func):
                    continue
                if name == "test_safe_default_does_not_import_anything_new":
                    continue
                if hasattr(func, "hypothesis"):
                    continue
                for args in _arguments(func):
                    try:
                        func(*args)
                    except BaseException:  # noqa: BLE001 - only the pickles matter here
                        pass
    finally:
        _safe.Loader._verify = original  # type: ignore[method-assign]
        _safe._load_inband_c = inband
    out.extend(seen)
    return out


def _arguments(func: Callable[..., Any]) -> list[tuple[Any, ...]]:
    params = list(inspect.signature(func).parameters)
    if not params:
        return [()]
    marks = getattr(func, "pytestmark", [])
    for mark in marks:
        if mark.name == "parametrize":
            first = mark.args[0]
            names = [n.strip() for n in first.split(",")] if isinstance(first, str) else list(first)
            if names == params:
                return [tuple(v) if len(names) > 1 else (v,) for v in mark.args[1]]
    if params == ["canary"]:
        import tempfile

        return [(Path(tempfile.mkdtemp()) / "pwned",)]
    return []


def real_payloads() -> list[tuple[bytes, int]]:
    out = []
    for obj in real_objects():
        out.extend(_pickle_part(streampickle.dumps(obj)))
    return out


def grammar_payloads(count: int, seed: int = 20260101) -> list[tuple[bytes, int]]:
    src = grammar.RandomSource(random.Random(seed))
    out = []
    for i in range(count):
        if i % 4 == 3:
            out.extend(_pickle_part(grammar.mutate_message(src, grammar.real_message(src))))
        else:
            pickled, chunks = grammar.generate_pickle(src)
            out.append((pickled, len(chunks)))
    return out


def corpus() -> list[tuple[bytes, int]]:
    if "all" not in _CACHE:
        _CACHE["all"] = collected_payloads() + real_payloads() + grammar_payloads(400)
    return _CACHE["all"]


# -- the differential tests ----------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(st.floats(allow_nan=False) | st.integers(-(2**64), 2**64).map(float))
def test_the_c_walks_hash_floats_as_python_does(value: float) -> None:
    # without making a float object: each float key's hash is counted, and floats in tuples
    assert _speedups.float_hash(value) == hash(value)


def test_the_kind_bits_are_kinds() -> None:
    for name, bit in _speedups.KINDS.items():
        assert getattr(_kinds, name) == bit, name
    assert set(_speedups.KINDS) == {n for n in _kinds.__all__ if n.isupper() and n not in ("SCALARS", "CONTAINERS")}
    assert _speedups.MAX_EQUAL_HASHES == _verify.MAX_EQUAL_HASHES
    assert _speedups.TEXT_HASHED_BYTES == _verify.TEXT_HASHED_BYTES
    assert (_speedups.MAX_COMPARED, _speedups.FREE_COMPARE) == (_verify.MAX_COMPARED, _verify.FREE_COMPARE)


@pytest.mark.timeout(600)  # ~40 s on an idle core, and several times that on a busy one
def test_the_collected_pickles_agree() -> None:
    payloads = collected_payloads()
    assert len(payloads) > 100
    for data, count in payloads:
        limits = OPAQUE_LIMITS if len(data) < 200_000 else (1024,)
        assert_twins(data, count, limits)


def test_real_messages_agree() -> None:
    payloads = real_payloads()
    accepted = 0
    for data, count in payloads:
        assert_twins(data, count)
        accepted += type(c_result(data, count, loader().resolve, 1024)) is int
    assert accepted > len(payloads) // 2


def test_the_grammar_agrees() -> None:
    for data, count in grammar_payloads(3000, seed=7):
        assert_twins(data, count)


def _mutated(rng: random.Random, data: bytes, mutations: int) -> bytes:
    out = bytearray(data)
    inserts = [b"\x94", b"h\x00", b"0", b"(", b"t", b"u", b"e", b"\x90", b"\x91", b"s", b"a", b"R", b"b", b"\x81",
               b"\x93", b"\x85", b"\x86", b"N", b"}", b"]", b"\x8f", b"K\x01", b"\x8c\x01a", b"\x98", b"\x97", b"1"]
    for _ in range(mutations):
        if not out:
            break
        i = rng.randrange(len(out))
        action = rng.random()
        if action < 0.4:
            out[i] = rng.randrange(256)
        elif action < 0.55:
            del out[i]
        elif action < 0.9:  # an opcode (and its argument) inserted
            out[i:i] = rng.choice(inserts)
        else:  # a stretch repeated: shared and nested structure
            j = rng.randrange(i, min(len(out), i + 40) + 1)
            out[i:i] = out[i:j]
    return bytes(out)


@pytest.fixture(scope="module")
def pool() -> list[tuple[bytes, int]]:
    return [p for p in corpus() if len(p[0]) < 20_000]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(1, 6))
def test_mutated_pickles_agree(pool: list[tuple[bytes, int]], seed: int, mutations: int) -> None:
    rng = random.Random(seed)
    data, count = rng.choice(pool)
    mutated = _mutated(rng, data, mutations)
    assert_twins(mutated, count)
    assert_twins(mutated, count + 1, (1024,))


@given(st.binary(max_size=80), st.integers(0, 2))
def test_random_bytes_agree(data: bytes, count: int) -> None:
    assert_twins(P5 + data, count)


def test_resolver_errors_propagate_at_the_same_call() -> None:
    names: list[tuple[str, str]] = []

    def resolver(module: str, qualname: str, pos: int) -> Any:
        names.append((module, qualname))
        if qualname == "boom":
            raise KeyError(f"no {module}.{qualname} at {pos}")
        return loader().resolve(module, qualname, pos)

    s = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # noqa: E731
    payload = P5 + s("streampickle._rebuild") + s("uuid") + b"\x93" + s("x") + s("boom") + b"\x93" + b"\x86."
    assert python_result(payload, 0, resolver, 3) == ("KeyError", "'no x.boom at 41'")
    first = list(names)
    names.clear()
    assert c_result(payload, 0, resolver, 3) == ("KeyError", "'no x.boom at 41'")
    assert names == first == [("streampickle._rebuild", "uuid"), ("x", "boom")]


# -- the bounds, against both --------------------------------------------------------------


def both(data: bytes, count: int = 0, max_opaque: int = 1024) -> Any:
    resolve = loader().resolve
    expected = python_result(data, count, resolve, max_opaque)
    assert c_result(data, count, resolve, max_opaque) == expected
    return expected


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _long(value: int, padding: bytes = b"") -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True) + padding
    return b"\x8a" + bytes([len(raw)]) + raw


def test_key_depth_is_bounded_alike() -> None:
    deep = lambda n: P5 + b"}" + b"N" + b"\x85" * n + b"Ns."  # noqa: E731
    assert both(deep(64)) == 0
    assert both(deep(65)) == (2 + 1 + 1 + 65 + 1, "SETITEM: a key nested 65 deep (at most 64)")
    frozen = P5 + b"}(" + b"N" + b"\x85" * 63 + b"\x91Ns."  # a frozenset adds a level
    assert both(frozen) == 0
    assert "nested 65 deep" in both(P5 + b"}(" + b"N" + b"\x85" * 64 + b"\x91Ns.")[1]


def test_the_work_budget_is_spent_alike() -> None:
    dag = _s("a") + b"\x940" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86\x940" for i in range(60)) + b"h<"
    assert "hashing the keys would take work" in both(P5 + b"}" + dag + b"Ns.")[1]
    items = b"](" + b"N" * 20_000 + b"e\x94"
    call = b"h\x00h\x01N\x86R0"
    payload = P5 + _s("streampickle._rebuild") + _s("deque") + b"\x93\x94" + b"0" + items + b"0" + b"h\x00" + b"0"
    assert both(payload + call * 10 + b"N.") == 1
    refused = both(payload + call * 3000 + b"N.")
    assert refused[1] == (
        "REDUCE: streampickle._rebuild.deque would walk containers out of proportion to the pickle's size"
    )


def test_equal_hashes_are_counted_alike() -> None:
    p = (1 << 61) - 1

    def keys(values: list[bytes]) -> bytes:
        return P5 + b"}(" + b"".join(v + b"N" for v in values) + b"u."

    assert both(keys([_long(k * p + 5) for k in range(1, 9)])) == 0
    flood = both(keys([_long(k * p + 5) for k in range(1, 10)]))
    assert flood[1] == "more than 8 keys with the same hash in one container: a hash flood"
    # the same value written with padding bytes, negative values, and tuples whose hash equals
    # the ints': refused only if every hash is Python's exactly
    mixed = [_long(2**70 + 3 + k * p, b"\x00" * k) for k in range(3)]
    mixed += [_long(-(2**80) - k * p, b"\xff" * k) for k in range(3)]
    assert both(keys(mixed + [_long(2**90 + k * p) for k in range(2)])) == 0
    assert both(keys(mixed + [_long(2**70 + 3 + k * p, b"\x00" * 9) for k in range(3, 9)]))[1] == flood[1]
    # tuples and ints with one hash: a tuple hash below the modulus, and big ints with that hash
    tail = (1.5, None, True, -1)
    x = next(x for x in range(2**70, 2**70 + 1000) if -p < hash((x, *tail)) < p)
    h = hash((x, *tail))
    sign = 1 if h >= 0 else -1
    item = lambda v: b"(" + _long(v) + b"G" + struct.pack(">d", 1.5) + b"N\x88J\xff\xff\xff\xff" + b"t"  # noqa: E731
    tuples = [item(x + k * p) for k in range(4)]
    ints = [_long(h + sign * p * (k + 1)) for k in range(5)]
    assert both(keys(tuples + ints))[1] == flood[1]
    assert both(keys(tuples + ints[:4])) == 0
    for value in (-(2**63), 2**63 - 1, -p, p, -p - 1, -(2**64) + 1, -1 - p * (2**40)):
        sign = 1 if value > 0 else -1
        colliding = [_long(value), *(_long(value + k * p * sign) for k in range(1, 9))]
        assert both(keys(colliding))[1] == flood[1]
    # equal hashes in different containers are no flood
    half = b"}(" + b"".join(_long(k * p + 5) + b"N" for k in range(1, 6)) + b"u"
    assert both(P5 + half + half + b"\x86.") == 0


def test_opaque_keys_are_counted_alike() -> None:
    data = _pickle_part(streampickle.dumps({uuid.UUID(int=i): i for i in range(10)}))[0][0]
    assert both(data, max_opaque=10) == 1
    assert both(data, max_opaque=9)[1].endswith(
        "more than Limits.max_opaque_keys=9 keys whose hash the verifier can't check "
        "(raise the limit for peers you trust with the CPU)"
    )
    frozen = P5 + b"}((N\x91N(K\x01\x91Nu."  # two frozenset keys
    assert both(frozen, max_opaque=2) == 0
    assert both(frozen, max_opaque=1)[1].startswith("SETITEMS: more than Limits.max_opaque_keys=1 keys")
    assert both(frozen, max_opaque=-(2**70))[1].startswith(
        "SETITEMS: more than Limits.max_opaque_keys=-1180591620717411303424"
    )
    assert both(frozen, max_opaque=2**70) == 0
    assert both(frozen, max_opaque=True)[1].startswith("SETITEMS: more than Limits.max_opaque_keys=True")


def test_a_million_tuple1_after_a_call_agree() -> None:
    call = P5 + _s("streampickle._rebuild") + _s("uuid") + b"\x93K\x05\x85R"
    assert both(call + b"\x85" * 999 + b".") == 1
    refused = both(call + b"\x85" * 1_000_000 + b".")
    assert refused[1] == "TUPLE1: a tuple nested more than 1000 deep", refused


def test_a_reconstructor_named_and_not_called_is_refused_alike() -> None:
    def s(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    nd = s("streampickle._rebuild") + s("ndarray") + b"\x93"
    dt = s("streampickle._rebuild") + s("dtype") + b"\x93"
    bodies = [
        nd + b".", nd + b"\x85.", nd + b"\x94\x85h\x00\x86.", b"]" + nd + b"a.", b"](" + nd + b"e.",
        b"}" + nd + s("v") + b"s.", b"}" + s("k") + nd + b"s.", b"}(" + s("k") + nd + b"\x85u.",
        b"\x8f(" + nd + b"\x90.", b"(" + nd + b"\x91.", dt + b"N\x86.",
        dt + nd + b"\x85R.",  # a reconstructor's argument of a declared kind that is no global
        dt + s("<f8") + nd + b"\x85\x86R.",  # a tuple holding one where a tuple may not go either
        nd + b"\x94(" + s("<f8") + b"]K\x03a\x89\x97h\x00\x85t\x85.",  # a buffer after, and a tuple of it
        b"]" + nd + b"\x85\x85a.",
    ]
    for body in bodies:
        data = b"\x80\x05" + body
        count = data.count(b"\x97")
        assert_twins(data, count)
        assert type(c_result(data, count, loader().resolve, 1024)) is tuple  # refused, by this rule or a kind
