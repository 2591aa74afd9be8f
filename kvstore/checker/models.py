"""Sequential specifications the linearizability search checks ops against.

Theory of operation
-------------------
A model is a deterministic state machine over one key.  For the search, every op is *compiled*
once into a step function ``state -> new state`` that returns the ``BAD`` sentinel when the op
cannot take effect in that state; states are small hashable values (the register's value, or a
string for ``kv``), so the search can memoise (linearized set, state) pairs.  Compiling also
decides, per op, Jepsen's semantics (Kingsbury's Knossos; Porcupine's etcd and kv models):

* ``ok``: happened between its invoke and completion: *required*, must be linearized;
* ``fail``: did not happen: dropped (except a failed cas in the ``etcd`` model, below);
* ``info`` (or no completion): may take effect at any point after its invoke, or never:
  *optional*, its return sits at the end of time and the search may leave it out;
* reads that did not return ``ok`` constrain nothing and are dropped.

Models (the initial value is configurable; reading an absent key returns ``None``):

* ``register``: read, write, delete (a write of ``None``, i.e. absent).
* ``cas-register``: adds ``cas [expected new]``; a failed cas did not happen.
* ``etcd``: as the Knossos/Porcupine etcd test: a failed cas *did* happen and observed a value
  different from ``expected`` at its linearization point (so it constrains the search); an
  info cas is unknown; a timed-out read constrains nothing.
* ``kv``: per key ``get``/``put``/``append`` (Porcupine's kv test; initial ``""``);
  ``read``/``write``/``delete`` are accepted as synonyms.

Sibling reads (docs/history-format.md): a read that returned siblings is legal at a
linearization point where the register's value equals at least one of the siblings.

``compile_all`` also drops the optional ops whose written value nobody can observe (see its
docstring for why that is sound), and gives each step a signature so the search can treat
optional ops with the same effect as interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from kvstore.checker.history import History, Op


class _Bad:
    __slots__ = ()

    def __repr__(self) -> str:
        return "BAD"


BAD: Final[Any] = _Bad()
StepFn = Callable[[Any], Any]


class ModelError(ValueError):
    """The history uses an op the chosen model does not have, or the model is unknown."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final[Any] = _Unset()

READS = frozenset({"read", "get"})
WRITES = frozenset({"write", "put"})


@dataclass(frozen=True, slots=True)
class Step:
    fn: StepFn
    required: bool
    produces: Any = UNSET  # the state a (successful) write or cas leaves, whatever came before
    signature: Hashable = None  # equal signatures = the same step function (None: unique)


@dataclass(frozen=True)
class Model:
    """A model by name and initial value (picklable: steps are compiled where they are used)."""

    name: str
    initial: Hashable = None
    cas: bool = False
    failed_cas_observes: bool = False
    append: bool = False

    def supports(self, f: str) -> bool:
        return f in READS or f in WRITES or f == "delete" or (f == "cas" and self.cas) or (
            f == "append" and self.append
        )

    def compile(self, op: Op) -> Step | None:
        """The op's step, or None when it constrains nothing (failed ops, unanswered reads)."""
        f = op.f
        if f in READS:
            if op.type != "ok":
                return None
            if op.siblings is not None:
                return Step(_read_any(frozenset(op.siblings)), True)
            return Step(_read(op.result), True)
        if op.type == "fail":
            if f == "cas" and self.cas and self.failed_cas_observes:
                expected, _ = _cas_args(op)
                return Step(_cas_mismatch(expected), True)
            return None
        required = op.type == "ok"
        if f in WRITES or f == "delete":
            value = None if f == "delete" else op.value
            return Step(_write(value), required, value, _signature("write", value))
        if f == "cas" and self.cas:
            expected, new = _cas_args(op)
            return Step(_cas(expected, new), required, new, _signature("cas", expected, new))
        if f == "append" and self.append:
            return Step(_append(op.value), required, UNSET, _signature("append", op.value))
        raise ModelError(f"model {self.name!r} has no {f!r} operation (op at line {op.line}); {_hint(f)}")


    def compile_all(self, ops: Sequence[Op]) -> tuple[list[tuple[Op, Step]], int]:
        """Steps for the ops that constrain the search, and how many optional ops were pruned.

        An optional (info) write or cas whose resulting value nobody ever observes -- no read
        or sibling returned it, no cas expected it -- can be dropped: in any linearization that
        uses it, the next op to touch the state must be a blind write (anything else would
        observe the value), so removing it leaves a linearization.  This is what keeps the many
        timed-out writes of a partition from multiplying the search by 2^n.  It does not hold
        when some op observes by *difference* (a failed etcd cas) or builds on the state
        (append), so then nothing is pruned.
        """
        compiled: list[tuple[Op, Step]] = []
        for op in ops:
            step = self.compile(op)
            if step is not None:
                compiled.append((op, step))
        observed: set[Any] = set()
        for op, _step in compiled:
            if op.f == "append" or (op.f == "cas" and op.type == "fail"):
                return compiled, 0
            if op.f in READS:
                if op.siblings is not None:
                    observed.update(op.siblings)
                else:
                    observed.add(op.result)
            elif op.f == "cas":
                observed.add(op.value[0])
        kept = [
            (op, step)
            for op, step in compiled
            if step.required or step.produces is UNSET or _observable(step.produces, observed)
        ]
        return kept, len(compiled) - len(kept)


