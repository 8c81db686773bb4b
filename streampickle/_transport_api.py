"""The contract between the async adapters (``ObjectStream``, ``dump``, ``load``) and the byte
transports under them (``_transports``): what each method does, how it may be cancelled,
what it raises, and what is left after ``aclose``. Each transport implements all of it; mypy
checks the signatures and ``tests/test_transport_contract.py`` the behaviour, over every
transport and backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ._decoder import Decoder
from ._encoder import Chunk

#: What ``Transport.fill`` may hand the bytes it read to instead of ``decoder.feed``.
Feed = Callable[[bytes | bytearray | memoryview], None]

__all__ = ["READ_AHEAD", "Transport"]

# How far ``fill`` may read ahead of the current part when it is not ``exact``: a burst of
# small messages costs one read, and a server's idle connections hold little (see
# ``SocketTransport``'s scratch memory).
READ_AHEAD = 256 * 1024


class Transport(Protocol):
    """Moves bytes between one channel and the sans-IO core; one object per channel.

    Bytes in. ``fill(decoder, exact=, limit=)`` reads once from the channel into ``decoder``
    (``feed``, or ``get_buffer``/``buffer_updated``) and returns True, or, at the channel's
    end, calls ``decoder.feed_eof()`` and returns False. ``exact``: read nothing past the
    current part of the current message (``decoder.get_buffer()``), so that what follows stays
    in the channel for whoever reads next (``load``); otherwise the transport may read ahead
    (``ObjectStream``), and a small message costs one read or less. ``limit``: read at most
    that many bytes (a memory budget's grant). ``feed``: hand what was read to this function
    instead of the decoder (a progress meter that feeds the decoder in its own pieces: see
    ``ReceiveMeter.feed``); the bytes are read into the transport's own buffer then, never
    into the decoder's. ``wait_readable()`` returns once a read would
    find bytes, the end, or an error, where the transport can tell; one that can't returns at
    once.

    Bytes out. ``send_chunks(chunks)`` hands the chunks to the channel in order and returns
    once the channel has them all (it does not wait for the peer). ``send_later(chunk)`` may
    take one small whole message to write after the caller's next yield to the event loop,
    together with others (True), or decline (False: send it with ``send_chunks``); what it
    took counts as sent and goes out before anything sent later, and ``aclose`` writes it
    first. ``send_eof()`` writes what ``send_later`` took and closes the sending direction: the
    peer's reads end; receiving goes on.

    ``sent`` grows as sends hand bytes to the channel; it never goes down. With
    ``exact_send_accounting`` it counts bytes the kernel took, so a send cancelled with
    ``sent`` unchanged put nothing on the wire and the stream is intact; without it, ``sent``
    grows as soon as a piece may have been handed over, and an unchanged count still means
    nothing was.

    Cancellation. A cancelled ``fill`` loses nothing: the bytes it took from the channel are
    in the decoder, and the rest are still in the channel. A cancelled ``send_chunks`` handed
    over the bytes ``sent`` says and no more (see above). A cancelled ``aclose`` still closes
    the channel, dropping what it was waiting for the peer to take (what ``send_later`` took;
    what an asyncio transport still buffers).

    Close. ``aclose()`` wakes every task blocked in the transport with
    ``anyio.ClosedResourceError`` and closes the channel; closing again does nothing. After
    it, ``fill``, ``wait_readable``, ``send_chunks`` and ``send_eof`` raise
    ``anyio.ClosedResourceError`` and ``send_later`` returns False.

    Errors. A channel that failed (reset, broken pipe, the peer gone) raises
    ``anyio.BrokenResourceError`` from the ``OSError`` or the channel's own error; ``fill``
    also raises what the decoder raises about the bytes (``StreamPickleError``). An asyncio
    transport made for one direction (``dump``'s ``StreamWriter``) raises :class:`UsageError`
    when used for the other.

    ``extra_attributes``: anyio typed attributes of the channel (``SocketAttribute`` for a
    socket; none for a channel without one, such as a memory stream). The mapping stays
    available after close, though reading an attribute of a closed socket may raise
    ``OSError``.
    """

    exact_send_accounting: bool
    sent: int

    async def fill(
        self, decoder: Decoder, *, exact: bool, limit: int | None = None, feed: Feed | None = None
    ) -> bool: ...

    async def wait_readable(self) -> None: ...

    def send_later(self, chunk: Chunk) -> bool: ...

    async def send_chunks(self, chunks: list[Chunk]) -> None: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...

    def abort(self) -> bool:
        """Close the channel at once, writing nothing more and without awaiting: blocked calls
        wake with ``anyio.ClosedResourceError`` and what ``send_later`` took is dropped. True
        once closed (or if it already was); False, changing nothing, where the channel can't
        be closed without awaiting (most anyio streams: TLS, pipes, memory streams)."""
        ...

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]: ...
