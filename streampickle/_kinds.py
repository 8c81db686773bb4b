"""What the verifier knows about a value before the unpickler makes it: its kind.

The safe loader's verifier (``_verify``) runs the pickle machine on *kinds* instead of
objects: every stack slot and memo entry holds what the opcodes that made it say it is. The
rules are then stated on kinds: ``SETITEMS`` needs a ``DICT`` below its mark, a
reconstructor's arguments must be of the kinds it declares, ``BUILD`` needs an ``INSTANCE``
of a class the user allowed. A kind is one bit, so a declaration that admits several kinds is
their union (``STR | LIST``).

Kinds are exact: a ``BUFFER`` slot holds an out-of-band buffer and nothing else, a ``DICT``
slot a dict built by this pickle's own ``EMPTY_DICT``. Reconstructors still check the exact
Python type of every argument at call time: the two checks guard each other.
"""

from __future__ import annotations

__all__ = [
    "ANY",
    "BOOL",
    "BUFFER",
    "BYTEARRAY",
    "BYTES",
    "CONTAINERS",
    "DICT",
    "FLOAT",
    "FROZENSET",
    "GLOBAL",
    "INSTANCE",
    "INT",
    "LIST",
    "NONE",
    "OPAQUE",
    "SCALARS",
    "SET",
    "STR",
    "TUPLE",
    "TZINFO",
    "VALUE",
    "name_of",
]

NONE = 1 << 0  # None
BOOL = 1 << 1  # True or False
INT = 1 << 2  # an int literal (BININT*, LONG1, LONG4)
FLOAT = 1 << 3  # BINFLOAT
STR = 1 << 4  # a str literal
BYTES = 1 << 5  # a bytes literal (in-band)
BYTEARRAY = 1 << 6  # BYTEARRAY8
BUFFER = 1 << 7  # an out-of-band buffer: NEXT_BUFFER, or READONLY_BUFFER of one
TUPLE = 1 << 8  # a tuple built from stack items (immutable: the verifier knows its items)
LIST = 1 << 9  # a list this pickle made (EMPTY_LIST)
DICT = 1 << 10  # a dict this pickle made (EMPTY_DICT)
SET = 1 << 11  # a set this pickle made (EMPTY_SET)
FROZENSET = 1 << 12  # FROZENSET
GLOBAL = 1 << 13  # a resolved global, before it is called
VALUE = 1 << 14  # what a streampickle reconstructor returned (a fresh, validated object)
TZINFO = 1 << 15  # what the timezone or zoneinfo reconstructor returned
INSTANCE = 1 << 16  # what calling a class the user allowed returned
OPAQUE = 1 << 17  # what calling anything else the user allowed returned

SCALARS = NONE | BOOL | INT | FLOAT | STR | BYTES
CONTAINERS = LIST | DICT | SET
ANY = (1 << 18) - 1

_NAMES = {
    NONE: "None", BOOL: "bool", INT: "int", FLOAT: "float", STR: "str", BYTES: "bytes",
    BYTEARRAY: "bytearray", BUFFER: "out-of-band buffer", TUPLE: "tuple", LIST: "list",
    DICT: "dict", SET: "set", FROZENSET: "frozenset", GLOBAL: "global",
    VALUE: "reconstructed value", TZINFO: "time zone", INSTANCE: "instance of an allowed class",
    OPAQUE: "result of an allowed callable",
}


def name_of(kinds: int) -> str:
    """A readable name for a kind or a union of kinds: ``"str or list"``."""
    if kinds == ANY:
        return "anything"
    return " or ".join(name for bit, name in _NAMES.items() if kinds & bit)
