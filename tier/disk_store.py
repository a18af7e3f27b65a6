"""The persistent tier: pages in append-only segment files, located by an LMDB index.

Write order makes it crash-safe: the payload is written and fdatasync'd *before* the index transaction that points at
it commits (one durable commit per batch: group commit). A crash can leave orphan bytes at a segment's tail, never an
entry pointing at torn or missing data. Every read verifies the xxh3 checksum; a mismatch is a miss, the entry is
dropped and counted, never served.

Several processes (one per TP rank) may share a store: LMDB serialises index writes, and each process appends to a
segment of its own (a fresh, never-reused id, flock'ed while open), so no two writers ever touch the same file.
Compaction only rewrites sealed segments (or open ones whose writer is gone: its flock is free) and moves an entry only
if the entry still points where it did when the copy was made.

This module is the public API and the read path; the parts have a module each: disk_config.py (config, stats),
page_writer.py (put_many's steps), segment_writer.py (appends, fsync, seal), segment_fds.py + handle_cache.py (read
descriptors), compaction.py (capacity, eviction, compaction), index.py (records and the index-room policy), crypto.py
(sealing), store_catalog.py (listing, deleting, score hints, notes), store_upkeep.py (expiry, maintain, verify). The
rules they keep are numbered in docs/invariants.md (I1, I2, ...).

Disk faults (ENOSPC, EIO, a read-only file system, a full LMDB map) turn the tier off for ``retry_after_s`` with one
log line and a counter per kind; the caller sees misses / refused writes and keeps running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence

import lmdb
import numpy as np

from . import clock
from .codecs import HEADER, CodecError, decode_page
from .compaction import Compactor
from .crypto import KeyRing, PageSealer
from .disk_config import (
    DiskStats,
    DiskStoreConfig,
    GiB,
    MiB,
    VerifyReport,
    fault_kind,
)
from .errors import ConfigError, StoreDirError
from .fileio import select_io
from .index import SEALED, IndexRoom, Record, page_key
from .namespace import Namespace, key_bytes
from .page_writer import PageWriter
from .read_runs import Dest, ReadOutcome, Want, blob_ok, dest_of, raw_page_ok, read_runs, zero_copy
from .recovery import Recovery, open_store
from .segment_fds import SegmentFds
from .segment_records import trailer_size
from .segment_writer import SegmentWriter
from .store_catalog import StoreCatalog, check_note
from .store_dir import SEGMENT_DIR
from .store_upkeep import StoreUpkeep

log = logging.getLogger("kvdrive.tier")

__all__ = ["SEALED", "DiskStats", "DiskStore", "DiskStoreConfig", "GiB", "MiB", "ReadOutcome", "VerifyReport"]


class DiskStore:
    def __init__(
        self,
        config: DiskStoreConfig,
        *,
        lock_mode: str = "shared",
        keyring: KeyRing | None = None,
        repair: bool = True,
        rebuild: bool = False,
    ):
        """Open (creating, checking and if need be repairing: tier/recovery.py) the store at ``config.path``. A
        damaged store never raises: it is repaired, moved aside, or this store runs with its disk tier off
        (``off_reason``). ``repair=False`` (the read-only ``kvdrive`` commands) raises for a damaged store instead;
        ``rebuild`` rebuilds the index from the segment files even if it checks out (``kvdrive repair --rebuild``)."""
        self.config = config
        self._counts = Counter()
        self._faults = Counter()
        self._closed = False
        self._disabled_until = 0.0
        # threads a batch's reads and decodes may use (tier/parallel.py; the engine sets TierConfig.decode_threads):
        # None, every usable core
        self.decode_threads: int | None = None
        opened = open_store(config.path, map_size=config.map_size, lock_mode=lock_mode, repair=repair, rebuild=rebuild)
        self.path = opened.path
        self.recoveries: list[Recovery] = opened.recoveries  # the ladder's steps this open took
        self.off_reason = opened.off_reason  # why the disk tier is off for good in this process (None: it is not)
        # With a key ring every page is sealed (AES-GCM, per-tenant key) before it reaches the disk, and only sealed
        # pages are served: the index is not authenticated, so a plaintext entry could have been planted (I6).
        self._sealer = PageSealer(keyring, store_path=self.path) if keyring is not None else None
        self._lock = opened.lock
        self.index = opened.index
        if self.index is None:
            return  # off: every call below answers "nothing here" without touching the directory
        self.index_room = IndexRoom(
            self.index,
            store_path=self.path,
            low_watermark=config.low_watermark,
            counts=self._counts,
            on_fault=self._fault,
        )
        self.index_room.clear_stale_readers()
        io = select_io(config.io, handles=config.fd_cache)
        seg_dir = os.path.join(self.path, SEGMENT_DIR)
        self._write_lock = threading.RLock()  # one writer segment per process; index writes serialise in LMDB
        self.fds = SegmentFds(seg_dir, io, config.fd_cache)
        self.writer = SegmentWriter(
            self.index,
            seg_dir,
            io,
            segment_bytes=config.segment_bytes,
            direct_io=config.direct_io,
            staging_bytes=config.staging_bytes,
            faults=self._faults,
            store_path=self.path,
        )
        self.compactor = Compactor(
            config,
            store_path=self.path,
            index=self.index,
            room=self.index_room,
            writer=self.writer,
            fds=self.fds,
            write_lock=self._write_lock,
            counts=self._counts,
            read_blob=self._read_blob,
            drop_bad=self._drop_bad,
        )
        self._pages = PageWriter(self.index, self.index_room, self.writer, self._sealer)
        self.catalog = StoreCatalog(self.index, self.index_room, self._pages, self._write_lock)
        self.upkeep = StoreUpkeep(
            self.index,
            room=self.index_room,
            compactor=self.compactor,
            fds=self.fds,
            pages=self._pages,
            write_lock=self._write_lock,
            counts=self._counts,
            faults=self._faults,
            read_blob=self._read_blob,
            drop_bad=self._drop_bad,
        )

    @property
    def _io(self):
        """The file I/O backend (tier/fileio.py); bench/tier_bench.py wraps it to time reads and writes."""
        return self.fds.io

    @_io.setter
    def _io(self, io) -> None:
        self.fds.io = self.writer.io = io

    # --- public API ----------------------------------------------------------------------------------------
    def put_many(
        self,
        ns: Namespace,
        keys: Sequence,
        blobs: Sequence[bytes],
        *,
        scores: Sequence[float] | None = None,
        ttl_s: float | None = None,
        expires_ms: Sequence[int] | None = None,
    ) -> list[bool]:
        """Store encoded pages. True for each page now on disk (written here or already there).

        ``expires_ms``: per-page absolute expiry (ms since the epoch, 0 never), instead of ``ttl_s`` from now (pages
        that waited in a queue keep the expiry they were given); a page already past it is not written (False).
        In four steps: check the arguments, plan the batch (what is not there yet, sealed), write it durably, index
        it."""
        headers = PageWriter.check(ns, keys, blobs, scores, ttl_s, expires_ms)
        if not self.available():
            return [False] * len(keys)
        if self._sealer is not None and not self._sealer.has_key(ns.tenant):
            self._sealer.refuse_unkeyed(ns.tenant, len(keys))
            return [False] * len(keys)
        pkeys = [page_key(ns.id, key_bytes(k)) for k in keys]
        now = clock.now_ms()
        if expires_ms is None:
            ttl = ttl_s if ttl_s is not None else self.config.default_ttl_s
            expiry = [now + int(ttl * 1000) if ttl else 0] * len(keys)
        else:
            expiry = [int(e) for e in expires_ms]
        with self._write_lock:
            have = self._present(pkeys, now)
            batch = self._pages.plan(ns, pkeys, blobs, have, expiry, now)
            if batch is None:
                return have
            if not batch.todo:
                return [h or not 0 < e <= now for h, e in zip(have, expiry)]
            if not self.compactor.make_room(self._pages.append_bytes(ns, pkeys, batch)):
                self._counts["rejected_full"] += len(batch.todo)
                return have
            try:
                seg, recs, end = self._pages.write_durably(ns, pkeys, headers, batch, expiry, scores, now)
                evicted = self._counts["evicted"]
                done = self._pages.index_records(ns, seg, recs, end, ttl=any(expiry[i] for i in batch.todo))
                self.writer.seal_if_full()
            except (OSError, lmdb.Error) as e:
                self._fault(e, "write")
                self.writer.abandon()
                if isinstance(e, lmdb.MapFullError):
                    self.index_room.free()
                return have
            self._counts["pages_written"] += done
            self._counts["bytes_written"] += sum(r.length for _, r in recs[:done])
            self._counts["rejected_full"] += len(recs) - done  # no room left in the index: dead bytes, for GC
            if done < len(recs) or self._counts["evicted"] != evicted:
                # a map too small for the batch: its commits evicted pages to make room, maybe its own earlier ones
                return self._present(pkeys, now)
        return [not 0 < e <= now for e in expiry]

    def get_many(self, ns: Namespace, keys: Sequence, outs: Sequence) -> list[bool]:
        """Read and decode pages into the caller's buffers. False is a miss; that buffer's contents are then
        undefined."""
        if len(keys) != len(outs):
            raise ConfigError(f"get_many got {len(keys)} keys and {len(outs)} buffers; they must match")
        dests = [dest_of(o) for o in outs]
        pkeys = [page_key(ns.id, key_bytes(k)) for k in keys]
        result = [False] * len(keys)
        if not self.available():
            self._counts["misses"] += len(keys)
            return result
        now = clock.now_ms()
        with self.index.read() as txn:
            recs = [self._usable(txn.get(pk, db=self.index.pages), now) for pk in pkeys]
        for i, rec in enumerate(recs):
            # the caller's mistake, said as such: a read into it would fail the size check and drop a good page
            if rec is not None and rec.raw_nbytes != dests[i].nbytes:
                raise CodecError(
                    f"page {keys[i]!r} holds {rec.raw_nbytes} bytes; its output buffer holds {dests[i].nbytes}"
                )
        bad = self._read_pages([(i, r) for i, r in enumerate(recs) if r is not None], dests, ns, pkeys, now, result)
        if bad:
            # another process may have compacted the segment away: look the failed entries up once more, and read
            # those that moved
            with self.index.read() as txn:
                moved = [
                    (i, cur)
                    for i, rec in bad
                    for cur in (self._usable(txn.get(pkeys[i], db=self.index.pages), now),)
                    if cur is not None and cur.location != rec.location
                ]
            if moved:
                retried = {i for i, _ in moved}
                bad = [(i, rec) for i, rec in bad if i not in retried]
                bad += self._read_pages(moved, dests, ns, pkeys, now, result)
        if bad:
            self._drop_bad([(pkeys[i], rec) for i, rec in bad])
        n_hit = sum(result)
        self._counts["hits"] += n_hit
        self._counts["misses"] += len(keys) - n_hit
        return result

    def read_blobs(self, ns: Namespace, keys: Sequence) -> list[tuple[np.ndarray, int] | None]:
        """Verified encoded blobs and their expiry (ms since the epoch, 0 never), for promotion into the DRAM tier
        without decoding (TierEngine.promote). None: a miss."""
        pkeys = [page_key(ns.id, key_bytes(k)) for k in keys]
        if not self.available():
            return [None] * len(keys)
        now = clock.now_ms()
        with self.index.read() as txn:
            recs = [self._usable(txn.get(pk, db=self.index.pages), now) for pk in pkeys]
        items = [(i, rec) for i, rec in enumerate(recs) if rec is not None]
        out: list = [None] * len(keys)

        def finish(k: int, blob) -> ReadOutcome:  # on the worker pool: a verified blob, opened if sealed
            i, rec = items[k]
            outcome, blob = self._opened(rec, blob, ns, pkeys[i])
            if blob is not None:
                out[i] = (blob, rec.expires_ms)
            return outcome

        outcomes = self._read_runs([Want(rec, pkeys[i], None) for i, rec in items], ns, finish)
        bad = []
        for (i, rec), outcome in zip(items, outcomes):
            if outcome is None:  # the runs could not serve it: read it alone, as before runs
                outcome, blob = self._read_blob_alone(rec, ns, pkeys[i])
                if blob is not None:
                    out[i] = (blob, rec.expires_ms)
            if outcome is ReadOutcome.OK:
                self._pages.touched[pkeys[i]] = now
            elif outcome is ReadOutcome.BAD:
                bad.append((pkeys[i], rec))
        if bad:
            self._drop_bad(bad)
        n_hit = sum(b is not None for b in out)
        self._counts["hits"] += n_hit
        self._counts["misses"] += len(keys) - n_hit
        return out

    def exists_many(self, ns: Namespace, keys: Sequence, held=None) -> int:
        """Number of leading keys present (SGLang counts storage hits this way: a prefix stops at its first miss).

        ``held(key) -> bool`` optionally names keys held elsewhere (an upper tier) that count as hits too.
        """
        if not self.available() or (self._sealer is not None and not self._sealer.has_key(ns.tenant)):
            n = 0
            for k in keys:
                if held is None or not held(k):
                    break
                n += 1
            return n
        with self.index.read() as txn:  # I6: entries written the other way (sealed or not) are unusable here
            return self.index.leading_present(
                txn, ns.id, keys, now_ms=clock.now_ms(), sealed=self._sealer is not None, held=held
            )

    def contains(self, ns: Namespace, keys: Sequence) -> list[bool]:
        if self.index is None:
            return [False] * len(keys)
        now = clock.now_ms()
        if self._sealer is not None and not self._sealer.has_key(ns.tenant):
            return [False] * len(keys)
        with self.index.read() as txn:
            return [
                self._usable(txn.get(page_key(ns.id, key_bytes(k)), db=self.index.pages), now) is not None for k in keys
            ]

    def set_scores(self, ns: Namespace, keys: Sequence, scores: Sequence[float]) -> None:
        """Record the promoter's value for pages (eviction takes the lowest first). Skipped while the tier is off."""
        if not self.available():
            return
        try:
            self.catalog.set_scores(ns, keys, scores)  # in small transactions, never evicting pages (I7)
        except (OSError, lmdb.Error) as e:  # e.g. a full map: a fault like any other, never the caller's exception
            self._fault(e, "scores")
            if isinstance(e, lmdb.MapFullError):
                with self._write_lock:
                    self.index_room.free()

    # --- contents and notes (tier/store_catalog.py) ---------------------------------------------------------
    def delete_many(self, ns: Namespace, keys: Sequence) -> int:
        return self.catalog.delete_many(ns, keys) if self.index is not None else 0

    def clear(self, namespace_id: bytes | None = None) -> int:
        """Drop every page (of one namespace, or all); space comes back at the next compaction."""
        return self.catalog.clear(namespace_id) if self.index is not None else 0

    def keys(self, ns: Namespace) -> list[bytes]:
        """Keys of every page held for ``ns`` (hashed for keys over 400 bytes)."""
        return self.catalog.keys(ns) if self.index is not None else []

    def namespaces(self) -> list[tuple[bytes, dict | None, int, int]]:
        """(namespace id, description, pages, encoded bytes) for each namespace holding pages."""
        return self.catalog.namespaces() if self.index is not None else []

    def get_note(self, name: str) -> bytes | None:
        """A small value kept with the store under ``name`` (e.g. measured costs that should outlive a restart)."""
        return self.catalog.get_note(name) if self.index is not None else None

    def put_note(self, name: str, value: bytes) -> bool:
        """Keep ``value`` (at most 64 KiB) under ``name``; False when the disk tier is off (the note is not kept)."""
        check_note(name, value)
        if not self.available():
            return False
        try:
            self.catalog.put_note(name, value)
        except (OSError, lmdb.Error) as e:
            self._fault(e, "write")
            return False
        return True

    # --- upkeep (tier/store_upkeep.py) ---------------------------------------------------------------------------
    def maintain(self) -> None:
        """Expire TTL'd pages, enforce capacity, compact sparse segments. Safe to call from any thread, any time."""
        if not self.available():
            return
        try:
            self.upkeep.maintain()
        except (OSError, lmdb.Error) as e:
            self._fault(e, "maintenance")

    def expire(self) -> int:
        """Delete expired pages. A full index scan, skipped while no page in the store was ever given a TTL."""
        return self.upkeep.expire() if self.index is not None else 0

    def compact(self, live_ratio: float | None = None) -> int:
        """Rewrite live pages out of sparse sealed segments (live share below ``live_ratio``, default the config's
        gc_live_ratio) and delete emptied ones. Returns segments reclaimed."""
        if self.index is None:
            return 0
        return self.compactor.compact(live_ratio)

    def verify(self) -> VerifyReport:
        """Re-read every page, check header and checksum; drop bad entries from the index."""
        return self.upkeep.verify() if self.index is not None else VerifyReport(0, 0, 0, 0)

    def stats(self) -> DiskStats:
        recoveries = dict(Counter(r.kind.value for r in self.recoveries))
        if self.index is None:
            return DiskStats(
                False,
                0,
                0,
                0,
                0,
                self.config.capacity_bytes,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                {},
                recoveries=recoveries,
            )
        c = self._counts
        return DiskStats(
            enabled=time.monotonic() >= self._disabled_until,
            **self.catalog.contents(self.fds.path)._asdict(),
            capacity_bytes=self.config.capacity_bytes,
            hits=c["hits"],
            misses=c["misses"],
            pages_written=c["pages_written"],
            bytes_written=c["bytes_written"],
            bytes_read=c["bytes_read"],
            corrupt_dropped=c["corrupt_dropped"],
            expired=c["expired"],
            evicted=c["evicted"],
            segments_compacted=c["segments_compacted"],
            rejected_full=c["rejected_full"],
            faults=dict(self._faults),
            sealed=dict(self._sealer.counts) if self._sealer is not None else {},
            recoveries=recoveries,
        )

    def has_room(self) -> bool:
        """Whether the files (dead bytes included) sit below the low watermark, where eviction stops: spare room,
        which a write takes from no page. A store that has filled evicts to just under it, so it has spare room for
        about one batch each time it evicts. False while the tier is off (the selective write-down spends only
        spare room: WriteDown._spare)."""
        if self._closed or not self.available():
            return False
        used, _, _ = self.compactor.usage()
        return used < self.config.capacity_bytes * self.config.low_watermark

    def available(self) -> bool:
        """Whether the disk tier is on: False for ``retry_after_s`` after a fault (then it tries again).
        StoreDirError once the store is closed."""
        if self._closed:
            raise StoreDirError(f"store {self.path} is closed")
        if self.index is None:
            return False
        if self._disabled_until and time.monotonic() >= self._disabled_until:
            self._disabled_until = 0.0
            log.warning("kvdrive: disk tier at %s back on after a fault; retrying", self.path)
            self.index_room.clear_stale_readers()  # a map filled by a dead process's reader comes back with it
        return not self._disabled_until

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.index is None:
            return
        with self._write_lock:
            try:
                if self._pages.touched:
                    with self.index.write() as txn:
                        self._pages.flush_touched(txn)
                self.writer.seal()
            except (OSError, lmdb.Error) as e:
                log.warning("kvdrive: closing store %s: %s", self.path, e)
        self.fds.close()
        self.writer.close()
        close_io = getattr(self.fds.io, "close", None)
        if close_io is not None:
            close_io()
        self.index.close()
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _present(self, pkeys: list[bytes], now: int) -> list[bool]:
        with self.index.read() as txn:
            return [self._usable(txn.get(pk, db=self.index.pages), now) is not None for pk in pkeys]

    # --- reading ---------------------------------------------------------------------------------------------
    def _usable(self, b, now: int) -> Record | None:
        """The live record, if this store can serve it: sealed exactly when encryption is on (I6)."""
        rec = Record.unpack_live(b, now)
        return rec if rec is None or rec.sealed == (self._sealer is not None) else None

    def _read_pages(
        self,
        items: list[tuple[int, Record]],
        dests: list[Dest],
        ns: Namespace,
        pkeys: list[bytes],
        now: int,
        result: list[bool],
    ) -> list[tuple[int, Record]]:
        """Read each (i, record) into dests[i], setting result[i] on success: in coalesced runs, verified and decoded on
        the worker pool (tier/read_runs.py); a record the runs could not serve is read again alone (that verdict
        stands). Returns those to drop (BAD); once a read fault turned the tier off, the rest are misses too, not
        more failing reads."""

        def finish(k: int, got) -> ReadOutcome:  # on the worker pool
            if got is True:  # a raw page, read and verified in place
                return ReadOutcome.OK
            i, rec = items[k]
            return self._decode_into(rec, got, dests[i], ns, pkeys[i])

        outcomes = self._read_runs([Want(rec, pkeys[i], dests[i]) for i, rec in items], ns, finish)
        bad = []
        for (i, rec), outcome in zip(items, outcomes):
            if outcome is None and not self._disabled_until:
                outcome = self._read_into(rec, dests[i], ns, pkeys[i])
            if outcome is ReadOutcome.OK:
                result[i] = True
                self._pages.touched[pkeys[i]] = now
            elif outcome is ReadOutcome.BAD:
                bad.append((i, rec))
        return bad

    def _read_runs(self, wants: list[Want], ns: Namespace, finish) -> list[ReadOutcome | None]:
        """tier/read_runs.py's coalesced read of ``wants``; counts and faults are taken here, on the caller's thread
        (the counters are not thread-safe). None: read it alone."""
        if not wants:
            return []
        runs = read_runs(self.fds, wants, ns.kv_dtype, finish, max_threads=self.decode_threads)
        self._counts["bytes_read"] += runs.bytes_read
        if runs.error is not None:
            self._fault(runs.error, "read")
        return runs.outcomes

    def _read_into(self, rec: Record, dest: Dest, ns: Namespace, pk: bytes) -> ReadOutcome:
        """One page read alone (no run): the path records take when their run could not serve them."""
        try:
            if zero_copy(rec, dest):
                # zero copy: header into a small buffer, body straight into the caller's buffer (row by row for a
                # strided one)
                hdr = bytearray(HEADER.size)
                tail = bytearray(trailer_size(pk) if rec.framed else 0)
                n = self.fds.pread(rec.seg, rec.off, [hdr, *dest.parts, tail] if rec.framed else [hdr, *dest.parts])
                if n is None or n != rec.length + len(tail):
                    return ReadOutcome.BAD
                if not raw_page_ok(hdr, dest.parts, tail, rec, pk, ns.kv_dtype):
                    return ReadOutcome.BAD
                self._counts["bytes_read"] += rec.length
                return ReadOutcome.OK
            buf = self._sealer.read_buffer(rec.length) if rec.sealed else None
            blob = self._read_blob(rec, pk, buf)
            if blob is None:
                return ReadOutcome.BAD
            return self._decode_into(rec, blob, dest, ns, pk)
        except CodecError:
            return ReadOutcome.BAD
        except OSError as e:
            self._fault(e, "read")
            return ReadOutcome.MISS

    def _decode_into(self, rec: Record, blob, dest: Dest, ns: Namespace, pk: bytes) -> ReadOutcome:
        """A verified blob (an envelope if sealed) decoded into the caller's buffer. CodecError: a damaged page.
        Runs on the worker pool (a sealer's failure counts are bumped there: rare, and at worst one is lost)."""
        outcome, plain = self._opened(rec, blob, ns, pk, scratch=True)
        if plain is not None:
            decode_page(plain, dest.target, ns.kv_dtype)
        return outcome

    def _opened(self, rec: Record, blob, ns: Namespace, pk: bytes, scratch: bool = False):
        """(outcome, the page blob or None): a sealed record's envelope opened under its tenant's key."""
        if not rec.sealed:
            return ReadOutcome.OK, blob
        plain, drop = self._sealer.unseal(ns.tenant, pk, blob, scratch=scratch)
        if plain is None:
            return (ReadOutcome.BAD if drop else ReadOutcome.MISS), None
        return ReadOutcome.OK, plain

    def _read_blob_alone(self, rec: Record, ns: Namespace, pk: bytes):
        """(outcome, the page blob or None) of one record read alone, opened if sealed (read_blobs' per-page path)."""
        try:
            blob = self._read_blob(rec, pk)
        except OSError as e:
            self._fault(e, "read")
            return ReadOutcome.MISS, None
        if blob is None:
            return ReadOutcome.BAD, None
        return self._opened(rec, blob, ns, pk)

    def _read_blob(self, rec: Record, pk: bytes, buf: np.ndarray | None = None) -> np.ndarray | None:
        """I8: the verified blob of page ``pk`` (read into ``buf`` if given: exactly rec.length bytes), or None if
        missing/short/corrupt, or (format 2) its trailer does not name ``pk``. An I/O error propagates: it says nothing
        of the data."""
        if buf is None:
            buf = np.empty(rec.length, dtype=np.uint8)  # not zero-filled: every byte is read or the blob is rejected
        # a sealed page's envelope is bound to its namespace and key (AES-GCM associated data): its trailer adds
        # nothing, and its tag is the stronger check (read_runs.blob_ok)
        named = rec.framed and not rec.sealed
        tail = bytearray(trailer_size(pk) if named else 0)
        n = self.fds.pread(rec.seg, rec.off, [buf, tail] if named else [buf])
        if n != rec.length + len(tail) or not blob_ok(buf, tail, rec, pk):
            return None
        self._counts["bytes_read"] += rec.length
        return buf

    def _drop_bad(self, bad: list[tuple[bytes, Record]]) -> None:
        n = 0
        try:
            with self._write_lock, self.index.write() as txn:
                for pk, rec in bad:
                    cur = txn.get(pk, db=self.index.pages)
                    if cur is not None and Record.unpack(cur).location == rec.location:  # still the entry we read
                        self.index.delete_page(txn, pk)
                        n += 1
        except (OSError, lmdb.Error) as e:  # a read must not fail on it: the entries stay (bad reads are misses)
            self._fault(e, "drop")
            return
        self._counts["corrupt_dropped"] += n
        if n:
            log.warning("kvdrive: dropped %d corrupt or missing page(s) from store %s (served as misses)", n, self.path)

    def _fault(self, e: BaseException, during: str) -> None:
        kind = fault_kind(e)
        self._faults[kind] += 1
        if not self._disabled_until:
            log.error(
                "kvdrive: disk tier at %s off for %gs after %s during %s: %s (requests recompute meanwhile)",
                self.path,
                self.config.retry_after_s,
                kind,
                during,
                e,
            )
        self._disabled_until = time.monotonic() + self.config.retry_after_s
