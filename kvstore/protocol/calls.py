"""The calls of the step-able cores: the effects that start and stop peer calls, and the answers.

Theory of operation
-------------------
The pure cores (``kvstore.protocol.coordinator`` for AP reads and writes,
``kvstore.protocol.proposer`` for CASPaxos) never do I/O: like etcd-io/raft's
``Ready``/``Advance``, they emit effects and their asyncio drivers carry them out. Both speak
to peers the same way, so the vocabulary lives here once: ``Send`` starts a call numbered by
the core, ``Abandon`` cancels calls the core no longer waits for, ``StartTimer`` asks for one
wake-up, and a call comes back as ``Reply`` (the peer's untrusted wire answer) or
``CallFailed`` (no answer: ``maybe_delivered`` when the request may have reached the peer,
``recovering`` when the peer refused because it lost its storage, a certain failure).
Times are monotonic nanoseconds read from the node's Clock by the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.transport.base import Message


@dataclass(frozen=True, slots=True)
class Send:
    """Call ``peer`` with ``message``, giving up at ``timeout_at_ns`` (monotonic)."""

    call: int
    peer: str
    message: Message
    timeout_at_ns: int


@dataclass(frozen=True, slots=True)
class Abandon:
    """Cancel these calls; the core counted them as maybe delivered and ignores their answers."""

    calls: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Call ``on_timer`` once the monotonic clock reaches ``at_ns`` (replaces any earlier timer)."""

    at_ns: int


@dataclass(frozen=True, slots=True)
class Reply:
    """Input: the peer's wire reply to ``Send`` ``call`` (untrusted)."""

    call: int
    message: Message


@dataclass(frozen=True, slots=True)
class CallFailed:
    """Input: ``Send`` ``call`` got no reply.  ``maybe_delivered``: the request may have reached
    the peer (timeout, lost reply, remote error); ``recovering``: the peer refused because it
    lost its storage (nothing was done there, a certain failure)."""

    call: int
    maybe_delivered: bool
    recovering: bool = False


Answer = Reply | CallFailed
