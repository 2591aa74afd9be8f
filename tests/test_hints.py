"""Tables for the hinted-handoff policy: records, bounds, expiry and replay planning (pure)."""

from __future__ import annotations

import msgpack
import pytest

from kvstore.protocol import versions
from kvstore.protocol.hints import (
    ADMITTED,
    NS_PER_S,
    HintDecodeError,
    HintLedger,
    HintPolicy,
    HintRecord,
    HintRefused,
    InvalidHintPolicy,
    PendingHint,
    ReplayLimits,
    ReplayPlan,
    SendLog,
    hint_storage_key,
    plan_replay,
    split_hint_storage_key,
)
from kvstore.protocol.versions import VersionedObject

T0 = 1_700_000_000 * NS_PER_S
MS = 1_000_000


def obj_with(value: bytes | None, node: str = "n1", context: dict[str, int] | None = None) -> VersionedObject:
    return versions.update(VersionedObject.empty(), context or {}, node, value, T0)


def record(target: str = "n3", key: str = "k", created_at_ns: int = T0, value: bytes | None = b"v") -> HintRecord:
    return HintRecord(target, key, 42, created_at_ns, versions.encode(obj_with(value)))


# --- record and key ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k", "", "a\x00b", "ключ", "x" * 1000])
def test_storage_key_roundtrip_and_no_collisions(key: str) -> None:
    storage_key = hint_storage_key("n3", key)
    assert split_hint_storage_key(storage_key) == ("n3", key)
    assert hint_storage_key("n3", key) != hint_storage_key("n2", key)


def test_storage_key_of_a_non_hint_is_a_typed_error() -> None:
    with pytest.raises(HintDecodeError):
        split_hint_storage_key("plain-key")


@pytest.mark.parametrize("value", [b"v", b"", None])
def test_record_roundtrip(value: bytes | None) -> None:
    original = record(value=value)
    decoded = HintRecord.decode(original.encode())
    assert decoded == original
    assert decoded.obj() == obj_with(value)
    assert original.size_bytes == len(original.encode())


@pytest.mark.parametrize(
    "blob",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([2, "n3", "k", 1, 1, b""]),  # unknown version
        msgpack.packb(["n3", "k", 1, b""]),  # the pre-module 4-field layout
        msgpack.packb([1, "n3", "k", "1", 1, b""]),  # token not an int
        msgpack.packb([1, "n3", "k", 1, 1, "text"]),  # blob not bytes
        msgpack.packb({"target": "n3"}),
    ],
)
def test_record_decode_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(HintDecodeError):
        HintRecord.decode(blob)


def test_coalesce_merges_objects_and_keeps_the_oldest_creation_time() -> None:
    first = obj_with(b"v1")
    second = versions.update(first, first.vector(), "n1", b"v2", T0 + 1)  # saw v1: supersedes it
    concurrent = versions.update(VersionedObject.empty(), {}, "n2", b"w", T0 + 2)
    old = HintRecord("n3", "k", 42, T0, versions.encode(first))
    newer = HintRecord("n3", "k", 42, T0 + 5 * NS_PER_S, versions.encode(second))
    merged = old.coalesce(newer)
    assert merged.created_at_ns == T0
    assert merged.obj().live_values == [b"v2"]
    # Order does not matter, and a concurrent write becomes a sibling.
    assert newer.coalesce(old) == merged
    both = merged.coalesce(HintRecord("n3", "k", 42, T0 + 9, versions.encode(concurrent)))
    assert sorted(both.obj().live_values) == [b"v2", b"w"]


def test_coalesce_refuses_different_keys() -> None:
    with pytest.raises(ValueError):
        record(key="a").coalesce(record(key="b"))
    with pytest.raises(ValueError):
        record(target="n2").coalesce(record(target="n3"))


