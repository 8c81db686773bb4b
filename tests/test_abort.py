"""ObjectStream.abort(): closing at once, without awaiting and without a goodbye."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import numpy as np
import pytest

import streampickle
from streampickle import ObjectStream
from streampickle.testing import memory_stream_pair

pytestmark = pytest.mark.anyio

BACKENDS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


async def test_abort_wakes_a_blocked_receive_and_the_peer_sees_the_end(anyio_backend: Any) -> None:
    a, b = socket.socketpair()
    left, right = ObjectStream.from_socket(a), ObjectStream.from_socket(b)
    async with right:
        errors: list[BaseException] = []

        async def receive() -> None:
            try:
                await left.receive()
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            left.abort()
        assert len(errors) == 1 and isinstance(errors[0], anyio.ClosedResourceError)
        assert a.fileno() == -1  # the socket is closed, not just marked
        with pytest.raises(anyio.EndOfStream):
            await right.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await left.send(1)
        left.abort()  # twice: nothing
        await left.aclose()  # and aclose after it: nothing


async def test_abort_in_the_middle_of_a_large_send_cuts_the_message(anyio_backend: Any) -> None:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        sender = await streampickle.connect_tcp("127.0.0.1", port)
        receiver = await listener.accept()
        async with receiver:
            array = np.ones(64 << 20, dtype=np.uint8)  # far more than the socket buffers hold
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    async def send() -> None:
                        with pytest.raises(anyio.ClosedResourceError):
                            await sender.send(array)

                    tg.start_soon(send)
                    await anyio.wait_all_tasks_blocked()
                    sender.abort()
                with pytest.raises(streampickle.IncompleteMessageError):
                    await receiver.receive()


async def test_abort_with_a_key_sends_no_authenticated_end(anyio_backend: Any) -> None:
    a, b = socket.socketpair()
    key = streampickle.Key(b"k" * 32)
    left, right = ObjectStream.from_socket(a, key=key), ObjectStream.from_socket(b, key=key)
    async with right:
        await left.send("last")
        left.abort()
        assert await right.receive() == "last"
        with pytest.raises(streampickle.AuthenticationError, match="without the peer's authenticated end"):
            await right.receive()  # a cut, not a clean end


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_abort_on_an_asyncio_stream_pair(anyio_backend: Any) -> None:
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    left = ObjectStream((reader, writer))
    right = ObjectStream.from_socket(b)
    async with right:
        await left.send({"n": 1})
        assert await right.receive() == {"n": 1}
        left.abort()
        assert writer.transport.is_closing()
        with pytest.raises(anyio.EndOfStream):
            await right.receive()


async def test_abort_refuses_a_stream_it_cant_close_at_once(anyio_backend: Any) -> None:
    x, y = memory_stream_pair()
    left = ObjectStream(x)
    async with left, ObjectStream(y) as right:
        with pytest.raises(streampickle.UsageError, match="aclose"):
            left.abort()
        await left.send("still open")  # refused, so left as it was
        assert await right.receive() == "still open"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_abort_where_no_event_loop_runs_still_closes_the_socket(backend: str) -> None:
    """A finalizer (the dask comm's for a dangling stream), another thread, or code after the
    event loop ended may abort a stream: no task there can wait on it, and the socket closes."""
    name, options = BACKENDS[backend]
    a, b = socket.socketpair()
    stream, peer = ObjectStream.from_socket(b), ObjectStream.from_socket(a)

    async def converse() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.receive)
            await anyio.wait_all_tasks_blocked()
            await peer.send("after a wait")

    anyio.run(converse, backend=name, backend_options=options)
    stream.abort()  # no loop runs here now
    assert b.fileno() == -1
    a.close()

    c, d = socket.socketpair()
    stream = ObjectStream.from_socket(d)

    async def abort_from_a_thread() -> None:
        await anyio.to_thread.run_sync(stream.abort)

    anyio.run(abort_from_a_thread, backend=name, backend_options=options)
    assert d.fileno() == -1
    assert c.recv(1) == b""  # the peer sees the end
    c.close()
