"""The AP coordinator: a client's write or read, driven through the seams to its quorum.

Theory of operation
-------------------
The request paths follow Dynamo (DeCandia et al. 2007, §4.5-4.7) and Riak KV:

**Write.**  The node that receives a client write forwards it to a *primary*
(one of the key's N preference-list members) believed up, unless it is one
itself.  The coordinating primary applies the write to its local copy under a
per-key lock (``versions.update``: a new dotted sibling), persists it, then sends
the resulting object to the other N-1 targets in parallel; it answers once W
targets (itself included) stored it durably.  Coordinating at a replica is what
keeps dots unique: the coordinator holds every dot it ever issued for the key.
For the same reason it can refuse a context claiming more of its own counters than
it issued (a context from before the key's tombstone was reaped would otherwise
supersede the key's new writes: ``causal_context.refuse_unissued``).
The remaining targets complete in the background, bounded.

**Sloppy quorum.**  With ``sloppy`` on, a primary believed down (or failing the
call) is replaced by the next healthy fallback in the ring's order; the fallback
stores the object as a *hint* naming the intended owner, and it counts toward W.
When no primary is reachable at all, the receiving node coordinates as a
fallback, under a fresh one-shot actor id (``node!incarnation.boot.seq``): it
lacks the key's history, so only a never-reused actor keeps the dot unique.  With ``sloppy`` off only primaries count, and a
request that cannot reach W of them fails *before* writing anything.

**Read.**  Ask the N targets, answer after R replies, merging their objects with
``versions.sync`` (concurrent siblings are all returned).  The rest of the
replies are awaited briefly afterwards for read repair.

**Outcomes.**  A write that reached fewer than W targets answers 503
``quorum_unavailable``; when any target may have stored it, the body says
``indeterminate: true``: the write may still become visible (Jepsen's ``info``).

**Faults of one node's disk.**  The coordinator's own durable write comes first,
before any replica sees the new dot.  If its disk refuses it (``StorageFull``),
the write was certainly not applied anywhere: the coordinator answers 507
``insufficient_storage`` with ``indeterminate: false``, and a node that forwarded
the write to it (or that is itself that coordinator) fails over to the next
primary believed up.  Any other storage error after the write was issued may
have left it on disk: 503 ``storage_unavailable``, ``indeterminate: true``.

**Deadlines.**  Every await on a request's path ends at the request deadline
(``timeout_ms``): remote calls through the transport's timeout, the coordinator's
own read-modify-write (lock, read, durable write) and local calls by waiting for
them at most until then.  Work still running at the deadline is never cut
half-way (a storage write handed to the engine lands regardless); it finishes in
the background and the answer is 503 ``timeout`` -- ``indeterminate: true`` once
the durable write was issued, ``false`` while it was still waiting for the key's
lock or read.

**Coordinator cores.**  Every decision of a coordinated write or read -- the sloppy-quorum
plan and its stand-ins, the W/R arithmetic, the local read-modify-write, the sibling merge,
which replicas read repair brings up to date, and each outcome's status and ``indeterminate``
-- is made by the pure, step-able ``kvstore.protocol.coordinator.WriteCoordinatorCore`` /
``ReadCoordinatorCore`` (inputs in, effects out, in the manner of etcd-io/raft's
``Ready``/``Advance``).  ``coordinate_write`` and ``get`` are their thin asyncio driver
(``_drive``): they carry out the effects in order through the seams -- ``CheckRegister``,
``PersistLocal`` (the lock, read and durable write, bounded by the deadline), ``Send`` (one future
per call, ``Node.start_call``), ``Abandon``, ``StartTimer`` -- and feed the answers back in the order the
calls completed.  After a write's answer its remaining replica calls are driven in the
background; after a read's, ``PendingRepair`` hands them to read repair.  Which node
coordinates a client write (here, forwarded to a primary, the next primary after a certain
refusal, or here as a fallback) is the ``WriteRouterCore``'s decision; ``put`` drives it.

Everything time-dependent comes from the node's injected ``Clock`` (every deadline and elapsed
time is a reading of ``clock.monotonic_ns``, every wait an asyncio sleep or timeout); I/O goes
through the node's ``Transport`` (``Node.call``) and ``Storage`` seams.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstore.errors import NodeError
from kvstore.protocol import causal_context, versions
from kvstore.protocol.coordinator import (
    MIN_CALL_TIMEOUT_NS,
    REFUSED_REMOTE_CODES,
    Abandon,
    Answer,
    CallFailed,
    CheckRegister,
    CoordinateHere,
    Done,
    Effect,
    Failed,
    JointOwners,
    LocalFailed,
    LocalResult,
    LocalWritten,
    NoteRefusal,
    PersistLocal,
    ReadCoordinatorCore,
    ReadMembership,
    ReadOutcome,
    RemoteFailed,
    Repair,
    Reply,
    Send,
    StartTimer,
    WriteCoordinatorCore,
    WriteOutcome,
    WriteRouterCore,
    WriteTargets,
    plan_write,
    read_targets,
    write_targets,
)
from kvstore.protocol.hints import NS_PER_S
from kvstore.protocol.messages import CoordinateWrite, CoordinateWriteReply, serve
from kvstore.protocol.ring import key_token
from kvstore.protocol.versions import VersionedObject
from kvstore.runtime.calls import answer_of, consume_outcome
from kvstore.storage import StorageBusy, StorageFull
from kvstore.storage.base import StorageError
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger(__name__)


@dataclass
class _LocalWrite:
    """How far the coordinator's own read-modify-write got (set by the step itself)."""

    writing: bool = False  # the durable write was handed to storage: it may land


