"""Node and cluster configuration (TOML, read with stdlib ``tomllib``).

Theory of operation
-------------------
Every node reads the same member list, so every node computes the same ring:
that list is version 0 of the membership; later versions come from membership
changes (kvstore.protocol.membership, kvstore.runtime.reconfig) and are persisted by the node.  A config file describes the whole cluster plus which
member this process is (``node_id``).  Validation names the bad field
(``ConfigError.field``) so a typo never surfaces as a stack trace at the first
request.  Defaults follow Dynamo/Riak: N=3, R=2, W=2.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvstore.protocol.ring import DEFAULT_VNODES
from kvstore.protocol.tombstones import UnsafeGracePeriod, check_grace_covers_hint_window
from kvstore.protocol.versions import CONFLICT_MODES
from kvstore.storage.base import ENGINES, FSYNC_POLICIES

CONSISTENCY_LEVELS: tuple[str, ...] = ("eventual", "quorum", "linearizable")
READ_REPAIR_MODES: tuple[str, ...] = ("async", "blocking", "off")
# Both travel in the peer hello, whose size is capped before authentication (transport/stream.py).
MAX_SECRET_BYTES = 1024
MAX_MEMBER_ID_BYTES = 128
INITIAL_CLUSTER_STATES: tuple[str, ...] = ("new", "existing")


class ConfigError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"config field '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class Member:
    id: str
    host: str
    http_port: int
    peer_port: int
    # The machine it runs on, for placement only (kvstore.protocol.ring): a key's replicas go
    # to distinct machines first.  "" is a machine of its own (named by its id).  Not ``host``,
    # which is a network address: two addresses may be one machine, and one name may not.
    machine: str = ""

    @property
    def machine_name(self) -> str:
        return self.machine or self.id

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@dataclass(frozen=True)
class Limits:
    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_inflight_requests: int = 1024
    max_background_tasks: int = 4096
    request_timeout_ms: int = 2000
    replica_timeout_ms: int = 1000
    # Public HTTP port (docs/architecture.md, "Limits"): what one client connection may hold.
    # At the cap a new connection closes the longest-idle one (as nginx reuses keep-alive
    # connections); when none is idle it is answered 503 `overloaded` and closed.  Keep the cap
    # below the process's open-file limit.
    max_http_connections: int = 512
    # From the first byte of a request to the end of its headers (slowloris).
    http_header_timeout_ms: int = 10_000
    # A keep-alive connection with no complete request for this long is closed.  Longer than
    # the clients' own pool keep-alive (aiohttp's 15 s), so a client never reuses a connection
    # the node is closing at that very moment.
    http_idle_timeout_ms: int = 75_000
    # Peer port: an unauthenticated connection must send its hello within this time...
    peer_hello_timeout_ms: int = 2000
    # ...and at most this many may be waiting to authenticate (beyond it the oldest is closed).
    max_unauthenticated_peer_connections: int = 64
    # A request body that stops arriving for this long is refused (408): a stalled upload
    # would otherwise hold one of the in-flight request slots for ever.
    body_idle_timeout_ms: int = 10_000


@dataclass(frozen=True)
class APSettings:
    heartbeat_interval_ms: int = 200
    phi_threshold: float = 8.0
    hint_max_per_target: int = 100_000
    hint_max_bytes: int = 256 * 1024 * 1024
    hint_max_age_s: int = 3 * 3600
    hint_replay_rate_per_s: int = 2000
    hint_replay_concurrency: int = 16
    read_repair: str = "async"
    read_repair_wait_ms: int = 200
    anti_entropy_interval_s: float = 30.0
    anti_entropy_keys_per_s: int = 20_000
    # >= the hint window (+1 h of clock-skew margin): a late hint cannot resurrect a reaped delete.
    tombstone_grace_s: float = 4 * 3600.0


FRONT_ENDS: tuple[str, ...] = ("aiohttp", "httptools")


@dataclass(frozen=True)
class ServerSettings:
    # Who parses the public port's HTTP: "httptools" for /kv/* with every other route forwarded
    # in process to aiohttp (kvstore.server.http_front), or "aiohttp" for every route.
    front_end: str = "httptools"


@dataclass(frozen=True)
class TLSSettings:
    """Optional TLS (kvstore.tls): on when ``cert_file`` is set; then key and CA are required too."""

    cert_file: str = ""  # this node's certificate (PEM), shown to clients and to peers
    key_file: str = ""  # its private key (PEM)
    ca_file: str = ""  # the CA (PEM) that signed every member's certificate: peers are verified against it
    http: bool = True  # serve the client API over HTTPS
    peer: bool = True  # mutual TLS on peer links

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    members: tuple[Member, ...]
    secret: str
    replicas: int = 3
    r: int = 2
    w: int = 2
    vnodes: int = DEFAULT_VNODES
    conflict_mode: str = "siblings"
    consistency: str = "eventual"
    sloppy: bool = True
    storage: str = "sqlite"
    data_dir: str = "./data"
    fsync: str = "batch"
    batch_window_ms: float = 2.0
    bind: str = "127.0.0.1"
    # How to treat an *empty* Paxos store at start (etcd's flag): "existing" = this node lost its
    # state, recover it from the peers before voting; "new" = first start of a new cluster.
    # Ignored once the store holds anything (see kvstore.runtime.register_recovery).
    initial_cluster_state: str = "existing"
    limits: Limits = field(default_factory=Limits)
    ap: APSettings = field(default_factory=APSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    @property
    def scheme(self) -> str:
        return "https" if self.tls.enabled and self.tls.http else "http"

    def url_of(self, member: Member) -> str:
        """A member's client URL: https when this cluster serves HTTPS (``Member.url`` is plain http)."""
        return f"{self.scheme}://{member.host}:{member.http_port}"

    @property
    def me(self) -> Member:
        return self.member(self.node_id)

    def member(self, member_id: str) -> Member:
        for m in self.members:
            if m.id == member_id:
                return m
        raise KeyError(member_id)

    @property
    def member_ids(self) -> list[str]:
        return [m.id for m in self.members]

    def with_node(self, node_id: str) -> NodeConfig:
        return validate(replace(self, node_id=node_id))


