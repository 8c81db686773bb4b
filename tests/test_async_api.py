"""await dump/load on byte streams, ObjectStream specifics, and the zero-copy socket path."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import tempfile
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from anyio.abc import SocketAttribute

import streampickle
from _pairs import tcp_anyio, tcp_owned, tls, unix_anyio, unix_owned
from _util import what_woke
from streampickle import ObjectStream
from streampickle._transports import SOCKET_BUFFER, AnyioTransport, SocketTransport
from streampickle.testing import _close_while_blocked, memory_stream_pair

pytestmark = pytest.mark.anyio


async def test_consecutive_loads_each_get_their_message_and_leave_the_rest() -> None:
    a, b = memory_stream_pair(max_buffered_sends=100)
    objs = [np.arange(10), {"k": "v"}, np.ones((100, 100), order="F")]
    for obj in objs:
        await streampickle.dump(obj, a)
    await a.send(b"raw tail")
    await a.send_eof()
    for obj in objs:
        got = await streampickle.load(b)
        assert type(got) is type(obj)
    assert await b.receive() == b"raw tail"  # not one byte beyond the last message was read
    with pytest.raises(EOFError):
        await streampickle.load(b)


async def test_load_over_tcp_stream_and_eof_inside_a_message() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        message = streampickle.dumps(np.arange(1000))
        async with anyio.create_task_group() as tg:

            async def server(stream) -> None:
                async with stream:
                    await stream.send(message)
                    await stream.send(message[:50])
                tg.cancel_scope.cancel()

            tg.start_soon(listener.serve, server)
            client = await anyio.connect_tcp("127.0.0.1", port)
            async with client:
                assert (await streampickle.load(client))[-1] == 999
                with pytest.raises(streampickle.IncompleteMessageError) as info:
                    await streampickle.load(client)
                assert info.value.received == 50


async def test_cancelled_load_resumes_with_the_same_message() -> None:
    a, b = memory_stream_pair(max_buffered_sends=1)
    big = np.random.default_rng(0).random(3_000_000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(streampickle.dump, big, a)
        cancellations = 0
        for _ in range(10_000):
            with anyio.move_on_after(0.001) as scope:
                got = await streampickle.load(b)
            if not scope.cancelled_caught:
                break
            cancellations += 1
        assert cancellations > 0
        assert np.array_equal(got, big)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_stream_reader_and_writer() -> None:
    received = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            received.append(await streampickle.load(reader))
        with pytest.raises(EOFError):
            await streampickle.load(reader)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await streampickle.dump({"a": np.arange(5)}, writer)
    await streampickle.dump(np.zeros(3_000_000), writer)
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if len(received) == 2:
            break
        await asyncio.sleep(0.02)
    server.close()
    assert received[0]["a"].sum() == 10 and received[1].shape == (3_000_000,)


async def test_forbidden_message_is_dropped_and_the_stream_goes_on() -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    a, b = await tcp_owned()
    async with a, b:
        await a.send(Evil())
        await a.send("fine")
        with pytest.raises(streampickle.ForbiddenGlobalError):
            await b.receive()
        assert await b.receive() == "fine"


async def test_framing_error_poisons_the_receive_side() -> None:
    x, y = memory_stream_pair()
    stream = ObjectStream(y)
    await x.send(b"GET / HTTP/1.1\r\n")
    with pytest.raises(streampickle.ProtocolError):
        await stream.receive()
    with pytest.raises(streampickle.ProtocolError, match="failed earlier"):
        await stream.receive()


async def test_keyed_object_streams() -> None:
    x, y = memory_stream_pair()
    a, b = ObjectStream(x, key=b"k1"), ObjectStream(y, key=b"k1")
    await a.send(np.arange(3))
    assert (await b.receive()).tolist() == [0, 1, 2]
    c = ObjectStream(x, key=b"other")
    await c.send("x")
    with pytest.raises(streampickle.AuthenticationError):
        await b.receive()


@pytest.mark.parametrize("mac", ["blake3", "poly1305"])
async def test_fast_mac_keyed_stream_over_a_real_socket(mac: str) -> None:
    """A large array with a blake3 or poly1305 key: hashed slice by slice as it is sent and as
    it is received; a receiver keyed for HMAC-SHA256 refuses the same bytes."""
    arr = np.random.default_rng(5).random(4_000_000)  # 32 MB: many slices and reads
    key = streampickle.Key(b"shared secret", mac=mac)  # type: ignore[arg-type]
    for receiver_key in (key, b"shared secret"):
        path = os.path.join(tempfile.mkdtemp(), "sock")
        async with await streampickle.create_unix_listener(path, key=receiver_key) as listener:
            a = await streampickle.connect_unix(path, key=key)
            b = await listener.accept()
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(a.send, {"arr": arr})
            if receiver_key is key:
                assert np.array_equal((await b.receive())["arr"], arr)
            else:
                with pytest.raises(streampickle.AuthenticationError, match=mac):
                    await b.receive()
                tg.cancel_scope.cancel()


async def test_typed_attributes_are_forwarded() -> None:
    for make in (tcp_owned, tcp_anyio):
        a, b = await make()
        async with a, b:
            assert a.extra(SocketAttribute.remote_port) == b.extra(SocketAttribute.local_port)
            assert a.extra(SocketAttribute.raw_socket).fileno() >= 0


def grown_sndbuf() -> int:
    """SO_SNDBUF of a socket whose buffers streampickle grew: Linux reports double what was
    set, and caps what can be set at net.core.wmem_max."""
    with open("/proc/sys/net/core/wmem_max") as f:
        return 2 * min(SOCKET_BUFFER, int(f.read()))


async def test_socket_buffers_grown_on_unix_left_to_autotuning_on_tcp() -> None:
    """Unix sockets get SOCKET_BUFFER; TCP sockets keep the kernel's autotuning, so their
    buffers start at the small tcp_rmem/tcp_wmem defaults instead of the size a setsockopt
    would fix."""
    want = grown_sndbuf()
    for make, grown in ((unix_owned, True), (tcp_owned, False)):
        a, b = await make()
        async with a, b:
            for stream in (a, b):
                size = stream.extra(SocketAttribute.raw_socket).getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                assert (size >= want) is grown, (make.__name__, size, want)


async def test_which_streams_take_the_zero_copy_path(anyio_backend: str) -> None:
    a, b = await tcp_owned()
    async with a, b:
        assert isinstance(a._t, SocketTransport) and a._t._owner is None
    a, b = await tcp_anyio()  # on asyncio its socket belongs to an asyncio transport
    async with a, b:
        assert isinstance(a._t, SocketTransport if anyio_backend == "trio" else AnyioTransport)
    a, b = await unix_anyio()  # no asyncio transport under it: zero-copy everywhere
    async with a, b:
        assert isinstance(a._t, SocketTransport) and a._t._owner is a.transport_stream
        # and its buffers grown like streampickle's own
        sock = a.extra(SocketAttribute.raw_socket)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= grown_sndbuf()
    a, b = await tls()  # TLS is never bypassed
    async with a, b:
        assert isinstance(a._t, AnyioTransport)


async def test_cancelled_receives_on_anyio_unix_stream_leave_the_loop_clean(anyio_backend: str) -> None:
    """anyio's asyncio Unix streams wait with ``add_reader(sock, fut.set_result, None)`` and
    remove the reader from a done-callback, so a receive cancelled as the socket turns readable
    lets the reader fire on the cancelled future: ``InvalidStateError`` in the loop's exception
    handler (uvloop shows it within a few hundred cancellations). streampickle drives such
    streams itself; this fails if it ever goes back through their ``receive()``."""
    errors: list[dict] = []
    if anyio_backend != "trio":
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    a, b = await unix_anyio()
    async with a, b, anyio.create_task_group() as tg:

        async def producer() -> None:
            for i in range(10_000):
                await a.send(i)
                await anyio.lowlevel.checkpoint()  # let the receiver wait, often

        tg.start_soon(producer)
        got: list[int] = []
        cancelled = 0
        while len(got) < 10_000:
            with anyio.move_on_after(0.00001) as scope:
                got.append(await b.receive())
            cancelled += scope.cancelled_caught
    assert got == list(range(10_000))
    assert cancelled >= 100, "too few receives were cancelled to exercise the race"
    assert not errors, errors[:3]


class RecordingSocket:
    """A socket stand-in that records the memory handed to sendmsg and recv_into."""

    family = socket.AF_INET

    def __init__(self, incoming: bytes = b"") -> None:
        self.sent_buffers: list[memoryview] = []
        self.recv_targets: list[memoryview] = []
        self.out = bytearray()
        self._incoming = memoryview(incoming)

    def setblocking(self, flag: bool) -> None:
        pass

    def send(self, data, flags: int = 0) -> int:
        return self.sendmsg([memoryview(data)])

    def sendmsg(self, buffers, ancdata=(), flags: int = 0) -> int:
        self.sent_buffers.extend(buffers)
        n = 0
        for b in buffers:
            self.out += b
            n += len(b)
        return n

    def recv_into(self, target) -> int:
        self.recv_targets.append(target)
        n = min(len(target), len(self._incoming), 1 << 20)
        target[:n] = self._incoming[:n]
        self._incoming = self._incoming[n:]
        return n


async def test_socket_path_sends_and_receives_without_copies() -> None:
    arr = np.random.default_rng(0).random(2_000_000)
    sender = RecordingSocket()
    await ObjectStream.from_socket(sender).send({"arr": arr})  # type: ignore[arg-type]
    # the array's own memory went to sendmsg
    assert any(np.shares_memory(np.frombuffer(b, np.uint8), arr) for b in sender.sent_buffers)

    receiver = RecordingSocket(bytes(sender.out))
    got = (await ObjectStream.from_socket(receiver).receive())["arr"]  # type: ignore[arg-type]
    assert np.array_equal(got, arr)
    # the array's bytes were recv_into'd straight into the final array's memory
    direct = [t for t in receiver.recv_targets if np.shares_memory(np.frombuffer(t, np.uint8), got)]
    assert sum(len(t) for t in direct) >= arr.nbytes - 256 * 1024  # all but a read-ahead


async def test_small_message_is_one_write() -> None:
    sock = RecordingSocket()
    stream = ObjectStream.from_socket(sock)  # type: ignore[arg-type]
    await stream.send({"id": 1, "name": "x", "vals": [1.0, 2.0, 3.0]})
    assert len(sock.sent_buffers) == 1


async def test_serve_runs_a_handler_per_connection() -> None:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)

        async def echo(stream: ObjectStream) -> None:
            async for obj in stream:
                await stream.send(obj * 2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo)

            async def client(i: int) -> None:
                async with await streampickle.connect_tcp("127.0.0.1", port) as c:
                    await c.send(np.full(10, i))
                    assert (await c.receive() == 2 * i).all()

            async with anyio.create_task_group() as clients:
                for i in range(10):
                    clients.start_soon(client, i)
            tg.cancel_scope.cancel()


async def test_incomplete_message_from_a_dying_peer() -> None:
    x, y = socket.socketpair()
    stream = ObjectStream.from_socket(y)
    data = streampickle.dumps(np.arange(10_000))
    x.sendall(data[: len(data) // 2])
    x.close()
    with pytest.raises(streampickle.IncompleteMessageError):
        await stream.receive()
    await stream.aclose()


async def test_unpicklable_object_raises_before_any_byte_and_stream_stays_usable() -> None:
    sock = RecordingSocket()
    stream = ObjectStream.from_socket(sock)  # type: ignore[arg-type]
    with pytest.raises(streampickle.EncodeError):
        await stream.send(lambda: 0)
    assert sock.out == b""
    await stream.send("ok")
    assert struct.unpack_from("<4s", sock.out)[0] == b"\x93SPK"


async def test_keyed_large_messages_over_sockets_and_memory() -> None:
    big = np.random.default_rng(5).random(1_500_000)
    for make in (_keyed_tcp, lambda: _memory_pair(key=b"key")):
        a, b = await make()
        async with a, b:
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, {"big": big})
                got = await b.receive()
            assert np.array_equal(got["big"], big)


async def _memory_pair(key: bytes):
    x, y = memory_stream_pair()
    return ObjectStream(x, key=key), ObjectStream(y, key=key)


async def _keyed_tcp():
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1", key=b"key") as listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await streampickle.connect_tcp("127.0.0.1", port, key=b"key")
        server = await listener.accept()
    return client, server


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the loop whose add_reader we can wrap
async def test_a_large_part_arrives_through_one_reader_registration() -> None:
    """On an asyncio loop a side chunk is read from one reader callback, not from a wait per
    read (each costs a registration, a removal and a task switch: hundreds per large array)."""
    loop = asyncio.get_running_loop()
    a, b = await tcp_owned()
    async with a, b:
        fd = b.extra(SocketAttribute.raw_socket).fileno()
        registrations = 0
        add_reader = loop.add_reader

        def counting_add_reader(what, *args):  # type: ignore[no-untyped-def]
            nonlocal registrations
            registrations += what == fd or getattr(what, "fileno", lambda: None)() == fd
            return add_reader(what, *args)

        loop.add_reader = counting_add_reader  # type: ignore[method-assign]
        try:
            big = np.random.default_rng(7).random(8_000_000)  # 64 MB
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, big)
                got = await b.receive()
        finally:
            del loop.add_reader
        assert np.array_equal(got, big)
        assert 1 <= registrations <= 4, registrations


async def _stalled_inside_a_large_chunk() -> tuple[socket.socket, ObjectStream, bytes]:
    """A raw peer that sent the start of a 32 MB array's message and then stopped."""
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        peer = socket.create_connection(("127.0.0.1", listener.extra(SocketAttribute.local_port)))
        stream = await listener.accept()
    data = streampickle.dumps(np.zeros(4_000_000))
    peer.sendall(data[: 1 << 20])
    return peer, stream, data


