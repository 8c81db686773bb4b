"""Reconstructors that pickles name on the wire, safe to call with a peer's arguments.

Why these exist: numpy's own pickling goes through ``numpy.core.multiarray._reconstruct``
(which allocates whatever shape the pickle claims, uninitialised) and ``ndarray.__setstate__``
/ ``dtype.__setstate__`` (which have crashed the interpreter on states one bit away from valid
ones). None of those can be on a safe allowlist. So the encoder reduces arrays, numpy scalars,
dtypes and a few Python-level value types to the reconstructors below instead. Each one:

* takes plain data (strings, ints, tuples, lists, bytes, and out-of-band buffers);
* validates every argument, builds dtypes only through ``numpy.dtype``'s public constructor
  from a restricted descriptor grammar, and never allocates from a size the input merely
  claims: an array's size must equal the bytes of the buffer that actually arrived;
* is an immutable object, not a function, so a ``BUILD`` opcode aimed at it can't plant
  state (``__defaults__``, ``__module__``...) that would change later messages.

These names are part of the wire format (docs/wire-format.md): renaming one breaks peers.
"""

from __future__ import annotations

import collections
import fractions
import math
import re
import uuid as _uuid
from typing import Any, Callable

import numpy as np

from . import _kinds
from ._errors import MalformedPickleError
from ._kinds import BOOL, BUFFER, BYTES, DICT, INT, LIST, STR

__all__ = ["ndarray", "object_ndarray", "scalar", "dtype", "uuid", "fraction", "counter", "NAMES"]

# numpy's own limit on dimensions (NPY_MAXDIMS is 32 before numpy 2, 64 since).
_MAX_DIMS = 64
# Nesting of structured dtypes and fields per level; far beyond real use, small enough that a
# descriptor can't make numpy do unbounded work.
_MAX_DESCR_DEPTH = 8
_MAX_FIELDS = 4096
# dtype.str of every plain (non-structured) dtype we send: byte order, kind, item size, and a
# datetime unit. Kind "O" (object) is absent on purpose: an object array built over raw bytes
# would treat peer bytes as pointers.
_SIMPLE_DESCR = re.compile(r"[<>|][biufcmMSUV][0-9]{1,10}(\[[0-9]{0,10}[a-zA-Z\u03bc]{1,3}\])?")


class Rebuilder:
    """A reconstructor referenced by name from pickles; immutable, so ``BUILD`` can't alter it.

    ``args`` declares, for each positional argument, the kinds (``_kinds``) the verifier lets
    a pickle pass there; ``result`` is the kind of what it returns. The verifier refuses a
    call with another number of arguments or an argument of another kind before the
    unpickler runs; the function itself then checks each argument's exact Python type.
    """

    __slots__ = ("_name", "_func", "args", "result")

    def __init__(self, name: str, func: Callable[..., Any], args: tuple[int, ...], result: int = _kinds.VALUE) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "result", result)

    def __call__(self, *args: Any) -> Any:
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
    return MalformedPickleError(f"invalid numpy data in the pickle: {what}")


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


def dtype_of(descr: Any, depth: int = 0) -> np.dtype[Any]:
    """Build a dtype from a wire descriptor, refusing anything outside the grammar."""
    if type(descr) is str:
        if not _SIMPLE_DESCR.fullmatch(descr):
            raise _bad(f"dtype descriptor {descr!r} is not a plain dtype string")
        try:
            dt = np.dtype(descr)
        except (TypeError, ValueError) as exc:
            raise _bad(f"dtype descriptor {descr!r}: {exc}") from exc
        if dt.str != descr or dt.itemsize == 0:
            raise _bad(f"dtype descriptor {descr!r} is not canonical")
        return dt
    if type(descr) is not list or not descr or len(descr) > _MAX_FIELDS or depth >= _MAX_DESCR_DEPTH:
        raise _bad("structured dtype descriptor must be a non-empty list of fields, nested at most "
                   f"{_MAX_DESCR_DEPTH} deep, of at most {_MAX_FIELDS} fields")
    names: list[str] = []
    formats: list[Any] = []
    offsets: list[int] = []
    offset = 0
    for field in descr:
        if type(field) is list and len(field) == 2 and field[0] == "" and type(field[1]) is int:
            if not 0 < field[1] < 1 << 40:
                raise _bad(f"padding of {field[1]} bytes")
            offset += field[1]  # padding
            continue
        if type(field) is not list or len(field) != 3 or type(field[0]) is not str or not field[0]:
            raise _bad(f"structured dtype field {field!r} is not [name, descriptor, shape]")
        name, inner, shape = field
        base = dtype_of(inner, depth + 1)
        shape = _shape(shape)
        names.append(name)
        formats.append((base, shape) if shape else base)
        offsets.append(offset)
        offset += base.itemsize * math.prod(shape)
        if offset >= 1 << 40:
            raise _bad("structured dtype larger than 1 TiB per item")
    try:
        return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})
    except (TypeError, ValueError) as exc:
        raise _bad(f"structured dtype: {exc}") from exc


