"""The ``kvstore`` command line.

Theory of operation
-------------------
``main(argv)`` parses with argparse and dispatches to one handler per
subcommand; it returns the exit status instead of raising ``SystemExit``, so
tests (and ``python -m kvstore``) call it directly.

Exit status: 0 success; 1 an operating error (a node unreachable, a 4xx/5xx
answer, a failed precondition), reported as ONE line on stderr and never as a
traceback; 2 a usage error (argparse's message, or a missing argument we
check ourselves); 3 ``get`` found no value; 4 ``put``/``delete`` was stored
but other live values remain on the key (a put left siblings, a delete did
not delete: it had no context, or a stale one), with a warning on stderr;
130 interrupted.  A traceback
means a bug in kvstore, and is left visible on purpose.

Output: values go to stdout byte-for-byte (so ``kvstore get k > file`` is
exact); notes and warnings go to stderr, except
with ``--json``, which prints one JSON document on stdout for scripts.

Startup is kept cheap (``kvstore --help`` must be instant): this module
imports only the standard library at import time; aiohttp (via
``kvstore.client``), rich and the node/cluster machinery are imported inside
the handler that needs them.

Adding a subcommand: write ``def register_x(sub: Subparsers) -> None`` that
adds a parser and sets ``handler=`` with ``set_defaults``, and append
``("x", register_x)`` to ``COMMANDS``.  A command whose implementation owns its
own argument parsing (``check``, ``chaos``) goes in ``DELEGATED`` instead: it
receives the rest of argv untouched.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from kvstore import __version__

if TYPE_CHECKING:
    from kvstore.client import Client, GetResult, PutResult

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T")

DEFAULT_NODE = "http://127.0.0.1:7001"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_OTHERS_ALIVE = 4  # put/delete stored, but values its context did not cover are still alive
WRITE_COMMANDS = frozenset({"put", "delete", "cas"})

EPILOG = (
    "exit status: 0 ok, 1 operating error (one line on stderr), 2 usage error, 3 key not found (get),\n"
    "4 put/delete stored but other values remain on the key (a put left siblings, a delete did not delete).\n"
    f"--node defaults to $KVSTORE_NODE (comma-separated URLs allowed) or {DEFAULT_NODE}."
)


class UsageError(Exception):
    """A usage problem argparse cannot see (e.g. a missing secret); exit status 2."""


class Formatter(argparse.HelpFormatter):
    """Wraps descriptions and epilogs to the terminal but keeps their explicit line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text  # bound here: zero-argument super() does not work inside a comprehension
        return "\n".join(fill(line, width, indent) for line in text.splitlines())


# --------------------------------------------------------------------------- shared option groups


def quorum_arg(text: str) -> int | str:
    word = text.strip().lower()
    if word in ("one", "quorum", "all"):
        return word
    try:
        value = int(word)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or one|quorum|all, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--node", action="append", metavar="URL",
        help=f"a node to talk to; repeat for failover (default $KVSTORE_NODE or {DEFAULT_NODE})",
    )
    group.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                       help="per-attempt timeout (default 5)")
    group.add_argument("--cacert", metavar="PEM", default=os.environ.get("KVSTORE_CACERT"),
                       help="the CA that signed the nodes' certificates, for https:// nodes (default $KVSTORE_CACERT)")
    return parent


def consistency_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("consistency")
    group.add_argument("--consistency", choices=["eventual", "quorum", "linearizable"],
                       help="consistency level (default: the node's)")
    group.add_argument("--sloppy", action=argparse.BooleanOptionalAction, default=None,
                       help="allow fallback replicas (hinted handoff); default: the node's")
    return parent


def node_urls(args: argparse.Namespace) -> list[str]:
    if args.node:
        urls = [u for item in args.node for u in item.split(",")]
    else:
        urls = os.environ.get("KVSTORE_NODE", DEFAULT_NODE).split(",")
    urls = [u.strip() for u in urls if u.strip()]
    if not urls:
        raise UsageError("no node URL given (--node or $KVSTORE_NODE)")
    return urls


