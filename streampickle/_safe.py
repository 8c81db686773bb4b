"""Turning a verified message's pickle back into an object: safe by default.

Safe mode (the default) is two gates in front of the C unpickler:

1. the verifier (``_verify``) proves, before anything is unpickled, what every opcode acts
   on: only protocol-5 opcodes in a well-formed order, globals that resolve to
   streampickle's own reconstructors or to names the user allowed, reconstructor calls with
   arguments of the kinds each declares, ``SETITEMS``/``APPENDS``/``ADDITEMS`` only into
   containers the pickle made, ``BUILD`` only on instances of allowed classes, dict keys
   whose hashes can't be steered, and work in proportion to the pickle's size. Its fast
   path (``_speedups.scan``, or ``_verify.scan_py`` without the C extension) settles plain
   data alone and hands anything else to the full walk;
2. ``find_class`` resolves the same names again at unpickling time, from the same table.

Every default type is built by a reconstructor (``_rebuild``) that checks the exact type and
range of each argument and returns a fresh object; no stdlib class or function is on the
default allowlist. Users extend it with exact names (``allow=``, vetted by ``_allow``: names
that run code or reach the system are refused).

``trusted=True`` skips both and behaves like ``pickle.loads`` (only the bytes-after-STOP and
buffer-count checks remain, since they are about framing, not trust).

A loader given ``persistent_load`` (the user's callable, as ``pickle.Unpickler`` takes it)
admits ``BINPERSID``: the fast scan still refuses it, so such a pickle is judged by the full
walk with ``persistent=True``, and unpickled with the callable set, in both modes. In safe
mode the callable is wrapped: each id is checked first, and one holding an internal value
(a reconstructor or its metered wrapper, named by the pickle and not called; a numpy value
before its ``BUILD``, which the verifier already refuses) anywhere in its tuples, lists,
dicts and sets is refused before the user's code sees it, the walk charged to the call
budget.

Standard pickles (``Loader.load_standard``, for :class:`streampickle.PickleDecoder`: any
protocol, as ``pickle.dump`` writes them) take the same two gates: ``_verify.verify_standard``
(the full walk, with the opcodes of protocols 0-4) and a ``find_class`` that resolves the same
table, which adds ``_rebuild.STANDARD_NAMES`` (numpy's reducers, the protocol 0-4 spellings of
bytes, bytearrays and sets, and ``copyreg._reconstructor`` for allowed classes) to the
reconstructors. The C twins are framed-only, so a standard pickle that
names a global is unpickled by the pure-Python unpickler, whose ``BUILD`` is replaced: it
completes a reconstructor's ``Pending`` value with its state (numpy's ``__setstate__`` never
runs) and otherwise builds only instances of allowed classes, as the verifier proved. Data a
standard pickle passes to reconstructors again through its memo (an array's bytes, a
bytearray's, text to encode) is charged its length each time after the first, at most the
pickle's size in all: each use is a copy or a scan.
"""

from __future__ import annotations

import gc
import importlib
import io
import itertools
import pickle
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from . import _rebuild, _verify
from ._accel import speedups
from ._allow import denied_object_reason, parse_allow
from ._errors import ForbiddenGlobalError, MalformedPickleError, StreamPickleError, UsageError
from ._limits import Limits
from ._scan import scan as _scan

__all__ = ["DEFAULT_ALLOWED", "Loader"]

#: Globals the safe loader resolves without being asked: streampickle's reconstructors only.
DEFAULT_ALLOWED: frozenset[str] = frozenset(_rebuild.NAMES)

_DEFAULT_MAX_OPAQUE_KEYS = Limits().max_opaque_keys
_GETATTR = "builtins.getattr"
# The common array's builder and the dtype cache it reads (see ``_MeteredArray``).
_plain_ndarray = _rebuild.plain_ndarray_in
_PLAIN_DTYPES = _rebuild._PLAIN_DTYPES


