"""CP mode driver: CASPaxos acceptor and proposer over the Transport and Storage seams.

Theory of operation
-------------------
Linearizable keys are single-register replicated state machines run with
CASPaxos (Rystsov 2018, arXiv:1802.07000).  The rules are pure functions in
``kvstore.protocol.paxos``, the messages in ``kvstore.protocol.paxos_wire``, and the proposer's
whole protocol -- rounds, retries, backoff, the fast path, indeterminacy -- is
the pure, step-able ``kvstore.protocol.proposer.ProposerCore``.  This module adds I/O,
time and concurrency.

**Acceptor** (``PaxosAcceptor``).  Every node runs one, over a dedicated
``Storage`` opened with ``fsync="always"``.  A message's read-modify-write of
the key's acceptor state runs under a per-key lock and the new state is
durable (``await storage.put``) *before* the reply leaves: a promise or accept
that was ever observed by a proposer survives a crash, which is what Paxos's
safety rests on.  The critical section is shielded from cancellation so an
abandoned caller can never leave a half-finished write racing with the next
message for the key.  A rejected message changes nothing and costs no fsync.

**Proposer** (``PaxosProposer``): a thin asyncio driver, in the manner of
etcd-io/raft's ``Ready``/``Advance`` loop.  Any node can propose for any key,
given the key's replica list (the acceptors; normally the ring's N primaries,
fixed per key -- a majority is counted over exactly this list, so it must not
vary between proposers).  ``propose`` builds one ``ProposerCore`` per proposal
over the node's shared ``ProposerState`` (ballot counter, fast-path cache),
then loops:

1. carry out the batch of effects the core returned, in its order: ``Send``
   starts a task running the node's ``call`` (the local node is reached
   through the same ``call``; the node short-circuits calls to itself), with a
   timeout ending at the proposal's deadline; ``Abandon`` cancels calls;
   ``Detach`` hands calls of a successful accept round to the background
   (bounded: ``4 * max_in_flight``; beyond that they are cancelled);
   ``StartTimer`` replaces the timer; ``Done``/``Failed`` return or raise;
2. wait for the next input and feed it to the core: every call completed so
   far, as one batch in completion order (completions are queued by the tasks'
   done callbacks, in the order the event loop completes them -- never by
   iterating a set of futures, whose order depends on object ids), else the
   timer.  With no call in flight the
   core is backing off, and the driver waits with the injected ``sleep``.

Nothing waits beyond the deadline: every call's timeout ends there, the
deadline timer ends a round, and a cancelled proposal cancels its calls.  Time
is read from the injected ``Clock`` (``Instant``: monotonic and wall), and
backoff randomness comes from the injected ``random.Random``; so under a
virtual-time event loop the whole proposer is deterministic from a seed.

Outcomes, the retry/lineage rule and the fast path are described in
``kvstore.protocol.proposer``.  Round trips and fsyncs per operation: 2 RTT and 2 fsyncs
per acceptor normally, 1 RTT and 1 fsync per acceptor on the fast path; every
retry adds a full round.  A read whose quorum read (peek) agrees: 1 RTT, no fsync
(the acceptor answers a peek under the key's lock, from durable state, writing nothing).

Assumptions: the node's ``call`` raises ``PeerUnavailable``/``RemoteError``
(or returns an error reply) on failure.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from kvstore.clock import Clock
from kvstore.errors import Overloaded
from kvstore.protocol.membership import STALE_CONFIG
from kvstore.protocol.paxos import (
    EMPTY_STATE,
    Accepted,
    AcceptorState,
    Change,
    CorruptState,
    Promise,
    Rejected,
    merge_states,
    on_accept,
    on_peek,
    on_prepare,
)
from kvstore.protocol.paxos_wire import (
    MAX_GROUP,
    OP_ACCEPT,
    OP_PEEK,
    OP_PREPARE,
    RECOVERING,
    PaxosMessageError,
    PaxosRequest,
    accept_message,
    parse_peek,
    parse_request,
    prepare_message,
    reply_to_wire,
)
from kvstore.protocol.proposer import (
    Abandon,
    Answer,
    ConsensusUnavailable,
    Detach,
    Done,
    Effect,
    Failed,
    Instant,
    ProposerConfig,
    ProposerCore,
    ProposeResult,
    ProposerState,
    ProposerStats,
    Send,
    StartTimer,
)
from kvstore.runtime.calls import answer_of, consume_outcome
from kvstore.runtime.locks import KeyLocks
from kvstore.storage.base import Storage, StorageError
from kvstore.transport.base import Message

# Typed refusals an acceptor sends before doing anything (lost its storage, or fenced a stale
# configuration): a certain failure of that call, not a maybe-delivered one.
CERTAIN_REFUSALS = (RECOVERING, STALE_CONFIG)

# Re-exported: the acceptor's and proposer's public names as callers knew them.
__all__ = [
    "MAX_GROUP",
    "OP_ACCEPT",
    "OP_PEEK",
    "OP_PREPARE",
    "RECOVERING",
    "AcceptorGate",
    "AcceptorStats",
    "ConsensusOverloaded",
    "ConsensusUnavailable",
    "PaxosAcceptor",
    "PaxosMessageError",
    "PaxosProposer",
    "ProposeResult",
    "ProposerStats",
    "accept_message",
    "prepare_message",
]

Call = Callable[[str, Message, float], Awaitable[Message]]
Sleep = Callable[[float], Awaitable[None]]


class ConsensusOverloaded(Overloaded):
    """Too many proposals in flight on this node (HTTP 503 ``overloaded``)."""


# --------------------------------------------------------------------------------------------
# Acceptor
# --------------------------------------------------------------------------------------------


@dataclass
class AcceptorStats:
    prepares: int = 0
    accepts: int = 0
    peeks: int = 0  # read-only looks (quorum reads): no write
    rejects: int = 0
    writes: int = 0  # durable state writes (one fsync each under fsync="always")
    malformed: int = 0
    refused_recovering: int = 0  # messages refused because the acceptor has not recovered yet
    absorbed: int = 0  # states merged in from other acceptors by recovery


class AcceptorGate(Protocol):
    """Whether this acceptor may vote, and who it is (``kvstore.runtime.register_recovery.AcceptorRecovery``)."""

    @property
    def incarnation(self) -> str: ...

    def votable(self, token: int) -> bool:
        """False while the acceptor lost state it has not recovered for this token's range."""
        ...

    def view(self, members: Iterable[str]) -> dict[str, str]:
        """The incarnations registered here for those members (itself and unknown ones left out)."""
        ...


