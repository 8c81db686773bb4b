"""The decoder's framing: EOF at every prefix, limits at their boundaries, sticky failures,
early refusal of garbage, and memory that follows arrived bytes rather than claims."""

from __future__ import annotations

import decimal
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

import streampickle
from _util import assert_same
from streampickle import (
    Decoder,
    IncompleteMessageError,
    LimitExceededError,
    Limits,
    MalformedPickleError,
    ProtocolError,
)
from streampickle._accel import speedups


def header(*, magic=b"\x93SPK", version=1, flags=0, reserved=0, chunks=0, plen=3) -> bytes:
    return struct.pack("<4sBBHIQ", magic, version, flags, reserved, chunks, plen)


SMALL = streampickle.dumps({"a": np.arange(3, dtype=np.int16), "b": "x"})


def test_feed_eof_after_every_prefix_of_a_message() -> None:
    for k in range(len(SMALL) + 1):
        decoder = Decoder()
        decoder.feed(SMALL[:k])
        if k in (0, len(SMALL)):
            decoder.feed_eof()  # clean: nothing, or one whole message
            assert len(list(decoder)) == (k == len(SMALL))
            continue
        assert list(decoder) == [], k  # a prefix never yields an object
        with pytest.raises(IncompleteMessageError) as info:
            decoder.feed_eof()
        assert info.value.received == k
        # expected grows as the parts that declare sizes arrive: header, then the length table
        chunk_bytes = 6  # one int16 array of 3 items
        want = 20 if k < 20 else len(SMALL) - chunk_bytes if k < 28 else len(SMALL)
        assert info.value.expected == want, k


def test_incomplete_reports_whole_message_expectation_after_table() -> None:
    decoder = Decoder()
    decoder.feed(SMALL[:40])
    with pytest.raises(IncompleteMessageError) as info:
        decoder.feed_eof()
    assert (info.value.received, info.value.expected) == (40, len(SMALL))


@pytest.mark.parametrize(
    "garbage",
    [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"\x80\x05N.", b"\x93SPX"],
)
def test_garbage_is_refused_on_its_first_wrong_byte(garbage: bytes) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="not a streampickle stream"):
        decoder.feed(garbage)


@pytest.mark.parametrize(
    "bad",
    [header(version=2), header(version=0), header(flags=0x02), header(flags=0x80), header(reserved=1), header(plen=0)],
)
def test_bad_header_fields_are_protocol_errors(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        Decoder().feed(bad)


def test_failure_is_sticky_and_earlier_messages_are_still_delivered() -> None:
    decoder = Decoder()
    decoder.feed(SMALL)
    with pytest.raises(ProtocolError):
        decoder.feed(b"JUNK")
    out = next(decoder)  # the message before the failure is not lost
    assert out["b"] == "x"
    for call in (lambda: decoder.feed(SMALL), decoder.get_buffer, decoder.feed_eof, lambda: next(decoder)):
        with pytest.raises(ProtocolError, match="failed earlier"):
            call()


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("max_pickle_size", lambda n: header(plen=n)),
        ("max_side_chunks", lambda n: header(chunks=n)),
    ],
)
def test_header_limits_boundary(field: str, make) -> None:
    limit = 1000
    limits = Limits(**{field: limit})
    Decoder(limits=limits).feed(make(limit))  # exactly at the limit: accepted
    with pytest.raises(LimitExceededError, match=field):
        Decoder(limits=limits).feed(make(limit + 1))


def test_message_size_limit_boundary_counts_every_part() -> None:
    arr = np.arange(100, dtype=np.uint8)
    data = streampickle.dumps(arr)
    ok = Limits(max_message_size=len(data))
    assert (streampickle.loads(data, limits=ok) == arr).all()
    with pytest.raises(LimitExceededError, match="max_message_size"):
        streampickle.loads(data, limits=Limits(max_message_size=len(data) - 1))


def test_huge_claims_are_refused_from_the_header_alone() -> None:
    for bad in (header(plen=2**63), header(plen=2**64 - 1), header(chunks=2**32 - 1)):
        tracemalloc.start()
        decoder = Decoder()
        with pytest.raises(LimitExceededError):
            decoder.feed(bad)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 * 1024


def test_chunk_lengths_summing_past_64_bits_are_refused() -> None:
    table = struct.pack("<2Q", 2**63, 2**63)
    with pytest.raises(LimitExceededError, match="max_message_size"):
        Decoder().feed(header(chunks=2, plen=3) + table)


def test_every_chunk_small_but_total_over_limit_refused_at_the_table() -> None:
    limits = Limits(max_message_size=10_000)
    table = struct.pack("<3Q", 4000, 4000, 4000)
    with pytest.raises(LimitExceededError):
        Decoder(limits=limits).feed(header(chunks=3, plen=3) + table)


