"""What every storage engine shares: the busy error, argument checks, ring-range arithmetic.

Theory of operation
-------------------
Both engines keep records in one ordered keyspace of ``(token, key)`` pairs and answer a
ring-range scan by walking at most two contiguous *segments* of that keyspace.  This module
turns ``scan(start, end, limit, after)`` into those segments once, so the engines cannot
disagree on the wrap-around and paging rules:

* ``start < end``: one segment, tokens in ``(start, end]``.
* ``start >= end``: the range wraps.  Segment A holds tokens in ``(start, MAX_TOKEN]``,
  segment B tokens in ``[MIN_TOKEN, end]``; A comes first.  ``start == end`` is the whole
  ring, beginning just after ``start``.
* ``after`` (the last ``(token, key)`` of the previous page) drops every segment that lies
  wholly before it in ring order and moves the lower bound of the segment containing it.

A segment is ``(lower, lower_inclusive, upper_token)``: records with
``(token, key) > lower`` (or ``>=``) and ``token <= upper_token``.  ``""`` is the least str,
so ``(t, "")`` inclusive means "token >= t" without needing a "largest key" sentinel.

Argument checks that guard programmer errors are ``assert``s; a key that SQLite cannot store
(a str with lone surrogates, i.e. not encodable as UTF-8) is an operating error of the
caller's input and raises ``StorageError`` from *both* engines, so they stay interchangeable.
"""

from __future__ import annotations

from kvstore.storage.base import MAX_META_NAME, StorageError

MIN_TOKEN = -(2**63)
MAX_TOKEN = 2**63 - 1

Segment = tuple[tuple[int, str], bool, int]


class StorageBusy(StorageError):
    """The engine's bounded write queue is full: shed load (the node answers 503) and retry later."""


class StorageClosed(StorageError):
    """The store was closed; no further operations are accepted."""


class StorageFull(StorageError):
    """The disk is full: the write was refused and *not applied* (the engine rolled it back).

    Distinct from a plain ``StorageError`` (e.g. a failed fsync), after which the write may or
    may not be on disk: only this one lets the node tell a client "certainly not written"."""


def check_record(key: str, token: int, blob: bytes | None = None) -> None:
    """Validate one record's arguments (cheap: runs on every operation)."""
    assert isinstance(key, str), f"key must be str, not {type(key).__name__}"
    assert isinstance(token, int) and MIN_TOKEN <= token <= MAX_TOKEN, f"token out of int64 range: {token!r}"
    assert blob is None or isinstance(blob, bytes), f"blob must be bytes, not {type(blob).__name__}"
    # isascii() is O(1) on CPython's compact strings, so the common case pays nothing.
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StorageError(f"key is not valid UTF-8 text: {exc}") from None


def check_meta(name: str, blob: bytes | None = None) -> None:
    """Validate a meta blob's arguments (programmer errors only: names are constants)."""
    assert isinstance(name, str) and name.isascii() and 0 < len(name) <= MAX_META_NAME, f"bad meta name {name!r}"
    assert blob is None or isinstance(blob, bytes), f"blob must be bytes, not {type(blob).__name__}"


def scan_segments(start: int, end: int, after: tuple[int, str] | None) -> list[Segment]:
    """The keyspace segments, in ring order, that ``scan(start, end, _, after)`` must walk."""
    assert MIN_TOKEN <= start <= MAX_TOKEN and MIN_TOKEN <= end <= MAX_TOKEN, (start, end)
    # start == MAX_TOKEN leaves nothing strictly above it: that segment is empty, drop it.
    if start < end:
        raw = [(start + 1, end)]
    else:
        raw = [(lo, hi) for lo, hi in ((start + 1, MAX_TOKEN), (MIN_TOKEN, end)) if lo <= hi]
    fresh: list[Segment] = [((lo, ""), True, hi) for lo, hi in raw]
    if after is None:
        return fresh
    assert isinstance(after, tuple) and len(after) == 2, f"after must be (token, key): {after!r}"
    assert isinstance(after[0], int) and isinstance(after[1], str), f"bad after: {after!r}"
    for i, (lo, hi) in enumerate(raw):
        if (lo, "") <= after and after[0] <= hi:
            # Resume inside the segment holding `after`; the segments before it are done.
            return [(after, False, hi), *fresh[i + 1 :]]
    # `after` is in no segment.  Without wrap, keyspace order is ring order: a position past
    # the range means the scan is complete, one before it means nothing was read yet.  With
    # wrap, the only gap is (end, start], which ring order puts just before the range.
    if start < end and raw and after[0] > raw[0][1]:
        return []
    return fresh
