"""Bad input a decoder on a socket meets, each with the one outcome that is safe.

Three outcomes, and every test here says which one it expects:

* *poisoned*: framing can't be trusted any more (a bad header, a size over a limit, an end
  inside a message). The error is raised, and every later call raises it again ("failed
  earlier"); the bytes after the bad ones are never read as a message (no resynchronising);
* *dropped alone*: the message arrived whole but its pickle is malformed. Only that message
  raises (:class:`MalformedPickleError`); the next one decodes normally;
* *delivered*: odd but valid input (empty chunks, strided, Fortran, read-only arrays) comes
  back bit-exact.

Sizes a peer declares must cost nothing until the bytes behind them arrive, so the tests that
send large claims measure the memory the decoder takes with ``tracemalloc`` (numpy reports its
allocations to it), and the framing tests feed input byte by byte as well as whole, to pin the
byte at which an error is raised: a header is judged when its last byte arrives, not later.
"""

from __future__ import annotations

import contextlib
import gc
import io
import pickle
import socket
import struct
import tracemalloc
from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import SocketAttribute

import streampickle
from _pairs import _anyio_accept, _tls_contexts
from _util import assert_same, make_message
from streampickle import (
    Decoder,
    IncompleteMessageError,
    LimitExceededError,
    Limits,
    MalformedPickleError,
    ObjectStream,
    ProtocolError,
    StreamPickleError,
    _wire,
)

KiB = 1 << 10
MiB = 1 << 20
P5 = b"\x80\x05"
HEADER_SIZE = 20


# -- building messages ------------------------------------------------------------------------


def header(*, magic: bytes = b"\x93SPK", version: int = 1, flags: int = 0, reserved: int = 0,
           chunks: int = 0, plen: int = 3) -> bytes:
    """A fixed header written from the spec's table, independently of the library."""
    return struct.pack("<4sBBHIQ", magic, version, flags, reserved, chunks, plen)


def split(message: bytes) -> tuple[bytes, list[bytes]]:
    """The pickle part and the side chunks of an unkeyed message."""
    count = int.from_bytes(message[8:12], "little")
    plen = int.from_bytes(message[12:20], "little")
    lengths = struct.unpack(f"<{count}Q", message[20 : 20 + 8 * count])
    start = 20 + 8 * count
    pos = start + plen
    chunks = []
    for n in lengths:
        chunks.append(message[pos : pos + n])
        pos += n
    assert pos == len(message)
    return message[start : start + plen], chunks


def s(text: str) -> bytes:  # SHORT_BINUNICODE
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def glob(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return s(module) + s(name) + b"\x93"


AFTER_OBJ = {"after": np.arange(4, dtype=np.int32)}
AFTER = streampickle.dumps(AFTER_OBJ)  # a valid message that follows the bad one


# -- feeding and judging ----------------------------------------------------------------------


def feed_bytewise(decoder: Decoder, data: bytes) -> tuple[int, StreamPickleError] | None:
    """Feed ``data`` one byte at a time; the index of the byte whose feed raised, and the error."""
    for i in range(len(data)):
        try:
            decoder.feed(data[i : i + 1])
        except StreamPickleError as exc:
            return i, exc
    return None


def assert_poisoned(decoder: Decoder, error: type[StreamPickleError]) -> None:
    """Every later call raises ``error`` again, and the valid message that follows (fed now,
    or already fed after the bad bytes) is never delivered: no resynchronising."""
    assert decoder.failed
    assert decoder.pending == 0
    for call in (lambda: decoder.feed(AFTER), lambda: next(decoder), decoder.feed_eof, decoder.get_buffer):
        with pytest.raises(error, match="failed earlier") as info:
            call()
        assert type(info.value) is error


def assert_dropped_alone(message: bytes, error: type[StreamPickleError] = MalformedPickleError,
                         **options: Any) -> StreamPickleError:
    """``message`` raises ``error`` (exactly that class) at its place in the stream, the
    decoder is not failed, and the message after it decodes normally. Checked with the
    message fed whole (the fast path) and byte by byte (the incremental path)."""
    caught = None
    for whole in (True, False) if len(message) < 64 * KiB else (True,):
        decoder = Decoder(**options)
        stream = message + AFTER
        if whole:
            decoder.feed(stream)
        else:
            assert feed_bytewise(decoder, stream) is None  # no framing error, at any byte
        with pytest.raises(error) as info:
            next(decoder)
        assert type(info.value) is error, info.value
        assert not info.value.poisons_stream and not decoder.failed
        assert_same(AFTER_OBJ, next(decoder))
        decoder.feed_eof()  # the stream ends cleanly after it
        caught = info.value
    assert caught is not None
    return caught


@contextlib.contextmanager
def traced() -> Iterator[list[int]]:
    """Measure the peak of traced memory inside the block: ``[peak]`` when it ends."""
    gc.collect()
    result: list[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield result
        result.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


# =============================================================================================
# Framing and declared lengths
# =============================================================================================


@pytest.mark.parametrize("plen", [2**63, 2**64 - 1, 2**64 - 2], ids=["2**63", "2**64-1", "minus-2-as-u64"])
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "bytewise"])
def test_a_pickle_length_beyond_any_limit_is_refused_from_the_header_alone(plen: int, whole: bool) -> None:
    bad = header(plen=plen) + b"\x80\x05N."
    decoder = Decoder()
    with traced() as peak:
        if whole:
            with pytest.raises(LimitExceededError) as info:
                decoder.feed(bad)
            exc: StreamPickleError = info.value
        else:
            at, exc = feed_bytewise(decoder, bad)  # type: ignore[misc]
            assert at == HEADER_SIZE - 1  # on the header's last byte, before any pickle byte
    assert type(exc) is LimitExceededError and "max_pickle_size" in str(exc)
    assert peak[0] < 64 * KiB
    assert_poisoned(decoder, LimitExceededError)


# One real message with side chunks, and each limit's value for it.
LIMITED = streampickle.dumps({"a": np.arange(5, dtype=np.int32), "b": np.ones((2, 3)), "s": "x" * 50})
LIMITED_CHUNKS = int.from_bytes(LIMITED[8:12], "little")
LIMITED_PICKLE = int.from_bytes(LIMITED[12:20], "little")
INBAND = streampickle.dumps({"s": "y" * 100, "n": [1, 2, 3]})