class PaxosAcceptor:
    """Answers ``paxos_prepare`` / ``paxos_accept`` for every key, persisting before replying.

    With a ``gate``, it refuses (error ``recovering``, nothing done) every message for a token
    the gate says it may not vote on yet, and tags each reply with its incarnation and its view
    of the group's incarnations, which lets proposers drop replies of a lost incarnation
    (``kvstore.protocol.paxos.stale_acceptors``).  Without one (simulations of acceptors whose storage
    is never lost) it always votes and tags nothing.
    """

    def __init__(
        self,
        storage: Storage,
        gate: AcceptorGate | None = None,
        *,
        cached_states: int = 10_000,
        cached_bytes: int = 16 << 20,
    ) -> None:
        assert cached_states >= 0 and cached_bytes >= 0
        self.storage = storage
        self.gate = gate
        self.locks = KeyLocks()
        self.stats = AcceptorStats()
        # Keys that may have a record in ``storage`` (None: unknown, always read).  Loaded from the
        # store before the first message (``index_keys``) and grown before every write, so a key
        # outside it, looked up under the key's lock, certainly has no record: its state is empty
        # without a storage read (a first write of a new key then costs no read at any acceptor).
        self.stored_keys: set[str] | None = None
        # The durable state of recently used keys, decoded (bounded LRU, by count and value bytes).
        # Written only under the key's lock, after the put returned, and dropped before a put
        # starts: an entry is always exactly what the store holds, as this acceptor is the only
        # writer of its key records (register_recovery merges through ``absorb``).
        self._states: OrderedDict[str, tuple[AcceptorState, int]] = OrderedDict()
        self._states_bytes = 0
        self._max_states = cached_states
        self._max_states_bytes = cached_bytes

    def index_keys(self, keys: set[str]) -> None:
        """Every key with a record in the store, read before the acceptor answers anything: from
        now on a key outside the set (and not written since) is known to be empty."""
        self.stored_keys = keys

    async def handle(self, message: Message) -> Message:
        """Answer one Paxos message.  Malformed messages get an error reply; storage failures
        (including an undecodable stored state) raise ``StorageError`` -- never a reply that
        could forget a promise."""
        try:
            request: PaxosRequest | tuple[str, int, tuple[str, ...]] = (
                parse_peek(message) if message.get("op") == OP_PEEK else parse_request(message)
            )
        except (PaxosMessageError, ValueError) as exc:
            self.stats.malformed += 1
            return {"error": "bad_request", "message": str(exc), "remote_error": True}
        token = request[1] if isinstance(request, tuple) else request.token
        if self.gate is not None and not self.gate.votable(token):
            # Our storage was lost and this key's range is not recovered yet: a vote from empty
            # state could contradict a promise or accept the lost state held.
            self.stats.refused_recovering += 1
            return {
                "error": RECOVERING,
                "message": "this acceptor lost its storage and is recovering the key's state from its peers",
                "remote_error": True,
            }
        if isinstance(request, tuple):
            return await self._peek(*request)
        # Shielded: if the caller gives up (a cancelled straggler, a local call abandoned at the
        # deadline), the read-modify-write still finishes under the lock.  Without this, a put
        # still running in a storage thread could land after a later message's put and roll back
        # a promise that was already replied.
        work = asyncio.ensure_future(self._apply(request))
        work.add_done_callback(consume_outcome)  # abandoned by a cancelled caller: no warning
        return await asyncio.shield(work)

    async def _apply(self, request: PaxosRequest) -> Message:
        key, token = request.key, request.token
        async with self.locks.hold(key):
            state = await self._load(key, token)
            reply: Promise | Accepted | Rejected
            if request.op == OP_PREPARE:
                self.stats.prepares += 1
                new_state, reply = on_prepare(state, request.ballot)
            else:
                assert request.value is not None
                self.stats.accepts += 1
                new_state, reply = on_accept(
                    state, request.ballot, request.value, promise_next=request.promise_next, lineage=request.lineage
                )
            if isinstance(reply, Rejected):
                self.stats.rejects += 1
                assert new_state == state
            else:
                # Durable before the reply leaves: the promise/accept is now unforgettable.
                await self._store(key, token, new_state)
            wire = reply_to_wire(reply)
            if self.gate is not None:
                # The view is read after the state is durable, with no await in between: if it
                # does not show a peer's newer incarnation yet, that peer registered after this
                # state was stored, hence its recovery scan sees it (kvstore.runtime.register_recovery).
                wire["inc"] = self.gate.incarnation
                wire["view"] = self.gate.view(request.group)
            return wire

    async def _peek(self, key: str, token: int, group: tuple[str, ...]) -> Message:
        """A read-only look at the key's state (``paxos.on_peek``): no write, no fsync.

        Under the key's lock, so it is ordered with the votes on the key: it reports the state
        of every vote already answered, and only durable state (a vote's state is stored before
        the lock is released)."""
        async with self.locks.hold(key):
            state = await self._load(key, token)
            self.stats.peeks += 1
            wire = reply_to_wire(on_peek(state))
            if self.gate is not None:
                wire["inc"] = self.gate.incarnation
                wire["view"] = self.gate.view(group)
            return wire

    async def absorb(self, key: str, token: int, remote: AcceptorState) -> bool:
        """Merge another acceptor's state for a key into ours (recovery); True if it changed.

        Runs under the key's lock like a vote, shielded from cancellation, durable on return.
        Raises ``ValueError`` for a state that contradicts ours at one ballot."""
        work = asyncio.ensure_future(self._absorb(key, token, remote))
        work.add_done_callback(consume_outcome)
        return await asyncio.shield(work)

    async def _absorb(self, key: str, token: int, remote: AcceptorState) -> bool:
        async with self.locks.hold(key):
            local = await self._load(key, token)
            merged = merge_states(local, remote)
            # A state taken from a peer is not a vote of ours: peeks must not count it
            # (kvstore.protocol.paxos, "Quorum reads").  A state we voted for stays a vote.
            merged = replace(merged, absorbed=merged.accepted != local.accepted or local.absorbed)
            if merged == local:
                return False
            await self._store(key, token, merged)
            self.stats.absorbed += 1
            return True

    async def load(self, key: str, token: int) -> AcceptorState:
        """The key's durable state (under the key's lock, so never half-way through a vote)."""
        async with self.locks.hold(key):
            return await self._load(key, token)

    async def _load(self, key: str, token: int) -> AcceptorState:
        """The key's state; the caller holds the key's lock (the cache is only coherent so)."""
        cached = self._states.get(key)
        if cached is not None:
            self._states.move_to_end(key)
            return cached[0]
        if self.stored_keys is not None and key not in self.stored_keys:
            return EMPTY_STATE  # no record was ever stored for it (see ``stored_keys``)
        blob = await self.storage.get(key, token)
        if blob is None:
            return EMPTY_STATE
        try:
            state = AcceptorState.decode(blob)
        except CorruptState as exc:
            # Answering from an empty state would break promises: refuse instead.
            raise StorageError(f"corrupt paxos state for key {key!r}: {exc}") from exc
        self._remember(key, state)
        return state

    async def _store(self, key: str, token: int, state: AcceptorState) -> None:
        """Write the key's new state durably; the caller holds the key's lock."""
        if self.stored_keys is not None:
            self.stored_keys.add(key)  # before the put: a put that fails may still have landed
        self._forget(key)  # a failed put leaves the store unknown: read it again next time
        await self.storage.put(key, token, state.encode())
        self.stats.writes += 1
        self._remember(key, state)

    def _remember(self, key: str, state: AcceptorState) -> None:
        if self._max_states == 0:
            return
        self._forget(key)
        size = 256 + (len(state.value.value) if state.value is not None and state.value.value is not None else 0)
        if size > self._max_states_bytes:
            return
        self._states[key] = (state, size)
        self._states_bytes += size
        while len(self._states) > self._max_states or self._states_bytes > self._max_states_bytes:
            _, (_, evicted) = self._states.popitem(last=False)
            self._states_bytes -= evicted

    def _forget(self, key: str) -> None:
        entry = self._states.pop(key, None)
        if entry is not None:
            self._states_bytes -= entry[1]


