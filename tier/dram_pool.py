"""kvdrive's compressed DRAM tier (``Tier.DRAM``): a byte-bounded map of encoded pages with value-ordered eviction.

Not SGLang's host pool (``Tier.HOST``, uncompressed, above this one): pages SGLang writes back from its host pool land
here encoded, and leave for the disk store.

Value is the promoter's score; until a page has one (score 0 for all), eviction is least-recently-used. Victims are
handed to a ``demote`` callback (the engine queues them for the disk store) *before* they leave the pool, so a page
is never invisible in between. Thread-safe.

Pages waiting for their score
    Score 0.0 means "no score yet", not "worth nothing": kvdrive's SGLang backend stores a request's prompt pages
    while the request still runs (SGLang backs them up as soon as they reach its host pool), and the promoter learns
    of them, and scores them, only when the request finishes. Ranked as the lowest value, each such page was the first
    victim of its own insertion into a pool holding scored pages and, not yet admitted for the disk, was dropped: the
    agent's rounds of issue 18's serving smoke found none of their history after a flush. So an unscored page in a
    scored pool waits up to ``unscored_grace_s`` for its score, evicted before that only if nothing else is left
    (oldest first, so the byte bound always holds); once scored it ranks by value like any page, and one still
    unscored after the grace (its request was aborted, or is very long) ranks as unscored again, first out: a page
    is never protected indefinitely. 0.0 also never replaces a score the pool holds (set_score, a refreshing put):
    it carries no information. (tests/tier/test_dram_pool_unscored.py,
    tests/tier/test_dram_pool_stored_before_scored.py)
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from . import clock
from .validate import integer

PoolKey = tuple[bytes, bytes]  # (namespace id, key bytes)

# How long an unscored page in a scored pool waits for its score (module doc): three of kvdrive's report ticks
# (10 s each), the ticks that hand the promoter's scores to the tiers once the page's request has finished
UNSCORED_GRACE_S = 30.0


class DramPoolStats(NamedTuple):
    entries: int
    used_bytes: int  # encoded bytes held
    raw_bytes: int  # their decoded size (raw_bytes / used_bytes = codec ratio)
    capacity_bytes: int
    hits: int
    misses: int
    inserts: int
    demoted: int  # left the pool for the disk tier (or were already there)
    dropped: int  # left the pool with nowhere to go (no disk tier, or its queue full)


class _Entry:
    __slots__ = ("blob", "raw_nbytes", "score", "on_disk", "ns", "retiring", "expires_ms", "stored")

    def __init__(
        self, blob: bytes, raw_nbytes: int, score: float, on_disk: bool, ns, expires_ms: int = 0, stored: float = 0.0
    ):
        self.blob, self.raw_nbytes, self.score, self.on_disk, self.ns = blob, raw_nbytes, score, on_disk, ns
        self.retiring = False  # picked as a victim; another thread is handing it to the disk tier
        self.expires_ms = expires_ms  # wall-clock ms (the disk store's clock); 0: never
        self.stored = stored  # time.monotonic() when put: an unscored page waits for its score from here

    def expired(self, now: int | None = None) -> bool:
        return clock.expired(self.expires_ms, now)


# demote(victims) -> number accepted; victims are (key, entry) pairs, oldest/lowest value first
Demote = Callable[[list[tuple[PoolKey, _Entry]]], int]


class DramPool:
    def __init__(self, capacity_bytes: int, demote: Demote | None = None, *, low_watermark: float = 0.9):
        self.capacity = integer(capacity_bytes, "DRAM pool capacity_bytes", least=0)
        self._low = int(capacity_bytes * low_watermark)  # evict in batches down to here: fewer, larger demotions
        self._demote = demote
        self._lock = threading.Lock()
        self._map: OrderedDict[PoolKey, _Entry] = OrderedDict()  # LRU order: oldest first
        self._used = self._raw = 0
        self._retiring = 0  # bytes of victims being handed over (still visible, no longer counted as excess)
        self._scored = 0  # entries with a non-zero score: when none, LRU order is value order
        self.unscored_grace_s = UNSCORED_GRACE_S  # see the module doc: pages waiting for their score
        self._hits = self._misses = self._inserts = self._demoted = self._dropped = 0

    def put(
        self,
        key: PoolKey,
        blob: bytes,
        raw_nbytes: int,
        *,
        ns=None,
        score: float = 0.0,
        on_disk: bool = False,
        expires_ms: int = 0,
    ) -> bool:
        """Insert (or refresh) a page. False when the page alone is larger than the pool. An expired page
        (``expires_ms``, wall-clock ms) is never served and leaves at the next ``expire``. ``score`` 0.0: not
        scored yet (module doc: it waits for its score; a refreshed page keeps the score it had)."""
        if len(blob) > self.capacity:
            return False
        now = time.monotonic()
        with self._lock:
            old = self._map.pop(key, None)
            if old is not None:
                self._account(old, -1)
                on_disk = on_disk or (old.on_disk and old.blob == blob)
                score = score or old.score  # "no score" carries no information: keep what was known
            e = _Entry(blob, raw_nbytes, float(score), on_disk, ns, int(expires_ms), now)
            self._map[key] = e
            self._account(e, +1)
            self._inserts += 1
            victims = self._pick_victims() if self._used - self._retiring > self.capacity else []
        if victims:
            self._retire(victims)
        return True

    def get(self, key: PoolKey) -> bytes | None:
        with self._lock:
            e = self._map.get(key)
            if e is not None and e.expired() and not e.retiring:
                del self._map[key]
                self._account(e, -1)
                e = None
            if e is None or e.expired():
                self._misses += 1
                return None
            self._map.move_to_end(key)
            self._hits += 1
            return e.blob

    def contains(self, key: PoolKey) -> bool:
        e = self._map.get(key)
        return e is not None and not e.expired()

    def peek(self, key: PoolKey):
        """The live entry for ``key`` (blob, on_disk, ns, score), or None; no hit counted, recency unchanged."""
        with self._lock:
            e = self._map.get(key)
            return e if e is not None and not e.expired() else None

    def eviction_floor(self, incoming_bytes: int = 0) -> float | None:
        """The score a page must beat to be worth adding now: None while ``incoming_bytes`` more still fit under
        the low watermark (no eviction would follow), else the lowest score held (the first victim). Pages waiting
        for their score are not victims while others are left: with only those left, nothing beats them (inf)."""
        with self._lock:
            if self._used + incoming_bytes <= self._low:
                return None
            waiting = self._waiting()
            scores = [e.score for e in self._map.values() if not e.retiring and not waiting(e)]
            if scores:
                return min(scores)
            return math.inf if self._map else None

    def expire(self) -> int:
        """Drop pages past their expiry. Returns how many."""
        now = clock.now_ms()
        return self.drop_where(lambda e: e.expired(now))

    def drop_where(self, doomed: Callable[[_Entry], bool]) -> int:
        """Drop (without demoting) every page for which ``doomed(entry)`` holds: expired pages, or those of a tenant
        whose key was deleted."""
        with self._lock:
            keys = [k for k, e in self._map.items() if doomed(e)]
            for k in keys:
                self._account(self._map.pop(k), -1)
            return len(keys)

    def mark_on_disk(self, keys: list[PoolKey], blobs: list[bytes]) -> None:
        with self._lock:
            for k, b in zip(keys, blobs):
                e = self._map.get(k)
                if e is not None and e.blob is b:
                    e.on_disk = True

    def set_score(self, key: PoolKey, score: float) -> None:
        """The page's value (the promoter's score). 0.0 ("no score", as the promoter answers for a page it does not
        know) never replaces a score held: it carries no information."""
        if not score:
            return
        with self._lock:
            e = self._map.get(key)
            if e is not None:
                self._scored += (score != 0) - (e.score != 0)
                e.score = float(score)

    def discard(self, key: PoolKey) -> None:
        with self._lock:
            e = self._map.pop(key, None)
            if e is not None:
                self._account(e, -1)

    def clear(self, ns_id: bytes | None = None) -> int:
        with self._lock:
            doomed = [k for k in self._map if ns_id is None or k[0] == ns_id]
            for k in doomed:
                self._account(self._map.pop(k), -1)
            return len(doomed)

    def entries_not_on_disk(self) -> list[tuple[PoolKey, _Entry]]:
        with self._lock:
            return [(k, e) for k, e in self._map.items() if not e.on_disk]

    def stats(self) -> DramPoolStats:
        with self._lock:
            return DramPoolStats(
                entries=len(self._map),
                used_bytes=self._used,
                raw_bytes=self._raw,
                capacity_bytes=self.capacity,
                hits=self._hits,
                misses=self._misses,
                inserts=self._inserts,
                demoted=self._demoted,
                dropped=self._dropped,
            )

    # --- internals ---------------------------------------------------------------------------------------------
    def _account(self, e: _Entry, sign: int) -> None:
        self._used += sign * len(e.blob)
        self._raw += sign * e.raw_nbytes
        self._scored += sign * (e.score != 0)

    def _waiting(self) -> Callable[[_Entry], bool]:
        """Whether an entry is an unscored page still waiting for its score (module doc); with no scored page in the
        pool, none is (plain LRU). Called with the lock held."""
        if self._scored == 0:
            return lambda e: False
        since = time.monotonic() - self.unscored_grace_s
        return lambda e: e.score == 0 and e.stored > since

    def _pick_victims(self) -> list[tuple[PoolKey, _Entry]]:
        """Lowest value first until usage is at the low watermark; pages waiting for their score last, oldest first.
        Called with the lock held."""
        excess = self._used - self._retiring - self._low
        victims, freed = [], 0
        if self._scored == 0:
            it = iter(self._map.items())  # LRU order
        else:
            order = {k: i for i, k in enumerate(self._map)}
            waiting = self._waiting()
            it = iter(sorted(self._map.items(), key=lambda kv: (waiting(kv[1]), kv[1].score, order[kv[0]])))
        for k, e in it:
            if freed >= excess:
                break
            if e.retiring:
                continue
            e.retiring = True
            victims.append((k, e))
            freed += len(e.blob)
        self._retiring += freed
        return victims

    def _retire(self, victims: list[tuple[PoolKey, _Entry]]) -> None:
        to_demote = [(k, e) for k, e in victims if not e.on_disk]
        accepted = self._demote(to_demote) if (self._demote and to_demote) else 0
        with self._lock:
            for k, e in victims:
                self._retiring -= len(e.blob)
                if self._map.get(k) is e:  # not refreshed meanwhile
                    del self._map[k]
                    self._account(e, -1)
            self._demoted += len(victims) - len(to_demote) + accepted
            self._dropped += len(to_demote) - accepted
