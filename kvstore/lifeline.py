"""Child processes that exit when the process that started them dies.

Theory of operation
-------------------
A test run, a benchmark or a seed sweep starts node processes (``LocalCluster``) or worker
processes (``kvstore sim --seeds``) and stops them itself.  When that parent is killed (SIGKILL,
an out-of-memory kill, a CI timeout), nothing stops them: they are orphaned and keep their ports,
files and CPU.  ``exit_with_parent(pid)`` makes a child notice: a daemon thread waits for the
parent process to exit -- on Linux through a pidfd (``os.pidfd_open``, readable once the process
has exited: no polling), elsewhere by polling ``os.getppid()`` -- and then ends the child the
way a stop would: SIGTERM to itself (a node's own graceful stop), then SIGKILL if it is still
there after ``grace_s``.  A child that stops normally first is not affected (the thread is a
daemon and never signals anything while the parent lives).

Why not ``prctl(PR_SET_PDEATHSIG)``: Linux sends that signal when the *thread* that forked the
child exits, and clusters are started from worker threads (``asyncio.to_thread``, a benchmark's
restart thread) that end long before the cluster should.

The parent's PID is handed to the child (``PARENT_PID_ENV`` for a node, an argument for a pool
worker) rather than read with ``os.getppid()`` in the child: a parent that died before the
child's watch began would otherwise go unnoticed, since the child already belongs to init or a
subreaper.  Limits: a child stopped by SIGSTOP (the pause nemesis) acts only once continued; a
child meant to outlive its parent (``kvstore cluster up --detach``) is started without the watch.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Mapping

PARENT_PID_ENV = "KVSTORE_EXIT_WITH_PARENT"  # set by a parent for its children: its own PID
GRACE_S = 10.0  # after the SIGTERM, as LocalCluster.stop waits before its SIGKILL
POLL_S = 1.0  # only without pidfds


def exit_with_parent(parent_pid: int, grace_s: float = GRACE_S) -> threading.Thread:
    """Start watching ``parent_pid``; when it exits, SIGTERM this process, SIGKILL it ``grace_s`` later."""
    assert parent_pid > 0
    thread = threading.Thread(target=_watch, args=(parent_pid, grace_s), name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def exit_with_parent_from_env(environ: Mapping[str, str] | None = None) -> threading.Thread | None:
    """``exit_with_parent`` for the PID in ``PARENT_PID_ENV``, if set (a node started by a harness)."""
    raw = (os.environ if environ is None else environ).get(PARENT_PID_ENV, "")
    if not raw.isdigit() or int(raw) <= 0:
        return None
    return exit_with_parent(int(raw))


def child_environment(environ: Mapping[str, str], exit_with_parent: bool = True) -> dict[str, str]:
    """``environ`` for a child that should exit with this process (or, when not, that must not
    inherit a watch meant for this process's own parent)."""
    env = {k: v for k, v in environ.items() if k != PARENT_PID_ENV}
    if exit_with_parent:
        env[PARENT_PID_ENV] = str(os.getpid())
    return env


def _watch(parent_pid: int, grace_s: float) -> None:
    _wait_for_exit(parent_pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_exit(parent_pid: int) -> None:
    """Return once ``parent_pid`` (this process's parent when the watch began) has exited."""
    if os.getppid() != parent_pid:
        return  # gone already: this process was handed to init or a subreaper
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            fd = pidfd_open(parent_pid)
        except OSError:
            fd = -1  # exited just now (ESRCH), or no pidfds here (ENOSYS, a sandbox): poll
        if fd >= 0:
            try:
                if os.getppid() == parent_pid:  # still our parent: the pidfd is of the right process
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)
                    while not poller.poll():
                        pass
                return
            finally:
                os.close(fd)
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
