"""A dask.distributed comm backend: ``sp://host:port`` moves a cluster's messages through
streampickle's TCP streams, and ``sp+unix://host/path`` through Unix sockets on one host.

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
  every byte, with replay and reordering refused; each connection starts with
  :meth:`ObjectStream.handshake`, so a recorded session replayed runs nothing, and a peer
  without the key is refused at its first message. It authenticates, it does not encrypt, so
  ``distributed.comm.require-encryption`` refuses ``sp://`` (use ``tls://`` there).
* *Peers that stall can't starve a listener.* A connection still in its handshakes holds a
  descriptor until ``distributed.comm.timeouts.connect``; at most
  ``distributed.comm.sp.max-handshakes`` are kept at once (the oldest goes for a newcomer),
  and an ``accept`` that fails for want of descriptors is retried, as ``serve`` does.
* *Errors become dask's.* A closed or broken stream, a peer's bad bytes, a refused key: the
  comm is aborted and ``CommClosedError`` is raised, naming the peer and the cause. A read
  or write interrupted by anything else (a cancellation) aborts the comm too, as dask's TCP
  comm does: its caller can't know where the message stopped.
* *One host: Unix sockets and shared memory.* ``sp+unix://`` listens on a Unix socket (mode
  0600). Without a key its connections pass descriptors: a frame lying in shared memory the
  sender made (an array a task made with ``shared_empty``) is handed over as that memory,
  not copied; other frames go as bytes, since copying them into shared memory first costs
  more than the socket does.
* *Idle receive memory, briefly.* ``streampickle.buffer_pool`` keeps dead arrays' memory for
  reuse, and a dask worker's memory limit counts it, so a process that listens on ``sp://``
  or ``sp+unix://`` (a scheduler, nanny or worker; not a client) bounds the pool from
  ``distributed.comm.sp.pool`` (``max-bytes``, ``max-idle``) when it starts listening:
  256 MiB for 1 s by default, with ``release_before_map`` (idle memory of another size goes
  before a new chunk's memory is mapped), and the listener's event loop trims the pool every
  quarter of ``max-idle``, so that idle memory goes within about 1.25 s of an array's death
  even when nothing more is received. After each message with pooled side chunks, idle
  memory is capped at what another message like it would take, until the next such message
  (``BufferPool.keep_for``).

Configuration is read when a connection or listener is made, never at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import tempfile
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
from anyio.abc import SocketAttribute

try:
    import dask.config
    from dask.utils import parse_bytes, parse_timedelta
    from distributed.comm.addressing import parse_host_port, unparse_host_port
    from distributed.comm.core import (
        BaseListener,
        Comm,
        CommClosedError,
        Connector,
        FatalCommClosedError,
    )
    from distributed.comm.registry import Backend
    from distributed.comm.tcp import BaseTCPBackend
    from distributed.comm.utils import ensure_concrete_host, from_frames, to_frames
    from distributed.utils import ensure_ip
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        f"streampickle.dask needs dask.distributed ({exc}): install it with "
        f"python3 -m pip install 'streampickle[dask]' (or -e '.[dask]' in a checkout)"
    ) from exc

from . import _shm
from ._anyio_compat import notify_closing
from ._errors import (
    AuthenticationError,
    IncompleteMessageError,
    ProtocolError,
    StreamPickleError,
    UsageError,
)
from ._limits import open_file_limit
from ._mac import Key, MacName
from ._pool import DEFAULT_MAX_BYTES, DEFAULT_MAX_IDLE, POOL_MIN, buffer_pool
from ._serve import accept_patiently
from ._sockets import (
    ObjectStreamListener,
    connect_tcp,
    connect_unix,
    create_tcp_listener,
    create_unix_listener,
)
from ._stream import ObjectStream

__all__ = [
    "KEY_ENV",
    "EncryptionRequiredError",
    "SPBackend",
    "SPComm",
    "SPConnector",
    "SPListener",
    "SPUnixBackend",
    "SPUnixConnector",
    "SPUnixListener",
    "cluster_key",
]

logger = logging.getLogger("streampickle.dask")

#: The environment variable that gives the cluster's key when dask's config has none.
KEY_ENV = "STREAMPICKLE_DASK_KEY"
# Frames of bytes up to this size travel inside the pickle (one write with the header); larger
# ones, and every view of an array, as zero-copy side chunks. dask's small messages (a task,
# a heartbeat) are one msgpack frame of a few hundred bytes: a side chunk would cost them an
# extra length-table entry and allocation each. A 64 MiB array sent in-band instead took 3-8x
# as long here (a copy into bytes on each end, and the pickle's own).
_IN_BAND = 64 * 1024
# At most this many frames of one message go as shared memory (each is a descriptor, and a
# message may carry at most Limits.max_descriptors, 253, Linux's cap for one sendmsg).
_SHARE_MAX = 200
# dask splits each frame of a message's payload into pieces of distributed.comm.shard (64 MiB)
# unless the comm says otherwise, and joins them with a copy on the other side: a 256 MiB
# array then arrives in four buffers, is copied into a fifth, and the four stay in the receive
# pool (measured: 586 MiB of RSS on the receiving worker against 326 on tcp://). A message
# here carries frames of any size, each received into its own memory: no split.
_UNSPLIT = 1 << 62

# The receive pool's defaults for a dask process (streampickle's own keep 1 GiB for 10 s). A
# worker's memory limit counts idle pool memory (MADV_FREE pages stay in RSS until the kernel
# takes them). In a cluster benchmark, a pool of 256 MiB whose idle blocks lived until the next
# receive raised a worker's peak RSS from tcp://'s 340 MiB to 598: four 64 MiB keys mapped
# beside an idle 256 MiB block. Here a block of another size goes before a new one is mapped
# (release_before_map), and none stays idle much past max-idle: the listener's loop trims the
# pool every _TRIM_FRACTION of it (_PoolTrimmer), since the pool has no timer of its own.
_POOL_MAX_BYTES = "256 MiB"
_POOL_MAX_IDLE = "1s"
_TRIM_FRACTION = 0.25
_TRIM_EVERY_MIN = 0.05  # seconds: a tiny max-idle doesn't make the loop spin
_MACS: tuple[MacName, ...] = ("hmac-sha256", "blake3", "poly1305")
# Connections still in their handshakes (streampickle's with a key, then dask's) are peers
# that proved nothing yet, each holding a descriptor for up to distributed.comm.timeouts.connect
# (30 s by default). At most this share of the open-file limit is theirs, unless
# distributed.comm.sp.max-handshakes says otherwise; past it the oldest is dropped for a newcomer.
# The floor keeps a burst of genuine connections (a cluster's workers starting at once) from
# dropping one another where the limit is small: 64 is a quarter of 256, the smallest limit
# seen in practice (macOS's default soft limit).
_HANDSHAKES_SHARE = 4
_HANDSHAKES_MIN = 64


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


# Set in a listening process (_configure_pool): after each message with pooled side chunks,
# idle memory is capped at what another message like it would take (BufferPool.keep_for), so
# blocks that die after a burst of transfers don't sit idle under the tasks that follow.
_keep_per_message = False


def _configure_pool() -> None:
    """Bound the receive pool's idle memory from ``distributed.comm.sp.pool``. What the config
    sets applies; its defaults only replace streampickle's own, so that a process that
    configured the pool itself keeps its bounds."""
    max_bytes = dask.config.get("distributed.comm.sp.pool.max-bytes", None)
    max_idle = dask.config.get("distributed.comm.sp.pool.max-idle", None)
    untouched = (buffer_pool.max_bytes, buffer_pool.max_idle) == (DEFAULT_MAX_BYTES, DEFAULT_MAX_IDLE)
    if max_bytes is None and untouched:
        max_bytes = _POOL_MAX_BYTES
    if max_idle is None and untouched:
        max_idle = _POOL_MAX_IDLE
    global _keep_per_message
    _keep_per_message = True
    buffer_pool.configure(
        max_bytes=None if max_bytes is None else int(parse_bytes(max_bytes)),  # 0 is a value: no pool
        max_idle=None if max_idle is None else float(parse_timedelta(max_idle, default="seconds")),
        release_before_map=True if untouched else None,
    )


class _PoolTrimmer:
    """Trims ``buffer_pool`` from one event loop while any listener on it runs: every
    ``_TRIM_FRACTION`` of ``max_idle``, blocks idle for longer than ``max_idle`` are unmapped,
    so idle memory goes even when no receive comes to apply the bounds."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._users = 0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._users += 1
        if self._handle is None:
            self._schedule()

    def stop(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        every = max(_TRIM_EVERY_MIN, buffer_pool.max_idle * _TRIM_FRACTION)
        self._handle = self._loop.call_later(every, self._tick)

    def _tick(self) -> None:
        self._handle = None
        if self._users > 0 and not self._loop.is_closed():
            buffer_pool.trim()
            self._schedule()


_trimmers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _PoolTrimmer] = weakref.WeakKeyDictionary()


