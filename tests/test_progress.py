"""Byte-level progress (``progress=``): what each message reports, on every transport and
backend, and what a callback that cancels or raises leaves behind."""

from __future__ import annotations

import io
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import ByteStream, SocketAttribute

import streampickle
from streampickle import IncompleteMessageError, ObjectStream
from streampickle._progress import MAX_STEP, MIN_STEP, Progress, groups, step_for
from streampickle.testing import memory_stream_pair

pytestmark = pytest.mark.anyio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


class Recorder:
    """A progress callback that keeps every event, and can act on the n-th one."""

    def __init__(self, action: Callable[[Progress], None] | None = None, at: int = -1) -> None:
        self.events: list[Progress] = []
        self.action = action
        self.at = at

    def __call__(self, event: Progress) -> None:
        self.events.append(event)
        if len(self.events) - 1 == self.at and self.action is not None:
            self.action(event)

    def by_message(self, direction: str) -> dict[int, list[Progress]]:
        out: dict[int, list[Progress]] = {}
        for event in self.events:
            assert event.direction == direction
            out.setdefault(event.message, []).append(event)
        return out


def check_message(events: list[Progress], direction: str) -> int:
    """The events of one message keep the contract: a first one at the start, then at most
    one step apart, done growing, the last one at done == total. Returns the total."""
    total = events[-1].total
    assert events[-1].done == total
    assert all(e.total == total for e in events)
    dones = [e.done for e in events]
    assert dones == sorted(dones) and len(set(dones)) == len(dones)
    if total <= MIN_STEP:
        assert len(events) == 1  # a small message: its end only
    elif direction == "send":
        assert dones[0] == 0
    else:
        assert dones[0] < MIN_STEP  # the header and length table
    step = step_for(total)
    assert all(b - a <= step for a, b in itertools.pairwise(dones))
    return total


def check(recorder: Recorder, direction: str, count: int) -> list[int]:
    messages = recorder.by_message(direction)
    assert sorted(messages) == list(range(count))
    return [check_message(messages[i], direction) for i in range(count)]


