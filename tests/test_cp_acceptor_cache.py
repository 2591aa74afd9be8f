"""The acceptor's key index and state cache (kvstore.runtime.caspaxos.PaxosAcceptor).

A linearizable write of a new key used to read the Paxos store at every acceptor for both its
prepare and its accept (6 storage reads per write on 3 nodes), a quorum read once per replica.
The acceptor now knows which keys have a record (``index_keys``, grown before every write) and
keeps the durable state of recent keys decoded.  These tests pin the saving (storage reads
counted) and the invariant that makes it safe: what the acceptor answers from memory is exactly
what its store holds, also after a failed write, an eviction or a restart.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kvstore.protocol.paxos import AcceptorState, Ballot, RegisterValue
from kvstore.runtime.caspaxos import PaxosAcceptor, accept_message, prepare_message
from kvstore.storage import open_storage
from kvstore.storage.base import Storage, StorageError
from tests.vtime import simulated

TOKEN = 7


class Counting:
    """Counts reads and writes; ``fail_next_put_after_write`` makes one put land, then raise."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.gets = 0
        self.puts = 0
        self.fail_next_put_after_write = False

    async def get(self, key: str, token: int) -> bytes | None:
        await asyncio.sleep(0)
        self.gets += 1
        return await self.inner.get(key, token)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        await asyncio.sleep(0)
        self.puts += 1
        await self.inner.put(key, token, blob)
        if self.fail_next_put_after_write:
            self.fail_next_put_after_write = False
            raise StorageError("write landed, then the disk reported an error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def b(counter: int, node: str = "n1") -> Ballot:
    return Ballot(counter, node)


async def write(acceptor: PaxosAcceptor, key: str, counter: int, value: bytes) -> None:
    assert (await acceptor.handle(prepare_message(key, TOKEN, b(counter), ("n1",))))["ok"]
    message = accept_message(key, TOKEN, b(counter), RegisterValue.of(value), None, (b(counter),), ("n1",))
    reply = await acceptor.handle(message)
    assert reply["ok"]


@simulated
async def test_a_new_key_costs_no_storage_read_and_its_state_is_durable() -> None:
    storage = Counting(open_storage("memory", None, "always"))
    acceptor = PaxosAcceptor(storage)  # type: ignore[arg-type]
    acceptor.index_keys(set())  # an empty store
    for i in range(20):
        await write(acceptor, f"k{i}", 5, b"v%d" % i)
        peek = await acceptor.handle({"op": "paxos_peek", "key": f"k{i}", "token": TOKEN, "group": ["n1"]})
        assert peek["ok"] and peek["value"] == b"v%d" % i
    assert storage.gets == 0 and storage.puts == 40  # without the index and cache: 60 reads
    restarted = PaxosAcceptor(storage)  # type: ignore[arg-type]  # a new process: memory lost
    assert (await restarted.load("k3", TOKEN)).value == RegisterValue.of(b"v3")


@simulated
async def test_an_indexed_key_is_read_once_then_served_from_memory() -> None:
    storage = Counting(open_storage("memory", None, "always"))
    first = PaxosAcceptor(storage)  # type: ignore[arg-type]
    await write(first, "old", 3, b"x")
    acceptor = PaxosAcceptor(storage)  # type: ignore[arg-type]
    acceptor.index_keys({"old"})
    storage.gets = 0
    # The stored promise (3) holds: a lower prepare is refused, even though nothing is cached yet.
    assert not (await acceptor.handle(prepare_message("old", TOKEN, b(2), ("n1",))))["ok"]
    assert (await acceptor.handle(prepare_message("old", TOKEN, b(4), ("n1",))))["ok"]
    assert not (await acceptor.handle(prepare_message("old", TOKEN, b(4), ("n1",))))["ok"]
    assert storage.gets == 1


@simulated
async def test_a_failed_write_is_read_back_not_answered_from_memory() -> None:
    storage = Counting(open_storage("memory", None, "always"))
    acceptor = PaxosAcceptor(storage)  # type: ignore[arg-type]
    acceptor.index_keys(set())
    await write(acceptor, "k", 3, b"x")
    storage.fail_next_put_after_write = True  # the promise of 9 lands, but the put raises
    with pytest.raises(StorageError):
        await acceptor.handle(prepare_message("k", TOKEN, b(9), ("n1",)))
    # The store holds the promise of 9: the acceptor must not answer from its older copy.
    reply = await acceptor.handle(prepare_message("k", TOKEN, b(5), ("n1",)))
    assert not reply["ok"] and reply["conflict"] == [9, "n1"]
    # Same for a key whose first write failed: it is in the index from before the put.
    storage.fail_next_put_after_write = True
    with pytest.raises(StorageError):
        await acceptor.handle(prepare_message("fresh", TOKEN, b(9), ("n1",)))
    assert not (await acceptor.handle(prepare_message("fresh", TOKEN, b(5), ("n1",))))["ok"]


@simulated
async def test_the_cache_is_bounded_and_evicted_keys_are_read_again() -> None:
    storage = Counting(open_storage("memory", None, "always"))
    acceptor = PaxosAcceptor(storage, cached_states=4, cached_bytes=10_000)  # type: ignore[arg-type]
    acceptor.index_keys(set())
    for i in range(10):
        await write(acceptor, f"k{i}", 2, b"v" * 100)
    assert len(acceptor._states) <= 4
    storage.gets = 0
    for i in range(10):
        assert (await acceptor.load(f"k{i}", TOKEN)) == AcceptorState(
            promised=b(2), accepted=b(2), value=RegisterValue.of(b"v" * 100), lineage=(b(2),)
        )
    assert 6 <= storage.gets <= 10  # the evicted ones came from the store
    big = PaxosAcceptor(storage, cached_states=100, cached_bytes=1000)  # type: ignore[arg-type]
    big.index_keys({f"k{i}" for i in range(10)})
    for i in range(10):
        await big.load(f"k{i}", TOKEN)
    assert big._states_bytes <= 1000
