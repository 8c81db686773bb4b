"""The conformance battery (streampickle.testing) over every binding, on asyncio and trio."""

from __future__ import annotations

import shutil
from typing import Any

import anyio
import numpy as np
import pytest

from _pairs import BINDINGS, reap_processes
from streampickle.testing import CHECKS, check_object_stream

# Two bindings run over a third party's stream that may not give what a check needs:
#
# * anyio's asyncio TCP streams on uvloop have kept reading after receive() returned (their
#   pause_reading() had no effect there), so the receiving side buffered whatever the peer sent:
#   no backpressure (measured: 300 MiB accepted with nobody reading). Whether it happens
#   depends on timing: a bare probe of the same stream blocked three times in a row in a CI
#   run whose check had just seen 256 MiB go out, so no probe can tell streampickle's fault
#   from the stream's there. The checks that need backpressure are not held to that binding
#   on uvloop: the same streampickle code (the anyio transport) is held to them over the same
#   binding on asyncio, whose stream has backpressure, and over streampickle's own sockets on
#   uvloop.
# * anyio's asyncio process stdin closes with StreamWriter.close(), and asyncio's pipe transport
#   closes only after flushing what it buffered: with nobody reading, a send blocked in drain()
#   never woke. (trio's process pipes do wake it.) streampickle's guarantee is that it passes
#   the transport's behaviour on: so when the check fails there, the same thing is probed on
#   the bare anyio stream, without streampickle: if the bare stream does it too, the check has
#   nothing to pass on and is skipped, saying what the probe saw; if the bare stream behaves,
#   the failure is streampickle's and stands.
_NEEDS_BACKPRESSURE = {"backpressure", "close_wakes_blocked_send"}


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
        return ("anyio's TCP stream on uvloop has no dependable backpressure (see above); the same "
                "check holds over this binding on asyncio")
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
