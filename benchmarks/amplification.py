"""Amplification: how much CPU and memory a hostile message makes a safe receiver spend, per byte.

    python benchmarks/amplification.py                 # every attack at 10 KB, 100 KB and 1 MB
    python benchmarks/amplification.py --quick         # 10 KB and 100 KB, a 3 s CPU cap
    python benchmarks/amplification.py --json out.json --only fraction,scalar

Why: a peer on a socket chooses every byte it sends, and a decoder that spends a lot per byte
received is a denial of service, whatever it finally answers. The bound we hold the safe
loader to is **2 us of CPU per message byte plus 10 ms, and 512 bytes of memory per message
byte**. This script builds, for each attack class (docs/security.md lists them), the worst
input we know at several sizes and measures what decoding it costs.

Each measurement is a fresh process (so no earlier attack warmed a cache or left memory
behind) that decodes one message with default options, either with ``streampickle.loads`` or
with a ``Decoder`` fed 64 KiB pieces, and reports:

* CPU seconds: ``time.process_time()`` around the decode alone (freeing the result is not
  counted);
* the peak memory above the baseline: the rise of ``ru_maxrss`` in that run, and, in a second
  fresh process (tracemalloc slows allocation, so it never shares a run with the clock), the
  ``tracemalloc`` peak. numpy reports its allocations to tracemalloc, so the traced peak
  counts arrays too; the RSS rise also counts allocator slack and pages never given back;
* the outcome: ``accepted``, or the error raised, with the first words of its message.

A child that runs past the CPU cap is killed (``RLIMIT_CPU``) and reported as ``>= cap``: a
lower bound. Children run under an 8 GiB address-space limit, so that an attack we got wrong
fails with ``MemoryError`` instead of taking the machine; the memory attacks are sized to
stay near 1 GiB.

Rows marked ``fixed`` have one natural size (a header, a 60-level DAG); the others are built
to each target size of pickle. ``B/B`` is bytes of memory per message byte; ``us/B`` is
microseconds of CPU per message byte.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import json
import math
import os
import platform
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

KB = 1000
SIZES = [10 * KB, 100 * KB, 1000 * KB]
QUICK_SIZES = [10 * KB, 100 * KB]
CPU_CAP = 10.0  # seconds of CPU a child may use before it is killed
QUICK_CPU_CAP = 3.0
TRACE_SLOWDOWN = 4  # a traced child's cap is this many times the plain one
ADDRESS_SPACE = 8 << 30
PIECE = 64 * 1024  # the Decoder is fed pieces of this size

# The bounds every row is held to.
CPU_PER_BYTE = 2e-6
CPU_BASE = 0.010
MEM_PER_BYTE = 512

P61 = (1 << 61) - 1  # the modulus of Python's numeric hash

# -- pickle building blocks ---------------------------------------------------------------------

PROTO = b"\x80\x05"
STOP = b"."
MEMO_POP = b"\x94" + b"0"  # MEMOIZE, then POP: define a memo slot and leave the stack as it was


def s(text: str) -> bytes:
    """A str literal (SHORT_BINUNICODE or BINUNICODE)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return b"\x8c" + bytes([len(raw)]) + raw
    return b"X" + struct.pack("<I", len(raw)) + raw


def b(data: bytes) -> bytes:
    """A bytes literal (SHORT_BINBYTES, BINBYTES or BINBYTES8)."""
    if len(data) < 256:
        return b"C" + bytes([len(data)]) + data
    if len(data) < 1 << 32:
        return b"B" + struct.pack("<I", len(data)) + data
    return b"\x8e" + struct.pack("<Q", len(data)) + data


def integer(value: int) -> bytes:
    """An int literal: BININT1, BININT2, BININT, LONG1 or LONG4, the shortest that fits."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(1 << 31) <= value < 1 << 31:
        return b"J" + struct.pack("<i", value)
    size = (value.bit_length() + 8) // 8
    raw = value.to_bytes(size, "little", signed=True)
    if size < 256:
        return b"\x8a" + bytes([size]) + raw
    return b"\x8b" + struct.pack("<i", size) + raw


def flt(value: float) -> bytes:
    return b"G" + struct.pack(">d", value)


def get(index: int) -> bytes:
    """BINGET or LONG_BINGET of a memo slot."""
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def rebuilder(name: str) -> bytes:
    """STACK_GLOBAL of one of streampickle's reconstructors."""
    return s("streampickle._rebuild") + s(name) + b"\x93"


#: A call of a harmless reconstructor: a pickle that starts with it names a global, so the
#: full (Python) verifier walks all of it instead of the C scan.
FORCE_FULL = rebuilder("ellipsis") + b")R0"