def _import(module: str, qualname: str) -> Any:
    """The object an allowed name refers to (the name is the user's, never only the peer's)."""
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Meter:
    """One unpickling's reconstructor calls: how many were made (so that a refusal can be
    traced to its ``REDUCE``: the unpickler makes the calls in the verifier's order), and the
    work units left to charge them (``Rebuilder.cost``)."""

    __slots__ = ("calls", "left")

    def __init__(self, budget: int) -> None:
        self.calls = 0
        self.left = budget


class _Metered:
    """A reconstructor as one unpickling sees it: each call is counted and its cost charged
    before it runs; a call the budget can't pay for is refused."""

    __slots__ = ("_rebuilder", "_meter")

    def __init__(self, rebuilder: _rebuild.Rebuilder, meter: _Meter) -> None:
        self._rebuilder = rebuilder
        self._meter = meter

    def __call__(self, *args: Any) -> Any:
        meter = self._meter
        meter.calls += 1
        meter.left -= self._rebuilder.cost(*args)
        if meter.left < 0:
            raise self._overdrawn()
        return self._rebuilder(*args)

    def _overdrawn(self) -> MalformedPickleError:
        return MalformedPickleError(
            f"{self._rebuilder.name}: the reconstructor calls would take work out of proportion to the "
            "pickle's size (a memoized argument passed again and again?)"
        )


class _MeteredArray(_Metered):
    """``_Metered`` for ``ndarray``, the reconstructor of nearly every large message: its
    common case (``_rebuild.plain_ndarray``) costs one call, not three layers of them; the
    charge is the same."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        array = _plain_ndarray(_PLAIN_DTYPES, *args) if len(args) == 4 else None
        if array is None:
            return super().__call__(*args)
        meter = self._meter
        meter.calls += 1
        meter.left -= _rebuild.plain_ndarray_cost(array)  # what ndarray's cost says for it
        if meter.left < 0:
            raise self._overdrawn()
        return array


class _PersistentIdRefused(MalformedPickleError):
    """A persistent id that would have handed the user's ``persistent_load`` an internal value."""


class _GuardedPersistentLoad:
    """The user's ``persistent_load`` as a safe unpickling calls it: the id is checked first,
    so the hook never sees one of streampickle's internal values (a reconstructor the pickle
    named without calling it, ``getattr`` as the loader answers it, a numpy value before the
    ``BUILD`` that completes it), however deep in tuples, lists, dicts and sets it is. The
    walk visits each container once per id and is charged to the pickle's work budget, so a
    shared structure passed as many ids is refused, not walked many times."""

    __slots__ = ("_hook", "_meter")

    def __init__(self, hook: Callable[[Any], Any], meter: _Meter) -> None:
        self._hook = hook
        self._meter = meter

    def __call__(self, pid: Any) -> Any:
        _check_persistent_id(pid, self._meter)
        return self._hook(pid)


def _internal(obj: Any) -> bool:
    """Whether ``obj`` is one of the safe loader's own objects, never a peer's value."""
    if isinstance(obj, _INTERNAL_TYPES):
        return True
    return type(obj) is types.MethodType and getattr(obj, "__func__", None) is Loader._getattr


def _check_persistent_id(pid: Any, meter: _Meter) -> None:
    todo = [pid]
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        if _internal(obj):
            raise _PersistentIdRefused(
                "a persistent id holds one of streampickle's internal values (a reconstructor named and not "
                "called, or a numpy value before its BUILD), so persistent_load was not called: the peer's pickle "
                "is malformed or hostile")
        # the base classes' iteration: an allowed subclass's own __iter__ is never called
        items: Any
        if isinstance(obj, tuple):
            items = tuple.__iter__(obj)
        elif isinstance(obj, list):
            items = list.__iter__(obj)
        elif isinstance(obj, (set, frozenset)):
            items = (set.__iter__ if isinstance(obj, set) else frozenset.__iter__)(obj)  # type: ignore[arg-type]
        elif isinstance(obj, dict):
            items = itertools.chain(dict.keys(obj), dict.values(obj))
        else:
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        before = len(todo)
        todo.extend(items)
        meter.left -= len(todo) - before + 1
        if meter.left < 0:
            raise _PersistentIdRefused(
                "the persistent ids would take work out of proportion to the pickle's size to check (one "
                "structure passed again and again?)")


