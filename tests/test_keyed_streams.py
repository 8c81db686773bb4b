"""Keyed streams over real sockets: replay, reflection, splicing and truncation are refused;
a forged header costs the receiver no memory; a clean end is told from a cut.

The attacker in these tests controls the channel: it speaks to the victim over a plain socket,
sending bytes it recorded (encoded here with the key, as the genuine peer would have sent them)
in the wrong order, from the wrong stream, or back to their sender.
"""

from __future__ import annotations

import socket
import tracemalloc
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import SocketAttribute

import streampickle
from streampickle import AuthenticationError, Decoder, Encoder, ObjectStream
from streampickle.testing import memory_stream_pair

pytestmark = pytest.mark.anyio

KEY = b"keyed stream secret"
GiB = 1 << 30


def wire(encoder: Encoder, obj: Any) -> bytes:
    return b"".join(bytes(c) for c in encoder.encode(obj))


async def keyed_server(**options: Any) -> tuple[Any, int]:
    listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", key=KEY, **options)
    return listener, listener.extra(SocketAttribute.local_port)


async def receive_all(stream: ObjectStream) -> tuple[list[Any], BaseException | None]:
    """What the stream delivers until it ends, and the error it ended with (None: cleanly)."""
    got: list[Any] = []
    try:
        async for obj in stream:
            got.append(obj)
    except Exception as exc:  # noqa: BLE001 - the error is the outcome
        return got, exc
    return got, None


async def attack(recorded: list[bytes]) -> tuple[list[Any], BaseException | None]:
    """Send ``recorded`` messages from a plain socket to a keyed ObjectStream server; what it
    delivered, and how its stream ended."""
    listener, port = await keyed_server()
    async with listener:
        attacker = await anyio.connect_tcp("127.0.0.1", port)
        victim = await listener.accept()
        async with attacker, victim:
            for message in recorded:
                await attacker.send(message)
            await attacker.send_eof()
            return await receive_all(victim)


async def test_a_keyed_stream_delivers_in_order_and_ends_cleanly_on_aclose() -> None:
    listener, port = await keyed_server()
    async with listener:
        client = await streampickle.connect_tcp("127.0.0.1", port, key=KEY)
        server = await listener.accept()
        async with server:
            async with client:
                for i in range(5):
                    await client.send({"i": i, "a": np.full(1000 * i, i)})
            got, error = await receive_all(server)
    assert error is None and [obj["i"] for obj in got] == list(range(5))
    assert all(np.array_equal(obj["a"], np.full(1000 * i, i)) for i, obj in enumerate(got))


async def test_send_eof_ends_a_keyed_stream_and_the_other_direction_goes_on() -> None:
    listener, port = await keyed_server()
    async with listener:
        client = await streampickle.connect_tcp("127.0.0.1", port, key=KEY)
        server = await listener.accept()
        async with client, server:
            await client.send("question")
            await client.send_eof()
            got, error = await receive_all(server)
            assert (got, error) == (["question"], None)
            await server.send("answer")
            assert await client.receive() == "answer"


@pytest.mark.parametrize("order", [(0, 1, 0), (0, 2), (1, 0), (0, 1, 1)],
                         ids=["replayed", "dropped", "reordered", "repeated"])
async def test_a_recorded_message_out_of_order_is_refused(order: tuple[int, ...]) -> None:
    encoder = Encoder(key=KEY)
    recorded = [wire(encoder, f"message {i}") for i in range(3)]
    got, error = await attack([recorded[i] for i in order])
    in_order = 0
    while in_order < len(order) and order[in_order] == in_order:
        in_order += 1
    assert got == [f"message {i}" for i in range(in_order)]
    assert isinstance(error, AuthenticationError) and "was due" in str(error)


async def test_a_message_of_another_stream_spliced_in_is_refused() -> None:
    ours, theirs = Encoder(key=KEY), Encoder(key=KEY)
    wire(theirs, "their message 0")
    got, error = await attack([wire(ours, "ours 0"), wire(theirs, "their message 1")])
    assert got == ["ours 0"]
    assert isinstance(error, AuthenticationError) and "another sender" in str(error)


async def test_a_message_reflected_back_to_its_sender_is_refused() -> None:
    """The server's own reply, captured by the attacker, is sent back to the server."""
    listener, port = await keyed_server()
    async with listener:
        attacker = await anyio.connect_tcp("127.0.0.1", port)
        victim = await listener.accept()
        async with attacker, victim:
            await victim.send({"reply": np.arange(10)})
            captured = b""
            decoder = Decoder(key=KEY)  # the attacker can't forge, but it can record
            while not decoder.pending:
                data = await attacker.receive()
                captured += data
                decoder.feed(data)
            await attacker.send(captured)
            with pytest.raises(AuthenticationError, match="sent by this end"):
                await victim.receive()


async def test_a_cut_keyed_stream_is_not_a_clean_end() -> None:
    """The attacker drops the last messages and the end of stream, then closes: everything
    that arrived is delivered, and the end is an AuthenticationError, not EndOfStream."""
    encoder = Encoder(key=KEY)
    recorded = [wire(encoder, i) for i in range(4)] + [encoder.encode_end()]
    got, error = await attack(recorded[:2])
    assert got == [0, 1] and isinstance(error, AuthenticationError)
    assert "without the peer's authenticated end" in str(error)
    got, error = await attack(recorded)
    assert got == [0, 1, 2, 3] and error is None


