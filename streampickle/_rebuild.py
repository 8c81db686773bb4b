"""Reconstructors that pickles name on the wire, safe to call with a peer's arguments.

Why these exist: numpy's own pickling goes through ``numpy.core.multiarray._reconstruct``
(which allocates whatever shape the pickle claims, uninitialised) and ``ndarray.__setstate__``
/ ``dtype.__setstate__`` (which have crashed the interpreter on states one bit away from valid
ones), and the standard library's value types are rebuilt by calling their classes with
whatever the pickle says: ``deque(range(2**62), 0)`` never returns, ``datetime`` built from a
byte state checks little, ``Fraction`` of huge ints runs a quadratic gcd. None of those can be
on a safe allowlist. So the encoder reduces arrays, numpy scalars, dtypes and the value types
below to these reconstructors instead, and in safe mode they are the only globals a peer's
pickle can name (besides names the user allows). Each one:

* takes a fixed number of positional arguments of declared kinds (``Rebuilder.args``), all of
  them plain data: ``None``, bools, ints, floats, strs, bytes, tuples, lists and dicts the
  pickle made, out-of-band buffers, and time zones this module made;
* checks the exact type (``type(x) is int``, never ``isinstance``) and the range of every
  argument, bounds digit counts and descriptor sizes, and never iterates anything but an
  exact list, dict or tuple it was given;
* returns a fresh object: a list or dict it was given is copied, since the pickle can still
  change that one through its memo after the call;
* describes bad arguments in bounded words (a type name, a length, a truncated value), never
  with ``repr()`` of a peer's container, which may be self-referencing or shared exponentially;
* raises :class:`MalformedPickleError` for anything outside its rules;
* is an immutable object, not a function, so a ``BUILD`` opcode aimed at it can't plant
  state (``__defaults__``, ``__module__``...) that would change later messages.

numpy data is built only through ``numpy.dtype``'s public constructor from a restricted
descriptor grammar, and an array is never allocated from a size the input merely claims: its
size must equal the bytes of the buffer that actually arrived.

These names are part of the wire format (docs/wire-format.md): renaming one breaks peers.
"""

from __future__ import annotations

import collections
import datetime as _dt
import decimal as _decimal
import fractions
import math
import pickle
import re
import sys
import uuid as _uuid
import weakref
import zoneinfo as _zoneinfo
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from . import _kinds, _shm
from ._accel import speedups
from ._errors import MalformedPickleError
from ._kinds import BOOL, BUFFER, BYTES, DICT, FLOAT, INT, LIST, NONE, STR, TZINFO

__all__ = [
    "DECIMAL_MAX_DIGITS", "DECIMAL_MAX_EXPONENT", "FRACTION_MAX_BITS", "INT64_MAX", "INT64_MIN",
    "MAX_DESCR_NODES", "NAMES", "SCANNED_BYTES_PER_UNIT", "WORK_UNIT_NS", "Rebuilder", "complex_",
    "counter", "date", "datetime", "decimal", "deque", "descr_of", "dtype", "dtype_of", "ellipsis",
    "empty_descr_of", "fraction", "nbytes", "ndarray", "not_implemented", "object_ndarray",
    "ordered_dict", "range_", "scalar", "slice_", "time", "timedelta", "timezone", "uuid",
    "zoneinfo",
]

# numpy's own limit on dimensions (NPY_MAXDIMS is 32 before numpy 2, 64 since): a shape past
# it is the peer's error, refused here, not a ValueError from numpy when the array is made.
_MAX_DIMS = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
# Nesting of structured dtypes; far beyond real use, and numpy recurses per level.
_MAX_DESCR_DEPTH = 8
#: Descriptor nodes (descriptor strings, descriptor lists and padding entries) that building
#: one dtype may visit, across all levels together. A sub-list the pickle shares through its
#: memo is counted at every place it appears, so no descriptor costs more than this however it
#: nests: a list of 16 fields that are all one 16-field list, 8 levels deep, is 16**8 visits,
#: refused after 4096.
MAX_DESCR_NODES = 4096
# dtype.str of every plain (non-structured) dtype we send: byte order, kind, item size, and a
# datetime unit. Kind "O" (object) is absent on purpose: an object array built over raw bytes
# would treat peer bytes as pointers.
_SIMPLE_DESCR = re.compile(r"[<>|][biufcmMSUV][0-9]{1,10}(\[(?:[1-9][0-9]{0,9})?[a-zA-Z\u03bc]{1,3}\])?")
# The largest code point a str can hold; numpy's U arrays store UCS-4 and don't check.
_MAX_CODE_POINT = 0x10FFFF
# numpy's empty str_, bytes_ and void scalars have a flexible dtype of no size, and only they
# (an array made with one gets itemsize 1). Such a dtype travels as that scalar or as a dtype
# object, never as an array's or a field's dtype: an array of itemsize 0 would be any length in
# no bytes. Each maps to the scalar's type and its one value.
_EMPTY_FLEXIBLE: dict[str, tuple[type, Any]] = {
    "|S0": (np.bytes_, b""),
    "<U0": (np.str_, ""),
    ">U0": (np.str_, ""),
    "|V0": (np.void, b""),
}

#: Signed 64-bit bounds of the ints in a slice or range, of shape entries and of a deque's
#: maxlen: what every platform's Py_ssize_t-sized fields hold.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
#: Bits of a Fraction's numerator or denominator (about 4,900 decimal digits). The gcd that
#: normalises a Fraction is quadratic in this; at 16,384 bits it takes about 0.3 ms.
FRACTION_MAX_BITS = 1 << 14
#: Coefficient digits of a Decimal (and of a NaN's payload): the limit CPython puts on int/str
#: conversions by default (``sys.int_info.default_max_str_digits``).
DECIMAL_MAX_DIGITS = 4300
#: Largest magnitude of a finite Decimal's exponent. ``int(Decimal("1E1000000"))`` takes half a
#: minute, so a peer's Decimal is kept to values whose integer part has at most 8,600 digits.
DECIMAL_MAX_EXPONENT = 4300