def _expect(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(name, f"expected a number, got {value!r}")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(name, f"expected {expected}, got {type(value).__name__} {value!r}")
    return value


def _section(data: dict[str, Any], cls: type, name: str) -> Any:
    raw = data.get(name, {})
    _expect(raw, dict, name)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown setting (known: {', '.join(sorted(known))})")
        default = known[key].default
        kind: type | tuple[type, ...] = (int, float) if isinstance(default, float) else type(default)
        values[key] = _expect(value, kind, f"{name}.{key}")
    return cls(**values)


def from_dict(data: dict[str, Any]) -> NodeConfig:
    sections = {"limits", "ap", "tls", "server"}
    top_known = {f.name for f in fields(NodeConfig)} - sections - {"members"}
    for key in data:
        if key not in top_known | sections | {"members", "cluster"}:
            raise ConfigError(key, "unknown setting")
    flat = dict(data)
    cluster = flat.pop("cluster", {})
    _expect(cluster, dict, "cluster")
    for key, value in cluster.items():
        if key not in top_known:
            raise ConfigError(f"cluster.{key}", "unknown setting")
        flat.setdefault(key, value)
    raw_members = flat.pop("members", None)
    if not isinstance(raw_members, list) or not raw_members:
        raise ConfigError("members", "expected a non-empty list of [[members]] tables")
    members = []
    for i, raw in enumerate(raw_members):
        where = f"members[{i}]"
        _expect(raw, dict, where)
        for key in ("id", "http_port", "peer_port"):
            if key not in raw:
                raise ConfigError(f"{where}.{key}", "missing")
        members.append(
            Member(
                id=_expect(raw["id"], str, f"{where}.id"),
                host=_expect(raw.get("host", "127.0.0.1"), str, f"{where}.host"),
                http_port=_expect(raw["http_port"], int, f"{where}.http_port"),
                peer_port=_expect(raw["peer_port"], int, f"{where}.peer_port"),
                machine=_expect(raw.get("machine", ""), str, f"{where}.machine"),
            )
        )
    limits = _section(flat, Limits, "limits")
    ap = _section(flat, APSettings, "ap")
    tls = _section(flat, TLSSettings, "tls")
    server = _section(flat, ServerSettings, "server")
    for name in sections:
        flat.pop(name, None)
    for key in ("node_id", "secret"):
        if key not in flat:
            raise ConfigError(key, "missing")
    scalar_kinds: dict[str, type | tuple[type, ...]] = {
        "node_id": str,
        "secret": str,
        "replicas": int,
        "r": int,
        "w": int,
        "vnodes": int,
        "conflict_mode": str,
        "consistency": str,
        "sloppy": bool,
        "storage": str,
        "data_dir": str,
        "fsync": str,
        "batch_window_ms": (int, float),
        "bind": str,
        "initial_cluster_state": str,
    }
    for key, value in flat.items():
        _expect(value, scalar_kinds[key], key)
    return validate(NodeConfig(members=tuple(members), limits=limits, ap=ap, tls=tls, server=server, **flat))


def validate(cfg: NodeConfig) -> NodeConfig:
    ids = [m.id for m in cfg.members]
    if len(set(ids)) != len(ids):
        raise ConfigError("members", f"duplicate member ids in {ids}")
    for i, m in enumerate(cfg.members):
        if not m.id or any(c in m.id for c in " /?#%!~"):
            raise ConfigError(f"members[{i}].id", f"{m.id!r} must be non-empty without spaces or / ? # % ! ~")
        if len(m.id.encode("utf-8")) > MAX_MEMBER_ID_BYTES:
            raise ConfigError(f"members[{i}].id", f"must be at most {MAX_MEMBER_ID_BYTES} bytes")
        if len(m.machine.encode("utf-8")) > MAX_MEMBER_ID_BYTES or not m.machine.isprintable():
            raise ConfigError(f"members[{i}].machine", f"must be printable, at most {MAX_MEMBER_ID_BYTES} bytes")
        for port_name in ("http_port", "peer_port"):
            port = getattr(m, port_name)
            if not 1 <= port <= 65535:
                raise ConfigError(f"members[{i}].{port_name}", f"{port} is not a TCP port")
    if cfg.node_id not in ids:
        raise ConfigError("node_id", f"{cfg.node_id!r} is not one of the members {ids}")
    if not 1 <= cfg.replicas <= len(ids):
        raise ConfigError("replicas", f"N={cfg.replicas} must be between 1 and the member count {len(ids)}")
    for name in ("r", "w"):
        if not 1 <= getattr(cfg, name) <= cfg.replicas:
            raise ConfigError(name, f"{getattr(cfg, name)} must be between 1 and N={cfg.replicas}")
    if cfg.vnodes < 1 or cfg.vnodes > 4096:
        raise ConfigError("vnodes", "must be between 1 and 4096")
    if cfg.conflict_mode not in CONFLICT_MODES:
        raise ConfigError("conflict_mode", f"must be one of {CONFLICT_MODES}")
    if cfg.consistency not in CONSISTENCY_LEVELS:
        raise ConfigError("consistency", f"must be one of {CONSISTENCY_LEVELS}")
    if cfg.storage not in ENGINES:
        raise ConfigError("storage", f"must be one of {ENGINES}")
    if cfg.fsync not in FSYNC_POLICIES:
        raise ConfigError("fsync", f"must be one of {FSYNC_POLICIES}")
    if cfg.initial_cluster_state not in INITIAL_CLUSTER_STATES:
        raise ConfigError("initial_cluster_state", f"must be one of {INITIAL_CLUSTER_STATES}")
    if len(cfg.secret) < 8:
        raise ConfigError("secret", "must be at least 8 characters")
    if len(cfg.secret.encode("utf-8")) > MAX_SECRET_BYTES:
        # The secret travels in the peer hello, which is read before authentication and so is small.
        raise ConfigError("secret", f"must be at most {MAX_SECRET_BYTES} bytes")
    if cfg.server.front_end not in FRONT_ENDS:
        raise ConfigError("server.front_end", f"must be one of {FRONT_ENDS}")
    if cfg.ap.read_repair not in READ_REPAIR_MODES:
        raise ConfigError("ap.read_repair", f"must be one of {READ_REPAIR_MODES}")
    try:
        check_grace_covers_hint_window(int(cfg.ap.tombstone_grace_s * 1e9), int(cfg.ap.hint_max_age_s * 1e9))
    except UnsafeGracePeriod:
        raise ConfigError(
            "ap.tombstone_grace_s",
            f"{cfg.ap.tombstone_grace_s} s is shorter than the hint window ap.hint_max_age_s = "
            f"{cfg.ap.hint_max_age_s} s: a hint delivered after a reap could resurrect a delete",
        ) from None
    for f in fields(Limits):
        if getattr(cfg.limits, f.name) <= 0:
            raise ConfigError(f"limits.{f.name}", "must be positive")
    for f in fields(APSettings):
        value = getattr(cfg.ap, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"ap.{f.name}", "must be positive")
    if cfg.limits.max_key_bytes > 1024:
        raise ConfigError("limits.max_key_bytes", "keys are limited to 1 KiB")
    tls_paths = ("cert_file", "key_file", "ca_file")
    if any(getattr(cfg.tls, name) for name in tls_paths):
        for name in tls_paths:
            if not getattr(cfg.tls, name):
                raise ConfigError(f"tls.{name}", "TLS needs cert_file, key_file and ca_file together")
        if not (cfg.tls.http or cfg.tls.peer):
            raise ConfigError("tls", "http and peer are both false: remove cert_file to run without TLS")
    return cfg


def load(path: str | Path) -> NodeConfig:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("<file>", f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from None
    return from_dict(data)


def to_toml(cfg: NodeConfig) -> str:
    """Render a config back to TOML (used by ``kvstore cluster up`` to write node files)."""

    def lit(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = [f"node_id = {lit(cfg.node_id)}", f"secret = {lit(cfg.secret)}"]
    for name in (
        "replicas",
        "r",
        "w",
        "vnodes",
        "conflict_mode",
        "consistency",
        "sloppy",
        "storage",
        "data_dir",
        "fsync",
        "batch_window_ms",
        "bind",
        "initial_cluster_state",
    ):
        lines.append(f"{name} = {lit(getattr(cfg, name))}")
    sections: list[tuple[str, Any]] = [("limits", cfg.limits), ("ap", cfg.ap), ("server", cfg.server)]
    if cfg.tls != TLSSettings():
        sections.append(("tls", cfg.tls))
    for section, obj in sections:
        lines.append(f"\n[{section}]")
        lines += [f"{f.name} = {lit(getattr(obj, f.name))}" for f in fields(obj)]
    for m in cfg.members:
        lines.append("\n[[members]]")
        lines += [
            f"id = {lit(m.id)}",
            f"host = {lit(m.host)}",
            f"http_port = {m.http_port}",
            f"peer_port = {m.peer_port}",
        ]
        if m.machine:
            lines.append(f"machine = {lit(m.machine)}")
    return "\n".join(lines) + "\n"
