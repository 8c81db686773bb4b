"""On asyncio and uvloop, a socket that streampickle drives is read from one reader callback.

A stream over a socket streampickle made for it (``connect_*``, a listener's ``accept``) keeps
the callback registered between receives (registering and removing it for each message was a
third of a small message's cost). Nothing else may leave one behind: a loop keeps a
registration for a closed descriptor and gives it to the next socket with the same number,
and registering a reader for a descriptor replaces the one there. So a closed stream, a
stream dropped unclosed, a one-call ``load``, and a stream over a socket the caller handed
over (which the caller may close or read without the stream knowing) leave none; these tests
check each on real sockets. trio has no reader callbacks.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket

import anyio
import numpy as np
import pytest
from anyio.abc import SocketAttribute
from anyio.lowlevel import checkpoint

import streampickle
from _pairs import anyio_socket_pair, unix_owned
from streampickle import ObjectStream

pytestmark = pytest.mark.anyio

CALLBACK_LOOPS = ["asyncio", ("asyncio", {"use_uvloop": True})]


async def assert_the_number_serves_a_new_socket(fd: int) -> None:
    """``fd`` is closed; give its number to a new socket and check that a loop reader for it
    works. A registration left for the old socket breaks that: asyncio's selector still maps
    the number, so ``add_reader`` modifies an epoll entry that closing removed and raises."""
    loop = asyncio.get_running_loop()
    c, d = socket.socketpair()
    if d.fileno() == fd:
        c, d = d, c
    with c, d:
        duplicate = c.fileno() != fd  # the number is free: the new socket may have taken it
        if duplicate:
            os.dup2(c.fileno(), fd)
        try:
            woke = anyio.Event()
            loop.add_reader(fd, woke.set)
            try:
                d.send(b"x")
                with anyio.fail_after(10):
                    await woke.wait()
            finally:
                loop.remove_reader(fd)
        finally:
            if duplicate:
                os.close(fd)


def stream_pair() -> tuple[ObjectStream, ObjectStream, int]:
    """Two streams over a socket pair the test hands over (``from_socket``)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return ObjectStream.from_socket(a), ObjectStream.from_socket(b), b.fileno()


async def owned_pair() -> tuple[ObjectStream, ObjectStream, int]:
    """Two streams over a Unix socket streampickle made (``connect_unix``, ``accept``)."""
    client, server = await unix_owned()
    return client, server, server.extra(SocketAttribute.raw_socket).fileno()


async def receive_after_waiting(receiver: ObjectStream, sender: ObjectStream, item: object) -> None:
    """``receiver`` receives ``item``, having waited for it (so its reader was registered)."""
    async with anyio.create_task_group() as tg:
        got: list[object] = []
        tg.start_soon(lambda: _append(got, receiver.receive()))
        await anyio.wait_all_tasks_blocked()
        await sender.send(item)
    assert got == [item]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the loop whose add_reader we can wrap
