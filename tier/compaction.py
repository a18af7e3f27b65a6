"""Capacity, eviction and compaction of segment files: make room for a batch, evict the lowest-value pages, rewrite
the live pages of sparse sealed segments, recover the segments of dead writers, delete emptied files.

Compaction only rewrites sealed segments (or open ones whose writer is gone: its flock is free, I4) and moves an
entry only if it still points where it did when the copy was made (its Location, I3); a segment file is deleted only
once the index no longer names it, and this process's descriptor of it closes when its last read is done (I5). One
process compacts a store at a time (the GC lock file).
"""

from __future__ import annotations

import fcntl
import heapq
import os
import threading
from collections import Counter
from collections.abc import Callable

from . import clock
from .index import (
    FRAMED,
    SEG_OPEN,
    SEG_SEALED,
    Index,
    IndexRoom,
    Record,
    SegInfo,
    seg_key,
)
from .segment_fds import SegmentFds
from .segment_records import MIN_PAGE_BYTES, Kind, trailer
from .segment_writer import SegmentWriter
from .store_dir import FILE_MODE, GC_LOCK_FILE


def _live_share(info: SegInfo) -> float:
    """Share of a segment's bytes that are live: its pages' blobs and (at least) their trailers -- SegInfo counts blob
    bytes only (I10), and without them a segment of small pages would look sparse and be compacted over and over. An
    underestimate: with ``live_ratio`` 1 every segment holding any dead bytes is still compacted (`kvdrive clear
    --tenant` relies on it to leave none of a tenant's bytes behind)."""
    return min(1.0, (info.live + info.count * MIN_PAGE_BYTES) / max(info.end, 1))


