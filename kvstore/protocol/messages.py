"""Typed internal messages: a frozen dataclass per peer request and reply, and one codec for all.

Theory of operation
-------------------
Nodes talk through the ``Transport`` seam in msgpack maps with an ``"op"`` field.  Every such map a
node sends or serves is described here once, as a frozen dataclass (``OP`` names its op), and goes
through one codec:

* ``encode(message)`` gives exactly the map the transport sent before the types existed: the same
  keys, in the same order, the same values (an optional field left at its default is omitted, as
  it always was), so a node running this code and one running the older code understand each other
  byte for byte.
* ``decode(raw)`` / ``decode_as(raw, type)`` / ``decode_reply(raw, type)`` check *every* field of an
  untrusted map -- type, shape, bounds (``OBJECTS_PER_MESSAGE`` entries, ``SUMMARY_BATCH`` ranges)
  -- before any of it is used, and raise one typed ``MessageError`` for anything malformed; the
  node answers it with the same ``bad_request`` error reply a malformed message always got.
  Fields the type does not know are ignored (a newer peer may add some); a missing required field
  is an error.  Shapes are checked by ``msgspec`` (strict: a bool is not an int, a str is not
  bytes); what depends on more than one field (a push entry's token is its key's) stays with the
  mechanism that knows why.
* ``REGISTRY`` maps every op a node serves to its request type (``REPLIES``: to its reply type);
  ``serve(type, handler)`` makes a transport ``Handler`` of a typed one.

Two families of messages already had a pure typed codec of their own and keep it, registered here
through thin adapters: the CASPaxos prepare/accept (``kvstore.protocol.paxos_wire``) and the Merkle
level/bucket requests (``kvstore.protocol.merkle``).  Their replies depend on the request they
answer (a promise is for *our* ballot; a level reply has one hash per index asked), so they are
parsed by those modules with the request in hand.

Pure: no I/O, no clock, no randomness; table-tested in ``tests/test_messages.py``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec

from kvstore.protocol import paxos_wire
from kvstore.protocol.merkle import BucketRequest, LevelRequest, MerkleError
from kvstore.transport.base import Message

OBJECTS_PER_MESSAGE = 256  # keys per pull/push/reap message
SUMMARY_BATCH = 128  # ranges per anti-entropy summary message
MAX_GROUP = paxos_wire.MAX_GROUP  # member ids named in one message
PAGE_RECORDS = 256  # records per acceptor recovery scan page (kvstore.runtime.register_recovery)
# A linearizable change on the wire (kvstore.runtime.register): [kind, *args], args per kind.
CHANGE_ARITY = {"read": 0, "write": 1, "delete": 0, "cas": 2, "put_if_absent": 1}


class MessageError(ValueError):
    """A peer's message (or reply) was malformed: answered as ``bad_request``, never applied."""

    def __init__(self, op: str, detail: str) -> None:
        super().__init__(f"malformed {op} message: {detail}")
        self.op = op
        self.detail = detail


# --- requests ----------------------------------------------------------------------------------
# Field order is wire order; ``cv`` (the membership version a request was planned on, see
# ``kvstore.runtime.node.FENCED_OPS``) is added by ``Node.call`` when absent.

