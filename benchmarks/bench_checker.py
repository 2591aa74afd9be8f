"""The consistency checker on the public Porcupine/Knossos corpus: time per file and in total.

Theory of operation
-------------------
For each history listed in the corpus's VERDICTS.tsv (102 etcd logs, 6 kv EDN histories) we
time, separately, *parsing* (reading the file into ops), the *linearizability* check (the WGL
search over every key, with the default budgets and scheduling: the figure comparable with
Porcupine's ``CheckOperations``; wall clock, and this process's CPU time, which a loaded
machine disturbs less), and the *analyses* (availability, lost writes, stale reads, latency).
Each file is timed ``--repeat`` times and the best run kept (the machine is shared; the
minimum is the least noisy estimate).  Every verdict is compared with the corpus's: a wrong
verdict is reported and makes the exit status 1.  Not a test: it prints numbers.

Usage (from the repository root)::

    python benchmarks/bench_checker.py [--corpus DIR] [--repeat 3] [--per-file]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kvstore.checker import analysis
from kvstore.checker.core import check_keys
from kvstore.checker.history import load
from kvstore.checker.models import make_model

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "porcupine"


def _verdict(results: dict[object, object]) -> str:
    verdicts = {getattr(kr, "verdict", "") for kr in results.values()}
    if "invalid" in verdicts:
        return "not-linearizable"
    return "unknown" if "unknown" in verdicts else "linearizable"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-file", action="store_true", help="print every file, not only the slow ones")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    verdicts_path = args.corpus / "VERDICTS.tsv"
    if not verdicts_path.is_file():
        print(f"no corpus at {args.corpus}", file=sys.stderr)
        return 2
    rows = [line.split("\t") for line in verdicts_path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    totals: dict[str, list[float]] = {"jepsen": [0.0] * 4, "kv": [0.0] * 4}
    wrong = 0
    print(f"{'file':22} {'ops':>5} {'parse ms':>9} {'check ms':>9} {'check cpu ms':>12} {'analyses ms':>11}  verdict")
    for name, expected in rows:
        path = args.corpus / "test_data" / name
        model = make_model("kv" if name.startswith("kv/") else "etcd")
        best = [float("inf")] * 4  # parse, check (wall), check (cpu), analyses
        got = ""
        n_ops = 0
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            hist = load(path)
            t1 = time.perf_counter()
            c1 = time.process_time()
            results, _stats = check_keys(hist.by_key(), model, workers=args.workers)
            c2 = time.process_time()
            t2 = time.perf_counter()
            analysis.analyse(hist, model.initial)
            t3 = time.perf_counter()
            run = [t1 - t0, t2 - t1, c2 - c1, t3 - t2]
            best = [min(b, r) for b, r in zip(best, run, strict=True)]
            got = _verdict(dict(results))
            n_ops = len(hist.ops)
        group = "kv" if name.startswith("kv/") else "jepsen"
        totals[group] = [a + b for a, b in zip(totals[group], best, strict=True)]
        flag = "" if got == expected else f"  WRONG (expected {expected})"
        wrong += bool(flag)
        if args.per_file or flag or best[1] > 0.05 or group == "kv":
            print(f"{name:22} {n_ops:5d} {best[0] * 1e3:9.1f} {best[1] * 1e3:9.1f} {best[2] * 1e3:12.1f} "
                  f"{best[3] * 1e3:11.1f}  {got}{flag}")
    print()
    for group, label in (("jepsen", "102 etcd histories"), ("kv", "6 kv histories")):
        p, c, cpu, a = totals[group]
        print(f"{label:20} parse {p:6.3f} s   check {c:6.3f} s (cpu {cpu:6.3f} s)   analyses {a:6.3f} s   "
              f"total {p + c + a:6.3f} s")
    all_check = totals["jepsen"][1] + totals["kv"][1]
    print(f"{'all 108':20} check {all_check:6.3f} s   verdicts wrong: {wrong}   "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
