"""Judging explorer runs and presenting them: the terminal table and the HTML report.

Theory of operation
-------------------
``judge`` turns one run's history into the figures of one table cell, using only
the checker (``kvstore.checker.check``) and the history itself: availability
during the fault on each side, the linearizability verdict, stale reads, lost
acknowledged writes, reads with siblings, latency.  ``findings_for`` derives the
plain-language finding from those figures by fixed thresholds, so the sentence
can never disagree with the numbers beside it.

Sides: for a partition the checker's per-side availability is used (majority =
the larger group).  For faults without sides (kill, pause, clock skew) the
"minority" column holds the clients of the affected nodes (the killed, paused
or skewed ones) and the "majority" column everyone else, so the same two
columns answer "did the healthy part keep working, and what did the faulty part
see?".

The report is one self-contained HTML file: plots are PNGs embedded as base64,
counterexample timelines are inline SVG; it opens offline.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstore.checker import Result, check
from kvstore.checker.analysis import Counts, fault_windows, partition_sides, percentile
from kvstore.protocol.ring import Ring

CHECK_TIME_LIMIT_S = 30.0


def _affected_nodes(result: Result) -> list[str]:
    nodes: set[str] = set()
    for window in fault_windows(result.history):
        if window.fault == "partition":
            continue
        value = window.value
        if isinstance(value, list):
            nodes.update(v for v in value if isinstance(v, str))
        elif isinstance(value, dict):
            nodes.update(k for k in value if isinstance(k, str) and k.startswith("n"))
    return sorted(nodes)


class SideOps(Counts):
    """Counts that also keep the ops (to say what kind of ops succeeded on a side)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def add(self, op: Any) -> None:
        super().add(op)
        self.ops.append(op)


def _during_fault(
    result: Result, ring: Ring | None = None, replicas: int = 3
) -> tuple[SideOps, SideOps, str, list[str]]:
    """(majority-side counts, minority-side counts, how sides were defined, minority nodes).

    With a ring, partition sides are judged *per key*: an op is on the majority side when its
    node's group holds a majority of that key's replicas.  That is the side a quorum system can
    serve; a 2-node group holding 2 of a key's 3 replicas is that key's majority.
    """
    windows = fault_windows(result.history)
    partitions = [w for w in windows if w.fault == "partition"]
    majority, minority = SideOps(), SideOps()
    if partitions:
        minority_nodes: set[str] = set()
        for window in partitions:
            sides = partition_sides(window.value) or {}
            minority_nodes.update(n for n, info in sides.items() if info.side != "majority")
            for op in result.history.ops:
                if not (window.start <= op.invoke < window.end) or op.node is None:
                    continue
                side = sides.get(op.node)
                if ring is not None and side is not None:
                    owners = ring.preference_list(str(op.key), replicas)
                    reachable = sum(1 for o in owners if o in side.group)
                    (majority if 2 * reachable > replicas else minority).add(op)
                else:
                    (majority if side is not None and side.side == "majority" else minority).add(op)
        rule = "per-key replica majority" if ring is not None else "partition sides"
        return majority, minority, rule, sorted(minority_nodes)
    affected = _affected_nodes(result)
    for window in windows:
        for op in result.history.ops:
            if window.start <= op.invoke < window.end:
                (minority if op.node in affected else majority).add(op)
    return majority, minority, "clients of the affected node(s)" if affected else "all clients", affected


