"""Pictures of a cluster as SVG: the ring with its vnodes and a key's placement, and the nodes
with the links a fault cut.  Shared by the live page and the batch report.

Theory of operation
-------------------
Pure functions from data to an SVG string: no script, no external font or stylesheet, so a
picture works inline in the self-contained report and in the live page alike.

* ``ring_svg``: every vnode is a tick on a circle at its token's angle (token -2^63 at the
  top, clockwise), coloured by its member.  A key is a marker at its token; the arc from it
  runs clockwise through the vnodes that decide its preference list (the first vnode of each
  of the first N distinct members, numbered 1..N) -- the walk ``Ring.walk`` does.  Members
  believed down are drawn hollow, their stand-ins named.
* ``topology_svg``: nodes on a circle, one line per pair: grey when both directions
  deliver, red and dashed when cut both ways, orange with an arrow (the direction that still
  delivers) when cut one way.  Killed nodes are crossed out, paused ones marked, skewed
  clocks labelled; the groups a partition leaves are named below.
* ``grudge_of``: the cut links from a partition's description in a history (the nemesis's
  ``start-partition`` value), for pictures of recorded runs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kvstore.harness.nemesis import groups_grudge, grudge_groups
from kvstore.protocol.placement import Placement
from kvstore.protocol.ring import TOKEN_MIN, TOKEN_SPACE, Ring

# Okabe & Ito's colour-blind-safe palette, one colour per member (by sorted position).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C7A00", "#666666")


def node_colors(nodes: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(nodes))}


def _angle(token: int) -> float:
    """Radians clockwise from the top for a token."""
    return 2 * math.pi * (token - TOKEN_MIN) / TOKEN_SPACE


def _point(cx: float, cy: float, r: float, angle: float) -> tuple[float, float]:
    return cx + r * math.sin(angle), cy - r * math.cos(angle)


def _esc(text: Any) -> str:
    return html.escape(str(text))


ZOOM_CELLS = 24  # vnodes shown in the strip that magnifies a key's walk


def ring_svg(ring: Ring, where: Placement | None = None, down: Sequence[str] = (), size: int = 300,
             title: str | None = None) -> str:
    """The ring, and when ``where`` is given the key's token, its walk and its replicas."""
    colors = node_colors(ring.members)
    down_set = set(down)
    top = 22 if title else 4
    cx, cy = size / 2, top + size / 2
    radius = size / 2 - 24
    legend_x = size + 10
    width = size + 190
    height = top + size + (106 if where is not None else 8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" class="ring">']
    if title:
        out.append(f'<text x="4" y="15" font-weight="bold" font-size="13">{_esc(title)}</text>')
    out.append(f'<circle cx="{cx}" cy="{cy}" r="{radius}" fill="none" stroke="#e9ecef" stroke-width="14"/>')
    ticks: dict[str, list[str]] = {m: [] for m in ring.members}
    for token, member in ring.vnode_owners():
        a = _angle(token)
        x0, y0 = _point(cx, cy, radius - 7, a)
        x1, y1 = _point(cx, cy, radius + 7, a)
        ticks[member].append(f"M{x0:.1f} {y0:.1f}L{x1:.1f} {y1:.1f}")
    for member, segments in ticks.items():
        faded = ' stroke-opacity="0.35"' if member in down_set else ""
        out.append(f'<path d="{"".join(segments)}" stroke="{colors[member]}" stroke-width="1.2"{faded}>'
                   f'<title>{_esc(member)}: {ring.vnodes} vnodes</title></path>')
    out.append(f'<text x="{cx}" y="{cy - 4}" text-anchor="middle" fill="#495057">{len(ring.members)} nodes x '
               f'{ring.vnodes} vnodes</text>')
    out.append(f'<text x="{cx}" y="{cy + 12}" text-anchor="middle" fill="#868e96">token -2^63 at the top, '
               'clockwise</text>')
    roles: dict[str, str] = {}
    if where is not None:
        walk_out, roles = _walk(ring, where, cx, cy, radius, colors, down_set, top + size + 6, width)
        out += walk_out
    share = ring.ownership(1)
    for i, member in enumerate(ring.members):
        y = top + 18 + i * 36
        hollow = member in down_set
        out.append(f'<rect x="{legend_x}" y="{y - 11}" width="14" height="14" rx="3" '
                   f'fill="{"#fff" if hollow else colors[member]}" stroke="{colors[member]}" stroke-width="2"/>')
        out.append(f'<text x="{legend_x + 20}" y="{y}"><tspan font-weight="bold">{_esc(member)}</tspan> '
                   f'{share[member]:.0%} of the ring{" (down)" if hollow else ""}</text>')
        if member in roles:
            out.append(f'<text x="{legend_x + 20}" y="{y + 15}" fill="#495057">{_esc(roles[member])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _walk(ring: Ring, where: Placement, cx: float, cy: float, radius: float, colors: Mapping[str, str],
          down: set[str], band_y: float, width: float) -> tuple[list[str], dict[str, str]]:
    """The key's marker on the ring and a strip magnifying its walk: the vnodes clockwise from
    its token, the first of each member numbered (1..N primaries, then the fallbacks)."""
    owners = ring.vnode_owners()
    tokens = [t for t, _ in owners]
    start = tokens.index(where.vnode_token)
    cells: list[tuple[int, str]] = []
    for step in range(min(ZOOM_CELLS, len(owners))):  # until every member was met, and one more vnode
        cells.append(owners[(start + step) % len(owners)])
        if len({m for _, m in cells[:-1]}) == len(ring.members):
            break
    stand_ins = {v: k for k, v in where.stand_ins.items()}
    roles: dict[str, str] = {}
    for rank, member in enumerate(where.preference_list, start=1):
        roles[member] = f"key's primary {rank}" + (" - down" if member in down else "")
    for member in where.fallbacks:
        roles[member] = (f"stands in for {stand_ins[member]} (hints)" if member in stand_ins
                         else f"fallback {where.fallbacks.index(member) + 1}")
    out: list[str] = []
    a0 = _angle(where.token)
    kx, ky = _point(cx, cy, radius + 10, a0)
    ix, iy = _point(cx, cy, radius - 12, a0)
    out.append(f'<line x1="{kx:.1f}" y1="{ky:.1f}" x2="{ix:.1f}" y2="{iy:.1f}" stroke="#212529" stroke-width="3">'
               f'<title>key {_esc(where.key)}: token {where.token}</title></line>')
    ox, oy = _point(cx, cy, radius + 12, a0)
    out.append(f'<circle cx="{ox:.1f}" cy="{oy:.1f}" r="4" fill="#212529"/>')
    left, right = 8.0, width - 8.0
    cell_w = (right - left - 40) / len(cells)
    y = band_y + 22
    out.append(f'<line x1="{ox:.1f}" y1="{oy:.1f}" x2="{left + 6}" y2="{y}" stroke="#212529" '
               f'stroke-dasharray="3 3" stroke-width="1"/>')
    out.append(f'<text x="{left}" y="{band_y + 10}" fill="#212529">key <tspan font-weight="bold">'
               f'{_esc(where.key)}</tspan>, clockwise from its token: the first vnode of each node counts</text>')
    out.append(f'<path d="M{left} {y + 9} l10 -7 v14 z" fill="#212529"><title>the key\'s token</title></path>')
    seen: list[str] = []
    for i, (token, member) in enumerate(cells):
        x = left + 14 + i * cell_w
        first = member not in seen
        if first:
            seen.append(member)
        hollow = member in down
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{cell_w - 2:.1f}" height="18" rx="2" '
                   f'fill="{"#fff" if hollow else colors[member]}" stroke="{colors[member]}" stroke-width="1.5" '
                   f'fill-opacity="{1.0 if first else 0.35}"><title>vnode of {_esc(member)} at token {token}'
                   f'</title></rect>')
        if first:
            rank = len(seen)
            primary = rank <= where.replicas
            label = str(rank) if primary else ("h" if member in stand_ins else "f")
            out.append(f'<text x="{x + (cell_w - 2) / 2:.1f}" y="{y + 13}" text-anchor="middle" font-weight="bold" '
                       f'font-size="11" fill="{"#212529" if hollow or not primary else "#fff"}">{label}</text>')
            out.append(f'<text x="{x + (cell_w - 2) / 2:.1f}" y="{y + 32}" text-anchor="middle" font-size="11" '
                       f'font-weight="{"bold" if primary else "normal"}">{_esc(member)}</text>')
    out.append(f'<text x="{left}" y="{y + 50}" fill="#495057" font-size="11">1..{where.replicas}: the '
               'preference list (primaries); f: a fallback; h: a fallback taking hints</text>')
    out.append(f'<text x="{left}" y="{y + 64}" fill="#495057" font-size="11">for a primary believed down; '
               'faded: a node met again</text>')
    return out, roles


