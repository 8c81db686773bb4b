"""Files of objects: ``sync.iter_load`` and ``streampickle.iter_load`` over real files written
with ``sync.dump`` (arrays of many dtypes, a 64 MiB one, many small messages, keys, empty and
truncated files, refused globals), a pipe and a socket, and the async one on every backend."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.file import FileReadStream

import streampickle
from _util import assert_same, sample_objects
from streampickle import sync

KEY = b"k" * 32


class Point:
    """A class a safe reader refuses until it is allowed."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


def _arrays() -> list[Any]:
    rng = np.random.default_rng(1)
    structured = np.zeros(4, dtype=[("a", "<i4"), ("b", "<f8", (2,))])
    structured["a"] = [1, 2, 3, 4]
    read_only = np.arange(7, dtype=np.int16)
    read_only.flags.writeable = False
    return [
        rng.random((64, 33)),
        np.arange(1000, dtype=np.int8),
        np.arange(12, dtype=">u4").reshape(3, 4),
        (rng.random(50) + 1j * rng.random(50)).astype(np.complex64),
        np.array([True, False, True]),
        np.array(["ab", "héllo"]),
        np.arange("2026-01-01", "2026-01-07", dtype="datetime64[D]"),
        np.asfortranarray(rng.random((5, 7))),
        np.array(3.5),
        np.empty((0, 3)),
        structured,
        read_only,
    ]


def _write(path: Path, objs: list[Any], **options: Any) -> Path:
    with open(path, "wb") as f:
        for obj in objs:
            sync.dump(obj, f, **options)
    return path