def _trimmer() -> _PoolTrimmer | None:
    """The running asyncio loop's trimmer (None on another event loop: nothing trims there,
    and the pool applies its bounds at its next use)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    trimmer = _trimmers.get(loop)
    if trimmer is None:
        trimmer = _trimmers[loop] = _PoolTrimmer(loop)
    return trimmer


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
    if not view.c_contiguous:  # a copy, in memory order where the frame is Fortran-ordered
        view = memoryview(view.tobytes(order="A"))
    # The buffer is a uint8 array over the frame's memory, not the memoryview itself: CPython
    # before 3.12.7 can crash when its garbage collector breaks a reference cycle holding a
    # PickleBuffer of a memoryview (as the traceback of an interrupted write does), and an
    # array over a memoryview holds it without keeping it exported.
    # ignore: numpy's stubs declare ndarray.__buffer__ for Python 3.12+ only.
    return pickle.PickleBuffer(np.frombuffer(view, dtype=np.uint8))  # type: ignore[arg-type]


def _shared_frames(frames: list[Any]) -> list[Any]:
    """The frames of a message on a shared-memory socket. A frame lying in shared memory
    this process made (an array a task made with ``streampickle.shared_empty`` or
    ``shared_copy``) travels as a descriptor, by the encoder's own rule, up to
    ``_SHARE_MAX`` of them; past that, as a private copy. Others are not copied into shared
    memory: that copy, with the page faults of fresh shared pages, cost more than the two
    copies through the socket it saves (0.5 s against 0.3 s for 256 MiB, measured here)."""
    out = []
    shared = 0
    for frame in frames:
        item = _frame_out(frame)
        if isinstance(item, pickle.PickleBuffer) and _shm.find([item.raw()])[0] is not None:
            shared += 1
            if shared > _SHARE_MAX:
                item = pickle.PickleBuffer(bytearray(item.raw()))
        out.append(item)
    return out


def _frames_in(message: Any) -> list[Any]:
    """The peer's message as frames; ``_NotFrames`` if it is anything else."""
    if type(message) is not list or not all(isinstance(f, (bytes, memoryview)) for f in message):
        raise _NotFrames(f"expected a list of dask frames, got a {type(message).__name__}")
    return message