class _SafeUnpickler(pickle.Unpickler):
    _loader: Loader  # set on the per-Loader subclass

    def __init__(self, file: Any, *, buffers: Any = None, budget: int = 0) -> None:
        super().__init__(file, buffers=buffers)
        self.meter = _Meter(budget)
        persistent_load = self._loader.persistent_load
        if persistent_load is not None:
            # ignore: typeshed declares persistent_load a method; the C unpickler takes any callable
            self.persistent_load = _GuardedPersistentLoad(persistent_load, self.meter)  # type: ignore[method-assign]

    def find_class(self, module: str, name: str) -> Any:
        found = self._loader.resolve_object(module, name)
        if type(found) is not _rebuild.Rebuilder:
            return found
        return (_MeteredArray if found is _rebuild.ndarray else _Metered)(found, self.meter)


def _takes_state(cls: type) -> bool:
    """Whether pickle gives ``cls``'s instances a state (a ``BUILD``): it keeps object's own
    reduction (which sends ``__dict__`` and slots), or it has ``__setstate__``."""
    if hasattr(cls, "__setstate__"):
        return True
    return not any("__reduce_ex__" in vars(k) or "__reduce__" in vars(k) for k in cls.__mro__ if k is not object)


def call_budget(pickle_bytes: int, chunk_bytes: int) -> int:
    """Work units the reconstructor calls of one pickle may cost together: as many per pickle
    byte as the verifier's budget, plus what reading each side chunk once costs (an array's
    data is scanned once, for the code-point check of text)."""
    return _verify.WORK_PER_BYTE * pickle_bytes + _verify.WORK_BASE + chunk_bytes // _rebuild.SCANNED_BYTES_PER_UNIT


