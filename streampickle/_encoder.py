"""The sans-IO encoder: an object in, a list of bytes-like chunks out.

The whole object is pickled before the first chunk exists, so a ``__reduce__`` that raises
leaves nothing half-written: the caller gets :class:`EncodeError` and has sent zero bytes.

Chunks are passed through, never joined: every out-of-band buffer (numpy array memory, any
``pickle.PickleBuffer``) is its own chunk, a memoryview of the original memory. The chunks
hold references to that memory, so they stay valid after ``encode`` returns; the caller must
not modify the arrays until the chunks are written (the same rule as ``socket.sendmsg``).
A pickle over 64 KiB is passed on in the pieces the pickler wrote (64 KiB frames, and large
bytes or str payloads as they are), not joined. Only the small parts (header, length table,
and a pickle under 64 KiB) are joined, so that a small message goes out in one write.

A graph of plain data in which no object can appear twice (``_speedups.unshared``: nothing
but the root referenced from outside its parent) is pickled without the pickler's memo,
which is most of the cost of pickling a large graph: a million (int, float, str) tuples
pickle 6x as fast. The objects that come back are the same; the pickle has no MEMOIZE ops.
"""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import fractions
import functools
import pickle
import sys
import uuid
import zoneinfo
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, NoReturn, TypeVar, cast

import numpy as np

from . import _rebuild, _shm, _wire
from ._accel import speedups
from ._errors import EncodeError, UsageError, encode_error
from ._limits import Limits
from ._mac import Key, as_key, new_sender
from ._shm import SharedChunks

__all__ = ["Chunk", "Encoder", "dumps"]

#: What ``Encoder.encode`` returns a list of: bytes for what it built, memoryviews of the
#: caller's memory for out-of-band buffers.
Chunk = bytes | memoryview
# What drop_sent trims: a list of views for sendmsg, or of chunks as they came.
_Piece = TypeVar("_Piece", memoryview, Chunk)

#: Most buffers one ``sendmsg`` takes on Linux (IOV_MAX).
IOV_MAX = 1024


def sendable(chunks: list[Chunk]) -> list[memoryview]:
    """The non-empty chunks as flat byte views, ready for ``sendmsg``."""
    return [memoryview(c).cast("B") for c in chunks if len(c)]


def drop_sent(views: list[_Piece], sent: int) -> None:
    """Remove the first ``sent`` bytes from ``views`` (in place) after a partial ``sendmsg``."""
    while sent:
        first = views[0]
        if sent >= len(first):
            sent -= len(first)
            del views[0]
        else:
            views[0] = first[sent:]
            sent = 0


# The wire descriptors of the plain (non-structured) dtypes met so far, by the dtype's identity:
# numpy's builtin dtypes are singletons, so an array of a common dtype finds its descriptor
# with one lookup instead of ``descr_of``'s checks (a third of an array's encoding). Keyed by
# id with the dtype kept in the entry, not by the dtype itself: dtypes compare equal across
# differences that matter here (metadata). Bounded: past the bound, descr_of as before.
_PLAIN_DESCRS: dict[int, tuple[np.dtype[Any], str]] = {}
_PLAIN_DESCRS_MAX = 256


def _plain_descr(dt: np.dtype[Any]) -> str | list[Any] | None:
    """``_rebuild.descr_of(dt)``, remembered for plain dtypes."""
    known = _PLAIN_DESCRS.get(id(dt))
    if known is not None and known[0] is dt:
        return known[1]
    descr = _rebuild.descr_of(dt)
    if type(descr) is str and len(_PLAIN_DESCRS) < _PLAIN_DESCRS_MAX:
        _PLAIN_DESCRS[id(dt)] = (dt, descr)
    return descr


def _reduce_ndarray(arr: np.ndarray[Any, Any]) -> Any:
    dt = arr.dtype
    descr = _plain_descr(dt)
    if descr is None:
        if dt == np.dtype(object):
            fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous)
            items = arr.ravel(order="F" if fortran else "C").tolist()
            return _rebuild.object_ndarray, (list(arr.shape), fortran, bool(arr.flags.writeable), items)
        return NotImplemented  # exotic dtype: numpy's own pickling (only trusted=True loads it)
    if arr.flags.c_contiguous:
        fortran = False
    elif arr.flags.f_contiguous:
        fortran = True
    else:  # a strided view: one contiguous copy, sent out-of-band like any array
        writeable = arr.flags.writeable
        arr = np.ascontiguousarray(arr)
        arr.flags.writeable = writeable
        fortran = False
    # The array's own memory, exported whole (the encoder sends it as flat bytes, ``raw()``);
    # the receiver rebuilds dtype and shape from the descriptor. The buffer protocol has no
    # format for datetime64 and a few other dtypes: those export a flat uint8 view instead.
    try:
        # ignore: numpy's stubs declare ndarray.__buffer__ for Python 3.12+ only; it has the
        # buffer protocol on every version.
        buffer = pickle.PickleBuffer(arr)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        buffer = pickle.PickleBuffer(arr.ravel(order="K").view(np.uint8))  # type: ignore[arg-type]
    return _rebuild.ndarray, (descr, list(arr.shape), fortran, buffer)


