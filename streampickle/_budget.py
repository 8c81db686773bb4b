"""A memory budget shared by streams: the bytes that incomplete messages may hold at once.

Why: a message's side chunks are allocated when its header arrives, but uninitialised, so a
process's memory grows with the bytes that actually arrive, not with what a header claims. A
thousand peers that each send part of a large message and stall can still hold gigabytes
between them, each within ``Limits.max_message_size``. A budget caps their sum.

Theory of operation. Each stream under a budget has a :class:`Charge`: the bytes of its
current incomplete message beyond a free ``ALLOWANCE``. Before each read the async adapter asks
the charge to cover what the read could bring (``Charge.grant``), and caps the read to what
it got; after the read it trims the charge to what the decoder still holds (``Charge.trim``),
which is nothing once the message is complete or the decoder has failed. A read that needs
budget that is not there waits in a FIFO queue; meanwhile the connection is simply not read,
so the kernel's buffers fill and TCP flow control stops the peer. Nothing here reads a
socket or a decoder: the adapter passes in plain byte counts.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import anyio

from ._errors import UsageError

__all__ = ["ALLOWANCE", "MAX_QUANTUM", "QUANTUM", "Charge", "MemoryBudget", "check_budget", "default_budget_bytes"]

# Bytes of each incomplete message that cost nothing: every header (fixed part and a length
# table of up to a thousand side chunks) and every small message fits, so a well-behaved peer
# is served while others hold the whole budget. It is also what each connection may hold
# beyond the budget: 16 MiB for a thousand connections.
ALLOWANCE = 16 * 1024
# Most a read asks for at once is 1/256 of the budget, from QUANTUM to MAX_QUANTUM: large
# enough that a big array costs few reads (on asyncio a part is filled from one reader
# callback), small enough that a read waiting for its peer holds little of the budget: it
# takes 256 peers that stall inside large messages to hold all of it until their deadlines.
QUANTUM = 1 << 20
MAX_QUANTUM = 64 << 20
# Where the machine's memory can't be read (no sysconf): a budget that fits a small server.
_FALLBACK_BYTES = 1 << 30


def default_budget_bytes() -> int:
    """Half of the machine's physical memory: what a listener's own budget gets by default.
    Big enough that it never limits a server that fits in memory anyway, small enough that
    stalled peers can't take the machine into swap or the OOM killer."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_BYTES
    return total // 2 if total > 0 else _FALLBACK_BYTES