async def test_bytes_after_the_end_of_stream_are_refused() -> None:
    encoder = Encoder(key=KEY)
    got, error = await attack([wire(encoder, 0), encoder.encode_end(), wire(encoder, 1)])
    assert got == [0] and isinstance(error, streampickle.ProtocolError) and "authenticated end" in str(error)
    decoder = Decoder(key=KEY)
    encoder = Encoder(key=KEY)
    decoder.feed(wire(encoder, 0) + encoder.encode_end())
    assert list(decoder) == [0] and decoder.ended
    with pytest.raises(streampickle.ProtocolError, match="authenticated end"):
        decoder.feed(b"\x93")


async def test_a_message_that_stands_alone_is_refused_in_a_stream() -> None:
    """What dumps (or dump) signs can be replayed at will, so a stream takes none of it."""
    got, error = await attack([streampickle.dumps("alone", key=KEY)])
    assert got == [] and isinstance(error, AuthenticationError) and "stands alone" in str(error)


def forged_header(claim: int) -> bytes:
    """A version-2 header claiming one side chunk of ``claim`` bytes, with a header tag made
    without the key."""
    header = streampickle._wire.pack_header(flags=1, chunk_count=1, pickle_length=100, version=2)
    return header + bytes(range(1, 9)) + bytes(8) + claim.to_bytes(8, "little") + bytes(32)


def test_a_forged_header_is_refused_before_memory_is_committed() -> None:
    """A peer without the key claims a 1 GiB side chunk and sends 8 MiB of it: the decoder
    refuses at the header tag, having committed nothing to the claim."""
    message = memoryview(forged_header(GiB) + bytes(100) + bytes(8 << 20))  # sliced without copies
    for stream in (True, False):
        decoder = Decoder(key=KEY, stream=stream)
        tracemalloc.start()
        try:
            with pytest.raises(AuthenticationError, match="header tag mismatch"):
                for start in range(0, len(message), 64 << 10):
                    decoder.feed(message[start : start + (64 << 10)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 << 10, peak
        assert decoder.progress[0] <= len(forged_header(GiB))  # not a byte past the header tag


async def test_a_peer_without_the_key_gets_nothing_past_the_header() -> None:
    """Over a socket: the keyed server reads the forged header, refuses it and drops the
    connection; the peer's 1 GiB claim costs the server nothing."""
    listener, port = await keyed_server()
    async with listener:
        attacker = await anyio.connect_tcp("127.0.0.1", port)
        victim = await listener.accept()
        async with attacker, victim:
            await attacker.send(forged_header(GiB) + bytes(1 << 20))
            with pytest.raises(AuthenticationError, match="header tag mismatch"):
                await victim.receive()
            assert victim._decoder.failed


async def test_a_send_cancelled_before_its_first_byte_takes_no_sequence_number() -> None:
    """A send cancelled while its bytes wait for the transport sent nothing: the stream goes
    on, and the next message takes the number the cancelled one had."""
    a, b = socket.socketpair()
    sender, receiver = ObjectStream.from_socket(a, key=KEY), ObjectStream.from_socket(b, key=KEY)
    async with sender, receiver:
        await sender.send("first")
        transport = sender._t
        entered = anyio.Event()
        original = transport.send_chunks

        async def stuck(chunks: list[Any]) -> None:
            entered.set()
            await anyio.sleep_forever()

        transport.send_chunks = stuck
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender.send, np.ones(1 << 20))  # side chunks: sent now, not with a burst
            await entered.wait()
            tg.cancel_scope.cancel()
        transport.send_chunks = original
        await sender.send("second")
        assert [await receiver.receive(), await receiver.receive()] == ["first", "second"]


async def test_sends_queued_behind_a_cancelled_one_keep_their_order() -> None:
    """Three tasks send; the one waiting in the middle of the queue is cancelled; the others
    arrive in order, numbered without a gap."""
    a, b = socket.socketpair()
    sender, receiver = ObjectStream.from_socket(a, key=KEY), ObjectStream.from_socket(b, key=KEY)
    big = np.ones(16 << 20, dtype=np.uint8)  # more than the socket holds: the first send waits
    async with sender, receiver, anyio.create_task_group() as tg:
        tg.start_soon(sender.send, big)
        await anyio.wait_all_tasks_blocked()
        doomed = anyio.CancelScope()
        tg.start_soon(_send_in, doomed, sender, "cancelled")
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(sender.send, "last")
        await anyio.wait_all_tasks_blocked()
        doomed.cancel()
        first = await receiver.receive()
        assert np.array_equal(first, big)
        assert await receiver.receive() == "last"


async def _send_in(scope: anyio.CancelScope, stream: ObjectStream, obj: Any) -> None:
    with scope:
        await stream.send(obj)


async def test_the_one_message_functions_still_take_a_key() -> None:
    """dump/load with a key: each message stands alone, as with dumps/loads; a keyed
    ObjectStream's end reads as EOFError in load()."""
    x, y = memory_stream_pair()
    for i in range(3):
        await streampickle.dump(i, x, key=KEY)
    assert [await streampickle.load(y, key=KEY) for _ in range(3)] == [0, 1, 2]
    stream = ObjectStream(x, key=KEY)
    await stream.send("from a stream")
    await stream.send_eof()
    assert await streampickle.load(y, key=KEY) == "from a stream"
    with pytest.raises(EOFError, match="authenticated end"):
        await streampickle.load(y, key=KEY)
