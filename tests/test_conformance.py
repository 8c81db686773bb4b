"""The conformance battery (streampickle.testing) over every binding, on asyncio and trio."""

from __future__ import annotations

import shutil
from typing import Any

import anyio
import numpy as np
import pytest
from anyio.abc import SocketAttribute

from _pairs import BINDINGS, _anyio_accept, reap_processes
from streampickle.testing import CHECKS, check_object_stream

# Two bindings run over a third party's stream that may not give what a check needs:
#
# * anyio's asyncio TCP streams on uvloop have kept reading after receive() returned (their
#   pause_reading() had no effect there), so the receiving side buffered whatever the peer sent:
#   no backpressure (measured: 300 MiB accepted with nobody reading). streampickle's own sockets
#   don't depend on it.
# * anyio's asyncio process stdin closes with StreamWriter.close(), and asyncio's pipe transport
#   closes only after flushing what it buffered: with nobody reading, a send blocked in drain()
#   never woke. (trio's process pipes do wake it.)
#
# streampickle's guarantee is that it passes the transport's behaviour on: it buffers nothing of
# its own. So when such a check fails there, the same thing is probed on the bare anyio stream,
# without streampickle: if the bare stream does it too, the check has nothing to pass on and is
# skipped, saying what the probe saw; if the bare stream behaves, the failure is streampickle's
# and stands. Whether the third party is fixed or not, the suite is right.
_NEEDS_BACKPRESSURE = {"backpressure", "close_wakes_blocked_send"}


async def _bare_tcp_blocks_a_sender_nobody_reads() -> tuple[bool, int]:
    """anyio's TCP streams without streampickle, as ``_backpressure`` drives them: whether a
    sender blocks within 256 MiB when nobody reads, and how many MiB went out."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)
    client, server = await _anyio_accept(listener, lambda: anyio.connect_tcp("127.0.0.1", port))
    async with client, server:
        await client.send(b"warm-up")
        await server.receive()
        chunk = bytes(1 << 20)
        sent = 0
        with anyio.move_on_after(1.0):
            while sent <= 256:
                await client.send(chunk)
                sent += 1
    return sent <= 256, sent


async def _bare_pipe_close_wakes_a_blocked_send() -> bool:
    """anyio's process stdin without streampickle: whether closing it wakes a send blocked on a
    child that doesn't read."""
    cat = shutil.which("cat")
    assert cat, "the process-pipe probe needs cat"
    woke: list[BaseException] = []
    async with await anyio.open_process([cat], stderr=None) as proc:
        assert proc.stdin is not None

        async def blocked() -> None:
            try:
                await proc.stdin.send(np.ones(64 << 20, dtype=np.uint8).tobytes())
            except Exception as exc:  # noqa: BLE001 - we record what woke it (not the timeout)
                woke.append(exc)

        with anyio.move_on_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(blocked)
                await anyio.sleep(0.1)
                await proc.stdin.aclose()
        proc.kill()
    return bool(woke)


async def _third_party_reason(binding: str, check: str, anyio_backend: Any) -> str | None:
    """Why the bare transport can't support ``check`` on this backend, if it can't."""
    on_uvloop = isinstance(anyio_backend, tuple)
    on_asyncio = anyio_backend == "asyncio" or on_uvloop
    if check in _NEEDS_BACKPRESSURE and binding == "tcp-anyio" and on_uvloop:
        # whether it blocks has depended on how much uvloop read first: a few tries, and
        # backpressure that fails once is not there to pass on
        for _ in range(3):
            blocked, sent = await _bare_tcp_blocks_a_sender_nobody_reads()
            if not blocked:
                return f"anyio's TCP stream on uvloop, bare, sent {sent} MiB with nobody reading: no backpressure"
    if (
        check == "close_wakes_blocked_send" and binding == "process-pipes" and on_asyncio
        and not await _bare_pipe_close_wakes_a_blocked_send()
    ):
        return "anyio's process stdin on asyncio, bare, does not wake a blocked send when closed"
    return None


@pytest.mark.anyio
@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("binding", BINDINGS)
async def test_conformance(binding: str, check: str, anyio_backend: object) -> None:
    try:
        await check_object_stream(BINDINGS[binding], only=[check])
    except Exception:
        await reap_processes()
        reason = await _third_party_reason(binding, check, anyio_backend)
        if reason is None:
            raise
        pytest.skip(reason)
    finally:
        await reap_processes()
