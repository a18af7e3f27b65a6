"""A node-shared copy of one process's DRAM tier, for ranks that hold the very same KV (MLA's replicated latent cache).

With MLA every tensor-parallel rank holds the same KV pages and one rank writes them; SGLang asks every rank how many
leading pages storage holds and takes the minimum. The other ranks' DRAM tiers are empty (they never store), so
before this they saw only what had reached the disk: hits capped at the disk (under selective write-down, often
nothing) and every rank re-reading it (issue 15). The writer now publishes each page it holds in its DRAM tier to this
mirror; the other ranks read it as their DRAM tier. All ranks then agree on hits, and a page crosses from the writer
to a reader as a memory copy.

The mirror is a :class:`DiskStore` on a memory-backed file system (``/dev/shm``): its LMDB index and segment files
are shared memory for the processes of a node, with the store's multi-process safety, capacity eviction, checksums
and sealing as on disk. Publishing runs on the mirror's own thread from a bounded queue (full: the page is not
mirrored, counted); readers see a page once its batch commits (milliseconds). Nothing here is needed for
correctness: a page missing from the mirror is read from disk, or is a miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections import Counter, deque
from collections.abc import Sequence

from .disk_store import DiskStore, DiskStoreConfig
from .namespace import Namespace, key_bytes

log = logging.getLogger("kvdrive.tier")

SHM_ROOT = "/dev/shm"
MIN_BYTES = 64 << 20  # a mirror smaller than this holds too little to matter
QUEUE_PAGES = 4096  # pages waiting to be published; over this a page is not mirrored
BATCH_PAGES = 256  # one LMDB commit


def mirror_path(store_dir: str, root: str = SHM_ROOT) -> str:
    """The mirror of the store at ``store_dir``: one per store directory, so every rank of a server finds it."""
    h = hashlib.blake2b(os.path.realpath(store_dir).encode(), digest_size=8).hexdigest()
    return os.path.join(root, f"kvdrive-mirror-{h}")


def mirror_capacity(want_bytes: int, root: str = SHM_ROOT) -> int:
    """``want_bytes`` capped at half the free space of ``root`` (0 where that is under MIN_BYTES or unreadable)."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return 0
    cap = min(int(want_bytes), free // 2)
    return cap if cap >= MIN_BYTES else 0


class ReplicaMirror:
    """Args:
    path: the mirror's directory (``mirror_path``).
    capacity_bytes: its cap (``mirror_capacity``).
    keyring: the engine's key ring (sealed tenants' pages stay sealed in shared memory too).
    publisher: whether this process publishes (the writing rank) or only reads.
    """

    def __init__(self, path: str, capacity_bytes: int, keyring=None, *, publisher: bool):
        seg = max(1 << 20, min(64 << 20, capacity_bytes // 16))
        self.store = DiskStore(
            DiskStoreConfig(path=path, capacity_bytes=capacity_bytes, segment_bytes=seg, direct_io=False),
            keyring=keyring,
        )
        self.publisher = publisher
        self.counts = Counter()
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = None
        if publisher:
            self._thread = threading.Thread(target=self._publish_loop, name="kvdrive-mirror", daemon=True)
            self._thread.start()

    @classmethod
    def open(
        cls, store_dir: str, want_bytes: int, keyring=None, *, publisher: bool, root: str = SHM_ROOT
    ) -> ReplicaMirror | None:
        """The mirror of ``store_dir``, or None (logged) where shared memory is too small or the store won't open."""
        cap = mirror_capacity(want_bytes, root)
        path = mirror_path(store_dir, root)
        if not cap:
            log.warning(
                "kvdrive: no room for a replica mirror in %s; ranks that only read see the disk tier only", root
            )
            return None
        try:
            m = cls(path, cap, keyring, publisher=publisher)
        except Exception as e:  # noqa: BLE001 - an optional tier: never the reason a server does not start
            log.warning(
                "kvdrive: replica mirror %s unusable (%s); ranks that only read see the disk tier only", path, e
            )
            return None
        log.info(
            "kvdrive: replica mirror %s (%.0f MiB, %s)",
            path,
            cap / 2**20,
            "publishing this rank's DRAM tier" if publisher else "read by this rank",
        )
        return m

    # --- the writer's side ---------------------------------------------------------------------------------------
    def publish(self, ns: Namespace, key: bytes, blob: bytes, score: float, expires_ms: int) -> None:
        """Queue a page the writer now holds in its DRAM tier (never blocks; a full queue drops it, counted)."""
        with self._cv:
            if self._stop or len(self._queue) >= QUEUE_PAGES:
                self.counts["dropped"] += 1
                return
            self._queue.append((ns, key, blob, score, expires_ms))
            self._cv.notify()

    def _publish_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait(0.5)
                if self._stop and not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH_PAGES, len(self._queue)))]
            by_ns: dict[bytes, list] = {}
            for item in batch:
                by_ns.setdefault(item[0].id, []).append(item)
            for items in by_ns.values():
                try:
                    ok = self.store.put_many(
                        items[0][0],
                        [it[1] for it in items],
                        [it[2] for it in items],
                        scores=[it[3] for it in items],
                        expires_ms=[it[4] for it in items],
                    )
                    self.counts["published"] += sum(ok)
                    self.counts["dropped"] += len(ok) - sum(ok)
                except Exception:  # noqa: BLE001 - the publisher must survive anything; the store counts faults
                    log.exception("kvdrive: replica mirror publish failed")
                    self.counts["dropped"] += len(items)

    def wait_published(self, timeout: float) -> bool:
        """Tests and benches: wait until the queue is empty (its last batch may still be committing)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if not self._queue:
                    return True
            time.sleep(0.01)
        return False

    # --- every rank's side ---------------------------------------------------------------------------------------
    def get_many(self, ns: Namespace, keys: Sequence, outs: Sequence) -> list[bool]:
        got = self.store.get_many(ns, keys, outs)
        self.counts["hits"] += sum(got)
        return got

    def held(self, ns: Namespace, keys: Sequence) -> set[bytes]:
        """The key bytes among ``keys`` the mirror holds."""
        if not keys:
            return set()
        return {key_bytes(k) for k, on in zip(keys, self.store.contains(ns, keys)) if on}

    def drop_queued(self, doomed) -> int:
        """Drop queued pages whose namespace ``doomed(ns)`` names (a tenant's key was removed: they are in the clear
        here, as in the write-down queue); pages already in the mirror are sealed like the disk's."""
        with self._cv:
            keep = deque(it for it in self._queue if not doomed(it[0]))
            n = len(self._queue) - len(keep)
            self._queue = keep
        return n

    def clear(self, namespace_id: bytes | None = None) -> None:
        with self._cv:
            self._queue = deque(it for it in self._queue if namespace_id is not None and it[0].id != namespace_id)
        self.store.clear(namespace_id)

    def stats(self) -> dict:
        return {**self.counts, "queued": len(self._queue)}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.store.close()
