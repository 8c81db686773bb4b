"""The sp:// comm backend against what dask.distributed expects of every comm: the behaviours
dask checks for its own backends (client/server exchange, implicit and explicit close,
connect timeouts, many listeners, (de)serialization, addresses, large messages, closing with
a large message in flight), plus sp://'s own: the key, require-encryption, the entry point,
safe loading of the frames and the receive pool's bounds. Real sockets, on asyncio (dask's
event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

pytest.importorskip("distributed")

import anyio
import dask
from distributed.comm import CommClosedError, connect, listen, parse_address, parse_host_port
from distributed.comm.core import FatalCommClosedError
from distributed.comm.registry import backends, get_backend
from distributed.protocol import Serialized, deserialize, serialize, to_serialize
from distributed.utils import get_ip

import streampickle
from _util import relay
from streampickle import dask as sp_dask

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def comm_pair(address: str = "sp://127.0.0.1", **kwargs: Any) -> tuple[Any, Any]:
    """A connected (client, server) pair of comms, handshake done."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def handle(comm: Any) -> None:
        await queue.put(comm)

    listen_args = kwargs.pop("listen_args", {})
    connect_args = kwargs.pop("connect_args", {})
    async with listen(address, handle, **listen_args, **kwargs) as listener:
        client = await connect(listener.contact_address, **connect_args, **kwargs)
    return client, await queue.get()


# --- the exchange ---------------------------------------------------------------------------


async def test_client_server_many_clients_at_once(anyio_backend: str) -> None:
    seen: list[int] = []

    async def handle(comm: Any) -> None:
        try:
            assert parse_address(comm.peer_address)[0] == "sp"
            msg = await comm.read()
            assert msg["op"] == "ping"
            await comm.write({**msg, "op": "pong"})
            assert (await comm.read())["op"] == "done"
        finally:
            await comm.close()

    # Arguments a backend doesn't know are ignored, as by dask's own.
    listener = await listen("sp://127.0.0.1", handle, xxx="bar")
    try:
        scheme, loc = parse_address(listener.listen_address)
        host, port = parse_host_port(loc)
        assert scheme == "sp" and host == "127.0.0.1" and 1023 < port < 65536
        assert listener.contact_address == listener.listen_address

        async def client(key: int, delay: float) -> None:
            comm = await connect(listener.contact_address, xxx="foo")
            try:
                assert comm.peer_address == listener.contact_address
                await comm.write({"op": "ping", "data": key})
                await comm.write({"op": "done"})
                await asyncio.sleep(delay)
                assert await comm.read() == {"op": "pong", "data": key}
                seen.append(key)
            finally:
                await comm.close()

        await client(1234, 0)
        await asyncio.gather(*(client(i, 0.05) for i in range(20)))
        assert sorted(seen) == [*range(20), 1234]
    finally:
        listener.stop()


async def test_a_wildcard_listener_gives_a_concrete_contact_address(anyio_backend: str) -> None:
    async def handle(comm: Any) -> None:
        await comm.write(await comm.read())
        await comm.close()

    for address, port in [("sp://", None), ("sp://0.0.0.0", None), ("sp://:0", None)]:
        async with listen(address, handle) as listener:
            listen_host, listen_port = parse_host_port(parse_address(listener.listen_address)[1])
            contact_host, contact_port = parse_host_port(parse_address(listener.contact_address)[1])
            assert listen_host == "0.0.0.0" and contact_host == get_ip()
            assert listen_port == contact_port and (port is None or port == listen_port)
            comm = await connect(listener.contact_address)
            await comm.write("echo")
            assert await comm.read() == "echo"
            await comm.close()


async def test_addresses_mirror_each_other(anyio_backend: str) -> None:
    a, b = await comm_pair()
    assert a.peer_address == b.local_address
    assert a.local_address == b.peer_address
    assert a.local_address.startswith("sp://127.0.0.1:")
    assert "closed" not in repr(a)
    a.abort()
    b.abort()
    assert a.closed() and b.closed() and "closed" in repr(a)


async def test_many_listeners_get_distinct_addresses(anyio_backend: str) -> None:
    async def handle(comm: Any) -> None:
        pass

    listeners = [await listen("sp://127.0.0.1", handle) for _ in range(100)]
    try:
        assert len({listener.listen_address for listener in listeners}) == 100
        assert len({listener.contact_address for listener in listeners}) == 100
    finally:
        for listener in listeners:
            listener.stop()


async def test_connecting_to_nobody_times_out_with_an_oserror(anyio_backend: str) -> None:
    async def handle(comm: Any) -> None:
        pass

    async with listen("sp://127.0.0.1", handle) as listener:
        address = listener.contact_address
    await asyncio.sleep(0.05)  # the listener's socket is closed by its accept task
    with pytest.raises(OSError, match="Timed out trying to connect to sp://"):
        await connect(address, timeout=0.3)