# --- policy and expiry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "age_ns, expired",
    [
        (0, False),
        (3600 * NS_PER_S - 1, False),
        (3600 * NS_PER_S, False),  # exactly at the window: still valid
        (3600 * NS_PER_S + 1, True),
        (-10 * NS_PER_S, False),  # from the "future" (wall clock stepped back)
    ],
)
def test_expiry_at_the_hint_window(age_ns: int, expired: bool) -> None:
    policy = HintPolicy(max_hints_per_target=10, max_bytes_total=10_000, max_age_ns=3600 * NS_PER_S)
    assert policy.expired(T0, T0 + age_ns) is expired


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_hints_per_target": 0, "max_bytes_total": 1, "max_age_ns": 1},
        {"max_hints_per_target": 1, "max_bytes_total": -1, "max_age_ns": 1},
        {"max_hints_per_target": 1, "max_bytes_total": 1, "max_age_ns": 0},
        {"max_hints_per_target": 1.5, "max_bytes_total": 1, "max_age_ns": 1},
    ],
)
def test_invalid_policies_are_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidHintPolicy):
        HintPolicy(**kwargs)


# --- ledger --------------------------------------------------------------------------------

POLICY = HintPolicy(max_hints_per_target=3, max_bytes_total=1000, max_age_ns=3600 * NS_PER_S)


@pytest.mark.parametrize(
    "admits, expected",
    [
        # (target, size, replacing) -> expected status/reason of the last admit
        ([("n2", 100, None)], ("ok", None)),
        ([("n2", 100, None)] * 3, ("ok", None)),
        ([("n2", 100, None)] * 4, ("refused_full", "target_full")),
        ([("n2", 100, None)] * 3 + [("n3", 100, None)], ("ok", None)),  # per target
        ([("n2", 400, None), ("n3", 400, None), ("n4", 201, None)], ("refused_full", "store_full")),
        ([("n2", 400, None), ("n3", 400, None), ("n4", 200, None)], ("ok", None)),  # exactly full
        ([("n2", 1001, None)], ("refused_full", "hint_too_large")),
        # Coalescing into an existing hint: no new slot, only the growth is charged.
        ([("n2", 100, None)] * 3 + [("n2", 150, 100)], ("ok", None)),
        ([("n2", 500, None), ("n3", 400, None), ("n2", 601, 500)], ("refused_full", "store_full")),
        ([("n2", 500, None), ("n3", 400, None), ("n2", 600, 500)], ("ok", None)),
    ],
)
def test_admission_bounds(admits: list[tuple[str, int, int | None]], expected: tuple[str, str | None]) -> None:
    ledger = HintLedger(POLICY)
    results = [ledger.admit(target, size, replacing) for target, size, replacing in admits]
    assert all(r.ok for r in results[:-1])
    last = results[-1]
    assert (last.status, last.reason) == expected
    if not last.ok:
        assert last.message
        with pytest.raises(HintRefused) as caught:
            last.raise_if_refused()
        assert caught.value.admission is last


def test_refusal_changes_nothing_and_remove_frees_room() -> None:
    ledger = HintLedger(POLICY)
    for _ in range(3):
        assert ledger.admit("n2", 100) == ADMITTED
    before = (ledger.pending("n2"), ledger.pending_bytes("n2"), ledger.total_bytes)
    assert not ledger.admit("n2", 100).ok
    assert (ledger.pending("n2"), ledger.pending_bytes("n2"), ledger.total_bytes) == before == (3, 300, 300)
    ledger.remove("n2", 100)
    assert ledger.admit("n2", 100).ok
    assert ledger.snapshot() == {"n2": 3}


def test_cancel_undoes_an_admission_exactly() -> None:
    ledger = HintLedger(POLICY)
    ledger.admit("n2", 100)
    ledger.admit("n2", 180, replacing_bytes=100)
    assert (ledger.pending("n2"), ledger.total_bytes) == (1, 180)
    ledger.cancel("n2", 180, replacing_bytes=100)
    assert (ledger.pending("n2"), ledger.total_bytes) == (1, 100)
    ledger.cancel("n2", 100)
    assert (ledger.pending("n2"), ledger.total_bytes, ledger.snapshot()) == (0, 0, {})