#: ``_reduce_ndarray``, whose common case (a remembered dtype, contiguous memory) runs in C
#: when the extension is built: the same reduction, or the Python reducer for every other array.
_reduce_array: Callable[[Any], Any] = (
    functools.partial(speedups.reduce_ndarray, _PLAIN_DESCRS, _rebuild.ndarray, _reduce_ndarray)
    if speedups else _reduce_ndarray
)


def _reduce_generic(value: np.generic) -> Any:
    descr = _rebuild.descr_of(value.dtype)
    if descr is not None:
        return _rebuild.scalar, (descr, value.tobytes())
    descr = _rebuild.empty_descr_of(value.dtype)
    if descr is not None:  # np.str_(""), np.bytes_(b""), np.void(b""): no bytes, whatever
        return _rebuild.scalar, (descr, b"")  # tobytes() says (np.str_("") gives four)
    return NotImplemented


def _reduce_dtype(dt: np.dtype[Any]) -> Any:
    descr = _rebuild.descr_of(dt)
    if descr is None:
        descr = _rebuild.empty_descr_of(dt)  # np.dtype("U0"), the dtype of np.str_("")
    if descr is None:
        return NotImplemented
    return _rebuild.dtype, (descr,)


# The Python value types below are reduced to the reconstructors a safe loader accepts. A value
# outside a reconstructor's bounds (a Fraction of 20,000 bits, a slice of strs, a datetime
# whose tzinfo is some other class) keeps its own pickling: it loads with trusted=True, or with
# its class in allow=.


def _int64(value: Any) -> bool:
    return type(value) is int and _rebuild.INT64_MIN <= value <= _rebuild.INT64_MAX


def _reduce_slice(s: slice) -> Any:
    parts = (s.start, s.stop, s.step)
    if all(p is None or _int64(p) for p in parts):
        return _rebuild.slice_, parts
    return NotImplemented


def _reduce_range(r: range) -> Any:
    if _int64(r.start) and _int64(r.stop) and _int64(r.step):
        return _rebuild.range_, (r.start, r.stop, r.step)
    return NotImplemented


def _reduce_fraction(f: fractions.Fraction) -> Any:
    n, d = f.numerator, f.denominator
    if type(n) is int and type(d) is int and max(n.bit_length(), d.bit_length()) <= _rebuild.FRACTION_MAX_BITS:
        return _rebuild.fraction, (n, d)
    return NotImplemented


def _reduce_decimal(d: decimal.Decimal) -> Any:
    sign, digits, exponent = d.as_tuple()
    if type(exponent) is int:
        if len(digits) > _rebuild.DECIMAL_MAX_DIGITS or abs(exponent) > _rebuild.DECIMAL_MAX_EXPONENT:
            return NotImplemented
    elif exponent == "F":
        digits = ()  # as_tuple() gives (0,) for an infinity; the wire has no digits
    elif len(digits) > _rebuild.DECIMAL_MAX_DIGITS:
        return NotImplemented
    return _rebuild.decimal, (sign, "".join(map(str, digits)), exponent)


def _reduce_ordered_dict(od: collections.OrderedDict[Any, Any]) -> Any:
    return _rebuild.ordered_dict, (dict(od),)


def _reduce_deque(dq: collections.deque[Any]) -> Any:
    return _rebuild.deque, (list(dq), dq.maxlen)


def _reduce_timedelta(td: datetime.timedelta) -> Any:
    return _rebuild.timedelta, (td.days, td.seconds, td.microseconds)


def _reduce_timezone(tz: datetime.timezone) -> Any:
    # (offset,) or (offset, name): None for the default name. No public API tells a default
    # name from a given one; typeshed omits the method (ignore), both datetime modules have it.
    args = tz.__getinitargs__()  # type: ignore[attr-defined]
    offset = args[0]
    return _rebuild.timezone, (
        (offset.days * 86_400 + offset.seconds) * 1_000_000 + offset.microseconds,
        args[1] if len(args) > 1 else None,
    )


def _reduce_zoneinfo(tz: zoneinfo.ZoneInfo) -> Any:
    if type(tz.key) is not str:  # ZoneInfo.from_file: no key to name it by
        return NotImplemented
    return _rebuild.zoneinfo, (tz.key,)


def _plain_tz(tz: Any) -> bool:
    """Whether a time's or datetime's tzinfo travels by a reconstructor (else the whole value
    keeps its own pickling, so that allow= can still load it)."""
    return tz is None or type(tz) is datetime.timezone or (type(tz) is zoneinfo.ZoneInfo and type(tz.key) is str)


def _reduce_time(t: datetime.time) -> Any:
    if not _plain_tz(t.tzinfo):
        return NotImplemented
    return _rebuild.time, (t.hour, t.minute, t.second, t.microsecond, t.tzinfo, t.fold)


def _reduce_datetime(d: datetime.datetime) -> Any:
    if not _plain_tz(d.tzinfo):
        return NotImplemented
    return _rebuild.datetime, (d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, d.tzinfo, d.fold)