def array(nbytes: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return (np.arange(nbytes, dtype=np.uint8) + seed).astype(np.uint8)


async def exchange(sender: ObjectStream, receiver: ObjectStream, items: list[Any]) -> list[Any]:
    got: list[Any] = []

    async def send_all() -> None:
        for item in items:
            await sender.send(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send_all)
        for _ in items:
            got.append(await receiver.receive())
    return got


# -- pairs with a recorder on each end ----------------------------------------------------------


async def socketpair(send: Recorder, receive: Recorder) -> tuple[ObjectStream, ObjectStream]:
    a, b = socket.socketpair()
    return ObjectStream.from_socket(a, progress=send), ObjectStream.from_socket(b, progress=receive)


async def memory(send: Recorder, receive: Recorder) -> tuple[ObjectStream, ObjectStream]:
    a, b = memory_stream_pair()
    return ObjectStream(a, progress=send), ObjectStream(b, progress=receive)


async def tcp(send: Recorder, receive: Recorder) -> tuple[ObjectStream, ObjectStream]:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1", progress=receive) as listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await streampickle.connect_tcp("127.0.0.1", port, progress=send)
        server = await listener.accept()
    return client, server


async def unix(send: Recorder, receive: Recorder) -> tuple[ObjectStream, ObjectStream]:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    async with await streampickle.create_unix_listener(path, progress=receive) as listener:
        client = await streampickle.connect_unix(path, progress=send)
        server = await listener.accept()
    os.unlink(path)
    return client, server


PAIRS = [socketpair, memory, tcp, unix]


@pytest.fixture(params=PAIRS, ids=[p.__name__ for p in PAIRS])
def make_pair(request: pytest.FixtureRequest) -> Any:
    return request.param


# -- the contract -------------------------------------------------------------------------------


def test_step_is_one_percent_within_bounds() -> None:
    assert step_for(256 * MiB) == 256 * MiB // 100
    assert step_for(50 << 30) == MAX_STEP
    assert step_for(1000) == MIN_STEP


def test_groups_cut_chunks_without_copying() -> None:
    data = bytearray(range(256)) * 10
    chunks: list[Any] = [b"head", memoryview(data), b"", b"tail"]
    cut = groups(chunks, 1000)
    sizes = [sum(len(c) for c in g) for g in cut]
    assert sizes[:-1] == [1000] * (len(sizes) - 1) and sum(sizes) == 2568
    assert b"".join(bytes(c) for g in cut for c in g) == b"head" + bytes(data) + b"tail"
    inner = [c for g in cut for c in g if isinstance(c, memoryview)]
    assert all(c.obj is data for c in inner)  # views of the array's memory


def test_progress_event_is_frozen() -> None:
    event = Progress("send", 5, 10, 0)
    assert event.fraction == 0.5
    with pytest.raises(AttributeError):
        event.done = 6  # type: ignore[misc]


async def test_256_mib_message_both_directions() -> None:
    send, receive = Recorder(), Recorder()
    a, b = await socketpair(send, receive)
    big = array(256 * MiB)
    async with a, b:
        (got,) = await exchange(a, b, [big])
    assert np.array_equal(got, big)
    (sent_total,) = check(send, "send", 1)
    (received_total,) = check(receive, "receive", 1)
    assert sent_total == received_total > 256 * MiB
    # at least every 1% (2.56 MiB here, under 64 MiB): about a hundred reports each way
    assert len(send.events) >= 100 and len(receive.events) >= 100


async def test_every_transport(make_pair: Any) -> None:
    send, receive = Recorder(), Recorder()
    a, b = await make_pair(send, receive)
    items = [array(9 * MiB, 1), {"small": 1}, array(3 * MiB, 2), b"x" * 100]
    async with a, b:
        got = await exchange(a, b, items)
    assert np.array_equal(got[0], items[0]) and got[1] == items[1]
    assert np.array_equal(got[2], items[2]) and got[3] == items[3]
    assert check(send, "send", 4) == check(receive, "receive", 4)
    # a small message reports once, at its end; a large one at its start too
    assert len(receive.by_message("receive")[1]) == len(send.by_message("send")[1]) == 1
    assert send.by_message("send")[2][0].done == 0


async def test_burst_of_small_messages() -> None:
    send, receive = Recorder(), Recorder()
    a, b = await socketpair(send, receive)
    items = list(range(200))
    async with a, b:
        assert await exchange(a, b, items) == items
    sent = check(send, "send", 200)
    assert check(receive, "receive", 200) == sent
    assert len(send.events) == len(receive.events) == 200


async def test_keyed_stream_counts_the_tag() -> None:
    send, receive = Recorder(), Recorder()
    a, b = memory_stream_pair()
    sa = ObjectStream(a, key=b"secret", progress=send)
    sb = ObjectStream(b, key=b"secret", progress=receive)
    items = [array(5 * MiB), "after"]
    async with sa, sb:
        got = await exchange(sa, sb, items)
    assert np.array_equal(got[0], items[0]) and got[1] == "after"
    assert check(send, "send", 2) == check(receive, "receive", 2)


async def test_dump_and_load() -> None:
    send, receive = Recorder(), Recorder()
    a, b = memory_stream_pair()
    big = array(4 * MiB)
    got: list[Any] = []

    async def load() -> None:
        got.append(await streampickle.load(b, progress=receive))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await streampickle.dump(big, a, progress=send)
    assert np.array_equal(got[0], big)
    assert check(send, "send", 1) == check(receive, "receive", 1)


async def test_no_callback_no_events() -> None:
    a, b = socket.socketpair()
    sa, sb = ObjectStream.from_socket(a), ObjectStream.from_socket(b)
    async with sa, sb:
        assert sa._send_meter is None and sb._receive_meter is None
        (got,) = await exchange(sa, sb, [array(MiB)])
    assert len(got) == MiB


# -- cancellation and callbacks that raise ------------------------------------------------------


class Stop(Exception):
    pass


async def test_cancelled_receive_loses_nothing() -> None:
    scope = anyio.CancelScope()
    receive = Recorder(lambda event: scope.cancel(), at=3)
    a, b = await socketpair(Recorder(), receive)
    big = array(32 * MiB, 3)
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(a.send, big)
        with scope:
            await b.receive()
        assert scope.cancelled_caught
        got = await b.receive()
        tg.start_soon(a.send, "next")
        assert await b.receive() == "next"
    assert np.array_equal(got, big)
    events = receive.by_message("receive")
    check_message(events[0], "receive")
    assert len(events) == 2


async def test_receive_callback_raising_loses_nothing() -> None:
    def fail(event: Progress) -> None:
        raise Stop

    receive = Recorder(fail, at=2)
    a, b = await socketpair(Recorder(), receive)
    big = array(16 * MiB, 4)
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(a.send, big)
        with pytest.raises(Stop):
            await b.receive()
        got = await b.receive()
        tg.start_soon(a.send, "next")
        assert await b.receive() == "next"
    assert np.array_equal(got, big)
    check_message(receive.by_message("receive")[0], "receive")  # no event lost or repeated


async def test_receive_callback_raising_at_the_end() -> None:
    receive = Recorder()
    receive.action, receive.at = None, -1

    def fail_at_end(event: Progress) -> None:
        receive.events.append(event)
        if event.done == event.total and event.message == 0:
            raise Stop

    a, b = memory_stream_pair()
    sa, sb = ObjectStream(a), ObjectStream(b, progress=fail_at_end)
    big = array(2 * MiB, 5)
    async with sa, sb, anyio.create_task_group() as tg:
        tg.start_soon(sa.send, big)
        with pytest.raises(Stop):
            await sb.receive()
        assert np.array_equal(await sb.receive(), big)  # complete and held: returned next
    check_message(receive.by_message("receive")[0], "receive")


async def test_send_callback_raising_first_sends_nothing() -> None:
    def fail(event: Progress) -> None:
        if event.done == 0 and event.message == 0 and not fail.done:  # type: ignore[attr-defined]
            fail.done = True  # type: ignore[attr-defined]
            raise Stop

    for key in (None, b"secret"):
        a, b = socket.socketpair()
        fail.done = False  # type: ignore[attr-defined]
        sa = ObjectStream.from_socket(a, key=key, progress=fail)
        sb = ObjectStream.from_socket(b, key=key)
        async with sa, sb:
            with pytest.raises(Stop):
                await sa.send(array(MiB))  # large enough to have a first event
            await sa.send("second")  # intact: with a key, the same sequence number is reused
            assert await sb.receive() == "second"


async def test_send_callback_raising_midway_breaks_sending() -> None:
    def fail(event: Progress) -> None:
        raise Stop

    send = Recorder(fail, at=2)
    a, b = await socketpair(send, Recorder())
    async with a, b, anyio.create_task_group() as tg:
        received: list[BaseException] = []

        async def receive() -> None:
            try:
                await b.receive()
            except IncompleteMessageError as exc:
                received.append(exc)

        tg.start_soon(receive)
        with pytest.raises(Stop):
            await a.send(array(16 * MiB))
        with pytest.raises(anyio.BrokenResourceError):
            await a.send("more")
        await a.aclose()
    assert len(received) == 1  # the peer sees an incomplete message, never a wrong object


async def test_send_callback_raising_at_the_end_sent_the_message() -> None:
    def fail(event: Progress) -> None:
        if event.message == 0 and event.done == event.total:
            raise Stop

    a, b = memory_stream_pair()
    sa, sb = ObjectStream(a, progress=fail), ObjectStream(b)
    big = array(2 * MiB, 6)
    async with sa, sb, anyio.create_task_group() as tg:

        async def send() -> None:
            with pytest.raises(Stop):
                await sa.send(big)
            await sa.send("next")  # intact

        tg.start_soon(send)
        assert np.array_equal(await sb.receive(), big)
        assert await sb.receive() == "next"


# -- the example --------------------------------------------------------------------------------


@pytest.mark.parametrize("api", [[], ["--sync"]], ids=["async", "sync"])
def test_example_runs_with_a_progress_bar_on_both_ends(api: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "progress.py"), "--arrays", "2", "--mib", "8", "--plain", *api],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    for line in ("send     #0", "send     #1", "receive  #0", "receive  #1"):
        assert f"{line} [####################] 100%" in text
    assert "received 2 arrays of 8 MiB" in text


