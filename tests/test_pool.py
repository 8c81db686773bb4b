"""The buffer pool: destinations of large side chunks reuse the memory of arrays that died.

What matters most is that memory is never reused while anything built on it lives: the
array, a view, a reshaped or transposed copy of the reference, a memoryview. Then that the
bounds hold (bytes kept, seconds kept), that it is thread-safe, and that a garbage collection
inside the pool's own lock can't deadlock it."""

from __future__ import annotations

import gc
import mmap
import pickle
import socket
import sys
import threading
import time

import numpy as np
import pytest

import streampickle
from streampickle import _pool, sync
from streampickle._pool import HUGE_PAGE, POOL_MIN, BufferPool, buffer_pool

MiB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_pool():
    saved = (buffer_pool.max_bytes, buffer_pool.max_idle, buffer_pool.release_before_map)
    buffer_pool.release()
    buffer_pool.reused = buffer_pool.mapped = 0
    buffer_pool.keep_for(None)
    yield
    buffer_pool.configure(max_bytes=saved[0], max_idle=saved[1], release_before_map=saved[2])
    buffer_pool.keep_for(None)
    buffer_pool.release()


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def over_socket(*objs):
    """Send ``objs`` over a real Unix socketpair and receive them back, one by one."""
    a, b = socket.socketpair()
    with a, b:
        out = []
        for obj in objs:
            t = threading.Thread(target=sync.dump, args=(obj, a))
            t.start()
            out.append(sync.load(b))
            t.join()
        return out


def test_a_received_array_reuses_the_memory_of_one_that_died():
    first = np.arange(MiB, dtype=np.float64)  # 8 MiB
    (got,) = over_socket(first)
    assert np.array_equal(got, first) and got.flags.writeable
    where = address(got)
    assert where % HUGE_PAGE == 0
    del got
    second = np.arange(MiB, dtype=np.float64)[::-1].copy()
    (again,) = over_socket(second)
    assert address(again) == where  # the same memory, no fresh mapping
    assert np.array_equal(again, second)
    assert buffer_pool.reused >= 1


@pytest.mark.parametrize("keep", [
    lambda a: a[10:],                       # a numpy view
    lambda a: a.reshape(-1, 4).T,           # a view of a view
    lambda a: memoryview(a),                # a memoryview of the array
    lambda a: memoryview(a)[3:],            # a slice of that memoryview
    lambda a: np.frombuffer(pickle.PickleBuffer(a), dtype=np.uint8),  # through a PickleBuffer
    lambda a: {"inside": [a]},              # the array itself, in a container
])
def test_memory_is_never_reused_while_anything_built_on_it_lives(keep):
    (got,) = over_socket(np.full(2 * MiB, 7, dtype=np.uint8))
    kept = keep(got)
    del got
    gc.collect()
    others = over_socket(*[np.full(2 * MiB, 9, dtype=np.uint8) for _ in range(3)])
    assert buffer_pool.reused == 0
    # The kept object still sees its own bytes, and no new array shares its memory.
    flat = np.asarray(kept["inside"][0] if isinstance(kept, dict) else kept)
    assert (flat == 7).all()
    for o in others:
        assert (o == 9).all()
        assert not np.shares_memory(o, flat)


