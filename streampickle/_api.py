"""One-shot helpers over the sans-IO core: a whole message as one ``bytes``.

``loads`` is the :class:`Decoder`'s one-buffer path and ``dumps`` the :class:`Encoder`'s
output joined: neither has a decoding or framing rule of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._decoder import Decoder
from ._encoder import dumps
from ._limits import Limits
from ._mac import Key
from ._options import options_for

__all__ = ["dumps", "loads"]

_load_one = Decoder.load_one


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
    call returns an object or raises a :class:`StreamPickleError`.

    The same as ``Decoder(..., stream=False)`` fed ``data`` and its end, then ``next()``
    (see :meth:`Decoder.load_one`), but for the trailing-bytes rule."""
    return _load_one(data, options_for(trusted, allow, key, limits))
