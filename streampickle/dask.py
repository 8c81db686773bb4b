"""A dask.distributed comm backend: ``sp://host:port`` moves a cluster's messages through
streampickle's TCP streams.

Installed by the ``dask`` extra and registered through the ``distributed.comm.backends`` entry
point, so ``LocalCluster(protocol="sp://")``, ``dask scheduler --protocol sp`` and
``dask worker sp://host:port`` need nothing else (docs/dask.md).

Theory of operation:

* *dask serializes, streampickle moves.* ``write`` turns a message into dask's frames
  (``distributed.comm.utils.to_frames``: a msgpack header and the serialized payloads, numpy
  arrays as views of their memory), unsplit, and sends the list of frames as one
  streampickle message. Each frame over ``_IN_BAND`` bytes, and each frame that is not
  ``bytes`` (a view of an array), goes as a ``pickle.PickleBuffer``: a zero-copy side chunk,
  received straight into its own aligned memory, writable if the sender's was. ``read``
  takes the list back and hands it to ``from_frames``. dask's own TCP comm splits frames
  over 64 MiB and copies them again when it joins them; here a frame arrives whole.
* *Safe loading stays on.* What crosses the wire at streampickle's level is a list of bytes
  and buffers, which the safe loader builds without a single global; anything else from the
  peer is a protocol violation that closes the comm. dask's own deserialization of the
  frames (which unpickles what its peer sends) is unchanged: ``key=`` is what keeps
  strangers out.
* *A key for the cluster.* ``distributed.comm.sp.key`` in dask's config (or the
  ``STREAMPICKLE_DASK_KEY`` environment variable) makes every connection carry an HMAC over
  every byte, with replay and reordering refused; a peer without the key is refused at its
  first message, the handshake. It authenticates, it does not encrypt, so
  ``distributed.comm.require-encryption`` refuses ``sp://`` (use ``tls://`` there).
* *Errors become dask's.* A closed or broken stream, a peer's bad bytes, a refused key: the
  comm is aborted and ``CommClosedError`` is raised, naming the peer and the cause. A read
  or write interrupted by anything else (a cancellation) aborts the comm too, as dask's TCP
  comm does: its caller can't know where the message stopped.
* *Idle receive memory is bounded.* Large frames are received into memory of
  ``streampickle.buffer_pool``, which keeps dead arrays' memory for reuse; a dask worker's
  memory limit counts that memory, so the backend sizes the pool from
  ``distributed.comm.sp.pool`` (``max-bytes``, ``max-idle``) when it is first used.

Configuration is read when a connection or listener is made, never at import.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import dask.config
from anyio.abc import SocketAttribute
from dask.utils import parse_bytes, parse_timedelta
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import (
    BaseListener,
    Comm,
    CommClosedError,
    Connector,
    FatalCommClosedError,
)
from distributed.comm.tcp import BaseTCPBackend
from distributed.comm.utils import ensure_concrete_host, from_frames, to_frames

from ._anyio_compat import notify_closing
from ._errors import AuthenticationError, StreamPickleError, UsageError
from ._mac import Key, MacName
from ._pool import buffer_pool
from ._sockets import ObjectStreamListener, connect_tcp, create_tcp_listener
from ._stream import ObjectStream

__all__ = [
    "KEY_ENV",
    "EncryptionRequiredError",
    "SPBackend",
    "SPComm",
    "SPConnector",
    "SPListener",
    "cluster_key",
]

logger = logging.getLogger("streampickle.dask")

#: The environment variable that gives the cluster's key when dask's config has none.
KEY_ENV = "STREAMPICKLE_DASK_KEY"
# Frames of bytes up to this size travel inside the pickle (one write with the header); larger
# ones, and every view of an array, as zero-copy side chunks. dask's small messages (a task,
# a heartbeat) are one msgpack frame of a few hundred bytes: a side chunk would cost them an
# extra length-table entry and allocation each.
_IN_BAND = 64 * 1024
# The receive pool's defaults for a dask process: less than streampickle's own (1 GiB for
# 10 s), since a worker's memory limit counts idle pool memory (MADV_FREE pages stay in RSS
# until the kernel takes them) and a worker's transfers come in a burst, then stop.
_POOL_MAX_BYTES = "256 MiB"
_POOL_MAX_IDLE = "2s"


_MACS: tuple[MacName, ...] = ("hmac-sha256", "blake3", "poly1305")


class EncryptionRequiredError(UsageError):
    """``distributed.comm.require-encryption`` is set, and ``sp://`` does not encrypt."""


def cluster_key() -> Key | None:
    """The cluster's key: ``distributed.comm.sp.key`` in dask's config (a string, or bytes),
    else the ``STREAMPICKLE_DASK_KEY`` environment variable, else None (no authentication).
    ``distributed.comm.sp.mac`` picks the MAC (``hmac-sha256`` by default; see
    :class:`streampickle.Key`); every process of the cluster must use the same key and MAC."""
    secret = dask.config.get("distributed.comm.sp.key", None)
    if secret is None or secret == "":
        secret = os.environ.get(KEY_ENV) or None
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise UsageError(
            f"distributed.comm.sp.key must be a string or bytes, not {type(secret).__name__}: "
            f"set it in dask's config or in the {KEY_ENV} environment variable"
        )
    mac = dask.config.get("distributed.comm.sp.mac", None) or "hmac-sha256"
    if mac not in _MACS:
        raise UsageError(f"distributed.comm.sp.mac must be one of {', '.join(_MACS)}, not {mac!r}")
    return Key(secret, mac=mac)


