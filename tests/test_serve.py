"""``ObjectStreamListener.serve`` isolates connections, over real TCP and Unix sockets.

A bad peer (garbage, a forbidden global, HTTP, half a message, a handler that raises) ends its
own connection, logged with its address on the "streampickle" logger, while a good peer on
another connection is answered before and after. Accept errors for lack of descriptors are
waited out, and ``max_connections`` holds further peers in the backlog. Every assertion is
about order or state, never about how long something took; timeouts only guard against hangs.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

import streampickle
import streampickle._serve
from streampickle import ObjectStream, ObjectStreamListener
from streampickle._wire import pack_header

pytestmark = pytest.mark.anyio

GUARD = 30  # seconds: only ever a hang's failure, never an assertion

# The bad peers' bytes.
MALFORMED_23_BYTES = pack_header(flags=0, chunk_count=0, pickle_length=3) + b"\xff\xff\xff"
# os.system("id -u"), as protocol 5 writes it: PROTO, two names, STACK_GLOBAL, an argument, REDUCE.
OS_SYSTEM_PICKLE = b"\x80\x05\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x05id -u\x94\x85\x94R\x94."
OS_SYSTEM = pack_header(flags=0, chunk_count=0, pickle_length=len(OS_SYSTEM_PICKLE)) + OS_SYSTEM_PICKLE
HTTP_REQUEST = b"GET / HTTP/1.1\r\n\r\n"
HALF_A_MESSAGE = streampickle.dumps(np.arange(1000))[:2000]

assert len(MALFORMED_23_BYTES) == 23


async def echo(stream: ObjectStream) -> None:
    """The README's handler shape: ``async for``, nothing caught."""
    async for request in stream:
        if request == "raise":
            raise RuntimeError("the handler's own bug")
        await stream.send(("echo", request))


async def tolerant(stream: ObjectStream) -> None:
    """The README's recommended handler: a refused message is answered, a poisoned stream ends."""
    while True:
        try:
            request = await stream.receive()
        except anyio.EndOfStream:
            return
        except streampickle.StreamPickleError as exc:
            if exc.poisons_stream:
                raise
            await stream.send({"error": type(exc).__name__})
            continue
        await stream.send(("echo", request))


# -- servers and peers ---------------------------------------------------------------------------


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def bound_socket(transport: str) -> socket.socket:
    """A listening socket on 127.0.0.1 (any port) or at a fresh Unix path."""
    if transport == "tcp":
        return socket.create_server(("127.0.0.1", 0))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(tempfile.mkdtemp(), "sock"))
    sock.listen()
    return sock


async def listen(transport: str) -> ObjectStreamListener:
    if transport == "tcp":
        return await streampickle.create_tcp_listener(local_host="127.0.0.1")
    return await streampickle.create_unix_listener(os.path.join(tempfile.mkdtemp(), "sock"))


def address_of(listener: ObjectStreamListener) -> Any:
    """``(host, port)`` for TCP, the path for a Unix socket."""
    return listener.extra(SocketAttribute.local_address)


async def connect(address: Any) -> ObjectStream:
    if isinstance(address, tuple):
        return await streampickle.connect_tcp(*address)
    return await streampickle.connect_unix(address)


def raw_peer(address: Any) -> socket.socket:
    """A plain blocking socket to the server: a bad peer writes its bytes with it. Connecting
    and writing a few bytes never wait for the server: the kernel completes both."""
    sock = socket.socket(socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX)
    sock.connect(address)
    return sock


def expected_peer(sock: socket.socket) -> str:
    """What the server's log records should name for the peer that owns ``sock``."""
    if sock.family == socket.AF_INET:
        host, port = sock.getsockname()
        return f"{host}:{port}"
    return f"pid {os.getpid()}"  # a Unix client has no address of its own; its process does