@pytest.mark.parametrize("pair", ["owned", "handed-over"])
async def test_a_conversation_of_small_messages_registers_the_reader_once_on_its_own_socket(pair: str) -> None:
    loop = asyncio.get_running_loop()
    a, b, fd = await owned_pair() if pair == "owned" else stream_pair()
    registrations = 0
    add_reader = loop.add_reader

    def counting_add_reader(what, *args):  # type: ignore[no-untyped-def]
        nonlocal registrations
        registrations += what == fd
        return add_reader(what, *args)

    async def echo() -> None:
        async for item in a:
            await a.send(item)

    loop.add_reader = counting_add_reader  # type: ignore[method-assign]
    try:
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(echo)
            for i in range(200):
                await b.send({"n": i})
                assert await b.receive() == {"n": i}
                if pair == "handed-over":
                    assert b._t._armed is None  # removed as each wait ended
            await b.send_eof()
    finally:
        del loop.add_reader
    if pair == "owned":
        # 200 waits, one registration (a few more if a reply ever came while nobody was
        # waiting, which removes it)
        assert 1 <= registrations <= 10, registrations
    else:
        assert registrations >= 150, registrations  # about one per wait


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_bytes_that_come_while_nobody_receives_remove_the_reader() -> None:
    """A reader left registered for a readable socket would run on every loop iteration."""
    a, b, _ = await owned_pair()
    async with a, b:
        await receive_after_waiting(b, a, "first")
        assert b._t._armed is not None  # kept between receives
        await a.send("second")  # nobody receives on b now
        for _ in range(100):
            await checkpoint()
            if b._t._armed is None:
                break
        assert b._t._armed is None, "the reader stayed registered with bytes waiting"
        assert await b.receive() == "second"


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_closing_a_stream_removes_its_reader() -> None:
    a, b, fd = await owned_pair()
    async with a:
        await receive_after_waiting(b, a, 1)
        assert b._t._armed is not None  # kept between receives
        await b.aclose()
        assert b._t._armed is None
        await assert_the_number_serves_a_new_socket(fd)


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_a_stream_dropped_unclosed_removes_its_reader() -> None:
    a, b, fd = await owned_pair()
    raw = b.extra(SocketAttribute.raw_socket)
    async with a:
        await receive_after_waiting(b, a, 1)
        assert b._t._armed is not None
        del b
        gc.collect()
        raw.close()
        await assert_the_number_serves_a_new_socket(fd)


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_a_handed_over_socket_closed_under_its_stream_leaves_no_reader() -> None:
    """The caller closes the socket it handed to ``from_socket``, not the stream."""
    a, b, fd = stream_pair()
    async with a:
        await receive_after_waiting(b, a, 1)
        b.transport_stream.close()
        await assert_the_number_serves_a_new_socket(fd)


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_an_anyio_stream_closed_under_its_object_stream_leaves_no_reader() -> None:
    """``async with await anyio.connect_unix(path) as conn: await ObjectStream(conn).receive()``:
    the anyio stream is closed, the ObjectStream never is."""
    client, server = await anyio_socket_pair("unix")
    fd = server.extra(SocketAttribute.raw_socket).fileno()
    objects = ObjectStream(server)  # kept: a dropped stream would clean up as it goes
    async with client:
        async with server:
            await receive_after_waiting(objects, ObjectStream(client), "hello")
        await assert_the_number_serves_a_new_socket(fd)
    assert objects.transport_stream is server


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_an_anyio_stream_read_by_its_own_receive_between_object_receives() -> None:
    """Receives through the ObjectStream and through the anyio stream under it, in turn:
    neither waits for a callback the other replaced."""
    client, server = await anyio_socket_pair("unix")
    async with client, server:
        objects = ObjectStream(server)
        with anyio.fail_after(10):
            await receive_after_waiting(objects, ObjectStream(client), 1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.receive)
                await anyio.wait_all_tasks_blocked()
                await client.send(b"raw")
            await receive_after_waiting(objects, ObjectStream(client), 2)


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_two_streams_receiving_on_one_socket_at_once_are_refused() -> None:
    """A second reader for the socket would replace the first one's, which would then wait
    forever: the second receive is refused instead, as anyio refuses a second waiter."""
    a, b = socket.socketpair()
    first, second, sender = ObjectStream.from_socket(b), ObjectStream.from_socket(b), ObjectStream.from_socket(a)
    async with sender:
        async with anyio.create_task_group() as tg:
            got: list[object] = []
            tg.start_soon(lambda: _append(got, first.receive()))
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await second.receive()
            await sender.send("for the first")
        assert got == ["for the first"]
        await receive_after_waiting(second, sender, "then the second")
    b.close()


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_a_load_that_waited_leaves_no_reader_behind() -> None:
    """A one-call ``load`` on an anyio Unix stream drives the stream's socket for the call
    only: afterwards the stream is the caller's, with nothing of streampickle's registered,
    and its socket can close and its number go to a new socket that a loop reader serves."""
    client, server = await anyio_socket_pair("unix")
    fd = server.extra(SocketAttribute.raw_socket).fileno()
    array = np.arange(100_000, dtype=np.float64)
    async with client, server:
        got: list[object] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _append(got, streampickle.load(server)))
            await anyio.wait_all_tasks_blocked()  # the load waits for bytes
            await streampickle.dump(array, client)
        assert np.array_equal(got[0], array)
        await client.send(b"raw bytes")
        assert await server.receive() == b"raw bytes"  # anyio's own reads work as before
    await assert_the_number_serves_a_new_socket(fd)


async def _append(out: list[object], awaitable: object) -> None:
    out.append(await awaitable)  # type: ignore[misc]


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_a_receive_cancelled_while_the_reader_waits_loses_nothing() -> None:
    a, b, _ = await owned_pair()
    async with a, b:
        with anyio.move_on_after(0) as scope:  # cancelled as soon as it waits
            await b.receive()
        assert scope.cancelled_caught
        await a.send({"after": "the cancelled receive"})
        assert await b.receive() == {"after": "the cancelled receive"}
        big = np.random.default_rng(3).random(1_000_000)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, big)
            assert np.array_equal(await b.receive(), big)
