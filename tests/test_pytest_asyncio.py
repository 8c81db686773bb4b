"""streampickle tested the way a pytest-asyncio user tests: ``@pytest.mark.asyncio`` tests on
pytest-asyncio's event loop, ``@pytest_asyncio.fixture`` async fixtures that yield connected
streams and close them after, and plain asyncio (``asyncio.gather``, ``asyncio.timeout``,
asyncio's own streams) around the library. The suite runs pytest-asyncio in strict mode, so
these tests and anyio's (``@pytest.mark.anyio``) live side by side, each plugin running only
its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import pytest_asyncio

import streampickle
from _util import assert_same
from streampickle import ObjectStream
from streampickle.testing import check_object_stream, memory_stream_pair

Pair = tuple[ObjectStream, ObjectStream]


def _arrays() -> list[Any]:
    rng = np.random.default_rng(7)
    return [
        rng.random((256, 128)),
        np.arange(100, dtype=np.int8),
        np.arange(12, dtype=">i2").reshape(3, 4),
        np.asfortranarray(rng.random((9, 5)).astype(np.float32)),
        np.array(["a", "bc"]),
        np.empty((0, 4), dtype=np.complex128),
        np.arange(2 * 1024 * 1024, dtype=np.float64),  # 16 MiB: many reads, backpressure
    ]


async def _memory_pair() -> Pair:
    a, b = memory_stream_pair()
    return ObjectStream(a), ObjectStream(b)


async def _unix_pair() -> Pair:
    # a short directory of its own: a Unix socket's path has at most 107 bytes
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "sock")
    async with await streampickle.create_unix_listener(path) as listener:
        client = await streampickle.connect_unix(path)
        server = await listener.accept()
    shutil.rmtree(directory)  # connected sockets don't need their path
    return client, server


@pytest_asyncio.fixture(params=["memory", "unix"])
async def streams(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    """A connected pair of object streams, closed after the test."""
    a, b = await (_memory_pair() if request.param == "memory" else _unix_pair())
    async with a, b:
        yield a, b


@pytest.mark.asyncio
async def test_arrays_both_ways(streams: Pair) -> None:
    a, b = streams
    arrays = _arrays()

    async def send_all(stream: ObjectStream) -> None:
        for array in arrays:
            await stream.send(array)

    async def receive_all(stream: ObjectStream) -> list[Any]:
        return [await stream.receive() for _ in arrays]

    # both directions at once: each side sends while the other receives
    _, _, from_a, from_b = await asyncio.gather(send_all(a), send_all(b), receive_all(b), receive_all(a))
    assert_same(arrays, from_a)
    assert_same(arrays, from_b)
    assert all(array.flags.writeable for array in from_a)


@pytest.mark.asyncio
async def test_async_for_ends_at_the_peers_end(streams: Pair) -> None:
    a, b = streams
    objs = [{"i": i, "v": np.full(3, i)} for i in range(100)]

    async def send() -> None:
        for obj in objs:
            await a.send(obj)
        await a.send_eof()

    async def receive() -> list[Any]:
        return [obj async for obj in b]

    _, got = await asyncio.gather(send(), receive())
    assert_same(objs, got)


@pytest.mark.asyncio
async def test_a_cancelled_receive_loses_nothing(streams: Pair) -> None:
    a, b = streams
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):  # cancels a receive that nothing will satisfy
            await b.receive()
    await a.send(np.arange(5))
    assert_same(np.arange(5), await b.receive())


@pytest.mark.asyncio
async def test_a_refused_global_is_the_library_error(streams: Pair) -> None:
    a, b = streams
    await a.send(Path("/tmp"))  # a class the safe default doesn't load
    with pytest.raises(streampickle.ForbiddenGlobalError):
        await b.receive()
    await a.send("next")  # the message alone was dropped: the stream goes on
    assert await b.receive() == "next"


@pytest.mark.asyncio
@pytest.mark.parametrize("make", [_memory_pair, _unix_pair], ids=["memory", "unix"])
async def test_conformance_battery(make: Any) -> None:
    await check_object_stream(make)


@pytest_asyncio.fixture
async def asyncio_unix_streams() -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """asyncio's own streams, as ``asyncio.open_unix_connection`` returns them, connected to a
    server that echoes each message back with ``streampickle.load``/``dump``."""
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "sock")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(EOFError):
            while True:
                await streampickle.dump(await streampickle.load(reader), writer)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_unix_server(echo, path)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        yield reader, writer
        writer.close()
        await writer.wait_closed()
    shutil.rmtree(directory)


@pytest.mark.asyncio
async def test_dump_and_load_on_asyncio_streams(
    asyncio_unix_streams: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    reader, writer = asyncio_unix_streams
    for obj in [*_arrays(), {"nested": [np.ones(3), "x"]}]:
        await streampickle.dump(obj, writer)
        assert_same(obj, await streampickle.load(reader))
    writer.write_eof()
    with pytest.raises(EOFError):
        await streampickle.load(reader)


@pytest.mark.asyncio
async def test_dump_and_load_on_memory_streams() -> None:
    a, b = memory_stream_pair()
    async with a, b:
        arrays = _arrays()

        async def send() -> None:
            for array in arrays:
                await streampickle.dump(array, a)
            await a.send_eof()

        async def receive() -> list[Any]:
            got = []
            with contextlib.suppress(EOFError):
                while True:
                    got.append(await streampickle.load(b))
            return got

        _, got = await asyncio.gather(send(), receive())
    assert_same(arrays, got)


@pytest.mark.asyncio
async def test_iter_load_reads_a_file_of_objects(tmp_path: Path) -> None:
    objs = [*_arrays(), *({"n": i} for i in range(1000))]
    path = tmp_path / "log.spk"
    with open(path, "wb") as f:  # noqa: ASYNC230 - written before the test's async part
        for obj in objs:
            streampickle.sync.dump(obj, f)
    async with await anyio.open_file(path, "rb") as f:
        got = [obj async for obj in streampickle.iter_load(f)]
    assert_same(objs, got)
