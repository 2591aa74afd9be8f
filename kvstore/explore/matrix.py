"""``kvstore explore``: run CP and AP side by side under faults and show the trade-off.

Theory of operation
-------------------
Each cell of the matrix (mode x nemesis) is a real run of the chaos harness
against real node processes, judged by the checker.  Nothing in the table is
written by hand: every figure is computed from that run's history, and every
finding sentence is derived from those figures by fixed rules
(``findings_for``), so a bug in the store, the harness or the checker shows up
as a surprising cell rather than being papered over.

Clusters: one local 5-node, N=3 cluster per conflict mode the selected modes
need (``eventual-lww`` needs a cluster in last-write-wins mode; the others
share a sibling-mode cluster).  Runs on one cluster use disjoint key prefixes,
so they do not read each other's data.  Clusters are stopped by PID when the
explorer ends, including on Ctrl-C.  With ``--netns`` the clusters are
``kvstore.harness.netns.NetnsCluster``s and partitions are nftables rules
(``kvstore.harness.nft_nemesis``); the runs, histories and judging are the same.

``--simulate`` runs every cell on a fresh simulated cluster instead
(``kvstore.sim``: the same nodes, workload, nemeses and checker on simulated
time, network and disks), in parallel processes (``--jobs``).  Each cell is then
a pure function of the seed and its settings: the table and report are the same
on every machine, and every cell replays with the ``kvstore sim`` command shown
in its report section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.client import KvstoreError
from kvstore.client.admin import read_cluster
from kvstore.config import APSettings, Limits
from kvstore.harness.local_cluster import ClusterError, LocalCluster
from kvstore.harness.nemesis import ClusterControl
from kvstore.harness.netns import NetnsCluster
from kvstore.harness.nft_nemesis import NftClusterControl, attach_control, control_for
from kvstore.harness.runner import SCENARIOS, RunSpec, run_scenario
from kvstore.harness.signals import Interrupted, run_until_signalled
from kvstore.harness.workload import MODES

DEFAULT_MODES = ["eventual", "eventual-lww", "quorum", "linearizable"]
DEFAULT_SCENARIOS = ["majority-partition", "isolated-node", "kill-restart", "clock-skew"]
QUICK_SCENARIOS = ["majority-partition", "clock-skew"]
MODE_HELP = {
    "eventual": "AP: sloppy quorum, R=W=1, hinted handoff, siblings",
    "eventual-lww": "AP with last-write-wins (the coordinator's clock decides)",
    "quorum": "strict R=W=2 of N=3 on primaries only",
    "linearizable": "CP: CASPaxos per key on a majority of its N replicas",
}
EXPLORE_AP = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=5.0, read_repair="async")
EXPLORE_LIMITS = Limits(request_timeout_ms=1000, replica_timeout_ms=500)


@dataclass
class Cell:
    mode: str
    scenario: str
    out_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    section: str | None = None  # its report section, when the worker that ran it rendered it (--simulate)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="kvstore explore")
    parser.description = (
        "Start local clusters, run every consistency mode under every nemesis, judge each history with "
        "the checker, and print a side-by-side table plus an HTML report."
    )
    parser.add_argument("--quick", action="store_true", help="a smaller matrix and shorter runs (about 1 minute)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 8, quick 5)")
    parser.add_argument("--scenarios", default=None, help=f"comma list (default {','.join(DEFAULT_SCENARIOS)}; "
                                                          f"known: {','.join(SCENARIOS)})")
    parser.add_argument("--modes", default=None, help=f"comma list (default {','.join(DEFAULT_MODES)})")
    parser.add_argument("--seed", type=int, default=7, help="seed for schedules and workloads (default 7)")
    parser.add_argument("--nodes", default=None, help="use an existing cluster (URL,URL,...; needs --secret)")
    parser.add_argument("--secret", default=None, help="the existing cluster's secret (admin routes)")
    parser.add_argument("--out", default="explore-report", help="report folder (default explore-report)")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON on stdout")
    parser.add_argument("--clients", type=int, default=10, help="clients per run (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="ops/s per run over all clients (default 100)")
    parser.add_argument("--serve", action="store_true",
                        help="instead: the live explorer in the browser (see: kvstore explore --serve --help)")
    parser.add_argument("--netns", action="store_true",
                        help="root, Linux: every node in its own network namespace and partitions cut by nftables "
                             "instead of the in-process fault layer (docs/netns.md)")
    parser.add_argument("--simulate", action="store_true",
                        help="run every cell on a simulated cluster (deterministic from --seed, seconds not minutes)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="with --simulate: cells run in parallel in this many processes (default: CPU count)")
    return parser


def _split(text: str | None, default: list[str], known: list[str] | dict[str, Any], what: str) -> list[str]:
    if not text:
        return list(default)
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise SystemExit(f"kvstore explore: unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return items


def main(argv: list[str] | None = None) -> int:
    if "--serve" in (sys.argv[1:] if argv is None else argv):  # the live explorer parses its own options
        from kvstore.ui.cli import serve_main

        return serve_main(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    modes = _split(args.modes, DEFAULT_MODES, list(MODES), "mode")
    scenarios = _split(args.scenarios, QUICK_SCENARIOS if args.quick else DEFAULT_SCENARIOS, SCENARIOS, "scenario")
    duration = args.duration or (5.0 if args.quick else 8.0)
    if duration < 3:
        raise SystemExit("kvstore explore: --duration must be at least 3 seconds")
    if args.simulate:
        if args.nodes:
            raise SystemExit("kvstore explore: --simulate runs its own simulated clusters; drop --nodes")
        if args.netns:
            raise SystemExit("kvstore explore: --simulate has no real network to cut; drop --netns")
        try:
            return _explore_simulated(args, modes, scenarios, duration)
        except KeyboardInterrupt:
            print("\nkvstore explore: interrupted", file=sys.stderr)
            return 130
    try:
        return run_until_signalled(_explore(args, modes, scenarios, duration))
    except ClusterError as exc:
        print(f"kvstore explore: a cluster could not start: {exc}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt):
        print("\nkvstore explore: interrupted; faults healed and clusters stopped", file=sys.stderr)
        return 130


async def _explore(args: argparse.Namespace, modes: list[str], scenarios: list[str], duration: float) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "kvstore explore " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if len(sys.argv) > 2 else []))
    clusters: dict[str, LocalCluster] = {}
    controls: dict[str, ClusterControl] = {}
    skipped: list[str] = []
    cells: list[Cell] = []
    started = time.monotonic()
    try:
        if args.nodes:
            control, conflict_mode = await _attach(args)
            if args.netns:  # a cluster started by `kvstore cluster up --netns`
                control = attach_control(control.urls, control.secret)
            controls[conflict_mode] = control
            for mode in list(modes):
                if MODES[mode]["conflict_mode"] != conflict_mode:
                    skipped.append(f"{mode} (needs a {MODES[mode]['conflict_mode']}-mode cluster)")
                    modes.remove(mode)
        else:
            needed = sorted({MODES[m]["conflict_mode"] for m in modes})
            for conflict_mode in needed:
                where = "in network namespaces" if args.netns else "local"
                console.print(f"[bold]starting a {where} 5-node cluster (N=3, conflict mode {conflict_mode})...")
                cluster = (NetnsCluster if args.netns else LocalCluster)(
                    5, 3, data_dir=tempfile.mkdtemp(prefix=f"kvstore-explore-{conflict_mode}-"),
                    conflict_mode=conflict_mode, ap=EXPLORE_AP, limits=EXPLORE_LIMITS,
                    spares=2 if "membership" in scenarios else 0,  # the membership nemesis joins them
                )
                clusters[conflict_mode] = cluster
                await asyncio.to_thread(cluster.start)
                controls[conflict_mode] = control_for(cluster)
        cells = [Cell(m, s, out / "runs" / f"{m}--{s}") for m in modes for s in scenarios]
        await _run_cells(cells, controls, clusters, args, duration, command, console)
    finally:
        for control in controls.values():
            await control.close()
        for cluster in clusters.values():
            await asyncio.to_thread(cluster.stop)
    elapsed = time.monotonic() - started
    meta = {"seed": args.seed, "duration_s": duration, "modes": modes, "scenarios": scenarios,
            "skipped": skipped, "elapsed_s": round(elapsed, 1), "command": command,
            "partitions": "nftables in network namespaces" if args.netns else "in-process fault layer"}
    return _finish(args, out, cells, meta, f"{elapsed:.0f} s")


def _finish(args: argparse.Namespace, out: Path, cells: list[Cell], meta: dict[str, Any], took: str) -> int:
    """Write results.json and the report, print the table (or JSON); 1 if any run failed."""
    from kvstore.explore.report import print_table, write_report  # matplotlib: only once there is a report

    results = {"meta": meta, "cells": [_cell_json(c) for c in cells]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, cells, meta)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(cells, meta)
        print(f"\nreport: {out / 'index.html'}   figures: {out / 'results.json'}   ({took})")
    failed = [c for c in cells if c.error]
    if failed:
        print(f"kvstore explore: {len(failed)} run(s) failed: " + "; ".join(f"{c.mode}/{c.scenario}: {c.error}"
                                                                       for c in failed), file=sys.stderr)
        return 1
    return 0


async def _attach(args: argparse.Namespace) -> tuple[ClusterControl, str]:
    if not args.secret:
        raise SystemExit("kvstore explore: --nodes needs --secret (the cluster secret, for the nemesis)")
    first = args.nodes.split(",")[0].strip()
    try:
        info = await read_cluster(first)
    except (KvstoreError, ValueError) as exc:
        raise ClusterError(f"cannot reach the cluster at {first}: {exc}") from None
    urls = {m["id"]: m["url"] for m in info["members"]}
    return ClusterControl(urls=urls, secret=args.secret), str(info.get("conflict_mode", "siblings"))


async def _run_cells(
    cells: list[Cell],
    controls: dict[str, ClusterControl],
    clusters: dict[str, LocalCluster],
    args: argparse.Namespace,
    duration: float,
    command: str,
    console: Any,
) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kvstore.explore.report import judge

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, transient=False,
    ) as bar:
        task = bar.add_task("exploring", total=len(cells), status="")
        for cell in cells:
            control = controls[MODES[cell.mode]["conflict_mode"]]
            spec = RunSpec(
                scenario=cell.scenario, mode=cell.mode, duration_s=duration, seed=args.seed,
                clients=args.clients, rate_per_s=args.rate, settle_s=2.0,
                key_prefix=f"{cell.mode}.{cell.scenario}.",
            )
            label = f"{cell.mode} x {cell.scenario}"

            def progress(phase: str, workload: Any, elapsed: float, label: str = label) -> None:
                c = workload.counters
                bar.update(task, status=f"{label}: {phase} {elapsed:4.1f}s ok={c.ok} fail={c.fail} info={c.info}")

            t0 = time.monotonic()
            cluster = clusters.get(MODES[cell.mode]["conflict_mode"])
            info = {"nodes": 5, "replicas": 3, "conflict_mode": MODES[cell.mode]["conflict_mode"],
                    "urls": control.urls, "ap": vars(EXPLORE_AP), "limits": vars(EXPLORE_LIMITS)}
            if isinstance(control, NftClusterControl):
                info["netns"] = control.record()
            try:
                result = await run_scenario(spec, control, cell.out_dir, cluster_info=info, progress=progress,
                                            command=f"{command}  # cell {cell.mode}/{cell.scenario}")
                bar.update(task, status=f"{label}: checking")
                members, vnodes, replicas = await ring_info(control, cluster)
                cell.summary = await asyncio.to_thread(judge, result.events, cell.mode, cell.out_dir, members,
                                                       vnodes, replicas)
            except Exception as exc:  # one broken run must not hide the others' results
                cell.error = f"{type(exc).__name__}: {exc}"
                if cluster is not None:
                    await control.heal_all()
            cell.seconds = time.monotonic() - t0
            bar.advance(task)


async def ring_info(control: ClusterControl, cluster: LocalCluster | None) -> tuple[list[str], int, int]:
    """Members, vnodes and N of the cluster, so the judge can tell each key's replica majority."""
    if cluster is not None:
        return cluster.node_ids, cluster.base_config.vnodes, cluster.base_config.replicas
    info = await read_cluster(next(iter(control.urls.values())))
    return [m["id"] for m in info["members"]], int(info["vnodes"]), int(info["replicas"])


