"""The persistent tier: pages in append-only segment files, located by an LMDB index.

Write order makes it crash-safe: the payload is written and fdatasync'd *before* the index transaction that points at
it commits (one durable commit per batch: group commit). A crash can leave orphan bytes at a segment's tail, never an
entry pointing at torn or missing data. Every read verifies the xxh3 checksum; a mismatch is a miss, the entry is
dropped and counted, never served.

Several processes (one per TP rank) may share a store: LMDB serialises index writes, and each process appends to a
segment of its own (a fresh, never-reused id, flock'ed while open), so no two writers ever touch the same file.
Compaction only rewrites sealed segments (or open ones whose writer is gone: its flock is free) and moves an entry only
if the entry still points where it did when the copy was made.

Disk faults (ENOSPC, EIO, a read-only file system, a full LMDB map) turn the tier off for ``retry_after_s`` with one
log line and a counter per kind; the caller sees misses / refused writes and keeps running.
"""
from __future__ import annotations

import errno
import fcntl
import heapq
import json
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import lmdb
import numpy as np
import xxhash

from .buffers import byte_view
from .codecs import HEADER, CodecError, decode_page, get_codec, peek_header
from .crypto import OVERHEAD, KeyRing, SealError, is_envelope
from .dtypes import dtype_info
from .errors import ConfigError, StoreDirError
from .fileio import ALIGN, Staging, direct_append, open_direct, select_io
from .index import (_SHORT_KEY, EXPIRES_AT, SEG_OPEN, SEG_SEALED, Index, IndexShape, Record, SegInfo, page_key,
                    seg_key)
from .namespace import Namespace, key_bytes
from .store_dir import FILE_MODE, INDEX_DIR, SEGMENT_DIR, GC_LOCK_FILE, StoreLock, check_store_dir

log = logging.getLogger("kvdrive.tier")

