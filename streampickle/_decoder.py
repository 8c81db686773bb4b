"""The sans-IO decoder: bytes in, in any split; whole objects out, in order.

Theory of operation. A message is a sequence of *parts*: the fixed header, (with a key) the
stream fields, the length table, (with a key) the header tag, the pickle, each side chunk, and
the tag. The decoder is always filling exactly one part, at
``self._pos`` within ``self._view``; when a part fills, ``_finish_part`` checks it and moves on.
Two ways to put bytes in, which may be mixed freely:

* ``feed(data)`` copies ``data`` into the parts, however it is split;
* ``get_buffer()`` / ``buffer_updated(n)`` (the ``asyncio.BufferedProtocol`` pair) hand out
  the exact memory the next bytes belong in, so a transport can ``recv_into`` it. For a side
  chunk that memory is the chunk's final destination: a 64-byte-aligned, uninitialised buffer
  (from 1 MiB, reused memory from ``buffer_pool`` when it has some) that the decoded array
  will view. The buffer handed out never extends past the current part, hence never past
  the current message: a reader that only uses ``get_buffer`` consumes exactly one message
  and not a byte more.

Memory follows the bytes that arrived, never the sizes claimed: sizes are checked against
:class:`Limits` as soon as the header (or length table) is complete; a side chunk's destination
is allocated uninitialised (the kernel commits its pages as they are written) only when its
first byte is about to arrive; the pickle part grows geometrically with what arrived.

Completed messages wait in a queue as raw parts; they are unpickled one at a time as the
caller iterates, so a message that fails to unpickle raises at its place in the order and the
messages after it are unaffected. A framing failure (bad header, limit, tag, EOF mid-message)
is sticky: the decoder stays failed and every later call raises, since message boundaries
can't be trusted any more. Messages completed before the failure are still delivered first.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _shm, _wire
from ._accel import speedups
from ._errors import (
    AuthenticationError,
    IncompleteMessageError,
    LimitExceededError,
    ProtocolError,
    StreamPickleError,
    UsageError,
)
from ._limits import Limits
from ._mac import Key, describe_flags
from ._options import DEFAULT_LIMITS, Options, options_for
from ._pool import HUGE_PAGE, POOL_MIN, buffer_pool, small_pages
from ._safe import GC_PAUSE_BYTES, unpickling_failed

if TYPE_CHECKING:
    from ._encoder import Encoder

__all__ = ["PICKLE_COPY_LIMIT", "READ_AHEAD", "Decoder", "aligned_empty", "byte_view"]

ALIGNMENT = 64  # cache line, and enough for every SIMD load numpy does
#: The staging memory ``get_buffer(read_ahead=True)`` hands out between messages: one read
#: takes hundreds of small messages, and a larger read gains nothing (the kernel's socket
#: buffer hands over at most what arrived).
READ_AHEAD = 64 * 1024
_TABLE_FLOOR = 4 * 1024  # a table part's first memory; it doubles as its bytes arrive
_PICKLE_GROWTH_FLOOR = 4 * 1024  # the pickle part starts this big (or smaller, if it is): a
# message that claims a large pickle part and sends a few bytes holds no more than this
#: Pickle parts below this size are unpickled from a ``bytes`` copy, larger ones from a view of
#: the memory they arrived in. Why this size: it is where the loader starts pausing the GC
#: (``_safe.GC_PAUSE_BYTES``), and below it the loader takes a ``bytes`` pickle in one C call
#: (scan and ``pickle.loads``), which is worth a copy of up to 1 MiB; from it up, that path is
#: not taken anyway, a view works as well, and it saves copying all of the pickle. The C path
#: of ``Decoder.loads`` (``_speedups.load_plain``, which copies) takes only pickles below it.
PICKLE_COPY_LIMIT = GC_PAUSE_BYTES

# Parts of a message, in order. _FIELDS and _HEADER_TAG are only in version-2 (keyed) messages.
_HEADER, _FIELDS, _TABLE, _SHARED, _HEADER_TAG, _PICKLE, _CHUNK, _TAG = range(8)
_PART_NAMES = ("header", "stream fields", "length table", "shared table", "header tag", "pickle", "side chunk", "tag")
_NO_PICKLE = np.empty(0, dtype=np.uint8)
_NO_CHUNKS: tuple[memoryview, ...] = ()  # the side chunks of every message that has none
_UNALLOCATED = memoryview(bytearray())  # the view of a part whose memory is not allocated yet
_UNMAPPED = memoryview(bytearray())  # a shared side chunk's place until its message is mapped
_TAG_MISMATCH = (
    "tag mismatch: the message was altered in transit, or the two ends use different keys. "
    "Nothing of it was unpickled."
)
_HEADER_TAG_MISMATCH = (
    "header tag mismatch: the message's header was forged or altered in transit, or the two "
    "ends use different keys. No memory was committed to it."
)
# The C twins of the whole-message paths below, for plain messages (plain_at in _speedups.c);
# without the C extension the Python paths do it all.
_take_plain = speedups.take_plain if speedups else None
_load_plain = speedups.load_plain if speedups else None
# What Decoder.loads' C path takes: pickles it may copy (see PICKLE_COPY_LIMIT), default limits.
_PLAIN_MAX_PICKLE = min(PICKLE_COPY_LIMIT - 1, DEFAULT_LIMITS.max_pickle_size)
_PLAIN_MAX_MESSAGE = DEFAULT_LIMITS.max_message_size


def byte_view(data: Any) -> memoryview:
    """The bytes of ``data``, any bytes-like object, as a flat memoryview of unsigned bytes:
    the bytes ``bytes(memoryview(data))`` would give, whatever the buffer's item format and
    shape. A C-contiguous buffer is viewed in place; any other one (a strided slice, a
    Fortran-order array) is copied once, in C order.

    Anything that can't export a buffer (``str``, ``None``, an ``int``, a list, a released
    memoryview, an object whose export fails) raises :class:`UsageError`: it is the caller's
    mistake, not the peer's. The slow path behind the inline ``memoryview(data)`` of ``feed``
    and ``loads``: only taken when that one failed or was not a plain byte view.
    """
    try:
        view = memoryview(data)
    except Exception as exc:  # TypeError: no buffer; ValueError, BufferError: the export failed
        raise UsageError(
            f"expected a bytes-like object (bytes, bytearray, memoryview, a numpy array...), "
            f"not {type(data).__name__}"
        ) from exc
    try:
        return view.cast("B")
    except (TypeError, ValueError):  # not C-contiguous, or a format cast() refuses
        pass
    try:
        return memoryview(view.tobytes())
    except Exception as exc:
        raise UsageError(f"could not read the bytes of the {type(data).__name__} given: {exc}") from exc


def aligned_empty(nbytes: int) -> np.ndarray[Any, Any]:
    """An uninitialised, writable uint8 array of ``nbytes`` whose data is 64-byte aligned.

    Uninitialised on purpose: zero-filling a receive buffer costs more than the transfer it is
    for, and every byte of it is about to be overwritten by the peer's data.

    Arrays of 2 MiB or more start on a 2 MiB boundary, so that all of their memory can be
    transparent huge pages (numpy asks for them on allocations from 4 MiB): the kernel only
    maps a huge page over an aligned 2 MiB range, and ``malloc`` doesn't align its large
    blocks. Faulting in 64 arrays of 4 MiB took a third of the time aligned (measured). The
    extra 2 MiB is address space only: its pages are never touched.

    From ``POOL_MIN`` (1 MiB) up, the memory comes from ``buffer_pool`` (see ``_pool``):
    memory of earlier arrays that died, already faulted in, unless the pool is configured to
    keep none.
    """
    if nbytes >= POOL_MIN and buffer_pool.max_bytes:
        return buffer_pool.empty(nbytes)
    alignment = HUGE_PAGE if nbytes >= HUGE_PAGE else ALIGNMENT
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    offset = -raw.__array_interface__["data"][0] % alignment
    return raw[offset : offset + nbytes]


class Decoder:
    """Decodes a stream of messages fed in any split. No I/O; not thread-safe.

    Options: ``trusted`` (load any global, like ``pickle``; only for trusted peers), ``allow``
    (exact global names or classes to admit in safe mode), ``key`` (verify every message's
    tag before unpickling: ``bytes`` for HMAC-SHA256 or a :class:`Key`; must match the
    encoder's), ``limits``, ``persistent_load`` (a callable that turns a persistent id, from the
    peer's ``Encoder(persistent_id=...)``, into an object, as ``pickle.Unpickler`` takes it;
    without it a pickle holding a persistent id is refused; the safe verifier still judges
    everything else in the pickle); or all five made once as ``options=`` (an
    ``_options.Options``).

    ``stream`` (with a key): the messages are one direction of a stream, from one peer's
    :class:`Encoder`. The decoder then refuses, with :class:`AuthenticationError`, a message
    that is replayed, out of order, follows a dropped one, comes from another sender than the
    stream's first message, or was sent by this process (reflected back), and a stream that
    ends without the peer's authenticated end (:meth:`Encoder.encode_end`): a cut stream is
    told from a clean end. ``stream=False`` reads messages that stand alone (``loads``, and
    ``dumps`` on the other end): each authentic message is accepted, in any order. Either way,
    a keyed message of wire format version 1 (tagged only at its end, with no sequence
    numbers) is refused with :class:`AuthenticationError`.

    ``shared_memory``: accept side chunks handed over as shared memory (an
    ``Encoder(shared_memory=True)`` on the same host, over a Unix socket): the transport hands
    the descriptors that arrive with the bytes to :meth:`feed_descriptors`; the decoder checks
    each file when the message's shared table arrives and maps the announced ranges once the
    whole message has (see :func:`shared_empty`). Without it,
    such a message is refused with :class:`ProtocolError`.
    """

    def __init__(
        self,
        *,
        trusted: bool = False,
        allow: Iterable[Any] = (),
        key: bytes | Key | None = None,
        limits: Limits | None = None,
        stream: bool = True,
        options: Options | None = None,
        shared_memory: bool = False,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        if options is None:
            options = options_for(trusted, allow, key, limits, persistent_load)
        else:
            _given_options(options, trusted, allow, key, limits, persistent_load)
        self.options = options
        self._loader = options.loader
        self._limits = options.limits
        self._key = options.key
        self._want_flags = self._key.flags if self._key is not None else 0
        # The stream, with a key: its sender, the sequence number due next, and whether its
        # authenticated end arrived.
        self._stream = stream and self._key is not None
        self._peer: bytes | None = None
        self._next_sequence = 0
        self._ended = False
        #: Set by a stream under a :class:`MemoryBudget`: a side chunk's first huge page is
        #: held back to small pages, so that what a budget counts is what the peer's bytes
        #: commit (see ``committed``).
        self.budgeted = False
        self._own_sender: bytes | None = None  # our own encoder's, where we have one (reflection)
        self._fields_buf = bytearray(_wire.STREAM_FIELDS_SIZE)
        # complete messages awaiting unpickling: (pickle part, side-chunk buffers)
        self._ready: collections.deque[tuple[bytes | memoryview, Sequence[memoryview]]] = collections.deque()
        self._failure: StreamPickleError | None = None
        self._eof = False
        self._header_buf = bytearray(_wire.HEADER_SIZE)
        # get_buffer(read_ahead=True) between messages: memory that takes whatever arrives,
        # handed to feed() by buffer_updated (made on first use, then reused).
        self._staging: bytearray | None = None
        self._staged = False
        # Shared memory: whether this end opted in; the descriptors that arrived and no message
        # has claimed yet (in order), and those the message in flight claimed, to map once it
        # is complete; what closes them if the decoder is dropped holding some. Every one is
        # counted in ``_shm.HELD`` while held. ``_fds_due``: how many of the bytes the
        # unclaimed ones came with are still to be fed (None: all were); ``_fds_inside``: the
        # number of the message they arrived inside of, if they arrived inside one.
        self._shared_memory = bool(shared_memory)
        self._fds: list[int] = []
        self._claimed: list[int] = []
        self._fds_guard: weakref.finalize[Any, Any] | None = None
        self._fds_due: int | None = None
        self._fds_inside: int | None = None
        self._serial = -1  # counts the messages started, from 0
        self._start_message()

    # -- public API -------------------------------------------------------------------------

    @staticmethod
    def loads(
        data: bytes | bytearray | memoryview,
        *,
        trusted: bool = False,
        allow: Iterable[Any] = (),
        key: bytes | Key | None = None,
        limits: Limits | None = None,
        options: Options | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Decode exactly one whole message. Missing bytes raise :class:`IncompleteMessageError`,
        bytes after the message raise :class:`ProtocolError`. This is :func:`streampickle.loads`.

        ``data`` is any bytes-like object, read as ``bytes(memoryview(data))`` would read it: a
        memoryview of another item format or several dimensions, or a numpy array, is taken as
        its raw bytes, and a non-contiguous one is copied once first. Anything that isn't
        bytes-like (``str``, ``None``...), or a bad option, raises :class:`UsageError`. So every
        call returns an object or raises a :class:`StreamPickleError`.

        The same objects and errors as ``Decoder(..., stream=False)`` fed ``data`` and its end,
        then ``next()``. The commonest call, a plain message with default options, is decoded
        in one C call when the extension is built (making a decoder costs more than unpickling
        a small object); the C function leaves everything else to the decoder, which decides."""
        if options is None:
            options = options_for(trusted, allow, key, limits, persistent_load)
        else:
            _given_options(options, trusted, allow, key, limits, persistent_load)
        if options.plain and _load_plain is not None:
            try:
                obj = _load_plain(data, options.trusted, _PLAIN_MAX_PICKLE, _PLAIN_MAX_MESSAGE)
            except Exception as exc:
                raise unpickling_failed(exc) from exc
            if obj is not NotImplemented:
                return obj
        return Decoder(options=options, stream=False)._load_whole(data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the stream: any size, any split, several messages at once.

        Raises the framing errors (``ProtocolError``, ``LimitExceededError``,
        ``AuthenticationError``) as soon as the bytes show them. ``b""`` is not end of input;
        call :meth:`feed_eof` for that.

        ``data`` is any bytes-like object, read as ``bytes(memoryview(data))`` would read it (a
        non-contiguous one is copied first, see :func:`byte_view`); nothing of it is kept, so
        the caller may reuse or resize it at once. Anything else raises :class:`UsageError`
        and leaves the decoder as it was.
        """
        self._staged = False  # a staging buffer handed out before is no longer the target
        if isinstance(data, bytes):
            view = memoryview(data)
        else:
            try:
                view = memoryview(data).cast("B")
            except Exception:  # noqa: BLE001 - whatever memoryview refuses, byte_view judges
                view = byte_view(data)  # copies, or raises UsageError
        fed = len(view)
        while view:
            if self._pos == 0 and self._part == _HEADER and self._failure is None and not self._eof:
                view = self._take_whole(view)  # whole messages in one step each
                if not view:
                    break
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self._updated(n)
            view = view[n:]
        if self._fds:
            self._check_claimed(fed)

    def feed_descriptors(self, fds: Iterable[int], nbytes: int | None = None) -> None:
        """Take the descriptors that arrived with the bytes about to be fed (``SCM_RIGHTS`` on
        a Unix socket): call it before feeding those bytes, and say how many bytes came with
        them (``nbytes``: the read's count; None: the next :meth:`feed` or
        :meth:`buffer_updated` call's bytes). The decoder owns them from here: a message's
        shared table claims them in order, and each is closed once the message is complete
        and its ranges are mapped, or when the decoder fails or :meth:`close_descriptors` is
        called.

        A message's descriptors travel with its first byte, so once the bytes they came with
        are fed, descriptors still unclaimed must be for the message then in flight, which
        began among those bytes and has yet to reach its shared table. Otherwise they were
        sent for nothing, or with a byte inside a message: :class:`ProtocolError`. So is any
        descriptor given to a decoder made without ``shared_memory=True``. More than
        ``Limits.max_descriptors`` waiting at once is a :class:`LimitExceededError`, and so is
        a descriptor past what the whole process holds for messages in flight (a quarter of
        its open-file limit: ``_shm.held_limit``). In each case every descriptor is closed
        first."""
        fds = list(fds)
        if not fds:
            return
        if self._failure is not None or not self._shared_memory:
            _shm.close_all(fds)
            if self._failure is not None:
                raise self._sticky()
            raise self._fail(ProtocolError(
                f"{len(fds)} descriptors arrived on a connection that did not opt in to shared "
                f"memory: pass shared_memory=True on both ends"
            ))
        if not _shm.HELD.take(len(fds)):
            _shm.close_all(fds)
            held, limit = _shm.HELD.count, _shm.held_limit()
            raise self._fail(LimitExceededError(
                f"{len(fds)} descriptors arrived while this process already holds {held} that "
                f"peers sent with messages still in flight, at most {limit} (a quarter of its "
                f"open-file limit, at least {_shm.MAX_DESCRIPTORS}, so that connections and files "
                f"keep the rest): refused. Peers that send descriptors and then stall hold them "
                f"until the header deadline (Limits.max_header_seconds); if the load is "
                f"legitimate, raise the open-file limit (ulimit -n, resource.setrlimit)."
            ))
        if self._fds_guard is None:
            self._fds_guard = weakref.finalize(self, _close_held, self._fds, self._claimed)
        self._fds.extend(fds)
        self._fds_due = nbytes
        self._fds_inside = self._serial if self._received else None
        limit = self._limits.max_descriptors
        if len(self._fds) + len(self._claimed) > limit:
            raise self._over("descriptors waiting at once", len(self._fds) + len(self._claimed),
                             "max_descriptors", limit)

    def close_descriptors(self) -> None:
        """Close the descriptors that arrived and no complete message has used yet (when the
        connection closes: they can't be used any more)."""
        _close_held(self._fds, self._claimed)

    def _check_claimed(self, fed: int) -> None:
        """After ``fed`` bytes: once the bytes the waiting descriptors came with are all fed,
        refuse them unless the message in flight can still claim them (see
        :meth:`feed_descriptors`)."""
        if self._fds_due is not None:
            self._fds_due -= fed
            if self._fds_due > 0:
                return
            self._fds_due = None
        if self._failure is not None:
            return
        count = len(self._fds)
        if self._part == _HEADER and self._pos == 0:
            problem = "that no message claimed"
        elif self._fds_inside == self._serial:
            problem = ("with a byte inside a message, which no message claimed (a message's descriptors "
                       "travel with its first byte)")
        elif self._part > _SHARED or (self._part > _HEADER and not self._header.flags & _wire.FLAG_SHARED):
            problem = "that the message they came with left unclaimed (it has no shared table, or claimed fewer)"
        else:
            return  # for the message in flight, whose shared table is still to come
        raise self._fail(ProtocolError(f"the peer sent {count} descriptors {problem}: the peer is broken or hostile"))

    def get_buffer(self, sizehint: int = -1, *, read_ahead: bool = False) -> memoryview:
        """Writable memory where the next incoming bytes belong; at least one byte long.

        Never longer than what the current part of the current message still needs, so filling
        it never reads into the next message. In a side chunk it is the chunk's final,
        aligned destination. Call :meth:`buffer_updated` after writing into it.

        ``read_ahead=True`` is for a reader that owns the whole connection (an
        ``asyncio.BufferedProtocol``, a ``recv_into`` loop): between messages it hands out
        ``READ_AHEAD`` bytes of staging memory instead of the 20 bytes of the next header,
        and :meth:`buffer_updated` decodes whatever was written there as :meth:`feed` would,
        so a run of small messages costs one read per ``READ_AHEAD`` bytes instead of two or
        three reads per message. Inside a message the answer is the same as without it: a
        side chunk is still read straight into its final memory.

        ``sizehint`` (an int; negative for none) is how many bytes the caller has ready; only
        a growing pickle part uses it, and a non-int raises :class:`UsageError` there.
        """
        self._check_usable()
        if read_ahead and self._pos == 0 and self._part == _HEADER and not self._eof:
            if self._staging is None:
                self._staging = bytearray(READ_AHEAD)
            self._staged = True
            return memoryview(self._staging)
        self._staged = False
        if self._part == _PICKLE:
            self._grow_pickle(sizehint)
        elif self._part == _CHUNK and self._view is _UNALLOCATED:
            self._allocate_chunk()
        elif self._pos == self._cap < self._end:  # a table, grown as it arrives
            self._grow_table()
        return self._view[self._pos : self._cap]

    def buffer_updated(self, nbytes: int) -> None:
        """Say that ``nbytes`` were written at the start of the last :meth:`get_buffer` view.

        ``nbytes`` is an int (or has ``__index__``) from 0 to the view's length; anything else
        raises :class:`UsageError` and changes nothing."""
        self._check_usable()
        if self._staged:
            staging = memoryview(self._staging or b"")
            if type(nbytes) is not int or not 0 <= nbytes <= len(staging):
                nbytes = _index(nbytes, "buffer_updated()")
                if not 0 <= nbytes <= len(staging):
                    raise UsageError(
                        f"buffer_updated({nbytes}) does not fit the buffer from get_buffer(), "
                        f"which had room for {len(staging)} bytes"
                    )
            self._staged = False
            self.feed(staging[:nbytes])
            return
        self._updated(nbytes)
        if self._fds:
            self._check_claimed(nbytes)

    def _updated(self, nbytes: int) -> None:
        """``buffer_updated`` for the last ``get_buffer`` view that was not staging memory."""
        # One identity test on the hot path: a float or a str must not reach the state below.
        if type(nbytes) is not int or nbytes < 0 or self._pos + nbytes > self._cap:
            nbytes = self._byte_count(nbytes)
        if nbytes == 0:
            return
        if self._ended:
            raise self._after_end()
        start = self._pos
        self._pos += nbytes
        self._received += nbytes
        if self._mac is not None and self._part != _TAG:
            self._mac.update(self._view[start : self._pos])
        if self._part == _HEADER and start < len(_wire.MAGIC):
            self._guard(_wire.check_magic_prefix, self._view[: self._pos])
        if self._pos == self._end:
            self._finish_part()

    def feed_eof(self) -> None:
        """Say the input ended. Raises :class:`IncompleteMessageError` if it ended inside a
        message; at a boundary, it just records the end (objects already complete can still
        be iterated)."""
        self._check_usable()
        self._eof = True
        if self._fds or self._claimed:
            self.close_descriptors()
        if self._stream and not self._ended and not self._received:
            raise self._fail(AuthenticationError(
                "the stream ended without the peer's authenticated end: the connection was cut "
                "(by an attacker, who may have dropped the last messages, or by a crash), or the "
                "peer closed it without ending the stream (ObjectStream.send_eof and aclose end "
                "it; Encoder.encode_end makes the end message)."
            ))
        if self._received:
            raise self._fail(
                IncompleteMessageError(
                    f"the stream ended inside a message, in its {_PART_NAMES[self._part]}: "
                    f"{self._received} of {self._expected} bytes had arrived. The peer "
                    f"closed the connection or died mid-message.",
                    received=self._received,
                    expected=self._expected,
                )
            )

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """The next complete object. Stops when more input is needed; raises the error of a
        message that failed to unpickle (that message is dropped, the next one follows)."""
        if self._ready:
            pickle_bytes, buffers = self._ready.popleft()
            return self._loader.load(pickle_bytes, buffers)
        if self._failure is not None:
            raise self._sticky()
        raise StopIteration

    @contextlib.contextmanager
    def loading_plain(self) -> Iterator[None]:
        """Meanwhile, load messages as the default safe decoder does, whatever this decoder's
        options: no ``allow``, no ``persistent_load``, never trusted. For messages that can
        only be plain data and come before the peer has proven anything (a handshake's). The
        decoder's ``max_opaque_keys`` still holds: a lowered limit is about CPU, not trust."""
        plain = Options(limits=self._limits).loader  # Options picks the shared loader where it can
        saved, self._loader = self._loader, plain
        try:
            yield
        finally:
            self._loader = saved

    @property
    def pending(self) -> int:
        """How many complete messages are waiting to be unpickled by iteration."""
        return len(self._ready)

    @property
    def failed(self) -> bool:
        """True once a framing error has made the decoder unusable."""
        return self._failure is not None

    @property
    def in_message(self) -> bool:
        """True if part of a message has arrived and the rest has not."""
        return self._received > 0

    @property
    def in_header(self) -> bool:
        """True if part of a message has arrived and not yet all of its header (the fixed
        header, the length table and, with a key, the stream fields and header tag)."""
        return self._received > 0 and self._part <= _HEADER_TAG and self._failure is None

    @property
    def holds_descriptors(self) -> bool:
        """True while descriptors a peer sent wait here (shared memory), claimed by the message
        in flight or not yet: each counts against what the whole process holds
        (``_shm.held_limit``), so stream adapters hold such a message to the header's
        deadline (plus time for the bytes that arrived), not the message's."""
        return bool(self._fds or self._claimed)

    @property
    def committed(self) -> int:
        """Bytes of memory the incomplete message holds: what arrived of it, where a side chunk
        of at least 2 MiB counts every 2 MiB page it touched whole (such memory is aligned
        for transparent huge pages, and the kernel commits each huge page at its first
        byte), except its first 2 MiB under a memory budget, which has ordinary pages. What
        a memory budget charges."""
        huge = self._huge_end(self._pos) - self._pos if self._in_huge_chunk() else 0
        return self._received + self._page_slack + huge

    def commit_for(self, nbytes: int) -> int:
        """How much :attr:`committed` grows if the next ``nbytes`` arrive into the current part."""
        if not self._in_huge_chunk():
            return nbytes
        return self._huge_end(self._pos + nbytes) - self._huge_end(self._pos)

    def readable_within(self, commit: int) -> int:
        """The most bytes the current part may take while :attr:`committed` grows by at most
        ``commit`` (0 if that doesn't reach the next whole page)."""
        if not self._in_huge_chunk():
            return commit
        pos = self._pos
        if self._small_head and pos < HUGE_PAGE:  # ordinary pages up to 2 MiB, then whole ones
            head = HUGE_PAGE - pos
            return commit if commit <= head else head + (commit - head) // HUGE_PAGE * HUGE_PAGE
        end = (self._huge_end(pos) + commit) // HUGE_PAGE * HUGE_PAGE
        return max(0, end - pos)

    def _in_huge_chunk(self) -> bool:
        return self._part == _CHUNK and self._end >= HUGE_PAGE

    def _huge_end(self, nbytes: int) -> int:
        """The memory the first ``nbytes`` of the current large side chunk commit."""
        if self._small_head and nbytes <= HUGE_PAGE:
            return nbytes
        return -(-nbytes // HUGE_PAGE) * HUGE_PAGE

    @property
    def ended(self) -> bool:
        """True once the peer's authenticated end of the stream arrived (keyed streams): no
        message follows it, and the stream ended cleanly."""
        return self._ended

    @property
    def progress(self) -> tuple[int, int]:
        """``(received, expected)`` bytes of the current message; ``expected`` is what the
        parts seen so far declare, and grows as the header and length table arrive."""
        return self._received, self._expected

    def _load_whole(self, data: Any) -> Any:
        """``loads`` on a fresh decoder: fed ``data`` up to the end of its first message."""
        try:
            view = memoryview(data).cast("B")
        except Exception:  # noqa: BLE001 - whatever memoryview refuses, byte_view judges
            view = byte_view(data)  # copies, or raises UsageError for what isn't bytes-like
        total = len(view)
        view = self._take_whole(view, limit=1)
        while view and not self._ready:
            target = self.get_buffer(len(view))  # never extends past the first message
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]
        if view:
            raise ProtocolError(
                f"{len(view)} bytes follow the message (at offset {total - len(view)}); loads() "
                f"takes exactly one message: use a Decoder to read several"
            )
        self.feed_eof()
        if not self._ready:
            raise IncompleteMessageError(
                "loads() was given no bytes", received=0, expected=_wire.HEADER_SIZE
            )
        return next(self)

    # -- message state ------------------------------------------------------------------------

    def _start_message(self) -> None:
        self._serial += 1
        self._part = _HEADER
        self._view = memoryview(self._header_buf)
        self._pos = 0
        self._end = self._cap = _wire.HEADER_SIZE
        self._received = 0
        self._expected = _wire.HEADER_SIZE
        self._mac: Any = None  # made when a header completes on the incremental path
        self._lengths: tuple[int, ...] = ()
        self._table: memoryview | None = None
        self._page_slack = 0  # see ``committed``: bytes of huge pages the done side chunks touched past their end
        self._small_head = False  # the current side chunk's first 2 MiB has ordinary pages
        self._chunks: list[memoryview] = []
        # Side chunks in shared files: for each claimed descriptor, the indices of its side
        # chunks (None: all of them) and their (offset, length) ranges, mapped once the message
        # is complete; and, by index, whether a side chunk is one of them.
        self._files: list[tuple[list[int] | None, list[tuple[int, int]]]] = []
        self._shared: list[bool] | None = None
        self._pickle = _NO_PICKLE

    def _enter(self, part: int, view: memoryview, size: int) -> None:
        self._part = part
        self._view = view
        self._pos = 0
        self._end = self._cap = size

    def _finish_part(self) -> None:
        part = self._part
        if part == _HEADER:
            self._on_header()
        elif part == _FIELDS:
            self._on_fields()
        elif part == _TABLE:
            self._on_table()
        elif part == _SHARED:
            self._on_shared()
        elif part == _HEADER_TAG:
            self._on_header_tag()
        elif part == _PICKLE:
            self._next_chunk()
        elif part == _CHUNK:
            self._chunks.append(self._view)
            if self._end >= HUGE_PAGE:
                self._page_slack += self._huge_end(self._end) - self._end
            self._small_head = False
            self._next_chunk()
        else:
            self._on_tag()

    def _accept_header(self, data: Any) -> _wire.Header:
        """Parse a fixed header and check it against the key, the stream and the limits; the
        incremental path's step, which ``_whole_message_at`` takes too."""
        header = self._check_header(self._guard(_wire.parse_header, data))
        self._header = header
        self._expected = header.size()
        self._check_total()
        return header

    def _check_header(self, header: _wire.Header) -> _wire.Header:
        """Refuse (for good) a parsed header that this decoder's key, stream or limits don't
        admit; pin a keyed stream's wire format version to its first message's."""
        limits = self._limits
        flags, chunk_count, pickle_length, version = header
        if flags & ~(_wire.FLAG_END | _wire.FLAG_SHARED) != self._want_flags:
            raise self._fail(AuthenticationError(self._wrong_signature(flags)))
        if flags & _wire.FLAG_SHARED and not (self._shared_memory and _shm.AVAILABLE):
            raise self._fail(ProtocolError(
                "the peer hands arrays over as shared memory (descriptors beside the bytes), "
                "which this end did not opt in to: pass shared_memory=True on both ends "
                "(connect_unix, create_unix_listener, ObjectStream.from_socket, sync.dump and "
                "sync.load), or have the peer send ordinary arrays"
                if _shm.AVAILABLE else
                "the peer hands arrays over as shared memory, which this platform can't map "
                "(no sealed memfd): have the peer send ordinary arrays"
            ))
        if self._key is not None and version != _wire.VERSION_KEYED:
            # Version 1 tagged only the whole message, at its end: what its header claims
            # took memory before anything was authenticated (a peer without the key streamed
            # gigabytes into side chunks), and it has no sequence numbers.
            raise self._fail(AuthenticationError(
                f"a keyed message of wire format version {version}: keyed messages are version "
                f"{_wire.VERSION_KEYED}, whose header is authenticated before any memory is "
                f"committed to it. Version 1 is no longer read with a key: a peer running an old "
                f"streampickle must upgrade, or this is a recorded message replayed"
            ))
        if chunk_count > limits.max_side_chunks:
            raise self._over("side chunks", chunk_count, "max_side_chunks", limits.max_side_chunks)
        if pickle_length > limits.max_pickle_size:
            raise self._over("pickle bytes", pickle_length, "max_pickle_size", limits.max_pickle_size)
        return header

    def _whole_message_at(self, view: memoryview, pos: int) -> tuple[_wire.Header, tuple[int, ...], int] | None:
        """The one answer to "is there a whole message at ``view[pos:]``, and what does its
        header say": its header, its side chunks' lengths and its size in bytes, or None while
        its fixed header, length table or body are not all there (the incremental path then
        takes the bytes). The header and sizes are checked as the incremental path checks
        them, in its order, with the same errors; tags are the caller's to check."""
        end = len(view)
        if end - pos < _wire.HEADER_SIZE:
            return None
        try:
            header = _wire.parse_header(view[pos : pos + _wire.HEADER_SIZE])
        except ProtocolError as exc:
            raise self._fail(exc) from None
        self._check_header(header)
        if header.flags & _wire.FLAG_SHARED:
            return None  # the incremental path takes messages with descriptors
        size = header.size()
        max_size = self._limits.max_message_size
        if size > max_size:
            self._check_size(size)  # raises
        lengths: tuple[int, ...] = ()
        if header.chunk_count:
            table = pos + header.table_offset
            table_end = table + header.chunk_count * _wire.LENGTH_SIZE
            if end < table_end:
                return None
            lengths = _wire.unpack_lengths(view[table:table_end])
            size += sum(lengths)  # Python ints: no wraparound, whatever the peer claims
            if size > max_size:
                self._check_size(size)  # raises
        if end - pos < size:
            return None
        return header, lengths, size

    def _wrong_signature(self, flags: int) -> str:
        """Why a message with header flags ``flags`` is refused here, and what to do."""
        got = describe_flags(flags)
        if self._key is None:
            return (
                f"the peer's message carries {got} but this decoder has no key: pass the same "
                f"key= on both ends (or none on both)."
            )
        if not flags & _wire.FLAG_MAC:
            return (
                "this decoder has a key but the peer's message carries no tag: the peer has no "
                "key configured, or someone is injecting unsigned messages."
            )
        return (
            f"the peer's message carries {got} but this decoder's key expects "
            f"{describe_flags(self._want_flags)}: both ends must use the same "
            f"streampickle.Key(..., mac=...)."
        )

    def _accept_lengths(self, table: Any) -> tuple[int, ...]:
        lengths = _wire.unpack_lengths(table)
        self._expected += sum(lengths)  # Python ints: no wraparound, whatever the peer claims
        self._check_total()
        self._lengths = lengths
        return lengths

    def _on_header(self) -> None:
        header = self._accept_header(self._header_buf)
        if self._key is not None:
            self._mac = self._key.new()
            self._mac.update(self._header_buf)
        if header.version == _wire.VERSION_KEYED:
            self._enter(_FIELDS, memoryview(self._fields_buf), _wire.STREAM_FIELDS_SIZE)
        else:
            self._on_fields()

    def _on_fields(self) -> None:
        table = self._header.chunk_count * _wire.LENGTH_SIZE
        if table:
            self._enter_table(_TABLE, table)
        else:
            self._on_table()

    def _enter_table(self, part: int, size: int) -> None:
        """Enter a table part of ``size`` bytes, whose memory grows as its bytes arrive: a
        header claiming 65,536 side chunks arrives in 20 bytes (36, keyed, before its tag
        can be checked), and 2,000 such connections once held a GiB of empty tables."""
        self._enter(part, memoryview(bytearray(min(size, _TABLE_FLOOR))), size)
        self._cap = min(size, _TABLE_FLOOR)

    def _grow_table(self) -> None:
        """Double the table part's memory (to at most its size), keeping what arrived."""
        grown = bytearray(min(self._end, 2 * self._cap))
        grown[: self._pos] = self._view[: self._pos]
        self._view = memoryview(grown)
        self._cap = len(grown)

    def _on_table(self) -> None:
        if self._header.chunk_count:
            self._accept_lengths(self._view)
            self._table = self._view
        else:
            self._table = None
        if self._header.flags & _wire.FLAG_SHARED:
            self._enter_table(_SHARED, _wire.shared_table_size(self._header.chunk_count))
            return
        self._after_tables()

    def _on_shared(self) -> None:
        """The shared table is in: claim the message's descriptors and check each once (the
        file, its seals, its size against the ranges announced in it); they are mapped when
        the rest of the message has arrived (``_map_shared``), so a message in flight holds
        descriptors, never mappings."""
        lengths = self._lengths
        count, entries = self._guard(_wire.unpack_shared_table, self._view, lengths)
        if count > self._limits.max_descriptors:
            raise self._over("descriptors", count, "max_descriptors", self._limits.max_descriptors)
        if count > len(self._fds):
            raise self._fail(ProtocolError(
                f"the message's side chunks lie in {count} shared-memory files, but "
                f"{len(self._fds)} descriptors arrived with it: the peer is broken or hostile, "
                f"or something between us dropped them (is this a Unix socket end to end?)"
            ))
        self._claimed.extend(self._fds[:count])
        del self._fds[:count]
        shared = [index != _wire.INLINE for index, _ in entries]
        every = all(shared)
        files: list[tuple[list[int] | None, list[tuple[int, int]]]]  # (side chunks or None: all, ranges)
        if count == 1 and every:
            # The common case, every side chunk in one file: nothing to group.
            files = [(None, [(offset, length) for (_, offset), length in zip(entries, lengths, strict=True)])]
        else:
            files = list(_shm.by_file(entries, lengths, count))
        if len(entries) > _shm.MAX_MAPPINGS:  # fewer side chunks can't need more mappings
            needed = sum(_shm.mappings_needed(ranges) for _, ranges in files)
            if needed > _shm.MAX_MAPPINGS:
                raise self._fail(ProtocolError(
                    f"the message's side chunks lie in {needed} separate parts of its shared-memory "
                    f"files, each a mapping of its own; at most {_shm.MAX_MAPPINGS} are mapped per "
                    f"message (a streampickle sender sends such a message as bytes): the peer is "
                    f"broken or hostile"
                ))
        for fd, (_, ranges) in zip(self._claimed, files, strict=True):
            self._guard(_shm.check_received, fd, ranges)
        self._files = files
        self._shared = shared
        # The shared side chunks don't travel in the stream.
        self._expected -= sum(lengths) if every else sum(itertools.compress(lengths, shared))
        self._after_tables()

    def _map_shared(self) -> None:
        """The message is complete: map the ranges of its shared side chunks into their places
        among the chunks, then close the descriptors (the mappings don't need them)."""
        chunks = self._chunks
        try:
            for fd, (indices, ranges) in zip(self._claimed, self._files, strict=True):
                views = self._guard(_shm.map_received, fd, ranges)
                for i, view in zip(range(len(views)) if indices is None else indices, views, strict=True):
                    chunks[i] = view
        finally:
            _shm.close_held(self._claimed)
            self._files = []

    def _after_tables(self) -> None:
        if self._header.version == _wire.VERSION_KEYED:
            self._enter(_HEADER_TAG, memoryview(bytearray(_wire.TAG_SIZE)), _wire.TAG_SIZE)
        else:
            self._on_header_tag()

    def _on_header_tag(self) -> None:
        header = self._header
        if header.version == _wire.VERSION_KEYED:
            assert self._key is not None
            signed = bytes(self._header_buf) + bytes(self._fields_buf)
            if self._table is not None:
                signed += bytes(self._table)
            if not self._key.check(signed, self._view):
                raise self._fail(AuthenticationError(_HEADER_TAG_MISMATCH))
            self._follow(*_wire.unpack_stream_fields(self._fields_buf))
            if header.is_end:
                self._end_of_stream()
                return
        self._table = None
        self._enter(_PICKLE, _UNALLOCATED, header.pickle_length)
        self._cap = 0
        self._chunk_index = -1

    def _follow(self, sender: bytes, sequence: int) -> None:
        """Check an authentic header's place in the stream (a keyed stream decoder only):
        from the stream's sender, and the next in its order."""
        if not self._stream:
            return
        if sender == _wire.NO_SENDER:
            raise self._fail(AuthenticationError(
                "a message that stands alone (dumps, or dump with a key) arrived in a stream: "
                "such messages can be replayed, so a stream decoder refuses them. Send with an "
                "ObjectStream (or one Encoder kept for the stream), or read with "
                "Decoder(stream=False)."
            ))
        if self._peer is None:
            if sender == self._own_sender:
                raise self._fail(AuthenticationError(
                    "the message was sent by this end of the stream: it is one of ours, reflected "
                    "back by someone who controls the channel"
                ))
            self._peer = sender
        elif sender != self._peer:
            raise self._fail(AuthenticationError(
                f"the message comes from another sender ({sender.hex()}) than this stream's "
                f"({self._peer.hex()}): it was recorded on another connection and spliced in"
            ))
        due = self._next_sequence
        if sequence != due:
            why = (
                "it was replayed or reordered" if sequence < due
                else "messages before it were dropped, or it was reordered"
            )
            raise self._fail(AuthenticationError(
                f"message number {sequence} of the stream arrived where number {due} was due: "
                f"{why} by someone who controls the channel"
            ))
        self._next_sequence = due + 1

    def _end_of_stream(self) -> None:
        self._ended = True
        self._start_message()

    def _after_end(self) -> StreamPickleError:
        return self._fail(ProtocolError(
            "bytes follow the peer's authenticated end of the stream: the peer is broken, or "
            "someone is injecting data"
        ))

    def _take_whole(self, view: memoryview, limit: int = -1) -> memoryview:
        """Fast path: decode the whole messages at the start of ``view`` (at most ``limit``,
        if not negative) in one step each and return what is left. Only called at a message
        boundary. ``_whole_message_at`` decides what is a whole message and checks it as the
        incremental path does, so both paths accept and refuse exactly the same bytes; with a
        key, only version-2 messages that are not the stream's end are taken here, checked
        in the incremental path's order (header tag, place in the stream, tag)."""
        key = self._key
        limits = self._limits
        ready = self._ready
        # Runs of plain messages go through C when it is there (plain_at in _speedups.c): the
        # loop below, in Python, costs more than unpickling a small message.
        take_plain = _take_plain if limit < 0 and key is None else None
        pos = taken = 0
        while taken != limit and not self._ended:
            if take_plain is not None:
                pos = take_plain(view, pos, limits.max_pickle_size, limits.max_message_size, ready.append, _NO_CHUNKS)
            found = self._whole_message_at(view, pos)
            if found is None:
                break
            header, lengths, size = found
            start = pos + header.pickle_offset
            if key is not None:
                if header.version != _wire.VERSION_KEYED or header.flags & _wire.FLAG_END:
                    break  # the incremental path takes these
                if not key.check(view[pos : start - _wire.TAG_SIZE], view[start - _wire.TAG_SIZE : start]):
                    raise self._fail(AuthenticationError(_HEADER_TAG_MISMATCH))
                self._follow(*_wire.unpack_stream_fields(view, pos + _wire.HEADER_SIZE))
                tag = pos + size - _wire.TAG_SIZE
                if not key.check(view[pos:tag], view[tag : pos + size]):
                    raise self._fail(AuthenticationError(_TAG_MISMATCH))
            stop = start + header.pickle_length
            chunks = self._copy_chunks(view, stop, lengths) if lengths else _NO_CHUNKS
            ready.append((view[start:stop].tobytes(), chunks))
            pos += size
            taken += 1
        return view[pos:] if pos else view

    def _copy_chunks(self, view: memoryview, at: int, lengths: Sequence[int]) -> list[memoryview]:
        """The side chunks of a whole message in ``view``, from offset ``at``, each copied
        into a destination of its own (see ``_take_whole``)."""
        chunks: list[memoryview] = []
        for length in lengths:
            dest = self._destination(length, len(chunks)).data
            dest[:] = view[at : at + length]
            chunks.append(dest)
            at += length
        return chunks

    def _next_chunk(self) -> None:
        if self._part == _PICKLE:
            # A small pickle goes on as bytes, which unpickle fastest; a large one as a view of
            # the buffer it arrived in (exactly its size: growth stops at the part's end),
            # which saves a copy of all of it.
            pickled = self._pickle
            self._pickle_bytes = pickled.tobytes() if pickled.nbytes < PICKLE_COPY_LIMIT else pickled.data
            self._pickle = _NO_PICKLE
            shared = self._shared
            if shared is not None and all(shared):
                # Every side chunk lies in a shared file: none travels in the stream, and each
                # takes its place when the message is complete (_map_shared).
                self._chunks = [_UNMAPPED] * len(shared)
                self._chunk_index = len(shared) - 1
        while True:
            self._chunk_index += 1
            if self._chunk_index == len(self._lengths):
                if self._shared is not None:
                    self._map_shared()
                if self._header.has_mac:
                    self._enter(_TAG, memoryview(bytearray(_wire.TAG_SIZE)), _wire.TAG_SIZE)
                else:
                    self._complete()
                return
            shared = self._shared
            if shared is not None and shared[self._chunk_index]:
                self._chunks.append(_UNMAPPED)  # mapped once the message is complete
                continue
            size = self._lengths[self._chunk_index]
            self._enter(_CHUNK, _UNALLOCATED, size)
            if size:
                return
            self._chunks.append(aligned_empty(0).data)  # zero-length: nothing to wait for

    def _on_tag(self) -> None:
        assert self._mac is not None and self._key is not None
        if not self._key.verify(self._mac, bytes(self._view)):
            raise self._fail(AuthenticationError(_TAG_MISMATCH))
        self._complete()

    def _complete(self) -> None:
        self._ready.append((self._pickle_bytes, self._chunks))
        self._start_message()

    # -- memory -------------------------------------------------------------------------------

    def _grow_pickle(self, sizehint: int) -> None:
        if self._pos < self._cap:
            return
        if type(sizehint) is not int:
            sizehint = _index(sizehint, "get_buffer(sizehint=...)")
        # Geometric growth into fresh uninitialised memory: what is held stays within twice
        # what arrived (plus the floor), whatever the header claimed.
        new_cap = min(self._end, max(_PICKLE_GROWTH_FLOOR, 2 * self._cap, sizehint))
        grown = np.empty(new_cap, dtype=np.uint8)
        if self._pos:
            grown[: self._pos] = self._pickle[: self._pos]
        self._pickle = grown
        self._view = grown.data
        self._cap = new_cap

    def _allocate_chunk(self) -> None:
        size = self._end
        destination = self._destination(size, self._chunk_index)
        if self.budgeted and size >= HUGE_PAGE and small_pages(destination, HUGE_PAGE):
            # Under a memory budget: the first bytes of a large side chunk (a read ahead of
            # its header may bring them unasked) commit 4 KiB pages as they arrive, not a 2
            # MiB page at once. After its first 2 MiB a chunk is arriving in earnest.
            self._small_head = True
        self._view = destination.data
        self._cap = size

    def _destination(self, size: int, index: int) -> np.ndarray[Any, Any]:
        try:
            return aligned_empty(size)
        except MemoryError as exc:
            raise self._fail(LimitExceededError(
                f"could not allocate {size} bytes for side chunk {index}: the system "
                f"refused. Lower Limits.max_message_size to refuse such messages up front."
            )) from exc

    # -- failure ------------------------------------------------------------------------------

    def _check_total(self) -> None:
        self._check_size(self._expected)

    def _check_size(self, size: int) -> None:
        limit = self._limits.max_message_size
        if size > limit:
            raise self._over("bytes in all", size, "max_message_size", limit)

    def _over(self, what: str, value: int, field: str, limit: int) -> LimitExceededError:
        exc = LimitExceededError(
            f"the peer's message declares {value} {what}, over Limits.{field}={limit}. If "
            f"the peer is legitimately sending that much, raise it with "
            f"limits=Limits({field}=...)."
        )
        self._fail(exc)
        return exc

    def _guard(self, check: Any, *args: Any) -> Any:
        try:
            return check(*args)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    @property
    def peer(self) -> bytes | None:
        """The sender id a keyed stream decoder took from the stream's first message, and
        holds every later one to; None before that message (and for other decoders)."""
        return self._peer

    def pair_with(self, encoder: Encoder) -> None:
        """This decoder reads the direction opposite to ``encoder``'s on one keyed stream:
        a message with the encoder's sender id is ours reflected back by an attacker, and is
        refused with :class:`AuthenticationError`."""
        self._own_sender = encoder.sender

    def fail(self, exc: StreamPickleError, *, discard: bool = False) -> None:
        """End the stream with ``exc``, found outside the bytes (a deadline a transport keeps,
        a peer's answer refused): what arrived of the current message is freed and every
        later call raises ``exc`` again, as for a framing error the decoder found itself.
        Complete messages not yet taken still come first, unless ``discard``: then they are
        dropped too (they came from a peer found out). A decoder that failed before keeps its
        first error."""
        if self._failure is None:
            self._fail(exc)
        if discard:
            self._ready.clear()

    def _fail(self, exc: StreamPickleError) -> StreamPickleError:
        self._failure = exc
        self._view = _UNALLOCATED
        self._chunks = []
        self._shared = None
        if self._fds or self._claimed:
            self.close_descriptors()
        self._pickle = _NO_PICKLE  # what arrived of the message is freed, not kept for the error
        self._pickle_bytes = b""
        return exc

    def _sticky(self) -> StreamPickleError:
        assert self._failure is not None
        failure = self._failure
        exc = type(failure).__new__(type(failure))
        exc.__dict__.update(failure.__dict__)
        exc.args = (f"the decoder failed earlier and can't be used again: {failure}",)
        exc.__cause__ = failure
        return exc

    def _byte_count(self, nbytes: Any) -> int:
        """``buffer_updated``'s argument as an int that fits the last buffer, or UsageError."""
        n = _index(nbytes, "buffer_updated()")
        if n < 0 or self._pos + n > self._cap:
            raise UsageError(
                f"buffer_updated({n}) does not fit the buffer from get_buffer(), which had room "
                f"for {self._cap - self._pos} bytes"
            )
        return n

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._sticky()
        if self._eof:
            raise UsageError("the decoder was told the input ended (feed_eof); it takes no more")


def _close_held(fds: list[int], claimed: list[int]) -> None:
    """Close a decoder's descriptors, unclaimed and claimed (see ``_shm.close_held``)."""
    _shm.close_held(fds)
    _shm.close_held(claimed)


def _given_options(options: Any, trusted: Any, allow: Any, key: Any, limits: Any, persistent_load: Any = None) -> None:
    """Refuse ``options=`` that is no :class:`Options`, or that comes with option keywords."""
    if not isinstance(options, Options):
        raise UsageError(f"options must be an Options, not {type(options).__name__}")
    if not (trusted is False and type(allow) is tuple and not allow and key is None and limits is None
            and persistent_load is None):
        raise UsageError(
            "pass options= or the option keywords (trusted, allow, key, limits, persistent_load), not both"
        )


def _index(value: Any, where: str) -> int:
    """``value`` as an int (``operator.index``: ints, bools, numpy integers), or UsageError."""
    try:
        return operator.index(value)
    except TypeError as exc:
        raise UsageError(f"{where} takes a byte count (an int), not {type(value).__name__}") from exc