def _cell_json(cell: Cell) -> dict[str, Any]:
    return {"mode": cell.mode, "scenario": cell.scenario, "dir": str(cell.out_dir), "seconds": round(cell.seconds, 1),
            "error": cell.error, **cell.summary}


# --- the matrix on simulated clusters ---------------------------------------------------------------


def _simulate_cell(mode: str, scenario: str, seed: int, duration: float, clients: int, rate: float,
                   out_dir: str, command: str) -> dict[str, Any]:
    """One simulated cell (runs in a worker process): the judge's figures and the cell's report
    section (its plots rendered here, in parallel with the other cells), or the error."""
    from kvstore.explore.report import cell_section
    from kvstore.sim.run import SimConfig, replay_command, run_sim

    config = SimConfig(mode=mode, scenario=scenario, duration_s=duration, clients=clients, rate_per_s=rate)
    try:
        result = run_sim(seed, config, Path(out_dir))
    except Exception as exc:  # one broken run must not hide the others' results
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": 0.0}
    summary = {**result.summary, "history_sha256": result.history_sha256, "simulated_s": round(result.simulated_s, 3),
               "broken": result.broken, "replay": replay_command(seed, config)}
    section = cell_section(Path(out_dir), mode, scenario, summary,
                           {"seed": seed, "duration_s": duration, "command": command})
    return {"summary": summary, "seconds": result.wall_s, "section": section}


