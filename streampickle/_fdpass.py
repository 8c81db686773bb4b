"""Passing descriptors over a Unix socket (``SCM_RIGHTS``), for the transports of
``shared_memory=True`` connections: the ancillary data a message's first ``sendmsg`` carries,
and the descriptors a ``recvmsg`` brought, checked."""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import ProtocolError
from ._shm import MAX_DESCRIPTORS, close_all

if TYPE_CHECKING:
    from ._decoder import Decoder

__all__ = ["ANCILLARY_SPACE", "RECEIVE_FLAGS", "ancillary", "receive_into", "received_descriptors"]

#: Ancillary space for one receive: room for ``MAX_DESCRIPTORS``; a peer that sends more has
#: its message truncated by the kernel (``MSG_CTRUNC``), which is refused.
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_DESCRIPTORS * 4) if hasattr(socket, "CMSG_SPACE") else 0
#: Receive flags: every descriptor a peer sends is close-on-exec from its arrival, so a child
#: process this one starts never inherits it.
RECEIVE_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """``sendmsg`` ancillary data carrying ``fds`` (none for no descriptors)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_descriptors(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The descriptors in what ``recvmsg`` returned. Ancillary data the kernel cut short
    (more descriptors than ``ANCILLARY_SPACE`` holds) is a :class:`ProtocolError`, after every
    descriptor that did arrive is closed; so is any other kind of ancillary data."""
    fds: list[int] = []
    unexpected = None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:whole]))
        else:
            unexpected = (level, kind)
    if msg_flags & getattr(socket, "MSG_CTRUNC", 0):
        close_all(fds)
        raise ProtocolError(
            f"the peer sent more descriptors with one message than the {MAX_DESCRIPTORS} a "
            f"message may carry (the kernel cut them off): the peer is broken or hostile"
        )
    if unexpected is not None:
        close_all(fds)
        raise ProtocolError(
            f"the peer sent ancillary data of level {unexpected[0]}, type {unexpected[1]}; "
            f"streampickle only takes descriptors (SCM_RIGHTS)"
        )
    return fds


def receive_into(sock: socket.socket, target: memoryview, decoder: Decoder, *, bounded: bool) -> int:
    """``sock.recv_into(target)`` for a socket that carries descriptors, feeding ``decoder``
    the descriptors that came (it owns them from then on) before the caller feeds the bytes.

    A message's descriptors travel with its first byte, so only a read that can return a
    message's first byte needs room for them: a ``recvmsg_into``, since a plain read would
    make the kernel close them. ``bounded`` says that ``target`` is the decoder's own buffer
    (``get_buffer()``, which never reaches past the current part): inside a message such a
    read can't reach the next one, and is a plain ``recv_into``, which costs less per call
    on a large array's many reads. Descriptors a peer attaches to a later byte of a message
    are then closed by the kernel and never reach this process."""
    if bounded and decoder.in_message:
        return sock.recv_into(target)
    n, ancdata, msg_flags, _ = sock.recvmsg_into([target], ANCILLARY_SPACE, RECEIVE_FLAGS)
    if ancdata or msg_flags:
        fds = received_descriptors(ancdata, msg_flags)
        if fds:
            decoder.feed_descriptors(fds, n)
    return n
