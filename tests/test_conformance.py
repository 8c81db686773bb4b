"""The conformance battery (streampickle.testing) over every binding, on asyncio and trio."""

from __future__ import annotations

import pytest

from _pairs import BINDINGS, reap_processes
from streampickle.testing import CHECKS, check_object_stream


# anyio's asyncio TCP streams running on uvloop keep reading after receive() returns
# (their pause_reading() has no effect there), so the receiving side buffers whatever the peer
# sends: no backpressure. Measured: 300 MiB accepted with nobody reading. streampickle's own
# sockets don't depend on it. Not strict: whether a 64 MiB send blocks at all there depends on
# how much uvloop buffered first (it sometimes does, and then the check passes), and a fix in
# anyio or uvloop must not break this suite.
_UVLOOP_NO_BACKPRESSURE = {"tcp-anyio"}
_NEEDS_BACKPRESSURE = {"backpressure", "close_wakes_blocked_send"}

# anyio's asyncio process stdin closes with StreamWriter.close(), and asyncio's pipe transport
# closes only after flushing what it buffered: with nobody reading, a send blocked in drain()
# never wakes. (trio's process pipes do wake it.) Not strict, as above: a fix in asyncio must
# not break this suite.
_ASYNCIO_CLOSE_DOES_NOT_WAKE_SEND = {"process-pipes"}


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("binding", BINDINGS)
async def test_conformance(binding: str, check: str, anyio_backend: object, request: pytest.FixtureRequest) -> None:
    on_asyncio = anyio_backend == "asyncio" or isinstance(anyio_backend, tuple)
    if check in _NEEDS_BACKPRESSURE and binding in _UVLOOP_NO_BACKPRESSURE and isinstance(anyio_backend, tuple):
        request.applymarker(pytest.mark.xfail(strict=False, reason="anyio streams on uvloop don't pause reading"))
    if check == "close_wakes_blocked_send" and binding in _ASYNCIO_CLOSE_DOES_NOT_WAKE_SEND and on_asyncio:
        request.applymarker(pytest.mark.xfail(strict=False, reason="asyncio's pipe transport flushes before closing"))
    try:
        await check_object_stream(BINDINGS[binding], only=[check])
    finally:
        await reap_processes()
