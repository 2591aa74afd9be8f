"""The AP write and read coordinators as pure, step-able cores.

Theory of operation
-------------------
One client write (``WriteCoordinatorCore``) or read (``ReadCoordinatorCore``) on the
eventual/quorum path, as Dynamo coordinates it (DeCandia et al. 2007, §4.5-4.7; Riak KV's
``put_fsm``/``get_fsm``), without doing any I/O itself.  In the style of etcd-io/raft's
``Ready``/``Advance`` (and of ``kvstore.protocol.proposer``): the core is fed *inputs* and answers
each one with a batch of *effects* that its driver carries out, in order, before the next
input.  The production driver is ``kvstore.runtime.coordinator`` (asyncio, its Transport/Storage/Clock
seams); the unit tables in ``tests/test_coordinator.py`` step the cores by hand.  Every
decision lives here: quorum arithmetic (``kvstore.protocol.quorum``), the sloppy-quorum plan and its
stand-ins, the local read-modify-write (``versions.update``), the sibling merge of a read,
which replicas a read repairs, and how each outcome classifies under ``kvstore.contract``
(``outcome_of``).  The core reads no clock and draws no randomness: time comes in as
``at_ns`` (the node's monotonic clock) and ``wall_ns``.

**Planning** (pure functions).  ``write_targets`` splits the key's preference list into
primaries believed up, primaries believed down and healthy fallbacks (ring order);
``plan_write`` gives every up primary a *slot* and every down one a stand-in: the next spare
fallback, which stores a hint naming the primary (a fallback-coordinated write also gives
the coordinator itself the first down primary's slot).  Unused fallbacks stay *spares*: when
a slot's call fails, its copy is handed to the next spare, as a hint.  ``read_targets`` is the
up primaries, topped up from healthy fallbacks when sloppy.

**Write inputs**: ``start(at_ns)``; ``on_register(holds, at_ns)``; ``on_local(result, at_ns)``
(``LocalWritten`` or ``LocalFailed``, the outcome of ``PersistLocal``; the driver's local step
computes the new object with ``local_update``); ``on_answers(answers, at_ns)`` with
``Reply(call, message)`` / ``CallFailed(call, maybe_delivered)`` in the order the calls
completed (each answer is judged on its own, as it arrives: answers after the quorum was
decided change nothing but the background hand-offs); ``on_timer(at_ns)`` (the deadline).

**Write effects**, one batch at a time:

1. ``Failed`` alone, if fewer slots than W could be planned (before anything is written:
   ``indeterminate: false``); else ``CheckRegister(key, token)``: is the key linearizable here
   (then ``Failed(ConsistencyConflict)``)?
2. ``PersistLocal(hint_for, timeout_at_ns)``: the coordinator's own durable write, *before* any
   replica sees the new dot (a crash in between must not leave a dot on replicas that this
   node could issue again: Riak's KV-679).  The driver gives up waiting at ``timeout_at_ns``
   and reports whether the write was already handed to storage (then it may land).
3. ``Send(call, peer, message, timeout_at_ns)`` for every other slot, in plan order, then
   ``StartTimer(deadline)`` -- or, when the coordinator's own ack already makes W (W=1),
   ``Done`` right after the sends.
4. After each answer: a failed slot's copy goes to the next spare (``Send``, a hint); then
   ``Done(WriteOutcome)`` once W slots acknowledged, ``Failed(QuorumUnavailable,
   indeterminate)`` once W became impossible or the deadline timer fired short of it.  The
   outcome comes last in its batch and only once; the calls still in flight then finish in
   the background, and the driver keeps feeding their answers (a failed one may still be
   handed to a spare) until ``settled``.

**Read inputs/effects**: ``start`` sends ``replica_get`` to every target (target order) and
starts the deadline timer, or fails at once when fewer than R targets are believed up.  Once
R replied, or R became impossible, or the deadline passed: a linearizable key
(``ConsistencyConflict``) or a missed quorum (``QuorumUnavailable``, never indeterminate: a
read changes nothing) abandons the rest (``Abandon``) and fails; otherwise ``Done(ReadOutcome)``
carries ``versions.sync_all`` of the replies so far (concurrent siblings are all kept).  Read
repair is a second phase the driver may start (``begin_repair(at_ns, wait_ns)``: its
policy, ``ap.read_repair``, decides whether): the core keeps collecting the remaining replies
until they are all in or ``StartTimer(at + wait)`` fires (then ``Abandon``), merges everything
and emits one ``Repair(peer, message, timeout_ns)`` per *primary* that answered with a
missing, stale or conflicting version, in target order.  A target that did not answer is left
to anti-entropy; a fallback holds hints, not data.

**Membership changes** (``kvstore.protocol.membership``, docs/membership.md).  Every replica
message carries ``cv``, the configuration version the plan was made on (``config_version``), so
a replica that installed a newer version refuses it (``stale_config``, nothing done) instead of
answering from a placement that no longer holds.  While a range moves (a *joint* phase) reads
follow the old ring (their targets are the old owners), and a write also goes to the key's new
owners that are not old ones (``plan_write``'s ``joint``: extra data slots) and needs, besides W
slots in all, W acknowledgements among the old owners *and* W among the new ones
(``write_quorum_reached``; a hinted stand-in counts for the owner it stands in for): it then
survives the commit whatever the range transfer missed.  Such a write is decided once both
counts are met, or once no call is left in flight (or the deadline passed) without them.

**Effect order within a batch**: ``Send``s, then ``Abandon``, then ``StartTimer`` (at most
one, replacing any earlier timer), then ``Repair``s, then ``Done``/``Failed`` last.
``CheckRegister`` and ``PersistLocal`` come alone: the core waits for their result.
Answers to calls the core no longer waits for (abandoned, or after a read decided) are
ignored, so a driver may deliver them anyway.

**Routing a client write** (``WriteRouterCore``, before any of the above): the receiving
node coordinates if it is a primary believed up, else forwards (``Send`` of a
``coordinate_write``, its ``timeout_ms`` a margin short of the request's so the primary's own
typed answer arrives first) to the primaries believed up, in ring order, one at a time.  Only a
*certain* refusal (the primary's own disk refused before any replica saw the write:
``refused_before_replicating``; ``NoteRefusal``) or a forward that certainly never arrived
moves on to the next; any answer that may mean "applied" ends the request.  When no primary
took it: the first refusal, or (strict) ``quorum_unavailable``, or (sloppy) a fresh look at the
membership (``ReadMembership``) and, with a primary believed down, ``CoordinateHere(as_fallback)``.
Each effect is answered before the next (``on_coordinated``, ``on_answer``, ``on_membership``).

**Outcomes** (``outcome_of``, per ``kvstore.contract``): ``Done`` is ``ok``; ``Failed`` is
``fail`` when its error says ``indeterminate: false`` or is a 4xx, else ``info``.  A write
that was persisted locally and then missed W is always indeterminate: the coordinator (and
maybe some replicas) hold it, and it may still spread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from kvstore import contract
from kvstore.errors import (
    BadRequest,
    ConsistencyConflict,
    InsufficientStorage,
    NodeError,
    Overloaded,
    QuorumUnavailable,
    RequestTimeout,
    StorageUnavailable,
)
from kvstore.protocol import causal_context, messages, versions
from kvstore.protocol.calls import Abandon, Answer, CallFailed, Reply, Send, StartTimer
from kvstore.protocol.membership import STALE_CONFIG, write_quorum_reached
from kvstore.protocol.quorum import QuorumTracker
from kvstore.protocol.versions import VersionedObject
from kvstore.transport.base import Message, RemoteError

MIN_CALL_TIMEOUT_NS = 1_000_000  # a call always gets at least 1 ms, even at the deadline

LINEARIZABLE_WRITE = (
    "this key is used with consistency=linearizable; an eventual/quorum write would bypass its register"
)
LINEARIZABLE_READ = "this key is used with consistency=linearizable; read it with consistency=linearizable"

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ReadOutcome:
    obj: VersionedObject
    replies: int
    responders: list[str] = field(default_factory=list)


@dataclass
class WriteOutcome:
    obj: VersionedObject
    acknowledged: int
    hinted: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Effects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckRegister:
    """Ask whether this node holds a linearizable register for the key; answer ``on_register``."""

    key: str
    token: int


@dataclass(frozen=True, slots=True)
class PersistLocal:
    """The coordinator's own read-modify-write of the key, under the key's lock: read the local
    copy (data only; data plus hints when ``hint_for`` is set), compute
    ``core.local_update(base, actor, wall_ns)``, store it durably (as data, or as a hint for
    ``hint_for``).  Stop waiting at ``timeout_at_ns``; answer ``on_local``."""

    key: str
    token: int
    hint_for: str | None
    timeout_at_ns: int





@dataclass(frozen=True, slots=True)
class Repair:
    """Read repair: send ``message`` (a ``replica_put`` of the merged object) to the stale
    primary ``peer``, with ``timeout_ns`` for the call.  Best effort: its failure is ignored."""

    peer: str
    message: Message
    timeout_ns: int


@dataclass(frozen=True, slots=True)
class Done:
    result: WriteOutcome | ReadOutcome


@dataclass(frozen=True, slots=True)
class Failed:
    error: NodeError

    @property
    def indeterminate(self) -> bool:
        """The request may still take effect (``kvstore.contract``'s ``info``)."""
        return outcome_of(self) == contract.INFO


Effect = CheckRegister | PersistLocal | Send | Abandon | StartTimer | Repair | Done | Failed


def outcome_of(effect: Done | Failed) -> contract.Outcome:
    """What the answer this outcome becomes proves to a client (``kvstore.contract``)."""
    if isinstance(effect, Done):
        return contract.OK
    return contract.refusal_outcome(effect.error.status, effect.error.body())


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------






@dataclass(frozen=True, slots=True)
class LocalWritten:
    """Input: ``PersistLocal`` stored ``obj`` durably."""

    obj: VersionedObject


LocalCause = Literal["timeout", "storage_full", "storage_busy", "storage_error", "bad_context", "refused"]


@dataclass(frozen=True, slots=True)
class LocalFailed:
    """Input: ``PersistLocal`` did not finish.

    ``writing``: the durable write had been handed to storage (it may land).  ``cause``:
    ``timeout`` (the deadline came first), ``storage_full`` / ``storage_busy`` /
    ``storage_error`` (the store raised), ``bad_context`` (``local_update`` refused the client's
    context; ``detail`` says why), ``refused`` (a typed refusal, e.g. a full hint store: ``error``
    is answered as it is).
    """

    cause: LocalCause
    writing: bool
    detail: str = ""
    error: NodeError | None = None


LocalResult = LocalWritten | LocalFailed


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteTargets:
    """A key's preference list as the failure detector sees it."""

    up: tuple[str, ...]  # primaries believed up, in ring order
    down: tuple[str, ...]  # primaries believed down, in ring order
    spare: tuple[str, ...]  # healthy fallbacks in ring order (none unless sloppy)


@dataclass(frozen=True, slots=True)
class JointOwners:
    """A key's owners in both rings while its range moves (a joint configuration)."""

    old: tuple[str, ...]  # the old ring's preference list (N)
    new: tuple[str, ...]  # the new ring's preference list (N)


@dataclass(frozen=True, slots=True)
class WritePlan:
    """Who stores what: ``slots`` are (member, hint_for) -- ``hint_for`` names the down primary
    a fallback stands in for (None: the member stores data).  ``spares`` are the unused healthy
    fallbacks, in ring order, for hand-offs when a slot's call fails.  ``joint``: the write needs
    W acknowledgements among the old owners and W among the new ones too."""

    slots: tuple[tuple[str, str | None], ...]
    spares: tuple[str, ...]
    joint: JointOwners | None = None


def write_targets(walk: Sequence[str], n: int, is_up: Callable[[str], bool], sloppy: bool) -> WriteTargets:
    primaries, fallbacks = walk[:n], walk[n:]
    up = tuple(p for p in primaries if is_up(p))
    down = tuple(p for p in primaries if p not in up)
    spare = tuple(f for f in fallbacks if is_up(f)) if sloppy else ()
    return WriteTargets(up, down, spare)


def plan_write(
    targets: WriteTargets, node_id: str, as_fallback: bool, joint: JointOwners | None = None
) -> WritePlan:
    """Up primaries store data; each down primary is replaced by the next spare fallback, which
    stores a hint naming it.  ``as_fallback``: this node coordinates as the first down
    primary's stand-in (no primary took the write).  ``joint`` (``targets`` are then the old
    ring's): each new owner that is not an old one gets a data slot too, after the others
    (the coordinator's own write counts for it when it is one)."""
    slots: list[tuple[str, str | None]] = [(p, None) for p in targets.up]
    spares = [f for f in targets.spare if f != node_id]
    down = list(targets.down)
    if as_fallback:
        assert down, "a fallback coordinates only when a primary is unreachable"
        slots.append((node_id, down.pop(0)))
    for owner in down:
        if spares:
            slots.append((spares.pop(0), owner))
    if joint is not None:
        slots += [(m, None) for m in joint.new if m not in joint.old and m != node_id]
    return WritePlan(tuple(slots), tuple(spares), joint)


def read_targets(walk: Sequence[str], n: int, is_up: Callable[[str], bool], sloppy: bool) -> list[str]:
    targets = [p for p in walk[:n] if is_up(p)]
    if sloppy and len(targets) < n:
        extra = [f for f in walk[n:] if is_up(f)]
        targets += extra[: n - len(targets)]
    return targets


def _call_timeout_at(at_ns: int, deadline_ns: int, cap_ns: int | None) -> int:
    remaining = deadline_ns - at_ns if cap_ns is None else min(deadline_ns - at_ns, cap_ns)
    return at_ns + max(MIN_CALL_TIMEOUT_NS, remaining)


# --------------------------------------------------------------------------------------------
# The write coordinator
# --------------------------------------------------------------------------------------------


@dataclass
class _WriteCall:
    slot: int
    member: str
    hint_for: str | None
    handoff: bool  # the copy of a failed slot, sent to a spare


class WriteCoordinatorCore:
    """One eventual/quorum write coordinated by ``node_id``; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        key: str,
        token: int,
        value: bytes | None,
        context: Mapping[str, int],
        w: int,
        sloppy: bool,
        plan: WritePlan,
        as_fallback: bool,
        deadline_ns: int,
        replica_timeout_ns: int,
        mode: versions.ConflictMode,
        config_version: int | None = None,
    ) -> None:
        assert w >= 1 and replica_timeout_ns > 0
        assert not as_fallback or (node_id, _owner_of(plan, node_id)) in plan.slots
        self.node_id = node_id
        self.key = key
        self.token = token
        self.value = value
        self.context = dict(context)
        self.w = w
        self.sloppy = sloppy
        self.plan = plan
        self.as_fallback = as_fallback
        self.deadline_ns = deadline_ns
        self.replica_timeout_ns = replica_timeout_ns
        self.mode = mode
        self.config_version = config_version  # stamped on every replica message (``cv``)
        self.obj = VersionedObject.empty()
        self.hinted: list[str] = []
        # Owners whose copy is stored: a slot's member, or the owner a hinted stand-in holds it for.
        self.owners_acked: set[str] = set()
        self.answered = False  # Done or Failed was emitted
        self._phase: Literal["new", "register", "local", "replicating"] = "new"
        self._tracker: QuorumTracker | None = None
        self._spares = list(plan.spares)
        self._put: messages.ReplicaPut | None = None  # the object sent to every replica
        self._message: Message = {}
        self._calls: dict[int, _WriteCall] = {}
        self._ids = itertools.count()

    @property
    def outstanding(self) -> tuple[int, ...]:
        """Calls sent and not yet answered, in send order."""
        return tuple(self._calls)

    @property
    def settled(self) -> bool:
        """The outcome was given and no call is in flight: nothing more can happen."""
        return self.answered and not self._calls

    # --- inputs ---------------------------------------------------------------------------

    def start(self, at_ns: int) -> list[Effect]:
        assert self._phase == "new", "a core runs one write"
        if len(self.plan.slots) < self.w:
            # Refuse before writing anything: a certain failure, not indeterminate.
            return self._answer(Failed(QuorumUnavailable(
                self.w, 0, indeterminate=False, detail=f"only {len(self.plan.slots)} healthy targets"
            )))
        self._phase = "register"
        return [CheckRegister(self.key, self.token)]

    def on_register(self, holds: bool, at_ns: int) -> list[Effect]:
        assert self._phase == "register"
        if holds:
            return self._answer(Failed(ConsistencyConflict(LINEARIZABLE_WRITE)))
        self._phase = "local"
        hint_for = _owner_of(self.plan, self.node_id) if self.as_fallback else None
        return [PersistLocal(self.key, self.token, hint_for, self.deadline_ns)]

    def local_update(self, base: VersionedObject, actor: str, wall_ns: int) -> VersionedObject:
        """The new object of the coordinator's local step: the client's write applied to ``base``.

        Raises ``causal_context.BadContext`` when this node is a primary and the context claims
        more of its own counters than it issued (``causal_context.refuse_unissued``: a context
        from before the key's tombstone was reaped).  A fallback lacks the key's history and
        writes under a one-shot actor, so it has nothing to check.
        """
        if not self.as_fallback:
            causal_context.refuse_unissued(self.context, actor, base.vector())
        return versions.update(base, self.context, actor, self.value, wall_ns, self.mode)

    def on_local(self, result: LocalResult, at_ns: int) -> list[Effect]:
        assert self._phase == "local"
        if isinstance(result, LocalFailed):
            return self._answer(Failed(self._local_error(result)))
        self._phase = "replicating"
        self.obj = result.obj
        self._put = messages.ReplicaPut(self.key, self.token, versions.encode(self.obj), cv=self.config_version)
        self._message = messages.encode(self._put)
        self._tracker = QuorumTracker(needed=self.w, total=len(self.plan.slots))
        if self.as_fallback:
            self.hinted.append(self.node_id)
        own = [(member, owner) for member, owner in self.plan.slots if member == self.node_id]
        assert len(own) == 1, "the coordinator is a primary believed up, or a fallback with a slot"
        effects: list[Effect] = []
        for slot, (member, hint_for) in enumerate(self.plan.slots):
            if member != self.node_id:
                effects.append(self._send(_WriteCall(slot, member, hint_for, handoff=False), at_ns))
        # Recorded after the sends: a joint write decides early only once no call is in flight.
        outcome = self._record(True, self.node_id, own[0][1] or self.node_id)
        if not outcome:
            effects.append(StartTimer(self.deadline_ns))
        return effects + outcome

    def on_answers(self, answers: Iterable[Answer], at_ns: int) -> list[Effect]:
        """Answers in completion order; each is judged as it comes (as if one at a time)."""
        sends: list[Effect] = []
        outcome: list[Effect] = []
        for answer in answers:
            call = self._calls.pop(answer.call, None)
            if call is None:
                continue  # not a call of this write, or answered already
            ok = isinstance(answer, Reply) and _acknowledged(answer.message)
            if ok:
                if call.hint_for is not None:
                    self.hinted.append(call.member)
                outcome += self._record(True, call.member, call.hint_for or call.member)
            elif not call.handoff and self.sloppy and self._spares:
                # The slot's member did not take it (in time): hand its copy to the next fallback.
                spare = self._spares.pop(0)
                owner = call.hint_for or call.member
                sends.append(self._send(_WriteCall(call.slot, spare, owner, handoff=True), at_ns, deadline_only=True))
            else:
                outcome += self._record(False, call.member)
        return sends + outcome

    def on_reply(self, call: int, message: Message, at_ns: int) -> list[Effect]:
        return self.on_answers([Reply(call, message)], at_ns)

    def on_failure(self, call: int, at_ns: int, *, maybe_delivered: bool = True) -> list[Effect]:
        return self.on_answers([CallFailed(call, maybe_delivered)], at_ns)

    def on_timer(self, at_ns: int) -> list[Effect]:
        if self.answered or self._phase != "replicating":
            return []
        return self._decide()

    # --- internals --------------------------------------------------------------------------

    def _send(self, call: _WriteCall, at_ns: int, deadline_only: bool = False) -> Send:
        number = next(self._ids)
        self._calls[number] = call
        if call.hint_for is None:
            message = dict(self._message)
        else:
            assert self._put is not None
            message = messages.encode(msgspec.structs.replace(self._put, hint_for=call.hint_for))
        cap = None if deadline_only else self.replica_timeout_ns
        return Send(number, call.member, message, _call_timeout_at(at_ns, self.deadline_ns, cap))

    def _record(self, ok: bool, member: str, owner: str | None = None) -> list[Effect]:
        tracker = self._tracker
        assert tracker is not None
        if self.answered:
            return []  # the answer was given: this completion is background work
        if ok:
            tracker.ack(member)
            self.owners_acked.add(owner or member)
        else:
            tracker.fail()
        if self.plan.joint is None:
            return self._decide() if tracker.done else []
        # Joint: W slots in all may come before W among the new owners; wait for both, or for
        # the last call in flight (then it is decided as it stands).
        return self._decide() if self._satisfied() or tracker.impossible or not self._calls else []

    def _satisfied(self) -> bool:
        tracker = self._tracker
        assert tracker is not None
        joint = self.plan.joint
        if joint is None:
            return tracker.satisfied
        return tracker.satisfied and write_quorum_reached(self.owners_acked, joint.old, joint.new, self.w)

    def _decide(self) -> list[Effect]:
        tracker = self._tracker
        assert tracker is not None
        if self._satisfied():
            return self._answer(Done(WriteOutcome(self.obj, tracker.acknowledged, list(self.hinted))))
        # The coordinator holds the write, and maybe some replicas do: indeterminate.
        targets = ", ".join(m for m, _ in self.plan.slots)
        return self._answer(Failed(QuorumUnavailable(
            self.w, tracker.acknowledged, indeterminate=True, detail="targets: " + targets
        )))

    def _answer(self, effect: Done | Failed) -> list[Effect]:
        assert not self.answered
        self.answered = True
        return [effect]

    def _local_error(self, failed: LocalFailed) -> NodeError:
        node = self.node_id
        match failed.cause:
            case "timeout" if failed.writing:
                return RequestTimeout(
                    f"{node}'s durable write did not finish within timeout_ms (slow disk); "
                    "it may still land and then spread to the other replicas", indeterminate=True,
                )
            case "timeout":
                return RequestTimeout(
                    f"{node} could not start the write within timeout_ms (the key is busy or its "
                    "storage is slow); it was not applied", indeterminate=False,
                )
            case "storage_full":
                return InsufficientStorage(
                    f"{node}: disk full; the write was refused before any replica saw it ({failed.detail})",
                    indeterminate=False,
                )
            case "storage_busy":
                return Overloaded(f"{node}: {failed.detail}; retry later", indeterminate=False)
            case "storage_error":
                return StorageUnavailable(f"{node}: storage error: {failed.detail}", indeterminate=failed.writing)
            case "bad_context":
                return BadRequest("bad_context", failed.detail)
            case "refused":
                assert failed.error is not None, "a refusal carries its typed error"
                return failed.error
        raise AssertionError(f"unknown local failure {failed.cause!r}")


def _owner_of(plan: WritePlan, node_id: str) -> str | None:
    for member, owner in plan.slots:
        if member == node_id and owner is not None:
            return owner
    return None


def _acknowledged(reply: Message) -> bool:
    # The node's call turns an error reply into RemoteError; a reply that still carries one
    # (a driver that passes wire replies as they are) is a failure, not an ack.
    return isinstance(reply, dict) and not reply.get("remote_error") and not reply.get("error")


# --------------------------------------------------------------------------------------------
# The read coordinator
# --------------------------------------------------------------------------------------------


class ReadCoordinatorCore:
    """One eventual/quorum read; see the module docstring."""

    def __init__(
        self,
        *,
        key: str,
        token: int,
        r: int,
        targets: Sequence[str],
        primaries: Sequence[str],
        deadline_ns: int,
        replica_timeout_ns: int,
        mode: versions.ConflictMode,
        config_version: int | None = None,
    ) -> None:
        assert r >= 1 and replica_timeout_ns > 0
        assert len(set(targets)) == len(targets), "targets must be distinct"
        self.config_version = config_version  # stamped on every replica message (``cv``)
        self.key = key
        self.token = token
        self.r = r
        self.targets = tuple(targets)
        self.primaries = tuple(primaries)
        self.deadline_ns = deadline_ns
        self.replica_timeout_ns = replica_timeout_ns
        self.mode = mode
        # Filled in completion order (a dict: iterated in insertion order).  None: the replica
        # answered that it holds nothing for the key.
        self.replies: dict[str, VersionedObject | None] = {}
        self.mixed: list[str] = []  # replicas that hold a linearizable register for the key
        self.merged = VersionedObject.empty()
        self.answered = False
        self.failed = False
        self._tracker: QuorumTracker | None = None
        self._calls: dict[int, str] = {}
        self._started = False
        self._repairing = False
        self._repaired = False

    @property
    def outstanding(self) -> tuple[int, ...]:
        return tuple(self._calls)

    @property
    def settled(self) -> bool:
        """Nothing more will come out: failed, or the repairs were decided."""
        return self.failed or self._repaired

    # --- inputs ---------------------------------------------------------------------------

    def start(self, at_ns: int) -> list[Effect]:
        assert not self._started, "a core runs one read"
        self._started = True
        if len(self.targets) < self.r:
            self.answered = self.failed = True
            return [Failed(QuorumUnavailable(self.r, 0, indeterminate=False, detail="not enough replicas believed up"))]
        self._tracker = QuorumTracker(needed=self.r, total=len(self.targets))
        message = messages.encode(messages.ReplicaGet(self.key, self.token, cv=self.config_version))
        effects: list[Effect] = []
        for number, member in enumerate(self.targets):
            self._calls[number] = member
            effects.append(
                Send(number, member, message, _call_timeout_at(at_ns, self.deadline_ns, self.replica_timeout_ns))
            )
        effects.append(StartTimer(self.deadline_ns))
        return effects

    def on_answers(self, answers: Iterable[Answer], at_ns: int) -> list[Effect]:
        """Answers in completion order; the quorum is judged after each one."""
        tracker = self._tracker
        if tracker is None or self.failed or self._repaired:
            return []
        effects: list[Effect] = []
        for answer in answers:
            member = self._calls.pop(answer.call, None)
            if member is None:
                continue
            parsed = _replica_reply(answer.message) if isinstance(answer, Reply) else None
            ok = parsed is not None
            if parsed is not None:
                obj, linearizable = parsed
                self.replies[member] = obj
                if linearizable:
                    self.mixed.append(member)
            if self.answered:
                continue  # the read was answered; the reply is kept for the repair
            if ok:
                tracker.ack(member)
            else:
                tracker.fail()
            if tracker.done:
                effects += self._decide()
                if self.failed:
                    return effects
        if self._repairing and not self._calls:
            effects += self._repairs()
        return effects

    def on_reply(self, call: int, message: Message, at_ns: int) -> list[Effect]:
        return self.on_answers([Reply(call, message)], at_ns)

    def on_failure(self, call: int, at_ns: int, *, maybe_delivered: bool = True) -> list[Effect]:
        return self.on_answers([CallFailed(call, maybe_delivered)], at_ns)

    def on_timer(self, at_ns: int) -> list[Effect]:
        if self._tracker is None or self.failed or self._repaired:
            return []
        if not self.answered:
            return self._decide()  # the deadline
        if self._repairing:
            return [*self._abandon(), *self._repairs()]  # the repair wait is over
        return []

    def begin_repair(self, at_ns: int, wait_ns: int) -> list[Effect]:
        """After ``Done``: wait up to ``wait_ns`` for the remaining replies, then repair."""
        assert self.answered and not self.failed and not self._repairing, "repair follows a successful read, once"
        self._repairing = True
        if not self._calls:
            return self._repairs()
        return [StartTimer(at_ns + wait_ns)]

    # --- internals --------------------------------------------------------------------------

    def _decide(self) -> list[Effect]:
        tracker = self._tracker
        assert tracker is not None and not self.answered
        self.answered = True
        if self.mixed:
            self.failed = True
            return [*self._abandon(), Failed(ConsistencyConflict(LINEARIZABLE_READ))]
        if not tracker.satisfied:
            self.failed = True
            return [*self._abandon(), Failed(QuorumUnavailable(self.r, tracker.acknowledged, indeterminate=False))]
        self.merged = versions.sync_all((o for o in self.replies.values() if o is not None), self.mode)
        return [Done(ReadOutcome(self.merged, tracker.acknowledged, list(self.replies)))]

    def _abandon(self) -> list[Effect]:
        if not self._calls:
            return []
        calls, self._calls = tuple(self._calls), {}
        return [Abandon(calls)]

    def _repairs(self) -> list[Effect]:
        """One ``Repair`` per primary that answered with something other than the merge."""
        self._repaired = True
        merged = versions.sync_all([self.merged, *(o for o in self.replies.values() if o is not None)], self.mode)
        if merged == VersionedObject.empty():
            # Nobody holds the key (never written, or its tombstone was reaped): there is nothing
            # to repair, and "repairing" would store an empty record on every primary per read.
            return []
        digest = versions.digest(merged)
        message = messages.encode(
            messages.ReplicaPut(self.key, self.token, versions.encode(merged), cv=self.config_version)
        )
        effects: list[Effect] = []
        for member in self.targets:
            if member not in self.primaries or member not in self.replies:
                continue  # no answer: unknown state, anti-entropy's job; fallbacks hold hints
            got = self.replies[member]
            if got is not None and versions.digest(got) == digest:
                continue
            effects.append(Repair(member, message, self.replica_timeout_ns))
        return effects


def _replica_reply(reply: Message) -> tuple[VersionedObject | None, bool] | None:
    """The object of a ``replica_get`` reply (None: the replica holds nothing) and whether the
    key is linearizable there; None when the reply is an error or cannot be decoded (counted
    as a failed call)."""
    if not isinstance(reply, dict) or reply.get("remote_error") or reply.get("error"):
        return None
    try:
        parsed = messages.decode_reply(reply, messages.ReplicaGetReply, messages.ReplicaGet.OP)
        return (None if parsed.obj is None else versions.decode(parsed.obj)), parsed.cp
    except (ValueError, TypeError, KeyError):  # MessageError is a ValueError
        return None


# --------------------------------------------------------------------------------------------
# The write router: which node coordinates a client write
# --------------------------------------------------------------------------------------------

# A forwarded request gets this much less time than the forwarder, so the coordinator's own typed
# answer (e.g. a timeout with ``indeterminate``) can arrive before the forwarder's call times out.
FORWARD_MARGIN_MS = 20

# RemoteError codes that a peer answers before doing anything (the request was not applied).
# ``stale_config``: the request was planned on an older membership version and fenced (docs/membership.md).
REFUSED_REMOTE_CODES = ("bad_request", "unknown_op", "overloaded", "insufficient_storage", STALE_CONFIG)


@dataclass(frozen=True, slots=True)
class CoordinateHere:
    """Coordinate the write on this node (a ``WriteCoordinatorCore``; as the stand-in of a down
    primary when ``as_fallback``); answer ``on_coordinated`` with its outcome or typed error."""

    as_fallback: bool


@dataclass(frozen=True, slots=True)
class NoteRefusal:
    """A primary certainly refused the write (its disk); the router tries the next one.  For
    the driver's metrics (``kvstore_replica_errors{peer, reason}``) and debug log."""

    peer: str
    error: NodeError


@dataclass(frozen=True, slots=True)
class ReadMembership:
    """Look at the key's preference list again (``write_targets``); answer ``on_membership``."""


RouterEffect = CoordinateHere | Send | NoteRefusal | ReadMembership | Done | Failed


@dataclass(frozen=True, slots=True)
class RemoteFailed:
    """Input: a forward's peer answered an untyped error (``RemoteError``)."""

    call: int
    error: RemoteError


class WriteRouterCore:
    """Where a client write is coordinated: here if this node is a primary believed up, else
    forwarded (``coordinate_write``) to one; the next primary only after a *certain* refusal
    (``refused_before_replicating``); as a fallback when no primary took it and one is believed
    down (sloppy).  Any answer that may mean "applied" ends the request: no hidden second
    attempt.  One step at a time: each effect (``CoordinateHere``, a forward ``Send``,
    ``ReadMembership``) is answered before the next; ``NoteRefusal`` comes before the next
    attempt in its batch, ``Done``/``Failed`` last."""

    def __init__(
        self,
        *,
        node_id: str,
        key: str,
        value: bytes | None,
        context: Mapping[str, int],
        w: int,
        sloppy: bool,
        targets: WriteTargets,
        deadline_ns: int,
    ) -> None:
        self.node_id = node_id
        self.key = key
        self.value = value
        self.context = dict(context)
        self.w = w
        self.sloppy = sloppy
        self.targets = targets
        self.deadline_ns = deadline_ns
        self.refusals: list[NodeError] = []
        self._candidates = ([node_id] if node_id in targets.up else []) + [p for p in targets.up if p != node_id]
        self._current: str | None = None  # the node asked now (this one, or a forward's primary)
        self._forward: int | None = None  # the forward's call
        self._as_fallback = False  # the last attempt: no refusal is retried after it
        self._ids = itertools.count()
        self.answered = False

    def start(self, at_ns: int) -> list[RouterEffect]:
        assert self._current is None and not self.answered
        if not self.sloppy and len(self.targets.up) < self.w:
            return self._answer(Failed(QuorumUnavailable(
                self.w, 0, indeterminate=False, detail=f"primaries believed down: {list(self.targets.down)}"
            )))
        return self._next(at_ns)

    def on_coordinated(self, result: WriteOutcome | NodeError, at_ns: int) -> list[RouterEffect]:
        """The outcome of ``CoordinateHere``."""
        assert self._current is not None and not self.answered
        if isinstance(result, WriteOutcome):
            return self._answer(Done(result))
        if self._as_fallback:
            return self._answer(Failed(result))  # the last attempt
        return self._refused_or_failed(result, at_ns)

    def on_answer(self, answer: Reply | CallFailed | RemoteFailed, at_ns: int) -> list[RouterEffect]:
        """The answer to the forward ``Send``."""
        assert answer.call == self._forward and self._current is not None and not self.answered
        self._forward = None
        primary = self._current
        match answer:
            case Reply(message=reply):
                try:
                    parsed = messages.decode_reply(reply, messages.CoordinateWriteReply, messages.CoordinateWrite.OP)
                    if parsed.status == "ok":
                        if parsed.obj is None or parsed.acknowledged is None:
                            raise messages.MessageError(messages.CoordinateWrite.OP, "an ok answer has obj and acknowledged")
                        outcome = WriteOutcome(versions.decode(parsed.obj), parsed.acknowledged, list(parsed.hinted or []))
                        return self._answer(Done(outcome))
                except (ValueError, TypeError, KeyError):  # MessageError is a ValueError
                    # The primary answered, but not legibly: it may have applied the write.
                    return self._answer(Failed(QuorumUnavailable(
                        self.w, 0, indeterminate=True, detail=f"malformed answer from {primary}"
                    )))
                return self._refused_or_failed(error_from_body(parsed.body or {}, parsed.http), at_ns)
            case RemoteFailed(error=error):
                return self._refused_or_failed(error_from_remote(error, self.w), at_ns)
            case CallFailed(maybe_delivered=True):
                return self._answer(Failed(QuorumUnavailable(
                    self.w, 0, indeterminate=True, detail=f"forward to {primary} timed out"
                )))
            case CallFailed():
                return self._next(at_ns)  # it certainly never got the request
        raise AssertionError(f"unknown answer {answer!r}")

    def on_membership(self, targets: WriteTargets, at_ns: int) -> list[RouterEffect]:
        """The preference list as the failure detector sees it now (after every primary failed)."""
        assert not self.answered
        if not targets.down:
            # Every primary is still believed up but none took the forwarded write (a forward that
            # may have been delivered ended the request already): there is no down primary for
            # this node to stand in for as a fallback.  Nothing was written: a certain failure.
            if at_ns >= self.deadline_ns:
                return self._answer(Failed(RequestTimeout(
                    "the deadline passed before a primary could be asked", indeterminate=False
                )))
            return self._answer(Failed(QuorumUnavailable(
                self.w, 0, indeterminate=False, detail="no primary took the forwarded write"
            )))
        self._current = self.node_id
        self._as_fallback = True
        return [CoordinateHere(as_fallback=True)]

    # --- internals --------------------------------------------------------------------------

    def _refused_or_failed(self, error: NodeError, at_ns: int) -> list[RouterEffect]:
        if not refused_before_replicating(error):
            return self._answer(Failed(error))
        assert self._current is not None
        self.refusals.append(error)
        return [NoteRefusal(self._current, error), *self._next(at_ns)]

    def _next(self, at_ns: int) -> list[RouterEffect]:
        remaining_ns = self.deadline_ns - at_ns
        if self._candidates and remaining_ns > 0:
            primary = self._current = self._candidates.pop(0)
            if primary == self.node_id:
                return [CoordinateHere(as_fallback=False)]
            self._forward = next(self._ids)
            message = messages.encode(messages.CoordinateWrite(
                self.key, self.value, sorted(self.context.items()), self.w, self.sloppy,
                max(1, remaining_ns // 1_000_000 - FORWARD_MARGIN_MS),
            ))
            return [Send(self._forward, primary, message, self.deadline_ns)]
        if self.refusals:
            return self._answer(Failed(self.refusals[0]))  # every primary tried refused for certain
        if not self.sloppy:
            return self._answer(Failed(QuorumUnavailable(self.w, 0, indeterminate=False, detail="no primary reachable")))
        return [ReadMembership()]

    def _answer(self, effect: Done | Failed) -> list[RouterEffect]:
        assert not self.answered
        self.answered = True
        return [effect]


def error_from_body(body: Mapping[str, Any], http_status: Any = None) -> NodeError:
    """The typed error a peer answered (a forwarded write or proposal), with its status and body."""
    code = str(body.get("error") or "internal")
    message = str(body.get("message", ""))
    err: NodeError
    if code == "quorum_unavailable":
        err = QuorumUnavailable(
            int(body.get("needed", 0)), int(body.get("acknowledged", 0)), bool(body.get("indeterminate", True))
        )
    elif code == "overloaded":
        err = Overloaded(message)
    elif code == "consistency_conflict":
        err = ConsistencyConflict(message)
    elif code == "bad_context":
        err = BadRequest("bad_context", message)
    else:
        err = NodeError(message)
        err.code = code
        err.status = 503
    # Pass the peer's answer on as it was: its message (with details) and every field of its body.
    err.message = message
    err.extra = {k: v for k, v in body.items() if k not in ("error", "message")}
    if isinstance(http_status, int) and 400 <= http_status <= 599:
        err.status = http_status
    return err


def error_from_remote(exc: RemoteError, needed: int) -> NodeError:
    """A peer's handler failed outside its typed answers (``RemoteError``): say what is known."""
    if exc.code == "insufficient_storage":
        return InsufficientStorage(f"{exc.peer}: {exc.message}", indeterminate=False)
    if exc.code == "overloaded":
        return Overloaded(f"{exc.peer}: {exc.message}; retry later", indeterminate=False)
    detail = f"{exc.peer} answered {exc.code}: {exc.message}"
    # A refused message was not applied; any other failure (a storage error, a bug) may have been.
    return QuorumUnavailable(needed, 0, indeterminate=exc.code not in REFUSED_REMOTE_CODES, detail=detail)


def refused_before_replicating(exc: NodeError) -> bool:
    """The coordinator's own disk refused the write before any replica saw it: nothing was
    applied anywhere, and another primary (another disk) may well succeed."""
    return exc.code in ("insufficient_storage", "storage_unavailable") and exc.extra.get("indeterminate") is False