#: Reductions by exact type: a subclass (an IntEnum, a datetime subclass) is not in here and
#: keeps its own pickling.
_EXACT: dict[type, Callable[[Any], Any]] = {
    np.ndarray: _reduce_array,
    complex: lambda c: (_rebuild.complex_, (c.real, c.imag)),
    slice: _reduce_slice,
    range: _reduce_range,
    type(Ellipsis): lambda _: (_rebuild.ellipsis, ()),
    type(NotImplemented): lambda _: (_rebuild.not_implemented, ()),
    fractions.Fraction: _reduce_fraction,
    decimal.Decimal: _reduce_decimal,
    uuid.UUID: lambda u: (_rebuild.uuid, (u.int,)),
    collections.OrderedDict: _reduce_ordered_dict,
    collections.deque: _reduce_deque,
    collections.Counter: lambda c: (_rebuild.counter, (dict(c),)),
    datetime.date: lambda d: (_rebuild.date, (d.year, d.month, d.day)),
    datetime.time: _reduce_time,
    datetime.datetime: _reduce_datetime,
    datetime.timedelta: _reduce_timedelta,
    datetime.timezone: _reduce_timezone,
    zoneinfo.ZoneInfo: _reduce_zoneinfo,
}


def _reduce_known(obj: Any) -> Any:
    """The library's reduction of ``obj`` to a safe reconstructor call, or NotImplemented."""
    reduce = _EXACT.get(type(obj))
    if reduce is not None:
        return reduce(obj)
    if isinstance(obj, np.generic):
        return _reduce_generic(obj)
    if isinstance(obj, np.dtype):
        return _reduce_dtype(obj)
    return NotImplemented


def _mappings_needed(entries: list[tuple[int, int]], lengths: list[int], files: int) -> int:
    """How many mappings the receiver would make for the side chunks ``entries`` place in
    ``files`` shared files (see ``_shm.MAX_MAPPINGS``)."""
    return sum(_shm.mappings_needed(ranges) for _, ranges in _shm.by_file(entries, lengths, files))


class _Pickler(pickle.Pickler):
    """The C pickler, with numpy and the standard library's value types reduced to
    streampickle's safe reconstructors. ``reducer_override`` only runs for objects the C fast
    paths don't cover (not for ints, floats, strs, bytes, lists, tuples, dicts, sets), so plain
    data costs nothing extra; the rest pays one dict lookup on its exact type."""

    reducer_override = staticmethod(_reduce_known)  # no bound-method frame on the hot path


def _check_hooks(pickler_class: Any, dispatch_table: Any, persistent_id: Any) -> None:
    """Refuse hooks of the wrong type, as the caller's mistake (:class:`UsageError`)."""
    if pickler_class is not None and not (
        isinstance(pickler_class, type) and issubclass(pickler_class, pickle.Pickler)
    ):
        raise UsageError(f"pickler_class must be a subclass of pickle.Pickler, not {pickler_class!r}")
    if dispatch_table is not None and not isinstance(dispatch_table, Mapping):
        raise UsageError(f"dispatch_table must be a mapping of type to reducer, not {type(dispatch_table).__name__}")
    if persistent_id is not None and not callable(persistent_id):
        raise UsageError(f"persistent_id must be a callable, not {type(persistent_id).__name__}")


def _hooked_pickler(
    pickler_class: type[pickle.Pickler] | None,
    dispatch_table: Mapping[type, Callable[[Any], Any]] | None,
) -> type[pickle.Pickler]:
    """A subclass of ``pickler_class`` (default ``pickle.Pickler``) whose ``reducer_override``
    asks, in this order: the class's own ``reducer_override``; then, for a type in
    ``dispatch_table``, nobody (the pickler then uses that table); then the library's reducers.
    What none of them takes goes on as ``pickle`` does: the class's ``dispatch_table`` (with
    ``dispatch_table`` in front of it), ``copyreg``, ``__reduce_ex__``.

    Why this order: the user's hooks are the more specific choice, so they win for the types
    they name; the library's reducers still run before the class's own table and ``copyreg``
    (which pickle ``complex`` by ``builtins.complex``, a global a safe peer refuses), so that
    numpy arrays stay zero-copy side chunks and safe loading keeps working."""
    base: type[pickle.Pickler] = pickle.Pickler if pickler_class is None else pickler_class
    own = getattr(base, "reducer_override", None)
    table: Mapping[type, Callable[[Any], Any]] = dispatch_table if dispatch_table is not None else {}

    def reducer_override(self: pickle.Pickler, obj: Any) -> Any:
        if own is not None:
            reduced = own(self, obj)
            if reduced is not NotImplemented:
                return reduced
        if type(obj) in table:
            return NotImplemented
        return _reduce_known(obj)

    namespace: dict[str, Any] = {"reducer_override": reducer_override, "__module__": __name__}
    if dispatch_table is not None:  # read live, as pickle reads a dispatch_table: later entries count
        inherited = getattr(base, "dispatch_table", None)  # on pickle.Pickler itself: a slot, not a table
        behind = inherited if isinstance(inherited, Mapping) else copyreg.dispatch_table
        # A view of the class's table, not a copy: reducers registered there later still count.
        namespace["dispatch_table"] = collections.ChainMap(
            cast("MutableMapping[Any, Any]", table), cast("MutableMapping[Any, Any]", behind)
        )  # ChainMap only reads them
    return type(f"Hooked{base.__name__}", (base,), namespace)


#: Pickles up to this size can't have grown the memo table past _PICKLER_MAX_BYTES.
_MEMO_CHECK_BYTES = 2048
#: A pickler (memo table and write buffer) bigger than this is replaced, not cleared.
_PICKLER_MAX_BYTES = 64 * 1024


