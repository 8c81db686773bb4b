"""The blocking adapter over real sockets, pipes, files and a real child process."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import streampickle
from _util import assert_same, sample_objects
from streampickle import sync


def test_socketpair_many_messages_each_load_gets_its_own() -> None:
    a, b = socket.socketpair()
    objs = [*sample_objects().values(), np.random.default_rng(0).random((512, 1024))]
    with a, b:
        sender = threading.Thread(target=lambda: [sync.dump(o, a) for o in objs])
        sender.start()
        for o in objs:
            assert_same(o, sync.load(b))
        sender.join()
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            sync.load(b)


def test_load_never_reads_past_its_message() -> None:
    a, b = socket.socketpair()
    with a, b:
        sync.dump({"x": np.arange(10)}, a)
        a.sendall(b"raw bytes after")
        assert sync.load(b)["x"].sum() == 45
        assert b.recv(100) == b"raw bytes after"


def test_peer_closing_mid_message_is_incomplete() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = streampickle.dumps(np.arange(1000))
        a.sendall(data[:100])
        a.close()
        with pytest.raises(streampickle.IncompleteMessageError) as info:
            sync.load(b)
        assert info.value.received == 100 and info.value.expected == len(data)


def test_files_raw_and_buffered(tmp_path) -> None:
    path = tmp_path / "objs.spk"
    objs = [np.arange(5), {"k": "v"}, np.ones((3, 3), order="F")]
    with open(path, "wb") as f:
        for o in objs:
            sync.dump(o, f)
    for opener in (lambda: open(path, "rb"), lambda: open(path, "rb", buffering=0)):  # noqa: SIM115 - opened by the with
        with opener() as f:
            for o in objs:
                assert_same(o, sync.load(f))
            with pytest.raises(EOFError):
                sync.load(f)


def test_file_without_readinto_and_key() -> None:
    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self._f = io.BytesIO(data)

        def read(self, n: int) -> bytes:
            return self._f.read(n)

    out = io.BytesIO()
    sync.dump([1, np.arange(3)], out, key=b"k")
    got = sync.load(ReadOnly(out.getvalue()), key=b"k")
    assert got[0] == 1 and got[1].tolist() == [0, 1, 2]


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from streampickle import sync
    while True:
        try:
            obj = sync.load(sys.stdin.buffer)
        except EOFError:
            break
        # echo back a summary and the object itself
        sync.dump({"sum": float(obj["a"].sum()), "obj": obj}, sys.stdout.buffer)
    """
)


