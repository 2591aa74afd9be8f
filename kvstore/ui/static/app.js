// kvstore live CAP explorer: the page. Plain JS and SVG, no libraries, no build step.
// It draws the session's snapshots (pushed over a WebSocket twice a second) and sends the
// user's actions as POST /api/action. All figures and sentences come from the server; the
// page only lays them out.
"use strict";

const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C7A00", "#666666"];
const SVGNS = "http://www.w3.org/2000/svg";
const W = 560, H = 350, ZONE_X = 370;   // the graph's size; x beyond ZONE_X is "the other side"

let state = null;          // the latest snapshot
let selected = null;       // the selected node
let drag = null;           // {node, dx, dy, moved}
let currentKey = null;     // the key whose placement is shown
let placementTimer = null;
let ceShown = null;        // the id of the counterexample on screen
let ceAutoOpened = false;
let pending = false;       // an action is on its way
const positions = {};      // node -> {x, y} as last laid out
let graphDrawn = "";       // what the graph last drew (it is redrawn only when that changes)

// --- small helpers -------------------------------------------------------------------------

function $(sel) { return document.querySelector(sel); }
function el(tag, attrs = {}, text = null) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}
function sv(tag, attrs = {}, text = null) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}
function pct(x) { return x === null || x === undefined ? "–" : Math.round(x * 100) + "%"; }
function colorOf(node) {
  const nodes = state ? state.cluster.nodes : [];
  const i = Math.max(0, nodes.indexOf(node));
  return PALETTE[i % PALETTE.length];
}
function say(text, kind) {
  const m = $("#message");
  m.textContent = text;
  m.className = kind || "";
}

async function act(body) {
  if (pending) { say("one action at a time: the last one is still running", "error"); return false; }
  pending = true;
  say("…", "");
  try {
    const resp = await fetch("/api/action", {
      method: "POST", headers: {"Content-Type": "application/json", "X-Explorer": "1"}, body: JSON.stringify(body),
    });
    const doc = await resp.json();
    if (!resp.ok) { say(doc.message || ("HTTP " + resp.status), "error"); return false; }
    say(doc.message, "ok");
    return true;
  } catch (err) {
    say("the explorer did not answer: " + err, "error");
    return false;
  } finally {
    pending = false;
  }
}

// --- the live feed -------------------------------------------------------------------------

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/ws");
  ws.onmessage = (ev) => {
    const snap = JSON.parse(ev.data);
    if (snap.type === "state") { state = snap; render(); }
  };
  ws.onclose = () => {
    const s = $("#status");
    s.dataset.status = "disconnected";
    s.textContent = "disconnected: retrying";
    setTimeout(connect, 1500);
  };
}

function render() {
  const s = $("#status");
  s.dataset.status = state.status;
  s.textContent = state.busy ? "busy: " + state.busy : state.status_text;
  const run = state.run;
  $("#run").textContent = run.number ? `run ${run.number} · ${Math.floor(run.seconds)} s` +
    (run.stopped ? " · stopped" : "") : "";
  $("#histories").textContent = run.number ? "Histories of this run (for kvstore check): " + run.histories : "";
  $("#log").textContent = state.log.slice().reverse().join("\n");
  if (!state.cluster.nodes.length) return;
  $("#topology-desc").textContent = state.topology.description ? "· " + state.topology.description : "";
  renderCapabilities();
  if (!drag) renderGraph(false);
  renderKeys();
  renderModes();
  renderCounterexamples();
}

function renderCapabilities() {
  const caps = state.capabilities;
  for (const b of document.querySelectorAll("#presets button, #heal-partition")) b.disabled = !caps.partition;
  for (const b of document.querySelectorAll("#node-actions button")) {
    const need = {kill: "kill", restart: "kill", pause: "pause", resume: "pause", skew: "skew"}[b.dataset.act];
    b.disabled = !caps[need] || !selected;
    b.title = caps[need] ? (b.title || "") : caps.why_not;
  }
  $("#heal-all").disabled = !caps.partition;
}

// --- the network graph ---------------------------------------------------------------------

