"""Standard pickle streams: ``PickleDecoder``, ``load_pickle`` and ``sync.load_pickle`` read what
``pickle.dump(obj, f, protocol=p)`` writes, for every protocol, safely by default.

The producer is a real process (``pickle.dump`` to a pipe or a TCP socket); the consumer feeds
what arrives in random splits, or reads it with the loaders, which must leave whatever follows
a pickle in the stream."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import random
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import streampickle
from streampickle import (
    ForbiddenGlobalError,
    IncompleteMessageError,
    LimitExceededError,
    Limits,
    MalformedPickleError,
    PickleDecoder,
    ProtocolError,
    StreamPickleError,
    _rebuild,
)

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)

# The objects the producer pickles, built the same way in both processes.
CATALOG = textwrap.dedent("""
    import numpy as np
    def catalog():
        return [
            None, True, False, 0, -1, 255, 2**31, -2**70, 1.5, float("inf"), "", "héllo\\n\\u20ac",
            b"", b"\\x00bytes\\xff", (1, "two", (3.0,)), [1, [2, [3]]], {"a": 1, 2: [3], (4, 5): None},
            {1, 2, 3}, frozenset({"x"}), 1 + 2j, [b"shared"] * 3,
            np.arange(12, dtype=np.float64).reshape(3, 4),
            np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)),
            np.array(3.25), np.array(["ab", "céd", ""]), np.array([b"x", b"yz"]),
            np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
            np.array([1, 2], dtype="datetime64[ns]"), np.array([True, False]),
            np.zeros((0, 3), dtype=np.complex64), np.arange(5, dtype=np.uint8)[::2],
            {"nested": {"arrays": [np.ones(4, dtype=np.float32), np.arange(3, dtype=np.int16)]}},
            np.float64(2.5), np.int32(-7), np.str_("ü"), np.datetime64("2020-01-01", "ns"),
            bytearray(b"\\x00ba\\xff\\n"), bytearray(), [bytearray(b"twice")] * 2,
        ]
""")
namespace: dict[str, Any] = {}
exec(CATALOG, namespace)  # the catalog is this file's own code, also run by the producer
catalog = namespace["catalog"]


def same(a: Any, b: Any) -> bool:
    """Equal values of equal types, arrays compared by dtype, shape, order and contents."""
    if isinstance(b, np.ndarray):
        return (type(a) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
                and a.flags.f_contiguous >= (b.flags.f_contiguous and not b.flags.c_contiguous)
                and a.tobytes() == b.tobytes())
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(b, dict):
        return type(a) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in b)
    return type(a) is type(b) and a == b


def produce(protocol: int, sink: str) -> bytes | subprocess.Popen[bytes]:
    """Run a producer process that pickle.dump()s the catalog with ``protocol``, then
    b"TRAILER". ``sink`` "pipe": return its whole output; "tcp:PORT": it connects and writes."""
    code = CATALOG + textwrap.dedent(f"""
        import pickle, socket, sys
        sink = {sink!r}
        if sink == "pipe":
            f = sys.stdout.buffer
        else:
            sock = socket.create_connection(("127.0.0.1", int(sink[4:])))
            f = sock.makefile("wb")
        for obj in catalog():
            pickle.dump(obj, f, protocol={protocol})
        f.write(b"TRAILER")
        f.flush()
    """)
    if sink == "pipe":
        return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.fixture(scope="module")
def streams() -> dict[int, bytes]:
    """Each protocol's stream, as the producer process wrote it to a pipe."""
    return {p: produce(p, "pipe") for p in PROTOCOLS}  # type: ignore[misc]


