"""Quorum arithmetic: parsing R/W, and deciding when a fan-out has succeeded or cannot.

Theory of operation
-------------------
Dynamo's tunable consistency: each key lives on N replicas; a write is acknowledged
after W replicas durably took it and a read answers after R replicas replied.
``R + W > N`` makes every read quorum intersect every write quorum (on the
*primaries*), which is the classic "strong-ish" setting; it is still not
linearizable (see docs/consistency.md).  ``QuorumTracker`` is the pure state
machine a coordinator feeds with replica replies; it says when to answer, and
declares failure as soon as success has become impossible, so no request waits
for a timeout it cannot win.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class InvalidQuorum(ValueError):
    """r/w outside 1..N or not a number/word (a client error: 400)."""


QUORUM_WORDS = ("one", "quorum", "all")


def majority(n: int) -> int:
    assert n >= 1
    return n // 2 + 1


def parse_quorum(text: str | int | None, n: int, default: int, name: str = "r") -> int:
    """Parse ``r``/``w``: an integer or one|quorum|all, validated against N."""
    assert 1 <= default <= n, f"default {name}={default} outside 1..{n}"
    if text is None or text == "":
        return default
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        word = text.strip().lower()
        if word == "one":
            return 1
        if word == "quorum":
            return majority(n)
        if word == "all":
            return n
        try:
            value = int(word, 10)
        except ValueError:
            raise InvalidQuorum(f"{name}={text!r} is not an integer or one|quorum|all") from None
    else:
        raise InvalidQuorum(f"{name} must be an integer or one|quorum|all")
    if not 1 <= value <= n:
        raise InvalidQuorum(f"{name}={value} is outside 1..N (N={n})")
    return value


@dataclass
class QuorumTracker:
    """Counts replica outcomes for one request against a quorum of ``needed`` out of ``total``."""

    needed: int
    total: int
    acknowledged: int = 0
    failed: int = 0
    responders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert 1 <= self.needed <= self.total, (self.needed, self.total)

    def ack(self, member: str) -> None:
        assert self.acknowledged + self.failed < self.total, "more outcomes than replicas"
        self.acknowledged += 1
        self.responders.append(member)

    def fail(self) -> None:
        assert self.acknowledged + self.failed < self.total, "more outcomes than replicas"
        self.failed += 1

    @property
    def satisfied(self) -> bool:
        return self.acknowledged >= self.needed

    @property
    def impossible(self) -> bool:
        return self.total - self.failed < self.needed

    @property
    def done(self) -> bool:
        return self.satisfied or self.impossible

    @property
    def pending(self) -> int:
        return self.total - self.acknowledged - self.failed
