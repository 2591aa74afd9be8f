"""The one way the project makes aiohttp client sessions: one request, one send.

Theory of operation
-------------------
aiohttp's ``ClientSession`` silently sends a request a second time when the connection
drops before the answer arrives, for every method it deems idempotent (GET, HEAD, OPTIONS,
TRACE, PUT, DELETE).  A PUT or DELETE here is not idempotent in that sense: the first copy
may have been applied, and the second copy's answer (often a refused connection, because the
node just died) then describes a request the caller never knew about.  That is how the chaos
harness once recorded an applied write as failed (kvstore.contract, "one request, one
outcome").

``client_session`` builds a session with that re-send switched off.  aiohttp has no public
knob for it; its own test client sets the private ``_retry_connection`` attribute (aiohttp
>= 3.11), which is what this does.  If a future aiohttp drops the attribute, this refuses to
make a session rather than silently re-sending; tests/test_http_session.py counts requests
at a server that drops every connection, so a version where setting it stops working is
caught too.  tests/test_http_session.py also checks that no other module calls
``aiohttp.ClientSession(`` directly.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from kvstore.contract import NoAnswer


class HiddenRetryError(RuntimeError):
    """This aiohttp cannot be told not to re-send requests; refuse to run with it."""


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    """An ``aiohttp.ClientSession(**kwargs)`` that sends each request exactly once.

    Call inside a running event loop (as for any ``ClientSession``).
    """
    session = aiohttp.ClientSession(**kwargs)
    if not hasattr(session, "_retry_connection"):
        raise HiddenRetryError(
            f"aiohttp {aiohttp.__version__} has no way to turn off its hidden re-send of dropped requests; "
            "kvstore needs aiohttp >= 3.11"
        )
    session._retry_connection = False
    return session


def no_answer_kind(exc: BaseException) -> NoAnswer | None:
    """Why a request got no HTTP answer, from aiohttp's exception (None: not a transport failure).

    ``unreachable``: the connection was never made (refused, DNS, connect timeout), so nothing
    was sent.  ``timeout`` / ``disconnected``: the request may have been sent, and applied.
    """
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "unreachable"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError):
        return "disconnected"
    return None