async def test_a_stopped_listener_accepts_no_one(anyio_backend: str) -> None:
    handled: list[Any] = []

    async def handle(comm: Any) -> None:
        handled.append(comm)

    listener = await listen("sp://127.0.0.1", handle)
    address = listener.contact_address
    listener.stop()
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):
        await connect(address, timeout=0.3)
    assert handled == []


# --- closing --------------------------------------------------------------------------------


async def test_closed_implicitly_by_the_server(anyio_backend: str) -> None:
    async def handle(comm: Any) -> None:
        await comm.close()

    async with listen("sp://127.0.0.1", handle) as listener:
        comm = await connect(listener.contact_address)
        with pytest.raises(CommClosedError):
            await comm.write({})
            await comm.read()
        assert comm.closed()

        comm = await connect(listener.contact_address)
        with pytest.raises(CommClosedError):
            await comm.read()


async def test_closed_explicitly_wakes_reads_on_both_ends(anyio_backend: str) -> None:
    a, b = await comm_pair()
    a_read = asyncio.ensure_future(a.read())
    b_read = asyncio.ensure_future(b.read())
    await asyncio.sleep(0.01)
    await a.close()
    with pytest.raises(CommClosedError):
        await a_read
    with pytest.raises(CommClosedError):
        await b_read
    for comm in (a, b):
        with pytest.raises(CommClosedError):
            await comm.read()
        with pytest.raises(CommClosedError):
            await comm.write({})
    await b.close()
    await b.close()  # twice: nothing


async def test_a_cancelled_read_aborts_the_comm(anyio_backend: str) -> None:
    # As dask's TCP comm: the caller can't know where the message stopped, so the comm goes.
    a, b = await comm_pair()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(a.read(), 0.05)
    assert a.closed()
    with pytest.raises(CommClosedError):
        await b.read()
    await b.close()


async def test_closing_with_a_large_message_in_flight(anyio_backend: str) -> None:
    # The reader gets CommClosedError, never part of the array as a message.
    a, b = await comm_pair()
    big = np.arange(48 << 20, dtype=np.uint8)  # far more than the sockets' buffers
    writing = asyncio.ensure_future(a.write({"x": to_serialize(big)}))
    with anyio.fail_after(10):
        while not a.stream._send_lock.locked():  # noqa: ASYNC110 - serialized (in a thread), now being sent
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # the sockets' buffers fill up; nobody reads yet
    assert not writing.done()
    reading = asyncio.ensure_future(b.read())
    await asyncio.sleep(0)  # the read takes what the buffers hold: part of the message
    a.abort()
    with pytest.raises(CommClosedError):
        await writing
    with pytest.raises(CommClosedError):
        await reading
    assert a.closed() and b.closed()


async def test_a_dropped_comm_closes_its_socket(anyio_backend: str) -> None:
    a, b = await comm_pair()
    sock = a.stream.extra(anyio.abc.SocketAttribute.raw_socket)
    del a
    import gc

    gc.collect()
    assert sock.fileno() == -1
    with pytest.raises(CommClosedError):
        await b.read()


# --- messages -------------------------------------------------------------------------------


async def test_large_arrays_arrive_whole_exact_and_writable(anyio_backend: str) -> None:
    a, b = await comm_pair()
    try:
        # Over dask's 64 MiB shard size, which its TCP comm would split and join again.
        big = np.random.default_rng(0).integers(0, 2**63, size=(9 << 20) + 3, dtype=np.int64)
        small = np.arange(10.0)
        ro = np.arange(1000, dtype=np.int32)
        ro.flags.writeable = False
        # A write returns once the kernel has the bytes, so the peer reads meanwhile (as a
        # dask server's read loop does).
        msg = {"op": "data", "big": to_serialize(big), "small": to_serialize(small), "ro": to_serialize(ro)}
        _, got = await asyncio.gather(a.write(msg), b.read())
        assert got["op"] == "data"
        np.testing.assert_array_equal(got["big"], big)
        np.testing.assert_array_equal(got["small"], small)
        np.testing.assert_array_equal(got["ro"], ro)
        assert got["big"].flags.writeable and got["small"].flags.writeable
        assert not got["ro"].flags.writeable
        # Large bytes and a nested structure, back the other way.
        blob = os.urandom(3 << 20)
        # (msgpack gives sequences back as tuples, on every dask comm)
        nested = {"op": "nested", "deep": (tuple({"k": (i, str(i))} for i in range(50)),), "blob": blob}
        _, back = await asyncio.gather(b.write(nested), a.read())
        assert back == nested
    finally:
        await a.close()
        await b.close()


