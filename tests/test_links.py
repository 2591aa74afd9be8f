"""LinkTable (kvstore.transport.links): refused handshakes in each direction, by table, on a manual clock."""

from __future__ import annotations

import pytest

from kvstore.clock import ManualClock
from kvstore.transport.links import MAX_MESSAGE_CHARS, STALE_AFTER_S, LinkTable

S = 1_000_000_000


def table(**kwargs: object) -> tuple[LinkTable, ManualClock]:
    clock = ManualClock(start_ns=1_700_000_000 * S)
    return LinkTable(["n1", "n2"], clock, **kwargs), clock  # type: ignore[arg-type]


def test_a_clear_link_is_ok_both_ways() -> None:
    links, _ = table()
    assert links.refuses_us("n1") is None and links.we_refuse("n1") is None
    assert not links.is_refused("n1")
    assert links.member_json("n1") == {"they_refuse_us": None, "we_refuse_them": None}
    assert links.strangers_json() == []


def test_a_run_of_refusals_keeps_its_start_and_counts() -> None:
    links, clock = table()
    links.refused_by_peer("n1", "unauthorized", "wrong cluster secret")
    clock.advance(2 * S)
    links.refused_by_peer("n1", "unauthorized", "wrong cluster secret")
    doc = links.member_json("n1")["they_refuse_us"]
    assert doc == {
        "code": "unauthorized",
        "message": "wrong cluster secret",
        "since": "2023-11-14T22:13:20Z",
        "for_s": 2.0,
        "last_s_ago": 0.0,
        "count": 2,
        "address": None,
    }
    assert links.is_refused("n1") and not links.is_refused("n2")


def test_another_code_starts_a_new_run() -> None:
    links, clock = table()
    links.refused_by_peer("n1", "unauthorized", "wrong cluster secret")
    clock.advance(5 * S)
    links.refused_by_peer("n1", "version_mismatch", "protocol 2")
    refusal = links.refuses_us("n1")
    assert refusal is not None and refusal.code == "version_mismatch" and refusal.count == 1
    assert links.member_json("n1")["they_refuse_us"]["for_s"] == 0.0


@pytest.mark.parametrize("clear", ["handshake_succeeded", "handshake_failed"])
def test_an_outgoing_refusal_stands_until_a_handshake_says_otherwise(clear: str) -> None:
    links, clock = table()
    links.refused_by_peer("n1", "unknown_member", "node id 'n9' is not a member")
    clock.advance(int(10 * STALE_AFTER_S * S))
    assert links.refuses_us("n1") is not None  # no ageing: only a new attempt changes it
    getattr(links, clear)("n1")
    assert links.refuses_us("n1") is None


def test_an_incoming_refusal_of_a_member_clears_on_authentication_or_ages_out() -> None:
    links, clock = table()
    links.refused_incoming("n2", "unauthorized", "wrong cluster secret", "10.0.0.2:4000")
    refusal = links.we_refuse("n2")
    assert refusal is not None and refusal.address == "10.0.0.2:4000"
    links.authenticated("n2")
    assert links.we_refuse("n2") is None
    links.refused_incoming("n2", "unauthorized", "wrong cluster secret", "10.0.0.2:4001")
    clock.advance(int(STALE_AFTER_S * S))
    assert links.we_refuse("n2") is not None  # exactly at the limit: still fresh
    clock.advance(1)
    assert links.we_refuse("n2") is None and not links.is_refused("n2")


def test_a_refusal_without_a_claimed_id_is_not_attributed() -> None:
    links, _ = table()
    links.refused_incoming(None, "bad_hello", "not msgpack", "10.0.0.9:1")
    assert links.strangers_json() == [] and not links.is_refused("n1")


def test_strangers_are_bounded_least_recently_seen_first() -> None:
    links, clock = table(max_strangers=3)
    for name in ("x1", "x2", "x3"):
        links.refused_incoming(name, "unknown_member", f"node id {name!r} is not a member", "10.0.0.9:1")
        clock.advance(S)
    links.refused_incoming("x1", "unknown_member", "again", "10.0.0.9:2")  # seen again: now the freshest
    links.refused_incoming("x4", "unknown_member", "new", "10.0.0.9:3")  # evicts x2, the stalest
    assert [s["id"] for s in links.strangers_json()] == ["x1", "x3", "x4"]
    assert {s["id"]: s["count"] for s in links.strangers_json()}["x1"] == 2
    clock.advance(int(STALE_AFTER_S * S) + 1)
    assert links.strangers_json() == []


def test_messages_are_truncated() -> None:
    links, _ = table()
    links.refused_by_peer("n1", "bad_hello", "x" * 10_000)
    refusal = links.refuses_us("n1")
    assert refusal is not None and len(refusal.message) == MAX_MESSAGE_CHARS


def test_our_own_refusal_of_a_peer_certificate_blocks_routing_until_a_handshake_succeeds() -> None:
    links, _ = table()
    links.refused_on_our_attempt("n1", "tls_rejected", "this node does not trust its certificate")
    assert links.outgoing_blocked("n1") and links.refuses_us("n1") is None
    refusal = links.we_refuse("n1")
    assert refusal is not None and refusal.code == "tls_rejected"
    assert links.member_json("n1")["they_refuse_us"] is None
    links.handshake_succeeded("n1")
    assert not links.outgoing_blocked("n1") and links.we_refuse("n1") is None


def test_a_refusal_by_the_peer_blocks_routing() -> None:
    links, _ = table()
    assert not links.outgoing_blocked("n1")
    links.refused_by_peer("n1", "unauthorized", "wrong cluster secret")
    assert links.outgoing_blocked("n1") and not links.outgoing_blocked("n2")
