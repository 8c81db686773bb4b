"""Byte-level progress of long sends and receives: the event users get, and when they get it.

A multi-GiB array takes seconds to minutes to move, and without this nothing says how far it
got. The async adapters (``ObjectStream``, ``dump``, ``load`` and what builds on them) and
the blocking ones (``sync.dump``, ``sync.load``, ``sync.iter_load``) take
``progress=callback``; the callback gets a :class:`Progress` for each message:

* a first event when the message starts: before its first byte goes out (``done == 0``), or,
  receiving, once its header and length table arrived (``total`` is then final, ``done`` is
  what arrived so far);
* then at least every :func:`step_for` bytes (1% of the message, at most 64 MiB, at least
  ``MIN_STEP``);
* and a last event with ``done == total`` once all of it went out (the kernel took it) or
  arrived (it is complete; unpickling comes after).

A message of at most ``MIN_STEP`` bytes (64 KiB) gets only the last event, in both
directions: a burst of small messages costs one call each.

Cost. Without a callback nothing here runs. With one, nothing is called per read: the
adapters compute the next threshold once and cap their reads and sends at it, so the
callback runs once per step, and each event's count is exact. A receive that reads exactly
(``load``) never reads past the message it is in. One that reads ahead (``sync.iter_load``)
keeps doing so, and hands what a read brought to :meth:`ReceiveMeter.feed`, which gives it
to the decoder in the pieces an exact read could have brought: a run of small messages
still costs one read, and a few ``feed`` calls per message instead of one C call for the
run. (``ObjectStream`` still reads message by message with a callback: its transports feed
the decoder themselves.)

This module is part of the sans-IO core: no I/O, no event loop.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ._decoder import Decoder
    from ._encoder import Chunk

__all__ = ["MAX_STEP", "MIN_STEP", "Progress", "ProgressCallback", "ReceiveMeter", "SendMeter", "groups", "step_for"]

# Reports come at least every 1% of a message, and at least every MAX_STEP bytes: 1% of a
# 50 GiB message is half a GiB, which a slow link takes minutes over.
MAX_STEP = 64 << 20
# ... but never more often than every MIN_STEP bytes: each report caps a read or a send, and
# below 64 KiB (the size of a direct read, ``DIRECT_READ``) that costs more system calls than
# the report is worth. Messages under 6.4 MiB are reported every 64 KiB, not every 1%.
MIN_STEP = 64 << 10


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one message has got: ``done`` of its ``total`` bytes (on the wire: header,
    pickle, side chunks and tag), sending or receiving. ``message`` counts this stream's
    messages in that direction from 0 (``dump`` and ``load`` send or receive message 0)."""

    direction: Literal["send", "receive"]
    done: int
    total: int
    message: int

    @property
    def fraction(self) -> float:
        """``done / total``, from 0.0 to 1.0."""
        return self.done / self.total if self.total else 1.0


#: What ``progress=`` takes: a function of one :class:`Progress`, whose result is ignored.
ProgressCallback = Callable[[Progress], object]


