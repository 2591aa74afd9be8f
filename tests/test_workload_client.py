"""The chaos workload and the nemesis's admin calls go through ``kvstore.client``: their outcomes, without sockets.

A ``ScriptedTransport`` (the client's ``ClientTransport`` seam) answers each request with a scripted HTTP
answer, or raises the client's ``NotSent`` / ``Lost``; the history must record what that proves
(``kvstore.contract``): an answer that proves the outcome is ok/fail, a request that may have reached the
node without a proving answer is info, a request provably never sent is fail.  Every test also checks that
exactly one request was sent per operation (no hidden retry in the client or the workload).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from kvstore.client import Lost, NotSent, ServerError
from kvstore.client.admin import AdminClient
from kvstore.contract import etag_of
from kvstore.harness.endpoint import ApiRequest, ApiResponse, EndpointTransport, NoAnswerError, endpoint_urls
from kvstore.harness.history import HistoryWriter, read_history
from kvstore.harness.nemesis import ClusterControl, NemesisError
from kvstore.harness.workload import Workload, WorkloadSpec

Answer = tuple[int, Mapping[str, str], bytes] | BaseException


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.url).query))


@dataclass
class ScriptedTransport:
    """Answers requests in order from ``answers`` (an exception is raised instead of answered)."""

    answers: list[Answer]
    sent: list[Sent] = field(default_factory=list)
    closed: bool = False

    async def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
        timeout_s: float, connect_timeout_s: float,
    ) -> tuple[int, Mapping[str, str], bytes]:
        self.sent.append(Sent(method, url, dict(headers), body))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def close(self) -> None:
        self.closed = True


def json_answer(status: int, doc: Any, headers: Mapping[str, str] | None = None) -> Answer:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(doc).encode()


async def perform(tmp_path: Path, transport: ScriptedTransport, f: str, value: Any, mode: str = "quorum",
                  contexts: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """One op through the workload; (completion type, the completion event)."""
    history = HistoryWriter(tmp_path / "history.jsonl")
    async with Workload(WorkloadSpec(mode=mode, keys=["k"], clients=1), {"n1": "http://n1:7001"}, history, 1,
                        transport=transport) as workload:
        kind = await workload.perform(0, "n1", f, "k", value, contexts)
    history.close()
    assert not transport.closed, "an injected transport belongs to the caller"
    events = read_history(tmp_path / "history.jsonl")
    assert [e["type"] for e in events] == ["invoke", kind]
    assert len(transport.sent) == 1, "one request per recorded operation"
    return kind, events[1]


# The outcome table (formerly the workload's own ``classify``): an HTTP answer and what it proves.
@pytest.mark.parametrize(
    "f,status,body,doc,expected",
    [
        ("read", 200, b"42", None, ("ok", {"value": 42})),
        ("read", 404, b"", {"error": "not_found"}, ("ok", {"value": None})),
        ("read", 300, b"", {"siblings": [{"value": "MQ=="}, {"value": "Mg=="}]},
         ("ok", {"value": None, "siblings": [1, 2]})),
        ("read", 503, b"", {"error": "quorum_unavailable", "indeterminate": False},
         ("fail", {"error": "quorum_unavailable"})),
        ("write", 204, b"", None, ("ok", {})),
        ("write", 503, b"", {"error": "quorum_unavailable", "indeterminate": False},
         ("fail", {"error": "quorum_unavailable"})),
        ("write", 503, b"", {"error": "quorum_unavailable", "indeterminate": True},
         ("info", {"error": "quorum_unavailable"})),
        ("write", 500, b"", {"error": "internal"}, ("info", {"error": "internal"})),
        ("cas", 412, b"", {"error": "precondition_failed"}, ("fail", {"error": "precondition_failed"})),
        ("write", 400, b"", {"error": "invalid_key"}, ("fail", {"error": "invalid_key"})),
        ("delete", 429, b"", {"error": "overloaded"}, ("fail", {"error": "overloaded"})),
        ("write", 409, b"", {"error": "consistency_conflict"}, ("fail", {"error": "consistency_conflict"})),
        # A 5xx that does not say "indeterminate": false may have written: unknown, for reads too.
        ("write", 503, b"", {"error": "overloaded"}, ("info", {"error": "overloaded"})),
        ("write", 502, b"Bad Gateway", None, ("info", {"error": "http_502"})),
        ("read", 503, b"", {"error": "timeout"}, ("info", {"error": "timeout"})),
        ("read", 500, b"", {"error": "internal"}, ("info", {"error": "internal"})),
        ("read", 400, b"", {"error": "invalid_quorum"}, ("fail", {"error": "invalid_quorum"})),
        ("read", 300, b"", {"siblings": "nope"}, ("info", {"error": "bad_response"})),
        ("write", 300, b"", None, ("info", {"error": "http_300"})),
    ],
)
async def test_an_answer_is_recorded_as_what_it_proves(
    tmp_path: Path, f: str, status: int, body: bytes, doc: Any, expected: tuple[str, dict[str, Any]],
) -> None:
    answer = json_answer(status, doc) if doc is not None else (status, {"Content-Type": "text/plain"}, body)
    value = {"read": None, "write": 7, "delete": None, "cas": [1, 2]}[f]
    mode = "linearizable" if f == "cas" else "quorum"
    kind, event = await perform(tmp_path, ScriptedTransport([answer]), f, value, mode)
    extra = {k: event[k] for k in ("value", "siblings", "error") if k in event and k in expected[1]}
    assert (kind, extra) == expected


@pytest.mark.parametrize("f,value", [("write", 7), ("delete", None), ("cas", [1, 2])])
async def test_a_write_lost_in_flight_is_info(tmp_path: Path, f: str, value: Any) -> None:
    transport = ScriptedTransport([Lost("disconnected", "connection lost")])
    kind, event = await perform(tmp_path, transport, f, value, "linearizable" if f == "cas" else "quorum")
    assert kind == "info", "it may have been applied"
    assert event["error"] == "connection lost"


async def test_a_timed_out_write_is_info(tmp_path: Path) -> None:
    kind, event = await perform(tmp_path, ScriptedTransport([Lost("timeout", "no response")]), "write", 7)
    assert (kind, event["error"]) == ("info", "timeout")


async def test_a_read_lost_in_flight_is_info(tmp_path: Path) -> None:
    kind, event = await perform(tmp_path, ScriptedTransport([Lost("timeout", "no response")]), "read", None)
    assert (kind, event["error"]) == ("info", "timeout")
    assert "value" not in event or event["value"] is None


@pytest.mark.parametrize("f,value", [("write", 7), ("read", None), ("delete", None)])
async def test_a_request_never_sent_is_fail(tmp_path: Path, f: str, value: Any) -> None:
    kind, event = await perform(tmp_path, ScriptedTransport([NotSent("connection refused")]), f, value)
    assert (kind, event["error"]) == ("fail", "connection_refused")


async def test_a_503_json_error_is_fail_with_its_code(tmp_path: Path) -> None:
    answer = json_answer(503, {"error": "overloaded", "message": "shed", "indeterminate": False})
    kind, event = await perform(tmp_path, ScriptedTransport([answer]), "write", 7)
    assert (kind, event["error"]) == ("fail", "overloaded")


async def test_the_request_carries_the_mode_the_context_and_the_cas_etag(tmp_path: Path) -> None:
    transport = ScriptedTransport([(204, {"X-Context": "c2", "X-Siblings": "1"}, b"")])
    contexts = {"k": "c1"}
    await perform(tmp_path, transport, "write", 7, "eventual", contexts)
    sent = transport.sent[0]
    assert (sent.method, sent.path, sent.body) == ("PUT", "/kv/k", b"7")
    assert sent.query == {"consistency": "eventual", "w": "1", "sloppy": "true", "timeout_ms": "800"}
    assert sent.headers["X-Context"] == "c1"
    assert contexts == {"k": "c2"}, "a write that left no other sibling hands its context on"

    transport = ScriptedTransport([(204, {"X-Context": "c3", "X-Siblings": "2"}, b"")])
    await perform(tmp_path, transport, "write", 8, "eventual", contexts)
    assert contexts == {"k": "c2"}, "a context covering a sibling the client never saw is not reused"

    transport = ScriptedTransport([(204, {}, b"")])
    await perform(tmp_path, transport, "cas", [1, 2], "linearizable", {"k": "ignored"})
    sent = transport.sent[0]
    assert sent.headers["If-Match"] == etag_of(b"1") and "X-Context" not in sent.headers
    assert sent.query["consistency"] == "linearizable" and sent.body == b"2"


# --------------------------------------------------------------------------- admin calls


async def test_admin_calls_are_authenticated_and_typed() -> None:
    membership = {"config": {"version": 3, "phase": "stable", "members": {}}, "progress": {"step": "done"}}
    transport = ScriptedTransport([
        json_answer(200, {"rules": {"n2": {"drop_in": True}}}),
        json_answer(200, {"skew_ms": 250.0}),
        json_answer(200, membership),
    ])
    async with AdminClient({"n1": "http://n1:7001"}, "s3cret", transport=transport) as admin:
        rules = await admin.set_link_rules("n1", {"n2": {"drop_in": True}})
        skew = await admin.set_clock_skew("n1", 250)
        state = await admin.membership("n1")
    assert rules == {"n2": {"drop_in": True}} and skew == 250.0
    assert (state.version, state.phase, state.done) == (3, "stable", True)
    assert [(s.method, s.path) for s in transport.sent] == [
        ("PUT", "/admin/faults"), ("POST", "/admin/clock"), ("GET", "/admin/membership")]
    assert all(s.headers["X-Cluster-Secret"] == "s3cret" for s in transport.sent)
    assert json.loads(transport.sent[0].body or b"") == {"rules": {"n2": {"drop_in": True}}}
    assert not transport.closed


@pytest.mark.parametrize(
    "answer,indeterminate,code",
    [
        (NotSent("connection refused"), False, "unreachable"),
        (Lost("disconnected", "connection lost"), True, "indeterminate"),
        (json_answer(400, {"error": "invalid_body", "message": "no"}), False, "invalid_body"),
        (json_answer(401, {"error": "unauthorized", "message": "secret"}), False, "unauthorized"),
    ],
)
async def test_a_failed_nemesis_call_is_a_nemesis_error_sent_once(
    answer: Answer, indeterminate: bool, code: str
) -> None:
    transport = ScriptedTransport([answer])
    control = ClusterControl(urls={"n1": "http://n1:7001", "n2": "http://n2:7002"}, secret="s3cret")
    control._admin_client = AdminClient(control.urls, control.secret, transport=transport)
    with pytest.raises(NemesisError) as info:
        await control.skew("n1", 100.0)
    cause = info.value.__cause__
    assert getattr(cause, "indeterminate", None) is indeterminate and getattr(cause, "code", None) == code
    assert len(transport.sent) == 1, "an admin call is never re-sent"
    assert control.skews_ms == {}, "a skew that was not confirmed is not recorded as in force"


async def test_a_malformed_membership_answer_is_indeterminate_not_a_crash() -> None:
    transport = ScriptedTransport([json_answer(202, {"config": "?"})])
    async with AdminClient({"n1": "http://n1:7001"}, "s3cret", transport=transport) as admin:
        with pytest.raises(ServerError) as info:
            await admin.change_membership("n1", {"action": "leave", "id": "n3"})
    assert info.value.code == "bad_response" and info.value.indeterminate, "a 202 may have started the change"
    assert transport.sent[0].method == "POST" and json.loads(transport.sent[0].body or b"") == {
        "action": "leave", "id": "n3"}


# --------------------------------------------------------------------------- the simulator's endpoint


@dataclass
class ScriptedEndpoint:
    """A simulated cluster's ``Endpoint``: raises or answers from ``answers``; records what arrived."""

    answers: list[ApiResponse | NoAnswerError]
    arrived: list[tuple[str, ApiRequest]] = field(default_factory=list)

    async def request(self, node: str, request: ApiRequest, timeout_s: float) -> ApiResponse:
        self.arrived.append((node, request))
        answer = self.answers.pop(0)
        if isinstance(answer, NoAnswerError):
            raise answer
        return answer

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "answer,expected",
    [
        (ApiResponse(204, {"X-Context": "c", "X-Siblings": "1"}, b""), ("ok", None)),
        (NoAnswerError("unreachable", "connection_refused"), ("fail", "connection_refused")),
        (NoAnswerError("timeout", "timeout"), ("info", "timeout")),
        (NoAnswerError("disconnected", "connection_reset"), ("info", "connection_reset")),
    ],
)
async def test_a_simulated_node_is_reached_through_the_same_client(
    tmp_path: Path, answer: ApiResponse | NoAnswerError, expected: tuple[str, str | None]
) -> None:
    """``EndpointTransport``: never sent (``unreachable``) is ``NotSent``, the rest ``Lost``."""
    endpoint = ScriptedEndpoint([answer])
    history = HistoryWriter(tmp_path / "history.jsonl")
    async with Workload(WorkloadSpec(mode="eventual", keys=["a/b c"], clients=1), endpoint_urls(["n1"]), history, 1,
                        transport=EndpointTransport(endpoint)) as workload:
        kind = await workload.perform(0, "n1", "write", "a/b c", 5)
    history.close()
    event = read_history(tmp_path / "history.jsonl")[-1]
    assert (kind, event.get("error")) == expected
    [(node, request)] = endpoint.arrived
    assert (node, request.method, request.raw_path, request.body) == ("n1", "PUT", "/kv/a%2Fb%20c", b"5")
    assert request.query == {"consistency": "eventual", "w": "1", "sloppy": "true", "timeout_ms": "800"}
