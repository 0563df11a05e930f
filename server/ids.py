"""Ids with OpenAI's prefixes: unguessable, and ordered by creation time."""

from __future__ import annotations

import os
import threading
import time


class _RandomPool:
    """Random bytes from the operating system's CSPRNG, fetched 4 KiB at a time.

    One ``os.urandom`` call per id would also release the GIL three times per response, each
    time handing the interpreter to the store's thread in the middle of a request.
    """

    SIZE = 4096

    def __init__(self) -> None:
        self._reset()
        # A child must never repeat its parent's ids (nor inherit a lock another thread held).
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._used = 0

    def hex(self, count: int) -> str:
        """``count`` random bytes as hex; every byte is handed out once."""
        with self._lock:
            if self._used + count > len(self._pool):
                self._pool, self._used = os.urandom(self.SIZE), 0
            start = self._used
            self._used = start + count
            return self._pool[start : start + count].hex()


_random = _RandomPool()


def new_id(prefix: str) -> str:
    """An unguessable id with one of OpenAI's prefixes (resp_, msg_, fc_, rs_, ws_).

    48 hex digits: the creation time in milliseconds (12), then 144 random bits. Ids that
    grow with time land at the end of the store's indexes, where a random id would dirty a
    random page of each index per insert (about three times the write cost).
    """
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{_random.hex(18)}"