class _Pieces(list[Any]):
    """The pickler's output file: each write is kept as it is, with no copy into a BytesIO.

    The C pickler writes a small pickle once, as one bytes object at the end of ``dump``; a
    large one in 64 KiB frames, plus each large bytes, str or bytearray payload on its own.
    """

    write = list.append


def _frame_py(pickled: bytes, flags: int) -> bytes:
    """A message without side chunks: header + pickle (a tag, if any, is appended later)."""
    return _wire.pack_header(flags, 0, len(pickled)) + pickled


#: How deep ``unshared`` walks; a graph nested deeper is left to the memo (as in C).
_UNSHARED_MAX_DEPTH = 200
_NEVER_MEMOIZED = frozenset({bool, int, float})


def _unshared_py(obj: Any) -> bool:
    """The Python twin of C ``unshared`` (see ``_speedups.c``): whether pickling ``obj``
    without the memo gives back the same objects. True when the graph holds only exact None,
    bool, int, float, str, bytes, list, tuple and dict objects, and each str, bytes or
    container in it but the root has one reference (from its parent), so it appears once;
    strings and bytes of at most one ASCII character are exempt. The same answer as C on every
    input, so that both configurations write the same bytes."""
    kind = type(obj)
    if kind is list or kind is dict or kind is tuple:
        return _unshared_walk(obj, 0)
    return obj is None or kind in _NEVER_MEMOIZED or kind is str or kind is bytes


def _unshared_walk(container: Any, depth: int) -> bool:
    """Whether every item of ``container`` (a list, tuple or dict ``depth`` levels below the
    root) passes the test for a non-root object, each read in its own loop shape."""
    if depth >= _UNSHARED_MAX_DEPTH:
        return False
    depth += 1
    if type(container) is dict:
        for key in container:
            if not _unshared_item(key, depth, _KEY_REFS):
                return False
            value = container[key]
            if not _unshared_item(value, depth, _VALUE_REFS):
                return False
        return True
    for item in container:  # noqa: SIM110 - the loop _walk_refs measures; all() would be another
        if not _unshared_item(item, depth, _ITEM_REFS):
            return False
    return True


def _unshared_item(item: Any, depth: int, walk_refs: int) -> bool:
    """C ``unshared_impl`` for a non-root ``item``; ``walk_refs``: the references the walk
    holds on it while it reads the count (its loop's local, this call's argument)."""
    kind = type(item)
    if item is None or kind in _NEVER_MEMOIZED:
        return True
    if kind is str:
        return (
            sys.getrefcount(item) - walk_refs == 1
            or len(item) == 0
            or (len(item) == 1 and item.isascii())
        )
    if kind is bytes:
        return sys.getrefcount(item) - walk_refs == 1 or len(item) <= 1
    if kind is tuple and not item:
        return True  # written as EMPTY_TUPLE, never memoized
    if kind is list or kind is tuple or kind is dict:
        return sys.getrefcount(item) - walk_refs == 1 and _unshared_walk(item, depth)
    return False


def _walk_refs() -> tuple[int, int, int]:
    """The references the walk's three loop shapes hold on an item whose container holds the
    only other one: measured, not assumed, so that the twin stays right on an interpreter that
    counts locals differently."""
    seen = []

    def count(item: Any, depth: int, walk_refs: int) -> bool:
        seen.append(sys.getrefcount(item))
        return True

    probe: list[list[Any]] = [[]]
    for item in probe:
        count(item, 0, 0)
    mapping: dict[tuple[str, object], list[Any]] = {("fresh", object()): [[]][0]}
    for key in mapping:
        count(key, 0, 0)
        value = mapping[key]
        count(value, 0, 0)
    item_refs, key_refs, value_refs = (n - 1 for n in seen)
    return item_refs, key_refs, value_refs


_ITEM_REFS, _KEY_REFS, _VALUE_REFS = _walk_refs()


def _dump_py(pickler: pickle.Pickler, obj: Any) -> None:
    """``pickler.dump(obj)``, without the memo when :func:`_unshared_py` says it can: the same
    bytes as the C ``dump``."""
    if _unshared_py(obj):
        pickler.fast = True
        try:
            pickler.dump(obj)
        finally:
            pickler.fast = False
    else:
        pickler.dump(obj)


def _dump_small_py(pickler: pickle.Pickler, out: list[Any], buffers: list[Any], obj: Any, limit: int) -> bytes | None:
    """``dumps()``'s commonest case: dump ``obj``; if that made one pickle of at most ``limit``
    bytes and no out-of-band buffer, reset the pickler and return the framed message, else
    None (the caller finishes from ``out`` and ``buffers``)."""
    _dump(pickler, obj)
    if len(out) == 1 and not buffers and len(out[0]) <= limit:
        pickled = out[0]
        out.clear()
        pickler.clear_memo()
        return _frame(pickled, 0)
    return None


# Without the C extension: the same bytes, built in Python (see _unshared_py).
_frame_c = speedups.frame if speedups else None
_dump_c = speedups.dump if speedups else None
_dump_small_c = speedups.dump_small if speedups else None

_frame = _frame_c or _frame_py
# Pickles obj; without the memo when no object in it can appear twice (see _speedups.unshared:
# for a large graph the memo is most of pickling's cost).
_dump = _dump_c or _dump_py
_dump_small = _dump_small_c or _dump_small_py