async def test_a_frame_over_dasks_shard_size_goes_unsplit(anyio_backend: str) -> None:
    # dask splits a payload's frames at distributed.comm.shard (64 MiB) unless the comm says
    # otherwise, and the receiver then joins the pieces with a copy: here each frame travels
    # whole, received into its own memory.
    a, b = await comm_pair()
    sent: list[list[Any]] = []
    send = a._stream.send

    async def recording_send(frames: Any) -> None:
        sent.append(frames)
        await send(frames)

    a._stream.send = recording_send  # type: ignore[method-assign]
    try:
        big = np.arange(9 << 20, dtype=np.int64)  # 72 MiB
        _, got = await asyncio.gather(a.write({"op": "data", "big": to_serialize(big)}), b.read())
        np.testing.assert_array_equal(got["big"], big)
        (frames,) = sent
        sizes = sorted(memoryview(f).nbytes for f in frames)
        assert sizes[-1] == big.nbytes, f"the array's frame was split: frame sizes {sizes}"
    finally:
        await a.close()
        await b.close()


def test_frames_going_out_survive_the_garbage_collector_breaking_a_cycle(anyio_backend: str) -> None:
    # An interrupted write leaves its frames in a reference cycle (traceback, frame, locals).
    # CPython before 3.12.7 crashes when its garbage collector breaks a cycle holding a
    # PickleBuffer of a memoryview (the view is cleared while the buffer still exports it);
    # the frames must go out wrapped another way. In a child process: the failure is a crash.
    program = textwrap.dedent("""
        import gc
        import numpy as np
        from streampickle import dask as sp_dask

        def interrupted():
            out = [sp_dask._frame_out(memoryview(bytearray(1 << 17))),
                   sp_dask._frame_out(memoryview(np.arange(20000.0)))]
            try:
                raise RuntimeError("interrupted write")
            except RuntimeError as exc:
                err = exc  # the traceback's frame holds err and out: a cycle
            return len(out)

        for _ in range(50):
            interrupted()
        gc.collect()
        print("survived")
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]


async def test_the_frames_go_out_of_band_only_when_large(anyio_backend: str) -> None:
    small = b"x" * 100
    large = b"y" * (sp_dask._IN_BAND + 1)
    view = memoryview(bytearray(10))
    out = [sp_dask._frame_out(f) for f in (small, large, view)]
    assert out[0] is small
    assert all(type(o).__name__ == "PickleBuffer" for o in out[1:])
    # and what goes on the wire loads safely, frames back as bytes or writable memory
    back = streampickle.loads(streampickle.dumps(out))
    assert back[0] == small and bytes(back[1]) == large
    assert isinstance(back[2], memoryview) and not back[2].readonly


async def check_deserialize(deserialize_flag: bool, where: str) -> None:
    """A message of Serialize and Serialized values, read with deserialize on or off, on the
    listener's side or the connector's."""
    blob = os.urandom(1 << 20) * 4
    msg = {"op": "update", "x": blob, "to_ser": [to_serialize(123)], "ser": Serialized(*serialize(456)),
           "big": (to_serialize(blob),)}
    received: asyncio.Queue[Any] = asyncio.Queue()
    done = asyncio.Event()

    async def handle(comm: Any) -> None:
        try:
            if where == "listener":
                await received.put(await comm.read())
            else:
                await comm.write(msg)
                await done.wait()
        finally:
            await comm.close()

    listen_flag = deserialize_flag if where == "listener" else True
    connect_flag = deserialize_flag if where == "connector" else True
    async with listen("sp://127.0.0.1", handle, deserialize=listen_flag) as listener:
        comm = await connect(listener.contact_address, deserialize=connect_flag)
    try:
        if where == "listener":
            await comm.write(msg)
            out = await received.get()
        else:
            out = await comm.read()
            done.set()
    finally:
        await comm.close()
    assert out["op"] == "update" and out["x"] == blob
    if deserialize_flag:
        assert list(out["to_ser"]) == [123] and out["ser"] == 456
        assert bytes(out["big"][0]) == blob
    else:
        assert isinstance(out["ser"], Serialized) and deserialize(out["ser"].header, out["ser"].frames) == 456
        (to_ser,) = out["to_ser"]
        assert deserialize(to_ser.header, to_ser.frames) == 123
        (big,) = out["big"]
        assert bytes(deserialize(big.header, big.frames)) == blob


@pytest.mark.parametrize("where", ["listener", "connector"])
@pytest.mark.parametrize("deserialize_flag", [True, False])
async def test_deserialize_flag(anyio_backend: str, deserialize_flag: bool, where: str) -> None:
    await check_deserialize(deserialize_flag, where)


async def test_a_peer_that_sends_anything_but_frames_is_cut_off(anyio_backend: str) -> None:
    handled: list[Any] = []

    async def handle(comm: Any) -> None:
        handled.append(comm)

    async with listen("sp://127.0.0.1", handle) as listener:
        host, port = parse_host_port(parse_address(listener.contact_address)[1])
        async with await streampickle.connect_tcp(host, port) as raw:
            await raw.receive()  # the listener's handshake
            await raw.send({"not": "frames"})
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await raw.receive()
    assert handled == []


# --- sp://'s own: keys, encryption, the entry point, the pool --------------------------------


async def test_the_same_key_on_both_ends_connects(anyio_backend: str) -> None:
    with dask.config.set({"distributed.comm.sp.key": "cluster secret"}):
        a, b = await comm_pair()
    try:
        assert a.stream._keyed and b.stream._keyed
        await a.write({"op": "ping"})
        assert await b.read() == {"op": "ping"}
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("server_key", "client_key"), [("right", None), ("right", "wrong"), (None, "right")]
)
async def test_a_peer_without_the_key_is_refused(anyio_backend: str, server_key: Any, client_key: Any) -> None:
    handled: list[Any] = []

    async def handle(comm: Any) -> None:
        handled.append(comm)

    with dask.config.set({"distributed.comm.sp.key": server_key}):
        listener = await listen("sp://127.0.0.1", handle)
    try:
        with dask.config.set({"distributed.comm.sp.key": client_key}), pytest.raises(CommClosedError):
            await connect(listener.contact_address, timeout=5)
        await asyncio.sleep(0.05)
        assert handled == []
    finally:
        listener.stop()


class _Records(logging.Handler):
    """Collects the records of a logger, and sets ``seen`` at one whose text has ``wanted``."""

    def __init__(self, wanted: str) -> None:
        super().__init__(logging.DEBUG)
        self.wanted = wanted
        self.records: list[logging.LogRecord] = []
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.wanted in record.getMessage():
            self.seen.set()


@contextlib.contextmanager
def _logging(records: _Records) -> Any:
    """``records`` gets the streampickle.dask logger's records from INFO up, meanwhile."""
    log = logging.getLogger("streampickle.dask")
    level = log.level
    log.addHandler(records)
    log.setLevel(logging.INFO)  # (setLevel, not .level: it clears the logger's cached answers)
    try:
        yield
    finally:
        log.removeHandler(records)
        log.setLevel(level)


async def _read_one(comm: Any, handled: list[Any], done: asyncio.Event | None = None) -> None:
    handled.append(await comm.read())
    await comm.close()
    if done is not None:
        done.set()


async def _until_closed(raw: Any) -> None:
    """Read from a raw socket until the peer closes it."""
    with anyio.fail_after(20):  # a guard against a hang
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            while True:
                await raw.receive()


async def test_a_recorded_keyed_session_replayed_is_refused(anyio_backend: str) -> None:
    """An attacker on the path records a client's whole keyed session, then replays it on a
    connection of its own: every tag, sender id and sequence number is genuine, but the
    server's new challenge is not answered."""
    handled: list[Any] = []
    recorded = bytearray()
    with dask.config.set({"distributed.comm.sp.key": "cluster secret"}):
        listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, handled))
        target = parse_host_port(listener.contact_address.removeprefix("sp://"))
        proxy = await anyio.create_tcp_listener(local_host="127.0.0.1")

        async def proxy_one() -> None:
            client_side = await proxy.listeners[0].accept()
            async with client_side, await anyio.connect_tcp(*target) as server_side, anyio.create_task_group() as tg:
                tg.start_soon(relay, client_side, server_side, recorded)
                tg.start_soon(relay, server_side, client_side, None)

        try:
            async with proxy, anyio.create_task_group() as tg:
                tg.start_soon(proxy_one)
                comm = await connect(f"sp://127.0.0.1:{proxy.extra(anyio.abc.SocketAttribute.local_port)}", timeout=10)
                await comm.write({"op": "delete", "key": "x"})
                await comm.close()
            assert handled == [{"op": "delete", "key": "x"}]  # the genuine session ran

            async with await anyio.connect_tcp(*target) as attacker:
                await attacker.send(bytes(recorded))
                await _until_closed(attacker)
            assert handled == [{"op": "delete", "key": "x"}]  # the replay ran nothing
        finally:
            listener.stop()


