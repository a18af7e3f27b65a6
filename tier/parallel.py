"""A process-wide worker pool for a batch's page work (decode, encode, verify): ``parallel_for``.

Reloads used to decode one page after another on the caller's thread (issue 18): one core, ~1.5-2.3 GB/s for zstd.
The page work releases the GIL where it matters (python-zstandard and xxhash on large inputs, numpy's copies and
ufuncs, preadv, AES-GCM), so threads scale it across cores.

``parallel_for(fn, n)`` calls ``fn(i)`` for every i in range(n), split into contiguous chunks balanced by ``weights``
(bytes of work per item): one chunk per worker, and the caller's thread runs a chunk itself -- on a 1-core machine
there is no handoff at all, and a caller never waits for a chunk no worker has started (it takes such chunks back,
so many callers sharing a small pool cannot queue behind one another). A batch whose total weight is below
``INLINE_BELOW_BYTES`` runs inline: a few small pages must not pay a thread handoff (measured, see the constant).

The first exception raised by ``fn`` is re-raised in the caller once every chunk has stopped (a chunk stops at its
next item after a failure elsewhere), so no worker still writes into the caller's buffers after the call returns.
``fn`` runs on pool threads: it must not touch unsynchronised shared state (count after the call, not in ``fn``).
A ``parallel_for`` called from inside ``fn`` runs inline (a worker waiting on workers could deadlock the pool).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("kvdrive.tier")

# Below this much work (bytes of pages) a batch runs inline on the caller's thread. A handoff to a pool thread and
# back (queue put, wake-up, completion signal) measured ~25-60 us on these 2-core VMs when idle and several times that
# when loaded (bench/reload_bench.py --handoff); zstd decodes bf16 pages at ~2-3 GB/s per core, so 256 KiB is
# ~100 us of decode: below it, splitting cannot win back what the handoff costs.
INLINE_BELOW_BYTES = 256 * 1024


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container or taskset may allow fewer than the machine
    has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_for(decode_threads: int | None) -> int:
    """How many threads (the caller's included) a batch may use: ``decode_threads`` (TierConfig; 0 or None = every
    usable core), never more than the usable cores."""
    cores = usable_cores()
    if not decode_threads:
        return cores
    return max(1, min(int(decode_threads), cores))


class _Chunk:
    """Items [start, stop) of one batch. ``claim`` is taken once, by whichever thread runs the chunk first."""

    __slots__ = ("batch", "claim", "start", "stop")

    def __init__(self, batch: _Batch, start: int, stop: int):
        self.batch, self.start, self.stop = batch, start, stop
        self.claim = threading.Lock()

    def run(self) -> None:
        b = self.batch
        try:
            for i in range(self.start, self.stop):
                if b.error is not None:
                    break  # another chunk failed: the call raises anyway
                b.fn(i)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
            with b.lock:
                if b.error is None:
                    b.error = e
        finally:
            with b.lock:
                b.pending -= 1
                if b.pending == 0:
                    b.done.set()


class _Batch:
    __slots__ = ("done", "error", "fn", "lock", "pending")

    def __init__(self, fn: Callable[[int], object], n_chunks: int):
        self.fn = fn
        self.pending = n_chunks
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()


class WorkerPool:
    """``threads - 1`` daemon threads (the caller is the last one), started on first use."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._queue: queue.SimpleQueue[_Chunk | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._local = threading.local()  # .inside: this thread is running a chunk

    def parallel_for(
        self,
        fn: Callable[[int], object],
        n_items: int,
        *,
        weights: Sequence[int] | None = None,
        max_threads: int | None = None,
        inline_below: int = INLINE_BELOW_BYTES,
    ) -> None:
        """Call ``fn(i)`` for i in range(n_items) on up to ``max_threads`` threads (the caller's included).

        ``weights``: bytes of work per item, to balance the chunks and to run small batches inline (total below
        ``inline_below``); without them every item counts as worth a thread of its own."""
        if n_items <= 0:
            return
        threads = min(self.threads, max_threads or self.threads, n_items)
        total = sum(weights) if weights is not None else None
        if threads <= 1 or (total is not None and total < inline_below) or getattr(self._local, "inside", False):
            for i in range(n_items):
                fn(i)
            return
        self._ensure_started()
        bounds = split(n_items, threads, weights)
        batch = _Batch(fn, len(bounds))
        chunks = [_Chunk(batch, a, b) for a, b in bounds]
        for c in chunks[1:]:
            self._queue.put(c)
        self._run_claimed(chunks[0])
        for c in reversed(chunks[1:]):  # take back what no worker has started yet
            self._run_claimed(c)
        batch.done.wait()
        if batch.error is not None:
            raise batch.error

    def _run_claimed(self, c: _Chunk) -> None:
        if not c.claim.acquire(blocking=False):
            return
        self._local.inside = True
        try:
            c.run()
        finally:
            self._local.inside = False

    def _ensure_started(self) -> None:
        if self._workers:
            return
        with self._start_lock:
            if self._workers:
                return
            workers = [
                threading.Thread(target=self._work, name=f"kvdrive-decode-{i}", daemon=True)
                for i in range(self.threads - 1)
            ]
            for t in workers:
                t.start()
            self._workers = workers

    def _work(self) -> None:
        while True:
            c = self._queue.get()
            if c is None:
                return
            self._run_claimed(c)

    def stop(self) -> None:
        """Stop the workers (tests; the process-wide pool lives as long as the process)."""
        with self._start_lock:
            for _ in self._workers:
                self._queue.put(None)
            for t in self._workers:
                t.join(timeout=5)
            self._workers = []


def split(n_items: int, parts: int, weights: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous, non-empty [start, stop) ranges covering range(n_items), of about equal weight
    (equal item counts without ``weights``)."""
    parts = max(1, min(parts, n_items))
    if weights is None:
        q, r = divmod(n_items, parts)
        out, a = [], 0
        for p in range(parts):
            b = a + q + (p < r)
            out.append((a, b))
            a = b
        return out
    total = sum(weights) or 1
    out, a, acc = [], 0, 0
    for p in range(1, parts):
        target = total * p / parts
        b = a
        # leave at least one item for each later part
        while b < n_items - (parts - p) and (acc + weights[b] <= target or b == a):
            acc += weights[b]
            b += 1
        if b > a:
            out.append((a, b))
            a = b
    out.append((a, n_items))
    return out


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def pool() -> WorkerPool:
    """The process-wide pool, sized to the usable cores (callers cap their share with ``max_threads``)."""
    global _pool
    p = _pool
    if p is None:
        with _pool_lock:
            if _pool is None:
                _pool = WorkerPool(usable_cores())
            p = _pool
    return p


def parallel_for(
    fn: Callable[[int], object],
    n_items: int,
    *,
    weights: Sequence[int] | None = None,
    max_threads: int | None = None,
    inline_below: int = INLINE_BELOW_BYTES,
) -> None:
    """``WorkerPool.parallel_for`` on the process-wide pool."""
    pool().parallel_for(fn, n_items, weights=weights, max_threads=max_threads, inline_below=inline_below)


def _forget_pool_after_fork() -> None:
    # a forked child has none of the parent's threads: it starts a pool of its own when it first needs one
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