@pytest.mark.parametrize(
    ("field", "message", "value", "refused_at"),
    [
        ("max_pickle_size", LIMITED, LIMITED_PICKLE, HEADER_SIZE - 1),
        ("max_side_chunks", LIMITED, LIMITED_CHUNKS, HEADER_SIZE - 1),
        # with side chunks the total is known when the length table is complete ...
        ("max_message_size", LIMITED, len(LIMITED), HEADER_SIZE + 8 * LIMITED_CHUNKS - 1),
        # ... without, from the header
        ("max_message_size", INBAND, len(INBAND), HEADER_SIZE - 1),
        ("max_pickle_size", INBAND, len(INBAND) - HEADER_SIZE, HEADER_SIZE - 1),
    ],
    ids=["pickle", "chunks", "message", "message-inband", "pickle-inband"],
)
def test_each_limit_accepts_exactly_its_value_and_refuses_one_more_before_the_body(
    field: str, message: bytes, value: int, refused_at: int
) -> None:
    assert LIMITED_CHUNKS >= 2  # the fixture has several side chunks
    for whole in (True, False):
        at_limit = Decoder(limits=Limits(**{field: value}))
        if whole:
            at_limit.feed(message)
        else:
            assert feed_bytewise(at_limit, message) is None
        (out,) = list(at_limit)
        assert_same(streampickle.loads(message), out)

    over = Decoder(limits=Limits(**{field: value - 1}))
    at, exc = feed_bytewise(over, message)  # type: ignore[misc]
    assert type(exc) is LimitExceededError and f"Limits.{field}={value - 1}" in str(exc)
    assert at == refused_at
    assert_poisoned(over, LimitExceededError)
    with pytest.raises(LimitExceededError):
        Decoder(limits=Limits(**{field: value - 1})).feed(message)  # the whole-message path


def test_a_2_31_byte_claim_with_3_bytes_sent_commits_memory_for_the_3_bytes() -> None:
    decoder = Decoder()
    with traced() as peak:
        decoder.feed(header(plen=2**31 - 1))
        decoder.feed(b"\x80\x05N")  # and then the peer waits
        assert len(decoder.get_buffer()) <= 64 * KiB  # where the next bytes go: not 2 GiB
    assert peak[0] < 1 * MiB
    assert decoder.in_message and decoder.progress == (HEADER_SIZE + 3, HEADER_SIZE + 2**31 - 1)
    with pytest.raises(IncompleteMessageError) as info:
        decoder.feed_eof()
    # the counts cover the whole message so far: the 20-byte header and the 3 pickle bytes
    assert (info.value.received, info.value.expected) == (HEADER_SIZE + 3, HEADER_SIZE + 2**31 - 1)
    assert_poisoned(decoder, IncompleteMessageError)


def test_the_pickle_buffer_grows_with_the_bytes_that_arrive_not_with_the_claim() -> None:
    decoder = Decoder()
    decoder.feed(header(plen=2**31 - 1) + P5)
    arrived = 2
    for step in range(1, 6):
        with traced() as peak:
            piece = 1000 * 4**step  # up to 1 MB
            decoder.feed(b"N" * piece)
            arrived += piece
            held = decoder.get_buffer().obj.nbytes  # the pickle part's buffer, all of it
        assert held <= max(64 * KiB, 2 * arrived) + 64 * KiB, (arrived, held)
        assert peak[0] <= 3 * held + 64 * KiB  # one buffer, plus its copy while growing
    assert decoder.progress[0] == HEADER_SIZE + arrived


@pytest.mark.parametrize(
    ("bad", "refused_at"),
    [
        (header(plen=0)[:12] + struct.pack("<q", -2), HEADER_SIZE - 1),  # pickle length
        (header()[:8] + struct.pack("<i", -2) + header()[12:], HEADER_SIZE - 1),  # chunk count
        (header(chunks=1) + struct.pack("<q", -1), HEADER_SIZE + 7),  # a side chunk's length
        (header(chunks=2) + struct.pack("<qq", 10, -2), HEADER_SIZE + 15),
    ],
    ids=["pickle-length", "chunk-count", "chunk-length", "second-chunk-length"],
)
def test_a_negative_length_is_an_unsigned_claim_over_the_limits(bad: bytes, refused_at: int) -> None:
    """The wire format has no signed field and no escape values: the bytes of -2 read as an
    unsigned length are a claim of about 2**64 (or 2**32 chunks), refused like any other."""
    decoder = Decoder()
    at, exc = feed_bytewise(decoder, bad + b"\x80\x05N.")  # type: ignore[misc]
    assert type(exc) is LimitExceededError and at == refused_at
    assert_poisoned(decoder, LimitExceededError)


def test_a_negative_length_inside_the_pickle_drops_the_message() -> None:
    assert_dropped_alone(make_message(P5 + b"\x8b" + struct.pack("<i", -2) + b"."))  # LONG4


@pytest.mark.parametrize("limits", [Limits(max_side_chunks=1024), None], ids=["1024", "default"])
def test_a_side_chunk_count_of_2_32_minus_1_is_refused_before_the_length_table(limits: Limits | None) -> None:
    bad = header(chunks=2**32 - 1, plen=3) + b"\x00" * 64  # the start of a 32 GiB table
    decoder = Decoder(limits=limits)
    with traced() as peak:
        at, exc = feed_bytewise(decoder, bad)  # type: ignore[misc]
    assert type(exc) is LimitExceededError and "max_side_chunks" in str(exc)
    assert at == HEADER_SIZE - 1  # not one table byte was taken
    assert peak[0] < 64 * KiB
    assert_poisoned(decoder, LimitExceededError)


@pytest.mark.parametrize("lengths", [(2**63, 2**63), (2**64 - 1, 2**64 - 1), (2**64 - 1, 1, 2**64 - 1)])
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "bytewise"])
def test_side_chunk_lengths_that_wrap_64_bits_are_summed_without_wrapping(
    lengths: tuple[int, ...], whole: bool
) -> None:
    """Under the largest possible message limit, only exact arithmetic refuses these: summed
    modulo 2**64 the lengths come to a few bytes."""
    table = struct.pack(f"<{len(lengths)}Q", *lengths)
    assert (sum(lengths) + HEADER_SIZE + len(table) + 3) % 2**64 < 2**64 - 1
    bad = header(chunks=len(lengths), plen=3) + table + b"\x80\x05N"
    decoder = Decoder(limits=Limits(max_message_size=2**64 - 1))
    if whole:
        with pytest.raises(LimitExceededError, match="max_message_size") as info:
            decoder.feed(bad)
        assert type(info.value) is LimitExceededError
    else:
        at, exc = feed_bytewise(decoder, bad)  # type: ignore[misc]
        assert type(exc) is LimitExceededError and at == HEADER_SIZE + len(table) - 1
    assert_poisoned(decoder, LimitExceededError)


