"""Turning a verified message's pickle back into an object: safe by default.

Safe mode (the default) is two gates in front of the C unpickler:

1. ``_scan.scan`` walks the opcodes first and refuses anything a protocol-5 pickler would not
   write (see ``_scan``), so the C unpickler only ever runs on well-formed input;
2. ``find_class`` admits only globals on an exact-name allowlist: streampickle's own
   reconstructors (arrays, numpy scalars and dtypes, UUID, Fraction, Counter) and immutable
   builtin value types. Nothing on it runs code, imports modules, touches files, or allocates
   from a size the input merely claims. Users extend it with exact names (``allow=``).

``trusted=True`` skips both and behaves like ``pickle.loads`` (only the bytes-after-STOP and
buffer-count checks remain, since they are about framing, not trust).
"""

from __future__ import annotations

import gc
import io
import pickle
from typing import Any, Callable, Iterable, Sequence

from . import _rebuild
from ._errors import ForbiddenGlobalError, MalformedPickleError, StreamPickleError, UsageError
from ._scan import scan as _scan

__all__ = ["Loader", "DEFAULT_ALLOWED"]

#: Globals the safe loader resolves without being asked. Each is an immutable type whose
#: constructor validates its arguments and does work linear in them (no walking of nested
#: arguments, no size taken on trust): mutable Python classes are left out because a BUILD
#: opcode could set attributes on the class itself.
DEFAULT_ALLOWED: frozenset[str] = frozenset(
    {
        "builtins.complex",
        "builtins.slice",
        "builtins.range",
        "builtins.Ellipsis",
        "builtins.NotImplemented",
        "datetime.date",
        "datetime.time",
        "datetime.datetime",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "collections.OrderedDict",
        "collections.deque",
        *_rebuild.NAMES,
    }
)


