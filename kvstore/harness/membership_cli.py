"""``kvstore cluster join|leave|replace|resume|abort|membership``: membership changes from the shell.

Each command sends one request (never re-sent; ``kvstore.client.admin.AdminClient``) to a member
(``--seed``) with the cluster secret,
then, unless ``--wait 0``, polls ``GET /admin/membership`` on that member until the change is
committed (or stopped with an error), for at most ``--wait`` seconds.  The seed drives the range
move; see docs/membership.md.  Exit codes: 0 done, 1 refused / stopped / unreachable / timed out,
2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from kvstore.client import KVError
from kvstore.client.admin import AdminClient

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class MembershipCommandError(Exception):
    pass


def _request(seed: str, secret: str, method: str, body: Any = None, timeout_s: float = 15.0) -> dict[str, Any]:
    """One ``/admin/membership`` call to ``seed`` through ``kvstore.client.admin`` (sent once)."""

    async def call() -> dict[str, Any]:
        async with AdminClient({"seed": seed}, secret, timeout_s=timeout_s) as admin:
            if method == "GET":
                return (await admin.membership("seed")).to_json()
            return (await admin.change_membership("seed", body)).to_json()

    try:
        return asyncio.run(call())
    except KVError as exc:
        if exc.status is None:
            raise MembershipCommandError(f"cannot reach {seed}: {exc.message}") from None
        raise MembershipCommandError(f"{exc.code}: {exc.message}") from None
    except ValueError as exc:  # a seed that is not an http(s) URL
        raise MembershipCommandError(str(exc)) from None


def _wait(seed: str, secret: str, version: int, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        doc = _request(seed, secret, "GET")
        config, progress = doc["config"], doc["progress"]
        if config["version"] >= version and config["phase"] == "stable" and progress.get("step") == "done":
            return doc
        if "error" in progress:
            raise MembershipCommandError(f"the change stopped at {progress.get('step')}: {progress['error']} "
                                         "(kvstore cluster resume, or abort)")
        if time.monotonic() > deadline:
            raise MembershipCommandError(f"not committed after {wait_s:g} s; progress: {json.dumps(progress)}")
        time.sleep(0.5)


def cmd_membership(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"action": args.action}
    if args.action in ("join", "leave", "replace"):
        body["id"] = args.id
    if args.action == "replace":
        body["by"] = args.by
    if args.action in ("join", "replace"):
        body |= {"host": args.host, "http_port": args.http_port, "peer_port": args.peer_port}
        if args.machine:
            body["machine"] = args.machine
    try:
        if args.action == "show":
            print(json.dumps(_request(args.seed, args.secret, "GET"), indent=2))
            return EXIT_OK
        doc = _request(args.seed, args.secret, "POST", body)
        config = doc["config"]
        print(json.dumps(doc, indent=2))
        if args.action in ("join", "replace"):
            print(f"# start {args.by if args.action == 'replace' else args.id} now, with these members in its "
                  "node.toml (initial_cluster_state = \"new\"):", file=sys.stderr)
            for member, address in sorted(config["members"].items()):
                print(f'[[members]]\nid = "{member}"\nhost = "{address["host"]}"\n'
                      f'http_port = {address["http_port"]}\npeer_port = {address["peer_port"]}'
                      + (f'\nmachine = "{address["machine"]}"' if address.get("machine") else ""), file=sys.stderr)
        if args.wait > 0 and config["phase"] == "joint":
            done = _wait(args.seed, args.secret, int(config["version"]) + 1, args.wait)
            print(f"committed: version {done['config']['version']}, members {done['config']['new']}", file=sys.stderr)
    except MembershipCommandError as exc:
        print(f"kvstore cluster {args.action}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def register(cluster_sub: Any) -> None:
    """Add the membership subcommands to ``kvstore cluster``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", required=True, metavar="URL", help="HTTP URL of a member (it drives the change)")
        p.add_argument("--secret", default=os.environ.get("KVSTORE_SECRET"), required="KVSTORE_SECRET" not in os.environ,
                       help="the cluster secret (default $KVSTORE_SECRET)")
        p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                       help="wait this long for the commit (0: return once the change began; default 300)")

    def address(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", required=True, help="the new node's host (as the others reach it)")
        p.add_argument("--http-port", type=int, required=True, help="the new node's HTTP port")
        p.add_argument("--peer-port", type=int, required=True, help="the new node's peer port")
        p.add_argument("--machine", default="", help="the machine it runs on, if other members run there too "
                       "(replicas go to distinct machines first; default: a machine of its own)")

    p = cluster_sub.add_parser("join", help="add a node: its ranges are streamed to it, then the ring commits")
    p.add_argument("id", help="the new node's id")
    address(p)
    common(p)
    p.set_defaults(handler=cmd_membership, action="join")

    p = cluster_sub.add_parser("leave", help="remove a node: its ranges move to the others first")
    p.add_argument("id", help="the leaving node's id")
    common(p)
    p.set_defaults(handler=cmd_membership, action="leave")

    p = cluster_sub.add_parser("replace", help="replace a node by a new one (one range move)")
    p.add_argument("id", help="the node that leaves")
    p.add_argument("by", help="the new node's id")
    address(p)
    common(p)
    p.set_defaults(handler=cmd_membership, action="replace")

    for action, text in (("resume", "run the remaining steps of a stopped change"),
                         ("abort", "give a stopped change up (back to the old ring)"),
                         ("membership", "show the membership in force and the change's progress")):
        p = cluster_sub.add_parser(action, help=text)
        common(p)
        p.set_defaults(handler=cmd_membership, action="show" if action == "membership" else action)