async def test_close_wakes_a_receive_waiting_inside_a_large_chunk() -> None:
    peer, stream, _ = await _stalled_inside_a_large_chunk()

    def waiting_inside_the_chunk() -> None:
        assert stream._decoder.in_message and stream._decoder.get_buffer().nbytes > 1 << 20

    with peer:
        woke = await _close_while_blocked(stream, stream.receive, check=waiting_inside_the_chunk)
    assert woke and isinstance(woke[0], anyio.ClosedResourceError), woke
    assert stream._t._armed is None and stream._t._read_done is None  # the reader went with the socket


async def test_a_peer_that_dies_inside_a_large_chunk() -> None:
    peer, stream, data = await _stalled_inside_a_large_chunk()

    async def more_then_die() -> None:
        await anyio.sleep(0.05)  # the receive is waiting inside the chunk by now
        peer.sendall(data[1 << 20 : 2 << 20])
        peer.close()

    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(more_then_die)
        with pytest.raises(streampickle.IncompleteMessageError) as failure:
            await stream.receive()
    assert failure.value.received == 2 << 20  # every byte that came was counted


@pytest.mark.parametrize("pair", [unix_anyio, tcp_anyio], ids=["unix-anyio", "tcp-anyio"])
async def test_load_cancelled_after_the_read_that_completed_its_message_keeps_the_message(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cancellation can land after the read that took a message's last bytes from the stream
    # (asyncio delivers task.cancel() at the await that read them). Emulated exactly: the first
    # fill completes the message, then the cancellation arrives.
    from streampickle import _stream

    real_fill = _stream._fill
    cancel_once = [True]
    scope = anyio.CancelScope()

    async def fill_then_cancel(*args: Any, **kwargs: Any) -> Any:
        result = await real_fill(*args, **kwargs)
        if cancel_once[0] and args[1].pending:
            cancel_once[0] = False
            scope.cancel()
            await anyio.lowlevel.checkpoint()  # the cancellation lands here
        return result

    monkeypatch.setattr(_stream, "_fill", fill_then_cancel)
    a, b = await pair()
    async with a, b:
        sending, receiving = a.transport_stream, b.transport_stream  # bare anyio streams
        await streampickle.dump({"n": 1, "data": np.arange(10)}, sending)
        await streampickle.dump("second", sending)
        with scope:
            await streampickle.load(receiving)
        assert scope.cancelled_caught and not cancel_once[0]
        first = await streampickle.load(receiving)
        assert first["n"] == 1 and first["data"].tolist() == list(range(10))
        assert await streampickle.load(receiving) == "second"


async def _asyncio_object_streams() -> tuple[ObjectStream, ObjectStream, asyncio.Server]:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ObjectStream(await asyncio.open_connection("127.0.0.1", port))
    return client, ObjectStream(await accepted), server


@pytest.mark.parametrize("anyio_backend", ["asyncio", pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
async def test_object_stream_over_asyncio_streams() -> None:
    client, peer, server = await _asyncio_object_streams()
    try:
        big = np.arange(1_000_000, dtype=np.float64)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, {"big": big})
            got = await peer.receive()
        assert np.array_equal(got["big"], big)
        await peer.send("reply")
        assert await client.receive() == "reply"
        assert client.extra(SocketAttribute.remote_port) == server.sockets[0].getsockname()[1]
        # send_eof: the peer's receive ends, and it can still answer
        await client.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await peer.receive()
        await peer.send("after eof")
        assert await client.receive() == "after eof"
        # aclose: closes the connection (the peer sees the end), twice is fine, use after raises
        await peer.aclose()
        await peer.aclose()
        with pytest.raises(anyio.EndOfStream):
            await client.receive()
        with pytest.raises(anyio.ClosedResourceError):
            await peer.send("closed")
        assert peer.transport_stream[1].is_closing()
    finally:
        await client.aclose()
        server.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_stream_aclose_wakes_a_blocked_receive() -> None:
    client, peer, server = await _asyncio_object_streams()
    woke = await what_woke(client.receive, client.aclose)
    await peer.aclose()
    server.close()
    assert len(woke) == 1 and isinstance(woke[0], anyio.ClosedResourceError), woke


async def test_unix_listener_replaces_a_stale_socket_file() -> None:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(path)
    crashed.listen()
    crashed.close()  # what a crash leaves: the file, and nobody listening
    assert await anyio.Path(path).exists()
    async with await streampickle.create_unix_listener(path) as listener:
        client = await streampickle.connect_unix(path)
        server = await listener.accept()
        async with client, server:
            await client.send("through the new listener")
            assert await server.receive() == "through the new listener"


async def test_unix_listener_leaves_a_live_servers_socket_alone() -> None:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    async with await streampickle.create_unix_listener(path) as live:
        with pytest.raises(OSError) as info:
            await streampickle.create_unix_listener(path)
        assert info.value.errno == errno.EADDRINUSE and path in str(info.value)
        async with await live.accept() as probe:  # how the second listener found it alive
            with pytest.raises(anyio.EndOfStream):
                await probe.receive()
        client = await streampickle.connect_unix(path)  # the live server still has its socket
        server = await live.accept()
        async with client, server:
            await client.send("still here")
            assert await server.receive() == "still here"


async def test_unix_listener_leaves_a_file_that_is_not_a_socket_alone() -> None:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    await anyio.Path(path).write_text("precious")
    with pytest.raises(OSError) as info:
        await streampickle.create_unix_listener(path)
    assert info.value.errno == errno.EADDRINUSE and path in str(info.value)
    assert await anyio.Path(path).read_text() == "precious"


async def test_connect_tcp_error_names_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as info:  # still the errno's class
        await streampickle.connect_tcp("127.0.0.1", port)
    assert info.value.errno == errno.ECONNREFUSED
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


async def test_connect_tcp_to_a_numeric_address_looks_nothing_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # anyio's getaddrinfo runs in a worker thread: a numeric address needs no lookup, so a
    # process (a dask worker) that only connects to addresses never starts that thread.
    looked_up: list[str] = []
    lookup = anyio.getaddrinfo

    async def recording(host: str, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return await lookup(host, *args, **kwargs)

    monkeypatch.setattr(anyio, "getaddrinfo", recording)
    hosts = ["127.0.0.1"] + (["::1"] if socket.has_ipv6 and _ipv6_loopback() else [])
    for host in hosts:
        async with await streampickle.create_tcp_listener(local_host=host) as listener:
            port = listener.extra(SocketAttribute.local_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_echo_once, listener)
                async with await streampickle.connect_tcp(host, port) as client:
                    await client.send({"to": host})
                    assert await client.receive() == {"to": host}
    assert looked_up == []
    # A name is still looked up, and connects.
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_echo_once, listener)
            async with await streampickle.connect_tcp("localhost", port) as client:
                await client.send(b"named")
                assert await client.receive() == b"named"
    assert looked_up == ["localhost"]


async def _echo_once(listener: Any) -> None:
    async with await listener.accept() as stream:
        await stream.send(await stream.receive())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_from_socket_grows_a_socketpairs_buffers_and_keeps_the_socket() -> None:
    a, b = socket.socketpair()
    default = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    want = grown_sndbuf()
    assert default < want, "this system's default Unix buffers are already as large"
    stream = ObjectStream.from_socket(a)
    async with stream:
        assert stream.transport_stream is a
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= want
    b.close()


class CountingSocket(socket.socket):
    """A real socket that counts the reads made on it."""

    reads = 0

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self.reads += 1
        return super().recv_into(*args, **kwargs)


async def test_a_burst_of_small_messages_costs_one_read() -> None:
    a, b = socket.socketpair()
    counting = CountingSocket(b.family, b.type, b.proto, fileno=b.detach())
    sender, receiver = ObjectStream.from_socket(a), ObjectStream.from_socket(counting)
    async with sender, receiver:
        for i in range(200):
            await sender.send({"i": i, "name": "x"})
        await sender.send_eof()  # written: all of it is in the receiver's socket buffer now
        for i in range(200):
            assert (await receiver.receive())["i"] == i
        # they were all in the kernel: one read-ahead took them (the decoder's header and
        # pickle parts are never read separately)
        assert counting.reads == 1, counting.reads


def test_a_stream_used_under_one_backend_then_another_keeps_working() -> None:
    # Each anyio.run is a new event loop, and trio and asyncio alternate: the stream's
    # cancellation checkpoint is looked up again for each, not kept from the first.
    a, b = socket.socketpair()
    sender, receiver = ObjectStream.from_socket(a), ObjectStream.from_socket(b)

    async def round_trip(n: int) -> None:
        await sender.send({"n": n, "array": np.arange(n)})
        got = await receiver.receive()
        assert got["n"] == n and np.array_equal(got["array"], np.arange(n))

    for n, backend in enumerate(["trio", "asyncio", "trio", "asyncio", "asyncio"]):
        anyio.run(round_trip, n, backend=backend)
    anyio.run(sender.aclose, backend="trio")
    anyio.run(receiver.aclose, backend="asyncio")
