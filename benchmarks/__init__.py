"""kvstore benchmarks: ``python -m benchmarks.run`` (the ``kvstore bench`` suite) and single studies.

A package so the studies share one load generator (``benchmarks.loadgen``) and can be run as
``python -m benchmarks.<name>`` from the repository root as well as ``python benchmarks/<name>.py``.
"""