class MemoryBudget:
    """Bytes that incomplete messages may hold at once, shared by any group of streams.

    Give the same budget to several streams (``ObjectStream(..., budget=b)``, ``load(...,
    budget=b)``, ``connect_tcp(..., budget=b)``) or to a listener, which by default makes
    one for its connections. Rules:

    * A stream is charged for the bytes that actually arrive, not for what a header claims:
      side chunks are allocated uninitialised, so memory follows what arrived.
    * The first 16 KiB of every incomplete message are free (``ALLOWANCE``): headers and
      small messages never wait, so a client of small messages is served even while others
      hold the whole budget.
    * Beyond that, a read takes budget first (1/256 of it at a time, at least 1 MiB and at
      most 64 MiB) and is capped to what it got. If there is none, the stream is not read until
      there is: backpressure, not an error. The peer's sends block on TCP flow control meanwhile.
    * A stream's charge goes back when its message completes, when its decoder fails, when
      ``load`` returns or raises, and when the stream is closed; what a read was granted but
      didn't use goes back after the read. A read cancelled while it waits takes nothing.
    * A stream whose request can't be met proceeds anyway if no other stream holds any of the
      budget, so one message larger than the whole budget is still received, alone.

    Messages that together need more than the budget wait for each other, until one of them
    completes or reaches its deadline (``Limits.max_message_seconds``). Size the budget for
    the bytes of large messages your workload has in flight at once, and leave headroom for
    what it doesn't count: up to 16 KiB per connection, completed messages not yet received,
    and each connection's own objects and kernel buffers.

    ``max_bytes``, ``in_use`` (bytes charged now) and ``waiting`` (streams held back now) are
    read-only. One budget belongs to one
    event loop at a time; it works on asyncio, uvloop and trio.
    """

    def __init__(self, max_bytes: int) -> None:
        if type(max_bytes) is not int or max_bytes < 1:  # not a bool, not a float
            raise UsageError(f"MemoryBudget(max_bytes) must be a positive int, not {max_bytes!r}")
        self._max = max_bytes
        self._quantum = min(max_bytes, max(QUANTUM, min(max_bytes // 256, MAX_QUANTUM)))
        self._in_use = 0
        self._holding: set[Charge] = set()  # the charges holding more than nothing
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def max_bytes(self) -> int:
        """The most that incomplete messages may hold together beyond their allowances."""
        return self._max

    @property
    def in_use(self) -> int:
        """Bytes charged now. Above ``max_bytes`` only while one stream holds it alone."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """How many streams are waiting for room now (their reads are held back)."""
        return len(self._waiters)

    def __repr__(self) -> str:
        return f"MemoryBudget(max_bytes={self._max}) <in use: {self._in_use}, waiting: {len(self._waiters)}>"

    def _fits(self, n: int, charge: Charge) -> bool:
        """Whether ``charge`` may take ``n`` more now: there is room, or it holds all there is."""
        return self._in_use + n <= self._max or self._in_use == charge.held

    def _add(self, charge: Charge, n: int) -> None:
        if n:
            self._in_use += n
            charge.held += n
            self._holding.add(charge)

    def _remove(self, charge: Charge, n: int) -> None:
        self._in_use -= n
        charge.held -= n
        if not charge.held:
            self._holding.discard(charge)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Grant waiters in order while the first one fits; then, if a single charge holds
        budget and is itself waiting, grant it too: everyone else is waiting for it."""
        waiters = self._waiters
        while waiters and self._fits(waiters[0].n, waiters[0].charge):
            self._grant(waiters.popleft())
        if waiters and len(self._holding) == 1:
            (sole,) = self._holding
            waiter = sole._waiter
            if waiter is not None and not waiter.event.is_set():
                waiters.remove(waiter)
                self._grant(waiter)

    def _grant(self, waiter: _Waiter) -> None:
        self._add(waiter.charge, waiter.n)
        waiter.event.set()


def check_budget(budget: Any) -> MemoryBudget:
    """``budget`` if it is a :class:`MemoryBudget`, else the caller's mistake."""
    if not isinstance(budget, MemoryBudget):
        raise UsageError(f"budget must be a streampickle.MemoryBudget or None, not {type(budget).__name__}")
    return budget


class _Waiter:
    __slots__ = ("charge", "n", "event", "closed")

    def __init__(self, charge: Charge, n: int) -> None:
        self.charge = charge
        self.n = n
        self.event = anyio.Event()
        self.closed = False  # woken by Charge.close, granted nothing


class Charge:
    """One stream's share of a :class:`MemoryBudget`: ``held`` bytes, owned by one reader."""

    __slots__ = ("budget", "held", "_waiter", "__weakref__")

    def __init__(self, budget: Any) -> None:
        self.budget = check_budget(budget)
        self.held = 0
        self._waiter: _Waiter | None = None

    async def grant(self, received: int, wanted: int, minimum: int = 1) -> int | None:
        """Cover a read that adds up to ``wanted`` bytes to a message holding ``received``;
        the most it may add, or None for all of ``wanted``. ``minimum``: the least that lets
        the read take a byte (a whole huge page, at the start of one).

        Free while the read stays inside the allowance (plus what is already held). Past it,
        asks for up to ``QUANTUM`` more: while the allowance still has ``minimum`` left, only
        if the budget has room now (else the read is capped to the allowance); otherwise
        waiting until it has."""
        room = ALLOWANCE - received + self.held
        if wanted <= room:
            return None
        budget = self.budget
        # Up to a quantum beyond the allowance, plus what a resumed message (a parked load)
        # already holds uncharged; never more than the read could bring, never less than
        # lets it take a byte.
        n = max(min(wanted - room, max(0, -room) + budget._quantum), minimum - room)
        if room >= minimum and (budget._waiters or not budget._fits(n, self)):
            return room  # don't wait while the allowance has room; don't jump the queue
        if budget._fits(n, self) and (not budget._waiters or budget._in_use == self.held):
            budget._add(self, n)
        else:
            await self._wait(n)
        return room + n

    async def _wait(self, n: int) -> None:
        budget = self.budget
        waiter = self._waiter = _Waiter(self, n)
        budget._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.closed:
                pass
            elif waiter.event.is_set():  # granted as we were cancelled: give it back
                budget._remove(self, n)
            else:
                budget._waiters.remove(waiter)
                budget._wake()  # the first in line may have been holding the others up
            raise
        finally:
            self._waiter = None
        if waiter.closed:
            raise anyio.ClosedResourceError

    def trim(self, received: int) -> None:
        """Keep only what a message of which ``received`` bytes have arrived needs charged
        (0: nothing, as after a complete or failed message), and give back the rest."""
        extra = self.held - max(0, received - ALLOWANCE)
        if extra > 0:
            self.budget._remove(self, extra)

    def close(self) -> None:
        """Give everything back, and wake a read waiting for budget with
        ``anyio.ClosedResourceError`` (its stream is being closed)."""
        waiter = self._waiter
        if waiter is not None and not waiter.event.is_set():
            self.budget._waiters.remove(waiter)
            waiter.closed = True
            waiter.event.set()
            self.budget._wake()
        self.trim(0)
