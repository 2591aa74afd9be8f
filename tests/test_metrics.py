"""The node's metrics remember labelled children (kvstore.runtime.metrics) without changing what is counted."""

from __future__ import annotations

import pytest

from kvstore.runtime.metrics import Metrics


def test_labels_returns_the_same_child_and_counts_into_the_registry() -> None:
    metrics = Metrics()
    first = metrics.requests.labels(op="get", status="200")
    assert metrics.requests.labels(op="get", status="200") is first
    first.inc()
    metrics.requests.labels(op="get", status="200").inc(2)
    metrics.requests.labels("get", "404").inc()
    sample = metrics.registry.get_sample_value
    assert sample("kvstore_requests_total", {"op": "get", "status": "200"}) == 3.0
    assert sample("kvstore_requests_total", {"op": "get", "status": "404"}) == 1.0
    metrics.latency.labels(op="put").observe(0.002)
    assert sample("kvstore_request_latency_seconds_count", {"op": "put"}) == 1.0


def test_remove_and_clear_forget_the_remembered_children() -> None:
    metrics = Metrics()
    metrics.hints_pending.labels(target="n2").set(5)
    metrics.hints_pending.remove("n2")
    sample = metrics.registry.get_sample_value
    assert sample("kvstore_hints_pending", {"target": "n2"}) is None
    metrics.hints_pending.labels(target="n2").set(7)  # a new child, registered again
    assert sample("kvstore_hints_pending", {"target": "n2"}) == 7.0
    metrics.hints_pending.clear()
    metrics.hints_pending.labels(target="n2").inc()
    assert sample("kvstore_hints_pending", {"target": "n2"}) == 1.0


def test_wrong_label_names_are_still_refused() -> None:
    with pytest.raises(ValueError):
        Metrics().requests.labels(op="get")


def test_count_request_counts_as_labels_would_and_forgets_on_clear() -> None:
    metrics = Metrics()
    metrics.count_request("put", 204, 0.002)
    metrics.count_request("put", 204, 0.3)
    metrics.requests.labels(op="put", status="204").inc()  # the same child, asked the usual way
    metrics.count_request("get", 404, 0.001)
    sample = metrics.registry.get_sample_value
    assert sample("kvstore_requests_total", {"op": "put", "status": "204"}) == 3.0
    assert sample("kvstore_requests_total", {"op": "get", "status": "404"}) == 1.0
    assert sample("kvstore_request_latency_seconds_count", {"op": "put"}) == 2.0
    assert sample("kvstore_request_latency_seconds_bucket", {"op": "put", "le": "0.0025"}) == 1.0
    metrics.requests.clear()
    metrics.count_request("put", 204, 0.002)  # a new child, registered again
    assert sample("kvstore_requests_total", {"op": "put", "status": "204"}) == 1.0