class Rebuilder:
    """A reconstructor referenced by name from pickles; immutable, so ``BUILD`` can't alter it.

    ``args`` declares, for each positional argument, the kinds (``_kinds``) the verifier lets
    a pickle pass there; ``result`` is the kind of what it returns. The verifier refuses a
    call with another number of arguments or an argument of another kind before the
    unpickler runs; the call itself checks the count again and the function each argument's
    exact Python type and range.

    ``cost(*args)`` is what the call will do beyond walking the containers it is given (which
    the verifier charges), in work units (``WORK_UNIT_NS``): the safe loader charges it to a
    budget in proportion to the pickle's size *before* making the call, so that one memoized
    argument passed to a thousand calls can't multiply the work. It is computed from sizes
    alone (lengths, bit counts, descriptor nodes, colliding keys) and never raises.

    ``build``: the call returns a :class:`Pending` value that exactly one ``BUILD`` completes
    (numpy's ``dtype`` and ``_reconstruct``, as standard pickles call them); only the standard
    pickle loader resolves such names.

    ``optional``: how many of the last declared arguments may be left out (``bytearray()``
    and ``bytearray(data)`` as standard pickles write them); 0 for streampickle's own.

    ``hashes_items``: the call hashes every item of its first argument, a list (``set(list)``
    and ``frozenset(list)`` as protocols 0-3 write sets): the verifier charges each item the
    list was given as a set item (nesting depth, hashing work, equal hashes, opaque keys).
    """

    __slots__ = ("_name", "_func", "args", "result", "cost", "build", "optional", "hashes_items")

    _name: str
    _func: Callable[..., Any]
    args: tuple[int, ...]
    result: int
    cost: Callable[..., int]
    build: bool
    optional: int
    hashes_items: bool

    def __init__(self, name: str, func: Callable[..., Any], args: tuple[int, ...], result: int = _kinds.VALUE,
                 cost: Callable[..., int] | None = None, build: bool = False, optional: int = 0,
                 hashes_items: bool = False) -> None:
        object.__setattr__(self, "build", build)
        object.__setattr__(self, "hashes_items", hashes_items)
        object.__setattr__(self, "optional", optional)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "result", result)
        object.__setattr__(self, "cost", cost or _one)

    @property
    def name(self) -> str:
        """The reconstructor's name (its global is ``streampickle._rebuild.<name>``)."""
        return self._name

    def __call__(self, *args: Any) -> Any:
        if not len(self.args) - self.optional <= len(args) <= len(self.args):
            raise _bad(f"{self._name} takes {len(self.args)} arguments, not {len(args)}")
        return self._func(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"streampickle reconstructor {self._name} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"streampickle reconstructor {self._name} is immutable")

    def __reduce__(self) -> str:
        return self._name  # pickled as the global streampickle._rebuild.<name>

    def __repr__(self) -> str:
        return f"<streampickle reconstructor {self._name}>"


def _bad(what: str) -> MalformedPickleError:
    return MalformedPickleError(f"invalid data in the pickle: {what}")


# Longest text of a peer's value that goes into an error message.
_BRIEF_CHARS = 40


def _brief(value: Any) -> str:
    """Words for a peer's value, made in bounded time: a container by its type and length, an
    int by its size if it is long, a str or bytes cut to a few dozen characters. Never
    ``repr()`` of a container: it may contain itself, or share one list 2**40 times."""
    kind = type(value)
    if value is None or kind is bool or kind is float:
        return repr(value)
    if kind is int:
        return repr(value) if value.bit_length() <= 128 else f"an int of {value.bit_length()} bits"
    if kind is str or kind is bytes:
        text = repr(value[:_BRIEF_CHARS])
        return f"{text}... ({len(value)} long)" if len(value) > _BRIEF_CHARS else text
    if kind in (list, tuple, dict, set, frozenset):
        return f"a {kind.__name__} of length {len(value)}"
    return f"a {kind.__qualname__}"


def _int_in(value: Any, low: int, high: int, what: str, bounds: str = "") -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; else the error naming
    ``what`` and the range (``bounds`` says it in words where the numbers are long)."""
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{what} must be an int {bounds or f'in [{low}, {high}]'}, not {_brief(value)}")
    return value


# -- dtypes ---------------------------------------------------------------------------------


def descr_of(dt: np.dtype[Any]) -> str | list[Any] | None:
    """The wire descriptor of a dtype, or None if it can't travel by the safe path."""
    if dt.hasobject or dt.itemsize == 0 or dt.metadata:
        return None
    if dt.fields is None:
        if dt.subdtype is not None or not _SIMPLE_DESCR.fullmatch(dt.str):
            return None
        return dt.str
    out: list[Any] = []
    offset = 0
    for name in dt.names or ():
        field = dt.fields[name]
        sub, field_offset = field[0], field[1]
        if len(field) > 2 or field_offset < offset:  # titles, or overlapping fields
            return None
        if field_offset > offset:
            out.append(["", offset_gap := field_offset - offset])
            offset += offset_gap
        base, shape = (sub.subdtype if sub.subdtype is not None else (sub, ()))
        inner = descr_of(base)
        if inner is None:
            return None
        out.append([name, inner, list(shape)])
        offset += sub.itemsize
    if dt.itemsize > offset:
        out.append(["", dt.itemsize - offset])
    return out


def empty_descr_of(dt: np.dtype[Any]) -> str | None:
    """The wire descriptor of an empty flexible dtype (``np.str_("").dtype``...), else None."""
    if dt.str in _EMPTY_FLEXIBLE and dt.fields is None and not dt.metadata:
        return dt.str
    return None


def dtype_of(descr: Any) -> np.dtype[Any]:
    """Build a dtype from a wire descriptor, refusing anything outside the grammar, nested
    more than 8 deep, or visiting more than ``MAX_DESCR_NODES`` nodes in all."""
    return _build_dtype(descr, 0, [MAX_DESCR_NODES])[0]


def _build_dtype(descr: Any, depth: int, budget: list[int]) -> tuple[np.dtype[Any], bool]:
    """The dtype of ``descr``, and whether it holds a U (UCS-4 text) field anywhere.

    ``budget`` holds the nodes still allowed to be visited; every descriptor and every padding
    entry costs one, wherever it is met (shared or not)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _bad(f"a dtype descriptor of more than {MAX_DESCR_NODES} nodes (counting every use of a shared one)")
    if type(descr) is str:
        dt = _plain_dtype(descr)
        return dt, dt.kind == "U"
    if type(descr) is not list or not descr or depth >= _MAX_DESCR_DEPTH:
        raise _bad(f"a structured dtype descriptor must be a non-empty list of fields, nested at most "
                   f"{_MAX_DESCR_DEPTH} deep, not {_brief(descr)}")
    if len(descr) > budget[0]:  # each entry costs at least one node: refuse before the walk
        raise _bad(f"a dtype descriptor of more than {MAX_DESCR_NODES} nodes (counting every use of a shared one)")
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    offset = 0
    has_text = False
    for field in descr:
        if type(field) is not list or len(field) not in (2, 3) or type(field[0]) is not str:
            raise _bad(
                "a structured dtype field must be [name, descriptor, shape] or ['', padding], "
                f"not {_brief(field)}"
            )
        if len(field) == 2:
            budget[0] -= 1
            if field[0] != "" or budget[0] < 0:
                raise _bad(f"a padding entry must be ['', bytes] within {MAX_DESCR_NODES} nodes")
            offset += _int_in(field[1], 1, (1 << 40) - 1, "a padding size")
            continue
        name, inner, shape = field
        if not name:
            raise _bad("a structured dtype field has an empty name")
        base, text = _build_dtype(inner, depth + 1, budget)
        shape = _shape(shape)
        names.append(name)
        formats.append((base, shape) if shape else base)
        offsets.append(offset)
        has_text = has_text or text
        offset += base.itemsize * math.prod(shape)
        if offset >= 1 << 40:
            raise _bad("a structured dtype larger than 1 TiB per item")
    if offset >= 1 << 40:
        raise _bad("a structured dtype larger than 1 TiB per item")
    try:
        dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"structured dtype: {str(exc)[:200]}") from exc
    return dt, has_text


# The plain descriptors already checked, and their dtypes: a stream's arrays use a handful,
# and checking one costs a regular expression and a dtype. Bounded, so that a peer naming many
# different ones can't grow it; past the bound they are checked every time.
_PLAIN_DTYPES: dict[str, np.dtype[Any]] = {}
_PLAIN_DTYPES_MAX = 256


def _plain_dtype(descr: str) -> np.dtype[Any]:
    """A non-structured dtype from its canonical ``dtype.str`` (a str: the caller checks)."""
    dt = _PLAIN_DTYPES.get(descr)
    if dt is not None:
        return dt
    dt = _check_plain_dtype(descr)
    if len(_PLAIN_DTYPES) < _PLAIN_DTYPES_MAX:
        _PLAIN_DTYPES[descr] = dt
    return dt


def _check_plain_dtype(descr: str) -> np.dtype[Any]:
    """``_plain_dtype`` uncached: check the descriptor and build its dtype."""
    if not _SIMPLE_DESCR.fullmatch(descr):
        raise _bad(f"dtype descriptor {_brief(descr)} is not a plain dtype string")
    try:
        dt = np.dtype(descr)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"dtype descriptor {descr!r}: {str(exc)[:200]}") from exc  # descr: <= 30 chars
    if dt.str != descr or dt.itemsize == 0:
        raise _bad(f"dtype descriptor {descr!r} is not canonical")
    return dt


def _shape(shape: Any) -> tuple[int, ...]:
    """An array or subarray shape: a list or tuple of at most 64 ints in [0, 2**63)."""
    if type(shape) not in (list, tuple) or len(shape) > _MAX_DIMS:
        raise _bad(f"a shape must be a list of at most {_MAX_DIMS} ints, not {_brief(shape)}")
    for n in shape:
        _int_in(n, 0, INT64_MAX, "a shape entry")
    return tuple(shape)


# -- arrays and scalars ---------------------------------------------------------------------


def _ndarray(descr: Any, shape: Any, fortran: Any, buffer: Any) -> np.ndarray[Any, Any]:
    """An array viewing ``buffer`` (one side chunk); its size must match the buffer exactly."""
    array = plain_ndarray(descr, shape, fortran, buffer)  # the common case in one call (trusted loads too)
    if array is not None:
        return array
    dt, has_text = _dtype_of(descr)
    return _array_of(dt, has_text, shape, fortran, buffer)


def _dtype_of(descr: Any) -> tuple[np.dtype[Any], bool]:
    """The dtype a wire descriptor describes, checked, and whether it holds text."""
    if type(descr) is str:  # the common case, which _build_dtype would take at one node's cost
        dt = _plain_dtype(descr)
        return dt, dt.kind == "U"
    return _build_dtype(descr, 0, [MAX_DESCR_NODES])


def _array_of(dt: np.dtype[Any], has_text: bool, shape: Any, fortran: Any, buffer: Any) -> np.ndarray[Any, Any]:
    """An array of a checked dtype viewing ``buffer``, whose size must match exactly."""
    shape = _shape(shape)
    if type(fortran) is not bool:
        raise _bad("the array order flag must be a bool")
    view = _byte_buffer(buffer)
    expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow
    if view.nbytes != expected:
        raise _bad(
            f"an array of shape {shape} and dtype {dt.str} needs {expected} bytes, its side "
            f"chunk has {view.nbytes}"
        )
    flat = np.frombuffer(view, dtype=dt)
    if has_text:
        if _shm.is_mapped(view):
            # Shared memory (a peer's file): the peer can rewrite it after the check, so the
            # array checked is a private copy.
            flat = flat.copy()
        _check_code_points(flat)
    return flat.reshape(shape, order="F" if fortran else "C")


def plain_ndarray_py(
    dtypes: dict[str, np.dtype[Any]], descr: Any, shape: Any, fortran: Any, buffer: Any
) -> np.ndarray[Any, Any] | None:
    """``ndarray``'s common case in a third of its time, or None for any other case.

    The common case: a dtype met before (in ``dtypes``, the cache ``_PLAIN_DTYPES``) and not
    text (whose data needs checking), a shape list of at most 32 ints, and a side chunk (a
    flat memoryview of bytes) of exactly the array's size. That is what a streampickle sender
    sends for nearly every array, and a message of many arrays (64 views of one shared buffer
    cost 64 calls and nothing else) spends most of its decoding here. The array is built as
    ``_ndarray`` builds it; anything else returns None and takes ``_ndarray``, which checks
    every case and says what is wrong."""
    if type(descr) is not str or type(shape) is not list or type(fortran) is not bool or type(buffer) is not memoryview:
        return None
    dt = dtypes.get(descr)
    if dt is None or dt.kind == "U" or len(shape) > 32:
        return None
    expected = dt.itemsize
    for n in shape:
        if type(n) is not int or not 0 <= n <= INT64_MAX:
            return None
        expected *= n
    if buffer.nbytes != expected or buffer.format != "B" or not buffer.c_contiguous:
        return None
    flat = np.frombuffer(buffer, dtype=dt)
    if len(shape) == 1:  # already the shape the size check proved: no reshape to pay for
        return flat
    return flat.reshape(shape, order="F" if fortran else "C")


#: ``plain_ndarray_py``, in C when the extension is built (same checks, same answers).
plain_ndarray_in: Callable[..., np.ndarray[Any, Any] | None] = (
    speedups.plain_ndarray if speedups else plain_ndarray_py
)


def plain_ndarray(descr: Any, shape: Any, fortran: Any, buffer: Any) -> np.ndarray[Any, Any] | None:
    """``plain_ndarray_in`` with this module's dtype cache."""
    return plain_ndarray_in(_PLAIN_DTYPES, descr, shape, fortran, buffer)


def _byte_buffer(buffer: Any) -> memoryview:
    """The memory an array's data arrived in, as a flat view of bytes.

    Only what the decoder hands the unpickler for a side chunk (a memoryview, a
    ``PickleBuffer``, or a 1-D C-contiguous uint8 array from ``aligned_empty``), a bytes
    literal, or a bytearray (what ``pickle.loads(..., buffers=...)`` is commonly given by a
    receiver that isn't streampickle; a memoryview of it would pass anyway): never an object
    array, whose bytes are pointers, nor a typed array or any other exporter."""
    kind = type(buffer)
    if kind is bytes or kind is bytearray:
        return memoryview(buffer)
    if kind is np.ndarray:
        if buffer.dtype != np.uint8 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
            raise _bad(
                "an array's data must be a 1-D contiguous uint8 buffer, "
                f"not a {buffer.ndim}-D {buffer.dtype.str} array"
            )
        return memoryview(buffer)
    if kind is memoryview or kind is pickle.PickleBuffer:
        view = memoryview(buffer)
        if view.format not in ("B", "b", "c") or not view.c_contiguous:
            raise _bad(f"an array's data must be contiguous bytes, not a buffer of format {view.format[:20]!r}")
        return view
    raise _bad(f"an array's data must be an out-of-band buffer or bytes, not {_brief(buffer)}")


def _check_code_points(arr: np.ndarray[Any, Any]) -> None:
    """Refuse an array with a character above U+10FFFF in any U field, however nested.

    numpy doesn't check UCS-4 data it is given, and turning such an element into a str fails
    inside CPython (``SystemError``). One vectorized pass per U field: linear in the data."""
    dt = arr.dtype
    if not arr.size:
        return
    if dt.names is not None:
        for name in dt.names:
            sub = arr[name]  # a subarray field's view has the field's shape appended
            if _holds_text(sub.dtype):
                _check_code_points(sub)
    elif dt.kind == "U":
        units = arr[..., np.newaxis].view(np.dtype(np.uint32).newbyteorder(dt.byteorder))
        if units.size and units.max() > _MAX_CODE_POINT:
            raise _bad(f"a {dt.str} array holds a code point above U+10FFFF")


def _holds_text(dt: np.dtype[Any]) -> bool:
    """Whether ``dt`` has a U field at any depth (bounded by ``MAX_DESCR_NODES``)."""
    fields = dt.fields  # None exactly when names is
    if dt.names is None or fields is None:
        return dt.kind == "U"
    return any(_holds_text(fields[name][0].base) for name in dt.names)


def _object_ndarray(shape: Any, fortran: Any, writeable: Any, items: Any) -> np.ndarray[Any, Any]:
    """An object array from a list of items that arrived in-band (each item passed the
    allowlist itself). The items are copied into the array, not the list kept."""
    shape = _shape(shape)
    if type(items) is not list or len(items) != math.prod(shape):
        raise _bad(f"an object array of shape {shape} needs a list of {math.prod(shape)} items, not {_brief(items)}")
    if type(fortran) is not bool or type(writeable) is not bool:
        raise _bad("object array flags must be bools")
    depth = _nesting(items)
    flat = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # item by item: a slice assignment would broadcast lists
        flat[i] = item
    out = flat.reshape(shape, order="F" if fortran else "C")
    out.flags.writeable = writeable
    return _nested(out, depth)


#: How deeply deques and object arrays may hold one another directly. Freeing them recurses in
#: C, a frame or more per level, without the guard CPython gives lists, tuples, dicts and sets
#: (its "trashcan", which frees a deep chain a piece at a time): a peer's chain of 150,000
#: deques, 7 bytes each, crashed the process that freed it, and 20,000 object arrays did too.
MAX_BARE_NESTING = 1000

_T = TypeVar("_T")

#: The depth of each deque and object array made here that holds another (id: depth); an
#: entry goes when its object does. One that holds none is 1 deep and has no entry.
_DEPTHS: dict[int, int] = {}


def _nesting(items: Any) -> int:
    """How deep a deque or object array of ``items`` is: 1, or one more than the deepest
    deque or object array among them. Past ``MAX_BARE_NESTING``: refused."""
    depth = 0
    for item in items:
        kind = type(item)
        if kind is collections.deque or (kind is np.ndarray and item.dtype.hasobject):
            depth = max(depth, _DEPTHS.get(id(item), 1))
    if depth >= MAX_BARE_NESTING:
        raise _bad(
            f"deques and object arrays nested {depth + 1} deep, directly in one another: at most "
            f"{MAX_BARE_NESTING} (freeing a deeper chain could overflow the C stack)"
        )
    return depth + 1


def _nested(obj: _T, depth: int) -> _T:
    """``obj``, with its ``depth`` remembered while it lives if it holds another."""
    if depth > 1:
        key = id(obj)
        _DEPTHS[key] = depth
        weakref.finalize(obj, _DEPTHS.pop, key, None)
    return obj


def _scalar(descr: Any, data: Any) -> Any:
    """A numpy scalar from exactly ``itemsize`` bytes."""
    if type(descr) is str and descr in _EMPTY_FLEXIBLE:
        if type(data) is not bytes or data:
            raise _bad(f"a {descr} scalar needs 0 bytes, not {_brief(data)}")
        kind, value = _EMPTY_FLEXIBLE[descr]
        return kind(value)
    dt, has_text = _build_dtype(descr, 0, [MAX_DESCR_NODES])
    if type(data) is not bytes or len(data) != dt.itemsize:
        raise _bad(f"a {dt.str} scalar needs {dt.itemsize} bytes, not {_brief(data)}")
    # A void scalar on its own writable copy, as numpy's pickle makes it: one on read-only
    # memory would be hashable, and numpy hashes and compares a structured one field by
    # field (microseconds each), so a few hundred as colliding keys would take minutes.
    flat = np.frombuffer(bytearray(data) if dt.kind == "V" else data, dtype=dt)
    if has_text:
        _check_code_points(flat)
    return flat[0]


def _dtype(descr: Any) -> np.dtype[Any]:
    if type(descr) is str and descr in _EMPTY_FLEXIBLE:  # a dtype object, not an array's
        return np.dtype(descr)
    return dtype_of(descr)  # one argument only: the budget is not the peer's to set


# -- numbers --------------------------------------------------------------------------------


def _complex(real: Any, imag: Any) -> complex:
    """``complex(real, imag)`` from two floats (NaN and infinities included)."""
    if type(real) is not float or type(imag) is not float:
        raise _bad(f"a complex needs two floats, not {_brief(real)} and {_brief(imag)}")
    return complex(real, imag)


def _fraction(numerator: Any, denominator: Any) -> fractions.Fraction:
    """A Fraction, normalised; each part has at most ``FRACTION_MAX_BITS`` bits."""
    limit = 1 << FRACTION_MAX_BITS
    _int_in(numerator, 1 - limit, limit - 1, "a Fraction's numerator", f"of at most {FRACTION_MAX_BITS} bits")
    _int_in(denominator, 1, limit - 1, "a Fraction's denominator", f"> 0 of at most {FRACTION_MAX_BITS} bits")
    return fractions.Fraction(numerator, denominator)


_COEFFICIENT = re.compile(r"0|[1-9][0-9]*")  # [0-9], not \d: ASCII digits only
_PAYLOAD = re.compile(r"(?:[1-9][0-9]*)?")


def _decimal_of(sign: Any, digits: Any, exponent: Any) -> _decimal.Decimal:
    """A Decimal from ``Decimal.as_tuple()``'s parts: ``sign`` 0 or 1; ``digits`` the
    coefficient as a string of ASCII digits without leading zeros (empty for an infinity, the
    payload or empty for a NaN), at most ``DECIMAL_MAX_DIGITS``; ``exponent`` an int of
    magnitude at most ``DECIMAL_MAX_EXPONENT``, or "F" (infinity), "n" (NaN), "N" (sNaN)."""
    _int_in(sign, 0, 1, "a Decimal's sign")
    if type(digits) is not str or len(digits) > DECIMAL_MAX_DIGITS:
        raise _bad(f"a Decimal's digits must be a str of at most {DECIMAL_MAX_DIGITS} digits, not {_brief(digits)}")
    text = "-" if sign else ""
    if type(exponent) is int:
        _int_in(exponent, -DECIMAL_MAX_EXPONENT, DECIMAL_MAX_EXPONENT, "a Decimal's exponent")
        if not _COEFFICIENT.fullmatch(digits):
            raise _bad(f"a finite Decimal's digits must be ASCII digits without leading zeros, not {_brief(digits)}")
        text += f"{digits}E{exponent}"
    elif exponent == "F" and type(exponent) is str:
        if digits:
            raise _bad("an infinite Decimal has no digits")
        text += "Infinity"
    elif exponent in ("n", "N") and type(exponent) is str:
        if not _PAYLOAD.fullmatch(digits):
            raise _bad(f"a NaN's payload must be ASCII digits without leading zeros, not {_brief(digits)}")
        text += f"{'s' if exponent == 'N' else ''}NaN{digits}"
    else:
        raise _bad(f"a Decimal's exponent must be an int, 'F', 'n' or 'N', not {_brief(exponent)}")
    return _decimal.Decimal(text)  # exact: a string is converted without rounding


# -- builtin values -------------------------------------------------------------------------


def _slice(start: Any, stop: Any, step: Any) -> slice:
    """A slice whose parts are each None or a signed 64-bit int (a step of 0 included, as
    Python allows in a slice object)."""
    for part in (start, stop, step):
        if part is not None:
            _int_in(part, INT64_MIN, INT64_MAX, "a slice's start, stop or step")
    return slice(start, stop, step)


def _range(start: Any, stop: Any, step: Any) -> range:
    """A range of signed 64-bit ints with a non-zero step."""
    for part in (start, stop, step):
        _int_in(part, INT64_MIN, INT64_MAX, "a range's start, stop or step")
    if step == 0:
        raise _bad("a range's step must not be 0")
    return range(start, stop, step)


def _ellipsis() -> Any:
    return Ellipsis


def _not_implemented() -> Any:
    return NotImplemented


# -- collections ----------------------------------------------------------------------------


def _ordered_dict(items: Any) -> collections.OrderedDict[Any, Any]:
    """A new OrderedDict with the items of a dict, in its order."""
    if type(items) is not dict:
        raise _bad(f"an OrderedDict needs a dict, not {_brief(items)}")
    return collections.OrderedDict(items)


def _deque(items: Any, maxlen: Any) -> collections.deque[Any]:
    """A new deque of a list's items; ``maxlen`` None or an int in [0, 2**63)."""
    if type(items) is not list:
        raise _bad(f"a deque needs a list, not {_brief(items)}")
    if maxlen is not None:
        _int_in(maxlen, 0, min(INT64_MAX, sys.maxsize), "a deque's maxlen")
    return _nested(collections.deque(items, maxlen), _nesting(items))


def _counter(items: Any) -> collections.Counter[Any]:
    """A new Counter with the items of a dict (any values, as Counter allows)."""
    if type(items) is not dict:
        raise _bad(f"a Counter needs a dict, not {_brief(items)}")
    return collections.Counter(items)


def _uuid_from(value: Any) -> _uuid.UUID:
    """``uuid.UUID(int=value)``, value in [0, 2**128)."""
    return _uuid.UUID(int=_int_in(value, 0, (1 << 128) - 1, "a UUID", "in [0, 2**128)"))


# -- dates and times ------------------------------------------------------------------------

_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_DAY_US = 86_400 * 1_000_000


def _check_date(year: Any, month: Any, day: Any) -> None:
    """Year in [1, 9999], month in [1, 12], day within that month (proleptic Gregorian)."""
    _int_in(year, _dt.MINYEAR, _dt.MAXYEAR, "a year")
    _int_in(month, 1, 12, "a month")
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    _int_in(day, 1, _MONTH_DAYS[month - 1] + leap, f"the day of month {year}-{month:02}")


def _check_time(hour: Any, minute: Any, second: Any, microsecond: Any, tz: Any, fold: Any) -> None:
    """Clock fields in range, ``tz`` None or a time zone this module makes, fold 0 or 1."""
    _int_in(hour, 0, 23, "an hour")
    _int_in(minute, 0, 59, "a minute")
    _int_in(second, 0, 59, "a second")
    _int_in(microsecond, 0, 999_999, "a microsecond")
    _int_in(fold, 0, 1, "fold")
    if tz is not None and type(tz) is not _dt.timezone and type(tz) is not _zoneinfo.ZoneInfo:
        raise _bad(f"a time zone must be None, a datetime.timezone or a zoneinfo.ZoneInfo, not {_brief(tz)}")


# The checks below start with one expression that admits the common case (days 1 to 28,
# which every month has) without a function call: lists of a million datetimes are common,
# and the per-field helpers that then give the precise error cost 1 us more per value.


def _date(year: Any, month: Any, day: Any) -> _dt.date:
    if not (type(year) is int and type(month) is int and type(day) is int
            and 1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= 28):
        _check_date(year, month, day)
    return _dt.date(year, month, day)


def _clock_ok(hour: Any, minute: Any, second: Any, microsecond: Any, tz: Any, fold: Any) -> bool:
    return (type(hour) is int and type(minute) is int and type(second) is int
            and type(microsecond) is int and type(fold) is int
            and 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 59
            and 0 <= microsecond <= 999_999 and 0 <= fold <= 1
            and (tz is None or type(tz) is _dt.timezone or type(tz) is _zoneinfo.ZoneInfo))


def _time(hour: Any, minute: Any, second: Any, microsecond: Any, tz: Any, fold: Any) -> _dt.time:
    if not _clock_ok(hour, minute, second, microsecond, tz, fold):
        _check_time(hour, minute, second, microsecond, tz, fold)
    return _dt.time(hour, minute, second, microsecond, tz, fold=fold)


def _datetime(year: Any, month: Any, day: Any, hour: Any, minute: Any, second: Any,
              microsecond: Any, tz: Any, fold: Any) -> _dt.datetime:
    if not (type(year) is int and type(month) is int and type(day) is int
            and 1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= 28
            and _clock_ok(hour, minute, second, microsecond, tz, fold)):
        _check_date(year, month, day)
        _check_time(hour, minute, second, microsecond, tz, fold)
    return _dt.datetime(year, month, day, hour, minute, second, microsecond, tz, fold=fold)


def _timedelta(days: Any, seconds: Any, microseconds: Any) -> _dt.timedelta:
    """A timedelta from its normalised fields, as ``timedelta.days/seconds/microseconds``."""
    _int_in(days, -999_999_999, 999_999_999, "a timedelta's days")
    _int_in(seconds, 0, 86_399, "a timedelta's seconds")
    _int_in(microseconds, 0, 999_999, "a timedelta's microseconds")
    return _dt.timedelta(days, seconds, microseconds)


def _timezone(offset: Any, name: Any) -> _dt.timezone:
    """A fixed-offset zone: ``offset`` in microseconds east of UTC, strictly within a day
    either way; ``name`` None (the default name) or a str."""
    _int_in(offset, 1 - _DAY_US, _DAY_US - 1, "a time zone's offset in microseconds")
    delta = _dt.timedelta(microseconds=offset)
    if name is None:
        return _dt.timezone(delta)
    if type(name) is not str:
        raise _bad(f"a time zone's name must be None or a str, not {_brief(name)}")
    return _dt.timezone(delta, name)


# What an IANA time zone key looks like ("UTC", "Europe/Paris", "America/Argentina/Buenos_Aires",
# "Etc/GMT+5"): at most four path components of letters, digits, "_", "+" and "-". Nothing else
# reaches zoneinfo, which looks a key up only inside its time zone path anyway.
_ZONE_KEY = re.compile(r"[A-Za-z0-9_+-]{1,64}(?:/[A-Za-z0-9_+-]{1,64}){0,3}")


def _zoneinfo_of(key: Any) -> _zoneinfo.ZoneInfo:
    """``zoneinfo.ZoneInfo(key)`` (the shared, cached instance) for an installed zone's key.

    The key is looked up alone, not in the list of all installed zones: listing them reads
    every file of the time zone directory (33 ms here), more than a small message may cost.
    A key that names no zone file (missing, a directory, a table such as ``zone.tab``) is
    refused."""
    zone = _zones.get(key) if type(key) is str else None
    if zone is not None:
        return zone
    if type(key) is not str or not _ZONE_KEY.fullmatch(key):
        raise _bad(f"a time zone key must name an installed zone, not {_brief(key)}")
    try:
        zone = _zoneinfo.ZoneInfo(key)
    except (KeyError, ValueError, OSError, ImportError) as exc:  # not found, not a zone file
        raise _bad(f"a time zone key must name an installed zone, not {_brief(key)}") from exc
    _zones[key] = zone
    return zone


# Every zone a pickle has named, kept: so that each zone's file is read once per process (about
# 600 zones, 2 MB in all), not once per call, whatever order a peer names them in.
_zones: dict[str, _zoneinfo.ZoneInfo] = {}


# -- what a call costs ----------------------------------------------------------------------

#: The work unit of the safe loader's budgets (the verifier's, and the one each reconstructor
#: call is charged to): about this many nanoseconds of CPU on an idle CI-class core, or 8 bytes
#: of memory. A pickle gets ``_verify.WORK_PER_BYTE`` units per byte, so the work any input
#: can make a call do stays near 1 µs and 128 bytes per byte it sent. The costs below were
#: measured per reconstructor (``benchmarks/amplification.py`` shows the outcome).
WORK_UNIT_NS = 60

# Building one structured dtype field (numpy's dtype constructor: 1.4 to 1.7 µs a field, and
# more when the fields are nested).
_DESCR_NODE_COST = 48
# A plain descriptor string: a regular expression match and numpy's dtype lookup (~1 µs).
_PLAIN_DESCR_COST = 16
# Bytes an array's data may span per unit: reading them once (the code-point check of a U
# array scans 30 GB/s) is all the reconstructor does with them.
SCANNED_BYTES_PER_UNIT = 256
# Bytes a numpy scalar copies out of its data per unit (the copy is kept: memory).
_COPIED_BYTES_PER_UNIT = 8
# Per item of a dict copied into an OrderedDict (about 200 ns and 77 bytes an item) or a Counter
# (60 ns, 61 bytes), on top of the unit the verifier charges per item.
_ORDERED_DICT_ITEM_COST = 10
_COUNTER_ITEM_COST = 7
# Per key whose hash is Python code or a tree (a Fraction's takes about 1 µs) ...
_OPAQUE_KEY_COST = 32
# ... and per pair of keys with equal hashes, which the copy compares with ``__eq__`` (Python
# code for a Fraction: 0.6 µs against a Fraction), or of an opaque and a cheap key (5 to 20 µs
# against a float it converts). What converting big numbers costs was charged to the dict's
# size when the verifier saw its keys, and the copy is charged that as it walks the dict.
_COLLISION_COST = 10
_MIXED_COLLISION_COST = 500
# Keys whose hashes the verifier already checked (salted, small, or computed and bounded).
_CHEAP_KEYS = frozenset({str, bytes, int, float, bool, type(None)})
# Loading a time zone's file: 45 to 70 µs. Each installed zone is loaded once per process
# (``_zones`` keeps them), so this is charged at most once per zone, ever; but one message may
# name every zone, so a first load is charged its full time: a message can load about 64
# zones plus one per 64 bytes (a list of all 599 zones, 12 KB, is refused on first use).
_ZONE_LOAD_COST = 1024


def _one(*args: Any) -> int:
    return 1


def _descr_cost(descr: Any) -> int:
    """Units to build the dtype of ``descr``: its nodes (every use of a shared sub-list
    counted, as ``_build_dtype`` counts them) and the entries of its subarray shapes."""
    if type(descr) is str:
        return _PLAIN_DESCR_COST
    nodes = 1
    shape_entries = 0
    todo = [descr]
    while todo:
        level = todo.pop()
        if type(level) is not list:
            continue
        nodes += len(level)  # every entry is one node: a field's descriptor or a padding entry
        if nodes > MAX_DESCR_NODES:
            # _build_dtype counts the same nodes, so it refuses this call, which ends the load:
            # charge it as little, so that the refusal the peer sees is that one.
            return _PLAIN_DESCR_COST
        for field in level:
            if type(field) is list and len(field) == 3:
                todo.append(field[1])
                shape = field[2]
                if type(shape) is list or type(shape) is tuple:
                    shape_entries += min(len(shape), _MAX_DIMS + 1)
    return _DESCR_NODE_COST * nodes + shape_entries


def nbytes(data: Any) -> int:
    """The bytes of an array's or scalar's data (0 for what the reconstructor refuses)."""
    kind = type(data)
    if kind is bytes or kind is bytearray:
        return len(data)
    try:
        if kind is memoryview or kind is np.ndarray:
            return int(data.nbytes)
        if kind is pickle.PickleBuffer:
            with memoryview(data) as view:
                return view.nbytes
    except ValueError:  # a released buffer: the reconstructor refuses it
        pass
    return 0


def _ndarray_cost(descr: Any, shape: Any, fortran: Any, buffer: Any) -> int:
    return _descr_cost(descr) + nbytes(buffer) // SCANNED_BYTES_PER_UNIT


def plain_ndarray_cost(array: np.ndarray[Any, Any]) -> int:
    """``_ndarray_cost`` of the call that ``plain_ndarray`` answered with ``array``."""
    return _PLAIN_DESCR_COST + array.nbytes // SCANNED_BYTES_PER_UNIT


def _scalar_cost(descr: Any, data: Any) -> int:
    return _descr_cost(descr) + nbytes(data) // _COPIED_BYTES_PER_UNIT


def _fraction_cost(numerator: Any, denominator: Any) -> int:
    """The gcd that normalises a Fraction is linear and then quadratic in its bits (measured:
    9 µs at 1,024 bits, 39 µs at 4,096, 320 µs at 16,384)."""
    bits = 0
    for part in (numerator, denominator):
        if type(part) is int:
            bits = max(bits, part.bit_length())
    if bits > FRACTION_MAX_BITS:
        return 1  # refused before any arithmetic
    return 1 + bits // 8 + bits * bits // 40_000


def _decimal_cost(sign: Any, digits: Any, exponent: Any) -> int:
    """Checking and converting the coefficient's digits (18 µs for 4,300)."""
    return 1 + (len(digits) // 8 if type(digits) is str and len(digits) <= DECIMAL_MAX_DIGITS else 0)


def _dict_cost(items: Any, per_item: int) -> int:
    """Units to copy ``items`` into a new mapping, beyond the unit per key the verifier
    charges: ``per_item`` for each item, more for each key whose hash is Python code or a
    tree, and more again for each pair of such keys with equal hashes (the copy compares
    them). The verifier bounds equal hashes among the keys it can compute; the others it
    only counts (``Limits.max_opaque_keys``), so their collisions are counted here, by hashing
    them once."""
    if type(items) is not dict:
        return 1
    return _keys_cost(items, per_item)


def _keys_cost(keys: dict[Any, Any] | list[Any], per_item: int) -> int:
    """``_dict_cost`` of a mapping's keys, or of a list of set items. The verifier has bounded
    the hashing of each (charged as a key), so hashing the opaque ones once here is bounded."""
    cheap = _CHEAP_KEYS
    opaque = [key for key in keys if type(key) not in cheap]
    cost = 1 + per_item * len(keys) + _OPAQUE_KEY_COST * len(opaque)
    if opaque:  # the copy compares each key with those of its hash before it, cheap ones too
        shared = collections.Counter(map(hash, opaque))
        alike = collections.Counter(h for h in map(hash, keys) if h in shared)
        for h, n in shared.items():
            cost += _COLLISION_COST * (n * (n - 1) // 2) + _MIXED_COLLISION_COST * n * (alike[h] - n)
    return cost


def _ordered_dict_cost(items: Any) -> int:
    return _dict_cost(items, _ORDERED_DICT_ITEM_COST)


def _counter_cost(items: Any) -> int:
    return _dict_cost(items, _COUNTER_ITEM_COST)


def _zoneinfo_cost(key: Any) -> int:
    return 1 if type(key) is str and key in _zones else _ZONE_LOAD_COST


# -- the table ------------------------------------------------------------------------------

ndarray = Rebuilder("ndarray", _ndarray, (STR | LIST, LIST, BOOL, BUFFER | BYTES), cost=_ndarray_cost)
object_ndarray = Rebuilder("object_ndarray", _object_ndarray, (LIST, BOOL, BOOL, LIST))
scalar = Rebuilder("scalar", _scalar, (STR | LIST, BYTES), cost=_scalar_cost)
dtype = Rebuilder("dtype", _dtype, (STR | LIST,), cost=_descr_cost)
complex_ = Rebuilder("complex_", _complex, (FLOAT, FLOAT))
fraction = Rebuilder("fraction", _fraction, (INT, INT), cost=_fraction_cost)
decimal = Rebuilder("decimal", _decimal_of, (INT, STR, INT | STR), cost=_decimal_cost)
slice_ = Rebuilder("slice_", _slice, (NONE | INT, NONE | INT, NONE | INT))
range_ = Rebuilder("range_", _range, (INT, INT, INT))
ellipsis = Rebuilder("ellipsis", _ellipsis, ())
not_implemented = Rebuilder("not_implemented", _not_implemented, ())
ordered_dict = Rebuilder("ordered_dict", _ordered_dict, (DICT,), cost=_ordered_dict_cost)
deque = Rebuilder("deque", _deque, (LIST, NONE | INT))
counter = Rebuilder("counter", _counter, (DICT,), cost=_counter_cost)
uuid = Rebuilder("uuid", _uuid_from, (INT,))
date = Rebuilder("date", _date, (INT, INT, INT))
time = Rebuilder("time", _time, (INT, INT, INT, INT, NONE | TZINFO, INT))
datetime = Rebuilder("datetime", _datetime, (INT, INT, INT, INT, INT, INT, INT, NONE | TZINFO, INT))
timedelta = Rebuilder("timedelta", _timedelta, (INT, INT, INT))
timezone = Rebuilder("timezone", _timezone, (INT, NONE | STR), result=TZINFO)
zoneinfo = Rebuilder("zoneinfo", _zoneinfo_of, (STR,), result=TZINFO, cost=_zoneinfo_cost)

#: Every reconstructor, by the global name pickles use for it.
NAMES: dict[str, Rebuilder] = {
    f"{__name__}.{r._name}": r
    for r in (
        ndarray, object_ndarray, scalar, dtype, complex_, fraction, decimal, slice_, range_,
        ellipsis, not_implemented, ordered_dict, deque, counter, uuid, date, time, datetime,
        timedelta, timezone, zoneinfo,
    )
}


# -- standard pickles (PickleDecoder): numpy's own reducers and protocol 0-4 spellings ----------
#
# ``pickle.dump`` of an ndarray writes ``numpy...._reconstruct(ndarray, (0,), b"b")`` and then
# ``BUILD`` with (version, shape, dtype, is_fortran, rawdata); a dtype is ``numpy.dtype(descr,
# align, copy)`` and ``BUILD`` with (3, byteorder, subarray, names, fields, elsize, alignment,
# flags); protocol 5 writes ``numpy...._frombuffer(buffer, dtype, shape, order)``. Safe mode
# never calls numpy's reconstructors or ``__setstate__``: these stand in for them. The calls
# return a :class:`Pending`; the safe unpickler's ``BUILD`` hands it the state, and it builds
# the object from checked parts (a dtype only if it pickles back to exactly that state; an
# array through ``_ndarray``'s checks of dtype, shape, size and code points).

_STATE_STR = re.compile(r"[<>|=]")
_DTYPE_DESCR = re.compile(r"[?biufcSUVMm][0-9]{0,10}")
_MAX_FIELDS = 4096


class Pending:
    """What a ``build`` reconstructor returned: inert until the one ``BUILD`` that completes it."""

    __slots__ = ("_make", "_args", "_cost", "result")

    def __init__(self, make: Callable[..., Any], args: tuple[Any, ...], cost: Callable[..., int] = _one) -> None:
        self._make = make
        self._args = args
        self._cost = cost
        self.result: Any = None

    def cost(self, state: Any) -> int:
        """What the ``BUILD`` with ``state`` will cost, in work units (see ``Rebuilder.cost``)."""
        return self._cost(state) if type(state) is tuple else 1

    def build(self, state: Any) -> Any:
        """Complete it with ``state`` (once); return the object made."""
        if self.result is not None:
            raise _bad("a BUILD on a value already built")
        if type(state) is not tuple:
            raise _bad(f"a BUILD state must be a tuple, not {_brief(state)}")
        self.result = self._make(*self._args, state)
        return self.result

    def __reduce__(self) -> Any:
        raise TypeError("a pending value is not picklable")


def _pending_dtype(descr: Any, align: Any, copy: Any) -> Pending:
    if type(descr) is not str or not _DTYPE_DESCR.fullmatch(descr):
        raise _bad(f"numpy.dtype: descriptor {_brief(descr)} is not a plain type code")
    if align not in (False, 0) or copy not in (True, 1) or type(align) not in (bool, int):
        raise _bad("numpy.dtype: align must be false and copy true, as numpy pickles them")
    return Pending(_dtype_from_state, (descr,), _dtype_state_cost)


def _dtype_state_cost(state: tuple[Any, ...]) -> int:
    """A dtype's BUILD walks and rebuilds the field and subarray dtypes its state holds (the
    pickle's own dtype objects, which the memo lets it share many times over)."""
    nodes = 1
    if len(state) >= 5:
        subarray, fields = state[2], state[4]
        if type(subarray) is tuple and subarray and isinstance(subarray[0], np.dtype):
            nodes += _dtype_nodes(subarray[0])
        if type(fields) is dict:
            for field in fields.values():
                if type(field) is tuple and field and isinstance(field[0], np.dtype):
                    nodes += _dtype_nodes(field[0])
                if nodes > MAX_DESCR_NODES:
                    # The BUILD refuses a dtype this large (its walk stops here too): charge
                    # it as little, so that the refusal the peer sees is that one.
                    return 1
    return _DTYPE_WALK_COST * nodes


def _dtype_from_state(descr: str, state: tuple[Any, ...]) -> np.dtype[Any]:
    """The dtype numpy's pickle of ``descr`` with ``state`` means, made from checked parts, and
    refused unless it pickles back to exactly ``descr`` and ``state``."""
    if len(state) not in (8, 9) or state[0] != (3 if len(state) == 8 else 4) or type(state[0]) is not int:
        raise _bad("a dtype state must be numpy's (3, ...) of 8 items or (4, ...) of 9")
    byteorder, subarray, names, fields, elsize, alignment = state[1:7]
    if type(byteorder) is not str or not _STATE_STR.fullmatch(byteorder):
        raise _bad(f"a dtype state's byte order must be one of < > | =, not {_brief(byteorder)}")
    _int_in(elsize, -1, INT64_MAX, "a dtype state's item size")
    _int_in(alignment, -1, 64, "a dtype state's alignment")
    try:
        if names is not None:
            if (type(names) is not tuple or type(fields) is not dict or not 0 < len(names) <= _MAX_FIELDS
                    or len(fields) != len(names) or subarray is not None or descr[0] != "V"):
                raise _bad("a structured dtype state needs names, fields and a V descriptor")
            formats, offsets = [], []
            for name in names:
                field = fields.get(name) if type(name) is str else None
                if (type(field) is not tuple or len(field) != 2 or not isinstance(field[0], np.dtype)
                        or type(field[1]) is not int):
                    raise _bad(f"a structured dtype's field {_brief(name)} is not (dtype, offset)")
                formats.append(field[0])
                offsets.append(_int_in(field[1], 0, 1 << 40, "a field offset"))
            made = np.dtype({"names": list(names), "formats": formats, "offsets": offsets,
                             "itemsize": _int_in(elsize, 1, 1 << 40, "an item size")},
                            align=bool(state[7] & 0x80 if type(state[7]) is int else 0))
        elif subarray is not None:
            if (type(subarray) is not tuple or len(subarray) != 2 or not isinstance(subarray[0], np.dtype)
                    or fields is not None):
                raise _bad("a subarray dtype state needs (base dtype, shape)")
            made = np.dtype((subarray[0], _shape(subarray[1])))
        else:
            if fields is not None:
                raise _bad("a dtype state with fields but no names")
            code = descr
            if len(state) == 9:  # datetime64 / timedelta64: the unit is in the metadata
                meta = state[8]
                # numpy 2 writes (None, unit); numpy 1 writes ({}, unit)
                if (descr not in ("M8", "m8") or type(meta) is not tuple or len(meta) != 2
                        or not (meta[0] is None or (type(meta[0]) is dict and not meta[0]))
                        or type(meta[1]) is not tuple or len(meta[1]) != 4 or type(meta[1][0]) is not bytes
                        or type(meta[1][1]) is not int):
                    raise _bad("a dtype state's metadata is not a datetime unit")
                unit = meta[1][0].decode("ascii")
                count = _int_in(meta[1][1], 1, 1 << 31, "a datetime unit count")
                code = f"{descr}[{count if count != 1 else ''}{unit}]"
            elif descr[0] in "SUV" and descr[1:] == "" and elsize > 0:
                code = f"{descr}{elsize // 4 if descr == 'U' else elsize}"
            made = np.dtype(code if byteorder in "|=" else byteorder + code)
    except MalformedPickleError:
        raise
    except (TypeError, ValueError, OverflowError, UnicodeDecodeError, KeyError) as exc:
        raise _bad(f"a dtype state numpy refuses: {str(exc)[:200]}") from exc
    if made.hasobject:
        raise _bad("a dtype holding Python objects: object arrays are refused in safe mode")
    _check_dtype_graph(made)
    if made.__reduce__()[1:] != ((descr, False, True), state):
        raise _bad(f"the dtype state of {descr!r} does not match the dtype it describes")
    return made


def _check_dtype_graph(dt: np.dtype[Any]) -> None:
    """Refuse a dtype nested more than 8 deep or of more than ``MAX_DESCR_NODES`` nodes,
    counting a field dtype each time it is used, as the descriptors of streampickle's own
    messages are bounded. A pickle can use one dtype as the field of many through its memo,
    which makes a tree exponential in the pickle's size: numpy (hashing it, copying an array
    of it) and ``descr_of`` walk it whole, and a deep one overflows numpy's C stack. The walk
    stops at the first node past the bound."""
    if _dtype_nodes(dt) > MAX_DESCR_NODES:
        raise _bad(f"a dtype nested more than {_MAX_DESCR_DEPTH} deep or of more than {MAX_DESCR_NODES} "
                   f"nodes (counting every use of a shared one)")


def _dtype_nodes(dt: np.dtype[Any]) -> int:
    """The nodes of ``dt``'s graph, every use of a shared field dtype counted; the walk stops
    at ``MAX_DESCR_NODES + 1``, which a graph deeper than ``_MAX_DESCR_DEPTH`` also counts as."""
    todo = [(dt, 0)]
    nodes = 0
    while todo:
        current, depth = todo.pop()
        nodes += 1
        if nodes > MAX_DESCR_NODES or depth > _MAX_DESCR_DEPTH:
            return MAX_DESCR_NODES + 1
        if current.subdtype is not None:
            todo.append((current.subdtype[0], depth + 1))
        elif current.names and current.fields is not None:
            fields = current.fields
            todo.extend((fields[name][0], depth + 1) for name in current.names)
    return nodes


#: Standard pickles name an array's dtype as an object the pickle built (numpy's ``dtype``,
#: completed by its BUILD), and share one through the memo: 400 arrays of one structured
#: dtype name it 400 times. Its descriptor and checked rebuild take 5-6 µs a node (3,661
#: nodes: 20 ms), so each dtype object's are remembered here, by identity (the object kept
#: alive with them, at most ``_CHECKED_DTYPES_MAX``, then all forgotten at once): a dtype that
#: many arrays share is walked once. A use that finds none is charged its nodes
#: (``_dtype_use_cost``); once, 400 arrays rebuilding one dtype took 8 s for 15 KB.
_CHECKED_DTYPES: dict[int, tuple[np.dtype[Any], np.dtype[Any], bool]] = {}
_CHECKED_DTYPES_MAX = 16
#: Work units (``WORK_UNIT_NS``) per node of a dtype that an array's checks describe and
#: rebuild (measured: 5-6 µs a node), and per node of a dtype that a BUILD checks (its graph
#: walked, and the state compared: 0.6 µs a node).
_DTYPE_NODE_COST = 100
_DTYPE_WALK_COST = 10


def _checked_dtype(dt: Any) -> tuple[np.dtype[Any], bool]:
    """The checked rebuild of a dtype object a standard pickle built, and whether it holds
    text (see ``_CHECKED_DTYPES``)."""
    if not isinstance(dt, np.dtype):
        raise _bad(f"an array's dtype must be a dtype, not {_brief(dt)}")
    entry = _CHECKED_DTYPES.get(id(dt))
    if entry is None or entry[0] is not dt:
        descr = descr_of(dt)
        if descr is None:
            raise _bad(f"an array of dtype {dt.str[:40]}: not one that loads safely")
        if len(_CHECKED_DTYPES) >= _CHECKED_DTYPES_MAX:
            _CHECKED_DTYPES.clear()
        entry = _CHECKED_DTYPES[id(dt)] = (dt, *_dtype_of(descr))
    return entry[1], entry[2]


def _dtype_use_cost(dt: Any) -> int:
    """What an array of dtype object ``dt`` costs beyond its data: 1 if its checks are
    remembered, else a walk and a rebuild of every node."""
    entry = _CHECKED_DTYPES.get(id(dt))
    if (entry is not None and entry[0] is dt) or not isinstance(dt, np.dtype):
        return 1  # remembered; or not a dtype, which the call refuses
    return 1 + _DTYPE_NODE_COST * _dtype_nodes(dt)


def _checked_array(dt: Any, shape: Any, fortran: bool, data: Any) -> np.ndarray[Any, Any]:
    checked, has_text = _checked_dtype(dt)
    if type(shape) is not tuple:
        raise _bad(f"an array's shape must be a tuple, not {_brief(shape)}")
    return _array_of(checked, has_text, shape, fortran, data)


def _pending_array(cls: Any, shape: Any, typecode: Any) -> Pending:
    if cls is not ndarray_class or shape != (0,) or typecode != b"b":
        raise _bad("numpy's _reconstruct takes (ndarray, (0,), b'b') from numpy's own pickles")
    return Pending(_array_from_state, (), _array_state_cost)


def _array_state_cost(state: tuple[Any, ...]) -> int:
    return _dtype_use_cost(state[2]) if len(state) == 5 else 1


def _array_from_state(state: tuple[Any, ...]) -> np.ndarray[Any, Any]:
    if len(state) != 5 or state[0] != 1 or type(state[0]) is not int:
        raise _bad("an array state must be numpy's (1, shape, dtype, is_fortran, data)")
    _, shape, dt, fortran, data = state
    if type(data) is list:
        raise _bad("an object array: arrays of Python objects are refused in safe mode")
    if type(data) is not bytes:
        raise _bad(f"an array's data must be bytes, not {_brief(data)}")
    if type(fortran) is int and fortran in (0, 1):
        fortran = bool(fortran)
    if type(fortran) is not bool:
        raise _bad("an array's is_fortran flag must be a bool")
    return _checked_array(dt, shape, fortran, data).copy(order="K")  # writable, as pickle makes it


def _frombuffer(buffer: Any, dt: Any, shape: Any, order: Any) -> np.ndarray[Any, Any]:
    if order not in ("C", "F") or type(order) is not str:
        raise _bad(f"an array's order must be 'C' or 'F', not {_brief(order)}")
    if type(buffer) is pickle.PickleBuffer:
        buffer = buffer.raw()
    return _checked_array(dt, shape, order == "F", buffer)


def _numpy_scalar(dt: Any, data: Any) -> Any:
    """A numpy scalar as numpy pickles it, ``scalar(dtype, bytes)``: a 0-d array's checks."""
    if type(data) is not bytes:
        raise _bad(f"a numpy scalar's data must be bytes, not {_brief(data)}")
    checked = _checked_array(dt, (), False, data)
    return (checked.copy() if checked.dtype.kind == "V" else checked)[()]  # writable: see _scalar


def _ndarray_class() -> Any:
    raise _bad("numpy.ndarray is only an argument of numpy's _reconstruct")


def _codecs_encode(text: Any, encoding: Any) -> bytes:
    """``bytes`` as protocols 0-2 write them: ``_codecs.encode(text, "latin1")``."""
    if type(text) is not str or encoding != "latin1" or type(encoding) is not str:
        raise _bad("_codecs.encode is only admitted as encode(str, 'latin1'), how pickle writes bytes")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise _bad("_codecs.encode: text beyond latin-1") from None


def _empty_bytes() -> bytes:
    return b""


def _set_of(items: Any) -> set[Any]:
    if type(items) is not list:
        raise _bad(f"a set is made from a list, not {_brief(items)}")
    return set(items)


def _frozenset_of(items: Any) -> frozenset[Any]:
    if type(items) is not list:
        raise _bad(f"a frozenset is made from a list, not {_brief(items)}")
    return frozenset(items)


def _set_cost(items: Any) -> int:
    """Units to hash ``items`` into a set: as a Counter's, more for colliding opaque items.
    Not by building the set to see: the items' hashing is what this charges for (the
    verifier bounded it, charging each item as a set item)."""
    if type(items) is not list:
        return 1
    try:
        return _keys_cost(items, _COUNTER_ITEM_COST)
    except TypeError:  # unhashable: the call itself will refuse
        return 1 + len(items)


def _bytearray_of(*data: Any) -> bytearray:
    """``bytearray()`` or ``bytearray(data)`` as protocols 0-4 write a bytearray: ``data`` is
    bytes (a literal, or ``_codecs.encode(text, "latin1")`` in protocols 0-2), nothing else
    (no int size, no iterable, no str with an encoding)."""
    if data and type(data[0]) is not bytes:
        raise _bad(f"a bytearray is made from bytes, not {_brief(data[0])}")
    return bytearray(data[0]) if data else bytearray()


def _bytearray_cost(*data: Any) -> int:
    return 1 + (len(data[0]) // SCANNED_BYTES_PER_UNIT if data and type(data[0]) is bytes else 0)


def _object_class() -> Any:
    raise _bad("builtins.object is only an argument of copyreg._reconstructor")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor(cls, object, None)``: protocols 0-1's default reduction of an
    instance of a plain class, ``object.__new__(cls)`` (its ``BUILD`` gives the state). ``cls``
    is what ``find_class`` returned for a name the user allowed (the verifier proved it a
    class); any other base, or a state, is refused."""
    if base is not object_class or state is not None:
        raise _bad("copyreg._reconstructor is only admitted as _reconstructor(cls, object, None)")
    if not isinstance(cls, type):  # a Rebuilder (a marker) is no class either
        raise _bad(f"copyreg._reconstructor instantiates a class, not {_brief(cls)}")
    try:
        return object.__new__(cls)
    except TypeError as exc:  # a class whose instances object.__new__ can't make
        raise _bad(f"copyreg._reconstructor: {str(exc)[:200]}") from exc


def _pending_dtype_cost(descr: Any, align: Any, copy: Any) -> int:
    return _descr_cost(descr)


ndarray_class = Rebuilder("ndarray_class", _ndarray_class, ())
_ARRAY_ARGS = (_kinds.GLOBAL, _kinds.TUPLE, BYTES)
pending_array = Rebuilder("pending_array", _pending_array, _ARRAY_ARGS, build=True)
pending_dtype = Rebuilder("pending_dtype", _pending_dtype, (STR, BOOL | INT, BOOL | INT), cost=_pending_dtype_cost,
                          build=True)
frombuffer = Rebuilder("frombuffer", _frombuffer, (BYTES | _kinds.BYTEARRAY | BUFFER, _kinds.VALUE, _kinds.TUPLE, STR),
                       cost=lambda buffer, dt, shape, order: _dtype_use_cost(dt))
numpy_scalar = Rebuilder("numpy_scalar", _numpy_scalar, (_kinds.VALUE, BYTES),
                         cost=lambda dt, data: _dtype_use_cost(dt))
codecs_encode = Rebuilder("codecs_encode", _codecs_encode, (STR, STR), result=BYTES)
empty_bytes = Rebuilder("empty_bytes", _empty_bytes, (), result=BYTES)
set_ = Rebuilder("set_", _set_of, (LIST,), cost=_set_cost, hashes_items=True)
bytearray_ = Rebuilder("bytearray_", _bytearray_of, (BYTES,), result=_kinds.BYTEARRAY, cost=_bytearray_cost,
                       optional=1)
object_class = Rebuilder("object_class", _object_class, ())
#: Its result is an instance of its first argument, which must be a class the user allowed.
reconstructor = Rebuilder("reconstructor", _reconstructor, (_kinds.GLOBAL, _kinds.GLOBAL, NONE),
                          result=_kinds.INSTANCE)
#: Names a standard pickle passes as arguments and never calls: ``find_class`` returns them as
#: they are (unmetered), and calling one is refused.
MARKERS = (ndarray_class, object_class)
frozenset_ = Rebuilder("frozenset_", _frozenset_of, (LIST,), cost=_set_cost, hashes_items=True)

#: The names standard pickles (``pickle.dump``, any protocol) use for numpy arrays and dtypes,
#: for bytes, bytearrays and sets in protocols 0-4 and for plain instances in protocols 0-1
#: (``copyreg._reconstructor``, only of classes the user allowed), and what the safe standard
#: loader makes of them.
#: Resolved by :class:`streampickle.PickleDecoder` only, never in streampickle's own messages.
STANDARD_NAMES: dict[str, Rebuilder] = {
    "numpy.ndarray": ndarray_class,
    "numpy.core.multiarray._reconstruct": pending_array,
    "numpy._core.multiarray._reconstruct": pending_array,
    "numpy.dtype": pending_dtype,
    "numpy.core.numeric._frombuffer": frombuffer,
    "numpy._core.numeric._frombuffer": frombuffer,
    "numpy.core.multiarray.scalar": numpy_scalar,
    "numpy._core.multiarray.scalar": numpy_scalar,
    "_codecs.encode": codecs_encode,
    "builtins.bytes": empty_bytes,
    "__builtin__.bytes": empty_bytes,
    "builtins.set": set_,
    "__builtin__.set": set_,
    "builtins.frozenset": frozenset_,
    "__builtin__.frozenset": frozenset_,
    "builtins.complex": complex_,
    "__builtin__.complex": complex_,
    "builtins.bytearray": bytearray_,
    "__builtin__.bytearray": bytearray_,
    "builtins.object": object_class,
    "__builtin__.object": object_class,
    "copyreg._reconstructor": reconstructor,
    "copy_reg._reconstructor": reconstructor,
}