async def test_a_servers_own_keyed_handshake_relayed_to_itself_is_refused(anyio_backend: str) -> None:
    """Two connections to one keyed listener, each fed what the listener says on the other:
    each gets a genuine handshake of the key, in the listener's own role."""
    handled: list[Any] = []
    records = _Records("role")
    with dask.config.set({"distributed.comm.sp.key": "cluster secret"}), _logging(records):
        listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, handled))
        target = parse_host_port(listener.contact_address.removeprefix("sp://"))
        try:
            async with await anyio.connect_tcp(*target) as first, await anyio.connect_tcp(*target) as second:
                with anyio.fail_after(20):  # a guard against a hang
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(relay, first, second)
                        tg.start_soon(relay, second, first)
            assert handled == []
            assert len([r for r in records.records if "claims the role 'responder'" in r.getMessage()]) == 2
        finally:
            listener.stop()


@pytest.mark.parametrize("sent", [1.0, 0.5], ids=["after-its-hello", "mid-hello"])
async def test_a_key_holder_cut_in_the_handshake_may_be_retried(anyio_backend: str, sent: float) -> None:
    """A listener that sent its genuine hello (or part of it) and then went, as a crash
    does: the failure is an ordinary CommClosedError, which dask's connect retries, not a
    fatal one (the listener proved the key, or may have)."""
    with dask.config.set({"distributed.comm.sp.key": "cluster secret"}):
        hello = b"".join(bytes(c) for c in streampickle.Encoder(key=sp_dask.cluster_key()).encode(
            ("streampickle-handshake-1", "responder", os.urandom(16))
        ))
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, \
                anyio.create_task_group() as tg:

            async def send_then_crash() -> None:
                async with await listener.listeners[0].accept() as raw:
                    await raw.send(hello[: int(len(hello) * sent)])

            tg.start_soon(send_then_crash)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            with pytest.raises(CommClosedError) as info:
                await get_backend("sp").get_connector().connect(f"127.0.0.1:{port}")
            assert not isinstance(info.value, FatalCommClosedError)