def test_chunks_each_small_but_over_the_message_limit_together_are_refused_at_the_length_table() -> None:
    message = streampickle.dumps([np.zeros(4000, dtype=np.uint8) for _ in range(3)])
    limits = Limits(max_message_size=10_000)  # each chunk fits, the three don't
    decoder = Decoder(limits=limits)
    with traced() as peak:
        at, exc = feed_bytewise(decoder, message)  # type: ignore[misc]
    assert type(exc) is LimitExceededError and "max_message_size" in str(exc)
    assert at == HEADER_SIZE + 3 * 8 - 1  # the table's last byte: not one pickle byte taken
    assert peak[0] < 64 * KiB
    assert_poisoned(decoder, LimitExceededError)


VALID_HEADER = header(chunks=1, plen=40)


def _with_byte(data: bytes, pos: int, value: int) -> bytes:
    return data[:pos] + bytes([value]) + data[pos + 1 :]


@pytest.mark.parametrize(
    ("bad", "refused_at"),
    [
        *[(_with_byte(VALID_HEADER, i, 0x00), i) for i in range(4)],  # magic, at its wrong byte
        (_with_byte(VALID_HEADER, 4, 0), HEADER_SIZE - 1),  # version 0
        (_with_byte(VALID_HEADER, 4, 2), HEADER_SIZE - 1),  # a future version
        (_with_byte(VALID_HEADER, 4, 255), HEADER_SIZE - 1),
        *[(_with_byte(VALID_HEADER, 5, bit), HEADER_SIZE - 1) for bit in (0x08, 0x10, 0x20, 0x40, 0x80)],
        (_with_byte(VALID_HEADER, 5, 0x02), HEADER_SIZE - 1),  # a MAC named, but no tag
        (_with_byte(VALID_HEADER, 5, 0x04), HEADER_SIZE - 1),
        (_with_byte(VALID_HEADER, 5, 0x07), HEADER_SIZE - 1),  # two MACs
        (_with_byte(VALID_HEADER, 6, 1), HEADER_SIZE - 1),  # the reserved field
        (_with_byte(VALID_HEADER, 7, 0x80), HEADER_SIZE - 1),
    ],
    ids=[f"magic{i}" for i in range(4)]
    + ["version0", "version2", "version255"]
    + [f"flag{bit:#04x}" for bit in (0x08, 0x10, 0x20, 0x40, 0x80)]
    + ["blake3-without-tag", "poly1305-without-tag", "two-macs", "reserved-low", "reserved-high"],
)
def test_a_bad_header_field_is_a_protocol_error_that_ends_the_stream(bad: bytes, refused_at: int) -> None:
    stream = bad + b"\x00" * 8 + b"x" * 40 + AFTER  # the rest of the claimed message, then a good one
    decoder = Decoder()
    at, exc = feed_bytewise(decoder, stream)  # type: ignore[misc]
    assert type(exc) is ProtocolError and at == refused_at
    assert_poisoned(decoder, ProtocolError)
    whole = Decoder()
    with pytest.raises(ProtocolError) as info:
        whole.feed(stream)
    assert type(info.value) is ProtocolError
    assert_poisoned(whole, ProtocolError)


@pytest.mark.parametrize(
    "first_bytes",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x80\x05\x95"],
    ids=["tls-client-hello", "http-get", "bare-pickle"],
)
def test_another_protocol_is_refused_on_its_first_byte(first_bytes: bytes) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="not a streampickle stream") as info:
        decoder.feed(first_bytes[:1])  # one byte: no waiting for the other 19 of a header
    assert type(info.value) is ProtocolError
    assert_poisoned(decoder, ProtocolError)


@pytest.mark.anyio
async def test_another_protocol_on_an_object_stream_is_refused_without_waiting_for_more() -> None:
    from streampickle.testing import memory_stream_pair

    peer, ours = memory_stream_pair()
    stream = ObjectStream(ours)
    await peer.send(b"\x16\x03\x01")  # and the peer waits for our ServerHello
    with anyio.fail_after(2):
        with pytest.raises(ProtocolError, match="not a streampickle stream"):
            await stream.receive()
        with pytest.raises(ProtocolError, match="failed earlier"):
            await stream.receive()


def test_a_header_the_decoder_accepts_has_exactly_one_encoding() -> None:
    """Every field is fixed-width and must-be-zero bits must be zero, so no two byte strings
    mean the same header. Swept: every value of every byte of a valid header; each header the
    decoder accepts must be the one the spec's packing of its fields gives back."""
    limits = Limits(max_message_size=2**64 - 1, max_pickle_size=2**64 - 1)
    accepted = 0
    for pos in range(HEADER_SIZE):
        for value in range(256):
            candidate = _with_byte(VALID_HEADER, pos, value)
            try:
                Decoder(limits=limits).feed(candidate)
            except StreamPickleError:
                continue
            accepted += 1
            _, _, flags, _, count, plen = struct.unpack("<4sBBHIQ", candidate)
            assert _wire.pack_header(flags=flags, chunk_count=count, pickle_length=plen) == candidate, pos
    # Accepted: the chunk counts up to max_side_chunks (every value of the count's low two
    # bytes, only 0 in its high two), every pickle length but 0, and in the other 8 bytes only
    # the value they have.
    assert Limits().max_side_chunks == 65_536
    assert accepted == (256 + 256 + 1 + 1) + (8 * 256 - 1) + 8


def test_the_header_and_length_table_held_are_bounded_by_max_side_chunks() -> None:
    """The format's header is 20 fixed bytes plus an 8-byte entry per side chunk: the
    counterpart of a header-size limit is max_side_chunks, checked before the table."""
    limits = Limits(max_side_chunks=1024)
    decoder = Decoder(limits=limits)
    data = header(chunks=1024, plen=3) + bytes(8 * 1024)
    with traced() as peak:
        decoder.feed(data)
    assert peak[0] < 8 * 1024 + 16 * KiB
    assert decoder.progress == (HEADER_SIZE + 8 * 1024, HEADER_SIZE + 8 * 1024 + 3)
    over = Decoder(limits=limits)
    at, exc = feed_bytewise(over, header(chunks=1025, plen=3) + bytes(16))  # type: ignore[misc]
    assert type(exc) is LimitExceededError and at == HEADER_SIZE - 1
    assert_poisoned(over, LimitExceededError)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "bytewise"])
