"""Coalesced writes on streampickle's sockets: on asyncio and uvloop, the small messages of a
burst of sends go out together in one write when the sending task next yields. What must hold:
fewer system calls, no added latency for the first send after a wait, nothing lost or
reordered, and errors and closing behave as if each message had been written at once."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from streampickle import IncompleteMessageError, ObjectStream

pytestmark = pytest.mark.anyio


class CountingSocket(socket.socket):
    """A real socket that counts the system calls that write to it."""

    writes = 0

    def send(self, data: Any, *args: Any) -> int:
        self.writes += 1
        return super().send(data, *args)

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        self.writes += 1
        return super().sendmsg(buffers, *args)


def counting_pair() -> tuple[CountingSocket, ObjectStream, ObjectStream]:
    a, b = socket.socketpair()
    counted = CountingSocket(fileno=a.detach())
    return counted, ObjectStream.from_socket(counted), ObjectStream.from_socket(b)


def coalesces(anyio_backend: Any) -> bool:
    return anyio_backend != "trio"  # trio's loop takes no callbacks: each message is one write


def message(i: int) -> dict[str, Any]:
    return {"id": i, "name": "x", "vals": [1.0, 2.0, 3.0]}


async def test_a_burst_of_small_messages_takes_few_writes(anyio_backend: Any) -> None:
    sock, a, b = counting_pair()
    got = []

    async def receive_all() -> None:
        got.extend([await b.receive() for _ in range(1000)])

    with anyio.fail_after(10):  # a taken message never written would hang the receiver
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(receive_all)
            for i in range(1000):
                await a.send(message(i))
    assert got == [message(i) for i in range(1000)]
    if coalesces(anyio_backend):
        # one at once after each of the 16 yields, then the rest of each burst in one write
        assert sock.writes <= 40, sock.writes
    else:
        assert sock.writes == 1000


async def test_the_first_send_after_a_wait_goes_out_at_once(anyio_backend: Any) -> None:
    """A reply isn't held back: the send after a receive that waited is written before it
    returns. A second send in the same burst is written when the task next yields."""
    sock, a, b = counting_pair()
    async with a, b:
        await a.send("hello")
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.send, "ping")
            assert await a.receive() == "ping"  # waits for the peer
            before = sock.writes
            await a.send("pong")
            assert sock.writes == before + 1
            await a.send("and more")
            if coalesces(anyio_backend):
                assert sock.writes == before + 1  # taken, not yet written
            await anyio.lowlevel.checkpoint()
            assert sock.writes == before + 2
        assert [await b.receive() for _ in range(3)] == ["hello", "pong", "and more"]


async def test_a_burst_goes_out_while_the_task_waits_for_something_else() -> None:
    _, a, b = counting_pair()
    heard = anyio.Event()

    async def peer() -> None:
        assert [await b.receive() for _ in range(3)] == [0, 1, 2]
        heard.set()

    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(peer)
        with anyio.fail_after(5):  # a message kept back would hang here
            for i in range(3):
                await a.send(i)
            await heard.wait()


@pytest.mark.parametrize("end", ["aclose", "send_eof"])
async def test_ending_the_stream_writes_the_burst_first(end: str) -> None:
    _, a, b = counting_pair()
    async with b:
        for i in range(50):  # fewer than the sends between yields: one burst
            await a.send(message(i))
        await getattr(a, end)()  # in the same turn of the loop as the sends
        with anyio.fail_after(10):
            assert [await b.receive() for _ in range(50)] == [message(i) for i in range(50)]
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        await a.aclose()


async def test_close_with_a_full_kernel_loses_no_message_whose_send_returned() -> None:
    """The peer stops reading and the sender fills every buffer. Closing wakes the blocked
    send, and every message whose send returned still reaches the peer, in order (closing
    waits for the peer to make room for the ones still held). The message being sent when
    the stream closed may be cut off: the peer sees it as an incomplete message, never as a
    clean end."""
    _, a, b = counting_pair()
    payload = "x" * 1000
    completed = 0
    woke: list[BaseException] = []

    async def sender() -> None:
        nonlocal completed
        try:
            while True:
                await a.send((completed, payload))
                completed += 1
        except anyio.ClosedResourceError as exc:
            woke.append(exc)

    async with b, anyio.create_task_group() as tg:
        tg.start_soon(sender)
        while True:  # until the sender is blocked: the kernel and the burst are full
            seen = completed
            await anyio.sleep(0.2)
            if completed == seen:
                break
        tg.start_soon(a.aclose)
        await anyio.sleep(0.2)
        assert woke, "closing did not wake the blocked send"
        got = []
        try:
            with anyio.fail_after(10):
                async for item in b:
                    got.append(item)
        except IncompleteMessageError:
            pass
    assert got == [(i, payload) for i in range(completed)]


async def test_a_failed_burst_write_surfaces_at_the_next_send(anyio_backend: Any) -> None:
    _, a, b = counting_pair()
    await a.send(0)
    await b.aclose()  # the peer is gone
    with pytest.raises(anyio.BrokenResourceError):
        for i in range(1, 5):
            await a.send(i)  # a taken message's write fails later; the next send says so
            await anyio.lowlevel.checkpoint()
    await a.aclose()  # closing doesn't raise it again
