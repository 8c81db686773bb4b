"""Peak memory of a 1 GiB array sent between two real processes, on every transport and backend.

Issue 3's bounds: the sender's peak RSS rises by at most 32 MiB (no copy of the array), the
receiver's by at most the array + 32 MiB (one destination, no staging copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.heavy  # ten 1 GiB transfers between processes

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_memory_peer.py")
SIZE = 1 << 30
MiB = 1 << 20


def run_pair(transport: str, backend: str) -> dict[str, dict]:
    address = os.path.join(tempfile.mkdtemp(), "sock") if transport == "unix-owned" else "0"
    if transport == "pipe":
        out = subprocess.run(
            [sys.executable, PEER, "send", transport, backend, address, str(SIZE)],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout
        lines = [json.loads(line) for line in out.splitlines()]
        return {line["role"]: line for line in lines}
    receiver = subprocess.Popen(
        [sys.executable, PEER, "recv", transport, backend, address, str(SIZE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout is not None
        ready = json.loads(receiver.stdout.readline())
        if transport != "unix-owned":
            address = str(ready["ready"])
        sent = subprocess.run(
            [sys.executable, PEER, "send", transport, backend, address, str(SIZE)],
            capture_output=True, text=True, timeout=120, check=True,
        )
        received = json.loads(receiver.stdout.readline())
        assert receiver.wait(timeout=60) == 0
    finally:
        receiver.kill()
        receiver.wait()
        receiver.stdout.close()  # an unclosed pipe warns (ResourceWarning)
    return {"send": json.loads(sent.stdout.splitlines()[-1]), "recv": received}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("transport", ["unix-owned", "tcp-owned", "tcp-anyio", "tls", "pipe"])
def test_one_gib_between_processes(transport: str, backend: str) -> None:
    result = run_pair(transport, backend)
    assert result["recv"]["ok"], result
    send_mib = result["send"]["increase_mib"]
    recv_mib = result["recv"]["increase_mib"]
    print(f"{transport}/{backend}: sender +{send_mib:.1f} MiB, receiver +{recv_mib:.1f} MiB")
    assert send_mib <= 32, f"sender peak RSS rose by {send_mib:.1f} MiB"
    assert recv_mib <= SIZE / MiB + 32, f"receiver peak RSS rose by {recv_mib:.1f} MiB"
