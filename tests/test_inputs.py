"""Every input to the decoding entry points, of any type, returns or raises a StreamPickleError.

``loads``, the ``Decoder`` (feed, get_buffer/buffer_updated, feed_eof, iteration),
``sync.load``, async ``load`` and ``ObjectStream.receive`` are each given what a caller or a
transport might hand them by mistake: data that isn't bytes-like, bytes-like objects of other
shapes and formats, bad options, file objects and streams that misbehave, and every prefix of
valid messages. Each case asserts the exact error type: ``UsageError`` for the caller's
mistake, ``IncompleteMessageError`` for a message cut short, ``ProtocolError`` for bad bytes.
"""

from __future__ import annotations

import array
import io
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

import anyio
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from anyio.abc import ByteReceiveStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streampickle
from _pairs import unix_anyio
from _util import assert_same
from streampickle import (
    Decoder,
    IncompleteMessageError,
    Limits,
    ObjectStream,
    ProtocolError,
    StreamPickleError,
    UsageError,
    _decoder,
    _wire,
    sync,
)
from streampickle.testing import memory_stream_pair

KEY = b"k" * 32
OBJ = {"a": 1, "b": [1.5, "x"]}
PLAIN = streampickle.dumps(OBJ)
CHUNKS_OBJ = [np.arange(5, dtype=np.int16), np.ones((2, 3))]
CHUNKS = streampickle.dumps(CHUNKS_OBJ)  # two side chunks
KEYED = streampickle.dumps(OBJ, key=KEY)
MESSAGES = {"plain": (PLAIN, {}), "two-chunks": (CHUNKS, {}), "keyed": (KEYED, {"key": KEY})}
HEADER = _wire.HEADER_SIZE


def _message_of_length_multiple(k: int) -> tuple[str, bytes]:
    """A message whose length is a multiple of k, and the string it carries."""
    for n in range(64):
        message = streampickle.dumps("x" * n)
        if len(message) % k == 0:
            return "x" * n, message
    raise AssertionError("no such message")


class _NoBuffer:
    """An object without a buffer (Python 3.11 classes can't export one)."""


def _released() -> memoryview:
    view = memoryview(PLAIN)
    view.release()
    return view


NOT_BYTES_LIKE: dict[str, Callable[[], Any]] = {
    "str": lambda: "abc",
    "str-of-message": lambda: PLAIN.decode("latin-1"),
    "None": lambda: None,
    "int": lambda: 5,
    "float": lambda: 1.5,
    "list": lambda: list(PLAIN),
    "dict": lambda: {},
    "object": _NoBuffer,
    "released-memoryview": _released,
    "numpy-datetime (export fails)": lambda: np.array(["2020-01-01"], dtype="M8[D]"),
}


def _strided(message: bytes) -> memoryview:
    """A non-contiguous memoryview holding ``message`` at every other byte."""
    spread = bytearray(2 * len(message))
    spread[::2] = message
    return memoryview(spread)[::2]


