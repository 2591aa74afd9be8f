"""The live CAP explorer: ``kvstore explore --serve`` and ``kvstore ui``.

Theory of operation
-------------------
A local web app (aiohttp, WebSocket, plain JS and SVG shipped in ``static/``, nothing fetched
from elsewhere) on top of a live cluster.  It reuses the harness and the checker instead of
imitating them: faults go through ``kvstore.harness.runner.FaultDriver`` and ``kvstore.harness.nemesis``, load
comes from ``kvstore.harness.workload.Workload`` (one per consistency mode, side by side), verdicts from
``kvstore.checker`` run per key in windows in a worker process (``verdicts``).  What is new
here is only the glue and the presentation:

* ``topology``: which node hears which, and so which side of a fault a client is on per key;
* ``stats``: rolling availability per side, latency, throughput, from completed ops;
* ``explain``: the plain-language account of each mode, derived from the figures by rules;
* ``pictures``: the ring and the topology as SVG (also used by the batch report);
* ``probe``: what each replica holds for a key (convergence after a heal);
* ``session``: clusters, workloads, faults and the checker of one live run;
* ``server``/``cli``: the HTTP and WebSocket surface and the two commands.
"""
