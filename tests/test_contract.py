"""kvstore.contract: the one outcome classification, the ETag, the error codes (issue 11, item 4)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kvstore import contract
from kvstore.contract import (
    ERROR_CODES,
    answer_outcome,
    error_body,
    etag_of,
    no_answer_outcome,
    refusal_outcome,
)
from tests.conftest import REPO_ROOT

NOT_APPLIED = {"error": "quorum_unavailable", "indeterminate": False}
MAY_LAND = {"error": "quorum_unavailable", "indeterminate": True}


@pytest.mark.parametrize(
    ("status", "body", "read", "expected"),
    [
        # success
        (204, None, False, "ok"),
        (200, None, False, "ok"),
        (200, None, True, "ok"),
        (300, {"siblings": []}, True, "ok"),
        (404, {"error": "not_found"}, True, "ok"),
        # a 4xx is a refusal made before anything changed
        (400, {"error": "invalid_key"}, False, "fail"),
        (401, {"error": "unauthorized"}, False, "fail"),
        (404, {"error": "not_found"}, False, "fail"),
        (409, {"error": "consistency_conflict"}, False, "fail"),
        (412, {"error": "precondition_failed"}, False, "fail"),
        (413, {"error": "value_too_large"}, False, "fail"),
        (429, {"error": "overloaded"}, False, "fail"),
        (400, {"error": "invalid_quorum"}, True, "fail"),
        # a 5xx proves nothing unless it says so
        (503, NOT_APPLIED, False, "fail"),
        (503, NOT_APPLIED, True, "fail"),
        (503, MAY_LAND, False, "info"),
        (503, {"error": "overloaded"}, False, "info"),  # the disagreement issue 11 found: now info everywhere
        (503, {"error": "timeout"}, True, "info"),
        (503, {"error": "storage_unavailable", "indeterminate": True}, False, "info"),
        (500, {"error": "internal"}, False, "info"),
        (502, None, False, "info"),
        (503, {"indeterminate": "false"}, False, "info"),  # only the JSON false counts
        # anything unexpected is unknown
        (300, None, False, "info"),
        (301, None, True, "info"),
        (204, None, True, "info"),
    ],
)
def test_answer_outcome(status: int, body: dict[str, Any] | None, read: bool, expected: str) -> None:
    assert answer_outcome(status, body, read=read) == expected


def test_refusal_outcome_never_calls_a_success_ok() -> None:
    assert refusal_outcome(204, None) == "info"


@pytest.mark.parametrize(("what", "expected"), [("unreachable", "fail"), ("timeout", "info"),
                                                ("disconnected", "info")])
def test_no_answer_outcome(what: contract.NoAnswer, expected: str) -> None:
    assert no_answer_outcome(what) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"error": "timeout", "indeterminate": true}', {"error": "timeout", "indeterminate": True}),
        (b"", {}),
        (b"Bad Gateway", {}),
        (b"[1, 2]", {}),
        (b"\xff\xfe", {}),
    ],
)
def test_error_body(raw: bytes, expected: dict[str, Any]) -> None:
    assert error_body(raw) == expected


def test_etag_is_the_quoted_blake2b_64_digest() -> None:
    assert etag_of(b"hello") == '"' + __import__("hashlib").blake2b(b"hello", digest_size=8).hexdigest() + '"'
    assert len(etag_of(b"")) == 18 and etag_of(b"a") != etag_of(b"b")


def test_etag_of_is_defined_once() -> None:
    definitions = [
        str(path.relative_to(REPO_ROOT))
        for folder in ("kvstore", "chaos", "benchmarks")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        if re.search(r"^def etag_of\(", path.read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert definitions == ["kvstore/contract.py"]


def test_every_error_code_the_server_can_send_is_in_the_contract() -> None:
    """The codes in the server's sources and in the OpenAPI document are the stable set."""
    patterns = [
        r'BadRequest\(\s*"([a-z_]+)"',
        r'json_error\(\s*\d+,\s*"([a-z_]+)"',
        r'^\s+code = "([a-z_]+)"',
        r'\d{3}: "([a-z_]+)"',  # a status -> code table (the error middleware's)
    ]
    found: set[str] = set()
    for path in sorted((REPO_ROOT / "kvstore").rglob("*.py")):
        if path.name in ("client.py", "contract.py"):
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in patterns:
            found.update(re.findall(pattern, text, re.MULTILINE))
    spec = json.loads((REPO_ROOT / "kvstore" / "openapi.json").read_text(encoding="utf-8"))
    for schema in spec["components"]["schemas"].values():
        code = schema.get("properties", {}).get("error", {})
        found.update(code.get("enum", []))
    assert found, "the scan found no codes at all: the patterns are stale"
    assert found <= ERROR_CODES, sorted(found - ERROR_CODES)
