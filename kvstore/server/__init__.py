"""The HTTP face of a node: the aiohttp application, the kv request core it adapts, request guards, and the
process entry point (``python -m kvstore.server.app``).
"""