def judge(
    events: list[dict[str, Any]],
    mode: str,
    out_dir: Path | None = None,
    members: list[str] | None = None,
    vnodes: int = 256,
    replicas: int = 3,
) -> dict[str, Any]:
    model = "cas-register" if mode == "linearizable" else "register"
    result = check(events, model=model, time_limit_s=CHECK_TIME_LIMIT_S, workers=1)
    ring = Ring(members, vnodes) if members else None
    majority, minority, sides_rule, minority_nodes = _during_fault(result, ring, replicas)
    a = result.analyses
    ok_latencies = sorted(
        (op.complete_time - op.invoke_time) / 1e6
        for op in result.history.ops
        if op.type == "ok" and op.invoke_time is not None and op.complete_time is not None
    )
    invalid = [str(kr.key) for kr in result.keys if kr.verdict == "invalid"]
    unknown = [str(kr.key) for kr in result.keys if kr.verdict == "unknown"]
    writes_ok_minority = sum(1 for op in minority.ops if op.type == "ok" and op.f in ("write", "cas", "delete"))
    summary: dict[str, Any] = {
        "model": model,
        "linearizable": str(result.valid),
        "keys": len(result.keys),
        "keys_invalid": invalid,
        "keys_unknown": unknown,
        "availability_overall": a.availability.overall.availability,
        "availability_fault_majority": majority.availability,
        "availability_fault_minority": minority.availability,
        "fault_ops_majority": majority.to_dict(),
        "fault_ops_minority": minority.to_dict(),
        "sides_rule": sides_rule,
        "minority_nodes": minority_nodes,
        "writes_ok_on_minority_during_fault": writes_ok_minority,
        "stale_reads": len(a.stale_reads),
        "lost_writes": len(a.lost_writes),
        "lost_write_values": [lw.value for lw in a.lost_writes][:20],
        "sibling_reads": len(a.sibling_reads),
        "ops": a.availability.overall.to_dict(),
        "latency_p50_ms": percentile(ok_latencies, 50) if ok_latencies else None,
        "latency_p99_ms": percentile(ok_latencies, 99) if ok_latencies else None,
        "check_seconds": round(result.seconds, 2),
    }
    # For the plots: which ops (by invoke index) were on the minority side, lost, or stale.
    summary["plot_marks"] = {
        "minority": [op.invoke for op in minority.ops],
        "lost": [result.op(lw.op).invoke for lw in a.lost_writes],
        "stale": [result.op(sr.op).invoke for sr in a.stale_reads],
    }
    summary["finding"] = findings_for(summary)
    if members:  # for the report's pictures: the topology with the fault, a key's placement
        summary["ring"] = {"members": list(members), "vnodes": vnodes, "replicas": replicas}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "check.json").write_text(result.to_json(indent=1))
        summary["timeline_svg"] = _counterexample_svg(result)
    return summary


def _counterexample_svg(result: Result) -> str | None:
    from kvstore.checker import report

    bad = result.invalid_keys
    if not bad:
        return None
    kr = bad[0]
    ops, first = report.focus_ops(result, kr)
    lay = report.layout(result, ops, f"key {kr.key}: not linearizable", kr, first)
    return report.svg(lay, max_width=1100)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def findings_for(s: dict[str, Any]) -> str:
    """One plain-language line, derived only from the figures in ``s``."""
    parts: list[str] = []
    minority, majority = s["availability_fault_minority"], s["availability_fault_majority"]
    partitioned = s["sides_rule"] in ("partition sides", "per-key replica majority")
    side = "minority side" if partitioned else "faulty node's clients"
    if minority is not None:
        if minority >= 0.9:
            parts.append(f"{side} stayed available ({_pct(minority)})")
        elif minority <= 0.1:
            parts.append(f"{side} refused requests ({_pct(minority)} ok)")
        else:
            parts.append(f"{side} partly available ({_pct(minority)})")
        if s["writes_ok_on_minority_during_fault"] and minority > 0.1 and partitioned:
            parts[-1] += f", {s['writes_ok_on_minority_during_fault']} writes accepted there"
    if majority is not None and majority < 0.9:
        parts.append(f"majority side only {_pct(majority)} available")
    if s["linearizable"] == "false":
        parts.append(f"NOT linearizable ({len(s['keys_invalid'])}/{s['keys']} keys)")
    elif s["linearizable"] == "unknown":
        parts.append("linearizability unknown (checker budget ran out)")
    else:
        parts.append("linearizable")
    if s["lost_writes"]:
        parts.append(f"{s['lost_writes']} acknowledged writes lost")
    if s["stale_reads"]:
        parts.append(f"{s['stale_reads']} stale reads")
    if s["sibling_reads"]:
        parts.append(f"{s['sibling_reads']} reads returned siblings")
    return "; ".join(parts)


