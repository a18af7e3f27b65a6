"""The LMDB index: page records, segment accounting and namespace descriptions. Never payload bytes.

Databases in one environment:
    meta   b"next_seg" -> u32 (segment ids are never reused, so a stale location can never hit new bytes)
    ns     namespace id (16 B) -> canonical JSON description (for stats and clear)
    pages  namespace id + key tag -> Record (packed)
    segs   segment id (u32 big-endian) -> SegInfo (packed)
A page record and the accounting of the segment it lives in always change in the same transaction.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from typing import NamedTuple

import lmdb

from .errors import StoreDirError
from .store_dir import FILE_MODE

_REC = struct.Struct("<IQIBBQQQQQf")
EXPIRES_AT = slice(50, 58)  # byte range of expires_ms inside a packed record: lookups test it without unpacking
_SEG = struct.Struct("<QQQIB")
_U32 = struct.Struct(">I")
_SHORT_KEY = 400  # longer keys are hashed to stay well under LMDB's 511-byte key limit

SEG_OPEN = 0  # a live writer appends to it (it holds a flock on the file)
SEG_SEALED = 1


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
    def unpack(cls, b) -> "Record":
        return cls._make(_REC.unpack(b))


class SegInfo(NamedTuple):
    end: int  # committed end offset (bytes indexed or compacted away; tail past it is an orphan of a crash)
    live: int  # bytes of pages the index points at
    raw_live: int  # decoded bytes of those pages (codec ratio)
    count: int
    state: int

    def pack(self) -> bytes:
        return _SEG.pack(*self)

    @classmethod
    def unpack(cls, b) -> "SegInfo":
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
        return (min(records, self.leaves) + min(records * max(0, self.depth - 1), self.branches)
                + -(-records // per_leaf) + COMMIT_FIXED_PAGES)

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
                env = lmdb.open(self.path, map_size=map_size, max_dbs=8, subdir=True, readonly=readonly,
                                lock=True, sync=True, metasync=False, readahead=False, max_readers=1024,
                                mode=FILE_MODE)
                dbs = {name: env.open_db(name.encode(), create=not readonly)
                       for name in ("meta", "ns", "pages", "segs")} if not readonly else None
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
        return IndexShape(max(1, info["map_size"] // psize),  # the map in force: LMDB keeps the largest any opener gave
                          2 + sum(st[k] for st in trees for k in ("branch_pages", "leaf_pages", "overflow_pages")),
                          pages["depth"], pages["leaf_pages"], pages["branch_pages"], pages["entries"])

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
        txn.put(seg_key(seg), info._replace(live=live, raw_live=raw_live, count=count,
                                            end=max(info.end, end)).pack(), db=self.segs)

    def remove_from_seg(self, txn, rec: Record) -> None:
        info = self.seg_info(txn, rec.seg)
        if info is None:
            return
        info = info._replace(live=max(0, info.live - rec.length), raw_live=max(0, info.raw_live - rec.raw_nbytes),
                             count=max(0, info.count - 1))
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
