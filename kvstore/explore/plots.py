"""Plots of one chaos run, in the spirit of Jepsen's latency-raw and rate graphs.

Theory of operation
-------------------
Pictures must tell the CAP story without the text: every operation is a mark at
(completion time, latency), shaped and coloured by its outcome (ok / fail /
info), so a refusal wall on the minority side or a stretch of timeouts is
visible at a glance; fault windows are shaded and labelled.  The second panel
shows throughput and availability per second, split by partition side when a
partition has sides.  Rendered with matplotlib's Agg backend to PNG bytes (no
display needed), embedded into the self-contained HTML report.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUTCOME_STYLE = {
    "ok": {"color": "#2b8a3e", "marker": "o", "label": "ok"},
    "fail": {"color": "#c92a2a", "marker": "x", "label": "fail (certainly not applied)"},
    "info": {"color": "#e67700", "marker": "^", "label": "info (outcome unknown)"},
}


def fault_windows(events: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """(start_s, end_s, label) of every nemesis window, from start-*/stop-* (and kill/restart) events."""
    windows: list[tuple[float, float, str]] = []
    open_at: dict[str, tuple[float, str]] = {}
    pairs = {"kill": "restart", "pause": "resume"}
    end_s = max((e["time"] for e in events), default=0) / 1e9
    for e in events:
        if e.get("process") != "nemesis":
            continue
        f, t = str(e.get("f")), e["time"] / 1e9
        if f.startswith("start-"):
            open_at[f[len("start-") :]] = (t, f[len("start-") :])
        elif f in pairs:
            open_at[f] = (t, f"{f} {','.join(e.get('value') or [])}")
        elif f.startswith("stop-") and f[len("stop-") :] in open_at:
            start, label = open_at.pop(f[len("stop-") :])
            windows.append((start, t, label))
        else:
            for opener, closer in pairs.items():
                if f == closer and opener in open_at:
                    start, label = open_at.pop(opener)
                    windows.append((start, t, label))
    windows += [(start, end_s, label) for start, label in open_at.values()]
    return sorted(windows)


def completed_ops(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Client ops as {f, type, start_s, end_s, latency_ms, node}."""
    invokes: dict[Any, dict[str, Any]] = {}
    ops = []
    for e in events:
        p = e.get("process")
        if p == "nemesis":
            continue
        if e["type"] == "invoke":
            invokes[p] = e
        elif p in invokes:
            inv = invokes.pop(p)
            ops.append(
                {
                    "invoke_index": inv["index"],
                    "f": e["f"],
                    "type": e["type"],
                    "start_s": inv["time"] / 1e9,
                    "end_s": e["time"] / 1e9,
                    "latency_ms": (e["time"] - inv["time"]) / 1e6,
                    "node": e.get("node"),
                }
            )
    return ops


def _shade(ax: Any, windows: list[tuple[float, float, str]]) -> None:
    for start, end, label in windows:
        ax.axvspan(start, end, color="#868e96", alpha=0.18, lw=0)
        ax.text(start, 1.0, f" {label}", transform=ax.get_xaxis_transform(), va="top", ha="left",
                fontsize=8, color="#495057")


