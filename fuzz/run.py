"""Run the fuzzers for a while and save what they find, minimized, to tests/corpus/.

    python -m fuzz.run --seconds 120 [--target loads|decoder|scan|all] [--engine grammar|atheris] [--jobs 1]

Theory of operation. This process supervises; it never runs peer bytes itself. It starts
``--jobs`` workers (this module with ``--worker``) that fuzz until the deadline: the grammar
engine generates cases in a loop, the atheris engine lets libFuzzer call back with inputs
(messages to run as they are, or choices for the grammar). Before a worker runs a target on an
input it writes the input, and the time it started, into a *slot*: a file mapped into both
processes. So when a worker dies (a crash) or sits on one input past ``--timeout`` (a hang),
the supervisor knows which input did it, records it, and starts the worker again for the
time left. The findings a worker's own oracle reports (``fuzz.targets``) it writes to the work
directory. At the end the supervisor keeps the smallest input of each kind of finding,
minimizes each in a child process (``fuzz.minimize``), saves it to the corpus, and prints one
summary line.

On a small shared machine: workers run niced, with one BLAS thread and an address-space limit;
"slow" is judged on CPU time and confirmed by re-running, so a busy neighbour doesn't make
findings; only hangs are judged on wall time, with a generous limit.

Nothing here imports streampickle at module level: an atheris worker must import it under
coverage instrumentation first.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import mmap
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
CORPUS = ROOT / "tests" / "corpus"
TARGET_NAMES = ("loads", "decoder", "scan")  # the order of the slot's counters
EXIT_RESTART = 3  # a worker asks to be started again (it changed state it can't trust)
_SAVED = "saved to "

# -- the slot ---------------------------------------------------------------------------------

_HEAD = struct.Struct("<QQIIQ8QQ")  # running, started (ns), target, cuts, size, counts, findings
_MAX_CUTS = 4096
_CUTS_AT = 256
_DATA_AT = _CUTS_AT + 4 * _MAX_CUTS
_MAX_DATA = 32 << 20


class Slot:
    """The input a worker is running and how many it ran, in a file both processes map."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _DATA_AT + _MAX_DATA:
                os.ftruncate(fd, _DATA_AT + _MAX_DATA)  # sparse: pages appear as inputs are written
            self._map = mmap.mmap(fd, _DATA_AT + _MAX_DATA)
        finally:
            os.close(fd)
        head = self.head()
        self.counts = list(head[5:13])
        self.findings = head[13]
        self._target = self._cuts = self._size = 0

    def head(self) -> tuple[int, ...]:
        return _HEAD.unpack_from(self._map, 0)

    def _write(self, running: int, started: int) -> None:
        _HEAD.pack_into(
            self._map,
            0,
            running,
            started,
            self._target,
            self._cuts,
            self._size,
            *self.counts,
            self.findings,
        )

    def begin(self, target: int, data: bytes, cuts: tuple[int, ...]) -> None:
        data, cuts = data[:_MAX_DATA], cuts[:_MAX_CUTS]
        self._map[_DATA_AT : _DATA_AT + len(data)] = data
        struct.pack_into(f"<{len(cuts)}I", self._map, _CUTS_AT, *cuts)
        self._target, self._cuts, self._size = target, len(cuts), len(data)
        self._write(1, time.monotonic_ns())

    def end(self) -> None:
        self.counts[self._target] += 1
        self._write(0, 0)

    def current(self) -> tuple[str, bytes, tuple[int, ...]] | None:
        """(target, data, cuts) of the input being run, or None between inputs."""
        running, _, target, ncuts, size = self.head()[:5]
        if not running:
            return None
        cuts = struct.unpack_from(f"<{ncuts}I", self._map, _CUTS_AT)
        return TARGET_NAMES[target], bytes(self._map[_DATA_AT : _DATA_AT + size]), cuts

    def totals(self) -> tuple[int, ...]:
        """Inputs run per target, as the worker last wrote them."""
        return self.head()[5:13]

    def clear(self) -> None:
        """Mark the slot idle (its worker is gone), keeping the worker's counts."""
        struct.pack_into("<Q", self._map, 0, 0)

    def running_for(self) -> float:
        running, started = self.head()[:2]
        return (time.monotonic_ns() - started) / 1e9 if running else 0.0


