"""The benchmark suite: streampickle side by side with its peers and the raw-socket limit.

    python benchmarks/run.py                       # every workload, TCP and Unix, 5 rounds
    python benchmarks/run.py --workloads big-array --transports unix --rounds 7 --scale 0.5
    python benchmarks/run.py --quick               # the smoke configuration the tests run

Each measurement is two fresh OS processes (benchmarks/peers.py): a receiver and a sender,
which move the workload over their one connection up to 5 times (until 1 s of transfers), each
transfer timed by the receiver from a start barrier until every object is reconstructed (if the
first takes under 20 ms, it and the next ones up to ten are untimed: they warm the code up).
Contenders are interleaved (A B C A B C ...) round by round so that machine noise hits them
alike; a contender's figure is the median over all its transfers, and every figure is
reported as a ratio to limit-socket measured in the same run. Received data is
verified outside the timed region. After the table come the targets, each checked
against the rows of the same run (``targets``). Contenders whose package is missing (dask-comm needs
`distributed`, zmq-zerocopy needs `pyzmq`) are skipped with a message, and so are the
same-host rows (``SHARED``: shared memory, Unix sockets only) where the platform has no memfd.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peers  # noqa: E402
import workloads  # noqa: E402

WORKLOADS = ["big-array", "many-arrays", "small-msgs", "object-graph"]
TRANSPORTS = ["tcp", "unix"]
NEEDS = {"dask-comm": "distributed", "zmq-zerocopy": "zmq", "streampickle-uvloop": "uvloop",
         "streampickle-uvloop-shm-packed": "uvloop",
         "streampickle-asyncio-blake3": "blake3", "streampickle-asyncio-poly1305": "cryptography"}
TCP_ONLY = {"dask-comm"}
#: The same-host contenders: shared memory over Unix sockets (see peers.run_streampickle).
SHARED = ["streampickle-asyncio-shm", "streampickle-asyncio-shm-packed", "streampickle-asyncio-shm-read",
          "streampickle-asyncio-shm-ordinary", "streampickle-asyncio-shm-pool",
          "streampickle-uvloop-shm-packed", "streampickle-trio-shm-packed",
          "streampickle-sync-shm", "streampickle-sync-shm-packed", "streampickle-sync-shm-read"]
UNIX_ONLY = set(SHARED)
#: ``--baseline DIR``: a contender named ``NAME@baseline`` runs NAME with streampickle imported
#: from the checkout in DIR (built in place), interleaved with the others: before and after a
#: change, measured in one run on one machine state.
BASELINE = "@baseline"
BASELINE_DIRS: list[str] = []


def available(contenders: list[str]) -> list[str]:
    out = []
    for name in contenders:
        module = NEEDS.get(name)
        if module and importlib.util.find_spec(module) is None:
            print(f"skipping {name}: the {module!r} package is not installed "
                  f"(pip install -e '.[bench]')", file=sys.stderr)
            continue
        if name in SHARED and not shared_memory_available():
            print(f"skipping {name}: this platform has no sealable shared-memory files (memfd)", file=sys.stderr)
            continue
        out.append(name)
    return out


def shared_memory_available() -> bool:
    from streampickle import _shm

    return _shm.AVAILABLE


def measure(contender: str, transport: str, workload: str, scale: float, timeout: float) -> dict[str, Any]:
    """One measurement: a fresh receiver and sender process; the seconds of each transfer."""
    peer = [sys.executable, os.path.join(HERE, "peers.py")]
    contender, marked, _ = contender.partition(BASELINE)  # "NAME@baseline": the other checkout's
    library = BASELINE_DIRS[0] if marked else os.path.dirname(HERE)
    args = [contender, transport, workload, str(scale)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([library, os.environ.get("PYTHONPATH", "")]))
    receiver = subprocess.Popen([*peer, "recv", *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert receiver.stdout is not None
        address = json.loads(receiver.stdout.readline())["address"]
        sender = subprocess.run([*peer, "send", *args, address], capture_output=True, text=True,
                                timeout=timeout, env=env)
        if sender.returncode != 0:
            raise RuntimeError(f"{contender} sender failed:\n{sender.stderr[-2000:]}")
        line = receiver.stdout.readline()
        if receiver.wait(timeout=timeout) != 0 or not line:
            raise RuntimeError(f"{contender} receiver failed (its traceback is above)")
        result = json.loads(line)
        if not result.get("verified"):
            raise RuntimeError(f"{contender} receiver failed verification")
    finally:
        receiver.kill()
    return {"seconds": result["seconds"], "recv_rss_mib": result["rss_mib"],
            "send_rss_mib": json.loads(sender.stdout.splitlines()[-1])["rss_mib"],
            "recv_pss_mib": result.get("recv_pss_mib"), "send_pss_mib": result.get("send_pss_mib")}


def transfers(measurements: list[dict[str, Any]]) -> list[float]:
    """The seconds of every transfer of a contender's measurements, in order."""
    return [t for m in measurements for t in m["seconds"]]


