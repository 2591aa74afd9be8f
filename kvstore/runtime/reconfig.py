"""Membership changes on a running cluster: the configuration register, gossip, range moves.

Theory of operation
-------------------
The membership (``kvstore.protocol.membership.ClusterConfig``) is stored in a CASPaxos register under
``CONFIG_KEY``; every change is a compare-and-set on the stored configuration (put-if-absent for
the first one, whose predecessor is version 0 read from the TOML), so one version is never
given two configurations.  A node persists each version it installs in its Paxos store's meta
(fsync'd) before using it, and loads it at start, so a restarted node never falls back to the
TOML's member list.

**Learning.**  Every internal message carries the sender's version (``cv``); a node that sees a
higher one (in a request, a reply, a ping or a ``stale_config`` refusal) fetches that peer's
configuration (``config_get``), one fetch per peer at a time.  Configurations are only ever
installed in increasing version order, and only committed ones exist anywhere, so a fetched one
is as good as the register's.

**A change** (``begin``, then ``drive``, run by the node that received the admin request):

1. CAS ``stable(A)`` -> ``joint(A, B)``.  From then on writes go to both rings' owners (W among
   each), reads to the old owners, CASPaxos rounds need a majority of both acceptor sets.
2. Push the joint version to every member of A and B until each one reports it installed (they
   fence anything older from then on), then wait one request timeout, so requests planned on
   the older version have ended.
3. Stream: each member of B pulls every range it gains from every old owner of that range over
   the Merkle anti-entropy exchange (``AntiEntropy.sync_ranges``).  All old owners, not one: a
   write acknowledged by W of them is then on the new owner whichever W it was.
4. Catch up the registers: each member of A re-commits (a joint read) every register it holds
   whose acceptor set changes, so each one's latest value is on a majority of its new set.
5. CAS ``joint(A, B)`` -> ``stable(B)`` and push it to every member of A and B; a node that
   installs it drops the data of ranges it no longer owns.

A step that fails leaves the configuration joint (safe: both rings are written, old ones read);
``resume`` runs the remaining steps again (each is idempotent), ``abort`` goes back to
``stable(A)`` (safe too: every joint quorum contains an old majority).  See docs/membership.md
for the safety argument and what is not covered.

Every wait ends at a deadline read from the node's clock; every loop is bounded; members are
visited in sorted order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from kvstore.errors import NodeError
from kvstore.protocol.membership import CONFIG_KEY, Address, ClusterConfig, MembershipError, segments
from kvstore.protocol.messages import (
    ConfigGet,
    ConfigGetReply,
    ConfigPush,
    ConfigPushReply,
    ErrorReply,
    MbCatchup,
    MbCatchupReply,
    MbTransfer,
    MbTransferReply,
    MessageError,
    decode_reply,
    encode,
    serve,
)
from kvstore.protocol.paxos import CompareAndSet, PutIfAbsent, Read, etag_of
from kvstore.protocol.ring import TOKEN_MIN, TokenRange
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger(__name__)

META_CONFIG = "cluster_config"
REGISTER_TIMEOUT_S = 5.0
INSTALL_TIMEOUT_S = 60.0  # every member must install the joint version within this
TRANSFER_TIMEOUT_S = 300.0  # one member's whole stream, all attempts together
CATCHUP_TIMEOUT_S = 300.0
STEP_CALL_TIMEOUT_S = 30.0  # one attempt: a request lost to a partition costs this, not the whole step
CATCHUP_CONCURRENCY = 8
CATCHUP_MAX_KEYS = 1_000_000  # one member re-commits at most this many registers per change
DROP_PAGE = 500
RETRY_S = 0.5


class Reconfiguration:
    """One node's part in membership changes (a ``Mechanism`` of ``kvstore.runtime.node.Node``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._fetching: dict[str, asyncio.Task[None]] = {}  # peer -> its config fetch (one each)
        self._driver: asyncio.Task[None] | None = None
        self._drop: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # installs in version order
        self.progress: dict[str, Any] = {"step": "idle"}

    def handlers(self) -> dict[str, Handler]:
        return {
            "config_get": serve(ConfigGet, self._on_config_get),
            "config_push": serve(ConfigPush, self._on_config_push),
            "mb_transfer": serve(MbTransfer, self._on_transfer),
            "mb_catchup": serve(MbCatchup, self._on_catchup),
        }

    async def start(self) -> None:
        blob = await self.node.paxos_storage.meta_get(META_CONFIG)
        if blob is not None:
            config = ClusterConfig.decode(blob)
            if config.version > self.node.config.version:
                self.node.install_config(config)

    async def stop(self) -> None:
        tasks = [t for t in (self._driver, self._drop, *self._fetching.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- learning and installing ---------------------------------------------------------------

    def learn_from(self, peer: str) -> None:
        """Fetch ``peer``'s configuration in the background (one fetch per peer at a time)."""
        running = self._fetching.get(peer)
        if running is not None and not running.done():
            return
        self._fetching[peer] = asyncio.create_task(self._fetch(peer), name=f"config-fetch-{peer}")

    async def _fetch(self, peer: str) -> None:
        try:
            reply = await self.node.transport.call(peer, encode(ConfigGet()), REGISTER_TIMEOUT_S)
            await self.adopt(ClusterConfig.decode(decode_reply(reply, ConfigGetReply, ConfigGet.OP).config))
        except (PeerUnavailable, RemoteError, MembershipError, MessageError, KeyError, TypeError) as exc:
            log.info("could not fetch the membership from %s: %s", peer, exc)

    async def adopt(self, config: ClusterConfig) -> bool:
        """Persist and install ``config`` if it is newer than ours; True if it was."""
        async with self._lock:
            previous = self.node.config
            if config.version <= previous.version:
                return False
            await self.node.paxos_storage.meta_put(META_CONFIG, config.encode())  # durable first
            self.node.install_config(config)
        if config.phase == "stable" and (previous.phase == "joint" or self.node.node_id not in config.members):
            self._start_drop()
        return True

    async def _on_config_get(self, sender: str, message: ConfigGet) -> ConfigGetReply:
        return ConfigGetReply(self.node.config.encode())

    async def _on_config_push(self, sender: str, message: ConfigPush) -> ConfigPushReply | ErrorReply:
        try:
            await self.adopt(ClusterConfig.decode(message.config))
        except MembershipError as exc:
            return ErrorReply(exc.code, exc.message)
        return ConfigPushReply(self.node.config.version)

    # --- the register ------------------------------------------------------------------------

    async def read_committed(self) -> tuple[ClusterConfig, bool]:
        """The register's configuration (linearizable read), and whether the register holds one
        (False: nothing was ever changed; the configuration is version 0 from the TOML)."""
        reply = await self.node.parts.register.run(CONFIG_KEY, Read(), REGISTER_TIMEOUT_S)
        value = reply.get("value")
        if value is None:
            if self.node.config.version != 0:
                raise MembershipError("config_lost", "the configuration register is empty on a changed cluster")
            return self.node.config, False
        config = ClusterConfig.decode(value)
        await self.adopt(config)
        return config, True

    async def _swap(self, current: ClusterConfig, stored: bool, proposed: ClusterConfig) -> None:
        """Compare-and-set the register from ``current`` to ``proposed``; ``conflict`` if it moved."""
        assert proposed.version == current.version + 1
        change = CompareAndSet(etag_of(current.encode()), proposed.encode()) if stored else PutIfAbsent(proposed.encode())
        reply = await self.node.parts.register.run(CONFIG_KEY, change, REGISTER_TIMEOUT_S)
        if reply.get("outcome") != "ok":
            raise MembershipError("conflict", f"another change took version {proposed.version} first; read it again")
        await self.adopt(proposed)

    # --- a change ----------------------------------------------------------------------------

    async def begin(self, action: str, member: str | None, address: Address | None, by: str | None) -> ClusterConfig:
        """Start a change (``join``, ``leave``, ``replace``) or act on the one in progress
        (``resume``, ``abort``); the range move runs in the background (``progress``)."""
        if self._driver is not None and not self._driver.done():
            raise MembershipError("change_running", "this node is already driving a change; wait or query it")
        current, stored = await self.read_committed()
        n = self.node.n
        if action == "join":
            assert member is not None and address is not None
            proposed = current.join(member, address, n)
        elif action == "leave":
            assert member is not None
            proposed = current.leave(member, n)
        elif action == "replace":
            assert member is not None and by is not None and address is not None
            proposed = current.replace(member, by, address, n)
        elif action == "abort":
            proposed = current.abort()
        elif action == "resume":
            if current.phase != "joint":
                raise MembershipError("no_change_in_progress", f"version {current.version} is stable")
            proposed = current
        else:
            raise MembershipError("invalid_action", f"unknown action {action!r}")
        if proposed is not current:
            await self._swap(current, stored, proposed)
        if proposed.phase == "joint":
            self._driver = asyncio.create_task(self.drive(proposed), name="membership-change")
        else:
            self.progress = {"step": "done", "version": proposed.version}
            await self._announce(proposed, proposed.members + current.members)
        return proposed

    async def drive(self, joint: ClusterConfig) -> None:
        """Steps 2-5 of the module docstring; leaves ``progress`` saying where it stopped."""
        try:
            self.progress = {"step": "install", "version": joint.version}
            await self._install_everywhere(joint)
            self.progress["step"] = "settle"
            await asyncio.sleep(2 * self.node.cfg.limits.request_timeout_ms / 1000.0)
            self.progress["step"] = "transfer"
            transferred = 0
            for member in joint.new:
                reply = await self._step(member, encode(MbTransfer(joint.version)), TRANSFER_TIMEOUT_S)
                transferred += decode_reply(reply, MbTransferReply, MbTransfer.OP).keys
            self.progress["keys_transferred"] = transferred
            self.progress["step"] = "catchup"
            registers = 0
            for member in joint.old:
                reply = await self._step(member, encode(MbCatchup(joint.version)), CATCHUP_TIMEOUT_S)
                registers += decode_reply(reply, MbCatchupReply, MbCatchup.OP).registers
            self.progress["registers_recommitted"] = registers
            self.progress["step"] = "commit"
            stable = joint.commit()
            await self._swap(joint, True, stable)
            self.progress["step"] = "announce"
            await self._announce(stable, joint.members)
            self.progress = {**self.progress, "step": "done", "version": stable.version}
            log.warning("membership change done: version %d, members %s", stable.version, list(stable.new))
        except (PeerUnavailable, RemoteError, MembershipError, MessageError, NodeError, TimeoutError) as exc:
            self.progress = {**self.progress, "error": f"{type(exc).__name__}: {exc}"}
            log.error("membership change stopped at %s: %s (resume or abort it)", self.progress.get("step"), exc)

    async def _step(self, member: str, message: Message, total_s: float) -> Message:
        """Ask ``member`` to run an (idempotent) step, again after a lost request or a failed
        attempt, until it succeeds or ``total_s`` passed; a refusal for the version is final."""
        deadline = self.node.now_s() + total_s
        while True:
            remaining = deadline - self.node.now_s()
            try:
                return await self.node.call(member, message, max(0.001, min(STEP_CALL_TIMEOUT_S, remaining)))
            except RemoteError as exc:
                if exc.code == "wrong_version" or self.node.now_s() >= deadline:
                    raise
                self.progress["retrying"] = f"{member}: {exc.code}"
            except PeerUnavailable as exc:
                if self.node.now_s() >= deadline:
                    raise
                self.progress["retrying"] = f"{member}: {exc}"
            await asyncio.sleep(RETRY_S)

    async def _install_everywhere(self, config: ClusterConfig) -> None:
        deadline = self.node.now_s() + INSTALL_TIMEOUT_S
        waiting = [m for m in config.members if m != self.node.node_id]
        while waiting:
            behind: list[str] = []
            for member in waiting:
                try:
                    reply = await self.node.call(member, encode(ConfigPush(config.encode())), 2.0)
                    if decode_reply(reply, ConfigPushReply, ConfigPush.OP).version < config.version:
                        behind.append(member)
                except (PeerUnavailable, RemoteError, MessageError):
                    behind.append(member)
            waiting = behind
            if waiting:
                if self.node.now_s() >= deadline:
                    raise MembershipError("members_unreachable", f"{waiting} did not install version {config.version}")
                self.progress["waiting_for"] = waiting
                await asyncio.sleep(RETRY_S)
        self.progress.pop("waiting_for", None)

    async def _announce(self, config: ClusterConfig, members: tuple[str, ...]) -> None:
        """Best effort: members that miss it learn it by gossip (a leaving one is told here)."""
        for member in sorted(set(members)):
            if member == self.node.node_id:
                continue
            with contextlib.suppress(PeerUnavailable, RemoteError):
                await self.node.transport.call(member, encode(ConfigPush(config.encode())), 2.0)

    # --- the steps each member runs ------------------------------------------------------------

    def _require_version(self, version: int) -> None:
        if version != self.node.config.version or self.node.config.phase != "joint":
            raise MembershipError(
                "wrong_version", f"{self.node.node_id} is at version {self.node.config.version}, asked for "
                f"{version}"
            )

    async def _on_transfer(self, sender: str, message: MbTransfer) -> MbTransferReply | ErrorReply:
        """Pull every range this node gains from every old owner of it (Merkle exchange)."""
        try:
            self._require_version(message.version)
        except MembershipError as exc:
            return ErrorReply(exc.code, exc.message)
        me = self.node.node_id
        placement = self.node.placement
        by_source: dict[str, list[TokenRange]] = {}
        for segment in segments(placement.old_ring, placement.new_ring, self.node.n):
            if me in segment.gained:
                for owner in segment.old_owners:
                    by_source.setdefault(owner, []).append(TokenRange(segment.start, segment.end, ()))
        keys = 0
        for source in sorted(by_source):
            stats = await self.node.parts.anti_entropy.sync_ranges(source, by_source[source])
            if stats.exchanges_failed:
                return ErrorReply(
                    "transfer_failed", f"{stats.exchanges_failed} ranges from {source} could not be compared"
                )
            keys += stats.keys_exchanged
        return MbTransferReply(keys, sorted(by_source))

    async def _on_catchup(self, sender: str, message: MbCatchup) -> MbCatchupReply | ErrorReply:
        """Re-commit, with joint quorums, every register held here whose acceptor set changes."""
        try:
            self._require_version(message.version)
        except MembershipError as exc:
            return ErrorReply(exc.code, exc.message)
        node = self.node
        register = node.parts.register
        slots = asyncio.Semaphore(CATCHUP_CONCURRENCY)
        moving: list[str] = []
        after: tuple[int, str] | None = None
        while len(moving) < CATCHUP_MAX_KEYS:
            page = await node.paxos_storage.scan(TOKEN_MIN, TOKEN_MIN, 1000, after)
            moving += [r.key for r in page if len(node.placement.acceptor_sets(r.token)) > 1]
            if len(page) < 1000:
                break
            after = (page[-1].token, page[-1].key)

        async def recommit(key: str) -> None:
            async with slots:
                # peek=False: a full round, so the state is accepted anew by joint quorums.
                await register.propose_here(key, Read(), REGISTER_TIMEOUT_S, peek=False)

        results = await asyncio.gather(*(recommit(k) for k in moving[:CATCHUP_MAX_KEYS]), return_exceptions=True)
        failed = [k for k, r in zip(moving, results, strict=False) if isinstance(r, BaseException)]
        if failed:
            return ErrorReply("catchup_failed", f"{len(failed)} of {len(moving)} registers could not be re-committed")
        return MbCatchupReply(len(moving))

    # --- dropping what is no longer ours ------------------------------------------------------

    def _start_drop(self) -> None:
        if self._drop is not None and not self._drop.done():
            self._drop.cancel()
        self._drop = asyncio.create_task(self._drop_unowned(), name="membership-drop")

    async def _drop_unowned(self) -> None:
        """Delete the data of keys this node no longer replicates (bounded pages)."""
        node = self.node
        version = node.config.version
        after: tuple[int, str] | None = None
        dropped = 0
        while node.config.version == version:
            page = await node.data.scan(TOKEN_MIN, TOKEN_MIN, DROP_PAGE, after)
            for record in page:
                if node.config.version != version:
                    return  # a newer version: its own drop runs
                if not node.placement.owns(node.node_id, record.token):
                    async with node.locks.hold(record.key):
                        await node.data.delete(record.key, record.token)
                    dropped += 1
            if len(page) < DROP_PAGE:
                break
            after = (page[-1].token, page[-1].key)
        log.warning("membership version %d: dropped %d keys this node no longer replicates", version, dropped)

