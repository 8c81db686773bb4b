"""Faults of the channel and of the process, over real sockets and processes, each contained.

A peer resets its connection inside a side chunk, half-closes (between messages or inside one),
vanishes while we send it a large array, or never reads; a ``BaseException`` escapes a socket
write; a receive or send is cancelled at each of its await points; a TLS peer never finishes
its handshake; an array changes while it is sent with a key; an object can't be pickled; the
process runs out of file descriptors. Each fault ends the one connection it happened on with
a typed error (``anyio.BrokenResourceError`` for the transport's own failures,
:class:`IncompleteMessageError` for a peer that stopped inside a message, ``EncodeError``
before any byte for what can't be pickled), a stream that can't frame its next message any
more refuses to send, and the rest of the process goes on: a ``serve()``-based server answers
a normal client alongside and afterwards, and other connections are untouched.

No assertion is about how long something took. Where a fault must happen while a call is
blocked, the test waits for ``anyio.wait_all_tasks_blocked`` or for a message larger than any
socket buffer; timeouts (``GUARD``) only turn a hang into a failure.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.tls import TLSListener, TLSStream

import streampickle
from _pairs import _tls_contexts, tcp_anyio, tcp_owned, unix_owned
from streampickle import (
    AuthenticationError,
    IncompleteMessageError,
    Key,
    ObjectStream,
    StreamPickleError,
)
from streampickle.testing import memory_stream_pair
from test_serve import (  # noqa: F401
    address_of,
    closed_by_server,
    connect,
    listen,
    raw_peer,
    round_trip,
    transport,
)

pytestmark = pytest.mark.anyio

GUARD = 30  # seconds: only ever a hang's failure, never an assertion
MiB = 1 << 20

# A message with one side chunk, small enough that a blocking peer writes a prefix of it
# without waiting for the server to read.
ARRAY = np.arange(20_000, dtype=np.int64)  # 160 KB
ARRAY_MESSAGE = streampickle.dumps(ARRAY)
INSIDE_THE_CHUNK = len(ARRAY_MESSAGE) - ARRAY.nbytes // 2
BIG = np.ones(64 * MiB, dtype=np.uint8)  # more than both ends' socket buffers together


async def echo(stream: ObjectStream) -> None:
    async for request in stream:
        await stream.send(("echo", request))


def reporting(handler: Callable[[ObjectStream], Any], report: Any) -> Callable[[ObjectStream], Any]:
    """``handler``, with whatever ends it (an exception, or None) sent to ``report``: the
    test reads how each connection ended from there instead of from the log."""

    async def run(stream: ObjectStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            await report.send(exc)
            raise
        await report.send(None)

    return run


@asynccontextmanager
async def server(transport: str, handler: Callable[[ObjectStream], Any]) -> AsyncIterator[tuple[Any, Any]]:  # noqa: F811
    """A ``serve()``-based server running ``reporting(handler)``: yields its address and the
    stream on which each connection's end arrives."""
    report_send, report_receive = anyio.create_memory_object_stream[Any](100)
    listener = await listen(transport)
    address = address_of(listener)
    with report_send, report_receive:  # closed after: an unclosed one warns (ResourceWarning)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, reporting(handler, report_send))
            yield address, report_receive
            tg.cancel_scope.cancel()


async def next_end(report: Any) -> BaseException | None:
    with anyio.fail_after(GUARD):
        return await report.receive()


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on, timeout 0); a Unix socket just closes."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


# =============================================================================================
# A peer resetting or half-closing its connection
# =============================================================================================


async def test_a_reset_inside_a_side_chunk_ends_that_connection_alone(transport: str) -> None:  # noqa: F811
    """On TCP the kernel reports the reset (``BrokenResourceError`` from ``ECONNRESET``), or,
    when the reset is processed before the server's first read of the connection, an end
    inside the message (``IncompleteMessageError``); a Unix socket has no reset and always
    ends that way. Either is logged as a lost connection."""
    async with server(transport, echo) as (address, report):
        good = await connect(address)
        await round_trip(good, "before")

        bad = raw_peer(address)
        bad.sendall(ARRAY_MESSAGE[:INSIDE_THE_CHUNK])
        reset(bad)
        error = await next_end(report)
        if isinstance(error, anyio.BrokenResourceError):
            assert transport == "tcp", repr(error)
            assert isinstance(error.__cause__, ConnectionResetError), repr(error.__cause__)
        else:
            assert isinstance(error, IncompleteMessageError), repr(error)
            assert (error.received, error.expected) == (INSIDE_THE_CHUNK, len(ARRAY_MESSAGE))

        await round_trip(good, "after")  # the same connection, untouched
        async with await connect(address) as another:  # and serve() still accepts
            await round_trip(another, "new")
        await good.aclose()
        assert await next_end(report) is None