@asynccontextmanager
async def serving(
    listener: ObjectStreamListener, handler: Callable[..., Any], **options: Any
) -> AsyncIterator[None]:
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(listener.serve, handler, **options))
        yield
        tg.cancel_scope.cancel()


async def round_trip(stream: ObjectStream, obj: Any) -> None:
    with anyio.fail_after(GUARD):
        await stream.send(obj)
        assert await stream.receive() == ("echo", obj)


async def closed_by_server(sock: socket.socket) -> None:
    """Wait until the server has closed ``sock``'s connection (EOF, or a reset if it closed
    with our bytes unread)."""
    with anyio.fail_after(GUARD):
        await anyio.wait_readable(sock)
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


class LogWatch(logging.Handler):
    """Wakes a test when the "streampickle" logger writes a record; the test then asserts on
    ``caplog``. Records are emitted on the event loop's thread, from the task that logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed: anyio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, predicate: Callable[[logging.LogRecord], bool]) -> logging.LogRecord:
        with anyio.fail_after(GUARD):
            while True:
                for record in self.records:
                    if predicate(record):
                        return record
                self._changed = anyio.Event()
                await self._changed.wait()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.DEBUG, logger="streampickle")
    watch = LogWatch()
    logger = logging.getLogger("streampickle")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


# -- bad peers, each on its own connection, while a good one goes on ---------------------------


def send_and_keep(data: bytes) -> Callable[[socket.socket], None]:
    return lambda sock: sock.sendall(data)


def send_and_die(data: bytes, *, reset: bool) -> Callable[[socket.socket], None]:
    def act(sock: socket.socket) -> None:
        sock.sendall(data)
        if reset and sock.family == socket.AF_INET:  # close with RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()

    return act


# kind: (what the bad peer does, the level logged, the error named in the record)
BAD_PEERS = {
    "malformed-23-bytes": (send_and_keep(MALFORMED_23_BYTES), logging.WARNING, {"MalformedPickleError"}),
    "forbidden-global": (send_and_keep(OS_SYSTEM), logging.WARNING, {"ForbiddenGlobalError"}),
    "http-request": (send_and_keep(HTTP_REQUEST), logging.WARNING, {"ProtocolError"}),
    "dies-mid-message": (send_and_die(HALF_A_MESSAGE, reset=False), logging.INFO, {"IncompleteMessageError"}),
    # on TCP the reset is read as ECONNRESET; a Unix socket has no reset and ends like the above
    "resets-mid-message": (
        send_and_die(HALF_A_MESSAGE, reset=True),
        logging.INFO,
        {"BrokenResourceError", "IncompleteMessageError"},
    ),
    "handler-raises": (send_and_keep(streampickle.dumps("raise")), logging.ERROR, {"RuntimeError"}),
}


@pytest.mark.parametrize("kind", list(BAD_PEERS))
async def test_a_bad_peer_ends_only_its_own_connection(
    transport: str, kind: str, logs: LogWatch, caplog: Any
) -> None:
    act, level, errors = BAD_PEERS[kind]
    listener = await listen(transport)
    address = address_of(listener)
    async with serving(listener, echo):
        good = await connect(address)
        await round_trip(good, "before")

        bad = raw_peer(address)
        peer = expected_peer(bad)
        act(bad)
        await logs.wait_for(lambda r: peer in r.getMessage())
        if bad.fileno() >= 0:
            await closed_by_server(bad)
            bad.close()

        await round_trip(good, "after")  # the same connection, untouched
        async with await connect(address) as another:  # and serve() still accepts
            await round_trip(another, "new")
        await good.aclose()

    (record,) = [r for r in caplog.records if peer in r.getMessage()]
    assert record.name == "streampickle"
    assert record.levelno == level
    assert peer in record.peer
    assert any(f"{error}:" in record.getMessage() for error in errors), record.getMessage()
    assert (record.exc_info is not None) == (level == logging.ERROR)  # a traceback for bugs only
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r is not record]


async def test_the_recommended_handler_answers_refused_messages_and_goes_on(
    transport: str, logs: LogWatch
) -> None:
    listener = await listen(transport)
    address = address_of(listener)
    async with serving(listener, tolerant), await connect(address) as good:
        await round_trip(good, 1)
        bad = raw_peer(address)
        async with ObjectStream.from_socket(bad) as bad_stream:
            with anyio.fail_after(GUARD):
                bad.sendall(MALFORMED_23_BYTES)
                assert await bad_stream.receive() == {"error": "MalformedPickleError"}
                bad.sendall(OS_SYSTEM)
                assert await bad_stream.receive() == {"error": "ForbiddenGlobalError"}
                await bad_stream.send("still here")  # the stream kept going after both
                assert await bad_stream.receive() == ("echo", "still here")
                await round_trip(good, 2)
                bad.sendall(HTTP_REQUEST)  # this one poisons the stream: serve() closes it
                record = await logs.wait_for(lambda r: "ProtocolError" in r.getMessage())
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await bad_stream.receive()
        assert record.levelno == logging.WARNING
        await round_trip(good, 3)


async def test_a_failing_connection_does_not_cancel_a_given_task_group(logs: LogWatch) -> None:
    listener = await listen("tcp")
    address = address_of(listener)
    async with listener, anyio.create_task_group() as handlers:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo, handlers)
            async with await connect(address) as good:
                await round_trip(good, "before")
                bad = raw_peer(address)
                bad.sendall(HTTP_REQUEST)
                await closed_by_server(bad)
                bad.close()
                await round_trip(good, "after")
            tg.cancel_scope.cancel()
        handlers.cancel_scope.cancel()


async def test_cancelling_serve_cancels_the_handlers_and_is_not_logged(caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="streampickle")
    cancelled: list[str] = []
    started = anyio.Event()

    async def waits(stream: ObjectStream) -> None:
        started.set()
        try:
            await stream.receive()
        except anyio.get_cancelled_exc_class():
            cancelled.append("handler")
            raise

    listener = await listen("tcp")
    async with listener:
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, waits)
                async with await connect(address_of(listener)):
                    await started.wait()
                    tg.cancel_scope.cancel()
    assert cancelled == ["handler"]
    assert not caplog.records


async def test_a_base_exception_from_a_handler_ends_serve(caplog: Any) -> None:
    class Stop(BaseException):
        pass

    async def stops(stream: ObjectStream) -> None:
        raise Stop

    listener = await listen("tcp")
    async with listener, await connect(address_of(listener)):
        with anyio.fail_after(GUARD), pytest.raises(BaseExceptionGroup) as info:
            await listener.serve(stops)
    assert info.group_contains(Stop)
    assert not [r for r in caplog.records if r.name == "streampickle"]


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
async def test_max_connections_must_be_a_positive_int(value: Any) -> None:
    async with await listen("tcp") as listener:
        with pytest.raises(streampickle.UsageError, match="max_connections"):
            await listener.serve(echo, max_connections=value)


# -- max_connections -----------------------------------------------------------------------------


class CountingListener(ObjectStreamListener):
    """Counts the accept calls serve() has started."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, {})
        self.accepts_started = 0

    async def accept(self) -> ObjectStream:
        self.accepts_started += 1
        return await super().accept()