def _bytes_like_cases() -> dict[str, tuple[Callable[[], Any], Any]]:
    """Bytes-like objects that aren't flat bytes; each holds a whole message: (make, object)."""
    s4, m4 = _message_of_length_multiple(4)
    s6, m6 = _message_of_length_multiple(6)
    return {
        "bytearray": (lambda: bytearray(PLAIN), OBJ),
        "memoryview": (lambda: memoryview(PLAIN), OBJ),
        "memoryview-slice": (lambda: memoryview(b"~" + PLAIN + b"~")[1:-1], OBJ),
        "array.array-B": (lambda: array.array("B", PLAIN), OBJ),
        "memoryview-format-i": (lambda: memoryview(m4).cast("i"), s4),
        "memoryview-2d": (lambda: memoryview(m6).cast("B", (len(m6) // 6, 6)), s6),
        "memoryview-non-contiguous": (lambda: _strided(PLAIN), OBJ),
        "numpy-uint8": (lambda: np.frombuffer(PLAIN, np.uint8), OBJ),
        "numpy-big-endian-u4": (lambda: np.frombuffer(m4, ">u4"), s4),
        "numpy-non-contiguous": (lambda: np.frombuffer(bytes(_strided(PLAIN).obj), np.uint8)[::2], OBJ),
        "numpy-fortran-2d": (
            lambda: np.asfortranarray(np.frombuffer(m6, np.uint8).reshape(-1, 6)),
            s6,
        ),
        "memoryview-non-contiguous-chunks": (lambda: _strided(CHUNKS), CHUNKS_OBJ),
    }


BYTES_LIKE = _bytes_like_cases()

BAD_OPTIONS = {
    "trusted=yes": {"trusted": "yes"},
    "trusted=None": {"trusted": None},
    "trusted=1": {"trusted": 1},
    "limits=5": {"limits": 5},
    "limits=dict": {"limits": {"max_message_size": 1}},
    "limits=class": {"limits": Limits},
    "allow=5": {"allow": 5},
    "allow=None": {"allow": None},
    "allow=str": {"allow": "builtins.complex"},
    "allow=[5]": {"allow": [5]},
    "key=5": {"key": 5},
    "key=str": {"key": "secret"},
    "key=empty": {"key": b""},
    "key=list": {"key": [1, 2]},
    "key=ndarray": {"key": np.zeros(3, np.uint8)},
}


@pytest.fixture(params=["c", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C fast paths (when built) and without them: both must agree."""
    if request.param == "python":
        monkeypatch.setattr(_decoder, "_load_plain", None)
        monkeypatch.setattr(_decoder, "_take_plain", None)
    return request.param


def _raises_exactly(error: type[BaseException], call: Callable[[], Any]) -> BaseException:
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    return info.value


# -- loads and Decoder.feed: the data ----------------------------------------------------------


@pytest.mark.parametrize("make", NOT_BYTES_LIKE.values(), ids=NOT_BYTES_LIKE.keys())
def test_loads_refuses_what_is_not_bytes_like(make: Callable[[], Any], path: str) -> None:
    exc = _raises_exactly(UsageError, lambda: streampickle.loads(make()))
    assert exc.__cause__ is not None


@pytest.mark.parametrize("make", NOT_BYTES_LIKE.values(), ids=NOT_BYTES_LIKE.keys())
def test_feed_refuses_what_is_not_bytes_like_and_the_decoder_carries_on(make: Callable[[], Any], path: str) -> None:
    decoder = Decoder()
    decoder.feed(PLAIN[:7])
    exc = _raises_exactly(UsageError, lambda: decoder.feed(make()))
    assert exc.__cause__ is not None
    assert not decoder.failed and decoder.progress == (7, HEADER)
    decoder.feed(PLAIN[7:])
    assert_same(OBJ, next(decoder))


@pytest.mark.parametrize(("make", "obj"), BYTES_LIKE.values(), ids=BYTES_LIKE.keys())
def test_loads_reads_any_bytes_like_object_by_its_bytes(make: Callable[[], Any], obj: Any, path: str) -> None:
    assert_same(obj, streampickle.loads(make()))


@pytest.mark.parametrize(("make", "obj"), BYTES_LIKE.values(), ids=BYTES_LIKE.keys())
def test_feed_reads_any_bytes_like_object_by_its_bytes(make: Callable[[], Any], obj: Any, path: str) -> None:
    decoder = Decoder()
    decoder.feed(make())
    decoder.feed(make())
    got = list(decoder)
    assert len(got) == 2
    for item in got:
        assert_same(obj, item)


def test_bytes_like_of_bad_bytes_is_a_protocol_error() -> None:
    """Accepted as bytes means judged as bytes: an int array is not a message."""
    _raises_exactly(ProtocolError, lambda: streampickle.loads(np.arange(10, dtype=np.int32)))
    http_2d = memoryview(b"GET / HTTP/1.1\r\nX: y\r\n\r\n").cast("B", (4, 6))
    _raises_exactly(ProtocolError, lambda: streampickle.loads(http_2d))


def test_the_decoder_keeps_no_hold_on_the_callers_bytearray() -> None:
    """The caller may resize its buffer as soon as feed() or loads() returns."""
    data = bytearray(CHUNKS)
    decoder = Decoder()
    decoder.feed(data[:HEADER + 3])  # a copy: slicing a bytearray
    view = memoryview(data)[HEADER + 3 :]
    decoder.feed(view[:10])
    view.release()
    data.clear()  # BufferError if the decoder still exported it
    data.extend(CHUNKS[HEADER + 13 :])
    decoder.feed(data)
    data.clear()
    assert_same(CHUNKS_OBJ, next(decoder))

    data = bytearray(CHUNKS)
    out = streampickle.loads(data)
    data[:] = bytes(len(data))  # the arrays must not view it
    data.clear()
    assert_same(CHUNKS_OBJ, out)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_are_usage_errors(options: dict[str, Any], path: str) -> None:
    _raises_exactly(UsageError, lambda: streampickle.loads(PLAIN, **options))
    _raises_exactly(UsageError, lambda: Decoder(**options))
    _raises_exactly(UsageError, lambda: sync.load(io.BytesIO(PLAIN), **options))


@pytest.mark.parametrize("options", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_and_bad_data_together_are_usage_errors(options: dict[str, Any]) -> None:
    _raises_exactly(UsageError, lambda: streampickle.loads("abc", **options))


def test_allow_as_a_numpy_array_or_generator_is_an_iterable_of_names() -> None:
    address = ipaddress.IPv4Address("1.2.3.4")
    message = streampickle.dumps(address)
    assert streampickle.loads(message, allow=np.array(["ipaddress.IPv4Address"])) == address
    assert streampickle.loads(message, allow=(n for n in ["ipaddress.IPv4Address"])) == address
    assert streampickle.loads(PLAIN, allow=np.array([], dtype=str)) == OBJ


# -- get_buffer / buffer_updated / feed_eof -----------------------------------------------------


@pytest.mark.parametrize("nbytes", ["3", None, 1.5, 2.0, [1], -1, 21, 10**30, -(10**30)])
def test_buffer_updated_refuses_what_is_not_a_count_that_fits(nbytes: Any) -> None:
    decoder = Decoder()
    target = decoder.get_buffer()
    assert len(target) == HEADER
    target[:5] = PLAIN[:5]
    _raises_exactly(UsageError, lambda: decoder.buffer_updated(nbytes))
    # nothing changed: the decoder goes on with the bytes already in its buffer
    assert decoder.progress == (0, HEADER) and not decoder.failed
    decoder.buffer_updated(5)
    decoder.feed(PLAIN[5:])
    assert_same(OBJ, next(decoder))


@pytest.mark.parametrize("count", [np.int64(7), np.uint8(7), True], ids=["int64", "uint8", "bool"])
def test_buffer_updated_takes_integer_likes(count: Any) -> None:
    decoder = Decoder()
    n = int(count)
    decoder.get_buffer()[:n] = PLAIN[:n]
    decoder.buffer_updated(count)
    assert decoder.progress == (n, HEADER)
    decoder.feed(PLAIN[n:])
    assert_same(OBJ, next(decoder))


@pytest.mark.parametrize("hint", ["big", None, 1e6, [1]])
def test_get_buffer_refuses_a_sizehint_that_is_not_an_int(hint: Any) -> None:
    decoder = Decoder()
    decoder.feed(PLAIN[:HEADER])  # now in the pickle part, which grows by the hint
    _raises_exactly(UsageError, lambda: decoder.get_buffer(hint))
    assert not decoder.failed
    decoder.feed(PLAIN[HEADER:])
    assert_same(OBJ, next(decoder))


def test_get_buffer_takes_integer_like_hints() -> None:
    decoder = Decoder()
    decoder.feed(PLAIN[:HEADER])
    assert len(decoder.get_buffer(np.int64(3))) == len(PLAIN) - HEADER


@pytest.mark.parametrize("cut", range(1, HEADER))
def test_a_header_cut_short_at_eof_is_incomplete(cut: int) -> None:
    decoder = Decoder()
    decoder.feed(PLAIN[:cut])
    exc = _raises_exactly(IncompleteMessageError, decoder.feed_eof)
    assert (exc.received, exc.expected) == (cut, HEADER)
    _raises_exactly(IncompleteMessageError, lambda: next(decoder))  # sticky


def test_parse_header_of_a_short_or_long_buffer() -> None:
    exc = _raises_exactly(IncompleteMessageError, lambda: _wire.parse_header(PLAIN[:15]))
    assert (exc.received, exc.expected) == (15, HEADER)
    assert exc.__cause__ is not None
    _raises_exactly(ProtocolError, lambda: _wire.parse_header(PLAIN[:HEADER] + b"x"))
    _raises_exactly(ProtocolError, lambda: _wire.unpack_lengths(b"\0" * 12))


# -- every prefix -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MESSAGES)
@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_every_prefix_given_to_loads_is_incomplete(kind: str, as_type: type, path: str) -> None:
    message, options = MESSAGES[kind]
    assert_same(streampickle.loads(as_type(message), **options), streampickle.loads(message, **options))
    for cut in range(len(message)):
        with pytest.raises(StreamPickleError) as info:
            streampickle.loads(as_type(message[:cut]), **options)
        assert type(info.value) is IncompleteMessageError, f"prefix of {cut} bytes: {info.value!r}"
        assert info.value.received == cut


@pytest.mark.parametrize("kind", MESSAGES)
def test_every_prefix_given_to_sync_load_is_incomplete(kind: str, tmp_path) -> None:
    message, options = MESSAGES[kind]
    path = tmp_path / "cut"
    for cut in range(1, len(message)):
        path.write_bytes(message[:cut])
        for buffering in (0, -1):  # raw FileIO (readinto) and BufferedReader
            with open(path, "rb", buffering=buffering) as f:
                exc = _raises_exactly(IncompleteMessageError, lambda: sync.load(f, **options))
            assert exc.received == cut


# -- property: anything at all ----------------------------------------------------------------


def _loads_or_library_error(data: Any, **options: Any) -> tuple[str, Any]:
    try:
        return "ok", streampickle.loads(data, **options)
    except StreamPickleError as exc:
        return "error", type(exc)


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A valid message with bytes replaced, inserted or cut off."""
    message, options = draw(st.sampled_from(list(MESSAGES.values())))
    data = bytearray(message)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    return bytes(data), options


_SMALL = Limits(max_message_size=1 << 20)  # a mutated length can't make the test allocate much

anything = st.one_of(
    st.binary(),
    st.text(),
    st.none(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(0, 255), max_size=30),
    st.builds(bytearray, st.binary()),
    st.builds(memoryview, st.binary()),
    hnp.arrays(
        st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.datetime64_dtypes()),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    ),
    hnp.arrays(np.uint8, 64).map(lambda a: a[::3]),
)


@given(anything)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_loads_of_anything_returns_or_raises_a_library_error(data: Any) -> None:
    outcome = _loads_or_library_error(data)
    try:
        as_bytes = bytes(memoryview(data))
    except Exception:  # noqa: BLE001 - not bytes-like, whatever the error: the caller's mistake
        assert outcome == ("error", UsageError)
        return
    # bytes-like: judged by its bytes, exactly as flat bytes are
    expected = _loads_or_library_error(as_bytes)
    assert outcome[0] == expected[0]
    if outcome[0] == "error":
        assert outcome[1] is expected[1]


@given(_mutated())
@settings(max_examples=500, deadline=None)
def test_loads_of_mutated_messages_returns_or_raises_a_library_error(case: tuple[bytes, dict[str, Any]]) -> None:
    data, options = case
    _loads_or_library_error(data, **options)  # anything but a StreamPickleError fails here
    _loads_or_library_error(data, limits=_SMALL, **options)
    decoder = Decoder(limits=_SMALL, **options)
    try:
        for i in range(len(data)):
            decoder.feed(data[i : i + 1])
        decoder.feed_eof()
        list(decoder)
    except StreamPickleError:
        pass


# -- sync.load: real files, pipes, sockets, and file objects that misbehave ---------------------


def test_sync_load_from_a_pipe_cut_inside_the_header() -> None:
    r, w = os.pipe()
    with os.fdopen(r, "rb", buffering=0) as reader:
        with os.fdopen(w, "wb") as writer:
            writer.write(PLAIN + PLAIN[:15])
        assert_same(OBJ, sync.load(reader))
        exc = _raises_exactly(IncompleteMessageError, lambda: sync.load(reader))
        assert (exc.received, exc.expected) == (15, HEADER)


def test_sync_load_from_an_empty_file_is_eof(tmp_path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with open(path, "rb") as f, pytest.raises(EOFError):
        sync.load(f)


def test_sync_load_from_a_text_file_or_a_closed_one_is_a_usage_error(tmp_path) -> None:
    path = tmp_path / "msg"
    path.write_bytes(PLAIN)
    with open(path, encoding="latin-1") as f:
        exc = _raises_exactly(UsageError, lambda: sync.load(f))
    assert exc.__cause__ is not None
    with open(path, "rb") as f:
        pass  # a closed file
    exc = _raises_exactly(UsageError, lambda: sync.load(f))
    assert isinstance(exc.__cause__, ValueError)


def test_sync_load_from_a_non_blocking_socket_is_a_usage_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        exc = _raises_exactly(UsageError, lambda: sync.load(b))
        assert isinstance(exc.__cause__, BlockingIOError)
        a.sendall(PLAIN)
        b.setblocking(True)
        assert_same(OBJ, sync.load(b))  # nothing was consumed


@pytest.mark.parametrize("file", [None, 5, "path/to/file", PLAIN, [PLAIN]], ids=["None", "int", "str", "bytes", "list"])
def test_sync_load_from_what_is_not_a_file_is_a_usage_error(file: Any) -> None:
    _raises_exactly(UsageError, lambda: sync.load(file))


class _Reader:
    """A file object with only ``read``, whose results a test chooses: ``script(n, served)``
    returns what ``read(n)`` gives after ``served`` bytes of ``data`` went out."""

    def __init__(self, data: bytes, script: Callable[[int, bytes], Any]) -> None:
        self._data = data
        self._served = 0
        self._script = script

    def read(self, n: int) -> Any:
        out = self._script(n, self._data[self._served : self._served + n])
        if isinstance(out, (bytes, bytearray)):
            self._served += len(out)
        return out


class _ReadInto:
    """A file object with ``readinto``: ``script(target, piece)`` writes (or not) and returns
    what ``readinto`` returns; ``piece`` is what a good file would write next."""

    def __init__(self, data: bytes, script: Callable[[memoryview, bytes], Any]) -> None:
        self._data = data
        self._served = 0
        self._script = script

    def readinto(self, target: memoryview) -> Any:
        piece = self._data[self._served : self._served + len(target)]
        out = self._script(target, piece)
        if isinstance(out, (int, np.integer)) and out > 0:
            self._served += int(out)
        return out


def _good_readinto(target: memoryview, piece: bytes) -> int:
    target[: len(piece)] = piece
    return len(piece)


BAD_READS: dict[str, Callable[[int, bytes], Any]] = {
    "str": lambda n, piece: piece.decode("latin-1"),
    "int": lambda n, piece: len(piece),
    "list": lambda n, piece: list(piece),
    "too-many-bytes": lambda n, piece: piece + b"\0" * 4,
    "int32-array": lambda n, piece: np.zeros(max(1, n // 4), np.int32),
    "None (non-blocking)": lambda n, piece: None,
}


@pytest.mark.parametrize("script", BAD_READS.values(), ids=BAD_READS.keys())
def test_sync_load_from_a_file_whose_read_misbehaves(script: Callable[[int, bytes], Any]) -> None:
    _raises_exactly(UsageError, lambda: sync.load(_Reader(PLAIN, script)))


def _writes_then(result: Any) -> Callable[[memoryview, bytes], Any]:
    def script(target: memoryview, piece: bytes) -> Any:
        target[: len(piece)] = piece
        return result(target, piece) if callable(result) else result

    return script


BAD_READINTOS: dict[str, Callable[[memoryview, bytes], Any]] = {
    "str": _writes_then("3"),
    "bytes": _writes_then(lambda t, piece: piece),
    "None (non-blocking)": _writes_then(None),
    "float": _writes_then(2.0),
    "negative": _writes_then(-1),
    "more-than-the-buffer": _writes_then(lambda t, piece: len(t) + 1),
    "array": _writes_then(np.array([1, 2])),
}


@pytest.mark.parametrize("script", BAD_READINTOS.values(), ids=BAD_READINTOS.keys())
def test_sync_load_from_a_file_whose_readinto_misbehaves(script: Callable[[memoryview, bytes], Any]) -> None:
    _raises_exactly(UsageError, lambda: sync.load(_ReadInto(PLAIN, script)))


def test_sync_load_takes_integer_like_counts_from_readinto() -> None:
    assert_same(OBJ, sync.load(_ReadInto(PLAIN, lambda t, p: np.int64(_good_readinto(t, p)))))


def test_sync_load_from_a_file_whose_readinto_is_not_callable() -> None:
    class NotCallable:
        readinto = 5

    exc = _raises_exactly(UsageError, lambda: sync.load(NotCallable()))
    assert isinstance(exc.__cause__, TypeError)


@pytest.mark.parametrize("error", [ConnectionResetError, TimeoutError, OSError])
def test_sync_load_os_error_before_the_message_propagates(error: type[OSError]) -> None:
    def script(target: memoryview, piece: bytes) -> int:
        raise error("the channel failed")

    _raises_exactly(error, lambda: sync.load(_ReadInto(CHUNKS, script)))


@pytest.mark.parametrize("error", [ConnectionResetError, TimeoutError, OSError])
@pytest.mark.parametrize("after", [1, HEADER, HEADER + 9, len(CHUNKS) - 1])
def test_sync_load_os_error_inside_the_message_is_incomplete(error: type[OSError], after: int) -> None:
    served = 0

    def script(target: memoryview, piece: bytes) -> int:
        nonlocal served
        if served >= after:
            raise error("the channel failed")
        n = min(len(piece), after - served, 7)  # short reads, as a pipe gives them
        target[:n] = piece[:n]
        served += n
        return n

    exc = _raises_exactly(IncompleteMessageError, lambda: sync.load(_ReadInto(CHUNKS, script)))
    assert type(exc.__cause__) is error
    assert exc.received == after


def test_sync_load_from_read_only_files_in_short_pieces() -> None:
    """The read()-only path still works when read returns fewer bytes than asked."""
    assert_same(CHUNKS_OBJ, sync.load(_Reader(CHUNKS, lambda n, piece: bytearray(piece[:3]))))


# -- async load and ObjectStream.receive --------------------------------------------------------


class _Scripted(ByteReceiveStream):
    """A byte stream that returns the given items verbatim, whatever their type, then ends."""

    def __init__(self, items: list[Any]) -> None:
        self._items = list(items)

    async def receive(self, max_bytes: int = 65536) -> Any:
        await anyio.lowlevel.checkpoint()
        if not self._items:
            raise anyio.EndOfStream
        return self._items.pop(0)

    async def aclose(self) -> None:
        pass


STREAM_ITEMS: dict[str, Any] = {
    "str": "abc",
    "str-of-message": PLAIN.decode("latin-1"),
    "None": None,
    "int": 5,
    "list": [1, 2],
    "numpy-datetime": np.array(["2020-01-01"], dtype="M8[D]"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("item", STREAM_ITEMS.values(), ids=STREAM_ITEMS.keys())
async def test_async_load_of_a_stream_that_returns_no_bytes(item: Any) -> None:
    with pytest.raises(UsageError) as info:
        await streampickle.load(_Scripted([PLAIN[:3], item, PLAIN[3:]]))
    assert type(info.value) is UsageError


@pytest.mark.anyio
@pytest.mark.parametrize("item", STREAM_ITEMS.values(), ids=STREAM_ITEMS.keys())
async def test_receive_of_a_stream_that_returns_no_bytes(item: Any) -> None:
    stream = ObjectStream(_Scripted([PLAIN[:3], item, PLAIN[3:]]))
    with pytest.raises(UsageError) as info:
        await stream.receive()
    assert type(info.value) is UsageError
    assert_same(OBJ, await stream.receive())  # a usage error does not poison the stream


@pytest.mark.anyio
@pytest.mark.parametrize(("make", "obj"), BYTES_LIKE.values(), ids=BYTES_LIKE.keys())
async def test_async_load_and_receive_take_any_bytes_like_from_a_stream(make: Callable[[], Any], obj: Any) -> None:
    assert_same(obj, await streampickle.load(_Scripted([make()])))
    assert_same(obj, await ObjectStream(_Scripted([make()])).receive())


@pytest.mark.anyio
@pytest.mark.parametrize("options", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
async def test_async_bad_options_are_usage_errors(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError) as info:
        await streampickle.load(_Scripted([PLAIN]), **options)
    assert type(info.value) is UsageError
    with pytest.raises(UsageError) as info:
        ObjectStream(_Scripted([PLAIN]), **options)
    assert type(info.value) is UsageError


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [None, 5, "stream", PLAIN], ids=["None", "int", "str", "bytes"])
async def test_async_load_and_receive_from_what_is_not_a_stream(stream: Any) -> None:
    with pytest.raises(UsageError) as info:
        await streampickle.load(stream)
    assert type(info.value) is UsageError
    with pytest.raises(UsageError) as info:
        await ObjectStream(stream).receive()
    assert type(info.value) is UsageError


@pytest.mark.anyio
async def test_async_load_of_every_prefix_over_a_memory_stream() -> None:
    for cut in range(len(CHUNKS)):
        a, b = memory_stream_pair(max_buffered_sends=2)
        if cut:
            await a.send(CHUNKS[:cut])
        await a.send_eof()
        if cut == 0:
            with pytest.raises(EOFError):
                await streampickle.load(b)
            continue
        with pytest.raises(IncompleteMessageError) as info:
            await streampickle.load(b)
        assert type(info.value) is IncompleteMessageError and info.value.received == cut


@pytest.mark.anyio
@pytest.mark.parametrize("cut", [1, 4, 12, 15, 19])
async def test_a_header_cut_short_over_real_sockets_is_incomplete(cut: int) -> None:
    a, b = socket.socketpair()
    receiver = ObjectStream.from_socket(b)
    with a:
        a.sendall(PLAIN[:cut])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(IncompleteMessageError) as info:
            await receiver.receive()
    await receiver.aclose()
    assert type(info.value) is IncompleteMessageError
    assert (info.value.received, info.value.expected) == (cut, HEADER)

    x, y = await unix_anyio()  # load() on an anyio Unix stream: the raw-socket path
    async with x, y:
        await x.transport_stream.send(KEYED[:cut])
        await x.transport_stream.send_eof()
        with pytest.raises(IncompleteMessageError) as info:
            await streampickle.load(y.transport_stream, key=KEY)
    assert type(info.value) is IncompleteMessageError and info.value.received == cut


@pytest.mark.anyio
async def test_async_load_after_an_interrupted_one_with_options_that_cant_be_compared() -> None:
    a, b = memory_stream_pair()
    await a.send(PLAIN[:25])
    with anyio.move_on_after(0.05):
        await streampickle.load(b)  # parks its decoder, 25 bytes in
    with pytest.raises(UsageError) as info:
        await streampickle.load(b, key=np.zeros(3, np.uint8))
    assert type(info.value) is UsageError


@pytest.mark.anyio
async def test_async_load_from_an_unhashable_stream() -> None:
    class Unhashable(_Scripted):
        def __eq__(self, other: object) -> bool:
            return self is other

    assert_same(OBJ, await streampickle.load(Unhashable([PLAIN[:9], PLAIN[9:]])))


@pytest.mark.anyio
async def test_async_load_with_allow_as_a_generator() -> None:
    address = ipaddress.IPv4Address("1.2.3.4")
    got = await streampickle.load(
        _Scripted([streampickle.dumps(address)]), allow=(n for n in ["ipaddress.IPv4Address"])
    )
    assert got == address
