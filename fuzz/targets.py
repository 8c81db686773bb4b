"""What the fuzzers run, and the oracle that says whether a run found something.

Targets (each takes a :class:`~fuzz.grammar.Case`):

* ``loads``: ``streampickle.loads(data)`` with default options;
* ``decoder``: a ``Decoder`` fed the stream whole and then cut at the case's points, iterated
  to the end; the two must deliver the same outcomes, message by message, and when the stream
  is one message ``loads`` must agree with them;
* ``scan``: the C pre-scan and the Python reference must return equal results for every
  message's pickle, and so must every C/Python pair that ``streampickle._verify`` exports (if
  that module exists).

The oracle (:func:`check`) runs a target and reports a :class:`Finding` when:

* ``exception``: anything but a ``streampickle.StreamPickleError`` escaped;
* ``differential``: two implementations, or two ways of feeding, disagreed;
* ``contract``: an error that says it poisons the stream came from a message that was
  dropped alone (or the reverse);
* ``slow``: the run took more CPU than ``SLACK * (2e-6 * len(data) + 0.010)`` seconds per pass
  (CPU, not wall time, so a busy machine doesn't make findings; confirmed by re-running);
* ``memory``: its peak memory (tracemalloc, or the growth of the peak RSS) was over
  ``512 * len(data)`` plus the side-chunk bytes the stream declares plus 16 MiB;
* ``state``: the run changed state that later messages depend on (the reconstructors, the
  safe loader's allowlist, numpy's builtin dtypes).

Crashes and hangs kill the process; the runner (``fuzz.run``) sees those from outside.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import itertools
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

import streampickle
from streampickle import StreamPickleError, _scan

from . import wire
from .grammar import Case

__all__ = ["TARGETS", "Finding", "Mismatch", "check", "classify", "memory_budget", "time_budget", "verify_twins"]

SLACK = 5.0
_MiB = 1 << 20


class Mismatch(AssertionError):
    """Two implementations or two ways of feeding disagreed (class ``differential``); ``key``
    names which two."""

    cls = "differential"

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key


class ContractBroken(Mismatch):
    """An error's ``poisons_stream`` disagrees with what the decoder did (class ``contract``)."""

    cls = "contract"


class Finding(NamedTuple):
    cls: str  # exception, differential, contract, slow, memory, state (crash: from the runner)
    target: str
    signature: str  # what two findings of one bug have in common
    detail: str


# -- targets --------------------------------------------------------------------------------


def run_loads(case: Case) -> None:
    streampickle.loads(case.data)


def _pieces(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _outcome(obj: Any) -> tuple[str, str]:
    return ("ok", type(obj).__name__)


#: The outcome of a stream whose decoder could not allocate a side chunk's destination. A
#: claimed chunk costs address space when its first byte arrives, so whether that succeeds
#: depends on the process (its address-space limit, what ``buffer_pool`` holds), not on the
#: input: outcomes with it are not compared.
ALLOCATION_REFUSED = ("failed", "allocation refused")


def _failed(exc: BaseException) -> tuple[str, str]:
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, MemoryError):
            return ALLOCATION_REFUSED
        cause = cause.__cause__
    return ("failed", type(exc).__name__)


def _drain(decoder: streampickle.Decoder, out: list[tuple[str, str]]) -> None:
    """Take every complete message out of the decoder; a message that fails is dropped alone."""
    for _ in range(decoder.pending + 1):
        pending = decoder.pending
        try:
            obj = next(decoder)
        except StopIteration:
            return
        except StreamPickleError as exc:
            if not pending:  # the decoder's own sticky failure: recorded by the caller
                return
            if exc.poisons_stream:
                raise ContractBroken(
                    f"message error {type(exc).__name__}",
                    f"{exc} (from one message, but it says it poisons the stream)",
                ) from exc
            out.append(("error", type(exc).__name__))
            continue
        out.append(_outcome(obj))
    raise Mismatch("pending", "the decoder kept delivering messages past its pending count")


def decode(data: bytes, cuts: tuple[int, ...] = ()) -> list[tuple[str, str]]:
    """Feed ``data`` in the pieces ``cuts`` make; the outcome of every message, in order, then
    how the stream ended."""
    decoder = streampickle.Decoder()
    out: list[tuple[str, str]] = []
    for piece in _pieces(data, cuts):
        try:
            decoder.feed(piece)
        except StreamPickleError as exc:
            _drain(decoder, out)
            if not exc.poisons_stream or not decoder.failed:
                raise ContractBroken(
                    f"feed error {type(exc).__name__}", f"{exc} (but the decoder is still usable)"
                ) from exc
            out.append(_failed(exc))
            return out
        _drain(decoder, out)
    try:
        decoder.feed_eof()
    except StreamPickleError as exc:
        _drain(decoder, out)
        out.append(_failed(exc))
        return out
    _drain(decoder, out)
    out.append(("end", ""))
    return out


