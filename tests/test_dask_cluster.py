"""Real dask clusters on sp://: a LocalCluster of worker processes computing a rechunk, a
shuffle of numpy arrays and a dataframe shuffle (where dask.dataframe is installed) with exact
results, under a cluster key that a client without it can't get past; and the command-line
scheduler and worker as separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

import dask
import dask.array as da
from distributed import Client, LocalCluster

import streampickle
from streampickle import dask as sp_dask

KEY = "a secret every process of this cluster holds"


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """Three worker processes and a scheduler, all on sp:// with the cluster key (the nanny
    hands dask's config to its worker process)."""
    with dask.config.set({"distributed.comm.sp.key": KEY}), LocalCluster(
        protocol="sp://", n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        yield c


def workers(client: Client) -> list[str]:
    """The workers' addresses, asked of the scheduler. Not ``scheduler_info()["workers"]``: a
    sync client's periodic refresh can replace that answer with its worker-less summary before
    the call returns it."""
    return sorted(client.nthreads())


def test_every_process_talks_sp(client: Client) -> None:
    assert client.scheduler.address.startswith("sp://")
    addresses = workers(client)
    assert len(addresses) == 3 and all(a.startswith("sp://127.0.0.1:") for a in addresses)
    # and the workers' own connections are sp:// too: each worker runs its backend
    kinds = client.run(lambda dask_worker: type(dask_worker.batched_stream.comm).__name__)
    assert set(kinds.values()) == {"SPComm"}


def _cell(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.sin(i * 1500.0 + j) * 1e6


@pytest.mark.parametrize("method", ["tasks", "p2p"])
def test_rechunk_moves_every_chunk_exactly(client: Client, method: str) -> None:
    shape = (1200, 1500)
    data = np.fromfunction(_cell, shape)
    x = da.fromfunction(_cell, shape=shape, chunks=(100, 1500), dtype=float)  # rows, made on the workers ...
    with dask.config.set({"array.rechunk.method": method}):
        y = x.rechunk((1200, 100))  # ... to columns: every output chunk needs every input one
    result = client.compute(y).result()
    assert result.dtype == data.dtype and np.array_equal(result, data)


def _partition(seed: int, n: int, parts: int) -> dict[int, np.ndarray]:
    values = np.random.default_rng(seed).integers(0, 1 << 40, size=n, dtype=np.int64)
    return {p: values[values % parts == p] for p in range(parts)}


def _gather(*pieces: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate(pieces))


def test_a_shuffle_of_numpy_arrays_between_pinned_workers(client: Client) -> None:
    # Each input partition on one worker, each output on another: every piece crosses sp://.
    names = workers(client)
    parts, n = 6, 100_000
    inputs = [
        client.submit(_partition, seed, n, parts, workers=[names[seed % 3]], allow_other_workers=False, pure=False)
        for seed in range(parts)
    ]
    pieces = [
        [client.submit(lambda d, p=p: d[p], i, workers=[names[(p + 1) % 3]], allow_other_workers=False) for i in inputs]
        for p in range(parts)
    ]
    outputs = [
        client.submit(_gather, *row, workers=[names[(p + 2) % 3]], allow_other_workers=False)
        for p, row in enumerate(pieces)
    ]
    got = client.gather(outputs)
    expected = [_gather(*(_partition(seed, n, parts)[p] for seed in range(parts))) for p in range(parts)]
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_large_key_between_two_workers(client: Client) -> None:
    first, second = workers(client)[:2]
    big = client.submit(lambda: np.arange(9 << 20, dtype=np.int64), workers=[first], allow_other_workers=False)
    total = client.submit(lambda a: (int(a.sum()), a.flags.writeable, a.shape), big, workers=[second],
                          allow_other_workers=False)
    n = 9 << 20  # 72 MiB of int64: more than dask's TCP comm sends in one piece
    assert total.result() == (n * (n - 1) // 2, True, (n,))


def test_a_dataframe_shuffle(client: Client) -> None:
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")  # needs pyarrow too
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"k": rng.integers(0, 40, 60_000), "v": np.arange(60_000), "f": rng.standard_normal(60_000)})
    ddf = dd.from_pandas(df, npartitions=6)
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
        shuffled = ddf.shuffle(on="k", npartitions=5)
        partitions = client.compute(shuffled.to_delayed())
        parts = client.gather(partitions)
    assert sum(len(p) for p in parts) == len(df)
    keys = [set(p["k"]) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(keys) for b in keys[i + 1 :])  # each key in one place
    back = pd.concat(parts).sort_values("v").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, df)