def _configure_pool() -> None:
    """Bound the receive pool's idle memory from ``distributed.comm.sp.pool``."""
    max_bytes = dask.config.get("distributed.comm.sp.pool.max-bytes", None)
    max_idle = dask.config.get("distributed.comm.sp.pool.max-idle", None)
    max_bytes = _POOL_MAX_BYTES if max_bytes is None else max_bytes  # 0 is a value: no pool
    max_idle = _POOL_MAX_IDLE if max_idle is None else max_idle
    buffer_pool.configure(
        max_bytes=int(parse_bytes(max_bytes)) if isinstance(max_bytes, str) else int(max_bytes),
        max_idle=float(parse_timedelta(max_idle, default="seconds")),
    )


def _check_encryption(address: str, connection_args: dict[str, Any]) -> None:
    required = connection_args.get("require_encryption")
    if required is None:
        required = dask.config.get("distributed.comm.require-encryption", None)
    if required:
        raise EncryptionRequiredError(
            f"refusing {address!r}: distributed.comm.require-encryption is set, and sp:// "
            f"does not encrypt (its key authenticates only). Use tls:// for this cluster, or "
            f"turn require-encryption off where authentication is enough."
        )


def _frame_out(frame: Any) -> Any:
    """A frame as it goes into the message: small bytes in-band, the rest out of band."""
    if type(frame) is bytes and len(frame) <= _IN_BAND:
        return frame
    view = frame if isinstance(frame, memoryview) else memoryview(frame)
    if not view.contiguous:
        view = memoryview(view.tobytes())
    return pickle.PickleBuffer(view)


def _frames_in(message: Any) -> list[Any]:
    """The peer's message as frames, or ``ProtocolViolation`` if it is anything else."""
    if type(message) is not list or not all(isinstance(f, (bytes, memoryview)) for f in message):
        raise _NotFrames(f"expected a list of dask frames, got a {type(message).__name__}")
    return message


class _NotFrames(Exception):
    pass


def _address(prefix: str, sockaddr: Any) -> str:
    return prefix + unparse_host_port(*sockaddr[:2])