function layout(topo) {
  // The largest group that still talks stays left, the others go into the right-hand box.
  const nodes = topo.nodes;
  const groups = topo.groups.length ? topo.groups : [nodes];
  const left = groups[0], right = [].concat(...groups.slice(1));
  const place = (list, cx, cy, r) => list.forEach((n, i) => {
    const a = 2 * Math.PI * i / Math.max(1, list.length) - Math.PI / 2;
    positions[n] = list.length === 1 ? {x: cx, y: cy} : {x: cx + r * Math.cos(a), y: cy + r * Math.sin(a)};
  });
  place(left, right.length ? 190 : 190, 172, right.length ? 120 : 125);
  place(right, (ZONE_X + W) / 2, 172, right.length > 1 ? 60 : 0);
}

function linkState(topo, a, b) {
  const cut = new Set(topo.cut.map(([s, r]) => s + ">" + r));
  const ab = !cut.has(a + ">" + b), ba = !cut.has(b + ">" + a);   // a->b delivers, b->a delivers
  if (ab && ba) return "up";
  if (!ab && !ba) return "cut";
  return ab ? "a-to-b" : "b-to-a";
}

function dotFill(mode, n) {
  const c = (state.modes[mode].figures.by_node || {})[n];
  const a = c ? c.availability : null;
  return a === null || a === undefined ? "#dee2e6" : a >= 0.9 ? "#2b8a3e" : a <= 0.1 ? "#c92a2a" : "#e67700";
}

function renderGraph(force = true) {
  const topo = state.topology;
  const g = $("#graph");
  // Redraw only when what it shows changed: a node replaced twice a second cannot be clicked.
  const drawn = JSON.stringify([topo, selected, Object.keys(state.modes).map(
    (mode) => topo.nodes.map((n) => dotFill(mode, n)))]);
  if (!force && drawn === graphDrawn) return;
  graphDrawn = drawn;
  layout(topo);
  g.replaceChildren();
  const defs = sv("defs");
  const marker = sv("marker", {id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7",
                               markerHeight: "7", orient: "auto-start-reverse"});
  marker.appendChild(sv("path", {d: "M0 0L10 5L0 10z", fill: "#e67700"}));
  defs.appendChild(marker);
  g.appendChild(defs);
  const zone = sv("rect", {x: ZONE_X, y: 8, width: W - ZONE_X - 8, height: H - 16, rx: 10, class: "zone", id: "zone"});
  g.appendChild(zone);
  g.appendChild(sv("text", {x: (ZONE_X + W) / 2, y: 26, "text-anchor": "middle", fill: "#e67700", "font-size": 12},
                   "the other side"));
  g.appendChild(sv("text", {x: (ZONE_X + W) / 2, y: H - 16, "text-anchor": "middle", fill: "#e67700", "font-size": 11},
                   "drag nodes here to cut them off"));
  const nodes = topo.nodes;
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const a = nodes[i], b = nodes[j], st = linkState(topo, a, b);
      const pa = positions[a], pb = positions[b];
      const id = a + "-" + b;
      const hit = sv("line", {x1: pa.x, y1: pa.y, x2: pb.x, y2: pb.y, class: "link-hit", "data-link": id});
      hit.appendChild(sv("title", {}, st === "up" ? `${a} – ${b}: click to cut this link`
                                                  : `${a} – ${b}: ${st === "cut" ? "cut" : "cut one way"}; click to mend`));
      hit.addEventListener("click", () => toggleLink(a, b));
      let line;
      if (st === "up") {
        line = sv("line", {x1: pa.x, y1: pa.y, x2: pb.x, y2: pb.y, stroke: "#adb5bd", "stroke-width": 2, class: "link"});
      } else if (st === "cut") {
        line = sv("line", {x1: pa.x, y1: pa.y, x2: pb.x, y2: pb.y, stroke: "#c92a2a", "stroke-width": 2,
                           "stroke-dasharray": "5 4", class: "link"});
      } else {
        const [src, dst] = st === "a-to-b" ? [pa, pb] : [pb, pa];
        line = sv("line", {x1: src.x, y1: src.y, x2: src.x + (dst.x - src.x) * 0.78, y2: src.y + (dst.y - src.y) * 0.78,
                           stroke: "#e67700", "stroke-width": 2, "stroke-dasharray": "6 3", "marker-end": "url(#arrow)",
                           class: "link"});
      }
      line.setAttribute("data-link-state", st);
      line.setAttribute("data-link-line", id);
      g.appendChild(line);
      g.appendChild(hit);
      if (st === "cut") {
        g.appendChild(sv("text", {x: (pa.x + pb.x) / 2, y: (pa.y + pb.y) / 2 + 4, "text-anchor": "middle",
                                  fill: "#c92a2a", "font-weight": "bold", "pointer-events": "none"}, "✕"));
      }
    }
  }
  const modes = Object.keys(state.modes);
  for (const n of nodes) {
    const p = positions[n];
    const killed = topo.killed.includes(n), paused = topo.paused.includes(n);
    const grp = sv("g", {class: "node" + (n === selected ? " selected" : ""), "data-node": n,
                         transform: `translate(${p.x},${p.y})`,
                         "data-state": killed ? "killed" : paused ? "paused" : "up"});
    grp.appendChild(sv("circle", {r: 22, fill: killed ? "#495057" : colorOf(n), stroke: "#212529", "stroke-width": 1.5,
                                  class: "body"}));
    grp.appendChild(sv("text", {y: 5, "text-anchor": "middle", fill: "#fff", "font-weight": "bold",
                                "pointer-events": "none"}, n));
    if (killed) grp.appendChild(sv("path", {d: "M-15 -15L15 15M15 -15L-15 15", stroke: "#c92a2a", "stroke-width": 3,
                                            "pointer-events": "none"}));
    const notes = [];
    if (killed) notes.push("killed");
    if (paused) notes.push("paused");
    if (topo.skews_ms[n]) notes.push("clock " + (topo.skews_ms[n] > 0 ? "+" : "") + topo.skews_ms[n] / 1000 + " s");
    if (notes.length) grp.appendChild(sv("text", {y: -28, "text-anchor": "middle", fill: "#c92a2a", "font-size": 11,
                                                   "pointer-events": "none"}, notes.join(", ")));
    modes.forEach((mode, i) => {   // one dot per mode: this node's clients, last 10 s
      const c = (state.modes[mode].figures.by_node || {})[n];
      const a = c ? c.availability : null;
      const fill = dotFill(mode, n);
      const dot = sv("circle", {cx: (i - (modes.length - 1) / 2) * 12, cy: 32, r: 5, fill: fill, stroke: "#fff",
                                "data-dot-mode": mode});
      dot.appendChild(sv("title", {}, `${mode} via ${n}: ${pct(a)} answered (last 10 s)`));
      grp.appendChild(dot);
    });
    grp.addEventListener("pointerdown", (ev) => startDrag(ev, n));
    g.appendChild(grp);
  }
}

