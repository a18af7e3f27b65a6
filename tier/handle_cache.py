"""A bounded LRU cache of open file handles that never closes a handle a reader is using (I5 in docs/invariants.md).

A handle is pinned while a read uses it: the cache (LRU eviction) and ``forget`` (a segment compacted away) only
retire it, and the last reader's unpin closes it. Closing a descriptor under a reader in another thread gave EBADF
(the tier turned itself off), or worse, a reused descriptor number read from another file (found by
bench/stress/soak.py). Generic over the handle: the disk store caches POSIX descriptors per segment
(tier/segment_fds.py) and KvikioIO caches kvikio CuFile handles per path with the same code (issue 15: kvikio's
handles used to be closed mid-read by compaction). Guarded by tests/tier/test_fileio.py's handle-cache tests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

H = TypeVar("H")


class Pinned(Generic[H]):
    """One cached handle and the reads using it right now."""

    __slots__ = ("closed", "handle", "key", "retired", "users")

    def __init__(self, key: Hashable, handle: H):
        self.key, self.handle, self.users, self.retired, self.closed = key, handle, 0, False, False


class HandleCache(Generic[H]):
    """``opener(key) -> handle`` opens (its exceptions reach ``pin``'s caller); ``closer(key, handle, replaced)``
    closes, ``replaced`` telling whether a newer handle of the same key is cached by then. At most ``capacity``
    handles are cached; pinned ones past it stay open until unpinned."""

    def __init__(self, opener: Callable[[Hashable], H], closer: Callable[[Hashable, H, bool], None], capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"handle cache capacity must be a positive integer, got {capacity!r}")
        self._open, self._close, self.capacity = opener, closer, capacity
        self._entries: OrderedDict[Hashable, Pinned[H]] = OrderedDict()
        self._lock = threading.Lock()

    def pin(self, key: Hashable) -> Pinned[H]:
        """The cached handle of ``key`` (opened if need be), pinned: pass it to ``unpin`` when done."""
        with self._lock:
            p = self._entries.get(key)
            if p is not None:
                self._entries.move_to_end(key)
                p.users += 1
                return p
        handle = self._open(key)  # outside the lock: a slow open must not stall every other reader
        with self._lock:
            p = self._entries.get(key)
            if p is not None:  # another thread opened it meanwhile: use that one
                self._close(key, handle, True)
            else:
                p = self._entries[key] = Pinned(key, handle)
                while len(self._entries) > self.capacity:
                    self._retire_locked(self._entries.popitem(last=False)[1])
            p.users += 1
            return p

    def unpin(self, p: Pinned[H]) -> None:
        with self._lock:
            p.users -= 1
            if p.retired and not p.users:
                self._close_locked(p)

    @contextmanager
    def pinned(self, key: Hashable) -> Iterator[H]:
        p = self.pin(key)
        try:
            yield p.handle
        finally:
            self.unpin(p)

    def forget(self, key: Hashable) -> bool:
        """Take ``key``'s handle out of the cache: closed now, or by its last reader. False if none was cached."""
        with self._lock:
            p = self._entries.pop(key, None)
            if p is None:
                return False
            self._retire_locked(p)
            return True

    def cached(self) -> list:
        with self._lock:
            return list(self._entries)

    def close_all(self) -> None:
        """Retire every handle (those in use close when their reads finish)."""
        with self._lock:
            for p in self._entries.values():
                self._retire_locked(p)
            self._entries.clear()

    def _retire_locked(self, p: Pinned[H]) -> None:
        """``p`` has left the cache: close it now, or when its last reader is done."""
        p.retired = True
        if not p.users:
            self._close_locked(p)

    def _close_locked(self, p: Pinned[H]) -> None:
        if not p.closed:
            p.closed = True
            self._close(p.key, p.handle, p.key in self._entries)