def run_figure(
    events: list[dict[str, Any]],
    title: str,
    minority: set[int] | None = None,
    subtitle: str = "",
    final_reads_from_s: float | None = None,
    minority_label: str = "minority side",
    lost: set[int] | None = None,
    stale: set[int] | None = None,
) -> bytes:
    """``minority``, ``lost`` and ``stale`` are sets of invoke indexes (as judged by the checker)."""
    ops = completed_ops(events)
    windows = fault_windows(events)
    fig, (ax_lat, ax_rate) = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
    fig.suptitle(title, fontsize=13, fontweight="bold", y=0.99)
    if subtitle:
        fig.text(0.5, 0.935, textwrap.fill(subtitle, 120), ha="center", va="top", fontsize=9, color="#343a40")
    for kind, style in OUTCOME_STYLE.items():
        xs = [o["end_s"] for o in ops if o["type"] == kind]
        ys = [max(o["latency_ms"], 0.05) for o in ops if o["type"] == kind]
        if xs:
            ax_lat.scatter(xs, ys, s=10 if kind == "ok" else 22, c=style["color"], marker=style["marker"],
                           label=f"{style['label']} ({len(xs)})", alpha=0.75, linewidths=1)
    for marked, style in ((lost, {"color": "#5f3dc4", "marker": "D", "label": "acknowledged, later lost"}),
                          (stale, {"color": "#0b7285", "marker": "s", "label": "stale read"})):
        chosen = [o for o in ops if marked and o["invoke_index"] in marked]
        if chosen:
            ax_lat.scatter([o["end_s"] for o in chosen], [max(o["latency_ms"], 0.05) for o in chosen], s=46,
                           facecolors="none", edgecolors=style["color"], marker=style["marker"], linewidths=1.6,
                           label=f"{style['label']} ({len(chosen)})", zorder=5)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms, log)")
    ax_lat.legend(loc="upper right", fontsize=8, framealpha=0.9)
    _shade(ax_lat, windows)
    if final_reads_from_s is not None:
        for ax in (ax_lat, ax_rate):
            ax.axvline(final_reads_from_s, color="#495057", lw=1, ls=":")
        ax_lat.text(final_reads_from_s, 0.02, " final reads\n (after healing)", transform=ax_lat.get_xaxis_transform(),
                    fontsize=8, color="#495057", va="bottom")
    horizon = max((o["end_s"] for o in ops), default=1.0)
    # Bins short enough to show a few-second fault window, long enough to hold several ops.
    bin_s = max(0.25, round(horizon / 40, 2))
    bins = [i * bin_s for i in range(int(horizon / bin_s) + 1)]

    def per_bin(selector: Any) -> tuple[list[float], list[float | None]]:
        ok = [0] * len(bins)
        total = [0] * len(bins)
        for o in ops:
            if not selector(o):
                continue
            i = min(int(o["end_s"] / bin_s), len(bins) - 1)
            total[i] += 1
            ok[i] += o["type"] == "ok"
        avail = [ok[i] / total[i] if total[i] else None for i in range(len(bins))]
        return [t / bin_s for t in total], avail

    rate, avail = per_bin(lambda o: True)
    ax_rate.bar(bins, rate, width=bin_s * 0.9, color="#a5d8ff", label="ops completed / s", align="edge")
    ax_rate.set_ylabel("ops / s")
    ax_av = ax_rate.twinx()
    ax_av.set_ylim(-0.05, 1.05)
    ax_av.set_ylabel("availability (ok share)")
    xs = [b + bin_s / 2 for b in bins]
    if minority:
        _, av_min = per_bin(lambda o: o["invoke_index"] in minority)
        _, av_maj = per_bin(lambda o: o["invoke_index"] not in minority)
        ax_av.plot(xs, av_maj, color="#1864ab", lw=2, marker=".", label="availability: everyone else")
        ax_av.plot(xs, av_min, color="#c92a2a", lw=2, ls="--", marker=".", label=f"availability: {minority_label}")
    else:
        ax_av.plot(xs, avail, color="#1864ab", lw=2, marker=".", label="availability: all clients")
    _shade(ax_rate, windows)
    ax_rate.set_xlabel("time since start of run (s)")
    handles = ax_rate.get_legend_handles_labels()[0] + ax_av.get_legend_handles_labels()[0]
    labels = ax_rate.get_legend_handles_labels()[1] + ax_av.get_legend_handles_labels()[1]
    ax_rate.legend(handles, labels, loc="lower left", fontsize=8, framealpha=0.9)
    fig.tight_layout(rect=(0, 0, 1, 0.92 if subtitle else 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
