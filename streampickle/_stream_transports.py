"""Transports that copy: an anyio byte stream, or an asyncio ``StreamReader``/``StreamWriter``,
used through their public API (see ``_transport_api.Transport`` for the contract).

Each received byte is copied once, from the channel's ``bytes`` into its place in the decoder.
Large chunks are sent in ``SEND_SLICE`` pieces, so that no channel ever buffers a second copy
of a whole array. Neither can tell how much of an interrupted send reached the peer
(``exact_send_accounting = False``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import SocketAttribute

from ._decoder import Decoder
from ._encoder import Chunk
from ._errors import UsageError
from ._socket_transport import socket_attributes
from ._transport_api import READ_AHEAD, Feed

__all__ = ["SEND_SLICE", "AnyioTransport", "AsyncioTransport", "slices"]

# Largest piece handed to a copying transport in one call. asyncio's transports copy what the
# kernel did not take at once into their own buffer; a 1 MiB slice bounds that copy.
SEND_SLICE = 1 << 20


def slices(chunks: list[Chunk], size: int = SEND_SLICE) -> list[memoryview | bytes]:
    out: list[memoryview | bytes] = []
    for chunk in chunks:
        if len(chunk) <= size:
            if len(chunk):
                out.append(chunk)
            continue
        view = memoryview(chunk).cast("B")
        out.extend(view[i : i + size] for i in range(0, len(view), size))
    return out


def _socket_closed(stream: Any) -> bool:
    """Whether ``stream`` is over a socket that is closed now."""
    sock = stream.extra(SocketAttribute.raw_socket, None) if hasattr(stream, "extra") else None
    return sock is not None and sock.fileno() == -1


class AnyioTransport:
    """An anyio byte stream (or a send-only or receive-only one), through its public API."""

    exact_send_accounting = False

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.sent = 0
        self._closed = False

    def send_later(self, chunk: Chunk) -> bool:
        """Never: anyio's streams do their own buffering (see ``SocketTransport.send_later``)."""
        return False

    async def send_chunks(self, chunks: list[Chunk]) -> None:
        self._check_open()
        send = self.stream.send
        for piece in slices(chunks):
            self.sent += 1  # can't tell how much of an interrupted send reached the stream
            await send(piece)

    async def fill(
        self, decoder: Decoder, *, exact: bool, limit: int | None = None, feed: Feed | None = None
    ) -> bool:
        """Feed the decoder what the stream has next; False (after ``feed_eof``) at its end.
        ``exact``: never read past the current part; ``limit``: read at most that many bytes."""
        self._check_open()
        try:
            data = await self.stream.receive(_want(decoder, exact, limit))
        except anyio.EndOfStream:
            decoder.feed_eof()
            return False
        (decoder.feed if feed is None else feed)(data)
        return True

    async def wait_readable(self) -> None:
        """Returns at once: an anyio stream can't say whether a receive would wait."""
        self._check_open()
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._check_open()
        await self.stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        try:
            await self.stream.aclose()
        except AttributeError:
            # anyio's asyncio socket stream closes its transport, yields once, then aborts it.
            # If that one turn of the loop flushed the transport's last buffered bytes (a send
            # cancelled mid-message leaves some), asyncio (3.11) has already let the transport
            # go and its abort() fails on the missing loop. The socket is closed by then: the
            # close did what it was for.
            if not _socket_closed(self.stream):
                raise

    def abort(self) -> bool:
        """Never: an anyio stream is closed by awaiting its ``aclose``."""
        return False

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        attributes: Mapping[Any, Callable[[], Any]] = self.stream.extra_attributes
        return attributes


class AsyncioTransport:
    """An ``asyncio.StreamReader`` and ``StreamWriter`` (either may be None: ``load`` gets a
    reader alone, ``dump`` a writer alone), through their public API. Errors of the asyncio
    transport underneath (``ConnectionResetError``, ...) become ``anyio.BrokenResourceError``."""

    exact_send_accounting = False

    def __init__(self, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter | None) -> None:
        self.reader = reader
        self.writer = writer
        self.sent = 0
        self._closed = False
        self._sending = False  # a send_chunks is under way

    def send_later(self, chunk: Chunk) -> bool:
        """Never: a ``StreamWriter`` does its own buffering (see ``SocketTransport.send_later``)."""
        return False

    async def send_chunks(self, chunks: list[Chunk]) -> None:
        writer = self._writer()
        self._sending = True
        try:
            for piece in slices(chunks):
                self.sent += 1
                writer.write(piece)
                await writer.drain()
                if self._closed:  # closed while waiting: the rest was dropped
                    raise anyio.ClosedResourceError
        except OSError as exc:
            if self._closed:
                raise anyio.ClosedResourceError from exc
            raise anyio.BrokenResourceError(f"sending failed: {exc}") from exc
        finally:
            self._sending = False

    async def fill(
        self, decoder: Decoder, *, exact: bool, limit: int | None = None, feed: Feed | None = None
    ) -> bool:
        reader = self._reader()
        try:
            data = await reader.read(_want(decoder, exact, limit))
        except OSError as exc:
            raise anyio.BrokenResourceError(f"receiving failed: {exc}") from exc
        if self._closed:  # closed while waiting: the reader saw the end of our own transport
            raise anyio.ClosedResourceError
        if not data:
            decoder.feed_eof()
            return False
        (decoder.feed if feed is None else feed)(data)
        return True

    async def wait_readable(self) -> None:
        """Returns at once: a ``StreamReader`` can't say whether a read would wait."""
        self._reader()
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """``write_eof`` where the transport has one (TCP, Unix sockets, pipes); elsewhere (TLS)
        nothing: the peer sees the end when the stream is closed."""
        writer = self._writer()
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError as exc:
                raise anyio.BrokenResourceError(f"sending failed: {exc}") from exc
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the writer's transport (which is the reader's too) and wait until it is
        closed: until the peer has taken what earlier sends left in the transport's buffer.
        Cancelled, or with a send under way (its message can't be completed, so the rest is
        of no use to the peer), it aborts instead, dropping that buffer. A ``StreamReader``
        alone has no transport to close: it is only marked closed."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        writer = self.writer
        if writer is None:
            await anyio.lowlevel.checkpoint()
            return
        if self._sending:
            writer.transport.abort()
        else:
            writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the connection was lost before the close: closed all the same
        except BaseException:
            writer.transport.abort()
            raise

    def abort(self) -> bool:
        """Abort the writer's transport (which is the reader's too), dropping what its
        buffer holds; a ``StreamReader`` alone is only marked closed."""
        self._closed = True
        if self.writer is not None:
            self.writer.transport.abort()
        return True

    def _reader(self) -> asyncio.StreamReader:
        if self._closed:
            raise anyio.ClosedResourceError
        if self.reader is None:
            raise UsageError("this asyncio stream has no StreamReader to receive from")
        return self.reader

    def _writer(self) -> asyncio.StreamWriter:
        if self._closed:
            raise anyio.ClosedResourceError
        if self.writer is None:
            raise UsageError("this asyncio stream has no StreamWriter to send with")
        return self.writer

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The socket's attributes, where the writer's transport has a socket."""
        sock = self.writer.get_extra_info("socket") if self.writer is not None else None
        return socket_attributes(sock) if sock is not None else {}


def _want(decoder: Decoder, exact: bool, limit: int | None) -> int:
    """How many bytes a copying transport asks its channel for."""
    want = len(decoder.get_buffer())
    if not exact:
        want = max(want, READ_AHEAD)
    if limit is not None and limit < want:
        want = limit
    return want