def calls(prefix: bytes, call: bytes, size: int, suffix: bytes = b"", at_least: int = 1) -> bytes:
    """``prefix`` + ``call`` repeated to make about ``size`` bytes in all + ``suffix``."""
    room = size - len(prefix) - len(suffix) - 3
    return prefix + call * max(at_least, room // len(call)) + suffix


def frame(pickled: bytes, chunks: list[bytes] = (), key: bytes | None = None) -> bytes:  # type: ignore[assignment]
    """A wire-format message around ``pickled`` (docs/wire-format.md), written out by hand so
    that any pickle, hostile or not, can be framed."""
    from streampickle import _wire

    head = _wire.HEADER_STRUCT.pack(_wire.MAGIC, _wire.VERSION, 1 if key else 0, 0, len(chunks), len(pickled))
    head += b"".join(struct.pack("<Q", len(c)) for c in chunks)
    body = head + pickled + b"".join(chunks)
    if key:
        body += hmac.new(key, body, hashlib.sha256).digest()
    return body


def header_only(chunk_count: int, pickle_length: int, rest: bytes = b"") -> bytes:
    from streampickle import _wire

    return _wire.HEADER_STRUCT.pack(_wire.MAGIC, _wire.VERSION, 0, 0, chunk_count, pickle_length) + rest


# -- the attacks --------------------------------------------------------------------------------


@dataclass
class Case:
    """One input to decode: the message and how to decode it."""

    message: bytes = b""
    key: str | None = None  # hex; the decoder's key=
    entries: tuple[str, ...] = ("loads", "decoder")
    no_eof: bool = False  # the Decoder is fed the bytes and left waiting for more
    encode_bytes: int = 0  # an encoder-side row: dumps() of an array this big, which fails
    note: str = ""


@dataclass
class Attack:
    name: str
    section: str
    what: str
    build: Callable[[int], Case]
    fixed: bool = False  # one natural size: built once, with size 0
    sizes: list[int] | None = None  # its own sizes instead of the run's
    results: list[dict[str, Any]] = field(default_factory=list)


def plain(body: bytes, **options: Any) -> Case:
    return Case(frame(PROTO + body + STOP), **options)


# Resource exhaustion: memo sharing


def dag_tuples(_: int) -> Case:
    """A tuple DAG 60 levels deep: level i+1 is (level i, level i), 2**60 paths, 60 objects."""
    body = b"N\x94"
    for i in range(60):
        body += b"0" + get(i) + get(i) + b"\x86\x94"
    return plain(body)


def dag_lists(_: int) -> Case:
    body = b"]\x94"
    for i in range(60):
        body += b"0]\x94(" + get(i) + get(i) + b"e"
    return plain(body)


def dag_key(_: int) -> Case:
    """The tuple DAG as a dict key: hashing it would visit 2**60 nodes."""
    body = b"N\x94"
    for i in range(60):
        body += b"0" + get(i) + get(i) + b"\x86\x94"
    return plain(body + b"0}" + get(60) + b"Ns")


# Resource exhaustion: amplifying opcodes, marks and nesting


def one_byte_items(op: bytes) -> Callable[[int], Case]:
    def build(size: int) -> Case:
        return plain(calls(b"](", op, size, b"e"))
    return build


def binget_repeated(size: int) -> Case:
    return plain(calls(b"](" + b(b"x" * 1000) + b"\x94", b"h\x00", size, b"e"))


def none_append(size: int) -> Case:
    return plain(calls(b"]", b"Na", size))


def marks(size: int) -> Case:
    return plain(b"(" * max(1, size - 2) + b"N")


def deep_lists_marks(size: int) -> Case:
    n = max(1, (size - 3) // 3)
    return plain(b"](" * n + b"]" + b"e" * n)


def deep_lists_append(size: int) -> Case:
    n = max(2, size // 2)
    return plain(b"]" * n + b"a" * (n - 1))


def deep_tuples(size: int) -> Case:
    return plain(b"N" + b"\x85" * max(1, size - 4))


# Resource exhaustion: hash flooding


def keys_up_to(size: int, key: Callable[[int], bytes], most: int = 1 << 62) -> Case:
    """A dict of ``key(0)``, ``key(1)``, ... (each a key and its value), as many as fit in
    ``size`` bytes, at most ``most``."""
    keys: list[bytes] = []
    total = 0
    while total < size - 8 and len(keys) < most:
        keys.append(key(len(keys)))
        total += len(keys[-1])
    return plain(b"}(" + b"".join(keys) + b"u")


def int_keys_colliding(size: int) -> Case:
    """Dict keys k * (2**61 - 1): every one hashes to 0."""
    return keys_up_to(size, lambda k: integer((k + 1) * P61) + b"N")


_M64 = (1 << 64) - 1
_XX1, _XX2, _XX5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _rotl(x: int) -> int:
    return ((x << 31) | (x >> 33)) & _M64


def _rotr(x: int) -> int:
    return ((x >> 31) | (x << 33)) & _M64


def colliding_pairs(count: int, target: int = 0x5EED) -> list[tuple[int, int]]:
    """2-tuples of ints that all have hash ``target`` under CPython's tuple hash (xxHash
    lanes): pick lane 1, then solve lane 2, since the multiplier is odd and so invertible
    modulo 2**64. An int can have any hash in (-P, P) except -1."""
    inv1, inv2 = pow(_XX1, -1, 1 << 64), pow(_XX2, -1, 1 << 64)
    want = _rotr(((target - (2 ^ (_XX5 ^ 3527539))) & _M64) * inv1 & _M64)
    pairs = []
    a = 0
    while len(pairs) < count:
        lane1 = _rotl((_XX5 + a * _XX2) & _M64) * _XX1 & _M64
        h = (want - lane1) * inv2 & _M64
        if h < P61:
            pairs.append((a, h))
        elif h > (1 << 64) - P61 and h != _M64:
            pairs.append((a, h - (1 << 64)))
        a += 1
    return pairs


def tuple_keys_colliding(size: int) -> Case:
    count = max(10, size // 16)
    items = b"".join(integer(x) + integer(y) + b"\x86N" for x, y in colliding_pairs(count))
    return plain(b"}(" + items + b"u")


def str_tuple_keys_colliding(size: int) -> Case:
    """Tuple keys (k * (2**61 - 1), "a"), the str memoized: the salt of "a" is the same in
    every tuple and every int hashes to 0, so all hash alike."""
    return keys_up_to(size, lambda k: integer((k + 1) * P61) + (b"\x8c\x01a\x94" if k == 0 else b"h\x00") + b"\x86N")


def twin_tuple_keys_colliding(size: int) -> Case:
    """Tuple keys of 16 places, each "aJ" or its bytes twin b"aJ" (a str hashes as its
    buffer): 2**16 tuples with one hash, as many as the size holds."""
    def key(bits: int) -> bytes:
        return b"(" + b"".join((b"C" if bits >> j & 1 else b"\x8c") + bytes([len(f"a{j}")]) + f"a{j}".encode()
                               for j in range(16)) + b"tN"

    return keys_up_to(size, key, most=1 << 16)


_SLOW_TEXT = "\ud800".encode("utf-8", "surrogatepass") * 85  # 255 bytes: the slowest str to decode


def memo_text_tuples(size: int) -> Case:
    """A str of lone surrogates (the slowest to decode) just under TEXT_HASHED_BYTES, memoized,
    then one 1-tuple of it per 3 bytes into a set: each tuple would hash it again."""
    count = max(1, (size - len(_SLOW_TEXT) - 16) // 3)
    return plain(b"\x8fX" + len(_SLOW_TEXT).to_bytes(4, "little") + _SLOW_TEXT + b"\x940(" + b"h\x00\x85" * count
                 + b"\x90")


def memo_text_one_tuple(size: int) -> Case:
    """That str, memoized, then copied into one tuple per 2 bytes (every copy on the stack
    before the tuple is made), as a set item."""
    count = max(1, (size - len(_SLOW_TEXT) - 16) // 2)
    return plain(b"\x8fX" + len(_SLOW_TEXT).to_bytes(4, "little") + _SLOW_TEXT + b"\x940((" + b"h\x00" * count
                 + b"t\x90")


def opaque_tuple_compares(_size: int) -> Case:
    """256 opaque tuple keys with one hash (a 300-byte str makes each opaque), each
    ((x_k,) * 16,) * 16 of its own equal str x_k: every key is compared with each before it,
    walking 256 equal strings a compare."""
    out = []
    slot = 0
    for k in range(256):
        get = [b"j" + (slot + i).to_bytes(4, "little") for i in range(3)]
        out.append(b"X" + (300).to_bytes(4, "little") + b"x" * 300 + b"\x940(" + get[0] * 16 + b"t\x940("
                   + get[1] * 16 + b"t\x940(" + get[2] + integer(5 + k * P61) + b"tN")
        slot += 3
    return plain(b"}(" + b"".join(out) + b"u")


def decimals_beside_an_int(size: int) -> Case:
    """One int key of most of the size and four Decimal keys of its hash: each Decimal == int
    converts the int exactly, in time quadratic in its size."""
    x = int.from_bytes(b"\x5a" * max(8, size - 200), "little")
    decimals = b"".join(rebuilder("decimal") + integer(0) + s(str(x % P61 + k * P61)) + integer(0) + b"\x87RN"
                        for k in range(4))
    return plain(b"}(" + integer(x) + b"N" + decimals + b"u")


def float_keys_colliding(size: int) -> Case:
    """Floats m * 2**(61 j): all j give one hash per m (2**61 is 1 modulo 2**61 - 1), about
    34 floats per hash value."""
    keys = []
    m = 1
    while len(keys) * 10 < size - 8:
        for j in range(-18, 18):
            try:
                x = math.ldexp(m, 61 * j)
            except OverflowError:
                continue
            if x:
                keys.append(flt(x) + b"N")
        m += 2
    return plain(b"}(" + b"".join(keys[: max(1, (size - 8) // 10)]) + b"u")


def opaque_keys(make: Callable[[int], bytes], setup: bytes) -> Callable[[int], Case]:
    """Reconstructed dict keys with one hash, as many as ``Limits.max_opaque_keys`` and the
    size allow; the rest of the size is a bytes literal."""
    from streampickle import Limits

    most = Limits().max_opaque_keys

    def build(size: int) -> Case:
        keys = []
        total = len(setup) + 16
        k = 1
        while len(keys) < most:
            item = make(k) + b"N"
            if total + len(item) > size and keys:
                break
            keys.append(item)
            total += len(item)
            k += 1
        pad = max(0, size - total - 8)
        return plain((b(b"p" * pad) + b"0" if pad else b"") + setup + b"}(" + b"".join(keys) + b"u")
    return build


def fraction_key(k: int) -> bytes:
    return get(0) + integer(k * P61) + b"K\x01\x86R"


def uuid_key(k: int) -> bytes:
    return get(0) + integer(k * P61) + b"\x85R"


_C = 1000003 << 30  # complex hash = hash(real) + 1000003 * hash(imag)


def complex_key(k: int) -> bytes:
    return get(0) + get(1) + b(struct.pack("<dd", float(_C - 1000003 * k), float(k))) + b"\x86R"


def bigint_in_tuple_keys(size: int) -> Case:
    """One memoized int of half the size, as the first item of set items (X, k): every item
    rehashes X (an int caches no hash), and the verifier charges the tuple 2 units."""
    digits = max(8, size // 2)
    x = (1 << (8 * digits - 2)) + 12345
    head = integer(x) + b"\x94" + b"0" + b"\x8f("
    items = []
    total = len(head) + 8
    k = 0
    while total < size or not items:
        item = get(0) + integer(k) + b"\x86"
        items.append(item)
        total += len(item)
        k += 1
    return plain(head + b"".join(items) + b"\x90")


# Resource exhaustion: reconstructors given memoized arguments


def walk_at_budget(name: str) -> Callable[[int], Case]:
    """A memoized list or dict of L items passed to a reconstructor as many times as the
    verifier's work budget (16 units per pickle byte + 65,536) allows; the rest is padding,
    which raises the budget."""
    from streampickle._verify import WORK_BASE, WORK_PER_BYTE

    def build(size: int) -> Case:
        n_items = max(100, min(10_000, size // 10))
        setup = b"](" + b"N" * n_items + b"e" + MEMO_POP  # memo 0: the list
        setup += b"}(" + b"".join(integer(i) + b"N" for i in range(n_items)) + b"u" + MEMO_POP  # memo 1
        setup += rebuilder(name) + MEMO_POP  # memo 2
        call, cost = {
            "deque": (get(2) + get(0) + b"N\x86R", n_items + 1),
            "counter": (get(2) + get(1) + b"\x85R", n_items + 1),
            "ordered_dict": (get(2) + get(1) + b"\x85R", n_items + 1),
            # shape [n_items] (a fresh one-item list), C order, writeable, the memoized items
            "object_ndarray": (get(2) + b"(]" + integer(n_items) + b"a\x89\x88" + get(0) + b"tR", n_items + 2),
        }[name]
        budget = WORK_PER_BYTE * size + WORK_BASE - 2 * n_items
        count = max(1, min(budget // cost - 1, (size - len(setup) - 16) // len(call)))
        body = setup + b"](" + call * count + b"e"
        pad = size - len(body) - 16
        if pad > 0:
            body = b(b"p" * pad) + b"0" + body
        return plain(body)
    return build


def walk_over_budget(_: int) -> Case:
    """The same, 3,000 times over a 10,000-item dict: refused by the work budget."""
    setup = b"}(" + b"".join(integer(i) + b"N" for i in range(10_000)) + b"u" + MEMO_POP
    setup += rebuilder("counter") + MEMO_POP
    return plain(setup + b"](" + (get(1) + get(0) + b"\x85R") * 3000 + b"e")


def shared_descriptor(levels: int = 7, fields: int = 3) -> tuple[bytes, int]:
    """A structured dtype descriptor whose every level is a list of ``fields`` fields that all
    reuse one memoized sub-list: 3**7 leaves within the 4,096-node bound. Returns the pickle
    bytes (defining memo slots 0..levels) and the slot of the top list."""
    body = s("<f8") + MEMO_POP
    previous = 0
    for level in range(levels):
        body += b"](" + b"".join(b"](" + s(f"f{k}") + get(previous) + b"]e" for k in range(fields)) + b"e" + MEMO_POP
        previous = level + 1
    return body, previous


def dtype_shared(size: int) -> Case:
    body, top = shared_descriptor()
    body += rebuilder("dtype") + MEMO_POP
    return plain(calls(body + b"](", get(top + 1) + get(top) + b"\x85R", size, b"e"))


def dtype_shared_20(_: int) -> Case:
    """The same, 20 calls: a size at which the decode ends within the CPU cap."""
    body, top = shared_descriptor()
    body += rebuilder("dtype") + MEMO_POP
    return plain(body + b"](" + (get(top + 1) + get(top) + b"\x85R") * 20 + b"e")


def ndarray_text_check(size: int) -> Case:
    """A U-dtype array over a memoized bytes literal of half the size, rebuilt again and again:
    each call checks every code point of the whole literal."""
    nbytes = max(4, (size // 2) // 4 * 4)
    setup = rebuilder("ndarray") + MEMO_POP + s(f"<U{nbytes // 4}") + MEMO_POP + b"]K\x01a" + MEMO_POP
    setup += b(b"a\0\0\0" * (nbytes // 4)) + MEMO_POP
    return plain(calls(setup + b"](", get(0) + b"(" + get(1) + get(2) + b"\x89" + get(3) + b"tR", size, b"e"))


def scalar_copies(size: int) -> Case:
    """``scalar('|S<n>', memoized n bytes)`` again and again: each call copies the n bytes
    into a new numpy bytes scalar. n is chosen so that all copies together stay near 1 GiB."""
    call_len = 8
    n = size // 2
    while n * (size - n) // call_len > 1 << 30:
        n = n * 3 // 4
    setup = rebuilder("scalar") + MEMO_POP + s(f"|S{n}") + MEMO_POP + b(b"s" * n) + MEMO_POP
    return plain(calls(setup + b"](", get(0) + get(1) + get(2) + b"\x86R", size, b"e"))


def fraction_memo(size: int) -> Case:
    """Fractions of two memoized 16,383-bit ints (the reconstructor's limit), rebuilt again
    and again: each normalises with a gcd of the two."""
    import random

    rng = random.Random(5)
    num, den = rng.getrandbits(16383), rng.getrandbits(16383) | (1 << 16382) | 1
    setup = rebuilder("fraction") + MEMO_POP + integer(num) + MEMO_POP + integer(den) + MEMO_POP
    return plain(calls(setup + b"](", get(0) + get(1) + get(2) + b"\x86R", size, b"e"))


def decimal_memo(size: int) -> Case:
    setup = rebuilder("decimal") + MEMO_POP + s("7" * 4300) + MEMO_POP
    return plain(calls(setup + b"](", get(0) + b"(K\x00" + get(1) + integer(4300) + b"tR", size, b"e"))


def zoneinfo_all(_: int) -> Case:
    """Every installed time zone once, in a fresh process: each one loads its file (each zone
    is loaded once per process, and kept)."""
    import zoneinfo

    zones = sorted(zoneinfo.available_timezones())
    setup = rebuilder("zoneinfo") + MEMO_POP
    return plain(setup + b"](" + b"".join(get(0) + s(z) + b"\x85R" for z in zones) + b"e")


# Big literals and the reference


def long4(size: int) -> Case:
    return plain(integer((1 << (8 * max(300, size - 16) - 2)) + 1))


def long_string(size: int) -> Case:
    return plain(s("a" * max(1, size - 16)))


def long_bytes(size: int) -> Case:
    return plain(b(b"a" * max(1, size - 16)))


def legit_tuples(size: int) -> Case:
    """``[(i, i / 7, f"s{i}") ...]`` as streampickle.dumps writes it: plain data."""
    import streampickle

    n = max(1, size // 18) if size < 10**7 else 1_000_000
    return Case(streampickle.dumps([(i, i / 7, f"s{i}") for i in range(n)]), note=f"{n} tuples")


# The full verifier's worst accepted shapes


def tuple1_chain_full(size: int) -> Case:
    return plain(FORCE_FULL + b"N" + b"\x85" * max(1, size - len(FORCE_FULL) - 4))


def empty_tuples_full(size: int) -> Case:
    return plain(calls(FORCE_FULL + b"(", b")", size, b"t"))


def empty_lists_full(size: int) -> Case:
    return plain(calls(FORCE_FULL + b"](", b"]", size, b"e"))


# Framing, truncation, buffers, opcodes, code execution, integrity, time, sender, numpy


def claim_2_63(_: int) -> Case:
    return Case(header_only(0, 1 << 63))


def claim_2_31_then_3(_: int) -> Case:
    return Case(header_only(0, (1 << 31) - 1, b"\x80\x05N"))


def chunk_count_2_32(_: int) -> Case:
    return Case(header_only((1 << 32) - 1, 10))


def chunk_lengths_wrap(_: int) -> Case:
    return Case(header_only(2, 4, struct.pack("<QQ", 1 << 63, 1 << 63)))


def cut_in_half(size: int) -> Case:
    whole = plain(b(b"a" * max(1, size - 16))).message
    return Case(whole[: len(whole) // 2])


def held_half(size: int) -> Case:
    whole = plain(b(b"a" * max(1, size - 16))).message
    return Case(whole[: len(whole) // 2], entries=("decoder",), no_eof=True)


def zero_length_chunks(size: int) -> Case:
    n = max(1, min(65_536, (size - 24) // 9))
    return Case(frame(PROTO + b"](" + b"\x97" * n + b"e" + STOP, [b""] * n), note=f"{n} chunks")


def extra_next_buffer(_: int) -> Case:
    return Case(frame(PROTO + b"](" + b"\x97" * 3 + b"e" + STOP, [b"ab", b"cd"]))


def bad_opcode_after_walk(size: int) -> Case:
    return plain(calls(FORCE_FULL + b"(", b")", size, b"t\xff0"))


def binbytes8_claim(_: int) -> Case:
    return plain(b"\x8e" + struct.pack("<Q", 1 << 62) + b"abc")


def long_binput(_: int) -> Case:
    return plain(b"Nr\xff\xff\xff\xff")


def os_system(_: int) -> Case:
    return plain(s("os") + s("system") + b"\x93" + s("echo pwned") + b"\x85R")


def forbidden_after_walk(size: int) -> Case:
    return plain(calls(FORCE_FULL + b"(", b")", size, b"t0" + s("os") + s("system") + b"\x93"))


def wrong_tag(size: int) -> Case:
    message = bytearray(frame(PROTO + b(b"a" * max(1, size - 16)) + STOP, key=b"k"))
    message[-1] ^= 1
    return Case(bytes(message), key=b"k".hex(), note="key=b'k' (HMAC-SHA256)")


def encode_fails(size: int) -> Case:
    return Case(entries=("dumps",), encode_bytes=size, note="dumps([array, lambda])")


def array_f8(size: int) -> Case:
    import numpy as np

    import streampickle

    return Case(streampickle.dumps(np.arange(max(1, size // 8), dtype="<f8")))


def array_text(size: int) -> Case:
    import numpy as np

    import streampickle

    return Case(streampickle.dumps(np.array(["héllo wörld"] * max(1, size // 44), dtype="<U11")))


def array_object(size: int) -> Case:
    import numpy as np

    import streampickle

    items = np.empty(max(1, size // 3), dtype=object)
    items[:] = [i % 200 for i in range(len(items))]
    return Case(streampickle.dumps(items))


ATTACKS: list[Attack] = [
    # A. framing and declared lengths
    Attack("claim-2**63", "framing", "pickle length 2**63 in the header", claim_2_63, fixed=True),
    Attack("claim-2**31-then-3", "framing", "pickle length 2**31-1, then 3 bytes and EOF",
           claim_2_31_then_3, fixed=True),
    Attack("chunks-2**32-1", "framing", "side-chunk count 2**32-1", chunk_count_2_32, fixed=True),
    Attack("chunk-lengths-wrap", "framing", "two side-chunk lengths of 2**63", chunk_lengths_wrap, fixed=True),
    # B. truncation
    Attack("cut-in-half", "truncation", "a message cut in half, then EOF", cut_in_half),
    # C. out-of-band buffer accounting
    Attack("zero-length-chunks", "buffers", "up to 65,536 zero-length side chunks, one NEXT_BUFFER each",
           zero_length_chunks),
    Attack("extra-next-buffer", "buffers", "3 NEXT_BUFFERs, 2 side chunks", extra_next_buffer, fixed=True),
    # D. malformed opcodes
    Attack("bad-opcode-after-walk", "opcodes", "0xff after a pickle the full verifier walks", bad_opcode_after_walk),
    Attack("binbytes8-2**62", "opcodes", "BINBYTES8 declaring 2**62 bytes", binbytes8_claim, fixed=True),
    Attack("long-binput-ffffffff", "opcodes", "LONG_BINPUT 0xffffffff", long_binput, fixed=True),
    # E. code execution
    Attack("os-system", "code", "STACK_GLOBAL os.system + REDUCE", os_system, fixed=True),
    Attack("forbidden-after-walk", "code", "os.system after a pickle the full verifier walks", forbidden_after_walk),
    # F. resource exhaustion
    Attack("dag-tuples", "exhaustion", "tuple DAG 60 levels deep (2**60 paths)", dag_tuples, fixed=True),
    Attack("dag-lists", "exhaustion", "list DAG 60 levels deep", dag_lists, fixed=True),
    Attack("dag-as-key", "exhaustion", "the tuple DAG as a dict key", dag_key, fixed=True),
    Attack("empty-set", "exhaustion", "EMPTY_SET per byte, into one list", one_byte_items(b"\x8f")),
    Attack("empty-dict", "exhaustion", "EMPTY_DICT per byte, into one list", one_byte_items(b"}")),
    Attack("empty-list", "exhaustion", "EMPTY_LIST per byte, into one list", one_byte_items(b"]")),
    Attack("empty-tuple-memoize", "exhaustion", "EMPTY_TUPLE + MEMOIZE per 2 bytes", one_byte_items(b")\x94")),
    Attack("none-append", "exhaustion", "NONE + APPEND per 2 bytes into one list", none_append),
    Attack("binget-repeated", "exhaustion", "BINGET of a memoized 1 KB object per 2 bytes", binget_repeated),
    Attack("marks", "exhaustion", "a MARK per byte (10**6 at 1 MB)", marks),
    Attack("deep-lists-marks", "exhaustion", "lists nested by MARK/APPENDS", deep_lists_marks),
    Attack("deep-lists-append", "exhaustion", "lists nested by APPEND (no MARK), depth = bytes/2", deep_lists_append),
    Attack("deep-tuples", "exhaustion", "tuples nested by TUPLE1 chains, depth = bytes", deep_tuples),
    Attack("int-keys-k*P", "exhaustion", "dict keys k*(2**61-1), all hash 0", int_keys_colliding),
    Attack("tuple-keys-crafted", "exhaustion", "2-tuples of ints solved to one tuple hash", tuple_keys_colliding),
    Attack("str-tuple-keys", "exhaustion", "tuple keys (k*(2**61-1), \"a\"), all hash alike", str_tuple_keys_colliding),
    Attack("twin-tuple-keys", "exhaustion", "16-tuples of \"aJ\" or b\"aJ\", all hash alike",
           twin_tuple_keys_colliding),
    Attack("memo-text-tuples", "exhaustion", "a 255-byte str of surrogates, memoized, in a 1-tuple per 3 bytes",
           memo_text_tuples),
    Attack("memo-text-one-tuple", "exhaustion", "that str, memoized, copied into one tuple per 2 bytes",
           memo_text_one_tuple),
    Attack("opaque-tuple-compares", "exhaustion", "256 opaque tuple keys, one hash, 256 equal strs a compare",
           opaque_tuple_compares, fixed=True),
    Attack("float-keys", "exhaustion", "floats m*2**(61j), ~34 per hash", float_keys_colliding),
    Attack("decimals-beside-an-int", "exhaustion", "an int key and 4 Decimal keys of its hash", decimals_beside_an_int),
    Attack("fraction-keys", "exhaustion", "max_opaque_keys Fraction keys with one hash",
           opaque_keys(fraction_key, rebuilder("fraction") + MEMO_POP)),
    Attack("uuid-keys", "exhaustion", "max_opaque_keys UUID keys with one hash",
           opaque_keys(uuid_key, rebuilder("uuid") + MEMO_POP)),
    Attack("numpy-complex-keys", "exhaustion", "max_opaque_keys numpy complex128 scalar keys with one hash",
           opaque_keys(complex_key, rebuilder("scalar") + MEMO_POP + s("<c16") + MEMO_POP)),
    Attack("bigint-in-tuple-keys", "exhaustion", "set items (X, k), X a memoized int of half the size",
           bigint_in_tuple_keys),
    Attack("deque-walk", "exhaustion", "memoized list to deque, at the work budget", walk_at_budget("deque")),
    Attack("counter-walk", "exhaustion", "memoized dict to counter, at the work budget", walk_at_budget("counter")),
    Attack("ordered-dict-walk", "exhaustion", "memoized dict to ordered_dict, at the work budget",
           walk_at_budget("ordered_dict")),
    Attack("object-ndarray-walk", "exhaustion", "memoized list to object_ndarray, at the work budget",
           walk_at_budget("object_ndarray")),
    Attack("counter-walk-3000x", "exhaustion", "10,000-item dict to counter 3,000 times", walk_over_budget, fixed=True),
    Attack("dtype-shared-descr", "exhaustion",
           "dtype() of a memoized 7-level descriptor sharing one sub-list per level, repeated", dtype_shared),
    Attack("dtype-shared-descr-20x", "exhaustion", "the same, 20 calls", dtype_shared_20, fixed=True),
    Attack("ndarray-U-recheck", "exhaustion", "U-dtype ndarray over one memoized literal of half the size, repeated",
           ndarray_text_check),
    Attack("scalar-S-copies", "exhaustion", "scalar('|S<n>') of one memoized literal, repeated (copies <= 1 GiB)",
           scalar_copies),
    Attack("fraction-gcd", "exhaustion", "fraction() of two memoized 16,383-bit ints, repeated", fraction_memo),
    Attack("decimal-digits", "exhaustion", "decimal() of a memoized 4,300-digit str, repeated", decimal_memo),
    Attack("zoneinfo-all", "exhaustion", "zoneinfo() of every installed zone (first use)", zoneinfo_all, fixed=True),
    Attack("long4", "exhaustion", "one LONG4 int of the whole size", long4),
    Attack("long-str", "exhaustion", "one BINUNICODE str of the whole size", long_string),
    Attack("long-bytes", "exhaustion", "one BINBYTES of the whole size", long_bytes),
    Attack("tuple1-chain-full", "exhaustion", "a global, then NONE and TUPLE1 per byte (full verifier)",
           tuple1_chain_full),
    Attack("empty-tuples-full", "exhaustion", "a global, then EMPTY_TUPLE per byte in one TUPLE (full verifier)",
           empty_tuples_full),
    Attack("empty-lists-full", "exhaustion", "a global, then EMPTY_LIST per byte in one list (full verifier)",
           empty_lists_full),
    Attack("legit-tuples", "reference", "a plain list of (int, float, str) tuples", legit_tuples),
    Attack("legit-1M-tuples", "reference", "1,000,000 (int, float, str) tuples", legit_tuples, sizes=[10**7]),
    # G. integrity
    Attack("wrong-tag", "integrity", "a keyed message with a wrong tag", wrong_tag),
    # H / I. time and cancellation: what a stalled or abandoned message holds
    Attack("half-held", "time", "half a message, then the peer stalls (or the receive is cancelled)", held_half),
    # J. sender faults
    Attack("encode-fails", "sender", "dumps([array of the size, lambda]) raises EncodeError", encode_fails),
    # K. numpy round trips
    Attack("array-f8", "numpy", "a float64 array (one side chunk)", array_f8),
    Attack("array-U", "numpy", "a U11 array (code points checked)", array_text),
    Attack("array-object", "numpy", "an object array of small ints", array_object),
]

# -- the child: one decode in a fresh process ---------------------------------------------------


def child(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    cap = spec["cpu_cap"]
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(cap), math.ceil(cap) + 2))
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    import tracemalloc

    import numpy as np

    import streampickle

    streampickle.loads(streampickle.dumps({"warm": [1, 2.0, "up"]}))
    data = b""
    if spec["file"]:
        with open(spec["file"], "rb") as f:
            data = f.read()
    key = bytes.fromhex(spec["key"]) if spec["key"] else None
    array = np.ones(spec["encode_bytes"], dtype=np.uint8) if spec["encode_bytes"] else None
    entry = spec["entry"]
    gc.collect()
    if spec["trace"]:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    result: Any = None
    try:
        if entry == "loads":
            result = streampickle.loads(data, key=key)
        elif entry == "dumps":
            result = streampickle.dumps([array, lambda: None])
        else:
            result = _decode_in_pieces(data, key, spec["no_eof"])
        outcome = "waiting" if result is _WAITING else "accepted"
    except Exception as exc:  # noqa: BLE001 - any error is an outcome to report
        outcome = f"{type(exc).__name__}: {str(exc)[:160]}"
    cpu = time.process_time() - start
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    peak = tracemalloc.get_traced_memory()[1] - base if spec["trace"] else None
    print(json.dumps({"cpu": cpu, "rss": rss, "peak": peak, "outcome": outcome}))
    sys.stdout.flush()
    os._exit(0)  # freeing a big result is not part of the measurement


_WAITING = object()


def _decode_in_pieces(data: bytes, key: bytes | None, no_eof: bool) -> Any:
    import streampickle

    decoder = streampickle.Decoder(key=key)
    view = memoryview(data)
    out: list[Any] = []
    for i in range(0, len(view), PIECE):
        decoder.feed(view[i : i + PIECE])
        out.extend(decoder)
    if no_eof:
        return out[-1] if out else _WAITING
    decoder.feed_eof()
    out.extend(decoder)
    if not out:
        raise RuntimeError("the decoder returned nothing")
    return out[-1]


# -- the parent: build, run, judge --------------------------------------------------------------


def run_child(case: Case, path: str | None, entry: str, trace: bool, cap: float, tmp: str) -> dict[str, Any]:
    spec = {"file": path, "key": case.key, "entry": entry, "trace": trace, "no_eof": case.no_eof,
            "encode_bytes": case.encode_bytes, "cpu_cap": cap * (TRACE_SLOWDOWN if trace else 1)}
    spec_path = os.path.join(tmp, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_path],
                          capture_output=True, text=True, env=env, timeout=spec["cpu_cap"] * 3 + 60)
    if proc.returncode == 0 and proc.stdout.strip():
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if proc.returncode < 0:  # killed by RLIMIT_CPU (SIGXCPU, then SIGKILL)
        return {"cpu": spec["cpu_cap"], "rss": None, "peak": None, "capped": True,
                "outcome": f"over the {spec['cpu_cap']:g} s CPU cap (killed, signal {-proc.returncode})"}
    return {"cpu": None, "rss": None, "peak": None, "outcome": f"child failed: {proc.stderr.strip()[-300:]}"}


def measure(attack: Attack, sizes: list[int], cap: float, tmp: str) -> None:
    for size in ([0] if attack.fixed else attack.sizes or sizes):
        case = attack.build(size)
        path = None
        nbytes = case.encode_bytes or len(case.message)
        if case.message:
            path = os.path.join(tmp, "message.bin")
            with open(path, "wb") as f:
                f.write(case.message)
        for entry in case.entries:
            plain_run = run_child(case, path, entry, False, cap, tmp)
            traced = {"peak": None}
            if not plain_run.get("capped"):
                traced = run_child(case, path, entry, True, cap, tmp)
            row = judge(attack, size, nbytes, entry, plain_run, traced.get("peak"), case.note)
            attack.results.append(row)
            print(format_detail(row), flush=True)


def judge(attack: Attack, size: int, nbytes: int, entry: str, run: dict[str, Any], peak: int | None,
          note: str) -> dict[str, Any]:
    cpu, rss = run.get("cpu"), run.get("rss")
    cpu_bound = CPU_PER_BYTE * nbytes + CPU_BASE
    return {
        "attack": attack.name, "section": attack.section, "size": size, "bytes": nbytes,
        "entry": entry, "cpu_s": cpu, "capped": bool(run.get("capped")),
        "us_per_byte": None if cpu is None else cpu * 1e6 / nbytes,
        "tracemalloc_peak": peak, "rss_rise": rss,
        "trace_bytes_per_byte": None if peak is None else peak / nbytes,
        "rss_bytes_per_byte": None if rss is None else rss / nbytes,
        "cpu_ok": None if cpu is None else cpu <= cpu_bound,
        "mem_ok": None if peak is None else peak <= MEM_PER_BYTE * nbytes,
        "outcome": run["outcome"], "note": note,
    }


def _num(value: float | None, digits: int = 2, capped: bool = False) -> str:
    if value is None:
        return "n/a"
    if value < 1000:
        text = f"{value:,.{digits + 1 if 0 < value < 1 else digits}f}"
    else:
        text = f"{value:,.0f}"
    return f">= {text}" if capped else text


def _size(nbytes: int) -> str:
    return (
        f"{nbytes / 1e6:.2f} MB"
        if nbytes >= 10**6
        else f"{nbytes / 1e3:.1f} KB"
        if nbytes >= 1000
        else f"{nbytes} B"
    )


def format_detail(row: dict[str, Any]) -> str:
    return (f"  {row['attack']:<22} {_size(row['bytes']):>9} {row['entry']:<7} "
            f"cpu {_num(row['cpu_s'], 3, row['capped'])} s  {_num(row['us_per_byte'], 2, row['capped'])} us/B  "
            f"trace {_num(row['trace_bytes_per_byte'], 1)} B/B  rss {_num(row['rss_bytes_per_byte'], 1)} B/B  "
            f"{'' if row['cpu_ok'] in (True, None) else 'CPU-OVER '}"
            f"{'' if row['mem_ok'] in (True, None) else 'MEM-OVER '}"
            f"{row['outcome'][:90]}")


def _mark(values: list[bool | None]) -> str:
    if any(v is False for v in values):
        return "**no**"
    return "yes" if values and all(v is True for v in values) else "n/a"


def _worst(rows: list[dict[str, Any]], key: str) -> tuple[float | None, dict[str, Any] | None]:
    known = [r for r in rows if r[key] is not None]
    if not known:
        return None, None
    top = max(known, key=lambda r: r[key])
    return top[key], top


def summary(attacks: list[Attack]) -> list[str]:
    lines = ["| section | attack | sizes (message bytes) | outcome | worst CPU us/B | worst tracemalloc B/B "
             "| worst RSS B/B | CPU <= 2 us/B + 10 ms | memory <= 512 B/B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for attack in attacks:
        rows = attack.results
        if not rows:
            continue
        cpu, cpu_row = _worst(rows, "us_per_byte")
        trace, trace_row = _worst(rows, "trace_bytes_per_byte")
        rss, _ = _worst(rows, "rss_bytes_per_byte")
        outcomes = sorted({_short_outcome(r["outcome"]) for r in rows})
        sizes = ", ".join(dict.fromkeys(_size(r["bytes"]) for r in rows))
        cpu_text = _num(cpu, 2, bool(cpu_row and cpu_row["capped"]))
        if cpu_row is not None and cpu_row["us_per_byte"] is not None and len(rows) > 1:
            cpu_text += f" ({_size(cpu_row['bytes'])})"
        trace_text = _num(trace, 1) + (
            f" ({_size(trace_row['bytes'])})" if trace_row is not None and len(rows) > 1 else ""
        )
        lines.append(
            f"| {attack.section} | {attack.name}: {attack.what.replace('|', chr(92) + '|')} | {sizes} "
            f"| {'; '.join(outcomes)} | {cpu_text} | {trace_text} | {_num(rss, 1)} "
            f"| {_mark([r['cpu_ok'] for r in rows])} | {_mark([r['mem_ok'] for r in rows])} |"
        )
    return lines


def _short_outcome(outcome: str) -> str:
    """The outcome without what varies with the size (offsets, byte counts), cut short."""
    if outcome.startswith("over the"):
        return outcome.split(" (")[0]
    name, _, detail = outcome.partition(": ")
    detail = re.sub(r"\bbyte \d+", "byte N", detail)
    detail = re.sub(r"\d+ of \d+ bytes", "n of m bytes", detail)
    return name if not detail else f"{name} ({detail[:70].rstrip()}...)" if len(detail) > 70 else f"{name} ({detail})"


def sections(attacks: list[Attack]) -> list[str]:
    lines = ["| section | worst CPU us/B (attack) | worst tracemalloc B/B (attack) | rows over a bound |",
             "|---|---|---|---|"]
    order = list(dict.fromkeys(a.section for a in attacks))
    for section in order:
        rows = [r for a in attacks if a.section == section for r in a.results]
        if not rows:
            continue
        cpu, cpu_row = _worst(rows, "us_per_byte")
        trace, trace_row = _worst(rows, "trace_bytes_per_byte")
        over = sorted({r["attack"] for r in rows if r["cpu_ok"] is False or r["mem_ok"] is False})
        cpu_name = f" ({cpu_row['attack']})" if cpu_row else ""
        trace_name = f" ({trace_row['attack']})" if trace_row else ""
        lines.append(
            f"| {section} | {_num(cpu, 2, bool(cpu_row and cpu_row['capped']))}{cpu_name} "
            f"| {_num(trace, 1)}{trace_name} | {', '.join(over) or 'none'} |"
        )
    return lines


def machine() -> dict[str, Any]:
    import numpy as np

    import streampickle

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "numpy": np.__version__,
            "streampickle": streampickle.__version__, "commit": commit, "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 KB and 100 KB only, a 3 s CPU cap")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--only", help="comma-separated substrings of attack names to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, ROOT)
    sizes = QUICK_SIZES if args.quick else SIZES
    cap = QUICK_CPU_CAP if args.quick else CPU_CAP
    attacks = ATTACKS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        attacks = [a for a in ATTACKS if any(w in a.name for w in wanted)]
    if args.quick:  # the 1M-tuple reference takes as long as all the rest of --quick
        attacks = [a for a in attacks if a.sizes is None]
    info = machine()
    print(f"machine: {info['nproc']} x {info['cpu']}, Python {info['python']}, numpy {info['numpy']}, "
          f"streampickle {info['streampickle']} ({info['commit']})")
    print(f"sizes {', '.join(_size(n) for n in sizes)}; CPU cap {cap:g} s per child; bound: "
          f"{CPU_PER_BYTE * 1e6:g} us/B + {CPU_BASE * 1e3:g} ms CPU, {MEM_PER_BYTE} B/B memory\n")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amplification-") as tmp:
        for attack in attacks:
            print(f"{attack.section} / {attack.name}: {attack.what}", flush=True)
            measure(attack, sizes, cap, tmp)
    print(f"\n{time.monotonic() - started:.0f} s\n")
    print("\n".join(summary(attacks)))
    print()
    print("\n".join(sections(attacks)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "sizes": sizes, "cpu_cap": cap,
                       "bound": {"cpu_per_byte": CPU_PER_BYTE, "cpu_base": CPU_BASE, "mem_per_byte": MEM_PER_BYTE},
                       "rows": [r for a in attacks for r in a.results]}, f, indent=1)


if __name__ == "__main__":
    main()
