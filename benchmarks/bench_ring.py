"""Ring construction and lookups: this checkout's ``kvstore/protocol/ring.py`` against another revision's.

Every node start, membership change and simulated node boot builds a ``Ring``; the simulator's
profile showed the walk precomputation (``_distinct_from``, every vnode's walk at construction).
This times, in one run and interleaved, the baseline revision's ring module (read with ``git show
REV:kvstore/protocol/ring.py``) and this checkout's, on the same members:

* ``build``: construct a ring (5 members, 256 vnodes: the simulator's default);
* ``build+1k``: construct, then look up the walks of 1,000 keys (a short simulated run);
* ``build+all``: construct, then every vnode's range (``ranges(3)``: what anti-entropy asks);

and prints the median time of each and the ratio new/baseline.  Bounded: ``--repeat`` rounds.
Run: ``python benchmarks/bench_ring.py [--baseline main] [--members 5] [--repeat 15]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvstore.protocol import ring as current  # noqa: E402


def load_revision(rev: str, where: Path) -> ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kvstore/protocol/ring.py"],
                            check=True, capture_output=True, text=True, timeout=30).stdout
    path = where / "ring_baseline.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("ring_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ring_baseline"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--baseline", default="main", help="git revision of the baseline ring.py (default main)")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--vnodes", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    assert 1 <= args.repeat <= 1000 and 3 <= args.members <= 64
    members = [f"n{i + 1}" for i in range(args.members)]
    keys = [f"key-{i}" for i in range(1000)]
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_revision(args.baseline, Path(tmp))
        modules = {"baseline": baseline, "new": current}
        # The answers first: the two modules must place every key identically (no machines named).
        a, b = baseline.Ring(members, args.vnodes), current.Ring(members, args.vnodes)
        assert [a.walk(k) for k in keys] == [b.walk(k) for k in keys], "the two rings disagree"
        assert [(r.start, r.end, r.owners) for r in a.ranges(3)] == [(r.start, r.end, r.owners) for r in b.ranges(3)]
        def build_and_look_up(m: ModuleType) -> list[Any]:
            ring = m.Ring(members, args.vnodes)
            return [ring.walk(k) for k in keys]

        cases: dict[str, Callable[[ModuleType], Any]] = {
            "build": lambda m: m.Ring(members, args.vnodes),
            "build+1k": build_and_look_up,
            "build+all": lambda m: m.Ring(members, args.vnodes).ranges(3),
        }
        times: dict[str, dict[str, list[float]]] = {case: {"baseline": [], "new": []} for case in cases}
        for round_no in range(args.repeat):
            for case, fn in cases.items():
                order = ("baseline", "new") if round_no % 2 == 0 else ("new", "baseline")
                for name in order:
                    times[case][name].append(timed(lambda fn=fn, name=name: fn(modules[name])))  # type: ignore[misc]
    print(f"ring: {args.members} members x {args.vnodes} vnodes, {args.repeat} interleaved rounds; "
          f"baseline = {args.baseline}:kvstore/protocol/ring.py, new = this checkout")
    print(f"{'case':<10} {'baseline ms':>12} {'new ms':>8} {'new/baseline':>13}")
    for case, by in times.items():
        base_ms, new_ms = statistics.median(by["baseline"]) * 1e3, statistics.median(by["new"]) * 1e3
        print(f"{case:<10} {base_ms:>12.2f} {new_ms:>8.2f} {new_ms / base_ms:>12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