# --------------------------------------------------------------------------------------------
# Proposer driver
# --------------------------------------------------------------------------------------------


class PaxosProposer:
    """Runs CASPaxos proposals for this node: a ``ProposerCore`` per proposal, driven by asyncio.

    See the module docstring (the driver) and ``kvstore.protocol.proposer`` (the protocol)."""

    def __init__(
        self,
        node_id: str,
        call: Call,
        clock: Clock,
        rng: random.Random,
        *,
        max_attempts: int = 20,
        backoff_base_s: float = 0.005,
        backoff_cap_s: float = 0.2,
        max_in_flight: int = 256,
        fast_path: bool = True,
        clock_ballots: bool = True,
        fast_path_capacity: int = 10_000,
        peek_reads: bool = True,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        assert node_id and max_attempts >= 1 and max_in_flight >= 1 and fast_path_capacity >= 0
        self.node_id = node_id
        self.call = call
        self.clock = clock
        self.rng = rng
        self.config = ProposerConfig(
            max_attempts=max_attempts,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            fast_path=fast_path,
            clock_ballots=clock_ballots,
            peek_reads=peek_reads,
        )
        self.max_in_flight = max_in_flight
        self.sleep = sleep
        self.stats = ProposerStats()
        self.in_flight = 0
        self.state = ProposerState(node_id, fast_path_capacity)
        self._stragglers: set[asyncio.Future[Message]] = set()

    # --- public ---------------------------------------------------------------------------

    async def propose(
        self,
        key: str,
        token: int,
        replicas: list[str],
        change: Change,
        timeout_s: float,
        *,
        acceptor_sets: tuple[tuple[str, ...], ...] | None = None,
        stamp: Message | None = None,
        fallback: bool = True,
        peek: bool = True,
        first_write: bool = False,
        all_up: bool = True,
    ) -> ProposeResult:
        """Linearizably apply ``change`` to ``key``'s register replicated on ``replicas``.

        ``acceptor_sets`` and ``stamp``: joint consensus during a membership change
        (``ProposerCore``); by default a majority of ``replicas``, unstamped.  ``fallback=False``:
        a read whose quorum read is inconclusive raises ``PeekInconclusive`` (nothing changed);
        ``peek=False``: a read runs the full protocol (it re-commits the state).  ``first_write``: the
        caller believes the key new: a write is first tried at the zero ballot, without phase 1;
        ``all_up``: it believes every replica up (worth waiting a little for the last answer).
        Raises ``ConsensusUnavailable`` (see ``indeterminate``) or ``ConsensusOverloaded``.
        """
        assert replicas and len(set(replicas)) == len(replicas), "replicas must be distinct"
        assert timeout_s > 0
        if self.in_flight >= self.max_in_flight:
            self.stats.overloaded += 1
            raise ConsensusOverloaded(f"{self.in_flight} consensus proposals already in flight")
        self.in_flight += 1
        self.stats.proposals += 1
        try:
            deadline_ns = self.clock.monotonic_ns() + int(timeout_s * 1e9)
            core = ProposerCore(
                self.state, self.config, self.rng, key, token, tuple(replicas), change, deadline_ns, self.stats,
                acceptor_sets=acceptor_sets, stamp=stamp, fallback=fallback, peek=peek, first_write=first_write,
                all_up=all_up,
            )
            result = await self._drive(core)
        except ConsensusUnavailable:
            self.stats.failed += 1
            raise
        finally:
            self.in_flight -= 1
        self.stats.committed += 1
        return result

    def holds_fast_path(self, key: str) -> bool:
        return self.state.holds_fast_path(key)

    def forget_fast_path(self, key: str | None = None) -> None:
        """Drop fast-path entries (e.g. when the ring changes the key's replicas)."""
        self.state.forget_fast_path(key)

    # --- the driver -----------------------------------------------------------------------

    async def _drive(self, core: ProposerCore) -> ProposeResult:
        """Carry out the core's effects in order; feed it answers in the order they complete."""
        calls: dict[int, asyncio.Future[Message]] = {}  # sent, not yet fed back or released
        completed: deque[int] = deque()  # calls whose answer is in, in completion order
        wake = asyncio.Event()
        timer_at_ns: int | None = None

        def on_done(call: int) -> Callable[[asyncio.Future[Message]], None]:
            def done(_: asyncio.Future[Message]) -> None:
                completed.append(call)
                wake.set()

            return done

        effects = core.start(self._now())
        try:
            while True:
                for effect in effects:
                    match effect:
                        case Send(call=call, peer=peer, message=message, timeout_at_ns=timeout_at_ns):
                            timeout_s = (timeout_at_ns - self.clock.monotonic_ns()) / 1e9
                            sent = asyncio.ensure_future(self.call(peer, message, timeout_s))
                            sent.add_done_callback(consume_outcome)
                            sent.add_done_callback(on_done(call))
                            calls[call] = sent
                        case Abandon(calls=abandoned):
                            for call in abandoned:
                                calls.pop(call).cancel()
                        case Detach(calls=detached):
                            for call in detached:
                                self._keep_straggler(calls.pop(call))
                        case StartTimer(at_ns=at_ns):
                            timer_at_ns = at_ns
                        case Done(result=result):
                            return result
                        case Failed(error=error):
                            raise error
                assert timer_at_ns is not None, "a core waiting for input always has a timer"
                effects = await self._next_input(core, calls, completed, wake, timer_at_ns)
        finally:
            for undecided in calls.values():  # the proposal itself was cancelled: no call outlives it
                undecided.cancel()

    async def _next_input(
        self,
        core: ProposerCore,
        calls: dict[int, asyncio.Future[Message]],
        completed: deque[int],
        wake: asyncio.Event,
        timer_at_ns: int,
    ) -> list[Effect]:
        """Wait for the next answer (oldest completion first) or the timer; feed it to the core."""
        while True:
            answers: list[Answer] = []
            while completed:
                call = completed.popleft()
                task = calls.pop(call, None)
                if task is not None:  # else abandoned or detached since it completed
                    answers.append(answer_of(call, task, CERTAIN_REFUSALS, refusal_is_recovering=True))
            # Calls that completed but whose done callback has not run yet (it runs one loop
            # iteration later) are answered too, in send order: an answer at hand must not be
            # counted as still in flight (a certain refusal would look maybe-delivered).
            for call in [call for call, task in calls.items() if task.done()]:
                answers.append(answer_of(call, calls.pop(call), CERTAIN_REFUSALS, refusal_is_recovering=True))
            if answers:
                # Everything already in, as one batch: the core judges the round once, after all.
                return core.on_answers(answers, self._now())
            if not calls:
                # Nothing in flight: a backoff.  Through the injected sleep, which tests use to
                # run other proposals in between.
                await self.sleep(max(0.0, (timer_at_ns - self.clock.monotonic_ns()) / 1e9))
                return core.on_timer(self._now())
            remaining_s = (timer_at_ns - self.clock.monotonic_ns()) / 1e9
            if remaining_s <= 0:
                return core.on_timer(self._now())
            wake.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await wake.wait()
            except TimeoutError:
                return core.on_timer(self._now())

    def _keep_straggler(self, task: asyncio.Future[Message]) -> None:
        """An accept of a successful round still in flight: let it finish so its replica keeps
        up -- bounded (each call's timeout ends at the proposal's deadline, and at most
        ``4 * max_in_flight`` are kept; beyond that it is cancelled, which only costs catch-up)."""
        if len(self._stragglers) < 4 * self.max_in_flight:
            self._stragglers.add(task)
            task.add_done_callback(self._stragglers.discard)
        else:
            task.cancel()

    def _now(self) -> Instant:
        return Instant(self.clock.monotonic_ns(), self.clock.wall_ns())
