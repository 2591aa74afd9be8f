"""Hinted handoff: what a hint is, when one may be stored, and when one is replayed.

Theory of operation
-------------------
Follows Dynamo (DeCandia et al. 2007, §4.6) and Cassandra's hinted handoff.
When a write's primary replica is believed down, a *sloppy quorum* sends the
object to the next healthy fallback in the ring instead; the fallback keeps it as
a *hint* naming the intended owner (the target) and replays it when the target is
reachable again.  This module is the pure policy; the node does the I/O.

**Record and key.**  A hint is ``(target, key, token, created_at_ns, object
blob)``, stored in the hint store under ``(token, hint_storage_key(target, key))``:
the ring token keeps hints scannable by range like data, and the key scheme makes
every hint for the same target and key *coalesce* into one record.  A second hint
for the same (target, key) is merged into the first by the caller with
``versions.sync`` (``HintRecord.coalesce``), never appended: the hint store holds
at most one record per (target, key), and replay sends one merged object.
Coalescing keeps the **oldest** ``created_at_ns``: the age bound is a promise
about the oldest write a hint may still deliver (which is what makes a hint window
shorter than the tombstone grace period safe, see ``tombstones``); the price is
that a key rewritten throughout a long outage has its hint expire with the first
write's, and anti-entropy repairs it.

**Bounds** (``HintPolicy``, tracked by ``HintLedger``):

* ``max_hints_per_target``: one dead member cannot take the whole store.
* ``max_bytes_total``: the hint store's total size.
* ``max_age_ns``: the *hint window* (Cassandra's ``max_hint_window``).  A hint
  older than this is dropped unsent (with a metric and a log line) and the key is
  left to anti-entropy.

A hint refused for lack of room is reported (``Admission``), never dropped
silently: the coordinator then does **not** count that fallback toward W, so a
write whose only "acks" would have been refused hints fails as it should.

**Replay** (``plan_replay``): oldest first, round-robin across targets so that
one large backlog does not starve a small one, only to targets believed up and
not in failure backoff, at most ``concurrency`` in flight and at most
``rate_per_s`` sends in any one-second window (a sliding window over the caller's
recent send times).  After a successful send the caller deletes the hint only if
it is unchanged (compare the stored blob under the key's lock): a newer write may
have been coalesced into it while the old version was in flight.

Ages use the holder's wall clock (``Clock.wall_ns``) because hints outlive
restarts, which a monotonic clock does not; a wall-clock jump can therefore expire
hints early or late.  Everything here is pure and deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgpack

from kvstore.protocol import versions
from kvstore.protocol.versions import ConflictMode, VersionedObject

NS_PER_S = 1_000_000_000
HINT_FORMAT_VERSION = 1
KEY_SEPARATOR = "\x00"  # cannot appear in a member id, so (target, key) pairs never collide


class HintDecodeError(ValueError):
    """A stored hint record could not be decoded (corruption or a foreign format)."""


class InvalidHintPolicy(ValueError):
    """Hint bounds that make no sense (non-positive limits)."""


class HintRefused(Exception):
    """A hint was not stored; the fallback must not count toward W."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.message)
        self.admission = admission


def hint_storage_key(target: str, key: str) -> str:
    """The hint store key: one record per (target, key), so later hints coalesce into it."""
    assert KEY_SEPARATOR not in target, "member ids cannot contain NUL"
    return f"{target}{KEY_SEPARATOR}{key}"


def split_hint_storage_key(storage_key: str) -> tuple[str, str]:
    """Inverse of ``hint_storage_key``: (target, key)."""
    target, separator, key = storage_key.partition(KEY_SEPARATOR)
    if not separator:
        raise HintDecodeError(f"{storage_key!r} is not a hint storage key")
    return target, key