class _NotFrames(Exception):
    pass


def _connect_timeout() -> float:
    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds"))


async def _handshake_or_close(stream: ObjectStream, *, initiator: bool, peer: str) -> None:
    """On a keyed connection, :meth:`ObjectStream.handshake` before dask's first message, so
    that a session recorded earlier and replayed, or a listener's own handshake relayed
    between two of its connections, is refused. Bounded by ``distributed.comm.timeouts.connect``.
    On failure the stream is aborted and ``CommClosedError`` raised; ``FatalCommClosedError``
    (dask doesn't retry it) when retrying can't help: the peer's first message failed the key,
    or it is not a handshake (a peer whose streampickle predates it)."""
    try:
        with anyio.fail_after(_connect_timeout()):
            await stream.handshake(initiator=initiator)
    except IncompleteMessageError as exc:  # cut mid-message (a crash): worth another try
        stream.abort()
        raise CommClosedError(f"the handshake with {peer} failed: {exc}") from exc
    except (AuthenticationError, ProtocolError) as exc:
        stream.abort()
        if isinstance(exc, ProtocolError):
            logger.warning("refused %s: %s", peer, exc)
            raise FatalCommClosedError(f"{peer} did not hand-shake: {exc}") from exc
        if stream.peer_sender is None:  # no authentic message: a stranger (or another key)
            logger.warning("refused %s: %s (every process of the cluster needs the same "
                           "distributed.comm.sp.key or %s)", peer, exc, KEY_ENV)
            raise FatalCommClosedError(f"{peer} did not prove this cluster's key: {exc}") from exc
        # A key holder's stream, cut or refused mid-handshake (a replay, a relay, a crash).
        logger.info("the handshake with %s failed: %s", peer, exc)
        raise CommClosedError(f"the handshake with {peer} failed: {exc}") from exc
    except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
            StreamPickleError) as exc:
        stream.abort()
        raise CommClosedError(f"the handshake with {peer} failed: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        stream.abort()  # cancelled (a connect timeout): the stream is mid-handshake
        raise


def _address(prefix: str, sockaddr: Any) -> str:
    return prefix + unparse_host_port(*sockaddr[:2])


def _max_handshakes() -> int:
    """How many connections a listener keeps in their handshakes at once:
    ``distributed.comm.sp.max-handshakes``, else a quarter of the open-file limit (at least
    64), so that peers which connect and stall can't take the descriptors the process needs."""
    configured = dask.config.get("distributed.comm.sp.max-handshakes", None)
    if configured is not None:
        if type(configured) is not int or configured < 1:
            raise UsageError(f"distributed.comm.sp.max-handshakes must be a positive int, not {configured!r}")
        return configured
    return max(_HANDSHAKES_MIN, open_file_limit() // _HANDSHAKES_SHARE)


class SPComm(Comm):
    """An established ``sp://`` or ``sp+unix://`` connection: one :class:`ObjectStream` over a
    TCP or Unix socket."""

    def __init__(
        self, stream: ObjectStream, local_addr: str, peer_addr: str, deserialize: bool = True, *,
        share: bool = False, proven: bool = False,
    ) -> None:
        self._closed = False
        self._share = share  # frames in shared memory go as descriptors (sp+unix://)
        super().__init__(deserialize=deserialize)
        self._stream = stream
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        # A key refused on the first message read is a stranger's, unless the handshake
        # proved the peer's key (proven): then it is a cut, as after any good message.
        self._reads = 1 if proven else 0
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
        if _keep_per_message:
            sizes = [f.nbytes for f in frames if type(f) is memoryview and f.nbytes >= POOL_MIN]
            if sizes:  # (a message without a pooled chunk, a heartbeat, says nothing about the next)
                buffer_pool.keep_for(sizes)
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
            frame_split_size=_UNSPLIT,
        )
        try:
            await self._stream.send(_shared_frames(frames) if self._share else [_frame_out(f) for f in frames])
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
        key = cluster_key()
        try:
            stream = await connect_tcp(host, port, key=key)
        except OSError as exc:
            raise CommClosedError(f"could not connect to {self.prefix}{address}: {exc}") from exc
        _keepalive(stream)
        if key is not None:
            await _handshake_or_close(stream, initiator=True, peer=self.prefix + address)
        local = _address(self.prefix, stream.extra(SocketAttribute.local_address))
        return SPComm(stream, local, self.prefix + address, deserialize, proven=key is not None)


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
        self._trimming: _PoolTrimmer | None = None
        self._keyed = False  # connections hand-shake first (set when started, from the config)
        # Connections in their handshakes, oldest first, and how many may be at once.
        self._unproven: dict[ObjectStream, None] = {}
        self._max_unproven = _HANDSHAKES_MIN
        self._dropping = False  # dropping unproven connections since the table was last below its cap

    def _start_trimming(self) -> None:
        """Once listening: trim the receive pool from this loop until stopped."""
        self._trimming = _trimmer()
        if self._trimming is not None:
            self._trimming.start()

    def _configure(self) -> Key | None:
        """What a listener reads from dask's config as it starts (the receive pool's bounds,
        the cap on connections in their handshakes, the cluster key); the key."""
        _configure_pool()
        self._max_unproven = _max_handshakes()
        key = cluster_key()
        self._keyed = key is not None
        return key

    async def start(self) -> None:
        key = self._configure()
        backlog = int(dask.config.get("distributed.comm.socket-backlog"))
        host = self.ip or None
        if host == "0.0.0.0":
            host = None
        listener = await create_tcp_listener(
            local_host=host, local_port=int(self.port), backlog=backlog, key=key, budget=None
        )
        self._socket = listener.extra(SocketAttribute.raw_socket)
        host_port = listener.extra(SocketAttribute.local_address)
        self._bound = (str(host_port[0]), int(host_port[1]))
        self._accepting = asyncio.ensure_future(self._accept(listener))
        self._start_trimming()

    async def _accept(self, listener: ObjectStreamListener) -> None:
        while True:
            try:
                # Out of descriptors or memory (EMFILE, ...) is waited out, as serve() does:
                # the peer waits in the backlog, and the listener lives on.
                stream = await accept_patiently(listener)
            except anyio.ClosedResourceError:
                return  # stopped
            except OSError:
                logger.exception("%s stops accepting connections", self.listen_address)
                raise
            try:
                peer = self._peer(stream)
            except (OSError, anyio.TypedAttributeLookupError):  # reset before we could ask
                stream.abort()
                continue
            # Counted here, not in its task: in a flood, accepted connections waiting for
            # their tasks to start would escape the cap and take every descriptor.
            self._admit(stream, peer)
            task = asyncio.ensure_future(self._handle(stream, peer))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
            await asyncio.sleep(0)  # the handlers run between accepts; newcomers wait in the backlog

    def _peer(self, stream: ObjectStream) -> str:
        return _address(self.prefix, stream.extra(SocketAttribute.remote_address))

    def _comm_for(self, stream: ObjectStream, peer: str) -> SPComm:
        _keepalive(stream)
        local = _address(self.prefix, stream.extra(SocketAttribute.local_address))
        return SPComm(stream, local, peer, self.deserialize, proven=self._keyed)

    async def _handle(self, stream: ObjectStream, peer: str) -> None:
        try:
            if self._accepting is None:  # stopped after the accept: the peer must not hang
                await stream.aclose()
                return
            if self._keyed:
                try:
                    await _handshake_or_close(stream, initiator=False, peer=peer)
                except CommClosedError:
                    return  # logged if it was the key; the stream is aborted
                self._release(stream)  # a key holder, no longer a candidate for dropping
            comm = self._comm_for(stream, peer)
            comm.allow_offload = self.allow_offload
            try:
                # dask's handshake has no deadline of its own here: a peer that stalls in it is
                # dropped at the connect timeout, as in streampickle's.
                with anyio.fail_after(_connect_timeout()):
                    await self.on_connection(comm)
            except (CommClosedError, TimeoutError) as exc:
                comm.abort()
                why = "stalled past distributed.comm.timeouts.connect" if isinstance(exc, TimeoutError) else "closed"
                logger.info("connection from %s %s before the handshake completed", peer, why)
                return
        finally:
            self._release(stream)
        await self.comm_handler(comm)

    def _release(self, stream: ObjectStream) -> None:
        """``stream`` is out of its handshakes (or of the listener)."""
        self._unproven.pop(stream, None)
        if len(self._unproven) < self._max_unproven // 2:
            self._dropping = False

    def _admit(self, stream: ObjectStream, peer: str) -> None:
        """Count ``stream`` among the connections in their handshakes; at the cap, drop the
        oldest of them. A genuine peer's handshake takes a round trip (with a key, it leaves
        the count once streampickle's handshake proved it; without, after dask's), so the
        oldest is most likely one that connected and stalled, and stalling peers can't keep a
        newcomer out (refusing newcomers instead would let a few stalled connections lock the
        listener). What this can't stop: a flood of more than the cap's worth of connections
        per round trip drops genuine ones too (docs/dask.md)."""
        if len(self._unproven) >= self._max_unproven:
            oldest = next(iter(self._unproven))
            del self._unproven[oldest]
            oldest.abort()  # its handler wakes with ClosedResourceError and returns
            logger.log(
                logging.DEBUG if self._dropping else logging.WARNING,
                "%s: %d connections are in their handshakes, the most allowed "
                "(distributed.comm.sp.max-handshakes): dropped the oldest for %s. Peers that "
                "connect and stall do this; if the load is genuine, raise the limit",
                self.listen_address, self._max_unproven, peer,
            )
            self._dropping = True
        self._unproven[stream] = None

    def stop(self) -> None:
        trimming, self._trimming = self._trimming, None
        if trimming is not None:
            trimming.stop()
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


# --- sp+unix://: Unix sockets between processes on one host ---------------------------------

_UNIX_PREFIX = "sp+unix://"
_unix_names = itertools.count()


def _split_unix(loc: str) -> tuple[str, str | None]:
    """``HOST/PATH`` (or ``HOST``, ``HOST:PORT``, ``/PATH``) as (host, absolute path or None).
    The host only names the machine, for dask's bookkeeping; a port is dropped."""
    host, slash, rest = loc.partition("/")
    host = (parse_host_port(host, 0)[0] if host else "") or "127.0.0.1"  # ":8786" has no host
    return host, ("/" + rest if slash else None)


def _unix_share(key: Key | None) -> bool:
    """Shared memory where the platform has it, and not with a key (a key's tag can't cover
    memory that doesn't travel in the message)."""
    return _shm.AVAILABLE and key is None


class SPUnixConnector(Connector):
    prefix = _UNIX_PREFIX

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> SPComm:
        _check_encryption(self.prefix + address, connection_args)
        host, path = _split_unix(address)
        if path is None:
            raise ValueError(f"{self.prefix}{address} names no socket: expected {self.prefix}HOST/PATH")
        key = cluster_key()
        share = _unix_share(key)
        try:
            stream = await connect_unix(path, key=key, shared_memory=share)
        except OSError as exc:
            raise CommClosedError(f"could not connect to {self.prefix}{address}: {exc}") from exc
        if key is not None:
            await _handshake_or_close(stream, initiator=True, peer=self.prefix + address)
        local = f"{self.prefix}{unparse_host_port(host)}/client-{os.getpid()}-{next(_unix_names)}"
        return SPComm(stream, local, self.prefix + address, deserialize, share=share, proven=key is not None)


class SPUnixListener(SPListener):
    """Listens on a Unix socket, its file readable and writable by this user only (mode
    0600), at the path the address names or a new one in the temporary directory; removes
    the file when stopped."""

    prefix = _UNIX_PREFIX

    def __init__(self, address: str, comm_handler: Callable[[SPComm], Any], deserialize: bool = True,
                 allow_offload: bool = True, default_host: str | None = None, default_port: int = 0,
                 **connection_args: Any) -> None:
        super().__init__("", comm_handler, deserialize, allow_offload, default_host, default_port, **connection_args)
        _check_encryption(self.prefix + address, connection_args)
        self.host, path = _split_unix(address)
        self.path = path or os.path.join(
            tempfile.gettempdir(), f"streampickle-dask-{os.getpid()}-{next(_unix_names)}-{os.urandom(4).hex()}.sock"
        )
        self._share = False

    async def start(self) -> None:
        key = self._configure()
        self._share = _unix_share(key)
        listener = await create_unix_listener(
            self.path, mode=0o600, backlog=int(dask.config.get("distributed.comm.socket-backlog")),
            key=key, budget=None, shared_memory=self._share,
        )
        self._socket = listener.extra(SocketAttribute.raw_socket)
        self._bound = (self.host, 0)
        self._accepting = asyncio.ensure_future(self._accept(listener))
        self._start_trimming()

    def _peer(self, stream: ObjectStream) -> str:
        return f"{self.prefix}{unparse_host_port(self.host)}/peer-{next(_unix_names)}"

    def _comm_for(self, stream: ObjectStream, peer: str) -> SPComm:
        return SPComm(stream, self.listen_address, peer, self.deserialize, share=self._share, proven=self._keyed)

    def stop(self) -> None:
        started = self._accepting is not None
        super().stop()
        if started:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    @property
    def listen_address(self) -> str:
        self.get_host_port()  # started?
        return f"{self.prefix}{unparse_host_port(self.host)}{self.path}"

    @property
    def contact_address(self) -> str:
        return self.listen_address


class SPUnixBackend(Backend):
    """The ``sp+unix`` scheme: ``sp+unix://HOST/PATH``, a Unix socket on the machine HOST
    names; with no key, frames in shared memory are handed over as such."""

    def get_connector(self) -> SPUnixConnector:
        return SPUnixConnector()

    def get_listener(self, loc: str, handle_comm: Any, deserialize: bool, **connection_args: Any) -> SPUnixListener:
        return SPUnixListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc: str) -> str:
        return _split_unix(loc)[0]

    def resolve_address(self, loc: str) -> str:
        host, path = _split_unix(loc)
        return str(unparse_host_port(ensure_ip(host))) + (path or "")

    def get_local_address_for(self, loc: str) -> str:
        return str(unparse_host_port(ensure_ip(_split_unix(loc)[0])))
