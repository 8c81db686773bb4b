"""Shrink a finding to a small input that still fails the same way, and save it to the corpus.

Delta debugging (Zeller's ddmin) at three grains, coarse first: whole messages of a stream,
the opcodes of each pickle (with the header's lengths kept true) and its side chunks, then
bytes. A candidate is kept if it still shows the finding's class (and, for exceptions and
disagreements, the same signature: the minimizer must not slide from one bug to another).

Every candidate runs in a forked child, so a candidate that crashes the interpreter, hangs or
eats memory costs that child only; the minimizer itself never runs peer bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from . import targets, wire
from .grammar import Case

__all__ = ["minimize", "run_isolated", "save"]

T = TypeVar("T")
_EXACT = {"exception", "differential", "contract", "state"}  # classes whose signature must match too


def run_isolated(
    target: str, case: Case, cls: str, *, timeout: float, slack: float = targets.SLACK
) -> list[tuple[str, str]]:
    """(class, signature) of each finding ``case`` shows, run in a forked child: a crash is
    ``crash``, a child still running after ``timeout`` seconds is ``slow`` (a hang). The
    measurement suits ``cls``: tracemalloc for memory, CPU time for slow, neither otherwise."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report, and leave without running any cleanup of the parent's
        os.close(read)
        try:
            found = targets.check(
                target, case,
                timing=cls == "slow",
                memory="tracemalloc" if cls == "memory" else "none",
                slack=slack,
            )
            os.write(write, json.dumps([(f.cls, f.signature) for f in found]).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return [("slow", "slow:hang")]
        chunks = []
        while chunk := os.read(read, 1 << 16):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(read)
    if os.WIFSIGNALED(status):
        return [("crash", f"crash:signal {os.WTERMSIG(status)}")]
    return [tuple(f) for f in json.loads(b"".join(chunks) or b"[]")]  # type: ignore[misc]


def _shows(found: list[tuple[str, str]], cls: str, signature: str) -> bool:
    return any(c == cls and (cls not in _EXACT or s == signature) for c, s in found)


def ddmin(items: Sequence[T], test: Callable[[list[T]], bool], deadline: float) -> list[T]:
    """A smallest-found sublist of ``items`` (order kept) for which ``test`` holds; ``test``
    holds for ``items`` itself."""
    items = list(items)
    n = 2
    while items and time.monotonic() < deadline:
        size = max(1, -(-len(items) // n))
        for start in range(0, len(items), size):
            candidate = items[:start] + items[start + size :]
            if time.monotonic() >= deadline:
                return items
            if test(candidate):
                items = candidate
                n = max(n - 1, 2)
                break
        else:
            if size == 1:
                return items
            n = min(len(items), 2 * n)
    return items


def _consistent(m: wire.Message) -> bool:
    return m.complete and not m.flags


def minimize(
    target: str, case: Case, cls: str, signature: str, *, seconds: float, timeout: float, slack: float = targets.SLACK
) -> Case | None:
    """A smaller case that still shows the finding, or None if ``case`` itself doesn't (a
    finding the fuzzing process saw but a fresh one can't reproduce)."""
    deadline = time.monotonic() + seconds

    def test(candidate: Case) -> bool:
        return _shows(run_isolated(target, candidate, cls, timeout=timeout, slack=slack), cls, signature)

    if not test(case):
        return None
    # one message of the stream alone, or fewer messages
    messages, tail = wire.parse_stream(case.data)
    if len(messages) > 1 or (messages and tail):
        parts = [case.data[m.start : m.end] for m in messages] + ([tail] if tail else [])
        kept = ddmin(parts, lambda ps: bool(ps) and test(Case(b"".join(ps), case.cuts)), deadline)
        case = Case(b"".join(kept), case.cuts)
    # the cuts, for the decoder
    if case.cuts:
        cuts = ddmin(case.cuts, lambda cs: test(Case(case.data, tuple(cs))), deadline)
        case = Case(case.data, tuple(cuts))
    # opcodes and side chunks of a message whose header tells the truth
    messages, tail = wire.parse_stream(case.data, 1)
    if messages and _consistent(messages[0]) and not tail and len(messages[0].pickle) > 2:
        m = messages[0]

        def repack(tokens: Sequence[bytes], chunks: Sequence[bytes]) -> Case:
            return Case(wire.pack_message(b"".join(tokens), list(chunks)), case.cuts)

        tokens = wire.tokenize(m.pickle)
        tokens = ddmin(tokens, lambda ts: bool(ts) and test(repack(ts, m.chunks)), deadline)
        chunks = ddmin(m.chunks, lambda cs: test(repack(tokens, cs)), deadline)
        for i, chunk in enumerate(chunks):  # zeros where the bytes don't matter
            zeroed = [*chunks[:i], bytes(len(chunk)), *chunks[i + 1 :]]
            if any(chunk) and time.monotonic() < deadline and test(repack(tokens, zeroed)):
                chunks = zeroed
        case = repack(tokens, chunks)
    # bytes, last
    data = ddmin(case.data, lambda bs: bool(bs) and test(Case(bytes(bs), case.cuts)), deadline)
    data = bytes(data)
    return Case(data, tuple(c for c in case.cuts if 0 < c < len(data)))


def save(case: Case, cls: str, directory: Path) -> Path:
    """Write ``case`` as ``<class>-<sha1[:12]>.bin`` (and its cuts, if any, beside it in
    ``.cuts``); an existing file of the same name is the same finding."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(case.data).hexdigest()[:12]
    path = directory / f"{cls}-{digest}.bin"
    path.write_bytes(case.data)
    if case.cuts:
        path.with_suffix(".cuts").write_text(",".join(map(str, case.cuts)) + "\n")
    return path