def test_record_existing_rebuilds_over_the_limits_and_then_refuses() -> None:
    ledger = HintLedger(POLICY)
    for _ in range(5):
        ledger.record_existing("n2", 300)  # found on disk after a restart with a smaller limit
    assert (ledger.pending("n2"), ledger.total_bytes, ledger.total_hints) == (5, 1500, 5)
    assert ledger.admit("n3", 1).reason == "store_full"
    assert ledger.admit("n2", 1).reason == "target_full"


def test_ledger_snapshot_is_sorted_by_target() -> None:
    ledger = HintLedger(POLICY)
    for target in ["n9", "n2", "n5", "n2"]:
        ledger.admit(target, 10)
    assert list(ledger.snapshot().items()) == [("n2", 2), ("n5", 1), ("n9", 1)]


def test_removing_untracked_hints_is_a_bug() -> None:
    ledger = HintLedger(POLICY)
    with pytest.raises(AssertionError):
        ledger.remove("n2", 10)


# --- replay planning -----------------------------------------------------------------------

REPLAY_POLICY = HintPolicy(max_hints_per_target=1000, max_bytes_total=10**9, max_age_ns=3600 * NS_PER_S)


def pending(target: str, count: int, first_created_ns: int = T0, step_ns: int = MS) -> list[PendingHint]:
    return [PendingHint(target, f"{target}-k{i:03d}", i, first_created_ns + i * step_ns) for i in range(count)]


def plan(hints: list[PendingHint], now_ns: int = T0 + NS_PER_S, **kwargs: object) -> ReplayPlan:
    limits = kwargs.pop("limits", ReplayLimits(rate_per_s=100, concurrency=10))
    targets_up = kwargs.pop("targets_up", ("n2", "n3", "n4"))
    return plan_replay(
        hints, now_ns=now_ns, policy=REPLAY_POLICY, limits=limits, targets_up=targets_up, **kwargs  # type: ignore[arg-type]
    )


def keys(hints: tuple[PendingHint, ...]) -> list[str]:
    return [h.key for h in hints]


def test_oldest_first_bounded_by_concurrency() -> None:
    hints = pending("n2", 30)[::-1]  # given newest first: the plan reorders
    result = plan(hints)
    assert keys(result.send) == [f"n2-k{i:03d}" for i in range(10)]
    assert result.waiting == 20 and result.next_check_ns is None


def test_in_flight_hints_are_neither_resent_nor_double_counted() -> None:
    hints = pending("n2", 30)
    in_flight = [h.storage_key for h in hints[:4]]
    result = plan(hints, in_flight=in_flight)
    assert keys(result.send) == [f"n2-k{i:03d}" for i in range(4, 10)]


@pytest.mark.parametrize(
    "recent_offsets_ms, expected_sends, next_check_offset_ms",
    [
        ([], 10, None),  # only concurrency binds
        ([-999] * 95, 5, 1),  # 95 sends in the window: 5 left; the oldest frees at +1 ms
        ([-1000] * 95, 10, None),  # exactly 1 s old: out of the window
        ([-500] * 100, 0, 500),
        ([-900] * 50 + [-100] * 50, 0, 100),
        ([-2000] * 1000, 10, None),  # old sends are ignored
    ],
)
def test_rate_limit_over_a_sliding_one_second_window(
    recent_offsets_ms: list[int], expected_sends: int, next_check_offset_ms: int | None
) -> None:
    now = T0 + 10 * NS_PER_S
    hints = pending("n2", 50, first_created_ns=T0)
    result = plan(hints, now_ns=now, recent_send_times_ns=[now + ms * MS for ms in recent_offsets_ms])
    assert len(result.send) == expected_sends
    expected_next = None if next_check_offset_ms is None else now + next_check_offset_ms * MS
    assert result.next_check_ns == expected_next


def test_rate_is_respected_when_it_binds_before_concurrency() -> None:
    now = T0 + 10 * NS_PER_S
    limits = ReplayLimits(rate_per_s=3, concurrency=50)
    result = plan(pending("n2", 20), now_ns=now, limits=limits)
    assert len(result.send) == 3
    assert result.next_check_ns == now + NS_PER_S


