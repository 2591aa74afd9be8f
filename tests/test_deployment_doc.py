"""docs/deployment.md against the code: the configuration reference names every field of
kvstore/config.py and no other, with the real defaults and types; the compose cluster's files agree
with each other and load as configs; the systemd unit verifies (issue 14, part 3).

The field lists come from the dataclasses themselves (``dataclasses.fields``), and the defaults
both from the dataclasses and from what the loader fills in for a minimal file, so a field added
to config.py without a line in the reference fails here.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore import config
from tests.deploy_doc import ReferenceRow, read_doc, reference_rows

ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = ROOT / "deploy" / "docker"
UNIT = ROOT / "deploy" / "systemd" / "kvstore.service"

SECTIONS: dict[str, tuple[str, type]] = {
    "": ("### Top-level settings", config.NodeConfig),
    "members": ("### `[[members]]`", config.Member),
    "limits": ("### `[limits]`", config.Limits),
    "ap": ("### `[ap]`", config.APSettings),
    "tls": ("### `[tls]`", config.TLSSettings),
    "server": ("### `[server]`", config.ServerSettings),
}
NESTED = {"members", "limits", "ap", "tls", "server"}  # NodeConfig fields that are tables of their own
TYPE_NAMES: dict[str, type] = {"string": str, "integer": int, "float": float, "boolean": bool}
MINIMAL: dict[str, Any] = {
    "node_id": "n1",
    "secret": "at-least-8-chars",
    # Three members: the default N=3 needs them.
    "members": [{"id": f"n{i}", "http_port": 7000 + i, "peer_port": 7100 + i} for i in (1, 2, 3)],
}


def documented(section: str) -> dict[str, ReferenceRow]:
    rows = reference_rows(read_doc(), SECTIONS[section][0])
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), f"a setting documented twice in [{section}]: {names}"
    return {r.name: r for r in rows}


def code_fields(section: str) -> dict[str, dataclasses.Field[Any]]:
    cls = SECTIONS[section][1]
    return {f.name: f for f in dataclasses.fields(cls) if not (section == "" and f.name in NESTED)}


def parse_default(row: ReferenceRow) -> Any:
    """A documented default as TOML reads it (`"sqlite"` is a string, `256` an integer)."""
    assert row.default.startswith("`") and row.default.endswith("`"), f"{row.name}: default {row.default!r}"
    return tomllib.loads(f"value = {row.default.strip('`')}")["value"]


def loaded_minimal() -> config.NodeConfig:
    return config.from_dict(MINIMAL)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_reference_names_every_field_and_no_other(section: str) -> None:
    in_doc, in_code = set(documented(section)), set(code_fields(section))
    assert in_code - in_doc == set(), f"fields of config.py missing from the reference [{section}]"
    assert in_doc - in_code == set(), f"the reference [{section}] names settings config.py does not have"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_documented_types_and_defaults_are_the_real_ones(section: str) -> None:
    rows, fields = documented(section), code_fields(section)
    cfg = loaded_minimal()
    for name, row in rows.items():
        f = fields[name]
        assert row.type in TYPE_NAMES, f"{name}: unknown type {row.type!r}"
        loaded_value = getattr({"": cfg, "members": cfg.members[0], "limits": cfg.limits, "ap": cfg.ap,
                                "tls": cfg.tls, "server": cfg.server}[section], name)
        if row.default == "required":
            # Required: no default in the dataclass (Member has none at all: check the loader), and
            # a file without it is refused naming the field.
            if section != "members":
                assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, name
            data = {**MINIMAL, "members": [dict(m) for m in MINIMAL["members"]]}
            del (data["members"][0] if section == "members" else data)[name]
            with pytest.raises(config.ConfigError) as refused:
                config.from_dict(data)
            assert refused.value.field.endswith(name)
            assert isinstance(loaded_value, TYPE_NAMES[row.type]), name
            continue
        default = parse_default(row)
        assert type(default) is TYPE_NAMES[row.type], f"{name}: documented {row.type}, default written {default!r}"
        if section != "members":
            assert f.default == default, f"[{section}] {name}: documented {default!r}, config.py has {f.default!r}"
            assert type(f.default) is type(default), f"[{section}] {name}: {f.default!r} vs {default!r}"
        # What a file that leaves it out actually gets.
        assert loaded_value == default and type(loaded_value) is type(default), (section, name, loaded_value)


def test_the_cluster_table_and_bind_versus_host_are_explained() -> None:
    doc = read_doc()
    assert "**`bind` versus `host`.**" in doc
    # The [cluster] alias the page describes is what the loader does: a top-level value wins.
    cfg = config.from_dict({**MINIMAL, "replicas": 1, "cluster": {"replicas": 1, "w": 1, "r": 1}})
    assert (cfg.replicas, cfg.w, cfg.r) == (1, 1, 1)
    assert "a top-level value wins" in doc


# --- compose ---------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def dockerfile_lines() -> list[str]:
    return (DOCKER_DIR / "Dockerfile").read_text(encoding="utf-8").splitlines()


def test_compose_runs_five_nodes_whose_files_agree() -> None:
    doc = compose()
    services: dict[str, Any] = doc["services"]
    assert sorted(services) == ["n1", "n2", "n3", "n4", "n5"]
    entrypoint = next(line for line in dockerfile_lines() if line.startswith("ENTRYPOINT"))
    config_in_container = re.search(r'"--config", "([^"]+)"', entrypoint)
    assert config_in_container is not None
    expose = next(line for line in dockerfile_lines() if line.startswith("EXPOSE")).split()[1:]
    configs = {}
    published_host_ports = []
    for name, service in services.items():
        mounts = dict(v.rsplit(":", 1)[0].split(":", 1) if v.count(":") == 2 else v.split(":", 1)
                      for v in service["volumes"])
        by_target = {target: source for source, target in mounts.items()}
        source = by_target[config_in_container[1]]
        cfg = config.load(DOCKER_DIR / source)  # each file loads with the node's own loader
        configs[name] = cfg
        assert cfg.node_id == name, f"service {name} mounts the config of {cfg.node_id}"
        assert cfg.bind == "0.0.0.0", "a container must listen on its network interface"
        # Its data dir is the service's own named volume.
        assert by_target[cfg.data_dir] == f"{name}-data" and f"{name}-data" in doc["volumes"]
        # The published port is this node's HTTP port, on the host's loopback only.
        (port,) = service["ports"]
        host_ip, host_port, container_port = port.split(":")
        assert host_ip == "127.0.0.1" and int(container_port) == cfg.me.http_port
        published_host_ports.append(int(host_port))
        assert {str(cfg.me.http_port), str(cfg.me.peer_port)} <= set(expose)
    assert len(set(published_host_ports)) == 5
    first = configs["n1"]
    assert [m.id for m in first.members] == sorted(services)
    for m in first.members:
        assert m.host == m.id, "members reach each other by service name"
    for name, cfg in configs.items():
        # Identical but for node_id: same members, secret, N/R/W, vnodes, everything.
        assert dataclasses.replace(cfg, node_id="n1") == first, f"{name}.toml differs from n1.toml"
    assert first.replicas == 3 and first.initial_cluster_state == "new"


def test_docker_compose_accepts_the_file_when_installed() -> None:
    if shutil.which("docker-compose"):
        cmd = ["docker-compose", "-f", "compose.yaml", "config", "--quiet"]
    elif shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                   timeout=30).returncode == 0:
        cmd = ["docker", "compose", "-f", "compose.yaml", "config", "--quiet"]
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    result = subprocess.run(cmd, cwd=DOCKER_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/opt/kvstore/bin/kvstore node --config /etc/kvstore/node.toml" in text
    # /opt/kvstore does not exist here: point ExecStart at this checkout's kvstore to verify the rest.
    kvstore_bin = Path(sys.executable).parent / "kvstore"
    assert kvstore_bin.exists()
    unit = tmp_path / "kvstore.service"
    unit.write_text(text.replace("/opt/kvstore/bin/kvstore", str(kvstore_bin)), encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kvstore.service" not in result.stderr, result.stderr  # no warning about the unit itself