async def test_max_connections_holds_further_peers_in_the_backlog(transport: str) -> None:
    listener = CountingListener(bound_socket(transport))
    address = address_of(listener)
    events: list[str] = []
    async with serving(listener, echo, max_connections=2):
        a = await connect(address)
        await round_trip(a, "a1")
        b = await connect(address)
        await round_trip(b, "b1")
        # b's handler ran, so serve() has passed b's accept: at the limit, it called no other
        assert listener.accepts_started == 2

        c = await connect(address)  # the kernel completes the connect: c waits in the backlog
        await c.send("c1")
        c_answered = anyio.Event()

        async def c_waits() -> None:
            assert await c.receive() == ("echo", "c1")
            events.append("c answered")
            c_answered.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(c_waits)
            await round_trip(a, "a2")  # the two admitted peers are served meanwhile
            await round_trip(b, "b2")
            assert events == [] and listener.accepts_started == 2
            events.append("a closed")
            await a.aclose()
            with anyio.fail_after(GUARD):
                await c_answered.wait()
        assert events == ["a closed", "c answered"]
        await round_trip(b, "b3")
        await round_trip(c, "c2")
        await b.aclose()
        await c.aclose()


async def test_a_failed_connection_frees_its_place(transport: str, logs: LogWatch) -> None:
    listener = await listen(transport)
    address = address_of(listener)
    async with serving(listener, echo, max_connections=1):
        bad = raw_peer(address)
        bad.sendall(HTTP_REQUEST)
        async with await connect(address) as good:  # waits in the backlog until bad is closed
            await round_trip(good, "served")
        await closed_by_server(bad)
        bad.close()


