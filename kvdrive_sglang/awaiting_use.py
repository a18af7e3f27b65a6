"""Pages kvdrive loaded into SGLang's host pool for a request that has not run yet, in load order.

SGLang (0.5.17-0.5.23) prefetches a queued request's storage hit into its host pool when the request enters the
waiting queue, and unlocks those host pages as soon as the transfer completes, before the request runs. When more
prefetched tokens wait than the host pool holds, each new prefetch's allocation evicts host pages by SGLang's order,
least recently used first: the pages loaded first, whose requests run next. The serving bench found kvdrive's
half-size host pool losing most loaded prefixes that way: after a restart and on the agent rounds, SGLang logged
"prefetch success ... loaded=1040" and then prefilled the same prefixes with 0 cached tokens
(bench/results/serving-cpu-kvdrive-spill.md). kvdrive's eviction order (radix_backend.PromoterEviction) ranks
pages awaiting use above all others and, among them, keeps the earliest loaded, since requests run in arrival order.

A page stops awaiting use when a finished request through it is reported, when it leaves the host pool, or
``HOLD_S`` after it was loaded (an aborted request must not keep its pages' rank).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence


class AwaitingUse:
    """Page key -> load sequence number, for pages loaded and not yet used (bounded, oldest forgotten first).

    Called from SGLang's prefetch I/O threads (``loaded``) and its scheduler thread (the rest)."""

    HOLD_S = 60.0  # a request waits this long at most in practice; past it the page ranks as any other
    MAX_KEYS = 1 << 16

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._keys: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (sequence, loaded at)
        self._seq = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def loaded(self, keys: Sequence[str]) -> None:
        """Pages just loaded into SGLang's host pool for a waiting request (one sequence number for the batch).

        Args:
            keys: their page keys.
        """
        if not keys:
            return
        now = self._clock()
        with self._lock:
            self._seq += 1
            for k in keys:
                self._keys[k] = (self._seq, now)
                self._keys.move_to_end(k)
            while len(self._keys) > self.MAX_KEYS:
                self._keys.popitem(last=False)

    def used(self, keys: Sequence[str]) -> None:
        """Pages a finished request ran through, or pages that left the host pool: no longer awaiting use.

        Args:
            keys: their page keys.
        """
        if keys and self._keys:
            with self._lock:
                for k in keys:
                    self._keys.pop(k, None)

    def order(self, key: str) -> int | None:
        """The page's load sequence number while it awaits use (lower: loaded earlier), else None.

        Args:
            key: a page key.
        """
        got = self._keys.get(key)
        if got is None:
            return None
        if self._clock() - got[1] > self.HOLD_S:
            self.used([key])
            return None
        return got[0]