class SPComm(Comm):
    """An established ``sp://`` connection: one :class:`ObjectStream` over TCP."""

    def __init__(self, stream: ObjectStream, local_addr: str, peer_addr: str, deserialize: bool = True) -> None:
        self._closed = False
        super().__init__(deserialize=deserialize)
        self._stream = stream
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        self._reads = 0  # messages read: a key refused on the first one is a stranger
        # A comm dropped without close() closes its socket when collected, as dask's TCP comm.
        self._finalizer = weakref.finalize(self, _abort_dangling, stream, repr(self))
        self._finalizer.atexit = False

    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    @property
    def stream(self) -> ObjectStream:
        """The :class:`streampickle.ObjectStream` under this comm."""
        return self._stream

    async def read(self, deserializers: Any = None) -> Any:
        if self._closed:
            raise CommClosedError(f"in {self}: the comm is closed")
        try:
            frames = _frames_in(await self._stream.receive())
        except (anyio.EndOfStream, anyio.ClosedResourceError) as exc:
            self.abort()
            raise CommClosedError(f"in {self}: the connection is closed") from exc
        except AuthenticationError as exc:
            self.abort()
            if self._reads:  # cut after a good message (a peer's abort, keyed): a closed comm
                raise CommClosedError(f"in {self}: {exc}") from exc
            logger.warning("refused %s: %s (every process of the cluster needs the same "
                           "distributed.comm.sp.key or %s)", self._peer_addr, exc, KEY_ENV)
            raise FatalCommClosedError(
                f"in {self}: the peer's first message doesn't carry this cluster's key: {exc}"
            ) from exc
        except (anyio.BrokenResourceError, OSError, StreamPickleError, _NotFrames) as exc:
            self.abort()
            raise CommClosedError(f"in {self}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.abort()  # interrupted: the caller can't know where the message stopped
            raise
        self._reads += 1
        try:
            # distributed's comm helpers are unannotated
            return await from_frames(  # type: ignore[no-untyped-call]
                frames, deserialize=self.deserialize, deserializers=deserializers, allow_offload=self.allow_offload
            )
        except EOFError as exc:
            self.abort()
            raise CommClosedError(f"in {self}: aborted stream on truncated data") from exc

    async def write(self, msg: Any, serializers: Any = None, on_error: str | None = "message") -> int:
        if self._closed:
            raise CommClosedError(f"in {self}: the comm is closed")
        frames = await to_frames(  # type: ignore[no-untyped-call]  # unannotated in distributed
            msg,
            allow_offload=self.allow_offload,
            serializers=serializers,
            on_error=on_error,
            context={"sender": self.local_info, "recipient": self.remote_info, **self.handshake_options},
        )
        try:
            await self._stream.send([_frame_out(f) for f in frames])
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
            self.abort()
            raise CommClosedError(f"in {self}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.abort()
            raise
        return sum(memoryview(f).nbytes for f in frames)

    async def close(self) -> None:
        """Close the connection, after the key's end of stream if there is a key."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        try:
            await self._stream.aclose()
        except (OSError, anyio.BrokenResourceError, StreamPickleError):
            pass  # the peer is gone already: closed all the same

    def abort(self) -> None:
        self._closed = True
        self._finalizer.detach()
        self._stream.abort()

    def closed(self) -> bool:
        return self._closed

    @property
    def extra_info(self) -> dict[str, Any]:
        return {}


def _abort_dangling(stream: ObjectStream, name: str) -> None:
    logger.warning("closing dangling stream in %s", name)
    stream.abort()


class SPConnector(Connector):
    prefix = "sp://"

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> SPComm:
        _check_encryption(self.prefix + address, connection_args)
        host, port = parse_host_port(address)
        try:
            stream = await connect_tcp(host, port, key=cluster_key())
        except OSError as exc:
            raise CommClosedError(f"could not connect to {self.prefix}{address}: {exc}") from exc
        _keepalive(stream)
        local = _address(self.prefix, stream.extra(SocketAttribute.local_address))
        return SPComm(stream, local, self.prefix + address, deserialize)


def _keepalive(stream: ObjectStream) -> None:
    """TCP keepalive as dask's TCP comm sets it (``distributed.comm.timeouts.tcp``), so a
    peer that vanished without a FIN is noticed."""
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None:
        return
    timeout = int(parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp"), default="seconds"))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            probes = 10
            interval = max(1, (timeout - max(2, timeout // 4)) // probes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, timeout - interval * probes))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout * 1000)
    except OSError:
        logger.debug("could not set TCP keepalive on %r", sock, exc_info=True)


class SPListener(BaseListener):
    prefix = "sp://"

    def __init__(
        self,
        address: str,
        comm_handler: Callable[[SPComm], Any],
        deserialize: bool = True,
        allow_offload: bool = True,
        default_host: str | None = None,
        default_port: int = 0,
        **connection_args: Any,
    ) -> None:
        super().__init__()
        _check_encryption(self.prefix + address, connection_args)
        self.ip, self.port = parse_host_port(address, default_port)
        self.default_host = default_host
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self._socket: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        backlog = int(dask.config.get("distributed.comm.socket-backlog"))
        host = self.ip or None
        if host == "0.0.0.0":
            host = None
        listener = await create_tcp_listener(
            local_host=host, local_port=int(self.port), backlog=backlog, key=cluster_key(), budget=None
        )
        self._socket = listener.extra(SocketAttribute.raw_socket)
        host_port = listener.extra(SocketAttribute.local_address)
        self._bound = (str(host_port[0]), int(host_port[1]))
        self._accepting = asyncio.ensure_future(self._accept(listener))

    async def _accept(self, listener: ObjectStreamListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return  # stopped
            except OSError:
                logger.exception("%s stops accepting connections", self.listen_address)
                raise
            task = asyncio.ensure_future(self._handle(stream))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, stream: ObjectStream) -> None:
        peer = _address(self.prefix, stream.extra(SocketAttribute.remote_address))
        if self._accepting is None:  # stopped after the accept: the peer must not hang
            await stream.aclose()
            return
        _keepalive(stream)
        local = _address(self.prefix, stream.extra(SocketAttribute.local_address))
        comm = SPComm(stream, local, peer, self.deserialize)
        comm.allow_offload = self.allow_offload
        try:
            await self.on_connection(comm)
        except CommClosedError:
            logger.info("connection from %s closed before the handshake completed", peer)
            return
        await self.comm_handler(comm)

    def stop(self) -> None:
        accepting, self._accepting = self._accepting, None
        if accepting is not None:
            accepting.cancel()
            # Closed here, not by the cancelled task: stop() must free the port before it returns.
            if self._socket is not None and self._socket.fileno() >= 0:
                notify_closing(self._socket)
                self._socket.close()

    def get_host_port(self) -> tuple[str, int]:
        if self._bound is None:
            raise ValueError("invalid operation on a listener that was not started")
        return self._bound

    @property
    def listen_address(self) -> str:
        return self.prefix + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self) -> str:
        host, port = self.get_host_port()
        concrete = ensure_concrete_host(host, default_host=self.default_host)  # type: ignore[no-untyped-call]  # unannotated in distributed
        return self.prefix + unparse_host_port(concrete, port)


class SPBackend(BaseTCPBackend):
    """The ``sp`` scheme: addresses as dask's TCP (``host:port``), connections streampickle's."""

    _connector_class = SPConnector
    _listener_class = SPListener

    def __init__(self) -> None:
        _configure_pool()