def test_a_zero_pickle_length_is_a_protocol_error_not_a_keep_alive(whole: bool) -> None:
    stream = header(plen=0) + AFTER
    decoder = Decoder()
    if whole:
        with pytest.raises(ProtocolError, match="empty pickle") as info:
            decoder.feed(stream)
        exc: StreamPickleError = info.value
    else:
        at, exc = feed_bytewise(decoder, stream)  # type: ignore[misc]
        assert at == HEADER_SIZE - 1
    assert type(exc) is ProtocolError
    assert_poisoned(decoder, ProtocolError)


ARRAY_MESSAGE = streampickle.dumps({"x": np.arange(3, dtype="<f8"), "y": np.arange(2, dtype="<i2")})
ARRAY_PICKLE, ARRAY_CHUNKS = split(ARRAY_MESSAGE)


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_a_pickle_length_short_of_the_stop_drops_the_message_without_reading_the_chunks(trusted: bool) -> None:
    """The declared pickle part ends one byte before its STOP, and every side-chunk byte is a
    STOP: an unpickler that read past the pickle part would find one and succeed."""
    short = make_message(ARRAY_PICKLE[:-1], [b"." * len(c) for c in ARRAY_CHUNKS])
    assert_dropped_alone(short, trusted=trusted)


@pytest.mark.parametrize(
    ("tail", "trusted"),
    [
        (b"garbage", False), (b"N.", False), (P5 + b"N.", False), (b"\x00", False),
        (b"garbage", True), (b"\x00", True),
    ],
    ids=["garbage", "stop-again", "second-pickle", "nul", "trusted-garbage", "trusted-nul"],
)
def test_bytes_after_stop_or_a_second_pickle_drop_the_message(tail: bytes, trusted: bool) -> None:
    assert_dropped_alone(make_message(ARRAY_PICKLE + tail, ARRAY_CHUNKS), trusted=trusted)


# =============================================================================================
# Truncation and end of input
# =============================================================================================


def test_an_end_at_a_message_boundary_is_clean_and_unlike_an_end_inside_one() -> None:
    for before, count in ((b"", 0), (AFTER, 1), (AFTER + INBAND, 2)):
        decoder = Decoder()
        decoder.feed(before)
        decoder.feed_eof()  # no error: a clean end
        assert not decoder.failed and not decoder.in_message
        assert len(list(decoder)) == count
        with pytest.raises(StopIteration):
            next(decoder)
    # the blocking adapter says it the way files do; an end inside a message is no EOFError
    with pytest.raises(EOFError) as info:
        streampickle.sync.load(io.BytesIO(b""))
    assert not isinstance(info.value, StreamPickleError)
    with pytest.raises(IncompleteMessageError) as incomplete:
        streampickle.sync.load(io.BytesIO(AFTER[:3]))
    assert not isinstance(incomplete.value, EOFError)
    assert (incomplete.value.received, incomplete.value.expected) == (3, HEADER_SIZE)


KEY = b"shared secret"
FIXTURES = {
    "inband": streampickle.dumps({"s": "x", "n": [1, 2.5]}),
    "chunks": streampickle.dumps([np.arange(3, dtype=np.int16), np.zeros(0), np.ones(2, dtype=">f4")]),
    "keyed": streampickle.dumps({"a": np.arange(4, dtype=np.uint8)}, key=KEY),
}


def _expected_after(message: bytes, k: int, keyed: bool) -> int:
    """What the parts among the first k bytes declare the message to be."""
    count = int.from_bytes(message[8:12], "little")
    if k < HEADER_SIZE:
        return HEADER_SIZE
    head = HEADER_SIZE + 16 * keyed + 8 * count  # a keyed message: version 2, stream fields
    if k < head:  # the side chunks' lengths are not known yet
        return head + 32 * keyed + int.from_bytes(message[12:20], "little") + 32 * keyed
    return len(message)


@pytest.mark.parametrize("name", FIXTURES)
def test_every_prefix_of_a_message_needs_more_and_then_ends_incomplete(name: str) -> None:
    message = FIXTURES[name]
    keyed = name == "keyed"
    options = {"key": KEY, "stream": False} if keyed else {}
    for k in range(1, len(message)):
        for whole in (True, False):
            decoder = Decoder(**options)
            if whole:
                decoder.feed(message[:k])
            else:
                assert feed_bytewise(decoder, message[:k]) is None
            assert list(decoder) == [] and decoder.in_message, k
            assert decoder.progress == (k, _expected_after(message, k, keyed)), k
            with pytest.raises(IncompleteMessageError) as info:
                decoder.feed_eof()
            assert (info.value.received, info.value.expected) == decoder.progress, k
            assert_poisoned(decoder, IncompleteMessageError)
    decoder = Decoder(**options)
    decoder.feed(message)
    decoder.feed_eof()
    assert len(list(decoder)) == 1


# A keyed message with two 512 KiB side chunks (below the pool's size, so their memory is
# malloc'd and freed, never kept) and a small pickle part.
CUT_ARRAYS = [np.full(64 * KiB, i, dtype=np.float64) for i in range(2)]
CUT_MESSAGE = streampickle.dumps({"a": CUT_ARRAYS[0], "b": CUT_ARRAYS[1]}, key=KEY)
_CUT_PICKLE_START = HEADER_SIZE + 16 + 16 + 32  # header, stream fields, 2 lengths, header tag
_CUT_PICKLE_END = _CUT_PICKLE_START + int.from_bytes(CUT_MESSAGE[12:20], "little")
CUT_POINTS = {
    "after-header": HEADER_SIZE,
    "inside-the-header-tag": _CUT_PICKLE_START - 5,
    "mid-pickle": _CUT_PICKLE_START + 10,
    "between-pickle-and-chunks": _CUT_PICKLE_END,
    "inside-chunk-0": _CUT_PICKLE_END + 300 * KiB,
    "between-chunks": _CUT_PICKLE_END + 512 * KiB,
    "inside-chunk-1": _CUT_PICKLE_END + 900 * KiB,
    "just-before-the-tag": len(CUT_MESSAGE) - 32,
    "inside-the-tag": len(CUT_MESSAGE) - 5,
}