def _write_finding(
    directory: Path, cls: str, target: str, signature: str, detail: str, data: bytes, cuts: tuple[int, ...]
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cls}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    meta = {"cls": cls, "target": target, "signature": signature, "detail": detail, "cuts": list(cuts)}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


# -- workers ------------------------------------------------------------------------------------


def _limit(memory_mb: int) -> None:
    """What every process that runs peer bytes does first: lower priority, bounded memory."""
    try:
        os.nice(10)
    except OSError:
        pass
    if memory_mb:
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class _Executor:
    """Runs each selected target on a case under the oracle, through the slot."""

    def __init__(self, args: argparse.Namespace) -> None:
        from . import targets

        self.check = targets.check
        self.names = TARGET_NAMES if args.target == "all" else (args.target,)
        self.slack = args.slack
        self.slot = Slot(Path(args.work) / f"job-{args.worker}.slot")
        self.out = Path(args.work) / f"job-{args.worker}"
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self.runs = 0

    def __call__(self, case: Any, only: str | None = None) -> None:
        for name in (only,) if only else self.names:
            self.slot.begin(TARGET_NAMES.index(name), case.data, case.cuts)
            self.runs += 1
            found = self.check(name, case, memory="tracemalloc" if self.runs % 64 == 0 else "rss", slack=self.slack)
            self.slot.end()
            for finding in found:
                self.record(finding, case)
            if any(f.cls == "state" for f in found):
                os._exit(EXIT_RESTART)  # this process's state can't be trusted any more

    def record(self, finding: Any, case: Any) -> None:
        key = (finding.cls, finding.signature)
        self.seen[key] += 1
        if self.seen[key] > 2:  # a few inputs per kind are plenty: the supervisor keeps one
            return
        self.slot.findings += 1
        path = _write_finding(
            self.out,
            finding.cls,
            finding.target,
            finding.signature,
            finding.detail,
            case.data,
            case.cuts,
        )
        print(f"finding: {finding.signature}: {finding.detail[:300]} ({path.name})", file=sys.stderr, flush=True)


def _work_grammar(args: argparse.Namespace) -> None:
    from . import grammar

    execute = _Executor(args)
    rng = random.Random(args.seed)
    src = grammar.RandomSource(rng)
    now = time.monotonic()
    deadline = now + args.seconds
    next_big = now + args.big_every / 2 if args.big_every else float("inf")
    made = 0
    while now < deadline and (not args.runs or made < args.runs):
        if now >= next_big:
            # Big attacks take seconds each when they aren't refused, so they come on a
            # clock, not a rate, and go through one target: loads, unless another was chosen.
            next_big = now + args.big_every
            execute(grammar.generate_case(src, big=True), only=execute.names[0])
        else:
            execute(grammar.generate_case(src))
        made += 1
        now = time.monotonic()


def _work_atheris(args: argparse.Namespace) -> None:
    import importlib

    import atheris

    with atheris.instrument_imports(include=["streampickle"]):
        for name in ("streampickle", "streampickle._verify", "streampickle._allow"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    from . import grammar, wire

    execute = _Executor(args)

    def one_input(data: bytes) -> None:
        # A message runs as it is (libFuzzer mutates its bytes); anything else is the
        # grammar's choices (libFuzzer mutates the choices).
        if data[:4] == wire.MAGIC:
            case = grammar.Case(data, grammar.choose_cuts(grammar.source(zlib.crc32(data)), data))
        else:
            case = grammar.generate_case(atheris.FuzzedDataProvider(data))
        execute(case)

    corpus = Path(args.work) / f"job-{args.worker}" / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={max(1, int(args.seconds))}",
        f"-timeout={int(args.timeout) + 10}",  # the supervisor's watchdog fires first
        f"-rss_limit_mb={args.memory_limit_mb}",
        f"-artifact_prefix={corpus.parent}/",
        f"-seed={args.seed & 0x7FFFFFFF or 1}",
        "-max_len=65536",
        "-print_final_stats=1",
        str(corpus),
    ]
    if SEEDS.is_dir():
        argv.append(str(SEEDS))
    if args.runs:
        argv.append(f"-runs={args.runs}")
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def _work(args: argparse.Namespace) -> None:
    _limit(args.memory_limit_mb)
    if args.engine == "atheris":
        _work_atheris(args)
    else:
        _work_grammar(args)


# -- the supervisor -------------------------------------------------------------------------------