# -- accept errors: out of descriptors -----------------------------------------------------------


class FailingListener(ObjectStreamListener):
    """A listener whose first accept calls raise the given errors, as accept(2) does when the
    process is out of descriptors; later calls accept for real."""

    def __init__(self, sock: socket.socket, failures: list[BaseException]) -> None:
        super().__init__(sock, {})
        self.failures = failures

    async def accept(self) -> ObjectStream:
        if self.failures:
            await anyio.lowlevel.checkpoint()
            raise self.failures.pop(0)
        return await super().accept()


def os_error(code: int, wrapped: bool) -> BaseException:
    exc = OSError(code, os.strerror(code))
    if not wrapped:
        return exc  # streampickle's listeners, anyio's TCP listener on asyncio
    try:  # anyio's listeners on trio, and its Unix listener on asyncio
        raise anyio.BrokenResourceError from exc
    except anyio.BrokenResourceError as broken:
        return broken


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "wrapped"])
@pytest.mark.parametrize(
    "code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM], ids=errno.errorcode.get
)
async def test_accept_out_of_resources_is_waited_out(
    code: int, wrapped: bool, logs: LogWatch, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streampickle._serve, "ACCEPT_RETRY_DELAY", 0.001)
    listener = FailingListener(bound_socket("tcp"), [os_error(code, wrapped) for _ in range(3)])
    async with serving(listener, echo), await connect(address_of(listener)) as client:
        await round_trip(client, "served after the failures")
    assert listener.failures == []
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    name = errno.errorcode[code]
    assert [level for level, _ in records] == [logging.ERROR, logging.DEBUG, logging.DEBUG, logging.INFO]
    assert name in records[0][1] and os.strerror(code) in records[0][1]
    assert records[3][1] == "accepting again after 3 failed attempts"


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: os_error(errno.EINVAL, wrapped=False),
        lambda: os_error(errno.EINVAL, wrapped=True),
        anyio.ClosedResourceError,
    ],
    ids=["oserror", "wrapped", "closed"],
)
async def test_any_other_accept_error_ends_serve(make_error: Callable[[], BaseException]) -> None:
    error = make_error()
    listener = FailingListener(bound_socket("tcp"), [error])
    async with listener:
        with anyio.fail_after(GUARD), pytest.raises(ExceptionGroup) as info:
            await listener.serve(echo)
    assert info.group_contains(type(error))