def with_client(args: argparse.Namespace, use: Callable[[Client], Awaitable[T]], *, secret: str | None = None) -> T:
    """Run ``use(client)`` on a fresh event loop with a client for ``--node``/``--timeout``."""
    import asyncio

    from kvstore.client import Client

    try:
        client = Client(node_urls(args), timeout_s=args.timeout, secret=secret, ca_file=args.cacert)
    except ValueError as exc:  # a malformed --node URL
        raise UsageError(str(exc)) from None
    except OSError as exc:  # --cacert unreadable or not PEM (ssl.SSLError is an OSError)
        raise UsageError(f"--cacert {args.cacert}: {exc}") from None

    async def run() -> T:
        async with client:
            return await use(client)

    return asyncio.run(run())


# --------------------------------------------------------------------------- output helpers


def display(value: bytes) -> str:
    """A value as one line of text: itself if it is printable UTF-8, else ``base64:...``."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return text
    return "base64:" + base64.b64encode(value).decode("ascii")


def value_json(value: bytes) -> dict[str, Any]:
    try:
        text: str | None = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"value": text, "value_b64": base64.b64encode(value).decode("ascii")}


def write_stdout(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")  # for a person at a terminal only: piped output stays exact
    sys.stdout.buffer.flush()


def note(text: str) -> None:
    print(text, file=sys.stderr)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def report_write(result: PutResult) -> None:
    if result.context:
        print(f"context: {result.context}")
    if result.etag:
        print(f"etag: {result.etag}")


def read_value(arg: str) -> bytes:
    return sys.stdin.buffer.read() if arg == "-" else arg.encode("utf-8")


# --------------------------------------------------------------------------- key-value commands


def cmd_get(args: argparse.Namespace) -> int:
    got: GetResult = with_client(
        args, lambda kv: kv.get(args.key, r=args.r, consistency=args.consistency, sloppy=args.sloppy)
    )
    if args.json:
        print_json({
            "key": args.key,
            "found": got.found,
            **(value_json(got.value) if got.value is not None else {"value": None, "value_b64": None}),
            "siblings": [{**value_json(s.value), "timestamp_ns": s.timestamp_ns} for s in got.siblings],
            "context": got.context,
            "etag": got.etag,
            "node": got.node,
        })
        return EXIT_OK if got.found else EXIT_NOT_FOUND
    if not got.found:
        note(f"kvstore get: {args.key!r} not found")
        return EXIT_NOT_FOUND
    if got.conflict:
        for index, sibling in enumerate(got.siblings):
            print(f"[{index}] {display(sibling.value)}")
        print(f"context: {got.context}")
        note(f"{len(got.siblings)} siblings (concurrent writes): to resolve, put the value to keep "
             f"with --context {got.context}")
        return EXIT_OK
    assert got.value is not None
    write_stdout(got.value)
    note(f"context: {got.context}  etag: {got.etag}")
    return EXIT_OK


async def context_for(kv: Client, args: argparse.Namespace) -> str | None:
    """--context as given, or with --read-first the context of a fresh read of the key."""
    if not args.read_first:
        result: str | None = args.context
        return result
    got = await kv.get(args.key, consistency=args.consistency, sloppy=args.sloppy)
    return got.context


def check_others(args: argparse.Namespace, result: PutResult, deleting: bool) -> int:
    """Exit 4 with a warning when the write left values its context did not cover (PutResult.others)."""
    if not result.others:
        return EXIT_OK
    why = ("the context given did not cover them: it is stale, or another client wrote concurrently"
           if args.context or args.read_first else "no --context was given, so the write is concurrent with them")
    plural = "s" if result.others > 1 else ""
    if deleting:
        note(f"kvstore delete: warning: {args.key!r} was NOT deleted: {result.others} value{plural} still "
             f"alive ({why}); run it again with --read-first, or with --context from a get")
    else:
        note(f"kvstore put: warning: {args.key!r} now has {result.siblings} live values: {result.others} "
             f"other value{plural} survive beside this one as siblings ({why}); use --read-first, or "
             f"--context from a get")
    return EXIT_OTHERS_ALIVE


def cmd_put(args: argparse.Namespace) -> int:
    value = read_value(args.value)

    async def put(kv: Client) -> PutResult:
        return await kv.put(
            args.key, value, context=await context_for(kv, args), w=args.w, consistency=args.consistency,
            sloppy=args.sloppy, if_match=args.if_match, if_absent=args.if_absent,
        )

    result: PutResult = with_client(args, put)
    report_write(result)
    return check_others(args, result, deleting=False)


def cmd_delete(args: argparse.Namespace) -> int:
    async def delete(kv: Client) -> PutResult:
        return await kv.delete(
            args.key, context=await context_for(kv, args), w=args.w, consistency=args.consistency,
            sloppy=args.sloppy,
        )

    result: PutResult = with_client(args, delete)
    report_write(result)
    return check_others(args, result, deleting=True)


def cmd_cas(args: argparse.Namespace) -> int:
    result: PutResult = with_client(args, lambda kv: kv.cas(
        args.key, args.expected.encode("utf-8"), args.new.encode("utf-8"), w=args.w, consistency=args.consistency,
    ))
    report_write(result)
    return EXIT_OK


def context_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--context", help="the causal context from a previous get")
    group.add_argument("--read-first", action="store_true",
                       help="read KEY first and write with the context that read returns (it supersedes "
                            "every value the read saw)")


def register_kv(sub: Subparsers) -> None:
    conn, cons = connection_options(), consistency_options()

    p = sub.add_parser("get", parents=[conn, cons], help="read a key",
                       description="Print the value of KEY (or its siblings, one per line, and the context).",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("key", metavar="KEY")
    p.add_argument("--r", type=quorum_arg, help="read quorum: 1..N or one|quorum|all")
    p.add_argument("--json", action="store_true", help="print one JSON object (values as text and base64)")
    p.set_defaults(handler=cmd_get)

    p = sub.add_parser("put", parents=[conn, cons], help="write a key",
                       description="Write VALUE (or stdin with '-') to KEY.  Pass the --context of the read "
                                   "the write is based on (or --read-first): without it the write is "
                                   "concurrent with what is stored, the old value survives as a sibling, and "
                                   "the command warns and exits 4.",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", help="the value as UTF-8 text, or - to read bytes from stdin")
    context_options(p)
    p.add_argument("--w", type=quorum_arg, help="write quorum: 1..N or one|quorum|all")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--if-match", metavar="ETAG", help="write only if the current value has this ETag")
    cond.add_argument("--if-absent", action="store_true", help="write only if the key has no value")
    p.set_defaults(handler=cmd_put)

    p = sub.add_parser("delete", parents=[conn, cons], help="delete a key (writes a tombstone)",
                       description="Write a tombstone for KEY.  Pass the --context of a read (or --read-first): "
                                   "a delete without it is concurrent with the stored value, which then "
                                   "survives; the command says so and exits 4.",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("key", metavar="KEY")
    context_options(p)
    p.add_argument("--w", type=quorum_arg, help="write quorum: 1..N or one|quorum|all")
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("cas", parents=[conn], help="compare-and-set",
                       description="Set KEY to NEW only if its current value is EXPECTED (both UTF-8 text).",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("key", metavar="KEY")
    p.add_argument("expected", metavar="EXPECTED")
    p.add_argument("new", metavar="NEW")
    p.add_argument("--w", type=quorum_arg, help="write quorum: 1..N or one|quorum|all")
    p.add_argument("--consistency", choices=["eventual", "quorum", "linearizable"],
                   help="default linearizable (the only level the node offers compare-and-set at)")
    p.set_defaults(handler=cmd_cas)


# --------------------------------------------------------------------------- cluster commands


def cmd_status(args: argparse.Namespace) -> int:
    if args.key is not None:
        return print_placement(args)
    info: dict[str, Any] = with_client(args, lambda kv: kv.cluster())
    if args.json:
        print_json(info)
        return EXIT_OK
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    hints = info.get("pending_hints") or {}
    table = Table(title=f"kvstore cluster as seen by {info.get('node', '?')}")
    table.add_column("id")
    table.add_column("url", no_wrap=True)
    table.add_column("state")
    table.add_column("phi", justify="right")
    table.add_column("ownership", justify="right")
    table.add_column("pending hints", justify="right")
    table.add_column("link")
    machines = {str(m.get("id")): str(m.get("machine", m.get("id"))) for m in info.get("members", [])}
    named = any(machine != member for member, machine in machines.items())
    if named:
        table.add_column("machine")
    for member in info.get("members", []):
        state = str(member.get("state", "?"))
        phi = member.get("phi")
        ownership = member.get("ownership")
        table.add_row(
            str(member.get("id", "?")),
            str(member.get("url", "?")),
            f"[green]{state}[/green]" if state == "up" else f"[red]{state}[/red]",
            "-" if phi is None else f"{phi:.2f}",
            "-" if ownership is None else f"{ownership:.2f}%",
            str(hints.get(member.get("id"), 0)),
            escape(link_summary(member.get("link"))),
            *([escape(machines[str(member.get("id"))])] if named else []),
        )
    console = Console(highlight=False)
    console.print(table)
    for member in info.get("members", []):
        for line in link_details(member):
            console.print("[red]refused[/red] " + escape(line))
    for stranger in info.get("refused_peers") or []:
        console.print(f"[red]refused[/red] a non-member: {escape(repr(stranger.get('id')))} "
                      + escape(refusal_text(stranger)))
    settings = ("replicas", "r", "w", "vnodes", "conflict_mode", "consistency")
    n, r, w, vnodes, mode, consistency = (info.get(k, "?") for k in settings)
    console.print(f"N={n} R={r} W={w}  vnodes={vnodes}  conflict_mode={mode}  consistency={consistency}")
    warning = machines_warning(machines, n)
    if warning:
        console.print("[red]WARNING[/red] " + escape(warning))
    return EXIT_OK


def machines_warning(machines: dict[str, str], replicas: Any) -> str | None:
    """Why some keys keep more than one replica on one machine, or None (kvstore.protocol.ring)."""
    distinct = sorted(set(machines.values()))
    if not isinstance(replicas, int) or len(distinct) >= replicas:
        return None
    return (f"N={replicas} but the members run on {len(distinct)} machine(s) ({', '.join(distinct)}): every key "
            "keeps more than one replica on one machine, and that machine failing takes them together")


def print_placement(args: argparse.Namespace) -> int:
    """``kvstore status --key K``: where the key lives, as the answering node sees it."""
    where: dict[str, Any] = with_client(args, lambda kv: kv.placement(args.key))
    if args.json:
        print_json(where)
        return EXIT_OK
    down = set(where.get("primaries_down", []))
    stand_ins = {f["stands_in_for"]: f["id"] for f in where.get("fallbacks", []) if f.get("stands_in_for")}
    print(f"key {where.get('key')!r}  token {where.get('token')}  (vnode {where.get('vnode_token')}), "
          f"as seen by {where.get('node')}")
    machines: dict[str, str] = where.get("machines", {})
    for rank, member in enumerate(where.get("preference_list", []), start=1):
        on = f" on {machines[member]}" if machines.get(member, member) != member else ""
        if member in down:
            extra = f"  -> writes go to {stand_ins[member]} (a hint)" if member in stand_ins else "  (no stand-in up)"
            print(f"  primary {rank}: {member}{on}  DOWN{extra}")
        else:
            print(f"  primary {rank}: {member}{on}  up")
    for machine in where.get("shared_machines", []):
        sharing = [m for m in where.get("preference_list", []) if machines.get(m) == machine]
        print(f"  WARNING: replicas {', '.join(sharing)} share machine {machine}: the cluster has fewer machines "
              "than N, and that machine failing takes them all")
    fallbacks = ", ".join(f"{f['id']}{'' if f.get('up') else ' (down)'}" for f in where.get("fallbacks", []))
    print(f"  fallbacks in order: {fallbacks or '-'}")
    majority = "yes" if where.get("majority_reachable") else "NO: quorum and linearizable requests refuse here"
    print(f"  a majority of the primaries is reachable: {majority}")
    return EXIT_OK


def refusal_text(refusal: dict[str, Any]) -> str:
    """``unauthorized since 2026-01-02T12:00:01Z (42 times, last 0.2 s ago, from 10.0.0.3:5123): why``"""
    where = f", from {refusal['address']}" if refusal.get("address") else ""
    return (f"{refusal.get('code')} since {refusal.get('since')} ({refusal.get('count')} times, last "
            f"{refusal.get('last_s_ago')} s ago{where}): {refusal.get('message')}")


LINK_DIRECTIONS = (("they_refuse_us", "it refuses us"), ("we_refuse_them", "we refuse it"))


def link_summary(link: Any) -> str:
    """The table's link column: who refuses whom, by code ("ok" when neither side refuses)."""
    if not isinstance(link, dict):
        return ""
    out, incoming = link.get("they_refuse_us"), link.get("we_refuse_them")
    if out and incoming:
        codes = {out.get("code"), incoming.get("code")}
        return f"both ways: {'/'.join(sorted(map(str, codes)))}"
    if out:
        return f"refuses us: {out.get('code')}"
    if incoming:
        return f"we refuse: {incoming.get('code')}"
    return "ok"