class _Job:
    def __init__(self, index: int, args: argparse.Namespace, work: Path, seed: int) -> None:
        self.index, self.args, self.work, self.seed = index, args, work, seed
        self.slot = Slot(work / f"job-{index}.slot")
        self.log = work / f"job-{index}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.failures = 0

    def start(self, seconds: float) -> None:
        a = self.args
        self.starts += 1
        cmd = [
            sys.executable, "-m", "fuzz.run", "--worker", str(self.index), "--work", str(self.work),
            "--seconds", f"{seconds:.1f}", "--seed", str(self.seed + 7919 * self.starts),
            "--engine", a.engine, "--target", a.target, "--timeout", str(a.timeout),
            "--memory-limit-mb", str(a.memory_limit_mb), "--slack", str(a.slack), "--big-every", str(a.big_every),
            "--runs", str(a.runs),
        ]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


def _crash_class(tail: str) -> str:
    if "out-of-memory" in tail or "MemoryError" in tail:
        return "memory"
    if "libFuzzer: timeout" in tail:
        return "slow"
    return "crash"


def _supervise(args: argparse.Namespace) -> int:
    jobs_wanted = max(1, min(args.jobs, os.cpu_count() or 1))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="streampickle-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    own = work / "supervisor"
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    started = time.monotonic()
    deadline = started + args.seconds
    jobs = [_Job(i, args, work, seed + 1_000_003 * i) for i in range(jobs_wanted)]
    for job in jobs:
        job.start(args.seconds)
    live = set(jobs)
    while live:
        time.sleep(0.2)
        now = time.monotonic()
        for job in list(live):
            assert job.proc is not None
            rc = job.proc.poll()
            current = job.slot.current()
            if rc is None:
                hung = job.slot.running_for() > args.timeout
                if not hung and now < deadline + 3 * args.timeout + 30:
                    continue
                job.proc.kill()
                job.proc.wait()
                rc = -9 if hung else 0
                if hung and current is not None:
                    target, data, cuts = current
                    _write_finding(
                        own,
                        "slow",
                        target,
                        "slow:hang",
                        f"no answer after {args.timeout} s (wall)",
                        data,
                        cuts,
                    )
                    print(f"finding: slow:hang: {target} ran over {args.timeout} s", file=sys.stderr, flush=True)
            elif rc not in (0, EXIT_RESTART) and current is not None:
                target, data, cuts = current
                tail = job.log_tail()
                cls = _crash_class(tail)
                _write_finding(
                    own,
                    cls,
                    target,
                    f"{cls}:exit {rc}",
                    f"worker exited with {rc}: {tail[-600:]}",
                    data,
                    cuts,
                )
                print(f"finding: {cls}: {target}: worker exited with {rc}", file=sys.stderr, flush=True)
            elif rc not in (0, EXIT_RESTART):
                job.failures += 1
                print(f"worker {job.index} failed (exit {rc}):\n{job.log_tail(2000)}", file=sys.stderr, flush=True)
            job.slot.clear()
            if rc != 0 and deadline - now > 2 and job.failures < 3:
                job.start(deadline - now)
            else:
                live.discard(job)
    elapsed = time.monotonic() - started
    counts = [sum(job.slot.totals()[i] for job in jobs) for i in range(len(TARGET_NAMES))]
    saved = _keep_findings(args, work)
    sys.stderr.flush()
    print(_summary(args, jobs_wanted, seed, elapsed, counts, saved), flush=True)
    if args.keep_work or args.work:
        print(f"work directory: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(where.startswith(_SAVED) for _, _, where in saved) else 0


def _keep_findings(args: argparse.Namespace, work: Path) -> list[tuple[str, str, str]]:
    """Minimize the smallest input of each kind of finding and save it: (signature, target,
    where it went or why it didn't)."""
    best: dict[str, Path] = {}
    for meta_path in sorted(work.glob("*/*.json"), key=lambda p: p.with_suffix(".bin").stat().st_size):
        meta = json.loads(meta_path.read_text())
        key = meta["signature"] if meta["cls"] not in ("slow", "memory", "crash") else f"{meta['cls']}:{meta['target']}"
        if key not in best and meta_path.name not in {p.name for p in best.values()}:  # one input, one finding
            best[key] = meta_path
    out = []
    for _key, meta_path in sorted(best.items()):
        meta = json.loads(meta_path.read_text())
        cmd = [
            sys.executable, "-m", "fuzz.run", "--minimize", str(meta_path), "--seconds", str(args.minimize_seconds),
            "--timeout", str(args.timeout), "--memory-limit-mb", str(args.memory_limit_mb), "--slack", str(args.slack),
            "--corpus", str(args.corpus),
        ]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=args.minimize_seconds + 3 * args.timeout + 60)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines else {"error": done.stderr[-500:]}
        except (subprocess.TimeoutExpired, ValueError) as exc:
            result = {"error": repr(exc)[:500]}
        if result.get("saved"):
            where = _SAVED + result["saved"]
        elif result.get("reproduced") is False:
            where = "not reproducible in a fresh process"
        else:
            where = f"not saved: {result.get('error')}"
        print(f"{meta['signature']} ({meta['target']}): {meta['detail'][:400]}\n  -> {where}", file=sys.stderr)
        out.append((meta["signature"], meta["target"], where))
    return out


