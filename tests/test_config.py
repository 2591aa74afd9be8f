"""Config: TOML loading, validation that names the bad field, and the round trip through to_toml."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kvstore.config import ConfigError, from_dict, load, to_toml

BASE: dict[str, Any] = {
    "node_id": "n1",
    "secret": "s3cret-s3cret",
    "cluster": {"replicas": 3, "r": 2, "w": 2},
    "members": [
        {"id": f"n{i}", "host": "127.0.0.1", "http_port": 7000 + i, "peer_port": 7100 + i} for i in range(1, 6)
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    target: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    if value is DELETE:
        del target[parts[-1]]
    else:
        target[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    return data


DELETE = object()


def test_valid_config_and_defaults() -> None:
    cfg = from_dict(copy.deepcopy(BASE))
    assert cfg.node_id == "n1" and cfg.member_ids == ["n1", "n2", "n3", "n4", "n5"]
    assert (cfg.replicas, cfg.r, cfg.w, cfg.vnodes) == (3, 2, 2, 256)
    assert (cfg.storage, cfg.fsync, cfg.conflict_mode, cfg.consistency, cfg.bind) == (
        "sqlite", "batch", "siblings", "eventual", "127.0.0.1")
    assert cfg.me.url == "http://127.0.0.1:7001"
    assert cfg.limits.max_value_bytes == 1024 * 1024 and cfg.limits.max_key_bytes == 1024
    assert cfg.ap.tombstone_grace_s >= cfg.ap.hint_max_age_s
    # Connection limits (docs/architecture.md, "Limits")
    assert (cfg.limits.max_http_connections, cfg.limits.http_header_timeout_ms, cfg.limits.http_idle_timeout_ms) == (
        512, 10_000, 75_000)
    assert (cfg.limits.peer_hello_timeout_ms, cfg.limits.max_unauthenticated_peer_connections) == (2000, 64)


def test_the_largest_valid_hello_fits_the_pre_authentication_cap() -> None:
    from kvstore.config import MAX_MEMBER_ID_BYTES, MAX_SECRET_BYTES
    from kvstore.transport.stream import MAX_HELLO_BYTES, _pack

    frame = _pack({"node": "\u00e9" * (MAX_MEMBER_ID_BYTES // 2), "secret": "\u00e9" * (MAX_SECRET_BYTES // 2)})
    assert len(frame) - 4 <= MAX_HELLO_BYTES


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("node_id", "n9", "node_id"),
        ("node_id", DELETE, "node_id"),
        ("secret", "short", "secret"),
        ("secret", DELETE, "secret"),
        ("cluster.replicas", 6, "replicas"),
        ("cluster.replicas", 0, "replicas"),
        ("cluster.r", 4, "r"),
        ("cluster.w", 0, "w"),
        ("cluster.r", "two", "r"),
        ("cluster.vnodes", 0, "vnodes"),
        ("cluster.conflict_mode", "newest", "conflict_mode"),
        ("cluster.consistency", "strong", "consistency"),
        ("cluster.storage", "rocksdb", "storage"),
        ("cluster.fsync", "sometimes", "fsync"),
        ("cluster.sloppy", "yes", "sloppy"),
        ("cluster.colour", "blue", "cluster.colour"),
        ("bogus", 1, "bogus"),
        ("members", [], "members"),
        ("members.1.id", "n1", "members"),
        ("members.0.id", "bad id", "members[0].id"),
        ("members.0.http_port", 70000, "members[0].http_port"),
        ("members.2.peer_port", DELETE, "members[2].peer_port"),
        ("members.0.http_port", "7001", "members[0].http_port"),
        ("limits.max_value_bytes", 0, "limits.max_value_bytes"),
        ("limits.max_key_bytes", 4096, "limits.max_key_bytes"),
        ("limits.request_timeout_ms", True, "limits.request_timeout_ms"),
        ("limits.nonsense", 1, "limits.nonsense"),
        ("limits.max_http_connections", 0, "limits.max_http_connections"),
        ("limits.http_header_timeout_ms", -1, "limits.http_header_timeout_ms"),
        ("limits.http_idle_timeout_ms", 1.5, "limits.http_idle_timeout_ms"),
        ("limits.peer_hello_timeout_ms", 0, "limits.peer_hello_timeout_ms"),
        ("limits.max_unauthenticated_peer_connections", 0, "limits.max_unauthenticated_peer_connections"),
        ("secret", "s" * 1025, "secret"),
        ("members.3.id", "n" * 129, "members[3].id"),
        ("members.1.machine", 7, "members[1].machine"),
        ("members.1.machine", "m" * 129, "members[1].machine"),
        ("members.1.machine", "new\nline", "members[1].machine"),
        ("ap.read_repair", "sometimes", "ap.read_repair"),
        ("ap.hint_max_per_target", 0, "ap.hint_max_per_target"),
        ("ap.tombstone_grace_s", 60.0, "ap.tombstone_grace_s"),
        ("ap.phi_threshold", "high", "ap.phi_threshold"),
        ("server.front_end", "nginx", "server.front_end"),
        ("server.front_end", 1, "server.front_end"),
        ("server.workers", 2, "server.workers"),
    ],
)
def test_bad_fields_are_named(path: str, value: Any, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(with_change(path, value))
    assert exc.value.field == field, str(exc.value)
    assert field in str(exc.value)


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "missing.toml")
    assert exc.value.field == "<file>"
    bad = tmp_path / "bad.toml"
    bad.write_text("node_id = \n")
    with pytest.raises(ConfigError) as exc:
        load(bad)
    assert "not valid TOML" in str(exc.value)


@pytest.mark.parametrize("front_end", ["aiohttp", "httptools"])
def test_the_front_end_is_chosen_in_the_server_table(front_end: str) -> None:
    assert from_dict(with_change("server.front_end", front_end)).server.front_end == front_end


def test_to_toml_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(with_change("server.front_end", "aiohttp"))
    assert cfg.server.front_end == "aiohttp" != from_dict(copy.deepcopy(BASE)).server.front_end
    path = tmp_path / "node.toml"
    path.write_text(to_toml(cfg))
    assert load(path) == cfg
    cfg = from_dict(with_change("cluster.conflict_mode", "lww"))
    path.write_text(to_toml(cfg))
    assert load(path) == cfg
    assert cfg.with_node("n3").me.http_port == 7003


def test_machines_load_default_to_the_member_and_survive_to_toml(tmp_path: Path) -> None:
    cfg = from_dict(copy.deepcopy(BASE))
    assert [m.machine for m in cfg.members] == [""] * len(cfg.members)
    assert [m.machine_name for m in cfg.members] == [m.id for m in cfg.members]
    assert "machine" not in to_toml(cfg)  # a file naming no machines is written as before
    shared = from_dict(with_change("members.1.machine", "box-a"))
    assert shared.members[1].machine_name == "box-a"
    path = tmp_path / "node.toml"
    path.write_text(to_toml(shared))
    assert load(path) == shared
