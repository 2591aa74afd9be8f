"""What each replica of a key holds, read without changing it (to watch replicas converge).

Theory of operation
-------------------
A client read merges what it finds and repairs stale replicas, so it cannot show that
replicas disagree.  The probe asks each replica for its own copy instead, with the peer
protocol's ``replica_get`` (the message a coordinator sends; it returns the node's data
plus the hints it holds for the key, and changes nothing), sent over the node's HTTP
``/internal/msg`` route with the cluster secret, through the client's transport (sent once) --
as ``LocalCluster.acceptor_status`` asks for a node's Paxos status.  Two replicas *agree* when their objects have the same digest
(``versions.digest``: the same siblings and the same clock).  A probe that gets no answer
says so (None): a node killed, paused or slow is not counted as agreeing.
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvstore.client import ClientTransport, Lost, NotSent
from kvstore.protocol import versions
from kvstore.protocol.messages import MessageError, ReplicaGet, ReplicaGetReply, decode_reply, encode
from kvstore.protocol.ring import key_token

PROBE_SENDER = "explorer"  # the X-Node of the probe's messages (a replica_get ignores its sender)


def show_value(raw: bytes | None) -> str:
    if raw is None:
        return "(deleted)"
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= 24 else text[:21] + "..."


async def replica_copy(
    transport: ClientTransport, url: str, secret: str, key: str, timeout_s: float = 1.0
) -> dict[str, Any] | None:
    """The key's copy on the node at ``url``: {digest, values, siblings}, or None without an answer."""
    body = msgpack.packb(encode(ReplicaGet(key, key_token(key))), use_bin_type=True)
    headers = {"X-Cluster-Secret": secret, "X-Node": PROBE_SENDER, "Content-Type": "application/msgpack"}
    try:
        status, _, raw = await transport.request("POST", url + "/internal/msg", headers, body, timeout_s, timeout_s)
        if status != 200:
            return None
        reply = msgpack.unpackb(raw, raw=False)
    except (NotSent, Lost, ValueError, msgpack.ExtraData, msgpack.FormatError):
        return None
    if not isinstance(reply, dict) or reply.get("remote_error"):
        return None
    try:
        blob = decode_reply(reply, ReplicaGetReply, ReplicaGet.OP).obj
    except MessageError:
        return None
    obj = versions.decode(blob) if blob is not None else versions.VersionedObject.empty()
    return {
        "digest": versions.digest(obj).hex()[:16],
        "values": [show_value(s.value) for s in obj.siblings],
        "siblings": len(obj.siblings),
    }


def agree(copies: dict[str, dict[str, Any] | None]) -> bool:
    """Every replica answered, with the same versions."""
    digests = {c["digest"] if c is not None else None for c in copies.values()}
    return len(digests) == 1 and None not in digests
