"""The package layout's rules (docs/architecture.md), pinned by reading every module's imports.

Layers, bottom up: ``protocol`` (pure rules) <- ``storage``/``transport`` (the I/O seams) <- ``runtime``
(async drivers) <- ``server`` (HTTP) <- tooling (``harness``, ``explore``, ``ui``, ``sim``, ``cli``).
``contract``, ``errors``, ``clock``, ``config``, ``tls`` and ``ratelog`` are shared leaves; ``client`` speaks
only the contract.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "kvstore"

# What the pure layer may never import: time, the OS, global randomness, the event loop.
IMPURE = {"asyncio", "time", "os", "random", "socket", "threading", "subprocess", "aiohttp", "uvloop", "sqlite3"}
# Which kvstore modules each layer may import (by prefix, besides its own package).  Anything else is forbidden.
SHARED = ("kvstore.contract", "kvstore.errors")  # the client contract and the node's error family: pure leaves
ALLOWED: dict[str, tuple[str, ...]] = {
    # The pure cores speak the Transport seam's message type (a plain dict), nothing else of it.
    "protocol": (*SHARED, "kvstore.transport.base"),
    "storage": (*SHARED, "kvstore.protocol"),
    "transport": (*SHARED, "kvstore.protocol", "kvstore.clock", "kvstore.config", "kvstore.tls", "kvstore.ratelog",
                  "kvstore.client.http_session"),  # the one no-retry aiohttp session
    "runtime": (*SHARED, "kvstore.protocol", "kvstore.clock", "kvstore.config", "kvstore.storage",
                "kvstore.transport", "kvstore.ratelog"),
    "client": ("kvstore.contract", "kvstore.__version__"),
    "checker": ("kvstore.contract", "kvstore.protocol"),
}


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Absolute imports at run time (names under ``if TYPE_CHECKING:`` are only for the type checker)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((f"{node.module}.{alias.name}" if node.module == "kvstore" else node.module, node.lineno)
                         for alias in node.names)
    return found


def modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_pure_layer_imports_no_clock_os_randomness_or_event_loop() -> None:
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in modules(PACKAGE / "protocol")
        for name, line in imports_of(path)
        if name.split(".")[0] in IMPURE
    ]
    assert modules(PACKAGE / "protocol"), "kvstore/protocol/ has no modules"
    assert offenders == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert (PACKAGE / layer).is_dir(), f"kvstore/{layer}/ is missing"
    own = f"kvstore.{layer}"
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in modules(PACKAGE / layer)
        for name, line in imports_of(path)
        if name.startswith("kvstore") and not name.startswith(own)
        and not any(name == p or name.startswith(p + ".") for p in ALLOWED[layer])
    ]
    assert offenders == []


def test_the_installed_package_imports_nothing_from_the_checkout() -> None:
    """chaos/ and benchmarks/ are not installed: the kvstore package must work without them."""
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in modules(PACKAGE)
        for name, line in imports_of(path)
        if name.split(".")[0] in {"chaos", "benchmarks"}
    ]
    assert offenders == []


def test_pyproject_installs_only_the_kvstore_package() -> None:
    import tomllib

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["kvstore*"]
    assert "benchmarks" not in config["tool"]["setuptools"].get("package-data", {})


def test_every_module_opens_with_a_docstring_and_is_placed_in_the_architecture_doc() -> None:
    architecture = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing_doc, unplaced = [], []
    for path in modules(PACKAGE):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None:
            missing_doc.append(relative)
        if path.name != "__init__.py" and relative not in architecture:
            unplaced.append(relative)
    assert missing_doc == []
    assert unplaced == [], "docs/architecture.md must name every module's place (its file tree)"


def test_the_scenario_scripts_are_thin_and_use_the_installed_harness() -> None:
    scripts = sorted((REPO_ROOT / "chaos").glob("*.py"))
    assert scripts, "chaos/ holds the runnable scenario scripts"
    for script in scripts:
        names = [name for name, _ in imports_of(script)]
        assert any(name.startswith("kvstore.harness") for name in names), script.name
        assert not any(name.startswith("chaos") for name in names), script.name