async def test_a_keyed_peer_without_the_handshake_is_refused_for_good(anyio_backend: str) -> None:
    """A peer with the key whose streampickle predates the handshake: retrying can't help."""
    with dask.config.set({"distributed.comm.sp.key": "cluster secret"}):
        key = sp_dask.cluster_key()
        listener = await streampickle.create_tcp_listener(local_host="127.0.0.1", key=key)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:

            async def old_server() -> None:
                async with await listener.accept() as stream:
                    await stream.send([b"a dask handshake, as before"])
                    with contextlib.suppress(Exception):
                        await stream.receive()

            tg.start_soon(old_server)
            with pytest.raises(FatalCommClosedError, match="handshake"):
                await get_backend("sp").get_connector().connect(f"127.0.0.1:{port}")


async def test_a_peer_stalled_in_dasks_handshake_is_dropped_at_the_connect_timeout(anyio_backend: str) -> None:
    """Without a key there is no streampickle handshake, and dask's has no deadline of its
    own: the listener bounds it with distributed.comm.timeouts.connect."""
    with dask.config.set({"distributed.comm.sp.key": None, "distributed.comm.timeouts.connect": "1s"}):
        listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, []))
        try:
            async with await anyio.connect_tcp(*parse_host_port(listener.contact_address.removeprefix("sp://"))) as raw:
                await _until_closed(raw)  # (its guard is 20 s)
        finally:
            listener.stop()


async def test_stalled_connections_cant_keep_a_keyed_client_out(anyio_backend: str) -> None:
    """Peers that connect and say nothing hold a descriptor each until the connect timeout;
    past distributed.comm.sp.max-handshakes the listener drops the oldest for a newcomer."""
    handled: list[Any] = []
    with dask.config.set({"distributed.comm.sp.key": "cluster secret", "distributed.comm.sp.max-handshakes": 4}):
        listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, handled))
        target = parse_host_port(listener.contact_address.removeprefix("sp://"))
        stalled = [await anyio.connect_tcp(*target) for _ in range(10)]
        try:
            comm = await connect(listener.contact_address, timeout=20)
            await comm.write({"op": "ping"})
            await comm.close()
            # accepted in order, so the first 7 of the 10 were dropped for the last 3 and the client
            for raw in stalled[:7]:
                await _until_closed(raw)
            assert handled == [{"op": "ping"}]
        finally:
            for raw in stalled:
                await raw.aclose()
            listener.stop()


async def test_connections_count_against_the_cap_as_they_are_accepted(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a flood the connections' tasks may not run for a while: the cap holds anyway, so
    accepted connections waiting for their tasks can't take every descriptor."""
    started: list[Any] = []
    all_started, never = asyncio.Event(), asyncio.Event()

    async def starved(self: Any, stream: Any, peer: str) -> None:  # a handler that never gets going
        started.append(stream)
        if len(started) == 20:
            all_started.set()
        await never.wait()

    monkeypatch.setattr(sp_dask.SPListener, "_handle", starved)
    with dask.config.set({"distributed.comm.sp.key": "cluster secret", "distributed.comm.sp.max-handshakes": 4}):
        listener = await listen("sp://127.0.0.1", lambda comm: None)
    target = parse_host_port(listener.contact_address.removeprefix("sp://"))
    flood = [await anyio.connect_tcp(*target) for _ in range(20)]
    try:
        with anyio.fail_after(20):  # a guard against a hang
            await all_started.wait()
        for raw in flood[:16]:  # dropped, oldest first, though none of their tasks did anything
            await _until_closed(raw)
    finally:
        for raw in flood:
            await raw.aclose()
        for stream in started:  # (the starved handlers never close theirs)
            stream.abort()
        never.set()
        listener.stop()


async def test_a_peer_gone_before_its_address_is_read_is_dropped_quietly(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getpeername fails (ENOTCONN) for a peer that reset its connection right after it was
    accepted: that connection is closed, and the listener goes on."""
    peer = sp_dask.SPListener._peer
    reset: list[Any] = []

    def first_one_reset(self: Any, stream: Any) -> str:
        if not reset:
            reset.append(stream)
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return peer(self, stream)

    monkeypatch.setattr(sp_dask.SPListener, "_peer", first_one_reset)
    handled: list[Any] = []
    done = asyncio.Event()
    listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, handled, done))
    try:
        async with await anyio.connect_tcp(*parse_host_port(listener.contact_address.removeprefix("sp://"))) as raw:
            await _until_closed(raw)
        comm = await connect(listener.contact_address, timeout=20)
        await comm.write({"op": "ping"})
        await comm.close()
        with anyio.fail_after(20):  # a guard against a hang
            await done.wait()
        assert handled == [{"op": "ping"}]
    finally:
        listener.stop()


async def test_a_listener_waits_out_running_out_of_descriptors(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() failing with EMFILE (the process at its open-file limit) doesn't end the
    listener: it tries again, and the waiting peer is served."""
    failures = []
    accept = streampickle.ObjectStreamListener.accept

    async def accept_after_emfile(self: Any) -> Any:
        if not failures:
            failures.append(1)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await accept(self)

    monkeypatch.setattr(streampickle.ObjectStreamListener, "accept", accept_after_emfile)
    handled: list[Any] = []
    done = asyncio.Event()
    listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, handled, done))
    try:
        comm = await connect(listener.contact_address, timeout=20)
        await comm.write({"op": "ping"})
        await comm.close()
        with anyio.fail_after(20):  # a guard against a hang
            await done.wait()
        assert failures == [1] and handled == [{"op": "ping"}]
    finally:
        listener.stop()