async def collect_then_answer(stream: ObjectStream) -> None:
    """Read until the peer's end of stream, then answer: what arrived, in order."""
    got = [item async for item in stream]
    await stream.send(("got", len(got)))
    for item in got:
        await stream.send(item)


async def test_a_half_close_after_whole_messages_ends_receiving_cleanly_and_replies_still_flow(
    transport: str,  # noqa: F811
) -> None:
    async with server(transport, collect_then_answer) as (address, report):
        sent = ["one", ARRAY, {"three": 3}]
        async with await connect(address) as client:
            for item in sent:
                await client.send(item)
            await client.send_eof()
            with anyio.fail_after(GUARD):
                assert await client.receive() == ("got", 3)
                assert await client.receive() == "one"
                assert np.array_equal(await client.receive(), ARRAY)
                assert await client.receive() == {"three": 3}
                with pytest.raises(anyio.EndOfStream):  # the server closed after answering
                    await client.receive()
            # our own half-close stays: sending again is an error (EPIPE on the socket path)
            with pytest.raises((anyio.ClosedResourceError, anyio.BrokenResourceError)):
                await client.send("after eof")
        assert await next_end(report) is None  # a clean end for the server's handler too

        async with await connect(address) as another:
            await another.send("new")
            await another.send_eof()
            with anyio.fail_after(GUARD):
                assert await another.receive() == ("got", 1)


async def test_a_half_close_inside_a_message_is_an_incomplete_message(transport: str) -> None:  # noqa: F811
    async with server(transport, echo) as (address, report):
        good = await connect(address)
        await round_trip(good, "before")

        bad = raw_peer(address)
        bad.sendall(ARRAY_MESSAGE[:INSIDE_THE_CHUNK])
        bad.shutdown(socket.SHUT_WR)  # still open for reading
        error = await next_end(report)
        assert isinstance(error, IncompleteMessageError), repr(error)
        assert (error.received, error.expected) == (INSIDE_THE_CHUNK, len(ARRAY_MESSAGE))
        await closed_by_server(bad)  # and the server closed its end
        bad.close()

        await round_trip(good, "after")
        await good.aclose()


# =============================================================================================
# The peer is gone while we send (EPIPE, ECONNRESET)
# =============================================================================================


async def echo_or_big(stream: ObjectStream) -> None:
    """Echo, except that ``"big"`` is answered with BIG and then once more with "after": the
    failures of both sends end the handler (as an ExceptionGroup) if the peer is gone."""
    async for request in stream:
        if request != "big":
            await stream.send(("echo", request))
            continue
        errors = []
        for item in (BIG, "after"):
            try:
                await stream.send(item)
            except anyio.BrokenResourceError as exc:
                errors.append(exc)
        raise ExceptionGroup("sends to a peer that is gone", errors) if errors else AssertionError("both went out")


def test_python_ignores_sigpipe_so_a_write_to_a_closed_socket_is_an_error_not_a_death() -> None:
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN


async def test_a_peer_gone_during_a_large_send_breaks_that_stream_alone(transport: str) -> None:  # noqa: F811
    async with server(transport, echo_or_big) as (address, report):
        good = await connect(address)
        await round_trip(good, "before")
        peer = raw_peer(address)
        peer.sendall(streampickle.dumps("big"))
        peer.close()  # without reading: the server's writes fail with EPIPE or ECONNRESET
        group = await next_end(report)
        assert isinstance(group, ExceptionGroup) and len(group.exceptions) == 2, repr(group)
        first, second = group.exceptions
        assert isinstance(first.__cause__, (BrokenPipeError, ConnectionResetError)), repr(first.__cause__)
        # refused: the earlier send broke the stream (TCP, where the kernel took part of BIG)
        # or the connection is still gone (Unix, EPIPE before BIG's first byte)
        assert isinstance(second, anyio.BrokenResourceError), repr(second)

        await round_trip(good, "after")  # a connection made before the fault is untouched
        async with await connect(address) as another:  # and serve() still accepts
            await round_trip(another, "new")
        await good.aclose()


