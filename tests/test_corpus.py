"""The fuzzers' corpus, replayed: every input in tests/corpus/ (findings, minimized) and the
small seeds in fuzz/seeds/ goes through ``loads``, a Decoder fed whole and in pieces, and the
C/Python scan twins; each must return or raise a StreamPickleError, never anything else, and
the twins and feeding styles must agree. This is the fuzzers' oracle without its timing and
memory checks (fuzz/targets.py); fuzz/README.md says how inputs get here.

The grammar generator itself is run for a fixed seed through the same oracle, so that it keeps
working as the library changes under it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the fuzz package lives beside tests/, not inside streampickle
    sys.path.insert(0, str(ROOT))

from fuzz import grammar, minimize, targets, wire  # noqa: E402

CORPUS = ROOT / "tests" / "corpus"
SEEDS = ROOT / "fuzz" / "seeds"
_SEED_LIMIT = 64 * 1024

#: Corpus files whose finding is not fixed yet, by file name, with what they still do. Remove
#: an entry when the fix lands (the test then fails until it is removed: strict xfail).
KNOWN: dict[str, str] = {}


def _inputs() -> list[Path]:
    found = sorted(CORPUS.glob("*.bin")) if CORPUS.is_dir() else []
    seeds = sorted(p for p in SEEDS.glob("*.bin") if p.stat().st_size <= _SEED_LIMIT) if SEEDS.is_dir() else []
    return found + seeds


def _cuts(path: Path, data: bytes) -> list[tuple[int, ...]]:
    """The ways to cut ``data`` for the Decoder: the finding's own cuts, at every byte (if
    small), and at random places."""
    out: list[tuple[int, ...]] = []
    saved = path.with_suffix(".cuts")
    if saved.exists():
        out.append(tuple(int(c) for c in saved.read_text().split(",") if c.strip()))
    if len(data) <= 4096:
        out.append(tuple(range(1, len(data))))
    rng = random.Random(len(data))
    out.append(tuple(sorted({rng.randrange(1, max(2, len(data))) for _ in range(8)})))
    return out


def _params() -> list[Any]:
    out = []
    for p in _inputs():
        marks = [pytest.mark.xfail(reason=KNOWN[p.name], strict=True)] if p.name in KNOWN else []
        out.append(pytest.param(p, id=f"{p.parent.name}/{p.name}", marks=marks))
    return out


@pytest.mark.parametrize("path", _params())
def test_corpus_input_is_decoded_or_refused(path: Path) -> None:
    data = path.read_bytes()
    for target in ("loads", "scan"):
        assert targets.classify(target, grammar.Case(data)) is None
    for cuts in _cuts(path, data):
        assert targets.classify("decoder", grammar.Case(data, cuts)) is None


def test_the_corpus_has_no_strays() -> None:
    # every file is an input (<class>-<sha1[:12]>.bin) or the cuts of one
    if not CORPUS.is_dir():
        return
    for path in CORPUS.iterdir():
        assert path.suffix in (".bin", ".cuts"), path.name
        assert path.with_suffix(".bin").exists(), path.name


def test_the_grammar_passes_the_oracle() -> None:
    src = grammar.RandomSource(random.Random(20261205))
    for _ in range(1000):
        case = grammar.generate_case(src)
        for target in targets.TARGETS:
            assert targets.classify(target, case) is None, case
    assert targets.state_changes() == []


class _Provider:
    """Stands in for atheris's FuzzedDataProvider: the two calls the grammar makes."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:
        width = ((hi - lo).bit_length() + 7) // 8
        raw, self._data = self._data[:width], self._data[width:]
        return lo + int.from_bytes(raw, "little") % (hi - lo + 1)

    def ConsumeBytes(self, n: int) -> bytes:
        raw, self._data = self._data[:n], self._data[n:]
        return raw


def test_the_grammar_runs_on_provider_bytes_and_stops_when_they_end() -> None:
    rng = random.Random(7)
    for size in (0, 1, 10, 100, 1000, 5000):
        case = grammar.generate_case(_Provider(rng.randbytes(size)))
        assert case.data[:4] == wire.MAGIC
        assert targets.classify("loads", case) is None


def test_the_grammar_makes_well_formed_pickles_mostly() -> None:
    # most generated pickles must get past the pre-scan, or the fuzzer only tests the scan
    src = grammar.RandomSource(random.Random(3))
    accepted = 0
    for _ in range(200):
        pickled, chunks = grammar.generate_pickle(src)
        accepted += type(targets._scan.scan_py(pickled, len(chunks))) is int
    assert accepted > 100


def test_tokenize_cuts_any_bytes_into_opcodes_that_join_back() -> None:
    rng = random.Random(5)
    for _ in range(200):
        data = grammar.generate_case(grammar.RandomSource(rng)).data[20:]
        for cut in (data, data[: len(data) // 2], rng.randbytes(50)):
            assert b"".join(wire.tokenize(cut)) == cut


def test_the_minimizer_keeps_the_failure_and_drops_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    def picky(case: grammar.Case) -> None:
        if b"\x8c\x03<f8" in case.data:
            raise ValueError("a finding")

    monkeypatch.setitem(targets.TARGETS, "picky", targets.Target(picky, lambda case: 1))
    big = grammar.generate_case(grammar.RandomSource(random.Random(1))).data
    case = grammar.Case(wire.pack_message(b"\x80\x05]\x8c\x03<f8a\x8c\x01xa.") + big)
    found = targets.classify("picky", case)
    assert found is not None
    smaller = minimize.minimize("picky", case, found[0], found[1], seconds=30, timeout=10)
    assert smaller is not None
    assert b"\x8c\x03<f8" in smaller.data and len(smaller.data) <= 8