@dataclass(frozen=True, slots=True)
class HintRecord:
    target: str
    key: str
    token: int
    created_at_ns: int  # the holder's wall clock when the first write of this hint arrived
    object_blob: bytes  # versions.encode of the object to hand off

    @property
    def storage_key(self) -> str:
        return hint_storage_key(self.target, self.key)

    @property
    def size_bytes(self) -> int:
        """What the ledger charges for this hint: the size of its stored record, ``len(encode())``."""
        return len(self.encode())

    def obj(self) -> VersionedObject:
        return versions.decode(self.object_blob)

    def encode(self) -> bytes:
        """msgpack ``[1, target, key, token, created_at_ns, object_blob]``."""
        return msgpack.packb(
            [HINT_FORMAT_VERSION, self.target, self.key, self.token, self.created_at_ns, self.object_blob],
            use_bin_type=True,
        )

    @staticmethod
    def decode(blob: bytes) -> HintRecord:
        try:
            raw = msgpack.unpackb(blob, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise HintDecodeError(f"hint is not valid msgpack: {exc}") from None
        if not (isinstance(raw, list) and len(raw) == 6 and raw[0] == HINT_FORMAT_VERSION):
            raise HintDecodeError(f"not a version-{HINT_FORMAT_VERSION} hint record")
        _, target, key, token, created_at_ns, object_blob = raw
        if not (
            isinstance(target, str)
            and isinstance(key, str)
            and type(token) is int
            and type(created_at_ns) is int
            and isinstance(object_blob, bytes)
        ):
            raise HintDecodeError("hint fields have the wrong types")
        return HintRecord(target, key, token, created_at_ns, object_blob)

    def coalesce(self, newer: HintRecord, mode: ConflictMode = "siblings") -> HintRecord:
        """Merge a later hint for the same (target, key) into this one: objects synced, oldest age kept."""
        if (newer.target, newer.key, newer.token) != (self.target, self.key, self.token):
            raise ValueError(f"cannot coalesce hints for different keys: {self.storage_key!r} vs {newer.storage_key!r}")
        merged = versions.sync(self.obj(), newer.obj(), mode)
        return HintRecord(
            self.target,
            self.key,
            self.token,
            min(self.created_at_ns, newer.created_at_ns),
            versions.encode(merged),
        )


# --- bounds --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HintPolicy:
    max_hints_per_target: int
    max_bytes_total: int
    max_age_ns: int

    def __post_init__(self) -> None:
        for name in ("max_hints_per_target", "max_bytes_total", "max_age_ns"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise InvalidHintPolicy(f"{name} must be a positive integer, got {value!r}")

    def expired(self, created_at_ns: int, now_ns: int) -> bool:
        """Beyond the hint window: drop unsent (count it, log it) and leave the key to anti-entropy.

        A hint exactly ``max_age_ns`` old is still valid; one "from the future" (wall clock
        stepped back) is not expired.
        """
        return now_ns - created_at_ns > self.max_age_ns


AdmissionStatus = Literal["ok", "refused_full"]
RefusalReason = Literal["target_full", "store_full", "hint_too_large"]


@dataclass(frozen=True, slots=True)
class Admission:
    status: AdmissionStatus
    reason: RefusalReason | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_if_refused(self) -> None:
        if not self.ok:
            raise HintRefused(self)


ADMITTED = Admission("ok")


class HintLedger:
    """Counts and bytes of stored hints per target, enforcing a ``HintPolicy``.

    The node keeps one ledger next to its hint store: ``admit`` before storing a hint
    (it reserves the room), ``remove`` when a hint is delivered, expired, or its store
    write failed, and ``record_existing`` for every hint found on disk at startup.
    """

    def __init__(self, policy: HintPolicy) -> None:
        self.policy = policy
        self._count: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._total_bytes = 0

    def admit(self, target: str, size_bytes: int, replacing_bytes: int | None = None) -> Admission:
        """Reserve room for a hint of ``size_bytes``; on refusal nothing changes.

        ``replacing_bytes``: the size of the stored hint for the same (target, key) that this
        one coalesces into.  It replaces that record, so the count does not grow and only
        the size difference is charged; a coalescing hint is refused only on bytes.
        """
        assert size_bytes >= 0 and (replacing_bytes is None or replacing_bytes >= 0)
        policy = self.policy
        if size_bytes > policy.max_bytes_total:
            return Admission(
                "refused_full", "hint_too_large",
                f"a {size_bytes}-byte hint exceeds the whole hint store ({policy.max_bytes_total} bytes)",
            )
        count = self._count.get(target, 0)
        if replacing_bytes is None and count >= policy.max_hints_per_target:
            return Admission(
                "refused_full", "target_full",
                f"{count} hints already pending for {target} (limit {policy.max_hints_per_target})",
            )
        if replacing_bytes is not None:
            assert count >= 1 and self._bytes.get(target, 0) >= replacing_bytes, "replacing an untracked hint"
        growth = size_bytes - (replacing_bytes or 0)
        if self._total_bytes + growth > policy.max_bytes_total:
            return Admission(
                "refused_full", "store_full",
                f"hint store holds {self._total_bytes} bytes; {growth} more exceeds {policy.max_bytes_total}",
            )
        if replacing_bytes is None:
            self._count[target] = count + 1
        self._bytes[target] = self._bytes.get(target, 0) + growth
        self._total_bytes += growth
        self._check()
        return ADMITTED

    def cancel(self, target: str, size_bytes: int, replacing_bytes: int | None = None) -> None:
        """Undo an ``admit`` that returned ok (the hint store write failed), with the same arguments."""
        if replacing_bytes is None:
            self.remove(target, size_bytes)
            return
        growth = size_bytes - replacing_bytes
        assert self._bytes.get(target, 0) - growth >= 0
        self._bytes[target] -= growth
        self._total_bytes -= growth
        self._check()

    def record_existing(self, target: str, size_bytes: int) -> None:
        """Account for a hint already stored (startup scan), without enforcing the limits."""
        assert size_bytes >= 0
        self._count[target] = self._count.get(target, 0) + 1
        self._bytes[target] = self._bytes.get(target, 0) + size_bytes
        self._total_bytes += size_bytes

    def remove(self, target: str, size_bytes: int) -> None:
        """Release a hint's room (delivered, expired, or its store write failed after admit)."""
        count = self._count.get(target, 0)
        assert count >= 1, f"no hint tracked for {target}"
        assert self._bytes[target] >= size_bytes, f"removing {size_bytes} bytes, {target} has {self._bytes[target]}"
        if count == 1:
            assert self._bytes[target] == size_bytes, "the last hint of a target must release all its bytes"
            del self._count[target], self._bytes[target]
        else:
            self._count[target] = count - 1
            self._bytes[target] -= size_bytes
        self._total_bytes -= size_bytes
        self._check()

    def _check(self) -> None:
        assert self._total_bytes == sum(self._bytes.values())
        assert all(c > 0 for c in self._count.values()) and self._count.keys() == self._bytes.keys()

    def pending(self, target: str) -> int:
        return self._count.get(target, 0)

    def pending_bytes(self, target: str) -> int:
        return self._bytes.get(target, 0)

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    @property
    def total_hints(self) -> int:
        return sum(self._count.values())

    def snapshot(self) -> dict[str, int]:
        """{target: pending hints}, targets in sorted order (for the cluster API and gauges)."""
        return {target: self._count[target] for target in sorted(self._count)}


# --- replay --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingHint:
    """What the replay planner needs to know of a stored hint (not its blob)."""

    target: str
    key: str
    token: int
    created_at_ns: int

    @property
    def storage_key(self) -> str:
        return hint_storage_key(self.target, self.key)

    @staticmethod
    def of(record: HintRecord) -> PendingHint:
        return PendingHint(record.target, record.key, record.token, record.created_at_ns)


@dataclass(frozen=True, slots=True)
class ReplayLimits:
    rate_per_s: int  # at most this many sends in any one-second window
    concurrency: int  # at most this many sends in flight
    retry_backoff_ns: int = NS_PER_S  # after a failed send to a target, leave it alone this long

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.concurrency <= 0 or self.retry_backoff_ns < 0:
            raise InvalidHintPolicy(f"replay limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    send: tuple[PendingHint, ...]  # start these now, in this order
    expire: tuple[PendingHint, ...]  # drop these unsent (beyond the hint window)
    next_check_ns: int | None  # when the rate window next frees a slot; None: on a completion or new hint
    waiting: int = 0  # sendable hints left for a later round (rate, concurrency)
    blocked: dict[str, str] = field(default_factory=dict)  # target -> "down" | "backoff"


class SendLog:
    """The times of recent sends, bounded to what the rate window needs (for ``plan_replay``)."""

    def __init__(self, rate_per_s: int) -> None:
        assert rate_per_s > 0
        self._times_ns: deque[int] = deque(maxlen=rate_per_s)

    def record(self, now_ns: int) -> None:
        assert not self._times_ns or now_ns >= self._times_ns[-1], "send times must not go backwards"
        self._times_ns.append(now_ns)

    def times_ns(self) -> tuple[int, ...]:
        return tuple(self._times_ns)


def plan_replay(
    pending: Iterable[PendingHint],
    *,
    now_ns: int,
    policy: HintPolicy,
    limits: ReplayLimits,
    targets_up: Collection[str],
    in_flight: Collection[str] = (),
    recent_send_times_ns: Sequence[int] = (),
    last_failure_ns: Mapping[str, int] | None = None,
) -> ReplayPlan:
    """Which hints to send now, which to drop as expired, and when to look again.

    ``in_flight`` holds the storage keys of sends not yet finished (they are neither resent
    nor counted twice); ``recent_send_times_ns`` the start times of earlier sends (older
    than one second are ignored); ``last_failure_ns`` the last failed send per target.
    ``now_ns`` and ``created_at_ns`` are wall-clock times, send times the same clock.
    """
    last_failure = last_failure_ns or {}
    in_flight_keys = set(in_flight)
    expire: list[PendingHint] = []
    by_target: dict[str, list[PendingHint]] = {}
    blocked: dict[str, str] = {}
    for hint in pending:
        if policy.expired(hint.created_at_ns, now_ns):
            expire.append(hint)
            continue
        if hint.storage_key in in_flight_keys:
            continue
        target = hint.target
        if target not in targets_up:
            blocked[target] = "down"
            continue
        failed_at = last_failure.get(target)
        if failed_at is not None and now_ns - failed_at < limits.retry_backoff_ns:
            blocked[target] = "backoff"
            continue
        by_target.setdefault(target, []).append(hint)

    window_start_ns = now_ns - NS_PER_S
    in_window = sorted(t for t in recent_send_times_ns if window_start_ns < t <= now_ns)
    rate_budget = limits.rate_per_s - len(in_window)
    slot_budget = limits.concurrency - len(in_flight_keys)
    budget = max(0, min(rate_budget, slot_budget))

    def age_order(h: PendingHint) -> tuple[int, str, str]:
        return (h.created_at_ns, h.target, h.key)

    # Round-robin across targets, oldest hint first within each, targets ordered by their oldest hint.
    queues = [sorted(hints, key=age_order) for hints in by_target.values()]
    queues.sort(key=lambda q: age_order(q[0]))
    sendable = sum(len(q) for q in queues)
    send: list[PendingHint] = []
    position = 0
    while len(send) < budget and len(send) < sendable:
        for queue in queues:
            if position < len(queue) and len(send) < budget:
                send.append(queue[position])
        position += 1

    waiting = sendable - len(send)
    next_check_ns: int | None = None
    if waiting and rate_budget - len(send) <= 0:
        # With these sends the window holds `rate` or more; a slot frees when enough of the
        # oldest have aged out, i.e. one second after the (count - rate)-th oldest send.
        window = [*in_window, *([now_ns] * len(send))]
        next_check_ns = window[len(window) - limits.rate_per_s] + NS_PER_S
        assert next_check_ns > now_ns
    assert len(send) <= budget and len({h.storage_key for h in send}) == len(send)
    return ReplayPlan(
        tuple(send),
        tuple(sorted(expire, key=age_order)),
        next_check_ns,
        waiting,
        {t: blocked[t] for t in sorted(blocked)},
    )