def step_for(total: int) -> int:
    """The most bytes between two reports of a message of ``total`` bytes."""
    return min(MAX_STEP, max(MIN_STEP, total // 100))


def groups(chunks: list[Chunk], step: int) -> list[list[Chunk]]:
    """``chunks`` cut into consecutive groups of ``step`` bytes (the last one shorter), each a
    list of views of the chunks' memory: a send reports after each group. Nothing is copied."""
    out: list[list[Chunk]] = []
    group: list[Chunk] = []
    room = step
    for chunk in chunks:
        size = len(chunk)
        if size <= room:
            if size:
                group.append(chunk)
                room -= size
            if not room:
                out.append(group)
                group, room = [], step
            continue
        view = memoryview(chunk).cast("B")
        while view:
            piece, view = view[:room], view[room:]
            group.append(piece)
            room -= len(piece)
            if not room:
                out.append(group)
                group, room = [], step
    if group:
        out.append(group)
    return out


class SendMeter:
    """The progress of one stream's sends: which message is next, and its events."""

    __slots__ = ("callback", "count")

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.count = 0  # messages sent whole (or begun, on a stream whose sending is broken)

    def begin(self, total: int) -> None:
        """The first event of the message about to go out; nothing of it has been sent. None
        for a small message."""
        if total > MIN_STEP:
            self.callback(Progress("send", 0, total, self.count))

    def step(self, done: int, total: int) -> None:
        self.callback(Progress("send", done, total, self.count))

    def end(self, total: int) -> None:
        """The last event: the message went out whole, and the next one takes the next index."""
        index = self.count
        self.count += 1
        self.callback(Progress("send", total, total, index))


class ReceiveMeter:
    """The progress of the message a decoder is receiving.

    ``limit`` says how many bytes the next read may bring: up to the end of what the message
    has declared so far (so that one read never completes two messages and each message's
    total is exact) and, once reported, up to the next threshold. ``after`` reports what the
    read brought; it sets its state before calling the callback, so a callback that raises
    leaves it consistent (that event is not repeated; the next read carries on).

    A reader that reads ahead (a run of small messages in one read) hands what it read to
    :meth:`feed` instead, which gives it to the decoder in the same pieces that ``limit``
    would have allowed, so the events are those of exact reads, without their system calls."""

    __slots__ = ("callback", "count", "_next", "_due")

    def __init__(self, callback: ProgressCallback, count: int = 0) -> None:
        self.callback = callback
        self.count = count  # messages completed: the index of the one in progress
        self._next = -1  # where the next report is due; -1 until the first one
        self._due: collections.deque[Progress] = collections.deque()  # events fed, not yet delivered

    def limit(self, decoder: Decoder) -> int:
        received, expected = decoder.progress
        stop = self._next if 0 <= self._next < expected else expected
        return stop - received

    def after(self, decoder: Decoder, expected_before: int, completed: bool) -> None:
        """Report the read that just happened. ``expected_before`` is ``decoder.progress[1]``
        before it: when the read completed the message, that is its size, since the read
        could not reach past what was declared then."""
        event = self._account(decoder, expected_before, completed)
        if event is not None:
            self._due.append(event)
        self.deliver()

    def feed(self, decoder: Decoder, data: bytes | bytearray | memoryview) -> None:
        """``decoder.feed(data)`` for bytes read ahead, past the message in progress and maybe
        through several: fed in pieces that end where ``limit`` says, each accounted as an
        exact read would be. The events are queued, not delivered: the caller calls
        :meth:`deliver` once its own state is updated (and also when this raises: the
        decoder refused a piece, and the messages completed before it have their events), so
        every byte is in the decoder before a callback runs and a callback that raises loses
        none."""
        view = memoryview(data).cast("B")
        while view:
            expected = decoder.progress[1]
            pending = decoder.pending
            piece = max(1, self.limit(decoder))
            decoder.feed(view[:piece])
            view = view[piece:]
            event = self._account(decoder, expected, decoder.pending > pending)
            if event is not None:
                self._due.append(event)

    def deliver(self) -> None:
        """Call the callback with each event that is due, in order. If it raises, the events
        after that one stay due, for the next call."""
        due = self._due
        while due:
            self.callback(due.popleft())

    def _account(self, decoder: Decoder, expected_before: int, completed: bool) -> Progress | None:
        """The state after a read, and the event it is due, if any."""
        if completed:
            index = self.count
            self.count += 1
            self._next = -1
            return Progress("receive", expected_before, expected_before, index)
        if not decoder.in_message:
            self._next = -1  # a message that carries no object (a keyed stream's end)
            return None
        if decoder.in_header:
            return None
        received, expected = decoder.progress
        if received < self._next:
            return None
        if self._next < 0 and expected <= MIN_STEP:
            self._next = expected  # a small message: only its end is reported
            return None
        self._next = received + step_for(expected)
        return Progress("receive", received, expected, self.count)