class _Recording:
    """A real binary file that records each read's target: where it is and how big."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.reads: list[tuple[int, int]] = []  # (address, length)

    def readinto(self, target: memoryview) -> int:
        self.reads.append((np.frombuffer(target, dtype=np.uint8).ctypes.data, len(target)))
        n: int = self.file.readinto(target)
        return n


def _objects_then_error(iterator: Any) -> tuple[list[Any], BaseException | None]:
    got: list[Any] = []
    try:
        for obj in iterator:
            got.append(obj)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return got, exc
    return got, None


# -- sync.iter_load ------------------------------------------------------------------------


def test_arrays_of_many_dtypes_round_trip_in_order(tmp_path: Path) -> None:
    objs = [*_arrays(), *sample_objects().values()]
    path = _write(tmp_path / "arrays.spk", objs)
    with open(path, "rb") as f:
        got = list(sync.iter_load(f))
    assert_same(objs, got)
    for array in got[: len(_arrays())]:
        if array.nbytes:
            assert array.ctypes.data % 64 == 0  # each array in aligned memory of its own


def test_a_64_mib_array_is_read_straight_into_its_memory(tmp_path: Path) -> None:
    big = np.arange(8 * 1024 * 1024, dtype=np.float64)  # 64 MiB
    path = _write(tmp_path / "big.spk", [{"before": 1}, big, "after"])
    with open(path, "rb") as f:
        recording = _Recording(f)
        first, loaded, last = sync.iter_load(recording)
    assert first == {"before": 1} and last == "after"
    assert loaded.dtype == big.dtype and np.array_equal(loaded, big) and loaded.flags.writeable
    # The array's bytes were read into the array's own memory, not into a buffer then copied.
    start, end = loaded.ctypes.data, loaded.ctypes.data + loaded.nbytes
    into_array = sum(n for address, n in recording.reads if start <= address and address + n <= end)
    assert into_array >= loaded.nbytes - 64 * 1024  # all but what the read-ahead took
    # and no read was larger than the file's largest part: the file is never read whole
    assert max(n for _, n in recording.reads) <= loaded.nbytes


def test_many_small_messages_take_few_reads(tmp_path: Path) -> None:
    objs = [{"i": i, "name": f"n{i}"} for i in range(20_000)]
    path = _write(tmp_path / "small.spk", objs)
    with open(path, "rb", buffering=0) as f:  # raw: every read is a system call
        recording = _Recording(f)
        got = list(sync.iter_load(recording))
    assert got == objs
    assert len(recording.reads) < len(objs) // 100  # read ahead: many messages per read


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.spk"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        assert list(sync.iter_load(f)) == []


@pytest.mark.parametrize("last", [np.arange(100_000, dtype=np.float32), {"small": 1}], ids=["array", "small"])
@pytest.mark.parametrize("cut", [1, 19, 21, -1])
def test_truncated_last_message_raises_after_the_complete_ones(tmp_path: Path, last: Any, cut: int) -> None:
    objs = [np.arange(10), {"a": 1}, "x" * 100_000]
    path = _write(tmp_path / "cut.spk", [*objs, last])
    whole = len(streampickle.dumps(last))
    cut_at = cut if cut > 0 else whole + cut  # bytes of the last message left in the file
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - whole + cut_at)
    with open(path, "rb") as f:
        got, exc = _objects_then_error(sync.iter_load(f))
    assert_same(objs, got)
    assert isinstance(exc, streampickle.IncompleteMessageError)
    assert exc.received == cut_at and exc.received < exc.expected


def test_a_refused_global_is_the_library_error_at_its_place(tmp_path: Path) -> None:
    path = _write(tmp_path / "globals.spk", [1, Point(2), 3])
    with open(path, "rb") as f:
        got, exc = _objects_then_error(sync.iter_load(f))
    assert got == [1]
    assert isinstance(exc, streampickle.ForbiddenGlobalError)
    with open(path, "rb") as f:
        assert list(sync.iter_load(f, allow=[Point])) == [1, Point(2), 3]
    with open(path, "rb") as f:
        assert list(sync.iter_load(f, trusted=True)) == [1, Point(2), 3]


def test_broken_bytes_raise_after_the_complete_messages(tmp_path: Path) -> None:
    path = _write(tmp_path / "junk.spk", [1, 2])
    with open(path, "ab") as f:
        f.write(b"GET / HTTP/1.1\r\n")
    with open(path, "rb") as f:
        got, exc = _objects_then_error(sync.iter_load(f))
    assert got == [1, 2] and isinstance(exc, streampickle.ProtocolError)


def test_keyed_file_of_dump_calls(tmp_path: Path) -> None:
    objs = [np.arange(5), {"k": "v"}, *_arrays()[:3]]
    path = _write(tmp_path / "keyed.spk", objs, key=KEY)
    with open(path, "rb") as f:
        assert_same(objs, list(sync.iter_load(f, key=KEY)))
    with open(path, "rb") as f:
        got, exc = _objects_then_error(sync.iter_load(f, key=b"x" * 32))
    assert got == [] and isinstance(exc, streampickle.AuthenticationError)
    with open(path, "rb") as f:  # a keyed file read without the key is refused, not unpickled
        got, exc = _objects_then_error(sync.iter_load(f))
    assert got == [] and isinstance(exc, streampickle.StreamPickleError)


def test_keyed_file_messages_stand_alone(tmp_path: Path) -> None:
    """The chosen semantics: each message of ``dump(..., key=)`` is authenticated alone, as
    repeated ``sync.load`` calls read it, so moving whole messages in the file is not seen."""
    first, second = (streampickle.dumps(obj, key=KEY) for obj in ("first", "second"))
    path = tmp_path / "moved.spk"
    path.write_bytes(second + first + second)
    with open(path, "rb") as f:
        assert list(sync.iter_load(f, key=KEY)) == ["second", "first", "second"]


def test_keyed_file_with_an_altered_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "altered.spk", [b"a" * 1000, b"b" * 1000], key=KEY)
    data = bytearray(path.read_bytes())
    data[-100] ^= 1  # inside the second message's pickle
    path.write_bytes(bytes(data))
    with open(path, "rb") as f:
        got, exc = _objects_then_error(sync.iter_load(f, key=KEY))
    assert got == [b"a" * 1000] and isinstance(exc, streampickle.AuthenticationError)


def test_keyed_stream_file_ends_at_its_authenticated_end(tmp_path: Path) -> None:
    encoder = streampickle.Encoder(key=KEY)
    path = tmp_path / "stream.spk"
    with open(path, "wb") as f:
        for obj in ([1], [2], np.arange(3)):
            f.write(b"".join(bytes(chunk) for chunk in encoder.encode(obj)))
        f.write(encoder.encode_end())
    with open(path, "rb") as f:
        got = list(sync.iter_load(f, key=KEY))
    assert_same([[1], [2], np.arange(3)], got)


def test_a_pipe_yields_each_message_as_it_arrives() -> None:
    r, w = os.pipe()
    objs = [{"i": i} for i in range(5)] + [np.arange(100_000)]
    got: list[Any] = []
    received = threading.Event()

    def write() -> None:
        with open(w, "wb") as writer:
            for obj in objs:
                received.clear()
                sync.dump(obj, writer)
                # the reader must have it before the next is written: no waiting to fill a buffer
                assert received.wait(10)

    with open(r, "rb") as reader:
        thread = threading.Thread(target=write)
        thread.start()
        for obj in sync.iter_load(reader):
            got.append(obj)
            received.set()
        thread.join()
    assert_same(objs, got)


def test_a_socket_works_too() -> None:
    a, b = socket.socketpair()
    objs = [np.arange(300_000), {"x": 1}]

    def send() -> None:
        for obj in objs:
            sync.dump(obj, a)
        a.shutdown(socket.SHUT_WR)

    with a, b:
        thread = threading.Thread(target=send)
        thread.start()
        got = list(sync.iter_load(b))
        thread.join()
    assert_same(objs, got)


def test_a_read_error_inside_a_message_is_incomplete(tmp_path: Path) -> None:
    path = _write(tmp_path / "fail.spk", [1, np.arange(100_000)])

    class Failing(io.FileIO):
        def readinto(self, target: Any) -> int:
            if self.tell() > 1000:
                raise OSError("disk on fire")
            return super().readinto(target[:500])

    with Failing(path, "rb") as f:
        got, exc = _objects_then_error(sync.iter_load(f))
    assert got == [1]
    assert isinstance(exc, streampickle.IncompleteMessageError)
    assert isinstance(exc.__cause__, OSError)


def test_mistakes_are_refused_when_called(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.spk", [1])
    with open(path, encoding="latin-1") as text, pytest.raises(streampickle.UsageError, match="binary"):
        sync.iter_load(text)  # type: ignore[arg-type]
    with open(path, "rb") as f:
        with pytest.raises(streampickle.UsageError):
            sync.iter_load(f, limits=3)  # type: ignore[arg-type]  # before any iteration
        with pytest.raises(streampickle.UsageError):
            sync.iter_load(object())  # type: ignore[arg-type]


# -- streampickle.iter_load ------------------------------------------------------------------


def test_the_async_name_is_public_and_distinct() -> None:
    assert "iter_load" in streampickle.__all__ and "iter_load" in dir(streampickle)
    assert streampickle.iter_load is not sync.iter_load and streampickle.iter_load.__doc__


async def _collect(iterator: Any) -> tuple[list[Any], BaseException | None]:
    got: list[Any] = []
    try:
        async with contextlib.aclosing(iterator):
            async for obj in iterator:
                got.append(obj)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return got, exc
    return got, None


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["AsyncFile", "FileReadStream", "buffered-stream"])
async def test_async_iter_load(tmp_path: Path, source: str) -> None:
    objs = [*_arrays(), {"i": 1}, *({"n": i} for i in range(2_000)), np.arange(1_000_000)]
    path = _write(tmp_path / "async.spk", objs)
    async with contextlib.AsyncExitStack() as stack:
        if source == "AsyncFile":
            f: Any = await stack.enter_async_context(await anyio.open_file(path, "rb"))
        else:
            f = await stack.enter_async_context(await FileReadStream.from_path(path))
            if source == "buffered-stream":  # a byte stream that isn't a file: read by receive
                f = BufferedByteReceiveStream(f)
        got, exc = await _collect(streampickle.iter_load(f))
    assert exc is None
    assert_same(objs, got)


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["AsyncFile", "buffered-stream"])
async def test_async_empty_truncated_refused_and_keyed(tmp_path: Path, source: str) -> None:
    async def load(path: Path, **options: Any) -> tuple[list[Any], BaseException | None]:
        if source == "AsyncFile":
            async with await anyio.open_file(path, "rb") as f:
                return await _collect(streampickle.iter_load(f, **options))
        async with await FileReadStream.from_path(path) as stream:
            return await _collect(streampickle.iter_load(BufferedByteReceiveStream(stream), **options))

    empty = tmp_path / "empty.spk"
    empty.write_bytes(b"")
    assert await load(empty) == ([], None)

    cut = _write(tmp_path / "cut.spk", [1, 2, np.arange(100_000)])
    cut.write_bytes(cut.read_bytes()[:-10])
    got, exc = await load(cut)
    assert got == [1, 2] and isinstance(exc, streampickle.IncompleteMessageError)

    refused = _write(tmp_path / "refused.spk", ["a", Point(1)])
    got, exc = await load(refused)
    assert got == ["a"] and isinstance(exc, streampickle.ForbiddenGlobalError)
    assert await load(refused, allow=[Point]) == (["a", Point(1)], None)

    keyed = _write(tmp_path / "keyed.spk", [np.arange(4), "z"], key=KEY)
    got, exc = await load(keyed, key=KEY)
    assert exc is None
    assert_same([np.arange(4), "z"], got)
    got, exc = await load(keyed, key=b"y" * 32)
    assert got == [] and isinstance(exc, streampickle.AuthenticationError)


@pytest.mark.anyio
async def test_async_mistakes_are_refused_when_called(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.spk", [1])
    async with await anyio.open_file(path, "r") as text:
        with pytest.raises(streampickle.UsageError, match="binary"):
            streampickle.iter_load(text)
    with pytest.raises(streampickle.UsageError):
        streampickle.iter_load(object())
    async with await anyio.open_file(path, "rb") as f:
        with pytest.raises(streampickle.UsageError):
            streampickle.iter_load(f, allow=3)
