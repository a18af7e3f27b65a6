"""Write-behind to the remote tier: pages the engine wrote down to its disk go to the shared store later, in batches,
on this module's own thread, never on the request path.

A bounded queue (``queue_bytes`` of page blobs) takes pages without waiting: over the bound, or while the remote
tier is off after a fault, a page is dropped and counted (the shared tier is a cache: the page stays on this node's
disk). One batch (``batch_bytes``) is one ``exists`` call, then one ``put`` of the objects not there yet (another
node, or this one before a restart, may have written them), each time-bounded by the guard.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence

from ..crypto import KeyRing
from ..namespace import Namespace
from . import ObjectId, RemoteOptions, RemoteTier
from .envelope import pack
from .guard import CallGuard, Unavailable


class WriteBehind:
    def __init__(self, remote: RemoteTier, guard: CallGuard, options: RemoteOptions, keyring: KeyRing | None):
        self.remote, self.guard, self.options, self.keyring = remote, guard, options, keyring
        # queued, dropped_full, dropped_off, unkeyed, present, written, bytes_written, exists_calls, put_calls
        self.counts: Counter = Counter()
        self.times: Counter = Counter()  # put_s, exists_s
        self._queue: OrderedDict[ObjectId, tuple[Namespace, bytes]] = OrderedDict()
        self._bytes = 0
        self._busy = False  # a batch is off the queue, on its way
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvdrive-remote-write", daemon=True)
        self._thread.start()

    def queued_bytes(self) -> int:
        return self._bytes

    def offer(self, ns: Namespace, keys: Sequence[bytes], blobs: Sequence[bytes]) -> int:
        """Queue pages for the remote tier; never waits. Returns how many were taken."""
        n = 0
        with self._cv:
            for k, b in zip(keys, blobs):
                oid = ObjectId(ns.id, bytes(k))
                if oid in self._queue:
                    continue
                if self._stop or not self.guard.available():
                    self.counts["dropped_off"] += 1
                    continue
                if self._bytes + len(b) > self.options.queue_bytes:
                    self.counts["dropped_full"] += 1
                    continue
                self._queue[oid] = (ns, b)
                self._bytes += len(b)
                n += 1
            self.counts["queued"] += n
            if n:
                self._cv.notify_all()
        return n

    def drop(self, ns_id: bytes | None) -> None:
        """Forget queued pages of namespace ``ns_id`` (None: all)."""
        with self._cv:
            for oid in [o for o in self._queue if ns_id is None or o.ns_id == ns_id]:
                self._bytes -= len(self._queue.pop(oid)[1])

    def flush(self, timeout: float) -> bool:
        """Wait until the queue is empty (written, or dropped after a fault); True if it is."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def close(self, timeout: float) -> None:
        self.flush(timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=max(timeout, 1.0))

    def _take(self) -> list[tuple[ObjectId, Namespace, bytes]] | None:
        with self._cv:
            while not self._queue and not self._stop:
                self._cv.wait(0.5)
            if not self._queue:
                return None
            batch, size = [], 0
            while self._queue and (
                not batch or size + len(next(iter(self._queue.values()))[1]) <= self.options.batch_bytes
            ):
                oid, (ns, blob) = self._queue.popitem(last=False)
                self._bytes -= len(blob)
                batch.append((oid, ns, blob))
                size += len(blob)
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._write(batch)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _write(self, batch) -> None:
        ids, objs = [], []
        for oid, ns, blob in batch:
            obj = pack(ns, oid.key, blob, self.keyring)
            if obj is None:  # encryption on, the tenant has no key (now): nothing of it leaves the node
                self.counts["unkeyed"] += 1
                continue
            ids.append(oid)
            objs.append(obj)
        if not ids:
            return
        try:
            t0 = time.perf_counter()
            there = self.guard.call("exists", lambda: self.remote.exists(ids), self.options.timeout_s)
            self.times["exists_s"] += time.perf_counter() - t0
            self.counts["exists_calls"] += 1
            todo = [i for i, t in enumerate(there) if not t]
            self.counts["present"] += len(ids) - len(todo)
            if not todo:
                return
            put_ids, put_objs = [ids[i] for i in todo], [objs[i] for i in todo]
            t0 = time.perf_counter()
            self.guard.call("put", lambda: self.remote.put(put_ids, put_objs), self.options.put_timeout_s)
            self.times["put_s"] += time.perf_counter() - t0
            self.counts["put_calls"] += 1
            self.counts["written"] += len(put_ids)
            self.counts["bytes_written"] += sum(len(o) for o in put_objs)
        except Unavailable:
            self.counts["dropped_off"] += len(ids)
