"""When a tombstone may be removed ("reaped") without resurrecting the deleted value.

Theory of operation
-------------------
A delete is a write of a tombstone sibling (``value is None``) whose clock
supersedes the deleted value.  The tombstone must outlive every stale copy of
that value: if a replica drops it while another replica (or a hint, or an
in-flight repair) still holds the old value, the next read repair or
anti-entropy round sees "old value" vs "nothing" and copies the old value back:
the delete is undone ("resurrection", Riak's classic ``delete_mode`` problem).

The rule combines Riak's ``delete_mode`` (reap only once every primary has the
tombstone) with Cassandra's ``gc_grace_seconds`` (and only after a grace period):
``can_reap`` is true only when

1. every sibling is a tombstone (a live sibling is data, never reaped);
2. ``grace_ns`` has passed since the tombstone was written, measured from the
   *later* of the caller's ``deleted_at_ns`` (when this replica stored it) and
   the newest tombstone sibling's ``timestamp_ns`` (when a coordinator wrote it):
   a skewed or late clock can only postpone reaping, never hasten it;
3. every one of the key's N primaries is known to hold an object whose clock
   descends the tombstone's (``tombstone_is_covered``), established by the
   caller asking them (the local node, if a primary, includes itself).  A
   replica still holding the old value has a clock that does not descend the
   tombstone's, so it blocks reaping: that is the resurrection case.

What it does **not** cover on its own: copies outside the primaries.  A fallback
may hold a hint with the old value (written while a primary was down) and
deliver it after the reap.  That is bounded by the hint window: a hint older than
``max_age_ns`` is dropped unsent, and since it was created before the tombstone,
it expires no later than ``max_age_ns`` after the delete.  Hence the configuration
rule ``hint window <= grace`` (``check_grace_covers_hint_window``), the same
constraint Cassandra states between ``max_hint_window`` and ``gc_grace_seconds``.
The caller must also reap atomically: delete the record only if it is still the
object that was checked (under the key's lock), since a write may race the check.

Everything here is pure and deterministic.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from kvstore.protocol.versions import VersionedObject, descends


class UnsafeGracePeriod(ValueError):
    """The tombstone grace period is shorter than the hint window: a late hint could resurrect a delete."""


ReapBlocker = Literal["has_live_sibling", "not_a_tombstone", "grace_not_elapsed", "primaries_not_covered"]


@dataclass(frozen=True, slots=True)
class ReapVerdict:
    reap: bool
    blocker: ReapBlocker | None = None
    missing_primaries: tuple[str, ...] = ()  # primaries not known to hold the tombstone
    reapable_at_ns: int | None = None  # when the grace period ends (None: not a tombstone)


def tombstone_written_at_ns(obj: VersionedObject) -> int:
    """The newest tombstone sibling's timestamp (the coordinator's wall clock)."""
    stamps = [s.timestamp_ns for s in obj.siblings if s.is_tombstone]
    assert stamps, "the object has no tombstone"
    return max(stamps)


def tombstone_is_covered(remote: VersionedObject, local: VersionedObject) -> bool:
    """``remote`` has seen everything the ``local`` tombstone object has (its clock descends).

    Then dropping ``local`` cannot resurrect anything: syncing ``remote`` back in yields
    only writes that saw the delete.  A remote with a newer live value also covers it
    (that value legitimately overwrote the delete); a remote with the old value, or with
    nothing at all, does not.
    """
    assert local.is_deleted, "only a tombstone object can be covered"
    return descends(remote.vector(), local.vector())


def reap_verdict(
    obj: VersionedObject,
    deleted_at_ns: int,
    now_ns: int,
    grace_ns: int,
    primaries_holding: Collection[str],
    primaries: tuple[str, ...],
) -> ReapVerdict:
    """``can_reap`` with the reason it says no (for logs, metrics and tables)."""
    assert grace_ns >= 0, "a negative grace period is a configuration bug"
    assert primaries, "a key has at least one primary"
    assert len(set(primaries)) == len(primaries), "duplicate primaries"
    if not obj.siblings:
        return ReapVerdict(False, "not_a_tombstone")
    if not obj.is_deleted:
        return ReapVerdict(False, "has_live_sibling")
    reapable_at_ns = max(deleted_at_ns, tombstone_written_at_ns(obj)) + grace_ns
    if now_ns < reapable_at_ns:
        return ReapVerdict(False, "grace_not_elapsed", reapable_at_ns=reapable_at_ns)
    missing = tuple(p for p in primaries if p not in primaries_holding)
    if missing:
        return ReapVerdict(False, "primaries_not_covered", missing, reapable_at_ns)
    return ReapVerdict(True, reapable_at_ns=reapable_at_ns)


def can_reap(
    obj: VersionedObject,
    deleted_at_ns: int,
    now_ns: int,
    grace_ns: int,
    primaries_holding: Collection[str],
    primaries: tuple[str, ...],
) -> bool:
    """True iff the tombstone ``obj`` may be deleted from storage now (see the module docstring).

    ``primaries_holding``: the primaries whose copy ``tombstone_is_covered`` confirmed.
    """
    return reap_verdict(obj, deleted_at_ns, now_ns, grace_ns, primaries_holding, primaries).reap


def check_grace_covers_hint_window(grace_ns: int, hint_max_age_ns: int, clock_skew_margin_ns: int = 0) -> None:
    """Raise ``UnsafeGracePeriod`` unless grace >= hint window + skew margin (see the module docstring)."""
    if grace_ns < hint_max_age_ns + clock_skew_margin_ns:
        raise UnsafeGracePeriod(
            f"tombstone grace ({grace_ns} ns) is shorter than the hint window ({hint_max_age_ns} ns) plus "
            f"clock skew margin ({clock_skew_margin_ns} ns): a hint delivered after a reap could resurrect a delete"
        )