SIGPIPE_DEFAULT_SENDER = textwrap.dedent(
    """
    import signal, socket, sys
    import anyio, numpy as np, streampickle

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a program that pipes to `head` does

    async def main():
        a, b = socket.socketpair()
        stream = streampickle.ObjectStream.from_socket(a)
        b.close()
        try:
            await stream.send(np.ones(1 << 22, dtype=np.uint8))
        except anyio.BrokenResourceError as exc:
            print("BROKEN", type(exc.__cause__).__name__, flush=True)

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("sender_backend", ["asyncio", "trio"])
async def test_a_process_with_sigpipe_at_its_default_survives_writing_to_a_closed_peer(sender_backend: str) -> None:
    with anyio.fail_after(GUARD):
        result = await anyio.run_process(
            [sys.executable, "-c", SIGPIPE_DEFAULT_SENDER, sender_backend], check=False
        )
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr.decode()}"
    assert result.stdout.startswith(b"BROKEN BrokenPipeError")


# =============================================================================================
# A BaseException (or BufferError) escaping a transport write
# =============================================================================================


class Abort(BaseException):
    """A BaseException that is neither cancellation nor an Exception: how a framework aborts."""


FAULTS = {"base-exception": Abort, "keyboard-interrupt": KeyboardInterrupt, "buffer-error": BufferError}


class FaultySocket(socket.socket):
    """A socket whose writes can be made to fail once. ``fault`` is ``(how, count, exc)``:

    * ``"partial"``: the next write takes only ``count`` bytes (and says so), the one after
      raises ``exc``: the fault lands after part of the message reached the kernel;
    * ``"before"``: the next write raises ``exc`` before the system call;
    * ``"taken"``: the next write hands ``count`` bytes to the kernel, then raises ``exc``
      before returning (as a signal handler's ``KeyboardInterrupt`` can).
    """

    fault: tuple[str, int, BaseException] | None = None

    def _faulty_write(self, data: Any) -> int | None:
        """What the faulty write returns, or None if there is no fault armed."""
        if self.fault is None:
            return None
        how, count, exc = self.fault
        if how == "partial":
            self.fault = ("before", 0, exc)
            return socket.socket.send(self, memoryview(data).cast("B")[:count])
        self.fault = None
        if how == "taken":
            socket.socket.send(self, memoryview(data).cast("B")[:count])
        raise exc

    def send(self, data: Any, *args: Any) -> int:
        n = self._faulty_write(data)
        return socket.socket.send(self, data, *args) if n is None else n

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        n = self._faulty_write(buffers[0])
        return socket.socket.sendmsg(self, buffers, *args) if n is None else n


class FaultyByteStream(ByteStream):
    """An anyio byte stream whose next ``send`` raises ``fault`` once, before the inner one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fault: tuple[int, BaseException] | None = None  # (sends that go through first, raise)

    async def send(self, item: Any) -> None:
        if self.fault is not None:
            passes, exc = self.fault
            if passes == 0:
                self.fault = None
                raise exc
            self.fault = (passes - 1, exc)
        await self.inner.send(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.inner.receive(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self.inner.extra_attributes


async def faulty_pair(path: str) -> tuple[ObjectStream, ObjectStream, Any]:
    """``(sender, receiver, faulty)``: the sender writes through ``faulty``, a raw socket
    (streampickle's zero-copy path) or an anyio TCP stream (the copying path)."""
    if path == "socket":
        a, b = socket.socketpair()
        faulty = FaultySocket(a.family, a.type, fileno=a.detach())
        return ObjectStream.from_socket(faulty), ObjectStream.from_socket(b), faulty
    client, server_ = await tcp_anyio()
    faulty = FaultyByteStream(client.transport_stream)
    return ObjectStream(faulty), server_, faulty


def arm(path: str, faulty: Any, exc: BaseException, *, after_part: bool) -> None:
    """Make the sender's next message fail with ``exc``: after part of it was written, or (on
    the socket path) before its first byte."""
    if path == "socket":
        faulty.fault = ("partial", 10, exc) if after_part else ("before", 0, exc)
    else:
        faulty.fault = (1 if after_part else 0, exc)  # the header and pickle go through first


async def assert_peer_gets_only(receiver: ObjectStream, *expected: Any) -> None:
    """The receiver gets ``expected`` whole, then the sender's partial message ends it."""
    with anyio.fail_after(GUARD):
        for item in expected:
            assert await receiver.receive() == item
        with pytest.raises(IncompleteMessageError):
            await receiver.receive()


async def other_connections_still_work() -> None:
    a, b = await unix_owned()
    async with a, b:
        await a.send("unaffected")
        with anyio.fail_after(GUARD):
            assert await b.receive() == "unaffected"


@pytest.mark.parametrize("path", ["socket", "anyio-stream"])
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_base_exception_inside_a_write_aborts_the_stream(path: str, fault: str) -> None:
    """The fault interrupts a large message after its first bytes went out: it propagates
    as it is, the stream is broken for sending, and nothing is written after the partial
    message, so the peer sees an incomplete message, never a wrong object."""
    sender, receiver, faulty = await faulty_pair(path)
    async with sender, receiver:
        await sender.send("before")
        arm(path, faulty, FAULTS[fault](), after_part=True)
        with pytest.raises(FAULTS[fault]):
            await sender.send(np.ones(3 * MiB, dtype=np.uint8))
        for later in ("after", np.zeros(3 * MiB, dtype=np.uint8)):
            with pytest.raises(anyio.BrokenResourceError):
                await sender.send(later)
        await sender.aclose()
        await assert_peer_gets_only(receiver, "before")
    await other_connections_still_work()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_base_exception_before_a_messages_first_byte_still_aborts_the_socket_stream(fault: str) -> None:
    """Only a cancellation lands where the count of bytes the kernel took is exact (at an
    await); any other exception out of a write may have come after the kernel took bytes and
    before they were counted, so it aborts the send side even when the count says 0; the
    peer gets the messages before it."""
    sender, receiver, faulty = await faulty_pair("socket")
    async with sender, receiver:
        await sender.send("before")
        arm("socket", faulty, FAULTS[fault](), after_part=False)
        with pytest.raises(FAULTS[fault]):
            await sender.send(np.ones(3 * MiB, dtype=np.uint8))
        with pytest.raises(anyio.BrokenResourceError):
            await sender.send("after")
        await sender.aclose()
        with anyio.fail_after(GUARD):  # no byte of the message went out: a plain end
            assert await receiver.receive() == "before"
            with pytest.raises(anyio.EndOfStream):
                await receiver.receive()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_base_exception_after_the_kernel_took_the_first_bytes_aborts_the_stream(fault: str) -> None:
    sender, receiver, faulty = await faulty_pair("socket")
    async with sender, receiver:
        faulty.fault = ("taken", 5, FAULTS[fault]())  # a small message: one send(), 5 bytes taken
        with pytest.raises(FAULTS[fault]):
            await sender.send("a message the peer gets 5 bytes of")
        with pytest.raises(anyio.BrokenResourceError):
            await sender.send("after")
        await sender.aclose()
        await assert_peer_gets_only(receiver)


# =============================================================================================
# Cancellation at every await point of receive and send
# =============================================================================================


class CancelAt(ByteStream):
    """An anyio byte stream that cancels ``scope`` at its ``countdown``-th call to ``receive``
    or ``send`` (counting from 0), before that call touches the inner stream. Receives return
    at most ``piece`` bytes, so that one message takes many of them."""

    def __init__(self, inner: Any, piece: int = 1 << 30) -> None:
        self.inner = inner
        self.piece = piece
        self.countdown: int | None = None
        self.scope: anyio.CancelScope | None = None

    async def _await_point(self) -> None:
        if self.countdown is None:
            return
        if self.countdown == 0:
            self.countdown = None
            assert self.scope is not None
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()  # raises the cancellation
        else:
            self.countdown -= 1

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await self._await_point()
        return await self.inner.receive(min(max_bytes, self.piece))

    async def send(self, item: Any) -> None:
        await self._await_point()
        await self.inner.send(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return {}


CANCEL_OBJECT = {"a": np.arange(40, dtype=np.int64), "b": np.ones((3, 5)), "s": "x" * 60}
MAX_POINTS = 1000  # more than any message below takes: the loops end long before


def assert_same_object(got: Any) -> None:
    assert got.keys() == CANCEL_OBJECT.keys()
    assert np.array_equal(got["a"], CANCEL_OBJECT["a"]) and np.array_equal(got["b"], CANCEL_OBJECT["b"])
    assert got["s"] == CANCEL_OBJECT["s"]


@pytest.mark.parametrize("key", [None, b"k"], ids=["unkeyed", "keyed"])
async def test_a_receive_cancelled_at_any_await_point_resumes_with_the_same_message(key: bytes | None) -> None:
    """Cancelled before the first header byte, inside the header, the pickle, a side chunk
    or the tag: the next receive returns that message whole, then the one after it."""
    encoder = streampickle.Encoder(key=key)  # one sender: keyed messages in sequence
    wire = b"".join(bytes(c) for item in (CANCEL_OBJECT, "next") for c in encoder.encode(item))
    cancelled = 0
    for point in range(MAX_POINTS):
        ours, theirs = memory_stream_pair(max_buffered_sends=4)
        stream = CancelAt(ours, piece=16)
        receiver = ObjectStream(stream, key=key)
        await theirs.send(wire)
        with anyio.CancelScope() as scope:
            stream.scope, stream.countdown = scope, point
            got = await receiver.receive()
        if not scope.cancelled_caught:
            assert_same_object(got)
            break
        cancelled += 1
        with anyio.fail_after(GUARD):
            assert_same_object(await receiver.receive())
            assert await receiver.receive() == "next"
    assert cancelled > len(wire) // 16 // 2, cancelled  # it was cut at every read of the first message


@pytest.mark.parametrize("key", [None, b"k"], ids=["unkeyed", "keyed"])
async def test_a_send_cancelled_at_any_await_point_is_harmless_or_breaks_the_stream(key: bytes | None) -> None:
    """A message of several pieces (three side chunks, one over a send slice), cut at each
    write: either nothing of it went out and the stream goes on, or the stream is broken and
    the peer sees an incomplete message (or nothing); never a wrong object, and never a later
    message after part of this one."""
    obj = [np.arange(300_000), np.ones(10), "tail"]  # 2.4 MB: three 1 MiB slices and more
    cancelled = 0
    for point in range(MAX_POINTS):
        ours, theirs = memory_stream_pair(max_buffered_sends=100)
        stream = CancelAt(ours)
        sender, receiver = ObjectStream(stream, key=key), ObjectStream(theirs, key=key)
        with anyio.CancelScope() as scope:
            stream.scope, stream.countdown = scope, point
            await sender.send(obj)
        if not scope.cancelled_caught:
            got = await receiver.receive()
            assert np.array_equal(got[0], obj[0]) and got[2] == "tail"
            break
        cancelled += 1
        try:
            await sender.send("after")
            broken = False
        except anyio.BrokenResourceError:
            broken = True
        await sender.aclose()
        with anyio.fail_after(GUARD):
            if broken:
                # incomplete, or (keyed) an end the sender did not authenticate
                with pytest.raises((StreamPickleError, anyio.EndOfStream)):
                    await receiver.receive()
            else:
                assert await receiver.receive() == "after"
    assert cancelled >= 4, cancelled


@pytest.mark.parametrize("pair", ["tcp-owned", "unix-owned", "tcp-anyio", "memory"])
async def test_a_cancelled_close_still_closes_and_closing_twice_is_a_no_op(pair: str) -> None:
    makers = {**BLOCKING_PAIRS, "memory": memory_pair}
    a, b = await makers[pair]()
    async with b:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await a.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await a.send("after close")
        with pytest.raises(anyio.ClosedResourceError):
            await a.receive()
        await a.aclose()  # a second close is a no-op
        with anyio.fail_after(GUARD), pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await b.receive()  # the peer sees the end


async def memory_pair() -> tuple[ObjectStream, ObjectStream]:
    a, b = memory_stream_pair()
    return ObjectStream(a), ObjectStream(b)


# =============================================================================================
# A peer that never reads (a zero window)
# =============================================================================================

BLOCKING_PAIRS = {"tcp-owned": tcp_owned, "unix-owned": unix_owned, "tcp-anyio": tcp_anyio}


@pytest.mark.parametrize("how", ["move_on_after", "fail_after"])
@pytest.mark.parametrize("pair", list(BLOCKING_PAIRS))
async def test_a_send_to_a_peer_that_never_reads_blocks_and_the_caller_can_bound_it(
    pair: str, how: str, anyio_backend: Any
) -> None:
    """The send blocks (backpressure) rather than queueing: the sender's memory doesn't grow
    with the message. The caller's timeout ends it; a partly written message (the usual case;
    on a starved machine the timeout may come before the first byte) leaves the stream
    broken and the peer with an incomplete message; an unwritten one leaves it usable."""
    if pair == "tcp-anyio" and isinstance(anyio_backend, tuple):
        pytest.skip("anyio's TCP streams on uvloop read without backpressure (see test_conformance)")
    a, b = await BLOCKING_PAIRS[pair]()
    async with a, b:
        await a.send("warm-up")  # anyio's asyncio streams read eagerly until the first receive
        assert await b.receive() == "warm-up"
        tracemalloc.start()
        try:
            if how == "move_on_after":
                with anyio.move_on_after(0.2) as scope:
                    await a.send(BIG)
                assert scope.cancelled_caught, "64 MiB went out with nobody reading"
            else:
                with pytest.raises(TimeoutError):
                    with anyio.fail_after(0.2):
                        await a.send(BIG)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # the zero-copy path copies nothing; a copying transport holds at most a slice or two
        assert peak < 8 * MiB, f"the blocked send allocated {peak} bytes for a {BIG.nbytes}-byte message"
        try:
            await a.send("after")  # 64 MiB can't have gone out whole: at most part of it
            broken = False
        except anyio.BrokenResourceError:
            broken = True
        await a.aclose()
        if broken:
            await assert_peer_gets_only(b)
        else:
            with anyio.fail_after(GUARD):
                assert await b.receive() == "after"


# =============================================================================================
# A TLS peer that never completes its handshake
# =============================================================================================


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_tls_handshake_that_never_completes_is_closed_while_others_are_served() -> None:
    """streampickle runs over any anyio byte stream and leaves TLS to anyio: its
    ``TLSListener`` closes a connection whose handshake outlasts ``handshake_timeout``
    (30 s by default) while the server answers a TLS client alongside."""
    server_ctx, client_ctx = _tls_contexts()
    raw = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = raw.extra(SocketAttribute.local_port)
    listener = TLSListener(raw, server_ctx, standard_compatible=False, handshake_timeout=1.0)

    async def handler(stream: Any) -> None:
        async with ObjectStream(stream) as objects:
            await echo(objects)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        silent = socket.create_connection(("127.0.0.1", port))  # connects, then says nothing
        tcp = await anyio.connect_tcp("127.0.0.1", port)
        tls = await TLSStream.wrap(tcp, hostname="localhost", ssl_context=client_ctx, standard_compatible=False)
        good = ObjectStream(tls)
        await round_trip(good, "during")
        await closed_by_server(silent)  # the handshake deadline passed: the server hung up
        silent.close()
        await round_trip(good, "after")
        await good.aclose()
        tg.cancel_scope.cancel()
    await raw.aclose()


# =============================================================================================
# An array changed while it is sent, with a key
# =============================================================================================


class RecordingMac:
    """Wraps the sender's MAC: keeps a copy of every byte it hashed, as it hashed it."""

    def __init__(self, mac: Any, record: bytearray) -> None:
        self._mac = mac
        self._record = record

    def update(self, data: Any) -> None:
        self._record += bytes(data)
        self._mac.update(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mac, name)


async def keyed_pair(pair: str, key: Key) -> tuple[ObjectStream, ObjectStream]:
    if pair == "tcp-anyio":
        a, b = await tcp_anyio()
        return ObjectStream(a.transport_stream, key=key), ObjectStream(b.transport_stream, key=key)
    if pair == "tcp-owned":
        listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", key=key)
    else:
        listener = await streampickle.create_unix_listener(os.path.join(tempfile.mkdtemp(), "sock"), key=key)
    address = address_of(listener)
    async with listener:
        if pair == "tcp-owned":
            a = await streampickle.connect_tcp(*address, key=key)
        else:
            a = await streampickle.connect_unix(address, key=key)
        b = await listener.accept()
    return a, b


@pytest.mark.parametrize("pair", list(BLOCKING_PAIRS))
async def test_an_array_changed_while_it_is_sent_is_never_accepted_unlike_its_mac(
    pair: str, anyio_backend: Any
) -> None:
    """The sender blocks inside a keyed 32 MiB array (the peer isn't reading yet), and the
    array is then overwritten. Whatever went out, the receiver accepts only bytes that are
    exactly what the MAC hashed: on the zero-copy path the rest of the slice being sent
    differs from what was hashed, so the tag must fail."""
    if pair == "tcp-anyio" and isinstance(anyio_backend, tuple):
        pytest.skip("anyio's TCP streams on uvloop read without backpressure (see test_conformance)")
    a, b = await keyed_pair(pair, Key(b"mutation test key"))
    hashed = bytearray()
    encode_unsigned = a._encoder.encode_unsigned

    def recording(obj: Any) -> Any:
        chunks, mac = encode_unsigned(obj)
        return chunks, (RecordingMac(mac, hashed) if mac is not None else None)

    a._encoder.encode_unsigned = recording  # type: ignore[method-assign]
    array = np.zeros(32 * MiB, dtype=np.uint8)
    async with a, b:
        await a.send("warm-up")
        assert await b.receive() == "warm-up"
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, array)
            with anyio.fail_after(GUARD):
                await anyio.wait_all_tasks_blocked()  # the send waits for room in the kernel
            assert hashed, "the send had not started"
            array[:] = 0xFF  # every byte changes
            with anyio.fail_after(GUARD):
                try:
                    got = await b.receive()
                except AuthenticationError:
                    got = None
        if got is not None:
            assert pair == "tcp-anyio", "the zero-copy path sent bytes that differ from the hashed ones"
            assert got.tobytes() == bytes(hashed[-array.nbytes:])


# =============================================================================================
# Sender-side faults: pickling fails, nothing reaches the wire
# =============================================================================================


class RaisesInReduce:
    def __reduce__(self) -> Any:
        raise RuntimeError("refuses to be pickled")


class NonContiguousBuffer:
    """Reduces to a ``PickleBuffer`` over every other byte of a bytearray."""

    def __reduce_ex__(self, protocol: int) -> Any:
        return bytearray, (pickle.PickleBuffer(memoryview(bytearray(range(100)))[::2]),)


def _deep_list(depth: int) -> list[Any]:
    deep: list[Any] = []
    for _ in range(depth):
        deep = [deep]
    return deep


UNSENDABLE = {
    "reduce-raises-after-a-buffer": lambda: [bytearray(100_000), RaisesInReduce()],
    "lambda": lambda: (lambda: 0),
    "lock": lambda: threading.Lock(),
    "socket": lambda: socket.socket(),
    "generator": lambda: (x for x in ()),
    "too-deep-for-the-pickler": lambda: _deep_list(100_000),
    "non-contiguous-picklebuffer": lambda: NonContiguousBuffer(),
}


@pytest.mark.parametrize("what", list(UNSENDABLE))
async def test_an_unpicklable_object_raises_before_any_byte_and_the_stream_goes_on(what: str) -> None:
    """EncodeError (a ``pickle.PicklingError``, the cause chained) before a byte is written:
    the peer's socket holds nothing, buffers the pickler collected are released, and the next
    message goes out normally."""
    obj = UNSENDABLE[what]()
    if what == "reduce-raises-after-a-buffer":  # the bytearray goes out of band first
        data, obj = obj[0], [pickle.PickleBuffer(obj[0]), obj[1]]
    a, b = socket.socketpair()
    sender = ObjectStream.from_socket(a)
    async with sender:
        with pytest.raises(streampickle.EncodeError) as info:
            await sender.send(obj)
        assert isinstance(info.value, pickle.PicklingError) and info.value.__cause__ is not None
        if what == "too-deep-for-the-pickler":
            assert isinstance(info.value.__cause__, RecursionError)
        with pytest.raises(BlockingIOError):
            b.recv(1, socket.MSG_DONTWAIT)  # zero bytes on the wire
        if what == "reduce-raises-after-a-buffer":
            data.append(0)  # resizing works: the encoder released its view of the buffer
        await sender.send("next")
        receiver = ObjectStream.from_socket(b)
        async with receiver:
            with anyio.fail_after(GUARD):
                assert await receiver.receive() == "next"
    if isinstance(obj, socket.socket):
        obj.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_message_over_the_streams_limits_is_refused_before_any_byte() -> None:
    """Both ends configured with the same limits: the safe outcome is an EncodeError at the
    sender, before a byte is written, instead of the peer refusing the message's header and
    hanging up on it."""
    limits = streampickle.Limits(max_message_size=1 * MiB)
    a, b = socket.socketpair()
    sender, peer = ObjectStream.from_socket(a, limits=limits), ObjectStream.from_socket(b, limits=limits)
    async with sender, peer:
        with anyio.fail_after(GUARD):
            with pytest.raises(streampickle.EncodeError, match="max_message_size"):
                await sender.send(np.ones(2 * MiB, dtype=np.uint8))
            await sender.send("within the limits")  # the stream goes on
            await sender.send_eof()
            assert await peer.receive() == "within the limits"  # not a byte of the refused one
            with pytest.raises(anyio.EndOfStream):
                await peer.receive()


# =============================================================================================
# Out of file descriptors
# =============================================================================================

OUT_OF_FDS = textwrap.dedent(
    """
    import errno, os, resource, sys, tempfile
    import anyio, streampickle
    from anyio.abc import SocketAttribute

    async def echo(stream):
        async for obj in stream:
            await stream.send(obj)

    async def main(kind):
        if kind == "tcp":
            listener = await streampickle.create_tcp_listener(local_host="127.0.0.1")
            port = listener.extra(SocketAttribute.local_port)
            connect = lambda: streampickle.connect_tcp("127.0.0.1", port)
        else:
            path = os.path.join(tempfile.mkdtemp(), "sock")
            listener = await streampickle.create_unix_listener(path)
            connect = lambda: streampickle.connect_unix(path)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)
            client = await connect()
            await client.send("warm")
            assert await client.receive() == "warm"
            # take every descriptor left under a lowered limit
            highest = max(int(name) for name in os.listdir("/proc/self/fd"))
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
            fillers = []
            try:
                while True:
                    fillers.append(os.dup(0))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
            try:
                await connect()
            except OSError as exc:
                print("CONNECT", type(exc).__name__, errno.errorcode.get(exc.errno), exc, flush=True)
            else:
                print("CONNECT succeeded", flush=True)
            await client.send("existing")
            print("EXISTING", await client.receive(), flush=True)
            for fd in fillers:
                os.close(fd)
            async with await connect() as again:
                await again.send("new")
                print("NEW", await again.receive(), flush=True)
            await client.aclose()
            tg.cancel_scope.cancel()

    backend, kind = sys.argv[1:]
    if backend == "uvloop":
        anyio.run(main, kind, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, kind, backend=backend)
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds its descriptors in /proc/self/fd")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("process_backend", ["asyncio", "uvloop", "trio"])
async def test_a_connect_out_of_descriptors_is_a_clear_oserror_and_existing_connections_go_on(
    process_backend: str, transport: str  # noqa: F811
) -> None:
    """A real process at its RLIMIT_NOFILE: connecting fails at once with ``OSError``
    (``EMFILE``), the connection it already has (client and server ends, in the same
    process) still round-trips, and once descriptors are freed it connects again. (The
    server side, ``accept`` failing with ``EMFILE``, is test_serve's.)"""
    with anyio.fail_after(GUARD):
        result = await anyio.run_process(
            [sys.executable, "-c", OUT_OF_FDS, process_backend, transport], check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("CONNECT OSError EMFILE [Errno 24] Too many open files"), lines
    assert lines[1:] == ["EXISTING existing", "NEW new"]


class _AbortFailsAfterClose(ByteStream):
    """An anyio socket stream whose ``aclose`` fails as anyio's asyncio one can: it closes the
    socket, then the transport's abort raises AttributeError (asyncio 3.11 after a close that
    flushed the last buffered bytes of a cancelled send during anyio's one yield). With
    ``closes=False`` the socket stays open: an AttributeError that means something else."""

    def __init__(self, sock: socket.socket, closes: bool) -> None:
        self.sock = sock
        self.closes = closes

    async def send(self, item: Any) -> None:
        self.sock.sendall(item)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return self.sock.recv(max_bytes)

    async def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if self.closes:
            self.sock.close()
        raise AttributeError("'NoneType' object has no attribute 'call_soon'")

    @property
    def extra_attributes(self) -> Any:
        return {SocketAttribute.raw_socket: lambda: self.sock}


async def test_aclose_over_a_stream_whose_close_fails_after_closing_the_socket() -> None:
    a, b = socket.socketpair()
    with b:
        stream = ObjectStream(_AbortFailsAfterClose(a, closes=True))
        await stream.send([1, 2])
        await stream.aclose()  # the socket is closed: the close did its work
        assert a.fileno() == -1
        assert streampickle.loads(b.recv(1 << 16)) == [1, 2]
    c, d = socket.socketpair()
    with c, d, pytest.raises(AttributeError):  # the socket is still open: not that failure
        await ObjectStream(_AbortFailsAfterClose(c, closes=False)).aclose()