@pytest.mark.parametrize("cut", CUT_POINTS)
def test_a_peer_closing_inside_any_part_is_incomplete_and_frees_what_it_sent(cut: str) -> None:
    k = CUT_POINTS[cut]
    decoder = Decoder(key=KEY, stream=False)
    with traced():
        base = tracemalloc.get_traced_memory()[0]
        decoder.feed(CUT_MESSAGE[:k])
        holding = tracemalloc.get_traced_memory()[0] - base
        with pytest.raises(IncompleteMessageError) as info:
            decoder.feed_eof()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
    assert (info.value.received, info.value.expected) == (k, _expected_after(CUT_MESSAGE, k, keyed=True))
    if k > _CUT_PICKLE_END + 100 * KiB:
        assert holding > 100 * KiB  # the partial chunks were held ...
    assert after < 16 * KiB, (holding, after)  # ... and are let go, though the decoder lives
    assert_poisoned(decoder, IncompleteMessageError)


# =============================================================================================
# Out-of-band buffer accounting
# =============================================================================================

TWO_ARRAYS = streampickle.dumps([np.arange(3, dtype=np.int64), np.arange(4, dtype=np.uint8)])
TWO_PICKLE, TWO_CHUNKS = split(TWO_ARRAYS)


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_a_pickle_taking_more_buffers_than_the_header_declares_drops_the_message(trusted: bool) -> None:
    assert_dropped_alone(make_message(TWO_PICKLE, TWO_CHUNKS[:1]), trusted=trusted)


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_a_pickle_taking_fewer_buffers_than_the_header_declares_drops_the_message(trusted: bool) -> None:
    assert_dropped_alone(make_message(TWO_PICKLE, [*TWO_CHUNKS, b"extra"]), trusted=trusted)
    assert_dropped_alone(make_message(TWO_PICKLE, [*TWO_CHUNKS, b""]), trusted=trusted)


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_next_buffer_with_no_side_chunks_declared_drops_the_message(trusted: bool) -> None:
    assert_dropped_alone(make_message(TWO_PICKLE), trusted=trusted)
    assert_dropped_alone(make_message(P5 + b"\x97."), trusted=trusted)


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
@pytest.mark.parametrize("operand", [b"N", b"K\x05", b"]", s("text")], ids=["none", "int", "list", "str"])
def test_readonly_buffer_on_a_non_buffer_drops_the_message_with_the_type_error_chained(
    trusted: bool, operand: bytes
) -> None:
    err = assert_dropped_alone(make_message(P5 + operand + b"\x98."), trusted=trusted)
    if trusted:  # the unpickler's own TypeError, chained
        assert isinstance(err.__cause__, TypeError)
    else:  # the verifier refuses it before the unpickler runs, naming the opcode and offset
        assert f"at byte {2 + len(operand)}: READONLY_BUFFER on a" in str(err)


def _ndarray_pickle(descr: str, shape: list[int]) -> bytes:
    """The pickle part streampickle writes for an array of ``descr`` and ``shape``."""
    pickled, chunks = split(streampickle.dumps(np.zeros(shape, dtype=descr)))
    assert len(chunks) == 1
    return pickled


@pytest.mark.parametrize(
    ("descr", "shape", "chunk_bytes"),
    [("<f8", [3], 8), ("<i8", [1], 5), ("<f8", [3], 32), ("<i4", [2, 2], 12), ("<c16", [1], 0)],
)
def test_a_chunk_whose_length_does_not_fit_the_array_drops_the_message(
    descr: str, shape: list[int], chunk_bytes: int
) -> None:
    chunk = bytes(range(chunk_bytes))
    assert_dropped_alone(make_message(_ndarray_pickle(descr, shape), [chunk]))
    assert_dropped_alone(make_message(_ndarray_pickle(descr, shape), [chunk]), trusted=True)


@pytest.mark.parametrize(("dtype", "count", "chunk_bytes"), [("<f8", 3, 8), ("<i8", 1, 5)])
def test_numpys_own_array_pickling_with_a_wrong_chunk_length_wraps_numpys_value_error(
    dtype: str, count: int, chunk_bytes: int
) -> None:
    """Trusted peers may send numpy's own pickling (``_frombuffer``); a chunk of the wrong
    length makes numpy raise ValueError, which arrives chained, with the stream usable."""
    buffers: list[pickle.PickleBuffer] = []
    pickled = pickle.dumps(np.zeros(count, dtype=dtype), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1
    err = assert_dropped_alone(make_message(pickled, [bytes(chunk_bytes)]), trusted=True)
    assert isinstance(err.__cause__, ValueError)


def test_one_side_chunk_used_by_two_arrays_gives_two_views_of_it_or_is_refused() -> None:
    """NEXT_BUFFER memoized, then fetched again with BINGET for a second array."""
    ndarray = glob("streampickle._rebuild", "ndarray") + b"\x94"  # memo 0
    first = b"(" + s("<i2") + b"]K\x03a\x89" + b"\x97\x94" + b"tR"  # its buffer: memo 1
    second = b"h\x00(" + s("<i2") + b"]K\x03a\x89" + b"h\x01" + b"tR"
    message = make_message(P5 + ndarray + first + second + b"\x86.", [np.arange(3, dtype="<i2").tobytes()])
    for trusted in (False, True):
        decoder = Decoder(trusted=trusted)
        decoder.feed(message + AFTER)
        try:
            a, b = next(decoder)
        except MalformedPickleError:
            pass  # refusing it is the other acceptable answer
        else:
            assert a.tolist() == b.tolist() == [0, 1, 2] and a.dtype == b.dtype == np.dtype("<i2")
            assert np.shares_memory(a, b)  # one buffer, two views: never a stale or second copy
            a[0] = 7
            assert b[0] == 7
        assert_same(AFTER_OBJ, next(decoder))


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "bytewise"])
def test_zero_length_side_chunks_are_neither_an_end_nor_a_keep_alive(whole: bool) -> None:
    obj = [np.zeros(0), np.arange(3, dtype=np.int8), np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype="S3")]
    message = streampickle.dumps(obj)
    _, chunks = split(message)
    assert [len(c) for c in chunks] == [0, 3, 0, 0]  # zero-length first, between, and last
    decoder = Decoder()
    if whole:
        decoder.feed(message)
    else:
        assert feed_bytewise(decoder, message) is None
    assert decoder.pending == 1 and not decoder.in_message  # complete, no byte more needed
    decoder.feed(b"")  # empty input is no end either
    decoder.feed_eof()  # and an end right after the empty chunk is clean
    assert_same(obj, next(decoder))


