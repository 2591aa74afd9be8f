"""Tables for the tombstone reap rule, including the resurrection case (pure)."""

from __future__ import annotations

import pytest

from kvstore.protocol import versions
from kvstore.protocol.tombstones import (
    UnsafeGracePeriod,
    can_reap,
    check_grace_covers_hint_window,
    reap_verdict,
    tombstone_is_covered,
    tombstone_written_at_ns,
)
from kvstore.protocol.versions import VersionedObject

S = 1_000_000_000
T0 = 1_700_000_000 * S
GRACE = 60 * S
PRIMARIES = ("n1", "n2", "n3")
ALL = frozenset(PRIMARIES)

# A key's history: written at T0, then deleted at T0 + 1 s by a client that read the value.
LIVE = versions.update(VersionedObject.empty(), {}, "n1", b"old", T0)
TOMBSTONE = versions.update(LIVE, LIVE.vector(), "n1", None, T0 + S)
DELETED_AT = T0 + S
# A write concurrent with the delete (did not see it) and one after it (saw it).
CONCURRENT = versions.update(LIVE, {}, "n2", b"concurrent", T0 + 2 * S)
REWRITTEN = versions.update(TOMBSTONE, TOMBSTONE.vector(), "n2", b"new", T0 + 3 * S)
# Two concurrent deletes: two tombstone siblings.
OTHER_DELETE = versions.update(LIVE, LIVE.vector(), "n2", None, T0 + 5 * S)
TWO_TOMBSTONES = versions.sync(TOMBSTONE, OTHER_DELETE)
# Tombstone plus a concurrent live sibling.
MIXED = versions.sync(TOMBSTONE, CONCURRENT)


def test_fixtures_are_what_they_claim() -> None:
    assert TOMBSTONE.is_deleted and len(TOMBSTONE.siblings) == 1
    assert TWO_TOMBSTONES.is_deleted and len(TWO_TOMBSTONES.siblings) == 2
    assert not MIXED.is_deleted and MIXED.live_values == [b"concurrent"]
    assert REWRITTEN.live_values == [b"new"]


@pytest.mark.parametrize(
    "name, obj, deleted_at_ns, now_ns, holding, reap, blocker",
    [
        ("all conditions met", TOMBSTONE, DELETED_AT, DELETED_AT + GRACE, ALL, True, None),
        ("well after grace", TOMBSTONE, DELETED_AT, DELETED_AT + 10 * GRACE, ALL, True, None),
        ("grace not elapsed", TOMBSTONE, DELETED_AT, DELETED_AT + GRACE - 1, ALL, False, "grace_not_elapsed"),
        ("one primary unconfirmed", TOMBSTONE, DELETED_AT, DELETED_AT + GRACE, {"n1", "n2"}, False,
         "primaries_not_covered"),
        ("no primary confirmed", TOMBSTONE, DELETED_AT, DELETED_AT + GRACE, set(), False, "primaries_not_covered"),
        ("non-primaries do not count", TOMBSTONE, DELETED_AT, DELETED_AT + GRACE, {"n1", "n2", "n4", "n5"}, False,
         "primaries_not_covered"),
        ("live value", LIVE, DELETED_AT, DELETED_AT + 10 * GRACE, ALL, False, "has_live_sibling"),
        ("tombstone with a concurrent live sibling", MIXED, DELETED_AT, DELETED_AT + 10 * GRACE, ALL, False,
         "has_live_sibling"),
        ("empty object", VersionedObject.empty(), DELETED_AT, DELETED_AT + 10 * GRACE, ALL, False,
         "not_a_tombstone"),
        # The newest tombstone sibling (T0 + 5 s) starts the grace, not the older one.
        ("two tombstones, grace from the newest", TWO_TOMBSTONES, DELETED_AT, T0 + 5 * S + GRACE - 1, ALL, False,
         "grace_not_elapsed"),
        ("two tombstones, after the newest's grace", TWO_TOMBSTONES, DELETED_AT, T0 + 5 * S + GRACE, ALL, True,
         None),
        # This replica stored the tombstone later than its coordinator wrote it (it arrived by repair):
        # the later time counts, so a late copy is not reaped early.
        ("stored late by repair", TOMBSTONE, T0 + 30 * S, DELETED_AT + GRACE, ALL, False, "grace_not_elapsed"),
        ("stored late, grace passed", TOMBSTONE, T0 + 30 * S, T0 + 30 * S + GRACE, ALL, True, None),
        # A coordinator clock far in the past cannot hasten reaping: the local time counts.
        ("coordinator clock behind", versions.update(LIVE, LIVE.vector(), "n1", None, T0 - 3600 * S),
         DELETED_AT, DELETED_AT + GRACE - 1, ALL, False, "grace_not_elapsed"),
    ],
)
def test_reap_table(
    name: str,
    obj: VersionedObject,
    deleted_at_ns: int,
    now_ns: int,
    holding: set[str] | frozenset[str],
    reap: bool,
    blocker: str | None,
) -> None:
    verdict = reap_verdict(obj, deleted_at_ns, now_ns, GRACE, holding, PRIMARIES)
    assert (verdict.reap, verdict.blocker) == (reap, blocker), name
    assert can_reap(obj, deleted_at_ns, now_ns, GRACE, holding, PRIMARIES) is reap, name


