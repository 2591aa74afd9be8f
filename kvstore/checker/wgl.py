"""Linearizability of one key: the Wing-Gong search with Lowe's memoisation (WGL).

Theory of operation
-------------------
Wing & Gong (1993) search for a linearization by repeatedly picking a *minimal* operation (one
invoked before every still-pending completion), applying it to the model, and backtracking when
a completion is reached whose operation has not taken effect.  Lowe (2017) made it practical by
memoising the pair (set of linearized ops, model state): two paths that reach the same pair
have the same future, so the second is cut.  This is the algorithm of Porcupine (Athalye) and
of Knossos's ``wgl`` checker, and we follow Porcupine's structure:

* the history is a doubly linked list of call and return entries in real-time order, kept as
  two int arrays; linearizing an op *lifts* its call and return out of the list, backtracking
  puts them back (Knuth's dancing links), so no list is ever copied;
* the set of linearized ops is a Python int used as a bitset; the cache is a set of
  ``(bitset, state)`` tuples;
* ``info`` ops have their return at the end of time and are *optional*: the search succeeds as
  soon as every required op is linearized, so an info op may take effect anywhere after its
  invoke or never (Jepsen's semantics).

Guarantees: ``valid`` is returned only with a witness linearization in hand, ``invalid`` only
after the whole space was exhausted (the cache only removes revisits of an explored pair), and
when the budget (a deadline callable, a cap on cache entries) runs out the answer is
``unknown`` -- never a guess.  For an invalid history we keep the deepest point the search
reached: the longest partial linearization, the op whose completion could not be passed, and
the ops that were pending there (Knossos reports the same "final paths").

The search is pure and deterministic: the only clock is the injected ``deadline`` callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.checker.history import Op
from kvstore.checker.models import BAD, Model

Deadline = Callable[[], bool]  # True once the time budget is spent

DEFAULT_MAX_STATES = 2_000_000  # cache entries per key: roughly 150 bytes each
_BUDGET_CHECK_EVERY = 4096


@dataclass
class Counterexample:
    """Where the search got stuck deepest (op ids refer to ``History.ops``)."""

    prefix: list[int]  # the longest partial linearization, in linearization order
    states: list[Any]  # the model state after each op of ``prefix``
    stuck: int  # the op whose completion was reached before it could take effect
    pending: list[int]  # ops invoked before that completion, not in the prefix (incl. ``stuck``)
    state: Any  # the model state at that point


@dataclass
class KeyResult:
    key: Any
    verdict: str  # "valid" | "invalid" | "unknown"
    ops: int  # ops that took part in the search (after dropping those that constrain nothing)
    explored: int  # cache entries created
    pruned: int = 0  # optional ops left out because nothing could observe them
    reason: str | None = None  # why unknown
    linearization: list[int] | None = None  # a witness order when valid
    counterexample: Counterexample | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _never() -> bool:
    return False


def check_ops(
    key: Any,
    ops: Sequence[Op],
    model: Model,
    deadline: Deadline | None = None,
    max_states: int = DEFAULT_MAX_STATES,
    want_witness: bool = False,
) -> KeyResult:
    """Is this one key's sub-history linearizable under ``model``?"""
    deadline = deadline or _never
    compiled, pruned = model.compile_all(ops)
    n = len(compiled)
    required_total = sum(1 for _, step in compiled if step.required)
    if required_total == 0:
        return KeyResult(key, "valid", n, 0, pruned, linearization=[] if want_witness else None)

    # Entries: calls are 0..n-1, returns n..2n-1, the head sentinel is 2n.  Optional ops return
    # after every real event; their relative order does not matter.
    inf_pos = 1 << 62
    order = sorted(
        [(op.invoke, i) for i, (op, _) in enumerate(compiled)]
        + [
            ((op.complete if step.required and op.complete is not None else inf_pos), n + i)
            for i, (op, step) in enumerate(compiled)
        ]
    )
    head, tail = 2 * n, 2 * n + 1  # sentinels: never lifted, so no end-of-list tests
    nxt = [-1] * (2 * n + 2)
    prv = [-1] * (2 * n + 2)
    last = head
    for _, entry in order:
        nxt[last] = entry
        prv[entry] = last
        last = entry
    nxt[last] = tail
    prv[tail] = last

    steps = [step.fn for _, step in compiled]
    required = [step.required for _, step in compiled]
    bits = [1 << i for i in range(n)]

    state: Any = model.initial
    linearized = 0
    left = required_total
    cache: set[tuple[int, Any]] = set()
    cache_add = cache.add
    size = 0
    stack: list[tuple[int, Any]] = []  # (call entry, state before it)
    push = stack.append
    pop = stack.pop
    best_depth = -1
    best: Counterexample | None = None
    check_mask = _BUDGET_CHECK_EVERY - 1
    bad = BAD

    entry = nxt[head]
    while True:
        if entry < n:  # a call: try to linearize it now
            new_state = steps[entry](state)
            if new_state is not bad:
                new_linearized = linearized | bits[entry]
                cache_add((new_linearized, new_state))  # one hash: membership by size change
                if len(cache) != size:
                    size += 1
                    push((entry, state))
                    state = new_state
                    linearized = new_linearized
                    # lift the call and its return out of the list
                    p = prv[entry]
                    q = nxt[entry]
                    nxt[p] = q
                    prv[q] = p
                    r = entry + n
                    p = prv[r]
                    q = nxt[r]
                    nxt[p] = q
                    prv[q] = p
                    if required[entry]:
                        left -= 1
                        if not left:
                            witness = [compiled[e][0].id for e, _ in stack] if want_witness else None
                            return KeyResult(key, "valid", n, size, pruned, linearization=witness)
                    entry = nxt[head]
                    if not size & check_mask:
                        # pops never outnumber pushes, so checking here bounds all the work
                        if size > max_states:
                            return KeyResult(key, "unknown", n, size, pruned, f"over {max_states} states")
                        if deadline():
                            return KeyResult(key, "unknown", n, size, pruned, "time limit")
                    continue
            entry = nxt[entry]
            continue
        if entry == tail:  # cannot happen: a pending required return precedes the tail
            raise AssertionError("search ran off the end of the history")
        # A return whose op has not taken effect: everything before it was tried.
        if len(stack) > best_depth:
            best_depth = len(stack)
            best = _counterexample(compiled, stack, state, entry - n, nxt, head, n)
        if not stack:
            return KeyResult(key, "invalid", n, size, pruned, counterexample=best)
        entry, state = pop()
        linearized ^= bits[entry]
        if required[entry]:
            left += 1
        # unlift: return first, then call (reverse order of lifting)
        r = entry + n
        nxt[prv[r]] = r
        prv[nxt[r]] = r
        nxt[prv[entry]] = entry
        prv[nxt[entry]] = entry
        entry = nxt[entry]


def _counterexample(
    compiled: Sequence[tuple[Op, Any]],
    stack: Sequence[tuple[int, Any]],
    state: Any,
    stuck: int,
    nxt: Sequence[int],
    head: int,
    n: int,
) -> Counterexample:
    prefix = [compiled[e][0].id for e, _ in stack]
    states = [s for _, s in stack[1:]] + [state] if stack else []
    pending: list[int] = []
    entry = nxt[head]
    while entry < 2 * n and entry != stuck + n:
        if entry < n:
            pending.append(compiled[entry][0].id)
        entry = nxt[entry]
    return Counterexample(prefix, states, compiled[stuck][0].id, pending, state)


def deadline_after(seconds: float | None, clock: Callable[[], float] = time.monotonic) -> Deadline:
    """A deadline callable for ``check_ops`` (the only place a clock is read)."""
    if seconds is None:
        return _never
    end = clock() + seconds

    def expired() -> bool:
        return clock() >= end

    return expired