def _shape(shape: Any) -> tuple[int, ...]:
    if type(shape) not in (list, tuple) or len(shape) > _MAX_DIMS:
        raise _bad(f"shape must be a list of at most {_MAX_DIMS} ints")
    for n in shape:
        if type(n) is not int or n < 0:
            raise _bad(f"shape {shape!r} has an entry that is not a non-negative int")
    return tuple(shape)


# -- arrays and scalars ---------------------------------------------------------------------


def _ndarray(descr: Any, shape: Any, fortran: Any, buffer: Any) -> np.ndarray[Any, Any]:
    """An array viewing ``buffer`` (one side chunk); its size must match the buffer exactly."""
    dt = dtype_of(descr)
    shape = _shape(shape)
    if type(fortran) is not bool:
        raise _bad("the array order flag must be a bool")
    try:
        view = memoryview(buffer)
    except TypeError as exc:
        raise _bad("the array's data is not a buffer") from exc
    expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow
    if view.nbytes != expected:
        raise _bad(
            f"an array of shape {shape} and dtype {dt.str} needs {expected} bytes, its side "
            f"chunk has {view.nbytes}"
        )
    flat = np.frombuffer(buffer, dtype=dt)
    return flat.reshape(shape, order="F" if fortran else "C")


def _object_ndarray(shape: Any, fortran: Any, writeable: Any, items: Any) -> np.ndarray[Any, Any]:
    """An object array from a list of items that arrived in-band (each item passed the
    allowlist itself)."""
    shape = _shape(shape)
    if type(items) is not list or len(items) != math.prod(shape):
        raise _bad(f"an object array of shape {shape} needs a list of {math.prod(shape)} items")
    if type(fortran) is not bool or type(writeable) is not bool:
        raise _bad("object array flags must be bools")
    flat = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # item by item: a slice assignment would broadcast lists
        flat[i] = item
    out = flat.reshape(shape, order="F" if fortran else "C")
    out.flags.writeable = writeable
    return out


def _scalar(descr: Any, data: Any) -> Any:
    dt = dtype_of(descr)
    if type(data) is not bytes or len(data) != dt.itemsize:
        raise _bad(f"a {dt.str} scalar needs {dt.itemsize} bytes")
    return np.frombuffer(data, dtype=dt)[0]


# -- Python value types whose own reduction names a mutable Python class ------------------


def _uuid_from(value: Any) -> _uuid.UUID:
    if type(value) is not int or not 0 <= value < 1 << 128:
        raise _bad("a UUID needs an int in [0, 2**128)")
    return _uuid.UUID(int=value)


def _fraction(numerator: Any, denominator: Any) -> fractions.Fraction:
    if type(numerator) is not int or type(denominator) is not int or denominator <= 0:
        raise _bad("a Fraction needs an int numerator and a positive int denominator")
    return fractions.Fraction(numerator, denominator)


def _dtype(descr: Any) -> np.dtype[Any]:
    return dtype_of(descr)  # one argument only: the recursion depth is not the peer's to set


def _counter(items: Any) -> collections.Counter[Any]:
    if type(items) is not dict:
        raise _bad("a Counter needs a dict")
    return collections.Counter(items)


ndarray = Rebuilder("ndarray", _ndarray, (STR | LIST, LIST, BOOL, BUFFER | BYTES))
object_ndarray = Rebuilder("object_ndarray", _object_ndarray, (LIST, BOOL, BOOL, LIST))
scalar = Rebuilder("scalar", _scalar, (STR | LIST, BYTES))
dtype = Rebuilder("dtype", _dtype, (STR | LIST,))
uuid = Rebuilder("uuid", _uuid_from, (INT,))
fraction = Rebuilder("fraction", _fraction, (INT, INT))
counter = Rebuilder("counter", _counter, (DICT,))

#: Every reconstructor, by the global name pickles use for it.
NAMES: dict[str, Rebuilder] = {
    f"{__name__}.{r._name}": r for r in (ndarray, object_ndarray, scalar, dtype, uuid, fraction, counter)
}
