"""The rule the error classes state, held on every kind of stream.

A :class:`MessageDroppedError` drops one message and the stream goes on: the next message
arrives. A :class:`StreamBrokenError` ends the stream: every later call raises it again. Each
case below runs on the sans-IO ``Decoder`` (fed whole and byte by byte), ``loads``, the async
``ObjectStream`` over every binding and event loop, and ``streampickle.sync`` over a socket
pair; every error raised is checked against its base.
"""

from __future__ import annotations

import fractions
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import streampickle
from _pairs import BINDINGS, reap_processes
from _util import make_message
from streampickle import (
    AuthenticationError,
    Decoder,
    EncodeError,
    ForbiddenGlobalError,
    IncompleteMessageError,
    LimitExceededError,
    MalformedPickleError,
    MessageDroppedError,
    ProtocolError,
    StreamBrokenError,
    StreamPickleError,
    UsageError,
    _rebuild,
    sync,
)

KEY = b"k" * 32


class Point:
    """A class of the application's: a safe loader refuses it (not in ``allow``)."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


class ZeroDenominator:
    """Reduced to the safe ``fraction`` reconstructor with arguments it refuses."""

    def __reduce__(self) -> Any:
        return _rebuild.fraction, (1, 0)


def check_base(exc: BaseException, base: type[StreamPickleError]) -> None:
    """``exc`` is of ``base`` and not of the other one, and ``poisons_stream`` agrees."""
    other = MessageDroppedError if base is StreamBrokenError else StreamBrokenError
    assert isinstance(exc, base) and not isinstance(exc, other), type(exc).__mro__
    assert exc.poisons_stream is (base is StreamBrokenError)  # type: ignore[attr-defined]


# -- the cases ----------------------------------------------------------------------------------

#: Messages dropped alone: bytes of one whole message, and the error it raises.
DROPPED: dict[str, tuple[Callable[[], bytes], type[MessageDroppedError]]] = {
    "forbidden-global": (lambda: streampickle.dumps(Point(1, 2)), ForbiddenGlobalError),
    "reconstructor-refuses": (lambda: streampickle.dumps(ZeroDenominator()), MalformedPickleError),
    "bytes-after-stop": (lambda: make_message(b"\x80\x05N.garbage"), MalformedPickleError),
    "no-stop": (lambda: make_message(b"\x80\x05N"), MalformedPickleError),
    "unhashable-key": (lambda: make_message(b"\x80\x05}]]s."), MalformedPickleError),
}

#: Bytes that end the stream, and the error they raise.
BROKEN: dict[str, tuple[Callable[[], bytes], type[StreamBrokenError]]] = {
    "bad-magic": (lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ProtocolError),
    "bad-version": (lambda: struct.pack("<4sBBHIQ", b"\x93SPK", 9, 0, 0, 0, 2), ProtocolError),
    "over-limit": (lambda: struct.pack("<4sBBHIQ", b"\x93SPK", 1, 0, 0, 0, 1 << 40), LimitExceededError),
}


def _whole(data: bytes) -> list[bytes]:
    return [data]


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


SPLITS = {"whole": _whole, "byte-by-byte": _bytewise}


# -- the sans-IO decoder ----------------------------------------------------------------------


def _drain(decoder: Decoder) -> list[Any]:
    """The objects ready, in order, with a dropped message's error in its place."""
    out: list[Any] = []
    while True:
        try:
            out.append(next(decoder))
        except StopIteration:
            return out
        except MessageDroppedError as exc:
            out.append(exc)
        except StreamBrokenError:  # the failure after the messages before it: see _feed
            return out


def _feed(decoder: Decoder, data: bytes, split: Callable[[bytes], list[bytes]]) -> tuple[list[Any], Exception | None]:
    """Feed ``data`` in pieces, then the end: what came out, and the stream-ending error."""
    got: list[Any] = []
    try:
        for piece in split(data):
            decoder.feed(piece)
            got.extend(_drain(decoder))
        decoder.feed_eof()
    except StreamPickleError as exc:
        got.extend(_drain(decoder))  # messages completed before the failure still come out
        return got, exc
    return got + _drain(decoder), None


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS)
@pytest.mark.parametrize("case", DROPPED.values(), ids=DROPPED)
def test_decoder_drops_one_message_and_goes_on(case, split) -> None:
    make, expected = case
    decoder = Decoder()
    got, error = _feed(decoder, streampickle.dumps("before") + make() + streampickle.dumps("after"), split)
    assert error is None and not decoder.failed
    assert len(got) == 3 and got[0] == "before" and got[2] == "after", got
    assert type(got[1]) is expected
    check_base(got[1], MessageDroppedError)


def _keyed(obj: object, key: bytes = KEY) -> bytes:
    return streampickle.dumps(obj, key=key)