class Coordinator:
    """The asyncio driver of one node's coordinator cores, and the answer to ``coordinate_write``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.clock = node.clock
        self._fallback_seq = itertools.count(1)

    def handlers(self) -> dict[str, Handler]:
        return {"coordinate_write": serve(CoordinateWrite, self._on_coordinate_write)}

    def write_targets(self, key: str, sloppy: bool) -> WriteTargets:
        """The key's primaries believed up and down, and its healthy fallbacks in ring order."""
        return write_targets(self.node.ring.walk(key), self.node.n, self.node.is_up, sloppy)

    async def put(
        self,
        key: str,
        value: bytes | None,
        context: dict[str, int],
        w: int,
        sloppy: bool,
        timeout_s: float,
    ) -> WriteOutcome:
        """Client write entry point on any node: coordinate here if a primary, else forward to one.

        Which node coordinates is the ``WriteRouterCore``'s decision (a primary that certainly
        refused is replaced by the next; any answer that may mean "applied" ends the request, no
        hidden second attempt); this carries out its steps one at a time.
        """
        deadline = self.node.now_s() + timeout_s
        router = WriteRouterCore(
            node_id=self.node.node_id, key=key, value=value, context=context, w=w, sloppy=sloppy,
            targets=self.write_targets(key, sloppy), deadline_ns=int(deadline * NS_PER_S),
        )
        at_ns = self.clock.monotonic_ns()
        steps = deque(router.start(at_ns))
        while steps:
            match steps.popleft():
                case CoordinateHere(as_fallback=as_fallback):
                    coordinated: WriteOutcome | NodeError
                    try:
                        coordinated = await self.coordinate_write(
                            key, value, context, w, sloppy, deadline, as_fallback=as_fallback
                        )
                    except NodeError as exc:
                        coordinated = exc
                    at_ns = self.clock.monotonic_ns()
                    steps.extend(router.on_coordinated(coordinated, at_ns))
                case Send() as forward:
                    answer = await self._forward_write(forward, at_ns)
                    at_ns = self.clock.monotonic_ns()
                    steps.extend(router.on_answer(answer, at_ns))
                case NoteRefusal(peer=peer, error=error):
                    # Counted, not logged per write: a full disk refuses every write, and its own node logs it.
                    self.node.metrics.replica_errors.labels(peer=peer, reason=error.code).inc()
                    log.debug("primary %s refused a write of %r (%s); trying the next primary", peer, key, error.message)
                case ReadMembership():
                    targets = self.write_targets(key, sloppy)
                    at_ns = self.clock.monotonic_ns()
                    steps.extend(router.on_membership(targets, at_ns))
                case Done(result=outcome):
                    assert isinstance(outcome, WriteOutcome)
                    return outcome
                case Failed(error=error):
                    raise error
        raise AssertionError("the write router ended without an outcome")

    async def _forward_write(self, forward: Send, at_ns: int) -> Reply | CallFailed | RemoteFailed:
        """Ask a primary to coordinate the write, until the request's deadline."""
        self.node.metrics.forwarded.inc()
        try:
            reply = await self.node.call(forward.peer, forward.message, (forward.timeout_at_ns - at_ns) / NS_PER_S)
        except PeerUnavailable as exc:
            return CallFailed(forward.call, exc.maybe_delivered)
        except RemoteError as exc:
            return RemoteFailed(forward.call, exc)
        return Reply(forward.call, reply)

    async def _on_coordinate_write(self, sender: str, message: CoordinateWrite) -> CoordinateWriteReply:
        deadline = self.node.now_s() + message.timeout_ms / 1000.0
        try:
            outcome = await self.coordinate_write(
                message.key, message.value, dict(message.context), message.w, message.sloppy, deadline,
                as_fallback=False,
            )
        except NodeError as exc:
            return CoordinateWriteReply("error", body=exc.body(), http=exc.status)
        return CoordinateWriteReply(
            "ok", obj=versions.encode(outcome.obj), acknowledged=outcome.acknowledged, hinted=outcome.hinted
        )

    async def coordinate_write(
        self,
        key: str,
        value: bytes | None,
        context: dict[str, int],
        w: int,
        sloppy: bool,
        deadline: float,
        as_fallback: bool,
    ) -> WriteOutcome:
        """Coordinate a write here: drive a ``WriteCoordinatorCore`` (every decision is the
        core's; this carries out its effects through the node's seams)."""
        token = key_token(key)
        # The plan and every replica call are stamped with the membership version in force now;
        # while a range moves the key's new owners get the write too (docs/membership.md).
        version, placement = self.node.config.version, self.node.placement
        joint = JointOwners(placement.old_owners(token), placement.new_owners(token)) if placement.joint else None
        core = WriteCoordinatorCore(
            node_id=self.node.node_id, key=key, token=token, value=value, context=context, w=w,
            sloppy=sloppy, plan=plan_write(self.write_targets(key, sloppy), self.node.node_id, as_fallback, joint),
            as_fallback=as_fallback, deadline_ns=int(deadline * NS_PER_S),
            replica_timeout_ns=self.node.cfg.limits.replica_timeout_ms * 1_000_000, mode=self.node.mode,
            config_version=version,
        )
        calls = _CoreCalls(self.node)
        outcome = await self._drive(core, calls, core.start(self.clock.monotonic_ns()))
        if not core.settled:
            # Replica writes still in flight finish in the background (a failed one may still
            # be handed to a spare fallback); bounded by their timeouts, tracked until stop.
            self.node._track(asyncio.create_task(self._finish_write(core, calls), name="write-background"))
        if isinstance(outcome, Failed):
            raise outcome.error
        assert isinstance(outcome.result, WriteOutcome)
        return outcome.result

    async def _drive(
        self, core: WriteCoordinatorCore | ReadCoordinatorCore, calls: _CoreCalls, effects: list[Effect]
    ) -> Done | Failed:
        """Carry out a coordinator core's effects in order, feeding it its inputs, until its outcome."""
        timer_at_ns: int | None = None
        try:
            while True:
                queue = deque(effects)
                while queue:
                    match queue.popleft():
                        case CheckRegister(key=key, token=token):
                            assert isinstance(core, WriteCoordinatorCore)
                            holds = await self.node.holds_register(key, token)
                            queue.extend(core.on_register(holds, self.clock.monotonic_ns()))
                        case PersistLocal() as persist:
                            assert isinstance(core, WriteCoordinatorCore)
                            result = await self._persist_local(core, persist)
                            queue.extend(core.on_local(result, self.clock.monotonic_ns()))
                        case Send() as send:
                            calls.send(send)
                        case Abandon(calls=abandoned):
                            calls.abandon(abandoned)
                        case StartTimer(at_ns=at_ns):
                            timer_at_ns = at_ns
                        case Done() | Failed() as outcome:
                            return outcome
                        case other:
                            raise AssertionError(f"unexpected coordinator effect {other!r}")
                assert timer_at_ns is not None, "a core waiting for answers has a deadline timer"
                answers = await calls.wait(timer_at_ns)
                now_ns = self.clock.monotonic_ns()
                effects = core.on_timer(now_ns) if answers is None else core.on_answers(answers, now_ns)
        except BaseException:
            calls.release()  # cancelled (or a bug): calls in flight finish on their own, tracked
            raise

    async def _finish_write(self, core: WriteCoordinatorCore, calls: _CoreCalls) -> None:
        """After the answer: feed the write's remaining replica calls to its core until settled."""
        while not core.settled:
            answers = await calls.wait(None)
            if not answers:
                break
            for effect in core.on_answers(answers, self.clock.monotonic_ns()):
                assert isinstance(effect, Send), f"only hand-offs follow a write's outcome, not {effect!r}"
                calls.send(effect)

    async def _persist_local(self, core: WriteCoordinatorCore, persist: PersistLocal) -> LocalResult:
        """The coordinator's own read-modify-write of a key, answered by ``persist.timeout_at_ns``.

        The step runs in its own task, so giving up at the deadline never interrupts it half-way:
        a write already handed to storage finishes in the background (and is then indeterminate);
        one still waiting for the key's lock or read is cancelled (certainly not applied).
        """
        key, token, hint_for = persist.key, persist.token, persist.hint_for
        if hint_for is None:
            actor = self.node.actor
        else:
            assert self.node.identity is not None
            # A fallback lacks the key's history: only a never-reused actor keeps its dot unique.
            actor = self.node.identity.fallback_actor(self.node.node_id, next(self._fallback_seq))
        progress = _LocalWrite()

        async def step() -> VersionedObject:
            async with self.node.locks.hold(key):
                if hint_for is None:
                    blob = await self.node.data.get(key, token)
                    base = versions.decode(blob) if blob is not None else VersionedObject.empty()
                else:
                    base = await self.node.read_local(key, token)
                updated = core.local_update(base, actor, self.clock.wall_ns())
                # Durable here *before* any replica sees the new dot.  Replicating in parallel
                # with this fsync would save a group-commit wait, but a crash in between would
                # leave the dot on replicas and not here: after the restart this node would
                # issue the same dot for another value, and a sync would silently keep only one
                # of the two (Riak's KV-679).  Measured and reverted for that reason
                # (docs/benchmarks.md).
                progress.writing = True
                if hint_for is None:
                    await self.node.data.put(key, token, versions.encode(updated))
                else:
                    await self.node.store_hint(hint_for, key, token, updated)
            return updated

        loop = asyncio.get_running_loop()
        task = loop.create_task(step())
        # Woken by the step's end or the deadline, whichever is first (asyncio.wait's work, without its sets).
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(max(0.0, (persist.timeout_at_ns - self.clock.monotonic_ns()) / NS_PER_S), _fire, waiter)
        task.add_done_callback(functools.partial(_wake, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            self._abandon(task, progress)
            raise
        finally:
            timer.cancel()
        if not task.done():
            self._abandon(task, progress)
            return LocalFailed("timeout", progress.writing)
        try:
            return LocalWritten(task.result())
        except causal_context.BadContext as exc:
            return LocalFailed("bad_context", progress.writing, str(exc))
        except StorageFull as exc:
            return LocalFailed("storage_full", progress.writing, str(exc))
        except StorageBusy as exc:
            return LocalFailed("storage_busy", progress.writing, str(exc))
        except StorageError as exc:
            return LocalFailed("storage_error", progress.writing, str(exc))
        except NodeError as exc:  # a typed refusal of the step (a full hint store)
            return LocalFailed("refused", progress.writing, exc.message, exc)

    def _abandon(self, task: asyncio.Task[VersionedObject], progress: _LocalWrite) -> None:
        """Stop waiting for a local step: cancel it if it wrote nothing yet, else let it land."""
        if not progress.writing:
            task.cancel()
        task.add_done_callback(consume_outcome)
        self.node._adopt([task])

    # --- reads ----------------------------------------------------------------------------

    def read_targets(self, key: str, sloppy: bool) -> list[str]:
        return read_targets(self.node.ring.walk(key), self.node.n, self.node.is_up, sloppy)

    async def get(self, key: str, r: int, sloppy: bool, timeout_s: float) -> ReadOutcome:
        """Coordinate a read here: drive a ``ReadCoordinatorCore``, then hand the rest of its
        replies to read repair (whose policy decides whether and how to repair)."""
        deadline = self.node.now_s() + timeout_s
        token = key_token(key)
        core = ReadCoordinatorCore(
            key=key, token=token, r=r, targets=self.read_targets(key, sloppy),
            primaries=self.node.ring.walk_token(token)[: self.node.n], deadline_ns=int(deadline * NS_PER_S),
            replica_timeout_ns=self.node.cfg.limits.replica_timeout_ms * 1_000_000, mode=self.node.mode,
            config_version=self.node.config.version,  # a replica that installed a newer one refuses
        )
        calls = _CoreCalls(self.node)
        outcome = await self._drive(core, calls, core.start(self.clock.monotonic_ns()))
        if isinstance(outcome, Failed):
            raise outcome.error
        assert isinstance(outcome.result, ReadOutcome)
        await self.node.parts.read_repair.after_read(PendingRepair(self.node, core, calls), deadline)
        return outcome.result


class _CoreCalls:
    """The calls a coordinator core started (its ``Send`` effects), answered back to it in the
    order they completed: queued by the futures' done callbacks, never by iterating a set of
    futures (whose order depends on object ids).

    Each call is one future (``Node.start_call``: resolved by the transport's reader where it
    can, without a task); the driver waits on one waiter future, woken by the first completion
    or by its timer (``loop.call_later``), not on an ``asyncio.Event`` under ``asyncio.timeout``.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.futures: dict[int, asyncio.Future[Message]] = {}
        self.completed: deque[int] = deque()
        self._waiter: asyncio.Future[bool] | None = None

    def send(self, send: Send) -> None:
        timeout_ns = max(MIN_CALL_TIMEOUT_NS, send.timeout_at_ns - self.node.clock.monotonic_ns())
        fut = self.node.start_call(send.peer, send.message, timeout_ns / NS_PER_S)
        fut.add_done_callback(functools.partial(self._completed, send.call))
        self.futures[send.call] = fut

    def _completed(self, call: int, fut: asyncio.Future[Message]) -> None:
        consume_outcome(fut)  # an abandoned call that fails later must not log "never retrieved"
        self.completed.append(call)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def abandon(self, calls: Iterable[int]) -> None:
        for call in calls:
            fut = self.futures.pop(call, None)
            if fut is not None:
                fut.cancel()

    def release(self) -> None:
        """Stop listening: the calls still in flight finish on their own (tracked by the node)."""
        self.node._adopt(self.futures.values())
        self.futures.clear()

    def cancel(self) -> None:
        self.abandon(list(self.futures))

    def _drain(self) -> list[Answer]:
        answers: list[Answer] = []
        while self.completed:
            call = self.completed.popleft()
            fut = self.futures.pop(call, None)
            if fut is not None:  # else abandoned since it completed
                answers.append(answer_of(call, fut, REFUSED_REMOTE_CODES))
        # Calls that completed but whose done callback has not run yet: in send order, so an
        # answer at hand is never taken for a call still in flight.
        for call in [call for call, fut in self.futures.items() if fut.done()]:
            answers.append(answer_of(call, self.futures.pop(call), REFUSED_REMOTE_CODES))
        return answers

    async def wait(self, timer_at_ns: int | None) -> list[Answer] | None:
        """The answers in so far, in completion order; None when the timer fired first; [] when
        there is no timer and nothing in flight."""
        loop = asyncio.get_running_loop()
        while True:
            answers = self._drain()
            if answers:
                return answers
            timer: asyncio.TimerHandle | None = None
            waiter: asyncio.Future[bool] = loop.create_future()
            if timer_at_ns is None:
                if not self.futures:
                    return []
            else:
                remaining_s = (timer_at_ns - self.node.clock.monotonic_ns()) / NS_PER_S
                if remaining_s <= 0:
                    return None
                timer = loop.call_later(remaining_s, _fire, waiter)
            self._waiter = waiter
            try:
                fired = await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if fired:
                return self._drain() or None


def _fire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


def _wake(waiter: asyncio.Future[bool], _: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class PendingRepair:
    """A read answered after R replies, with its other replica reads still in flight: what read
    repair (``kvstore.runtime.read_repair``) gets to decide on."""

    def __init__(self, node: Node, core: ReadCoordinatorCore, calls: _CoreCalls) -> None:
        self.node = node
        self.core = core
        self.calls = calls

    def release(self) -> None:
        """No repair: let the remaining reads finish unobserved."""
        self.calls.release()

    def cancel(self) -> None:
        """No repair: cancel the remaining reads."""
        self.calls.cancel()

    async def repairs(self, wait_ns: int) -> list[Repair]:
        """Wait up to ``wait_ns`` for the remaining replies; the repairs the core decided on."""
        core, calls = self.core, self.calls
        effects = core.begin_repair(self.node.clock.monotonic_ns(), wait_ns)
        timer_at_ns: int | None = None
        repairs: list[Repair] = []
        try:
            while True:
                for effect in effects:
                    match effect:
                        case StartTimer(at_ns=at_ns):
                            timer_at_ns = at_ns
                        case Abandon(calls=abandoned):
                            calls.abandon(abandoned)
                        case Repair() as repair:
                            repairs.append(repair)
                        case other:
                            raise AssertionError(f"unexpected read-repair effect {other!r}")
                if core.settled:
                    return repairs
                assert timer_at_ns is not None
                answers = await calls.wait(timer_at_ns)
                now_ns = self.node.clock.monotonic_ns()
                effects = core.on_timer(now_ns) if answers is None else core.on_answers(answers, now_ns)
        finally:
            calls.cancel()  # nothing outlives the repair wait
