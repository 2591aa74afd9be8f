"""Tables for the phi-accrual failure detector and the membership view (pure, no real time)."""

from __future__ import annotations

import math
import random

import pytest

from kvstore.protocol.failure import (
    DOWN,
    UP,
    MembershipView,
    PhiAccrualDetector,
    UnknownMember,
    phi_normal,
)

MS = 1_000_000
START_NS = 10_000 * MS


def feed(detector: PhiAccrualDetector, intervals_ms: list[float], start_ns: int = START_NS) -> int:
    """Heartbeat at start, then after each interval; returns the time of the last heartbeat."""
    now = start_ns
    detector.heartbeat(now)
    for interval in intervals_ms:
        now += int(interval * MS)
        detector.heartbeat(now)
    return now


def regular(interval_ms: float, count: int) -> list[float]:
    return [interval_ms] * count


def jittered(interval_ms: float, jitter_ms: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [interval_ms + rng.uniform(-jitter_ms, jitter_ms) for _ in range(count)]


# --- the phi function ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "elapsed_ms, mean_ms, std_ms, low, high",
    [
        (100, 100, 10, 0.25, 0.35),  # at the mean: P(later) = 1/2, phi = log10(2) ~ 0.30
        (0, 100, 10, 0.0, 1e-6),  # far before the mean: no suspicion
        (130, 100, 10, 2.5, 3.1),  # 3 std: P(later) ~ 1.3e-3 -> phi ~ 2.9
        # 5 std: exactly ~2.9e-7 -> 6.54; the logistic approximation over-estimates the tail (7.3),
        # erring towards earlier suspicion.
        (150, 100, 10, 6.5, 7.5),
        (10_000, 100, 10, 1e6, math.inf),  # far beyond: huge but finite (no exp underflow)
    ],
)
def test_phi_normal_values(elapsed_ms: float, mean_ms: float, std_ms: float, low: float, high: float) -> None:
    phi = phi_normal(elapsed_ms, mean_ms, std_ms)
    assert low <= phi <= high
    assert math.isfinite(phi)


