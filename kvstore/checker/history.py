"""Reading histories: our JSON Lines, Jepsen EDN, and Jepsen log lines, into one list of ops.

Theory of operation
-------------------
A history is a sequence of *events* (invoke / ok / fail / info), in the order an observer saw
them.  We turn it into *operations*: an invoke paired with its completion, found as in Jepsen by
process (a process does one op at a time, so the first completion by the same process after an
invoke completes it).  An invoke with no completion by the end of the history is an ``info``:
its effect is unknown.  Events carry their *position* in the file; positions, not clock times,
define real-time order (the file order *is* the observed order; clocks are only used for
latency and drawing).  Nemesis events (process ``nemesis``) are kept aside, in order.

Formats, detected from the first meaningful line or forced by the caller:

* ``jsonl``: docs/history-format.md (one JSON object per line).
* ``edn``: Jepsen histories: a vector, a list or a bare sequence of op maps, read with the
  ``edn_format`` reader (keywords become strings, ``nil`` None, vectors tuples).  Ops without
  ``:key`` are one register, unless every client value is a Jepsen ``independent`` tuple
  ``[k v]`` (writes with a 2-vector, cas with ``[k [old new]]``): then they are split by ``k``.
* ``jepsen-log``: lines such as ``INFO  jepsen.util - 3 :invoke :cas [1 2]`` (tabs or spaces),
  as in the Knossos/Porcupine etcd corpus.  The value column is EDN, read by the same reader;
  lines that are not op lines (other loggers) are skipped.  For ``fail``/``info`` completions
  the value column holds the reason (``:timed-out``), not a value.

Values are *frozen* (lists become tuples, maps frozensets of items, sets frozensets) so that
models can keep them in hashable states.  Malformed input raises ``HistoryFormatError`` with the
line number; nothing here guesses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import edn_format

FORMATS = ("jsonl", "edn", "jepsen-log")
CLIENT_TYPES = ("invoke", "ok", "fail", "info")
NEMESIS = "nemesis"
INF = float("inf")


class HistoryFormatError(ValueError):
    """The history cannot be read; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None, path: str | None = None) -> None:
        self.message = message
        self.line = line
        self.path = path
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + message)


@dataclass(slots=True)
class Event:
    """One line of a history, normalised (values frozen, keywords as strings)."""

    position: int  # 0-based order in the history: the real-time order
    line: int  # 1-based source line (or the position + 1 when built from dicts)
    process: Hashable
    type: str
    f: str
    key: Hashable = None
    value: Any = None
    time: int | None = None
    node: str | None = None
    siblings: tuple[Any, ...] | None = None
    error: str | None = None
    mode: str | None = None


@dataclass(slots=True)
class Op:
    """An invoke with its completion.  ``complete`` is None when the history ended first."""

    id: int
    process: Hashable
    f: str
    key: Hashable
    value: Any  # the argument: write value, (expected, new) for cas, None for reads
    type: str  # ok | fail | info (no completion counts as info)
    result: Any  # what an ok read returned (None when absent or when siblings were returned)
    siblings: tuple[Any, ...] | None
    invoke: int  # position of the invoke event
    complete: int | None  # position of the completion event, None if none
    invoke_time: int | None
    complete_time: int | None
    node: str | None = None
    error: str | None = None
    line: int = 0

    @property
    def end(self) -> float:
        """Position after which the op certainly no longer takes effect (inf for info)."""
        if self.type == "info" or self.complete is None:
            return INF
        return self.complete

    def describe(self) -> str:
        """Human-readable summary, e.g. ``write 3``, ``read -> 3``, ``cas 1->2 (fail)``."""
        if self.f in ("read", "get"):
            if self.type != "ok":
                return f"{self.f} ({self.type})"
            if self.siblings is not None:
                shown = ", ".join(_show(v) for v in self.siblings)
                return f"{self.f} -> siblings {{{shown}}}"
            return f"{self.f} -> {_show(self.result)}"
        if self.f == "cas" and isinstance(self.value, tuple) and len(self.value) == 2:
            text = f"cas {_show(self.value[0])}->{_show(self.value[1])}"
        elif self.f == "delete":
            text = "delete"
        else:
            text = f"{self.f} {_show(self.value)}"
        return text if self.type == "ok" else f"{text} ({self.type})"


@dataclass(slots=True)
class NemesisEvent:
    position: int
    line: int
    f: str
    value: Any
    time: int | None