function svgPoint(ev) {
  const g = $("#graph");
  const pt = g.createSVGPoint();
  pt.x = ev.clientX; pt.y = ev.clientY;
  return pt.matrixTransform(g.getScreenCTM().inverse());
}

function startDrag(ev, node) {
  ev.preventDefault();
  const p = svgPoint(ev);
  drag = {node, dx: positions[node].x - p.x, dy: positions[node].y - p.y, moved: false, x: positions[node].x,
          y: positions[node].y};
  const grp = document.querySelector(`#graph [data-node="${node}"]`);
  grp.classList.add("dragging");
  grp.setPointerCapture(ev.pointerId);
  grp.addEventListener("pointermove", onDrag);
  grp.addEventListener("pointerup", endDrag, {once: true});
}

function onDrag(ev) {
  if (!drag) return;
  const p = svgPoint(ev);
  const x = Math.max(20, Math.min(W - 20, p.x + drag.dx)), y = Math.max(20, Math.min(H - 20, p.y + drag.dy));
  if (Math.hypot(x - drag.x, y - drag.y) > 6) drag.moved = true;
  const grp = document.querySelector(`#graph [data-node="${drag.node}"]`);
  grp.setAttribute("transform", `translate(${x},${y})`);
  $("#zone").classList.toggle("active", x > ZONE_X);
  drag.last = {x, y};
}

async function endDrag(ev) {
  const d = drag;
  const grp = document.querySelector(`#graph [data-node="${d.node}"]`);
  grp.removeEventListener("pointermove", onDrag);
  drag = null;
  if (!d.moved) { select(d.node); renderGraph(); return; }
  const topo = state.topology;
  const right = new Set([].concat(...(topo.groups.length ? topo.groups : [topo.nodes]).slice(1)));
  if (d.last.x > ZONE_X) right.add(d.node); else right.delete(d.node);
  const left = topo.nodes.filter((n) => !right.has(n));
  renderGraph();
  if (right.size === 0 || left.length === 0) {
    await act({action: "heal-partition"});
  } else {
    await act({action: "groups", groups: [left, [...right]]});
  }
}