async def test_a_key_holder_cut_after_the_handshake_is_not_called_a_stranger(anyio_backend: str) -> None:
    """Its key is proven, so the listener logs a lost connection, not a refused stranger."""
    handled: list[Any] = []
    records = _Records("closed before the handshake completed")
    with dask.config.set({"distributed.comm.sp.key": "cluster secret"}), _logging(records):
        key = sp_dask.cluster_key()
        listener = await listen("sp://127.0.0.1", lambda comm: _read_one(comm, handled))
        try:
            host, port = parse_host_port(listener.contact_address.removeprefix("sp://"))
            stream = await streampickle.connect_tcp(host, port, key=key)
            with anyio.fail_after(20):  # a guard against a hang
                await stream.handshake(initiator=True)
                await stream.receive()  # dask's handshake; the listener now waits for ours
                stream.abort()
                await records.seen.wait()
            assert [r.levelname for r in records.records] == ["INFO"]
            assert handled == []
        finally:
            listener.stop()


async def test_the_key_comes_from_the_environment_too(anyio_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sp_dask.KEY_ENV, "from the environment")
    with dask.config.set({"distributed.comm.sp.key": None}):
        key = sp_dask.cluster_key()
    assert key is not None
    with dask.config.set({"distributed.comm.sp.key": "from config", "distributed.comm.sp.mac": "blake3"}):
        pytest.importorskip("blake3")
        assert sp_dask.cluster_key() is not None
    monkeypatch.delenv(sp_dask.KEY_ENV)
    with dask.config.set({"distributed.comm.sp.key": None}):
        assert sp_dask.cluster_key() is None
    with dask.config.set({"distributed.comm.sp.key": "k", "distributed.comm.sp.mac": "md5"}), \
            pytest.raises(streampickle.UsageError, match=r"distributed\.comm\.sp\.mac"):
        sp_dask.cluster_key()


async def test_require_encryption_refuses_sp(anyio_backend: str) -> None:
    async def handle(comm: Any) -> None:
        pass

    with pytest.raises(sp_dask.EncryptionRequiredError, match="require-encryption"):
        listen("sp://127.0.0.1", handle, require_encryption=True)
    async with listen("sp://127.0.0.1", handle) as listener:
        with pytest.raises(sp_dask.EncryptionRequiredError, match="tls://"):
            await connect(listener.contact_address, require_encryption=True)
        with dask.config.set({"distributed.comm.require-encryption": True}), \
                pytest.raises(sp_dask.EncryptionRequiredError):
            await connect(listener.contact_address)


