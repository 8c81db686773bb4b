"""Byte transports under the async adapters: they only move bytes between a channel and the
sans-IO core, each keeping the contract of ``_transport_api.Transport``. Three kinds:

* ``AnyioTransport`` (``_stream_transports``): any anyio ``ByteStream`` (or a send-only or
  receive-only one), through its public API; each received byte is copied once, and large
  chunks are sent in slices so that no channel ever buffers a second copy of one.
* ``AsyncioTransport`` (``_stream_transports``): an ``asyncio.StreamReader`` /
  ``StreamWriter``; same policy.
* ``SocketTransport`` (``_socket_transport``): a raw non-blocking socket that streampickle
  drives itself, zero-copy both ways. This is the fast path, taken for streampickle's own
  sockets and for anyio socket streams whose socket nothing else reads (all of them on trio,
  the Unix ones on asyncio). anyio's asyncio TCP streams belong to an asyncio transport, which
  copies data the kernel did not take at once.

This module picks one for a stream (``transport_for``, ``fastest_transport``, and
``shared_transport`` for a stream whose descriptors must not be dropped) and sends a message's
chunks through it (``send_message``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from anyio.abc import ByteReceiveStream, ByteSendStream, SocketAttribute, SocketStream

from ._anyio_compat import is_asyncio_unix_stream, running_trio
from ._encoder import Chunk
from ._errors import UsageError
from ._socket_transport import (
    COALESCE_BYTES,
    DIRECT_READ,
    NO_SIGNAL,
    SOCKET_BUFFER,
    SocketTransport,
    grow_socket_buffers,
    socket_attributes,
)
from ._stream_transports import SEND_SLICE, AnyioTransport, AsyncioTransport, slices
from ._transport_api import READ_AHEAD, Transport

__all__ = [
    "COALESCE_BYTES",
    "DIRECT_READ",
    "NO_SIGNAL",
    "READ_AHEAD",
    "SEND_SLICE",
    "SOCKET_BUFFER",
    "AnyioTransport",
    "AsyncioTransport",
    "SocketTransport",
    "Transport",
    "fastest_transport",
    "grow_socket_buffers",
    "not_unix",
    "send_message",
    "shared_transport",
    "socket_attributes",
    "transport_for",
]


async def send_message(transport: Transport, chunks: list[Chunk], mac: Any) -> None:
    """Send one message's chunks; with ``mac`` (see ``Encoder.encode_unsigned``), hash each
    slice just before it goes out and send the tag last."""
    if mac is None:
        await transport.send_chunks(chunks)
        return
    for piece in slices(chunks):
        mac.update(piece)
        await transport.send_chunks([piece])
    await transport.send_chunks([mac.digest()])


def transport_for(stream: Any) -> Transport:
    """The copying transport for a stream: an anyio byte stream, an asyncio ``StreamReader``
    or ``StreamWriter`` (``load``/``dump``), or both as a ``(reader, writer)`` pair, as
    ``asyncio.open_connection`` returns them (an ``ObjectStream``)."""
    if isinstance(stream, tuple) and len(stream) == 2:
        reader, writer = stream
        if isinstance(reader, asyncio.StreamReader) and isinstance(writer, asyncio.StreamWriter):
            return AsyncioTransport(reader, writer)
    if isinstance(stream, asyncio.StreamWriter):
        return AsyncioTransport(None, stream)
    if isinstance(stream, asyncio.StreamReader):
        return AsyncioTransport(stream, None)
    if isinstance(stream, (ByteSendStream, ByteReceiveStream)) or hasattr(stream, "receive") or hasattr(stream, "send"):
        return AnyioTransport(stream)
    raise TypeError(
        "expected an anyio byte stream, an asyncio StreamReader or StreamWriter, or a "
        f"(StreamReader, StreamWriter) pair, not {type(stream).__name__}"
    )


def fastest_transport(stream: Any) -> Transport:
    """The zero-copy socket path where nothing else reads the socket, else a copying one.

    * On trio, an anyio socket stream's raw socket is an ordinary non-blocking socket that
      streampickle may drive itself.
    * On asyncio, anyio's Unix streams are the same (see ``_anyio_compat.is_asyncio_unix_stream``). Their
      own wait is also racy: a receive cancelled while the socket turns readable makes the
      loop's reader call ``set_result`` on the cancelled future (``InvalidStateError`` in the
      loop's exception handler; seen on uvloop). Driving the socket with
      ``_anyio_compat.wait_readable``, which tolerates that, avoids the race.
    * anyio's asyncio TCP streams belong to an asyncio transport, whose own reader would race
      ours, so they are used through their public API.

    A TLS stream is not a ``SocketStream`` and is never bypassed. A Unix socket taken over gets
    the same buffer sizes as streampickle's own Unix sockets (``grow_socket_buffers``); TCP
    sockets keep the kernel's buffer autotuning, as streampickle's own do.
    """
    if isinstance(stream, SocketStream) and (running_trio() or is_asyncio_unix_stream(stream)):
        sock = stream.extra(SocketAttribute.raw_socket)
        if sock.family == socket.AF_UNIX:
            grow_socket_buffers(sock)
        return SocketTransport(sock, owner=stream)
    return transport_for(stream)


def not_unix(sock: Any) -> UsageError:
    """The error for ``shared_memory=True`` on a socket that is not a Unix socket."""
    family = getattr(sock, "family", None)
    name = getattr(family, "name", family)
    return UsageError(
        f"shared_memory=True needs a Unix socket (AF_UNIX) between processes on one host: "
        f"descriptors can't be passed over a {name} socket. Leave shared_memory off here; "
        f"arrays then travel as bytes."
    )


def shared_transport(stream: Any) -> SocketTransport:
    """The transport of a ``shared_memory=True`` ``ObjectStream``: a Unix socket that streampickle
    drives itself (``from_socket``'s, or the raw socket under an anyio Unix socket stream
    that ``fastest_transport`` would drive), reading with room for descriptors. UsageError
    for anything else: a copying transport would drop them."""
    if isinstance(stream, socket.socket):
        if stream.family != socket.AF_UNIX:
            raise not_unix(stream)
        return SocketTransport(stream, shared_memory=True)
    if isinstance(stream, SocketStream):
        sock = stream.extra(SocketAttribute.raw_socket)
        if sock.family != socket.AF_UNIX:
            raise not_unix(sock)
        if running_trio() or is_asyncio_unix_stream(stream):
            grow_socket_buffers(sock)
            return SocketTransport(sock, owner=stream, shared_memory=True)
    raise UsageError(
        f"shared_memory=True needs a Unix socket that streampickle reads itself: an anyio Unix "
        f"socket stream, ObjectStream.from_socket, connect_unix or create_unix_listener; not a "
        f"{type(stream).__name__}, whose reads would drop the descriptors"
    )