async def test_shared_memory_message_reports_its_wire_bytes() -> None:
    send, receive = Recorder(), Recorder()
    a, b = socket.socketpair(socket.AF_UNIX)
    sa = ObjectStream.from_socket(a, shared_memory=True, progress=send)
    sb = ObjectStream.from_socket(b, shared_memory=True, progress=receive)
    shared = streampickle.shared_empty(8 * MiB, dtype=np.uint8)
    shared[:] = 7
    items = [shared, array(2 * MiB, 8)]
    async with sa, sb:
        got = await exchange(sa, sb, items)
    assert np.array_equal(got[0], shared) and np.array_equal(got[1], items[1])
    totals = check(send, "send", 2)
    assert check(receive, "receive", 2) == totals
    assert totals[0] < MIN_STEP  # the shared array's bytes don't travel: a few dozen do


# -- the blocking adapter: streampickle.sync ----------------------------------------------------


def sync_pair(nbytes: int, reader: Callable[[Any, Recorder], Any]) -> tuple[Recorder, Recorder, Any, int]:
    """One array of ``nbytes`` from ``sync.dump`` in a thread to ``reader`` over a real
    socketpair, each end with a recorder; returns them, what was read and the wire size."""
    from streampickle import sync

    send, receive = Recorder(), Recorder()
    big = array(nbytes, 9)
    a, b = socket.socketpair()
    with a, b:

        def dump() -> None:
            sync.dump(big, a, progress=send)
            a.shutdown(socket.SHUT_WR)  # the end of the input, for iter_load

        sender = threading.Thread(target=dump)
        sender.start()
        try:
            got = reader(b, receive)
        finally:
            sender.join()
    assert np.array_equal(got, big)
    return send, receive, got, len(streampickle.dumps(big))


