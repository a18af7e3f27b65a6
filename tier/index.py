"""The LMDB index: page records, segment accounting and namespace descriptions. Never payload bytes.

Databases in one environment:
    meta   b"next_seg" -> u32 (segment ids are never reused, so a stale location can never hit new bytes)
    ns     namespace id (16 B) -> canonical JSON description (for stats and clear)
    pages  namespace id + key tag -> Record (packed)
    segs   segment id (u32 big-endian) -> SegInfo (packed)
A page record and the accounting of the segment it lives in always change in the same transaction (I2 in
docs/invariants.md). The record layout is this module's: other modules use Record, Location and the helpers below.

Also here: the index-room policy (IndexRoom), which keeps the LMDB map from filling: commit sizing, headroom
eviction, stale readers of dead processes.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import lmdb

from .errors import StoreDirError
from .namespace import key_bytes
from .store_dir import FILE_MODE

log = logging.getLogger("kvdrive.tier")

_REC = struct.Struct("<IQIBBQQQQQf")  # I10: the on-disk record layout; existing stores depend on it
EXPIRES_AT = slice(50, 58)  # byte range of expires_ms inside a packed record: lookups test it without unpacking
_FLAGS_AT = struct.calcsize("<IQIB")  # byte offset of flags inside a packed record (after seg, off, length, codec)
_NEVER = bytes(8)  # expires_ms == 0
_SEG = struct.Struct("<QQQIB")
_U32 = struct.Struct(">I")
_SHORT_KEY = 400  # longer keys are hashed to stay well under LMDB's 511-byte key limit
SEALED = 1  # Record.flags bit: the blob on disk is an AES-GCM envelope of the page blob (tier/crypto.py)
# Record.flags bit: a trailer naming the page follows the blob (segment format 2, tier/segment_records.py); reads check
# it names the page asked for, and a rebuild can find the page from the segment file alone (I11)
FRAMED = 2

SEG_OPEN = 0  # a live writer appends to it (it holds a flock on the file)
SEG_SEALED = 1


class Location(NamedTuple):
    """Where a record's bytes are. Segments are append-only and their ids never reused (I3), so two records at one
    location name the same bytes: an entry is "still the one we read" exactly when its location is unchanged."""

    seg: int
    off: int
    length: int


class Record(NamedTuple):
    seg: int
    off: int
    length: int  # blob bytes on disk (header + body)
    codec: int
    flags: int
    checksum: int  # xxh3_64 of the blob
    raw_nbytes: int  # decoded page bytes
    created_ms: int
    atime_ms: int
    expires_ms: int  # 0: never
    score: float  # promoter value (0 until a promoter sets one)

    def pack(self) -> bytes:
        return _REC.pack(*self)

    @classmethod
    def unpack(cls, b) -> Record:
        return cls._make(_REC.unpack(b))

    @classmethod
    def unpack_live(cls, b, now_ms: int) -> Record | None:
        """The record packed in ``b`` unless there is none or it expired by ``now_ms``."""
        if b is None:
            return None
        rec = cls._make(_REC.unpack(b))
        return None if rec.expires_ms and rec.expires_ms <= now_ms else rec

    @property
    def location(self) -> Location:
        return Location(self.seg, self.off, self.length)

    @property
    def sealed(self) -> bool:
        return bool(self.flags & SEALED)

    @property
    def framed(self) -> bool:
        return bool(self.flags & FRAMED)


class SegInfo(NamedTuple):
    end: int  # committed end offset (bytes indexed or compacted away; tail past it is an orphan of a crash)
    live: int  # bytes of pages the index points at
    raw_live: int  # decoded bytes of those pages (codec ratio)
    count: int
    state: int

    def pack(self) -> bytes:
        return _SEG.pack(*self)

    @classmethod
    def unpack(cls, b) -> SegInfo:
        return cls._make(_SEG.unpack(b))


# Pages a commit changes besides the page tree's own: the main tree (sub-tree roots), meta, ns and segs leaves, and
# LMDB's free list. A sweep of batch sizes 1-64 through 128-512 KiB maps never failed a commit with 3; 6 for margin.
COMMIT_FIXED_PAGES = 6


class IndexShape(NamedTuple):
    """The LMDB map against its trees, for sizing commits. LMDB copies every page a commit changes before freeing
    the old ones, and the pages one commit freed cannot be reused by the next (a reader may still hold that
    snapshot): beyond its trees a map needs room for two commits' copies, which in a tiny map is most of it."""

    map_pages: int
    used: int  # pages the trees use, LMDB's two meta pages included
    depth: int  # of the page-record tree
    leaves: int
    branches: int
    entries: int

    def commit_pages(self, records: int) -> int:
        """Pages a commit changing ``records`` page records may need: a copy of each leaf and branch it touches, the
        new leaves the tree grows by, and the other trees' changed pages."""
        per_leaf = max(8, self.entries // max(1, self.leaves))
        return (
            min(records, self.leaves)
            + min(records * max(0, self.depth - 1), self.branches)
            + -(-records // per_leaf)
            + COMMIT_FIXED_PAGES
        )

    def commit_cap(self, records: int, share: float) -> int:
        """The most of ``records`` one commit may change with its room within ``share`` of the map (halving)."""
        budget = max(COMMIT_FIXED_PAGES + 1, int(self.map_pages * share))
        while records > 1 and self.commit_pages(records) > budget:
            records = (records + 1) // 2
        return records

    def fill(self, records: int, last: int) -> float:
        """Share of the map the trees plus the next commit's (``records``) and the last one's (``last``) room take."""
        return (self.used + self.commit_pages(records) + self.commit_pages(last)) / self.map_pages


def page_key(ns_id: bytes, key: bytes) -> bytes:
    if len(key) <= _SHORT_KEY:
        return ns_id + b"\0" + key
    return ns_id + b"\1" + hashlib.blake2b(key, digest_size=32).digest()


def seg_key(seg: int) -> bytes:
    return _U32.pack(seg)


def seg_id(k: bytes) -> int:
    return _U32.unpack(k)[0]


# sync=True, metasync=False: each commit fsyncs its data pages but not the meta page, so a *power loss* may undo the
# last commit (its pages become misses; LMDB stays consistent) while a killed process loses nothing. It halves the
# commit cost. The payload bytes are always fdatasync'd before the commit that points at them.
# LMDB forbids opening one environment twice in a process (its locks are per process): share it, refcounted.
_ENVS: dict[str, list] = {}
_ENVS_LOCK = threading.Lock()


class Index:
    def __init__(self, path: str, *, map_size: int, readonly: bool = False):
        self.path = os.path.realpath(path)
        with _ENVS_LOCK:
            ent = _ENVS.get(self.path)
            if ent is None:
                env = lmdb.open(
                    self.path,
                    map_size=map_size,
                    max_dbs=8,
                    subdir=True,
                    readonly=readonly,
                    lock=True,
                    sync=True,
                    metasync=False,
                    readahead=False,
                    max_readers=1024,
                    mode=FILE_MODE,
                )
                dbs = (
                    {name: env.open_db(name.encode(), create=not readonly) for name in ("meta", "ns", "pages", "segs")}
                    if not readonly
                    else None
                )
                if readonly:
                    with env.begin() as txn:
                        dbs = {}
                        for name in ("meta", "ns", "pages", "segs"):
                            dbs[name] = env.open_db(name.encode(), txn=txn, create=False)
                ent = [env, dbs, 0]
                _ENVS[self.path] = ent
            ent[2] += 1
        self.env, dbs, _ = ent
        self.meta, self.ns, self.pages, self.segs = dbs["meta"], dbs["ns"], dbs["pages"], dbs["segs"]
        self.closed = False

    def close(self) -> None:
        with _ENVS_LOCK:
            if self.closed:
                return  # the environment is shared: a second close must not drop another holder's reference
            self.closed = True
            ent = _ENVS.get(self.path)
            if ent is None:
                return
            ent[2] -= 1
            if ent[2] == 0:
                del _ENVS[self.path]
                ent[0].close()

    def read(self):
        self._check_open()
        return self.env.begin(buffers=False)

    def write(self):
        self._check_open()
        return self.env.begin(write=True)

    def _check_open(self) -> None:
        # the environment may still be open for another store object in this process: refuse explicitly rather
        # than keep working (or fail with lmdb's "closed/deleted/dropped object") after this one was closed
        if self.closed:
            raise StoreDirError(f"store {os.path.dirname(self.path)} is closed")

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (kill -9 of a server or a tool):
        LMDB keeps their old snapshot alive, so no page freed since can be reused and the map fills for good.
        Returns how many were cleared."""
        return self.env.reader_check()

    def shape(self) -> IndexShape:
        info = self.env.info()
        psize = self.env.stat()["psize"]
        with self.read() as txn:
            trees = [txn.stat(db) for db in (self.meta, self.ns, self.pages, self.segs)] + [self.env.stat()]
        pages = trees[2]
        return IndexShape(
            max(1, info["map_size"] // psize),  # the map in force: LMDB keeps the largest any opener gave
            2 + sum(st[k] for st in trees for k in ("branch_pages", "leaf_pages", "overflow_pages")),
            pages["depth"],
            pages["leaf_pages"],
            pages["branch_pages"],
            pages["entries"],
        )

    # --- helpers used inside a caller's write transaction ---------------------------------------------------
    def alloc_segment(self, txn) -> int:
        cur = txn.get(b"next_seg", db=self.meta)
        seg = _U32.unpack(cur)[0] if cur else 1
        txn.put(b"next_seg", _U32.pack(seg + 1), db=self.meta)
        txn.put(seg_key(seg), SegInfo(0, 0, 0, 0, SEG_OPEN).pack(), db=self.segs)
        return seg

    def seg_info(self, txn, seg: int) -> SegInfo | None:
        b = txn.get(seg_key(seg), db=self.segs)
        return SegInfo.unpack(b) if b is not None else None

    def put_pages(self, txn, seg: int, recs: list[tuple[bytes, Record]], *, end: int) -> None:
        """Point page keys at new records in ``seg`` (its committed end now ``end``); a key's previous record, if
        any, leaves its segment's accounting. The segment's own accounting is written once per batch."""
        info = self.seg_info(txn, seg) or SegInfo(0, 0, 0, 0, SEG_OPEN)
        live, raw_live, count = info.live, info.raw_live, info.count
        for pk, rec in recs:
            old = txn.get(pk, db=self.pages)
            if old is not None:
                old_rec = Record.unpack(old)
                if old_rec.seg == seg:
                    live, raw_live, count = live - old_rec.length, raw_live - old_rec.raw_nbytes, count - 1
                else:
                    self.remove_from_seg(txn, old_rec)
            txn.put(pk, rec.pack(), db=self.pages)
            live, raw_live, count = live + rec.length, raw_live + rec.raw_nbytes, count + 1
        txn.put(
            seg_key(seg),
            info._replace(live=live, raw_live=raw_live, count=count, end=max(info.end, end)).pack(),
            db=self.segs,
        )

    def remove_from_seg(self, txn, rec: Record) -> None:
        info = self.seg_info(txn, rec.seg)
        if info is None:
            return
        info = info._replace(
            live=max(0, info.live - rec.length),
            raw_live=max(0, info.raw_live - rec.raw_nbytes),
            count=max(0, info.count - 1),
        )
        txn.put(seg_key(rec.seg), info.pack(), db=self.segs)

    def delete_page(self, txn, pkey: bytes) -> Record | None:
        """Delete one page entry, keeping its segment's accounting right. Returns the removed record."""
        b = txn.get(pkey, db=self.pages)
        if b is None:
            return None
        rec = Record.unpack(b)
        txn.delete(pkey, db=self.pages)
        self.remove_from_seg(txn, rec)
        return rec

    def segments(self, txn) -> dict[int, SegInfo]:
        return {seg_id(k): SegInfo.unpack(v) for k, v in txn.cursor(db=self.segs)}

    def records(self, txn):
        """(page key, Record) of every page, in key order."""
        return ((bytes(k), Record.unpack(v)) for k, v in txn.cursor(db=self.pages))

    def leading_present(self, txn, ns_id: bytes, keys, *, now_ms: int, sealed: bool, held=None) -> int:
        """How many leading ``keys`` of namespace ``ns_id`` have a live entry written the way this store serves
        (``sealed`` or not: I6) or are ``held(key)`` elsewhere. The hot lookup of SGLang's prefix matching: tests the
        packed bytes without unpacking them."""
        short = ns_id + b"\0"
        pages = self.pages
        want = SEALED if sealed else 0
        get = txn.get  # positional (key, default, db): measurably cheaper than keywords in this loop
        n = 0
        for k in keys:
            # fast path for the common key (a str of <= _SHORT_KEY bytes): same bytes as page_key(key_bytes(k))
            if type(k) is str and 0 < len(k) <= _SHORT_KEY // 4 and k.isascii():
                b = get(short + k.encode(), None, pages)
            else:
                b = get(page_key(ns_id, key_bytes(k)), None, pages)
            if (
                b is None
                or (b[EXPIRES_AT] != _NEVER and Record.unpack(b).expires_ms <= now_ms)
                or b[_FLAGS_AT] & SEALED != want
            ) and (held is None or not held(k)):
                break
            n += 1
        return n


# --- index-room policy ---------------------------------------------------------------------------------------------
# The index is a second capacity bound: past INDEX_HIGH of the map (its trees plus the room commits need, see
# IndexShape) the lowest-value pages are evicted down to INDEX_LOW. A commit's room stays under COMMIT_SHARE of the
# map: bigger batches are indexed in several commits (only ever in a map far too small for them: more commits take
# more pages while a reader pins old ones).
INDEX_HIGH, INDEX_LOW = 0.80, 0.60
COMMIT_SHARE = 0.25


class IndexRoom:
    """Keeps room in the LMDB map for the next commits (I7): sizes commits, evicts the lowest-value pages above
    INDEX_HIGH, frees the reader slots of dead processes. Its evictions count into ``counts["evicted"]``.

    ``last_txn_records``: page records the last index commit changed (its freed pages cannot be reused by the next
    commit: see IndexShape). Whoever commits page records sets it."""

    def __init__(
        self,
        index: Index,
        *,
        store_path: str,
        low_watermark: float,
        counts: Counter,
        on_fault: Callable[[BaseException, str], None],
    ):
        self.index = index
        self.store_path = store_path
        self.low_watermark = low_watermark
        self.counts = counts
        self.on_fault = on_fault
        self.last_txn_records = 0
        self._warned_tiny_map = False

    def fill(self, records: int = 0) -> float:
        """Share of the LMDB map its trees use plus the room the next commit (``records``) and the last need."""
        return self.index.shape().fill(records, self.last_txn_records)

    def commit_size(self, records: int, *, evict: bool = True) -> int:
        """How many of ``records`` page records the next index commit may change: at most COMMIT_SHARE of the map's
        room, and what fits under INDEX_HIGH after evicting the lowest-value pages (``evict``) -- 0 if not one."""
        shape = (self.keep_headroom(records) if evict else None) or self.index.shape()
        n = shape.commit_cap(records, COMMIT_SHARE)
        while n > 1 and shape.fill(n, self.last_txn_records) > INDEX_HIGH:
            n = (n + 1) // 2
        return n if records and shape.fill(n, self.last_txn_records) <= INDEX_HIGH else 0

    def keep_headroom(self, records: int = 0) -> IndexShape | None:
        """Above INDEX_HIGH of the map, evict the lowest-value pages down to INDEX_LOW, while LMDB still has the
        free pages that deleting needs (a map full to the last page cannot even commit a delete: every change copies
        its path of pages first). ``records``: page records the coming commit changes (at most its budget). Returns
        the index's shape as it now is (None after a fault)."""
        try:
            shape = self.index.shape()
            records = shape.commit_cap(records, COMMIT_SHARE)
            fill = shape.fill(records, self.last_txn_records)
            if fill > INDEX_HIGH:
                # evicting shrinks the page tree and, with it, the room a commit may need to copy it
                tree = shape.leaves + shape.branches
                shrinks = tree + min(records, shape.leaves) + min(self.last_txn_records, shape.leaves)
                share = min(1.0, (fill - INDEX_LOW) * shape.map_pages / max(1, shrinks))
                if share >= 1.0 and not self._warned_tiny_map:
                    self._warned_tiny_map = True
                    log.warning(
                        "kvdrive: the index map of store %s (map_size %d bytes) is too small to keep pages "
                        "and still commit: it is emptied to make room each time; give the disk a larger "
                        "map_size",
                        self.store_path,
                        self.index.env.info()["map_size"],
                    )
                self.free(share, full=False)
                shape = self.index.shape()
            return shape
        except (OSError, lmdb.Error) as e:  # called on the write path: a fault, never the writer's exception
            self.on_fault(e, "index eviction")
            return None

    def clear_stale_readers(self) -> None:
        try:
            n = self.index.clear_stale_readers()
        except lmdb.Error as e:
            log.warning("kvdrive: could not check the index readers of store %s: %s", self.store_path, e)
            return
        if n:
            log.warning(
                "kvdrive: cleared %d reader slot(s) of store %s left by dead processes (their old snapshot "
                "kept every index page freed since from reuse: the map would fill for good)",
                n,
                self.store_path,
            )

    def free(self, share: float | None = None, *, full: bool = True) -> None:
        """Drop ``share`` of the pages (lowest value first; default 1 - low_watermark, as capacity eviction would),
        in small transactions: each frees pages the next can reuse, where one big delete would itself need more room
        than a full map has; a transaction that does not fit is retried smaller (down to one page). ``full``: the
        map filled up (a fault) rather than crossed the watermark. The map is not grown instead: resizing is only
        safe while no transaction is open in the process, and readers run on SGLang's threads."""
        share = 1.0 - self.low_watermark if share is None else share
        if full:
            self.clear_stale_readers()
        with self.index.read() as txn:
            cands = [(r.score, r.atime_ms, pk) for pk, r in self.index.records(txn)]
        victims = sorted(pk for _, _, pk in heapq.nsmallest(max(1, math.ceil(len(cands) * share)), cands))
        n = i = 0
        batch = 16  # halved when a commit does not fit
        # key order: neighbours share leaf pages, so each small transaction copies (needs) few new pages
        while i < len(victims):
            try:
                with self.index.write() as txn:
                    done = sum(self.index.delete_page(txn, pk) is not None for pk in victims[i : i + batch])
            except lmdb.MapFullError:
                if batch == 1:
                    break  # as much as fitted; the next map-full fault frees more
                batch //= 2
                continue
            n += done  # counted once committed
            i += batch
            self.last_txn_records = batch
        self.counts["evicted"] += n
        if full:
            log.warning(
                "kvdrive: index of store %s is full (map_size %d bytes, %d pages): evicted the %d lowest-value "
                "pages to make room; a larger disk map_size keeps more",
                self.store_path,
                self.index.env.info()["map_size"],
                len(cands),
                n,
            )
        else:
            log.info(
                "kvdrive: index of store %s above %.0f%% of its map (map_size %d bytes): evicted the %d "
                "lowest-value pages of %d",
                self.store_path,
                100 * INDEX_HIGH,
                self.index.env.info()["map_size"],
                n,
                len(cands),
            )
