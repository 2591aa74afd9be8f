"""CASPaxos wire format: the messages between proposers and acceptors, as pure functions.

Theory of operation
-------------------
Proposers (``kvstore.protocol.proposer``) and acceptors (``kvstore.runtime.caspaxos``) exchange small
msgpack-able dicts through the node's ``Transport``.  This module builds them and
parses them back into the pure types of ``kvstore.protocol.paxos``.  Everything that arrives
from a peer is untrusted: every parser raises ``ValueError`` (``PaxosMessageError``
for requests) on anything malformed, and the caller turns that into an error reply
(acceptor) or a failed call (proposer) -- never a vote built from garbage.

Messages::

  prepare: {"op": "paxos_prepare", "key": str, "token": int, "ballot": [counter, node],
            "group": [member, ...] (the key's acceptors)}
    reply: {"ok": True, "accepted": [counter, node] | None, "value": bytes | None,
            "lineage": [[counter, node], ...], "inc": str, "view": {member: str}}
         | {"ok": False, "conflict": [counter, node]}
  accept:  {"op": "paxos_accept", "key": str, "token": int, "ballot": [counter, node],
            "value": bytes | None (None = absent/deleted), "promise_next": [counter, node] | None,
            "lineage": [[counter, node], ...] (origins of the value's last changes, newest first),
            "group": [member, ...]}
    reply: {"ok": True, "promised_next": [counter, node] | None, "inc": str, "view": {member: str}}
         | {"ok": False, "conflict": [counter, node]}
  peek:    {"op": "paxos_peek", "key": str, "token": int, "group": [member, ...]}  (changes nothing)
    reply: {"ok": True, "accepted": [counter, node] | None, "value": bytes | None,
            "lineage": [[counter, node], ...], "absorbed": bool (merged in by recovery, not a vote),
            "inc": str, "view": {member: str}}

"inc" is the answering acceptor's incarnation, "view" the incarnations it has registered for
the other members of "group" (``kvstore.runtime.register_recovery``); both absent when it has no identity.
Errors: ``{"error": code, "message": str, "remote_error": True}`` (the transport's convention);
code ``recovering``: the acceptor lost its storage and does not vote yet (nothing was done).

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvstore.protocol.paxos import (
    Accepted,
    Ballot,
    Lineage,
    Observed,
    Promise,
    RegisterValue,
    Rejected,
    ballot_from_wire,
    ballot_to_wire,
    lineage_from_wire,
    lineage_to_wire,
)
from kvstore.transport.base import Message

OP_PREPARE = "paxos_prepare"
OP_ACCEPT = "paxos_accept"
OP_PEEK = "paxos_peek"
RECOVERING = "recovering"  # error code: the acceptor lost its storage and has not recovered yet

MAX_GROUP = 64  # acceptors named in one message (a key has N of them)


class PaxosMessageError(ValueError):
    """A malformed Paxos message (answered with a remote error, never applied)."""


# --- requests ----------------------------------------------------------------------------------


def prepare_message(key: str, token: int, ballot: Ballot, group: Iterable[str] = ()) -> Message:
    message: Message = {"op": OP_PREPARE, "key": key, "token": token, "ballot": ballot.to_wire()}
    if group:
        message["group"] = list(group)
    return message


def accept_message(
    key: str,
    token: int,
    ballot: Ballot,
    value: RegisterValue,
    promise_next: Ballot | None,
    lineage: Lineage = (),
    group: Iterable[str] = (),
) -> Message:
    message: Message = {
        "op": OP_ACCEPT,
        "key": key,
        "token": token,
        "ballot": ballot.to_wire(),
        "value": value.value,
        "promise_next": ballot_to_wire(promise_next),
        "lineage": lineage_to_wire(lineage),
    }
    if group:
        message["group"] = list(group)
    return message


def peek_message(key: str, token: int, group: Iterable[str] = ()) -> Message:
    message: Message = {"op": OP_PEEK, "key": key, "token": token}
    if group:
        message["group"] = list(group)
    return message


def parse_peek(message: Message) -> tuple[str, int, tuple[str, ...]]:
    """Parse a peek (untrusted): (key, token, group); raises ``PaxosMessageError``."""
    if message.get("op") != OP_PEEK:
        raise PaxosMessageError(f"not a peek: {message.get('op')!r}")
    key, token = _parse_key_token(message)
    return key, token, _parse_group(message.get("group"))


def _parse_key_token(message: Message) -> tuple[str, int]:
    """The key and token every paxos request names (untrusted); raises ``PaxosMessageError``."""
    key = message.get("key")
    token = message.get("token")
    if not isinstance(key, str):
        raise PaxosMessageError("key must be a string")
    if not isinstance(token, int) or isinstance(token, bool):
        raise PaxosMessageError("token must be an integer")
    return key, token


@dataclass(frozen=True, slots=True)
class PaxosRequest:
    """A parsed prepare (``value is None``) or accept."""

    op: str
    key: str
    token: int
    ballot: Ballot
    value: RegisterValue | None
    promise_next: Ballot | None
    lineage: Lineage
    group: tuple[str, ...]


def parse_request(message: Message) -> PaxosRequest:
    """Parse a prepare or accept (untrusted); raises ``PaxosMessageError``/``ValueError``."""
    op = message.get("op")
    if op not in (OP_PREPARE, OP_ACCEPT):
        raise PaxosMessageError(f"not a paxos op: {op!r}")
    key, token = _parse_key_token(message)
    ballot = Ballot.from_wire(message.get("ballot"))
    group = _parse_group(message.get("group"))
    if op == OP_PREPARE:
        return PaxosRequest(op, key, token, ballot, None, None, (), group)
    if "value" not in message:
        raise PaxosMessageError("accept needs a value (null = absent)")
    value = RegisterValue.of(_bytes_or_none(message.get("value"), "value"))
    promise_next = ballot_from_wire(message.get("promise_next"))
    if promise_next is not None and not (promise_next > ballot and promise_next.node == ballot.node):
        raise PaxosMessageError("promise_next must be a later ballot of the same proposer")
    lineage = lineage_from_wire(message.get("lineage"))
    if lineage and lineage[0] > ballot:
        raise PaxosMessageError("a value's latest change cannot be newer than its accept ballot")
    return PaxosRequest(op, key, token, ballot, value, promise_next, lineage, group)


def _parse_group(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_GROUP or not all(isinstance(m, str) and m for m in raw):
        raise PaxosMessageError(f"group must be a list of at most {MAX_GROUP} member ids")
    return tuple(raw)


def _bytes_or_none(obj: Any, what: str) -> bytes | None:
    if obj is not None and not isinstance(obj, bytes):
        raise PaxosMessageError(f"{what} must be bytes or null")
    return obj


# --- replies -----------------------------------------------------------------------------------


def reply_to_wire(reply: Promise | Accepted | Rejected | Observed) -> Message:
    """An acceptor's answer (without the incarnation tags, which the acceptor adds)."""
    match reply:
        case Observed(accepted=accepted, value=value, lineage=lineage, voted=voted):
            return {
                "ok": True,
                "accepted": ballot_to_wire(accepted),
                "value": None if value is None else value.value,
                "lineage": lineage_to_wire(lineage),
                "absorbed": not voted,
            }
        case Promise(accepted=accepted, value=value, lineage=lineage):
            return {
                "ok": True,
                "accepted": ballot_to_wire(accepted),
                "value": None if value is None else value.value,
                "lineage": lineage_to_wire(lineage),
            }
        case Accepted(promised_next=promised_next):
            return {"ok": True, "promised_next": ballot_to_wire(promised_next)}
        case Rejected(conflict=conflict):
            return {"ok": False, "conflict": conflict.to_wire()}
    raise AssertionError(f"unknown reply {reply!r}")


