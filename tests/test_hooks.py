"""Pickle's hooks: ``Encoder(pickler_class=, dispatch_table=, persistent_id=)`` and
``Decoder(persistent_load=)``, through the one-shot helpers and every stream API.

What must hold: a custom pickler's own reducers and tables work, out-of-band buffers still
leave as side chunks of the caller's memory (numpy arrays inside a cloudpickled closure too),
the library's reducers apply unless the user's hooks take the type first, the memo-less fast
paths are not taken, and safe loading is unchanged: what the hooks make loads only if its
globals are allowed (or the peer is trusted), and a persistent id loads only where the decoder
has a ``persistent_load``, judged by both verifier twins alike.
"""

from __future__ import annotations

import fractions
import os
import pickle
import random
import socket
import threading
from collections.abc import Callable
from typing import Any

import anyio
import cloudpickle
import numpy as np
import pytest
from anyio.abc import SocketAttribute

import streampickle
from streampickle import (
    Decoder,
    Encoder,
    ForbiddenGlobalError,
    MalformedPickleError,
    ObjectStream,
    UsageError,
    _shm,
    _verify,
    _wire,
)
from streampickle._accel import speedups
from streampickle._encoder import Chunk
from streampickle._safe import Loader
from streampickle._scan import scan_py
from streampickle.testing import memory_stream_pair

P5 = b"\x80\x05"
MEMOIZE = b"\x94"


def joined(chunks: list[Chunk]) -> bytes:
    return b"".join(bytes(memoryview(c).cast("B")) for c in chunks)


def header_of(chunks: list[Chunk]) -> _wire.Header:
    return _wire.parse_header(memoryview(chunks[0])[: _wire.HEADER_SIZE])


def address_of(buffer: Any) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0])


def closure_over(array: np.ndarray[Any, Any]) -> Callable[[], float]:
    """A function cloudpickle pickles by value, whose closure holds ``array``."""
    scale = 2.0
    return lambda: float(array.sum()) * scale


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


def make_point(x: int, y: int) -> Point:
    return Point(x, y)


def array_from_list(items: list[Any]) -> np.ndarray[Any, Any]:
    return np.array(items)


# -- pickler_class -------------------------------------------------------------------------


def test_a_cloudpickled_closure_sends_its_array_as_a_side_chunk_of_the_arrays_memory() -> None:
    array = np.arange(50_000, dtype=np.float64)
    chunks = Encoder(pickler_class=cloudpickle.Pickler).encode(closure_over(array))
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert len(views) == 1
    assert address_of(views[0]) == address_of(array)  # the array's own memory, not a copy
    assert views[0].nbytes == array.nbytes
    header = header_of(chunks)
    assert header.chunk_count == 1
    assert header.pickle_length < 4096  # the array's bytes are not in the pickle
    decoder = Decoder(trusted=True)
    decoder.feed(joined(chunks))
    function = next(decoder)
    assert function() == float(array.sum()) * 2.0


def test_a_cloudpickled_lambda_is_refused_by_a_safe_decoder_and_loads_trusted() -> None:
    message = streampickle.dumps(lambda x: x + 1, pickler_class=cloudpickle.Pickler)
    with pytest.raises(ForbiddenGlobalError, match="cloudpickle"):
        streampickle.loads(message)
    with pytest.raises(ForbiddenGlobalError):
        decoder = Decoder()
        decoder.feed(message)
        next(decoder)
    assert streampickle.loads(message, trusted=True)(41) == 42


def test_the_librarys_reducers_apply_under_a_custom_pickler_class() -> None:
    """Values a safe peer rebuilds still travel as reconstructor calls: cloudpickle's
    copyreg table would pickle complex by builtins.complex, which a safe peer refuses."""
    value = {"c": 1 + 2j, "f": fractions.Fraction(1, 3), "a": np.arange(3), "s": np.float32(1.5)}
    for cls in (cloudpickle.Pickler, pickle.Pickler):
        got = streampickle.loads(streampickle.dumps(value, pickler_class=cls))
        assert got["c"] == 1 + 2j and got["f"] == fractions.Fraction(1, 3) and got["s"] == np.float32(1.5)
        np.testing.assert_array_equal(got["a"], np.arange(3))


