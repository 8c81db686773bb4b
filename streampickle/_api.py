"""One-shot helpers over the sans-IO core: a whole message as one ``bytes``."""

from __future__ import annotations

from typing import Any, Iterable

from ._decoder import Decoder
from ._encoder import Encoder
from ._errors import IncompleteMessageError, ProtocolError
from ._limits import Limits

__all__ = ["dumps", "loads"]


def dumps(obj: Any, *, key: bytes | None = None) -> bytes:
    """Encode ``obj`` as exactly one message, joined into one ``bytes``.

    Joining copies every out-of-band buffer once; to send large arrays without that copy, use
    :class:`Encoder` (or the stream helpers), which hand out the chunks unjoined.
    """
    return b"".join(Encoder(key=key).encode(obj))


def loads(
    data: bytes | bytearray | memoryview,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | None = None,
    limits: Limits | None = None,
) -> Any:
    """Decode exactly one whole message. Missing bytes raise :class:`IncompleteMessageError`,
    bytes after the message raise :class:`ProtocolError`."""
    decoder = Decoder(trusted=trusted, allow=allow, key=key, limits=limits)
    view = memoryview(data).cast("B")
    total = len(view)
    while view and not decoder.pending:
        target = decoder.get_buffer(len(view))  # never extends past the first message
        n = min(len(target), len(view))
        target[:n] = view[:n]
        decoder.buffer_updated(n)
        view = view[n:]
    if view:
        raise ProtocolError(
            f"{len(view)} bytes follow the message (at offset {total - len(view)}); loads() "
            f"takes exactly one message: use a Decoder to read several"
        )
    decoder.feed_eof()
    if not decoder.pending:
        raise IncompleteMessageError("loads() was given no bytes", received=0, expected=20)
    return next(decoder)
