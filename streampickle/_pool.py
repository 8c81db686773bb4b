"""Memory for large received side chunks, taken back when the arrays built on it die.

Faulting in fresh memory is the largest cost of receiving an array: the kernel zeroes every
page before a process may touch it. Profiled on a 64 × 4 MiB transfer over a Unix socket,
zeroing (``clear_page_erms``) took four times the CPU of copying the bytes out of the socket.
A long-running receiver gets the same sizes again and again, so the destinations of large
side chunks come from a pool: when the last object that uses a destination (the array, a
view of it, a memoryview) dies, its memory goes back to the pool, and the next chunk of that
size class is read into it without a single page fault. Repeated 256 MiB transfers then
ran 1.2-1.3x as fast (see docs/performance.md).

What the pool keeps, and for how long, is bounded (``BufferPool.configure``):

* at most ``max_bytes`` of idle memory (1 GiB by default); beyond it, the blocks idle the
  longest are unmapped at once;
* for at most ``max_idle`` seconds (10 by default, as jemalloc's decay); older blocks are
  unmapped at the pool's next use. The pool has no thread or timer (nothing in the core
  does), so a process that stops receiving keeps its idle blocks until it receives again or
  calls ``release()``;
* idle memory is marked ``MADV_FREE`` where the platform has it: the kernel may take those
  pages back whenever it needs memory, without swapping, and a block whose pages it took is
  simply faulted in (zeroed) again when reused;
* with ``release_before_map``, a chunk that no idle block fits unmaps every idle block before
  its own memory is mapped: idle memory of another size never sits beside a new mapping, so
  the process's peak holds one chunk's memory, not two. The kernel hands the pages it just
  got back to the new mapping (zeroed again, but not fetched anew: in a VM whose balloon
  reports free pages to the host, memory left free for about two seconds costs 10-40x as
  much to fault in, 0.25-1 s for 256 MiB against 25 ms measured here).

``trim()`` applies the bounds at once, for a caller that has a timer (an event loop: the dask
backend calls it periodically, so that idle memory goes within about ``max_idle`` seconds
even when nothing is received). ``keep_for(sizes)``, called after each message with the sizes
of its side chunks, caps idle memory at what another message like it would take, until the
next call.

Reused memory holds earlier data until the peer's bytes overwrite it, exactly as
``np.empty`` can return memory that earlier objects of this process used. The decoder hands
out a destination only once every byte of it has arrived.
"""

from __future__ import annotations

import _thread  # the lock and thread id only: the core imports no threading machinery
import contextlib
import mmap
import os
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from _ctypes import CFuncPtr

__all__ = ["POOL_MIN", "BufferPool", "buffer_pool"]

HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and on arm64 with 4 KiB pages
# Chunks smaller than this come from np.empty: malloc already recycles small blocks, and the
# bookkeeping here (about 20 µs to take and give back a block) would show on them.
POOL_MIN = 1 << 20

_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_MADV_FREE = getattr(mmap, "MADV_FREE", None)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)


_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)
_madvise: CFuncPtr | Literal[False] | None = None  # libc's madvise, looked up on first use


def small_pages(array: np.ndarray[Any, Any], nbytes: int) -> bool:
    """Ask the kernel to back the first ``nbytes`` of ``array`` (which starts on a page
    boundary) with ordinary pages, never a transparent huge page: memory then follows the
    bytes written there, 4 KiB at a time, instead of 2 MiB at the first byte. Whether it could
    (False where the platform has no such advice)."""
    global _madvise
    if _MADV_NOHUGEPAGE is None or nbytes <= 0:
        return False
    if _madvise is None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return False
    status: int = _madvise(array.__array_interface__["data"][0], nbytes, _MADV_NOHUGEPAGE)
    return status == 0


