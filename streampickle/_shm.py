"""Shared memory between processes on one host: arrays whose memory is an anonymous, sealed
shared-memory file (a Linux ``memfd``), handed to the peer as a descriptor instead of bytes.

The sending half: :func:`shared_empty` and :func:`shared_copy` make ordinary numpy arrays over
such a file, and remember which address range belongs to which file (``find``), so that an
:class:`Encoder` made with ``shared_memory=True`` can send a side chunk lying in one as a
reference (descriptor, offset, length). The receiving half: ``check_received`` checks that a
descriptor a peer sent is what the reference needs (a shared-memory file sealed against
shrinking and growing, as large as announced) as soon as its message's shared table arrives,
and ``map_received`` maps exactly the announced ranges once the whole message has: a message
still in flight holds descriptors (counted process-wide, ``HELD``), never mappings.

Mappings are made with the C library's ``mmap`` (in the C extension, ``map_shared``, or
through ctypes without it), not Python's ``mmap`` module, which keeps a duplicate of the
descriptor open for as long as the mapping lives: a peer that sends thousands of arrays would
then hold thousands of our descriptors. Here a received
descriptor is closed as soon as its message's ranges are mapped, and a mapping is unmapped
when the last array or view over it is freed. Only the files this process made keep a descriptor open (one
per :func:`shared_empty` call, for as long as its memory lives), so that they can be sent.

Nothing has a name: there is nothing to clean up after a crash, unlike POSIX named shared
memory (``multiprocessing.shared_memory``), whose segments outlive a process that dies.
"""

from __future__ import annotations

import _thread
import bisect
import functools
import mmap
import operator
import os
import stat
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _wire
from ._accel import speedups
from ._errors import ProtocolError, UsageError
from ._limits import open_file_limit

__all__ = [
    "AVAILABLE",
    "HELD",
    "MAX_DESCRIPTORS",
    "MAX_MAPPINGS",
    "SharedChunks",
    "by_file",
    "check_no_key",
    "check_received",
    "close_all",
    "close_held",
    "descriptors_of",
    "find",
    "held_limit",
    "in_one_file",
    "is_mapped",
    "map_received",
    "mappings_needed",
    "shared_copy",
    "shared_empty",
]
# Passing the descriptors over a socket is _fdpass's (it imports socket; the core doesn't).

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

#: Whether this platform has anonymous, sealable shared-memory files (Linux: ``memfd_create``
#: and file seals). Elsewhere (macOS, Windows) :func:`shared_empty` raises :class:`UsageError`
#: and ``shared_memory=True`` connections send every array through the socket, as without it.
AVAILABLE = (
    sys.platform.startswith("linux")
    and hasattr(os, "memfd_create")
    and fcntl is not None
    and hasattr(fcntl, "F_ADD_SEALS")
)

#: At most this many descriptors travel with one message: Linux's limit for one ``sendmsg``
#: (``SCM_MAX_FD``). A message whose shared chunks lie in more files sends the rest as bytes.
MAX_DESCRIPTORS = 253

_PAGE = mmap.PAGESIZE
_F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; not in Python's fcntl
if AVAILABLE:
    _SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    _WRITE_SEALS = fcntl.F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE


#: The most mappings one message may ask of its receiver. Each is a kernel map entry, and a
#: process has about 65,530 (``vm.max_map_count``): a message of side chunks scattered over
#: a file, each on pages of its own, would otherwise take them all, and with them the
#: process's next thread or allocation. The receiver refuses a message that needs more; the
#: sender sends such a message's side chunks as bytes instead.
MAX_MAPPINGS = 1024

#: Files at least this large get huge pages where the kernel can give them (see
#: :func:`shared_empty`), and mappings at least this large start where the file's huge pages
#: can be mapped whole (see :func:`_map`).
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_COLLAPSE = 25  # Linux 6.1; not in Python's mmap before 3.13