def test_sync_dump_and_load_over_a_socketpair() -> None:
    from streampickle import sync

    send, receive, _, size = sync_pair(16 * MiB, lambda s, r: sync.load(s, progress=r))
    (sent,) = check(send, "send", 1)
    (received,) = check(receive, "receive", 1)
    assert sent == received == size  # header, pickle and side chunk: every byte on the wire
    step = step_for(size)
    # the sender reports exactly every step, from 0; the receiver at least as often
    assert [e.done for e in send.events] == [*range(0, size, step), size]
    assert len(receive.events) >= size // step + 1
    assert receive.events[0].done < MIN_STEP  # its header and length table


@pytest.mark.heavy
def test_sync_200_mib_over_a_socketpair() -> None:
    from streampickle import sync

    send, receive, _, size = sync_pair(200 * MiB, lambda s, r: sync.load(s, progress=r))
    assert check(send, "send", 1) == check(receive, "receive", 1) == [size]
    assert len(send.events) == len(range(0, size, step_for(size))) + 1 >= 101


def test_sync_iter_load_over_a_socketpair() -> None:
    from streampickle import sync

    def read(sock: socket.socket, recorder: Recorder) -> Any:
        (obj,) = list(sync.iter_load(sock, progress=recorder))  # up to the sender's shutdown
        return obj

    send, receive, _, size = sync_pair(3 * MiB, read)
    assert check(send, "send", 1) == check(receive, "receive", 1) == [size]


def test_sync_over_a_pipe_both_ends() -> None:
    from streampickle import sync

    send, receive = Recorder(), Recorder()
    items = [array(3 * MiB, 1), {"small": 1}, array(MiB, 2)]
    r, w = os.pipe()
    with open(r, "rb", buffering=0) as rf, open(w, "wb", buffering=0) as wf:
        sender = threading.Thread(target=lambda: [sync.dump(o, wf, progress=send) for o in items])
        sender.start()
        got = [sync.load(rf, progress=receive) for _ in items]
        sender.join()
    assert np.array_equal(got[0], items[0]) and got[1] == items[1] and np.array_equal(got[2], items[2])
    # each dump and each load is message 0 of its own call, as the async dump and load are
    sizes = [len(streampickle.dumps(o)) for o in items]
    for recorder, direction in ((send, "send"), (receive, "receive")):
        per_call = split_calls(recorder.events)
        assert [check_message(events, direction) for events in per_call] == sizes
    assert len(split_calls(receive.events)[1]) == 1  # a small message: its end only


