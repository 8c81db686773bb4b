"""The receiving options, validated once: ``trusted``, ``allow``, ``key``, ``limits``, and
pickle's ``persistent_load`` hook.

Every public function that reads messages (``loads``, ``load``, ``Decoder``, ``ObjectStream``,
the socket helpers) takes these four keywords; they are sugar for one :class:`Options`, which
checks them, and prepares what decoding needs from them (the loader with its allowlist, the
key's MAC, the limits), once. ``options_for`` answers the default keywords with a cached
instance, so the commonest call builds and checks nothing; ``Options.plain`` tells a fast path
that it may take a message with the defaults' rules, without looking at the options again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._errors import UsageError
from ._limits import Limits
from ._mac import Key, as_key
from ._safe import Loader

__all__ = ["DEFAULT_LIMITS", "Options", "options_for"]

DEFAULT_LIMITS = Limits()


class Options:
    """How to read a peer's messages; immutable, validated when made.

    ``trusted``: load any global, like ``pickle`` (only for trusted peers). ``allow``: exact
    global names or classes to admit in safe mode. ``key``: verify every message's tag before
    unpickling (``bytes`` for HMAC-SHA256, or a :class:`Key`). ``limits``: the sizes a message
    may declare (:class:`Limits`; ``None`` for the defaults). ``persistent_load``: a callable
    that turns a persistent id (from the peer's ``Encoder(persistent_id=...)``) into an object,
    as ``pickle.Unpickler.persistent_load``; without it, a pickle with a persistent id is refused.

    A bad option raises :class:`UsageError` (``limits`` first, then ``trusted`` and ``allow``,
    then ``key``). Derived, for the decoder: ``loader`` (the safe or trusted unpickler, with the
    allowlist parsed), ``key`` as a :class:`Key`, ``limits`` as a :class:`Limits`, and
    ``plain``: true for the defaults (any ``trusted``, no allowlist, no key, default limits, no
    ``persistent_load``).
    """

    __slots__ = ("trusted", "allow", "key", "limits", "persistent_load", "loader", "plain")

    trusted: bool
    allow: tuple[Any, ...]
    key: Key | None
    limits: Limits
    persistent_load: Callable[[Any], Any] | None
    loader: Loader
    plain: bool

    def __init__(
        self,
        *,
        trusted: bool = False,
        allow: Iterable[Any] = (),
        key: bytes | Key | None = None,
        limits: Limits | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
    ) -> None:
        if limits is not None and not isinstance(limits, Limits):
            raise UsageError(f"limits must be a streampickle.Limits, not {type(limits).__name__}")
        limits = limits or DEFAULT_LIMITS
        if type(allow) is not tuple and not isinstance(allow, (str, bytes)):  # Loader refuses those
            try:
                allow = tuple(allow)  # once: a generator can't be read twice
            except TypeError as exc:  # allow=5, allow=None
                raise UsageError(
                    f"allow must be an iterable of names or classes, not {type(allow).__name__}"
                ) from exc
        if not allow and limits.max_opaque_keys == DEFAULT_LIMITS.max_opaque_keys and persistent_load is None:
            loader = Loader.shared(trusted)  # checks trusted; immutable, so shared
        else:
            try:
                loader = Loader(trusted=trusted, allow=allow, max_opaque_keys=limits.max_opaque_keys,
                                persistent_load=persistent_load)
            except TypeError as exc:  # an iterable whose items are not names or classes
                raise UsageError(
                    f"allow must be an iterable of names or classes, not {type(allow).__name__}"
                ) from exc
        prepared_key = as_key(key)
        setter = object.__setattr__
        setter(self, "trusted", loader.trusted)
        setter(self, "allow", allow)
        setter(self, "key", prepared_key)
        setter(self, "limits", limits)
        setter(self, "persistent_load", persistent_load)
        setter(self, "loader", loader)
        plain = not allow and prepared_key is None and limits == DEFAULT_LIMITS and persistent_load is None
        setter(self, "plain", plain)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Options are immutable: make new ones instead of setting {name!r}")

    def __eq__(self, other: object) -> bool:
        """Options that read messages alike: the same five options (a ``key`` that can't
        say it is equal makes them unequal; ``persistent_load`` is compared by identity)."""
        if not isinstance(other, Options):
            return NotImplemented
        if self.persistent_load is not other.persistent_load:
            return False
        mine = (self.trusted, self.allow, self.key, self.limits)
        return mine == (other.trusted, other.allow, other.key, other.limits)

    __hash__ = None  # type: ignore[assignment]  # equal by value, and an allowlist may be unhashable

    def __repr__(self) -> str:
        return (
            f"Options(trusted={self.trusted!r}, allow={self.allow!r}, "
            f"key={'...' if self.key is not None else None}, limits={self.limits!r}"
            + (f", persistent_load={self.persistent_load!r})" if self.persistent_load is not None else ")")
        )


#: The options of every call that passes none, and of every ``trusted=True`` call that passes
#: no other: made once, here.
_DEFAULT = Options()
_NO_ALLOW: tuple[Any, ...] = ()
_TRUSTED = Options(trusted=True)


#: The key and Options of the last call with only a key (``bytes`` or a :class:`Key`, both
#: immutable): a server that calls ``loads(data, key=SECRET)`` per message prepares its key
#: once, not per call (a Key costs a microsecond to make, BLAKE3's key derivation more).
_last_keyed: tuple[object, Options] = (None, _DEFAULT)


def options_for(
    trusted: bool = False,
    allow: Iterable[Any] = (),
    key: bytes | Key | None = None,
    limits: Limits | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Options:
    """The :class:`Options` for these keywords: a cached instance for the defaults (with
    ``trusted`` exactly ``True`` or ``False``) and for the last key given alone (the same
    object), else a new one, validated."""
    global _last_keyed
    if allow is _NO_ALLOW and limits is None and persistent_load is None:  # () is one object in CPython
        if key is None:
            if trusted is False:
                return _DEFAULT
            if trusted is True:
                return _TRUSTED
        elif trusted is False:
            last_key, options = _last_keyed
            if key is last_key:
                return options
            options = Options(key=key)
            if type(key) is bytes or type(key) is Key:
                _last_keyed = (key, options)
            return options
    return Options(trusted=trusted, allow=allow, key=key, limits=limits, persistent_load=persistent_load)
