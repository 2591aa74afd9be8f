"""Typed internal messages: a frozen ``msgspec.Struct`` per peer request and reply, and one codec for all.

Theory of operation
-------------------
Nodes talk through the ``Transport`` seam in msgpack maps with an ``"op"`` field.  Every such map a
node sends or serves is described here once, as a frozen ``msgspec.Struct`` (``OP`` names its op;
Structs rather than dataclasses because msgspec builds and checks them in C, about twice as fast on
a quorum read's path, ``benchmarks/bench_messages.py``), and goes through one codec:

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

from collections.abc import Awaitable, Callable, Mapping
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


class Ping(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "ping"
    cv: int | None = None


class ReplicaGet(msgspec.Struct, frozen=True):
    """A replica's knowledge of a key (``kvstore.runtime.replica``)."""

    OP: ClassVar[str] = "replica_get"
    key: str
    token: int
    cv: int | None = None


class ReplicaPut(msgspec.Struct, frozen=True):
    """Merge ``obj`` (``versions.encode``) into a replica; a hint for ``hint_for`` at a fallback."""

    OP: ClassVar[str] = "replica_put"
    key: str
    token: int
    obj: bytes
    cv: int | None = None
    hint_for: str | None = None


class CoordinateWrite(msgspec.Struct, frozen=True):
    """A client write forwarded to a primary (``kvstore.runtime.coordinator``)."""

    OP: ClassVar[str] = "coordinate_write"
    key: str
    value: bytes | None
    context: list[tuple[str, int]]  # the causal context's (actor, counter) pairs, sorted
    w: Positive
    sloppy: bool
    timeout_ms: Positive
    cv: int | None = None


class AeSummary(msgspec.Struct, frozen=True):
    """Count and flat hash of each range, ``[start, end]`` (``kvstore.runtime.anti_entropy``)."""

    OP: ClassVar[str] = "ae_summary"
    ranges: Annotated[list[tuple[int, int]], msgspec.Meta(max_length=SUMMARY_BATCH)]
    cv: int | None = None


class AeLevel(msgspec.Struct, frozen=True):
    """One level of a Merkle exchange (``kvstore.protocol.merkle.LevelRequest``'s own wire format)."""

    OP: ClassVar[str] = "ae_level"
    request: LevelRequest
    cv: int | None = None


class AeBuckets(msgspec.Struct, frozen=True):
    """The items of differing buckets; ``fresh``: the responder builds its tree now."""

    OP: ClassVar[str] = "ae_buckets"
    request: BucketRequest
    fresh: bool = False
    cv: int | None = None


