"""Ways to make a connected pair of ObjectStreams: one abstract battery, many bindings."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import SocketAttribute
from anyio.streams.stapled import StapledByteStream
from anyio.streams.tls import TLSStream

import streampickle
from streampickle import ObjectStream
from streampickle.testing import memory_stream_pair

Pair = tuple[ObjectStream, ObjectStream]


async def memory() -> Pair:
    a, b = memory_stream_pair()
    return ObjectStream(a), ObjectStream(b)


async def socketpair() -> Pair:
    a, b = socket.socketpair()
    return ObjectStream.from_socket(a), ObjectStream.from_socket(b)


async def tcp_owned() -> Pair:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await streampickle.connect_tcp("127.0.0.1", port)
        server = await listener.accept()
    return client, server


async def unix_owned() -> Pair:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    async with await streampickle.create_unix_listener(path) as listener:
        client = await streampickle.connect_unix(path)
        server = await listener.accept()
    return client, server


async def _anyio_accept(listener: Any, connect: Callable[[], Awaitable[Any]]) -> tuple[Any, Any]:
    async with listener:
        client = await connect()
        server = None

        # anyio listeners only offer serve(): take the first connection and stop serving
        async def handler(stream: Any) -> None:
            nonlocal server
            server = stream
            scope.cancel()
            await anyio.sleep_forever()

        with anyio.CancelScope() as scope:
            await listener.serve(handler)
        return client, server


async def anyio_socket_pair(family: str) -> tuple[Any, Any]:
    """``(client, server)``: the two ends of one anyio socket stream, ``"tcp"`` over loopback
    or ``"unix"``."""
    if family == "tcp":
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(SocketAttribute.local_port)
        return await _anyio_accept(listener, lambda: anyio.connect_tcp("127.0.0.1", port))
    path = os.path.join(tempfile.mkdtemp(), "sock")
    listener = await anyio.create_unix_listener(path)
    return await _anyio_accept(listener, lambda: anyio.connect_unix(path))


async def tcp_anyio() -> Pair:
    client, server = await anyio_socket_pair("tcp")
    return ObjectStream(client), ObjectStream(server)


async def unix_anyio() -> Pair:
    client, server = await anyio_socket_pair("unix")
    return ObjectStream(client), ObjectStream(server)


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def tls() -> Pair:
    server_ctx, client_ctx = _tls_contexts()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    client_raw, server_raw = await _anyio_accept(listener, lambda: anyio.connect_tcp("127.0.0.1", port))
    async with anyio.create_task_group() as tg:
        result: dict[str, Any] = {}

        async def wrap(name: str, raw: Any, **kw: Any) -> None:
            result[name] = await TLSStream.wrap(raw, **kw)

        # standard_compatible=False: with True, aclose() waits for the peer's close_notify, so
        # closing one end and then the other (as the battery does) would wait forever
        tls_options = dict(standard_compatible=False)
        tg.start_soon(lambda: wrap("server", server_raw, server_side=True, ssl_context=server_ctx, **tls_options))
        tg.start_soon(lambda: wrap("client", client_raw, hostname="localhost", ssl_context=client_ctx, **tls_options))
    return ObjectStream(result["client"]), ObjectStream(result["server"])


#: Relay processes started by process_pipes(); reaped by reap_processes() after each test
#: (not when a stream closes: killing a relay would drop data still on its way to the peer).
PROCESSES: list[Any] = []


async def reap_processes() -> None:
    while PROCESSES:
        proc = PROCESSES.pop()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.aclose()


async def process_pipes() -> Pair:
    """a -> cat #1 -> b and b -> cat #2 -> a: real child processes and real pipes."""
    cat = shutil.which("cat")
    assert cat, "the process-pipe binding needs cat"
    p1 = await anyio.open_process([cat], stderr=None)
    p2 = await anyio.open_process([cat], stderr=None)
    PROCESSES.extend([p1, p2])
    return ObjectStream(StapledByteStream(p1.stdin, p2.stdout)), ObjectStream(StapledByteStream(p2.stdin, p1.stdout))


BINDINGS: dict[str, Callable[[], Awaitable[Pair]]] = {
    "memory": memory,
    "socketpair": socketpair,
    "tcp-owned": tcp_owned,
    "unix-owned": unix_owned,
    "tcp-anyio": tcp_anyio,
    "unix-anyio": unix_anyio,
    "tls": tls,
    "process-pipes": process_pipes,
}
