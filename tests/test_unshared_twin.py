"""``_unshared_py`` against C ``unshared``: the same answer on every graph, so that both
configurations pickle without the memo exactly when the other does (and write the same bytes)."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

import streampickle
from streampickle._accel import speedups
from streampickle._encoder import _unshared_py

_held: list[Any] = []  # objects given a second reference from outside the graph


def _graph(depth: int, rnd: random.Random) -> Any:
    if depth > 4 or rnd.random() < 0.3:
        return rnd.choice([
            lambda: rnd.randrange(-5, 5), lambda: rnd.random(), lambda: None, lambda: True,
            lambda: "s" * rnd.randrange(3), lambda: b"b" * rnd.randrange(3), lambda: (),
            lambda: "interned", lambda: "fresh" + str(rnd.random()),
            lambda: _hold("held" + str(rnd.random()), rnd), lambda: object(), lambda: 1j,
        ])()
    size = rnd.randrange(4)
    kind = rnd.randrange(3)
    if kind == 0:
        made: Any = [_graph(depth + 1, rnd) for _ in range(size)]
    elif kind == 1:
        made = tuple(_graph(depth + 1, rnd) for _ in range(size))
    else:
        made = {("k" + str(rnd.random()) if rnd.random() < 0.7 else rnd.randrange(9)): _graph(depth + 1, rnd)
                for _ in range(size)}
    return _hold(made, rnd) if rnd.random() < 0.1 else made


def _hold(obj: Any, rnd: random.Random) -> Any:
    if rnd.random() < 0.5:
        _held.append(obj)
    return obj


@pytest.mark.skipif(speedups is None, reason="compares with the C extension, which is not in use")
def test_the_twins_agree_on_random_graphs() -> None:
    rnd = random.Random(2026)
    answers = set()
    for _ in range(5000):
        obj = _graph(0, rnd)
        if isinstance(obj, list) and obj and rnd.random() < 0.2:
            obj.append(obj[0])  # shared
        if isinstance(obj, list) and rnd.random() < 0.05:
            obj.append(obj)  # a cycle
        c = speedups.unshared(obj)
        assert _unshared_py(obj) == c, obj
        answers.add(c)
        _held.clear()
    assert answers == {True, False}


@pytest.mark.skipif(speedups is None, reason="compares with the C extension, which is not in use")
@pytest.mark.parametrize("levels", [198, 199, 200, 201])
def test_the_twins_agree_at_the_depth_limit(levels: int) -> None:
    nested: Any = []
    for _ in range(levels):
        nested = [nested]
    assert _unshared_py(nested) == speedups.unshared(nested)


def test_a_graph_that_appears_once_is_pickled_without_the_memo_and_loads_the_same() -> None:
    # (a key written as a literal would also be held by this code: shared, by the rule)
    graph = {"".join(["ro", "ws"]): [(i, float(i), "name" + str(i)) for i in range(100)]}
    shared_row = ("x" + str(1), 2)
    shared = [shared_row, shared_row]
    assert _unshared_py(graph) and not _unshared_py(shared)
    data = streampickle.dumps(graph)
    assert b"\x94" not in data[data.index(b"\x80\x05"):]  # no MEMOIZE: the memo was left out
    assert streampickle.loads(data) == graph
    again = streampickle.loads(streampickle.dumps(shared))
    assert again[0] is again[1]  # the memo kept the sharing
    assert pickle.loads(pickle.dumps(graph, protocol=5)) == graph
