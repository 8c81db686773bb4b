"""The benchmark suite, once, in its tiny configuration, so that it cannot rot.

Timings here mean nothing (tiny sizes, one round, a machine that may be busy); what is tested
is that each workload runs for the reference contenders and streampickle on both backends, as
two processes over one TCP connection, reconstructs every object, passes verification, and
renders the tables. Kept small (4 workloads x 4 contenders, TCP only) so that it takes well
under a minute even with the cores shared; ``python benchmarks/run.py --quick`` runs them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("big-array", "many-arrays", "small-msgs", "object-graph")
CONTENDERS = ("limit-socket", "pickle5-oob-sync", "streampickle-asyncio", "streampickle-trio")

# One budget, nested: each sender process may take MEASURE_S, the whole run RUN_S, and pytest
# kills the test only after that (its own timeout would hide the run's stderr).
MEASURE_S, RUN_S = 120, 240


@pytest.mark.heavy
@pytest.mark.timeout(RUN_S + 60)
def test_benchmark_suite_runs_in_its_quick_configuration(tmp_path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--json", str(out),
         "--workloads", ",".join(WORKLOADS), "--transports", "tcp", "--contenders", ",".join(CONTENDERS),
         "--timeout", str(MEASURE_S)],
        capture_output=True, text=True, timeout=RUN_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {(r["workload"], r["transport"], r["contender"]) for r in rows}
    assert seen == {(w, "tcp", c) for w in WORKLOADS for c in CONTENDERS}
    assert all(r["median_s"] > 0 and r["vs_limit"] > 0 for r in rows)
    # Each contender moved its workload at least once over its one connection, and every
    # transfer has its sample. (How many times depends on the machine's speed: not checked.)
    assert all(r["transfers"] and min(r["transfers"]) >= 1 for r in rows)
    assert all(len(r["samples_s"]) == sum(r["transfers"]) for r in rows)
    assert "| workload |" in proc.stdout
    assert "| target |" in proc.stdout  # the targets, checked against the same rows


SHARED = ("limit-socket", "streampickle-asyncio", "streampickle-asyncio-shm", "streampickle-asyncio-shm-read",
          "streampickle-asyncio-shm-ordinary", "streampickle-asyncio-shm-pool")


@pytest.mark.heavy
@pytest.mark.timeout(RUN_S + 60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared memory needs memfd (Linux)")
def test_the_shared_memory_rows_run_in_the_quick_configuration(tmp_path) -> None:
    """The same-host rows over a Unix socket. Each receiver checks, besides the data, how its
    arrays came (mapped from the sender's shared-memory files, or as bytes for the ordinary
    row) and reads both ends' PSS, which every row here must report."""
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--json", str(out),
         "--workloads", "big-array,many-arrays", "--transports", "unix", "--contenders", ",".join(SHARED),
         "--timeout", str(MEASURE_S)],
        capture_output=True, text=True, timeout=RUN_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["workload"], r["contender"]) for r in rows} == {
        (w, c) for w in ("big-array", "many-arrays") for c in SHARED}
    assert all(r["transport"] == "unix" and r["recv_pss_mib"] is not None for r in rows)
    assert "| big-array, shared: speed / limit-socket |" in proc.stdout
