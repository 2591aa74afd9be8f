"""Reading docs/deployment.md for the tests that hold it to the code.

Two things are read from the page: the configuration reference tables (one markdown table per
section, ``| `name` | type | default | meaning |``), and the blocks of the "Three hosts by hand"
section marked for the doc-driven test::

    <!-- deploy-test:three-hosts ACTION ARGS... -->
    ```sh
    ...
    ```

Actions: ``run TARGET [stdout=TEXT]`` (TARGET is ``all`` or a host), ``file HOST PATH``,
``start HOST...``, ``stop HOST...``. Several markers may stand before one block; ``stop`` needs
no block of its own.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DEPLOYMENT_MD = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"

_MARKER = re.compile(r"^<!-- deploy-test:(?P<scenario>[\w-]+) (?P<args>.*?) -->\s*$")
_FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
_ROW = re.compile(r"^\|\s*`(?P<name>[^`]+)`\s*\|\s*(?P<type>[^|]+?)\s*\|\s*(?P<default>[^|]+?)\s*\|")


def read_doc() -> str:
    return DEPLOYMENT_MD.read_text(encoding="utf-8")


def section(doc: str, heading: str) -> str:
    """The text under a markdown heading (exact heading line), up to the next heading of its level or higher."""
    lines = doc.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise AssertionError(f"docs/deployment.md has no heading {heading!r}") from None
    level = len(heading) - len(heading.lstrip("#"))
    body = []
    for line in lines[start + 1:]:
        stripped = line.lstrip("#")
        if line.startswith("#") and stripped.startswith(" ") and len(line) - len(stripped) <= level:
            break
        body.append(line)
    return "\n".join(body)


@dataclass(frozen=True)
class ReferenceRow:
    name: str
    type: str  # string | integer | float | boolean
    default: str  # the cell as written: `"sqlite"`, `256`, or required


def reference_rows(doc: str, heading: str) -> list[ReferenceRow]:
    rows = []
    for line in section(doc, heading).splitlines():
        match = _ROW.match(line)
        if match and match["name"] != "setting":
            rows.append(ReferenceRow(match["name"], match["type"], match["default"].strip()))
    return rows


@dataclass
class Step:
    action: str  # run | file | start | stop
    args: list[str]
    code: str = ""
    options: dict[str, str] = field(default_factory=dict)


def scenario_steps(doc: str, scenario: str) -> list[Step]:
    """The marked steps of one scenario, in page order, each with the code block that follows it."""
    lines = doc.splitlines()
    steps: list[Step] = []
    pending: list[Step] = []
    i = 0
    while i < len(lines):
        marker = _MARKER.match(lines[i])
        if marker and marker["scenario"] == scenario:
            words = shlex.split(marker["args"])
            options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            pending.append(Step(words[0], [w for w in words[1:] if "=" not in w], options=options))
            i += 1
            continue
        fence = _FENCE.match(lines[i])
        if fence and fence["lang"]:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if pending:
                code = "\n".join(lines[i + 1:end]) + "\n"
                for step in pending:
                    if step.action != "stop":
                        step.code = code
                steps += pending
                pending = []
            i = end + 1
            continue
        if lines[i].strip() and pending and all(s.action == "stop" for s in pending):
            steps += pending  # a stop marker followed by prose: it needs no block
            pending = []
        i += 1
    assert not pending, f"markers with no block after them: {pending}"
    return steps
