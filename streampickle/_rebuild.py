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
* describes bad arguments in bounded words (a type name, a length, a truncated value), never
  with ``repr()`` of a peer's container, which may be self-referencing or shared exponentially;
* is an immutable object, not a function, so a ``BUILD`` opcode aimed at it can't plant
  state (``__defaults__``, ``__module__``...) that would change later messages.

These names are part of the wire format (docs/wire-format.md): renaming one breaks peers.
"""

from __future__ import annotations

import collections
import fractions
import math
import pickle
import re
import uuid as _uuid
from typing import Any, Callable

import numpy as np

from . import _kinds
from ._errors import MalformedPickleError
from ._kinds import BOOL, BUFFER, BYTES, DICT, INT, LIST, STR

__all__ = [
    "Rebuilder", "NAMES", "descr_of", "dtype_of", "ndarray", "object_ndarray", "scalar", "dtype",
    "uuid", "fraction", "counter", "INT64_MAX", "FRACTION_MAX_BITS", "MAX_DESCR_NODES",
]

# numpy's own limit on dimensions (NPY_MAXDIMS is 32 before numpy 2, 64 since).
_MAX_DIMS = 64
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
_SIMPLE_DESCR = re.compile(r"[<>|][biufcmMSUV][0-9]{1,10}(\[[0-9]{0,10}[a-zA-Z\u03bc]{1,3}\])?")
# The largest code point a str can hold; numpy's U arrays store UCS-4 and don't check.
_MAX_CODE_POINT = 0x10FFFF

#: Largest shape entry: what every platform's Py_ssize_t-sized fields hold.
INT64_MAX = (1 << 63) - 1
#: Bits of a Fraction's numerator or denominator (about 4,900 decimal digits). The gcd that
#: normalises a Fraction is quadratic in this; at 16,384 bits it takes about 0.3 ms.
FRACTION_MAX_BITS = 1 << 14

class Rebuilder:
    """A reconstructor referenced by name from pickles; immutable, so ``BUILD`` can't alter it.

    ``args`` declares, for each positional argument, the kinds (``_kinds``) the verifier lets
    a pickle pass there; ``result`` is the kind of what it returns. The verifier refuses a
    call with another number of arguments or an argument of another kind before the
    unpickler runs; the call itself checks the count again and the function each argument's
    exact Python type and range.
    """

    __slots__ = ("_name", "_func", "args", "result")

    def __init__(self, name: str, func: Callable[..., Any], args: tuple[int, ...], result: int = _kinds.VALUE) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "result", result)

    def __call__(self, *args: Any) -> Any:
        if len(args) != len(self.args):
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
            raise _bad(f"a structured dtype field must be [name, descriptor, shape] or ['', padding], not {_brief(field)}")
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


def _plain_dtype(descr: str) -> np.dtype[Any]:
    """A non-structured dtype from its canonical ``dtype.str``."""
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
    dt, has_text = _build_dtype(descr, 0, [MAX_DESCR_NODES])
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
        _check_code_points(flat)
    return flat.reshape(shape, order="F" if fortran else "C")


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
            raise _bad(f"an array's data must be a 1-D contiguous uint8 buffer, not a {buffer.ndim}-D {buffer.dtype.str} array")
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
    if dt.names is None:
        return dt.kind == "U"
    return any(_holds_text(dt.fields[name][0].base) for name in dt.names)


def _object_ndarray(shape: Any, fortran: Any, writeable: Any, items: Any) -> np.ndarray[Any, Any]:
    """An object array from a list of items that arrived in-band (each item passed the
    allowlist itself). The items are copied into the array, not the list kept."""
    shape = _shape(shape)
    if type(items) is not list or len(items) != math.prod(shape):
        raise _bad(f"an object array of shape {shape} needs a list of {math.prod(shape)} items, not {_brief(items)}")
    if type(fortran) is not bool or type(writeable) is not bool:
        raise _bad("object array flags must be bools")
    flat = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # item by item: a slice assignment would broadcast lists
        flat[i] = item
    out = flat.reshape(shape, order="F" if fortran else "C")
    out.flags.writeable = writeable
    return out


def _scalar(descr: Any, data: Any) -> Any:
    """A numpy scalar from exactly ``itemsize`` bytes."""
    dt, has_text = _build_dtype(descr, 0, [MAX_DESCR_NODES])
    if type(data) is not bytes or len(data) != dt.itemsize:
        raise _bad(f"a {dt.str} scalar needs {dt.itemsize} bytes, not {_brief(data)}")
    flat = np.frombuffer(data, dtype=dt)
    if has_text:
        _check_code_points(flat)
    return flat[0]


def _dtype(descr: Any) -> np.dtype[Any]:
    return dtype_of(descr)  # one argument only: the budget is not the peer's to set


# -- Python value types whose own reduction names a mutable Python class ------------------


def _uuid_from(value: Any) -> _uuid.UUID:
    """``uuid.UUID(int=value)``, value in [0, 2**128)."""
    return _uuid.UUID(int=_int_in(value, 0, (1 << 128) - 1, "a UUID", "in [0, 2**128)"))


def _fraction(numerator: Any, denominator: Any) -> fractions.Fraction:
    """A Fraction, normalised; each part has at most ``FRACTION_MAX_BITS`` bits."""
    limit = 1 << FRACTION_MAX_BITS
    _int_in(numerator, 1 - limit, limit - 1, "a Fraction's numerator", f"of at most {FRACTION_MAX_BITS} bits")
    _int_in(denominator, 1, limit - 1, "a Fraction's denominator", f"> 0 of at most {FRACTION_MAX_BITS} bits")
    return fractions.Fraction(numerator, denominator)


def _counter(items: Any) -> collections.Counter[Any]:
    """A new Counter with the items of a dict (any values, as Counter allows)."""
    if type(items) is not dict:
        raise _bad(f"a Counter needs a dict, not {_brief(items)}")
    return collections.Counter(items)


# -- the table ------------------------------------------------------------------------------

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
