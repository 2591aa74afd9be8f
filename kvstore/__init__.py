"""kvstore: a Dynamo-style sharded key-value store with tunable consistency, built as a CAP explorer."""

__version__ = "0.1.0"
