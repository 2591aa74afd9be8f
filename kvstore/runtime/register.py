"""The linearizable register wired into a node: CASPaxos proposals, votes and acceptor recovery.

Theory of operation
-------------------
``consistency=linearizable`` requests are CASPaxos proposals (``kvstore.runtime.caspaxos``) on
the key's N primaries, which are also its acceptors; a majority of them must
answer, so on the minority side of a partition a request fails with 503
``quorum_unavailable`` instead of answering from stale or unconfirmed data.

Every proposal for a key is run by the key's *first primary believed up*: a
receiving node that is not that primary forwards the operation (one extra hop),
so one proposer keeps the key's one-round-trip fast path across requests.  The
exception is a change of a key the receiving replica has never seen Paxos traffic
for (a new key, e.g. every insert): no proposer has a fast path for it yet, so the
replica proposes itself and saves the hop.  Any
node could propose safely; this is only about latency (two nodes that both believe
they lead a key are safe, they only invalidate each other's fast path).  A read
received by another replica of the key is first a *quorum read* from there (a peek
at every replica, no write: ``kvstore.protocol.proposer``); only if the replies do
not agree is it forwarded.  If the forward may have
reached the proposer and no answer came back, a change is reported as
indeterminate (it may still take effect), a read as a plain failure.

This module speaks changes (``kvstore.protocol.paxos``: read, write, delete, compare-and-set,
put-if-absent) and outcomes, not HTTP: the kv request core (``kvstore.server.kv_api``) maps
``If-Match`` / ``If-None-Match`` to changes and outcomes to 200/204/404/412.

Mixing modes on one key would silently break both guarantees (the register and
the eventual data are separate states), so the node refuses it with 409
``consistency_conflict``: a linearizable operation on a key that holds eventual
data on its proposer, and an eventual/quorum operation on a key that has
register state on a replica it reaches (see docs/consistency.md).

An acceptor whose Paxos store is new (a lost or replaced disk) votes only after recovering its
state from the other replicas (``kvstore.runtime.register_recovery``); until then it answers ``recovering``,
which its proposers count as a failure.

The register receives its proposer, acceptor and recovery from ``kvstore.runtime.assembly``; deadlines
read the node's injected clock (``Node.now_s``), waits are asyncio's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kvstore.errors import (
    ConsistencyConflict,
    NodeError,
    QuorumUnavailable,
    RequestTimeout,
    StorageUnavailable,
)
from kvstore.protocol import versions
from kvstore.protocol.messages import (
    CpPropose,
    CpProposeReply,
    MessageError,
    PaxosRecoverScan,
    PaxosRegister,
    PaxosStatus,
    decode_reply,
    encode,
    serve,
)
from kvstore.protocol.paxos import Change, CompareAndSet, Delete, PutIfAbsent, Read, Write
from kvstore.protocol.proposer import PeekInconclusive
from kvstore.protocol.ring import TOKEN_MIN, key_token
from kvstore.runtime.caspaxos import PaxosAcceptor, PaxosProposer
from kvstore.runtime.node import FORWARD_MARGIN_MS, Node, _error_from_body, _error_from_remote
from kvstore.runtime.register_recovery import AcceptorRecovery
from kvstore.storage import StorageError
from kvstore.storage.base import scan_pages
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError

AP_CONFLICT = "this key holds eventual-mode data; linearizable access would ignore it (use a separate key)"


def _change_to_wire(change: Change) -> list[Any]:
    match change:
        case Read():
            return ["read"]
        case Write(value=v):
            return ["write", v]
        case Delete():
            return ["delete"]
        case CompareAndSet(expected_etag=e, new_value=v):
            return ["cas", e, v]
        case PutIfAbsent(value=v):
            return ["put_if_absent", v]
    raise AssertionError(f"unknown change {change!r}")


def _change_from_wire(raw: list[Any]) -> Change:
    """A change the codec checked for shape (``CpPropose``: kind, arity, str/bytes/None arguments);
    ValueError (answered ``bad_request``) when an argument is not the one its kind takes."""
    kind, *args = raw
    if kind in ("read", "delete"):
        return Read() if kind == "read" else Delete()
    if kind in ("write", "put_if_absent"):
        if not isinstance(args[0], bytes):
            raise ValueError(f"a {kind} change's value is bytes")
        return Write(args[0]) if kind == "write" else PutIfAbsent(args[0])
    if kind == "cas":
        expected, new_value = args
        if not isinstance(expected, str) or not (new_value is None or isinstance(new_value, bytes)):
            raise ValueError("a cas change is [cas, etag (str), new value (bytes or null)]")
        return CompareAndSet(expected, new_value)
    raise ValueError(f"unknown change {kind!r}")


class LinearizableRegister:
    """The CP side of one node: proposes for the keys it leads, votes as an acceptor, recovers."""

    def __init__(
        self,
        node: Node,
        *,
        proposer: PaxosProposer,
        acceptor: PaxosAcceptor,
        recovery: AcceptorRecovery,
        register_keys: set[str],
    ) -> None:
        self.node = node
        self.proposer = proposer
        self.acceptor = acceptor
        self.recovery = recovery
        # Keys this acceptor has seen Paxos traffic for: the mixed-mode guard asks this set on
        # every eventual request instead of reading the Paxos store (a thread hop each time).
        # It holds one entry per linearizable key, like the Paxos store itself; the recovery
        # adds the keys it merges from its peers.
        self.register_keys = register_keys

    def handlers(self) -> dict[str, Handler]:
        return {
            "paxos_prepare": self.on_paxos,
            "paxos_accept": self.on_paxos,
            "paxos_peek": self.on_paxos,
            CpPropose.OP: serve(CpPropose, self.on_cp_propose),
            PaxosRegister.OP: serve(PaxosRegister, self.recovery.on_register),
            PaxosRecoverScan.OP: serve(PaxosRecoverScan, self.recovery.on_scan),
            PaxosStatus.OP: serve(PaxosStatus, self.recovery.on_status),
        }

    async def start(self) -> None:
        # Loaded before serving: the node starts its transport after its collaborators.
        stored: set[str] = set()
        async for page in scan_pages(self.node.paxos_storage, TOKEN_MIN, TOKEN_MIN, 1000):
            stored.update(r.key for r in page)
        self.register_keys.update(stored)
        # The acceptor's own copy: it grows only when a record is written, so a key outside it
        # needs no storage read (register_keys grows on arrival, before the acceptor's lock).
        self.acceptor.index_keys(stored)
        await self.recovery.load()  # before any vote: a new store must not answer from empty state
        self.recovery.start()

    async def stop(self) -> None:
        await self.recovery.stop()

    # --- internal messages ----------------------------------------------------------------

    async def on_paxos(self, sender: str, message: Message) -> Message:
        key = message.get("key")
        if isinstance(key, str):
            # Before handling: from the first prepare on, eventual access to the key is refused.
            self.register_keys.add(key)
        return await self.acceptor.handle(message)

    async def on_cp_propose(self, sender: str, request: CpPropose) -> CpProposeReply:
        change = _change_from_wire(request.change)  # before anything runs: a bad change is bad_request
        try:
            outcome = await self.propose_here(request.key, change, request.timeout_ms / 1000.0)
        except NodeError as exc:
            return CpProposeReply("error", body=exc.body(), http=exc.status)
        return CpProposeReply("ok", outcome=outcome["outcome"], value=outcome["value"], etag=outcome["etag"])

    async def has_register(self, key: str, token: int) -> bool:
        return key in self.register_keys

    # --- proposing ------------------------------------------------------------------------

    async def propose_here(
        self, key: str, change: Change, timeout_s: float, *, fallback: bool = True, peek: bool = True
    ) -> dict[str, Any]:
        node = self.node
        token = key_token(key)
        # The acceptor sets of the membership in force: while the key's replicas move, a majority of
        # the old set and one of the new set (joint consensus, docs/membership.md).  Every vote is
        # stamped with that version, so an acceptor that already installed a newer one refuses.
        version, placement = node.config.version, node.placement
        acceptor_sets = placement.acceptor_sets(token)
        replicas = list(placement.write_owners(token)) if len(acceptor_sets) > 1 else list(acceptor_sets[0])
        started_s = node.now_s()
        blob = await self._eventual_blob(key, token, timeout_s)
        timeout_s -= node.now_s() - started_s
        if timeout_s <= 0:
            raise RequestTimeout("the deadline passed before the proposal started; nothing was changed",
                                 indeterminate=False)
        if blob is not None and not versions.decode(blob).is_deleted:
            raise ConsistencyConflict(AP_CONFLICT)
        # A key this acceptor never saw Paxos traffic for is most likely new: try its first write
        # without phase 1 (a zero ballot, kvstore.protocol.paxos), which needs every replica, so
        # only with every one believed up.  A wrong guess is safe (one rejected round trip).
        all_up = all(node.is_up(peer) for peer in replicas if peer != node.node_id)
        first_write = isinstance(change, Write | PutIfAbsent) and key not in self.register_keys and all_up
        result = await self.proposer.propose(
            key, token, replicas, change, timeout_s, acceptor_sets=acceptor_sets, stamp={"cv": version},
            fallback=fallback, peek=peek, first_write=first_write,
            all_up=all_up,
        )
        node.metrics.paxos_rounds.inc(result.round_trips)
        return {
            "outcome": result.outcome,
            "value": result.value.value,
            "etag": result.current_etag,
        }

    async def _eventual_blob(self, key: str, token: int, timeout_s: float) -> bytes | None:
        """This node's eventual-mode record of the key (for the mixed-mode guard), by the deadline.

        A read cancelled at the deadline changes nothing, and no proposal has started yet: both a
        slow and a failing disk are certain failures here."""
        try:
            # asyncio.timeout, not wait_for: no task of its own per proposal (wait_for makes one).
            async with asyncio.timeout(max(0.0, timeout_s)):
                return await self.node.data.get(key, token)
        except TimeoutError:
            raise RequestTimeout(f"{self.node.node_id}'s storage did not answer within timeout_ms; "
                                 "nothing was changed", indeterminate=False) from None
        except StorageError as exc:
            raise StorageUnavailable(f"{self.node.node_id}: storage error: {exc}; nothing was changed",
                                     indeterminate=False) from None

    async def run(self, key: str, change: Change, timeout_s: float) -> dict[str, Any]:
        """Run the change on the key's first primary believed up (forwarding if that is not us).

        Returns ``{"outcome": "ok" | "precondition_failed", "value": bytes | None (the register's
        value after the change), "etag": str | None}``; raises the typed ``NodeError`` of a failure (``QuorumUnavailable``
        and its ``ConsensusUnavailable``, ``ConsistencyConflict``, ``RequestTimeout``, ...).
        """
        node = self.node
        deadline = node.now_s() + timeout_s
        is_read = isinstance(change, Read)
        majority = node.n // 2 + 1
        up = [p for p in node.ring.preference_list(key, node.n) if node.is_up(p)]
        if len(up) < majority:
            raise QuorumUnavailable(majority, len(up), indeterminate=False,
                                    detail="fewer than a majority of the key's replicas are believed up")
        if is_read and node.node_id in up[1:] and self.proposer.config.peek_reads:
            # A quorum read needs no proposer (kvstore.protocol.proposer, "Quorum reads"): peek from
            # here, and hand the read to the key's proposer only if the replies did not agree.  Only
            # from a replica: the mixed-mode guard looks at this node's own eventual record, which
            # only a replica of the key has (a non-replica forwards, as before).
            try:
                return await self.propose_here(key, change, deadline - node.now_s(), fallback=False)
            except PeekInconclusive:
                pass  # certain: a peek changes nothing; the proposer runs the full read below
        elif not is_read and node.node_id in up and key not in self.register_keys:
            # A key this replica never saw Paxos traffic for is (almost surely) new: no proposer
            # holds a fast-path promise for it that forwarding would use, so the hop would buy
            # nothing.  Propose here (any replica may; the key's proposer takes over from the
            # next request on, which this node then forwards).
            return await self.propose_here(key, change, deadline - node.now_s())
        for primary in up:
            remaining = deadline - node.now_s()
            if remaining <= 0:
                break
            if primary == node.node_id:
                return await self.propose_here(key, change, remaining)
            request = CpPropose(key, _change_to_wire(change), max(1, int(remaining * 1000) - FORWARD_MARGIN_MS))
            try:
                raw = await node.call(primary, encode(request), remaining)
                reply = decode_reply(raw, CpProposeReply, CpPropose.OP)
            except MessageError as exc:
                # The proposer answered, but not a reply we can read: the change may have run.
                raise QuorumUnavailable(majority, 0, indeterminate=not is_read,
                                        detail=f"proposer {primary} answered a malformed reply: {exc}") from None
            except PeerUnavailable as exc:
                if exc.maybe_delivered:
                    raise QuorumUnavailable(majority, 0, indeterminate=not is_read,
                                            detail=f"proposer {primary} did not answer in time") from None
                continue
            except RemoteError as exc:
                # The proposer failed outside its typed answers: certain only if it refused at once.
                err = _error_from_remote(exc, majority)
                if is_read and err.extra.get("indeterminate"):
                    err.extra["indeterminate"] = False  # a read changes nothing
                raise err from None
            if reply.status == "ok" and reply.outcome is not None:
                return {"outcome": reply.outcome, "value": reply.value, "etag": reply.etag}
            if reply.status == "error" and reply.body is not None:
                raise _error_from_body(reply.body, reply.http)
            raise QuorumUnavailable(majority, 0, indeterminate=not is_read,
                                    detail=f"proposer {primary} answered {reply.status} without its fields")
        raise QuorumUnavailable(majority, 0, indeterminate=False, detail="no replica of the key reachable")