def run(workload_names: list[str], transports: list[str], contenders: list[str], rounds: int,
        scale: float, timeout: float) -> list[dict[str, Any]]:
    rows = []
    for workload in workload_names:
        payload = workloads.payload_bytes(workload, scale)
        count = len(workloads.build(workload, scale))
        for transport in transports:
            names = [c for c in contenders if not (transport != "tcp" and c in TCP_ONLY)
                     and not (transport != "unix" and c in UNIX_ONLY)]
            samples: dict[str, list[dict[str, Any]]] = {c: [] for c in names}
            for r in range(rounds):
                for contender in names:  # interleaved: A B C A B C ...
                    samples[contender].append(measure(contender, transport, workload, scale, timeout))
                print(f"  {workload}/{transport}: round {r + 1}/{rounds} done", file=sys.stderr)
            limit = statistics.median(transfers(samples["limit-socket"]))
            p5 = statistics.median(transfers(samples["pickle5-oob-sync"])) if "pickle5-oob-sync" in samples else None
            for contender in names:
                secs = transfers(samples[contender])
                med = statistics.median(secs)
                rows.append({
                    "workload": workload, "transport": transport, "contender": contender,
                    "median_s": med, "min_s": min(secs), "max_s": max(secs),
                    "samples_s": secs,  # every transfer, round by round, for re-analysis
                    "transfers": [len(s["seconds"]) for s in samples[contender]],  # per round
                    "gb_per_s": payload / med / 1e9, "msgs_per_s": count / med,
                    "vs_limit": limit / med,
                    "vs_p5": p5 / med if p5 else None,
                    "send_rss_mib": max(s["send_rss_mib"] for s in samples[contender]),
                    "recv_rss_mib": max(s["recv_rss_mib"] for s in samples[contender]),
                    **pss(samples[contender]),
                    "payload_bytes": payload, "messages": count, "rounds": rounds,
                })
    return rows


def pss(measurements: list[dict[str, Any]]) -> dict[str, float]:
    """The PSS changes of the measurement whose transfer added the most physical memory (the
    sum of both ends' changes); none if the receiver could not read them (TCP)."""
    known = [m for m in measurements if m.get("recv_pss_mib") is not None and m.get("send_pss_mib") is not None]
    if not known:
        return {}
    worst = max(known, key=lambda m: m["recv_pss_mib"] + m["send_pss_mib"])
    return {"recv_pss_mib": worst["recv_pss_mib"], "send_pss_mib": worst["send_pss_mib"]}


