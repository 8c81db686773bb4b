"""A server for test_budget's many-connections test, in a process of its own so that its
memory can be measured alone.

    python _budget_server.py BACKEND BUDGET PREFIX {thp,no-thp}

Listens on TCP with ``budget=MemoryBudget(BUDGET)`` (``none``: ``budget=None``) and prints
``{"port": ...}``. Every connection is served by an echo handler, except that the message
``"status"`` is answered with this process's RSS growth since just before listening, the
budget's figures, and how many open connections have received at least PREFIX bytes of a
message in progress (their header and pickle part, when PREFIX is an attacker's) and at least
the free allowance. When its standard input closes it stops, closing every connection, and
prints what the budget still has in use. ``no-thp``: with transparent huge pages off for the
process.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import anyio
from anyio.abc import SocketAttribute

import streampickle
from streampickle._budget import ALLOWANCE

backend, budget_arg, prefix_arg, thp_arg = sys.argv[1:5]
PREFIX = int(prefix_arg)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def disable_transparent_huge_pages() -> None:
    """prctl(PR_SET_THP_DISABLE): the budget counts bytes, and with huge pages a side chunk
    commits memory 2 MiB at a time (streampickle's buffer pool asks for them), so that each
    connection that has begun a large chunk holds at least 2 MiB whatever the budget says."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(41, 1, 0, 0, 0) != 0:  # PR_SET_THP_DISABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


async def main() -> None:
    raise_open_file_limit()
    if thp_arg == "no-thp":
        disable_transparent_huge_pages()
    budget = None if budget_arg == "none" else streampickle.MemoryBudget(int(budget_arg))
    streams: set[Any] = set()
    baseline = rss_bytes()
    listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", budget=budget)
    assert listener.budget is budget

    def status() -> dict[str, int | None]:
        received = [s._decoder.progress[0] for s in streams]
        return dict(
            rss_growth=rss_bytes() - baseline,
            in_use=None if budget is None else budget.in_use,
            waiting=None if budget is None else budget.waiting,
            started=sum(1 for n in received if n >= PREFIX),
            past_allowance=sum(1 for n in received if n >= ALLOWANCE),
        )

    async def handle(stream: Any) -> None:
        streams.add(stream)
        try:
            async for message in stream:
                await stream.send(status() if message == "status" else message)
        finally:
            streams.discard(stream)

    async def stop_when_stdin_closes() -> None:
        await anyio.to_thread.run_sync(sys.stdin.read)
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_stdin_closes)
        tg.start_soon(listener.serve, handle)
        print(json.dumps({"port": listener.extra(SocketAttribute.local_port)}), flush=True)
    # every connection was closed with the task group: nothing may still be charged
    print(json.dumps({"in_use": None if budget is None else budget.in_use}), flush=True)


if backend == "uvloop":
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
else:
    anyio.run(main, backend=backend)
