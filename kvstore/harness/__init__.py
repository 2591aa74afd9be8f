"""The chaos harness: local clusters, workloads, nemeses, scenario runner, history recording, the kill campaign.
The runnable scenario scripts stay in the repository's top-level ``chaos/`` directory.
"""