class Loader:
    """Unpickles one message's pickle part against its side chunks, safely unless trusted."""

    def __init__(self, *, trusted: bool = False, allow: Iterable[Any] = (),
                 max_opaque_keys: int = _DEFAULT_MAX_OPAQUE_KEYS,
                 persistent_load: Callable[[Any], Any] | None = None) -> None:
        if type(trusted) is not bool:
            raise UsageError(f"trusted must be True or False, not {trusted!r}")
        if isinstance(allow, (str, bytes)):
            raise UsageError("allow must be a list of names or classes, not a single string")
        if persistent_load is not None and not callable(persistent_load):
            raise UsageError(f"persistent_load must be a callable, not {type(persistent_load).__name__}")
        self.trusted = trusted
        #: The user's callable for BINPERSID (None: the opcode is refused, as pickle refuses it).
        self.persistent_load = persistent_load
        self.max_opaque_keys = max_opaque_keys
        # full name -> object, or None until first use (imported then)
        self._allowed: dict[str, Any] = parse_allow(allow)
        self._globals: dict[str, _verify.Global] = {}
        # The restricted unpickler, bound to this loader; a trusted loader never uses one.
        self._unpickler: type[_SafeUnpickler] | None = (
            None if trusted else type("SafeUnpickler", (_SafeUnpickler,), {"_loader": self})
        )

    @classmethod
    def shared(cls, trusted: bool) -> Loader:
        """The loader for the default allowlist (immutable, so one serves every decoder)."""
        return _SHARED[trusted] if type(trusted) is bool else cls(trusted=trusted)

    # -- names ------------------------------------------------------------------------------

    def resolve(self, module: str, qualname: str, pos: int) -> _verify.Global:
        """What the verifier may assume of the global ``module.qualname`` (at byte ``pos``)."""
        full = f"{module}.{qualname}"
        known = self._globals.get(full)
        if known is not None:
            return known
        rebuilder = _rebuild.NAMES.get(full)
        if rebuilder is not None:
            found = _verify.Global(module, qualname, rebuilder=rebuilder)
        elif full == _GETATTR and any(name.count(".") > 1 for name in self._allowed):
            # getattr(allowed class, "name") is how pickle writes a classmethod; the verifier
            # admits it only when "module.Class.name" itself is allowed.
            found = _verify.Global(module, qualname, attribute_of=True)
        elif full in self._allowed:
            obj = self._object(full, module, qualname, pos)
            is_class = isinstance(obj, type)
            found = _verify.Global(
                module, qualname, is_class=is_class,
                dict_like=is_class and issubclass(obj, dict),
                list_like=is_class and issubclass(obj, list),
                buildable=is_class and _takes_state(obj),
            )
        else:
            raise ForbiddenGlobalError(module, qualname, position=pos, opcode="STACK_GLOBAL")
        if len(self._globals) < 4096:  # the cache is bounded; peers choose the names
            self._globals[full] = found
        return found

    def _object(self, full: str, module: str, qualname: str, pos: int | None) -> Any:
        obj = self._allowed[full]
        if obj is None:
            try:
                obj = _import(module, qualname)
            except Exception as exc:
                raise ForbiddenGlobalError(module, qualname, position=pos, opcode="STACK_GLOBAL") from exc
            if denied_object_reason(obj) is not None:  # "mymod.os.system" is os.system
                raise ForbiddenGlobalError(getattr(obj, "__module__", None) or module,
                                           getattr(obj, "__qualname__", None) or qualname,
                                           position=pos, opcode="STACK_GLOBAL")
            self._allowed[full] = obj
        return obj

    def resolve_object(self, module: str, name: str) -> Any:
        """``find_class`` of the restricted unpickler: the object for a name the verifier
        already admitted, from the same table."""
        full = f"{module}.{name}"
        rebuilder = _rebuild.NAMES.get(full)
        if rebuilder is not None:
            return rebuilder
        if full == _GETATTR:
            return self._getattr
        if full in self._allowed:
            return self._object(full, module, name, None)
        raise ForbiddenGlobalError(module, name)

    def _getattr(self, owner: Any, attr: Any) -> Any:
        """``builtins.getattr`` as a safe pickle sees it: only an allowed dotted name."""
        module = getattr(owner, "__module__", None)
        qualname = getattr(owner, "__qualname__", None)
        if type(attr) is not str or type(module) is not str or type(qualname) is not str:
            raise ForbiddenGlobalError("builtins", "getattr")
        full = f"{module}.{qualname}.{attr}"
        if full not in self._allowed:
            raise ForbiddenGlobalError(module, f"{qualname}.{attr}")
        return self._object(full, module, f"{qualname}.{attr}", None)

    def resolve_standard(self, module: str, qualname: str, pos: int) -> _verify.Global:
        """``resolve`` for a standard pickle: numpy's reducers and the protocol 0-3 spellings
        of bytes and sets (``_rebuild.STANDARD_NAMES``) too."""
        rebuilder = _rebuild.STANDARD_NAMES.get(f"{module}.{qualname}")
        if rebuilder is not None:
            return _verify.Global(module, qualname, rebuilder=rebuilder)
        return self.resolve(module, qualname, pos)

    def resolve_standard_object(self, module: str, name: str) -> Any:
        """``find_class`` of the standard safe unpickler, from the same table."""
        rebuilder = _rebuild.STANDARD_NAMES.get(f"{module}.{name}")
        return rebuilder if rebuilder is not None else self.resolve_object(module, name)

    # -- loading ----------------------------------------------------------------------------

    def load_standard(self, data: bytes) -> Any:
        """Unpickle one standard pickle (any protocol, no out-of-band buffers; ``data`` ends
        with its STOP): with pickle's unpickler if trusted, else verified first."""
        if self.trusted:
            return _plain_loads(data, None, self.persistent_load)
        persistent = self.persistent_load is not None
        try:
            verified = _gc_paused(lambda: _verify.verify_standard(data, self.resolve_standard, self.max_opaque_keys,
                                                                  persistent=persistent))
        except _verify.Refused as refused:
            raise _verify.refusal(refused) from None
        if not verified:  # plain data: no call, no BUILD, nothing to resolve
            return _plain_loads(data, None)
        unpickler = _StandardUnpickler(self, data, call_budget(len(data), 0))
        try:
            obj = _gc_paused(unpickler.load)
        except _PersistentIdRefused as exc:
            raise MalformedPickleError(str(exc)) from None
        except StreamPickleError:
            raise
        except Exception as exc:  # UnpicklingError, TypeError from a reconstructor, ...
            raise unpickling_failed(exc) from exc
        if unpickler.pending:
            raise MalformedPickleError("a numpy value was never completed by its BUILD")
        return obj


    def load(self, data: bytes | memoryview, buffers: Sequence[Any]) -> Any:
        """Unpickle ``data`` with ``buffers`` as its out-of-band buffers, all of them used."""
        if not buffers:
            return self.load_inband(data)
        it = iter(buffers)
        if self.trusted:
            obj = _plain_loads(data, it, self.persistent_load)
        else:
            obj = (self._restricted_loads(data, it, _chunk_bytes(buffers))
                   if self._verify(data, len(buffers)) else _plain_loads(data, it))
        if next(it, None) is not None:
            raise MalformedPickleError("the pickle used fewer out-of-band buffers than the message has side chunks")
        return obj

    def load_inband(self, data: bytes | memoryview) -> Any:
        """``load`` for a message without side chunks: the path every small message takes."""
        if (_load_inband_c is not None and type(data) is bytes and len(data) < GC_PAUSE_BYTES
                and self.persistent_load is None):
            try:
                obj = _load_inband_c(data, self.trusted)  # the fast path below, in one C call
            except Exception as exc:
                raise unpickling_failed(exc) from exc
            if obj is not NotImplemented:
                return obj
        if self.trusted:
            return _plain_loads(data, None, self.persistent_load)
        if self._verify(data, 0):
            return self._restricted_loads(data, None, 0)
        return _plain_loads(data, None)

    def _verify(self, data: bytes | memoryview, chunk_count: int) -> int:
        """Run the verifier; return the number of globals the pickle names (0: plain data,
        which the plain C unpickler loads as safely as the restricted one, and faster)."""
        result = _scan(data, chunk_count)
        if result == 0:
            return 0
        persistent = self.persistent_load is not None
        if type(result) is tuple and not persistent:  # with persistent_load, BINPERSID is the walk's to judge
            raise _verify.refusal(_verify.Refused(*result))
        walk = _verify_c or _verify.verify  # the C twin returns its refusal, the reference raises it
        try:
            if len(data) < _VERIFY_GC_PAUSE_BYTES:
                verified = walk(data, chunk_count, self.resolve, self.max_opaque_keys, persistent=persistent)
            else:
                # The walk makes an object per opcode, all alive until it ends: collections find
                # nothing to free and cost as much as the walk (measured: half its time).
                verified = _gc_paused(lambda: walk(data, chunk_count, self.resolve, self.max_opaque_keys,
                                                   persistent=persistent))
        except _verify.Refused as refused:
            raise _verify.refusal(refused) from None
        if isinstance(verified, tuple):
            raise _verify.refusal(_verify.Refused(*verified))
        return verified

    def _located(self, exc: MalformedPickleError, data: bytes | memoryview, buffers: Any,
                 call: int) -> MalformedPickleError:
        """``exc`` from the ``call``-th reconstructor call, with the offset of its ``REDUCE``."""
        offsets: list[int] = []
        try:
            _verify.verify(data, -1, self.resolve, self.max_opaque_keys, offsets,
                           persistent=self.persistent_load is not None)
        except (_verify.Refused, StreamPickleError):
            pass  # the walk stops at the buffer count, after every call was seen
        if not 0 < call <= len(offsets):
            return exc
        return MalformedPickleError(f"malformed pickle at byte {offsets[call - 1]}: REDUCE: {exc}")

    def _restricted_loads(self, data: bytes | memoryview, buffers: Any, chunk_bytes: int) -> Any:
        file = io.BytesIO(data)
        assert self._unpickler is not None  # only an untrusted loader unpickles with restrictions
        unpickler = self._unpickler(file, buffers=buffers, budget=call_budget(len(data), chunk_bytes))
        try:
            obj = unpickler.load() if len(data) < GC_PAUSE_BYTES else _gc_paused(unpickler.load)
        except _PersistentIdRefused as exc:
            raise MalformedPickleError(str(exc)) from None
        except MalformedPickleError as exc:  # a reconstructor refused its arguments' values
            raise self._located(exc, data, buffers, unpickler.meter.calls) from exc.__cause__
        except StreamPickleError:
            raise
        except Exception as exc:  # UnpicklingError, TypeError from a reconstructor, ...
            raise unpickling_failed(exc) from exc
        if file.tell() != len(data):  # the verifier guarantees this; a cheap cross-check
            raise MalformedPickleError(f"{len(data) - file.tell()} bytes follow STOP in the pickle part")
        return obj


