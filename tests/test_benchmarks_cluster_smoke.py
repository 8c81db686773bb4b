"""The dask cluster benchmark, once, in its tiny configuration, so that it cannot rot.

Timings here mean nothing (tiny sizes, one round, cores shared with the test run); what is
tested is that ``benchmarks/cluster.py --quick`` starts a real LocalCluster of worker processes
per protocol, runs every workload on it with its results checked, reads the workers' memory,
and writes one row per workload and protocol, with the ratio to tcp and the targets' table.
``sp`` and ``sp+unix`` are in the run where streampickle's comm backend registers them with
distributed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("distributed", reason="the cluster benchmark needs dask.distributed")

import dask.array  # after the skip: the benchmark needs distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _memfd() -> bool:
    from streampickle import _shm

    return bool(_shm.AVAILABLE)


WORKLOADS = ("small-tasks", "large-key", *(("shared-key",) if _memfd() else ()), "many-keys", "rechunk", "shuffle",
             *(("df-shuffle",) if importlib.util.find_spec("pandas") and importlib.util.find_spec("pyarrow") else ()))
RUN_S = 240


def registered(scheme: str) -> bool:
    from distributed.comm.registry import get_backend

    try:
        get_backend(scheme)
    except ValueError:
        return False
    return True


@pytest.mark.timeout(RUN_S + 60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmark reads worker memory from /proc")
def test_cluster_benchmark_runs_in_its_quick_configuration(tmp_path) -> None:
    out = tmp_path / "rows.json"
    protocols = ["tcp"] + [p for p in ("sp", "sp+unix") if registered(p)]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "cluster.py"), "--quick", "--json", str(out),
         "--workloads", ",".join(WORKLOADS), "--protocols", ",".join(protocols)],
        capture_output=True, text=True, timeout=RUN_S, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["workload"], r["protocol"]) for r in rows] == [(w, p) for w in WORKLOADS for p in protocols]
    for r in rows:
        assert r["rounds"] == 1 and r["samples_s"] and all(s > 0 for s in r["samples_s"])
        assert r["median_s"] > 0 and r["vs_tcp"] > 0
        assert r["peak_mib"] > 0 and r["idle_mib"] > 0  # read from the worker processes
    by = {(r["workload"], r["protocol"]): r for r in rows}
    for p in protocols:
        # The keys really went from worker A to worker B, and many-keys' four in one message.
        assert by["large-key", p]["fetches_per_run"] >= 1 and by["large-key", p]["keys_per_fetch"] == 1
        assert by["many-keys", p]["keys_per_fetch"] == 4
        assert by["rechunk", p]["moved_mib_per_run"] > 0
        if hasattr(dask.array.Array, "shuffle"):  # older dask indexes instead, which may not move data
            assert by["shuffle", p]["moved_mib_per_run"] > 0
    assert by["large-key", "tcp"]["vs_tcp"] == 1.0
    assert by["large-key", "tcp"]["shared_keys"] == 0  # tcp copies: B's array is its own memory
    assert "| workload | protocol |" in proc.stdout
    assert "| target |" in proc.stdout