def test_pipe_to_a_real_child_process() -> None:
    # as a context manager: its pipes are closed at the end (an unclosed one warns)
    with subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        rng = np.random.default_rng(1)
        for size in (0, 1, 1000, 3_000_000):
            obj = {"a": rng.random(size), "meta": {"size": size}}
            sync.dump(obj, proc.stdin)
            reply = sync.load(proc.stdout)
            assert reply["sum"] == pytest.approx(obj["a"].sum())
            assert_same(obj, reply["obj"])
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def test_socket_to_a_real_child_process() -> None:
    parent, child = socket.socketpair()
    code = textwrap.dedent(
        f"""
        import socket, numpy as np
        from streampickle import sync
        s = socket.socket(fileno={child.fileno()})
        arr = sync.load(s)
        sync.dump(arr * 2, s)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()])
    child.close()
    with parent:
        arr = np.arange(2_000_000, dtype=np.int64).reshape(1000, 2000)
        sync.dump(arr, parent)
        out = sync.load(parent)
        assert (out == arr * 2).all() and out.flags.aligned
    assert proc.wait(timeout=30) == 0


def test_sendmsg_handles_more_buffers_than_iov_max() -> None:
    a, b = socket.socketpair()
    arrays = [np.full(3, i, dtype=np.int16) for i in range(3000)]
    with a, b:
        t = threading.Thread(target=sync.dump, args=(arrays, a))
        t.start()
        out = sync.load(b)
        t.join()
    assert [int(x[0]) for x in out] == list(range(3000))


def test_os_pipe_file_objects() -> None:
    r, w = os.pipe()
    with open(r, "rb", buffering=0) as rf, open(w, "wb", buffering=0) as wf:
        t = threading.Thread(target=sync.dump, args=(np.arange(500_000), wf))
        t.start()
        out = sync.load(rf)
        t.join()
    assert out[-1] == 499_999


@pytest.mark.heavy
def test_a_side_chunk_over_4_gib_round_trips() -> None:
    """No 32-bit length anywhere: one 4 GiB + 16 byte array over a real socket. The sender's
    array is np.zeros (untouched zero pages cost no memory) with three marked bytes."""
    size = 2**32 + 16
    arr = np.zeros(size, dtype=np.uint8)
    for i, pos in enumerate((0, 2**32 - 1, size - 1)):
        arr[pos] = i + 1
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=lambda: sync.dump({"big": arr}, a), daemon=True)
        sender.start()
        out = sync.load(b)["big"]
        sender.join()
    assert out.shape == (size,) and out.flags.aligned
    assert (out[0], out[2**32 - 1], out[size - 1]) == (1, 2, 3)
    assert np.count_nonzero(out) == 3


# -- what a failing read raises: the same for load, iter_load and load_pickle --------------------


class Scripted:
    """A binary file of ``data`` whose ``readinto`` does ``action`` once ``at`` bytes were read:
    raises it (an exception) or returns it (anything else)."""

    def __init__(self, data: bytes, at: int, action: object) -> None:
        self.file = io.BytesIO(data)
        self.at = at
        self.action = action

    def readinto(self, target: memoryview) -> object:
        if self.file.tell() >= self.at:
            if isinstance(self.action, BaseException):
                raise self.action
            return self.action
        return self.file.readinto(target[: self.at - self.file.tell()])


def _framed() -> bytes:
    return streampickle.dumps({"a": np.arange(1000)})


def _plain() -> bytes:
    import pickle

    return pickle.dumps({"a": list(range(1000))}, protocol=5)


NOT_READY = "needs a blocking file or socket; this {} had no data ready"
READERS = {
    "load": (lambda f: sync.load(f), _framed, "message"),
    "iter_load": (lambda f: list(sync.iter_load(f)), _framed, "message"),
    "load_pickle": (lambda f: sync.load_pickle(f), _plain, "pickle"),
}


@pytest.fixture(params=sorted(READERS))
def reader(request: pytest.FixtureRequest) -> tuple[object, bytes, str]:
    read, data, unit = READERS[request.param]
    return read, data(), unit


def test_an_os_error_before_the_first_byte_is_raised_as_it_is(reader) -> None:
    read, data, _ = reader
    error = ConnectionResetError("reset by peer")
    with pytest.raises(ConnectionResetError) as info:
        read(Scripted(data, 0, error))
    assert info.value is error


def test_an_os_error_inside_is_incomplete_with_the_error_as_cause(reader) -> None:
    read, data, unit = reader
    error = OSError("disk on fire")
    match = rf"reading failed inside a {unit} \(disk on fire\): 100 of "
    with pytest.raises(streampickle.IncompleteMessageError, match=match) as info:
        read(Scripted(data, 100, error))
    assert info.value.__cause__ is error and info.value.received == 100


def test_a_file_with_no_data_ready_is_refused(reader) -> None:
    read, data, _ = reader
    for action in (BlockingIOError(), None):  # raised, or readinto's None
        with pytest.raises(streampickle.UsageError, match=NOT_READY.format("Scripted")):
            read(Scripted(data, 50, action))


def test_a_closed_file_is_refused(reader) -> None:
    read, data, _ = reader
    match = r"reading from the Scripted failed: ValueError\('I/O operation on closed file"
    with pytest.raises(streampickle.UsageError, match=match):
        read(Scripted(data, 50, ValueError("I/O operation on closed file.")))


@pytest.mark.parametrize("name", ["load", "iter_load"])
def test_a_readinto_returning_nonsense_is_refused(name: str) -> None:
    read, data, _ = READERS[name]
    match = r"Scripted.readinto\(\) returned a str of length 1 for a buffer of \d+ bytes; it must return how"
    with pytest.raises(streampickle.UsageError, match=match):
        read(Scripted(data(), 50, "x"))


def test_a_non_blocking_socket_is_refused_by_every_reader() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        for read in (sync.load, lambda s: list(sync.iter_load(s)), sync.load_pickle):
            with pytest.raises(streampickle.UsageError, match=NOT_READY.format("socket")):
                read(b)


def test_a_closed_buffered_file_is_refused_by_load_pickle_too(tmp_path) -> None:
    path = tmp_path / "one.pkl"
    path.write_bytes(_plain())
    f = open(path, "rb")  # noqa: SIM115 - closed before use, on purpose
    f.close()
    for read in (sync.load, sync.load_pickle):  # load_pickle peeks at a BufferedReader
        with pytest.raises(streampickle.UsageError, match="reading from the BufferedReader failed"):
            read(f)


def test_a_readinto_that_is_not_callable_is_refused(reader) -> None:
    read, _, _ = reader

    class NotCallable:
        readinto = 5

    with pytest.raises(streampickle.UsageError, match=r"reading from the NotCallable failed: TypeError") as info:
        read(NotCallable())
    assert isinstance(info.value.__cause__, TypeError)


class _DumpsWhileReduced:
    """An object whose reduction writes another message to the same file: ``dump`` inside
    ``dump``, which must not share the outer call's encoder."""

    def __init__(self, file: io.BytesIO) -> None:
        self.file = file

    def __reduce__(self) -> tuple[type, tuple[int]]:
        sync.dump({"inner": np.arange(3)}, self.file)
        return int, (7,)


def test_dump_reuses_nothing_between_calls_and_nests() -> None:
    """Each dump writes what a fresh Encoder would, whatever came before it, a failed dump
    or one made inside another's pickling included."""
    file = io.BytesIO()
    objects = [{"a": np.arange(10.0)}, "text", [np.ones((2, 3), np.int8)] * 2]
    for obj in objects:
        sync.dump(obj, file)
    with pytest.raises(streampickle.EncodeError):
        sync.dump(lambda: None, file)  # a value pickle refuses
    sync.dump(_DumpsWhileReduced(file), file)
    sync.dump(objects[0], file)
    file.seek(0)
    got = list(sync.iter_load(file, trusted=True))
    assert_same(got[:3], objects)
    assert_same(got[3:], [{"inner": np.arange(3)}, 7, objects[0]])
    expected = b"".join(b"".join(memoryview(c).cast("B") for c in streampickle.Encoder(stream=False).encode(o))
                        for o in objects)
    assert file.getvalue().startswith(expected)