def run_decoder(case: Case) -> None:
    whole = decode(case.data)
    if case.cuts:
        split = decode(case.data, case.cuts)
        if split != whole and ALLOCATION_REFUSED not in whole + split:
            raise Mismatch("whole/cut", f"fed whole: {whole}; cut at {list(case.cuts)[:20]}: {split}")
    one_message = len(whole) == 2 and whole[1] == ("end", "")
    no_message = len(whole) == 1 and whole[0][0] == "failed"
    if (one_message or (no_message and case.data)) and whole[0] != ALLOCATION_REFUSED:
        try:
            alone = _outcome(streampickle.loads(case.data))
        except StreamPickleError as exc:
            alone = _failed(exc) if whole[0][0] == "failed" else ("error", type(exc).__name__)
        if alone != whole[0] and alone != ALLOCATION_REFUSED:
            raise Mismatch("loads/decoder", f"loads(): {alone}; a Decoder: {whole[0]}")


def _pickles(data: bytes) -> list[tuple[bytes, int]]:
    """Each message's pickle part and declared side-chunk count; the whole input as a pickle
    if it is no message at all."""
    messages, _ = wire.parse_stream(data, 4)
    return [(m.pickle, m.count) for m in messages] or [(data, 0)]


def run_scan(case: Case) -> None:
    for pickled, count in _pickles(case.data):
        if _scan.scan_c is not None:
            expected = _scan.scan_py(pickled, count)
            got = _scan.scan_c(pickled, count)
            if got != expected:
                raise Mismatch("scan", f"scan_c: {got!r}; scan_py: {expected!r}")
        for name, py, c, args in verify_twins():
            expected = _call(py, args(pickled, count))
            got = _call(c, args(pickled, count))
            if got != expected:
                raise Mismatch(name, f"C: {got!r}; Python: {expected!r}")


def _call(func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """A twin's result, or its StreamPickleError as (class, message): twins must agree on
    what they raise too."""
    try:
        return func(*args)
    except StreamPickleError as exc:
        return (type(exc).__name__, str(exc))


_VERIFY: list[tuple[str, Callable[..., Any], Callable[..., Any], Callable[[bytes, int], tuple[Any, ...]]]] | None = None
_DATA_NAMES = {"data", "pickle", "pickled", "payload", "buf", "buffer", "raw"}
_COUNT_NAMES = {"chunk_count", "chunks", "count", "buffers", "nbuffers", "n_buffers", "buffer_count"}
#: Why ``verify_twins`` skipped a pair or the module, for the runner to report.
verify_notes: list[str] = []


def verify_twins() -> list[tuple[str, Callable[..., Any], Callable[..., Any], Callable[[bytes, int], tuple[Any, ...]]]]:
    """The C/Python pairs of ``streampickle._verify``: every ``X_py`` in its ``__all__`` with an
    ``X_c`` beside it (or else ``streampickle._speedups.X``), called with the pickle and the
    side-chunk count (matched by parameter name). Looked up once; an absent module gives none."""
    global _VERIFY
    if _VERIFY is not None:
        return _VERIFY
    _VERIFY = []
    try:
        module = importlib.import_module("streampickle._verify")
    except ImportError as exc:
        verify_notes.append(f"no streampickle._verify ({exc})")
        return _VERIFY
    try:
        speedups: Any = importlib.import_module("streampickle._speedups")
    except ImportError:
        speedups = None
    names = set(getattr(module, "__all__", ()))
    for name in sorted(names):
        if not name.endswith("_py"):
            continue
        py = getattr(module, name, None)
        if name[:-3] + "_c" in names:
            c = getattr(module, name[:-3] + "_c", None)
        else:  # the C twin may live in the extension under the plain name
            c = getattr(speedups, name[:-3], None)
        if py is None or c is None:
            verify_notes.append(f"{name[:-3]}: one twin is missing (no C extension?)")
            continue
        args = _arguments(py)
        if args is None:
            verify_notes.append(f"{name[:-3]}: can't tell how to call {inspect.signature(py)}")
            continue
        _VERIFY.append((name[:-3], py, c, args))
    if not _VERIFY:
        verify_notes.append(f"streampickle._verify exports no C/Python pair ({sorted(names)})")
    return _VERIFY


def _arguments(func: Callable[..., Any]) -> Callable[[bytes, int], tuple[Any, ...]] | None:
    try:
        params = [p for p in inspect.signature(func).parameters.values() if p.default is p.empty]
    except (TypeError, ValueError):
        return None
    roles = []
    for p in params:
        if p.name in _DATA_NAMES:
            roles.append(0)
        elif p.name in _COUNT_NAMES:
            roles.append(1)
        else:
            return None
    return lambda pickled, count: tuple((pickled, count)[r] for r in roles)


class Target(NamedTuple):
    run: Callable[[Case], None]
    passes: Callable[[Case], int]  # how many times it decodes the input (for the time budget)


TARGETS: dict[str, Target] = {
    "loads": Target(run_loads, lambda case: 1),
    "decoder": Target(run_decoder, lambda case: 3 if case.cuts else 2),
    "scan": Target(run_scan, lambda case: 2 + 2 * len(verify_twins())),
}


# -- the oracle -------------------------------------------------------------------------------


def time_budget(case: Case, slack: float = SLACK) -> float:
    """CPU seconds one decoding pass of ``case`` may take."""
    return slack * (2e-6 * len(case.data) + 0.010)


def memory_budget(case: Case) -> int:
    """Bytes one run of ``case`` may hold at its peak. The decoder allocates a side chunk's
    destination (uncommitted) when its first byte arrives, so what the stream declares counts."""
    return 512 * len(case.data) + min(wire.declared_chunk_bytes(case.data), 64 << 30) + 16 * _MiB


def _where(exc: BaseException) -> str:
    """The innermost frame of a traceback in streampickle (else the innermost of all)."""
    tb, last, ours = exc.__traceback__, None, None
    while tb is not None:
        code = tb.tb_frame.f_code
        last = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"
        if "/streampickle/" in code.co_filename:
            ours = last
        tb = tb.tb_next
    return ours or last or "?"


def classify(target: str, case: Case) -> tuple[str, str, str] | None:
    """Run ``target`` once: (class, signature, detail) of what it found, or None. Only the
    findings a single run shows (exceptions, disagreements); see :func:`check` for the rest."""
    try:
        TARGETS[target].run(case)
    except StreamPickleError:
        return None
    except Mismatch as exc:
        return exc.cls, f"{exc.cls}:{exc.key}", str(exc)[:2000]
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every escape is a finding, SystemExit too
        name = type(exc).__name__
        return "exception", f"exception:{name}:{_where(exc)}", f"{name}: {str(exc)[:1000]}"
    return None


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check(target: str, case: Case, *, timing: bool = True, memory: str = "rss", slack: float = SLACK) -> list[Finding]:
    """Run ``target`` on ``case`` under the oracle. ``memory`` is ``"rss"`` (cheap: the growth
    of the process's peak RSS, blind below an earlier peak), ``"tracemalloc"`` (exact, slower,
    and then timing is skipped) or ``"none"``."""
    traced = memory == "tracemalloc"
    if traced:
        tracemalloc.start()
        tracemalloc.reset_peak()
    rss = _rss_peak()
    cpu = time.process_time()
    try:
        found = classify(target, case)
        cpu = time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1] if traced else _rss_peak() - rss
    finally:
        if traced:
            tracemalloc.stop()
    out = []
    if found is not None:
        out.append(Finding(found[0], target, found[1], found[2]))
    if memory != "none" and peak > memory_budget(case):
        detail = f"peak {peak >> 20} MiB ({memory}) for {len(case.data)} input bytes"
        out.append(Finding("memory", target, f"memory:{target}", detail))
    if timing and not traced:
        budget = time_budget(case, slack) * TARGETS[target].passes(case)
        if cpu > budget and (cpu > 2 * budget or _rerun_cpu(target, case) > budget):
            detail = f"{cpu:.3f} s of CPU for {len(case.data)} bytes (budget {budget:.3f} s)"
            out.append(Finding("slow", target, f"slow:{target}", detail))
    changed = state_changes()
    if changed:
        out.append(Finding("state", target, f"state:{changed[0]}", "; ".join(changed)))
    return out