# The decoder-only cases: a key, and the end of input.
DECODER_BROKEN = {
    **{name: (make, expected, {}) for name, (make, expected) in BROKEN.items()},
    "wrong-key": (lambda: _keyed("x", b"o" * 32), AuthenticationError, {"key": KEY, "stream": False}),
    "cut-off": (lambda: streampickle.dumps("cut")[:-3], IncompleteMessageError, {}),
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS)
@pytest.mark.parametrize("case", DECODER_BROKEN.values(), ids=DECODER_BROKEN)
def test_decoder_ends_the_stream_and_every_later_call_raises(case, split) -> None:
    make, expected, options = case
    before, after = (_keyed(x) if options.get("key") else streampickle.dumps(x) for x in ("before", "after"))
    data = before + make() + (b"" if expected is IncompleteMessageError else after)
    decoder = Decoder(**options)
    got, error = _feed(decoder, data, split)
    assert got == ["before"] and type(error) is expected and decoder.failed
    check_base(error, StreamBrokenError)
    for call in (lambda: decoder.feed(after), decoder.get_buffer, decoder.feed_eof, lambda: next(decoder)):
        with pytest.raises(expected, match="failed earlier") as info:
            call()
        check_base(info.value, StreamBrokenError)


# -- loads: one message, so only the class tells ---------------------------------------------


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("case", DROPPED.values(), ids=DROPPED)
def test_loads_raises_a_dropped_message_error(case, trusted) -> None:
    make, expected = case
    if trusted and expected is ForbiddenGlobalError:
        assert streampickle.loads(make(), trusted=True).x == 1  # trusted loads anything
        return
    with pytest.raises(expected) as info:
        streampickle.loads(make(), trusted=trusted)
    check_base(info.value, MessageDroppedError)
    assert streampickle.loads(streampickle.dumps("after"), trusted=trusted) == "after"


@pytest.mark.parametrize(
    "data, expected",
    [
        *((make(), expected) for make, expected in BROKEN.values()),
        (streampickle.dumps("x")[:-1], IncompleteMessageError),
        (streampickle.dumps("x") + b"\0", ProtocolError),  # loads takes exactly one message
    ],
    ids=[*BROKEN, "cut-off", "trailing-bytes"],
)
def test_loads_raises_a_stream_ending_error(data: bytes, expected: type[StreamBrokenError]) -> None:
    with pytest.raises(expected) as info:
        streampickle.loads(data)
    assert type(info.value) is expected
    check_base(info.value, StreamBrokenError)


# -- the async ObjectStream, over every binding and event loop --------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("binding", BINDINGS)
async def test_object_stream_drops_one_message_and_goes_on(binding: str, anyio_backend: object) -> None:
    """Sent by the public API: the sender pickles them fine, the receiver refuses each alone."""
    a, b = await BINDINGS[binding]()

    async def send_all() -> None:  # beside the receives: a memory stream holds no bytes
        for obj in ("before", Point(1, 2), "middle", ZeroDenominator(), "after"):
            await a.send(obj)

    try:
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            assert await b.receive() == "before"
            with pytest.raises(ForbiddenGlobalError) as info:
                await b.receive()
            check_base(info.value, MessageDroppedError)
            assert await b.receive() == "middle"
            with pytest.raises(MalformedPickleError) as malformed:
                await b.receive()
            check_base(malformed.value, MessageDroppedError)
            assert await b.receive() == "after"
    finally:
        await reap_processes()


@pytest.mark.anyio
@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN)
@pytest.mark.parametrize("binding", BINDINGS)
async def test_object_stream_ends_and_every_later_receive_raises(binding: str, case, anyio_backend: object) -> None:
    """The bad bytes go out through the sender's own transport (what ``send`` writes with),
    between two good messages."""
    make, expected = case
    a, b = await BINDINGS[binding]()

    async def send_all() -> None:
        await a.send("before")
        await a._t.send_chunks([make()])
        await a.send("after")  # may wait forever: the receiver reads no more (cancelled below)

    try:
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            assert await b.receive() == "before"
            with pytest.raises(expected) as info:
                await b.receive()
            assert type(info.value) is expected
            check_base(info.value, StreamBrokenError)
            for _ in range(3):
                with pytest.raises(expected, match="failed earlier") as again:
                    await b.receive()
                check_base(again.value, StreamBrokenError)
            tg.cancel_scope.cancel()
    finally:
        await reap_processes()


# -- streampickle.sync over a socket pair ----------------------------------------------------


def test_sync_load_drops_one_message_and_goes_on() -> None:
    a, b = socket.socketpair()
    with a, b:
        for name, (make, _) in DROPPED.items():
            a.sendall(make())
            sync.dump(name, a)
        for name, (_, expected) in DROPPED.items():
            with pytest.raises(expected) as info:
                sync.load(b)
            check_base(info.value, MessageDroppedError)
            assert sync.load(b) == name  # the message was consumed whole: the next one follows


