"""The ``kvstore`` command: help, usage errors, and the client commands against a fake node."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import cli
from kvstore.cli import main
from kvstore.client import etag_of
from tests.test_client import Canned, FakeNode, Recorded, Script, ctx, dead_url, siblings_reply

SUBCOMMANDS = [
    [], ["get"], ["put"], ["delete"], ["cas"], ["status"], ["repair"], ["node"], ["cluster"], ["cluster", "up"],
]


@pytest.fixture
def fake() -> Iterator[FakeNode]:
    node = FakeNode().start()
    yield node
    node.stop()
    assert not node.spec_violations, node.spec_violations


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_NODE", raising=False)
    monkeypatch.delenv("KVSTORE_SECRET", raising=False)


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "top")
def test_help_exits_zero(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvstore" + "".join(" " + w for w in words))


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("get", "put", "delete", "cas", "status", "repair", "node", "cluster", "check", "chaos", "explore", "bench"):
        assert f"\n    {name} " in out, name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kvstore {cli.__version__}"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "usage: kvstore"),
        (["get"], "the following arguments are required: KEY"),
        (["put", "k"], "the following arguments are required: VALUE"),
        (["cas", "k", "a"], "the following arguments are required: NEW"),
        (["get", "k", "--r", "zero"], "expected an integer or one|quorum|all"),
        (["get", "k", "--r", "0"], "must be at least 1"),
        (["put", "k", "v", "--if-match", "x", "--if-absent"], "not allowed with argument"),
        (["get", "k", "--consistency", "strong"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["cluster"], "required: SUBCOMMAND"),
        (["cluster", "up", "--nodes", "0"], "must be at least 1"),
        (["node"], "the following arguments are required: --config"),
        (["get", "k", "--node", "localhost:7001"], "node URL must look like http://host:port"),
        (["repair", "--node", "http://127.0.0.1:1"], "--secret or $KVSTORE_SECRET"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert complaint in err and "Traceback" not in err


def test_connection_refused_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    dead = dead_url()
    for argv in (["get", "k"], ["put", "k", "v"], ["status"], ["delete", "k"]):
        assert main([*argv, "--node", dead]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert_one_line_error(captured.err, f"kvstore {argv[0]}:", "could not reach any node", dead)


# --------------------------------------------------------------------------- key-value commands


def test_put_then_get(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["put", "user:42", "hello", "--node", fake.url, "--w", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"context: {ctx(1)}", f"etag: {etag_of(b'hello')}"]
    assert fake.requests[-1].query["w"] == "2" and fake.store["user:42"] == b"hello"

    assert main(["get", "user:42", "--node", fake.url, "--r", "quorum", "--consistency", "quorum"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hello", "the value goes to stdout byte for byte"
    assert f"context: {ctx(1)}" in captured.err and etag_of(b"hello") in captured.err
    assert fake.requests[-1].query["r"] == "quorum" and fake.requests[-1].query["consistency"] == "quorum"


def test_put_reads_binary_stdin_and_get_writes_it_back_exactly(
    fake: FakeNode, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = bytes(range(256))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(blob)))
    assert main(["put", "bin", "-", "--node", fake.url]) == 0
    assert fake.store["bin"] == blob
    capsysbinary.readouterr()
    assert main(["get", "bin", "--node", fake.url]) == 0
    assert capsysbinary.readouterr().out == blob


def test_put_passes_context_and_conditions(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["put", "k", "v1", "--node", fake.url, "--if-absent"]) == 0
    assert main(["put", "k", "v2", "--node", fake.url, "--context", ctx(1), "--if-match",
                 etag_of(b"v1").strip('"'), "--no-sloppy"]) == 0
    first, second = fake.requests
    assert first.headers["If-None-Match"] == "*" and first.query["consistency"] == "linearizable"
    assert second.headers["If-Match"] == etag_of(b"v1") and second.headers["X-Context"] == ctx(1)
    assert second.query["sloppy"] == "false"
    assert fake.store["k"] == b"v2"


def test_get_json(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.store["k"] = b"caf\xc3\xa9"
    assert main(["get", "k", "--json", "--node", fake.url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["found"] is True and data["value"] == "café" and data["value_b64"] == "Y2Fmw6k="
    assert data["etag"] == etag_of(b"caf\xc3\xa9") and data["node"] == fake.url
    assert data["siblings"] == [{"value": "café", "value_b64": "Y2Fmw6k=", "timestamp_ns": None}]


def test_get_siblings_prints_each_with_its_index_and_the_context(
    fake: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.script = lambda rec: siblings_reply((b"left", 1), (b"\xff\x00", 2))
    assert main(["get", "k", "--node", fake.url]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["[0] left", "[1] base64:/wA=", f"context: {ctx(9)}"]
    assert "2 siblings" in captured.err

    assert main(["get", "k", "--json", "--node", fake.url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["value"] is None and [s["timestamp_ns"] for s in data["siblings"]] == [1, 2]
    assert data["siblings"][1] == {"value": None, "value_b64": "/wA=", "timestamp_ns": 2}


def test_get_not_found_exits_3(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "nope", "--node", fake.url]) == 3
    captured = capsys.readouterr()
    assert captured.out == "" and "not found" in captured.err
    assert main(["get", "nope", "--node", fake.url, "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["found"] is False


def test_delete_and_cas(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.store["k"] = b"old"
    assert main(["cas", "k", "old", "new", "--node", fake.url]) == 0
    assert fake.store["k"] == b"new"
    assert fake.requests[-1].headers["If-Match"] == etag_of(b"old")
    assert main(["delete", "k", "--node", fake.url, "--context", ctx(1), "--w", "all"]) == 0
    assert "k" not in fake.store and fake.requests[-1].query["w"] == "all"
    assert capsys.readouterr().out.splitlines()[-1] == f"context: {ctx(2)}"


def written(siblings: int) -> Script:
    """A node that stores the write but reports ``siblings`` live values afterwards."""
    def script(rec: Recorded) -> Canned | None:
        if rec.method == "GET":
            return None
        return Canned(204, headers={"X-Context": ctx(7), "X-Siblings": str(siblings),
                                    **({"ETag": etag_of(rec.body)} if rec.method == "PUT" else {})})
    return script


def test_a_delete_that_did_not_delete_warns_and_exits_4(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = written(siblings=1)
    assert main(["delete", "k", "--node", fake.url]) == 4
    assert_one_line_error(capsys.readouterr().err, "kvstore delete: warning:", "'k' was NOT deleted",
                          "1 value still alive", "no --context", "--read-first")
    assert main(["delete", "k", "--node", fake.url, "--context", ctx(1)]) == 4
    assert_one_line_error(capsys.readouterr().err, "NOT deleted", "stale")


def test_a_put_that_left_siblings_warns_and_exits_4(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = written(siblings=3)
    assert main(["put", "k", "v", "--node", fake.url]) == 4
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"context: {ctx(7)}", "the write itself is reported as usual"
    assert_one_line_error(captured.err, "kvstore put: warning:", "3 live values", "2 other values survive",
                          "--read-first")


def test_writes_that_left_nothing_else_alive_exit_0(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.store["k"] = b"old"
    assert main(["put", "k", "new", "--node", fake.url, "--context", ctx(0)]) == 0  # X-Siblings: 1
    assert main(["delete", "k", "--node", fake.url, "--context", ctx(1)]) == 0  # X-Siblings: 0
    assert main(["put", "lin", "v", "--node", fake.url, "--consistency", "linearizable"]) == 0  # no header
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["delete", "k"], ["put", "k", "new"]])
def test_read_first_writes_with_the_context_of_a_fresh_read(
    fake: FakeNode, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    fake.store["k"] = b"old"
    fake.version = 5
    assert main([*command, "--read-first", "--node", fake.url, "--consistency", "quorum"]) == 0
    read, write = fake.requests
    assert read.method == "GET" and read.query["consistency"] == "quorum"
    assert write.method == command[0].upper() and write.headers["X-Context"] == ctx(5)
    assert "warning" not in capsys.readouterr().err


def test_read_first_on_a_missing_key_writes_without_a_context(fake: FakeNode) -> None:
    assert main(["put", "fresh", "v", "--read-first", "--node", fake.url]) == 0
    read, write = fake.requests
    assert read.method == "GET" and "X-Context" not in write.headers and fake.store["fresh"] == b"v"


def test_read_first_and_context_are_exclusive(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delete", "k", "--read-first", "--context", ctx(1), "--node", fake.url]) == 2
    assert "not allowed with" in capsys.readouterr().err and fake.requests == []


def test_cas_mismatch_is_a_one_line_error(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.store["k"] = b"actual"
    assert main(["cas", "k", "stale", "new", "--node", fake.url]) == 1
    assert_one_line_error(capsys.readouterr().err, "kvstore cas:", "412 precondition_failed")
    assert fake.store["k"] == b"actual"


def test_a_4xx_is_a_one_line_error(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = lambda rec: Canned.error(400, "invalid_quorum", "r=5 is outside 1..N (N=3)")
    assert main(["get", "k", "--r", "5", "--node", fake.url]) == 1
    assert_one_line_error(capsys.readouterr().err, "kvstore get:", "400 invalid_quorum", "r=5 is outside 1..N")


def test_a_503_is_a_one_line_error(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = lambda rec: Canned.error(503, "quorum_unavailable", "1 of the 2 required replicas answered",
                                           needed=2, acknowledged=1, indeterminate=True)
    assert main(["put", "k", "v", "--node", fake.url]) == 1
    assert_one_line_error(capsys.readouterr().err, "503 quorum_unavailable")


def test_an_unknown_write_outcome_is_said_so(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = lambda rec: Canned.error(500, "internal", "internal error; see the node's log")
    assert main(["put", "k", "v", "--node", fake.url]) == 1
    assert_one_line_error(capsys.readouterr().err, "500 internal", "outcome unknown")
    assert main(["get", "k", "--node", fake.url]) == 1
    assert "outcome unknown" not in capsys.readouterr().err


def test_env_node_list_fails_over(
    fake: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSTORE_NODE", f"{dead_url()},{fake.url}")
    assert main(["put", "k", "v"]) == 0
    assert fake.store["k"] == b"v"
    assert "note:" not in capsys.readouterr().err, "a refused connection is not a re-sent write"


def test_a_write_cut_off_is_reported_unknown_and_not_resent(capsys: pytest.CaptureFixture[str]) -> None:
    flaky, good = FakeNode().start(), FakeNode().start()
    try:
        flaky.script = lambda rec: Canned(204, disconnect=True)
        assert main(["put", "k", "v", "--node", flaky.url, "--node", good.url]) == 1
    finally:
        flaky.stop()
        good.stop()
    assert_one_line_error(capsys.readouterr().err, "may or may not have been applied", flaky.url)
    assert flaky.count() == 1 and good.count() == 0, "the CLI sends a write once"


# --------------------------------------------------------------------------- cluster commands


def test_status_table(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--node", fake.url]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.strip().startswith(("│ n", "| n"))}
    assert set(rows) == {"n1", "n2", "n3"}, out
    assert "up" in rows["n1"] and "33.40%" in rows["n1"] and "0.00" in rows["n1"]
    assert "down" in rows["n3"] and "17" in rows["n3"] and " - " in rows["n3"]
    assert "http://127.0.0.1:7002" in rows["n2"]
    assert "N=3 R=2 W=2" in out and "conflict_mode=siblings" in out


def test_status_json(fake: FakeNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json", "--node", fake.url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["replicas"] == 3 and len(data["members"]) == 3


def test_repair(fake: FakeNode, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["repair", "--node", fake.url, "--secret", "wrong"]) == 1
    assert_one_line_error(capsys.readouterr().err, "kvstore repair:", "401 unauthorized")
    monkeypatch.setenv("KVSTORE_SECRET", "s3cret")
    assert main(["repair", "--node", fake.url]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "started", "ranges": 3}
    assert fake.requests[-1].headers["X-Cluster-Secret"] == "s3cret"


# --------------------------------------------------------------------------- commands implemented elsewhere


def test_node_calls_run_node_with_the_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_run_node(config_path: str) -> int:
        calls.append(config_path)
        return 7

    import kvstore.server.app

    monkeypatch.setattr(kvstore.server.app, "run_node", fake_run_node)
    assert main(["node", "--config", "/tmp/n1.toml"]) == 7
    assert calls == ["/tmp/n1.toml"]


def test_cluster_up_passes_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []

    def fake_cluster_up(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    import kvstore.harness.local_cluster

    monkeypatch.setattr(kvstore.harness.local_cluster, "cluster_up", fake_cluster_up)
    argv = ["cluster", "up", "--nodes", "5", "--replicas", "3", "--data-dir", "/tmp/d", "--base-port", "7001",
            "--storage", "memory", "--fsync", "never", "--vnodes", "32", "--conflict-mode", "lww", "--r", "1",
            "--w", "3"]
    assert main(argv) == 0
    args = seen[0]
    assert (args.nodes, args.replicas, args.data_dir, args.base_port) == (5, 3, "/tmp/d", 7001)
    assert (args.storage, args.fsync, args.vnodes, args.conflict_mode, args.r, args.w) == (
        "memory", "never", 32, "lww", 1, 3,
    )
    assert main(["cluster", "up"]) == 0
    defaults = seen[1]
    assert (defaults.nodes, defaults.replicas, defaults.base_port, defaults.data_dir) == (5, 3, 7001, None)
    assert (defaults.storage, defaults.fsync, defaults.vnodes, defaults.r, defaults.w) == (
        "sqlite", "batch", 256, None, None,
    )


def test_check_gets_the_rest_of_argv_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    module = types.ModuleType("kvstore.checker.cli")

    def check_main(argv: list[str]) -> int:
        received.append(argv)
        return 4

    module.main = check_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvstore.checker.cli", module)
    argv = ["run.jsonl", "--model", "register", "--help", "--node", "x", "--", "-v"]
    assert main(["check", *argv]) == 4
    assert received == [argv]


def test_a_delegated_command_exiting_with_a_message_prints_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = types.ModuleType("fake_explore")

    def explore_main(argv: list[str]) -> int:
        raise SystemExit("kvstore explore: unknown mode: strong")

    module.main = explore_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvstore.explore.matrix", module)
    assert main(["explore", "--modes", "strong"]) == 1
    assert_one_line_error(capsys.readouterr().err, "kvstore explore: unknown mode: strong")


def test_a_missing_delegated_module_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.DELEGATED, "ghost", ("kvstore.no_such_module", "nothing"))
    assert main(["ghost", "--help"]) == 1
    assert_one_line_error(capsys.readouterr().err, "kvstore ghost:", "not available")


def test_help_is_fast_because_heavy_modules_load_lazily() -> None:
    import subprocess

    code = "import sys, kvstore.cli; print(sorted(m for m in ('aiohttp', 'rich', 'kvstore.runtime.node') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cluster_up_refuses_detach_with_netns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """cluster stop signals PIDs only: a detached netns cluster would leave its namespaces behind."""
    assert main(["cluster", "up", "--detach", "--netns", "--data-dir", str(tmp_path / "c")]) == 2
    assert "--detach cannot be combined with --netns" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was made


def test_bench_outside_a_checkout_says_where_it_runs(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/ is not installed with the package: an installed wheel says so instead of a traceback."""
    monkeypatch.setattr(cli, "checkout_root", lambda: None)
    assert cli.main(["bench", "--quick"]) != 0
    err = capsys.readouterr().err
    assert "source checkout" in err and "benchmarks/" in err