def decode_in_splits(data: bytes, rng: random.Random, **options: Any) -> list[Any]:
    decoder = PickleDecoder(**options)
    out: list[Any] = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 1, 2, 3, 8, 50, 1000, 100_000))
        decoder.feed(data[i : i + n])
        i += n
        out.extend(decoder)
    decoder.feed_eof()
    return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_producer_process_stream_in_random_splits(streams: dict[int, bytes], protocol: int) -> None:
    data = streams[protocol]
    assert data.endswith(b"TRAILER")
    body = data[: -len(b"TRAILER")]
    for seed in range(3):
        out = decode_in_splits(body, random.Random(seed))
        assert len(out) == len(catalog())
        for got, want in zip(out, catalog(), strict=True):
            assert same(got, want), (protocol, want)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_byte_at_a_time_and_trusted(streams: dict[int, bytes], protocol: int) -> None:
    body = streams[protocol][: -len(b"TRAILER")]
    decoder = PickleDecoder(trusted=True)
    out = []
    for i in range(len(body)):
        decoder.feed(body[i : i + 1])
        out.extend(decoder)
    file = io.BytesIO(body)
    expected = [pickle.load(file) for _ in catalog()]  # trusted: what pickle.load makes
    assert len(out) == len(expected) and all(same(g, w) for g, w in zip(out, expected, strict=True))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_get_buffer_never_reaches_into_the_next_pickle(streams: dict[int, bytes], protocol: int) -> None:
    file = io.BytesIO(streams[protocol])
    decoder = PickleDecoder()
    for want in catalog():
        while not decoder.pending:
            target = decoder.get_buffer()
            decoder.buffer_updated(file.readinto(target))  # fills the whole view each time
        assert same(next(decoder), want)
    assert file.read() == b"TRAILER"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_load_pickle_from_a_producer_over_tcp(protocol: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        proc = produce(protocol, f"tcp:{server.getsockname()[1]}")
        assert isinstance(proc, subprocess.Popen)
        with proc:  # waited for even when an assertion fails, so no process outlives the test
            try:
                conn, _ = server.accept()
                with conn:
                    for want in catalog():
                        assert same(streampickle.sync.load_pickle(conn), want)
                    rest = b""
                    while chunk := conn.recv(100):
                        rest += chunk
                assert rest == b"TRAILER"  # nothing after each pickle was read
                assert proc.wait(timeout=60) == 0
            finally:
                proc.kill()


@pytest.mark.parametrize("buffering", [0, -1])  # a raw pipe (exact reads), a buffered one (peek)
def test_sync_load_pickle_on_a_pipe_and_a_file(tmp_path: Path, buffering: int) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as w:
        pickle.dump({"a": np.arange(3)}, w, protocol=0)
        pickle.dump([1, 2], w, protocol=5)
        pickle.dump("x" * 20_000, w, protocol=1)
        w.write(b"rest")
    with os.fdopen(read_end, "rb", buffering=buffering) as r:
        assert isinstance(r, io.BufferedReader) == (buffering != 0)
        assert same(streampickle.sync.load_pickle(r), {"a": np.arange(3)})
        assert streampickle.sync.load_pickle(r) == [1, 2]
        assert streampickle.sync.load_pickle(r) == "x" * 20_000
        assert r.read() == b"rest"
    path = tmp_path / "stream.pkl"
    with path.open("wb") as f:
        pickle.dump("one", f, protocol=2)
    with path.open("rb") as f:
        assert streampickle.sync.load_pickle(f) == "one"
        with pytest.raises(EOFError):
            streampickle.sync.load_pickle(f)
    path.write_bytes(pickle.dumps(list(range(100)), protocol=1)[:-5])
    with path.open("rb") as f, pytest.raises(IncompleteMessageError):
        streampickle.sync.load_pickle(f)


def test_sync_load_pickle_peeks_on_a_socket_and_takes_only_the_pickle() -> None:
    a, b = socket.socketpair()
    with a, b:
        stream = (pickle.dumps({"k": [1.5, "v"]}, protocol=0) + pickle.dumps(np.arange(3), protocol=2)
                  + b"\xffnot a pickle")
        a.sendall(stream)
        a.shutdown(socket.SHUT_WR)
        assert streampickle.sync.load_pickle(b) == {"k": [1.5, "v"]}
        assert same(streampickle.sync.load_pickle(b), np.arange(3))
        assert b.recv(100) == b"\xffnot a pickle"
        with pytest.raises(EOFError):
            streampickle.sync.load_pickle(b)


def test_async_load_pickle_leaves_what_follows() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(pickle.dumps(np.arange(4.0), protocol=4) + pickle.dumps({"k": (1,)}, protocol=0)
                                 + b"after")
                    conn.shutdown(socket.SHUT_WR)
                    assert same(await streampickle.load_pickle(stream), np.arange(4.0))
                    assert await streampickle.load_pickle(stream) == {"k": (1,)}
                    assert await stream.receive() == b"after"
                    with pytest.raises(EOFError):
                        await streampickle.load_pickle(stream)

    anyio.run(main)


LINES = [pickle.dumps([i / 3 for i in range(200)], protocol=0), pickle.dumps({"k": ("v", 10**30)}, protocol=1),
         pickle.dumps(np.arange(3.0), protocol=0)]


def test_async_load_pickle_on_an_asyncio_stream_reader_reads_lines_whole() -> None:
    import asyncio

    calls = 0

    def counted(method: Any) -> Any:
        async def call(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            return await method(*args)
        return call

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.getsockname()[1])
            conn, _ = server.accept()
            with conn:
                for name in ("read", "readuntil", "readexactly"):
                    setattr(reader, name, counted(getattr(reader, name)))
                conn.sendall(b"".join(LINES) + b"after")
                conn.shutdown(socket.SHUT_WR)
                got = [await streampickle.load_pickle(reader) for _ in LINES]
                assert got[:2] == [pickle.loads(LINES[0]), pickle.loads(LINES[1])]
                assert same(got[2], np.arange(3.0))
                assert await reader.read() == b"after"  # nothing beyond the pickles was taken
                with pytest.raises(EOFError):
                    await streampickle.load_pickle(reader)
            writer.close()
        # an opcode byte, then its line in one call: not a read per byte of each line
        assert calls <= sum(map(len, LINES)) // 4, calls

    asyncio.run(main())


class _Counted(anyio.abc.ByteReceiveStream):
    """A byte stream that counts the receives and bytes of the one it wraps."""

    def __init__(self, inner: Any, notify_at: int = 0) -> None:
        self.inner = inner
        self.calls = 0
        self.received = 0
        self.notify_at = notify_at
        self.reached = anyio.Event()  # set once notify_at bytes were received

    async def receive(self, max_bytes: int = 65536) -> bytes:
        self.calls += 1
        data: bytes = await self.inner.receive(max_bytes)
        self.received += len(data)
        if self.notify_at and self.received >= self.notify_at:
            self.reached.set()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_async_load_pickle_on_a_buffered_anyio_stream_reads_lines_whole() -> None:
    from anyio.streams.buffered import BufferedByteReceiveStream

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            async with await anyio.connect_tcp("127.0.0.1", server.getsockname()[1]) as tcp:
                conn, _ = server.accept()
                with conn:
                    counted = _Counted(tcp)
                    stream = BufferedByteReceiveStream(counted)
                    conn.sendall(b"".join(LINES) + b"after")
                    conn.shutdown(socket.SHUT_WR)
                    for data in LINES:
                        assert same(await streampickle.load_pickle(stream), pickle.loads(data))
                    assert await stream.receive() == b"after"  # kept in the stream's own buffer
                    with pytest.raises(EOFError):
                        await streampickle.load_pickle(stream)
        assert counted.calls <= 20, counted.calls  # a read per byte of each line was thousands

    anyio.run(main)


def test_async_load_pickle_at_an_end_inside_a_line() -> None:
    import asyncio

    from anyio.streams.buffered import BufferedByteReceiveStream

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"(I12")
        reader.feed_eof()
        with pytest.raises(IncompleteMessageError):
            await streampickle.load_pickle(reader)
        send, receive = anyio.create_memory_object_stream[bytes](4)
        with send, receive:
            await send.send(b"(I12")
            send.close()
            with pytest.raises(IncompleteMessageError):
                await streampickle.load_pickle(BufferedByteReceiveStream(receive))

    asyncio.run(main())