def _rerun_cpu(target: str, case: Case) -> float:
    """The least CPU time of two more runs: a GC pass or a page fault storm isn't the input's."""
    gc.collect()
    best = float("inf")
    for _ in range(2):
        cpu = time.process_time()
        classify(target, case)
        best = min(best, time.process_time() - cpu)
    return best


# -- state that must not change ----------------------------------------------------------------


def _state() -> dict[str, Any]:
    from streampickle import _encoder, _rebuild, _safe

    out: dict[str, Any] = {}
    for name, r in _rebuild.NAMES.items():
        out[name] = tuple(getattr(r, a, None) for a in ("__class__", "_func", "args", "result", "__dict__"))
    out["DEFAULT_ALLOWED"] = _safe.DEFAULT_ALLOWED
    # Read directly, not through getattr with a default: a renamed attribute fails here loudly
    # instead of leaving the check silently checking nothing.
    shared = _safe.Loader.shared(False)
    out["allowlist"] = tuple((k, id(v)) for k, v in shared._allowed.items())
    # The caches a peer's input fills may grow, but each entry stays what its key says.
    out["plain dtypes cached as named"] = all(dt.str == descr for descr, dt in _rebuild._PLAIN_DTYPES.items())
    out["plain descriptors cached as named"] = all(
        key == id(dt) and _rebuild.descr_of(dt) == descr for key, (dt, descr) in _encoder._PLAIN_DESCRS.items()
    )
    for code in "?bBhHiIlLqQefdgFDGMm":
        dt = np.dtype(code)
        out[f"dtype {code}"] = (dt.str, dt.itemsize, dt.alignment, dt.flags, dt.names, dt.subdtype, dt.metadata)
    return out


_BASELINE = _state()


def state_changes() -> list[str]:
    """What differs from the state at import, by name."""
    now = _state()
    return [k for k in sorted(set(now) | set(_BASELINE)) if now.get(k) != _BASELINE.get(k)]