def test_a_side_chunk_is_bounded_by_the_message_limit_at_its_exact_size() -> None:
    """There is no per-chunk limit: a chunk is bounded by max_message_size, which counts it
    from the length table, before any of its bytes."""
    arr = np.arange(1000, dtype=np.uint8)
    message = streampickle.dumps(arr)
    at_limit = Decoder(limits=Limits(max_message_size=len(message)))
    at_limit.feed(message)
    assert_same(arr, next(at_limit))
    bigger = streampickle.dumps(np.arange(1001, dtype=np.uint8))
    assert len(bigger) == len(message) + 1
    over = Decoder(limits=Limits(max_message_size=len(message)))
    at, exc = feed_bytewise(over, bigger)  # type: ignore[misc]
    assert type(exc) is LimitExceededError and at == HEADER_SIZE + 8 - 1
    assert_poisoned(over, LimitExceededError)


ALIGN_DTYPES = ["u1", "i2", "<i4", ">i8", "f2", "<f4", ">f8", "c8", "<c16", "?", "<M8[ms]", ">m8[us]", "S5", "<U3",
                "V7", [("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]]


@pytest.mark.parametrize("how", ["whole", "bytewise", "get_buffer"])
def test_decoded_arrays_of_every_dtype_start_64_byte_aligned(how: str) -> None:
    # an odd pickle length ahead of the chunks puts them at odd offsets on the wire
    arrays = {f"k{i}" * (i + 1): np.zeros(5 + i, dtype=dt) for i, dt in enumerate(ALIGN_DTYPES)}
    message = streampickle.dumps(arrays)
    decoder = Decoder()
    if how == "whole":
        decoder.feed(message)
    elif how == "bytewise":
        assert feed_bytewise(decoder, message) is None
    else:
        pos = 0
        while pos < len(message):
            target = decoder.get_buffer()
            n = min(len(target), len(message) - pos, 7)
            target[:n] = message[pos : pos + n]
            decoder.buffer_updated(n)
            pos += n
    out = next(decoder)
    for key, arr in arrays.items():
        got = out[key]
        assert got.dtype == arr.dtype and got.flags.aligned and got.ctypes.data % 64 == 0, key


# =============================================================================================
# Malformed opcodes (in a well-framed message: dropped alone)
# =============================================================================================


@pytest.mark.parametrize(
    "pickled",
    [b"\x80\x06N.", b"\x80\xffN.", b"\x80\x04N.", b"\x80\x02N.", b"N.", b"(t.", P5 + b"N0\x80\x05N.",
     P5 + b"\x80\x05N.", P5 + b"N\x80\x05."],
    ids=["proto6", "proto255", "proto4", "proto2", "missing", "missing-tuple", "later", "duplicate", "before-stop"],
)
def test_proto_other_than_5_or_anywhere_but_first_drops_the_message(pickled: bytes) -> None:
    assert_dropped_alone(make_message(pickled))


@pytest.mark.parametrize(
    "pickled",
    [P5 + b"Nt.", P5 + b"Nl.", P5 + b"Nd.", P5 + b"]Ne.", P5 + b"}NNu.", P5 + b"\x8fN\x90.", P5 + b"N\x91.",
     P5 + b"N1.", P5 + b"(N.", P5 + b"((Nt.", P5 + b"]((Nt.", P5 + b"(]N."],
    ids=["tuple", "list", "dict", "appends", "setitems", "additems", "frozenset", "pop_mark", "mark-open",
         "inner-mark-open", "two-marks-open", "mark-left-under-list"],
)
def test_marks_missing_or_never_closed_drop_the_message(pickled: bytes) -> None:
    assert_dropped_alone(make_message(pickled))


def test_long_binput_0xffffffff_drops_the_message_without_growing_a_memo() -> None:
    pickled = P5 + b"N" + b"r\xff\xff\xff\xff" + b"."  # LONG_BINPUT 2**32-1
    with traced() as peak:
        assert_dropped_alone(make_message(pickled))
    assert peak[0] < 1 * MiB  # a memo grown to 2**32 slots would be 32 GiB


@pytest.mark.parametrize(
    "pickled",
    [
        P5 + b"\x8e" + struct.pack("<Q", 2**62) + b"abc.",  # BINBYTES8
        P5 + b"\x96" + struct.pack("<Q", 2**62) + b"abc.",  # BYTEARRAY8
        P5 + b"\x8d" + struct.pack("<Q", 2**62) + b"abc.",  # BINUNICODE8
        P5 + b"B" + struct.pack("<I", 2**31 - 1) + b"abc.",  # BINBYTES
        P5 + b"X" + struct.pack("<I", 2**32 - 1) + b"abc.",  # BINUNICODE
        P5 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b"abc.",  # LONG4
        P5 + b"\x95" + struct.pack("<Q", 2**62) + b"N.",  # FRAME
    ],
    ids=["binbytes8", "bytearray8", "binunicode8", "binbytes", "binunicode", "long4", "frame"],
)
def test_a_length_prefix_beyond_the_pickle_drops_the_message_in_constant_memory(pickled: bytes) -> None:
    with traced() as peak:  # the safe loader's promise: trusted peers are not scanned
        assert_dropped_alone(make_message(pickled))
    assert peak[0] < 1 * MiB


@pytest.mark.parametrize(
    "pickled",
    [
        P5 + b"I" + b"9" * 100_000 + b"\n.",  # INT
        P5 + b"L" + b"9" * 100_000 + b"L\n.",  # LONG
        P5 + b"S'x'\n.",  # STRING
        P5 + b"Vx\n.",  # UNICODE
        P5 + b"F1.5\n.",  # FLOAT
        P5 + b"c" + b"m" * 10_000_000 + b"\nname\n.",  # GLOBAL with a 10 MB line
        P5 + b"(cbuiltins\nlist\no.",
    ],
    ids=["int-100000-digits", "long-100000-digits", "string", "unicode", "float", "global-10mb", "obj"],
)
def test_text_protocol_opcodes_drop_the_message_before_any_is_parsed(pickled: bytes) -> None:
    err = assert_dropped_alone(make_message(pickled))
    assert "is not allowed: a protocol-5 pickler never emits it" in str(err)


@pytest.mark.parametrize(
    "raw", [b"\xff\xfe", b"\xc3", b"a\x80b", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"],
    ids=["ff-fe", "cut-2-byte", "lone-continuation", "cut-3-byte", "5-byte-form", "overlong-slash"],
)
@pytest.mark.parametrize("opcode", [b"\x8c", b"X", b"\x8d"], ids=["short_binunicode", "binunicode", "binunicode8"])
def test_invalid_utf8_in_a_string_drops_the_message_with_the_decode_error_chained(raw: bytes, opcode: bytes) -> None:
    width = {b"\x8c": 1, b"X": 4, b"\x8d": 8}[opcode]
    pickled = P5 + opcode + len(raw).to_bytes(width, "little") + raw + b"."
    err = assert_dropped_alone(make_message(pickled))
    assert isinstance(err.__cause__, UnicodeDecodeError)


@pytest.mark.parametrize(
    "operands",
    [b"C\x02os" + s("system"), s("os") + b"C\x06system", b"K\x01K\x02", b"N" + s("system"), b"]" + s("x")],
    ids=["bytes-module", "bytes-name", "ints", "none-module", "list-module"],
)
def test_stack_global_with_non_str_operands_drops_the_message(operands: bytes) -> None:
    assert_dropped_alone(make_message(P5 + operands + b"\x93."))


# =============================================================================================
# numpy round trips: bit-exact, whatever the layout
# =============================================================================================


def _decode_bytewise(message: bytes) -> Any:
    decoder = Decoder()
    assert feed_bytewise(decoder, message) is None
    (out,) = list(decoder)
    return out


@pytest.mark.parametrize(
    "arr",
    [np.arange(20, dtype=np.int16)[::2], np.arange(60, dtype=">f8").reshape(6, 10)[:, ::3],
     np.arange(24, dtype=np.complex64).reshape(2, 3, 4)[:, ::-1, 1:3]],
    ids=["1d-step", "2d-columns", "3d-reversed"],
)
def test_a_non_contiguous_array_travels_as_one_side_chunk_and_comes_back_equal(arr: np.ndarray) -> None:
    assert not arr.flags.c_contiguous and not arr.flags.f_contiguous
    message = streampickle.dumps(arr)
    pickled, chunks = split(message)
    assert [len(c) for c in chunks] == [arr.nbytes] and len(pickled) < 200  # not in-band
    for out in (streampickle.loads(message), _decode_bytewise(message)):
        assert out.dtype == arr.dtype and out.shape == arr.shape and out.flags.c_contiguous
        assert out.tobytes() == arr.tobytes()


def test_a_fortran_ordered_array_is_one_chunk_and_stays_fortran_ordered() -> None:
    arr = np.asfortranarray(np.arange(35, dtype="<i8").reshape(5, 7))
    message = streampickle.dumps(arr)
    _, chunks = split(message)
    assert chunks == [arr.tobytes(order="F")]  # its own memory order, as it is
    for out in (streampickle.loads(message), _decode_bytewise(message)):
        assert out.flags.f_contiguous and not out.flags.c_contiguous
        assert out.strides == arr.strides and np.array_equal(out, arr)


def test_read_only_arrays_arrive_read_only_and_writable_ones_writable() -> None:
    ro = np.arange(10, dtype=np.float32)
    ro.flags.writeable = False
    rw = np.arange(10, dtype=np.float32)
    message = streampickle.dumps({"ro": ro, "rw": rw, "ro-view": ro[2:5]})
    for out in (streampickle.loads(message), _decode_bytewise(message), streampickle.loads(message, trusted=True)):
        assert out["ro"].flags.writeable is False and out["ro-view"].flags.writeable is False
        assert out["rw"].flags.writeable is True
        out["rw"][0] = 5  # and it really is
        with pytest.raises(ValueError):
            out["ro"][0] = 5


def _nan_filled(dtype: str, n: int = 7) -> np.ndarray:
    arr = np.arange(n).astype(dtype)
    if arr.dtype.kind in "fc":
        arr[1] = np.nan
        arr[2] = np.inf
        arr[3] = -0.0
    if arr.dtype.kind in "mM":
        arr[1] = np.datetime64("NaT") if arr.dtype.kind == "M" else np.timedelta64("NaT")
    return arr


ROUND_TRIP = {
    "empty": np.zeros(0),
    "empty-2d": np.zeros((0, 5), dtype=np.int32),
    "empty-last": np.zeros((3, 0), dtype=np.int32),
    "0-d": np.array(3.5),
    "0-d-int": np.array(-7, dtype=">i2"),
    "structured": np.array([(1, (2.5, np.nan), b"ab"), (3, (4.5, 5.5), b"c")],
                           dtype=[("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]),
    "structured-padded": np.zeros(3, dtype=np.dtype({"names": ["x", "y"], "formats": ["u1", "<f4"],
                                                     "offsets": [0, 8], "itemsize": 16})),
    "big-endian": _nan_filled(">f8"),
    "bool": np.array([True, False, True]),
    "complex": _nan_filled("<c16"),
    "complex64-be": _nan_filled(">c8"),
    "datetime64": _nan_filled("<M8[ns]"),
    "timedelta64": _nan_filled(">m8[s]"),
    "float16": _nan_filled("<f2"),
    "unicode": np.array(["", "é", "日本語"]),
    "object": np.array([1, "two", None, [3.0, np.nan], (4,)], dtype=object),
    "object-2d": np.array([[1, None], ["x", 2.5]], dtype=object),
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_every_kind_of_array_round_trips_bit_exact(name: str) -> None:
    arr = ROUND_TRIP[name]
    message = streampickle.dumps(arr)
    for out in (streampickle.loads(message), _decode_bytewise(message)):
        assert type(out) is np.ndarray
        assert out.dtype == arr.dtype and out.shape == arr.shape
        if arr.size:  # (an empty array's strides address nothing)
            assert out.strides == np.empty_like(arr, order="C").strides  # C order, packed
        if arr.dtype.hasobject:
            assert_same(arr, out)
        else:
            assert out.tobytes() == arr.tobytes()  # bit-exact: NaN payloads, -0.0, NaT
            if arr.dtype.kind in "fc":
                assert np.array_equal(out, arr, equal_nan=True)


def test_decoded_arrays_do_not_alias_the_memory_the_input_arrived_in() -> None:
    """A transport reads into one buffer and feeds from it again and again: arrays decoded
    from earlier reads must not change when it is overwritten."""
    arrays = [np.random.default_rng(i).random(5000) for i in range(3)]
    messages = b"".join(streampickle.dumps({"i": i, "a": a, "b": a[::2].copy()}) for i, a in enumerate(arrays))
    for piece in (7, 4096, 70_000, len(messages)):
        receive_buffer = bytearray(piece)
        decoder = Decoder()
        out = []
        for start in range(0, len(messages), piece):
            data = messages[start : start + piece]
            receive_buffer[: len(data)] = data
            decoder.feed(memoryview(receive_buffer)[: len(data)])
            out.extend(decoder)
            receive_buffer[:] = b"\xff" * len(receive_buffer)  # the transport reuses it
        assert [o["i"] for o in out] == [0, 1, 2]
        for o, a in zip(out, arrays, strict=True):
            assert o["a"].tobytes() == a.tobytes() and o["b"].tobytes() == a[::2].tobytes()


# =============================================================================================
# Connection loss on real sockets (async): reset, a vanished peer, TLS without close_notify
# =============================================================================================


def _reset(peer: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


async def _raw_peer_and_stream(kind: str) -> tuple[socket.socket, ObjectStream]:
    """A plain blocking socket (the peer) connected to an ObjectStream over TCP: streampickle's
    own socket stream, or an anyio one."""
    if kind == "streampickle":
        async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
            peer = socket.create_connection(("127.0.0.1", listener.extra(SocketAttribute.local_port)))
            stream = await listener.accept()
        return peer, stream
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    peers: list[socket.socket] = []

    async def connect() -> socket.socket:
        peers.append(socket.create_connection(("127.0.0.1", port)))
        return peers[0]

    _, server = await _anyio_accept(listener, connect)
    return peers[0], ObjectStream(server)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["streampickle", "anyio"])
async def test_a_connection_reset_mid_message_wakes_the_receiver_broken(kind: str) -> None:
    peer, stream = await _raw_peer_and_stream(kind)
    message = streampickle.dumps(np.arange(100_000))
    async with stream:
        peer.sendall(message[: len(message) // 2])

        async def reset_soon() -> None:
            await anyio.sleep(0.2)  # the receive is waiting inside the message by now
            _reset(peer)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reset_soon)
                with pytest.raises(anyio.BrokenResourceError) as info:
                    await stream.receive()
        # the reset is named, in the message or as the cause
        assert "reset" in str(info.value) or isinstance(info.value.__cause__, ConnectionResetError)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["reset", "close-unread"])
@pytest.mark.parametrize("kind", ["streampickle", "anyio"])
async def test_a_send_blocked_on_a_peer_that_goes_away_wakes_broken(kind: str, how: str) -> None:
    """The peer never reads, then resets or just closes (with our bytes unread, which makes
    its kernel reset too): the blocked send wakes with BrokenResourceError, and so does the
    next one."""
    peer, stream = await _raw_peer_and_stream(kind)
    big = np.ones(64 * MiB, dtype=np.uint8)  # more than both ends' socket buffers
    woke: list[BaseException] = []

    async def blocked_send() -> None:
        try:
            await stream.send(big)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertions below
            woke.append(exc)

    async with stream:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked_send)
                await anyio.sleep(0.3)
                assert not woke, woke  # still blocked on the peer
                if how == "reset":
                    _reset(peer)
                else:
                    peer.close()
        assert len(woke) == 1 and isinstance(woke[0], anyio.BrokenResourceError), woke
        assert isinstance(woke[0].__cause__, (ConnectionResetError, BrokenPipeError)), repr(woke[0].__cause__)
        with anyio.fail_after(5), pytest.raises(anyio.BrokenResourceError):
            await stream.send("after")


async def _tls_pair(standard_compatible: bool) -> tuple[Any, Any]:
    from anyio.streams.tls import TLSStream

    server_ctx, client_ctx = _tls_contexts()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    client_raw, server_raw = await _anyio_accept(listener, lambda: anyio.connect_tcp("127.0.0.1", port))
    wrapped: dict[str, Any] = {}

    async def wrap(name: str, raw: Any, **options: Any) -> None:
        wrapped[name] = await TLSStream.wrap(raw, standard_compatible=standard_compatible, **options)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: wrap("server", server_raw, server_side=True, ssl_context=server_ctx))
        tg.start_soon(lambda: wrap("client", client_raw, hostname="localhost", ssl_context=client_ctx))
    return wrapped["client"], wrapped["server"]


TLS_MESSAGE = streampickle.dumps({"a": np.arange(50_000, dtype=np.int32)})


@pytest.mark.anyio
@pytest.mark.parametrize("standard_compatible", [False], ids=["lenient"])
async def test_a_tls_ragged_eof_mid_message_is_incomplete(standard_compatible: bool) -> None:
    ours, peer = await _tls_pair(standard_compatible)
    stream = ObjectStream(ours)
    try:
        with anyio.fail_after(5):
            await peer.send(TLS_MESSAGE[:1000])
            await peer.transport_stream.aclose()  # FIN without close_notify
            with pytest.raises(IncompleteMessageError) as info:
                await stream.receive()
        assert info.value.received == 1000 and info.value.expected == len(TLS_MESSAGE)
    finally:
        await ours.transport_stream.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("standard_compatible", [False, True], ids=["lenient", "standard"])
async def test_a_tls_ragged_eof_between_messages_follows_the_streams_policy(standard_compatible: bool) -> None:
    """After a whole message, a FIN without close_notify is the end of the stream for a
    lenient TLS stream, and a broken stream (possible truncation) for a standard one."""
    ours, peer = await _tls_pair(standard_compatible)
    stream = ObjectStream(ours)
    try:
        with anyio.fail_after(5):
            await peer.send(TLS_MESSAGE)
            await peer.transport_stream.aclose()
            assert np.array_equal((await stream.receive())["a"], np.arange(50_000, dtype=np.int32))
            end = anyio.BrokenResourceError if standard_compatible else anyio.EndOfStream
            with pytest.raises(end):
                await stream.receive()
    finally:
        await ours.transport_stream.aclose()


BIG_PICKLE_MESSAGE = streampickle.dumps({"s": "x" * (512 * KiB), "a": CUT_ARRAYS[0]}, key=KEY)
_BIG_PICKLE_END = HEADER_SIZE + 16 + 8 + 32 + int.from_bytes(BIG_PICKLE_MESSAGE[12:20], "little")


@pytest.mark.parametrize("k", [_BIG_PICKLE_END - 1000, _BIG_PICKLE_END, _BIG_PICKLE_END + 100 * KiB],
                         ids=["mid-pickle", "after-pickle", "inside-chunk"])
def test_a_peer_closing_after_a_large_pickle_part_frees_it(k: int) -> None:
    decoder = Decoder(key=KEY, stream=False)
    with traced():
        base = tracemalloc.get_traced_memory()[0]
        decoder.feed(BIG_PICKLE_MESSAGE[:k])
        with pytest.raises(IncompleteMessageError):
            decoder.feed_eof()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
    assert after < 16 * KiB, after