def test_a_cancelled_async_load_pickle_loses_nothing() -> None:
    data = pickle.dumps({"k": list(range(100)), "a": np.arange(5)}, protocol=0)

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            async with await anyio.connect_tcp("127.0.0.1", server.getsockname()[1]) as tcp:
                conn, _ = server.accept()
                with conn:
                    stream = _Counted(tcp, notify_at=len(data) // 2)
                    conn.sendall(data[: len(data) // 2])
                    async with anyio.create_task_group() as group:
                        group.start_soon(streampickle.load_pickle, stream)
                        await stream.reached.wait()  # the load took the half...
                        await anyio.wait_all_tasks_blocked()  # ... and waits for more
                        group.cancel_scope.cancel()
                    conn.sendall(data[len(data) // 2 :] + b"after")
                    assert same(await streampickle.load_pickle(stream), pickle.loads(data))
                    assert await stream.receive() == b"after"

    anyio.run(main)


def test_async_load_pickle_refuses_what_is_no_stream() -> None:
    with pytest.raises(streampickle.UsageError, match="StreamReader"):
        anyio.run(streampickle.load_pickle, b"not a stream")


def test_a_forbidden_global_runs_nothing_and_the_next_pickle_decodes(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    for protocol in PROTOCOLS:
        decoder = PickleDecoder()
        decoder.feed(pickle.dumps(Hostile(), protocol=protocol) + pickle.dumps("next", protocol=protocol))
        with pytest.raises(ForbiddenGlobalError):
            next(decoder)
        assert next(decoder) == "next"
    assert not marker.exists()
    hand_written = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # protocol 0, GLOBAL
    with pytest.raises(ForbiddenGlobalError):
        next(iter(_fed(hand_written)))
    assert not marker.exists()


def _fed(data: bytes, **options: Any) -> PickleDecoder:
    decoder = PickleDecoder(**options)
    decoder.feed(data)
    return decoder


def test_object_arrays_and_unknown_classes_are_refused_unless_trusted() -> None:
    for protocol in PROTOCOLS:
        objects = np.array([1, "a"], dtype=object)
        data = pickle.dumps(objects, protocol=protocol)
        with pytest.raises(StreamPickleError):
            next(_fed(data))
        assert next(_fed(data, trusted=True)).tolist() == [1, "a"]


class _FakeArray:
    """Pickles as numpy's own reducer would, with the parts given."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> Any:
        return (np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (0,), b"b"), self.state)


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("state", [
    (1, (5,), np.dtype("f8"), False, b"\0" * 8),  # a shape that lies about the data
    (1, (1,), np.dtype("f8"), False, "not bytes"),
    (1, (2,), np.dtype("U1"), False, b"\xff\xff\xff\xff" * 2),  # code points beyond U+10FFFF
    (2, (1,), np.dtype("f8"), False, b"\0" * 8),
    (1, (-1,), np.dtype("f8"), False, b""),
])
def test_lying_array_states_are_refused(protocol: int, state: tuple[Any, ...]) -> None:
    with pytest.raises(MalformedPickleError):
        next(_fed(pickle.dumps(_FakeArray(state), protocol=protocol)))
    good = _FakeArray((1, (1,), np.dtype("f8"), False, b"\0" * 8))
    assert same(next(_fed(pickle.dumps(good, protocol=protocol))), np.zeros(1))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_every_flipped_bit_of_a_dtype_pickle_is_refused_or_loads_cleanly(protocol: int) -> None:
    dtypes = [np.dtype("<U5"), np.dtype([("a", "<i4"), ("b", ">f8", (2,))]), np.dtype("M8[ms]")]
    for dt in dtypes:
        data = pickle.dumps(dt, protocol=protocol)
        for i in range(len(data)):
            for bit in range(8):
                flipped = bytearray(data)
                flipped[i] ^= 1 << bit
                try:
                    got = list(_fed(bytes(flipped)))
                except StreamPickleError:
                    continue
                for obj in got:  # what loads is a plain value: a flipped literal
                    assert not isinstance(obj, streampickle._rebuild.Pending)
                    if isinstance(obj, np.dtype):
                        assert obj.__reduce__()[0] is np.dtype and not obj.hasobject


def test_huge_declared_lengths_are_refused_before_buffering() -> None:
    frame = b"\x80\x04\x95" + (1 << 62).to_bytes(8, "little")
    with pytest.raises(LimitExceededError):
        _fed(frame)
    binbytes8 = b"\x80\x05\x8e" + (1 << 40).to_bytes(8, "little")
    decoder = PickleDecoder()
    with pytest.raises(LimitExceededError):
        decoder.feed(binbytes8)
    with pytest.raises(LimitExceededError):  # the failure sticks
        decoder.feed(b"N.")


def test_one_feed_of_many_tiny_pickles_holds_about_the_bytes_fed() -> None:
    # A red-team find: 20 MiB of b"N." in one feed held a bytes object per pickle (RSS +585 MiB).
    # The decoder keeps one buffer and cuts a pickle only when iteration asks for it.
    count = 1 << 16
    data = b"N." * count
    decoder = PickleDecoder()
    tracemalloc.start()
    try:
        decoder.feed(data)
        after_feed = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert after_feed <= 2 * len(data) + (64 << 10)  # before: about 45 bytes per pickle
    assert decoder.pending == count
    held = 0
    for i, obj in enumerate(decoder):
        assert obj is None
        if i % 1024 == 0:
            held = max(held, sys.getsizeof(decoder._buf))
    assert held <= 2 * len(data) + (64 << 10)
    assert decoder.pending == 0 and not decoder.in_pickle and len(decoder._buf) == 0
    # work: each pickle is walked twice (once as fed, once when cut), a few loop turns each
    assert decoder._steps <= 4 * len(data)


def test_the_stream_walk_does_bounded_work_per_byte() -> None:
    # A protocol-0 line argument fed a byte at a time is searched once, not from its start at
    # every feed; frames and literals are sized once their prefix is in.
    shapes = [
        b"V" + b"a" * 50_000 + b"\n.",
        pickle.dumps([b"x" * 100] * 500 + list(range(2000)), protocol=4),  # frames
        b"(" + b"I1\n" * 10_000 + b"l.",
    ]
    for data in shapes:
        decoder = PickleDecoder()
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
        assert decoder.pending == 1
        next(decoder)
        assert decoder._steps <= 3 * len(data), (len(data), decoder._steps)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_buffer_is_compacted_while_a_pickle_is_half_fed(protocol: int) -> None:
    one = pickle.dumps({"k": list(range(50)), "s": "x" * 100}, protocol=protocol)
    data = one * (3 * (1 << 16) // len(one) + 3)
    decoder = PickleDecoder()
    got = 0
    for i in range(0, len(data), 5003):  # splits that fall inside pickles, iterated between
        decoder.feed(data[i : i + 5003])
        for obj in decoder:
            assert obj == pickle.loads(one)
            got += 1
        assert len(decoder._buf) <= 2 * (len(decoder._buf) - decoder._head) + (64 << 10)
    decoder.feed_eof()
    assert got == len(data) // len(one)


def test_limits_bound_each_pickle() -> None:
    limits = Limits(max_pickle_size=1000)
    small = pickle.dumps(b"x" * 900, protocol=3)
    assert list(_fed(small * 3, limits=limits)) == [b"x" * 900] * 3
    with pytest.raises(LimitExceededError):
        _fed(pickle.dumps(b"x" * 2000, protocol=3), limits=limits)
    line = b"V" + b"a" * 2000  # protocol 0: a line argument with no end in sight
    decoder = PickleDecoder(limits=limits)
    with pytest.raises(LimitExceededError):
        for i in range(0, len(line), 7):
            decoder.feed(line[i : i + 7])


def test_framing_errors_and_an_end_inside_a_pickle() -> None:
    decoder = PickleDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(pickle.dumps(1, protocol=2) + b"\xff")
    assert decoder.failed and next(decoder) == 1  # what was complete before still decodes
    with pytest.raises(ProtocolError):
        next(decoder)
    decoder = _fed(pickle.dumps([1, 2, 3], protocol=4)[:-3])
    with pytest.raises(IncompleteMessageError):
        decoder.feed_eof()


def test_malformed_pickles_are_dropped_whole() -> None:
    bad = [
        b"\x80\x02]q\x00(K\x01K\x02e0.",  # APPENDS then POP: STOP with an empty stack
        b"I99999999999999999999999999999999999999999999999999x\n.",  # INT that is no number
        b"\x80\x02h\x05.",  # BINGET of a slot never defined
        b"\x80\x02\x82\x01.",  # EXT1
        b"\x80\x02K\x01K\x02b.",  # BUILD on an int
    ]
    for data in bad:
        decoder = _fed(data + pickle.dumps("ok", protocol=2))
        with pytest.raises(MalformedPickleError):
            next(decoder)
        assert next(decoder) == "ok"


def test_persistent_ids_need_persistent_load() -> None:
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return "ref" if obj == "REPLACE" else None

    for protocol in PROTOCOLS:
        buf = io.BytesIO()
        Pickler(buf, protocol=protocol).dump(["REPLACE", 1])
        with pytest.raises(MalformedPickleError):
            next(_fed(buf.getvalue()))
        assert next(_fed(buf.getvalue(), persistent_load=lambda pid: f"<{pid}>")) == ["<ref>", 1]


def test_allowed_classes_load_through_the_allowlist() -> None:
    from fractions import Fraction

    for protocol in PROTOCOLS:
        data = pickle.dumps(Fraction(1, 3), protocol=protocol)
        with pytest.raises(ForbiddenGlobalError):
            next(_fed(data))
        assert next(_fed(data, allow=["fractions.Fraction"])) == Fraction(1, 3)


DTYPE_CALL = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f8\x89\x88\x87R"  # numpy.dtype("f8", False, True)
DTYPE_STATE = b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"


def test_a_pending_numpy_value_is_built_exactly_once_in_its_one_place() -> None:
    assert next(_fed(DTYPE_CALL + DTYPE_STATE + b"b.")) == np.dtype("<f8")
    assert next(_fed(DTYPE_CALL + b"q\x00" + DTYPE_STATE + b"b0h\x00.")) == np.dtype("<f8")  # memo, after BUILD
    misuses = [
        DTYPE_CALL + b".",  # never built
        b"\x80\x02]" + DTYPE_CALL[2:] + b"a.",  # put in a list, never built
        DTYPE_CALL + b"2" + DTYPE_STATE + b"b\x86.",  # DUP: two places for one pending value
        DTYPE_CALL + b"q\x00h\x00" + DTYPE_STATE + b"b\x86.",  # fetched from the memo before its BUILD
        DTYPE_CALL + DTYPE_STATE + b"b" + DTYPE_STATE + b"b.",  # built twice
        DTYPE_CALL + b"K\x01b.",  # a state that is no tuple
    ]
    for data in misuses:
        with pytest.raises(MalformedPickleError):
            next(_fed(data))


def _standard_loader(**options: Any) -> Any:
    return streampickle._safe.Loader(**options)


def test_a_pending_value_is_refused_by_the_verifier_before_anything_runs() -> None:
    # Each misuse is refused by the walk, before the unpickler (and any hook) runs.
    loader = _standard_loader(persistent_load=lambda pid: pid)
    misuses = [
        DTYPE_CALL + b".",  # the result
        b"\x80\x02]" + DTYPE_CALL[2:] + b"a.",  # APPEND
        DTYPE_CALL + b"\x85.",  # TUPLE1
        DTYPE_CALL + b"2" + DTYPE_STATE + b"b\x86.",  # DUP
        DTYPE_CALL + b"q\x00h\x00" + DTYPE_STATE + b"b\x86.",  # BINGET before its BUILD
        DTYPE_CALL + b"0N.",  # popped: never built
        DTYPE_CALL + b"Q.",  # a persistent id
        b"\x80\x02K\x01" + DTYPE_CALL[2:] + b"b0.",  # the state of another BUILD
    ]
    for data in misuses:
        with pytest.raises(streampickle._verify.Refused):
            streampickle._verify.verify_standard(data, loader.resolve_standard, 100, persistent=True)


def test_persistent_load_never_sees_an_internal_value() -> None:
    # A red-team find: persistent_load was called with the decoder's pending numpy value (and
    # with a reconstructor the pickle named without calling it) before the pickle was refused.
    seen: list[Any] = []

    def hook(pid: Any) -> Any:
        seen.append(pid)
        return "made"

    rebuilder = b"\x8c\x15streampickle._rebuild\x8c\x07ndarray\x93"
    hostile = [
        DTYPE_CALL + b"Q.",  # BINPERSID of a pending dtype
        DTYPE_CALL + b"\x85Q.",  # ... inside a tuple
        b"\x80\x02]" + DTYPE_CALL[2:] + b"aQ.",  # ... inside a list
        b"\x80\x05" + rebuilder + b"Q.",  # a reconstructor, named and not called
        b"\x80\x05" + rebuilder + b"\x85\x85Q.",  # ... two tuples deep
        b"\x80\x05]" + rebuilder + b"aQ.",  # ... in a list
        b"\x80\x05}\x8c\x01k" + rebuilder + b"sQ.",  # ... as a dict's value
        b"\x80\x05\x8f(" + rebuilder + b"\x85\x90Q.",  # ... in a tuple in a set
    ]
    for data in hostile:
        decoder = _fed(data + pickle.dumps("next", protocol=2), persistent_load=hook)
        with pytest.raises(MalformedPickleError):
            next(decoder)
        assert seen == [], data
        assert next(decoder) == "next"
    assert next(_fed(b"\x80\x05\x8c\x01x\x85Q.", persistent_load=hook)) == "made"  # a plain id still works
    assert seen == [("x",)]


class Plain:
    """A plain class: protocols 0-1 pickle its instances with copyreg._reconstructor."""

    def __eq__(self, other: object) -> bool:
        return type(other) is Plain and vars(other) == vars(self)


class NotPlain(int):
    pass


def not_a_class() -> None:
    pass


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bytearrays_load_in_safe_mode(protocol: int) -> None:
    # protocols 0-2: bytearray(_codecs.encode(text, "latin1")); 3-4: bytearray(bytes); 5: BYTEARRAY8
    for value in (bytearray(b"\x00ba\xff\n" * 100), bytearray(), [bytearray(b"x")] * 2, {"k": bytearray(b"v")}):
        got = next(_fed(pickle.dumps(value, protocol=protocol)))
        assert got == value and type(got) is type(value)
        if type(value) is list:
            assert type(got[0]) is bytearray and got[0] is got[1]


def test_a_bytearray_is_made_from_bytes_only() -> None:
    hostile = [
        b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.",  # bytearray(2**30): a size
        b"\x80\x02c__builtin__\nbytearray\nX\x01\x00\x00\x00a\x85R.",  # a str without encoding
        b"\x80\x02c__builtin__\nbytearray\nC\x01aC\x01a\x86R.",  # two arguments
        b"\x80\x02c__builtin__\nbytearray\n]\x85R.",  # an iterable
    ]
    for data in hostile:
        with pytest.raises(MalformedPickleError):
            next(_fed(data))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_copyreg_reconstructor_builds_only_allowed_classes(protocol: int) -> None:
    obj = Plain()
    obj.x = [1, "two"]  # type: ignore[attr-defined]
    data = pickle.dumps(obj, protocol=protocol)
    if protocol < 2:
        assert b"copy_reg\n_reconstructor" in data
    assert next(_fed(data, allow=[Plain])) == obj
    with pytest.raises(ForbiddenGlobalError, match=r"test_pickle_stream\.Plain"):
        next(_fed(data))


def test_copyreg_reconstructor_refuses_other_uses() -> None:
    def call(cls: bytes, base: bytes, state: bytes = b"N") -> bytes:
        return b"ccopy_reg\n_reconstructor\n(" + cls + base + state + b"tR."

    plain = b"ctest_pickle_stream\nPlain\n"
    obj = b"c__builtin__\nobject\n"
    allow = [Plain, NotPlain, not_a_class]
    assert type(next(_fed(call(plain, obj), allow=allow))) is Plain
    refused: list[tuple[bytes, type[StreamPickleError], str]] = [
        (call(plain, b"ctest_pickle_stream\nNotPlain\n"), MalformedPickleError, "only object"),  # another base
        (call(plain, obj, b"K\x01"), MalformedPickleError, "argument 2"),  # a state for the base
        (call(b"ctest_pickle_stream\nnot_a_class\n", obj), ForbiddenGlobalError, "not_a_class"),
        (call(obj, obj), ForbiddenGlobalError, "object"),  # object itself
        (call(b"cnumpy\nndarray\n", obj), ForbiddenGlobalError, "numpy.ndarray"),
        (call(b"ctest_pickle_stream\nUnknown\n", obj), ForbiddenGlobalError, "Unknown"),  # not allowed
        (b"c__builtin__\nobject\n)R.", MalformedPickleError, "only an argument"),  # object() called
    ]
    for data, error, words in refused:
        with pytest.raises(error, match=words):
            next(_fed(data, allow=allow))
    with pytest.raises(MalformedPickleError):  # a class object.__new__ can't make
        next(_fed(call(b"ctest_pickle_stream\nNotPlain\n", obj), allow=allow))


def _shared_array_data(size: int, repeats: int) -> bytes:
    """A protocol-4 list of ``repeats`` arrays that all take one ``size``-byte bytes literal
    from the memo: 8 bytes per extra array."""
    dtype = (b"cnumpy\ndtype\nX\x02\x00\x00\x00u1\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNN"
             b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    state = (b"(K\x01J" + size.to_bytes(4, "little") + b"\x85" + dtype + b"\x89B" + size.to_bytes(4, "little")
             + bytes(size) + b"t\x94")  # memo 3
    first = b"cnumpy._core.multiarray\n_reconstruct\n\x94cnumpy\nndarray\n\x94K\x00\x85C\x01b\x87\x94R" + state + b"b"
    return b"\x80\x04](" + first + b"h\x00h\x02Rh\x03b" * (repeats - 1) + b"e."


def test_data_shared_through_the_memo_is_not_copied_again_and_again() -> None:
    # A red-team style find: an array's state taken from the memo is copied into a new array
    # by every BUILD, so a 1 MiB pickle with 8 bytes per extra array made a GiB of arrays.
    assert len(next(_fed(_shared_array_data(1 << 10, 2)))) == 2  # a little sharing is charged, not refused
    with pytest.raises(MalformedPickleError, match="shares through its memo"):
        next(_fed(_shared_array_data(1 << 18, 8)))
    hostile = [  # bytearray, _codecs.encode and numpy scalars copy their data too
        b"\x80\x04](c__builtin__\nbytearray\n\x94B" + (1 << 18).to_bytes(4, "little") + bytes(1 << 18)
        + b"\x94\x85\x94R" + b"h\x00h\x02R" * 8 + b"e.",
        b"\x80\x04](c_codecs\nencode\n\x94X" + (1 << 18).to_bytes(4, "little") + b"a" * (1 << 18)
        + b"X\x06\x00\x00\x00latin1\x86\x94R" + b"h\x00h\x01R" * 8 + b"e.",
    ]
    for data in hostile:
        with pytest.raises(MalformedPickleError, match="shares through its memo"):
            next(_fed(data))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_real_pickles_of_many_arrays_and_repeated_bytes_are_not_charged(protocol: int) -> None:
    value = [np.arange(1000, dtype=np.int64) + i for i in range(50)] + [b"a", bytes([97]), b"a" * 5000, b"b" * 5000]
    got = next(_fed(pickle.dumps(value, protocol=protocol)))
    assert all(same(g, w) for g, w in zip(got, value, strict=True))


def test_a_refused_global_names_its_opcode() -> None:
    with pytest.raises(ForbiddenGlobalError, match=r"GLOBAL at byte 2\)"):
        next(_fed(b"\x80\x02cos\nsystem\n."))
    with pytest.raises(ForbiddenGlobalError, match="STACK_GLOBAL"):
        next(_fed(pickle.dumps(os.system, protocol=4)))


class _FakeScalar:
    """Pickles as numpy's scalar reducer would, with the parts given."""

    def __init__(self, dt: Any, data: Any) -> None:
        self.dt, self.data = dt, data

    def __reduce__(self) -> Any:
        return (np.float64(0).__reduce__()[0], (self.dt, self.data))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_scalars_are_built_from_checked_parts(protocol: int) -> None:
    assert next(_fed(pickle.dumps(_FakeScalar(np.dtype("f8"), b"\0" * 8), protocol=protocol))) == 0.0
    for dt, data in [(np.dtype("f8"), b"\0" * 7), (np.dtype("U1"), b"\xff" * 4), (np.dtype("O"), b"\0" * 8),
                     (np.dtype("f8"), "not bytes")]:
        with pytest.raises(MalformedPickleError):
            next(_fed(pickle.dumps(_FakeScalar(dt, data), protocol=protocol)))


def _load_one(data: bytes) -> Any:
    decoder = streampickle.PickleDecoder()
    decoder.feed(data)
    return next(decoder)


@pytest.mark.parametrize("pickled", [b"\x80\x02Nr\x00\x00\x00\x10.", b"Np268435456\n.", b"\x80\x02Nq\x05."])
def test_a_sparse_memo_slot_is_refused(pickled: bytes) -> None:
    """pickle numbers memo slots densely; a sparse one would make the C unpickler's memo
    array gigabytes long (a 9-byte pickle asking for 2**28 slots)."""
    with pytest.raises(streampickle.MalformedPickleError, match="skips slots"):
        _load_one(pickled)
    assert _load_one(b"\x80\x02Nq\x00h\x00\x86q\x01.") == (None, None)  # dense slots load


_P61 = (1 << 61) - 1  # ints k * (2**61 - 1) all hash to 0


@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_sets_as_old_protocols_write_them_load(protocol: int) -> None:
    """Protocols 0-3 write a set as set(list) and a frozenset as frozenset(list)."""
    value = {(1, (2.5, "x")), "s", b"b", 2**70, -3, None, frozenset({(4, 5), 6})}
    assert _load_one(pickle.dumps(value, protocol=protocol)) == value
    eight = {k * _P61 for k in range(1, 9)}  # equal hashes, as many as a dict's keys may have
    assert _load_one(pickle.dumps(eight, protocol=protocol)) == eight


@pytest.mark.parametrize("levels", [30, 60])
@pytest.mark.parametrize("head", [b"\x80\x02c__builtin__\nset\n]", b"c__builtin__\nfrozenset\n(l"],
                         ids=["protocol-2-set", "protocol-0-frozenset"])
def test_a_set_of_one_tuple_shared_at_every_level_is_refused(head: bytes, levels: int) -> None:
    """t = (t', t') costs two bytes a level (DUP, TUPLE2) and hashing it visits 2**levels
    tuples: 145 bytes hung the loader in set(list). The list's items are charged as set
    items, as a framed pickle's ADDITEMS are."""
    data = head + b"N" + b"2\x86" * levels + b"a\x85R."
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        _load_one(data)


@pytest.mark.parametrize("protocol", [0, 2])
def test_a_set_of_ints_with_equal_hashes_is_a_hash_flood(protocol: int) -> None:
    flood = {k * _P61 for k in range(1, 2000)}  # quadratic to insert: seconds at 16,000
    with pytest.raises(MalformedPickleError, match="hash flood"):
        _load_one(pickle.dumps(flood, protocol=protocol))


def test_a_list_passed_to_set_again_and_again_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One memoized list of (i,) tuples passed to set() many times: each call is charged its
    items' hashing, but each item is checked (and its hash recorded) once, not once a call
    (that was 8 times the CPU bound and more than the memory bound per byte)."""
    from streampickle import _verify

    checked = []
    key = _verify._key

    def counting(*args: Any) -> Any:
        checked.append(args[0])
        return key(*args)

    monkeypatch.setattr(_verify, "_key", counting)
    items, calls = 200, 3
    data = (b"\x80\x02c__builtin__\nset\nq\x00](" + b"".join(b"J" + i.to_bytes(4, "little") + b"\x85"
                                                           for i in range(items))
            + b"e\x85q\x0100(" + b"h\x00h\x01R" * calls + b"l.")  # memo: 0 set, 1 (list,)
    got = _load_one(data)
    assert len(got) == calls and all(s == {(i,) for i in range(items)} for s in got)
    assert len(checked) == items


def test_a_set_counts_items_whose_hash_the_verifier_cannot_check() -> None:
    data = pickle.dumps({complex(k, 1) for k in range(10)}, protocol=2)
    assert len(_load_one(data)) == 10
    decoder = PickleDecoder(limits=Limits(max_opaque_keys=9))
    decoder.feed(data)
    with pytest.raises(MalformedPickleError, match="max_opaque_keys=9"):
        next(decoder)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("salt", ["a", "\u0101", b"a", b""], ids=["ascii", "ucs2", "bytes", "empty-bytes"])
def test_tuple_keys_colliding_beside_a_str_are_a_hash_flood_in_every_protocol(protocol: int, salt: Any) -> None:
    # (k * (2**61 - 1), "a") all hash alike; protocols 0 and 1 write the str as a text line,
    # and protocols 0-2 a bytes as _codecs.encode(text, "latin1") (or bytes() for b""), whose
    # hash the verifier takes from the text's
    p = 2**61 - 1
    assert len(_load_one(pickle.dumps({(k * p, salt): k for k in range(1, 9)}, protocol=protocol))) == 8
    with pytest.raises(MalformedPickleError, match="same hash"):
        _load_one(pickle.dumps({(k * p, salt): k for k in range(1, 10)}, protocol=protocol))
    honest = {(f"name{i}", i % 3, salt): i for i in range(1000)}
    assert _load_one(pickle.dumps(honest, protocol=protocol)) == honest


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_bytes_keys_of_protocols_0_to_2_are_not_opaque(protocol: int) -> None:
    # these protocols write bytes as a call; its hash is the latin-1 text's, so more than
    # max_opaque_keys of them load
    keys = {f"k{i}".encode(): i for i in range(1000)} | {(b"t", i): i for i in range(1000)} | {b"": -1}
    assert _load_one(pickle.dumps(keys, protocol=protocol)) == keys


def test_a_set_of_an_unhashable_item_is_refused_before_it_is_built() -> None:
    with pytest.raises(MalformedPickleError, match="can't be a dict key or set item"):
        _load_one(b"\x80\x02c__builtin__\nset\n]]a\x85R.")


def _shared_dtype(levels: int, fields: int) -> np.dtype[Any]:
    """A structured dtype whose every level uses the level below ``fields`` times."""
    dt: np.dtype[Any] = np.dtype("i1")
    for _ in range(levels):
        names = [f"f{i}" for i in range(fields)]
        dt = np.dtype({"names": names, "formats": [dt] * fields,
                       "offsets": [i * dt.itemsize for i in range(fields)], "itemsize": fields * dt.itemsize})
    return dt


@pytest.mark.parametrize("levels, fields", [(21, 2), (7, 4), (12, 1)], ids=["deep-shared", "wide-shared", "deep"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_dtypes_too_deep_or_too_large_when_expanded_are_refused(levels: int, fields: int, protocol: int) -> None:
    """A pickle can reuse one dtype as many fields through its memo: 1.6 KB that numpy and
    descr_of would walk as two million fields, or a chain deep enough to overflow numpy's C
    stack. Counted as streampickle's own descriptors are (every use of a shared one), they
    are refused when the dtype is built, as an array's dtype, a dict key or on its own."""
    dt = _shared_dtype(levels, fields)
    for obj in (np.zeros((0,), dtype=dt), dt):
        with pytest.raises(streampickle.MalformedPickleError, match="nested more than"):
            _load_one(pickle.dumps(obj, protocol=protocol))
    as_key = b"\x80\x02}" + pickle.dumps(dt, 2)[2:-1] + b"Ns."
    with pytest.raises(streampickle.MalformedPickleError, match="nested more than"):
        _load_one(as_key)
    fine = _shared_dtype(3, 2)  # 15 nodes, 3 deep
    got = _load_one(pickle.dumps(np.zeros(2, dtype=fine), protocol=protocol))
    assert got.dtype == fine and got.shape == (2,)


@pytest.mark.parametrize("data", [
    pytest.param(b"\x80\x02cnumpy\nndarray\nq\x00.", id="numpys-marker"),
    pytest.param(b"\x80\x02cnumpy\nndarray\n\x85.", id="the-marker-in-a-tuple"),
    pytest.param(b"\x80\x02]cnumpy\nndarray\na.", id="the-marker-in-a-list"),
    pytest.param(b"\x80\x02cbuiltins\nobject\n.", id="the-object-marker"),
    pytest.param(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n.", id="a-reconstructor"),
    pytest.param(b"(cnumpy\nndarray\nl.", id="protocol-0-list"),
    pytest.param(b"(S'k'\ncnumpy\nndarray\nd.", id="protocol-0-dict"),
])
def test_a_standard_pickle_never_hands_over_a_reconstructor_or_marker(data: bytes) -> None:
    # numpy.ndarray and object are markers a standard pickle passes to numpy's _reconstruct and
    # copyreg's _reconstructor; as values they would be the loader's own objects.
    with pytest.raises(MalformedPickleError, match="named and not called"):
        next(_fed(data))
    array = np.arange(5.0)
    for protocol in range(0, 6):
        assert next(_fed(pickle.dumps([array, array], protocol=protocol)))[1].tolist() == array.tolist()


# -- dtypes shared by many numpy values ---------------------------------------------------------

_FIELDS_60 = np.dtype([(f"f{i}", "<f8") for i in range(60)])
_FIELDS_60x60 = np.dtype([(f"g{i}", _FIELDS_60) for i in range(60)])  # 3,661 nodes


def _get(slot: int) -> bytes:
    return b"h" + bytes([slot]) if slot < 256 else b"j" + slot.to_bytes(4, "little")


def _dtype_opcodes(dt: np.dtype[Any]) -> tuple[bytes, int]:
    """``dt`` pickled (protocol 4) without its PROTO, FRAME and STOP, and the memo slots it
    takes (the next one is free)."""
    dumped = pickle.dumps(dt, protocol=4)
    return dumped[11:-1], sum(op.name == "MEMOIZE" for op, _, _ in pickletools.genops(dumped))


def _arrays_sharing_a_dtype(times: int, dt: np.dtype[Any] = _FIELDS_60x60) -> bytes:
    """Hand-made: ``dt`` once, then ``times`` empty arrays whose state names it through the
    memo (numpy's _reconstruct and a BUILD each, 29 bytes an array)."""
    body, slot = _dtype_opcodes(dt)
    out = bytearray(b"\x80\x04" + body + b"\x94")
    dtype_slot, rc, nd, shape, code, state = range(slot, slot + 6)
    out += b"cnumpy.core.multiarray\n_reconstruct\n\x94cnumpy\nndarray\n\x94K\x00\x85\x94C\x01b\x94"
    out += b"(K\x01" + _get(shape) + _get(dtype_slot) + b"\x89C\x00t\x94" + b"0" * 6
    out += (_get(rc) + _get(nd) + _get(shape) + _get(code) + b"\x87R" + _get(state) + b"b0") * times
    return bytes(out + b"N.")


def _dtypes_from_one_state(times: int, dt: np.dtype[Any] = _FIELDS_60x60) -> bytes:
    """Hand-made: ``dt``'s state memoized, then ``times`` dtypes each completed by it."""
    body, slot = _dtype_opcodes(dt)
    assert body.endswith(b"b")
    out = bytearray(b"\x80\x04" + body[:-1] + b"\x94b0")  # the state -> slot; the first dtype built
    state, dtype_global, args = range(slot, slot + 3)
    descr = dt.__reduce__()[1][0].encode()
    out += b"cnumpy\ndtype\n\x94\x8c" + bytes([len(descr)]) + descr + b"\x89\x88\x87\x9400"
    out += (_get(dtype_global) + _get(args) + b"R" + _get(state) + b"b0") * times
    return bytes(out + b"N.")


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls = [0]
    real = getattr(_rebuild, name)

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(_rebuild, name, counted)
    return calls


def test_arrays_sharing_one_dtype_object_walk_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 400 arrays of one 60-field dtype, as pickle writes them: the dtype once, then a memo
    # reference from each array's state. Each array described and rebuilt it, 5-6 µs a node.
    walks = _count_calls(monkeypatch, "descr_of")
    _rebuild._CHECKED_DTYPES.clear()
    value = [np.zeros(2, dtype=_FIELDS_60) for _ in range(400)]
    got = _load_one(pickle.dumps(value, protocol=4))
    assert len(got) == 400 and all(g.dtype == _FIELDS_60 and g.shape == (2,) for g in got)
    assert walks[0] == 1 + len(_FIELDS_60.names or ())  # one walk: the dtype and each field's


def test_a_large_dtype_named_by_many_arrays_is_charged_its_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # 29 bytes an array, each once walking and rebuilding a 3,661-node dtype: 200 arrays in
    # 7.8 KB took 1.8 s of CPU (over 200 µs a byte). Charged its nodes before the first walk,
    # it is refused before any.
    walks = _count_calls(monkeypatch, "descr_of")
    _rebuild._CHECKED_DTYPES.clear()
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        _load_one(_arrays_sharing_a_dtype(200))
    assert walks[0] == 0
    assert _load_one(_arrays_sharing_a_dtype(200, _FIELDS_60)) is None  # a 61-node dtype: loads


def test_one_state_completing_many_dtypes_is_charged_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy.dtype(...) and a BUILD with one memoized state, 18 bytes a dtype, each walking the
    # 3,661 nodes its state's fields hold: 200 in 5.5 KB took 1.35 s of CPU.
    builds = _count_calls(monkeypatch, "_dtype_from_state")
    with pytest.raises(MalformedPickleError, match="out of proportion"):
        _load_one(_dtypes_from_one_state(200))
    assert builds[0] < 20


@pytest.mark.parametrize("data", [
    b"I0123\n.", b"(I0123\nc__builtin__\nbytes\n)Rt.", b"I-0\n.", b"(dI010\nI1\nsI8\nI2\ns.",
])
def test_an_int_line_with_a_leading_zero_is_refused(data: bytes) -> None:
    # pickle writes INT lines with %d. The C unpickler reads "I010" as octal 8 (strtol base
    # 0), pickle's Python unpickler refuses it, and the verifier read decimal 10: a dict it
    # proved to have two keys loaded with one. "I-0" loaded as False.
    with pytest.raises(MalformedPickleError, match="leading zero"):
        _load_one(data)


def test_int_lines_as_pickle_writes_them_load() -> None:
    assert _load_one(b"(I0\nI-5\nI00\nI01\nL7L\nt.") == (0, -5, False, True, 7)
