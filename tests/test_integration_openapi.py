"""Real node responses validate against the OpenAPI document (kvstore/openapi.json)."""

from __future__ import annotations

import pytest

from kvstore.cluster import LocalCluster
from tests.conftest import http, kv_path
from tests.openapi_util import validate_response

pytestmark = pytest.mark.integration


def test_responses_match_the_openapi_document(cluster5: LocalCluster) -> None:
    url = cluster5.urls[0]
    cases: list[tuple[str, str, str, dict[str, str], bytes | None]] = [
        ("PUT", "/kv/{key}", kv_path("oa:1", w=2), {}, b"one"),
        ("GET", "/kv/{key}", kv_path("oa:1", r=2), {}, None),
        ("GET", "/kv/{key}", kv_path("oa:missing"), {}, None),
        ("GET", "/kv/{key}", kv_path("oa:1", r=9), {}, None),
        ("PUT", "/kv/{key}", kv_path("oa:big"), {}, b"x" * (1024 * 1024 + 1)),
        ("PUT", "/kv/{key}", kv_path("oa:ctx"), {"X-Context": "%%%"}, b"v"),
        ("GET", "/cluster", "/cluster", {}, None),
        ("GET", "/health", "/health", {}, None),
        ("GET", "/openapi.json", "/openapi.json", {}, None),
    ]
    # Two concurrent writes make a 300 with siblings.
    http(url, "PUT", kv_path("oa:sib", w=3), body=b"a")
    http(cluster5.urls[1], "PUT", kv_path("oa:sib", w=3), body=b"b")
    cases.append(("GET", "/kv/{key}", kv_path("oa:sib", r=3), {}, None))
    statuses = set()
    for method, template, path, headers, body in cases:
        reply = http(url, method, path, body=body, headers=headers)
        validate_response(method, template, reply.status, reply.headers, reply.body)
        statuses.add(reply.status)
    # Validation ran on every kind of answer: success, siblings, not found, and client errors.
    assert {200, 204, 300, 400, 404, 413} <= statuses
    put = http(url, "PUT", kv_path("oa:del"), body=b"d")
    deleted = http(url, "DELETE", kv_path("oa:del"), headers={"X-Context": put.headers["x-context"]})
    validate_response("DELETE", "/kv/{key}", deleted.status, deleted.headers, deleted.body)
