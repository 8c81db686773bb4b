"""streampickle: stream Python objects, above all large numpy arrays, over byte channels.

Pickle protocol 5 in a small framed wire format (docs/wire-format.md), with every out-of-band
buffer sent as a zero-copy side chunk and received straight into its final, aligned memory.
Loading is safe by default: a peer's message builds plain data and numpy arrays only, unless
you allow more (``allow=``, ``trusted=True``); ``key=`` authenticates every byte.

The core is sans-IO (:class:`Encoder`, :class:`Decoder`); ``dumps``/``loads`` handle one
message in memory; :class:`PickleDecoder` reads plain ``pickle.dump`` streams (any protocol),
safely; :mod:`streampickle.sync` reads and writes blocking files and sockets.
:func:`shared_empty` and :func:`shared_copy` make arrays in shared memory, which a
``shared_memory=True`` Unix socket hands to a process on the same host without copying them.
:class:`Progress` is what a ``progress=`` callback gets on long sends and receives.

Loaded on first use, so that importing streampickle starts no I/O machinery (they are in
``__all__`` and ``dir()`` all the same): :class:`ObjectStream`, :func:`dump` and :func:`load`
(async streams), :func:`iter_load` (the objects of a file, asynchronously),
:func:`load_pickle` (one standard pickle from an async stream), :func:`connect_tcp`,
:func:`connect_unix`, :func:`create_tcp_listener`,
:func:`create_unix_listener` and :class:`ObjectStreamListener` (sockets),
:class:`MemoryBudget`, and the modules :mod:`streampickle.sync` and :mod:`streampickle.testing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._api import dumps, loads
from ._decoder import Decoder
from ._encoder import Encoder
from ._errors import (
    AuthenticationError,
    DeadlineExceededError,
    EncodeError,
    ForbiddenGlobalError,
    IncompleteMessageError,
    LimitExceededError,
    MalformedPickleError,
    MessageDroppedError,
    ProtocolError,
    StreamBrokenError,
    StreamPickleError,
    UsageError,
)
from ._limits import Limits
from ._mac import Key
from ._pickle_stream import PickleDecoder
from ._pool import BufferPool, buffer_pool
from ._progress import Progress
from ._shm import shared_copy, shared_empty
from ._wire import VERSION as WIRE_VERSION

# The one version source: pyproject.toml reads it from here when the package is built.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from . import sync, testing
    from ._budget import MemoryBudget
    from ._files import iter_load
    from ._pickle_stream import load_pickle
    from ._sockets import (
        ObjectStreamListener,
        connect_tcp,
        connect_unix,
        create_tcp_listener,
        create_unix_listener,
    )
    from ._stream import ObjectStream, dump, load

# The I/O adapters load on first use, so that importing streampickle (the sans-IO core)
# pulls in no socket, thread or event-loop machinery.
_LAZY = {
    "sync": ("streampickle.sync", None),
    "testing": ("streampickle.testing", None),
    "ObjectStream": ("streampickle._stream", "ObjectStream"),
    "MemoryBudget": ("streampickle._budget", "MemoryBudget"),
    "dump": ("streampickle._stream", "dump"),
    "load": ("streampickle._stream", "load"),
    "iter_load": ("streampickle._files", "iter_load"),
    "load_pickle": ("streampickle._pickle_stream", "load_pickle"),
    "connect_tcp": ("streampickle._sockets", "connect_tcp"),
    "connect_unix": ("streampickle._sockets", "connect_unix"),
    "create_tcp_listener": ("streampickle._sockets", "create_tcp_listener"),
    "create_unix_listener": ("streampickle._sockets", "create_unix_listener"),
    "ObjectStreamListener": ("streampickle._sockets", "ObjectStreamListener"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'streampickle' has no attribute {name!r}") from None
    import importlib

    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    # the lazily loaded names too, before their first use (help() lists __all__)
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "WIRE_VERSION",
    "AuthenticationError",
    "BufferPool",
    "DeadlineExceededError",
    "Decoder",
    "EncodeError",
    "Encoder",
    "ForbiddenGlobalError",
    "IncompleteMessageError",
    "Key",
    "LimitExceededError",
    "Limits",
    "MalformedPickleError",
    "MemoryBudget",
    "MessageDroppedError",
    "ObjectStream",
    "ObjectStreamListener",
    "PickleDecoder",
    "Progress",
    "ProtocolError",
    "StreamBrokenError",
    "StreamPickleError",
    "UsageError",
    "buffer_pool",
    "connect_tcp",
    "connect_unix",
    "create_tcp_listener",
    "create_unix_listener",
    "dump",
    "dumps",
    "iter_load",
    "load",
    "load_pickle",
    "loads",
    "shared_copy",
    "shared_empty",
    "sync",
    "testing",
]