def split_calls(events: list[Progress]) -> list[list[Progress]]:
    """Events of consecutive one-message calls, split at each message's last event."""
    calls: list[list[Progress]] = [[]]
    for event in events:
        assert event.message == 0
        calls[-1].append(event)
        if event.done == event.total:
            calls.append([])
    assert not calls[-1]
    return calls[:-1]


def test_sync_files_every_reader_reports_the_same_messages(tmp_path: Any) -> None:
    from streampickle import sync

    items = [array(5 * MiB, 3), "small", array(70_000, 4), array(2 * MiB, 5)]
    path = tmp_path / "log.sp"
    send = Recorder()
    offsets = [0]
    with open(path, "wb") as f:
        for obj in items:
            sync.dump(obj, f, progress=send)
            offsets.append(f.tell())
    sizes = [b - a for a, b in itertools.pairwise(offsets)]  # what each dump wrote
    assert [check_message(events, "send") for events in split_calls(send.events)] == sizes

    loads = Recorder()
    with open(path, "rb") as f:
        for obj in items:
            assert_equal(sync.load(f, progress=loads), obj)
    assert [check_message(events, "receive") for events in split_calls(loads.events)] == sizes

    for buffering in (-1, 0):  # buffered (readinto1) and raw
        iterated = Recorder()
        with open(path, "rb", buffering=buffering) as f:
            for got, obj in zip(sync.iter_load(f, progress=iterated), items, strict=True):
                assert_equal(got, obj)
        assert check(iterated, "receive", len(items)) == sizes  # numbered through the file


def assert_equal(got: Any, expected: Any) -> None:
    if isinstance(expected, np.ndarray):
        assert np.array_equal(got, expected)
    else:
        assert got == expected


class CountingFile(io.RawIOBase):
    """A real file whose reads are counted."""

    def __init__(self, path: Any) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with this one
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        self.reads += 1
        n: int = self.file.readinto(target)
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def test_sync_iter_load_reads_ahead_with_progress_too(tmp_path: Any) -> None:
    """A run of small messages costs one read per read-ahead buffer, with or without
    progress=, and each message still gets its own exact last event."""
    from streampickle import sync

    items = [{"step": i, "state": np.full(4, i)} for i in range(2000)] + [array(MiB, 6)]
    path = tmp_path / "small.sp"
    offsets = [0]
    with open(path, "wb") as f:
        for obj in items:
            sync.dump(obj, f)
            offsets.append(f.tell())
    reads = []
    recorder = Recorder()
    for progress in (None, recorder):
        with CountingFile(path) as f:
            got = list(sync.iter_load(f, progress=progress))
        assert len(got) == len(items) and np.array_equal(got[-1], items[-1])
        reads.append(f.reads)
    sizes = [b - a for a, b in itertools.pairwise(offsets)]
    assert check(recorder, "receive", len(items)) == sizes
    assert len(recorder.events) > len(items)  # the last message has steps
    without, with_progress = reads
    # the small messages: the same reads; the 1 MiB one: one read per 64 KiB step at most
    assert with_progress <= without + MiB // MIN_STEP + 1
    assert without < 50  # read ahead, not read per message


def test_sync_keyed_message_counts_its_tag() -> None:
    from streampickle import sync

    send, receive = Recorder(), Recorder()
    f = io.BytesIO()
    sync.dump(array(2 * MiB, 7), f, key=b"secret", progress=send)
    f.seek(0)
    assert np.array_equal(sync.load(f, key=b"secret", progress=receive), array(2 * MiB, 7))
    assert check(send, "send", 1) == check(receive, "receive", 1) == [len(f.getvalue())]


