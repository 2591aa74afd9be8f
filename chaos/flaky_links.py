"""Scenario: flaky-links -- run with `python chaos/flaky_links.py --mode eventual|quorum|linearizable --duration 30 --seed 7 --out runs/NAME`."""

import sys

from kvstore.harness.cli import main

if __name__ == "__main__":
    sys.exit(main(scenario="flaky-links"))