def test_a_large_claim_commits_memory_only_as_bytes_arrive() -> None:
    """2**31-1 pickle bytes declared, 3 sent: memory held stays tiny; EOF reports the counts."""
    decoder = Decoder()
    tracemalloc.start()
    decoder.feed(header(plen=2**31 - 1) + b"\x80\x05N")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(IncompleteMessageError) as info:
        decoder.feed_eof()
    assert info.value.received == 23 and info.value.expected == 20 + 2**31 - 1


def test_side_chunk_destination_is_allocated_when_its_bytes_come() -> None:
    decoder = Decoder()
    big = 2**34  # 16 GiB claimed
    decoder.feed(header(chunks=1, plen=3) + struct.pack("<Q", big) + b"\x80\x05N")
    assert decoder.in_message
    view = decoder.get_buffer()  # now it exists: virtual, uninitialised, not committed
    assert len(view) == big
    view[:4] = b"abcd"
    decoder.buffer_updated(4)
    assert decoder.progress == (20 + 8 + 3 + 4, 20 + 8 + 3 + big)


def test_malformed_pickle_drops_only_that_message() -> None:
    bad_pickle = b"\x80\x05N.garbage"
    bad = header(plen=len(bad_pickle)) + bad_pickle
    decoder = Decoder()
    decoder.feed(bad + SMALL)
    with pytest.raises(MalformedPickleError):
        next(decoder)
    assert next(decoder)["b"] == "x"  # the stream is still usable


def test_zero_length_chunk_is_not_eof_and_empty_feed_is_not_eof() -> None:
    data = streampickle.dumps([np.zeros(0), np.zeros(0, dtype=np.int8), b""])
    decoder = Decoder()
    decoder.feed(b"")
    decoder.feed(data)
    decoder.feed(b"")
    out = next(decoder)
    assert out[0].shape == (0,) and out[1].dtype == np.int8 and out[2] == b""


def test_decoded_arrays_are_aligned_and_own_fresh_memory() -> None:
    dtypes = ["u1", "i2", "<i4", ">i8", "f2", "f4", "f8", "c8", "c16", "?", "M8[ms]", "m8[us]", "S5", "U3", "V7"]
    arrays = [np.zeros(17, dtype=dt) for dt in dtypes]
    data = bytearray(streampickle.dumps(arrays))
    out = streampickle.loads(data)
    for a, b in zip(arrays, out, strict=True):
        assert b.dtype == a.dtype and b.flags.aligned and b.flags.writeable
        assert b.ctypes.data % 64 == 0
    data[:] = b"\xff" * len(data)  # the input buffer is reused: decoded arrays don't change
    assert all(not b.any() for b in out if b.dtype.kind not in "SUV")


def test_large_arrays_start_on_a_huge_page_boundary() -> None:
    """Receive buffers of 2 MiB or more are 2 MiB aligned, so the kernel can back all of them
    with transparent huge pages (faulting in 4 MiB arrays took 3x as long without)."""
    arrays = [np.arange(n, dtype=np.uint8) for n in (2 << 20, (4 << 20) + 8, (2 << 20) - 1)]
    out = streampickle.loads(streampickle.dumps(arrays))
    assert [a.ctypes.data % (2 << 20) for a in out[:2]] == [0, 0]
    assert out[2].ctypes.data % 64 == 0
    assert all(np.array_equal(a, b) for a, b in zip(arrays, out, strict=True))


