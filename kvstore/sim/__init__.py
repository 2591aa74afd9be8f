"""Deterministic simulation: a whole kvstore cluster in one process, replayable from a seed.

Theory of operation
-------------------
FoundationDB's and TigerBeetle's (VOPR) approach: run the real node code, with every source of
nondeterminism either simulated or derived from one seed, so that a run is a pure function of
``(seed, config)`` and any failure replays exactly.

* ``vloop``: the virtual-time event loop (time jumps to the next timer when nothing is ready),
  process ownership of tasks (``Host``: crash = cancel a process's tasks, pause = hold them),
  ``SimClock`` (the ``Clock`` seam), typed ``SimDeadlock`` / ``SimLimitExceeded``.
* ``network``: the ``Transport`` seam; latency and loss from the seeded rng, partitions and
  one-way cuts as the same ``FaultRules`` the real transport applies.
* ``disk``: durable in-memory disks (the ``Storage`` seam) that survive a crash, or are lost.
* ``cluster``: N real ``Node``s (real AP and CP machinery) assembled on those seams, the
  process faults, and the client endpoint into each node's kv API.
* ``control``: the chaos harness's ``FaultControl`` over a simulated cluster.
* ``run``: one run (the chaos harness's own workload, schedule and checker) -> history + verdict.
* ``sweep``: ``kvstore sim --seeds 1..1000``: many seeds in worker processes, each picking its mode
  and nemesis; every seed that broke its mode's promise, with its replay command.
* ``shrink``: ``kvstore sim --seed S --shrink``: delta debugging (ddmin) of a failing run's fault
  windows, clients, keys, rate and duration, down to a minimal run that fails the same way.
* ``cli``: ``kvstore sim``; ``kvstore explore --simulate`` runs the explorer's matrix on it.

Sources of nondeterminism found and fixed where they live: time (the loop's clock is the
simulated one; nodes read time through their ``Clock``), randomness (every rng is seeded from
the run's seed, the member and its boot number), iteration over id-hashed sets of futures
(the proposer's driver feeds ``ProposerCore`` its answers in completion order from done
callbacks, walking only dicts in send order).  Determinism is tested across
processes with different ``PYTHONHASHSEED`` values (tests/test_sim.py).
"""
