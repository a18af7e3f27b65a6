"""The write-down queue: encoded pages on their way from memory to the disk store, and the writer thread draining it.

Pages leaving the DRAM pool (``demote``, the pool's callback) and write-through copies (``enqueue``) wait here, oldest
first, bounded by ``writedown_queue_bytes``; one writer thread takes them in batches of ``writedown_batch_bytes`` and
writes each batch with one ``DiskStore.put_many`` (group commit). A queued page stays readable (``queued_blob``) until
its batch has committed, and leaves the queue only then (I9 in docs/invariants.md: a page is never invisible between
the tiers). When the queue is full a write-down is dropped and counted, never blocking the caller (``block=True``:
flush and close wait for room instead). The writer thread also runs the engine's periodic upkeep (``maintain``).

When the disk's codec (``disk_codec``: tier/codec_choice.py, e.g. raw in DRAM and zstd on disk) differs from a queued
page's, the writer thread re-encodes the page for the disk -- lossless pages only (raw <-> zstd); a lossy page is
written as it is, never re-encoded. The queue keeps the page as the DRAM tier holds it until its batch commits (I9).

``TierEngine`` owns one and keeps the page API and the tier order; this module only moves pages down. Split from
engine.py (issue 16).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np

from . import clock
from .codecs import HEADER, decode_page, encode_page, get_codec, peek_header
from .disk_store import DiskStore
from .dram_pool import DramPool, PoolKey
from .errors import CodecError, ConfigError
from .namespace import Namespace

log = logging.getLogger("kvdrive.tier")

# selective write-down: a page leaving DRAM unadmitted goes down only while the queue holds under this share of its
# bound (the writer keeps up; admitted pages always have the rest) -- see WriteDown._spare
SPARE_QUEUE_SHARE = 0.25


class QueuedPage(NamedTuple):
    """One page in the write-down queue: readable (``TierEngine.get_many``) until it is on disk."""

    ns: Namespace
    blob: bytes  # the encoded page, as the DRAM pool holds it
    score: float  # the promoter's value: the disk store evicts the lowest first
    expires_ms: int  # wall-clock ms (tier/clock.py); 0: never


class WriteDown:
    """The queue of pages waiting for ``disk`` and its writer thread (``start``). Counts, in ``counts``:
    ``writedown_dropped`` (a full queue, or the disk refused the page), ``not_admitted_dropped`` (selective: a page
    left the DRAM pool unadmitted while the disk had no spare bandwidth or room), ``not_admitted_spilled`` (one that
    went down on spare ones) and ``writedown_reencoded`` (pages re-encoded to ``disk_codec``).
    """

    def __init__(
        self,
        disk: DiskStore | None,
        *,
        queue_bytes: int,
        batch_bytes: int,
        maintain_interval_s: float,
        selective: bool,
        admitted: Callable[[Namespace, bytes], bool],
        maintain: Callable[[], None],
        disk_codec: str | None = None,
    ):
        self.disk = disk
        # lossless pages are written to disk in this codec (None: as queued); tier/codec_choice.py chooses it
        self.disk_codec = None if disk_codec is None else get_codec(disk_codec)
        if self.disk_codec is not None and not self.disk_codec.lossless:
            raise ConfigError(f"the write-down re-encodes lossless pages only; disk codec {disk_codec!r} is lossy")
        self.queue_bytes = queue_bytes
        self.batch_bytes = batch_bytes
        self.maintain_interval_s = maintain_interval_s
        self.selective = selective
        self._admitted = admitted
        self._maintain = maintain
        self.counts = Counter()
        self.pool: DramPool | None = None  # pages written down are marked on disk there (start)
        # (namespace, keys, blobs) of each batch that landed on disk, on the writer thread: the owner's hook
        # (TierEngine.on_written_down; the remote tier's write-behind). It must not block; an exception is logged
        self.on_written: Callable[[Namespace, list, list], None] | None = None
        # oldest first; readable until on disk (I9)
        self._queue: OrderedDict[PoolKey, QueuedPage] = OrderedDict()
        self._bytes = 0
        self._cv = threading.Condition()
        self._inflight = 0  # batches taken off the queue's head but not yet committed
        # the disk has room below its high watermark (no eviction needed): refreshed by the writer thread after each
        # batch and upkeep, read by _spare without touching the index
        self.disk_room = disk is not None
        self._stop = False
        self._writer: threading.Thread | None = None

    def __contains__(self, pk: PoolKey) -> bool:
        return pk in self._queue

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def start(self, pool: DramPool) -> None:
        """Start the writer thread (only with a disk store); written pages are marked on disk in ``pool``."""
        self.pool = pool
        if self.disk is not None:
            self._writer = threading.Thread(target=self._writer_loop, name="kvdrive-writedown", daemon=True)
            self._writer.start()

    def enqueue(
        self, pk: PoolKey, ns: Namespace, blob: bytes, score: float, expires_ms: int = 0, block: bool = False
    ) -> bool:
        """Queue a page for the disk. False: dropped (the queue is full and ``block`` is off, the page is larger than
        the whole queue, the disk tier is off, or the writer is stopping)."""
        with self._cv:
            if pk in self._queue:
                return True
            while self._bytes + len(blob) > self.queue_bytes:
                # a page larger than the whole queue never fits: waiting for room hung close() (found by fuzzing)
                if not block or self._stop or not self.disk.available() or len(blob) > self.queue_bytes:
                    self.counts["writedown_dropped"] += 1
                    return False
                self._cv.wait(0.1)
            self._queue[pk] = QueuedPage(ns=ns, blob=blob, score=score, expires_ms=expires_ms)
            self._bytes += len(blob)
            self._cv.notify_all()
        return True

    def queued_blob(self, pk: PoolKey) -> bytes | None:
        item = self._queue.get(pk)
        if item is None or clock.expired(item.expires_ms):  # expired pages are never served
            return None
        return item.blob

    def demote(self, victims: Iterable[tuple[PoolKey, Any]]) -> int:
        """The DRAM pool's callback: victims not yet on disk join the queue (non-blocking; a full queue drops them).
        The pool keeps a victim readable until this returns (I9), and the queue keeps it readable from then on.

        Selective: a victim the promoter has not admitted goes down only on spare bandwidth and room (``_spare``),
        else it leaves the tiers here (``not_admitted_dropped``)."""
        if self.disk is None:
            return 0
        n = 0
        for k, e in victims:
            if e.expired():
                continue
            if self.selective and not self._admitted(e.ns, k[1]):
                if not self._spare(len(e.blob)) or not self.enqueue(k, e.ns, e.blob, e.score, e.expires_ms):
                    self.counts["not_admitted_dropped"] += 1  # the disk is busy or full: leaves the tiers here
                    continue
                self.counts["not_admitted_spilled"] += 1
                n += 1
                continue
            n += self.enqueue(k, e.ns, e.blob, e.score, e.expires_ms)
        return n

    def _spare(self, nbytes: int) -> bool:
        """Whether a page not (yet) admitted may take the disk's spare capacity: the writer is keeping up (the queue
        holds under ``SPARE_QUEUE_SHARE`` of its bound) and the disk has room without evicting anything.

        Why: a page's second use often comes after an 8 MiB DRAM tier has already evicted it, so dropping every
        unadmitted victim lost exactly the pages admission waits for -- the serving bench's agent rounds found no
        history on kvdrive's disk and its restart recomputed every document (bench/results/serving-cpu.md). On
        disk such a page keeps its score, so it is the first evicted; under write pressure it is still dropped,
        so a one-off prompt never costs an admitted page its disk bandwidth or its place."""
        return self._bytes + nbytes <= self.queue_bytes * SPARE_QUEUE_SHARE and self.disk_room

    def drop_where(self, pred: Callable[[PoolKey, QueuedPage], bool]) -> int:
        """Drop the queued pages ``pred`` picks (clear, crypto-erase); the number dropped."""
        with self._cv:
            gone = [pk for pk, item in self._queue.items() if pred(pk, item)]
            for pk in gone:
                self._bytes -= len(self._queue.pop(pk).blob)
        return len(gone)

    def wait_written(self, deadline: float | None) -> bool:
        """Wait until everything queued is on disk (flush's queue part). False at ``deadline`` (time.monotonic), or
        when it cannot happen: the writer thread is gone or the disk tier is off."""
        with self._cv:
            self._cv.notify_all()
            while self._queue or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._writer is None or not self._writer.is_alive() or not self.disk.available():
                    return False
                self._cv.wait(0.1 if left is None else min(left, 0.1))
        return True

    def stop(self, timeout: float = 30) -> None:
        """Stop taking pages and let the writer finish what is queued (waiting at most ``timeout`` seconds)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=timeout)

    def clear(self) -> None:
        with self._cv:
            self._queue.clear()
            self._bytes = 0

    def _writer_loop(self) -> None:
        next_maintain = time.monotonic() + self.maintain_interval_s
        while True:
            with self._cv:
                while not self._queue and not self._stop and time.monotonic() < next_maintain:
                    self._cv.wait(0.5)
                if self._stop and not self._queue:
                    return
                batch, size = [], 0
                for pk, item in self._queue.items():  # stay in the queue (readable, I9) until committed
                    batch.append((pk, item))
                    size += len(item.blob)
                    if size >= self.batch_bytes:
                        break
                self._inflight += 1
            try:
                if batch:
                    self._write_batch(batch)
                upkeep = time.monotonic() >= next_maintain
                if upkeep:
                    next_maintain = time.monotonic() + self.maintain_interval_s
                    self._maintain()
                if batch or upkeep:  # what the disk holds changed (writes, expiry, compaction)
                    self.disk_room = self.disk.has_room()
            except Exception:  # the writer must survive anything; the store counts the faults
                log.exception("kvdrive: write-down batch failed")
            finally:
                with self._cv:
                    self._inflight -= 1
                    for pk, item in batch:
                        if self._queue.get(pk) is item:
                            del self._queue[pk]
                            self._bytes -= len(item.blob)
                    self._cv.notify_all()
            if batch and not self.disk.available():
                time.sleep(0.05)  # the store is off after a fault: its pages were dropped; don't spin

    def _write_batch(self, batch: list[tuple[PoolKey, QueuedPage]]) -> None:
        by_ns: dict[bytes, list[tuple[PoolKey, QueuedPage]]] = {}
        for pk, item in batch:
            by_ns.setdefault(item.ns.id, []).append((pk, item))
        for items in by_ns.values():
            ns = items[0][1].ns
            blobs = [self._for_disk(it.blob) for _, it in items]
            ok = self.disk.put_many(
                ns,
                [pk[1] for pk, _ in items],
                blobs,
                scores=[it.score for _, it in items],
                expires_ms=[it.expires_ms for _, it in items],
            )
            done = [(pk, it.blob, b) for (pk, it), b, o in zip(items, blobs, ok) if o]
            # the pool marks its entry by identity with the blob it holds (the queued one), not the disk's copy
            self.pool.mark_on_disk([pk for pk, _, _ in done], [q for _, q, _ in done])
            if done and self.on_written is not None:
                try:
                    self.on_written(ns, [pk[1] for pk, _, _ in done], [b for _, _, b in done])
                except Exception:  # noqa: BLE001 - a hook's failure must not stop the write-down
                    log.exception("kvdrive: the written-down hook failed")
            self.counts["writedown_dropped"] += len(items) - len(done)

    def _for_disk(self, blob: bytes) -> bytes:
        """``blob`` as the disk stores it: re-encoded to ``disk_codec`` when it is lossless and in another codec, else
        as it is. A blob that cannot be decoded is written as it is: reading it back fails its decode, a miss."""
        target = self.disk_codec
        if target is None:
            return blob
        try:
            h = peek_header(blob)
            source = get_codec(h.codec)
            if source.code == target.code or not source.lossless:  # lossy pages are never re-encoded
                return blob
            if source.name == "raw":  # the body is the page's bytes: encode from them, no decode (RawCodec's note)
                page = memoryview(blob).cast("B")[HEADER.size :]
                if len(page) != h.raw_nbytes:
                    raise CodecError(f"raw page body is {len(page)} bytes, its header says {h.raw_nbytes}")
            else:
                page = np.empty(h.raw_nbytes, np.uint8)
                decode_page(blob, page, h.dtype_name)
            out = encode_page(page, h.dtype_name, target, h.row_len)
        except CodecError:
            log.warning("kvdrive: a queued page could not be re-encoded to %s; writing it as it is", target.name)
            return blob
        self.counts["writedown_reencoded"] += 1
        return out