def test_a_client_without_the_key_is_refused(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sp_dask.KEY_ENV, raising=False)
    with dask.config.set({"distributed.comm.sp.key": None}), pytest.raises(OSError):
        Client(client.scheduler.address, timeout="2s")
    with dask.config.set({"distributed.comm.sp.key": "another secret"}), pytest.raises(OSError):
        Client(client.scheduler.address, timeout="2s")


def _shared_range(n: int) -> np.ndarray:

    out = streampickle.shared_empty(n, np.int64)
    out[:] = np.arange(n)
    return out


def _received_as_shared_memory(x: np.ndarray) -> tuple[int, bool]:
    from streampickle import _shm

    return int(x.sum()), x.base is not None and _shm.is_mapped(memoryview(x.base))


def test_a_unix_cluster_hands_shared_arrays_between_workers() -> None:
    # Without a key: sp+unix:// hands what a task made with streampickle.shared_empty to
    # another worker as shared memory, and ordinary arrays as bytes over the Unix socket.
    with dask.config.set({"distributed.comm.sp.key": None}), LocalCluster(
        protocol="sp+unix://", n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as c:
        assert c.scheduler.address.startswith("sp+unix://127.0.0.1/")
        first, second = workers(c)
        n = 4 << 20
        shared = c.submit(_shared_range, n, workers=[first], allow_other_workers=False)
        plain = c.submit(np.arange, n, dtype=np.int64, workers=[first], allow_other_workers=False)
        seen = [
            c.submit(_received_as_shared_memory, x, workers=[second], allow_other_workers=False)
            for x in (shared, plain)
        ]
        assert c.gather(seen) == [(n * (n - 1) // 2, True), (n * (n - 1) // 2, False)]
        x = da.fromfunction(_cell, shape=(600, 800), chunks=(50, 800), dtype=float)
        assert np.array_equal(c.compute(x.rechunk((600, 50))).result(), np.fromfunction(_cell, (600, 800)))


def _wait_for(path: Path, process: subprocess.Popen[Any], seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the scheduler exited with {process.returncode}")
        try:
            info: dict[str, Any] = json.loads(path.read_text())
            return info
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.1)
    raise AssertionError(f"the scheduler wrote no {path} in {seconds} s")


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.timeout(180)
def test_the_command_line_scheduler_and_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The key comes from the environment, so the command lines carry nothing sp:// specific
    # but the protocol and the address.
    env = {**os.environ, sp_dask.KEY_ENV: "from the environment", "PYTHONWARNINGS": "ignore"}
    bin_dir = Path(sys.executable).parent
    dask_cli = [str(bin_dir / "dask")] if (bin_dir / "dask").exists() else [sys.executable, "-m", "dask"]
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [*dask_cli, "scheduler", "--protocol", "sp", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    worker = None
    try:
        address = _wait_for(scheduler_file, scheduler, 60)["address"]
        assert address.startswith("sp://127.0.0.1:")
        worker = subprocess.Popen(
            [*dask_cli, "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        monkeypatch.setenv(sp_dask.KEY_ENV, "from the environment")
        with dask.config.set({"distributed.comm.sp.key": None}), Client(address, timeout="30s") as c:
            c.wait_for_workers(1, timeout=60)
            (worker_address,) = workers(c)
            assert worker_address.startswith("sp://127.0.0.1:")
            future = c.submit(np.arange, 1 << 20, workers=[worker_address])
            result = c.submit(lambda a: int(a.sum()), future).result()
            assert result == (1 << 20) * ((1 << 20) - 1) // 2
            assert c.gather(future).shape == (1 << 20,)
    finally:
        for process in (worker, scheduler):
            if process is not None:
                _stop(process)
                assert process.stderr is not None
                process.stderr.close()