def grudge_of(value: Any, nodes: Sequence[str]) -> dict[str, set[str]]:
    """The grudge (receiver -> senders it drops) a recorded partition description stands for."""
    grudge: dict[str, set[str]] = {n: set() for n in nodes}
    groups = value.get("groups") if isinstance(value, dict) else value
    cut = value.get("cut") if isinstance(value, dict) else None
    if isinstance(cut, list):  # hand-drawn: the exact links
        for sender, receiver in cut:
            grudge.setdefault(receiver, set()).add(sender)
        return grudge
    if isinstance(groups, dict):
        if "sides" in groups and "bridge" in groups:  # bridge: the two sides without the bridge
            left, right = ([n for n in side if n != groups["bridge"]] for side in groups["sides"])
            for a in left:
                grudge[a].update(right)
            for b in right:
                grudge[b].update(left)
        elif "deaf" in groups:
            grudge[groups["deaf"]] = {n for n in nodes if n != groups["deaf"]}
        elif "views" in groups:
            for node, view in groups["views"].items():
                grudge[node] = {n for n in nodes if n not in view}
        return grudge
    if isinstance(groups, list) and all(isinstance(g, list) for g in groups):
        return {**grudge, **groups_grudge(groups)}
    return grudge


def topology_svg(
    nodes: Sequence[str],
    grudge: Mapping[str, set[str] | frozenset[str]] | None = None,
    killed: Sequence[str] = (),
    paused: Sequence[str] = (),
    skews_ms: Mapping[str, float] | None = None,
    groups: Sequence[Sequence[str]] = (),
    size: int = 300,
    title: str | None = None,
) -> str:
    """Nodes and their links, with what a fault did to them."""
    grudge = grudge or {}
    skews_ms = skews_ms or {}
    colors = node_colors(nodes)
    ordered = sorted(nodes)
    cx, cy = size / 2, size / 2 + (10 if title else 0)
    radius = size / 2 - 46
    pos = {n: _point(cx, cy, radius, 2 * math.pi * i / len(ordered)) for i, n in enumerate(ordered)}
    height = size + 24 + (10 if title else 0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{height}" viewBox="0 0 {size} {height}" '
           f'font-family="sans-serif" font-size="12" class="topology">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0 0L10 5L0 10z" fill="#e67700"/></marker></defs>']
    if title:
        out.append(f'<text x="4" y="14" font-weight="bold">{_esc(title)}</text>')
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            a_hears_b = b not in grudge.get(a, ())
            b_hears_a = a not in grudge.get(b, ())
            (x0, y0), (x1, y1) = pos[a], pos[b]
            if a_hears_b and b_hears_a:
                out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="#adb5bd" '
                           f'stroke-width="2"><title>{a} - {b}: up</title></line>')
            elif not a_hears_b and not b_hears_a:
                mx, my = (x0 + x1) / 2, (y0 + y1) / 2
                out.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="#c92a2a" '
                           f'stroke-width="2" stroke-dasharray="5 4"><title>{a} - {b}: cut</title></line>')
                out.append(f'<text x="{mx:.1f}" y="{my + 4:.1f}" text-anchor="middle" fill="#c92a2a" '
                           f'font-weight="bold">\u2715</text>')
            else:  # one way: the arrow shows the direction that still delivers
                src, dst = (a, b) if b_hears_a else (b, a)
                (sx, sy), (dx, dy) = pos[src], pos[dst]
                ex, ey = sx + (dx - sx) * 0.8, sy + (dy - sy) * 0.8
                out.append(f'<line x1="{sx:.1f}" y1="{sy:.1f}" x2="{ex:.1f}" y2="{ey:.1f}" stroke="#e67700" '
                           f'stroke-width="2" stroke-dasharray="6 3" marker-end="url(#arrow)">'
                           f'<title>{src} -> {dst} delivers; {dst} -> {src} is cut</title></line>')
    for n in ordered:
        x, y = pos[n]
        dead, stopped = n in killed, n in paused
        fill = "#495057" if dead else colors[n]
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="20" fill="{fill}" stroke="#212529" stroke-width="1.5"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" fill="#fff" font-weight="bold">'
                   f'{_esc(n)}</text>')
        notes = (["killed"] if dead else []) + (["paused"] if stopped else [])
        if n in skews_ms:
            notes.append(f"clock {skews_ms[n] / 1000:+g} s")
        if dead:
            out.append(f'<path d="M{x - 14:.1f} {y - 14:.1f}L{x + 14:.1f} {y + 14:.1f}M{x + 14:.1f} {y - 14:.1f}'
                       f'L{x - 14:.1f} {y + 14:.1f}" stroke="#c92a2a" stroke-width="3"/>')
        if notes:
            out.append(f'<text x="{x:.1f}" y="{y + 34:.1f}" text-anchor="middle" fill="#c92a2a">'
                       f'{_esc(", ".join(notes))}</text>')
    if len(groups) > 1:
        label = "sides: " + " | ".join(" ".join(g) for g in groups)
        out.append(f'<text x="{size / 2:.1f}" y="{height - 6}" text-anchor="middle" fill="#495057">{_esc(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def run_fault(events: Sequence[Mapping[str, Any]], nodes: Sequence[str]) -> dict[str, Any]:
    """The faults a recorded run started (its nemesis events, in order), as ``topology_svg``'s
    arguments: the last partition's grudge and groups, the nodes killed or paused, the skews."""
    fault: dict[str, Any] = {"grudge": {}, "groups": [], "killed": [], "paused": [], "skews_ms": {},
                             "description": []}
    for event in events:
        if event.get("process") != "nemesis":
            continue
        f, value = str(event.get("f", "")), event.get("value")
        if f == "start-partition":
            fault["grudge"] = grudge_of(value, nodes)
            fault["groups"] = grudge_groups(fault["grudge"])
            kind = value.get("kind", "partition") if isinstance(value, dict) else "partition"
            fault["description"].append(f"{kind}: " + " | ".join(" ".join(g) for g in fault["groups"]))
        elif f in ("kill", "pause") and isinstance(value, list):
            fault["killed" if f == "kill" else "paused"] += [str(n) for n in value]
            fault["description"].append(f"{f} " + " ".join(str(n) for n in value))
        elif f == "start-skew" and isinstance(value, dict):
            fault["skews_ms"].update({str(n): float(ms) for n, ms in value.items()})
            fault["description"].append("clock skew " + ", ".join(f"{n} {ms / 1000:+g} s" for n, ms in value.items()))
    return fault


def fault_svg(events: Sequence[Mapping[str, Any]], nodes: Sequence[str], size: int = 300) -> str | None:
    """The topology with the fault a recorded run injected drawn on it (None: no fault recorded)."""
    fault = run_fault(events, nodes)
    if not fault["description"]:
        return None
    return topology_svg(nodes, fault["grudge"], fault["killed"], fault["paused"], fault["skews_ms"],
                        fault["groups"], size=size, title="the fault: " + "; ".join(fault["description"]))


def placement_during_fault_svg(ring: Ring, key: str, replicas: int, events: Sequence[Mapping[str, Any]]) -> str:
    """A key's placement as a node on the smallest side of the run's fault saw it: the replicas
    it could not reach drawn as down, with their stand-ins (with no partition: the nodes down)."""
    from kvstore.protocol.placement import placement

    fault = run_fault(events, ring.members)
    down = set(fault["killed"]) | set(fault["paused"])
    groups: list[list[str]] = [list(g) for g in fault["groups"] if not down.issuperset(g)]
    smallest = min(groups, key=lambda g: (len(g), g)) if len(groups) > 1 else None
    viewer_side = set(smallest) if smallest is not None else set(ring.members) - down
    viewer = sorted(viewer_side)[0] if viewer_side else ring.members[0]
    where = placement(ring, key, replicas, lambda m: m in viewer_side and m not in down)
    unreachable = sorted(m for m in ring.members if m not in viewer_side or m in down)
    return ring_svg(ring, where, down=unreachable, title=f"key {key} as {viewer} saw it during the fault")