def _signature(*parts: Any) -> Hashable:
    try:
        hash(parts)
    except TypeError:
        return None
    return parts


def _observable(value: Any, observed: set[Any]) -> bool:
    try:
        return value in observed
    except TypeError:  # an unhashable value cannot be proven unobserved
        return True


def _hint(f: str) -> str:
    if f == "cas":
        return "use --model cas-register or etcd"
    if f == "append":
        return "use --model kv"
    return "known ops: read/get, write/put, delete, cas, append"


def _cas_args(op: Op) -> tuple[Any, Any]:
    if not (isinstance(op.value, tuple) and len(op.value) == 2):
        raise ModelError(f"cas needs [expected new], got {op.value!r} (op at line {op.line})")
    return op.value[0], op.value[1]


def _read(value: Any) -> StepFn:
    def step(state: Any) -> Any:
        return state if state == value else BAD

    return step


def _read_any(values: frozenset[Any]) -> StepFn:
    def step(state: Any) -> Any:
        return state if state in values else BAD

    return step


def _write(value: Any) -> StepFn:
    def step(state: Any) -> Any:
        return value

    return step


def _cas(expected: Any, new: Any) -> StepFn:
    def step(state: Any) -> Any:
        return new if state == expected else BAD

    return step


def _cas_mismatch(expected: Any) -> StepFn:
    def step(state: Any) -> Any:
        return BAD if state == expected else state

    return step


def _append(suffix: Any) -> StepFn:
    text = "" if suffix is None else str(suffix)

    def step(state: Any) -> Any:
        return ("" if state is None else str(state)) + text

    return step


# --- registry ---------------------------------------------------------------------------------

MODEL_NAMES = ("register", "cas-register", "etcd", "kv")
ALIASES = {"etcd-cas-register": "etcd", "cas": "cas-register", "kv-append": "kv"}
DESCRIPTIONS = {
    "register": "read/write/delete register (delete = write of absent)",
    "cas-register": "register with compare-and-set; a failed cas did not happen",
    "etcd": "cas register as in the etcd corpus: a failed cas observed a mismatch; timed-out reads are ignored",
    "kv": "per-key get/put/append, initial \"\"",
}


def make_model(name: str, initial: Any = UNSET) -> Model:
    canonical = ALIASES.get(name, name)
    if canonical == "register":
        model = Model("register")
    elif canonical == "cas-register":
        model = Model("cas-register", cas=True)
    elif canonical == "etcd":
        model = Model("etcd", cas=True, failed_cas_observes=True)
    elif canonical == "kv":
        model = Model("kv", initial="", append=True)
    else:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
    if initial is not UNSET:
        model = Model(model.name, initial, model.cas, model.failed_cas_observes, model.append)
    return model


def guess_model(history: History) -> str:
    """The model a history most plausibly wants, when the caller did not say."""
    fs = {op.f for op in history.ops}
    if fs & {"append", "get", "put"}:
        return "kv"
    if history.format == "jepsen-log":
        return "etcd"
    if "cas" in fs:
        return "cas-register"
    return "register"