async function toggleLink(a, b) {
  const topo = state.topology;
  const pairs = new Map();   // "a-b" -> [a, b], undirected, every link cut in either direction
  for (const [s, r] of topo.cut) {
    const [x, y] = s < r ? [s, r] : [r, s];
    pairs.set(x + "-" + y, [x, y]);
  }
  const id = a + "-" + b;
  if (pairs.has(id)) pairs.delete(id); else pairs.set(id, [a, b]);
  await act({action: "links", cut: [...pairs.values()]});
}

function select(node) {
  selected = selected === node ? null : node;
  $("#selected-node").textContent = selected ? `Node ${selected}:` : "Click a node to select it.";
  renderCapabilities();
}

// --- where a key lives ---------------------------------------------------------------------

function renderKeys() {
  const keys = [].concat(...Object.values(state.modes).map((m) => m.keys));
  const box = $("#key-buttons");
  const list = $("#key-list");
  if (box.dataset.keys !== keys.join(",")) {
    box.dataset.keys = keys.join(",");
    box.replaceChildren(...keys.map((k) => {
      const b = el("button", {"data-key": k}, k);
      b.addEventListener("click", () => showKey(k));
      return b;
    }));
    list.replaceChildren(...keys.map((k) => el("option", {value: k})));
    if (!currentKey || !keys.includes(currentKey)) showKey(keys[0]);
  }
  for (const b of box.children) b.classList.toggle("current", b.dataset.key === currentKey);
  const sel = $("#view-node");
  if (sel.dataset.nodes !== state.cluster.nodes.join(",")) {
    sel.dataset.nodes = state.cluster.nodes.join(",");
    sel.replaceChildren(el("option", {value: ""}, "the first node up"),
                        ...state.cluster.nodes.map((n) => el("option", {value: n}, n)));
  }
}

function showKey(key) {
  if (!key) return;
  currentKey = key;
  $("#key-input").value = key;
  for (const b of $("#key-buttons").children) b.classList.toggle("current", b.dataset.key === key);
  loadPlacement();
}

async function loadPlacement() {
  clearTimeout(placementTimer);
  placementTimer = setTimeout(loadPlacement, 2000);
  if (!currentKey || !state || state.status !== "running") return;
  const node = $("#view-node").value;
  const url = "/api/placement?key=" + encodeURIComponent(currentKey) + (node ? "&node=" + encodeURIComponent(node) : "");
  try {
    const resp = await fetch(url);
    const doc = await resp.json();
    if (!resp.ok) { $("#placement-note").textContent = doc.message; return; }
    if (doc.key !== currentKey) return;
    $("#ring").innerHTML = doc.svg;   // drawn by the server (kvstore.ui.pictures), no script inside
    const p = doc.placement;
    const standIns = p.fallbacks.filter((f) => f.stands_in_for).map((f) => `${f.id} for ${f.stands_in_for}`);
    $("#placement-note").textContent = (doc.error ? doc.error + "; the explorer's own view: " : `${doc.asked} sees: `) +
      `primaries ${p.preference_list.join(", ")}` +
      (p.primaries_down.length ? `; believed down: ${p.primaries_down.join(", ")}` : "; all up") +
      (standIns.length ? `; writes go to ${standIns.join(", ")} (hints)` : "") +
      (p.majority_reachable ? "; a majority of the primaries is reachable: quorum and linearizable can answer here"
                            : "; NO majority of the primaries is reachable: quorum and linearizable refuse here") + ".";
    renderCopies(doc);
  } catch (err) {
    $("#placement-note").textContent = "placement not available: " + err;
  }
}

function renderCopies(doc) {
  const t = $("#copies");
  const copies = doc.copies || {};
  const nodes = Object.keys(copies);
  if (!nodes.length) {
    t.replaceChildren(el("caption", {}, doc.mode === "linearizable" ?
      "A linearizable key lives in each replica's Paxos store; every read is a majority round." : ""));
    return;
  }
  const rows = [el("caption", {}, doc.agree ? "Its replicas agree (same versions)." :
                                              "Its replicas differ right now.")];
  const head = el("tr");
  head.append(el("th", {}, "replica"), el("th", {}, "holds"), el("th", {}, "version"));
  rows.push(head);
  for (const n of nodes) {
    const c = copies[n];
    const tr = el("tr");
    tr.append(el("td", {}, n), el("td", {}, c ? (c.values.length ? c.values.join(" | ") : "(nothing)") : "no answer"),
              el("td", {}, c ? c.digest.slice(0, 8) : "–"));
    rows.push(tr);
  }
  t.replaceChildren(...rows);
}