@functools.cache
def _libc() -> tuple[Any, Any, Any, Any]:
    """The C library's mmap, munmap and madvise, and the ctypes module, loaded on first use
    (ctypes takes longer to import than the rest of streampickle's core)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.mmap, libc.munmap, libc.madvise, ctypes


class SharedChunks(list[Any]):
    """The chunks of a message that carries descriptors (``Encoder(shared_memory=True)``): a
    list like any other message's, plus ``descriptors``, the descriptors to send with its first
    byte (``SCM_RIGHTS``). They belong to the arrays' shared files, which this list keeps
    alive: send the message before dropping it, and don't close them."""

    __slots__ = ("_owners", "descriptors", "shared_bytes")

    descriptors: tuple[int, ...]
    shared_bytes: int  # the bytes the references stand for
    _owners: tuple[Any, ...]


def check_no_key(key: object) -> None:
    """Refuse ``shared_memory=True`` with a ``key`` (:class:`UsageError`): the encoder's rule,
    which the adapters also check before they open a connection."""
    if key is not None:
        raise UsageError(
            "shared_memory=True can't be combined with key=: a shared array's memory does not "
            "travel in the message, so the key's tag can't cover it, and either process can "
            "change it after the tag is checked. Use a key without shared memory, or shared "
            "memory between processes that trust each other without a key (a Unix socket's "
            "peer is on this host: check who it is with SO_PEERCRED, or restrict the socket "
            "file's mode)."
        )


def descriptors_of(chunks: Sequence[Any]) -> tuple[int, ...]:
    """The descriptors to send with a message's first byte: none for most messages."""
    return chunks.descriptors if type(chunks) is SharedChunks else ()


def close_all(fds: Sequence[int]) -> None:
    """Close every descriptor in ``fds``, whatever closing each one says."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- descriptors held for messages in flight --------------------------------------------------


class _Held:
    """How many descriptors peers sent that this process holds for messages not yet complete,
    across every connection. Each connection may hold up to ``Limits.max_descriptors`` for as
    long as its message is in flight, so a few peers that send descriptors and then stall
    would otherwise fill the process's file table, and then no listener can accept anyone:
    past ``held_limit()``, a decoder refuses more."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self.count = 0

    def take(self, n: int) -> bool:
        """Count ``n`` more descriptors as held, if the limit allows it."""
        limit = held_limit()
        with self._lock:
            if self.count + n > limit:
                return False
            self.count += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.count -= n


HELD = _Held()