def test_verdict_names_the_missing_primaries_and_when_grace_ends() -> None:
    verdict = reap_verdict(TOMBSTONE, DELETED_AT, DELETED_AT + GRACE, GRACE, {"n2"}, PRIMARIES)
    assert verdict.missing_primaries == ("n1", "n3")
    assert verdict.reapable_at_ns == DELETED_AT + GRACE
    early = reap_verdict(TOMBSTONE, DELETED_AT, DELETED_AT, GRACE, ALL, PRIMARIES)
    assert early.reapable_at_ns == DELETED_AT + GRACE


def test_zero_grace_reaps_as_soon_as_primaries_hold_it() -> None:
    assert can_reap(TOMBSTONE, DELETED_AT, DELETED_AT, 0, ALL, PRIMARIES)


# --- coverage: what a primary must hold -------------------------------------------------------


@pytest.mark.parametrize(
    "name, remote, covered",
    [
        ("the same tombstone", TOMBSTONE, True),
        ("a later write that saw the delete", REWRITTEN, True),
        ("the tombstone merged with a later delete", TWO_TOMBSTONES, True),
        ("stale replica with the old value", LIVE, False),  # the resurrection case
        ("nothing at all", VersionedObject.empty(), False),
        ("a concurrent write that never saw the delete", CONCURRENT, False),
    ],
)
def test_tombstone_is_covered(name: str, remote: VersionedObject, covered: bool) -> None:
    assert tombstone_is_covered(remote, TOMBSTONE) is covered, name


def test_resurrection_case_stale_replica_blocks_reaping() -> None:
    """n3 missed the delete and still holds the old value: reaping would bring it back."""
    replicas = {"n1": TOMBSTONE, "n2": TOMBSTONE, "n3": LIVE}
    holding = {member for member, obj in replicas.items() if tombstone_is_covered(obj, TOMBSTONE)}
    assert holding == {"n1", "n2"}
    assert not can_reap(TOMBSTONE, DELETED_AT, DELETED_AT + 100 * GRACE, GRACE, holding, PRIMARIES)
    # Why it matters: had n1 reaped, syncing n3's copy back revives the deleted value.
    assert versions.sync(VersionedObject.empty(), replicas["n3"]).live_values == [b"old"]
    # Whereas with the tombstone kept, the same sync keeps the key deleted.
    assert versions.sync(TOMBSTONE, replicas["n3"]).is_deleted
    # Once n3 is repaired, reaping is allowed, and nothing can come back from any replica.
    replicas["n3"] = versions.sync(replicas["n3"], TOMBSTONE)
    holding = {member for member, obj in replicas.items() if tombstone_is_covered(obj, TOMBSTONE)}
    assert can_reap(TOMBSTONE, DELETED_AT, DELETED_AT + GRACE, GRACE, holding, PRIMARIES)
    assert all(obj.is_deleted for obj in replicas.values())


def test_tombstone_written_at_is_the_newest_tombstone() -> None:
    assert tombstone_written_at_ns(TOMBSTONE) == T0 + S
    assert tombstone_written_at_ns(TWO_TOMBSTONES) == T0 + 5 * S
    assert tombstone_written_at_ns(MIXED) == T0 + S  # live siblings do not count


def test_programmer_errors_are_asserts() -> None:
    with pytest.raises(AssertionError):
        tombstone_is_covered(TOMBSTONE, LIVE)  # the local object must be a tombstone
    with pytest.raises(AssertionError):
        can_reap(TOMBSTONE, DELETED_AT, DELETED_AT, GRACE, ALL, ())
    with pytest.raises(AssertionError):
        can_reap(TOMBSTONE, DELETED_AT, DELETED_AT, -1, ALL, PRIMARIES)


# --- configuration rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grace_s, hint_window_s, skew_margin_s, safe",
    [
        (10 * 86400, 3 * 3600, 0, True),  # Cassandra's defaults
        (3 * 3600, 3 * 3600, 0, True),
        (3 * 3600, 3 * 3600, 1, False),
        (60, 3 * 3600, 0, False),  # kvstore's current APSettings defaults: unsafe
        (60, 30, 30, True),
    ],
)
def test_grace_must_cover_the_hint_window(grace_s: int, hint_window_s: int, skew_margin_s: int, safe: bool) -> None:
    if safe:
        check_grace_covers_hint_window(grace_s * S, hint_window_s * S, skew_margin_s * S)
    else:
        with pytest.raises(UnsafeGracePeriod):
            check_grace_covers_hint_window(grace_s * S, hint_window_s * S, skew_margin_s * S)
