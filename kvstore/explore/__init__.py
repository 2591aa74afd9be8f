"""``kvstore explore``: the CP-vs-AP matrix run on a local (or simulated) cluster, its plots and its HTML report.
"""