def test_sync_load_raises_a_stream_ending_error_and_so_does_every_later_load() -> None:
    """``sync.load`` keeps no state between calls: after a framing error the socket stands
    inside bytes that are no message, so the next loads fail too (here: the rest of the HTTP
    request, never a message boundary)."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(BROKEN["bad-magic"][0]())
        sync.dump("after", a)
        for _ in range(3):
            with pytest.raises(ProtocolError) as info:
                sync.load(b)
            check_base(info.value, StreamBrokenError)


@pytest.mark.parametrize("case", BROKEN.values(), ids=BROKEN)
def test_sync_load_raises_each_framing_error_as_stream_ending(case) -> None:
    make, expected = case
    a, b = socket.socketpair()
    with a, b:
        a.sendall(make())
        with pytest.raises(expected) as info:
            sync.load(b)
        assert type(info.value) is expected
        check_base(info.value, StreamBrokenError)


# -- the hierarchy itself -----------------------------------------------------------------------


def _public_errors() -> list[type[BaseException]]:
    return [
        obj for name in streampickle.__all__
        if isinstance(obj := getattr(streampickle, name), type) and issubclass(obj, BaseException)
    ]


def test_every_public_error_is_in_exactly_one_family() -> None:
    families = (UsageError, EncodeError, StreamBrokenError, MessageDroppedError)
    for cls in _public_errors():
        if cls is StreamPickleError:
            continue
        assert sum(issubclass(cls, family) for family in families) == 1, cls
        assert cls.poisons_stream is issubclass(cls, StreamBrokenError), cls


def test_the_classes_each_family_holds() -> None:
    assert {c for c in _public_errors() if issubclass(c, StreamBrokenError)} == {
        StreamBrokenError, ProtocolError, IncompleteMessageError, LimitExceededError,
        streampickle.DeadlineExceededError, AuthenticationError,
    }
    assert {c for c in _public_errors() if issubclass(c, MessageDroppedError)} == {
        MessageDroppedError, MalformedPickleError, ForbiddenGlobalError,
    }
    assert not issubclass(MalformedPickleError, ProtocolError)  # it was, and is no longer


def test_poisons_stream_is_read_from_the_hierarchy_and_cant_be_set() -> None:
    for cls in (UsageError, EncodeError, MalformedPickleError):
        assert cls.poisons_stream is False
    assert ProtocolError("x").poisons_stream is True and StreamPickleError.poisons_stream is False
    with pytest.raises(TypeError, match="poisons_stream"):
        type("Quiet", (ProtocolError,), {"poisons_stream": False})
    with pytest.raises(TypeError, match="both"):
        type("Both", (ProtocolError, MalformedPickleError), {})
    # an application's own subclass inherits the rule
    assert type("Mine", (MalformedPickleError,), {}).poisons_stream is False


def test_an_encode_error_is_neither_family_and_leaves_the_stream_usable() -> None:
    encoder = streampickle.Encoder()
    with pytest.raises(EncodeError) as info:
        encoder.encode(staticmethod(len))
    assert isinstance(info.value, TypeError) and isinstance(info.value, pickle.PicklingError)
    assert not isinstance(info.value, (StreamBrokenError, MessageDroppedError))
    assert info.value.poisons_stream is False
    assert streampickle.loads(b"".join(encoder.encode(fractions.Fraction(1, 3)))) == fractions.Fraction(1, 3)


@pytest.mark.parametrize("case", sorted(DROPPED))
def test_a_dropped_message_is_what_pickle_loads_would_raise(case: str) -> None:
    """Code written for ``pickle.loads`` (``except pickle.UnpicklingError``) keeps working;
    a stream-ending error is not one, since the next call can't go on."""
    make, expected = DROPPED[case]
    with pytest.raises(pickle.UnpicklingError) as info:
        streampickle.loads(make())
    assert type(info.value) is expected
    assert not issubclass(StreamBrokenError, pickle.UnpicklingError)


def test_errors_cross_a_process_whole() -> None:
    # multiprocessing and dask pickle an exception to carry it to another process: each error
    # that a real failure raises must come back as itself, with its fields.
    raised: list[BaseException] = []
    forbidden = Decoder()
    forbidden.feed(make_message(b"\x80\x05\x8c\x02os\x8c\x06system\x93."))
    cut = Decoder()
    cut.feed(streampickle.dumps([1, 2, 3])[:-3])
    for fail in (lambda: next(forbidden), cut.feed_eof):
        try:
            fail()
        except streampickle.StreamPickleError as exc:
            raised.append(exc)
    assert [type(e) for e in raised] == [ForbiddenGlobalError, IncompleteMessageError]
    for error in raised:
        back = pickle.loads(pickle.dumps(error, protocol=5))
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)
    fields = {"limit": "message_seconds", "seconds": 1.5, "received": 10, "expected": 20}
    deadline = streampickle.DeadlineExceededError("too slow", **fields)
    back = pickle.loads(pickle.dumps(deadline, protocol=5))
    assert type(back) is streampickle.DeadlineExceededError and vars(back) == vars(deadline) == fields
