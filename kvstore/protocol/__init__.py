"""Pure rules: ring, versions, quorum, hints, tombstones, Merkle trees, failure detection, CASPaxos rules and
the step-able proposer and coordinator cores.  No I/O, no clock, no global randomness: this package imports
no asyncio, time, os or random (tests/test_layout.py pins it).
"""
