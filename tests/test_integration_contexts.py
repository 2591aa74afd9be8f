"""Integration: a causal context cannot erase writes its holder never saw (issue 11, item 3).

A write with ``X-Context`` supersedes every sibling the context covers.  If a client could
claim dots that were never issued, or carry another key's context, or a context of an earlier
life of the key (before its tombstone was reaped), one PUT would silently delete other clients'
acknowledged writes.  Each test here makes such an attempt on real node processes and then
reads the key on every node with r=3: the acknowledged value must still be there.

The attacker builds its contexts without the kvstore library (base64url of msgpack, the way
anyone reading a context header would), so these tests run unchanged against older code.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import msgpack
import pytest

from kvstore.config import APSettings
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol.ring import Ring
from tests.conftest import Reply, http, kv_path

pytestmark = pytest.mark.integration

GRACE_S = 3.0
# Short grace so a tombstone can be reaped within a test (grace >= hint window is enforced).
SHORT_GRACE = APSettings(
    heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0, hint_max_age_s=2, tombstone_grace_s=GRACE_S
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(5, 3, data_dir=str(tmp_path_factory.mktemp("contexts")), ap=SHORT_GRACE)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def forged(entries: list[list[object]]) -> str:
    """A hand-made context: the version vector an attacker wishes the key had seen."""
    return b64url(msgpack.packb(entries, use_bin_type=True))


def raised_last_byte(context: str) -> str:
    """A genuine context with its last byte set to 0x7f: the last counter becomes 127.

    The last byte of a context is the last entry's counter (a msgpack fixint when small),
    whatever wraps it, so this tampers with the claim without knowing the format.
    """
    raw = base64.urlsafe_b64decode(context + "=" * (-len(context) % 4))
    return b64url(raw[:-1] + b"\x7f")


def walk(cluster: LocalCluster, key: str) -> list[str]:
    return Ring(cluster.node_ids, cluster.base_config.vnodes).walk(key)


def key_coordinated_by(cluster: LocalCluster, member: str, prefix: str) -> str:
    """A key whose first primary (its coordinator) is ``member``: its dots count on member's entry."""
    for i in range(10_000):
        candidate = f"{prefix}{i}"
        if walk(cluster, candidate)[0] == member:
            return candidate
    raise AssertionError(f"no key coordinated by {member}")


def error_code(reply: Reply) -> object:
    try:
        doc = reply.json()
    except ValueError:
        return None  # e.g. the empty body of a 204
    return doc.get("error") if isinstance(doc, dict) else None


def assert_everyone_reads(cluster: LocalCluster, key: str, value: bytes) -> None:
    """Every node, asking all three replicas, returns exactly ``value`` (no sibling, nothing lost)."""
    for node_id in cluster.node_ids:
        got = http(cluster.url(node_id), "GET", kv_path(key, r=3))
        assert (got.status, got.body) == (200, value), (node_id, got)


def wait_until(what: str, predicate: object, timeout_s: float, every_s: float = 0.5) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for: {what}"
        time.sleep(every_s)


def test_forged_and_foreign_contexts_are_refused_and_lose_nothing(cluster: LocalCluster) -> None:
    key = "ctx:victim"
    order = walk(cluster, key)
    coordinator, outsider = order[0], order[3]  # a primary, and a node that forwards to it
    created = http(cluster.url(coordinator), "PUT", kv_path(key, w=3), body=b"v1")
    assert created.status == 204
    # A genuine context of another key, whose counters on the same coordinator cover v1's dot.
    other = key_coordinated_by(cluster, coordinator, "ctx:other-")
    for i in range(3):
        assert http(cluster.url(coordinator), "PUT", kv_path(other, w=3), body=b"x%d" % i).status == 204
    other_read = http(cluster.url(coordinator), "GET", kv_path(other, r=3))
    other_context = other_read.headers["x-context"]

    attacks = {
        "forged: the coordinator at 10**9": forged([[coordinator, 10**9]]),
        "forged: every member at 10**9": forged([[m, 10**9] for m in cluster.node_ids]),
        "genuine, of another key": other_context,
        "genuine, counter raised": raised_last_byte(created.headers["x-context"]),
    }
    accepted = []
    for attack, context in attacks.items():
        for via in (coordinator, outsider):
            for method, body in (("PUT", b"attacker"), ("DELETE", None)):
                reply = http(cluster.url(via), method, kv_path(key, w=3), body=body, headers={"X-Context": context})
                if (reply.status, error_code(reply)) != (400, "bad_context"):
                    accepted.append((attack, via, method, reply.status, reply.body[:200]))
    # First what matters most: the acknowledged v1 is still what every node reads.
    assert_everyone_reads(cluster, key, b"v1")
    assert accepted == []

    # The genuine context still does what it is for: it supersedes exactly what was read.
    read = http(cluster.url(outsider), "GET", kv_path(key, r=3))
    resolved = http(cluster.url(outsider), "PUT", kv_path(key, w=3), body=b"v2",
                    headers={"X-Context": read.headers["x-context"]})
    assert resolved.status == 204 and resolved.headers["x-siblings"] == "1", resolved
    assert_everyone_reads(cluster, key, b"v2")