RLIMIT_SERVER = textwrap.dedent(
    """
    import logging, os, resource, socket, sys
    import anyio
    import streampickle
    from anyio.abc import SocketAttribute

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")

    async def echo(stream):
        async for obj in stream:
            await stream.send(obj)

    def open_fds():
        fds = set()
        for name in os.listdir("/proc/self/fd"):
            try:
                os.fstat(int(name))
            except OSError:
                continue  # the directory listdir had open
            fds.add(int(name))
        return fds

    async def main():
        # one round trip first, so that nothing is imported (opening files) after the limit drops
        a, b = socket.socketpair()
        x, y = streampickle.ObjectStream.from_socket(a), streampickle.ObjectStream.from_socket(b)
        async with x, y:
            await x.send("warm")
            assert await y.receive() == "warm"
        async with await streampickle.create_tcp_listener(local_host="127.0.0.1") as listener:
            fds = open_fds()
            limit = max(fds) + 3
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            print("READY", listener.extra(SocketAttribute.local_port), limit - len(fds), flush=True)
            await listener.serve(echo)

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("server_backend", ["asyncio", "trio"])
async def test_a_server_out_of_descriptors_recovers(server_backend: str) -> None:
    """A real process with RLIMIT_NOFILE lowered: one more peer than it has descriptors for
    makes accept fail with EMFILE; once the peers leave, serve() accepts again."""
    process = await anyio.open_process([sys.executable, "-u", "-c", RLIMIT_SERVER, server_backend])
    assert process.stdout is not None and process.stderr is not None
    stdout = BufferedByteReceiveStream(process.stdout)
    stderr = BufferedByteReceiveStream(process.stderr)
    seen: list[bytes] = []

    async def log_line_with(text: bytes) -> None:
        while not any(text in line for line in seen):
            seen.append(await stderr.receive_until(b"\n", 100_000))

    try:
        with anyio.fail_after(GUARD):
            ready, port, capacity = (await stdout.receive_until(b"\n", 1000)).split()
            assert ready == b"READY"
            peers = [socket.create_connection(("127.0.0.1", int(port))) for _ in range(int(capacity) + 1)]
            await log_line_with(b"EMFILE")
            for peer in peers:
                peer.close()
            async with await streampickle.connect_tcp("127.0.0.1", int(port)) as client:
                await client.send("after EMFILE")
                assert await client.receive() == "after EMFILE"
            await log_line_with(b"accepting again after")
    finally:
        process.kill()
        await process.aclose()
    assert next(line for line in seen if b"EMFILE" in line).startswith(b"ERROR streampickle accept failed")


# -- the example ---------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_tcp_server_example_runs() -> None:
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "tcp_server.py")
    with anyio.fail_after(GUARD * 2):
        result = await anyio.run_process([sys.executable, example], check=False)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert out.count("3 round trips") == 4
    assert "ForbiddenGlobalError" in out
    assert "connection closed by the server" in out
    assert "WARNING" in result.stderr.decode() and "ProtocolError" in result.stderr.decode()


# -- a connection that fails while it is set up --------------------------------------------------


@pytest.mark.parametrize(
    "failure", [OSError(errno.ECONNRESET, "reset"), RuntimeError("a bug")], ids=["oserror", "other"]
)
async def test_a_connection_whose_setup_fails_is_closed_and_only_an_oserror_is_passed_over(
    failure: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The accepted socket is closed either way (never left to the garbage collector); a
    # connection's own OSError (reset before it was set up) doesn't stop accepting.
    made: list[socket.socket] = []
    real = ObjectStream.from_socket

    def from_socket(sock: socket.socket, **options: Any) -> ObjectStream:
        made.append(sock)
        if len(made) == 1:
            raise failure
        return real(sock, **options)

    monkeypatch.setattr(ObjectStream, "from_socket", from_socket)
    listener = ObjectStreamListener(bound_socket("tcp"), {})
    first = raw_peer(address_of(listener))
    async with listener:
        if isinstance(failure, OSError):
            second = raw_peer(address_of(listener))
            with anyio.fail_after(GUARD):
                stream = await listener.accept()
            await stream.aclose()
            second.close()
        else:
            with anyio.fail_after(GUARD), pytest.raises(RuntimeError, match="a bug"):
                await listener.accept()
    assert made[0].fileno() == -1  # closed
    first.settimeout(GUARD)
    assert first.recv(1) == b""  # and the peer saw it close
    first.close()
