"""Receive deadlines (``Limits.max_header_seconds``, ``max_message_seconds``) over real TCP.

A peer that starts a message and stalls gets ``DeadlineExceededError`` naming the deadline, and
the stream is poisoned; a connection idle between messages is never timed out; under
``serve`` a crowd of slowloris peers is closed while a good client is answered. Every
assertion is about outcomes and counts, never about how long something took: timeouts only
guard against hangs, and the deadlines under test are short so the file runs in seconds.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import pytest

import streampickle
from streampickle import DeadlineExceededError, LimitExceededError, Limits, ObjectStream
from streampickle._wire import HEADER_SIZE, LENGTH_SIZE

pytestmark = pytest.mark.anyio

GUARD = 60  # seconds: only ever a hang's failure, never an assertion

ARRAY = np.arange(1000)
MESSAGE = streampickle.dumps(ARRAY)  # one side chunk: header, one length, pickle, the chunk
BODY_START = HEADER_SIZE + LENGTH_SIZE

# Short deadlines, the header's the shorter, so that hitting the wrong one shows.
SHORT = Limits(max_header_seconds=0.3, max_message_seconds=0.6)


# -- a receiving end over TCP, three ways ----------------------------------------------------------

Receive = Callable[[], Awaitable[Any]]


@pytest.fixture(params=["from_socket", "anyio_stream", "load"])
def receiver_kind(request: pytest.FixtureRequest) -> str:
    """streampickle's zero-copy socket path, ObjectStream over an anyio TCP stream, and
    ``load`` on an anyio TCP stream."""
    return request.param


async def tcp_pair(kind: str, limits: Limits) -> tuple[Receive, socket.socket, Any]:
    """``(receive, peer, closer)``: ``receive()`` reads one object on our end of a TCP
    connection; ``peer`` is a plain blocking socket at the other end that writes raw bytes."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        if kind == "from_socket":
            ours = socket.create_connection(("127.0.0.1", port))
            peer, _ = server.accept()
            stream = ObjectStream.from_socket(ours, limits=limits)
            return stream.receive, peer, stream
        anyio_stream = await anyio.connect_tcp("127.0.0.1", port)
        peer, _ = server.accept()  # the kernel completed the connection: no wait
        if kind == "anyio_stream":
            stream = ObjectStream(anyio_stream, limits=limits)
            return stream.receive, peer, stream
        return functools.partial(streampickle.load, anyio_stream, limits=limits), peer, anyio_stream
    finally:
        server.close()


async def test_a_stalled_header_hits_the_header_deadline(receiver_kind: str) -> None:
    receive, peer, closer = await tcp_pair(receiver_kind, SHORT)
    with peer:
        async with closer:
            peer.sendall(MESSAGE[:10])
            with anyio.fail_after(GUARD), pytest.raises(DeadlineExceededError) as info:
                await receive()
            exc = info.value
            assert (exc.limit, exc.seconds, exc.received) == ("max_header_seconds", 0.3, 10)
            assert isinstance(exc, LimitExceededError) and exc.poisons_stream
            text = str(exc)
            assert "Limits.max_header_seconds=0.3" in text and "10 of the" in text
            assert "limits=Limits(max_header_seconds=...)" in text
            if receiver_kind != "load":  # the stream is poisoned: the message is lost for good
                peer.sendall(MESSAGE[10:])
                with anyio.fail_after(GUARD), pytest.raises(DeadlineExceededError, match="can't be used again"):
                    await receive()


async def test_a_stalled_body_hits_the_message_deadline(receiver_kind: str) -> None:
    receive, peer, closer = await tcp_pair(receiver_kind, SHORT)
    with peer:
        async with closer:
            peer.sendall(MESSAGE[: BODY_START + 100])  # the whole header, part of the pickle
            with anyio.fail_after(GUARD), pytest.raises(DeadlineExceededError) as info:
                await receive()
            exc = info.value
            assert (exc.limit, exc.seconds, exc.received) == ("max_message_seconds", 0.6, BODY_START + 100)
            assert exc.expected == len(MESSAGE)
            assert "Limits.max_message_seconds=0.6" in str(exc)


async def test_an_idle_connection_between_messages_is_not_timed_out(receiver_kind: str) -> None:
    receive, peer, closer = await tcp_pair(receiver_kind, SHORT)
    with peer:
        async with closer:
            for i in range(2):
                if i:  # idle between the messages for longer than both deadlines
                    await anyio.sleep(SHORT.max_message_seconds + 0.2)
                peer.sendall(MESSAGE)
                with anyio.fail_after(GUARD):
                    assert np.array_equal(await receive(), ARRAY)


async def test_a_cancelled_receive_keeps_its_message_and_its_deadline() -> None:
    """Cancelling receive loses no bytes, and does not restart the message's clock."""
    receive, peer, closer = await tcp_pair("from_socket", SHORT)
    with peer:
        async with closer:
            peer.sendall(MESSAGE[:10])
            with anyio.move_on_after(0.05):
                await receive()
            with anyio.fail_after(GUARD), pytest.raises(DeadlineExceededError) as info:
                await receive()
            assert info.value.received == 10


def test_limits_take_positive_seconds_or_none() -> None:
    assert Limits().max_header_seconds == 30.0 and Limits().max_message_seconds == 600.0
    Limits(max_header_seconds=None, max_message_seconds=None)
    Limits(max_header_seconds=1, max_message_seconds=0.5)
    for bad in (0, -1.0, float("nan"), "30", True):
        with pytest.raises(ValueError, match="max_header_seconds"):
            Limits(max_header_seconds=bad)  # type: ignore[arg-type]


# -- under serve(): slowloris ------------------------------------------------------------------------

SLOW_PEERS = 200


async def echo(stream: ObjectStream) -> None:
    async for request in stream:
        await stream.send(("echo", request))


async def test_slowloris_peers_are_closed_while_a_good_client_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="streampickle")
    limits = Limits(max_header_seconds=1.0)
    started = 0
    closed = 0

    async def slowloris() -> None:
        """One byte of a header every 0.2 s, until the server closes the connection."""
        nonlocal started, closed
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream, anyio.create_task_group() as tg:

            async def dribble() -> None:
                nonlocal started
                try:
                    for i in range(len(MESSAGE)):
                        await stream.send(MESSAGE[i : i + 1])
                        if i == 0:
                            started += 1
                        await anyio.sleep(0.2)
                except (anyio.BrokenResourceError, OSError):
                    pass  # the server closed first; the receive below sees it too

            tg.start_soon(dribble)
            try:
                await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                closed += 1
            tg.cancel_scope.cancel()

    async def round_trip(client: ObjectStream, obj: Any) -> None:
        await client.send(obj)
        assert await client.receive() == ("echo", obj)

    with anyio.fail_after(GUARD):
        listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", limits=limits)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as server:
            server.start_soon(listener.serve, echo)
            async with await streampickle.connect_tcp("127.0.0.1", port) as client:
                await round_trip(client, "before")
                async with anyio.create_task_group() as peers:
                    for _ in range(SLOW_PEERS):
                        peers.start_soon(slowloris)
                    while started < SLOW_PEERS:  # noqa: ASYNC110 - a count the slow peers bump
                        await anyio.sleep(0.01)
                    await round_trip(client, "during")  # every slow peer has a message started
                assert closed == SLOW_PEERS
                await round_trip(client, "after")
            server.cancel_scope.cancel()

    refused = [r for r in caplog.records if "DeadlineExceededError" in r.getMessage()]
    assert len(refused) == SLOW_PEERS
    assert all(r.levelno == logging.WARNING and "max_header_seconds=1.0" in r.getMessage() for r in refused)
