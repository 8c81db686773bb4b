"""The benchmark suite, once, in its tiny configuration, so that it cannot rot.

Timings here mean nothing (tiny sizes, one round); what is tested is that every installed
contender runs as two processes, moves its workload several times over one connection,
reconstructs every object, and passes verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_suite_runs_in_its_quick_configuration(tmp_path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {(r["workload"], r["transport"], r["contender"]) for r in rows}
    for workload in ("big-array", "many-arrays", "small-msgs", "object-graph"):
        for transport in ("tcp", "unix"):
            for contender in ("limit-socket", "pickle5-oob-sync", "streampickle-asyncio", "streampickle-trio"):
                assert (workload, transport, contender) in seen
    assert all(r["median_s"] > 0 and r["vs_limit"] > 0 for r in rows)
    # Tiny transfers never use up the time budget: every contender moved its workload the
    # full number of times (peers.TRANSFERS) over one connection, each behind the start barrier.
    counts = {tuple(r["transfers"]) for r in rows}
    assert len(counts) == 1 and counts.pop()[0] > 1, counts
    assert all(len(r["samples_s"]) == sum(r["transfers"]) for r in rows)
    assert "| workload |" in proc.stdout
    assert "| target |" in proc.stdout  # the targets, checked against the same rows
