"""The errors streampickle raises, and whose fault each one is.

Every error is a :class:`StreamPickleError`, so one ``except`` clause catches them all. The
classes answer the two questions a caller has after a failure, and the hierarchy is the
answer::

    StreamPickleError
    ├── UsageError               the local code called the API wrongly; nothing changed
    ├── EncodeError              the object could not be pickled; nothing was written
    ├── StreamBrokenError        the peer's bytes ended the stream: close it
    │   ├── ProtocolError            not the wire format (bad magic, version, header...)
    │   │   └── IncompleteMessageError   the input ended inside a message
    │   ├── LimitExceededError       a declared size over Limits
    │   │   └── DeadlineExceededError    a message slower than Limits' deadlines
    │   └── AuthenticationError      a tag missing, wrong, replayed, reflected...
    └── MessageDroppedError      the peer's message was dropped alone: go on reading
        ├── MalformedPickleError     its pickle is broken or breaks the safe loader's rules
        └── ForbiddenGlobalError     its pickle names a global that is not allowed

* whose fault was it? ``UsageError`` is ours, ``EncodeError`` is the object being sent's;
  a :class:`StreamBrokenError` or a :class:`MessageDroppedError` is the peer's bytes.
* can the stream still be used? After a :class:`StreamBrokenError` message boundaries can no
  longer be trusted, so the decoder (and the stream over it) is poisoned: every later call
  raises the same error again. A :class:`MessageDroppedError` is for one message that arrived
  whole (and verified, with a key) but could not be loaded: it was consumed and dropped, and
  the next message decodes normally. ``except StreamBrokenError`` is therefore the clause
  that closes a connection, ``except MessageDroppedError`` the one that skips a message.
  ``poisons_stream`` says the same as ``isinstance(err, StreamBrokenError)``; it is read from
  the class hierarchy, so the two can't disagree.

An :class:`EncodeError` is also an instance of what ``pickle.dumps(obj, protocol=5)`` would
have raised (``TypeError``, ``pickle.PicklingError``, ``RuntimeError``, ``RecursionError``...),
so code written for pickle keeps its ``except`` clauses; see :func:`encode_error`.

Low-level causes (``struct.error``, ``pickle.UnpicklingError``, numpy's ``ValueError``...) are
always chained as ``__cause__``.
"""

from __future__ import annotations

import pickle
import types
from typing import Any

__all__ = [
    "AuthenticationError",
    "DeadlineExceededError",
    "EncodeError",
    "ForbiddenGlobalError",
    "IncompleteMessageError",
    "LimitExceededError",
    "MalformedPickleError",
    "MessageDroppedError",
    "ProtocolError",
    "StreamBrokenError",
    "StreamPickleError",
    "UsageError",
    "encode_error",
]


class _PoisonsStream:
    """``poisons_stream``: whether the class is a :class:`StreamBrokenError`, read on the class
    or on an instance. Computed, not stored, so that it can't disagree with the hierarchy."""

    def __get__(self, obj: object, owner: type | None = None) -> bool:
        return issubclass(owner if owner is not None else type(obj), StreamBrokenError)


class StreamPickleError(Exception):
    """Base class of every error streampickle raises."""

    #: True if, after this error, the decoder (and the stream under it) can't be used again:
    #: exactly the :class:`StreamBrokenError` subclasses.
    poisons_stream: Any = _PoisonsStream()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "poisons_stream" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} sets poisons_stream; derive it from StreamBrokenError or "
                f"MessageDroppedError instead, which say the same"
            )
        broken, dropped = globals().get("StreamBrokenError"), globals().get("MessageDroppedError")
        if broken and dropped and issubclass(cls, broken) and issubclass(cls, dropped):
            raise TypeError(f"{cls.__name__} can't both end the stream and drop one message")


class UsageError(StreamPickleError):
    """The local program called the API wrongly (for example ``feed`` after ``feed_eof``).

    This is a bug in the calling code, not something the peer did; the stream is as it was.
    """


class EncodeError(StreamPickleError, pickle.PicklingError):
    """The object could not be encoded; nothing was written and the stream is still usable.

    Raised before the first byte of the message exists, so a failed ``dump`` never leaves half a
    message on the wire. It is also a :class:`pickle.PicklingError`, and when pickling raised
    something else (``TypeError`` for a ``staticmethod``, ``RuntimeError`` for a dict changed
    while pickled, ``RecursionError``...), an instance of that type as well: code written for
    ``pickle.dumps`` keeps working. The original error is the ``__cause__``.
    """


