"""``get_buffer(read_ahead=True)``: a reader that owns the connection reads many small messages
per ``recv_into``, and a side chunk still lands in its final memory."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

import streampickle
from streampickle import Decoder, UsageError
from streampickle._decoder import READ_AHEAD

SMALL = [{"i": i, "name": "x" * 20} for i in range(2000)]


def _serve(data: bytes) -> tuple[socket.socket, threading.Thread]:
    """A socketpair whose far end sends ``data`` and closes; returns the near end."""
    near, far = socket.socketpair()

    def send() -> None:
        with far:
            far.sendall(data)

    thread = threading.Thread(target=send)
    thread.start()
    return near, thread


def _read_all(sock: socket.socket, decoder: Decoder, *, read_ahead: bool) -> tuple[list, int]:
    objects, reads = [], 0
    while True:
        target = decoder.get_buffer(read_ahead=read_ahead)
        n = sock.recv_into(target)
        reads += 1
        if not n:
            decoder.feed_eof()
            return objects, reads
        decoder.buffer_updated(n)
        objects.extend(decoder)


def test_small_messages_cost_a_fraction_of_a_read_each_over_a_socket() -> None:
    wire = b"".join(streampickle.dumps(m) for m in SMALL)
    sock, thread = _serve(wire)
    with sock:
        objects, reads = _read_all(sock, Decoder(), read_ahead=True)
    thread.join()
    assert objects == SMALL
    # A whole READ_AHEAD per read at best; the sender's pace may split them finer, but never
    # into the two or more reads per message that exact reads take.
    assert reads < len(SMALL) // 4, reads
    assert reads >= len(wire) // READ_AHEAD


def test_exact_reads_never_read_past_a_message() -> None:
    """Without read_ahead the buffer ends with the current part: the old contract holds."""
    wire = streampickle.dumps("one") + streampickle.dumps("two")
    decoder = Decoder()
    first = len(streampickle.dumps("one"))
    taken = 0
    while not decoder.pending:
        target = decoder.get_buffer()
        n = len(target)
        target[:n] = wire[taken : taken + n]
        decoder.buffer_updated(n)
        taken += n
    assert taken == first
    assert next(decoder) == "one"


def test_a_side_chunk_after_a_staged_header_is_read_into_its_final_memory() -> None:
    array = np.arange(1 << 20, dtype=np.float64)  # 8 MiB: one side chunk
    wire = streampickle.dumps(["small", array, "after"]) + streampickle.dumps("next")
    decoder = Decoder()
    pos = 0
    targets = []
    objects: list = []
    while pos < len(wire):
        target = decoder.get_buffer(read_ahead=True)
        n = min(len(target), len(wire) - pos, 1 << 20)
        target[:n] = wire[pos : pos + n]
        targets.append(np.frombuffer(target, np.uint8).ctypes.data)
        decoder.buffer_updated(n)
        pos += n
        objects.extend(decoder)
    first, second = objects
    assert first[0] == "small" and first[2] == "after" and second == "next"
    np.testing.assert_array_equal(first[1], array)
    assert first[1].flags.writeable
    # After the staged first read, the chunk's bytes were read into memory the array now views.
    start = first[1].ctypes.data
    assert sum(start <= t < start + array.nbytes for t in targets) >= array.nbytes // (1 << 20) - 1


@pytest.mark.parametrize("split", [1, 7, 20, 21, 4096])
def test_read_ahead_and_feed_mixed_in_any_split(split: int) -> None:
    objects_in = ["a", {"b": np.arange(5)}, b"c" * 300, np.zeros((3, 4), np.int8)]
    wire = b"".join(streampickle.dumps(o) for o in objects_in)
    decoder = Decoder()
    pos, turn, out = 0, 0, []
    while pos < len(wire):
        if turn % 3 == 2:
            decoder.feed(wire[pos : pos + split])
            pos += min(split, len(wire) - pos)
        else:
            target = decoder.get_buffer(read_ahead=turn % 3 == 0)
            n = min(len(target), split, len(wire) - pos)
            target[:n] = wire[pos : pos + n]
            decoder.buffer_updated(n)
            pos += n
        turn += 1
        out.extend(decoder)
    decoder.feed_eof()
    assert out[0] == "a" and out[2] == b"c" * 300
    np.testing.assert_array_equal(out[1]["b"], np.arange(5))
    np.testing.assert_array_equal(out[3], np.zeros((3, 4), np.int8))


@pytest.mark.parametrize("bad", [-1, READ_AHEAD + 1, 2.0, "3"])
def test_a_bad_count_for_a_staging_buffer_changes_nothing(bad: object) -> None:
    wire = streampickle.dumps("kept")
    decoder = Decoder()
    target = decoder.get_buffer(read_ahead=True)
    target[: len(wire)] = wire
    with pytest.raises(UsageError):
        decoder.buffer_updated(bad)  # type: ignore[arg-type]
    decoder.buffer_updated(len(wire))  # the staging buffer is still the target
    assert list(decoder) == ["kept"]


def test_framing_errors_in_staged_bytes_are_raised_and_sticky() -> None:
    decoder = Decoder()
    target = decoder.get_buffer(read_ahead=True)
    target[:8] = b"GET / HT"
    with pytest.raises(streampickle.ProtocolError):
        decoder.buffer_updated(8)
    with pytest.raises(streampickle.ProtocolError):
        decoder.get_buffer(read_ahead=True)