def parse_prepare_reply(reply: Message, ballot: Ballot) -> Promise | Rejected:
    """Parse a peer's answer to our prepare at ``ballot`` (untrusted); ``ValueError`` when malformed."""
    if reply.get("ok") is True:
        accepted = ballot_from_wire(reply.get("accepted"))
        raw = _bytes_or_none(reply.get("value"), "value")
        if accepted is None:
            return Promise(ballot, None, None)
        if "value" not in reply:
            raise ValueError("a promise with an accepted ballot must carry its value")
        lineage = lineage_from_wire(reply.get("lineage"))
        if lineage and lineage[0] > accepted:
            raise ValueError("a state's latest change cannot be newer than its accepted ballot")
        return Promise(ballot, accepted, RegisterValue.of(raw), lineage)
    if reply.get("ok") is False:
        return Rejected(Ballot.from_wire(reply.get("conflict")))
    raise ValueError(f"malformed prepare reply {reply!r}")


def parse_peek_reply(reply: Message) -> Observed:
    """Parse a peer's answer to our peek (untrusted); ``ValueError`` when malformed."""
    if reply.get("ok") is not True:
        raise ValueError(f"malformed peek reply {reply!r}")
    absorbed = reply.get("absorbed", False)
    if not isinstance(absorbed, bool):
        raise ValueError("absorbed must be a boolean")
    accepted = ballot_from_wire(reply.get("accepted"))
    raw = _bytes_or_none(reply.get("value"), "value")
    if accepted is None:
        return Observed(None, None, (), voted=not absorbed)
    if "value" not in reply:
        raise ValueError("a peek reply with an accepted ballot must carry its value")
    lineage = lineage_from_wire(reply.get("lineage"))
    if lineage and lineage[0] > accepted:
        raise ValueError("a state's latest change cannot be newer than its accepted ballot")
    return Observed(accepted, RegisterValue.of(raw), lineage, voted=not absorbed)


def parse_accept_reply(reply: Message, ballot: Ballot) -> Accepted | Rejected:
    """Parse a peer's answer to our accept at ``ballot`` (untrusted); ``ValueError`` when malformed."""
    if reply.get("ok") is True:
        return Accepted(ballot, ballot_from_wire(reply.get("promised_next")))
    if reply.get("ok") is False:
        return Rejected(Ballot.from_wire(reply.get("conflict")))
    raise ValueError(f"malformed accept reply {reply!r}")


def parse_tags(reply: Message) -> tuple[str | None, dict[str, str]]:
    """The (incarnation, view) a reply carries; ``ValueError`` when malformed (untrusted input)."""
    incarnation = reply.get("inc")
    view = reply.get("view") or {}
    if incarnation is not None and not isinstance(incarnation, str):
        raise ValueError("inc must be a string")
    if not isinstance(view, dict) or len(view) > MAX_GROUP:
        raise ValueError("view must be a map of member ids to incarnations")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in view.items()):
        raise ValueError("view must map member ids to incarnation strings")
    return incarnation, view