class StreamBrokenError(StreamPickleError):
    """The peer's bytes ended the stream: close the connection.

    Message boundaries can no longer be trusted, so the decoder is poisoned and every later
    call raises this error again (chained to the first). Messages that arrived whole before
    it are still delivered first. Catch this class to know when to hang up.
    """


class MessageDroppedError(StreamPickleError, pickle.UnpicklingError):
    """One message of the peer's was refused and dropped alone; the stream goes on.

    The message arrived whole (and verified, if a key is set) and its bytes were consumed;
    nothing it names was called. The next ``receive``/``next`` decodes the next message
    normally. Catch this class to skip a message, or to answer in its place. It is also a
    :class:`pickle.UnpicklingError`, what ``pickle.loads`` raises for a pickle it refuses, so
    code written for pickle keeps its ``except`` clauses.
    """


class ProtocolError(StreamBrokenError):
    """The peer's bytes break the wire format (bad magic, unknown version, reserved bits set...).

    Message boundaries can no longer be found, so the stream is poisoned: close the connection.
    Usually the peer is not a streampickle peer at all, speaks a newer wire version, or the
    bytes were corrupted in transit.
    """


class MalformedPickleError(MessageDroppedError):
    """A message arrived whole (and verified, if a key is set) but its pickle is broken.

    The message's bytes have been consumed and dropped; the stream is still usable and the next
    message decodes normally. The peer has a bug or is hostile.
    """


class LimitExceededError(StreamBrokenError):
    """A size declared by the peer is over one of the decoder's :class:`Limits`.

    Raised from the header alone, before anything of that size is allocated. The message names
    the limit; raise it with ``limits=Limits(...)`` if the peer is legitimately sending more.
    Its subclass :class:`DeadlineExceededError` is the time limits.
    """