def test_simulated_replay_never_exceeds_rate_or_concurrency() -> None:
    """Drive the planner with a send log: any 1 s window holds <= rate sends, in flight <= concurrency."""
    limits = ReplayLimits(rate_per_s=20, concurrency=4)
    hints = pending("n2", 100) + pending("n3", 30)
    log = SendLog(limits.rate_per_s)
    sent_at: list[int] = []
    in_flight: dict[str, int] = {}  # storage key -> completes at
    remaining = {h.storage_key: h for h in hints}
    now = T0 + NS_PER_S
    while remaining and now < T0 + 60 * NS_PER_S:
        for key in [k for k, done_at in in_flight.items() if done_at <= now]:
            del in_flight[key], remaining[key]
        result = plan_replay(
            list(remaining.values()), now_ns=now, policy=REPLAY_POLICY, limits=limits,
            targets_up={"n2", "n3"}, in_flight=list(in_flight), recent_send_times_ns=log.times_ns(),
        )
        for hint in result.send:
            log.record(now)
            sent_at.append(now)
            in_flight[hint.storage_key] = now + 30 * MS
        assert len(in_flight) <= limits.concurrency
        now += 10 * MS
    assert not remaining
    assert len(sent_at) == 130
    for i, t in enumerate(sent_at):
        assert sum(1 for u in sent_at[i:] if u < t + NS_PER_S) <= limits.rate_per_s


def test_round_robin_across_targets_starts_with_the_oldest_backlog() -> None:
    big = pending("n2", 50, first_created_ns=T0)
    small = pending("n3", 3, first_created_ns=T0 + 500 * MS)
    result = plan(big + small, limits=ReplayLimits(rate_per_s=100, concurrency=6))
    assert keys(result.send) == ["n2-k000", "n3-k000", "n2-k001", "n3-k001", "n2-k002", "n3-k002"]


def test_targets_down_or_in_backoff_are_skipped() -> None:
    now = T0 + 10 * NS_PER_S
    hints = pending("n2", 2) + pending("n3", 2) + pending("n4", 2)
    result = plan(
        hints, now_ns=now, targets_up={"n2", "n4"},
        last_failure_ns={"n4": now - 100 * MS, "n2": now - 5 * NS_PER_S},
        limits=ReplayLimits(rate_per_s=100, concurrency=10, retry_backoff_ns=NS_PER_S),
    )
    assert keys(result.send) == ["n2-k000", "n2-k001"]
    assert result.blocked == {"n3": "down", "n4": "backoff"}


def test_expired_hints_are_dropped_not_sent_and_cost_no_budget() -> None:
    now = T0 + 3600 * NS_PER_S + 5 * MS
    hints = pending("n2", 10, first_created_ns=T0)  # k000..k005 are older than the window
    result = plan(hints, now_ns=now, limits=ReplayLimits(rate_per_s=100, concurrency=2), targets_up=())
    assert keys(result.expire) == [f"n2-k{i:03d}" for i in range(5)]
    assert result.send == ()
    result = plan(hints, now_ns=now, limits=ReplayLimits(rate_per_s=100, concurrency=2))
    assert keys(result.send) == ["n2-k005", "n2-k006"]


def test_nothing_pending_means_an_empty_plan() -> None:
    result = plan([])
    assert (result.send, result.expire, result.next_check_ns, result.waiting) == ((), (), None, 0)


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    hints = pending("n2", 20) + pending("n3", 20) + pending("n4", 20)
    a = plan(hints, limits=ReplayLimits(rate_per_s=100, concurrency=25))
    b = plan(hints[::-1], limits=ReplayLimits(rate_per_s=100, concurrency=25))
    assert a == b


@pytest.mark.parametrize("kwargs", [{"rate_per_s": 0, "concurrency": 1}, {"rate_per_s": 1, "concurrency": 0}])
def test_invalid_replay_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidHintPolicy):
        ReplayLimits(**kwargs)


def test_send_log_keeps_only_what_the_window_needs() -> None:
    log = SendLog(rate_per_s=3)
    for t in range(10):
        log.record(T0 + t)
    assert log.times_ns() == (T0 + 7, T0 + 8, T0 + 9)
