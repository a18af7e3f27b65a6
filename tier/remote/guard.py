"""Time-bounded remote calls and the retry window: a remote fault never hangs or fails a caller.

Every call runs on one of the guard's worker threads and is waited for at most its bound. A call past its bound, or
one that raises, is a fault: the remote tier is off for ``retry_s`` (one log line, a counter per kind), and calls
made meanwhile return at once as unavailable. A call past its bound keeps its worker until the client library gives
up (a hung Mooncake master blocks a call ~30 s; the library releases the GIL meanwhile, so the caller and the server
go on). While every worker is held so, the tier stays unavailable (``busy`` counts those calls), so stuck calls never
pile up. Found by tests/tier/test_remote.py::test_hung_master_calls_are_time_bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from . import RemoteError, RemoteFault

log = logging.getLogger("kvdrive.tier")


class Unavailable(Exception):
    """The remote tier is off (retry window, all workers held) or the call just failed: treat as a miss."""


class CallGuard:
    def __init__(self, name: str, retry_s: float, workers: int = 2):
        self.name = name
        self.retry_s = retry_s
        self.workers = workers
        self.faults: Counter = Counter()  # fault kind -> count
        self.busy = 0  # calls refused because every worker was still held by an earlier call
        self.off = 0  # calls refused inside a retry window
        self._held = 0
        self._off_until = 0.0
        self._last_fault: str | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvdrive-remote")
        self._closed = False

    def available(self, *, count: bool = False) -> bool:
        """Whether a call would be made now; ``count``: a call skipped for it is counted (``off`` / ``busy``)."""
        if self._closed or time.monotonic() < self._off_until:
            self.off += count
            return False
        if self._held >= self.workers:
            self.busy += count
            return False
        return True

    def off_for_s(self) -> float:
        return max(0.0, self._off_until - time.monotonic())

    def last_fault(self) -> str | None:
        return self._last_fault

    def call(self, what: str, fn: Callable, timeout_s: float):
        """``fn()``'s value, within ``timeout_s``. Unavailable if the tier is off, or if this call faulted (then
        it is off from now on for the retry window)."""
        with self._lock:
            if self._closed or time.monotonic() < self._off_until:
                self.off += 1
                raise Unavailable(what)
            if self._held >= self.workers:
                self.busy += 1
                raise Unavailable(what)
            self._held += 1
        fut = self._pool.submit(fn)
        fut.add_done_callback(self._release)
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout:
            self.fault(RemoteFault.TIMEOUT, f"{what} took longer than {timeout_s:g} s")
        except RemoteError as e:
            self.fault(e.fault, f"{what}: {e.detail}")
            if e.partial is not None:
                return e.partial
        except Exception as e:  # noqa: BLE001 - a client library's surprise is a fault, never the caller's crash
            self.fault(RemoteFault.ERROR, f"{what}: {type(e).__name__}: {e}")
        raise Unavailable(what)

    def fault(self, kind: RemoteFault, detail: str) -> None:
        """Turn the tier off for the retry window: one log line per window, every fault counted."""
        with self._lock:
            self.faults[kind.value] += 1
            self._last_fault = f"{kind.value}: {detail}"
            was_on = time.monotonic() >= self._off_until
            self._off_until = time.monotonic() + self.retry_s
        if was_on:
            log.warning(
                "kvdrive: remote tier %s off for %g s after a fault (%s: %s); local tiers keep serving",
                self.name,
                self.retry_s,
                kind.value,
                detail,
            )

    def _release(self, _fut) -> None:
        with self._lock:
            self._held -= 1

    def close(self, what: str, fn: Callable, timeout_s: float) -> None:
        """Run ``fn`` (the client's close) within ``timeout_s``, then refuse every later call; never waits longer."""
        with self._lock:
            self._off_until = 0.0  # a close is always attempted
        try:
            self.call(what, fn, timeout_s)
        except Unavailable:
            pass
        self._closed = True
        self._pool.shutdown(wait=False)
