"""An acknowledged write survives SIGKILL of the process (sqlite, fsync ``always`` and ``batch``).

A child process writes records with concurrent writers and prints each record's index only
after its ``put()`` returned (the acknowledgement).  The parent kills the child with SIGKILL
by PID while it is still writing, reopens the file, and checks that every acknowledged record
is present with its exact blob.  This proves that acknowledgement happens only after commit;
surviving power loss additionally relies on the fsync that ``synchronous=FULL`` performs,
which a test cannot pull the plug on.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.storage import SqliteStorage

REPO_ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import asyncio, sys
from kvstore.storage.sqlite import SqliteStorage

def token(i):
    return (i * 11400714819323198485) % 2**64 - 2**63

async def main(path, policy, n, workers):
    store = SqliteStorage(path, policy)
    indices = iter(range(n))
    out = sys.stdout

    async def writer():
        for i in indices:  # one shared iterator: each index is written once
            await store.put("key-%d" % i, token(i), b"blob-%d" % i * 8)
            out.write("%d\n" % i)
            out.flush()

    await asyncio.gather(*(writer() for _ in range(workers)))
    await store.close()
    out.write("done\n")
    out.flush()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def token(i: int) -> int:
    return (i * 11400714819323198485) % 2**64 - 2**63


def run_child_and_kill(path: Path, policy: str, kill_after: int, stderr_path: Path) -> tuple[list[int], int]:
    """Start the writer child, SIGKILL it after `kill_after` acks; the acked indices and its exit code."""
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), policy, "10000000", "16"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=REPO_ROOT,
        )
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + 60
        while buf.count(b"\n") < kill_after:
            assert time.monotonic() < deadline, f"child too slow; stderr: {stderr_path.read_text()}"
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"child exited early ({proc.wait()}); stderr: {stderr_path.read_text()}"
                buf += chunk
        os.kill(proc.pid, signal.SIGKILL)
        # Whatever the child printed before it died was acknowledged too: read to EOF.
        while chunk := os.read(fd, 65536):
            buf += chunk
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    # A line without its newline is a print cut short by the kill: not an acknowledgement.
    lines = buf.split(b"\n")[:-1]
    assert b"done" not in lines, "the child finished before it was killed"
    return [int(line) for line in lines], returncode


@pytest.mark.parametrize("kill_after", [200, 3000])
@pytest.mark.parametrize("policy", ["always", "batch"])
async def test_acknowledged_writes_survive_sigkill(tmp_path: Path, policy: str, kill_after: int) -> None:
    path = tmp_path / "data.db"
    acked, returncode = run_child_and_kill(path, policy, kill_after, tmp_path / "child.stderr")
    assert returncode == -signal.SIGKILL
    assert len(acked) >= kill_after and len(set(acked)) == len(acked)

    store = SqliteStorage(str(path), policy)  # type: ignore[arg-type]
    try:
        missing = [i for i in acked if await store.get(f"key-{i}", token(i)) != b"blob-%d" % i * 8]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:10]}"
        # Unacknowledged writes (at most one in flight per child writer) may or may not have
        # landed; nothing else may appear, and every record must be intact.
        records = await store.scan(0, 0, 10**7)
        assert len(records) == await store.count()
        assert len(acked) <= len(records) <= len(acked) + 16
        for r in records:
            i = int(r.key.removeprefix("key-"))
            assert (r.token, r.blob) == (token(i), b"blob-%d" % i * 8)
    finally:
        await store.close()
