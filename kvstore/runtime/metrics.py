"""Prometheus metrics of one node (one registry per node, so in-process test clusters don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
