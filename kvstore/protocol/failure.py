"""Phi-accrual failure detection and the membership view built on it.

Theory of operation
-------------------
Follows "The phi Accrual Failure Detector" (Hayashibara, Défago, Yared, Katayama,
SRDS 2004) as implemented by Akka (``akka.remote.PhiAccrualFailureDetector``);
Cassandra's ``FailureDetector`` uses the same idea.  Instead of a binary
"timed out?", the detector outputs a suspicion level

    phi(t) = -log10( P(the next heartbeat arrives later than t) )

computed from the distribution of recently observed heartbeat inter-arrival
times.  phi = 1 means a 10% chance that the member is fine and merely late,
phi = 8 (the default threshold) a 1e-8 chance.  The threshold is the single knob
trading detection time against false suspicion, independent of the network's
actual timing: the detector adapts to whatever interval and jitter it observes.

**Which distribution.**  We model inter-arrival times as *normal* (Akka), not
exponential (Cassandra).  Cassandra learns from gossip, whose arrivals are a
Poisson-like process (a random peer every second), for which the exponential
is the right model, and for which the variance carries no information beyond
the mean.  Here every node pings every peer on a fixed interval, so arrivals are
regular and their spread *is* informative: a tight, regular stream should be
suspected sooner after it stops than a jittery one, which only the normal model
expresses.  Two guards keep the normal model sane:

* ``min_std_ms`` floors the standard deviation.  Perfectly regular heartbeats
  (e.g. a simulated network) give std ~ 0, which would make phi jump to
  infinity on the first millisecond of delay.
* ``acceptable_pause_ms`` is added to the mean (Akka's acceptable heartbeat
  pause): a known pause budget (GC, a slow event loop) that should not count
  as evidence of failure.

phi uses Akka's logistic approximation of the normal CDF,
``F(y) ~ 1 / (1 + exp(-y (1.5976 + 0.070566 y^2)))``, evaluated in log space
(a softplus) so that phi stays finite and strictly increasing however long the
silence: a plain ``exp`` underflows and would return ``inf`` after ~20 std.  The
approximation is within 0.05 of the exact normal tail up to 3 std and then
over-estimates it (phi 7.3 instead of 6.5 at 5 std): it errs towards suspicion.

**Window.**  The last ``window_size`` intervals, kept with exact integer sums
(nanoseconds), so the mean and variance are O(1) per heartbeat and never drift.
The first heartbeat seeds the window with two intervals around
``first_heartbeat_estimate_ms`` (mean = estimate, std = estimate / 4), as Akka
does, so that phi is defined from the very first heartbeat.

**Recovery.**  A heartbeat that arrives while phi is above the threshold ends
the suspicion but its (long) interval is *not* added to the window (as in
Akka): one outage must not inflate the mean and slow the next detection.

**Clustered heartbeats.**  A node counts every successful exchange with a peer
as a heartbeat, so under load heartbeats arrive microseconds apart, then only
every ping interval when traffic stops.  Sampling those micro-intervals would
shrink the mean and make the first idle ping interval look like a failure.
``min_sample_interval_ms`` therefore only samples an interval once that much
time has passed since the last *sampled* arrival; every heartbeat still
refreshes "last heard", so phi is measured from the freshest evidence.

Guarantees: phi is 0 before any heartbeat, finite and >= 0 always, and strictly
increasing in the time since the last heartbeat; the output depends only on the
sequence of ``now_ns`` values passed in (no clock reads, no randomness).
Assumes the times passed in come from one monotonic clock; a heartbeat whose time
is earlier than the last one is ignored (it carries no newer evidence).

``MembershipView`` holds one detector per peer and turns phi into "up"/"down".
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

MemberState = Literal["up", "down"]
UP: MemberState = "up"
DOWN: MemberState = "down"

NS_PER_MS = 1_000_000
_LN10 = math.log(10.0)


class UnknownMember(LookupError):
    """A member id that is not part of the configured membership."""

    def __init__(self, member: str) -> None:
        super().__init__(f"unknown member {member!r}")
        self.member = member


def _softplus(z: float) -> float:
    """log(1 + e^z) without overflow or underflow."""
    if z > 0:
        return z + math.log1p(math.exp(-z))
    return math.log1p(math.exp(z))


def phi_normal(elapsed_ms: float, mean_ms: float, std_ms: float) -> float:
    """-log10 P(interval > elapsed) for a normal(mean, std) interval, via Akka's logistic approximation."""
    assert std_ms > 0, "std must be floored above zero"
    y = (elapsed_ms - mean_ms) / std_ms
    # P(later) ~ 1 / (1 + e^z)  =>  phi = log10(1 + e^z) = softplus(z) / ln 10.
    z = y * (1.5976 + 0.070566 * y * y)
    return _softplus(z) / _LN10