@dataclass
class History:
    ops: list[Op]
    nemesis: list[NemesisEvent] = field(default_factory=list)
    format: str = "jsonl"
    length: int = 0  # number of events (positions are 0 .. length-1)
    source: str | None = None

    @property
    def has_times(self) -> bool:
        return bool(self.ops) and all(op.invoke_time is not None for op in self.ops)

    def keys(self) -> list[Hashable]:
        seen: dict[Hashable, None] = {}
        for op in self.ops:
            seen.setdefault(op.key, None)
        return list(seen)

    def by_key(self) -> dict[Hashable, list[Op]]:
        groups: dict[Hashable, list[Op]] = {}
        for op in self.ops:
            groups.setdefault(op.key, []).append(op)
        return groups


# --- values ---------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + " ".join(_show(v) for v in value) + "]"
    return str(value)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def freeze(value: Any) -> Any:
    """A hashable copy: sequences become tuples, maps frozensets of items, keywords strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, edn_format.Keyword):
        return value.name
    if isinstance(value, edn_format.Symbol):
        return str(value)
    if isinstance(value, Mapping):
        return frozenset((freeze(k), freeze(v)) for k, v in value.items())
    if isinstance(value, (set, frozenset)):
        return frozenset(freeze(v) for v in value)
    if isinstance(value, (list, tuple)) or isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Hashable):
        return value
    raise TypeError(f"unsupported value {value!r}")


def thaw(value: Any) -> Any:
    """The JSON-friendly form of a frozen value (tuples as lists, sets as sorted lists)."""
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if isinstance(value, frozenset):
        items = [thaw(v) for v in value]
        if all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in items):
            return {v[0]: v[1] for v in items}
        return sorted(items, key=repr)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _plain(value: Any) -> Any:
    """EDN data as plain Python (for nemesis values that analyses inspect)."""
    if isinstance(value, edn_format.Keyword):
        return value.name
    if isinstance(value, edn_format.Symbol):
        return str(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- format detection -----------------------------------------------------------------------

_LOG_LINE = re.compile(r"^\s*[A-Z]+\s+\S+\s+-\s+(\S+)\s+(:\S+)\s+(:\S+)(?:\s+(.*?))?\s*$")
_LOG_PREFIX = re.compile(r"^\s*(TRACE|DEBUG|INFO|WARN|WARNING|ERROR|FATAL)\s+[\w.$-]+\s+-\s")


def detect_format(text: str) -> str:
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith('{"') or line.startswith("{ \"") or line == "{":
            return "jsonl"
        if _LOG_LINE.match(line) or _LOG_PREFIX.match(line):
            return "jepsen-log"
        if line[0] in "[({#":
            return "edn"
        if line[0] == "{" or line.startswith(":"):
            return "edn"
        raise HistoryFormatError(
            "cannot tell the history format (expected JSON Lines, EDN op maps or Jepsen log lines); "
            "pass --format",
            line=text[: text.find(raw)].count("\n") + 1,
        )
    return "jsonl"  # empty: any format reads it as no events


# --- raw events per format ------------------------------------------------------------------


def _check_type(kind: Any, line: int) -> str:
    if kind not in CLIENT_TYPES:
        raise HistoryFormatError(f"type must be one of {', '.join(CLIENT_TYPES)}, got {kind!r}", line)
    return str(kind)


def _events_from_dicts(rows: Iterable[tuple[int, Mapping[str, Any]]]) -> list[Event]:
    """Our JSON objects (or already-parsed dicts) to events; ``rows`` are (line, dict)."""
    events: list[Event] = []
    for line, row in rows:
        if not isinstance(row, Mapping):
            raise HistoryFormatError(f"expected an object, got {type(row).__name__}", line)
        for required in ("process", "type", "f"):
            if required not in row:
                raise HistoryFormatError(f"missing field {required!r}", line)
        process = row["process"]
        if isinstance(process, (list, dict, bool)):
            raise HistoryFormatError(f"process must be an int or a string, got {process!r}", line)
        kind = _check_type(row["type"], line)
        f = row["f"]
        if not isinstance(f, str):
            raise HistoryFormatError(f"f must be a string, got {f!r}", line)
        time = row.get("time")
        if time is not None and (not isinstance(time, int | float) or isinstance(time, bool)):
            raise HistoryFormatError(f"time must be a number, got {time!r}", line)
        siblings = row.get("siblings")
        if siblings is not None and not isinstance(siblings, list):
            raise HistoryFormatError(f"siblings must be a list, got {siblings!r}", line)
        is_nemesis = process == NEMESIS
        error = row.get("error")
        events.append(
            Event(
                position=len(events),
                line=line,
                process=process,
                type=kind,
                f=f,
                key=freeze(row.get("key")),
                value=_plain(row.get("value")) if is_nemesis else freeze(row.get("value")),
                time=int(time) if time is not None else None,
                node=row.get("node") if isinstance(row.get("node"), str) else None,
                siblings=tuple(freeze(v) for v in siblings) if siblings is not None else None,
                error=str(error) if error is not None else None,
                mode=row.get("mode") if isinstance(row.get("mode"), str) else None,
            )
        )
    return events


def _parse_jsonl(text: str) -> list[Event]:
    rows: list[tuple[int, Any]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((number, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise HistoryFormatError(f"invalid JSON: {exc.msg} (column {exc.colno})", number) from exc
    return _events_from_dicts(rows)


def _edn_line_of(text: str, exc: Exception) -> int | None:
    """Best effort: the line of an EDN syntax error."""
    token = exc.args[0] if exc.args else None
    lexpos = getattr(token, "lexpos", None)
    if isinstance(lexpos, int):
        return text.count("\n", 0, lexpos) + 1
    match = re.search(r"lexpos (\d+)", str(exc))
    if match:
        return text.count("\n", 0, int(match.group(1))) + 1
    # One form per line is how Jepsen writes histories: find the first line that fails alone.
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip().lstrip("[(").rstrip("])").strip()
        if not line or line.startswith(";"):
            continue
        try:
            edn_format.loads_all(line, write_ply_tables=False)
        except Exception:  # noqa: BLE001 - any failure localises the error
            return number
    return None


def _load_edn(text: str, what: str = "EDN") -> list[Any]:
    try:
        forms = edn_format.loads_all(text, write_ply_tables=False)
    except (edn_format.EDNDecodeError, NotImplementedError, ValueError, TypeError) as exc:
        detail = exc.args[0] if exc.args else exc
        if hasattr(detail, "value") and hasattr(detail, "lexpos"):
            detail = f"unexpected {detail.value!r}"
        raise HistoryFormatError(f"invalid {what}: {detail}", _edn_line_of(text, exc)) from exc
    return list(forms)


def _kw(value: Any) -> Any:
    return value.name if isinstance(value, edn_format.Keyword) else value


def _parse_edn(text: str) -> list[Event]:
    forms = _load_edn(text)
    if len(forms) == 1 and isinstance(forms[0], (list, tuple, edn_format.ImmutableList)):
        forms = list(forms[0])
    # The reader does not report where each form was: Jepsen writes one op per line, so the
    # n-th line that opens a map is the n-th op (exact for that layout; a fallback otherwise).
    map_lines = [i + 1 for i, raw in enumerate(text.splitlines()) if raw.lstrip(" \t[(,").startswith("{")]
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, form in enumerate(forms):
        line = map_lines[n] if len(map_lines) == len(forms) else n + 1
        if not isinstance(form, Mapping):
            raise HistoryFormatError(f"expected an op map, got {_clip(repr(form))}", line)
        row: dict[str, Any] = {}
        for k, v in form.items():
            row[str(_kw(k))] = v
        for name in ("type", "f"):
            if name in row:
                row[name] = _kw(row[name])
        row["process"] = _kw(row.get("process")) if "process" in row else None
        if row["process"] is None:
            raise HistoryFormatError("op map without :process", line)
        if "error" in row and row["error"] is not None:
            row["error"] = _show(freeze(row["error"])) if not isinstance(row["error"], str) else row["error"]
        if "siblings" in row and row["siblings"] is not None:
            row["siblings"] = list(row["siblings"])
        if isinstance(row.get("time"), float):
            row["time"] = int(row["time"])
        rows.append((line, row))
    return _events_from_dicts(rows)


@lru_cache(maxsize=8192)
def _edn_value(text: str) -> Any:
    forms = edn_format.loads_all(text, write_ply_tables=False)
    if len(forms) != 1:
        raise ValueError(f"expected one value, got {len(forms)}")
    return forms[0]


def _parse_jepsen_log(text: str) -> list[Event]:
    events: list[Event] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        match = _LOG_LINE.match(raw)
        if match is None:
            continue  # other log lines of a jepsen.log
        process_text, type_text, f_text, value_text = match.groups()
        kind = type_text[1:]
        if kind not in CLIENT_TYPES:
            continue
        process: Hashable
        if process_text == ":nemesis":
            process = NEMESIS
        else:
            try:
                process = int(process_text)
            except ValueError:
                raise HistoryFormatError(f"bad process {process_text!r}", number) from None
        try:
            value = _edn_value(value_text) if value_text else None
        except Exception as exc:  # noqa: BLE001 - any reader failure is a format error here
            raise HistoryFormatError(f"invalid EDN value {value_text!r}", number) from exc
        error: str | None = None
        if kind in ("fail", "info") and isinstance(value, edn_format.Keyword):
            error, value = value.name, None
        events.append(
            Event(
                position=len(events),
                line=number,
                process=process,
                type=kind,
                f=f_text[1:],
                value=_plain(value) if process == NEMESIS else freeze(value),
                error=error,
            )
        )
    return events


# --- pairing --------------------------------------------------------------------------------


def _split_independent(events: list[Event]) -> None:
    """Jepsen ``independent`` histories carry [k v] tuples instead of a key: split them."""
    client = [e for e in events if e.process != NEMESIS]
    if not client or any(e.key is not None for e in client):
        return
    for e in client:
        if not (isinstance(e.value, tuple) and len(e.value) == 2):
            return
        if e.f == "cas" and not (isinstance(e.value[1], tuple) and len(e.value[1]) == 2):
            return
    for e in client:
        e.key, e.value = e.value


def pair(events: list[Event], fmt: str, source: str | None = None) -> History:
    """Turn events into ops (invoke + first completion by the same process)."""
    _split_independent(events)
    open_ops: dict[Hashable, Op] = {}
    ops: list[Op] = []
    nemesis: list[NemesisEvent] = []
    for e in events:
        if e.process == NEMESIS:
            nemesis.append(NemesisEvent(e.position, e.line, e.f, e.value, e.time))
            continue
        if e.type == "invoke":
            if e.process in open_ops:
                prev = open_ops[e.process]
                raise HistoryFormatError(
                    f"process {e.process!r} invoked {e.f} while its {prev.f} from line {prev.line} "
                    "is still open (a process does one op at a time)",
                    e.line,
                    source,
                )
            op = Op(
                id=len(ops),
                process=e.process,
                f=e.f,
                key=e.key,
                value=e.value,
                type="info",
                result=None,
                siblings=None,
                invoke=e.position,
                complete=None,
                invoke_time=e.time,
                complete_time=None,
                node=e.node,
                line=e.line,
            )
            open_ops[e.process] = op
            ops.append(op)
            continue
        op_or_none = open_ops.pop(e.process, None)
        if op_or_none is None:
            raise HistoryFormatError(
                f"{e.type} {e.f} by process {e.process!r} completes no open invoke", e.line, source
            )
        op = op_or_none
        if e.f != op.f:
            raise HistoryFormatError(
                f"completion f={e.f!r} does not match its invoke f={op.f!r} (line {op.line})", e.line, source
            )
        if e.key is not None and e.key != op.key:
            raise HistoryFormatError(
                f"completion key {e.key!r} does not match its invoke key {op.key!r} (line {op.line})",
                e.line,
                source,
            )
        op.type = e.type
        op.complete = e.position
        op.complete_time = e.time
        op.error = e.error
        if op.node is None:
            op.node = e.node
        if e.type == "ok" and op.f in ("read", "get"):
            op.siblings = e.siblings
            op.result = None if e.siblings is not None else e.value
    return History(ops=ops, nemesis=nemesis, format=fmt, length=len(events), source=source)


# --- entry points ---------------------------------------------------------------------------


def parse_text(text: str, fmt: str | None = None, source: str | None = None) -> History:
    fmt = fmt or "auto"
    if fmt == "auto":
        try:
            fmt = detect_format(text)
        except HistoryFormatError as exc:
            raise HistoryFormatError(exc.message, exc.line, source) from None
    parsers = {"jsonl": _parse_jsonl, "edn": _parse_edn, "jepsen-log": _parse_jepsen_log}
    if fmt not in parsers:
        raise HistoryFormatError(f"unknown format {fmt!r} (known: auto, {', '.join(FORMATS)})", None, source)
    try:
        events = parsers[fmt](text)
    except HistoryFormatError as exc:
        raise HistoryFormatError(exc.message, exc.line, source) from exc.__cause__
    return pair(events, fmt, source)


def load(path: str | Path, fmt: str | None = None) -> History:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HistoryFormatError(f"not UTF-8 text: {exc.reason}", None, str(p)) from exc
    return parse_text(text, fmt, str(p))


def from_dicts(rows: Sequence[Mapping[str, Any]]) -> History:
    """A history given as op dicts in our format (as the chaos harness keeps them in memory)."""
    return pair(_events_from_dicts((i + 1, row) for i, row in enumerate(rows)), "jsonl")
