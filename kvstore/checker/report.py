"""The report: a self-contained HTML page with hand-written SVG timelines (and PNG on demand).

Theory of operation
-------------------
A person should see *why* a key failed.  For every invalid key we draw the neighbourhood of
the counterexample: one lane per process, each op a bar from its invoke to its completion
(an ``info`` op runs off the right edge: it may take effect any time after its invoke), the
ops of the longest linearizable prefix in green and numbered in linearization order, the ops
that could not be linearized in orange, the op whose completion blocked the search in red,
and nemesis faults as shaded windows.  An overview draws every op of the history the same way.

The x axis is the *order of events* (compressed to the events drawn), not the clock: real-time
order is what linearizability is about, and uniform spacing keeps short ops readable.  Clock
times, when the history has them, are in each bar's tooltip.  The page has no scripts, no
external CSS or fonts: it opens offline, anywhere.  ``write_png`` draws the same layout with
matplotlib (imported only then), for terminals and quick looks.
"""

from __future__ import annotations

import html
import json
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.checker.analysis import fault_windows
from kvstore.checker.history import Op, _show, thaw

if TYPE_CHECKING:
    from kvstore.checker.core import Result
    from kvstore.checker.wgl import KeyResult

COLORS = {
    "prefix": "#4caf50",
    "pending": "#ff9800",
    "stuck": "#e53935",
    "ok": "#90a4ae",
    "fail": "#e0e0e0",
    "info": "#fff59d",
}
MAX_FOCUS_OPS = 80
MAX_OVERVIEW_OPS = 600


@dataclass
class Bar:
    lane: int
    x0: float
    x1: float
    open_end: bool  # info / never completed: drawn to the edge
    role: str  # prefix | pending | stuck | ok | fail | info
    label: str
    tooltip: str
    order: int | None = None  # position in the linearizable prefix


@dataclass
class Shade:
    x0: float
    x1: float
    label: str


@dataclass
class Layout:
    title: str
    lanes: list[str]
    bars: list[Bar]
    shades: list[Shade]
    width: float  # in x units
    note: str = ""

    def label_room(self) -> dict[int, float]:
        """For each bar (by index), the x room its label may use: up to the next bar in its lane."""
        room: dict[int, float] = {}
        by_lane: dict[int, list[int]] = {}
        for i, bar in enumerate(self.bars):
            by_lane.setdefault(bar.lane, []).append(i)
        for members in by_lane.values():
            members.sort(key=lambda i: self.bars[i].x0)
            for a, b in zip(members, [*members[1:], None], strict=True):
                end = self.bars[b].x0 if b is not None else self.width + 8
                room[a] = max(end - self.bars[a].x0, self.bars[a].x1 - self.bars[a].x0)
        return room


def _tooltip(op: Op) -> str:
    parts = [f"#{op.id} {op.describe()}", f"process {op.process}", f"line {op.line}"]
    if op.node:
        parts.append(f"node {op.node}")
    if op.invoke_time is not None:
        end = f"{op.complete_time / 1e6:.3f} ms" if op.complete_time is not None else "never"
        parts.append(f"{op.invoke_time / 1e6:.3f} ms .. {end}")
    if op.error:
        parts.append(f"error {op.error}")
    return " | ".join(parts)


