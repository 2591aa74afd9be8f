"""``kvstore chaos SCENARIO`` and ``python chaos/<scenario>.py``: run one scenario end to end."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from kvstore.client import KvstoreError
from kvstore.client.admin import read_cluster
from kvstore.harness.local_cluster import ClusterError, LocalCluster
from kvstore.harness.nemesis import ClusterControl
from kvstore.harness.netns import NetnsCluster
from kvstore.harness.nft_nemesis import NftClusterControl, attach_control, control_for
from kvstore.harness.runner import SCENARIO_HELP, SCENARIOS, RunSpec, run_scenario
from kvstore.harness.signals import Interrupted, run_until_signalled
from kvstore.harness.workload import MODES, Workload


def add_arguments(parser: argparse.ArgumentParser, scenario: str | None) -> None:
    if scenario is None:
        parser.add_argument("scenario", choices=sorted(SCENARIOS), help="which nemesis scenario to run")
    parser.add_argument("--mode", choices=list(MODES), default="eventual", help="consistency mode (default eventual)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of workload (default 30)")
    parser.add_argument("--seed", type=int, default=7, help="seed for the schedule and workload choices")
    parser.add_argument("--out", default=None, help="output folder (default runs/<scenario>-<mode>-<seed>)")
    parser.add_argument("--nodes", default=None, help="use an existing cluster: URL,URL,... (needs --secret)")
    parser.add_argument("--secret", default=os.environ.get("KVSTORE_SECRET"), help="cluster secret for --nodes")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (default 10)")
    parser.add_argument("--keys", type=int, default=5, help="independent registers (default 5)")
    parser.add_argument("--rate", type=float, default=100.0, help="ops/s over all clients (default 100)")
    parser.add_argument("--random-schedule", action="store_true", help="random fault windows from the seed")
    parser.add_argument("--storage", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--no-check", action="store_true", help="do not run the checker afterwards")
    parser.add_argument("--netns", action="store_true",
                        help="root, Linux: nodes in their own network namespaces, partitions cut by nftables "
                             "(with --nodes: a cluster started by `kvstore cluster up --netns`; docs/netns.md)")


class ProgressLine:
    """One live status line: phase, ops/s, ok/fail/info (plain lines when not a terminal)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def __call__(self, phase: str, workload: Workload, elapsed_s: float) -> None:
        c = workload.counters
        now_ns = workload.history.now()
        recent = sum(1 for t in c.completed_times_ns[-2000:] if now_ns - t < 1_000_000_000)
        line = (
            f"{self.label} {elapsed_s:5.1f}s phase={phase:<10} {recent:4d} ops/s  "
            f"ok={c.ok} fail={c.fail} info={c.info}"
        )
        if self.tty:
            sys.stderr.write("\r" + line + "   ")
            sys.stderr.flush()
        elif time.monotonic() - self.last_print >= 5.0:
            print(line, file=sys.stderr, flush=True)
            self.last_print = time.monotonic()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


async def _existing_cluster(urls: list[str], secret: str | None) -> ClusterControl:
    if not secret:
        raise SystemExit("kvstore chaos: --nodes needs --secret (or $KVSTORE_SECRET) for the admin routes")
    first = urls[0]
    try:
        info = await read_cluster(first)
    except (KvstoreError, ValueError) as exc:
        raise ClusterError(f"cannot reach the cluster at {first}: {exc}") from None
    members = {m["id"]: m["url"] for m in info["members"]}
    return ClusterControl(urls=members, secret=secret)


async def _run(args: argparse.Namespace, scenario: str) -> int:
    spec = RunSpec(
        scenario=scenario, mode=args.mode, duration_s=args.duration, seed=args.seed, clients=args.clients,
        keys=args.keys, rate_per_s=args.rate, random_schedule=args.random_schedule,
    )
    spec.faults()
    out = Path(args.out or f"runs/{scenario}-{args.mode}-{args.seed}")
    cluster: LocalCluster | None = None
    if args.nodes:
        control = await _existing_cluster([u.strip() for u in args.nodes.split(",") if u.strip()], args.secret)
        if args.netns:
            control = attach_control(control.urls, control.secret)
        info: dict[str, Any] = {"urls": control.urls, "external": True}
    else:
        if args.netns and scenario == "membership":
            # A spare node needs a namespace made up front; NetnsCluster makes them for its members only.
            raise SystemExit("kvstore chaos: the membership nemesis does not run with --netns yet")
        cluster = (NetnsCluster if args.netns else LocalCluster)(
            5, 3, storage=args.storage, conflict_mode=MODES[args.mode]["conflict_mode"],
            spares=2 if scenario == "membership" else 0)
        where = "a 5-node cluster in network namespaces" if args.netns else "a local 5-node cluster"
        print(f"starting {where} (N=3, {MODES[args.mode]['conflict_mode']})...", file=sys.stderr)
        await asyncio.to_thread(cluster.start)
        control = control_for(cluster)
        info = {"nodes": 5, "replicas": 3, "storage": args.storage, "conflict_mode": MODES[args.mode]["conflict_mode"],
                "urls": control.urls, "pids": {n: cluster.pid(n) for n in cluster.node_ids}}
    if isinstance(control, NftClusterControl):
        info["netns"] = control.record()
    progress = ProgressLine(f"[{scenario}/{args.mode}]")
    try:
        result = await run_scenario(spec, control, out, cluster_info=info, progress=progress,
                                    command=" ".join(shlex.quote(a) for a in sys.argv))
    finally:
        progress.done()
        await control.close()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
    counts = {t: sum(1 for e in result.events if e.get("type") == t and e.get("process") != "nemesis")
              for t in ("ok", "fail", "info")}
    print(f"history: {result.history_path}  ({counts['ok']} ok, {counts['fail']} fail, {counts['info']} info)")
    print(f"run:     {result.run_json_path}")
    if not args.no_check:
        try:
            from kvstore.checker.cli import main as check_main
        except ImportError:
            return 0
        model = "cas-register" if args.mode == "linearizable" else "register"
        check_main([str(result.history_path), "--model", model, "--report", str(out / "report")])
    return 0


def main(argv: list[str] | None = None, scenario: str | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if scenario is None and args_list[:1] == ["kill-campaign"]:
        from kvstore.harness.kill_campaign import main as campaign_main

        return campaign_main(args_list[1:])
    prog = f"python chaos/{scenario.replace('-', '_')}.py" if scenario else "kvstore chaos"
    description = SCENARIO_HELP.get(scenario or "", "Run a chaos scenario against a live cluster.")
    if scenario is None:
        description += (" `kvstore chaos kill-campaign` runs the kill -9 acceptance campaign instead "
                        "(see: kvstore chaos kill-campaign --help).")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, scenario)
    args = parser.parse_args(args_list)
    try:
        return run_until_signalled(_run(args, scenario or args.scenario))
    except ClusterError as exc:
        print(f"kvstore chaos: could not start the cluster: {exc}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt):
        print("kvstore chaos: interrupted; faults healed and nodes stopped", file=sys.stderr)
        return 130
