"""On asyncio and uvloop, a socket that streampickle drives is read from one reader callback,
registered for each wait and removed as it ends.

A registration that outlived its wait would be one the stream can't keep true: a loop keeps
a registration for a closed descriptor and gives it to the next socket with the same number,
registering a reader for a descriptor replaces the one there, and a forked child shares the
parent's epoll set. So these tests close, drop, poll and fork the sockets under streams,
streampickle's own and handed over, and check that the next receive and the next socket
still work. trio has no reader callbacks.
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
async def test_no_reader_stays_registered_between_receives(pair: str) -> None:
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
                assert b._t._armed is None
                assert not loop.remove_reader(fd)  # nothing left for the descriptor
            await b.send_eof()
    finally:
        del loop.add_reader
    assert registrations >= 150, registrations  # about one per wait: the receives did wait


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_someone_else_waiting_on_the_socket_between_receives() -> None:
    """anyio's own wait for the raw socket of a streampickle stream, between two receives,
    replaces and removes the loop's reader for it; the next receive still wakes."""
    a, b, _ = await owned_pair()
    async with a, b:
        with anyio.fail_after(10):
            await receive_after_waiting(b, a, 1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.wait_readable, b.extra(SocketAttribute.raw_socket))
                await anyio.wait_all_tasks_blocked()
                await a.send(2)
            assert await b.receive() == 2
            await receive_after_waiting(b, a, 3)


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_a_forked_child_closing_its_copy_leaves_the_parents_stream_working() -> None:
    """A child shares the parent's epoll set: its close of an inherited stream must not take
    a registration the parent's stream relies on."""
    a, b, _ = await owned_pair()
    async with a, b:
        await receive_after_waiting(b, a, 1)
        pid = os.fork()
        if pid == 0:  # the child: drop the inherited connection and go, whatever happens
            try:
                b.abort()
            finally:
                os._exit(0)
        assert (await anyio.to_thread.run_sync(os.waitpid, pid, 0))[1] == 0
        with anyio.fail_after(10):
            await receive_after_waiting(b, a, 2)


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_abort_from_another_thread_wakes_a_waiting_receive(backend: str) -> None:
    """The loop's futures and registrations are its own: the abort shuts the socket down at
    once and hands the rest to the loop, whose waiting receive wakes."""
    name, options = {"asyncio": ("asyncio", {}), "uvloop": ("asyncio", {"use_uvloop": True}),
                     "trio": ("trio", {})}[backend]
    woke: list[BaseException] = []

    async def main() -> None:
        done = anyio.Event()
        a, b, _ = await owned_pair()
        async with a:

            def abort_soon() -> None:
                b.abort()

            async with anyio.create_task_group() as tg:

                async def receive() -> None:
                    try:
                        await b.receive()
                    except BaseException as exc:  # noqa: BLE001 - what woke it is the result
                        woke.append(exc)
                        done.set()

                tg.start_soon(receive)
                await anyio.wait_all_tasks_blocked()
                with anyio.fail_after(10):
                    await anyio.to_thread.run_sync(abort_soon)
                    await done.wait()
            assert b.extra(SocketAttribute.raw_socket).fileno() == -1

    anyio.run(main, backend=name, backend_options=options)
    assert len(woke) == 1 and isinstance(woke[0], (anyio.ClosedResourceError, anyio.EndOfStream)), woke


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_closing_a_stream_removes_its_reader() -> None:
    a, b, fd = await owned_pair()
    async with a:
        await receive_after_waiting(b, a, 1)
        await b.aclose()
        assert b._t._armed is None
        await assert_the_number_serves_a_new_socket(fd)


@pytest.mark.parametrize("anyio_backend", CALLBACK_LOOPS)
async def test_a_stream_dropped_unclosed_removes_its_reader() -> None:
    a, b, fd = await owned_pair()
    raw = b.extra(SocketAttribute.raw_socket)
    async with a:
        await receive_after_waiting(b, a, 1)
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
