"""The table that turns aiohttp's protocol-level refusals into JSON statuses and stable codes."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, InvalidHeader, LineTooLong

from kvstore.server.api import MAX_HEADER_FIELD_BYTES, MAX_REQUEST_LINE_BYTES, classify_protocol_error


@pytest.mark.parametrize(
    ("status", "exc", "expected_status", "code"),
    [
        (400, LineTooLong(b"/kv/aaaa...", MAX_REQUEST_LINE_BYTES), 414, "uri_too_long"),
        (400, LineTooLong(b"X-Big...", MAX_HEADER_FIELD_BYTES), 431, "header_too_large"),
        (400, BadHttpMessage("Too many headers received"), 431, "too_many_headers"),
        (400, BadHttpMessage("Invalid character in Content-Length:\n\n  b'Content-Length: abc'\n   ^"),
         400, "malformed_request"),
        (400, BadHttpMethod("G\x01T /kv/a HTTP/1.1"), 400, "malformed_request"),
        (400, InvalidHeader(b"X-\x00"), 400, "malformed_request"),
        (400, None, 400, "malformed_request"),
        (500, RuntimeError("a bug"), 500, "internal"),
        (500, None, 500, "internal"),
        (504, None, 504, "timeout"),
    ],
)
def test_protocol_errors_map_to_a_status_and_a_stable_code(
    status: int, exc: BaseException | None, expected_status: int, code: str
) -> None:
    got_status, got_code, message = classify_protocol_error(status, exc)
    assert (got_status, got_code) == (expected_status, code)
    assert message and "\n" not in message and len(message) <= 400


def test_the_two_line_limits_differ_so_a_long_line_is_told_apart() -> None:
    assert MAX_REQUEST_LINE_BYTES != MAX_HEADER_FIELD_BYTES