def _chunk_bytes(buffers: Sequence[Any]) -> int:
    """The bytes of a message's side chunks: what a decoder hands over is memoryviews, read in
    one C-level pass; anything else, one at a time as ``_rebuild.nbytes`` reads it."""
    try:
        return sum(map(_MEMORYVIEW_NBYTES, buffers))
    except (TypeError, ValueError):  # not a memoryview, or a released one
        return sum(map(_rebuild.nbytes, buffers))


_MEMORYVIEW_NBYTES = memoryview.nbytes.__get__  # memoryviews only: TypeError for anything else


class _StandardCall:
    """A reconstructor as a standard unpickling sees it: each call is metered, its data
    arguments charged if the pickle shares them (``_StandardUnpickler.charge``), and a
    ``build`` one's ``Pending`` result counted until its ``BUILD``."""

    __slots__ = ("_metered", "_unpickler", "_build")

    def __init__(self, metered: _Metered, unpickler: Any, build: bool) -> None:
        self._metered = metered
        self._unpickler = unpickler
        self._build = build

    def __call__(self, *args: Any) -> Any:
        unpickler = self._unpickler
        unpickler.charge(args)
        made = self._metered(*args)
        if self._build:
            unpickler.pending += 1
        return made


#: pickle's pure-Python unpickler: typeshed declares none of the dispatch methods it overrides.
_PyUnpickler: Any = pickle._Unpickler


