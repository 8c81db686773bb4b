"""streampickle: stream Python objects, above all large numpy arrays, over byte channels.

Pickle protocol 5 in a small framed wire format (docs/wire-format.md), with every out-of-band
buffer sent as a zero-copy side chunk and received straight into its final, aligned memory.
Loading is safe by default: a peer's message builds plain data and numpy arrays only, unless
you allow more (``allow=``, ``trusted=True``); ``key=`` authenticates every byte.

The core is sans-IO (:class:`Encoder`, :class:`Decoder`); ``dumps``/``loads`` handle one
message in memory; :mod:`streampickle.sync` reads and writes blocking files and sockets.
"""

from __future__ import annotations

from . import sync
from ._api import dumps, loads
from ._decoder import Decoder
from ._encoder import Encoder
from ._errors import (
    AuthenticationError,
    EncodeError,
    ForbiddenGlobalError,
    IncompleteMessageError,
    LimitExceededError,
    MalformedPickleError,
    ProtocolError,
    StreamPickleError,
    UsageError,
)
from ._limits import Limits
from ._wire import VERSION as WIRE_VERSION

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Decoder",
    "EncodeError",
    "Encoder",
    "ForbiddenGlobalError",
    "IncompleteMessageError",
    "LimitExceededError",
    "Limits",
    "MalformedPickleError",
    "ProtocolError",
    "StreamPickleError",
    "UsageError",
    "WIRE_VERSION",
    "dumps",
    "loads",
    "sync",
]