// --- the modes ------------------------------------------------------------------------------

function modeCard(mode, m) {
  let card = document.querySelector(`.mode[data-mode="${mode}"]`);
  if (card) return card;
  card = el("article", {class: "mode", "data-mode": mode});
  card.innerHTML = `<h3></h3><div class="help"></div>
    <div class="avail"><div class="side majority"><span class="label">majority side</span><span class="big">–</span>
      <span class="n"></span></div><div class="side minority"><span class="label">minority side</span>
      <span class="big">–</span><span class="n"></span></div></div>
    <svg class="spark" viewBox="0 0 180 40" preserveAspectRatio="none"></svg>
    <dl class="figures"><dt>latency p50 / p99</dt><dd class="latency">–</dd>
      <dt>stale reads</dt><dd class="stale">–</dd><dt>lost writes</dt><dd class="lost">–</dd>
      <dt>sibling reads</dt><dd class="siblings">–</dd><dt>replicas agree</dt><dd class="convergence">–</dd></dl>
    <div class="verdicts"></div><p class="finding"></p><ul class="explanation"></ul>`;
  card.querySelector("h3").textContent = mode;
  card.querySelector(".help").textContent = m.help;
  $("#modes").appendChild(card);
  return card;
}

function renderSide(div, counts, active) {
  const a = counts.availability;
  div.dataset.value = a === null || a === undefined ? "" : a;
  div.dataset.total = counts.total;
  div.querySelector(".big").textContent = counts.total ? pct(a) : "–";
  div.querySelector(".n").textContent = counts.total ? `of ${counts.total} requests (10 s)` :
    active ? "no requests yet" : "no fault: no minority";
  div.className = "side " + (div.classList.contains("majority") ? "majority " : "minority ") +
    (!counts.total ? "idle" : a >= 0.9 ? "good" : a <= 0.1 ? "bad" : "partly");
}

function spark(svg, series) {
  svg.replaceChildren();
  const draw = (values, color) => {
    let d = "", pen = false;
    values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = i * 180 / Math.max(1, values.length - 1), y = 38 - v * 36;
      d += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
      pen = true;
    });
    if (d) svg.appendChild(sv("path", {d, fill: "none", stroke: color, "stroke-width": 1.6}));
  };
  svg.appendChild(sv("line", {x1: 0, y1: 2, x2: 180, y2: 2, stroke: "#eee"}));
  draw(series.majority, "#2b8a3e");
  draw(series.minority, "#c92a2a");
  svg.appendChild(sv("title", {}, "answered per second, last 90 s: green majority side, red minority side"));
}

