"""An optional result cache: least recently used, bounded by the bytes it holds."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def cache_key(model: str, options: str, data: bytes) -> str:
    digest = hashlib.sha256(data)
    digest.update(b"\0" + model.encode() + b"\0" + options.encode())
    return digest.hexdigest()


class ResultCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def size_bytes(self) -> int:
        return self._size

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return  # one result larger than the whole cache would just evict everything
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._size -= len(previous)
            self._entries[key] = value
            self._size += len(value)
            while self._size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted)