class PhiAccrualDetector:
    """Suspicion level of one monitored member, from its heartbeat arrival times."""

    def __init__(
        self,
        threshold: float = 8.0,
        window_size: int = 100,
        min_std_ms: float = 50.0,
        acceptable_pause_ms: float = 0.0,
        first_heartbeat_estimate_ms: float = 500.0,
        min_sample_interval_ms: float = 0.0,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2 (the seed uses two samples), got {window_size}")
        if not min_std_ms > 0:
            raise ValueError(f"min_std_ms must be > 0, got {min_std_ms}")
        if acceptable_pause_ms < 0 or min_sample_interval_ms < 0:
            raise ValueError("acceptable_pause_ms and min_sample_interval_ms must be >= 0")
        if not first_heartbeat_estimate_ms > 0:
            raise ValueError(f"first_heartbeat_estimate_ms must be > 0, got {first_heartbeat_estimate_ms}")
        self.threshold = threshold
        self.window_size = window_size
        self.min_std_ms = min_std_ms
        self.acceptable_pause_ms = acceptable_pause_ms
        self.first_heartbeat_estimate_ms = first_heartbeat_estimate_ms
        self.min_sample_interval_ns = int(min_sample_interval_ms * NS_PER_MS)
        self._intervals_ns: deque[int] = deque()
        self._sum_ns = 0
        self._sum_squares_ns2 = 0
        self._last_heard_ns: int | None = None
        self._last_sampled_ns: int | None = None
        # (mean + acceptable pause, floored std) of the window: phi is asked far more often than
        # the window changes (every request's placement asks), so it is kept until the next sample.
        self._phi_params: tuple[float, float] | None = None

    # --- observations ---------------------------------------------------------------------

    @property
    def last_heard_ns(self) -> int | None:
        return self._last_heard_ns

    @property
    def sample_count(self) -> int:
        return len(self._intervals_ns)

    def _push(self, interval_ns: int) -> None:
        self._phi_params = None
        self._intervals_ns.append(interval_ns)
        self._sum_ns += interval_ns
        self._sum_squares_ns2 += interval_ns * interval_ns
        if len(self._intervals_ns) > self.window_size:
            dropped = self._intervals_ns.popleft()
            self._sum_ns -= dropped
            self._sum_squares_ns2 -= dropped * dropped
        assert len(self._intervals_ns) <= self.window_size

    def heartbeat(self, now_ns: int) -> None:
        """Record evidence that the member was alive at ``now_ns``."""
        last_heard = self._last_heard_ns
        if last_heard is None:
            estimate_ns = int(self.first_heartbeat_estimate_ms * NS_PER_MS)
            spread_ns = estimate_ns // 4
            self._push(estimate_ns - spread_ns)
            self._push(estimate_ns + spread_ns)
            self._last_heard_ns = now_ns
            self._last_sampled_ns = now_ns
            return
        if now_ns <= last_heard:
            return  # stale or duplicate: no newer evidence, and a 0 interval would skew the window
        # Judge availability *before* refreshing: a heartbeat ending a suspected outage must not
        # feed the outage's length into the window.
        was_available = self.is_available(now_ns)
        assert self._last_sampled_ns is not None
        since_sampled_ns = now_ns - self._last_sampled_ns
        if not was_available:
            self._last_sampled_ns = now_ns
        elif since_sampled_ns >= max(1, self.min_sample_interval_ns):
            self._push(since_sampled_ns)
            self._last_sampled_ns = now_ns
        self._last_heard_ns = now_ns

    # --- statistics -----------------------------------------------------------------------

    def mean_ms(self) -> float:
        count = len(self._intervals_ns)
        assert count > 0
        return self._sum_ns / count / NS_PER_MS

    def std_ms(self) -> float:
        """The observed standard deviation (before flooring)."""
        count = len(self._intervals_ns)
        assert count > 0
        # Exact integer numerator: n * sum(x^2) - (sum x)^2 >= 0 (Cauchy-Schwarz).
        numerator = count * self._sum_squares_ns2 - self._sum_ns * self._sum_ns
        assert numerator >= 0
        return math.sqrt(numerator) / count / NS_PER_MS

    def phi(self, now_ns: int) -> float:
        """Suspicion level at ``now_ns``: 0 before any heartbeat, then grows with the silence."""
        if self._last_heard_ns is None:
            return 0.0
        elapsed_ms = max(0, now_ns - self._last_heard_ns) / NS_PER_MS
        params = self._phi_params
        if params is None:
            params = self._phi_params = (self.mean_ms() + self.acceptable_pause_ms, max(self.std_ms(), self.min_std_ms))
        return phi_normal(elapsed_ms, params[0], params[1])

    def is_available(self, now_ns: int) -> bool:
        return self.phi(now_ns) < self.threshold


class MembershipView:
    """Up/down view of every member, one phi detector per peer.

    **Never heard from.**  A peer with no heartbeat yet is "up" until
    ``startup_grace_ms`` after the view's start (``started_at_ns``, or the first
    ``now_ns`` the view is given), then "down".  Optimism because the whole
    cluster usually boots together: marking unknown peers down would send the
    first writes to fallbacks as hints (a hint storm to replay seconds later) and
    fail strict-quorum requests that would have succeeded; trying a primary that
    is in fact dead only costs one timed-out call, after which the coordinator
    substitutes a fallback anyway.  The grace bounds that optimism: a member that
    never answered is not believed up forever.  For a never-heard member phi is
    reported as 0.0 within the grace and ``inf`` after it.

    The local member is always "up" (phi 0.0) and its heartbeats are ignored.

    ``min_sample_interval_ms`` defaults to 100 ms here (half the default 200 ms
    ping interval): the node counts every successful call as a heartbeat, see the
    module docstring.  Set it to about half of ``heartbeat_interval_ms``.
    """

    def __init__(
        self,
        members: Iterable[str],
        self_id: str,
        threshold: float = 8.0,
        *,
        window_size: int = 100,
        min_std_ms: float = 50.0,
        acceptable_pause_ms: float = 0.0,
        first_heartbeat_estimate_ms: float = 500.0,
        min_sample_interval_ms: float = 100.0,
        startup_grace_ms: float = 5000.0,
        started_at_ns: int | None = None,
    ) -> None:
        ordered = tuple(sorted(set(members)))
        assert self_id in ordered, f"{self_id!r} is not among the members"
        if startup_grace_ms < 0:
            raise ValueError(f"startup_grace_ms must be >= 0, got {startup_grace_ms}")
        self.members = ordered
        self.self_id = self_id
        self.threshold = threshold
        self.startup_grace_ns = int(startup_grace_ms * NS_PER_MS)
        self._started_at_ns = started_at_ns
        self._detector_settings: dict[str, Any] = {
            "threshold": threshold,
            "window_size": window_size,
            "min_std_ms": min_std_ms,
            "acceptable_pause_ms": acceptable_pause_ms,
            "first_heartbeat_estimate_ms": first_heartbeat_estimate_ms,
            "min_sample_interval_ms": min_sample_interval_ms,
        }
        self._detectors: dict[str, PhiAccrualDetector] = {
            member: PhiAccrualDetector(**self._detector_settings) for member in ordered if member != self_id
        }
        # What transitions() last reported; everyone starts "up" (see the class docstring).
        self._reported: dict[str, MemberState] = dict.fromkeys(ordered, UP)

    def set_members(self, members: Iterable[str]) -> None:
        """A membership change: detectors of staying members keep their history, newcomers start
        "never heard from" (up within the grace), members that left are forgotten."""
        ordered = tuple(sorted(set(members) | {self.self_id}))
        for member in ordered:
            if member != self.self_id and member not in self._detectors:
                self._detectors[member] = PhiAccrualDetector(**self._detector_settings)
                self._reported[member] = UP
        for member in self.members:
            if member not in ordered:
                self._detectors.pop(member, None)
                self._reported.pop(member, None)
        self.members = ordered

    def _observe(self, now_ns: int) -> None:
        if self._started_at_ns is None:
            self._started_at_ns = now_ns

    def _check(self, member: str) -> None:
        if member not in self._reported:
            raise UnknownMember(member)

    def detector(self, member: str) -> PhiAccrualDetector:
        self._check(member)
        assert member != self.self_id, "the local member has no detector"
        return self._detectors[member]

    def heartbeat(self, member: str, now_ns: int) -> None:
        self._check(member)
        self._observe(now_ns)
        if member != self.self_id:
            self._detectors[member].heartbeat(now_ns)

    def phi(self, member: str, now_ns: int) -> float:
        self._check(member)
        self._observe(now_ns)
        if member == self.self_id:
            return 0.0
        detector = self._detectors[member]
        if detector.last_heard_ns is None:
            return 0.0 if self._within_grace(now_ns) else math.inf
        return detector.phi(now_ns)

    def _within_grace(self, now_ns: int) -> bool:
        assert self._started_at_ns is not None
        return now_ns - self._started_at_ns < self.startup_grace_ns

    def state(self, member: str, now_ns: int) -> MemberState:
        return UP if self.phi(member, now_ns) < self.threshold else DOWN

    def transitions(self, now_ns: int) -> list[tuple[str, MemberState, MemberState]]:
        """State changes since the previous call, in member order (for logs and metrics)."""
        changes: list[tuple[str, MemberState, MemberState]] = []
        for member in self.members:
            new = self.state(member, now_ns)
            old = self._reported[member]
            if new != old:
                changes.append((member, old, new))
                self._reported[member] = new
        return changes

    def snapshot(self, now_ns: int) -> dict[str, dict[str, MemberState | float]]:
        """{member: {"state": "up"|"down", "phi": float}} for every member, self included."""
        view: dict[str, dict[str, MemberState | float]] = {}
        for member in self.members:
            phi = self.phi(member, now_ns)
            view[member] = {"state": UP if phi < self.threshold else DOWN, "phi": phi}
        return view

    def up_members(self, now_ns: int) -> list[str]:
        return [m for m in self.members if self.state(m, now_ns) == UP]
