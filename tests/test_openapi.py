"""The OpenAPI document: well-formed, consistent with the contract, and the response checker works."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema.exceptions import SchemaError
from openapi_schema_validator import OAS30Validator

from kvstore.client import etag_of
from tests.openapi_util import (
    HTTP_METHODS,
    OpenAPIMismatch,
    deref,
    load_document,
    resolve_ref,
    validate_response,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_COPY = ROOT / "kvstore" / "openapi.json"
DOCS_COPY = ROOT / "docs" / "openapi.json"
OK_ETAG = etag_of(b"hello")
CTX = "kZKibjEB"  # any base64url text


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in all_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in all_refs(v)]
    return []


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    doc = load_document()
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items() if m in HTTP_METHODS]


# ---------------------------------------------------------------- the document itself


def test_docs_copy_is_identical_to_the_package_copy() -> None:
    assert DOCS_COPY.read_bytes() == PACKAGE_COPY.read_bytes(), "run: cp kvstore/openapi.json docs/openapi.json"


def test_document_is_openapi_303_with_the_public_routes() -> None:
    doc = json.loads(PACKAGE_COPY.read_text(encoding="utf-8"))
    assert doc["openapi"] == "3.0.3"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc["paths"]["/kv/{key}"]) == {"get", "put", "delete"}
    for path in ("/cluster", "/cluster/keys/{key}/placement", "/health", "/metrics", "/openapi.json"):
        assert "get" in doc["paths"][path], path
    assert doc["paths"]["/admin/repair"]["post"]["security"] == [{"ClusterSecret": []}]


def test_every_reference_resolves_and_every_component_is_used() -> None:
    doc = load_document()
    refs = set(all_refs(doc))
    for ref in refs:
        resolve_ref(ref, doc)
    for kind, items in doc["components"].items():
        if kind == "securitySchemes":
            continue
        for name in items:
            assert f"#/components/{kind}/{name}" in refs, f"unused component {kind}/{name}"


def test_every_component_schema_is_a_valid_openapi_30_schema() -> None:
    doc = load_document()
    for name, schema in doc["components"]["schemas"].items():
        try:
            OAS30Validator.check_schema(deref(schema, doc))
        except SchemaError as exc:
            pytest.fail(f"components/schemas/{name}: {exc.message}")


def test_operation_invariants() -> None:
    """Unique operationIds, every path variable declared, every response described, every error is Error."""
    doc = load_document()
    seen: set[str] = set()
    for method, path, op in operations():
        assert op["operationId"] not in seen
        seen.add(op["operationId"])
        declared = {p["name"] for p in deref(op.get("parameters", []), doc) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{([^}]+)\}", path)), (method, path)
        for status, response in op["responses"].items():
            response = deref(response, doc)
            assert response["description"], (method, path, status)
            if int(status) >= 400:
                schema = response["content"]["application/json"]["schema"]
                branches = schema.get("oneOf", [schema])
                for branch in branches:
                    parts = branch.get("allOf", [branch])
                    assert any(set(p.get("required", [])) >= {"error", "message"} for p in parts), (
                        method, path, status,
                    )


def test_error_schema_requires_error_and_message() -> None:
    error = load_document()["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"error", "message"}
    assert error["properties"]["error"]["type"] == "string"


def test_etag_schema_matches_the_etag_the_server_computes() -> None:
    pattern = load_document()["components"]["schemas"]["ETag"]["pattern"]
    for value in (b"", b"x", bytes(range(256))):
        assert re.match(pattern, etag_of(value))


def test_etag_of_in_the_client_equals_the_server_side_function() -> None:
    from kvstore.server import kv_api  # the kv request core computes every ETag the server sends

    for value in (b"", b"v2", b"\x00\xff" * 100):
        assert etag_of(value) == kv_api.etag_of(value)


def test_full_document_validates_when_openapi_spec_validator_is_installed() -> None:
    if importlib.util.find_spec("openapi_spec_validator") is None:
        pytest.skip("openapi_spec_validator is not installed; the structural tests above stand in for it")
    from openapi_spec_validator import validate

    validate(load_document())


# ---------------------------------------------------------------- validate_response


JSON = {"Content-Type": "application/json; charset=utf-8"}


def test_accepts_a_documented_200_with_headers() -> None:
    headers = {"X-Context": CTX, "ETag": OK_ETAG, "Content-Type": "application/octet-stream"}
    assert validate_response("GET", "/kv/{key}", 200, headers, b"hello") == b"hello"


def test_accepts_siblings_and_returns_the_parsed_body() -> None:
    body = {"siblings": [{"value": "YQ==", "timestamp_ns": 5}, {"value": "Yg==", "timestamp_ns": None}],
            "context": CTX}
    got = validate_response("GET", "/kv/{key}", 300, {**JSON, "X-Context": CTX}, json.dumps(body).encode())
    assert got == body


def test_accepts_a_concrete_path_and_lowercase_header_pairs() -> None:
    headers = [("x-context", CTX), ("content-type", "application/json")]
    body = b'{"error": "not_found", "message": "no value"}'
    assert validate_response("get", "/kv/user%3A42?r=2", 404, headers, body)["error"] == "not_found"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": "invalid_quorum", "message": "r=9 is outside 1..N (N=3)"}),
        (412, {"error": "precondition_failed", "message": "m", "current": None}),
        (412, {"error": "precondition_failed", "message": "m", "current": OK_ETAG}),
        (413, {"error": "value_too_large", "message": "m", "limit": 1048576}),
        (429, {"error": "overloaded", "message": "m"}),
        (503, {"error": "quorum_unavailable", "message": "m", "needed": 2, "acknowledged": 1,
               "indeterminate": True}),
        (503, {"error": "timeout", "message": "m", "indeterminate": False}),
        (503, {"error": "overloaded", "message": "m"}),
        (503, {"error": "overloaded", "message": "m", "indeterminate": False}),
        (503, {"error": "storage_unavailable", "message": "storage error: disk I/O", "indeterminate": True}),
    ],
)
def test_accepts_each_documented_put_error(status: int, body: dict[str, Any]) -> None:
    assert validate_response("PUT", "/kv/{key}", status, JSON, json.dumps(body).encode()) == body


def test_accepts_cluster_health_and_204() -> None:
    cluster = {
        "node": "n1",
        "members": [{"id": "n1", "url": "http://127.0.0.1:7001", "state": "up", "phi": None, "ownership": 33.3}],
        "replicas": 3, "r": 2, "w": 2, "vnodes": 64, "conflict_mode": "siblings", "consistency": "eventual",
        "pending_hints": {"n2": 0},
    }
    validate_response("GET", "/cluster", 200, JSON, json.dumps(cluster).encode())
    validate_response("GET", "/health", 200, JSON, b'{"status": "ok", "node": "n1"}')
    validate_response("DELETE", "/kv/{key}", 204, {"X-Context": CTX}, b"")
    validate_response("PUT", "/kv/{key}", 204, {"X-Context": CTX, "ETag": OK_ETAG}, b"")


def test_accepts_linearizable_answers_which_carry_no_context() -> None:
    """The register has no causal context: linearizable 200/204s carry only what they can."""
    validate_response("GET", "/kv/{key}", 200, {"ETag": OK_ETAG, "Content-Type": "application/octet-stream"}, b"x")
    validate_response("PUT", "/kv/{key}", 204, {"ETag": OK_ETAG}, b"")
    validate_response("DELETE", "/kv/{key}", 204, {}, b"")


@pytest.mark.parametrize(
    ("method", "path", "status", "headers", "body", "complaint"),
    [
        ("GET", "/kv/{key}", 418, JSON, b"{}", "status not documented"),
        ("PATCH", "/kv/{key}", 200, JSON, b"{}", "not documented"),
        ("GET", "/kv/{key}", 200, {"X-Context": CTX, "Content-Type": "application/octet-stream"}, b"x",
         "ETag is missing"),
        ("PUT", "/kv/{key}", 204, {"X-Context": CTX}, b"", "ETag is missing"),
        ("GET", "/kv/{key}", 200, {"X-Context": CTX, "ETag": "abc", "Content-Type": "application/octet-stream"},
         b"x", "header ETag"),
        ("GET", "/kv/{key}", 404, {"Content-Type": "text/html"}, b"<h1>404</h1>", "Content-Type"),
        ("GET", "/kv/{key}", 404, JSON, b'{"error": "not_found"}', "'message' is a required property"),
        ("PUT", "/kv/{key}", 412, JSON, b'{"error": "precondition_failed", "message": "m"}', "'current'"),
        ("PUT", "/kv/{key}", 503, JSON, b'{"error": "quorum_unavailable", "message": "m", "needed": 2}',
         "'acknowledged' is a required property"),
        ("GET", "/kv/{key}", 300, {**JSON, "X-Context": CTX},
         b'{"siblings": [{"value": "not base64!"}, {"value": "YQ=="}], "context": "c"}', "byte"),
        ("DELETE", "/kv/{key}", 204, {"X-Context": CTX}, b"unexpected", "none is documented"),
        ("GET", "/health", 200, JSON, b"not json", "not JSON"),
    ],
)
def test_rejects_what_the_document_does_not_promise(
    method: str, path: str, status: int, headers: dict[str, str], body: bytes, complaint: str
) -> None:
    with pytest.raises(OpenAPIMismatch, match=re.escape(complaint)):
        validate_response(method, path, status, headers, body)