class _Block:
    """One anonymous mapping: ``size`` usable bytes from a 2 MiB-aligned ``address``."""

    __slots__ = ("map", "whole", "address", "size", "idle_since")

    def __init__(self, size: int) -> None:
        # Private anonymous memory (a shared mapping would be shmem, without huge pages),
        # 2 MiB more than needed so that the usable part can start on a huge-page boundary.
        self.map = mmap.mmap(-1, size + HUGE_PAGE, flags=_MAP_FLAGS) if _MAP_FLAGS else mmap.mmap(-1, size + HUGE_PAGE)
        if _MADV_HUGEPAGE is not None:
            try:
                self.map.madvise(_MADV_HUGEPAGE)
            except OSError:
                pass
        # While this export exists the mapping can't be closed, so the raw address below stays
        # valid for as long as anything references the block.
        self.whole = np.frombuffer(self.map, dtype=np.uint8)
        base = self.whole.__array_interface__["data"][0]
        self.address = base + (-base % HUGE_PAGE)
        self.size = size
        self.idle_since = 0.0


class _Lease:
    """The base object of an array handed out: numpy keeps it alive for as long as any array,
    view or memoryview built on that array exists, and its death gives the block back."""

    __slots__ = ("__array_interface__", "_pool", "_block")

    def __init__(self, pool: BufferPool, block: _Block, nbytes: int) -> None:
        self.__array_interface__ = {
            "data": (block.address, False), "shape": (nbytes,), "typestr": "|u1", "version": 3,
        }
        self._pool = pool
        self._block = block

    def __del__(self) -> None:
        self._pool._give_back(self._block)


#: The pool's bounds unless configured: idle memory kept at most, and seconds an idle block lives.
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_IDLE = 10.0


