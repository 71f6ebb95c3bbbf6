"""A least-recently-used map bounded in entries and in bytes, safe to share between threads.

Every in-memory cache of the reading side is one of these (models and programs together, runs,
snapshot versions, failures), so that no table grows with what people browse.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """Keeps at most `max_items` entries and `max_bytes` bytes (each entry's size is given when
    it is put), dropping the least recently used first. One entry larger than the whole bound is
    still kept, alone: a model bigger than the budget can be used, just not cached beside others.
    """

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._making: dict[Hashable, threading.Event] = {}  # keys being made, by one thread each

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable, default: V | None = None) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: V, size: int = 0) -> V:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, size)
            self._bytes += size
            self._shrink()
            return value

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            return entry[0]

    def get_or_make(self, key: Hashable, make: Callable[[], tuple[V, int]]) -> V:
        """The cached value, or `make()`'s (value, size), stored. `make` runs outside the lock,
        once per key at a time: a thread asking for a key another thread is making waits for
        that one (and makes it itself if that one failed)."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return entry[0]
                making = self._making.get(key)
                if making is None:
                    making = self._making[key] = threading.Event()
                    break
            making.wait()
        try:
            value, size = make()
            return self.put(key, value, size)
        finally:
            with self._lock:
                del self._making[key]
            making.set()

    def items(self) -> list[tuple[Hashable, V]]:
        with self._lock:
            return [(key, value) for key, (value, _) in self._entries.items()]

    def _shrink(self) -> None:
        while len(self._entries) > 1 and (
            (self.max_items is not None and len(self._entries) > self.max_items)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size
