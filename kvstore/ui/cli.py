"""``kvstore explore --serve`` (own local clusters) and ``kvstore ui --node URL`` (an existing one).

Theory of operation
-------------------
Both parse their own arguments and run ``server.serve`` under ``run_until_signalled``, so
Ctrl-C or SIGTERM heals the faults and stops the clusters this command started (by PID)
before it exits.  The URL is printed as soon as the page is served (before the clusters are
up: the page shows their start), and opened in a browser with the standard ``webbrowser``
module unless ``--no-browser``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kvstore.harness.signals import Interrupted, run_until_signalled
from kvstore.harness.workload import MODES

DEFAULT_MODES = ["eventual", "eventual-lww", "quorum", "linearizable"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free one), got {value}")
    return value


def build_parser(prog: str, attach: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    if attach:
        parser.description = ("Open the live CAP explorer on an existing cluster: the ring, the network, a workload "
                              "per consistency mode and the checker's verdicts, live in the browser.")
        parser.add_argument("--node", action="append", required=True, metavar="URL",
                            help="a node of the cluster (repeat, or a comma list; the others are found from it)")
        parser.add_argument("--secret", default=os.environ.get("KVSTORE_SECRET"),
                            help="the cluster secret, for faults and replica probes (default $KVSTORE_SECRET; "
                                 "without it the page can watch but not break)")
    else:
        parser.description = ("Start local clusters and open the live CAP explorer in the browser: cut the network "
                              "with a click and watch each consistency mode answer or refuse, live.")
        parser.add_argument("--serve", action="store_true", help="(this mode)")
        parser.add_argument("--cluster-nodes", type=_positive_int, default=5, help="nodes per cluster (default 5)")
        parser.add_argument("--replicas", type=_positive_int, default=3, help="N, replicas per key (default 3)")
    parser.add_argument("--modes", default=None,
                        help=f"comma list (default {','.join(DEFAULT_MODES)}; known: {','.join(MODES)})")
    parser.add_argument("--port", type=_port, default=0, help="HTTP port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    parser.add_argument("--seed", type=int, default=7, help="seed for the faults' choices and the clients (default 7)")
    parser.add_argument("--clients", type=_positive_int, default=5, help="clients per mode (default 5)")
    parser.add_argument("--rate", type=_positive_float, default=20.0,
                        help="ops/s per mode, over its clients (default 20)")
    parser.add_argument("--keys", type=_positive_int, default=5, help="keys per mode (default 5)")
    parser.add_argument("--minutes", type=_positive_float, default=15.0,
                        help="a run's workload stops after this long (default 15; the page starts another)")
    parser.add_argument("--out", default=None, help="where the histories go (default: a temporary directory)")
    return parser


def _modes(text: str | None, prog: str) -> list[str]:
    if not text:
        return list(DEFAULT_MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"{prog}: unknown mode: {', '.join(unknown) or '(none)'} (known: {', '.join(MODES)})")
    return list(dict.fromkeys(modes))


def _run(args: argparse.Namespace, prog: str, attach_urls: list[str], secret: str | None) -> int:
    from kvstore.ui.server import serve
    from kvstore.ui.session import LiveSession, SessionConfig

    cfg = SessionConfig(
        modes=_modes(args.modes, prog), seed=args.seed, clients=args.clients, rate_per_s=args.rate,
        keys=args.keys, nodes=getattr(args, "cluster_nodes", 5), replicas=getattr(args, "replicas", 3),
        max_minutes=args.minutes, out_dir=Path(args.out) if args.out else None,
        attach_urls=attach_urls, secret=secret,
    )
    if not attach_urls and cfg.replicas > cfg.nodes:
        raise SystemExit(f"{prog}: --replicas {cfg.replicas} needs at least as many --cluster-nodes")
    session = LiveSession(cfg)
    try:
        return run_until_signalled(serve(session, "127.0.0.1", args.port, not args.no_browser))
    except (Interrupted, KeyboardInterrupt):
        print(f"\n{prog}: interrupted; faults healed and clusters stopped", file=sys.stderr)
        return 130


def serve_main(argv: list[str]) -> int:
    """``kvstore explore --serve [...]``."""
    prog = "kvstore explore --serve"
    args = build_parser("kvstore explore", attach=False).parse_args(argv)
    return _run(args, prog, [], None)


def main(argv: list[str] | None = None) -> int:
    """``kvstore ui --node URL [...]``."""
    prog = "kvstore ui"
    args = build_parser(prog, attach=True).parse_args(sys.argv[1:] if argv is None else argv)
    urls = [u.strip().rstrip("/") for item in args.node for u in item.split(",") if u.strip()]
    if not urls:
        raise SystemExit(f"{prog}: --node needs a URL")
    return _run(args, prog, urls, args.secret)