def test_sync_shared_memory_message_reports_its_wire_bytes() -> None:
    from streampickle import sync

    send, receive = Recorder(), Recorder()
    shared = streampickle.shared_empty(8 * MiB, dtype=np.uint8)
    shared[:] = 7
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        sync.dump(shared, a, shared_memory=True, progress=send)
        got = sync.load(b, shared_memory=True, progress=receive)
    assert np.array_equal(got, shared)
    (total,) = check(send, "send", 1)
    assert check(receive, "receive", 1) == [total] and total < MIN_STEP


def test_sync_dump_callback_raising() -> None:
    """First event: nothing written; last event: all of it; one between: a prefix, which the
    reader sees as an incomplete message."""
    from streampickle import sync

    big = array(2 * MiB, 8)

    def raising_at(index: int) -> Recorder:
        def fail(event: Progress) -> None:
            raise Stop

        return Recorder(fail, at=index)

    first = io.BytesIO()
    with pytest.raises(Stop):
        sync.dump(big, first, progress=raising_at(0))
    assert first.getvalue() == b""

    last = io.BytesIO()
    recorder = Recorder()
    sync.dump(big, io.BytesIO(), progress=recorder)
    with pytest.raises(Stop):
        sync.dump(big, last, progress=raising_at(len(recorder.events) - 1))
    last.seek(0)
    assert np.array_equal(sync.load(last), big)

    midway = io.BytesIO()
    with pytest.raises(Stop):
        sync.dump(big, midway, progress=raising_at(3))
    assert len(midway.getvalue()) == 3 * step_for(len(last.getvalue()))
    midway.seek(0)
    with pytest.raises(IncompleteMessageError):
        sync.load(midway)


def test_sync_load_and_iter_load_callback_raising_comes_out() -> None:
    from streampickle import sync

    data = streampickle.dumps(array(2 * MiB, 9)) * 2

    def fail(event: Progress) -> None:
        raise Stop

    with pytest.raises(Stop):
        sync.load(io.BytesIO(data), progress=Recorder(fail, at=2))
    with pytest.raises(Stop):
        list(sync.iter_load(io.BytesIO(data), progress=Recorder(fail, at=40)))


# -- reading ahead with a meter -----------------------------------------------------------------


def exact_events(data: bytes) -> list[Progress]:
    """The events of reading ``data`` with exact reads: each capped by the meter."""
    from streampickle import Decoder
    from streampickle._progress import ReceiveMeter

    recorder = Recorder()
    decoder, meter = Decoder(), ReceiveMeter(recorder)
    view = memoryview(data)
    while view:
        target = decoder.get_buffer()[: meter.limit(decoder)]
        expected, pending = decoder.progress[1], decoder.pending
        n = min(len(target), len(view))
        target[:n] = view[:n]
        decoder.buffer_updated(n)
        view = view[n:]
        meter.after(decoder, expected, decoder.pending > pending)
    return recorder.events


def test_meter_feed_gives_each_message_its_events() -> None:
    from streampickle import Decoder
    from streampickle._progress import ReceiveMeter

    items = [1, array(3 * MiB, 1), "two", *range(50), array(100_000, 2)]
    data = b"".join(streampickle.dumps(o) for o in items)
    sizes = [len(streampickle.dumps(o)) for o in items]
    for read in (len(data), 256 << 10, 1000, 7):  # one read of everything, and smaller ones
        recorder = Recorder()
        decoder, meter = Decoder(), ReceiveMeter(recorder)
        for start in range(0, len(data), read):
            meter.feed(decoder, memoryview(data)[start : start + read])
            meter.deliver()
        assert check(recorder, "receive", len(items)) == sizes
        assert decoder.pending == len(items)
    # done values differ from exact reads only in where the first event of a message lands
    exact = exact_events(data)
    assert [(e.message, e.total) for e in exact if e.done == e.total] == [
        (e.message, e.total) for e in recorder.events if e.done == e.total
    ]