Entries = Annotated[list[tuple[int, str]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]
Objects = Annotated[list[tuple[int, str, bytes]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]
MemberIds = Annotated[list[str], msgspec.Meta(max_length=MAX_GROUP)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
# An acceptor incarnation (``kvstore.runtime.identity.new_incarnation``: hex digits).
Incarnation = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z]{1,64}$")]


@dataclass(frozen=True, slots=True)
class Ping:
    OP: ClassVar[str] = "ping"
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class ReplicaGet:
    """A replica's knowledge of a key (``kvstore.runtime.replica``)."""

    OP: ClassVar[str] = "replica_get"
    key: str
    token: int
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class ReplicaPut:
    """Merge ``obj`` (``versions.encode``) into a replica; a hint for ``hint_for`` at a fallback."""

    OP: ClassVar[str] = "replica_put"
    key: str
    token: int
    obj: bytes
    cv: int | None = None
    hint_for: str | None = None


@dataclass(frozen=True, slots=True)
class CoordinateWrite:
    """A client write forwarded to a primary (``kvstore.runtime.coordinator``)."""

    OP: ClassVar[str] = "coordinate_write"
    key: str
    value: bytes | None
    context: list[tuple[str, int]]  # the causal context's (actor, counter) pairs, sorted
    w: Positive
    sloppy: bool
    timeout_ms: Positive
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class AeSummary:
    """Count and flat hash of each range, ``[start, end]`` (``kvstore.runtime.anti_entropy``)."""

    OP: ClassVar[str] = "ae_summary"
    ranges: Annotated[list[tuple[int, int]], msgspec.Meta(max_length=SUMMARY_BATCH)]
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class AeLevel:
    """One level of a Merkle exchange (``kvstore.protocol.merkle.LevelRequest``'s own wire format)."""

    OP: ClassVar[str] = "ae_level"
    request: LevelRequest
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class AeBuckets:
    """The items of differing buckets; ``fresh``: the responder builds its tree now."""

    OP: ClassVar[str] = "ae_buckets"
    request: BucketRequest
    fresh: bool = False
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class AePull:
    OP: ClassVar[str] = "ae_pull"
    keys: Entries
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class AePush:
    OP: ClassVar[str] = "ae_push"
    objects: Objects
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class AeStatus:
    OP: ClassVar[str] = "ae_status"
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class ReapCheck:
    """Per ``[token, key, tombstone]``: does the replica's copy descend the tombstone?"""

    OP: ClassVar[str] = "reap_check"
    keys: Objects
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class Reap:
    """Per ``[token, key, tombstone, primaries that confirmed]``: delete it if still exactly that."""

    OP: ClassVar[str] = "reap"
    keys: Annotated[list[tuple[int, str, bytes, MemberIds]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class ConfigGet:
    OP: ClassVar[str] = "config_get"
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class ConfigPush:
    """A membership configuration (``ClusterConfig.encode``) to adopt if newer."""

    OP: ClassVar[str] = "config_push"
    config: bytes
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class MbTransfer:
    """Pull the ranges this member gains in the joint configuration ``version``."""

    OP: ClassVar[str] = "mb_transfer"
    version: NonNegative
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class MbCatchup:
    """Re-commit with joint quorums the registers whose acceptor set changes in ``version``."""

    OP: ClassVar[str] = "mb_catchup"
    version: NonNegative
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class CpPropose:
    """A linearizable operation forwarded to a key's proposer (``kvstore.runtime.register``);
    ``change`` is ``[kind, args...]`` as that module writes it."""

    OP: ClassVar[str] = "cp_propose"
    key: str
    change: Annotated[list[Any], msgspec.Meta(min_length=1, max_length=3)]
    timeout_ms: Positive
    cv: int | None = None

    def __post_init__(self) -> None:  # msgspec calls it on decode: a ValueError is a validation error
        kind, *args = self.change
        arity = CHANGE_ARITY.get(kind) if isinstance(kind, str) else None
        if arity is None or len(args) != arity:
            raise ValueError(f"change must be [kind, args...] with kind one of {sorted(CHANGE_ARITY)}")
        if not all(a is None or isinstance(a, str | bytes) for a in args):
            raise ValueError("a change's arguments are strings, bytes or null")


@dataclass(frozen=True, slots=True)
class PaxosRegister:
    """An acceptor's new incarnation, registered at a peer (``kvstore.runtime.register_recovery``)."""

    OP: ClassVar[str] = "paxos_register"
    incarnation: Incarnation
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class PaxosRecoverScan:
    OP: ClassVar[str] = "paxos_recover_scan"
    incarnation: Incarnation
    after: tuple[int, str] | None
    limit: Positive
    max_bytes: Positive
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class PaxosStatus:
    OP: ClassVar[str] = "paxos_status"
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class PaxosPrepare:
    """Adapter: a CASPaxos prepare in ``kvstore.protocol.paxos_wire``'s format."""

    OP: ClassVar[str] = paxos_wire.OP_PREPARE
    request: paxos_wire.PaxosRequest
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class PaxosAccept:
    """Adapter: a CASPaxos accept in ``kvstore.protocol.paxos_wire``'s format."""

    OP: ClassVar[str] = paxos_wire.OP_ACCEPT
    request: paxos_wire.PaxosRequest
    cv: int | None = None


@dataclass(frozen=True, slots=True)
class PaxosPeek:
    """Adapter: a CASPaxos quorum read's peek (changes nothing) in ``kvstore.protocol.paxos_wire``'s format."""

    OP: ClassVar[str] = paxos_wire.OP_PEEK
    key: str
    token: int
    group: tuple[str, ...] = ()
    cv: int | None = None


# --- replies -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Any handler's refusal: ``Node.call`` raises it as ``RemoteError`` at the caller."""

    error: str
    message: str = ""
    remote_error: bool = True
    cv: int | None = None  # stale_config: the version the refusing node is at


@dataclass(frozen=True, slots=True)
class Ok:
    ok: bool = True


OK = Ok()  # immutable: one instance serves every plain acknowledgement


@dataclass(frozen=True, slots=True)
class PingReply:
    ok: bool
    cv: int  # the pinger fetches a newer membership


@dataclass(frozen=True, slots=True)
class ReplicaGetReply:
    obj: bytes | None  # None: the replica knows nothing of the key
    cp: bool = False  # the key is linearizable here: the coordinator refuses the mixed access


@dataclass(frozen=True, slots=True)
class CoordinateWriteReply:
    """``status`` ok: the merged object, how many acknowledged, who stood in; error: the typed
    error's JSON body and HTTP status, re-raised at the forwarding node."""

    status: Literal["ok", "error"]
    obj: bytes | None = None
    acknowledged: NonNegative | None = None
    hinted: list[str] | None = None
    body: dict[str, Any] | None = None
    http: int | None = None


@dataclass(frozen=True, slots=True)
class AeSummaryReply:
    summaries: list[tuple[NonNegative, bytes]]  # per range asked: (key count, flat hash)


@dataclass(frozen=True, slots=True)
class AeLevelReply:
    hashes: list[bytes]  # checked against the request by ``merkle.LevelReply.from_wire``


@dataclass(frozen=True, slots=True)
class AeBucketsReply:
    buckets: list[list[tuple[str, bytes]]]  # checked against the request by ``merkle.BucketReply.from_wire``


@dataclass(frozen=True, slots=True)
class AePullReply:
    objects: Annotated[list[tuple[str, bytes | None]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]


@dataclass(frozen=True, slots=True)
class AePushReply:
    applied: NonNegative
    refused: NonNegative


@dataclass(frozen=True, slots=True)
class AeStatusReply:
    running: bool
    rounds_completed: NonNegative
    last_round: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ReapCheckReply:
    covered: Annotated[list[bool], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]


@dataclass(frozen=True, slots=True)
class ReapReply:
    reaped: Annotated[list[Literal["reaped", "absent", "kept"]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]


@dataclass(frozen=True, slots=True)
class ConfigGetReply:
    config: bytes


@dataclass(frozen=True, slots=True)
class ConfigPushReply:
    version: NonNegative


@dataclass(frozen=True, slots=True)
class MbTransferReply:
    keys: NonNegative
    sources: list[str]


@dataclass(frozen=True, slots=True)
class MbCatchupReply:
    registers: NonNegative


@dataclass(frozen=True, slots=True)
class CpProposeReply:
    status: Literal["ok", "error"]
    outcome: str | None = None
    value: bytes | None = None
    etag: str | None = None
    body: dict[str, Any] | None = None
    http: int | None = None

    # ``value`` and ``etag`` are part of an ok answer even when None (the register is empty): the
    # old map always sent both, and older nodes read ``etag`` by key.
    ALWAYS: ClassVar[frozenset[str]] = frozenset({"value", "etag"})


@dataclass(frozen=True, slots=True)
class PaxosRegisterReply:
    ok: bool
    previous: Incarnation | None  # the incarnation of the registering node the peer knew before
    incarnation: Incarnation  # the peer's own


@dataclass(frozen=True, slots=True)
class PaxosRecoverScanReply:
    records: Annotated[list[tuple[int, str, bytes]], msgspec.Meta(max_length=PAGE_RECORDS)]
    next: tuple[int, str] | None
    done: bool


@dataclass(frozen=True, slots=True)
class PaxosStatusReply:
    incarnation: str
    status: str
    bootstrap: str
    decision: str
    recovered_from: list[str]
    peers: list[str]


# --- the codec ---------------------------------------------------------------------------------

REQUEST_TYPES: tuple[type, ...] = (
    Ping, ReplicaGet, ReplicaPut, CoordinateWrite,
    AeSummary, AeLevel, AeBuckets, AePull, AePush, AeStatus, ReapCheck, Reap,
    ConfigGet, ConfigPush, MbTransfer, MbCatchup,
    CpPropose, PaxosRegister, PaxosRecoverScan, PaxosStatus, PaxosPrepare, PaxosAccept, PaxosPeek,
)
REGISTRY: Mapping[str, type] = {t.OP: t for t in REQUEST_TYPES}  # type: ignore[attr-defined]
# The reply each op's handler answers with when it does not refuse (an ``ErrorReply``); None: the
# reply is parsed by the op's own codec with the request in hand (paxos_wire).
REPLIES: Mapping[str, type | None] = {
    "ping": PingReply, "replica_get": ReplicaGetReply, "replica_put": Ok, "coordinate_write": CoordinateWriteReply,
    "ae_summary": AeSummaryReply, "ae_level": AeLevelReply, "ae_buckets": AeBucketsReply, "ae_pull": AePullReply,
    "ae_push": AePushReply, "ae_status": AeStatusReply, "reap_check": ReapCheckReply, "reap": ReapReply,
    "config_get": ConfigGetReply, "config_push": ConfigPushReply, "mb_transfer": MbTransferReply,
    "mb_catchup": MbCatchupReply, "cp_propose": CpProposeReply, "paxos_register": PaxosRegisterReply,
    "paxos_recover_scan": PaxosRecoverScanReply, "paxos_status": PaxosStatusReply,
    "paxos_prepare": None, "paxos_accept": None, "paxos_peek": None,
}
assert set(REPLIES) == set(REGISTRY), "every op has its reply named"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Plain:
    """How a plain message type is written: its op, field names in wire order, and which fields
    are left out when absent (an absent default, None or False, that the old maps never sent)."""

    op: str | None
    names: tuple[str, ...]
    values: Callable[[Any], tuple[Any, ...]]
    omittable: tuple[tuple[str, Any], ...]


def _plain(cls: type) -> _Plain:
    always: frozenset[str] = getattr(cls, "ALWAYS", frozenset())
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields)
    getter = operator.attrgetter(*names)
    values: Callable[[Any], tuple[Any, ...]] = getter if len(names) > 1 else (lambda message: (getter(message),))
    omittable = tuple(
        (f.name, f.default) for f in fields if (f.default is None or f.default is False) and f.name not in always
    )
    return _Plain(getattr(cls, "OP", None), names, values, omittable)


_PLAIN: dict[type, _Plain] = {}


def encode(message: Any) -> Message:
    """The transport map of a request (with its ``op``) or a reply."""
    cls = type(message)
    plain = _PLAIN.get(cls)
    if plain is None:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls][0](message)
        plain = _PLAIN[cls] = _plain(cls)
    out: Message = {"op": plain.op} if plain.op is not None else {}
    out.update(zip(plain.names, plain.values(message), strict=True))
    for name, default in plain.omittable:
        if out[name] is default:
            del out[name]
    return out


def decode(raw: Any) -> Any:
    """The typed request of a transport map, by its ``op``; ``MessageError`` if malformed or unknown."""
    op = raw.get("op") if isinstance(raw, dict) else None
    cls = REGISTRY.get(op) if isinstance(op, str) else None
    if cls is None:
        raise MessageError(str(op), "unknown op")
    return decode_as(raw, cls)


def decode_as(raw: Any, cls: type[T]) -> T:
    """``raw`` as a ``cls`` request (its ``op`` is the router's business); ``MessageError`` if malformed."""
    adapter = _ADAPTERS.get(cls)
    if adapter is not None:
        return adapter[1](raw)  # type: ignore[no-any-return]
    return _convert(raw, cls, getattr(cls, "OP", cls.__name__))


def decode_reply(raw: Any, cls: type[T], op: str) -> T:
    """A peer's reply to ``op`` as ``cls``; ``MessageError`` if malformed."""
    return _convert(raw, cls, f"{op} reply")


def _convert(raw: Any, cls: type[T], what: str) -> T:
    try:
        return msgspec.convert(raw, cls, builtin_types=(bytes,))
    except msgspec.ValidationError as exc:
        raise MessageError(what, str(exc)) from None


# --- adapters of the codecs that were there first -------------------------------------------------


def _cv_of(raw: Message, op: str) -> int | None:
    cv = raw.get("cv")
    if cv is not None and type(cv) is not int:
        raise MessageError(op, "Expected `int | null`, got another type - at `$.cv`")
    return cv


def _stamped(message: Message, cv: int | None) -> Message:
    if cv is not None:
        message["cv"] = cv
    return message


def _encode_prepare(m: PaxosPrepare) -> Message:
    r = m.request
    return _stamped(paxos_wire.prepare_message(r.key, r.token, r.ballot, r.group), m.cv)


def _encode_accept(m: PaxosAccept) -> Message:
    r = m.request
    assert r.value is not None, "an accept carries a value"
    return _stamped(
        paxos_wire.accept_message(r.key, r.token, r.ballot, r.value, r.promise_next, r.lineage, r.group), m.cv
    )


def _decode_paxos(raw: Any, op: str) -> paxos_wire.PaxosRequest:
    if not isinstance(raw, dict):
        raise MessageError(op, "a message is a map")
    try:
        request = paxos_wire.parse_request({**raw, "op": op})
    except (ValueError, TypeError) as exc:  # PaxosMessageError and the ballot/lineage checks
        raise MessageError(op, str(exc)) from None
    return request


def _decode_prepare(raw: Any) -> PaxosPrepare:
    return PaxosPrepare(_decode_paxos(raw, PaxosPrepare.OP), _cv_of(raw, PaxosPrepare.OP))


def _decode_accept(raw: Any) -> PaxosAccept:
    return PaxosAccept(_decode_paxos(raw, PaxosAccept.OP), _cv_of(raw, PaxosAccept.OP))


def _encode_peek(m: PaxosPeek) -> Message:
    return _stamped(paxos_wire.peek_message(m.key, m.token, m.group), m.cv)


def _decode_peek(raw: Any) -> PaxosPeek:
    if not isinstance(raw, dict):
        raise MessageError(PaxosPeek.OP, "a message is a map")
    try:
        key, token, group = paxos_wire.parse_peek({**raw, "op": PaxosPeek.OP})
    except (ValueError, TypeError) as exc:
        raise MessageError(PaxosPeek.OP, str(exc)) from None
    return PaxosPeek(key, token, group, _cv_of(raw, PaxosPeek.OP))


def _encode_level(m: AeLevel) -> Message:
    return _stamped({"op": AeLevel.OP, **m.request.to_wire()}, m.cv)


def _decode_level(raw: Any) -> AeLevel:
    try:
        request = LevelRequest.from_wire(raw)
    except MerkleError as exc:
        raise MessageError(AeLevel.OP, str(exc)) from None
    return AeLevel(request, _cv_of(raw, AeLevel.OP))


def _encode_buckets(m: AeBuckets) -> Message:
    return _stamped({"op": AeBuckets.OP, **m.request.to_wire(), "fresh": m.fresh}, m.cv)


def _decode_buckets(raw: Any) -> AeBuckets:
    try:
        request = BucketRequest.from_wire(raw)
    except MerkleError as exc:
        raise MessageError(AeBuckets.OP, str(exc)) from None
    fresh = raw.get("fresh", False)
    if type(fresh) is not bool:
        raise MessageError(AeBuckets.OP, "Expected `bool`, got another type - at `$.fresh`")
    return AeBuckets(request, fresh, _cv_of(raw, AeBuckets.OP))


_ADAPTERS: dict[type, tuple[Callable[[Any], Message], Callable[[Any], Any]]] = {
    PaxosPrepare: (_encode_prepare, _decode_prepare),
    PaxosAccept: (_encode_accept, _decode_accept),
    PaxosPeek: (_encode_peek, _decode_peek),
    AeLevel: (_encode_level, _decode_level),
    AeBuckets: (_encode_buckets, _decode_buckets),
}


# --- serving ------------------------------------------------------------------------------------

Req = TypeVar("Req")


class Served:
    """A transport ``Handler`` of one op: decode the request, run the typed handler, encode its reply.

    A malformed request raises ``MessageError`` before the handler runs (the node answers it
    ``bad_request``).  ``__self__`` is the typed handler's owner, as for a bound method."""

    __slots__ = ("request_type", "handler")

    def __init__(self, request_type: type[Req], handler: Callable[[str, Req], Awaitable[Any]]) -> None:
        self.request_type = request_type
        self.handler = handler

    @property
    def __self__(self) -> Any:
        return getattr(self.handler, "__self__", None)

    async def __call__(self, sender: str, message: Message) -> Message:
        request = decode_as(message, self.request_type)
        return encode(await self.handler(sender, request))


def serve(request_type: type[Req], handler: Callable[[str, Req], Awaitable[Any]]) -> Served:
    return Served(request_type, handler)