def _explore_simulated(args: argparse.Namespace, modes: list[str], scenarios: list[str], duration: float) -> int:
    import concurrent.futures
    import os

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "kvstore explore " + " ".join(shlex.quote(a) for a in (sys.argv[2:] if len(sys.argv) > 2 else []))
    cells = [Cell(m, s, out / "runs" / f"{m}--{s}") for m in modes for s in scenarios]
    jobs = max(1, min(args.jobs or os.cpu_count() or 1, len(cells)))
    started = time.monotonic()
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as bar, concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        task = bar.add_task(f"exploring (simulated, {jobs} process{'es' if jobs > 1 else ''})", total=len(cells))
        futures = {
            pool.submit(_simulate_cell, c.mode, c.scenario, args.seed, duration, args.clients, args.rate,
                        str(c.out_dir), command): c
            for c in cells
        }
        for future in concurrent.futures.as_completed(futures):
            cell = futures[future]
            outcome = future.result()
            cell.error = outcome.get("error")
            cell.summary = outcome.get("summary", {})
            cell.seconds = outcome["seconds"]
            cell.section = outcome.get("section")
            bar.advance(task)
    elapsed = time.monotonic() - started
    meta = {"seed": args.seed, "duration_s": duration, "modes": modes, "scenarios": scenarios, "skipped": [],
            "elapsed_s": round(elapsed, 1), "command": command, "simulated": True, "jobs": jobs}
    return _finish(args, out, cells, meta, f"{elapsed:.0f} s, simulated")