GiB = 1 << 30
MiB = 1 << 20
_RAW_CODEC = get_codec("raw").code
_NOTE = b"note:"  # meta-table prefix of small values kept with the store (get_note / put_note)
_NEVER = bytes(8)  # expires_ms == 0
_SCORES_PER_TXN = 32  # score updates per index transaction (see set_scores)
# The index is a second capacity bound: past _INDEX_HIGH of the map (its trees plus the room commits need, see
# IndexShape) the lowest-value pages are evicted down to _INDEX_LOW. A commit's room stays under _COMMIT_SHARE of the
# map: bigger batches are indexed in several commits (only ever in a map far too small for them: more commits take
# more pages while a reader pins old ones).
_INDEX_HIGH, _INDEX_LOW = 0.80, 0.60
_COMMIT_SHARE = 0.25
SEALED = 1  # Record.flags bit: the blob on disk is an AES-GCM envelope of the page blob (tier/crypto.py)
_FLAGS_AT = 17  # byte offset of flags inside a packed record (after seg u32, off u64, length u32, codec u8)
MAX_TTL_S = 100 * 365 * 86400  # expiry times are u64 milliseconds; a TTL past this is a mistake, not a wish


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class DiskStoreConfig:
    path: str
    capacity_bytes: int = 64 * GiB
    segment_bytes: int = 256 * MiB  # capped at capacity/16 so eviction and compaction have room to work
    default_ttl_s: float | None = None  # None: pages never expire
    gc_live_ratio: float = 0.5  # compact sealed segments whose live share fell below this
    high_watermark: float = 0.95  # start evicting above this share of capacity...
    low_watermark: float = 0.80  # ...down to this share of live bytes
    map_size: int = 64 * GiB  # LMDB map: address space only (sparse file); ~300 B a page, so ~200M pages
    retry_after_s: float = 30.0  # a faulted disk tier tries again after this long
    io: str = "auto"  # "auto" | "posix" | "kvikio"
    direct_io: bool = True  # O_DIRECT appends where the file system allows (buffered otherwise)
    staging_bytes: int = 16 * MiB  # the aligned buffer O_DIRECT appends go through
    fd_cache: int = 256

    def __post_init__(self):
        def positive(name, integer=True, most=math.inf):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) if integer else \
                isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok or not 0 < v < most:  # NaN and inf too: a NaN TTL or retry delay broke the store later
                raise ConfigError(f"disk store {name} must be a positive {'integer' if integer else 'number'}"
                                  f"{'' if most == math.inf else f' below {most:g}'}, got {v!r}")
        for name in ("capacity_bytes", "segment_bytes", "fd_cache"):
            positive(name)
        positive("staging_bytes", most=(1 << 30) + 1)  # allocated up front (two halves): a huge one is a typo
        positive("map_size", most=1 << 46)  # address space reserved by LMDB's map: 64 TiB is ~10^11 pages
        positive("retry_after_s", integer=False)
        if self.default_ttl_s is not None:
            positive("default_ttl_s", integer=False, most=MAX_TTL_S)
        for name in ("gc_live_ratio", "high_watermark", "low_watermark"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"disk store {name} must be in (0, 1], got {v!r}")
        if self.low_watermark >= self.high_watermark:
            raise ConfigError(f"disk store low_watermark ({self.low_watermark}) must be below high_watermark "
                              f"({self.high_watermark})")
        if self.io not in ("auto", "posix", "kvikio"):
            raise ConfigError(f"disk store io must be 'auto', 'posix' or 'kvikio', got {self.io!r}")
        self.segment_bytes = max(64 << 10, min(self.segment_bytes, self.capacity_bytes // 16))


class _SegFd:
    """A cached read descriptor of one segment file and the reads using it right now."""
    __slots__ = ("seg", "fd", "users", "retired")

    def __init__(self, seg: int, fd: int):
        self.seg, self.fd, self.users, self.retired = seg, fd, 0, False


class DiskStats(NamedTuple):
    enabled: bool
    entries: int
    live_bytes: int  # encoded bytes the index points at
    raw_bytes: int  # decoded size of those pages (raw_bytes / live_bytes = codec ratio)
    file_bytes: int  # bytes in segment files (live + dead awaiting compaction)
    capacity_bytes: int
    segments: int
    hits: int
    misses: int
    pages_written: int
    bytes_written: int
    bytes_read: int
    corrupt_dropped: int
    expired: int
    evicted: int
    segments_compacted: int
    rejected_full: int
    faults: dict
    sealed: dict = {}  # encryption at rest: pages refused or missed per reason (no_key, stale_key, bad_tag, ...)


class VerifyReport(NamedTuple):
    checked: int
    ok: int
    bad: int  # failed checksum / header / missing bytes: dropped from the index
    bytes_checked: int
    io_errors: int = 0  # unreadable right now (EIO...): kept, since the bytes may be fine


def _fault_kind(e: BaseException) -> str:
    if isinstance(e, lmdb.MapFullError):
        return "map_full"
    if isinstance(e, OSError):
        return {errno.ENOSPC: "enospc", errno.EDQUOT: "enospc", errno.EIO: "eio", errno.EROFS: "read_only",
                errno.EACCES: "read_only", errno.EPERM: "read_only", errno.ENOENT: "missing_file"}.get(e.errno, "io_error")
    return "index_error"


class DiskStore:
    def __init__(self, config: DiskStoreConfig, *, lock_mode: str = "shared", keyring: KeyRing | None = None):
        self.config = config
        # With a key ring every page is sealed (AES-GCM, per-tenant key) before it reaches the disk, and only sealed
        # pages are served: the index is not authenticated, so a plaintext entry could have been planted.
        self._keyring = keyring
        self._sealed = Counter()
        self._warned_unkeyed: set[str] = set()
        self._seal_buf = bytearray()  # envelopes of the batch being written (under the write lock)
        self._plain = threading.local()  # per reading thread: the page blob just decrypted
        self.path = check_store_dir(config.path, create=True)
        self._lock = StoreLock(self.path, lock_mode)
        try:
            self._index = Index(os.path.join(self.path, INDEX_DIR), map_size=config.map_size)
        except lmdb.Error as e:
            self._lock.release()
            raise StoreDirError(f"cannot open the index of store {self.path}: {e}") from None
        self._seg_dir = os.path.join(self.path, SEGMENT_DIR)
        self._clear_stale_readers()
        self._io = select_io(config.io)
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="kvdrive-fsync")
        self._write_lock = threading.RLock()  # one writer segment per process; index writes serialise in LMDB
        self._fds: OrderedDict[int, _SegFd] = OrderedDict()  # read descriptors of segments, LRU
        self._fds_lock = threading.Lock()
        self._wseg = 0  # this process's open segment (0: none)
        self._wfd = -1
        self._wdirect = None  # O_DIRECT descriptor of the writer segment (None: buffered appends)
        self._staging: Staging | None = None
        self._wend = 0
        self._touched: dict[bytes, int] = {}  # page key -> access time, flushed with the next write transaction
        self._last_txn_records = 0  # page records the last index commit changed (its freed pages: see IndexShape)
        self._warned_tiny_map = False
        self._known_ns: set[bytes] = set()
        self._ttl_used = False  # any page with an expiry ever written (by any process): expire() must scan
        self._counts = Counter()
        self._faults = Counter()
        self._disabled_until = 0.0
        self._closed = False

    # --- public API ----------------------------------------------------------------------------------------
    def put_many(self, ns: Namespace, keys: Sequence, blobs: Sequence[bytes], *, scores: Sequence[float] | None = None,
                 ttl_s: float | None = None, expires_ms: Sequence[int] | None = None) -> list[bool]:
        """Store encoded pages. True for each page now on disk (written here or already there).

        ``expires_ms``: per-page absolute expiry (ms since the epoch, 0 never), instead of ``ttl_s`` from now (pages
        that waited in a queue keep the expiry they were given); a page already past it is not written (False)."""
        if len(keys) != len(blobs) or (scores is not None and len(scores) != len(keys)):
            raise ConfigError(f"put_many got {len(keys)} keys, {len(blobs)} blobs"
                              f"{'' if scores is None else f', {len(scores)} scores'}; they must match")
        pkeys = [page_key(ns.id, key_bytes(k)) for k in keys]
        # refuse anything that is not a well-formed page blob before it reaches the disk
        headers = [peek_header(b) for b in blobs]
        for k, h in zip(keys, headers):
            if h.dtype_name != ns.kv_dtype:  # it could never be read back: a read would drop it as damaged
                raise CodecError(f"page {k!r} is a {h.dtype_name} blob; its namespace holds {ns.kv_dtype} pages")
        if ttl_s is not None and (not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool)
                                  or not 0 < ttl_s < MAX_TTL_S):
            raise ConfigError(f"put_many ttl_s must be a positive number of seconds below {MAX_TTL_S}, got {ttl_s!r}")
        if expires_ms is not None and len(expires_ms) != len(keys):
            raise ConfigError(f"put_many got {len(keys)} keys and {len(expires_ms)} expiry times; they must match")
        if not self._available():
            return [False] * len(keys)
        keyring = self._keyring
        if keyring is not None and not keyring.has_key(ns.tenant):
            self._refuse_unkeyed(ns, len(keys))
            return [False] * len(keys)
        now = _now_ms()
        if expires_ms is None:
            ttl = ttl_s if ttl_s is not None else self.config.default_ttl_s
            expiry = [now + int(ttl * 1000) if ttl else 0] * len(keys)
        else:
            expiry = [int(e) for e in expires_ms]
        with self._write_lock:
            with self._index.read() as txn:
                have = [self._usable(txn.get(pk, db=self._index.pages), now) is not None for pk in pkeys]
            todo, seen = [], set()
            for i, h in enumerate(have):
                # skip pages already stored, duplicates within the batch, and pages whose expiry has passed
                if not h and pkeys[i] not in seen and not 0 < expiry[i] <= now:
                    seen.add(pkeys[i])
                    todo.append(i)
            if not todo:
                return [h or not 0 < e <= now for h, e in zip(have, expiry)]
            flags = 0
            if keyring is not None:
                blobs = self._seal(ns, pkeys, blobs, todo)
                if blobs is None:  # the key went away since the check above: nothing of it reaches the disk
                    self._refuse_unkeyed(ns, len(keys))
                    return have
                flags = SEALED
            incoming = sum(len(blobs[i]) for i in todo)
            if not self._make_room(incoming):
                self._counts["rejected_full"] += len(todo)
                return have
            try:
                seg, off0 = self._writer_for(incoming)
                # checksums are taken as each blob is staged, while the I/O thread writes the previous chunk
                sums = []
                end, synced = self._append([blobs[i] for i in todo], off0,
                                           lambda j, b: sums.append(xxhash.xxh3_64_intdigest(b)))
                recs, off = [], off0
                for j, i in enumerate(todo):
                    b, h = blobs[i], headers[i]
                    recs.append((pkeys[i], Record(seg, off, len(b), h.codec, flags, sums[j], h.raw_nbytes, now, now,
                                                  expiry[i], float(scores[i]) if scores is not None else 0.0)))
                    off += len(b)
                synced.result()  # durable before the index can point at it
                self._wend = end
                evicted = self._counts["evicted"]
                done = self._index_records(ns, seg, recs, end, ttl=any(expiry[i] for i in todo))
                if end >= self.config.segment_bytes:
                    self._seal_writer()
            except (OSError, lmdb.Error) as e:
                self._fault(e, "write")
                self._abandon_writer()
                if isinstance(e, lmdb.MapFullError):
                    self._free_index_room()
                return have
            self._counts["pages_written"] += done
            self._counts["bytes_written"] += sum(r.length for _, r in recs[:done])
            self._counts["rejected_full"] += len(recs) - done  # no room left in the index: dead bytes, for GC
            if done < len(recs) or self._counts["evicted"] != evicted:
                # a map too small for the batch: its commits evicted pages to make room, maybe its own earlier ones
                with self._index.read() as txn:
                    return [self._usable(txn.get(pk, db=self._index.pages), now) is not None for pk in pkeys]
        return [not 0 < e <= now for e in expiry]

    def get_many(self, ns: Namespace, keys: Sequence, outs: Sequence) -> list[bool]:
        """Read and decode pages into the caller's buffers. False is a miss; that buffer's contents are then undefined."""
        if len(keys) != len(outs):
            raise ConfigError(f"get_many got {len(keys)} keys and {len(outs)} buffers; they must match")
        views = [byte_view(o, writable=True) for o in outs]
        pkeys = [page_key(ns.id, key_bytes(k)) for k in keys]
        result = [False] * len(keys)
        if not self._available():
            self._counts["misses"] += len(keys)
            return result
        now = _now_ms()
        with self._index.read() as txn:
            recs = [self._usable(txn.get(pk, db=self._index.pages), now) for pk in pkeys]
        for i, rec in enumerate(recs):
            # the caller's mistake, said as such: a read into it would fail the size check and drop a good page
            if rec is not None and rec.raw_nbytes != views[i].size:
                raise CodecError(f"page {keys[i]!r} holds {rec.raw_nbytes} bytes; its output buffer holds "
                                 f"{views[i].size}")
        bad = []
        for attempt in (0, 1):
            for i, rec in enumerate(recs):
                if rec is None:
                    continue
                status = self._read_into(rec, views[i], ns, pkeys[i])
                if status == "ok":
                    result[i] = True
                    self._touched[pkeys[i]] = now
                elif status == "bad":
                    bad.append((i, rec))
                elif self._disabled_until:
                    break  # a read fault turned the tier off: the rest are misses too, not more failing reads
            if not bad or attempt:
                break
            # another process may have compacted the segment away: look the failed entries up once more
            recs = [None] * len(keys)
            with self._index.read() as txn:
                for i, rec in bad:
                    cur = self._usable(txn.get(pkeys[i], db=self._index.pages), now)
                    if cur is not None and cur[:3] != rec[:3]:
                        recs[i] = cur
            retried = {i for i, r in enumerate(recs) if r is not None}
            bad = [(i, rec) for i, rec in bad if i not in retried]
            if not retried:
                break
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
        if not self._available():
            return [None] * len(keys)
        now = _now_ms()
        with self._index.read() as txn:
            recs = [self._usable(txn.get(pk, db=self._index.pages), now) for pk in pkeys]
        out, bad = [], []
        for pk, rec in zip(pkeys, recs):
            try:
                blob = self._read_blob(rec) if rec is not None else None
            except OSError as e:
                self._fault(e, "read")
                out.append(None)
                continue
            if blob is not None and rec.flags & SEALED:
                blob, drop = self._unseal(ns.tenant, pk, blob)
                if drop:
                    bad.append((pk, rec))
            elif rec is not None and blob is None:
                bad.append((pk, rec))
            if blob is not None:
                self._touched[pk] = now
            out.append((blob, rec.expires_ms) if blob is not None else None)
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
        if not self._available():
            return self._held_prefix(keys, held)
        now = _now_ms()
        short = ns.id + b"\0"
        pages = self._index.pages
        n = 0
        keyring = self._keyring
        if keyring is not None and not keyring.has_key(ns.tenant):
            return self._held_prefix(keys, held)
        want = SEALED if keyring is not None else 0  # entries written the other way are unusable here
        with self._index.read() as txn:
            get = txn.get  # positional (key, default, db): measurably cheaper than keywords in this loop
            for k in keys:
                # fast path for the common key (a str of <= _SHORT_KEY bytes): same bytes as page_key(key_bytes(k))
                if type(k) is str and 0 < len(k) <= _SHORT_KEY // 4 and k.isascii():
                    b = get(short + k.encode(), None, pages)
                else:
                    b = get(page_key(ns.id, key_bytes(k)), None, pages)
                if b is None or (b[EXPIRES_AT] != _NEVER and Record.unpack(b).expires_ms <= now) \
                        or b[_FLAGS_AT] & SEALED != want:
                    if held is None or not held(k):
                        break
                n += 1
        return n

    @staticmethod
    def _held_prefix(keys: Sequence, held) -> int:
        n = 0
        for k in keys:
            if held is None or not held(k):
                break
            n += 1
        return n

    def contains(self, ns: Namespace, keys: Sequence) -> list[bool]:
        now = _now_ms()
        if self._keyring is not None and not self._keyring.has_key(ns.tenant):
            return [False] * len(keys)
        with self._index.read() as txn:
            return [self._usable(txn.get(page_key(ns.id, key_bytes(k)), db=self._index.pages), now) is not None
                    for k in keys]

    def set_scores(self, ns: Namespace, keys: Sequence, scores: Sequence[float]) -> None:
        """Record the promoter's value for pages (eviction takes the lowest first). Skipped while the tier is off."""
        if not self._available():
            return
        try:
            with self._write_lock:
                # in small transactions: one transaction copies every leaf it touches, and a few thousand scattered
                # updates at once need room for a copy of the whole tree; small ones reuse what the last freed.
                # They are a hint: where the map lacks even that room they go in smaller transactions, or not at
                # all -- never evicting pages for them
                pairs = list(zip(keys, scores))
                per_txn = self._commit_size(min(_SCORES_PER_TXN, len(pairs)), evict=False)
                for i in range(0, len(pairs) if per_txn else 0, per_txn or 1):
                    with self._index.write() as txn:
                        for k, s in pairs[i:i + per_txn]:
                            pk = page_key(ns.id, key_bytes(k))
                            b = txn.get(pk, db=self._index.pages)
                            if b is not None:
                                txn.put(pk, Record.unpack(b)._replace(score=float(s)).pack(), db=self._index.pages)
                    self._last_txn_records = per_txn
        except (OSError, lmdb.Error) as e:  # e.g. a full map: a fault like any other, never the caller's exception
            self._fault(e, "scores")
            if isinstance(e, lmdb.MapFullError):
                with self._write_lock:
                    self._free_index_room()

    def delete_many(self, ns: Namespace, keys: Sequence) -> int:
        with self._write_lock, self._index.write() as txn:
            return sum(self._index.delete_page(txn, page_key(ns.id, key_bytes(k))) is not None for k in keys)

    def clear(self, namespace_id: bytes | None = None) -> int:
        """Drop every page (of one namespace, or all); space comes back at the next compaction."""
        n = 0
        with self._write_lock, self._index.write() as txn:
            cur = txn.cursor(db=self._index.pages)
            prefix = namespace_id or b""
            doomed = []
            if cur.set_range(prefix):
                for k in cur.iternext(values=False):
                    if not k.startswith(prefix):
                        break
                    doomed.append(bytes(k))
            for pk in doomed:
                self._index.delete_page(txn, pk)
            n = len(doomed)
            if namespace_id is not None:
                txn.delete(namespace_id, db=self._index.ns)
            else:
                txn.drop(self._index.ns, delete=False)
        if namespace_id is None:
            self._known_ns.clear()
            self._touched.clear()
        else:
            self._known_ns.discard(namespace_id)
            for pk in [pk for pk in self._touched if pk.startswith(namespace_id)]:
                self._touched.pop(pk, None)
        return n

    def keys(self, ns: Namespace) -> list[bytes]:
        """Keys of every page held for ``ns`` (hashed for keys over 400 bytes)."""
        prefix = ns.id
        out = []
        with self._index.read() as txn:
            cur = txn.cursor(db=self._index.pages)
            if cur.set_range(prefix):
                for k in cur.iternext(values=False):
                    if not k.startswith(prefix):
                        break
                    out.append(bytes(k[len(prefix) + 1:]))
        return out

    def get_note(self, name: str) -> bytes | None:
        """A small value kept with the store under ``name`` (e.g. measured costs that should outlive a restart)."""
        with self._index.read() as txn:
            v = txn.get(_NOTE + name.encode(), db=self._index.meta)
        return bytes(v) if v is not None else None

    def put_note(self, name: str, value: bytes) -> bool:
        """Keep ``value`` (at most 64 KiB) under ``name``; False when the disk tier is off (the note is not kept)."""
        if len(value) > 65536:
            raise ConfigError(f"store note {name!r} is {len(value)} bytes; at most 65536 are allowed")
        if not self._available():
            return False
        try:
            with self._index.write() as txn:
                txn.put(_NOTE + name.encode(), value, db=self._index.meta)
        except (OSError, lmdb.Error) as e:
            self._fault(e, "write")
            return False
        return True

    def namespaces(self) -> list[tuple[bytes, dict | None, int, int]]:
        """(namespace id, description, pages, encoded bytes) for each namespace holding pages."""
        per: dict[bytes, list[int]] = {}
        with self._index.read() as txn:
            for k, v in txn.cursor(db=self._index.pages):
                acc = per.setdefault(bytes(k[:16]), [0, 0])
                acc[0] += 1
                acc[1] += Record.unpack(v).length
            descs = {bytes(k): json.loads(v) for k, v in txn.cursor(db=self._index.ns)}
        return [(nid, descs.get(nid), c, b) for nid, (c, b) in sorted(per.items())]

    def maintain(self) -> None:
        """Expire TTL'd pages, enforce capacity, compact sparse segments. Safe to call from any thread, any time."""
        if not self._available():
            return
        try:
            self._clear_stale_readers()
            with self._write_lock:
                self.expire()
                self._keep_index_headroom()  # writes keep it per commit (_commit_size); this catches other writers
                self._make_room(0)
                self.compact()
            self._close_stale_fds()
        except (OSError, lmdb.Error) as e:
            self._fault(e, "maintenance")

    def expire(self) -> int:
        """Delete expired pages. A full index scan, skipped while no page in the store was ever given a TTL."""
        if not self._ttl_used:
            with self._index.read() as txn:
                self._ttl_used = txn.get(b"ttl_used", db=self._index.meta) is not None
            if not self._ttl_used:
                return 0
        now = _now_ms()
        n = 0
        with self._write_lock, self._index.write() as txn:
            for k, v in list(txn.cursor(db=self._index.pages)):
                rec = Record.unpack(v)
                if rec.expires_ms and rec.expires_ms <= now:
                    self._index.delete_page(txn, bytes(k))
                    n += 1
        self._counts["expired"] += n
        return n

    def compact(self, live_ratio: float | None = None) -> int:
        """Rewrite live pages out of sparse sealed segments (live share below ``live_ratio``, default the config's
        gc_live_ratio) and delete emptied ones. Returns segments reclaimed."""
        gc_fd = os.open(os.path.join(self.path, GC_LOCK_FILE), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            try:
                fcntl.flock(gc_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is compacting this store right now
            with self._write_lock:
                return self._compact_locked(self.config.gc_live_ratio if live_ratio is None else live_ratio)
        finally:
            os.close(gc_fd)

    def verify(self) -> VerifyReport:
        """Re-read every page, check header and checksum; drop bad entries from the index."""
        checked = ok = nbytes = io_errors = 0
        bad = []
        with self._index.read() as txn:
            items = [(bytes(k), Record.unpack(v)) for k, v in txn.cursor(db=self._index.pages)]
        for pk, rec in items:
            checked += 1
            nbytes += rec.length
            try:
                blob = self._read_blob(rec)
            except OSError as e:
                io_errors += 1
                self._faults[_fault_kind(e)] += 1
                continue
            if blob is not None:
                ok += 1
            else:
                bad.append((pk, rec))
        if bad:
            self._drop_bad(bad)
        return VerifyReport(checked, ok, len(bad), nbytes, io_errors)

    def stats(self) -> DiskStats:
        with self._index.read() as txn:
            segs = self._index.segments(txn)
        file_bytes = 0
        for seg in segs:
            try:
                file_bytes += os.stat(self._seg_path(seg)).st_size
            except OSError:
                pass
        c = self._counts
        return DiskStats(
            enabled=time.monotonic() >= self._disabled_until, entries=sum(s.count for s in segs.values()),
            live_bytes=sum(s.live for s in segs.values()), raw_bytes=sum(s.raw_live for s in segs.values()),
            file_bytes=file_bytes, capacity_bytes=self.config.capacity_bytes, segments=len(segs),
            hits=c["hits"], misses=c["misses"], pages_written=c["pages_written"], bytes_written=c["bytes_written"],
            bytes_read=c["bytes_read"], corrupt_dropped=c["corrupt_dropped"], expired=c["expired"],
            evicted=c["evicted"], segments_compacted=c["segments_compacted"], rejected_full=c["rejected_full"],
            faults=dict(self._faults), sealed=dict(self._sealed))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._write_lock:
            try:
                if self._touched:
                    with self._index.write() as txn:
                        self._flush_touched(txn)
                self._seal_writer()
            except (OSError, lmdb.Error) as e:
                log.warning("kvdrive: closing store %s: %s", self.path, e)
        with self._fds_lock:
            for h in self._fds.values():
                self._retire_fd_locked(h)
            self._fds.clear()
        self._syncer.shutdown(wait=True)
        if self._staging is not None:
            self._staging.close()
        self._index.close()
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- internals -----------------------------------------------------------------------------------------
    @staticmethod
    def _live(b, now: int) -> Record | None:
        if b is None:
            return None
        rec = Record.unpack(b)
        return None if rec.expires_ms and rec.expires_ms <= now else rec

    def _usable(self, b, now: int) -> Record | None:
        """The live record, if this store can serve it: sealed exactly when encryption is on."""
        rec = self._live(b, now)
        return rec if rec is None or bool(rec.flags & SEALED) == (self._keyring is not None) else None

    def _seg_path(self, seg: int) -> str:
        return f"{self._seg_dir}/seg-{seg:08x}.kvs"

    def _available(self) -> bool:
        if self._closed:
            raise StoreDirError(f"store {self.path} is closed")
        if self._disabled_until and time.monotonic() >= self._disabled_until:
            self._disabled_until = 0.0
            log.warning("kvdrive: disk tier at %s back on after a fault; retrying", self.path)
            self._clear_stale_readers()  # a map filled by a dead process's reader comes back with it
        return not self._disabled_until

    def _fault(self, e: BaseException, during: str) -> None:
        kind = _fault_kind(e)
        self._faults[kind] += 1
        if not self._disabled_until:
            log.error("kvdrive: disk tier at %s off for %gs after %s during %s: %s (requests recompute meanwhile)",
                      self.path, self.config.retry_after_s, kind, during, e)
        self._disabled_until = time.monotonic() + self.config.retry_after_s

    def _register_ns(self, txn, ns: Namespace) -> None:
        if ns.id not in self._known_ns:
            txn.put(ns.id, ns.canonical, db=self._index.ns)
            self._known_ns.add(ns.id)

    def _flush_touched(self, txn) -> None:
        touched, self._touched = self._touched, {}
        pages = self._index.pages
        for pk, t in touched.items():
            b = txn.get(pk, db=pages)
            if b is not None:
                txn.put(pk, Record.unpack(b)._replace(atime_ms=t).pack(), db=pages)

    # writer segment ------------------------------------------------------------------------------------------
    def _writer_for(self, incoming: int) -> tuple[int, int]:
        if self._wseg and self._wend and self._wend + incoming > self.config.segment_bytes:
            self._seal_writer()
        if self._wseg and os.fstat(self._wfd).st_nlink == 0:
            # our segment file was deleted under us (by hand, or a cleanup job): appending to the orphaned inode
            # would index pages no reader can ever open. Its indexed pages read as misses (dropped); start afresh.
            self._faults["missing_file"] += 1
            log.error("kvdrive: segment file %s of store %s was deleted while in use; its pages are lost (served as "
                      "misses) and writes go to a new segment", self._seg_path(self._wseg), self.path)
            self._seal_writer()
        if not self._wseg:
            fd = -1
            try:
                with self._index.write() as txn:
                    seg = self._index.alloc_segment(txn)
                    # create and flock the file before the commit makes the segment visible: no other process can
                    # ever see an open segment without its writer's lock (and mistake it for a dead writer's)
                    # A file of this id may exist: left by a process killed inside this same (aborted) allocation.
                    # Nothing references an uncommitted id and we hold LMDB's writer lock, so it is ours to reset.
                    fd = os.open(self._seg_path(seg), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.ftruncate(fd, 0)
            except BaseException:
                # the allocation did not commit (e.g. a full map): let go of the file, or its flock would make the
                # next allocation of the same id fail (EAGAIN) for as long as this process lives
                if fd >= 0:
                    os.close(fd)
                raise
            self._wseg, self._wfd, self._wend = seg, fd, 0
            self._wdirect = open_direct(self._seg_path(seg)) if self.config.direct_io else None
        return self._wseg, self._wend

    def _seal_writer(self) -> None:
        if not self._wseg:
            return
        seg, fd = self._wseg, self._wfd
        self._wseg, self._wfd, self._wend = 0, -1, 0
        if self._wdirect is not None:
            os.close(self._wdirect)
            self._wdirect = None
        try:
            with self._index.write() as txn:
                info = self._index.seg_info(txn, seg)
                if info is not None:
                    txn.put(seg_key(seg), info._replace(state=SEG_SEALED).pack(), db=self._index.segs)
        finally:
            os.close(fd)

    def _append(self, bufs: list, off: int, each=None):
        """Append blobs at ``off`` to the writer segment and fdatasync it, on the I/O thread.

        Returns (new end, ALIGN-padded for O_DIRECT; future that completes once the bytes are durable).
        ``each(i, buf)`` runs on the caller's thread as each blob is staged.
        """
        fd = self._wfd
        if self._wdirect is not None and off % ALIGN == 0:
            if self._staging is None:
                self._staging = Staging(self.config.staging_bytes)
            end, writes = direct_append(self._wdirect, self._staging, bufs, off, self._submit, each)
        else:
            writes = []
            end = off + self._io.pwritev(fd, bufs, off)
            if each is not None:
                for i, b in enumerate(bufs):
                    each(i, b)
        # the same single I/O thread runs the sync after every write above; its future fails if any write did
        return end, self._submit(self._sync_after_writes, fd, writes)

    def _submit(self, fn, *args) -> Future:
        """``fn`` on the I/O thread; inline once Python's executors refuse work. At interpreter exit (SGLang's
        scheduler detaches its storage backend from an exit hook, after concurrent.futures has stopped accepting
        work) the final write-down of the DRAM tier must still reach the disk."""
        try:
            return self._syncer.submit(fn, *args)
        except RuntimeError:
            done: Future = Future()
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future, as the pool would
                done.set_exception(e)
            return done

    def _sync_after_writes(self, fd: int, writes: list) -> None:
        for w in writes:
            w.result()  # already done (FIFO thread): re-raises a failed write
        self._io.sync(fd)

    def _abandon_writer(self) -> None:
        """After a write fault: stop appending to this segment (its tail may be torn); compaction reclaims it."""
        try:
            self._seal_writer()
        except (OSError, lmdb.Error):
            pass

    # reads ---------------------------------------------------------------------------------------------------
    # A cached descriptor is pinned while a read uses it: the cache (LRU eviction) and compaction (forgetting a
    # deleted segment) only retire it, and the last reader closes it. Closing it under a reader in another thread
    # gave EBADF (the tier turned itself off), or worse, a reused descriptor number read from another file (found
    # by bench/stress/soak.py).
    def _pin_fd(self, seg: int) -> "_SegFd":
        with self._fds_lock:
            h = self._fds.get(seg)
            if h is not None:
                self._fds.move_to_end(seg)
                h.users += 1
                return h
        fd = os.open(self._seg_path(seg), os.O_RDONLY | os.O_CLOEXEC)
        with self._fds_lock:
            h = self._fds.get(seg)
            if h is not None:
                os.close(fd)
            else:
                h = self._fds[seg] = _SegFd(seg, fd)
                while len(self._fds) > self.config.fd_cache:
                    self._retire_fd_locked(self._fds.popitem(last=False)[1])
            h.users += 1
            return h

    def _unpin_fd(self, h: "_SegFd") -> None:
        with self._fds_lock:
            h.users -= 1
            if h.retired and not h.users:
                self._close_fd_locked(h)

    def _retire_fd_locked(self, h: "_SegFd") -> None:
        """``h`` has left the cache: close it now, or when its last reader is done."""
        h.retired = True
        if not h.users:
            self._close_fd_locked(h)

    def _close_fd_locked(self, h: "_SegFd") -> None:
        if h.fd >= 0:
            os.close(h.fd)
            h.fd = -1
            if h.seg not in self._fds:  # kvikio keeps its own handle per path: drop it unless a newer fd took over
                self._io.forget(self._seg_path(h.seg))

    def _forget_fd(self, seg: int) -> None:
        with self._fds_lock:
            h = self._fds.pop(seg, None)
            if h is not None:
                self._retire_fd_locked(h)
            else:
                self._io.forget(self._seg_path(seg))

    def _pread(self, rec: Record, bufs: list) -> int | None:
        """Read ``rec``'s bytes into ``bufs``. None when the segment file is gone (compacted or deleted)."""
        try:
            h = self._pin_fd(rec.seg)
        except FileNotFoundError:
            return None
        try:
            return self._io.preadv(h.fd, bufs, rec.off, self._seg_path(rec.seg))
        finally:
            self._unpin_fd(h)

    def _read_into(self, rec: Record, out, ns: Namespace, pk: bytes) -> str:
        """'ok', 'bad' (drop the entry) or 'miss' (transient, or no key now: keep the entry)."""
        dtype = ns.kv_dtype
        try:
            if rec.flags & SEALED:
                env = getattr(self._plain, "env", None)  # this thread's reusable read buffer
                if env is None or len(env) < rec.length:
                    env = self._plain.env = np.empty(rec.length, dtype=np.uint8)
                blob = self._read_blob(rec, env[:rec.length])
                if blob is None:
                    return "bad"
                plain, drop = self._unseal(ns.tenant, pk, blob, scratch=True)
                if plain is None:
                    return "bad" if drop else "miss"
                decode_page(plain, out, dtype)
            elif rec.codec == _RAW_CODEC and rec.length - HEADER.size == len(out):
                # zero copy: header into a small buffer, body straight into the caller's buffer
                hdr = bytearray(HEADER.size)
                n = self._pread(rec, [hdr, out])
                if n is None or n != rec.length:
                    return "bad"
                h = xxhash.xxh3_64(hdr)
                h.update(out)
                if h.intdigest() != rec.checksum:
                    return "bad"
                hh = peek_header(hdr)
                if hh.codec != _RAW_CODEC or hh.raw_nbytes != len(out) or hh.dtype != dtype_info(dtype).code:
                    return "bad"
                self._counts["bytes_read"] += rec.length
            else:
                blob = self._read_blob(rec)
                if blob is None:
                    return "bad"
                decode_page(blob, out, dtype)
        except CodecError:
            return "bad"
        except OSError as e:
            self._fault(e, "read")
            return "miss"
        return "ok"

    def _read_blob(self, rec: Record, buf: np.ndarray | None = None) -> np.ndarray | None:
        """The verified blob (read into ``buf`` if given: exactly rec.length bytes), or None if missing/short/corrupt.
        An I/O error propagates: it says nothing of the data."""
        if buf is None:
            buf = np.empty(rec.length, dtype=np.uint8)  # not zero-filled: every byte is read or the blob is rejected
        n = self._pread(rec, [buf])
        if n != rec.length or xxhash.xxh3_64_intdigest(buf) != rec.checksum:
            return None
        if rec.flags & SEALED:
            if not is_envelope(buf):  # its contents are checked when a key opens it
                return None
        else:
            try:
                peek_header(buf)
            except CodecError:
                return None
        self._counts["bytes_read"] += rec.length
        return buf

    def _seal(self, ns: Namespace, pkeys: list[bytes], blobs: Sequence, todo: list[int]) -> list | None:
        """``blobs`` with those at ``todo`` replaced by their envelopes, sealed into one buffer reused by every
        write (held under the write lock until the batch is durable; as large as the largest batch). None if the
        tenant has no key."""
        need = sum(len(blobs[i]) + OVERHEAD for i in todo)
        if len(self._seal_buf) < need:
            self._seal_buf = bytearray(need)
        mv, off, out = memoryview(self._seal_buf), 0, list(blobs)
        for i in todo:
            n = self._keyring.seal_into(ns.tenant, pkeys[i], blobs[i], mv[off:])
            if n is None:
                return None
            out[i] = mv[off:off + n]
            off += n
        return out

    def _unseal(self, tid: str, pk: bytes, envelope, scratch: bool = False) -> tuple[bytes | None, bool]:
        """(the page blob, or None; whether to drop the entry). With ``scratch`` the blob is a view of this thread's
        reusable buffer, valid until its next call. A tenant without a key keeps its entries (a restored key reads
        them again); pages sealed under a replaced key or failing authentication are dropped, like a checksum
        failure, so the page can be written again under the current key."""
        try:
            if not scratch:
                return self._keyring.open(tid, pk, envelope), False
            buf = getattr(self._plain, "buf", None)
            if buf is None or len(buf) < len(envelope):
                buf = self._plain.buf = bytearray(len(envelope))
            n = self._keyring.open_into(tid, pk, envelope, buf)
            return memoryview(buf)[:n], False
        except SealError as e:
            self._sealed[e.reason] += 1
            if e.reason == "bad_tag":
                log.warning("kvdrive: a page of store %s failed authentication (altered or misplaced); dropped",
                            self.path)
            return None, e.reason != "no_key"

    def _refuse_unkeyed(self, ns: Namespace, n: int) -> None:
        """With encryption on, a tenant without a key gets nothing written to disk (one log line per tenant)."""
        self._sealed["unkeyed_refused"] += n
        if ns.tenant not in self._warned_unkeyed:
            self._warned_unkeyed.add(ns.tenant)
            log.warning("kvdrive: %s has no key for tenant %s; its pages are not written to disk (further refusals "
                        "are counted, not logged)", self._keyring.describe(), ns.tenant or "'' (unsalted)")

    def _drop_bad(self, bad: list[tuple[bytes, Record]]) -> None:
        n = 0
        try:
            with self._write_lock, self._index.write() as txn:
                for pk, rec in bad:
                    cur = txn.get(pk, db=self._index.pages)
                    if cur is not None and Record.unpack(cur)[:3] == rec[:3]:  # still the entry we read
                        self._index.delete_page(txn, pk)
                        n += 1
        except (OSError, lmdb.Error) as e:  # a read must not fail on it: the entries stay (bad reads are misses)
            self._fault(e, "drop")
            return
        self._counts["corrupt_dropped"] += n
        if n:
            log.warning("kvdrive: dropped %d corrupt or missing page(s) from store %s (served as misses)", n, self.path)

    # capacity, eviction, compaction -------------------------------------------------------------------------
    def _usage(self) -> tuple[int, int, dict[int, SegInfo]]:
        with self._index.read() as txn:
            segs = self._index.segments(txn)
        used = 0
        for seg, info in segs.items():
            used += max(info.end, self._wend if seg == self._wseg else 0)
        return used, sum(s.live for s in segs.values()), segs

    def _make_room(self, incoming: int) -> bool:
        """Keep file bytes within capacity: evict lowest-value pages, then compact. False if ``incoming`` can't fit."""
        cap = self.config.capacity_bytes
        if incoming > cap // 4:
            return False
        used, live, _ = self._usage()
        if used + incoming <= cap * self.config.high_watermark:
            return True
        target_live = int(cap * self.config.low_watermark) - incoming
        if live > target_live:
            self._evict(live - target_live)
        self.compact()
        used, _, _ = self._usage()
        if used + incoming > cap and self._wseg:
            # our own open segment can only be reclaimed once sealed
            self._seal_writer()
            self.compact()
            used, _, _ = self._usage()
        if used + incoming > cap:
            # Dead bytes spread thinly over many segments: none is sparse enough for the usual ratio, and the
            # file bytes sit at the cap although live bytes are well below it. Compact any segment holding dead
            # bytes (emptiest first, as headroom allows), and if even that finds no room, drop the emptiest
            # segment's pages outright (log-structured eviction) — the store must never wedge into refusing writes.
            self.compact(live_ratio=1.0)
            used, _, _ = self._usage()
            while used + incoming > cap and self._evict_emptiest_segment():
                used, _, _ = self._usage()
        return used + incoming <= cap

    def _evict_emptiest_segment(self) -> bool:
        """Evict every page of the sealed segment with the fewest live bytes and delete it. False if none."""
        with self._index.read() as txn:
            segs = self._index.segments(txn)
        cands = sorted((info.live, seg) for seg, info in segs.items() if seg != self._wseg and info.state == SEG_SEALED)
        if not cands:
            return False
        seg = cands[0][1]
        with self._index.read() as txn:
            doomed = [bytes(k) for k, v in txn.cursor(db=self._index.pages) if Record.unpack(v).seg == seg]
        with self._index.write() as txn:
            n = sum(self._index.delete_page(txn, pk) is not None for pk in doomed)
            info = self._index.seg_info(txn, seg)
            emptied = info is not None and info.count == 0
            if emptied:
                txn.delete(seg_key(seg), db=self._index.segs)
        self._last_txn_records = n
        self._counts["evicted"] += n
        if not emptied:
            return False  # something still points into it (should not happen for a sealed segment): keep the file
        self._remove_segment_file(seg)
        self._counts["segments_compacted"] += 1
        return True

    def _remove_segment_file(self, seg: int) -> None:
        """Delete a segment's file once the index no longer names it (closing this process's cached handles)."""
        self._forget_fd(seg)
        try:
            os.unlink(self._seg_path(seg))
        except FileNotFoundError:
            pass

    def _index_records(self, ns: Namespace, seg: int, recs: list, end: int, *, ttl: bool) -> int:
        """Point the index at records just made durable in ``seg``, in as few commits as the map has room for (one,
        but in a map far too small for the batch). Returns how many are indexed: fewer than all only when the map
        has no room left even after eviction."""
        done = 0
        while done < len(recs):
            touched = len(self._touched) if done == 0 else 0  # the first commit also writes pending access times
            n = self._commit_size(len(recs) - done + touched) - touched
            if n <= 0:
                if touched:
                    self._touched = {}  # access times are a hint: dropped rather than the pages
                    continue
                break
            chunk = recs[done:done + n]
            last = done + n == len(recs)
            with self._index.write() as txn:
                self._register_ns(txn, ns)
                if ttl and not self._ttl_used:
                    txn.put(b"ttl_used", b"1", db=self._index.meta)
                    self._ttl_used = True
                # a commit's end covers its own records; the tail past it is an orphan until the next commits
                self._index.put_pages(txn, seg, chunk, end=end if last else chunk[-1][1].off + chunk[-1][1].length)
                if touched:
                    self._flush_touched(txn)
            self._last_txn_records = n + touched
            done += n
        return done

    def _commit_size(self, records: int, *, evict: bool = True) -> int:
        """How many of ``records`` page records the next index commit may change: at most _COMMIT_SHARE of the map's
        room, and what fits under _INDEX_HIGH after evicting the lowest-value pages (``evict``) -- 0 if not one."""
        shape = (self._keep_index_headroom(records) if evict else None) or self._index.shape()
        n = shape.commit_cap(records, _COMMIT_SHARE)
        while n > 1 and shape.fill(n, self._last_txn_records) > _INDEX_HIGH:
            n = (n + 1) // 2
        return n if records and shape.fill(n, self._last_txn_records) <= _INDEX_HIGH else 0

    def _index_fill(self, records: int = 0) -> float:
        """Share of the LMDB map its trees use plus the room the next commit (``records``) and the last need."""
        return self._index.shape().fill(records, self._last_txn_records)

    def _keep_index_headroom(self, records: int = 0) -> IndexShape | None:
        """Above _INDEX_HIGH of the map, evict the lowest-value pages down to _INDEX_LOW, while LMDB still has the
        free pages that deleting needs (a map full to the last page cannot even commit a delete: every change copies
        its path of pages first). ``records``: page records the coming commit changes (at most its budget). Returns
        the index's shape as it now is (None after a fault)."""
        try:
            shape = self._index.shape()
            records = shape.commit_cap(records, _COMMIT_SHARE)
            fill = shape.fill(records, self._last_txn_records)
            if fill > _INDEX_HIGH:
                # evicting shrinks the page tree and, with it, the room a commit may need to copy it
                tree = shape.leaves + shape.branches
                shrinks = tree + min(records, shape.leaves) + min(self._last_txn_records, shape.leaves)
                share = min(1.0, (fill - _INDEX_LOW) * shape.map_pages / max(1, shrinks))
                if share >= 1.0 and not self._warned_tiny_map:
                    self._warned_tiny_map = True
                    log.warning("kvdrive: the index map of store %s (map_size %d bytes) is too small to keep pages "
                                "and still commit: it is emptied to make room each time; give the disk a larger "
                                "map_size", self.path, self._index.env.info()["map_size"])
                self._free_index_room(share, full=False)
                shape = self._index.shape()
            return shape
        except (OSError, lmdb.Error) as e:  # called on the write path: a fault, never the writer's exception
            self._fault(e, "index eviction")
            return None

    def _clear_stale_readers(self) -> None:
        try:
            n = self._index.clear_stale_readers()
        except lmdb.Error as e:
            log.warning("kvdrive: could not check the index readers of store %s: %s", self.path, e)
            return
        if n:
            log.warning("kvdrive: cleared %d reader slot(s) of store %s left by dead processes (their old snapshot "
                        "kept every index page freed since from reuse: the map would fill for good)", n, self.path)

    def _free_index_room(self, share: float | None = None, *, full: bool = True) -> None:
        """Drop ``share`` of the pages (lowest value first; default 1 - low_watermark, as capacity eviction would),
        in small transactions: each frees pages the next can reuse, where one big delete would itself need more room
        than a full map has; a transaction that does not fit is retried smaller (down to one page). ``full``: the
        map filled up (a fault) rather than crossed the watermark. The map is not grown instead: resizing is only
        safe while no transaction is open in the process, and readers run on SGLang's threads."""
        share = 1.0 - self.config.low_watermark if share is None else share
        if full:
            self._clear_stale_readers()
        with self._index.read() as txn:
            cands = [(r.score, r.atime_ms, bytes(k))
                     for k, v in txn.cursor(db=self._index.pages) for r in (Record.unpack(v),)]
        victims = sorted(pk for _, _, pk in heapq.nsmallest(max(1, math.ceil(len(cands) * share)), cands))
        n = i = 0
        batch = 16  # halved when a commit does not fit
        # key order: neighbours share leaf pages, so each small transaction copies (needs) few new pages
        while i < len(victims):
            try:
                with self._index.write() as txn:
                    done = sum(self._index.delete_page(txn, pk) is not None for pk in victims[i:i + batch])
            except lmdb.MapFullError:
                if batch == 1:
                    break  # as much as fitted; the next map-full fault frees more
                batch //= 2
                continue
            n += done  # counted once committed
            i += batch
            self._last_txn_records = batch
        self._counts["evicted"] += n
        if full:
            log.warning("kvdrive: index of store %s is full (map_size %d bytes, %d pages): evicted the %d lowest-value "
                        "pages to make room; a larger disk map_size keeps more", self.path,
                        self._index.env.info()["map_size"], len(cands), n)
        else:
            log.info("kvdrive: index of store %s above %.0f%% of its map (map_size %d bytes): evicted the %d "
                     "lowest-value pages of %d", self.path, 100 * _INDEX_HIGH,
                     self._index.env.info()["map_size"], n, len(cands))

    def _evict(self, nbytes: int) -> None:
        """Drop the lowest-value pages (score, then least recently used) totalling at least ``nbytes``."""
        with self._index.read() as txn:
            cands = [(r.score, r.atime_ms, bytes(k), r.length)
                     for k, v in txn.cursor(db=self._index.pages) for r in (Record.unpack(v),)]
        avg = max(1, sum(c[3] for c in cands) // max(1, len(cands)))
        victims = heapq.nsmallest(min(len(cands), nbytes // avg + 16), cands)
        freed = n = 0
        with self._index.write() as txn:
            for _, _, pk, length in victims:
                if freed >= nbytes:
                    break
                if self._index.delete_page(txn, pk) is not None:
                    freed += length
                    n += 1
        self._last_txn_records = n
        self._counts["evicted"] += n

    def _writer_alive(self, seg: int) -> bool:
        if seg == self._wseg:
            return True
        try:
            fd = os.open(self._seg_path(seg), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False  # nobody holds it: its writer is gone
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _recover_dead_writers(self, segs: dict[int, SegInfo]) -> None:
        """Seal open segments whose writer is gone, cutting any unindexed (crash-orphaned) tail."""
        for seg, info in segs.items():
            if info.state != SEG_OPEN or self._writer_alive(seg):
                continue
            # Cut at the end committed *now*: ``segs`` may predate the writer's last commits before it died, and
            # cutting at that older end destroyed committed pages (found by bench/stress/kill_stress.py). A dead
            # writer commits nothing more, and the write transaction keeps other recoverers out meanwhile.
            with self._index.write() as txn:
                cur = self._index.seg_info(txn, seg)
                if cur is None or cur.state != SEG_OPEN:
                    segs[seg] = cur  # sealed or gone meanwhile (another process recovered or compacted it)
                    continue
                try:
                    os.truncate(self._seg_path(seg), cur.end)
                except FileNotFoundError:
                    pass
                txn.put(seg_key(seg), cur._replace(state=SEG_SEALED).pack(), db=self._index.segs)
            segs[seg] = cur._replace(state=SEG_SEALED)
        for seg in [seg for seg, info in segs.items() if info is None]:
            del segs[seg]

    def _compact_locked(self, live_ratio: float) -> int:
        with self._index.read() as txn:
            segs = self._index.segments(txn)
        self._recover_dead_writers(segs)
        victims = sorted((info.live, seg) for seg, info in segs.items()
                         if seg != self._wseg and info.state == SEG_SEALED
                         and (info.count == 0 or info.live / max(info.end, 1) < live_ratio))
        if not victims:
            return 0
        vset = {seg for _, seg in victims}
        by_seg: dict[int, list[tuple[bytes, Record]]] = {}
        with self._index.read() as txn:
            for k, v in txn.cursor(db=self._index.pages):
                r = Record.unpack(v)
                if r.seg in vset:
                    by_seg.setdefault(r.seg, []).append((bytes(k), r))
        cap = self.config.capacity_bytes
        reclaimed = 0
        for live, seg in victims:  # emptiest first; each is deleted before the next is copied (bounded overshoot)
            moving = by_seg.get(seg, [])
            if moving and self._usage()[0] + live > cap:
                continue  # copying forward would break the byte cap; eviction must free more first
            batch, batch_bytes, bad = [], 0, []
            limit = max(64 << 10, self.config.segment_bytes // 4)
            for pk, rec in moving:
                blob = self._read_blob(rec)
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
                self._drop_bad(bad)
            with self._index.write() as txn:
                info = self._index.seg_info(txn, seg)
                if info is None or info.count:
                    continue  # not empty after all (should not happen): keep it
                txn.delete(seg_key(seg), db=self._index.segs)
            self._remove_segment_file(seg)  # the index no longer names this segment: now the file can go
            reclaimed += 1
        self._counts["segments_compacted"] += reclaimed
        return reclaimed

    def _move(self, batch: list[tuple[bytes, Record, bytes]]) -> None:
        total = sum(len(b) for _, _, b in batch)
        seg, off0 = self._writer_for(total)
        end, synced = self._append([b for _, _, b in batch], off0)
        synced.result()
        off, moved = off0, []
        with self._index.write() as txn:
            for pk, rec, blob in batch:
                cur = txn.get(pk, db=self._index.pages)
                moved_rec = rec._replace(seg=seg, off=off)
                off += len(blob)
                if cur is None or Record.unpack(cur)[:2] != rec[:2]:
                    continue  # deleted or rewritten meanwhile: the copy is dead bytes
                moved.append((pk, moved_rec))
            self._index.put_pages(txn, seg, moved, end=end)  # also takes the old copies out of their segment
        self._last_txn_records = len(moved)
        self._wend = end
        if end >= self.config.segment_bytes:
            self._seal_writer()

    def _close_stale_fds(self) -> None:
        with self._index.read() as txn:
            live = set(self._index.segments(txn))
        with self._fds_lock:
            stale = [s for s in self._fds if s not in live]
        for s in stale:
            self._forget_fd(s)
