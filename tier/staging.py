"""Staging: pages acknowledged after a cheap copy, encoded into the tiers by a few encoder threads.

SGLang's HiCache backup thread keeps host-pool nodes locked until ``batch_set_v1`` returns, and encoding (zstd: about
0.6 GB/s per core) is far slower than the KV an 8B model writes through (several GB/s): kvdrive issue 15. So the engine
hands already-copied raw pages to a ``StagingArea`` and returns at once; its encoder threads encode each page and hand
the blob back to the engine (``land``), which stores it exactly as ``put_many`` would. Until it has landed a staged
page is served from its raw bytes. Bounded by bytes: a page that does not fit is refused and counted, never waited
for (the caller is SGLang's backup thread, and the scheduler waits on it).

Landing happens under one lock that ``drop_where`` also takes, so a page dropped here (its namespace cleared, its
tenant's key deleted, the engine closed) never reaches the tiers afterwards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from . import clock
from .dram_pool import PoolKey
from .namespace import Namespace

log = logging.getLogger("kvdrive.tier")


class StagedPage:
    """One raw page waiting for an encoder. Identity matters: a page replaced or dropped while it was being encoded
    is recognised by ``is`` and never lands."""

    __slots__ = ("data", "expires_ms", "ns", "owner", "score")

    def __init__(self, ns: Namespace, data: np.ndarray, owner: object, score: float, expires_ms: int):
        self.ns = ns
        self.data = data  # flat uint8 view of the caller's copy, owned by the stage from now on
        self.owner = owner  # the caller's page object: keeps the viewed memory alive
        self.score = score  # mutable: the promoter's scores reach staged pages too (TierEngine.set_scores)
        self.expires_ms = expires_ms  # wall-clock ms; 0: never

    def expired(self) -> bool:
        return clock.expired(self.expires_ms)


class StagingStats(NamedTuple):
    pages: int  # staged now (not yet encoded into the tiers)
    bytes: int  # their raw bytes
    refused: int  # pages refused because the staging area was full
    landed: int  # pages encoded and handed to the tiers
    failed: int  # pages whose encoding failed (logged): dropped
    encode_s: float  # encoder threads' time spent encoding


class StagingArea:
    def __init__(
        self,
        capacity_bytes: int,
        threads: int,
        encode: Callable[[StagedPage], bytes],
        land: Callable[[PoolKey, StagedPage, bytes], None],
    ):
        self.capacity = capacity_bytes
        self._encode = encode
        self._land = land
        self._items: dict[PoolKey, StagedPage] = {}
        self._todo: deque[tuple[PoolKey, StagedPage]] = deque()
        self._bytes = 0
        self._refused = self._landed = self._failed = 0
        self._encode_s = 0.0
        self._cv = threading.Condition()
        self._landing = threading.Lock()  # held while a blob enters the tiers (see the module doc)
        self._stop = False
        self._threads = [
            threading.Thread(target=self._work, name=f"kvdrive-encode-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def add(self, items: Sequence[tuple[PoolKey, StagedPage]]) -> list[bool]:
        """Stage pages in order; never blocks on the encoders. From the first page that does not fit on, every page
        is refused (False), so what a chain got stored stays a prefix of it. A key staged again replaces its page."""
        out = []
        with self._cv:
            full = self._stop
            for pk, item in items:
                old = self._items.get(pk)
                held = self._bytes - (old.data.nbytes if old is not None else 0)
                if full or held + item.data.nbytes > self.capacity:
                    full = True
                    self._refused += 1
                    out.append(False)
                    continue
                self._items[pk] = item
                self._bytes = held + item.data.nbytes
                self._todo.append((pk, item))
                out.append(True)
            self._cv.notify_all()
        return out

    def get(self, pk: PoolKey) -> StagedPage | None:
        """The staged page under ``pk`` (None when none, or expired: expired pages are never served)."""
        item = self._items.get(pk)  # one dict read: atomic, no lock needed
        return None if item is None or item.expired() else item

    def set_score(self, pk: PoolKey, score: float) -> None:
        item = self._items.get(pk)
        if item is not None:
            item.score = float(score)

    def drop_where(self, pred: Callable[[PoolKey, StagedPage], bool]) -> int:
        """Drop the staged pages ``pred`` picks; none of them lands afterwards (waits for a landing in progress)."""
        with self._landing, self._cv:
            doomed = [pk for pk, item in self._items.items() if pred(pk, item)]
            for pk in doomed:
                self._bytes -= self._items.pop(pk).data.nbytes
            self._cv.notify_all()
        return len(doomed)

    def wait_empty(self, deadline: float | None) -> bool:
        """Wait until every staged page has landed (or was dropped); False at ``deadline`` (time.monotonic)."""
        with self._cv:
            while self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not any(t.is_alive() for t in self._threads):
                    return False
                self._cv.wait(0.1 if left is None else min(left, 0.1))
        return True

    def close(self) -> int:
        """Drop what is still staged and stop the encoders; returns the pages dropped. Never waits for an encode in
        progress (its page no longer lands): the threads are daemons and exit after it."""
        n = self.drop_where(lambda pk, item: True)
        with self._cv:
            self._stop = True
            self._todo.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=0.5)
        return n

    def stats(self) -> StagingStats:
        with self._cv:
            return StagingStats(
                len(self._items), self._bytes, self._refused, self._landed, self._failed, self._encode_s
            )

    def _work(self) -> None:
        _lower_priority()
        while True:
            with self._cv:
                while not self._todo and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                pk, item = self._todo.popleft()
                if self._items.get(pk) is not item:
                    continue  # replaced or dropped meanwhile
            t0 = time.perf_counter()
            try:
                blob = self._encode(item)
            except Exception:  # an encoder thread must survive anything; the page is a miss
                log.exception("kvdrive: encoding a staged page failed; dropping it")
                blob = None
            dt = time.perf_counter() - t0
            with self._landing:
                live = self._items.get(pk) is item
                if live and blob is not None:
                    try:
                        self._land(pk, item, blob)
                    except Exception:  # as above
                        log.exception("kvdrive: storing a staged page failed; dropping it")
                        blob = None
                with self._cv:
                    self._encode_s += dt
                    if self._items.get(pk) is item:
                        del self._items[pk]
                        self._bytes -= item.data.nbytes
                        if blob is None:
                            self._failed += 1
                        else:
                            self._landed += 1
                    self._cv.notify_all()


ENCODER_NICENESS = 10  # on top of the process's own: SGLang's scheduler and backup threads come first for a core


def _lower_priority() -> None:
    """Let this (encoder) thread yield a contended core to SGLang's threads: the encoders only trail the writes,
    while the scheduler's forward passes and the backup thread's copies are what requests wait on. Linux only
    (per-thread niceness); elsewhere, or where refused, nothing changes."""
    try:
        os.setpriority(
            os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + ENCODER_NICENESS
        )
    except (AttributeError, OSError):
        pass
