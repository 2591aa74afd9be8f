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
  invoke or never (Jepsen's semantics);
* optional ops with the same effect (same signature: a write of the same value, a cas with
  the same arguments) are interchangeable once invoked -- neither has a return to meet -- so
  the memo records how many of each class are linearized, not which: the k-th one linearized
  sets the class's k-th bit.  (``Model.compile_all`` has already dropped the optional ops
  nobody could observe.)  Both reductions only merge configurations with identical futures;
  tests/test_checker_wgl.py checks the verdicts against brute force;
* the search is an object that stops at its budget and resumes later with a bigger one
  (``core.py`` raises budgets step by step across keys), so no work is done twice.

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
from dataclasses import dataclass
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
    return Search(key, ops, model, want_witness).run(max_states, deadline)


class Search:
    """One key's search, resumable: ``run`` stops at the budget with an ``unknown`` result and a
    later ``run`` with a bigger budget continues where it stopped (nothing is redone)."""

    def __init__(self, key: Any, ops: Sequence[Op], model: Model, want_witness: bool = False) -> None:
        self.key = key
        self.want_witness = want_witness
        compiled, self.pruned = model.compile_all(ops)
        self.compiled = compiled
        n = self.n = len(compiled)
        self.left = sum(1 for _, step in compiled if step.required)
        self.result: KeyResult | None = None
        if self.left == 0:
            self.result = KeyResult(key, "valid", n, 0, self.pruned, linearization=[] if want_witness else None)
            return

        # Entries: calls are 0..n-1, returns n..2n-1, sentinels head 2n and tail 2n+1 (never
        # lifted, so no end-of-list tests).  Optional ops return after every real event.
        inf_pos = 1 << 62
        order = sorted(
            [(op.invoke, i) for i, (op, _) in enumerate(compiled)]
            + [
                ((op.complete if step.required and op.complete is not None else inf_pos), n + i)
                for i, (op, step) in enumerate(compiled)
            ]
        )
        self.head, self.tail = head, tail = 2 * n, 2 * n + 1
        nxt = self.nxt = [-1] * (2 * n + 2)
        prv = self.prv = [-1] * (2 * n + 2)
        last = head
        for _, entry in order:
            nxt[last] = entry
            prv[entry] = last
            last = entry
        nxt[last] = tail
        prv[tail] = last

        self.steps = [step.fn for _, step in compiled]
        self.required = [step.required for _, step in compiled]
        self.bits = bits = [1 << i for i in range(n)]
        # Optional ops with the same signature are interchangeable once invoked (neither has a
        # return to meet), so the memo records how many of each class are linearized, not
        # which: the k-th one linearized takes the class's k-th bit.
        self.op_class = op_class = [-1] * n
        classes: dict[Any, list[int]] = {}
        for i, (_, step) in enumerate(compiled):
            if not step.required and step.signature is not None:
                members = classes.setdefault(step.signature, [])
                op_class[i] = len(classes) - 1 if not members else op_class[members[0]]
                members.append(i)
        self.class_bits = [[bits[i] for i in members] for members in classes.values()]
        self.class_count = [0] * len(self.class_bits)

        self.state: Any = model.initial
        self.linearized = 0
        self.cache: set[tuple[int, Any]] = set()
        self.stack: list[tuple[int, Any, int]] = []  # (call entry, state before it, its memo bit)
        self.best_depth = -1
        self.best: Counterexample | None = None
        self.entry = nxt[head]

    @property
    def explored(self) -> int:
        return len(self.cache) if self.result is None else self.result.explored

    def run(self, max_states: int = DEFAULT_MAX_STATES, deadline: Deadline | None = None) -> KeyResult:
        if self.result is not None:
            return self.result
        deadline = deadline or _never
        key, n, pruned = self.key, self.n, self.pruned
        steps, required, bits = self.steps, self.required, self.bits
        op_class, class_bits, class_count = self.op_class, self.class_bits, self.class_count
        nxt, prv, head, tail = self.nxt, self.prv, self.head, self.tail
        cache, stack = self.cache, self.stack
        cache_add, push, pop = cache.add, stack.append, stack.pop
        state, linearized, left, entry = self.state, self.linearized, self.left, self.entry
        size = len(cache)
        check_mask = _BUDGET_CHECK_EVERY - 1
        bad = BAD

        while True:
            if entry < n:  # a call: try to linearize it now
                new_state = steps[entry](state)
                if new_state is not bad:
                    c = op_class[entry]
                    bit = bits[entry] if c < 0 else class_bits[c][class_count[c]]
                    new_linearized = linearized | bit
                    cache_add((new_linearized, new_state))  # one hash: membership by size change
                    if len(cache) != size:
                        size += 1
                        push((entry, state, bit))
                        if c >= 0:
                            class_count[c] += 1
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
                                witness = [self.compiled[e][0].id for e, _, _ in stack] if self.want_witness else None
                                return self._finish(KeyResult(key, "valid", n, size, pruned, linearization=witness))
                        entry = nxt[head]
                        if not size & check_mask:
                            # pops never outnumber pushes, so checking here bounds all the work
                            over = size > max_states
                            if over or deadline():
                                self.state, self.linearized, self.left, self.entry = state, linearized, left, entry
                                reason = f"over {max_states} states" if over else "time limit"
                                return KeyResult(key, "unknown", n, size, pruned, reason)
                        continue
                entry = nxt[entry]
                continue
            if entry == tail:  # cannot happen: a pending required return precedes the tail
                raise AssertionError("search ran off the end of the history")
            # A return whose op has not taken effect: everything before it was tried.
            if len(stack) > self.best_depth:
                self.best_depth = len(stack)
                self.best = _counterexample(self.compiled, stack, state, entry - n, nxt, head, n)
            if not stack:
                return self._finish(KeyResult(key, "invalid", n, size, pruned, counterexample=self.best))
            entry, state, bit = pop()
            linearized ^= bit
            if required[entry]:
                left += 1
            else:
                c = op_class[entry]
                if c >= 0:
                    class_count[c] -= 1
            # unlift: return first, then call (reverse order of lifting)
            r = entry + n
            nxt[prv[r]] = r
            prv[nxt[r]] = r
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            entry = nxt[entry]

    def _finish(self, result: KeyResult) -> KeyResult:
        """Keep the verdict, drop the search structures (the cache can be big)."""
        self.result = result
        self.cache = set()
        self.stack = []
        return result


def _counterexample(
    compiled: Sequence[tuple[Op, Any]],
    stack: Sequence[tuple[int, Any, int]],
    state: Any,
    stuck: int,
    nxt: Sequence[int],
    head: int,
    n: int,
) -> Counterexample:
    prefix = [compiled[e][0].id for e, _, _ in stack]
    states = [s for _, s, _ in stack[1:]] + [state] if stack else []
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
