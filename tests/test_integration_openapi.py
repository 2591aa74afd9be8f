"""Real node responses validate against the OpenAPI document (kvstore/openapi.json)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.harness.local_cluster import LocalCluster
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
        ("GET", "/cluster/keys/{key}/placement", "/cluster/keys/oa%3A1/placement", {}, None),
        ("GET", "/cluster/keys/{key}/placement", "/cluster/keys/a%2Fb%2Fplacement/placement", {}, None),
        ("GET", "/cluster/keys/{key}/placement", "/cluster/keys/%FF/placement", {}, None),
        # Linearizable answers: the register has no causal context, so no X-Context.
        ("PUT", "/kv/{key}", kv_path("oa:lin", consistency="linearizable"), {"If-None-Match": "*"}, b"l"),
        ("GET", "/kv/{key}", kv_path("oa:lin", consistency="linearizable"), {}, None),
        ("PUT", "/kv/{key}", kv_path("oa:lin", consistency="linearizable"), {"If-None-Match": "*"}, b"again"),
        ("DELETE", "/kv/{key}", kv_path("oa:lin", consistency="linearizable"), {}, None),
        ("GET", "/kv/{key}", kv_path("oa:lin", consistency="linearizable"), {}, None),
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
    assert {200, 204, 300, 400, 404, 412, 413} <= statuses
    put = http(url, "PUT", kv_path("oa:del"), body=b"d")
    deleted = http(url, "DELETE", kv_path("oa:del"), headers={"X-Context": put.headers["x-context"]})
    validate_response("DELETE", "/kv/{key}", deleted.status, deleted.headers, deleted.body)


SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
SCHEMATHESIS_CHECKS = [
    "not_a_server_error",  # 500 only: see tests/schemathesis.toml
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
    # Not positive_data_acceptance: some schema-valid requests are refused for reasons a schema
    # cannot state (w above this cluster's N, If-Match without consistency=linearizable, an
    # X-Context no node issued); those 400s are right.
]


def test_schemathesis_run_passes(cluster5: LocalCluster) -> None:
    """A bounded, seeded schemathesis run against the live document: every answer conforms.

    Seeded and single-worker, so every run sends the same cases; bounded by --max-examples per
    operation (under a minute here).  Hypothesis' health checks are about the speed of data
    generation on this machine, not about the API, so they are off; so is its example database
    (nothing is written into the work tree and no earlier failure is replayed).
    """
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(SCHEMATHESIS_CONFIG), "--no-color",
        "run", cluster5.urls[0] + "/openapi.json",
        "--checks", ",".join(SCHEMATHESIS_CHECKS),
        "--max-examples", "200", "--seed", "20261203", "--workers", "1",
        "--continue-on-failure", "--generation-database", "none", "--suppress-health-check", "all",
        "--request-timeout", "75",  # above the largest timeout_ms the document allows (60 s)
        "--header", f"X-Cluster-Secret: {cluster5.secret}",  # so /admin/repair answers, not only 401
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cluster5.data_dir)
    report = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, report
    # It did test: every documented operation, with a few hundred generated cases.
    tested = re.search(r"Tested: (\d+)", run.stdout)
    generated = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert tested and int(tested.group(1)) == 8, report
    assert generated and int(generated.group(1)) >= 500 and generated.group(1) == generated.group(2), report