function renderModes() {
  for (const [mode, m] of Object.entries(state.modes)) {
    const card = modeCard(mode, m);
    const f = m.figures;
    renderSide(card.querySelector(".side.majority"), f.majority, true);
    renderSide(card.querySelector(".side.minority"), f.minority, state.topology.description !== "");
    spark(card.querySelector("svg.spark"), f.series);
    card.querySelector(".latency").textContent = f.latency_p50_ms === null ? "–" :
      `${f.latency_p50_ms} / ${f.latency_p99_ms} ms`;
    const a = m.anomalies || {};
    const fill = (cls, total, recent) => {
      const dd = card.querySelector(cls);
      dd.textContent = total === undefined ? "–" : `${total}` + (recent ? ` (${recent} in the last 10 s)` : "");
      dd.classList.toggle("hot", !!recent);
    };
    fill(".stale", a.stale_reads, a.stale_reads_recent);
    fill(".lost", a.lost_writes, a.lost_writes_recent);
    if (a.lost_writes_unsettled) {
      card.querySelector(".lost").textContent += ` · ${a.lost_writes_unsettled} not seen yet`;
    }
    fill(".siblings", a.sibling_reads, a.sibling_reads_recent);
    const conv = card.querySelector(".convergence");
    const c = m.convergence;
    conv.dataset.agree = c.agree === null ? "" : c.agree;
    conv.dataset.keys = c.keys;
    conv.textContent = mode === "linearizable" ? "n/a (reads are majority rounds)" :
      c.agree === null ? "–" : `${c.agree}/${c.keys} keys`;
    const chips = card.querySelector(".verdicts");
    chips.replaceChildren(el("span", {}, "checker:"));
    for (const [key, v] of Object.entries(m.verdicts)) {
      const short = key.slice(key.lastIndexOf(".") + 1);
      const mark = {valid: "✓", invalid: "✗", unknown: "?", pending: "…"}[v.verdict] || "…";
      const chip = el("span", {class: "chip", "data-key": key, "data-verdict": v.verdict, "data-worst": v.worst},
                      `${short} ${mark}`);
      chip.title = {valid: "no violation found" + (v.exact ? "" : " in its current window"),
                    invalid: "not linearizable: click for the counterexample", unknown: "the search ran out of budget",
                    pending: "not checked yet"}[v.verdict] + (v.worst === "invalid" && v.verdict !== "invalid" ?
                    "; an earlier window was not linearizable (click)" : "");
      if (v.counterexample) chip.addEventListener("click", () => openCounterexample(v.counterexample));
      chips.appendChild(chip);
    }
    card.querySelector(".finding").textContent = m.finding;
    const ul = card.querySelector(".explanation");
    ul.replaceChildren(...m.explanation.map((e) => el("li", {class: e.tone}, e.text)));
  }
}

// --- counterexamples ------------------------------------------------------------------------

function renderCounterexamples() {
  const list = state.counterexamples;
  const sel = $("#ce-select");
  const sig = list.map((c) => c.id).join(",");
  if (sel.dataset.sig !== sig) {
    sel.dataset.sig = sig;
    sel.replaceChildren(...list.slice().reverse().map((c) =>
      el("option", {value: c.id}, `${c.mode} · ${c.key} · window ${c.window} · ${c.stuck}`)));
    if (ceShown !== null) sel.value = ceShown;
  }
  if (!ceAutoOpened && list.length) {   // the first time a verdict turns: show why, once
    ceAutoOpened = true;
    openCounterexample(list[0].id);
  }
}

async function openCounterexample(id) {
  const resp = await fetch("/api/counterexample/" + id);
  const doc = await resp.json();
  if (!resp.ok) { say(doc.message, "error"); return; }
  ceShown = id;
  const panel = $("#counterexample-panel");
  panel.hidden = false;
  panel.dataset.mode = doc.mode;
  panel.dataset.key = doc.key;
  $("#ce-title").textContent = `${doc.mode}, key ${doc.key}, ${doc.start_s}–${doc.end_s} s`;
  $("#ce-explanation").textContent = "The checker: " + doc.explanation + "." +
    (doc.exact ? "" : " (Checked in a window of this key's history: a violation inside a window is a violation " +
                      "of the whole history.)");
  $("#ce-svg").innerHTML = doc.svg;   // drawn by the checker (kvstore.checker.report), no script inside
  $("#ce-select").value = id;
}

// --- wiring ---------------------------------------------------------------------------------

function wire() {
  for (const b of document.querySelectorAll("#presets button[data-preset]")) {
    b.addEventListener("click", () => act(Object.assign({action: "preset", kind: b.dataset.preset},
                                                        selected ? {node: selected} : {})));
  }
  $("#heal-partition").addEventListener("click", () => act({action: "heal-partition"}));
  $("#heal-all").addEventListener("click", () => act({action: "heal-all"}));
  $("#new-run").addEventListener("click", () => act({action: "new-run"}));
  for (const b of document.querySelectorAll("#node-actions button[data-act]")) {
    b.addEventListener("click", () => {
      if (!selected) return;
      const body = {action: b.dataset.act, node: selected};
      if (b.dataset.act === "skew") body.skew_ms = Number(b.dataset.skew);
      act(body);
    });
  }
  $("#key-input").addEventListener("change", (ev) => showKey(ev.target.value.trim()));
  $("#view-node").addEventListener("change", loadPlacement);
  $("#ce-close").addEventListener("click", () => { $("#counterexample-panel").hidden = true; ceShown = null; });
  $("#ce-select").addEventListener("change", (ev) => openCounterexample(ev.target.value));
}

wire();
connect();
