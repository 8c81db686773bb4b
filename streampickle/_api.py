"""One-shot helpers over the sans-IO core: a whole message as one ``bytes``."""

from __future__ import annotations

import struct
from typing import Any, Iterable

from . import _wire
from ._accel import speedups
from ._decoder import Decoder, byte_view
from ._encoder import dumps
from ._errors import IncompleteMessageError, ProtocolError
from ._limits import Limits
from ._mac import Key
from ._safe import _SHARED, GC_PAUSE_BYTES, unpickling_failed

_MAX_PICKLE = Limits().max_pickle_size
# The C path takes pickles below the size from which the Python path pauses the GC.
_C_MAX_PICKLE = GC_PAUSE_BYTES - 1
_unpack_length = struct.Struct("<Q").unpack_from

# Without the C extension the inline Python checks below do the same.
_loads_plain = speedups.loads_plain if speedups else None

__all__ = ["dumps", "loads"]

# The first 12 bytes of a version-1 message without tag or side chunks.
_PLAIN_PREFIX = _wire.MAGIC + bytes([_wire.VERSION]) + bytes(7)


def loads(
    data: bytes | bytearray | memoryview,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
) -> Any:
    """Decode exactly one whole message. Missing bytes raise :class:`IncompleteMessageError`,
    bytes after the message raise :class:`ProtocolError`.

    ``data`` is any bytes-like object, read as ``bytes(memoryview(data))`` would read it: a
    memoryview of another item format or several dimensions, or a numpy array, is taken as
    its raw bytes, and a non-contiguous one is copied once first. Anything that isn't
    bytes-like (``str``, ``None``...), or a bad option, raises :class:`UsageError`. So every
    call returns an object or raises a :class:`StreamPickleError`."""
    # The commonest call, one in-band message with default options, without building a
    # Decoder (its set-up costs more than unpickling a small object): first in one C call
    # (options, header, scan and pickle.loads), then, without the C extension, for a pickle
    # that names globals, or for one of 1 MiB or more (unpickled with the GC paused), the same
    # header checks inline. Anything unusual takes the decoder.
    if _loads_plain is not None:
        try:
            obj = _loads_plain(data, trusted, allow, key, limits, _C_MAX_PICKLE)
        except Exception as exc:
            raise unpickling_failed(exc) from exc
        if obj is not NotImplemented:
            return obj
    if (
        type(data) is bytes and key is None and limits is None
        and type(allow) is tuple and not allow  # not ``allow == ()``: a numpy array can't say
        and (trusted is False or trusted is True)
        # the decoder's header checks: magic, version, no flags or reserved bits, no side
        # chunks, a non-empty pickle within the default max_pickle_size, one message exactly
        and len(data) > _wire.HEADER_SIZE
        and data[:12] == _PLAIN_PREFIX
        and len(data) == _wire.HEADER_SIZE + _unpack_length(data, 12)[0]
        and len(data) - _wire.HEADER_SIZE <= _MAX_PICKLE
    ):
        return _SHARED[trusted].load_inband(data[_wire.HEADER_SIZE :])
    decoder = Decoder(trusted=trusted, allow=allow, key=key, limits=limits, stream=False)  # checks the options
    try:
        view = memoryview(data).cast("B")
    except Exception:
        view = byte_view(data)  # copies, or raises UsageError for what isn't bytes-like
    total = len(view)
    view = decoder._take_whole(view, limit=1)
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