def _pss_cells(r: dict[str, Any]) -> str:
    if r.get("recv_pss_mib") is None:
        return "- | -"
    return f"{r['recv_pss_mib']:+.0f} / {r['send_pss_mib']:+.0f} | {r['recv_pss_mib'] + r['send_pss_mib']:+.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown. Speed ratios: >1 is faster than the reference, measured in the same run;
    ``transfers`` is how many timed transfers the median is over (rounds x repeats). PSS
    (Unix sockets only): the change of each end's PSS over the transfer that added the most,
    receiver / sender, and their sum: the physical memory the transfer added."""
    lines = ["| workload | transport | contender | transfers | median s (min-max) | rate | x limit-socket "
             "| x pickle5-oob-sync | sender +RSS MiB | receiver +RSS MiB | PSS MiB recv / send | PSS MiB both |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['msgs_per_s']:,.0f} msg/s" if r["messages"] > 1 else f"{r['gb_per_s']:.2f} GB/s"
        vs_p5 = f"{r['vs_p5']:.2f}" if r.get("vs_p5") else "-"
        lines.append(
            f"| {r['workload']} | {r['transport']} | {r['contender']} | {len(r['samples_s'])} | {r['median_s']:.4f} "
            f"({r['min_s']:.4f}-{r['max_s']:.4f}) | {rate} | {r['vs_limit']:.2f} | {vs_p5} | "
            f"{r['send_rss_mib']:.0f} | {r['recv_rss_mib']:.0f} | {_pss_cells(r)} |"
        )
    return "\n".join(lines)


# The streampickle contenders the targets apply to (its own sockets; default options).
TARGETED = ["streampickle-asyncio", "streampickle-uvloop", "streampickle-trio"]


def targets(rows: list[dict[str, Any]]) -> str:
    """Issue 4's targets, checked against the rows of one run: markdown, one line per check.

    Ratios compare medians from the same run. A check whose reference contender is missing
    from the run (dask-comm without ``distributed``, say) is left out, not passed.
    """
    by = {(r["workload"], r["transport"], r["contender"]): r for r in rows}
    lines = ["| target | transport | contender | measured | goal | held |", "|---|---|---|---|---|---|"]

    def check(what: str, transport: str, contender: str, value: float, goal: str, held: bool) -> None:
        lines.append(f"| {what} | {transport} | {contender} | {value:.3f} | {goal} | {'yes' if held else '**no**'} |")

    for transport in TRANSPORTS:
        for contender in TARGETED:
            for workload in ("big-array", "many-arrays"):
                r = by.get((workload, transport, contender))
                if r is None:
                    continue
                floor = 1.0 if transport == "tcp" else 0.9
                check(f"{workload}: speed / limit-socket", transport, contender, r["vs_limit"], f">= {floor}",
                      r["vs_limit"] >= floor)
                dask = by.get((workload, transport, "dask-comm"))
                if dask is not None:
                    ratio = r["median_s"] / dask["median_s"]
                    check(f"{workload}: time / dask-comm", transport, contender, ratio, "<= 1.0", ratio <= 1.0)
                check(f"{workload}: sender peak RSS rise, MiB", transport, contender, r["send_rss_mib"], "<= 32",
                      r["send_rss_mib"] <= 32)
                extra = r["recv_rss_mib"] - r["payload_bytes"] / (1 << 20)
                check(f"{workload}: receiver peak RSS rise - payload, MiB", transport, contender, extra, "<= 32",
                      extra <= 32)
            r = by.get(("small-msgs", transport, contender))
            if r is not None:
                if r.get("vs_p5"):
                    check("small-msgs: msg/s / pickle5-oob-sync", transport, contender, r["vs_p5"], ">= 0.65",
                          r["vs_p5"] >= 0.65)
                naive = by.get(("small-msgs", transport, "anyio-naive"))
                if naive is not None:
                    ratio = naive["median_s"] / r["median_s"]
                    check("small-msgs: msg/s / anyio-naive", transport, contender, ratio, ">= 2.5", ratio >= 2.5)
            r = by.get(("object-graph", transport, contender))
            if r is not None and r.get("vs_p5"):
                ratio = 1 / r["vs_p5"]
                check("object-graph: time / pickle5-oob-sync", transport, contender, ratio, "<= 1.1", ratio <= 1.1)
        plain = by.get(("big-array", transport, "streampickle-asyncio"))
        for name, mac in (("streampickle-asyncio-key", "HMAC-SHA256"), ("streampickle-asyncio-blake3", "blake3"),
                          ("streampickle-asyncio-poly1305", "poly1305")):
            keyed = by.get(("big-array", transport, name))
            if keyed is not None and plain is not None:
                ratio = plain["median_s"] / keyed["median_s"]
                check(f"big-array with a key ({mac}): speed / unkeyed", transport, name, ratio, ">= 0.5",
                      ratio >= 0.5)
    shared_targets(by, check, lines)
    return "\n".join(lines)


def shared_targets(by: dict[tuple[str, str, str], dict[str, Any]], check: Callable[..., None],
                   lines: list[str]) -> None:
    """The same-host targets (shared memory over a Unix socket), added to ``targets``' lines.
    many-arrays' goal is for its arrays packed in one shared buffer (one descriptor and one
    mapping per message); one file per array and the recycled pool have no goal: their lines
    say what they reached. The hand-off goals are checked for each API measured (``ObjectStream``
    on asyncio, uvloop and trio, and the blocking ``sync`` adapter), each on its own line."""
    def goal_or_line(what: str, row: dict[str, Any] | None, goal: float | None) -> None:
        """A goal line for ``row``'s speed over the limit, or without a goal, the speed alone."""
        if row is None:
            return
        if goal is None:
            lines.append(f"| {what} | unix | {row['contender']} | {row['vs_limit']:.3f} | - | - |")
        else:
            check(what, "unix", row["contender"], row["vs_limit"], f">= {goal:g}", row["vs_limit"] >= goal)

    for workload in ("big-array", "many-arrays"):
        big = workload == "big-array"
        for api in ("asyncio", "uvloop", "trio", "sync"):
            goal_or_line(f"{workload}, shared: speed / limit-socket" + ("" if big else " (one file per array)"),
                         by.get((workload, "unix", f"streampickle-{api}-shm")), 100 if big else None)
            if not big:
                goal_or_line(f"{workload}, shared, packed in one buffer: speed / limit-socket",
                             by.get((workload, "unix", f"streampickle-{api}-shm-packed")), 50)
            goal_or_line(f"{workload}, shared, receiver reads it all: speed / limit-socket",
                         by.get((workload, "unix", f"streampickle-{api}-shm-read")), 3 if big else None)
        ordinary = by.get((workload, "unix", "streampickle-asyncio-shm-ordinary"))
        plain = by.get((workload, "unix", "streampickle-asyncio"))
        if ordinary is not None and plain is not None:
            ratio = plain["median_s"] / ordinary["median_s"]
            check(f"{workload}, ordinary arrays, opted in: speed / not opted in", "unix", ordinary["contender"],
                  ratio, ">= 1.0", ratio >= 1.0)
        pool = by.get((workload, "unix", "streampickle-asyncio-shm-pool"))
        if pool is not None:
            lines.append(f"| {workload}, ordinary arrays via a recycled shared buffer: speed / limit-socket | unix "
                         f"| {pool['contender']} | {pool['vs_limit']:.3f} | - | - |")
        for name in ("streampickle-asyncio-shm", "streampickle-asyncio-shm-packed", "streampickle-asyncio-shm-read",
                     "streampickle-asyncio-shm-pool", "streampickle-sync-shm", "streampickle-sync-shm-packed",
                     "streampickle-sync-shm-read"):
            r = by.get((workload, "unix", name))
            if r is not None and r.get("recv_pss_mib") is not None:
                added = r["recv_pss_mib"] + r["send_pss_mib"]
                check(f"{workload}, shared: physical memory added (PSS, both ends), MiB", "unix", name, added,
                      "<= 32", added <= 32)


