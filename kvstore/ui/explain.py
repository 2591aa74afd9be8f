"""What just happened to each mode, and why, in plain words derived from the figures.

Theory of operation
-------------------
Pure and rule-based, like the batch explorer's findings (``explore_report.findings_for``,
which also gives the one-line summary here): every sentence is chosen by a fixed threshold
on a figure shown beside it, and the "why" attached to it is the mechanism of that mode
(CASPaxos needs a majority of a key's replicas; a strict quorum needs W primaries; a sloppy
quorum takes any reachable node; last-write-wins orders by the coordinator's clock).  So the
text can never claim what the numbers do not show, and a surprise in the numbers (a
linearizable violation, a lost write with siblings) is said to be one.

Thresholds: a side "keeps answering" at >= 90% answered, "is refused" at <= 10%, with at least
``MIN_OPS`` requests on that side in the window; anything else is "partly".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvstore.explore.report import findings_for

MIN_OPS = 5
GOOD, BAD, INFO = "good", "bad", "info"
AP_MODES = ("eventual", "eventual-lww")


@dataclass
class Figures:
    mode: str
    fault: str = ""  # the faults in force, in words ("" = none)
    partitioned: bool = False
    down_nodes: list[str] = field(default_factory=list)  # killed or paused
    skews_ms: dict[str, float] = field(default_factory=dict)
    healed_s: float | None = None  # seconds since the last fault ended (when none is active)
    majority: dict[str, Any] = field(default_factory=dict)  # stats.SideCounts.to_json, last window
    minority: dict[str, Any] = field(default_factory=dict)
    writes_ok_minority: int = 0
    latency_p50_ms: float | None = None
    keys: int = 0
    keys_invalid: int = 0  # keys with a window proved not linearizable, ever
    keys_invalid_now: int = 0  # ... in their current window
    keys_checked: int = 0  # keys with a verdict at all
    exact: bool = True  # every key still in its first window (a verdict on the whole history)
    anomalies: dict[str, Any] = field(default_factory=dict)  # verdicts.anomalies
    agree: int | None = None  # keys whose replicas hold the same versions (None: not probed)
    probed_keys: int = 0
    replicas: int = 3  # N

    @property
    def majority_of_n(self) -> int:
        return self.replicas // 2 + 1

    @property
    def faulty(self) -> bool:
        return bool(self.fault)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _side(counts: dict[str, Any]) -> float | None:
    """The side's availability when it saw enough requests to judge."""
    if counts.get("total", 0) < MIN_OPS:
        return None
    value = counts.get("availability")
    return float(value) if value is not None else None


def explain(f: Figures) -> list[tuple[str, str]]:
    """(tone, sentence) pairs, most important first."""
    out: list[tuple[str, str]] = []
    out += _what_happens(f)
    out += _availability(f)
    out += _clocks(f)
    out += _verdict(f)
    out += _anomalies(f)
    out += _convergence(f)
    return out


def _what_happens(f: Figures) -> list[tuple[str, str]]:
    if f.faulty:
        return [(INFO, f"Fault in force: {f.fault}.")]
    if f.healed_s is not None:
        return [(INFO, f"No fault: the last one was healed {f.healed_s:.0f} s ago.")]
    return [(INFO, "No fault: every node hears every other.")]


def _availability(f: Figures) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    minority, majority = _side(f.minority), _side(f.majority)
    down = ", ".join(f.down_nodes)
    if f.faulty and minority is not None:
        n = f.minority["total"]
        if minority <= 0.1:
            if f.mode == "linearizable":
                why = ("each operation is a CASPaxos round that needs promises from a majority of the key's "
                       f"replicas ({f.majority_of_n} of {f.replicas}), and from there at most "
                       f"{f.majority_of_n - 1} is reachable. It gives up availability to stay consistent: "
                       "the C of CAP")
            elif f.mode == "quorum":
                why = (f"R = W = {f.majority_of_n} of N = {f.replicas} counts only the key's primaries, and from "
                       f"there at most {f.majority_of_n - 1} is reachable; stand-ins do not count")
            else:
                why = ("its clients are bound to a node that is down" if down else
                       "not even a sloppy quorum found a live node to take the request")
            out.append((BAD if f.mode in AP_MODES else INFO,
                        f"The minority side is refused: {_pct(minority)} of its {n} requests answered, because {why}."))
        elif minority >= 0.9:
            if f.mode in AP_MODES:
                why = ("with R = W = 1 and a sloppy quorum any reachable node takes a write, as a hint for the "
                       "replicas it cannot reach. It stays available and gives up consistency: the A of CAP")
                extra = f"; {f.writes_ok_minority} writes were accepted there" if f.writes_ok_minority else ""
                out.append((GOOD, f"The minority side keeps answering: {_pct(minority)} of {n} requests, "
                                  f"because {why}{extra}."))
            else:
                out.append((INFO, f"The minority side still answers {_pct(minority)} of {n} requests: "
                                  "no key lost its majority of replicas there."))
        else:
            out.append((INFO, f"The minority side answers {_pct(minority)} of its {n} requests."))
    if majority is not None:
        n = f.majority["total"]
        if f.faulty and majority >= 0.9:
            out.append((GOOD, f"The majority side keeps answering ({_pct(majority)} of {n}): it still reaches "
                              "most of each key's replicas."))
        elif majority < 0.9:
            timeouts = f.majority.get("info", 0)
            why = (f"; {timeouts} requests timed out (a request first sent to a replica on the other side "
                   "waits until the failure detector marks it down)" if timeouts else "")
            out.append((BAD, f"The majority side answers only {_pct(majority)} of {n} requests{why}."))
        elif f.mode == "linearizable" and f.latency_p50_ms is not None:
            out.append((INFO, f"Every operation is a round trip to a majority (p50 {f.latency_p50_ms:.1f} ms): "
                              "consistency costs latency even without faults."))
    return out