def held_limit() -> int:
    """The most descriptors this process holds at once for messages in flight: a quarter of
    its open-file limit (``RLIMIT_NOFILE``, read each time: a program may raise it), so the
    rest stays for connections and files whatever peers send; at least one message's worth
    (``MAX_DESCRIPTORS``), which under an open-file limit of about 1,000 is more than a
    quarter."""
    return max(MAX_DESCRIPTORS, open_file_limit() // 4)


def close_held(fds: list[int]) -> None:
    """Close the held descriptors in ``fds``, count them as no longer held, and empty the
    list."""
    taken, fds[:] = fds[:], []
    close_all(taken)
    HELD.give_back(len(taken))


# -- mappings ----------------------------------------------------------------------------------


def _map_py(fd: int, offset: int, size: int, huge_page: int, on_free: Callable[[int], None] | None) -> Any:
    """The Python twin of C ``map_shared``: a ctypes array over the mapping, which
    ``weakref.finalize`` unmaps when it is freed (after ``on_free(address)``, if given)."""
    map_, unmap, _, ctypes = _libc()
    failed = ctypes.c_void_p(-1).value
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    address = map_(None, size, prot, mmap.MAP_SHARED, fd, offset)
    if address is not None and address != failed and size >= huge_page and (address - offset) % huge_page:
        unmap(address, size)
        hint = None
        # PROT_NONE (0): address space only
        reserved = map_(None, size + huge_page, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if reserved is not None and reserved != failed:
            unmap(reserved, size + huge_page)
            hint = reserved + (offset - reserved) % huge_page
        address = map_(hint, size, prot, mmap.MAP_SHARED, fd, offset)
    if address is None or address == failed:  # MAP_FAILED
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    buffer = (ctypes.c_char * size).from_address(address)
    weakref.finalize(buffer, _unmapped, address, size, on_free)
    return buffer


def _unmapped(address: int, size: int, on_free: Callable[[int], None] | None) -> None:
    if on_free is not None:
        on_free(address)
    _libc()[1](address, size)


_map_shared = getattr(speedups, "map_shared", None) if speedups else None


def _map(fd: int, offset: int, size: int, on_free: Callable[[int], None] | None = None) -> tuple[Any, int]:
    """Map ``size`` bytes of ``fd`` from ``offset`` (a multiple of the page size), shared and
    writable: a buffer over the mapping (what arrays and views hold), which unmaps it when the
    last reference to it goes, after calling ``on_free(address)`` if given; and its address.
    OSError if the kernel refuses.

    A mapping of ``_HUGE_PAGE`` bytes or more is placed at an address that lies as far past a
    2 MiB boundary as ``offset`` does, so that the file's huge pages (see
    :func:`shared_empty`) map whole, one page-table entry each: the first read of 512 MiB
    then took 20 ms here, against 45-55 ms for the 131,072 entries of 4 KiB pages. The
    kernel's own choice is kept where it is such a place (Linux 6.7 and later put large
    mappings on 2 MiB boundaries); otherwise the place is found by reserving ``size`` plus 2
    MiB of address space and releasing it: the mapping asks for the place as a hint, and if
    another thread took it meanwhile it goes elsewhere, unaligned but as correct.

    The buffer is the C extension's ``Mapping`` where it is built, else a ctypes array with a
    finalizer: making a ctypes array type of a new size cost about 60 us cold, which a
    many-array message's whole hand-off measures in hundreds."""
    if _map_shared is not None:
        buffer = _map_shared(fd, offset, size, _HUGE_PAGE, on_free)
        return buffer, buffer.address
    buffer = _map_py(fd, offset, size, _HUGE_PAGE, on_free)
    return buffer, _libc()[3].addressof(buffer)


def _huge_pages(buffer: Any, address: int, size: int, *, at_once: bool) -> None:
    """Give a new file's first ``size`` bytes huge pages where the kernel can: ``at_once``,
    now; else as they are first written, where the host allows it.

    ``MADV_HUGEPAGE`` does it as pages are first written, where the host's
    ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` allows it (``advise`` or more).
    Many hosts ship ``never``, which ``MADV_COLLAPSE`` (Linux 6.1) overrides: it builds the
    huge pages of a range from the pages present in it, so one byte is written in each 2 MiB
    first. Measured on a VM with ``never``: making and filling a 512 MiB array took 30-55 ms
    instead of 320-370 (each 4 KiB page costs a fault), and a receiver's first read of it 20
    ms instead of 45-55. The exception was a fresh process on that VM, whose host takes idle
    memory back: zeroing the new huge pages made it supply them again, 0.7-1.3 s against
    0.4-0.5 s in 4 KiB pages. Where neither works (``deny``, older kernels, no free huge
    pages) the memory stays in 4 KiB pages; failing is harmless.

    Shared memory taken at once can't be reclaimed, and a file larger than the memory left
    would take it all before failing (``numpy.empty`` raises ``MemoryError`` instead). So a
    file larger than half the memory available (``MemAvailable``) is left to be taken as it
    is written."""
    madvise = _libc()[2]
    madvise(address, size, _MADV_HUGEPAGE)
    if not at_once or size > _available_memory() // 2:
        return
    whole = size - size % _HUGE_PAGE
    view = memoryview(buffer).cast("B")
    for offset in range(0, whole, _HUGE_PAGE):
        view[offset] = 0  # a zero over a zero: the contents don't change
    view.release()
    madvise(address, whole, _MADV_COLLAPSE)


def _available_memory() -> int:
    """Bytes of memory the kernel says are available for new allocations (``MemAvailable``
    in ``/proc/meminfo``); 0 where it can't be read."""
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Registry:
    """The address ranges of this process's own shared files, to find the file a buffer lies
    in. An entry lives as long as its mapping: the finalizer that unmaps it removes it first."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()  # not threading: the core starts no I/O machinery
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, int, weakref.ref[Any]]] = []  # start, end, fd, mapping

    def add(self, start: int, end: int, fd: int, mapping: Any) -> None:
        with self._lock:
            i = bisect.bisect(self._starts, start)
            self._starts.insert(i, start)
            self._entries.insert(i, (start, end, fd, weakref.ref(mapping)))

    def remove(self, start: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, start)
            if i < len(self._starts) and self._starts[i] == start:
                del self._starts[i]
                del self._entries[i]

    def holding(self, low: int, high: int) -> tuple[int, int, Any] | None:
        """The file whose range holds all of ``low`` to ``high`` (exclusive; ``low < high``):
        its descriptor, its start address and its mapping; or None."""
        with self._lock:
            i = bisect.bisect(self._starts, low) - 1
            if i < 0:
                return None
            start, end, fd, ref = self._entries[i]
            mapping = ref() if high <= end else None
        return None if mapping is None else (fd, start, mapping)

    def find(self, spans: list[tuple[int, int]]) -> list[tuple[int, int, Any] | None]:
        """For each (address, length), the file it lies in: descriptor, offset, mapping; or
        None. A run of spans in one file (a message's views of one buffer) costs one search."""
        found: list[tuple[int, int, Any] | None] = []
        start = end = fd = 0
        entry: tuple[int, int, int, weakref.ref[Any]] | None = None
        mapping = None
        with self._lock:
            for address, length in spans:
                if entry is None or not start <= address < end:
                    i = bisect.bisect(self._starts, address) - 1
                    entry = self._entries[i] if i >= 0 else None
                    start, end, fd = (entry[0], entry[1], entry[2]) if entry is not None else (0, 0, 0)
                    mapping = entry[3]() if entry is not None else None  # once per file, not per span
                if mapping is None or not length or address + length > end:
                    found.append(None)
                else:
                    found.append((fd, address - start, mapping))
        return found


_REGISTRY = _Registry()


def _forget(fd: int, address: int) -> None:
    """A file of ours is about to be unmapped: forget where it lay, then close it."""
    _REGISTRY.remove(address)
    close_all((fd,))


def _check_available() -> None:
    if not AVAILABLE:
        raise UsageError(
            f"shared-memory arrays need anonymous sealed shared-memory files (memfd, Linux); "
            f"{sys.platform} has none. Use ordinary arrays: a shared_memory=True connection "
            f"sends them through the socket."
        )


def shared_empty(
    shape: int | Sequence[int], dtype: Any = float, order: str = "C", *, huge_pages: bool = True
) -> np.ndarray[Any, Any]:
    """An ordinary, writable numpy array whose memory is an anonymous shared-memory file: sent
    on a ``shared_memory=True`` connection to a process on the same host, it travels as a
    descriptor, in about the same time at any size, and the receiver's array is the same
    memory as this one (see "Shared memory" in the README for who sees which writes).

    Like ``numpy.empty`` in its arguments; its contents start as zeros.

    ``huge_pages``: an array of 2 MiB or more gets its memory at once, in 2 MiB pages where
    the kernel can (Linux 6.1 or later, whatever the host's
    ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` says short of ``deny``): filling it
    is several times faster than in 4 KiB pages, each of which costs a fault, and so is a
    receiver's first read of it (see "Same host" in docs/performance.md). The memory is taken
    even if the array is never written, unless the array is larger than half the memory
    available. With ``huge_pages=False`` its pages become memory as they are first written,
    as ``numpy.empty``'s do: for a large array of which little will be used.

    The memory is 64-byte aligned (page-aligned, in fact) and is freed when the last array,
    view or received array over it, in any process, is freed: it has no name, so there is
    nothing to clean up after a crash. Each call holds one descriptor open while its memory
    lives. Object dtypes are refused (pointers mean nothing
    in another process). Raises :class:`UsageError` where the platform has no such files
    (see ``AVAILABLE``)."""
    _check_available()
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UsageError(f"shared_empty: not a dtype: {dtype!r}") from exc
    if dt.hasobject:
        raise UsageError(f"shared_empty: {dt} holds Python objects, which can't live in shared memory")
    if order not in ("C", "F"):
        raise UsageError(f"shared_empty: order must be 'C' or 'F', not {order!r}")
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    try:
        count = 1
        for n in dims:
            n = int(n)
            if n < 0:
                raise ValueError
            count *= n
    except (TypeError, ValueError) as exc:
        raise UsageError(f"shared_empty: shape must be non-negative ints, not {shape!r}") from exc
    nbytes = count * dt.itemsize
    size = max(_PAGE, _page_end(nbytes))  # a whole number of pages, at least one
    fd = os.memfd_create("streampickle", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Sealed against shrinking and growing, so no process holding it can make another's
        # mapping fault (SIGBUS); F_SEAL_SEAL, so that no one can add a seal against writing.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        # forgotten and closed just before it is unmapped: the registry never names an
        # address range another mapping could take meanwhile
        buffer, address = _map(fd, 0, size, functools.partial(_forget, fd))
    except BaseException:
        os.close(fd)
        raise
    if size >= _HUGE_PAGE:
        _huge_pages(buffer, address, size, at_once=huge_pages)
    _REGISTRY.add(address, address + size, fd, buffer)
    return np.ndarray(dims, dtype=dt, buffer=buffer, order="F" if order == "F" else "C")


def shared_copy(array: Any) -> np.ndarray[Any, Any]:
    """A copy of ``array`` (anything ``numpy.asarray`` takes) in shared memory: see
    :func:`shared_empty`. A Fortran-ordered array stays Fortran-ordered."""
    source = np.asarray(array)
    order = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
    out = shared_empty(source.shape, source.dtype, order)
    out[...] = source
    return out


def find(views: list[memoryview]) -> list[tuple[int, int, Any] | None]:
    """Where each contiguous buffer lies if it is in one of this process's shared files: the
    file's descriptor, the buffer's offset in it, and the mapping (to keep alive until the
    descriptor is sent). None for any other memory, and for an empty buffer."""
    if not AVAILABLE:
        return [None] * len(views)
    return _REGISTRY.find([(_address(view), view.nbytes) for view in views])


def in_one_file(views: list[memoryview], lengths: list[int]) -> tuple[int, list[int], Any] | None:
    """If every buffer of ``views`` (``lengths``: each one's ``nbytes``) is non-empty and lies
    in one of this process's shared files (a message whose arrays are views of one
    ``shared_empty`` buffer): the file's descriptor, each buffer's offset in it, and the
    mapping. Else None, and ``find`` says where each lies. One look-up for the message instead
    of one per buffer."""
    if not AVAILABLE or not views:
        return None
    addresses = list(map(_address, views))
    if not all(lengths):
        return None
    found = _REGISTRY.holding(min(addresses), max(map(operator.add, addresses, lengths)))
    if found is None:
        return None
    fd, start, mapping = found
    return fd, [address - start for address in addresses], mapping


def _address_py(view: memoryview) -> int:
    """The Python twin of C ``address``: where a contiguous buffer starts (readonly ones too)."""
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


_address = speedups.address if speedups else _address_py


def is_mapped(view: memoryview) -> bool:
    """Whether ``view`` lies in a mapping made here (a shared file of this process's or a
    peer's), whose contents another process may change at any time. (Without the C
    extension: False before the first mapping, when ctypes is not loaded yet.)"""
    if _map_shared is not None:
        return type(view.obj) is speedups.Mapping
    if not _libc.cache_info().currsize:
        return False
    return isinstance(view.obj, _libc()[3].Array)


def check_received(fd: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Check a descriptor a peer sent, for the ``(offset, length)`` ranges announced in it,
    before anything of it is mapped: a shared-memory file of ``memfd_create``'s ordinary kind
    (not huge pages, whose mappings outgrow the announced length), sealed against shrinking
    and growing (so a mapping can't fault later), not sealed against writing (arrays received
    are writable), and holding the range that ends last. :class:`ProtocolError` if it fails."""
    try:
        info = os.fstat(fd)
    except OSError as exc:
        raise ProtocolError(f"a descriptor the peer sent can't be examined: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolError(
            f"a descriptor the peer sent is not a shared-memory file (mode {info.st_mode:#o}): "
            f"the peer is broken or hostile"
        )
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ProtocolError(
            f"a descriptor the peer sent is not a sealable shared-memory file ({exc}): the peer "
            f"is broken or hostile"
        ) from exc
    if seals & _SEALS != _SEALS:
        raise ProtocolError(
            f"a shared-memory file the peer sent is not sealed against shrinking and growing "
            f"(seals {seals:#x}); it could shrink under our mapping and crash this process, so "
            f"it is refused"
        )
    if seals & _WRITE_SEALS:
        raise ProtocolError(
            f"a shared-memory file the peer sent is sealed against writing (seals {seals:#x}); "
            f"arrays received are writable, so it is refused"
        )
    if info.st_dev != _memfd_device():
        # A sealable regular file elsewhere: a memfd of huge pages (hugetlbfs), whose mapping
        # the kernel rounds up to a huge page and then can't unmap by the announced length,
        # so each message would leave a mapping behind until none could be made.
        raise ProtocolError(
            f"a descriptor the peer sent is not an anonymous shared-memory file of memfd_create's "
            f"ordinary kind (device {info.st_dev}, block size {info.st_blksize}: huge pages?): "
            f"the peer is broken or hostile"
        )
    offset, length = max(ranges, key=sum, default=(0, 0))
    if offset + length > info.st_size:
        raise ProtocolError(
            f"the peer announced {length} bytes at offset {offset} of a shared-memory file of "
            f"{info.st_size} bytes"
        )


@functools.cache
def _memfd_device() -> int:
    """The device of every file ``memfd_create`` makes without ``MFD_HUGETLB``: the kernel's
    internal shared-memory mount, the same for every process of the host."""
    fd = os.memfd_create("streampickle-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def _spans(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(offset, end, index) of each non-empty ``(offset, length)`` range, by offset."""
    return sorted([(offset, offset + length, i) for i, (offset, length) in enumerate(ranges) if length])


def _runs(spans: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, int]]:
    """The mappings ``spans`` (by offset) need: for each, its first and last page bounds and
    the slice of ``spans`` it holds. A run is the next spans whose first page is inside it or
    right after it: ranges on adjacent or shared pages share one mapping, and a page no range
    announced is never mapped."""
    k = 0
    n = len(spans)
    page = _PAGE
    while k < n:
        offset, end, _ = spans[k]
        start = offset - offset % page
        stop = -(-end // page) * page  # _page_end(end), inline: once per span of a many-array message
        run = k + 1
        while run < n:
            offset, end, _ = spans[run]
            if offset - offset % page > stop:  # a page no range announced lies between
                break
            if end > stop:
                stop = -(-end // page) * page
            run += 1
        yield start, stop, k, run
        k = run


def by_file(
    entries: Sequence[tuple[int, int]], lengths: Sequence[int], files: int
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """The side chunks a shared table's ``entries`` (descriptor index or ``INLINE``, offset)
    place in each of ``files`` files: for each file, the chunks' indices and their
    ``(offset, length)`` ranges, in order."""
    grouped: list[tuple[list[int], list[tuple[int, int]]]] = [([], []) for _ in range(files)]
    for i, ((index, offset), length) in enumerate(zip(entries, lengths, strict=True)):
        if index != _wire.INLINE:
            indices, ranges = grouped[index]
            indices.append(i)
            ranges.append((offset, length))
    return grouped


def mappings_needed(ranges: Sequence[tuple[int, int]]) -> int:
    """How many mappings ``map_received`` makes for ``ranges`` of one file."""
    return sum(1 for _ in _runs(_spans(ranges)))


def map_received(fd: int, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
    """Map the ``(offset, length)`` ranges of a descriptor a peer sent, which
    ``check_received`` passed, writable and shared: one view per range, in order.
    :class:`ProtocolError` if a mapping can't be made.

    Only the pages holding an announced range are mapped, never one more. Ranges whose pages
    touch or overlap (the arrays of one buffer, sent together) share one mapping, so a
    message of many arrays in one file costs one ``mmap``, not one per array (a message may
    need at most ``MAX_MAPPINGS``: the receiver checks). The caller closes ``fd``: the
    mappings don't need it."""
    views: list[memoryview | None] = [None] * len(ranges)
    spans = _spans(ranges)
    for start, stop, k, run in _runs(spans):
        try:
            buffer, _ = _map(fd, start, stop - start)
        except OSError as exc:
            raise ProtocolError(f"a shared-memory file the peer sent can't be mapped: {exc}") from exc
        whole = memoryview(buffer).cast("B")
        for offset, end, i in spans[k:run]:
            views[i] = whole[offset - start : end - start]
    return [memoryview(bytearray()) if view is None else view for view in views]  # empty: writable too


def _page_end(end: int) -> int:
    """``end`` rounded up to a whole page."""
    return -(-end // _PAGE) * _PAGE
