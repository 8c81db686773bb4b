"""Blocking adapter: ``dump``/``load`` over binary files, pipes and sockets.

``load`` reads exactly one message and not one byte beyond it (it only ever reads into the
decoder's ``get_buffer``, which never extends past the current message), so several ``load``
calls on one file or socket each get their message, and whatever follows is left for the
caller. Side chunks are read straight into their final memory with ``recv_into``/``readinto``.
``dump`` hands the encoder's chunks to ``sendmsg`` (sockets) or ``write`` unjoined: the array
memory goes to the kernel without a userspace copy.
"""

from __future__ import annotations

import socket
from typing import Any, BinaryIO, Iterable

from ._decoder import Decoder
from ._encoder import IOV_MAX, Chunk, Encoder, drop_sent, sendable
from ._limits import Limits
from ._mac import Key

__all__ = ["dump", "load"]



def dump(obj: Any, file: BinaryIO | socket.socket, *, key: bytes | Key | None = None) -> None:
    """Write one message carrying ``obj`` to a blocking binary file, pipe or socket.

    If ``obj`` can't be pickled, :class:`EncodeError` is raised and nothing is written.
    """
    chunks = Encoder(key=key).encode(obj)
    if isinstance(file, socket.socket):
        send_chunks(file, chunks)
        return
    write = file.write
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = write(view)  # raw files may write less than asked
            if n is None:
                raise BlockingIOError("streampickle.sync.dump needs a blocking file")
            view = view[n:]
    flush = getattr(file, "flush", None)
    if flush is not None:
        flush()


def send_chunks(sock: socket.socket, chunks: list[Chunk]) -> None:
    """``sendall`` for a list of buffers, with one ``sendmsg`` for as many as the kernel takes."""
    views = sendable(chunks)
    while views:
        drop_sent(views, sock.sendmsg(views[:IOV_MAX]))


def load(
    file: BinaryIO | socket.socket,
    *,
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
) -> Any:
    """Read exactly one message from a blocking binary file, pipe or socket and return its
    object. Raises ``EOFError`` if the input ends cleanly before the message starts, and
    :class:`IncompleteMessageError` if it ends inside it."""
    decoder = Decoder(trusted=trusted, allow=allow, key=key, limits=limits)
    if isinstance(file, socket.socket):
        readinto = file.recv_into
    else:
        readinto = getattr(file, "readinto", None) or _readinto_from_read(file)
    while not decoder.pending:
        target = decoder.get_buffer()
        n = readinto(target)
        if n is None:
            raise BlockingIOError("streampickle.sync.load needs a blocking file")
        if n == 0:
            decoder.feed_eof()  # raises IncompleteMessageError inside a message
            raise EOFError("the input ended before a message started")
        decoder.buffer_updated(n)
    return next(decoder)


def _readinto_from_read(file: Any) -> Any:
    def readinto(target: memoryview) -> int:
        data = file.read(len(target))
        target[: len(data)] = data
        return len(data)

    return readinto