def _summary(
    args: argparse.Namespace, jobs: int, seed: int, elapsed: float, counts: list[int], saved: list[tuple[str, str, str]]
) -> str:
    runs = ", ".join(
        f"{name} {n} inputs ({n / elapsed:.0f}/s)"
        for name, n in zip(TARGET_NAMES, counts, strict=True)
        if args.target in ("all", name)
    )
    kept = [f"{sig} ({target}) {where}" for sig, target, where in saved if where.startswith(_SAVED)]
    dropped = len(saved) - len(kept)
    found = f"findings: {len(kept)}" + (": " + "; ".join(kept) if kept else "")
    if dropped:
        found += f" ({dropped} more not reproducible outside the fuzzing process)"
    jobs_text = f"{jobs} job{'s' if jobs > 1 else ''}"
    return f"fuzz: {args.engine} engine, {elapsed:.0f} s, {jobs_text}, seed {seed}: {runs}; {found}"


def _minimize_one(args: argparse.Namespace) -> None:
    """Child process of the supervisor: minimize one raw finding and save it to the corpus."""
    _limit(args.memory_limit_mb)
    from . import minimize
    from .grammar import Case

    meta_path = Path(args.minimize)
    meta = json.loads(meta_path.read_text())
    case = Case(meta_path.with_suffix(".bin").read_bytes(), tuple(meta["cuts"]))
    if args.seconds <= 0:
        smaller: Case | None = case
    else:
        smaller = minimize.minimize(
            meta["target"], case, meta["cls"], meta["signature"],
            seconds=args.seconds, timeout=args.timeout, slack=args.slack,
        )
    if smaller is None:
        print(json.dumps({"reproduced": False}))
        return
    if meta["target"] != "decoder":
        smaller = Case(smaller.data)
    path = minimize.save(smaller, meta["cls"], Path(args.corpus))
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path.resolve()
    print(json.dumps({"reproduced": True, "saved": str(shown), "size": len(smaller.data)}))


def _make_seeds() -> None:
    from . import grammar

    SEEDS.mkdir(exist_ok=True)
    for old in SEEDS.glob("seed-*.bin"):
        old.unlink()
    for data in grammar.seeds():
        if len(data) <= 8192:
            (SEEDS / f"seed-{hashlib.sha1(data).hexdigest()[:12]}.bin").write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60, help="how long to fuzz (default 60)")
    p.add_argument("--target", choices=("all", *TARGET_NAMES), default="all")
    p.add_argument("--engine", choices=("grammar", "atheris"), default="grammar")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (at most the CPU count)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--runs", type=int, default=0, help="stop each worker after this many inputs (0: no limit)")
    p.add_argument("--timeout", type=float, default=30, help="wall seconds one input may take before it is a hang")
    p.add_argument("--memory-limit-mb", type=int, default=4096, help="address space of each worker")
    p.add_argument("--slack", type=float, default=5.0, help="how far over the CPU budget is slow")
    p.add_argument("--big-every", type=float, default=30, help="seconds between big attacks (grammar engine; 0: none)")
    p.add_argument("--minimize-seconds", type=float, default=60, help="per finding; 0 saves it as found")
    p.add_argument("--corpus", default=str(CORPUS), help="where findings go (default tests/corpus)")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work directory")
    p.add_argument("--make-seeds", action="store_true", help="write fuzz/seeds/ and exit")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--minimize", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _work(args)
        return 0
    if args.minimize is not None:
        _minimize_one(args)
        return 0
    if args.make_seeds:
        _make_seeds()
        return 0
    return _supervise(args)


if __name__ == "__main__":
    sys.exit(main())