def _clocks(f: Figures) -> list[tuple[str, str]]:
    if not f.skews_ms:
        return []
    skewed = ", ".join(f"{n} {ms / 1000:+g} s" for n, ms in sorted(f.skews_ms.items()))
    if f.mode == "eventual-lww":
        lost = f.anomalies.get("lost_writes_recent", 0)
        text = (f"Clocks skewed ({skewed}): last-write-wins keeps the value with the latest timestamp, and a "
                "timestamp is the coordinator's clock, so a node whose clock runs ahead wins over later writes")
        return [(BAD if lost else INFO, text + (f": {lost} acknowledged writes were just lost." if lost else "."))]
    why = ("CASPaxos orders by ballots, not clocks" if f.mode == "linearizable"
           else "concurrent writes are told apart by version vectors, not clocks")
    return [(GOOD, f"Clocks skewed ({skewed}): no effect on this mode, {why}.")]


def _verdict(f: Figures) -> list[tuple[str, str]]:
    if not f.keys_checked:
        return [(INFO, "The checker has no verdict yet.")]
    scope = "its whole history" if f.exact else "the windows checked so far"
    if f.keys_invalid == 0:
        if f.mode == "linearizable":
            return [(GOOD, f"The checker found no violation: every key is linearizable over {scope}.")]
        if f.mode == "quorum":
            return [(INFO, f"No violation found yet over {scope}; majorities that overlap do not by themselves "
                           "make a register (see a counterexample when one shows up).")]
        return [(INFO, f"No violation found yet over {scope}.")]
    keys = f"{f.keys_invalid}/{f.keys} keys"
    if f.mode == "linearizable":
        return [(BAD, f"The checker proved a violation on {keys}. In this mode that is a bug (in kvstore or the "
                      "checker): see the counterexample.")]
    if f.mode == "quorum":
        return [(BAD, f"Not linearizable on {keys}, although reads and writes meet on a majority: a read can "
                      "overlap a write that reached only some replicas, and concurrent writes become siblings.")]
    return [(BAD, f"Not linearizable on {keys}: replicas answer before they agree.")]


def _anomalies(f: Figures) -> list[tuple[str, str]]:
    a = f.anomalies
    if not a:
        return []
    out: list[tuple[str, str]] = []
    if a.get("stale_reads_recent"):
        example = a.get("stale_examples") or []
        out.append((BAD, f"{a['stale_reads_recent']} stale reads in the last 10 s: they returned a value already "
                         "overwritten before they began" + (f" (e.g. {example[-1]})." if example else ".")))
    if a.get("sibling_reads_recent"):
        out.append((INFO, f"{a['sibling_reads_recent']} reads in the last 10 s returned siblings: concurrent "
                          "writes are kept side by side for the client to merge, so none is dropped."))
    lost = a.get("lost_writes", 0)
    if lost:
        example = (a.get("lost_examples") or [""])[-1]
        if f.mode == "eventual-lww":
            why = "last-write-wins silently drops the older of two concurrent writes"
        elif f.mode == "linearizable":
            why = "in this mode that is a bug"
        else:
            why = "with siblings this should not happen: a bug, or a write cut off from every later read"
        out.append((BAD, f"{lost} acknowledged writes lost so far ({why})" + (f", e.g. {example}." if example else ".")))
    elif a.get("lost_writes_unsettled"):
        out.append((INFO, f"{a['lost_writes_unsettled']} acknowledged writes not seen by any read yet: with R = 1 "
                          "a read on another replica misses a write until it is copied there (one no read sees "
                          "within 10 s counts as lost)."))
    elif f.mode == "eventual" and a.get("sibling_reads"):
        out.append((GOOD, "No acknowledged write was lost: concurrent ones became siblings instead."))
    return out


def _convergence(f: Figures) -> list[tuple[str, str]]:
    if f.agree is None or not f.probed_keys:
        return []
    disagree = f.probed_keys - f.agree
    if f.faulty:
        if disagree:
            return [(INFO, f"Replicas disagree on {disagree}/{f.probed_keys} keys right now: each side keeps "
                           "its own writes.")]
        return []
    if disagree:
        return [(INFO, f"Converging: replicas agree on {f.agree}/{f.probed_keys} keys (hinted handoff, read "
                       "repair and anti-entropy are copying writes across).")]
    since = f" since the heal {f.healed_s:.0f} s ago" if f.healed_s is not None else ""
    return [(GOOD, f"Converged{since}: every replica of all {f.probed_keys} keys holds the same versions.")]


def finding(f: Figures) -> str:
    """The batch explorer's one-line finding, from the same figures."""
    rule = ("per-key replica majority" if f.partitioned
            else "clients of the affected node(s)" if f.faulty else "all clients")
    a = f.anomalies
    summary = {
        "availability_fault_minority": _side(f.minority) if f.faulty else None,
        "availability_fault_majority": _side(f.majority),
        "sides_rule": rule,
        "writes_ok_on_minority_during_fault": f.writes_ok_minority,
        "linearizable": "false" if f.keys_invalid else ("true" if f.keys_checked else "unknown"),
        "keys_invalid": ["?"] * f.keys_invalid,
        "keys": f.keys,
        "lost_writes": a.get("lost_writes", 0),
        "stale_reads": a.get("stale_reads", 0),
        "sibling_reads": a.get("sibling_reads", 0),
    }
    return findings_for(summary)