# Workloads whose data is mostly in-band: limit-socket only moves their pre-pickled bytes, so
# the meaningful reference is hand-written pickle code.
IN_BAND = {"small-msgs", "object-graph"}


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["workload"], r["transport"]) for r in rows}, key=lambda g: (WORKLOADS.index(g[0]), g[1]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.2 * len(groups)), squeeze=False)
    for ax, (workload, transport) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in rows if r["workload"] == workload and r["transport"] == transport]
        in_band = workload in IN_BAND
        if in_band:
            sel = [r for r in sel if r["contender"] != "limit-socket"]
        ax.barh([r["contender"] for r in sel], [r["vs_p5"] if in_band else r["vs_limit"] for r in sel],
                color=["tab:orange" if r["contender"].startswith("streampickle") else "tab:gray" for r in sel])
        ax.axvline(1.0, color="black", linewidth=0.8)
        reference = "pickle5-oob-sync" if in_band else "raw-socket limit"
        ax.set_title(f"{workload} over {transport}: speed / {reference} (same run)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def against_baseline(rows: list[dict[str, Any]]) -> str:
    """Each ``NAME@baseline`` contender's median time over NAME's: above 1, this checkout is
    faster."""
    out = ["| workload | transport | contender | baseline time / this time |", "|---|---|---|---|"]
    mine = {(r["workload"], r["transport"], r["contender"]): r["median_s"] for r in rows}
    for r in rows:
        name, marked, _ = r["contender"].partition(BASELINE)
        if marked:
            this = mine.get((r["workload"], r["transport"], name))
            if this:
                out.append(f"| {r['workload']} | {r['transport']} | {name} | {r['median_s'] / this:.3f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--contenders", default=",".join(peers.CONTENDERS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every workload by this factor")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (the smoke test)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--from-json", help="re-render the table (and --plot) from saved rows")
    parser.add_argument("--baseline", help="another checkout: its streampickle runs beside this one")
    parser.add_argument("--baseline-contenders", default="streampickle-asyncio,streampickle-uvloop,streampickle-trio",
                        help="the contenders measured again with the --baseline checkout")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            rows = json.load(f)
        for workload, transport in {(r["workload"], r["transport"]) for r in rows}:
            group = [r for r in rows if (r["workload"], r["transport"]) == (workload, transport)]
            p5 = [r["median_s"] for r in group if r["contender"] == "pickle5-oob-sync"]
            for r in group:
                r.setdefault("vs_p5", p5[0] / r["median_s"] if p5 else None)
        print(table(rows))
        print()
        print(targets(rows))
        if args.plot:
            plot(rows, args.plot)
        return
    if args.quick:
        args.rounds, args.scale = 1, 0.001
    contenders = available(args.contenders.split(","))
    if "limit-socket" not in contenders:
        contenders.insert(0, "limit-socket")
    if args.baseline:
        BASELINE_DIRS.append(os.path.abspath(args.baseline))
        contenders += [c + BASELINE for c in args.baseline_contenders.split(",") if c in contenders]
    started = time.perf_counter()
    rows = run(args.workloads.split(","), args.transports.split(","), contenders, args.rounds, args.scale, args.timeout)
    print(table(rows))
    print()
    print(targets(rows))
    if args.baseline:
        print()
        print(against_baseline(rows))
    print(f"\n{args.rounds} rounds, scale {args.scale}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