def _allow_entry(entry: Any) -> tuple[str, Any]:
    if isinstance(entry, str):
        if not entry or entry.startswith(".") or entry.endswith(".") or "." not in entry:
            raise UsageError(f"allow entry {entry!r} is not a dotted 'module.QualName'")
        return entry, None
    module = getattr(entry, "__module__", None)
    qualname = getattr(entry, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<locals>" in qualname:
        raise UsageError(f"allow entry {entry!r} has no importable module and qualified name")
    return f"{module}.{qualname}", entry


class _SafeUnpickler(pickle.Unpickler):
    _allowed: dict[str, Any]  # set on the per-Loader subclass

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._allowed:
            raise ForbiddenGlobalError(module, name)
        obj = self._allowed[full]
        if obj is None:
            obj = super().find_class(module, name)
        return obj


class Loader:
    """Unpickles one message's pickle part against its side chunks, safely unless trusted."""

    def __init__(self, *, trusted: bool = False, allow: Iterable[Any] = ()) -> None:
        if type(trusted) is not bool:
            raise UsageError(f"trusted must be True or False, not {trusted!r}")
        if isinstance(allow, (str, bytes)):
            raise UsageError("allow must be a list of names or classes, not a single string")
        self.trusted = trusted
        allowed: dict[str, Any] = dict.fromkeys(DEFAULT_ALLOWED)
        allowed.update(_rebuild.NAMES)
        allowed.update(_allow_entry(entry) for entry in allow)
        self._unpickler: type[pickle.Unpickler] = (
            pickle.Unpickler if trusted else type("SafeUnpickler", (_SafeUnpickler,), {"_allowed": allowed})
        )

    @classmethod
    def shared(cls, trusted: bool) -> Loader:
        """The loader for the default allowlist (immutable, so one serves every decoder)."""
        return _SHARED[trusted] if type(trusted) is bool else cls(trusted=trusted)

    def load(self, data: bytes | memoryview, buffers: Sequence[Any]) -> Any:
        """Unpickle ``data`` with ``buffers`` as its out-of-band buffers, all of them used."""
        if not buffers:
            return self.load_inband(data)
        it = iter(buffers)
        if self.trusted:
            obj = _plain_loads(data, it)
        else:
            globals_ = _scan(data, len(buffers))
            if type(globals_) is tuple:
                raise _refused(globals_)
            obj = self._restricted_loads(data, it) if globals_ else _plain_loads(data, it)
        if next(it, None) is not None:
            raise MalformedPickleError("the pickle used fewer out-of-band buffers than the message has side chunks")
        return obj

    def load_inband(self, data: bytes | memoryview) -> Any:
        """``load`` for a message without side chunks: the path every small message takes."""
        if _load_inband_c is not None and type(data) is bytes and len(data) < GC_PAUSE_BYTES:
            try:
                obj = _load_inband_c(data, self.trusted)  # the lines below, in one C call
            except Exception as exc:
                raise unpickling_failed(exc) from exc
            if obj is not NotImplemented:
                return obj
        if self.trusted:
            return _plain_loads(data, None)
        globals_ = _scan(data, 0)
        if not globals_:
            # No STACK_GLOBAL, and the scan admits no other opcode that looks a name up:
            # only builtin containers and scalars can come out, so the plain C unpickler is
            # as safe here as the restricted one, and faster.
            return _plain_loads(data, None)
        if type(globals_) is tuple:
            raise _refused(globals_)
        return self._restricted_loads(data, None)

    def _restricted_loads(self, data: bytes | memoryview, buffers: Any) -> Any:
        file = io.BytesIO(data)
        unpickler = self._unpickler(file, buffers=buffers)
        try:
            obj = unpickler.load() if len(data) < GC_PAUSE_BYTES else _gc_paused(unpickler.load)
        except StreamPickleError:
            raise
        except Exception as exc:  # UnpicklingError, TypeError from a reconstructor, ...
            raise unpickling_failed(exc) from exc
        if file.tell() != len(data):  # the scan guarantees this; a cheap cross-check
            raise MalformedPickleError(f"{len(data) - file.tell()} bytes follow STOP in the pickle part")
        return obj


def _plain_loads(data: bytes | memoryview, buffers: Any) -> Any:
    """``pickle.loads`` for trusted messages and for safe ones without globals. In trusted
    mode nothing scanned the pickle: insist at least that it ends with its STOP."""
    try:
        if len(data) < GC_PAUSE_BYTES:
            obj = pickle.loads(data, buffers=buffers)
        else:
            obj = _gc_paused(lambda: pickle.loads(data, buffers=buffers))
    except Exception as exc:
        raise unpickling_failed(exc) from exc
    if data[-1:] != b".":
        raise MalformedPickleError("the pickle part does not end with STOP")
    return obj


#: Pickle parts from this size up are unpickled with the cyclic garbage collector paused.
GC_PAUSE_BYTES = 1 << 20


def _gc_paused(load: Callable[[], Any]) -> Any:
    """Run ``load`` with the cyclic GC paused (and resumed only if it was running).

    Why: an unpickler creates objects that all end up reachable from its result, so the
    collections it triggers free nothing, yet each one traverses the containers made so far.
    For a million small tuples they were 10-25% of the load time (measured). The C unpickler
    holds the GIL throughout unless a reconstructor or find_class runs Python code, so other
    threads rarely even see the pause.
    """
    if not gc.isenabled():
        return load()
    gc.disable()
    try:
        return load()
    finally:
        gc.enable()


def unpickling_failed(exc: Exception) -> MalformedPickleError:
    """The error for a verified message whose pickle raised while loading (``exc``)."""
    return MalformedPickleError(f"the message's pickle failed to load: {exc!r}")


def _refused(result: tuple[int, str]) -> MalformedPickleError:
    return MalformedPickleError(f"malformed pickle at byte {result[0]}: {result[1]}")


try:
    from ._speedups import load_inband as _load_inband_c
except ImportError:  # built without the C extension
    _load_inband_c = None

_SHARED = {False: Loader(trusted=False), True: Loader(trusted=True)}