def layout(
    result: Result, ops: Sequence[Op], title: str, kr: KeyResult | None = None, start: int | None = None
) -> Layout:
    """Bars for ``ops`` on a compressed event axis, coloured by their part in ``kr``; ops invoked
    before ``start`` are clipped to the left edge (their label starts with an ellipsis)."""
    roles: dict[int, str] = {}
    order: dict[int, int] = {}
    if kr is not None and kr.counterexample is not None:
        ce = kr.counterexample
        for i, op_id in enumerate(ce.prefix):
            roles[op_id] = "prefix"
            order[op_id] = i + 1
        for op_id in ce.pending:
            roles[op_id] = "pending"
        roles[ce.stuck] = "stuck"
    lo = start if start is not None else min((op.invoke for op in ops), default=0)
    hi = max((op.complete if op.complete is not None else op.invoke for op in ops), default=0)
    windows = [w for w in fault_windows(result.history) if w.end > lo and w.start <= hi]
    marks = sorted({lo} | {p for op in ops for p in (op.invoke, op.complete) if p is not None and p >= lo}
                   | {max(lo, w.start) for w in windows} | {min(hi + 1, w.end) for w in windows})
    x_of = {p: float(i) for i, p in enumerate(marks)}
    width = float(len(marks))
    processes: list[Hashable] = []
    for op in sorted(ops, key=lambda o: o.invoke):
        if op.process not in processes:
            processes.append(op.process)
    lane_of = {p: i for i, p in enumerate(processes)}
    bars: list[Bar] = []
    for op in ops:
        open_end = op.complete is None or op.type == "info"
        x1 = width if op.complete is None else x_of[max(op.complete, lo)]
        clipped = op.invoke < lo
        role = roles.get(op.id) or ("ok" if op.type == "ok" else op.type)
        label = ("\u2026 " if clipped else "") + op.describe()
        bars.append(Bar(lane_of[op.process], x_of[max(op.invoke, lo)], x1, open_end, role, label,
                        _tooltip(op), order.get(op.id)))
    shades = [Shade(x_of[max(lo, w.start)], x_of[min(hi + 1, w.end)] if w.end <= hi else width,
                    f"{w.fault} {_short(w.value)}".strip()) for w in windows]
    note = ""
    if kr is not None and kr.counterexample is not None:
        stuck = result.op(kr.counterexample.stuck)
        note = (f"#{stuck.id} {stuck.describe()} cannot take effect: value {_show(kr.counterexample.state)} "
                f"after the longest linearizable prefix ({len(kr.counterexample.prefix)} ops)")
    return Layout(title, [f"p{p}" for p in processes], bars, shades, width, note)