class DeadlineExceededError(LimitExceededError):
    """A message took longer to arrive than ``Limits.max_header_seconds`` or
    ``Limits.max_message_seconds`` allow, counted from its first byte.

    Raised by the async adapters' receive. ``limit`` names the field, ``seconds`` is its value,
    ``received`` and ``expected`` are the message's bytes as in
    :class:`IncompleteMessageError`. What arrived of the message is dropped and the stream is
    poisoned: close it. The peer stalled, is hostile (a slowloris), or the link is slower than
    the limit allows; then raise it with ``limits=Limits(...)``.
    """

    def __init__(self, message: str, *, limit: str, seconds: float, received: int, expected: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.seconds = seconds
        self.received = received
        self.expected = expected

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {"limit": self.limit, "seconds": self.seconds, "received": self.received, "expected": self.expected}
        return _remade, (type(self), (str(self),), fields)


class IncompleteMessageError(ProtocolError):
    """The input ended inside a message.

    ``received`` is how many bytes of the message had arrived, ``expected`` how many the
    message was known to need at that point (it grows as the header and length table arrive).
    The peer crashed, was killed, or the connection was cut.
    """

    def __init__(self, message: str, *, received: int, expected: int) -> None:
        super().__init__(message)
        self.received = received
        self.expected = expected

    def __reduce__(self) -> tuple[Any, ...]:
        return _remade, (type(self), (str(self),), {"received": self.received, "expected": self.expected})


class AuthenticationError(StreamBrokenError):
    """The message's tag is missing, wrong, of the other MAC, or present where no key was
    configured.

    Nothing of the message was unpickled. Either the two ends use different keys or MACs (or
    only one has a key), or the bytes were altered in transit. The stream is poisoned.
    """


class ForbiddenGlobalError(MessageDroppedError):
    """The peer's pickle names a global that the safe loader does not allow.

    The message was dropped and nothing it names was called; the stream is still usable.
    ``module`` and ``name`` say what was asked for; ``position`` and ``opcode``, when known,
    where in the pickle (``"STACK_GLOBAL"`` at byte 17). If you trust that type, add its exact
    name with ``allow=[...]``; ``trusted=True`` lifts every restriction (only for trusted
    peers). A name that runs code or reaches the system (``os.system``, ``builtins.getattr``)
    can never be allowed, and for those the message says why and suggests neither.
    """

    def __init__(
        self, module: str, name: str, *, position: int | None = None, opcode: str | None = None
    ) -> None:
        from ._allow import denied_reason  # light: sys, types and typing only

        full = f"{module}.{name}"
        where = opcode or ""
        if position is not None:
            where = f"{where} at byte {position}".lstrip()
        asked = f"the peer's message asks for the global {_bounded(full)}" + (f" ({where})" if where else "")
        reason = denied_reason(full)
        if reason is not None:
            text = (
                f"{asked}, which can never be allowed: {reason}. The message was dropped; a peer "
                f"that sends it is buggy or hostile."
            )
        else:
            hint = f"allow=[{full!r}]" if len(full) <= _NAME_LIMIT else "its exact name in allow=[...]"
            text = (
                f"{asked}, which the safe loader does not allow, so the message was dropped. If "
                f"you trust that type, pass {hint} (exact names, never prefixes); "
                f"trusted=True loads anything and must only be used with peers you trust as "
                f"much as your own code."
            )
        super().__init__(text)
        self.module = module
        self.name = name
        self.position = position
        self.opcode = opcode

    def __reduce__(self) -> tuple[Any, ...]:
        return _remade, (type(self), (self.module, self.name), {"position": self.position, "opcode": self.opcode})


def _remade(cls: type[BaseException], args: tuple[Any, ...], fields: dict[str, Any]) -> BaseException:
    """An error with keyword-only fields, as pickle remakes it (``__reduce__``): an error that
    crosses a process (multiprocessing, a dask task) arrives whole, not as a TypeError."""
    return cls(*args, **fields)


#: Longest peer-chosen name an error message quotes whole.
_NAME_LIMIT = 200


def _bounded(text: str) -> str:
    """``repr(text)``, cut short if the peer made it long."""
    if len(text) <= _NAME_LIMIT:
        return repr(text)
    return f"{text[:_NAME_LIMIT]!r}...({len(text) - _NAME_LIMIT} more characters)"


def encode_error(message: str, cause: Exception) -> EncodeError:
    """The :class:`EncodeError` to raise (``from cause``) when pickling raised ``cause``.

    Its class is an :class:`EncodeError` and also ``type(cause)``: what ``pickle.dumps`` would
    have raised is still caught by the same ``except`` clause (``TypeError``, ``RuntimeError``,
    ``RecursionError``, a user's own error class...). Its ``args`` are ``(message,)`` and
    ``str`` is the message; the original, with its own attributes, is the ``__cause__``. When
    no such class can be made (a type that refuses subclasses, a base order that clashes with
    EncodeError's, a constructor that needs other arguments), it is a plain EncodeError.
    """
    return _encode_error(type(cause), message)


def _encode_error(kind: type[BaseException], message: str) -> EncodeError:
    combined = _combined(kind)
    if combined is not EncodeError:
        try:
            # The cause's own __init__ takes its own arguments; only its __new__ (which
            # allocates the C layout of OSError, AttributeError...) is needed.
            exc = combined.__new__(combined, message)
            BaseException.__init__(exc, message)
        except Exception:  # noqa: BLE001 - a __new__ that wants other arguments: plain EncodeError
            pass
        else:
            return exc
    return EncodeError(message)


#: The combined classes made so far, by original type; at most _COMBINED_MAX of them, since a
#: program may make exception types at run time (beyond that each error makes its own).
_COMBINED: dict[type[BaseException], type[EncodeError]] = {}
_COMBINED_MAX = 256


def _combined(kind: type[BaseException]) -> type[EncodeError]:
    """The class that is both EncodeError and ``kind`` (EncodeError itself if it already is a
    ``kind``, or if no such class can be made): one per type, so that they compare equal."""
    combined = _COMBINED.get(kind)
    if combined is None:
        combined = _make_combined(kind)
        if len(_COMBINED) < _COMBINED_MAX:
            _COMBINED[kind] = combined
    return combined


def _make_combined(kind: type[BaseException]) -> type[EncodeError]:
    if issubclass(kind, EncodeError):
        return kind
    if issubclass(EncodeError, kind):  # Exception, pickle.PicklingError
        return EncodeError

    def body(ns: dict[str, Any]) -> None:
        ns.update(
            __module__=__name__,
            __doc__=f"An EncodeError that is also a {kind.__qualname__}: see encode_error.",
            _kind=kind,
            # the message as given: not KeyError's quoting, nor a __str__ that reads
            # attributes only the cause's own __init__ sets
            __str__=BaseException.__str__,
            __repr__=BaseException.__repr__,
            __reduce__=_reduce_combined,
        )

    try:
        return types.new_class(f"EncodeError[{kind.__qualname__}]", (EncodeError, kind), exec_body=body)
    except Exception:  # noqa: BLE001 - a clashing base order or layout, or a type that refuses subclasses
        return EncodeError


def _reduce_combined(self: Any) -> tuple[Any, ...]:
    """Pickles a combined EncodeError as the call that makes it again (its class has no name
    to be found by), with the original type by reference."""
    return _encode_error, (self._kind, str(self)), self.__dict__ or None
