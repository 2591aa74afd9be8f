"""A bounded membership filter of the records a store may hold: "certainly absent" or "maybe".

Theory of operation
-------------------
``SqliteStorage`` answers a read of a record the filter has never seen without the reader
thread (the thread hop costs more CPU than the SQL; see ``kvstore.storage.sqlite``).  The
filter is a *scalable Bloom filter* (Almeida, Baquero, Preguiça, Hutchison: "Scalable Bloom
Filters", 2007): a list of ``rbloom.Bloom`` layers, each holding up to its capacity of records;
when the newest layer is full a new one of twice the capacity is added, with half the false
positive rate of the one before, so the whole filter keeps a false positive rate below
``false_positive_rate`` however many records arrive, while each layer stays fixed.

Guarantee: ``may_contain(record)`` is true for every record ever passed to ``add`` (or to
``fill``) on this object.  There are no false negatives, whatever the load: past the memory
bound the filter stops growing and keeps adding to its newest layer, so only the false
positive rate rises (at worst every answer is "maybe": the caller reads the file, as it would
without a filter).  A false positive only costs the caller the read it would have done anyway.
Nothing is ever removed (a Bloom filter cannot forget): a deleted record stays "maybe" until
the filter is rebuilt from the file (at the next open).

Memory bound: the layers' bits never exceed ``max_bytes`` in total (the first layer is sized
down to fit if needed).  Each record costs about ``1.44 * log2(1 / p)`` bits (~11 bits in the
first layer, at 0.5%); 8 MiB holds about 4 million records grown from 65,536 in 6 layers.

The hash is Python's ``hash`` of the ``(token, key)`` tuple (rbloom's default): salted per
process, which is fine because the filter lives only in memory and is rebuilt at every open.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rbloom import Bloom

_LN2_SQUARED = math.log(2) ** 2
# rbloom rounds a layer up to whole bytes (and may round further): budget this much per layer.
_LAYER_SLACK_BITS = 64


def bloom_bits(capacity: int, false_positive_rate: float) -> int:
    """Bits of an optimal Bloom filter for ``capacity`` items at ``false_positive_rate``."""
    return math.ceil(-capacity * math.log(false_positive_rate) / _LN2_SQUARED)


def bloom_capacity(bits: int, false_positive_rate: float) -> int:
    """The largest capacity whose optimal filter fits in ``bits``."""
    return max(1, math.floor(bits * _LN2_SQUARED / -math.log(false_positive_rate)))


class KeyFilter:
    """Which ``(token, key)`` records may exist: no false negatives, bounded memory."""

    def __init__(
        self,
        expected_records: int = 0,
        false_positive_rate: float = 0.01,
        max_bytes: int = 8 * 1024 * 1024,
        min_capacity: int = 1 << 16,
    ) -> None:
        if not 0.0 < false_positive_rate < 1.0:
            raise ValueError(f"false_positive_rate must be in (0, 1), got {false_positive_rate}")
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be >= 1024, got {max_bytes}")
        if min_capacity < 1:
            raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
        self.max_bytes = max_bytes
        self.false_positive_rate = false_positive_rate
        # Half the budget to the first layer, a quarter to the next, ...: the sum stays below p.
        self._next_rate = false_positive_rate / 2
        # Room for twice what the file holds now, so a store that doubles adds no layer.
        first = max(min_capacity, 2 * expected_records)
        first = min(first, bloom_capacity(max_bytes * 8 - _LAYER_SLACK_BITS, self._next_rate))
        self._layers: list[Bloom] = []
        self._capacity = 0  # of the newest layer
        self._in_newest = 0  # records added to the newest layer (an upper bound: see fill)
        self.saturated = False  # the memory bound stopped growth: the newest layer overfills
        self._add_layer(first)

    @property
    def size_bytes(self) -> int:
        return sum(layer.size_in_bits for layer in self._layers) // 8

    @property
    def layers(self) -> int:
        return len(self._layers)

    def may_contain(self, record: tuple[int, str]) -> bool:
        """False only if ``record`` was never added."""
        # A plain loop, not any() over a generator: this runs on every read and every put, and
        # the generator cost 3-7x the Bloom lookup itself (measured: ~0.25 us against ~1 us).
        for layer in self._layers:  # noqa: SIM110 (see above)
            if record in layer:
                return True
        return False

    def add(self, record: tuple[int, str]) -> None:
        """Remember ``record``; afterwards ``may_contain(record)`` is true for good."""
        if self.may_contain(record):
            # Already answered "maybe" (added before, or a false positive that nothing can make
            # "absent"): adding again would only use up capacity.  An overwrite costs nothing.
            return
        self._make_room(1)
        self._layers[-1].add(record)
        self._in_newest += 1

    def fill(self, records: Iterable[tuple[int, str]], count: int) -> None:
        """Add ``count`` distinct records at once (the key scan at open), without the membership test."""
        self._make_room(count)
        self._layers[-1].update(records)
        self._in_newest += count

    def _make_room(self, count: int) -> None:
        if self.saturated or self._in_newest + count <= self._capacity:
            return
        used_bits = sum(layer.size_in_bits for layer in self._layers)
        free_bits = self.max_bytes * 8 - used_bits
        wanted = max(2 * self._capacity, count)
        free_bits -= _LAYER_SLACK_BITS
        if bloom_bits(wanted, self._next_rate) > free_bits:
            wanted = bloom_capacity(free_bits, self._next_rate) if free_bits > 0 else 0
            if wanted < self._capacity:  # not worth a layer: overfill the newest one instead
                self.saturated = True
                return
        self._add_layer(wanted)

    def _add_layer(self, capacity: int) -> None:
        self._layers.append(Bloom(capacity, self._next_rate))
        self._capacity = capacity
        self._in_newest = 0
        self._next_rate /= 2
