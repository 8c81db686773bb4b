"""The safe default: what a hostile peer's pickle can and cannot make us do.

Every attack here arrives as a well-framed message, so each must be refused alone (the
message dropped, the stream still usable) with a StreamPickleError, and never run code."""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
from typing import Any

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import Decoder, ForbiddenGlobalError, MalformedPickleError
from test_attacks import refuse  # loads and a Decoder both refuse, and the stream goes on

P5 = b"\x80\x05"


def s(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return s(module) + s(name) + b"\x93"


@pytest.fixture()
def canary(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the attack ran code"


def test_os_system_via_stack_global_reduce(canary) -> None:
    payload = P5 + glob("os", "system") + s(f"touch {canary}") + b"\x85R."
    err = refuse(payload, exc=ForbiddenGlobalError)
    assert (err.module, err.name) == ("os", "system")
    # a name that runs code is never suggested for allow=, nor is trusted=True
    assert "can never be allowed" in str(err) and "allow=" not in str(err) and "trusted" not in str(err)
    assert (err.position, err.opcode) == (14, "STACK_GLOBAL")


def test_os_system_via_memoized_strings(canary) -> None:
    # put the names in the memo first and fetch them back: find_class still sees the final pair
    payload = (
        P5 + s("os") + b"\x94" + s("system") + b"\x94" + b"0" + b"0" + b"h\x00h\x01\x93"
        + s(f"touch {canary}") + b"\x85R."
    )
    refuse(payload, exc=ForbiddenGlobalError)


def test_protocol_0_global_opcode_is_refused_before_find_class(canary) -> None:
    payload = b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR."
    refuse(payload)  # not even PROTO 5
    refuse(P5 + b"cos\nsystem\n(S'x'\ntR.")


@pytest.mark.parametrize(
    "target",
    [
        ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
        ("builtins", "open"), ("posix", "system"), ("subprocess", "Popen"), ("importlib", "import_module"),
        ("pickle", "loads"), ("functools", "partial"), ("operator", "attrgetter"), ("numpy", "empty"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("builtins", "bytearray"),
        ("builtins", "object.__subclasses__"), ("collections", "OrderedDict.__init__.__globals__"),
        ("streampickle._safe", "Loader"), ("streampickle", "loads"), ("\u043es", "system"), ("os ", "system"),
        ("os\x00", "system"), ("numpy.f2py.diagnose", "run_command"), ("builtins", "list"),
    ],
)
def test_dangerous_globals_are_forbidden(target) -> None:
    refuse(P5 + glob(*target) + b".", exc=ForbiddenGlobalError)


def test_allow_takes_exact_names_not_prefixes() -> None:
    payload = P5 + glob("fractions", "Fraction") + b"."
    refuse(
        payload, exc=ForbiddenGlobalError,
        allow=["fractions.Fract", "fraction.Fraction", "fractions.Fraction.from_float"],
    )
    with pytest.raises(streampickle.UsageError, match="can never be allowed"):
        Decoder(allow=["numpy.f2py.diagnose.run_command"])  # runs commands: no allow= admits it
    with pytest.raises(streampickle.UsageError, match="dotted"):
        Decoder(allow=["numpy"])  # a bare module is not a name; prefixes are never allowed


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


def test_allow_by_name_and_by_class_and_trusted() -> None:
    data = streampickle.dumps(Point(1, 2))
    with pytest.raises(ForbiddenGlobalError, match=r"test_safe\.Point"):
        streampickle.loads(data)
    for allow in (["test_safe.Point"], [Point]):
        p = streampickle.loads(data, allow=allow)
        assert (p.x, p.y) == (1, 2)
    assert streampickle.loads(data, trusted=True).y == 2
    with pytest.raises(streampickle.UsageError):
        streampickle.loads(data, allow="test_safe.Point")


def test_build_cannot_modify_a_reconstructor() -> None:
    # BUILD with slot state aimed at streampickle._rebuild.ndarray itself
    payload = P5 + glob("streampickle._rebuild", "ndarray") + b"N}" + s("__defaults__") + b"K\x01s\x86b."
    refuse(payload)
    payload = P5 + glob("streampickle._rebuild", "ndarray") + b"}" + s("x") + b"K\x01sb."
    refuse(payload)


def test_build_cannot_modify_an_allowed_class() -> None:
    # BUILD aimed at the allowed class itself, not at an instance of it
    payload = P5 + glob("test_safe", "Point") + b"N}" + s("__init__") + b"K\x01s\x86b."
    err = refuse(payload, allow=[Point])
    assert "BUILD on a global" in str(err)
    assert callable(Point.__init__)


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("huge LONG_BINPUT", P5 + b"N" + b"r\xff\xff\xff\x3f" + b"."),
        ("BINBYTES8 claiming 2**62", P5 + b"\x8e" + struct.pack("<Q", 2**62) + b"abc."),
        ("BYTEARRAY8 claiming 2**62", P5 + b"\x96" + struct.pack("<Q", 2**62) + b"abc."),
        ("BINUNICODE8 claiming 2**62", P5 + b"\x8d" + struct.pack("<Q", 2**62) + b"abc."),
        ("BINBYTES claiming 2**31-1", P5 + b"B" + struct.pack("<I", 2**31 - 1) + b"abc."),
        ("LONG4 claiming 2**31", P5 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b"."),
        ("LONG4 negative", P5 + b"\x8b" + struct.pack("<i", -2) + b"."),
        ("bytes after STOP", P5 + b"N.garbage"),
        ("two pickles", P5 + b"N." + P5 + b"N."),
        ("no STOP", P5 + b"N"),
        ("PROTO 6", b"\x80\x06N."),
        ("PROTO 255", b"\x80\xffN."),
        ("no PROTO", b"N."),
        ("duplicate PROTO", P5 + b"\x80\x05N."),
        ("unknown opcode", P5 + b"\xff."),
        ("POP underflow", P5 + b"0N."),
        ("APPEND underflow", P5 + b"Na."),
        ("TUPLE2 underflow", P5 + b"N\x86."),
        ("SETITEM underflow", P5 + b"}Ns."),
        ("TUPLE without MARK", P5 + b"Nt."),
        ("MARK never closed", P5 + b"(N."),
        ("BINGET of undefined slot", P5 + b"h\x05."),
        ("LONG_BINGET of undefined slot", P5 + b"j\xff\xff\xff\xff."),
        ("INT text opcode", P5 + b"I" + b"9" * 1000 + b"\n."),
        ("STRING text opcode", P5 + b"S'x'\n."),
        ("INST", P5 + b"(ios\nsystem\n."),
        ("OBJ", P5 + b"(N" + b"o."),
        ("EXT1", P5 + b"\x82\x01."),
        ("BINPERSID", P5 + b"NQ."),
        ("PUT", P5 + b"Np0\n."),
        ("FRAME past the end", P5 + b"\x95" + struct.pack("<Q", 100) + b"N."),
        ("opcode straddling a FRAME end", P5 + b"\x95" + struct.pack("<Q", 2) + b"\x8c\x03abc."),
        ("FRAME inside a FRAME", P5 + b"\x95" + struct.pack("<Q", 11) + b"\x95" + struct.pack("<Q", 2) + b"N."),
        ("STOP with two items", P5 + b"NN."),
        ("READONLY_BUFFER on a non-buffer", P5 + b"N\x98."),
        ("empty stack STOP", P5 + b"."),
    ],
)
def test_malformed_pickles_are_refused_by_the_scan(name: str, payload: bytes) -> None:
    refuse(payload)


def test_out_of_band_buffer_count_must_match_exactly() -> None:
    one_buffer = P5 + b"\x97."
    refuse(one_buffer, chunks=[])  # NEXT_BUFFER, no chunk declared
    refuse(one_buffer, chunks=[b"a", b"b"])  # a chunk left over
    refuse(P5 + b"\x97\x97\x86.", chunks=[b"a"])  # two NEXT_BUFFER, one chunk
    assert bytes(streampickle.loads(make_message(one_buffer, [b"ab"]))) == b"ab"


def test_trusted_mode_still_checks_framing_of_the_pickle() -> None:
    # trusted mode hands the pickle to pickle.loads as it is; it still insists that the pickle
    # part ends with STOP and that every side chunk was used
    with pytest.raises(MalformedPickleError):
        streampickle.loads(make_message(P5 + b"N.garbage"), trusted=True)
    with pytest.raises(MalformedPickleError):
        streampickle.loads(make_message(P5 + b"\x97.", [b"a", b"b"]), trusted=True)


def ndarray_pickle(descr, shape, fortran=False) -> bytes:
    return pickle.dumps(
        (_Rebuild(descr, shape, fortran)), protocol=5, buffer_callback=lambda b: False
    )


class _Rebuild:
    """Pickles as a call of streampickle._rebuild.ndarray with arbitrary arguments."""

    def __init__(self, descr, shape, fortran) -> None:
        self.args = (descr, shape, fortran)

    def __reduce__(self):
        from streampickle import _rebuild

        return _rebuild.ndarray, (*self.args, pickle.PickleBuffer(b""))


@pytest.mark.parametrize(
    ("descr", "shape", "chunk"),
    [
        ("<f8", [3], b"\x00" * 8),  # 3 float64 need 24 bytes
        ("<i8", [1], b"\x00" * 5),
        ("<f8", [2**40, 2**40], b"\x00" * 8),  # claims 8 * 2**80 bytes
        ("<f8", [-1], b""),
        ("|O8", [1], b"\x00" * 8),  # object dtype over raw bytes would be pointers
        ("<f8x", [1], b"\x00" * 8),
        ([["a", "|O8", []]], [1], b"\x00" * 8),
        ([["a", "<f8", [2**62]]], [1], b"\x00" * 8),
        ("<f8", [1] * 65, b"\x00" * 8),
        (42, [1], b"\x00" * 8),
    ],
)
def test_ndarray_reconstructor_validates_against_the_chunk(descr, shape, chunk) -> None:
    payload = ndarray_pickle(descr, shape)
    refuse(payload, chunks=[chunk])


def test_trailing_pickle_opcodes_listing_matches_encoder_output() -> None:
    """What the encoder emits passes the scan: a sanity check on the opcode table."""
    data = streampickle.dumps({"a": [np.arange(3), {1, 2}, frozenset(), (1,), (1, 2, 3, 4)], "r": None})
    plen = int.from_bytes(data[12:20], "little")
    nchunks = int.from_bytes(data[8:12], "little")
    segment = data[20 + 8 * nchunks : 20 + 8 * nchunks + plen]
    ops = {op.name for op, _, _ in pickletools.genops(segment)}
    assert {"STACK_GLOBAL", "NEXT_BUFFER", "EMPTY_SET", "ADDITEMS", "FROZENSET", "MEMOIZE"} <= ops
    streampickle.loads(data)


def test_object_arrays_go_in_band_through_the_allowlist() -> None:
    arr = np.array([1, Point(1, 2)], dtype=object)
    data = streampickle.dumps(arr)
    with pytest.raises(ForbiddenGlobalError):
        streampickle.loads(data)
    assert streampickle.loads(data, allow=[Point])[1].y == 2


def test_numpy_subclass_and_exotic_dtypes_need_trust() -> None:
    m = np.ma.masked_array([1, 2], mask=[0, 1])
    data = streampickle.dumps(m)
    with pytest.raises(ForbiddenGlobalError):
        streampickle.loads(data)
    assert (streampickle.loads(data, trusted=True).mask == m.mask).all()


def test_safe_default_does_not_import_anything_new() -> None:
    payload = P5 + glob("this", "x") + b"."  # importing 'this' prints the Zen
    import sys

    sys.modules.pop("this", None)
    refuse(payload, exc=ForbiddenGlobalError)
    assert "this" not in sys.modules
    assert os.environ  # and nothing crashed


def test_keys_whose_hash_the_verifier_cannot_check_are_counted_against_the_limit() -> None:
    import uuid

    data = streampickle.dumps({uuid.UUID(int=i): i for i in range(10)})
    assert len(streampickle.loads(data)) == 10
    assert len(streampickle.loads(data, limits=streampickle.Limits(max_opaque_keys=10))) == 10
    with pytest.raises(MalformedPickleError, match="max_opaque_keys=9"):
        streampickle.loads(data, limits=streampickle.Limits(max_opaque_keys=9))


def test_colliding_big_int_keys_are_a_hash_flood() -> None:
    p = 2**61 - 1
    assert len(streampickle.loads(streampickle.dumps({k * p: None for k in range(1, 9)}))) == 8
    with pytest.raises(MalformedPickleError, match="same hash"):
        streampickle.loads(streampickle.dumps({k * p: None for k in range(1, 10)}))
    assert len(streampickle.loads(streampickle.dumps({k * p: None for k in range(1, 1000)}), trusted=True)) == 999


@pytest.mark.parametrize("salt", ["a", b"b", "\u0101" * 3], ids=["str", "bytes", "ucs2"])
def test_colliding_big_ints_beside_a_str_in_tuple_keys_are_a_hash_flood(salt: Any) -> None:
    # (k * (2**61 - 1), "a") all hash alike, the str's salt the same in each: quadratic to
    # insert (15 s for 32,000, 543 KB).
    p = 2**61 - 1
    assert len(streampickle.loads(streampickle.dumps({(k * p, salt): None for k in range(1, 9)}))) == 8
    with pytest.raises(MalformedPickleError, match="same hash"):
        streampickle.loads(streampickle.dumps({(k * p, salt): None for k in range(1, 10)}))
    assert len(streampickle.loads(streampickle.dumps({(k * p, salt): None for k in range(1, 100)}), trusted=True)) == 99


def test_one_nan_beside_colliding_big_ints_in_tuple_keys_is_a_hash_flood() -> None:
    # A NaN hashes by address; one NaN (a memo copy) hashes alike in every tuple it is in.
    def flood(count: int) -> bytes:
        body = b""
        for k in range(1, count + 1):
            n = (k * (2**61 - 1)).to_bytes(9, "little")
            nan = b"G" + struct.pack(">d", float("nan")) + b"\x94" if k == 1 else b"h\x00"
            body += b"\x8a\x09" + n + nan + b"\x86N"
        return make_message(P5 + b"}(" + body + b"u.")

    got = streampickle.loads(flood(8))
    assert len(got) == 8 and len({hash(k) for k in got}) == 1
    with pytest.raises(MalformedPickleError, match="same hash"):
        streampickle.loads(flood(9))


@pytest.mark.parametrize("kind", ["bytes", "ucs2", "ucs4"])
def test_tuples_of_a_str_or_its_twin_are_a_hash_flood(kind: str) -> None:
    # A str hashes over its own buffer: "a0" as b"a0" does, "\u0100" (two bytes a char) as
    # "\x00\x01", "\U00010000" as "\x00\x00\x01\x00". Four places of either: 16 tuples, one hash.
    def pair(i: int) -> tuple[Any, Any]:
        if kind == "bytes":
            return f"a{i}", f"a{i}".encode()
        if kind == "ucs2":
            return chr(0x100 + i), chr(i) + "\x01"
        return chr(0x10000 + i), chr(i) + "\x00\x01\x00"

    assert all(hash(pair(i)[0]) == hash(pair(i)[1]) and pair(i)[0] != pair(i)[1] for i in range(4))
    keys = {tuple(pair(i)[bits >> i & 1] for i in range(4)) for bits in range(16)}
    assert len(keys) == 16 and len({hash(k) for k in keys}) == 1
    with pytest.raises(MalformedPickleError, match="same hash"):
        streampickle.loads(streampickle.dumps(keys))
    assert streampickle.loads(streampickle.dumps(keys), trusted=True) == keys


def test_tuple_keys_with_strings_load_when_their_hashes_differ() -> None:
    records = {(f"name{i}", i % 3, f"\u0101{i}", f"b{i}".encode(), float("nan")): i for i in range(5000)}
    got = streampickle.loads(streampickle.dumps(records))
    assert sorted(got.values()) == list(range(5000))
    assert {k[:4] for k in got} == {k[:4] for k in records}


def test_tuple_keys_holding_a_long_str_are_counted_against_the_limit() -> None:
    # Hashing a string in a tuple is bounded work: one longer than TEXT_HASHED_BYTES makes
    # the tuple opaque instead, counted against max_opaque_keys (256).
    from streampickle import _verify

    long = "x" * (_verify.TEXT_HASHED_BYTES + 1)
    p = 2**61 - 1
    assert len(streampickle.loads(streampickle.dumps({(k * p, long): k for k in range(1, 257)}))) == 256
    with pytest.raises(MalformedPickleError, match="max_opaque_keys=256"):
        streampickle.loads(streampickle.dumps({(k * p, long): k for k in range(1, 258)}))
    at_limit = "x" * _verify.TEXT_HASHED_BYTES  # hashed, so its collisions are counted
    with pytest.raises(MalformedPickleError, match="same hash"):
        streampickle.loads(streampickle.dumps({(k * p, at_limit): k for k in range(1, 10)}))


def test_frozenset_keys_are_counted_against_the_limit() -> None:
    # frozenset({s, s.encode()}) hashes to one constant for every ASCII s (16,000 took 6 s):
    # the verifier doesn't compute a frozenset's hash, so such keys are opaque.
    keys = {frozenset({f"k{i}", f"k{i}".encode()}) for i in range(257)}
    assert len({hash(k) for k in keys}) == 1
    with pytest.raises(MalformedPickleError, match="max_opaque_keys=256"):
        streampickle.loads(streampickle.dumps(keys))
    honest = {frozenset({f"k{i}", f"v{i}"}): i for i in range(256)}
    assert streampickle.loads(streampickle.dumps(honest)) == honest
    assert streampickle.loads(streampickle.dumps(keys), limits=streampickle.Limits(max_opaque_keys=257)) == keys


def _opaque_keys_comparing_equal_trees(count: int, width: int, frozen: bool) -> bytes:
    # Key k is (V_k, t_k), or frozenset({(V_k, t_k)}): V_k = ((x_k,) * width,) * width with x_k
    # a str literal of its own, equal to every other key's, and t_k = 5 + k * (2**61 - 1), one
    # hash for all. So every key hashes alike and is compared with each one before it, walking
    # width**2 equal strings each time. The tuple keys are opaque through x_k, longer than the
    # verifier hashes; a frozenset is opaque whatever it holds (its tuple is hashed and counted
    # alone in it), and comparing two hashes the tuples again.
    text = b"x" * (20 if frozen else 300)
    out = [P5 + b"}("]
    slot = 0
    for k in range(count):
        get = [b"j" + struct.pack("<I", slot + i) for i in range(3)]
        out.append(b"X" + struct.pack("<I", len(text)) + text + b"\x940")
        out.append(b"(" + get[0] * width + b"t\x940")
        out.append(b"(" + get[1] * width + b"t\x940")
        slot += 3
        key = b"(" + get[2] + b"\x8a\x10" + (5 + k * (2**61 - 1)).to_bytes(16, "little", signed=True) + b"t"
        out.append((b"(" + key + b"\x91" if frozen else key) + b"N")
    return make_message(b"".join(out) + b"u.")


@pytest.mark.parametrize("frozen", [False, True], ids=["tuples", "frozensets"])
def test_opaque_keys_are_charged_the_compares_they_may_cost(frozen: bool) -> None:
    # 256 such keys (16 wide: 256 strings a compare), 147 KB, took 2.8 s to load; 40 wide and
    # 3,500-byte strings, 1 MB, over 2 minutes. Each opaque key is now charged its cost past
    # FREE_COMPARE for each opaque key before it in its container (at most MAX_COMPARED).
    with pytest.raises(MalformedPickleError, match="comparing keys whose hash the verifier can't check"):
        streampickle.loads(_opaque_keys_comparing_equal_trees(256, 16, frozen))
    few = streampickle.loads(_opaque_keys_comparing_equal_trees(8, 3, frozen))  # cheap ones pass
    assert len(few) == 8
    assert streampickle.loads(_opaque_keys_comparing_equal_trees(256, 16, frozen), trusted=True) is not None


def _keys_of_one_hash(case: str) -> bytes:
    """A dict whose keys share one hash, as a message; the fraction case by hand (the encoder
    leaves a Fraction to pickle, which the safe loader refuses)."""
    from decimal import Decimal
    from fractions import Fraction

    p = 2**61 - 1
    big = int.from_bytes(b"\x5a" * 8192, "little")  # 8 KB: Decimal(big) takes milliseconds
    if case == "decimals-after-an-int":
        keys: list[Any] = [big] + [Decimal(big % p + k * p) for k in range(4)]
    elif case == "an-int-after-decimals":
        keys = [Decimal(big % p + k * p) for k in range(4)] + [big]
    elif case == "longdoubles-after-ints":  # each compare turns a 4,271-digit int into a str
        keys = [1 + k * p * 10**4250 for k in range(1, 3)] + [np.longdouble(1) + np.longdouble(2) ** -60 * k
                                                               for k in range(4)]
    else:  # Decimal == Fraction multiplies out the Fraction's parts
        numerator, denominator = int.from_bytes(b"\x5a" * 2000, "little"), int.from_bytes(b"\x33" * 2000, "little")
        h = hash(Fraction(numerator, denominator))
        body = (glob("streampickle._rebuild", "fraction") + b"\x8b" + struct.pack("<i", 2001)
                + numerator.to_bytes(2001, "little") + b"\x8b" + struct.pack("<i", 2001)
                + denominator.to_bytes(2001, "little") + b"\x86RN")
        for k in range(4):
            digits = str(h + k * p).encode()
            body += (glob("streampickle._rebuild", "decimal") + b"K\x00\x8c" + bytes([len(digits)]) + digits
                     + b"K\x00\x87RN")
        return make_message(P5 + b"}(" + body + b"u.")
    assert len({hash(k) for k in keys}) == 1 and len(set(keys)) == len(keys)
    return streampickle.dumps(dict.fromkeys(keys))


@pytest.mark.parametrize("case", ["decimals-after-an-int", "an-int-after-decimals", "longdoubles-after-ints",
                                  "decimals-after-a-big-fraction"])
def test_numbers_of_other_types_with_one_hash_are_charged_their_conversions(case: str) -> None:
    # Decimal == int converts the int exactly, in time quadratic in its size (100 KB: 1.5 s a
    # compare); np.longdouble == int goes through str; Decimal == Fraction multiplies out its
    # parts. A Decimal costs the verifier 4 units, so the opaque-key charge alone let 100 KB
    # with four Decimals take 6 s. A number key whose hash is not computed is now charged for
    # each number before it in its container (and any number for each such key before it)
    # the square of the larger cost.
    data = _keys_of_one_hash(case)
    with pytest.raises(MalformedPickleError, match="numbers of different types"):
        streampickle.loads(data)
    assert len(streampickle.loads(data, trusted=True)) == (6 if case == "longdoubles-after-ints" else 5)


def test_numbers_of_other_types_load_when_their_compares_are_cheap() -> None:
    from decimal import Decimal

    keys = [Decimal("1.25"), 2**800, 1.5, np.longdouble(2.5)] + [Decimal(i) / 7 for i in range(250)]
    assert len(streampickle.loads(streampickle.dumps(dict.fromkeys(keys)))) == len(keys)


def test_floats_with_one_hash_are_counted() -> None:
    # 2.0 ** (61 * j) all hash to 1 (2 ** 61 is 1 modulo 2 ** 61 - 1); a search found 202
    # floats with one hash, and 256 Fractions of that hash beside them took 30 us a byte
    import math

    floats = [math.ldexp(1, 61 * j) for j in range(-8, 9) if j]
    assert len(floats) == 16 and {hash(f) for f in floats} == {1}
    assert len(streampickle.loads(streampickle.dumps(dict.fromkeys(floats[:8])))) == 8
    with pytest.raises(MalformedPickleError, match="same hash"):
        streampickle.loads(streampickle.dumps(dict.fromkeys(floats[:9])))


def _long(value: int) -> bytes:  # LONG4
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


def _copied(keys: bytes, copies: int, pad: int) -> bytes:
    """A dict of ``keys`` (SETITEMS pairs), memoized, copied ``copies`` times into an
    OrderedDict (each copy inserts every key again), after ``pad`` bytes that buy budget."""
    call = glob("streampickle._rebuild", "ordered_dict") + b"h\x00\x85R0"
    return make_message(P5 + b"B" + struct.pack("<I", pad) + b"p" * pad + b"0}\x94(" + keys + b"u0"
                        + call * copies + b"h\x00.")


def _decimal(digits: int) -> bytes:
    text = str(digits).encode()
    return glob("streampickle._rebuild", "decimal") + b"K\x00\x8c" + bytes([len(text)]) + text + b"K\x00\x87R"


@pytest.mark.parametrize("case", ["an-int-and-a-decimal", "fractions-and-floats"])
def test_a_copied_dict_is_charged_the_compares_its_copies_redo(case: str) -> None:
    # OrderedDict(d) inserts each key again, so every compare d's keys cost is made again per
    # copy, at 7 bytes a call: an int of 4 KB and a Decimal of its hash (a quadratic
    # conversion each time) copied 4,000 times in 152 KB took 13 s; Fractions and floats of
    # one hash (each Fraction == float runs Python code, 5 to 20 us) copied 100 times, 135 KB
    # took 2.5 s. A container's size now includes the compare charges its keys took, and the
    # copy's own cost charges pairs of one hash with an opaque key among them.
    import math

    p = 2**61 - 1
    if case == "an-int-and-a-decimal":
        x = int.from_bytes(b"\x5a" * 4000, "little")
        keys, copies = _long(x) + b"N" + _decimal(x % p + p) + b"N", 4000
    else:
        keys = b""
        for j in range(64):
            m = 1000003 + 7919 * j
            for i in range(1, 5):
                n = 3 * m % p + i * p
                n += 3 * p if n % 3 == 0 else 0
                keys += glob("streampickle._rebuild", "fraction") + _long(n) + b"K\x03\x86RN"
            keys += b"".join(b"G" + struct.pack(">d", math.ldexp(m, 61 * k)) + b"N" for k in range(8))
        copies = 100
    data = _copied(keys, copies, 120_000)
    with pytest.raises(MalformedPickleError, match="ordered_dict"):
        streampickle.loads(data)
    assert len(streampickle.loads(_copied(keys, 1, 120_000))) > 1  # one copy is within the budget


def test_a_void_scalar_is_writable_and_unhashable_as_numpy_makes_it() -> None:
    # numpy hashes and compares a structured scalar field by field (microseconds each): 256
    # of them with one hash as keys took 23 s. numpy's pickle makes them writable, and so
    # unhashable; so does the safe loader, in framed messages and standard pickles.
    dt = np.dtype([(f"f{i}", "i1") for i in range(8)])
    scalar = np.zeros(2, dt)[1]
    def standard(protocol: int) -> Any:
        decoder = streampickle.PickleDecoder()
        decoder.feed(pickle.dumps(scalar, protocol=protocol))
        return next(decoder)

    for got in (streampickle.loads(streampickle.dumps(scalar)), standard(2), standard(5)):
        assert type(got) is np.void and got.dtype == dt and got.tolist() == scalar.tolist()
        assert got.flags.writeable
        with pytest.raises(TypeError, match="unhashable"):
            hash(got)
    read_only = streampickle.loads(streampickle.dumps(np.frombuffer(bytes(8), dt)[0]))
    assert read_only.flags.writeable  # a copy, whatever the sender's was


@pytest.mark.parametrize("body", [
    glob("streampickle._rebuild", "ndarray") + b"Q.",  # a reconstructor, named and not called
    glob("streampickle._rebuild", "ndarray") + b"\x85\x85Q.",  # two tuples deep
    b"]" + glob("streampickle._rebuild", "ndarray") + b"aQ.",  # in a list
    b"}" + s("k") + glob("streampickle._rebuild", "dtype") + b"sQ.",  # a dict's value
    b"\x8f(" + glob("streampickle._rebuild", "ndarray") + b"\x85\x90Q.",  # a tuple in a set
])
def test_persistent_load_never_sees_an_internal_value(body: bytes) -> None:
    # A red-team find: the framed decoder's persistent_load (C and pure unpicklers alike) was
    # called with the restricted unpickler's wrapper of a reconstructor.
    seen: list[Any] = []

    def hook(pid: Any) -> Any:
        seen.append(pid)
        return "made"

    refuse(P5 + body, persistent_load=hook)
    assert seen == []
    assert streampickle.loads(make_message(P5 + s("x") + b"\x85Q."), persistent_load=hook) == "made"
    assert seen == [("x",)]


def test_persistent_ids_that_share_one_structure_are_charged() -> None:
    # One list of 2,000 items passed as 2,000 ids: checking each walks it; the budget refuses.
    body = b"]\x94(" + b"K\x01" * 2000 + b"e0" + b"h\x00Q0" * 2000 + b"N."
    seen: list[Any] = []
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        streampickle.loads(make_message(P5 + body), persistent_load=seen.append)
    assert len(seen) < 2000


# -- a reconstructor is called, never handed over ------------------------------------------------

NDARRAY = glob("streampickle._rebuild", "ndarray")
GETATTR = glob("builtins", "getattr")
ODICT = glob("collections", "OrderedDict")
POINT = glob("test_attacks", "Point")


@pytest.mark.parametrize("body", [
    pytest.param(NDARRAY + b".", id="the-result"),
    pytest.param(NDARRAY + b"\x85.", id="in-a-tuple"),
    pytest.param(NDARRAY + b"\x85\x85.", id="two-tuples-deep"),
    pytest.param(NDARRAY + b"\x94\x85h\x00\x86.", id="memoized-then-twice-in-a-tuple"),
    pytest.param(b"]" + NDARRAY + b"a.", id="appended"),
    pytest.param(b"](" + s("x") + NDARRAY + b"e.", id="in-appends"),
    pytest.param(b"}" + s("k") + NDARRAY + b"s.", id="a-dict-value"),
    pytest.param(b"}" + NDARRAY + s("v") + b"s.", id="a-dict-key"),
    pytest.param(b"}(" + s("k") + NDARRAY + b"\x85u.", id="a-tuple-in-setitems"),
    pytest.param(b"\x8f(" + NDARRAY + b"\x90.", id="a-set-item"),
    pytest.param(b"(" + NDARRAY + b"\x91.", id="a-frozenset-item"),
    pytest.param(glob("streampickle._rebuild", "dtype") + b"N\x86.", id="another-reconstructor"),
])
def test_a_reconstructor_named_and_not_called_is_refused(body: bytes) -> None:
    # Such a pickle would hand the caller the loader's metered wrapper of a reconstructor:
    # harmless to call (it only makes checked values), but one of streampickle's own objects.
    error = refuse(P5 + body)
    assert "named and not called" in str(error)


@pytest.mark.parametrize("body, allow", [
    pytest.param(ODICT + b"]" + NDARRAY + b"\x85a\x85R.", ["collections.OrderedDict"], id="in-a-list-argument"),
    pytest.param(ODICT + NDARRAY + b"\x85\x85R.", ["collections.OrderedDict"], id="a-tuple-argument"),
    pytest.param(POINT + NDARRAY + b"\x85\x81.", ["test_attacks.Point"], id="newobj-argument"),
    pytest.param(POINT + b")\x81" + NDARRAY + b"\x85b.", ["test_attacks.Point"], id="build-state"),
    pytest.param(GETATTR + NDARRAY + s("cost") + b"\x86R.", ["test_attacks.Point.x"], id="getattr-of-it"),
    pytest.param(GETATTR + b".", ["test_attacks.Point.x"], id="getattr-itself"),
])
def test_a_reconstructor_is_not_passed_to_what_the_user_allowed(body: bytes, allow: list[str]) -> None:
    error = refuse(P5 + body, allow=allow)
    assert "named and not called" in str(error)


def test_reconstructors_called_and_memoized_still_load() -> None:
    arrays = [np.arange(3.0), np.arange(4, dtype=np.int8)]
    got = streampickle.loads(streampickle.dumps({"a": arrays, "b": arrays[0], "t": (np.dtype("<f4"), 1)}))
    assert [a.tolist() for a in got["a"]] == [[0.0, 1.0, 2.0], [0, 1, 2, 3]]
    assert got["t"] == (np.dtype("<f4"), 1)
