"""Shared helpers: deep equality that understands numpy, sample objects, ways to split input
(whole, byte by byte, random pieces, with trailing bytes), a relay for attacks that
record or swap a connection's bytes, and what /proc/self/smaps says of a mapping."""

from __future__ import annotations

import collections
import contextlib
import datetime
import decimal
import fractions
import random
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import numpy as np

import streampickle


def assert_same(a: Any, b: Any, path: str = "obj") -> None:
    """Deep equality: same types, numpy arrays equal in dtype, shape, values (NaN-aware) and
    writeability."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.flags.writeable == b.flags.writeable, f"{path}: writeable differs"
        if a.dtype.hasobject:
            for i, (x, y) in enumerate(zip(a.ravel(), b.ravel(), strict=True)):
                assert_same(x, y, f"{path}[{i}]")
        else:
            assert a.tobytes() == b.tobytes(), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, (float, complex)) and a != a:
        assert repr(a) == repr(b), f"{path}: {a!r} != {b!r}"  # NaN-aware
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def sample_objects() -> dict[str, Any]:
    """Objects that the safe default must round-trip: plain data and numpy."""
    ro = np.arange(6, dtype=np.float64)
    ro.flags.writeable = False
    return {
        "none": None,
        "small-dict": {"id": 1, "name": "x", "vals": [1.0, 2.0, 3.0]},
        "scalars": [True, False, 0, -1, 2**70, 1.5, float("nan"), 1 + 2j, "héllo", b"\x00\xff", bytearray(b"ba")],
        "containers": ({1, 2}, frozenset({3}), (), [[]], {"k": (1, [2])}),
        "values": [
            datetime.datetime(2026, 11, 27, 15, 0, tzinfo=datetime.UTC),
            datetime.date(2000, 1, 1),
            datetime.timedelta(seconds=3),
            decimal.Decimal("1.25"),
            fractions.Fraction(2, 3),
            uuid.UUID(int=12345),
            collections.OrderedDict(a=1),
            collections.deque([1, 2], maxlen=5),
            collections.Counter("hello"),
            range(3, 9, 2),
            slice(1, None, 2),
            Ellipsis,
        ],
        "array": np.arange(1000, dtype=np.float64),
        "arrays-2d-f": np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)),
        "readonly": ro,
        "strided": np.arange(20, dtype=np.int16)[::3],
        "empty-and-0d": [np.zeros((0, 3)), np.array(5.0), np.float32(7), np.int8(-3)],
        "dtypes": [np.dtype("<M8[ns]"), np.dtype(">c16"), np.dtype([("a", "<i4"), ("b", "<f8", (2,))])],
        "structured": np.zeros(4, dtype=[("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")]),
        "object-array": np.array([1, "two", None, [3]], dtype=object),
        "bool-complex-dt": [np.array([True, False]), np.arange(3) * (1 + 1j), np.arange(3).astype("m8[s]")],
    }


def split_whole(data: bytes, rng: random.Random) -> Iterator[bytes]:
    yield data


def split_bytes(data: bytes, rng: random.Random) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def split_random(data: bytes, rng: random.Random) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 7, 19, 20, 21, 64, 1000, 70000])
        yield data[i : i + n]
        i += n


SPLITTERS: dict[str, Callable[[bytes, random.Random], Iterator[bytes]]] = {
    "whole": split_whole,
    "bytes": split_bytes,
    "random": split_random,
}


def decode_all(data: bytes, splitter: Callable[..., Iterator[bytes]], seed: int = 0, **options: Any) -> list[Any]:
    decoder = streampickle.Decoder(**options)
    out = []
    for piece in splitter(data, random.Random(seed)):
        decoder.feed(piece)
        out.extend(decoder)
    decoder.feed_eof()
    return out


def make_message(
    pickle_bytes: bytes,
    chunks: list[bytes] = (),  # type: ignore[assignment]
    key: bytes | None = None,
    *,
    sender: bytes = bytes(8),
    sequence: int = 0,
) -> bytes:
    """Frame an arbitrary (possibly hostile) pickle as a wire-format message, independently of
    the encoder: this is the spec of docs/wire-format.md written out by hand. Without a key,
    version 1; with one (HMAC-SHA256), version 2 from ``sender`` (all zeros: a message that
    stands alone) with sequence number ``sequence``."""
    import hashlib
    import hmac
    import struct

    table = b"".join(struct.pack("<Q", len(c)) for c in chunks)
    if not key:
        head = struct.pack("<4sBBHIQ", b"\x93SPK", 1, 0, 0, len(chunks), len(pickle_bytes))
        return head + table + pickle_bytes + b"".join(chunks)
    head = struct.pack("<4sBBHIQ", b"\x93SPK", 2, 1, 0, len(chunks), len(pickle_bytes))
    head += sender + struct.pack("<Q", sequence) + table
    body = head + hmac.new(key, head, hashlib.sha256).digest() + pickle_bytes + b"".join(chunks)
    return body + hmac.new(key, body, hashlib.sha256).digest()


async def what_woke(blocked: Callable[[], Awaitable[Any]], close: Callable[[], Awaitable[Any]]) -> list[BaseException]:
    """Run ``blocked()`` until every task waits, then ``close()``; return what ``blocked``
    raised (an empty list if it returned). The guard fails a close that wakes nothing."""
    import anyio

    woke: list[BaseException] = []

    async def run() -> None:
        try:
            await blocked()
        except BaseException as exc:  # noqa: BLE001 - we record what woke it
            woke.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            await close()
    return woke


async def relay(source: Any, sink: Any, tape: bytearray | None = None) -> None:
    """Copy ``source``'s bytes to ``sink`` (both anyio byte streams) until either end goes,
    appending them to ``tape`` if given, then end ``sink``'s sending side: a man in the
    middle who records, or who wires two connections to each other."""
    with contextlib.suppress(OSError, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        async for data in source:
            if tape is not None:
                tape += data
            await sink.send(data)
        await sink.send_eof()


def smaps_of(address: int) -> dict[str, str]:
    """The fields of the mapping (``/proc/self/smaps``) whose range holds ``address``: for
    example ``Rss`` and ``ShmemPmdMapped`` ("2048 kB"), ``VmFlags``."""
    fields: dict[str, str] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                if fields is not None:
                    return fields
                start, end = (int(x, 16) for x in first.split("-"))
                if start <= address < end:
                    fields = {}
            elif fields is not None:
                fields[first.rstrip(":")] = line.split(":", 1)[1].strip()
    if fields is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return fields


def smaps_kib(address: int, field: str) -> int:
    """One size field (``Rss``, ``ShmemPmdMapped``, ...) of the mapping holding ``address``, in
    KiB; 0 where this kernel has no such field."""
    value = smaps_of(address).get(field)
    return 0 if value is None else int(value.split()[0])