def link_details(member: dict[str, Any]) -> list[str]:
    """One line per refused direction of a member's link, with the reason and since when."""
    link = member.get("link")
    if not isinstance(link, dict):
        return []
    return [f"{member.get('id')}: {words}: {refusal_text(link[key])}" for key, words in LINK_DIRECTIONS
            if link.get(key)]


def cmd_repair(args: argparse.Namespace) -> int:
    if not args.secret:
        raise UsageError("the admin route needs the cluster secret: --secret or $KVSTORE_SECRET")
    result: dict[str, Any] = with_client(args, lambda kv: kv.repair(), secret=args.secret)
    print_json(result)
    return EXIT_OK


def register_admin(sub: Subparsers) -> None:
    conn = connection_options()
    p = sub.add_parser("status", parents=[conn], help="show cluster membership and settings",
                       description="A table of members (state, phi, ring ownership, pending hints, refused links) and N/R/W.",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("--json", action="store_true", help="print GET /cluster as JSON")
    p.add_argument("--key", metavar="K", help="where key K lives: token, preference list, stand-ins "
                                              "(GET /cluster/keys/K/placement)")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("repair", parents=[conn], help="start an anti-entropy round on a node",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("--secret", default=os.environ.get("KVSTORE_SECRET"),
                   help="the cluster secret (default $KVSTORE_SECRET)")
    p.set_defaults(handler=cmd_repair)


# --------------------------------------------------------------------------- running nodes


def cmd_node(args: argparse.Namespace) -> int:
    from kvstore.server.app import run_node

    return run_node(args.config)


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from kvstore.harness.local_cluster import cluster_up

    return cluster_up(args)


def cmd_cluster_stop(args: argparse.Namespace) -> int:
    from kvstore.harness import cluster_control

    try:
        stopped = cluster_control.stop(args.data_dir, grace_s=args.grace)
    except cluster_control.ControlError as exc:
        note(f"kvstore cluster stop: {exc}")
        return EXIT_ERROR
    print(f"kvstore: stopped {', '.join(stopped)}" if stopped else "kvstore: no node of this cluster was running")
    return EXIT_OK


def cmd_cluster_restart(args: argparse.Namespace) -> int:
    from kvstore.harness import cluster_control

    try:
        record = cluster_control.restart(args.data_dir, args.node_id, timeout_s=args.timeout, grace_s=args.grace)
    except cluster_control.ControlError as exc:
        note(f"kvstore cluster restart: {exc}")
        return EXIT_ERROR
    print(f"kvstore: {args.node_id} restarted, pid {record.pid}, {record.url}")
    return EXIT_OK


def register_nodes(sub: Subparsers) -> None:
    p = sub.add_parser("node", help="run one node in the foreground",
                       description="Run one node from its TOML config until SIGINT/SIGTERM.")
    p.add_argument("--config", required=True, metavar="PATH", help="the node's TOML config file")
    p.set_defaults(handler=cmd_node)

    p = sub.add_parser("cluster", help="local clusters (see: kvstore cluster up --help)")
    cluster_sub = p.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    up = cluster_sub.add_parser(
        "up", help="start N local node processes on 127.0.0.1; Ctrl-C stops them all",
        description="Start a local cluster of node processes on 127.0.0.1 and keep it up until Ctrl-C.",
    )
    up.add_argument("--nodes", type=positive_int, default=5, help="number of nodes (default 5)")
    up.add_argument("--replicas", type=positive_int, default=3, help="N, replicas per key (default 3)")
    up.add_argument("--data-dir", metavar="DIR", help="where node data and logs go (default: a temp dir)")
    up.add_argument("--base-port", type=positive_int, metavar="PORT", default=7001,
                    help="first HTTP port; node i serves HTTP on PORT+i-1 and peers on PORT+100+i-1 (default 7001)")
    up.add_argument("--storage", choices=["sqlite", "memory"], default="sqlite", help="storage engine (default sqlite)")
    up.add_argument("--fsync", choices=["always", "batch", "never"], default="batch",
                    help="durability of sqlite writes (default batch)")
    up.add_argument("--vnodes", type=positive_int, default=256, help="virtual nodes per member (default 256)")
    up.add_argument("--nodes-per-machine", type=positive_int, default=1, metavar="K",
                    help="name machines m1, m2, ... for each K consecutive nodes, as one node per core on "
                         "shared hosts would be: replicas go to distinct machines first (default 1: each node "
                         "its own machine; docs/deployment.md, 'Using more cores')")
    up.add_argument("--conflict-mode", choices=["siblings", "lww"], default="siblings",
                    help="keep concurrent writes as siblings, or last-write-wins (default siblings)")
    up.add_argument("--r", type=positive_int, help="default read quorum (default min(2, N))")
    up.add_argument("--w", type=positive_int, help="default write quorum (default min(2, N))")
    up.add_argument("--netns", action="store_true",
                    help="root, Linux: each node in its own network namespace with its own address on a bridge "
                         "(every node then uses PORT and PORT+100 on its own address; docs/netns.md)")
    up.add_argument("--detach", action="store_true",
                    help="return once the nodes are up and leave them running (state in DATA_DIR/cluster.json; "
                         "see: kvstore cluster stop, kvstore cluster restart)")
    up.set_defaults(handler=cmd_cluster_up)

    stop = cluster_sub.add_parser(
        "stop", help="stop a cluster started with --detach (by the PIDs in its data dir)",
        description="Stop every node of the detached cluster in DATA_DIR: SIGTERM, then SIGKILL after the grace "
                    "period. Only PIDs recorded in DATA_DIR/cluster.json that still run that node are signalled.",
    )
    stop.add_argument("--data-dir", required=True, metavar="DIR", help="the data dir given to cluster up --detach")
    stop.add_argument("--grace", type=positive_float, default=10.0, metavar="SECONDS",
                      help="time to exit after SIGTERM before SIGKILL (default 10)")
    stop.set_defaults(handler=cmd_cluster_stop)

    restart = cluster_sub.add_parser(
        "restart", help="restart one node of a cluster started with --detach",
        description="Stop NODE (if it runs) and start it again from its node.toml, then wait until it is healthy.",
    )
    restart.add_argument("node_id", metavar="NODE", help="the node's id, e.g. n2")
    restart.add_argument("--data-dir", required=True, metavar="DIR", help="the data dir given to cluster up --detach")
    restart.add_argument("--grace", type=positive_float, default=10.0, metavar="SECONDS",
                         help="time to exit after SIGTERM before SIGKILL (default 10)")
    restart.add_argument("--timeout", type=positive_float, default=30.0, metavar="SECONDS",
                         help="how long to wait for it to become healthy (default 30)")
    restart.set_defaults(handler=cmd_cluster_restart)

    from kvstore.harness.membership_cli import register as register_membership

    register_membership(cluster_sub)


# --------------------------------------------------------------------------- registry and entry point

COMMANDS: list[tuple[str, Callable[[Subparsers], None]]] = [
    ("kv", register_kv),
    ("admin", register_admin),
    ("nodes", register_nodes),
]

# name -> (module with main(argv) -> int, one-line help).  They parse their own arguments.
DELEGATED: dict[str, tuple[str, str]] = {
    "explore": ("kvstore.explore.matrix", "run CP and AP side by side under faults and report the trade-off "
                "(--serve: live, in the browser)"),
    "ui": ("kvstore.ui.cli", "the live CAP explorer in the browser, on an existing cluster"),
    "check": ("kvstore.checker.cli", "check a recorded history for consistency anomalies"),
    "chaos": ("kvstore.harness.cli", "run a fault-injection scenario against a local cluster"),
    "sim": ("kvstore.sim.cli", "deterministic chaos runs on a simulated cluster: one seed, or a sweep of seeds"),
    "bench": ("benchmarks.run", "measure throughput, latency, recovery and memory against baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="kvstore: a Dynamo-style key-value store with tunable consistency (a CAP explorer).",
        epilog=EPILOG, formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, register in COMMANDS:
        register(sub)
    for name, (_module, help_text) in DELEGATED.items():
        # Listed for --help only: main() hands these their argv before argparse sees it.
        sub.add_parser(name, help=help_text + f" (see: kvstore {name} --help)", add_help=False)
    return parser


# Delegated commands whose code lives in the source checkout, not in the installed package.
CHECKOUT_ONLY = {"bench": "benchmarks"}


def checkout_root() -> Path | None:
    """The source checkout this kvstore runs from (editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def run_delegated(name: str, argv: list[str]) -> int:
    module_name, _help = DELEGATED[name]
    if name in CHECKOUT_ONLY:
        top = CHECKOUT_ONLY[name]
        root = checkout_root()
        if root is None or not (root / top).is_dir():
            note(f"kvstore {name}: runs from a source checkout ({top}/ is not installed with the package); "
                 f"clone the repository, `pip install -e .` there and run `kvstore {name}` again")
            return EXIT_ERROR
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only "that module is not installed" is an operating error; a missing import inside it is a bug.
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        note(f"kvstore {name}: not available in this installation ({module_name} is missing)")
        return EXIT_ERROR
    result = module.main(argv)
    return int(result or 0)


def one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in DELEGATED:
            return run_delegated(args_list[0], args_list[1:])
        parser = build_parser()
        args = parser.parse_args(args_list)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return run_handler(args, handler)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2); sys.exit("message") from a command
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        note(str(exc.code))  # what the interpreter would have printed, had we not caught it
        return EXIT_ERROR
    except KeyboardInterrupt:
        note("kvstore: interrupted")
        return EXIT_INTERRUPTED


def run_handler(args: argparse.Namespace, handler: Handler) -> int:
    from kvstore.client import KVError, NodeUnreachable

    name = "kvstore " + " ".join(a for a in (args.command, getattr(args, "cluster_command", None)) if a)
    try:
        return handler(args)
    except UsageError as exc:
        note(f"{name}: {exc}")
        return EXIT_USAGE
    except NodeUnreachable as exc:
        note(f"{name}: {one_line(exc.message)}; is a node running there? (--node or $KVSTORE_NODE)")
        return EXIT_ERROR
    except KVError as exc:
        # The server's message already speaks for itself when it says indeterminate; otherwise the client
        # knows more than the message (an earlier copy may have landed, or a 5xx struck mid-write).
        writes = args.command in WRITE_COMMANDS
        unknown = (writes and exc.indeterminate and exc.code != "indeterminate"
                   and exc.body.get("indeterminate") is not True)
        suffix = " (outcome unknown: the write may have been applied)" if unknown else ""
        note(f"{name}: {one_line(str(exc))}{suffix}")
        return EXIT_ERROR
    except BrokenPipeError:  # `kvstore get k | head -c1`: the reader left; not an error worth a traceback
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