def test_the_arrays_of_a_message_with_many_side_chunks_are_all_reused():
    msg = {f"a{i}": np.full(MiB // 8, i, dtype=np.float64) for i in range(16)}
    (got,) = over_socket(msg)
    before = {address(v) for v in got.values()}
    del got
    (again,) = over_socket(msg)
    assert {address(v) for v in again.values()} == before
    for i in range(16):
        assert (again[f"a{i}"] == i).all()


def test_small_chunks_are_not_pooled():
    (got,) = over_socket(np.zeros(POOL_MIN // 2, dtype=np.uint8))
    del got
    assert buffer_pool.idle_bytes == 0 and buffer_pool.reused == 0


def test_max_bytes_bounds_the_idle_memory_and_zero_turns_the_pool_off():
    buffer_pool.configure(max_bytes=8 * MiB)
    arrays = [buffer_pool.empty(2 * MiB) for _ in range(10)]
    del arrays
    assert buffer_pool.idle_bytes == 8 * MiB
    buffer_pool.configure(max_bytes=0)
    assert buffer_pool.idle_bytes == 0
    (got,) = over_socket(np.ones(4 * MiB, dtype=np.uint8))
    assert buffer_pool.mapped == 10 and buffer_pool.reused == 0  # np.empty, not the pool
    del got
    assert buffer_pool.idle_bytes == 0


def test_idle_blocks_go_after_max_idle_seconds():
    pool = BufferPool(max_idle=0.05)
    a = pool.empty(2 * MiB)
    del a
    assert pool.idle_bytes == 2 * MiB
    time.sleep(0.1)
    b = pool.empty(4 * MiB)  # any use of the pool applies the bounds
    assert pool.idle_bytes == 0
    del b


def test_release_unmaps_every_idle_block():
    arrays = [buffer_pool.empty(3 * MiB) for _ in range(3)]
    del arrays
    assert buffer_pool.idle_bytes == 3 * 4 * MiB  # size classes are whole huge pages
    assert buffer_pool.release() == 12 * MiB
    assert buffer_pool.idle_bytes == 0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_idle_blocks_of_other_sizes_stay_unless_release_before_map():
    pool = BufferPool()
    a = pool.empty(4 * MiB)
    del a
    b = pool.empty(8 * MiB)  # no idle block fits: a fresh mapping, the 4 MiB block stays
    assert pool.idle_bytes == 4 * MiB and pool.mapped == 2
    del b
    assert pool.idle_bytes == 12 * MiB


def test_release_before_map_unmaps_idle_blocks_that_dont_fit_before_mapping(monkeypatch):
    pool = BufferPool(release_before_map=True)
    a, b = pool.empty(4 * MiB), pool.empty(4 * MiB)
    olds = [address(a), address(b)]
    a[:] = 1
    b[:] = 1
    del a, b
    assert pool.idle_bytes == 8 * MiB
    same = pool.empty(4 * MiB)  # a block fits: reused, the other stays idle
    assert pool.reused == 1 and pool.idle_bytes == 4 * MiB
    # What the pool holds idle at the moment it maps new memory (not where the kernel puts
    # the new mapping: it may well reuse the freed block's addresses).
    idle_when_mapping = []
    real_mmap = mmap.mmap

    def recording_mmap(*args, **kwargs):
        idle_when_mapping.append(pool.idle_bytes)
        return real_mmap(*args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", recording_mmap)
    other = pool.empty(6 * MiB)  # none fits: the idle one goes first
    monkeypatch.undo()
    assert idle_when_mapping == [0], "the idle block was still mapped when the new one was"
    assert pool.idle_bytes == 0 and pool.mapped == 3
    assert address(same) in olds
    del same, other
    assert pool.idle_bytes == 4 * MiB + 6 * MiB  # given back as ever
    pool.configure(release_before_map=False)
    assert pool.release_before_map is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_received_arrays_of_a_new_size_dont_sit_beside_idle_memory():
    """Real arrays over a socket: 64 MiB received and dropped, then 4 x 16 MiB. The idle
    64 MiB goes before the new chunks are mapped, so the process never holds both."""
    buffer_pool.configure(max_bytes=1 << 30, max_idle=60.0, release_before_map=True)
    (big,) = over_socket(np.ones(64 * MiB, dtype=np.uint8))
    assert big.sum() == 64 * MiB
    del big
    gc.collect()
    assert buffer_pool.idle_bytes == 64 * MiB
    before = rss_mib()
    smalls = over_socket(*[np.full(16 * MiB, k, dtype=np.uint8) for k in range(4)])
    assert [int(s[-1]) for s in smalls] == [0, 1, 2, 3]
    assert buffer_pool.mapped == 5 and buffer_pool.reused == 0
    # The first 16 MiB chunk unmapped the idle 64 MiB; the next three found nothing idle.
    assert rss_mib() - before < 32, "the idle 64 MiB block still sits beside 64 MiB of new arrays"
    del smalls


def test_trim_applies_the_bounds_without_a_receive():
    pool = BufferPool(max_idle=0.05)
    a, b = pool.empty(2 * MiB), pool.empty(4 * MiB)
    del a
    assert pool.trim() == 0 and pool.idle_bytes == 2 * MiB  # not idle long enough yet
    time.sleep(0.1)
    assert pool.trim() == 2 * MiB and pool.idle_bytes == 0  # no receive needed
    del b
    assert pool.trim() == 0 and pool.idle_bytes == 4 * MiB
    time.sleep(0.1)
    assert pool.trim() == 4 * MiB and pool.idle_bytes == 0


def test_keep_for_keeps_idle_only_what_a_message_like_the_last_would_take():
    pool = BufferPool()
    arrays = [pool.empty(4 * MiB) for _ in range(3)] + [pool.empty(8 * MiB) for _ in range(2)]
    del arrays
    assert pool.idle_bytes == 3 * 4 * MiB + 2 * 8 * MiB
    # Two chunks of the 4 MiB class (4 MiB - 5 rounds up to it); 100 bytes never pools.
    assert pool.keep_for([4 * MiB, 4 * MiB - 5, 100]) == 4 * MiB + 2 * 8 * MiB
    assert pool.idle_bytes == 2 * 4 * MiB
    again = [pool.empty(4 * MiB) for _ in range(3)]  # two reused, one mapped
    assert pool.reused == 2 and pool.idle_bytes == 0
    del again
    assert pool.idle_bytes == 2 * 4 * MiB  # the cap stays: the third block went as it died
    assert pool.keep_for([]) == 2 * 4 * MiB and pool.idle_bytes == 0
    pool.keep_for(None)  # no cap: idle blocks of any size stay again
    arrays = [pool.empty(4 * MiB), pool.empty(8 * MiB)]
    del arrays
    assert pool.idle_bytes == 12 * MiB


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        buffer_pool.configure(max_bytes=-1)
    with pytest.raises(ValueError):
        buffer_pool.configure(max_idle=-0.5)
    with pytest.raises(ValueError):
        BufferPool(max_bytes=-1)
    assert (buffer_pool.max_bytes, buffer_pool.max_idle) == (1 << 30, 10.0)  # unchanged


def test_threads_taking_and_dropping_at_once_never_share_memory():
    pool = BufferPool(max_bytes=64 * MiB)
    errors = []

    def work(tag: int) -> None:
        try:
            for _ in range(100):
                a = pool.empty(MiB + tag)
                a[::4096] = tag
                time.sleep(0)
                assert (a[::4096] == tag).all()  # nobody else wrote into it
                del a
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.idle_bytes == sum(size * len(blocks) for size, blocks in pool._idle.items())
    assert pool.idle_bytes <= 64 * MiB


def test_a_collection_inside_the_pools_own_lock_does_not_deadlock(monkeypatch):
    pool = BufferPool()
    cycle: list = [pool.empty(2 * MiB)]
    cycle.append(cycle)  # only the cycle collector can free this array
    del cycle
    real = time.monotonic
    collected = []

    def collecting_clock() -> float:
        if not collected:
            collected.append(gc.collect())  # the lease's __del__ runs here, under the lock
        return real()

    monkeypatch.setattr(_pool.time, "monotonic", collecting_clock)
    done = threading.Event()

    def use() -> None:
        b = pool.empty(4 * MiB)
        del b
        done.set()

    threading.Thread(target=use, daemon=True).start()
    assert done.wait(5), "the pool deadlocked on its own lock"
    monkeypatch.setattr(_pool.time, "monotonic", real)
    pool.empty(8 * MiB)  # the block given back during the collection is in the pool now
    assert 2 * MiB in pool._idle


def test_a_mapping_the_system_refuses_is_a_limit_error(monkeypatch):
    def refuse(size: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(_pool, "_Block", refuse)
    data = streampickle.dumps(np.ones(4 * MiB, dtype=np.uint8))
    with pytest.raises(streampickle.LimitExceededError, match="could not allocate"):
        streampickle.loads(data)


def test_a_child_forked_while_the_lock_is_held_can_use_the_pool():
    import os
    import signal

    with buffer_pool._lock:  # as if another thread were inside the pool at fork time
        pid = os.fork()
        if pid == 0:  # the child: the holder doesn't exist here
            signal.alarm(5)  # a deadlock ends the child, with a non-zero status
            try:
                a = buffer_pool.empty(2 * MiB)
                a[:] = 1
                os._exit(0 if (a == 1).all() else 1)
            finally:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
