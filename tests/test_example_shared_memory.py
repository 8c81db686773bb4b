"""examples/shared_memory.py, run as users run it (in its small mode): two real processes, a
Unix socket, arrays made with shared_empty. Its output says that the consumer's writes reached
the producer's arrays (so they were handed over as shared memory, not copied as bytes) and
that every byte was still there after the producer exited. Timings are printed, not checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from streampickle import _shm

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "shared_memory.py")

pytestmark = pytest.mark.skipif(not _shm.AVAILABLE, reason="no sealable shared-memory files (memfd) here")


def test_the_shared_memory_example_hands_arrays_over_as_shared_memory() -> None:
    result = subprocess.run([sys.executable, EXAMPLE, "--small"], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "producer: the consumer's marks are in 8 of my 8 arrays: the same memory", result.stdout
    assert re.fullmatch(
        r"handed off 8 arrays of 1 MiB \(0\.01 GiB\) in [\d.]+ ms: [\d.]+ GB/s, [\d.]+ ms per array", lines[1]
    ), result.stdout
    assert lines[2] == "verified every byte after the producer exited (exit code 0)"
    assert len(lines) == 3 and not result.stderr