def test_a_plain_pickler_subclass_keeps_arrays_zero_copy() -> None:
    class Mine(pickle.Pickler):
        pass

    array = np.arange(1000, dtype=np.int32)
    chunks = Encoder(pickler_class=Mine).encode([array])
    assert address_of(chunks[-1]) == address_of(array)
    np.testing.assert_array_equal(streampickle.loads(joined(chunks))[0], array)


def test_the_pickler_classs_reducer_override_comes_before_the_librarys() -> None:
    seen: list[type] = []

    class Lists(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            seen.append(type(obj))
            if type(obj) is np.ndarray:
                return array_from_list, (obj.tolist(),)
            return NotImplemented

    chunks = Encoder(pickler_class=Lists).encode(np.arange(4))
    assert header_of(chunks).chunk_count == 0  # the user's reduction: no side chunk
    assert b"array_from_list" in joined(chunks)
    assert np.ndarray in seen
    with pytest.raises(ForbiddenGlobalError, match="array_from_list"):
        streampickle.loads(joined(chunks))
    np.testing.assert_array_equal(streampickle.loads(joined(chunks), allow=[array_from_list]), np.arange(4))

    class Declines(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            return NotImplemented

    chunks = Encoder(pickler_class=Declines).encode(np.arange(4))
    assert header_of(chunks).chunk_count == 1  # declined: the library's reduction


def test_a_pickler_class_must_be_a_pickle_pickler() -> None:
    for bad in (int, "cloudpickle.Pickler", pickle._Pickler, object()):
        with pytest.raises(UsageError, match="pickler_class"):
            Encoder(pickler_class=bad)  # type: ignore[arg-type]


# -- dispatch_table ------------------------------------------------------------------------


def test_a_dispatch_table_reduces_its_types() -> None:
    calls: list[Point] = []

    def reduce_point(p: Point) -> Any:
        calls.append(p)
        return make_point, (p.x, p.y)

    message = streampickle.dumps([Point(1, 2), Point(3, 4)], dispatch_table={Point: reduce_point})
    assert len(calls) == 2
    with pytest.raises(ForbiddenGlobalError, match="make_point"):
        streampickle.loads(message)
    assert streampickle.loads(message, allow=[make_point]) == [Point(1, 2), Point(3, 4)]


def test_a_dispatch_table_comes_before_the_librarys_reducers() -> None:
    table = {np.ndarray: lambda a: (array_from_list, (a.tolist(),)), complex: lambda c: (make_point, (1, 2))}
    chunks = Encoder(dispatch_table=table).encode([np.arange(3), 1j])
    assert header_of(chunks).chunk_count == 0
    got = streampickle.loads(joined(chunks), allow=[array_from_list, make_point])
    np.testing.assert_array_equal(got[0], np.arange(3))
    assert got[1] == Point(1, 2)
    # types not in the table still get the library's reductions
    chunks = Encoder(dispatch_table=table).encode(fractions.Fraction(2, 3))
    assert streampickle.loads(joined(chunks)) == fractions.Fraction(2, 3)


def test_a_dispatch_table_keeps_the_pickler_classs_own_table() -> None:
    """cloudpickle pickles code objects through its class's dispatch_table: a table given
    beside it is put in front of that one, not in its place."""
    code = closure_over.__code__
    message = streampickle.dumps(
        (code, Point(5, 6)),
        pickler_class=cloudpickle.Pickler,
        dispatch_table={Point: lambda p: (make_point, (p.x, p.y))},
    )
    got_code, point = streampickle.loads(message, trusted=True)
    assert got_code == code and point == Point(5, 6)


def test_a_dispatch_table_is_read_live_as_pickle_reads_it() -> None:
    table: dict[type, Callable[[Any], Any]] = {}
    encoder = Encoder(dispatch_table=table)
    with pytest.raises(ForbiddenGlobalError, match="Point"):  # pickled by its class, which is not allowed
        streampickle.loads(joined(encoder.encode(Point(1, 2))), allow=[make_point])
    table[Point] = lambda p: (make_point, (p.x, p.y))
    assert streampickle.loads(joined(encoder.encode(Point(1, 2))), allow=[make_point]) == Point(1, 2)


def test_a_dispatch_table_must_be_a_mapping() -> None:
    with pytest.raises(UsageError, match="dispatch_table"):
        Encoder(dispatch_table=[(Point, make_point)])  # type: ignore[arg-type]


# -- persistent_id and persistent_load -----------------------------------------------------


class Resource:
    """Something that is not pickled: a lock, as a handle to a process-local object."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()


RESOURCES = {"db": Resource("db"), "cache": Resource("cache")}


def resource_id(obj: Any) -> Any:
    return ("resource", obj.name) if type(obj) is Resource else None


def load_resource(pid: Any) -> Resource:
    kind, name = pid
    assert kind == "resource"
    return RESOURCES[name]


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_persistent_ids_round_trip(trusted: bool) -> None:
    value = {"first": RESOURCES["db"], "both": [RESOURCES["db"], RESOURCES["cache"]], "n": 1, "a": np.arange(3)}
    message = streampickle.dumps(value, persistent_id=resource_id)
    got = streampickle.loads(message, persistent_load=load_resource, trusted=trusted)
    assert got["first"] is RESOURCES["db"]
    assert got["both"][0] is RESOURCES["db"] and got["both"][1] is RESOURCES["cache"]
    np.testing.assert_array_equal(got["a"], np.arange(3))
    decoder = Decoder(persistent_load=load_resource, trusted=trusted)
    for byte in range(len(message)):  # fed a byte at a time
        decoder.feed(message[byte : byte + 1])
    assert next(decoder)["first"] is RESOURCES["db"]


@pytest.mark.parametrize("trusted", [False, True], ids=["safe", "trusted"])
def test_a_persistent_id_without_persistent_load_is_refused(trusted: bool) -> None:
    message = streampickle.dumps([RESOURCES["db"]], persistent_id=resource_id)
    with pytest.raises(MalformedPickleError) as err:
        streampickle.loads(message, trusted=trusted)
    if trusted:  # the unpickler's own refusal, chained
        assert "persistent_load" in str(err.value.__cause__)
    else:
        assert "BINPERSID is not allowed: persistent ids need a decoder with persistent_load" in str(err.value)


def test_persistent_load_is_called_once_per_persistent_id() -> None:
    calls: list[Any] = []

    def load(pid: Any) -> Any:
        calls.append(pid)
        return pid * 2

    message = streampickle.dumps(list(range(20)), persistent_id=lambda o: o if type(o) is int and o % 2 else None)
    assert streampickle.loads(message, persistent_load=load) == [i * 2 if i % 2 else i for i in range(20)]
    assert calls == list(range(1, 20, 2))


def test_persistent_load_results_are_opaque_to_the_verifier() -> None:
    """What persistent_load returns can be a key or an item, never a container the pickle
    fills or an instance it builds."""
    message = streampickle.dumps({RESOURCES["db"]: 1}, persistent_id=resource_id)
    assert streampickle.loads(message, persistent_load=load_resource) == {RESOURCES["db"]: 1}
    pid = b"\x8c\x01x\x94"
    for tail, rule in ((b"Q]a.", "APPEND into a result of an allowed callable"),
                       (b"Q}b.", "BUILD on a result of an allowed callable")):
        with pytest.raises(MalformedPickleError, match=rule):
            Loader(persistent_load=lambda p: []).load_inband(P5 + pid + tail)
    with pytest.raises(MalformedPickleError, match="BINPERSID needs 1 items"):
        Loader(persistent_load=lambda p: p).load_inband(P5 + b"Q.")


def _shared_pid_pickle(items: int, calls: int) -> bytes:
    """A tuple of ``items`` Nones, memoized, then passed as the persistent id ``calls`` times."""
    return P5 + b"(" + b"N" * items + b"t\x940" + b"h\x00Q0" * calls + b"N."


def test_persistent_ids_are_charged_to_the_work_budget() -> None:
    """A memoized id passed again and again: the callable may hash it each time (a dict
    lookup does), so its tree is charged per use, as a dict key's is."""
    calls: list[Any] = []
    loader = Loader(persistent_load=calls.append)
    assert loader.load_inband(_shared_pid_pickle(5, 100)) is None
    assert len(calls) == 100
    with pytest.raises(MalformedPickleError, match="BINPERSID: the persistent ids would take work out of proportion"):
        loader.load_inband(_shared_pid_pickle(5000, 100))
    assert len(calls) == 100  # refused before anything was unpickled


def test_a_persistent_loads_error_is_the_decoders() -> None:
    message = streampickle.dumps([RESOURCES["db"]], persistent_id=resource_id)
    with pytest.raises(MalformedPickleError, match="KeyError"):
        streampickle.loads(message, persistent_load={}.__getitem__)


def test_keyed_streams_take_the_hooks() -> None:
    encoder = Encoder(key=b"k" * 32, pickler_class=cloudpickle.Pickler, persistent_id=resource_id)
    decoder = Decoder(key=b"k" * 32, trusted=True, persistent_load=load_resource)
    array = np.arange(10_000)
    for _ in range(2):
        decoder.feed(joined(encoder.encode([closure_over(array), RESOURCES["db"]])))
        function, resource = next(decoder)
        assert function() == float(array.sum()) * 2.0 and resource is RESOURCES["db"]


def test_hook_types_are_checked() -> None:
    with pytest.raises(UsageError, match="persistent_id"):
        Encoder(persistent_id=5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="persistent_load"):
        Decoder(persistent_load=5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="persistent_load"):
        Decoder(options=streampickle._options.Options(), persistent_load=load_resource)


# -- the general path ----------------------------------------------------------------------


def test_with_a_hook_the_memo_less_fast_path_is_not_taken() -> None:
    """An unshared plain graph is pickled without MEMOIZE by default; with any hook the
    pickler's own dump runs, memo and all, and persistent_id sees every object."""
    graph = [[str(i) * 3 for i in range(2)], [str(i) * 3 for i in range(5, 6)]]  # strs made now: unshared
    assert MEMOIZE not in joined(Encoder().encode(graph))
    seen: list[Any] = []
    hooks: list[dict[str, Any]] = [
        {"persistent_id": lambda o: seen.append(o)},
        {"pickler_class": pickle.Pickler},
        {"dispatch_table": {Point: make_point}},
    ]
    for hook in hooks:
        for chunks in (Encoder(**hook).encode(graph), [streampickle.dumps(graph, **hook)]):
            assert MEMOIZE in joined(chunks), hook
            assert streampickle.loads(joined(chunks)) == graph
        big = [[str(i)] for i in range(5000)]  # past the small-message path
        assert MEMOIZE in joined(Encoder(**hook).encode(big)), hook
    assert graph[0] in seen and graph[1] in seen and "000" in seen


def test_a_hooked_encoder_is_reusable_after_a_failure() -> None:
    encoder = Encoder(pickler_class=cloudpickle.Pickler, persistent_id=resource_id)
    with pytest.raises(streampickle.EncodeError):
        encoder.encode(threading.Lock())
    got = streampickle.loads(joined(encoder.encode([RESOURCES["db"], 1])), persistent_load=load_resource)
    assert got == [RESOURCES["db"], 1]


@pytest.mark.skipif(not _shm.AVAILABLE, reason="needs memfd and file seals (Linux)")
def test_shared_memory_works_with_hooks() -> None:
    array = streampickle.shared_empty(10_000, dtype=np.float64)
    array[:] = np.arange(10_000)
    chunks = Encoder(shared_memory=True, pickler_class=cloudpickle.Pickler,
                     persistent_id=resource_id).encode([closure_over(array), RESOURCES["cache"]])
    descriptors = _shm.descriptors_of(chunks)
    assert len(descriptors) == 1
    decoder = Decoder(shared_memory=True, trusted=True, persistent_load=load_resource)
    decoder.feed_descriptors([os.dup(fd) for fd in descriptors])
    decoder.feed(joined(chunks))
    function, resource = next(decoder)
    assert function() == float(np.arange(10_000).sum()) * 2.0
    assert resource is RESOURCES["cache"]


# -- the verifier twins with persistent ids ------------------------------------------------


def _both_walks(data: bytes, count: int, persistent: bool) -> tuple[Any, Any]:
    loader = Loader(allow=[make_point])

    def run(walk: Callable[..., Any]) -> Any:
        try:
            return walk(data, count, loader.resolve, 1024, persistent=persistent)
        except _verify.Refused as refused:
            return refused.pos, refused.reason
        except Exception as exc:  # noqa: BLE001 - the resolver's errors, compared by name
            return type(exc).__name__, str(exc)

    assert speedups is not None
    return run(_verify.verify), run(speedups.verify)


def _persistent_pickles() -> list[tuple[bytes, int]]:
    values = [
        [RESOURCES["db"]],
        {"k": RESOURCES["db"], RESOURCES["cache"]: (RESOURCES["db"], 1)},
        (np.arange(100), RESOURCES["db"], Point(1, 2)),
        list(range(30)),
    ]
    table = {Point: lambda p: (make_point, (p.x, p.y))}
    out = []
    for value in values:
        encoder = Encoder(persistent_id=lambda o: o if type(o) is int and o % 3 == 0 else resource_id(o),
                          dispatch_table=table)
        chunks = encoder.encode(value)
        header = header_of(chunks)
        data = joined(chunks)
        out.append((data[header.pickle_offset : header.pickle_offset + header.pickle_length], header.chunk_count))
    return out


@pytest.mark.skipif(speedups is None, reason="no C verify to compare")
def test_the_verifier_twins_agree_on_persistent_ids() -> None:
    rng = random.Random(20261206)
    inserts = [b"Q", b"\x94", b"h\x00", b"0", b"(", b"t", b"u", b"s", b"a", b"b", b"R", b"\x85", b"N", b"}", b"]"]
    for data, count in _persistent_pickles():
        for persistent in (False, True):
            py, c = _both_walks(data, count, persistent)
            assert py == c
            assert (type(py) is int and py > 0) == persistent, py
    assert _both_walks(_shared_pid_pickle(5, 100), 0, True) == (100, 100)
    py, c = _both_walks(_shared_pid_pickle(5000, 100), 0, True)
    assert py == c and "out of proportion" in py[1]
    for data, count in [*_persistent_pickles(), (_shared_pid_pickle(50, 20), 0)]:
        for _ in range(400):
            out = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(len(out))
                if rng.random() < 0.5:
                    out[i:i] = rng.choice(inserts)
                else:
                    out[i] = rng.randrange(256)
            for persistent in (False, True):
                py, c = _both_walks(bytes(out), count, persistent)
                assert py == c, (bytes(out), persistent)


@pytest.mark.skipif(speedups is None, reason="no C scan to compare")
def test_the_scan_twins_refuse_binpersid_alike() -> None:
    for data in (P5 + b"NQ.", P5 + b"Q.", P5 + b"\x8c\x01x\x94Q\x85."):
        assert speedups.scan(data, 0) == scan_py(data, 0)
        assert "persistent_load" in scan_py(data, 0)[1]  # type: ignore[index]


def test_persid_stays_refused_even_with_persistent_load() -> None:
    with pytest.raises(MalformedPickleError, match="PERSID is not allowed"):
        streampickle.loads(streampickle._encoder._frame(P5 + b"Pdb\n.", 0), persistent_load=load_resource)


# -- the stream APIs -----------------------------------------------------------------------


async def _round_trip(a: ObjectStream, b: ObjectStream) -> None:
    array = np.arange(100_000, dtype=np.float64)
    await a.send([closure_over(array), RESOURCES["db"]])
    function, resource = await b.receive()
    assert function() == float(array.sum()) * 2.0
    assert resource is RESOURCES["db"]


HOOKS: dict[str, Any] = {
    "pickler_class": cloudpickle.Pickler,
    "persistent_id": resource_id,
    "persistent_load": load_resource,
    "trusted": True,
}


@pytest.mark.anyio
async def test_object_streams_over_a_socketpair_take_the_hooks() -> None:
    left, right = socket.socketpair()
    async with ObjectStream.from_socket(left, **HOOKS) as a, ObjectStream.from_socket(right, **HOOKS) as b:
        await _round_trip(a, b)
        await _round_trip(b, a)


@pytest.mark.anyio
async def test_tcp_listeners_and_connections_take_the_hooks() -> None:
    async with await streampickle.create_tcp_listener(local_host="127.0.0.1", **HOOKS) as listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await streampickle.connect_tcp("127.0.0.1", port, **HOOKS)
        async with client, await listener.accept() as server:
            await _round_trip(client, server)
            await _round_trip(server, client)


@pytest.mark.anyio
async def test_unix_listeners_and_connections_take_the_hooks(tmp_path: Any) -> None:
    path = str(tmp_path / "hooks.sock")
    async with await streampickle.create_unix_listener(path, **HOOKS) as listener:
        client = await streampickle.connect_unix(path, **HOOKS)
        async with client, await listener.accept() as server:
            await _round_trip(client, server)
            await _round_trip(server, client)


@pytest.mark.anyio
async def test_a_stream_without_persistent_load_refuses_persistent_ids() -> None:
    left, right = socket.socketpair()
    async with ObjectStream.from_socket(left, persistent_id=resource_id) as a, ObjectStream.from_socket(right) as b:
        await a.send(RESOURCES["db"])
        with pytest.raises(MalformedPickleError, match="persistent_load"):
            await b.receive()


@pytest.mark.anyio
async def test_dump_and_load_take_the_hooks() -> None:
    a, b = memory_stream_pair()
    array = np.arange(100_000)
    got: list[Any] = []

    async def receive() -> None:
        got.append(await streampickle.load(b, trusted=True, persistent_load=load_resource))

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        await streampickle.dump([closure_over(array), RESOURCES["cache"]], a,
                                pickler_class=cloudpickle.Pickler, persistent_id=resource_id)
    function, resource = got[0]
    assert function() == float(array.sum()) * 2.0 and resource is RESOURCES["cache"]


def test_sync_dump_load_and_iter_load_take_the_hooks(tmp_path: Any) -> None:
    """The blocking adapters pass pickle's hooks through: a persistent id written by
    sync.dump is looked up by sync.load and by both iter_loads."""
    import anyio

    from streampickle import sync

    handle = object()
    table = {"db": handle}
    path = tmp_path / "log.sp"
    with open(path, "wb") as f:
        for n in range(3):
            sync.dump({"conn": handle, "n": n}, f, persistent_id=lambda obj: "db" if obj is handle else None)
    with open(path, "rb") as f:
        first = sync.load(f, persistent_load=table.__getitem__)
        assert first["conn"] is handle and first["n"] == 0
    with open(path, "rb") as f, pytest.raises(streampickle.StreamPickleError, match="persistent"):
        sync.load(f)  # safe by default: no persistent_load, no persistent ids
    with open(path, "rb") as f:
        assert [r["n"] for r in sync.iter_load(f, persistent_load=table.__getitem__)] == [0, 1, 2]

    async def read_all() -> list[Any]:
        async with await anyio.open_file(path, "rb") as f:
            return [r async for r in streampickle.iter_load(f, persistent_load=table.__getitem__)]

    got = anyio.run(read_all)
    assert [r["n"] for r in got] == [0, 1, 2] and all(r["conn"] is handle for r in got)