class Encoder:
    """Turns objects into the chunks of one message each. No I/O; reusable; not thread-safe.

    ``key``: if given, every message is signed (HMAC-SHA256 for ``bytes``; a :class:`Key`
    names its MAC): a tag over its header right after it, so the receiver commits no memory
    to a forged header, and a tag over all its bytes at its end. The peer's decoder must have
    the same key.

    ``stream`` (with a key): the encoder's messages form one direction of a stream. Each
    carries this encoder's sender id (random, drawn once) and its sequence number from 0, so
    that the peer's :class:`Decoder` refuses a replayed, dropped, reordered or reflected
    message, and :meth:`encode_end` can end the stream so that a cut is told from a clean
    end. Send the messages in the order they are encoded. ``stream=False`` makes messages
    that stand alone, as :func:`dumps` does: any key holder's decoder with ``stream=False``
    accepts each of them, again and in any order.

    ``limits``: refuse, with :class:`EncodeError` and before any chunk exists, a message that
    a decoder with these :class:`Limits` would refuse (too many bytes, side chunks or pickle
    bytes), instead of sending it for the peer to refuse and hang up on.

    ``shared_memory``: a side chunk whose memory lies in a shared-memory file of this process
    (:func:`shared_empty`, :func:`shared_copy`) travels as a reference to the file, not as
    bytes; such a message comes back as a :class:`~streampickle._shm.SharedChunks` list whose
    ``descriptors`` go with its first byte (``SCM_RIGHTS`` on a Unix socket). For a peer on
    the same host whose decoder has ``shared_memory=True`` too. Not with a key: memory the
    sender can still write can't be authenticated (:class:`UsageError`).

    Pickle's hooks, as ``pickle.Pickler`` has them: ``pickler_class``, a subclass of
    ``pickle.Pickler`` to pickle with (``cloudpickle.Pickler``, say); ``dispatch_table``, a
    mapping of type to reducer; ``persistent_id``, a callable that returns an object's
    persistent id, or None to pickle it. Out-of-band buffers still travel as side chunks. For
    each object, the first to take it wins: the class's ``reducer_override``, then
    ``dispatch_table``, then streampickle's own reducers (numpy arrays, scalars and dtypes, and
    the standard library's value types that a safe peer rebuilds), then the class's own
    ``dispatch_table``, ``copyreg`` and ``__reduce_ex__``. What the hooks make loads safely only
    if it names no global outside the peer's allowlist (or the peer is ``trusted``); a peer
    decodes persistent ids with ``Decoder(persistent_load=...)``. With any hook set, every
    message takes the general pickling path (no memo-less fast path).
    """

    def __init__(
        self,
        *,
        key: bytes | Key | None = None,
        stream: bool = True,
        limits: Limits | None = None,
        shared_memory: bool = False,
        pickler_class: type[pickle.Pickler] | None = None,
        dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
        persistent_id: Callable[[Any], Any] | None = None,
    ) -> None:
        if limits is not None and not isinstance(limits, Limits):
            raise UsageError(f"limits must be a streampickle.Limits, not {type(limits).__name__}")
        if shared_memory:
            _shm.check_no_key(key)
        _check_hooks(pickler_class, dispatch_table, persistent_id)
        self._hooks = (pickler_class, dispatch_table, persistent_id)
        self._hooked = pickler_class is not None or dispatch_table is not None or persistent_id is not None
        self._pickler_type: type[pickle.Pickler] = (
            _hooked_pickler(pickler_class, dispatch_table) if self._hooked else _Pickler
        )
        self._shared_memory = bool(shared_memory) and _shm.AVAILABLE
        self._limits = limits
        self._key = as_key(key)
        self._flags = self._key.flags if self._key is not None else 0
        self._sender = new_sender() if self._key is not None and stream else _wire.NO_SENDER
        self._sequence = 0
        # One pickler and output file, reused: creating them costs more than pickling a small
        # object. ``_busy`` guards against re-entry (a __reduce__ that encodes).
        self._out = _Pieces()
        self._buffers: list[pickle.PickleBuffer] = []
        self._pickler = self._new_pickler()
        self._busy = False

    def _new_pickler(self) -> pickle.Pickler:
        # The callback is the list's own append, not a method of self: an encoder is then no
        # reference cycle (self -> pickler -> bound method -> self), and one made per call
        # (dumps with a key) is freed at once instead of by the cyclic GC.
        pickler = self._pickler_type(self._out, protocol=5, buffer_callback=self._buffers.append)
        persistent_id = self._hooks[2]
        if persistent_id is not None:
            # ignore: typeshed declares persistent_id a method; the C pickler takes any callable
            pickler.persistent_id = persistent_id  # type: ignore[method-assign]
        return pickler

    def encode(self, obj: Any) -> list[Chunk]:
        """Return the chunks of one message carrying ``obj``; their concatenation is the
        message. Raises :class:`EncodeError` (and returns nothing) if ``obj`` can't be pickled.
        """
        chunks = self._encode(obj, True)
        if self._limits is not None:
            self._check_limits(obj, chunks, 0)
        return chunks

    def encode_unsigned(self, obj: Any) -> tuple[list[Chunk], Any]:
        """For transports that MAC while they send: the chunks of a keyed message without its
        tag, and a fresh MAC object to update with every byte as it goes out; the tag is its
        digest, sent last. Small messages (one chunk) come back signed as by :meth:`encode`,
        with None.

        Why: hashing the whole message before its first byte leaves makes the two ends hash
        one after the other; hashing each slice as it is sent lets the receiver hash slice k
        while the sender hashes slice k+1. Each slice is hashed from the memory it is sent
        from, so an array mutated meanwhile makes the tag fail: never a silent difference.
        """
        chunks = self._encode(obj, False)
        if self._key is None:
            if self._limits is not None:
                self._check_limits(obj, chunks, 0)
            return chunks, None
        if len(chunks) == 1:
            chunks = [b"".join((chunks[0], self._key.digest(chunks[0])))]
            mac = None
        else:
            mac = self._key.new()
        if self._limits is not None:
            self._check_limits(obj, chunks, 0 if mac is None else _wire.TAG_SIZE)
        return chunks, mac

    def _encode_joined(self, obj: Any) -> bytes:
        """``b"".join(self.encode(obj))`` for an encoder without a key or limits that nothing
        else uses meanwhile (``dumps``' pool: no ``_busy`` guard needed). The commonest
        message, small and plain, is made in one C call: ``dumps`` of a small object is half
        Python glue and half pickling, and each line shows in the total."""
        try:
            framed = _dump_small(self._pickler, self._out, self._buffers, obj, _MEMO_CHECK_BYTES)
        except BaseException as exc:  # noqa: BLE001 - _fail resets the encoder and re-raises
            self._fail(obj, exc)
        if framed is not None:
            return framed
        parts, size, views = self._finish(obj)
        if views is None and len(parts) == 1:
            return _frame(parts[0], 0)  # header and pickle in one allocation
        return b"".join(self._assemble(parts, size, views, True))

    def _check_limits(self, obj: Any, chunks: list[Chunk], tag: int) -> None:
        """Refuse a message over ``self._limits`` (``tag``: bytes still to come after the
        chunks), taking back its sequence number."""
        limits = self._limits
        assert limits is not None
        header = _wire.parse_header(memoryview(chunks[0])[: _wire.HEADER_SIZE])
        size = sum(memoryview(c).nbytes for c in chunks) + tag
        if type(chunks) is SharedChunks:
            size += chunks.shared_bytes
        for what, value, field in (
            ("bytes in all", size, "max_message_size"),
            ("pickle bytes", header.pickle_length, "max_pickle_size"),
            ("side chunks", header.chunk_count, "max_side_chunks"),
        ):
            limit = getattr(limits, field)
            if value > limit:
                self.unsend()
                raise EncodeError(
                    f"could not send {type(obj).__name__} object: its message has {value} "
                    f"{what}, over Limits.{field}={limit}, so a peer with these limits would "
                    f"refuse it. Nothing was sent; raise the limit on both ends to send it."
                )

    def _encode(self, obj: Any, sign: bool) -> list[Chunk]:
        if self._busy:  # a __reduce__ that encodes: a second pickler, the same stream
            pickler_class, dispatch_table, persistent_id = self._hooks
            nested = Encoder(key=self._key, stream=False, pickler_class=pickler_class,
                             dispatch_table=dispatch_table, persistent_id=persistent_id)
            nested._sender, nested._sequence = self._sender, self._sequence
            chunks = nested._encode(obj, sign)
            self._sequence = nested._sequence
            return chunks
        self._busy = True
        if self._key is None and not self._hooked:
            # The commonest message, small and plain, framed in the same C call as dumps() uses.
            try:
                framed = _dump_small(self._pickler, self._out, self._buffers, obj, _MEMO_CHECK_BYTES)
            except BaseException as exc:  # noqa: BLE001 - _fail resets the encoder and re-raises
                self._fail(obj, exc)
            if framed is not None:
                self._busy = False
                return [framed]
            parts, size, views = self._finish(obj)
        else:
            parts, size, views = self._pickle(obj)
        if views is None and self._key is None and size <= _wire.COALESCE_LIMIT:
            return [_frame(parts[0], 0)]  # every small unkeyed message: one chunk, one allocation
        return self._assemble(parts, size, views, sign)

    def _pickle(self, obj: Any) -> tuple[list[bytes], int, list[memoryview] | None]:
        """Pickle ``obj``: the pickle part (in pieces; one if it is at most 64 KiB), its size,
        and the out-of-band buffers' views (None if there are none). Leaves the encoder ready
        for the next object, whatever happens."""
        try:
            if self._hooked:  # the hooks see every object: no memo-less fast path
                self._pickler.dump(obj)
            else:
                _dump(self._pickler, obj)
        except BaseException as exc:  # noqa: BLE001 - _fail resets the encoder and re-raises
            self._fail(obj, exc)
        return self._finish(obj)

    def _finish(self, obj: Any) -> tuple[list[bytes], int, list[memoryview] | None]:
        """After a successful dump: take the pickle and views, and reset for the next one."""
        buffers = self._buffers
        views = None
        if buffers:
            try:
                views = [b.raw() for b in buffers]  # a non-contiguous PickleBuffer raises
            except BaseException as exc:  # noqa: BLE001 - _fail resets the encoder and re-raises
                self._fail(obj, exc)
            buffers.clear()
        out = self._out
        if len(out) == 1:  # a pickle under 64 KiB: the pickler's own bytes
            parts = [out[0]]
            size = len(parts[0])
        else:
            # Large payloads come as the objects pickled: a bytearray is copied, so that the
            # message doesn't change if the caller changes it after encode().
            parts = [p if type(p) is bytes else bytes(p) for p in out]
            size = sum(map(len, parts))
        out.clear()
        # The pickler's memo table never shrinks, and clearing it costs its whole size: after
        # one large object graph, every small message would pay milliseconds. So a pickler
        # whose memo grew is replaced. (A pickle of n bytes memoizes fewer than n objects.)
        if size > _MEMO_CHECK_BYTES and self._pickler.__sizeof__() > _PICKLER_MAX_BYTES:
            self._pickler = self._new_pickler()
        else:
            self._pickler.clear_memo()
        self._busy = False
        return parts, size, views

    def _fail(self, obj: Any, exc: BaseException) -> NoReturn:
        """After a failed dump: drop what it made (a fresh pickler keeps nothing of the
        failed object), and raise: for an Exception, an EncodeError that is also of its type
        (``except TypeError`` still catches what ``pickle.dumps`` raises as TypeError); others
        as they are."""
        for b in self._buffers:
            b.release()
        self._buffers.clear()
        self._out.clear()
        self._pickler = self._new_pickler()
        self._busy = False
        if not isinstance(exc, Exception):
            raise exc
        raise encode_error(f"could not pickle {type(obj).__name__} object: {exc}", exc) from exc

    def _assemble(self, parts: list[bytes], size: int, views: list[memoryview] | None, sign: bool) -> list[Chunk]:
        """The chunks of a message: header and length table (and with a key, the stream fields
        and the header tag), pickle, side chunks, tag."""
        count = 0 if views is None else len(views)
        if self._key is None:
            if views is not None:
                lengths = [v.nbytes for v in views]
                if self._shared_memory:
                    found = self._shared_references(views, lengths)
                    if found is not None:
                        return self._assemble_shared(parts, size, views, lengths, *found)
                head = _wire.pack_header(0, count, size) + _wire.pack_lengths(lengths)
            else:
                head = _wire.pack_header(0, count, size)
        else:
            head = self._signed_head(0, count, size, views)
        if size <= _wire.COALESCE_LIMIT:  # one piece in practice: the pickler flushes at 64 KiB
            whole = head + (parts[0] if len(parts) == 1 else b"".join(parts))
            if views is None:  # the whole message in one chunk
                if self._key is not None and sign:
                    whole += self._key.digest(whole)
                return [whole]
            chunks: list[Chunk] = [whole]
        else:
            chunks = [head, *parts]
        if views is not None:
            chunks.extend(views)
        if self._key is not None and sign:
            mac = self._key.new()
            for chunk in chunks:
                mac.update(chunk)
            chunks.append(mac.digest())
        return chunks

    @staticmethod
    def _shared_references(
        views: list[memoryview], lengths: list[int]
    ) -> tuple[list[tuple[int, int]], list[int], list[Any], bool] | None:
        """Where each side chunk (of ``lengths`` bytes) lies, if any lies in this process's
        shared files: each one's (descriptor index or ``INLINE``, offset), the descriptors in
        index order (one per file, however many chunks lie in it), the mappings to keep alive
        until they are sent, and whether every chunk is such a reference. None if every chunk
        goes inline. Past ``MAX_DESCRIPTORS`` files, chunks in a further file go inline."""
        one = _shm.in_one_file(views, lengths)
        if one is not None:  # the common case: every chunk in one file
            fd, offsets, mapping = one
            entries = [(0, offset) for offset in offsets]
            fds, owners, every = [fd], [mapping], True
        else:
            entries, fds, owners = Encoder._each_reference(views)
            if not fds:
                return None
            every = False
        if len(entries) > _shm.MAX_MAPPINGS and _mappings_needed(entries, lengths, len(fds)) > _shm.MAX_MAPPINGS:
            return None  # scattered over more parts of its files than a receiver maps: as bytes
        return entries, fds, owners, every

    @staticmethod
    def _each_reference(views: list[memoryview]) -> tuple[list[tuple[int, int]], list[int], list[Any]]:
        """``_shared_references`` chunk by chunk, for chunks in several files or in none: the
        entries, the descriptors in index order (none if no chunk lies in a shared file) and
        the mappings."""
        indices: dict[int, int] = {}
        entries: list[tuple[int, int]] = []
        owners: list[Any] = []  # each mapping once (a message's views of one buffer share it)
        for found in _shm.find(views):
            if found is None:
                entries.append((_wire.INLINE, 0))
                continue
            fd, offset, mapping = found
            index = indices.get(fd)
            if index is None:
                if len(indices) == _shm.MAX_DESCRIPTORS:
                    entries.append((_wire.INLINE, 0))
                    continue
                index = indices[fd] = len(indices)
            entries.append((index, offset))
            if not owners or owners[-1] is not mapping:
                owners.append(mapping)
        return entries, list(indices), owners

    def _assemble_shared(
        self,
        parts: list[bytes],
        size: int,
        views: list[memoryview],
        lengths: list[int],
        entries: list[tuple[int, int]],
        fds: list[int],
        owners: list[Any],
        every: bool,
    ) -> SharedChunks:
        """The chunks of a message some of whose side chunks are references to shared files:
        header, length table (every chunk's length), shared table, pickle, and only the inline
        chunks' bytes."""
        head = b"".join((
            _wire.pack_header(_wire.FLAG_SHARED, len(views), size),
            _wire.pack_lengths(lengths),
            _wire.pack_shared_table(len(fds), entries),
        ))
        chunks = SharedChunks()
        if size <= _wire.COALESCE_LIMIT:
            chunks.append(head + (parts[0] if len(parts) == 1 else b"".join(parts)))
        else:
            chunks.append(head)
            chunks.extend(parts)
        if every:  # no side chunk travels inline
            shared_bytes = sum(lengths)
        else:
            shared_bytes = 0
            for view, length, (index, _) in zip(views, lengths, entries, strict=True):
                if index == _wire.INLINE:
                    chunks.append(view)
                else:
                    shared_bytes += length
        chunks.descriptors = tuple(fds)
        chunks.shared_bytes = shared_bytes
        chunks._owners = tuple(owners)
        return chunks

    def _signed_head(self, flags: int, count: int, size: int, views: list[memoryview] | None) -> bytes:
        """A version-2 message's head: fixed header, stream fields, length table, header tag.
        Takes the next sequence number."""
        assert self._key is not None
        head = _wire.pack_header(self._flags | flags, count, size, _wire.VERSION_KEYED)
        head += _wire.pack_stream_fields(self._sender, self._sequence)
        if views is not None:
            head += _wire.pack_lengths([v.nbytes for v in views])
        if self._sender != _wire.NO_SENDER:
            self._sequence += 1
        return head + self._key.digest(head)

    def encode_end(self) -> bytes:
        """The authenticated end of this encoder's stream: send it last, so that the peer's
        decoder can tell a clean end from a connection cut by an attacker or a crash (without
        it, a keyed stream's end raises :class:`AuthenticationError`). Only for a keyed
        stream encoder."""
        if self._key is None or self._sender == _wire.NO_SENDER:
            raise UsageError("encode_end() ends a keyed stream: it needs Encoder(key=..., stream=True)")
        return self._signed_head(_wire.FLAG_END, 0, 0, None)

    @property
    def sender(self) -> bytes:
        """This encoder's 8-byte sender id: random for a keyed stream encoder, all zeros for
        messages that stand alone. A :class:`Decoder` given it (``pair_with``) refuses this
        encoder's messages reflected back."""
        return self._sender

    @property
    def sequence(self) -> int:
        """The sequence number this keyed stream encoder's next message takes (0 before the
        first); always 0 for messages that stand alone."""
        return self._sequence

    def unsend(self) -> None:
        """Take back the sequence number of the last message encoded, which was never sent
        (its send was cancelled before its first byte), so the next message takes its place.
        Only for a message no byte of which reached the peer: otherwise the peer sees two
        messages with one number and ends the stream."""
        if self._sender != _wire.NO_SENDER and self._sequence:
            self._sequence -= 1