class _StandardUnpickler(_PyUnpickler):  # type: ignore[misc]  # subclassing Any: see _PyUnpickler
    """The safe unpickler of standard pickles: pickle's own Python unpickler, with
    ``find_class`` resolving the loader's table and ``BUILD`` completing pending values."""

    def __init__(self, loader: Loader, data: bytes, budget: int) -> None:
        super().__init__(io.BytesIO(data))
        self._loader = loader
        self.meter = _Meter(budget)
        self.pending = 0  # pending values made and not yet built
        # Data the pickle passes to reconstructors: each object once for free; again (through
        # the memo), charged its length, at most the pickle's size in all. See ``charge``.
        self._seen: dict[int, Any] = {}
        self._shared_left = len(data) + SHARED_DATA_BASE
        if loader.persistent_load is not None:
            self.persistent_load = _GuardedPersistentLoad(loader.persistent_load, self.meter)

    def find_class(self, module: str, name: str) -> Any:
        found = self._loader.resolve_standard_object(module, name)
        if type(found) is not _rebuild.Rebuilder or found in _rebuild.MARKERS:  # arguments, never called
            return found
        metered = _Metered(found, self.meter)
        return _StandardCall(metered, self, found.build)

    def charge(self, items: Any) -> None:
        """Charge the bytes and str among ``items`` (a call's arguments, a BUILD's state) that
        this unpickling has passed before. Why: reconstructors copy or scan their data (an
        array's bytes are copied into a writable array, a bytearray copies its bytes, text is
        encoded or scanned for code points), and the memo lets a pickle pass one megabyte a
        thousand times in 8 bytes each: a 1 MiB pickle made a GiB of arrays. pickle's own
        picklers write each array's data once, so real pickles are never charged more than a
        few shared short strings."""
        seen = self._seen
        for item in items:
            kind = type(item)
            if (kind is bytes or kind is str or kind is bytearray) and item:
                if id(item) not in seen:
                    seen[id(item)] = item  # kept alive: no other object takes its id meanwhile
                    continue
                self._shared_left -= len(item)
                if self._shared_left < 0:
                    raise MalformedPickleError(
                        "the pickle passes data it shares through its memo to reconstructors more times than "
                        "its size allows (each would be copied or scanned again): the peer's pickle is malformed "
                        "or hostile")

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is _rebuild.Pending:
            if type(state) is tuple:
                self.charge(state)
            meter = self.meter  # the BUILD's own work: dtypes walked and rebuilt
            meter.left -= inst.cost(state)
            if meter.left < 0:
                raise MalformedPickleError(
                    "numpy values whose BUILDs would take work out of proportion to the pickle's size "
                    "(dtypes shared through the memo and walked again and again?)")
            self.stack[-1] = inst.build(state)
            self.pending -= 1
            return
        self.stack.append(state)
        _PyUnpickler.load_build(self)  # an instance of an allowed class: the verifier proved it

    def _got(self) -> None:
        top = self.stack[-1]
        if type(top) is _rebuild.Pending:
            if top.result is None:
                raise MalformedPickleError("a numpy value is used before the BUILD that completes it")
            self.stack[-1] = top.result

    def _get(self) -> None:
        _PyUnpickler.load_get(self)
        self._got()

    def _binget(self) -> None:
        _PyUnpickler.load_binget(self)
        self._got()

    def _long_binget(self) -> None:
        _PyUnpickler.load_long_binget(self)
        self._got()

    def _dup(self) -> None:  # a pending value has one place: the stack slot BUILD completes
        if type(self.stack[-1]) is _rebuild.Pending:
            raise MalformedPickleError("DUP of a numpy value before the BUILD that completes it")
        _PyUnpickler.load_dup(self)

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(_PyUnpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _build
    dispatch[pickle.GET[0]] = _get
    dispatch[pickle.BINGET[0]] = _binget
    dispatch[pickle.LONG_BINGET[0]] = _long_binget
    dispatch[pickle.DUP[0]] = _dup


def _plain_loads(data: bytes | memoryview, buffers: Any,
                 persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """``pickle.loads`` for trusted messages and for safe ones without globals (with
    ``persistent_load``, an unpickler that has it). In trusted mode nothing scanned the
    pickle: insist at least that it ends with its STOP."""
    try:
        if persistent_load is not None:
            unpickler = pickle.Unpickler(io.BytesIO(data), buffers=buffers)
            # ignore: typeshed declares persistent_load a method; the C unpickler takes any callable
            unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
            obj = unpickler.load() if len(data) < GC_PAUSE_BYTES else _gc_paused(unpickler.load)
        elif len(data) < GC_PAUSE_BYTES:
            obj = pickle.loads(data, buffers=buffers)
        else:
            obj = _gc_paused(lambda: pickle.loads(data, buffers=buffers))
    except Exception as exc:
        raise unpickling_failed(exc) from exc
    if data[-1:] != b".":
        raise MalformedPickleError("the pickle part does not end with STOP")
    return obj


#: Bytes of shared data a standard pickle may pass to reconstructors again, beyond its size.
SHARED_DATA_BASE = 1 << 16
#: Pickle parts from this size up are unpickled with the cyclic garbage collector paused.
GC_PAUSE_BYTES = 1 << 20
#: ... and verified with it paused from this size.
_VERIFY_GC_PAUSE_BYTES = 1 << 14


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
    """The error for a verified message whose pickle raised while loading (``exc``).

    The message says the exception's type and its first argument if that is a string, cut to
    300 characters: ``repr`` of an exception whose arguments are the peer's objects could walk
    structure of any size.
    """
    first = exc.args[0] if len(exc.args) == 1 else None
    detail = f": {first[:300]}" if type(first) is str else ""
    return MalformedPickleError(f"the message's pickle failed to load: {type(exc).__name__}{detail}")


# Without the C extension: the reference walk, slower but identical.
_load_inband_c = speedups.load_inband if speedups else None
_verify_c = speedups.verify if speedups else None

_SHARED = {False: Loader(trusted=False), True: Loader(trusted=True)}
#: What the safe loader makes and a peer's pickle can reach as a value: never a hook's to see.
_INTERNAL_TYPES = (_rebuild.Pending, _rebuild.Rebuilder, _Metered, _StandardCall)
