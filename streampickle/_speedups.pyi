"""Types of the C extension ``_speedups.c``: every function it exports, and its constants.

Import it only through ``streampickle._accel``, whose ``speedups`` is this module or ``None``.
"""

from collections.abc import Callable
from typing import Any

# The verifier's bounds, for the test that holds them to _verify's.
MAX_OPEN_MARKS: int
MAX_KEY_DEPTH: int
MAX_TUPLE_DEPTH: int
WORK_PER_BYTE: int
WORK_BASE: int
MAX_EQUAL_HASHES: int
#: The kind names of _kinds, to their bits.
KINDS: dict[str, int]

def scan(data: bytes | bytearray | memoryview, chunk_count: int, /) -> int | tuple[int, str]:
    """0 (plain, admitted), 1 (defer to the full verifier), or (position, reason) if refused."""

def verify(
    data: bytes | bytearray | memoryview,
    chunk_count: int,
    resolver: Callable[[str, str, int], Any],
    max_opaque_keys: int,
    /,
    *,
    persistent: bool = False,
) -> int | tuple[int, str]:
    """The number of STACK_GLOBAL and BINPERSID opcodes, or (position, reason) if refused;
    ``persistent``: admit BINPERSID (the decoder has a persistent_load)."""

def load_plain(data: object, trusted: bool, max_pickle: int, max_message: int, /) -> Any:
    """The object of the one plain message that is all of ``data``, or NotImplemented."""

def load_inband(pickled: bytes, trusted: bool, /) -> Any:
    """``pickle.loads(pickled)`` if it is plain, else NotImplemented."""

def take_plain(
    data: bytes | bytearray | memoryview,
    pos: int,
    max_pickle: int,
    max_message: int,
    append: Callable[[tuple[bytes, Any]], object],
    no_chunks: Any,
    /,
) -> int:
    """The offset of the first message from ``pos`` that isn't a whole plain one; each
    whole plain one before it appended as (pickle, no_chunks)."""

def frame(pickled: bytes, flags: int, /) -> bytes:
    """Header + pickled: a message without side chunks."""

def unshared(obj: object, /) -> bool:
    """Whether ``obj`` pickles to the same objects without the pickler's memo."""

def dump(pickler: Any, obj: object, /) -> None:
    """``pickler.dump(obj)``, without the memo if ``unshared(obj)``."""

def dump_small(pickler: Any, out: list[Any], buffers: list[Any], obj: object, limit: int, /) -> bytes | None:
    """A small plain message, or None (the caller finishes from ``out`` and ``buffers``)."""

def address(buffer: Any, /) -> int:
    """The address of a contiguous buffer's first byte."""

def plain_ndarray(
    dtypes: dict[str, Any], descr: object, shape: object, fortran: object, buffer: object, /
) -> Any:
    """An array of the common case, or None: ``_rebuild.plain_ndarray_py``."""

def reduce_ndarray(
    descrs: dict[int, tuple[Any, str]], rebuilder: Any, fallback: Callable[[Any], Any], array: Any, /
) -> Any:
    """``_encoder._reduce_ndarray(array)``: its common case in C, ``fallback(array)`` otherwise."""

class Mapping:
    """Shared memory ``map_shared`` mapped: a writable buffer of unsigned bytes, unmapped when
    the last reference goes."""

    @property
    def address(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def map_shared(fd: int, offset: int, size: int, huge_page: int, on_free: Callable[[int], object] | None, /) -> Mapping:
    """A Mapping of ``size`` bytes of ``fd`` from ``offset`` (_shm._map_py); OSError if refused.
    Not on Windows."""