class AePull(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "ae_pull"
    keys: Entries
    cv: int | None = None


class AePush(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "ae_push"
    objects: Objects
    cv: int | None = None


class AeStatus(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "ae_status"
    cv: int | None = None


class ReapCheck(msgspec.Struct, frozen=True):
    """Per ``[token, key, tombstone]``: does the replica's copy descend the tombstone?"""

    OP: ClassVar[str] = "reap_check"
    keys: Objects
    cv: int | None = None


class Reap(msgspec.Struct, frozen=True):
    """Per ``[token, key, tombstone, primaries that confirmed]``: delete it if still exactly that."""

    OP: ClassVar[str] = "reap"
    keys: Annotated[list[tuple[int, str, bytes, MemberIds]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]
    cv: int | None = None


class ConfigGet(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "config_get"
    cv: int | None = None


class ConfigPush(msgspec.Struct, frozen=True):
    """A membership configuration (``ClusterConfig.encode``) to adopt if newer."""

    OP: ClassVar[str] = "config_push"
    config: bytes
    cv: int | None = None


class MbTransfer(msgspec.Struct, frozen=True):
    """Pull the ranges this member gains in the joint configuration ``version``."""

    OP: ClassVar[str] = "mb_transfer"
    version: NonNegative
    cv: int | None = None


class MbCatchup(msgspec.Struct, frozen=True):
    """Re-commit with joint quorums the registers whose acceptor set changes in ``version``."""

    OP: ClassVar[str] = "mb_catchup"
    version: NonNegative
    cv: int | None = None


class CpPropose(msgspec.Struct, frozen=True):
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


class PaxosRegister(msgspec.Struct, frozen=True):
    """An acceptor's new incarnation, registered at a peer (``kvstore.runtime.register_recovery``)."""

    OP: ClassVar[str] = "paxos_register"
    incarnation: Incarnation
    cv: int | None = None


class PaxosRecoverScan(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "paxos_recover_scan"
    incarnation: Incarnation
    after: tuple[int, str] | None
    limit: Positive
    max_bytes: Positive
    cv: int | None = None


class PaxosStatus(msgspec.Struct, frozen=True):
    OP: ClassVar[str] = "paxos_status"
    cv: int | None = None


class PaxosPrepare(msgspec.Struct, frozen=True):
    """Adapter: a CASPaxos prepare in ``kvstore.protocol.paxos_wire``'s format."""

    OP: ClassVar[str] = paxos_wire.OP_PREPARE
    request: paxos_wire.PaxosRequest
    cv: int | None = None


class PaxosAccept(msgspec.Struct, frozen=True):
    """Adapter: a CASPaxos accept in ``kvstore.protocol.paxos_wire``'s format."""

    OP: ClassVar[str] = paxos_wire.OP_ACCEPT
    request: paxos_wire.PaxosRequest
    cv: int | None = None


class PaxosPeek(msgspec.Struct, frozen=True):
    """Adapter: a CASPaxos quorum read's peek (changes nothing) in ``kvstore.protocol.paxos_wire``'s format."""

    OP: ClassVar[str] = paxos_wire.OP_PEEK
    key: str
    token: int
    group: tuple[str, ...] = ()
    cv: int | None = None


# --- replies -----------------------------------------------------------------------------------


class ErrorReply(msgspec.Struct, frozen=True):
    """Any handler's refusal: ``Node.call`` raises it as ``RemoteError`` at the caller."""

    error: str
    message: str = ""
    remote_error: bool = True
    cv: int | None = None  # stale_config: the version the refusing node is at


class Ok(msgspec.Struct, frozen=True):
    ok: bool = True


OK = Ok()  # immutable: one instance serves every plain acknowledgement


class PingReply(msgspec.Struct, frozen=True):
    ok: bool
    cv: int  # the pinger fetches a newer membership


class ReplicaGetReply(msgspec.Struct, frozen=True):
    obj: bytes | None  # None: the replica knows nothing of the key
    cp: bool = False  # the key is linearizable here: the coordinator refuses the mixed access


class CoordinateWriteReply(msgspec.Struct, frozen=True):
    """``status`` ok: the merged object, how many acknowledged, who stood in; error: the typed
    error's JSON body and HTTP status, re-raised at the forwarding node."""

    status: Literal["ok", "error"]
    obj: bytes | None = None
    acknowledged: NonNegative | None = None
    hinted: list[str] | None = None
    body: dict[str, Any] | None = None
    http: int | None = None


class AeSummaryReply(msgspec.Struct, frozen=True):
    summaries: list[tuple[NonNegative, bytes]]  # per range asked: (key count, flat hash)


class AeLevelReply(msgspec.Struct, frozen=True):
    hashes: list[bytes]  # checked against the request by ``merkle.LevelReply.from_wire``


class AeBucketsReply(msgspec.Struct, frozen=True):
    buckets: list[list[tuple[str, bytes]]]  # checked against the request by ``merkle.BucketReply.from_wire``


class AePullReply(msgspec.Struct, frozen=True):
    objects: Annotated[list[tuple[str, bytes | None]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]


class AePushReply(msgspec.Struct, frozen=True):
    applied: NonNegative
    refused: NonNegative


class AeStatusReply(msgspec.Struct, frozen=True):
    running: bool
    rounds_completed: NonNegative
    last_round: dict[str, Any] | None


class ReapCheckReply(msgspec.Struct, frozen=True):
    covered: Annotated[list[bool], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]


class ReapReply(msgspec.Struct, frozen=True):
    reaped: Annotated[list[Literal["reaped", "absent", "kept"]], msgspec.Meta(max_length=OBJECTS_PER_MESSAGE)]


class ConfigGetReply(msgspec.Struct, frozen=True):
    config: bytes


class ConfigPushReply(msgspec.Struct, frozen=True):
    version: NonNegative


class MbTransferReply(msgspec.Struct, frozen=True):
    keys: NonNegative
    sources: list[str]


class MbCatchupReply(msgspec.Struct, frozen=True):
    registers: NonNegative


class CpProposeReply(msgspec.Struct, frozen=True):
    status: Literal["ok", "error"]
    outcome: str | None = None
    value: bytes | None = None
    etag: str | None = None
    body: dict[str, Any] | None = None
    http: int | None = None

    # ``value`` and ``etag`` are part of an ok answer even when None (the register is empty): the
    # old map always sent both, and older nodes read ``etag`` by key.
    ALWAYS: ClassVar[frozenset[str]] = frozenset({"value", "etag"})


class PaxosRegisterReply(msgspec.Struct, frozen=True):
    ok: bool
    previous: Incarnation | None  # the incarnation of the registering node the peer knew before
    incarnation: Incarnation  # the peer's own


class PaxosRecoverScanReply(msgspec.Struct, frozen=True):
    records: Annotated[list[tuple[int, str, bytes]], msgspec.Meta(max_length=PAGE_RECORDS)]
    next: tuple[int, str] | None
    done: bool


class PaxosStatusReply(msgspec.Struct, frozen=True):
    incarnation: str
    status: str
    bootstrap: str
    decision: str
    recovered_from: list[str]
    peers: list[str]
    # Present once an identity save failed since start (register_recovery retries it): how many
    # failed, and while a change still waits, the last error and for how long.
    identity_save_failures: int | None = None
    identity_save_error: str | None = None
    identity_unsaved_ms: int | None = None


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


def _plain_encoder(cls: type) -> Callable[[Any], Message]:
    """How a plain message type is written: its ``op`` first, then its fields in wire order
    (``msgspec.structs.asdict``: shallow, declaration order), less the fields left out when absent
    (an absent default, None or False, that the old maps never sent)."""
    always: frozenset[str] = getattr(cls, "ALWAYS", frozenset())
    omittable = tuple(
        (f.name, f.default)
        for f in msgspec.structs.fields(cls)
        if (f.default is None or f.default is False) and f.name not in always
    )
    op: str | None = getattr(cls, "OP", None)
    if op is None and not omittable:
        return msgspec.structs.asdict

    def encode_plain(message: Any) -> Message:
        out: Message = {"op": op, **_asdict(message)} if op is not None else _asdict(message)
        for name, default in omittable:
            if out[name] is default:
                del out[name]
        return out

    return encode_plain


_asdict = msgspec.structs.asdict
_ENCODERS: dict[type, Callable[[Any], Message]] = {}  # per type, made on first use (adapters: below)


def encode(message: Any) -> Message:
    """The transport map of a request (with its ``op``) or a reply."""
    cls = type(message)
    encoder = _ENCODERS.get(cls)
    if encoder is None:
        encoder = _ENCODERS[cls] = _plain_encoder(cls)
    return encoder(message)


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
    try:
        return msgspec.convert(raw, cls, builtin_types=_BUILTIN_TYPES)
    except msgspec.ValidationError as exc:
        raise MessageError(f"{op} reply", str(exc)) from None


# The transport's maps come from msgpack, which has bytes: a str where bytes are due is malformed
# (without this, ``convert`` would read it as base64).
_BUILTIN_TYPES = (bytes,)


def _convert(raw: Any, cls: type[T], what: str) -> T:
    try:
        return msgspec.convert(raw, cls, builtin_types=_BUILTIN_TYPES)
    except msgspec.ValidationError as exc:
        raise MessageError(what, str(exc)) from None


def _request_decoder(cls: type[T]) -> Callable[[Any], T]:
    """``decode_as(raw, cls)`` with the type's lookups done once (a served op's hot path)."""
    adapter = _ADAPTERS.get(cls)
    if adapter is not None:
        return adapter[1]
    what: str = getattr(cls, "OP", cls.__name__)
    convert, invalid, builtin_types = msgspec.convert, msgspec.ValidationError, _BUILTIN_TYPES

    def decode_plain(raw: Any) -> T:
        try:
            return convert(raw, cls, builtin_types=builtin_types)
        except invalid as exc:
            raise MessageError(what, str(exc)) from None

    return decode_plain


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
_ENCODERS.update((cls, codec[0]) for cls, codec in _ADAPTERS.items())


# --- serving ------------------------------------------------------------------------------------

Req = TypeVar("Req")


class Served:
    """A transport ``Handler`` of one op: decode the request, run the typed handler, encode its reply.

    A malformed request raises ``MessageError`` before the handler runs (the node answers it
    ``bad_request``).  ``__self__`` is the typed handler's owner, as for a bound method."""

    __slots__ = ("request_type", "handler", "_decode")

    def __init__(self, request_type: type[Req], handler: Callable[[str, Req], Awaitable[Any]]) -> None:
        self.request_type = request_type
        self.handler = handler
        self._decode = _request_decoder(request_type)

    @property
    def __self__(self) -> Any:
        return getattr(self.handler, "__self__", None)

    async def __call__(self, sender: str, message: Message) -> Message:
        request = self._decode(message)
        return encode(await self.handler(sender, request))


def serve(request_type: type[Req], handler: Callable[[str, Req], Awaitable[Any]]) -> Served:
    return Served(request_type, handler)
