"""What ``_anyio_compat`` probes in anyio is there on the installed release, and its fallbacks
work: an anyio release that moves any of it fails here, instead of silently taking a slower
or a fallback path."""

from __future__ import annotations

import os
import socket
import tempfile
from importlib.metadata import version
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from _pairs import _anyio_accept
from streampickle import Decoder, Encoder, _anyio_compat
from streampickle._transports import SocketTransport, fastest_transport

pytestmark = pytest.mark.anyio

ANYIO = tuple(int(part) for part in version("anyio").split(".")[:2])


def test_notify_closing_is_anyios_where_anyio_has_it() -> None:
    # anyio 4.10 added notify_closing; on an older release the fallback is chosen, knowingly.
    assert _anyio_compat.ANYIO_NOTIFY_CLOSING is (ANYIO >= (4, 10))
    assert _anyio_compat.ANYIO_NOTIFY_CLOSING is hasattr(anyio, "notify_closing")


async def test_checkpoint_if_cancelled_is_the_backends_own() -> None:
    checkpoint = _anyio_compat.checkpoint_if_cancelled()
    assert hasattr(anyio.lowlevel, "get_async_backend"), "anyio.lowlevel lost get_async_backend"
    assert checkpoint is not anyio.lowlevel.checkpoint_if_cancelled
    await checkpoint()


async def test_anyios_asyncio_unix_stream_is_recognised(anyio_backend: Any) -> None:
    path = os.path.join(tempfile.mkdtemp(), "sock")
    listener = await anyio.create_unix_listener(path)
    a, b = await _anyio_accept(listener, lambda: anyio.connect_unix(path))
    async with a, b:
        on_asyncio = anyio_backend != "trio"
        # Where this fails on asyncio, anyio renamed or moved its Unix stream (or the method it
        # waits with): check that it still drives its raw socket itself before updating the probe.
        assert _anyio_compat.is_asyncio_unix_stream(a) is on_asyncio
        assert isinstance(fastest_transport(a), SocketTransport)


@pytest.fixture(params=["anyio", "fallback"])
def waits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with anyio's socket waits and again with the fallback's."""
    if request.param == "anyio" and not _anyio_compat.ANYIO_NOTIFY_CLOSING:
        pytest.skip("this anyio has no notify_closing")
    monkeypatch.setattr(_anyio_compat, "ANYIO_NOTIFY_CLOSING", request.param == "anyio")
    return str(request.param)


async def test_close_wakes_a_blocked_receive_and_send(waits: str) -> None:
    a_sock, quiet = socket.socketpair()  # nothing comes to a
    b_sock, deaf = socket.socketpair()  # nothing reads what b sends
    a, b = SocketTransport(a_sock), SocketTransport(b_sock)
    woke: list[BaseException] = []

    async def receiving() -> None:
        try:
            await a.fill(Decoder(), exact=False)
        except BaseException as exc:  # noqa: BLE001 - we record what woke it
            woke.append(exc)

    async def sending() -> None:
        try:
            while True:  # until the kernel's buffers are full and the send waits
                await b.send_chunks([b"\0" * (1 << 20)])
        except BaseException as exc:  # noqa: BLE001 - we record what woke it
            woke.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receiving)
            tg.start_soon(sending)
            await anyio.wait_all_tasks_blocked()
            await a.aclose()
            await b.aclose()
    quiet.close()
    deaf.close()
    assert len(woke) == 2 and all(isinstance(exc, anyio.ClosedResourceError) for exc in woke), woke


async def test_round_trip_through_the_waits(waits: str) -> None:
    a_sock, b_sock = socket.socketpair()
    a, b = SocketTransport(a_sock), SocketTransport(b_sock)
    decoder = Decoder()
    payload = b"\1" * (8 << 20)  # more than the socket buffers: both sides wait
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send_chunks, Encoder().encode(payload))
        while not decoder.pending:
            assert await b.fill(decoder, exact=False)
    assert next(decoder) == payload
    await a.aclose()
    await b.aclose()