# dumps() without a key reuses encoders (making one costs more than pickling a small object),
# and so does encode_once(), by whether they send shared memory. list.pop and list.append are
# atomic, so concurrent threads each take their own; a __reduce__ that encodes re-entrantly
# finds the pool empty and makes one.
_POOL: list[Encoder] = []
_SHARED_POOL: list[Encoder] = []


def encode_once(obj: Any, *, shared_memory: bool = False) -> list[Chunk]:
    """``Encoder(stream=False, shared_memory=shared_memory).encode(obj)``, by an encoder
    reused from a pool: the one-message writers without a key or hooks (``sync.dump``) would
    otherwise make a pickler per message, a cost that shows beside a shared-memory hand-off."""
    pool = _SHARED_POOL if shared_memory else _POOL
    try:
        encoder = pool.pop()
    except IndexError:
        encoder = Encoder(stream=False, shared_memory=shared_memory)
    try:
        return encoder.encode(obj)
    finally:
        pool.append(encoder)


def dumps(
    obj: Any,
    *,
    key: bytes | Key | None = None,
    pickler_class: type[pickle.Pickler] | None = None,
    dispatch_table: Mapping[type, Callable[[Any], Any]] | None = None,
    persistent_id: Callable[[Any], Any] | None = None,
) -> bytes:
    """Encode ``obj`` as exactly one message, joined into one ``bytes``: what
    ``Encoder(key=key, stream=False, ...).encode(obj)`` returns, joined (the hooks
    ``pickler_class``, ``dispatch_table`` and ``persistent_id``: see :class:`Encoder`).

    Joining copies every out-of-band buffer once; to send large arrays without that copy, use
    :class:`Encoder` (or the stream helpers), which hand out the chunks unjoined.
    """
    if key is not None or pickler_class is not None or dispatch_table is not None or persistent_id is not None:
        encoder = Encoder(key=key, stream=False, pickler_class=pickler_class, dispatch_table=dispatch_table,
                          persistent_id=persistent_id)
        return b"".join(encoder.encode(obj))
    try:
        encoder = _POOL.pop()
    except IndexError:
        encoder = Encoder()
    try:
        return encoder._encode_joined(obj)
    finally:
        _POOL.append(encoder)