def test_usage_errors() -> None:
    decoder = Decoder()
    with pytest.raises(streampickle.UsageError):
        decoder.buffer_updated(10**9)
    decoder.feed_eof()
    with pytest.raises(streampickle.UsageError):
        decoder.feed(b"x")
    with pytest.raises(streampickle.UsageError):
        Decoder(limits={"max_message_size": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Limits(max_message_size=-1)


def test_loads_wants_exactly_one_message() -> None:
    with pytest.raises(ProtocolError, match="follow the message"):
        streampickle.loads(SMALL + SMALL)
    with pytest.raises(IncompleteMessageError):
        streampickle.loads(SMALL[:-1])
    with pytest.raises(IncompleteMessageError):
        streampickle.loads(b"")


def test_a_large_pickle_part_is_unpickled_from_the_buffer_it_arrived_in(monkeypatch) -> None:
    """A pickle part of 1 MiB or more is handed to the unpickler as a view of its receive
    buffer, not copied into bytes first; a small one is copied (bytes unpickle fastest)."""
    from streampickle import _safe

    seen = []
    real_loads = pickle.loads
    monkeypatch.setattr(_safe, "_load_inband_c", None)  # it calls _pickle.loads, unseen here
    monkeypatch.setattr(_safe.pickle, "loads", lambda data, **k: (seen.append(type(data)), real_loads(data, **k))[1])
    big = [str(i) for i in range(200_000)]
    decoder = Decoder()
    for message in (streampickle.dumps(big), streampickle.dumps(["small"])):
        for i in range(0, len(message), 100_000):  # in pieces: the incremental path
            decoder.feed(message[i : i + 100_000])
    assert list(decoder) == [big, ["small"]]
    assert seen == [memoryview, bytes]


def _decode_all(data: bytes, splits: list[int], limits: Limits | None) -> list[tuple[str, object]]:
    """What a decoder hands out for ``data`` fed in pieces ending at ``splits``: each object,
    or the type and text of each error, in order, until the decoder fails."""
    decoder = Decoder(limits=limits)
    out: list[tuple[str, object]] = []

    def drain() -> bool:
        while True:
            try:
                obj = next(decoder)
            except StopIteration:
                return True
            except streampickle.StreamPickleError as exc:
                out.append((type(exc).__name__, str(exc)))
                if decoder.failed:
                    return False
            else:
                out.append(("object", obj))

    start = 0
    for stop in [*splits, len(data)]:
        try:
            decoder.feed(data[start:stop])
        except streampickle.StreamPickleError as exc:
            out.append((type(exc).__name__, str(exc)))
            drain()
            return out
        if not drain():
            return out
        start = stop
    return out


@pytest.mark.skipif(
    speedups is None, reason="the C extension is not in use (not built, or STREAMPICKLE_PURE_PYTHON=1): no C twin"
)
@pytest.mark.parametrize("seed", range(40))
def test_the_c_paths_for_plain_messages_decode_as_the_python_ones(seed: int, monkeypatch) -> None:
    """A run of plain messages (no key, no side chunks) is split off in C (take_plain) and
    unpickled in C (load_inband); the Python loop they stand in for must give the same objects
    and the same errors at the same places, whatever the split, mix of messages, limits, or
    corruption. (The C functions may stop early and leave a message to Python, but never
    split one differently or accept one that Python refuses.)"""
    import random

    from streampickle import _decoder, _safe

    assert _decoder._take_plain is not None and _safe._load_inband_c is not None
    rng = random.Random(seed)
    pieces = [
        streampickle.dumps({"id": 1, "vals": [1.0, 2.0]}),
        streampickle.dumps("x" * rng.randrange(1, 300)),
        streampickle.dumps(np.arange(rng.randrange(0, 5))),  # side chunks: the Python loop
        streampickle.dumps(decimal.Decimal("1.5")),  # names a global
        streampickle.dumps(None),
        header(plen=0),  # refused: empty pickle part
        header(flags=1, plen=3) + b"\x80\x05N." + b"t" * 32,  # a tag nobody asked for
        header(plen=4) + b"\x80\x05N.",  # the pickle is short by one byte (eats the next)
        header(plen=3) + b"\x80\x05N",  # no STOP: malformed
        header(plen=3) + b"\x80\x05\x8c",  # the scan refuses it
        header(plen=17) + b"\x80\x05cbuiltins\nlen\n.",  # GLOBAL: refused in safe mode
    ]
    good, bad = pieces[:5], pieces[5:]
    stream = b"".join(rng.choice(good) for _ in range(rng.randrange(1, 30)))
    if seed % 2:  # every bad piece in some seeds
        stream += bad[seed // 2 % len(bad)]
        stream += b"".join(rng.choice(good) for _ in range(rng.randrange(0, 5)))
    if rng.random() < 0.3:  # a random byte changed
        i = rng.randrange(len(stream))
        stream = stream[:i] + bytes([rng.randrange(256)]) + stream[i + 1 :]
    if rng.random() < 0.3:
        stream = stream[: rng.randrange(len(stream))]  # cut anywhere
    splits = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 6))))
    limits = rng.choice([None, Limits(max_pickle_size=40), Limits(max_message_size=60)])

    with_c = _decode_all(stream, splits, limits)
    monkeypatch.setattr(_decoder, "_take_plain", None)
    monkeypatch.setattr(_safe, "_load_inband_c", None)
    in_python = _decode_all(stream, splits, limits)
    assert len(with_c) == len(in_python)
    for (kind_c, value_c), (kind_py, value_py) in zip(with_c, in_python, strict=True):
        assert kind_c == kind_py
        if kind_c == "object":
            assert_same(value_py, value_c)
        else:
            assert value_c == value_py


@pytest.mark.parametrize("key", [None, b"table key"], ids=["plain", "keyed"])
def test_a_length_table_takes_memory_as_it_arrives_not_as_claimed(key: bytes | None) -> None:
    # A header claims its side chunks' count in 20 bytes (36 keyed, whose tag comes after
    # the table): the table's memory came at once, 512 KiB for 65,536 chunks, and 2,000
    # stalled connections held a GiB. It grows with what arrives, and the table still reads.
    arrays = [np.full(1, i % 251, dtype=np.uint8) for i in range(20_000)]
    message = b"".join(bytes(memoryview(c).cast("B")) for c in streampickle.Encoder(key=key).encode(arrays))
    decoder = streampickle.Decoder(key=key)
    tracemalloc.start()
    try:
        decoder.feed(message[:100])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024  # the table alone is 160,000 bytes
    for i in range(100, len(message), 4093):
        decoder.feed(message[i : i + 4093])
    (got,) = list(decoder)
    assert [int(a[0]) for a in got] == [i % 251 for i in range(20_000)]