# --- terminal table ---------------------------------------------------------------------------


def _lin_cell(s: dict[str, Any]) -> str:
    if s.get("linearizable") == "true":
        return "[green]yes"
    if s.get("linearizable") == "false":
        return f"[red]no ({len(s['keys_invalid'])}/{s['keys']} keys)"
    return "[yellow]unknown"


def print_table(cells: Sequence[Any], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    simulated = ", simulated" if meta.get("simulated") else ""
    table = Table(title=f"kvstore CAP explorer — seed {meta['seed']}, {meta['duration_s']:.0f} s per run{simulated}",
                  show_lines=True)
    for col in ("mode", "nemesis", "avail. during fault\nmajority | minority", "linearizable", "stale\nreads",
                "lost\nwrites", "sibling\nreads", "p50 / p99\nms", "finding"):
        table.add_column(col, overflow="fold")
    for c in cells:
        s = c.summary
        if c.error:
            table.add_row(c.mode, c.scenario, "—", "—", "—", "—", "—", "—", f"[red]run failed: {c.error}")
            continue
        lat = (f"{s['latency_p50_ms']:.1f} / {s['latency_p99_ms']:.0f}"
               if s.get("latency_p50_ms") is not None else "—")
        table.add_row(
            c.mode, c.scenario,
            f"{_pct(s['availability_fault_majority'])} | {_pct(s['availability_fault_minority'])}",
            _lin_cell(s), str(s["stale_reads"]), str(s["lost_writes"]), str(s["sibling_reads"]), lat,
            s["finding"],
        )
    console = Console(width=max(140, Console().width))
    console.print(table)
    if meta.get("skipped"):
        console.print("skipped: " + ", ".join(meta["skipped"]))


# --- HTML report --------------------------------------------------------------------------------

GUIDE = """
<p>Each row is one real run: a workload of concurrent clients (each bound to one node) against a
5-node cluster with N=3, while a nemesis injects the fault for the middle 40% of the run. The
checker then judges the recorded history.</p>
<ul>
<li><b>avail. during fault</b>: the share of operations that succeeded while the fault was active.
For a partition the sides are judged per key: an operation is on the majority side when its
node's side holds a majority (2 of 3) of that key's replicas. For a kill or a clock skew:
everyone else, and the clients of the affected node.</li>
<li><b>linearizable</b>: whether every key's history can be explained by a single register that
changes atomically between each operation's start and end (Wing–Gong–Lowe search). "no" lists how
many keys failed; the timeline below the plots shows why.</li>
<li><b>stale reads</b>: reads that returned a value already overwritten by a write that had
completed before the read began. <b>lost writes</b>: acknowledged writes that no later read ever
saw, with no later overwrite to explain it. <b>sibling reads</b>: reads that returned several
concurrent values.</li>
<li>In the plots, each operation is a mark at its completion time and latency: green circles
succeeded, red crosses certainly failed, orange triangles have an unknown outcome (timeouts);
purple diamonds are acknowledged writes the checker found lost, teal squares stale reads. The
grey band is the fault window. The lower panel shows throughput and the share of successes over
time, for the minority side (or the affected node's clients) and everyone else.</li>
</ul>
<p>What to expect if the store and the checker are right: <i>linearizable</i> is never
non-linearizable and refuses requests on the minority side; <i>eventual</i> modes stay available on
both sides and pay with stale reads, siblings or (LWW with clock skew) lost writes; <i>quorum</i>
is unavailable where a key's replicas are cut off, and is still not linearizable in general.</p>
"""


SIMULATED_NOTE = (" on simulated clusters (real nodes on simulated time, network and disks: kvstore.sim; "
                  "each cell replays exactly with its kvstore sim command)")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cluster_pictures(s: dict[str, Any], events: list[dict[str, Any]]) -> tuple[str, str]:
    """The topology with the run's fault drawn on it and a key's placement during it (the key of
    the counterexample when there is one), as inline SVG; and the key's replicas, in words."""
    from kvstore.ui import pictures

    ring_info = s.get("ring")
    if not ring_info or not events:
        return "", ""
    ring = Ring(ring_info["members"], ring_info["vnodes"])
    keys = sorted({str(e["key"]) for e in events if e.get("process") != "nemesis" and "key" in e})
    key = s["keys_invalid"][0] if s.get("keys_invalid") else (keys[0] if keys else None)
    topology = pictures.fault_svg(events, ring.members)
    parts = [f"<figure>{topology}<figcaption>Who heard whom while the fault was in force.</figcaption></figure>"
             if topology else ""]
    note = ""
    if key is not None:
        replicas = ring.preference_list(key, ring_info["replicas"])
        note = ", replicas " + " ".join(replicas)
        parts.append(f"<figure>{pictures.placement_during_fault_svg(ring, key, ring_info['replicas'], events)}"
                     f"<figcaption>Where key {html.escape(key)} lives: its replicas are {' '.join(replicas)} "
                     "(numbered 1..N clockwise from its token).</figcaption></figure>")
    return "<div class=pics>" + "".join(parts) + "</div>", note


def cell_section(out_dir: Path, mode: str, scenario: str, s: dict[str, Any], meta: dict[str, Any]) -> str:
    """One cell's section of the report (its plots, pictures and how to reproduce it); writes its
    ``plot.png``.  Needs only the cell's directory, its summary and the matrix's seed, duration and
    command, so a worker process can render it right after the run (``kvstore explore --simulate``
    does, in parallel), and the report only assembles the sections."""
    from kvstore.explore.plots import run_figure
    from kvstore.harness.history import read_history

    anchor = f"{mode}--{scenario}"
    history_path = out_dir / "history.jsonl"
    run_json = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    events = read_history(history_path) if history_path.exists() else []
    first_final = run_json.get("final_reads_from_index")
    final_from = events[first_final]["time"] / 1e9 if isinstance(first_final, int) and first_final < len(events) else None
    marks = s.get("plot_marks", {})
    label = ("minority side (no majority of the key's replicas)" if s["sides_rule"] == "per-key replica majority"
             else f"clients of {','.join(s.get('minority_nodes') or [])}")
    png = run_figure(events, f"{mode} × {scenario}", minority=set(marks.get("minority", [])) or None,
                     subtitle=s["finding"], final_reads_from_s=final_from, minority_label=label,
                     lost=set(marks.get("lost", [])), stale=set(marks.get("stale", [])))
    (out_dir / "plot.png").write_bytes(png)
    timeline = s.get("timeline_svg")
    pictures, replicas_note = _cluster_pictures(s, events)
    repro = s.get("replay") or (f"python chaos/{scenario.replace('-', '_')}.py --mode {mode} "
                                f"--duration {meta['duration_s']:g} --seed {meta['seed']} --out runs/{anchor}")
    return (
        f"<section id='{anchor}'><h2>{mode} × {scenario}</h2><p class=finding>{html.escape(s['finding'])}</p>"
        + pictures
        + _img(png, f"latency and availability over time, {mode} under {scenario}")
        + (f"<h3>Why it is not linearizable (key {html.escape(s['keys_invalid'][0])}{replicas_note})</h3>"
           f"<div class=svg>{timeline}</div>" if timeline else "")
        + "<details><summary>configuration, seed and how to reproduce</summary>"
        + f"<p>Reproduce this cell alone: <code>{html.escape(repro)}</code><br>"
        + f"or the whole matrix: <code>{html.escape(meta['command'])}</code></p>"
        + f"<pre>{html.escape(json.dumps({k: run_json.get(k) for k in ('scenario', 'mode', 'seed', 'schedule', 'workload', 'cluster', 'versions')}, indent=1, default=str))}</pre>"
        + f"<p>History: <code>{html.escape(str(history_path))}</code>; checker output: "
        + f"<code>{html.escape(str(out_dir / 'check.json'))}</code></p></details></section>"
    )


def write_report(out: Path, cells: Sequence[Any], meta: dict[str, Any]) -> Path:
    """The matrix's ``index.html``: the table, the guide, and every cell's section (rendered here,
    or already by the worker that ran the cell: a cell's ``section``)."""
    rows = []
    sections = []
    for c in cells:
        s = c.summary
        anchor = f"{c.mode}--{c.scenario}"
        if c.error:
            rows.append(f"<tr><td>{c.mode}</td><td>{c.scenario}</td><td colspan=7 class=bad>run failed: "
                        f"{html.escape(c.error)}</td></tr>")
            continue
        lin = {"true": "<span class=good>yes</span>", "false": f"<span class=bad>no ({len(s['keys_invalid'])}/"
               f"{s['keys']} keys)</span>"}.get(s["linearizable"], "<span class=warn>unknown</span>")
        lat = (f"{s['latency_p50_ms']:.1f} / {s['latency_p99_ms']:.0f}" if s.get("latency_p50_ms") is not None
               else "—")
        rows.append(
            f"<tr><td><a href='#{anchor}'>{c.mode}</a></td><td>{c.scenario}</td>"
            f"<td>{_pct(s['availability_fault_majority'])} | {_pct(s['availability_fault_minority'])}</td>"
            f"<td>{lin}</td><td>{s['stale_reads']}</td><td>{s['lost_writes']}</td><td>{s['sibling_reads']}</td>"
            f"<td>{lat}</td><td>{html.escape(s['finding'])}</td></tr>"
        )
        section = getattr(c, "section", None)
        sections.append(section if section else cell_section(c.out_dir, c.mode, c.scenario, s, meta))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>kvstore CAP explorer</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; max-width: 1200px; color: #212529 }}
table {{ border-collapse: collapse; font-size: 14px }} td, th {{ border: 1px solid #dee2e6; padding: 4px 8px; vertical-align: top }}
th {{ background: #f1f3f5 }} .good {{ color: #2b8a3e; font-weight: bold }} .bad {{ color: #c92a2a; font-weight: bold }}
.warn {{ color: #e67700; font-weight: bold }} .finding {{ font-size: 15px; background: #f8f9fa; padding: 6px 10px; border-left: 4px solid #1864ab }}
img {{ max-width: 100%; border: 1px solid #dee2e6 }} .pics {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start }}
figure {{ margin: 0 }} figcaption {{ font-size: 13px; color: #495057; max-width: 480px }} section {{ margin-top: 36px }} .svg {{ overflow-x: auto }}
code, pre {{ background: #f8f9fa; font-size: 12px }} pre {{ padding: 8px; overflow-x: auto }}
</style></head><body>
<h1>kvstore CAP explorer</h1>
<p>Seed {meta['seed']}, {meta['duration_s']:g} s per run, {len(cells)} runs in {meta['elapsed_s']:.0f} s{SIMULATED_NOTE if meta.get('simulated') else ''}.
Command: <code>{html.escape(meta['command'])}</code></p>
<table><tr><th>mode</th><th>nemesis</th><th>avail. during fault<br>majority | minority</th><th>linearizable</th>
<th>stale reads</th><th>lost writes</th><th>sibling reads</th><th>p50 / p99 ms</th><th>finding</th></tr>
{''.join(rows)}</table>
<h2>How to read this</h2>{GUIDE}
{''.join(sections)}
</body></html>"""
    path = out / "index.html"
    path.write_text(doc, encoding="utf-8")
    return path