class BufferPool:
    """Reusable memory for the destinations of large side chunks; see the module docstring.

    One pool serves the whole process (``streampickle.buffer_pool``); the decoder takes its
    destinations from it. It is thread-safe: arrays die in whatever thread drops them last.
    ``reused`` and ``mapped`` count the destinations served from idle memory and from fresh
    mappings, to see whether the pool helps a workload.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_idle: float = DEFAULT_MAX_IDLE,
        release_before_map: bool = False,
    ) -> None:
        self._lock = _thread.allocate_lock()
        self._owner: int | None = None  # the thread inside _critical()
        self._idle: dict[int, list[_Block]] = {}  # size class -> blocks, oldest first
        self._idle_bytes = 0
        self._returned: list[_Block] = []  # given back while their thread held the lock
        self._keep: dict[int, int] | None = None  # size class -> idle blocks kept at most (keep_for)
        self.max_bytes = 0
        self.max_idle = 0.0
        self.release_before_map = False
        self.configure(max_bytes=max_bytes, max_idle=max_idle, release_before_map=release_before_map)  # checks them
        self.reused = 0  # destinations served from idle memory
        self.mapped = 0  # destinations that needed a fresh mapping
        _POOLS.add(self)

    def configure(
        self, *, max_bytes: int | None = None, max_idle: float | None = None, release_before_map: bool | None = None
    ) -> None:
        """Change the bounds: ``max_bytes`` of idle memory kept (0 keeps none, so every
        destination is fresh memory, as np.empty gives), for at most ``max_idle`` seconds;
        ``release_before_map``: unmap every idle block before mapping memory for a chunk that
        none of them fits (see the module docstring)."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        if max_idle is not None and max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, not {max_idle}")
        with self._critical():
            if max_bytes is not None:
                self.max_bytes = max_bytes
            if max_idle is not None:
                self.max_idle = max_idle
            if release_before_map is not None:
                self.release_before_map = bool(release_before_map)

    def release(self) -> int:
        """Unmap every idle block now; returns the bytes released."""
        with self._critical():
            released = self._idle_bytes
            self._idle.clear()
            self._idle_bytes = 0
        return released

    def trim(self) -> int:
        """Apply the bounds now (blocks idle for longer than ``max_idle`` go); returns the bytes
        released. The pool has no timer: a process with an event loop calls this from it."""
        with self._critical():
            self._take_returned()
            before = self._idle_bytes
            self._apply_bounds()
            return before - self._idle_bytes

    def keep_for(self, sizes: Iterable[int] | None) -> int:
        """From now on keep idle at most one block for each chunk size in ``sizes``, and unmap
        the rest at once: a receiver calls this after each message with side chunks of those
        sizes, so that idle memory never exceeds what another message like it would take.
        ``None`` lifts the cap (only ``max_bytes`` and ``max_idle`` bound the pool again).
        Returns the bytes released."""
        wanted: dict[int, int] | None = None
        if sizes is not None:
            wanted = {}
            for nbytes in sizes:
                if nbytes >= POOL_MIN:  # smaller chunks never come from the pool
                    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
                    wanted[size] = wanted.get(size, 0) + 1
        with self._critical():
            self._keep = wanted
            self._take_returned()
            before = self._idle_bytes
            self._apply_bounds()
            return before - self._idle_bytes

    @property
    def idle_bytes(self) -> int:
        """Bytes of idle memory the pool holds now."""
        return self._idle_bytes

    def empty(self, nbytes: int) -> np.ndarray[Any, Any]:
        """An uninitialised, writable uint8 array of ``nbytes`` that starts on a 2 MiB
        boundary, from idle memory of its size class if the pool has some."""
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        block = None
        with self._critical():
            blocks = self._idle.get(size)
            if blocks:
                block = blocks.pop()  # the most recently used: likeliest still in memory
                if not blocks:
                    del self._idle[size]
                self._idle_bytes -= size
                self.reused += 1
            elif self.release_before_map and self._idle:
                # No idle block fits: let them all go before mapping this one's memory.
                self._idle.clear()
                self._idle_bytes = 0
        if block is None:
            try:
                block = _Block(size)
            except OSError as exc:  # ENOMEM from mmap: what np.empty would raise
                raise MemoryError(f"could not map {size} bytes: {exc}") from exc
            self.mapped += 1
        return np.asarray(_Lease(self, block, nbytes))

    def _give_back(self, block: _Block) -> None:
        if block.size > self.max_bytes:
            return  # not kept: the mapping goes with its last reference
        if _MADV_FREE is not None:
            try:
                block.map.madvise(_MADV_FREE)
            except OSError:
                pass
        block.idle_since = time.monotonic()
        if self._owner == _thread.get_ident():
            # The garbage collector ran this lease's __del__ inside this thread's own critical
            # section; the block joins the pool when that section ends.
            self._returned.append(block)
            return
        with self._critical():
            self._returned.append(block)

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """Hold the lock; on the way out, take in the blocks given back and apply the bounds:
        blocks idle for longer than ``max_idle`` go, then the oldest until at most
        ``max_bytes`` are idle."""
        with self._lock:
            self._owner = _thread.get_ident()
            try:
                yield
                self._take_returned()
                self._apply_bounds()
            finally:
                self._owner = None

    def _take_returned(self) -> None:
        returned, self._returned = self._returned, []
        for block in returned:
            self._idle.setdefault(block.size, []).append(block)
            self._idle_bytes += block.size

    def _apply_bounds(self) -> None:
        keep = self._keep
        if keep is not None:
            for size in list(self._idle):
                while size in self._idle and len(self._idle[size]) > keep.get(size, 0):
                    self._drop_oldest(size)
        now = time.monotonic()
        for size in list(self._idle):
            while size in self._idle and now - self._idle[size][0].idle_since > self.max_idle:
                self._drop_oldest(size)
        while self._idle_bytes > self.max_bytes:
            self._drop_oldest(min(self._idle, key=lambda size: self._idle[size][0].idle_since))

    def _drop_oldest(self, size: int) -> None:
        """Let the oldest idle block of a size class go (its mapping goes with it)."""
        blocks = self._idle[size]
        del blocks[0]
        self._idle_bytes -= size
        if not blocks:
            del self._idle[size]


_POOLS: weakref.WeakSet[BufferPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread that held a pool's lock at fork doesn't exist in the child: start unlocked.
    for pool in _POOLS:
        pool._lock = _thread.allocate_lock()
        pool._owner = None


os.register_at_fork(after_in_child=_after_fork_in_child)

buffer_pool = BufferPool()
