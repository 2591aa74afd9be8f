"""The chaos harness: fault injection, workloads and Jepsen-style histories (see docs/chaos.md)."""