def _short(value: Any) -> str:
    if value is None:
        return ""
    groups = value.get("groups") if isinstance(value, dict) else value
    if isinstance(groups, list) and groups and all(isinstance(g, list) for g in groups):
        return " | ".join(" ".join(str(n) for n in g) for g in groups)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    text = json.dumps(thaw(value) if not isinstance(value, (dict, list)) else value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def focus_ops(result: Result, kr: KeyResult, limit: int = MAX_FOCUS_OPS) -> tuple[list[Op], int]:
    """(ops, first position) around a key's counterexample: from the last few ops of the prefix
    that had to complete, to the blocked op's completion; the blocked and pending ops, the recent
    prefix, and every op of the key that overlaps that stretch (info ops only if they matter)."""
    ce = kr.counterexample
    key_ops = [op for op in result.history.ops if op.key == kr.key]
    if ce is None or not key_ops:
        return key_ops[:limit], key_ops[0].invoke if key_ops else 0
    stuck = result.op(ce.stuck)
    anchors = [stuck] + [result.op(i) for i in ce.pending if result.op(i).type != "info"]
    recent = [op for op in (result.op(i) for i in ce.prefix) if op.type != "info"][-8:]
    start = min(op.invoke for op in anchors + recent)
    end = stuck.complete if stuck.complete is not None else max(op.invoke for op in anchors)
    must = {ce.stuck, *ce.pending, *ce.prefix[-12:]}
    chosen: list[Op] = []
    for op in key_ops:
        if op.invoke > end:
            continue
        finished = op.complete if op.complete is not None and op.type != "info" else None
        if finished is not None and finished < start and op.id not in must:
            continue
        if finished is None and op.invoke < start and op.id not in must:
            continue  # an old info op the search did not need: noise
        chosen.append(op)
    if len(chosen) > limit:
        rest = sorted((op for op in chosen if op.id not in must), key=lambda op: -op.invoke)
        keep = must | {op.id for op in rest[: max(0, limit - len(must))]}
        chosen = [op for op in chosen if op.id in keep]
    return chosen, start


# --- SVG ------------------------------------------------------------------------------------

LANE_H = 26
LABEL_W = 70
RIGHT_MARGIN = 220  # room for the labels of the last ops
TOP = 28


def svg(lay: Layout, px_per_unit: float | None = None, max_width: int = 1400) -> str:
    unit = px_per_unit or max(6.0, min(40.0, (max_width - LABEL_W - 20) / max(lay.width, 1.0)))
    plot_w = lay.width * unit
    w = int(LABEL_W + plot_w + RIGHT_MARGIN)
    h = int(TOP + LANE_H * max(1, len(lay.lanes)) + (26 if lay.note else 10))
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="4" y="16" font-weight="bold" font-size="13">{html.escape(lay.title)}</text>',
    ]
    for shade in lay.shades:
        x0 = LABEL_W + shade.x0 * unit
        x1 = LABEL_W + shade.x1 * unit
        out.append(f'<rect x="{x0:.1f}" y="{TOP - 6}" width="{max(x1 - x0, 2):.1f}" height="{h - TOP}" '
                   f'fill="#7e57c2" fill-opacity="0.12"><title>{html.escape(shade.label)}</title></rect>')
        out.append(f'<text x="{x0 + 2:.1f}" y="{TOP + 4 - 6}" fill="#5e35b1" font-size="10">'
                   f'{html.escape(shade.label[:40])}</text>')
    for i, lane in enumerate(lay.lanes):
        y = TOP + i * LANE_H
        fill = "#fafafa" if i % 2 else "#ffffff"
        out.append(f'<rect x="0" y="{y}" width="{w}" height="{LANE_H}" fill="{fill}" fill-opacity="0.6"/>')
        out.append(f'<text x="4" y="{y + LANE_H / 2 + 4:.1f}" fill="#555">{html.escape(lane)}</text>')
    room = lay.label_room()
    for n, bar in enumerate(lay.bars):
        y = TOP + bar.lane * LANE_H + 4
        x0 = LABEL_W + bar.x0 * unit
        x1 = LABEL_W + bar.x1 * unit
        bw = max(x1 - x0, 3.0)
        color = COLORS[bar.role]
        stroke = "#b71c1c" if bar.role == "stuck" else "#37474f"
        dash = ' stroke-dasharray="4 3"' if bar.open_end else ""
        width_attr = 2.2 if bar.role in ("stuck", "pending") else 0.8
        out.append(f'<g><title>{html.escape(bar.tooltip)}</title>')
        if bar.open_end and bar.x1 < lay.width:  # an info op may still take effect later
            out.append(f'<line x1="{x0 + bw:.1f}" y1="{y + (LANE_H - 8) / 2}" x2="{LABEL_W + plot_w:.1f}" '
                       f'y2="{y + (LANE_H - 8) / 2}" stroke="#9e9e9e" stroke-dasharray="2 3"/>')
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{bw:.1f}" height="{LANE_H - 8}" rx="3" fill="{color}" '
                   f'stroke="{stroke}" stroke-width="{width_attr}"{dash}/>')
        label = bar.label if bar.order is None else f"{bar.order}. {bar.label}"
        max_chars = int(min(room.get(n, 0.0) * unit, w - x0 - 4) / 6.0)
        if max_chars >= 2:
            shown = label if len(label) <= max_chars else label[: max_chars - 1] + "\u2026"
            weight = ' font-weight="bold"' if bar.role == "stuck" else ""
            out.append(f'<text x="{x0 + 3:.1f}" y="{y + LANE_H - 12}" fill="#111"{weight}>{html.escape(shown)}</text>')
        out.append("</g>")
    if lay.note:
        out.append(f'<text x="{LABEL_W}" y="{h - 4}" fill="#b71c1c">{html.escape(lay.note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def activity_svg(result: Result, buckets: int = 120, plot_w: int = 1100, plot_h: int = 110) -> str:
    """The whole history at a glance, at any size: ok/fail/info counts per slice of the history
    (by invoke), nemesis faults shaded, the ops of counterexamples marked."""
    hist = result.history
    n = max(hist.length, 1)
    counts = [[0, 0, 0] for _ in range(buckets)]
    index = {"ok": 0, "fail": 1, "info": 2}
    for op in hist.ops:
        counts[min(buckets - 1, op.invoke * buckets // n)][index.get(op.type, 2)] += 1
    peak = max((sum(c) for c in counts), default=1) or 1
    left, top = 50, 24
    w, h = left + plot_w + 20, top + plot_h + 40
    x = lambda pos: left + pos / n * plot_w  # noqa: E731 - a local scale
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family="sans-serif" font-size="11">',
           '<text x="4" y="16" font-weight="bold" font-size="13">the whole history: ops per slice '
           '(ok / fail / info), faults shaded</text>']
    for win in fault_windows(hist):
        x0, x1 = x(win.start), x(win.end)
        label = f"{win.fault} {_short(win.value)}".strip()
        out.append(f'<rect x="{x0:.1f}" y="{top}" width="{max(x1 - x0, 1.5):.1f}" height="{plot_h}" fill="#7e57c2" '
                   f'fill-opacity="0.14"><title>{html.escape(label)}</title></rect>')
        out.append(f'<text x="{x0 + 2:.1f}" y="{top + 10}" fill="#5e35b1" font-size="10">{html.escape(label[:30])}</text>')
    slice_w = plot_w / buckets
    colors = (COLORS["ok"], "#bdbdbd", "#fbc02d")
    for b, (ok, fail, info) in enumerate(counts):
        y = float(top + plot_h)
        for value, color in zip((ok, fail, info), colors, strict=True):
            if value:
                bh = value / peak * (plot_h - 14)
                y -= bh
                out.append(f'<rect x="{left + b * slice_w:.1f}" y="{y:.1f}" width="{max(slice_w - 1, 1):.1f}" '
                           f'height="{bh:.1f}" fill="{color}"/>')
    for kr in result.invalid_keys:
        if kr.counterexample is None:
            continue
        op = result.op(kr.counterexample.stuck)
        px = x(op.invoke)
        out.append(f'<g><title>{html.escape(_tooltip(op))}</title><path d="M{px - 5:.1f},{top + plot_h + 12} '
                   f'L{px + 5:.1f},{top + plot_h + 12} L{px:.1f},{top + plot_h + 2} Z" fill="{COLORS["stuck"]}"/></g>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#555"/>')
    out.append(f'<text x="4" y="{top + 10}" fill="#555">{peak}</text>')
    for phase in result.analyses.phases:
        out.append(f'<text x="{x(phase.start) + 2:.1f}" y="{top + plot_h + 26}" fill="#333">'
                   f'{html.escape(phase.name)}</text>')
    out.append(f'<text x="{left}" y="{h - 2}" fill="#777">red marks: ops that could not be linearized</text>')
    out.append("</svg>")
    return "\n".join(out)


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
.verdict-true { color: #2e7d32; } .verdict-false { color: #c62828; } .verdict-unknown { color: #ef6c00; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 6px; border: 1px solid #555;
  border-radius: 3px; font-size: 12px; }
.scroll { overflow-x: auto; border: 1px solid #ddd; padding: 4px; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _legend() -> str:
    items = [("prefix", "linearized (prefix, in order)"), ("pending", "cannot be linearized"),
             ("stuck", "blocked op"), ("ok", "other ok"), ("info", "info (dashed: no known end)"),
             ("fail", "fail")]
    spans = "".join(f'<span style="background:{COLORS[k]}">{html.escape(t)}</span>' for k, t in items)
    shade = '<span style="background:rgba(126,87,194,0.12)">nemesis fault</span>'
    return f'<div class="legend">{spans}{shade}</div>'


def render_html(result: Result) -> str:
    hist = result.history
    verdict = result.valid.value
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvstore check report</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Consistency check: <span class='verdict-{verdict}'>{html.escape(_verdict_words(result))}</span></h1>",
        f"<p>{html.escape(hist.source or 'in-memory history')} &mdash; model <code>{html.escape(result.model)}</code>"
        f" (initial {html.escape(_show(result.initial))}), format {html.escape(hist.format)}, "
        f"{len(hist.ops)} ops on {len(result.keys)} key(s), {len(hist.nemesis)} nemesis events, "
        f"checked in {result.seconds:.2f} s.</p>",
        _legend(),
    ]
    for kr in result.invalid_keys:
        ops, first = focus_ops(result, kr)
        lay = layout(result, ops, f"key {_show(kr.key)}: around the counterexample", kr, first)
        ce = kr.counterexample
        assert ce is not None
        parts.append(f"<h2>Key {html.escape(_show(kr.key))}: not linearizable</h2>")
        parts.append(f"<p>{html.escape(result.explain(kr))}.</p>")
        parts.append(f"<div class='scroll'>{svg(lay)}</div>")
        parts.append("<p>Operations that cannot be linearized:</p>")
        parts.append(_table(["op", "process", "operation", "line", "type"],
                            [(f"#{o.id}", o.process, o.describe(), o.line, o.type)
                             for o in (result.op(i) for i in ce.pending)]))
        tail = list(zip(ce.prefix, ce.states, strict=True))[-15:]
        parts.append(f"<p>Longest linearizable prefix: {len(ce.prefix)} ops (last {len(tail)} shown).</p>")
        parts.append(_table(["#", "op", "process", "operation", "value after"],
                            [(len(ce.prefix) - len(tail) + i + 1, f"#{op_id}", result.op(op_id).process,
                              result.op(op_id).describe(), _show(state)) for i, (op_id, state) in enumerate(tail)]))
    parts.append("<h2>Keys</h2>")
    parts.append(_table(["key", "verdict", "ops checked", "states explored", "pruned info ops", "seconds", "note"],
                        [(_show(kr.key), kr.verdict, kr.ops, kr.explored, kr.pruned, f"{kr.seconds:.3f}",
                          kr.reason or "") for kr in result.keys]))
    parts.extend(_analyses_html(result))
    parts.append("<h2>Timeline</h2>")
    parts.append(f"<div class='scroll'>{activity_svg(result)}</div>")
    if len(hist.ops) <= MAX_OVERVIEW_OPS:
        roles: dict[int, str] = {}
        for kr in result.invalid_keys:
            if kr.counterexample is not None:
                roles.update({i: "pending" for i in kr.counterexample.pending})
                roles[kr.counterexample.stuck] = "stuck"
        lay = layout(result, hist.ops, "every operation")
        for bar, op in zip(lay.bars, hist.ops, strict=True):
            bar.role = roles.get(op.id, bar.role)
        parts.append(f"<div class='scroll'>{svg(lay, px_per_unit=4.0 if lay.width > 300 else None)}</div>")
    else:
        parts.append(f"<p>({len(hist.ops)} ops: the per-operation timeline is drawn for histories of at most "
                     f"{MAX_OVERVIEW_OPS} ops; see the counterexamples above.)</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _verdict_words(result: Result) -> str:
    return {"true": "linearizable", "false": "NOT linearizable", "unknown": "unknown"}[result.valid.value]


def _analyses_html(result: Result) -> list[str]:
    a = result.analyses
    av = a.availability
    parts = ["<h2>Availability</h2>"]
    rows: list[Sequence[Any]] = [("overall", av.overall.ok, av.overall.fail, av.overall.info,
                                  _pct(av.overall.availability))]
    rows += [(f"phase: {name}", c.ok, c.fail, c.info, _pct(c.availability)) for name, c in av.by_phase.items()]
    rows += [(f"side: {name}", c.ok, c.fail, c.info, _pct(c.availability)) for name, c in av.by_side.items()]
    rows += [(f"group: {name}", c.ok, c.fail, c.info, _pct(c.availability)) for name, c in av.by_group.items()]
    parts.append(_table(["scope", "ok", "fail", "info", "availability"], rows))
    parts.append("<h2>Anomalies</h2>")
    parts.append(_table(["kind", "count", "examples"], [
        ("lost writes", len(a.lost_writes),
         "; ".join(f"#{lw.op} {result.op(lw.op).describe()} (not seen by #{lw.first_read} "
                   f"{result.op(lw.first_read).describe()})" for lw in a.lost_writes[:5])),
        ("stale reads", len(a.stale_reads),
         "; ".join(f"#{s.op} {result.op(s.op).describe()} (overwritten by #{s.overwritten_by} "
                   f"{result.op(s.overwritten_by).describe()})" for s in a.stale_reads[:5])),
        ("reads with siblings", len(a.sibling_reads),
         "; ".join(f"#{i} {result.op(i).describe()}" for i in a.sibling_reads[:5])),
    ]))
    if a.latency:
        parts.append("<h2>Latency (ok ops, ms)</h2>")
        parts.append(_table(["op", "phase", "count", "p50", "p99", "max"], [
            (f, ph, lat.count, f"{lat.p50_ms:.2f}", f"{lat.p99_ms:.2f}", f"{lat.max_ms:.2f}")
            for f, per in a.latency.items() for ph, lat in per.items()]))
    return parts


# --- files ----------------------------------------------------------------------------------


def write_report(result: Result, directory: str | Path, png: bool = False) -> Path:
    """Write report.html (and result.json, and timeline PNGs if asked); returns the HTML path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    page.write_text(render_html(result), encoding="utf-8")
    (out / "result.json").write_text(result.to_json(indent=2), encoding="utf-8")
    if png:
        for n, kr in enumerate(result.invalid_keys):
            ops, first = focus_ops(result, kr)
            lay = layout(result, ops, f"key {_show(kr.key)}: around the counterexample", kr, first)
            write_png(lay, out / f"counterexample-{n}.png")
    return page


def write_png(lay: Layout, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lanes = max(1, len(lay.lanes))
    inch_per_unit = 0.55
    fig_w = min(48.0, max(8.0, lay.width * inch_per_unit + 1.5))
    fig, ax = plt.subplots(figsize=(fig_w, 1.3 + 0.42 * lanes))
    chars_per_unit = (fig_w - 1.5) / max(lay.width, 1.0) * 72 / 7 / 0.62  # at 7 pt
    for shade in lay.shades:
        ax.axvspan(shade.x0, shade.x1, color="#7e57c2", alpha=0.12)
        ax.text(shade.x0, lanes - 0.35, shade.label[:40], fontsize=7, color="#5e35b1", va="bottom")
    room = lay.label_room()
    for n, bar in enumerate(lay.bars):
        y = lanes - 1 - bar.lane
        if bar.open_end and bar.x1 < lay.width:
            ax.plot([bar.x1, lay.width], [y + 0.5, y + 0.5], linestyle=":", color="#9e9e9e", linewidth=0.8)
        rect = Rectangle((bar.x0, y + 0.12), max(bar.x1 - bar.x0, 0.15), 0.76, facecolor=COLORS[bar.role],
                         edgecolor="#b71c1c" if bar.role == "stuck" else "#37474f",
                         linewidth=2.0 if bar.role in ("stuck", "pending") else 0.6,
                         linestyle="--" if bar.open_end else "-")
        ax.add_patch(rect)
        label = bar.label if bar.order is None else f"{bar.order}. {bar.label}"
        chars = int(room.get(n, 0.0) * chars_per_unit)
        if chars >= 2:
            ax.text(bar.x0 + 0.08, y + 0.5, label if len(label) <= chars else label[: chars - 1] + "\u2026",
                    fontsize=7, va="center", fontweight="bold" if bar.role == "stuck" else "normal")
    ax.set_xlim(0, max(lay.width, 1.0))
    ax.set_ylim(0, lanes)
    ax.set_yticks([lanes - 1 - i + 0.5 for i in range(len(lay.lanes))])
    ax.set_yticklabels(lay.lanes, fontsize=7)
    ax.set_xlabel("events (in history order)" + (f"\n{lay.note}" if lay.note else ""), fontsize=8)
    ax.set_title(lay.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