class Compactor:
    """``read_blob(rec, page_key)``: the verified blob or None (the read path's); ``drop_bad(pairs)``: drop entries
    whose bytes are missing or damaged. ``counts``: the store's counters (evicted, segments_compacted)."""

    def __init__(
        self,
        config,
        *,
        store_path: str,
        index: Index,
        room: IndexRoom,
        writer: SegmentWriter,
        fds: SegmentFds,
        write_lock: threading.RLock,
        counts: Counter,
        read_blob: Callable[[Record, bytes], object],
        drop_bad: Callable[[list], None],
    ):
        self.config = config
        self.store_path = store_path
        self.index, self.room, self.writer, self.fds = index, room, writer, fds
        self.write_lock = write_lock
        self.counts = counts
        self.read_blob, self.drop_bad = read_blob, drop_bad

    def usage(self) -> tuple[int, int, dict[int, SegInfo]]:
        """(file bytes, live bytes, segments): file bytes count this process's appends not yet indexed."""
        with self.index.read() as txn:
            segs = self.index.segments(txn)
        used = 0
        for seg, info in segs.items():
            used += max(info.end, self.writer.end if seg == self.writer.seg else 0)
        return used, sum(s.live for s in segs.values()), segs

    def make_room(self, incoming: int) -> bool:
        """Keep file bytes within capacity: evict lowest-value pages, then compact. False if ``incoming`` can't fit."""
        cap = self.config.capacity_bytes
        if incoming > cap // 4:
            return False
        used, live, _ = self.usage()
        if used + incoming <= cap * self.config.high_watermark:
            return True
        target_live = int(cap * self.config.low_watermark) - incoming
        if live > target_live:
            self.evict(live - target_live)
        self.compact()
        used, _, _ = self.usage()
        if used + incoming > cap and self.writer.seg:
            # our own open segment can only be reclaimed once sealed
            self.writer.seal()
            self.compact()
            used, _, _ = self.usage()
        if used + incoming > cap:
            # Dead bytes spread thinly over many segments: none is sparse enough for the usual ratio, and the
            # file bytes sit at the cap although live bytes are well below it. Compact any segment holding dead
            # bytes (emptiest first, as headroom allows), and if even that finds no room, drop the emptiest
            # segment's pages outright (log-structured eviction) — the store must never wedge into refusing writes.
            self.compact(live_ratio=1.0)
            used, _, _ = self.usage()
            while used + incoming > cap and self.evict_emptiest_segment():
                used, _, _ = self.usage()
        return used + incoming <= cap

    def evict(self, nbytes: int) -> None:
        """Drop the lowest-value pages (score, then least recently used) totalling at least ``nbytes``."""
        with self.index.read() as txn:
            cands = [(r.score, r.atime_ms, pk, r.length) for pk, r in self.index.records(txn)]
        avg = max(1, sum(c[3] for c in cands) // max(1, len(cands)))
        victims = heapq.nsmallest(min(len(cands), nbytes // avg + 16), cands)
        freed = n = 0
        with self.index.write() as txn:  # I2: delete_page keeps the segment's accounting in the same commit
            for _, _, pk, length in victims:
                if freed >= nbytes:
                    break
                if self.index.delete_page(txn, pk) is not None:
                    freed += length
                    n += 1
        self.room.last_txn_records = n
        self.counts["evicted"] += n

    def evict_emptiest_segment(self) -> bool:
        """Evict every page of the sealed segment with the fewest live bytes and delete it. False if none."""
        with self.index.read() as txn:
            segs = self.index.segments(txn)
        cands = sorted(
            (info.live, seg) for seg, info in segs.items() if seg != self.writer.seg and info.state == SEG_SEALED
        )
        if not cands:
            return False
        seg = cands[0][1]
        with self.index.read() as txn:
            doomed = [pk for pk, r in self.index.records(txn) if r.seg == seg]
        with self.index.write() as txn:
            n = sum(self.index.delete_page(txn, pk) is not None for pk in doomed)
            info = self.index.seg_info(txn, seg)
            emptied = info is not None and info.count == 0
            if emptied:
                txn.delete(seg_key(seg), db=self.index.segs)
        self.room.last_txn_records = n
        self.counts["evicted"] += n
        if not emptied:
            return False  # something still points into it (should not happen for a sealed segment): keep the file
        self.remove_segment_file(seg)
        self.counts["segments_compacted"] += 1
        return True

    def remove_segment_file(self, seg: int) -> None:
        """Delete a segment's file once the index no longer names it (closing this process's cached handles)."""
        self.fds.forget(seg)
        try:
            os.unlink(self.fds.path(seg))
        except FileNotFoundError:
            pass

    def writer_alive(self, seg: int) -> bool:
        """Whether ``seg``'s writer still holds its flock (I4): ours, or another live process's."""
        if seg == self.writer.seg:
            return True
        try:
            fd = os.open(self.fds.path(seg), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False  # nobody holds it: its writer is gone
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def recover_dead_writers(self, segs: dict[int, SegInfo]) -> None:
        """Seal open segments whose writer is gone, cutting any unindexed (crash-orphaned) tail."""
        for seg, info in segs.items():
            if info.state != SEG_OPEN or self.writer_alive(seg):
                continue
            # Cut at the end committed *now*: ``segs`` may predate the writer's last commits before it died, and
            # cutting at that older end destroyed committed pages (found by bench/stress/kill_stress.py). A dead
            # writer commits nothing more, and the write transaction keeps other recoverers out meanwhile.
            with self.index.write() as txn:
                cur = self.index.seg_info(txn, seg)
                if cur is None or cur.state != SEG_OPEN:
                    segs[seg] = cur  # sealed or gone meanwhile (another process recovered or compacted it)
                    continue
                try:
                    os.truncate(self.fds.path(seg), cur.end)
                except FileNotFoundError:
                    pass
                txn.put(seg_key(seg), cur._replace(state=SEG_SEALED).pack(), db=self.index.segs)
            segs[seg] = cur._replace(state=SEG_SEALED)
        for seg in [seg for seg, info in segs.items() if info is None]:
            del segs[seg]

    def compact(self, live_ratio: float | None = None) -> int:
        """Rewrite live pages out of sparse sealed segments (live share below ``live_ratio``, default the config's
        gc_live_ratio) and delete emptied ones. Returns segments reclaimed."""
        gc_fd = os.open(os.path.join(self.store_path, GC_LOCK_FILE), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(gc_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is compacting this store right now
            with self.write_lock:
                return self._compact_locked(self.config.gc_live_ratio if live_ratio is None else live_ratio)
        finally:
            os.close(gc_fd)

    def _compact_locked(self, live_ratio: float) -> int:
        with self.index.read() as txn:
            segs = self.index.segments(txn)
        self.recover_dead_writers(segs)
        victims = sorted(
            (info.live, seg)
            for seg, info in segs.items()
            if seg != self.writer.seg
            and info.state == SEG_SEALED
            and (info.count == 0 or _live_share(info) < live_ratio)
        )
        if not victims:
            return 0
        vset = {seg for _, seg in victims}
        by_seg: dict[int, list[tuple[bytes, Record]]] = {}
        with self.index.read() as txn:
            for pk, r in self.index.records(txn):
                if r.seg in vset:
                    by_seg.setdefault(r.seg, []).append((pk, r))
        cap = self.config.capacity_bytes
        reclaimed = 0
        for live, seg in victims:  # emptiest first; each is deleted before the next is copied (bounded overshoot)
            moving = by_seg.get(seg, [])
            if moving and self.usage()[0] + live > cap:
                continue  # copying forward would break the byte cap; eviction must free more first
            batch, batch_bytes, bad = [], 0, []
            limit = max(64 << 10, self.config.segment_bytes // 4)
            for pk, rec in moving:
                blob = self.read_blob(rec, pk)
                if blob is None:
                    bad.append((pk, rec))
                    continue
                batch.append((pk, rec, blob))
                batch_bytes += len(blob)
                if batch_bytes >= limit:
                    self._move(batch)
                    batch, batch_bytes = [], 0
            if batch:
                self._move(batch)
            if bad:
                self.drop_bad(bad)
            with self.index.write() as txn:
                info = self.index.seg_info(txn, seg)
                if info is None or info.count:
                    continue  # not empty after all (should not happen): keep it
                txn.delete(seg_key(seg), db=self.index.segs)
            self.remove_segment_file(seg)  # the index no longer names this segment: now the file can go
            reclaimed += 1
        self.counts["segments_compacted"] += reclaimed
        return reclaimed

    def _move(self, batch: list[tuple[bytes, Record, bytes]]) -> None:
        """Copy ``batch`` to the writer segment (format 2: each blob with its trailer, and the description of each
        namespace the segment does not hold yet, I11) and repoint the entries that did not change meanwhile."""
        now = clock.now_ms()
        tails = [
            trailer(Kind.PAGE, rec.flags & ~FRAMED, rec.codec, pk, blob, rec.raw_nbytes, rec.created_ms, rec.expires_ms)
            for pk, rec, blob in batch
        ]
        total = sum(len(b) for _, _, b in batch) + sum(len(t) for t in tails)
        with self.index.read() as txn:
            descs = {nid: txn.get(nid, db=self.index.ns) for nid in {pk[:16] for pk, _, _ in batch}}
        seg, off0 = self.writer.reserve(total + sum(len(d) + 64 for d in descs.values() if d is not None))
        bufs: list = []
        for (_, _, blob), tail in zip(batch, tails):
            bufs += [blob, tail]
        for nid, desc in descs.items():
            if desc is not None and nid not in self.writer.described:
                bufs += [desc, trailer(Kind.NAMESPACE, 0, 0, nid, desc, 0, now, 0)]
        off = off0
        end, synced = self.writer.append(bufs, off0)
        synced.result()  # I1: the copy is durable before the index points at it
        self.writer.described.update(nid for nid, desc in descs.items() if desc is not None)
        moved = []
        with self.index.write() as txn:
            for (pk, rec, blob), tail in zip(batch, tails):
                cur = txn.get(pk, db=self.index.pages)
                moved_rec = rec._replace(seg=seg, off=off, flags=rec.flags | FRAMED)
                off += len(blob) + len(tail)
                if cur is None or Record.unpack(cur).location != rec.location:
                    continue  # deleted or rewritten meanwhile: the copy is dead bytes
                moved.append((pk, moved_rec))
            self.index.put_pages(txn, seg, moved, end=end)  # also takes the old copies out of their segment (I2)
        self.room.last_txn_records = len(moved)
        self.writer.end = end
        self.writer.seal_if_full()
