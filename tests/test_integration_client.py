"""The Python client against real node processes: the README's example, siblings and resolvers,
compare-and-set, failover, typed errors."""

from __future__ import annotations

import asyncio

import pytest

import kvstore
from kvstore.cli import main as cli_main
from kvstore.client import BadRequest, PreconditionFailed, QuorumUnavailable, ValueTooLarge, lww_resolver
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol.ring import Ring

pytestmark = pytest.mark.integration


def test_readme_example_and_siblings(cluster5: LocalCluster) -> None:
    async def go() -> None:
        async with kvstore.Client(cluster5.urls[:2]) as kv:
            # The README's example, step by step.
            got = await kv.get("client:7", r=2)
            assert not got.found
            put = await kv.put("client:7", b"hello", context=got.context, w=2)
            assert put.others == 0 and put.siblings == 1
            assert (await kv.get("client:7", r=2)).value == b"hello"
            gone = await kv.delete("client:7", context=put.context, w=2)
            assert gone.others == 0
            assert not (await kv.get("client:7", r=2)).found

            # The README's old example deleted with the context of a read made before a later put:
            # the delete does not cover that put, which survives -- and the result says so.
            await kv.put("client:42", b"hello", w=2)
            got = await kv.get("client:42", r=2)
            await kv.put("client:42", b"v2", context=got.context, w=2)
            stale = await kv.delete("client:42", context=got.context, w=2)
            assert stale.others == 1 and (await kv.get("client:42", r=2)).value == b"v2", "v2 survived"
            latest = await kv.get("client:42", r=2)
            assert (await kv.delete("client:42", context=latest.context, w=2)).others == 0
            gone = await kv.get("client:42", r=2)
            assert not gone.found and gone.value is None

            # Two writes without context: siblings, then resolved by a write with the merged context.
            await kv.put("client:sib", b"a", w=3)
            await kv.put("client:sib", b"b", w=3)
            both = await kv.get("client:sib", r=3)
            assert both.value is None and sorted(s.value for s in both.siblings) == [b"a", b"b"]
            await kv.put("client:sib", b"merged", context=both.context, w=3)
            assert (await kv.get("client:sib", r=3)).value == b"merged"

        async with kvstore.Client(cluster5.urls, resolver=lww_resolver) as kv:
            await kv.put("client:lww", b"old", w=3)
            await asyncio.sleep(0.01)
            await kv.put("client:lww", b"new", w=3)
            assert (await kv.get("client:lww", r=3)).value == b"new", "the resolver picks the latest timestamp"

    asyncio.run(go())


def test_cas_and_put_if_absent(cluster5: LocalCluster) -> None:
    async def go() -> None:
        async with kvstore.Client(cluster5.urls) as kv:
            await kv.put_if_absent("client:cas", b"1", consistency="linearizable")
            with pytest.raises(PreconditionFailed):
                await kv.put_if_absent("client:cas", b"2", consistency="linearizable")
            await kv.cas("client:cas", expected=b"1", new=b"2", consistency="linearizable")
            with pytest.raises(PreconditionFailed) as exc:
                await kv.cas("client:cas", expected=b"1", new=b"3", consistency="linearizable")
            assert exc.value.status == 412
            assert (await kv.get("client:cas", consistency="linearizable")).value == b"2"

    asyncio.run(go())


def test_typed_errors_from_a_real_node(cluster5: LocalCluster) -> None:
    async def go() -> None:
        async with kvstore.Client(cluster5.urls[0]) as kv:
            with pytest.raises(BadRequest) as bad:
                await kv.get("client:x", r=9)
            assert bad.value.code == "invalid_quorum"
            with pytest.raises(ValueTooLarge):
                await kv.put("client:big", b"x" * (1024 * 1024 + 1))

    asyncio.run(go())


def test_failover_and_quorum_errors_with_dead_nodes(fresh_cluster: LocalCluster) -> None:
    key = "client:failover"
    pref = Ring(fresh_cluster.node_ids, fresh_cluster.base_config.vnodes).preference_list(key, 3)
    dead = pref[1]
    fresh_cluster.kill(dead)
    live = [u for n, u in zip(fresh_cluster.node_ids, fresh_cluster.urls, strict=True) if n != dead]

    async def go() -> None:
        # The dead node is first in the list: the client must fail over, silently for a refused connection.
        async with kvstore.Client([fresh_cluster.url(dead), *live]) as kv:
            result = await kv.put(key, b"still-here", w=2)
            assert result.node != fresh_cluster.url(dead) and not result.retried
            assert (await kv.get(key, r=2)).value == b"still-here"
            with pytest.raises(QuorumUnavailable) as exc:
                await kv.put(key, b"three", w=3, sloppy=False)
            assert exc.value.status == 503

    asyncio.run(go())


def test_cli_delete_without_a_context_says_the_value_survived(
    cluster5: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11, item 8: `kvstore delete KEY` without a context used to exit 0 while the value survived."""
    node = ["--node", cluster5.urls[0]]
    assert cli_main(["put", "cli:del", "v1", *node]) == 0
    assert cli_main(["delete", "cli:del", *node]) == 4
    assert "was NOT deleted" in capsys.readouterr().err
    assert cli_main(["get", "cli:del", *node]) == 0 and capsys.readouterr().out == "v1", "the value survived"
    assert cli_main(["delete", "cli:del", "--read-first", *node]) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli_main(["get", "cli:del", *node]) == 3, "deleted"

    assert cli_main(["put", "cli:put", "a", *node]) == 0
    assert cli_main(["put", "cli:put", "b", *node]) == 4  # no context: a sibling of "a"
    assert "2 live values" in capsys.readouterr().err
    assert cli_main(["put", "cli:put", "c", "--read-first", *node]) == 0
    capsys.readouterr()
    assert cli_main(["get", "cli:put", *node]) == 0 and capsys.readouterr().out == "c"