def test_meter_feed_loses_no_byte_when_a_callback_raises() -> None:
    from streampickle import Decoder
    from streampickle._progress import ReceiveMeter

    def fail(event: Progress) -> None:
        raise Stop

    items = list(range(10))
    data = b"".join(streampickle.dumps(o) for o in items)
    recorder = Recorder(fail, at=3)
    decoder, meter = Decoder(), ReceiveMeter(recorder)
    meter.feed(decoder, memoryview(data))
    assert decoder.pending == 10  # every byte is in before any callback runs
    with pytest.raises(Stop):
        meter.deliver()
    meter.deliver()  # the events after the one that raised are still due
    assert [e.message for e in recorder.events] == items
    assert list(decoder) == items


class CountingStream(ByteStream):
    """A byte stream holding ``data``, all of it ready at once, that counts its receives."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.receives = 0

    async def receive(self, max_bytes: int = 65536) -> bytes:
        self.receives += 1
        if not self.data:
            raise anyio.EndOfStream
        out, self.data = bytes(self.data[:max_bytes]), self.data[max_bytes:]
        return out

    async def send(self, item: bytes) -> None:
        raise AssertionError("only read here")

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def receives_of(data: bytes, count: int, progress: Any, *, stream: bool) -> int:
    source = CountingStream(data)
    if stream:
        async with ObjectStream(source, progress=progress) as objects:
            for _ in range(count):
                await objects.receive()
    else:
        for _ in range(count):
            await streampickle.load(source, progress=progress)
    return source.receives


async def test_load_reads_as_often_with_progress_for_small_messages() -> None:
    """load reads exactly (never past its message) either way: a callback costs no read."""
    data = b"".join(streampickle.dumps({"i": i}) for i in range(200))
    assert await receives_of(data, 200, Recorder(), stream=False) == await receives_of(data, 200, None, stream=False)


async def test_a_large_message_costs_at_most_a_read_per_step_more() -> None:
    """A stream with the whole message ready returns it in a few reads; with a callback each
    read stops at the next step, for about a hundred events."""
    data = streampickle.dumps(array(8 * MiB))
    steps = -(-len(data) // step_for(len(data)))
    for stream in (False, True):
        without = await receives_of(data, 1, None, stream=stream)
        recorder = Recorder()
        with_progress = await receives_of(data, 1, recorder, stream=stream)
        assert without < 10 and with_progress <= without + steps
        assert len(recorder.events) >= steps


async def test_object_stream_reads_ahead_with_progress_too() -> None:
    data = b"".join(streampickle.dumps({"i": i}) for i in range(200))
    recorder = Recorder()
    with_progress = await receives_of(data, 200, recorder, stream=True)
    assert len(recorder.events) == 200
    assert with_progress == await receives_of(data, 200, None, stream=True)


async def test_async_iter_load_reports_each_message_of_a_file_or_stream(tmp_path: Any) -> None:
    from streampickle import sync

    items = [array(3 * MiB, 1), "small", *range(300), array(200_000, 2)]
    path = tmp_path / "log.sp"
    out = io.BytesIO()
    offsets = [0]
    for obj in items:
        sync.dump(obj, out)
        offsets.append(out.tell())
    path.write_bytes(out.getvalue())
    sizes = [b - a for a, b in itertools.pairwise(offsets)]

    async def collect(source: Any, recorder: Recorder) -> list[Any]:
        return [obj async for obj in streampickle.iter_load(source, progress=recorder)]

    file_events = Recorder()
    async with await anyio.open_file(path, "rb") as f:
        got = await collect(f, file_events)
    assert len(got) == len(items) and np.array_equal(got[0], items[0]) and got[1] == "small"
    assert check(file_events, "receive", len(items)) == sizes

    stream_events = Recorder()
    a, b = memory_stream_pair()
    data = path.read_bytes()

    async def send() -> None:
        async with a:
            for start in range(0, len(data), 100_000):
                await a.send(data[start : start + 100_000])

    async with b, anyio.create_task_group() as tg:
        tg.start_soon(send)
        got = await collect(b, stream_events)
    assert len(got) == len(items) and np.array_equal(got[-1], items[-1])
    assert check(stream_events, "receive", len(items)) == sizes