@pytest.mark.parametrize(
    ("machines", "replicas", "warns"),
    [
        ({"n1": "n1", "n2": "n2", "n3": "n3"}, 3, False),  # each its own machine (the default)
        ({"n1": "m1", "n2": "m1", "n3": "m2", "n4": "m2", "n5": "m3", "n6": "m3"}, 3, False),
        ({"n1": "m1", "n2": "m1", "n3": "m2", "n4": "m2"}, 3, True),
        ({"n1": "m1", "n2": "m1", "n3": "m1"}, 2, True),
        ({"n1": "m1", "n2": "m1"}, "?", False),  # an answer without N: nothing to judge
    ],
)
def test_machines_warning(machines: dict[str, str], replicas: object, warns: bool) -> None:
    warning = cli.machines_warning(machines, replicas)
    assert (warning is not None) is warns
    if warning is not None:
        assert f"N={replicas}" in warning and f"{len(set(machines.values()))} machine(s)" in warning


def test_cluster_join_sends_the_machine_and_prints_it_for_the_new_nodes_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvstore.harness import membership_cli

    sent: list[dict[str, object]] = []
    member = {"host": "127.0.0.1", "http_port": 7004, "peer_port": 7104, "machine": "host-b"}

    def fake_request(seed: str, secret: str, method: str, body: dict[str, object] | None = None) -> dict[str, object]:
        sent.append(dict(body or {}))
        return {"config": {"version": 1, "phase": "joint", "members": {"n4": member}}, "progress": {}}

    monkeypatch.setattr(membership_cli, "_request", fake_request)
    code = cli.main(["cluster", "join", "n4", "--host", "127.0.0.1", "--http-port", "7004", "--peer-port", "7104",
                     "--machine", "host-b", "--seed", "http://127.0.0.1:1", "--secret", "s3cret-s3cret",
                     "--wait", "0"])
    assert code == 0
    assert sent == [{"action": "join", "id": "n4", **member}]
    assert 'machine = "host-b"' in capsys.readouterr().err
