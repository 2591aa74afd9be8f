"""``kvstore check HISTORY``: the verdict and the analyses on a terminal (or as JSON).

Theory of operation
-------------------
A thin shell over ``check()``: parse arguments, run, print, exit with Maelstrom's codes --
0 linearizable, 1 not linearizable, 2 unknown (a budget ran out) -- and 3 when the input
cannot be checked at all (unreadable file, malformed history, an op the model lacks), with a
one-line message instead of a traceback.  Tables use ``rich``; ``--json`` prints the result's
JSON alone, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvstore.checker.core import Result, check
from kvstore.checker.history import FORMATS, HistoryFormatError, _show
from kvstore.checker.models import MODEL_NAMES, UNSET, ModelError
from kvstore.checker.wgl import DEFAULT_MAX_STATES

EXIT_INPUT_ERROR = 3
SHOWN_INVALID_KEYS = 2  # in detail on the terminal; the report and --json have them all


def parse_initial(text: str) -> Any:
    """``--initial``: JSON (``0``, ``"x"``, ``null``), EDN's ``nil``, or else a bare string."""
    if text == "nil":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser(prog: str = "kvstore check") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check a history for linearizability (per key) and report availability, lost writes, "
        "stale reads, sibling reads and latency. Exit 0 valid, 1 invalid, 2 unknown, 3 bad input.",
    )
    parser.add_argument("history", help="history file: JSON Lines, Jepsen EDN or Jepsen log lines")
    parser.add_argument("--model", default="auto", choices=["auto", *MODEL_NAMES],
                        help="sequential model (default: guessed from the ops and format)")
    parser.add_argument("--initial", type=parse_initial, default=UNSET, metavar="V",
                        help="initial value of every key, as JSON or nil (default: nil; \"\" for kv)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="history format")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--report", metavar="DIR", help="write DIR/report.html (timelines) and DIR/result.json")
    parser.add_argument("--png", action="store_true", help="with --report: also counterexample PNGs")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="search time budget per key in seconds (default: none)")
    parser.add_argument("--max-states", type=int, default=DEFAULT_MAX_STATES, metavar="N",
                        help=f"search memory budget per key, in cached states (default {DEFAULT_MAX_STATES})")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes for hard keys (default: CPUs; 1 = none)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="decide every key even after one is found invalid")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = check(
            args.history,
            model=args.model,
            initial=args.initial,
            time_limit_s=args.time_limit,
            format=None if args.format == "auto" else args.format,
            workers=args.workers,
            max_states=args.max_states,
            exhaustive=args.exhaustive,
        )
    except (HistoryFormatError, ModelError) as exc:
        print(f"kvstore check: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except OSError as exc:
        print(f"kvstore check: cannot read {args.history}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    report_path = None
    if args.report:
        from kvstore.checker.report import write_report

        try:
            report_path = write_report(result, args.report, png=args.png)
        except OSError as exc:
            print(f"kvstore check: cannot write the report: {exc}", file=sys.stderr)
    if args.json:
        print(result.to_json(indent=2))
    else:
        print_result(result, report_path)
    return result.exit_code


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def print_result(result: Result, report_path: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    hist = result.history
    style = {"true": "bold green", "false": "bold red", "unknown": "bold yellow"}[result.valid.value]
    words = {"true": "LINEARIZABLE", "false": "NOT LINEARIZABLE", "unknown": "UNKNOWN"}[result.valid.value]
    console.print(f"[{style}]{words}[/]  {hist.source or ''}")
    console.print(
        f"model {result.model} (initial {_show(result.initial)}), format {hist.format}, {len(hist.ops)} ops, "
        f"{len(result.keys)} key(s), {result.seconds:.2f} s"
    )
    invalid, unknown = result.invalid_keys, result.unknown_keys
    if len(result.keys) > 1 or unknown:
        console.print(f"keys: {len(result.keys) - len(invalid) - len(unknown)} valid, {len(invalid)} invalid, "
                      f"{len(unknown)} unknown")
    by_reason: dict[str, list[str]] = {}
    for kr in unknown:
        by_reason.setdefault(kr.reason or "budget", []).append(_show(kr.key))
    for reason, names in by_reason.items():
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        hint = " (--exhaustive to keep going)" if "another key" in reason else ""
        console.print(f"  [yellow]unknown[/] {len(names)} key(s), {reason}{hint}: {shown}")
    for kr in invalid[:SHOWN_INVALID_KEYS]:
        ce = kr.counterexample
        console.print(f"\n[bold red]key {_show(kr.key)}[/]: {result.explain(kr)}.")
        if ce is None:
            continue
        table = Table(title="cannot be linearized", title_justify="left")
        for col in ("op", "process", "operation", "line"):
            table.add_column(col)
        for op_id in ce.pending[:20]:
            op = result.op(op_id)
            mark = " [red](blocked)[/]" if op_id == ce.stuck else ""
            table.add_row(f"#{op.id}", str(op.process), op.describe() + mark, str(op.line))
        console.print(table)
        tail = list(zip(ce.prefix, ce.states, strict=True))[-8:]
        if tail:
            prefix = Table(title=f"longest linearizable prefix: {len(ce.prefix)} ops (last {len(tail)})",
                           title_justify="left")
            for col in ("#", "op", "operation", "value after"):
                prefix.add_column(col)
            for i, (op_id, state) in enumerate(tail):
                prefix.add_row(str(len(ce.prefix) - len(tail) + i + 1), f"#{op_id}",
                               result.op(op_id).describe(), _show(state))
            console.print(prefix)
    if len(invalid) > SHOWN_INVALID_KEYS:
        others = ", ".join(_show(kr.key) for kr in invalid[SHOWN_INVALID_KEYS:SHOWN_INVALID_KEYS + 20])
        more = ", ..." if len(invalid) > SHOWN_INVALID_KEYS + 20 else ""
        console.print(f"\n... and {len(invalid) - SHOWN_INVALID_KEYS} more invalid keys ({others}{more}); "
                      "--report or --json for all")
    a = result.analyses
    av = a.availability
    table = Table(title="availability", title_justify="left")
    for col in ("scope", "ok", "fail", "info", "available"):
        table.add_column(col, justify="right" if col != "scope" else "left")
    table.add_row("overall", str(av.overall.ok), str(av.overall.fail), str(av.overall.info),
                  _pct(av.overall.availability))
    if len(av.by_phase) > 1:
        for name, c in av.by_phase.items():
            table.add_row(f"phase {name}", str(c.ok), str(c.fail), str(c.info), _pct(c.availability))
    for name, c in av.by_side.items():
        table.add_row(f"{name} side", str(c.ok), str(c.fail), str(c.info), _pct(c.availability))
    console.print(table)
    console.print(
        f"lost writes: {len(a.lost_writes)}   stale reads: {len(a.stale_reads)}   "
        f"reads with siblings: {len(a.sibling_reads)}"
    )
    for lw in a.lost_writes[:5]:
        console.print(f"  lost: #{lw.op} {result.op(lw.op).describe()} (key {_show(lw.key)}), "
                      f"not seen by #{lw.first_read} {result.op(lw.first_read).describe()} nor {lw.later_reads - 1} later reads")
    for st in a.stale_reads[:5]:
        console.print(f"  stale: #{st.op} {result.op(st.op).describe()} (key {_show(st.key)}), "
                      f"already overwritten by #{st.overwritten_by} {result.op(st.overwritten_by).describe()}")
    if a.latency:
        lat_table = Table(title="latency of ok ops (ms)", title_justify="left")
        for col in ("op", "phase", "n", "p50", "p99", "max"):
            lat_table.add_column(col, justify="left" if col in ("op", "phase") else "right")
        for f, per in a.latency.items():
            for phase, lat in per.items():
                lat_table.add_row(f, phase, str(lat.count), f"{lat.p50_ms:.2f}", f"{lat.p99_ms:.2f}",
                                  f"{lat.max_ms:.2f}")
        console.print(lat_table)
    if report_path is not None:
        console.print(f"report: {report_path}")


if __name__ == "__main__":
    sys.exit(main())
