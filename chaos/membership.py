"""Scenario: membership -- run with `python chaos/membership.py --mode eventual|quorum|linearizable --duration 30 --seed 7 --out runs/NAME`."""

import sys

from kvstore.harness.cli import main

if __name__ == "__main__":
    sys.exit(main(scenario="membership"))