def test_the_siblings_body_context_is_the_header_context_and_resolves(cluster: LocalCluster) -> None:
    key = "ctx:siblings"
    a, b = walk(cluster, key)[:2]
    assert http(cluster.url(a), "PUT", kv_path(key, w=3), body=b"left").status == 204
    assert http(cluster.url(b), "PUT", kv_path(key, w=3), body=b"right").status == 204  # no context: concurrent
    got = http(cluster.url(b), "GET", kv_path(key, r=3))
    assert got.status == 300, got
    doc = got.json()
    assert isinstance(doc, dict) and doc["context"] == got.headers["x-context"]
    # The same context is no good for a neighbouring key.
    neighbour = http(cluster.url(a), "PUT", kv_path(key + "x", w=3), body=b"n", headers={"X-Context": doc["context"]})
    assert (neighbour.status, error_code(neighbour)) == (400, "bad_context"), neighbour
    resolved = http(cluster.url(a), "PUT", kv_path(key, w=3), body=b"merged", headers={"X-Context": doc["context"]})
    assert resolved.status == 204 and resolved.headers["x-siblings"] == "1"
    assert_everyone_reads(cluster, key, b"merged")


def test_a_context_from_before_a_reap_cannot_erase_the_key_s_new_life(cluster: LocalCluster) -> None:
    """A genuine context of a deleted key's tombstone, kept past the reap, is refused.

    After the tombstone is reaped the coordinator's counters for the key start again at 1, so
    the old context (which covers the old, higher counters) would cover the new writes.
    """
    key = "ctx:reaped"
    order = walk(cluster, key)
    coordinator, outsider = order[0], order[3]
    context = None
    for i in range(3):
        headers = {"X-Context": context} if context else {}
        reply = http(cluster.url(coordinator), "PUT", kv_path(key, w=3), body=b"old%d" % i, headers=headers)
        assert reply.status == 204
        context = reply.headers["x-context"]
    assert context is not None
    deleted = http(cluster.url(coordinator), "DELETE", kv_path(key, w=3), headers={"X-Context": context})
    assert deleted.status == 204
    tombstone = http(cluster.url(coordinator), "GET", kv_path(key, r=3))
    assert tombstone.status == 404 and tombstone.headers.get("x-context"), tombstone
    stale_context = tombstone.headers["x-context"]

    time.sleep(GRACE_S + 0.5)

    def reaped() -> bool:
        for node_id in order[:3]:
            repair = http(cluster.url(node_id), "POST", "/admin/repair", headers={"X-Cluster-Secret": cluster.secret})
            assert repair.status == 202, repair
        return "x-context" not in http(cluster.url(coordinator), "GET", kv_path(key, r=3)).headers

    wait_until("the tombstone is reaped on every primary", reaped, timeout_s=60)

    assert http(cluster.url(coordinator), "PUT", kv_path(key, w=3), body=b"new").status == 204  # acknowledged
    accepted = []
    for via in (coordinator, outsider):
        stale = http(cluster.url(via), "PUT", kv_path(key, w=3), body=b"stale", headers={"X-Context": stale_context})
        if (stale.status, error_code(stale)) != (400, "bad_context"):
            accepted.append((via, stale.status, stale.body[:200]))
    assert_everyone_reads(cluster, key, b"new")
    assert accepted == []
