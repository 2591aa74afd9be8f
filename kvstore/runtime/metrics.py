"""Prometheus metrics of one node (one registry per node, so in-process test clusters don't collide).

Labelled metrics remember the child of each label set they were asked for: ``prometheus_client``'s
``labels()`` validates, stringifies and takes a lock on every call, and the hot paths (every
client request, every anti-entropy range) ask for the same few children again and again.
"""

from __future__ import annotations

from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_REMEMBERED_CHILDREN = 1024  # per metric; label sets past this are looked up the slow way


class _RememberedLabels:
    """``labels()`` answered from a dict of the children already made (forgotten on ``remove``/``clear``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._children: dict[tuple[Any, ...], Any] = {}

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        key = (labelvalues, *labelkwargs.items())
        child = self._children.get(key)
        if child is None:
            child = super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
            if len(self._children) < MAX_REMEMBERED_CHILDREN:
                self._children[key] = child
        return child

    def labels_by(self, key: Any, *labelvalues: str) -> Any:
        """The child of ``labelvalues`` remembered under the caller's own ``key`` (e.g. an int status,
        not its string): no label strings are built when it is known.  ``key`` must not be a
        tuple starting with a tuple (the keys ``labels`` remembers under)."""
        child = self._children.get(key)
        if child is None:
            child = super().labels(*labelvalues)  # type: ignore[misc]
            if len(self._children) < MAX_REMEMBERED_CHILDREN:
                self._children[key] = child
        return child

    def remove(self, *labelvalues: Any) -> None:
        self._children.clear()
        super().remove(*labelvalues)  # type: ignore[misc]

    def clear(self) -> None:
        self._children.clear()
        super().clear()  # type: ignore[misc]


class Counter(_RememberedLabels, prometheus_client.Counter):
    pass


class Gauge(_RememberedLabels, prometheus_client.Gauge):
    pass


class Histogram(_RememberedLabels, prometheus_client.Histogram):
    pass


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvstore_requests", "Client requests by op and HTTP status", ["op", "status"], registry=r)
        self.latency = Histogram(
            "kvstore_request_latency_seconds", "Client request latency", ["op"], buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.replica_errors = Counter(
            "kvstore_replica_errors", "Failed replica calls by peer and reason", ["peer", "reason"], registry=r
        )
        self.forwarded = Counter("kvstore_forwarded_writes", "Writes forwarded to a primary replica", registry=r)
        self.storage_records = Gauge("kvstore_storage_records", "Records in the data store", registry=r)
        self.storage_bytes = Gauge("kvstore_storage_bytes", "Approximate bytes in the data store", registry=r)
        self.hints_stored = Counter("kvstore_hints_stored", "Hints stored for unreachable owners", ["target"], registry=r)
        self.hints_replayed = Counter("kvstore_hints_replayed", "Hints delivered to their owner", ["target"], registry=r)
        self.hints_dropped = Counter("kvstore_hints_dropped", "Hints dropped (expired or refused)", ["reason"], registry=r)
        self.hints_pending = Gauge("kvstore_hints_pending", "Hints waiting per target", ["target"], registry=r)
        self.read_repairs = Counter("kvstore_read_repairs", "Read-repair writes sent to stale replicas", registry=r)
        self.ae_rounds = Counter("kvstore_anti_entropy_rounds", "Anti-entropy range exchanges", ["result"], registry=r)
        self.ae_keys = Counter("kvstore_anti_entropy_keys", "Keys exchanged by anti-entropy", registry=r)
        self.fd_transitions = Counter(
            "kvstore_failure_detector_transitions", "Member state changes seen", ["member", "state"], registry=r
        )
        self.tombstones_reaped = Counter("kvstore_tombstones_reaped", "Tombstones removed after grace", registry=r)
        self.paxos_rounds = Counter("kvstore_paxos_round_trips", "CASPaxos round trips", registry=r)
        self.http_connections_open = Gauge("kvstore_http_connections_open", "Client connections open", registry=r)
        self.http_connections_closed = Counter(
            "kvstore_http_connections_closed",
            "Client connections closed or refused by a limit (over_capacity, idle_evicted, header_timeout)",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "kvstore_event_loop_lag_seconds", "Event loop scheduling lag", buckets=LATENCY_BUCKETS_S, registry=r
        )

    def count_request(self, op: str, status: int, latency_s: float) -> None:
        """One client request answered: ``kvstore_requests{op,status}`` and its latency."""
        self.requests.labels_by((op, status), op, str(status)).inc()
        self.latency.labels_by(op, op).observe(latency_s)