def test_phi_normal_is_strictly_increasing_over_a_wide_span() -> None:
    values = [phi_normal(t, 200, 50) for t in range(0, 100_000, 7)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


# --- detector tables ----------------------------------------------------------------------


def test_no_heartbeat_means_no_suspicion() -> None:
    detector = PhiAccrualDetector()
    assert detector.phi(START_NS) == 0.0
    assert detector.is_available(START_NS + 10**12)


def test_first_heartbeat_seeds_the_estimate() -> None:
    detector = PhiAccrualDetector(first_heartbeat_estimate_ms=500)
    detector.heartbeat(START_NS)
    assert detector.sample_count == 2
    assert detector.mean_ms() == pytest.approx(500)
    assert detector.std_ms() == pytest.approx(125)
    # Well within the estimate: low; far beyond it: suspected.
    assert detector.phi(START_NS + 300 * MS) < 1
    assert not detector.is_available(START_NS + 2000 * MS)


@pytest.mark.parametrize(
    "name, intervals_ms, probe_after_ms",
    [
        ("regular 200ms, probed on time", regular(200, 50), 200),
        ("regular 200ms, probed a bit late", regular(200, 50), 260),
        ("regular 1s", regular(1000, 30), 1000),
        ("jitter +-80ms around 200ms", jittered(200, 80, 80, seed=1), 280),
        ("jitter +-400ms around 1s", jittered(1000, 400, 80, seed=2), 1400),
    ],
)
def test_regular_heartbeats_keep_phi_low(name: str, intervals_ms: list[float], probe_after_ms: float) -> None:
    detector = PhiAccrualDetector()
    last = feed(detector, intervals_ms)
    assert detector.phi(last + int(probe_after_ms * MS)) < 3.0, name
    assert detector.is_available(last + int(probe_after_ms * MS)), name


@pytest.mark.parametrize(
    "intervals_ms, suspected_by_ms",
    [
        (regular(200, 50), 600),
        (regular(1000, 50), 1700),
        (jittered(200, 80, 80, seed=3), 1000),
    ],
)
def test_silence_grows_phi_monotonically_past_the_threshold(intervals_ms: list[float], suspected_by_ms: int) -> None:
    detector = PhiAccrualDetector(threshold=8.0)
    last = feed(detector, intervals_ms)
    phis = [detector.phi(last + t * MS) for t in range(0, 10_000, 10)]
    assert all(b > a for a, b in zip(phis, phis[1:], strict=False)), "phi must grow with the silence"
    assert detector.phi(last + suspected_by_ms * MS) >= 8.0
    assert not detector.is_available(last + suspected_by_ms * MS)


def test_detection_time_scales_with_the_interval() -> None:
    """The same threshold yields a later suspicion for a slower stream: phi adapts."""

    def first_suspected_ms(interval_ms: int) -> int:
        detector = PhiAccrualDetector()
        last = feed(detector, regular(interval_ms, 100))
        return next(t for t in range(0, 100_000) if not detector.is_available(last + t * MS))

    fast, slow = first_suspected_ms(100), first_suspected_ms(1000)
    assert 100 < fast < 600
    assert slow > 1000 and slow > 3 * fast


def test_jitter_tolerance_a_jittery_stream_is_suspected_later() -> None:
    steady, jittery = PhiAccrualDetector(), PhiAccrualDetector()
    last_steady = feed(steady, regular(200, 100))
    last_jittery = feed(jittery, jittered(200, 150, 100, seed=4))
    probe = 450 * MS
    assert steady.phi(last_steady + probe) > jittery.phi(last_jittery + probe)
    # No false suspicion anywhere along a jittery stream when probed at its worst moment.
    detector = PhiAccrualDetector()
    now = START_NS
    detector.heartbeat(now)
    for interval in jittered(200, 150, 300, seed=5):
        worst = now + int(interval * MS) - 1
        assert detector.is_available(worst)
        now += int(interval * MS)
        detector.heartbeat(now)


@pytest.mark.parametrize(
    "min_std_ms, acceptable_pause_ms, silence_ms, available",
    [
        (50, 0, 400, True),
        (50, 0, 700, False),
        (200, 0, 700, True),  # a wider floor tolerates more
        (50, 1000, 1100, True),  # a pause budget shifts the mean
        (50, 1000, 1600, False),
    ],
)
def test_min_std_and_acceptable_pause(
    min_std_ms: float, acceptable_pause_ms: float, silence_ms: int, available: bool
) -> None:
    detector = PhiAccrualDetector(min_std_ms=min_std_ms, acceptable_pause_ms=acceptable_pause_ms, window_size=20)
    last = feed(detector, regular(200, 40))  # seeds pushed out: std observed = 0, the floor applies
    assert detector.std_ms() == pytest.approx(0)
    assert detector.is_available(last + silence_ms * MS) is available


def test_recovery_after_heartbeats_resume() -> None:
    detector = PhiAccrualDetector()
    last = feed(detector, regular(200, 50))
    outage_end = last + 30_000 * MS
    assert not detector.is_available(outage_end)
    detector.heartbeat(outage_end)
    assert detector.is_available(outage_end)
    assert detector.phi(outage_end) < 0.01
    # The outage's 30 s interval was not sampled: detection stays as fast as before.
    assert detector.mean_ms() < 250
    assert not detector.is_available(outage_end + 700 * MS)


def test_window_is_bounded_and_forgets_old_intervals() -> None:
    detector = PhiAccrualDetector(window_size=10)
    feed(detector, regular(1000, 30) + regular(100, 10))
    assert detector.sample_count == 10
    assert detector.mean_ms() == pytest.approx(100)


@pytest.mark.parametrize("delta_ns", [0, -5 * MS])
def test_stale_or_duplicate_heartbeats_are_ignored(delta_ns: int) -> None:
    detector = PhiAccrualDetector()
    last = feed(detector, regular(200, 10))
    count, mean = detector.sample_count, detector.mean_ms()
    detector.heartbeat(last + delta_ns)
    assert (detector.sample_count, detector.mean_ms(), detector.last_heard_ns) == (count, mean, last)


def test_min_sample_interval_ignores_clustered_heartbeats_for_the_statistics() -> None:
    """Bursts of 1 ms heartbeats (busy traffic) must not make an idle ping interval look like a failure."""
    bursty_intervals = ([1.0] * 199 + [1.0]) * 5  # 1 s of 1 ms heartbeats, five times

    def idle_then_check(min_sample_interval_ms: float) -> bool:
        detector = PhiAccrualDetector(min_sample_interval_ms=min_sample_interval_ms, window_size=1000)
        last = feed(detector, regular(200, 20) + bursty_intervals)
        return detector.is_available(last + 350 * MS)

    assert not idle_then_check(0.0)  # plain Akka behaviour: mean collapses to ~1 ms
    assert idle_then_check(100.0)


def test_detector_is_deterministic() -> None:
    intervals = jittered(200, 100, 200, seed=9)
    a, b = PhiAccrualDetector(), PhiAccrualDetector()
    last_a, last_b = feed(a, intervals), feed(b, intervals)
    assert [a.phi(last_a + t * MS) for t in range(0, 2000, 50)] == [b.phi(last_b + t * MS) for t in range(0, 2000, 50)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0},
        {"window_size": 1},
        {"min_std_ms": 0},
        {"acceptable_pause_ms": -1},
        {"first_heartbeat_estimate_ms": 0},
        {"min_sample_interval_ms": -1},
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PhiAccrualDetector(**kwargs)  # type: ignore[arg-type]


# --- membership view ----------------------------------------------------------------------

MEMBERS = ["n1", "n2", "n3"]


def make_view(**kwargs: float) -> MembershipView:
    return MembershipView(MEMBERS, "n1", started_at_ns=START_NS, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "elapsed_ms, state, phi",
    [
        (0, UP, 0.0),
        (4_999, UP, 0.0),
        (5_000, DOWN, math.inf),
        (60_000, DOWN, math.inf),
    ],
)
def test_never_heard_from_is_up_until_the_grace_ends(elapsed_ms: int, state: str, phi: float) -> None:
    view = make_view(startup_grace_ms=5000)
    assert view.state("n2", START_NS + elapsed_ms * MS) == state
    assert view.phi("n2", START_NS + elapsed_ms * MS) == phi


def test_grace_starts_at_the_first_observation_when_no_start_is_given() -> None:
    view = MembershipView(MEMBERS, "n1", startup_grace_ms=1000)
    first = START_NS + 123 * MS
    assert view.state("n3", first) == UP
    assert view.state("n3", first + 999 * MS) == UP
    assert view.state("n3", first + 1000 * MS) == DOWN


def test_self_is_always_up() -> None:
    view = make_view(startup_grace_ms=0)
    view.heartbeat("n1", START_NS)  # ignored
    assert view.state("n1", START_NS + 10**13) == UP
    assert view.phi("n1", START_NS + 10**13) == 0.0


def test_unknown_member_is_a_typed_error() -> None:
    view = make_view()
    with pytest.raises(UnknownMember):
        view.heartbeat("n9", START_NS)
    with pytest.raises(UnknownMember):
        view.state("n9", START_NS)


def test_transitions_report_each_change_once_in_member_order() -> None:
    view = make_view(startup_grace_ms=1000)
    now = START_NS
    for _ in range(30):
        view.heartbeat("n2", now)
        view.heartbeat("n3", now)
        now += 200 * MS
    assert view.transitions(now) == []
    # n3 goes silent; n2 keeps beating.
    for _ in range(10):
        view.heartbeat("n2", now)
        now += 200 * MS
    assert view.transitions(now) == [("n3", UP, DOWN)]
    assert view.transitions(now) == []  # reported once
    view.heartbeat("n3", now)
    view.heartbeat("n2", now)
    assert view.transitions(now) == [("n3", DOWN, UP)]
    # Both go silent: both reported, in member order.
    later = now + 5_000 * MS
    assert view.transitions(later) == [("n2", UP, DOWN), ("n3", UP, DOWN)]


def test_never_heard_member_transitions_down_after_grace() -> None:
    view = make_view(startup_grace_ms=2000)
    assert view.transitions(START_NS + 1999 * MS) == []
    assert view.transitions(START_NS + 2000 * MS) == [("n2", UP, DOWN), ("n3", UP, DOWN)]


def test_snapshot_has_every_member_with_state_and_phi() -> None:
    view = make_view(startup_grace_ms=1000)
    now = START_NS
    for _ in range(20):
        view.heartbeat("n2", now)
        now += 200 * MS
    snap = view.snapshot(now + 2000 * MS)
    assert list(snap) == MEMBERS
    assert snap["n1"] == {"state": UP, "phi": 0.0}
    assert snap["n2"]["state"] == DOWN and 8.0 <= float(snap["n2"]["phi"]) < math.inf
    assert snap["n3"] == {"state": DOWN, "phi": math.inf}
    assert view.up_members(now) == ["n1", "n2"]


def test_view_threshold_and_detector_options_are_applied() -> None:
    strict = make_view(threshold=1.0, min_sample_interval_ms=0)
    lenient = make_view(threshold=16.0, min_sample_interval_ms=0)
    now = START_NS
    for _ in range(30):
        strict.heartbeat("n2", now)
        lenient.heartbeat("n2", now)
        now += 200 * MS
    probe = now + 300 * MS
    assert strict.state("n2", probe) == DOWN
    assert lenient.state("n2", probe) == UP
    assert strict.detector("n2").threshold == 1.0
