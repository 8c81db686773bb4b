"""Deques and numpy object arrays nested directly in one another, as deep as a peer likes.

CPython frees a deep chain of lists, tuples, dicts or sets a piece at a time (its
"trashcan"); a deque or an object array frees what it holds by recursing in C, a frame or more
per level. A chain of 150,000 deques from the deque reconstructor (7 bytes a level, no MARK)
crashed the process that freed it: the caller dropping the result, or the unpickler dropping
its stack after a later opcode failed. 20,000 object arrays did too. The reconstructors
refuse a chain deeper than ``_rebuild.MAX_BARE_NESTING``; what is refused never gets deep
enough to crash, which each test checks in a child process (a crash there fails the test
instead of ending the run).
"""

from __future__ import annotations

import collections
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import streampickle
from _util import make_message
from streampickle import MalformedPickleError, _rebuild

LIMIT = _rebuild.MAX_BARE_NESTING


def _global(name: str) -> bytes:
    """STACK_GLOBAL streampickle._rebuild ``name``."""
    module = b"streampickle._rebuild"
    return b"\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"


def deque_chain(depth: int, then_fail: bool = False) -> bytes:
    """deque([deque([... deque([None]) ...])]) ``depth`` deep: the deque reconstructor is
    memoized once, then each level is BINGET, EMPTY_LIST, and at the end APPEND, NONE, TUPLE2,
    REDUCE. ``then_fail``: inside a list, followed by a date that doesn't exist (month 13), so
    that the unpickler fails with the chain on its stack."""
    body = _global("deque") + b"\x940" + b"h\x00]" * depth + b"N" + b"aN\x86R" * depth
    if then_fail:
        body = b"]" + body + b"a" + _global("date") + b"M\xe4\x07K\x0dK\x01\x87Ra"
    return make_message(b"\x80\x05" + body + b".")


def object_array_chain(depth: int) -> bytes:
    """object_ndarray([1], False, True, [object_ndarray(...)]) ``depth`` deep, each level
    memoized and read back by the next (LONG_BINGET)."""
    body = _global("object_ndarray") + b"\x94" + b"]K\x01a\x94" + b"00" + b"N\x940"
    for level in range(depth):
        body += b"h\x00(h\x01\x89\x88]j" + (2 + level).to_bytes(4, "little") + b"atR\x940"
    body += b"j" + (2 + depth).to_bytes(4, "little")
    return make_message(b"\x80\x05" + body + b".")


def depth_of(obj: Any) -> int:
    depth = 0
    while isinstance(obj, collections.deque) or (isinstance(obj, np.ndarray) and obj.dtype == object):
        obj = obj[0] if isinstance(obj, collections.deque) else obj.flat[0]
        depth += 1
    return depth


@pytest.mark.parametrize("chain", [deque_chain, object_array_chain])
def test_a_chain_as_deep_as_the_bound_loads_and_frees(chain: Any) -> None:
    got = streampickle.loads(chain(LIMIT))
    assert depth_of(got) == LIMIT
    del got  # freed here: as deep as the bound is safe


@pytest.mark.parametrize("chain", [deque_chain, object_array_chain])
def test_one_level_more_is_refused(chain: Any) -> None:
    with pytest.raises(MalformedPickleError, match=f"nested {LIMIT + 1} deep"):
        streampickle.loads(chain(LIMIT + 1))


def test_a_deque_holding_an_object_array_holding_a_deque_counts_every_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_rebuild, "MAX_BARE_NESTING", 10)  # shallow enough for the encoder to pickle
    obj: Any = None
    for level in range(10):
        if level % 2:
            obj = collections.deque([obj])
        else:
            array = np.empty(1, dtype=object)
            array[0] = obj
            obj = array
    assert depth_of(streampickle.loads(streampickle.dumps(obj))) == 10
    with pytest.raises(MalformedPickleError, match="nested 11 deep"):
        streampickle.loads(streampickle.dumps(collections.deque([obj])))


def test_a_list_between_levels_breaks_the_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    # A list frees its items through the trashcan: deques in lists in deques are safe to free
    # at any depth, and nothing refuses them.
    monkeypatch.setattr(_rebuild, "MAX_BARE_NESTING", 10)
    obj: Any = None
    for _ in range(30):
        obj = collections.deque([[obj]])
    got = streampickle.loads(streampickle.dumps(obj))
    for _ in range(30):
        got = got[0][0]
    assert got is None


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import streampickle, test_deep_nesting as t
message = {make}
try:
    got = streampickle.loads(message)
except streampickle.MalformedPickleError as exc:
    print("refused:", exc)
else:
    del got
    print("loaded")
"""


@pytest.mark.parametrize("make", [
    "t.deque_chain(150_000)",
    "t.deque_chain(150_000, then_fail=True)",
    "t.deque_chain(300_000)",
    "t.object_array_chain(20_000)",
])
def test_the_chains_that_crashed_a_process_are_refused_in_one(make: str) -> None:
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests, make=make)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith("refused:") and "nested" in done.stdout, done.stdout