async def test_dask_finds_the_backend_through_its_entry_point(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(backends, "sp", raising=False)
    backend = get_backend("sp")
    assert isinstance(backend, sp_dask.SPBackend)
    assert backend.resolve_address("localhost:80") == "127.0.0.1:80"
    assert backend.get_address_host("127.0.0.1:80") == "127.0.0.1"


@pytest.mark.parametrize("scheme", ["sp", "sp+unix"])
async def test_a_listening_process_bounds_the_receive_pool(anyio_backend: str, scheme: str) -> None:
    pool = streampickle.buffer_pool
    saved = (pool.max_bytes, pool.max_idle, pool.release_before_map)

    async def handle(comm: Any) -> None:
        pass

    async def start_listening() -> None:
        async with listen(f"{scheme}://127.0.0.1", handle):
            pass

    try:
        pool.configure(max_bytes=1 << 30, max_idle=10.0, release_before_map=False)  # streampickle's defaults ...
        get_backend(scheme)  # (finding the backend, as a client does, changes nothing)
        await connect_nowhere(scheme)
        assert (pool.max_bytes, pool.max_idle, pool.release_before_map) == (1 << 30, 10.0, False)
        await start_listening()
        # ... give way to dask's: 256 MiB for 1 s, idle memory of another size unmapped first
        assert (pool.max_bytes, pool.max_idle, pool.release_before_map) == (256 << 20, 1.0, True)
        config = {"distributed.comm.sp.pool.max-bytes": "8 MiB", "distributed.comm.sp.pool.max-idle": "1s"}
        with dask.config.set(config):
            await start_listening()
        assert (pool.max_bytes, pool.max_idle) == (8 << 20, 1.0)  # what the config says, applies
        pool.configure(max_bytes=3 << 20, max_idle=5.0)  # the process's own bounds ...
        await start_listening()
        assert (pool.max_bytes, pool.max_idle) == (3 << 20, 5.0)  # ... stay
        with dask.config.set({"distributed.comm.sp.pool.max-bytes": 0}):
            await start_listening()
        assert pool.max_bytes == 0  # no pool at all
    finally:
        pool.configure(max_bytes=saved[0], max_idle=saved[1], release_before_map=saved[2])


@pytest.mark.parametrize("scheme", ["sp", "sp+unix"])
async def test_the_listeners_loop_unmaps_idle_receive_memory_with_nothing_received(
    anyio_backend: str, scheme: str
) -> None:
    """A received array dies and its memory goes idle in the pool; with no further receive,
    the listening process's event loop unmaps it once it has been idle for max-idle."""
    pool = streampickle.buffer_pool
    saved = (pool.max_bytes, pool.max_idle, pool.release_before_map)
    pool.release()
    config = {"distributed.comm.sp.pool.max-bytes": "64 MiB", "distributed.comm.sp.pool.max-idle": "300ms"}
    try:
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def handle(comm: Any) -> None:
            await queue.put(comm)

        with dask.config.set(config):
            listener = await listen(f"{scheme}://127.0.0.1", handle)
        a = await connect(listener.contact_address)
        b = await queue.get()
        try:
            assert (pool.max_bytes, pool.max_idle) == (64 << 20, 0.3)
            big = np.arange(2 << 20, dtype=np.float64)  # 16 MiB
            _, got = await asyncio.gather(a.write({"x": to_serialize(big)}), b.read())
            np.testing.assert_array_equal(got["x"], big)
            del got
            await dropped()
            assert pool.idle_bytes == 16 << 20  # the array died: its memory is idle
            for _ in range(400):  # the loop trims every 75 ms; wait up to 20 s on a busy machine
                await asyncio.sleep(0.05)
                if pool.idle_bytes == 0:
                    break
            assert pool.idle_bytes == 0, "the idle block stayed with nothing received"
        finally:
            await a.close()
            await b.close()
            listener.stop()
        # The listener is stopped: nothing trims from this loop any more.
        trimmer = sp_dask._trimmers.get(asyncio.get_running_loop())
        assert trimmer is not None and trimmer._handle is None
    finally:
        pool.configure(max_bytes=saved[0], max_idle=saved[1], release_before_map=saved[2])


async def test_after_a_message_the_pool_keeps_idle_only_what_one_like_it_would_take(anyio_backend: str) -> None:
    """Three 4 MiB arrays received and dropped leave three idle blocks; a message with one
    4 MiB array reuses one and leaves idle only one more, not two, also once it dies."""
    pool = streampickle.buffer_pool
    saved = (pool.max_bytes, pool.max_idle, pool.release_before_map)
    pool.release()
    try:
        with dask.config.set({"distributed.comm.sp.pool.max-idle": "60s"}):
            a, b = await comm_pair()
        try:
            arrays = [np.full(MiB4 // 8, k, dtype=np.float64) for k in range(3)]
            _, got = await asyncio.gather(a.write({"x": [to_serialize(x) for x in arrays]}), b.read())
            assert [float(x[-1]) for x in got["x"]] == [0.0, 1.0, 2.0]
            del got
            await dropped()
            assert pool.idle_bytes == 3 * MiB4
            _, got = await asyncio.gather(a.write({"y": to_serialize(arrays[1])}), b.read())
            np.testing.assert_array_equal(got["y"], arrays[1])
            assert pool.idle_bytes == MiB4  # one reused, one kept for the next such message
            del got
            await dropped()
            assert pool.idle_bytes == MiB4  # the cap holds as arrays die: one such block idle
            # A message without a pooled chunk says nothing about the next: nothing changes.
            _, got = await asyncio.gather(a.write({"op": "heartbeat"}), b.read())
            assert got == {"op": "heartbeat"} and pool.idle_bytes == MiB4
        finally:
            await a.close()
            await b.close()
    finally:
        pool.configure(max_bytes=saved[0], max_idle=saved[1], release_before_map=saved[2])
        pool.keep_for(None)
        pool.release()


MiB4 = 4 << 20


async def dropped() -> None:
    """Let the loop run a few turns: the read's future lets go of the message only then."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def connect_nowhere(scheme: str) -> None:
    """A connect that fails: a client's use of the backend."""
    address = "sp://127.0.0.1:1" if scheme == "sp" else "sp+unix://127.0.0.1/nonexistent/socket"
    with pytest.raises(OSError):
        await connect(address, timeout=0.1)


# --- sp+unix:// ------------------------------------------------------------------------------


async def test_unix_client_server_and_addresses(anyio_backend: str) -> None:
    async def handle(comm: Any) -> None:
        await comm.write(await comm.read())
        await comm.close()

    listener = await listen("sp+unix://127.0.0.1", handle)
    try:
        scheme, loc = parse_address(listener.contact_address)
        host, path = sp_dask._split_unix(loc)
        assert scheme == "sp+unix" and host == "127.0.0.1" and path is not None
        assert listener.listen_address == listener.contact_address
        assert os.stat(path).st_mode & 0o777 == 0o600  # this user's processes only
        assert get_backend("sp+unix").get_address_host(loc) == "127.0.0.1"

        async def client(n: int) -> None:
            comm = await connect(listener.contact_address)
            try:
                assert comm.peer_address == listener.contact_address
                await comm.write({"n": n, "a": to_serialize(np.arange(n))})
                back = await comm.read()
                assert back["n"] == n and np.array_equal(back["a"], np.arange(n))
            finally:
                await comm.close()

        await asyncio.gather(*(client(n) for n in range(0, 200_000, 20_000)))
    finally:
        listener.stop()
    with pytest.raises(FileNotFoundError):
        os.stat(path)  # stop() removed the socket file


async def test_unix_addresses_name_a_host(anyio_backend: str) -> None:
    # What dask's command line and LocalCluster hand a listener: a host, maybe with a port.
    for loc in ("", ":8786", "127.0.0.1", "127.0.0.1:0", "/tmp/x.sock"):
        assert sp_dask._split_unix(loc)[0] == "127.0.0.1"
    assert sp_dask._split_unix("10.0.0.5/tmp/x.sock") == ("10.0.0.5", "/tmp/x.sock")
    assert sp_dask._split_unix("[::1]:0") == ("::1", None)


async def test_unix_at_a_given_path(anyio_backend: str, tmp_path: Any) -> None:
    async def handle(comm: Any) -> None:
        await comm.write("hello")
        await comm.close()

    path = str(tmp_path / "scheduler.sock")
    async with listen(f"sp+unix://127.0.0.1{path}", handle) as listener:
        assert listener.contact_address == f"sp+unix://127.0.0.1{path}"
        comm = await connect(f"sp+unix://{path}")  # the host may be left out
        assert await comm.read() == "hello"
        await comm.close()


async def test_unix_hands_shared_memory_over_as_such(anyio_backend: str) -> None:
    a, b = await comm_pair("sp+unix://127.0.0.1")
    try:
        assert a._share and b._share
        shared = streampickle.shared_empty(1 << 20, np.float64)
        shared[:] = 1.0
        plain = np.full(1 << 20, 2.0)
        _, got = await asyncio.gather(a.write({"s": to_serialize(shared), "p": to_serialize(plain)}), b.read())
        assert got["s"].sum() == 1 << 20 and got["p"].sum() == 2 << 20
        shared[7] = 42.0  # the same memory: the receiver sees the sender's later write ...
        plain[7] = 42.0  # ... and not for an ordinary array, which was copied
        assert got["s"][7] == 42.0 and got["p"][7] == 2.0
    finally:
        await a.close()
        await b.close()


async def test_unix_with_a_key_authenticates_and_shares_nothing(anyio_backend: str) -> None:
    with dask.config.set({"distributed.comm.sp.key": "secret"}):
        a, b = await comm_pair("sp+unix://127.0.0.1")
    try:
        assert not a._share and not b._share and a.stream._keyed
        shared = streampickle.shared_empty(1000, np.int64)
        shared[:] = 5
        _, got = await asyncio.gather(a.write({"s": to_serialize(shared)}), b.read())
        shared[0] = 6
        assert got["s"][0] == 5 and got["s"].sum() == 5000  # a copy: bytes travelled
    finally:
        await a.close()
        await b.close()
    handled: list[Any] = []

    async def handle(comm: Any) -> None:
        handled.append(comm)

    with dask.config.set({"distributed.comm.sp.key": "secret"}):
        listener = await listen("sp+unix://127.0.0.1", handle)
    try:
        with dask.config.set({"distributed.comm.sp.key": None}), pytest.raises(CommClosedError):
            await connect(listener.contact_address, timeout=5)
        assert handled == []
    finally:
        listener.stop()


async def test_unix_frames_past_the_descriptor_cap_travel_as_bytes(anyio_backend: str) -> None:
    frames = [memoryview(streampickle.shared_empty(16, np.uint8)) for _ in range(sp_dask._SHARE_MAX + 5)]
    out = sp_dask._shared_frames([b"header", *frames])
    assert out[0] == b"header"
    in_shm = [sp_dask._shm.find([o.raw()])[0] is not None for o in out[1:]]
    assert in_shm == [True] * sp_dask._SHARE_MAX + [False] * 5
