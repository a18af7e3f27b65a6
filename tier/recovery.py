"""Opening a store whatever state it is in: check it, repair it, or step aside -- a damaged cache never takes the
server down (issue 17). Damaged or missing data costs only misses.

The recovery ladder, in order of preference (each step: one log line, a count by kind in DiskStats.recoveries, which
the server exports as ``kvdrive:store_recoveries_total{kind=...}``):

1. Repair in place.
   - STAMP_REWRITTEN: the directory holds only kvdrive's entries but its KVDRIVE_FORMAT is missing or damaged.
   - DIRS_RECREATED: ``index/`` or ``segments/`` is missing (a missing index is then rebuilt, next).
   - INDEX_REBUILT: the LMDB index fails its check (``check_index``: opened and walked in a child process, so a
     damaged B-tree that would crash LMDB crashes only the child; every record and each segment's accounting (I2)
     must hold), or segment files hold bytes beyond the index's allocations (an older or replaced index). The index
     is rebuilt from the segment files alone (I11: each record's trailer names it). Only records whose trailer and
     checksum hold come back; what was in format-1 segments (written before trailers existed) is lost, as are the
     promoter's scores, access times and store notes (hints: they are learnt again).
2. MOVED_ASIDE: repairing failed (the rebuild could not read or write, or its result failed the check): the store is
   renamed ``DIR.damaged-<time>`` (kept for a look, never deleted silently) and an empty store starts at DIR.
3. TIER_OFF: not even that was possible (or the directory holds a store of another format version, which is left
   alone, or a maintenance command holds the store): this process runs with its disk tier off.

Checks and repairs run under the store's open lock (one opener at a time), and repairs only while no other process
has the store open (its exclusive lock): a store other processes are using passed their check when they opened it.
``kvdrive repair DIR`` runs the same ladder by hand (tier/cli.py).

A directory that is not a kvdrive store is still refused (store_dir.inspect_store_dir): nothing here writes into it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from enum import Enum
from typing import NamedTuple

import lmdb

from . import clock
from .codecs import CodecError, peek_header
from .crypto import is_envelope
from .errors import StoreDirError, StoreFormatError, StoreLockedError
from .index import FRAMED, SEALED, SEG_SEALED, Index, Record, SegInfo, seg_key
from .segment_records import Kind, scan, trailer_size
from .store_dir import (
    DIR_MODE,
    FILE_MODE,
    FORMAT_VERSION,
    INDEX_DIR,
    OPEN_LOCK_FILE,
    SEGMENT_DIR,
    DirState,
    StoreLock,
    check_store_dir,
    inspect_store_dir,
    rewrite_stamp,
)

log = logging.getLogger("kvdrive.tier")

_U32 = 4
_REC_BYTES = 62
_SEG_BYTES = 29
_TXN_PAGES = 20000  # page records per rebuild commit
LOCK_WAIT_S = 10.0  # a server waits this long for a maintenance command to let go of the store


class RecoveryKind(str, Enum):
    STAMP_REWRITTEN = "stamp_rewritten"
    DIRS_RECREATED = "dirs_recreated"
    INDEX_REBUILT = "index_rebuilt"
    MOVED_ASIDE = "moved_aside"
    TIER_OFF = "tier_off"


class Recovery(NamedTuple):
    kind: RecoveryKind
    detail: str


class IndexHealth(NamedTuple):
    ok: bool
    problem: str  # "" when ok
    pages: int = 0
    next_seg: int = 1  # the next segment id the index would allocate


class RebuildReport(NamedTuple):
    segments: int  # segment files scanned
    kept: int  # pages indexed
    dropped: int  # records whose trailer is whole but whose blob is damaged, or is not a page blob
    expired: int  # intact pages past their expiry (not indexed)
    superseded: int  # older copies of a page (compaction moved it; the newest copy is kept)
    unframed_segments: int  # files holding bytes but no whole record: format 1 (found only by the old index), or cut
    unreadable_segments: int  # files that could not be read (I/O errors)
    namespaces: int
    bytes_scanned: int


class OpenedStore(NamedTuple):
    """What ``open_store`` came to: the store's ``lock`` and ``index`` (both None when ``off_reason`` says why the
    disk tier is off) and the ``recoveries`` it took."""

    path: str
    lock: StoreLock | None
    index: Index | None
    recoveries: list[Recovery]
    off_reason: str | None


# --- the index check (runs in a child process) -------------------------------------------------------------------
def _check_env(index_dir: str) -> IndexHealth:
    """Walk every tree of the index and check every record: the child process's work (see check_index)."""
    env = lmdb.open(index_dir, readonly=True, lock=False, subdir=True, max_dbs=8, readahead=False)
    try:
        with env.begin() as txn:
            names = {bytes(k) for k, _ in txn.cursor()}
        if not names:
            return IndexHealth(True, "")  # a new, empty index
        missing = {b"meta", b"ns", b"pages", b"segs"} - names
        if missing:
            return IndexHealth(False, f"index databases {sorted(m.decode() for m in missing)} are missing")
        with env.begin() as txn:
            dbs = {n: env.open_db(n.encode(), txn=txn, create=False) for n in ("meta", "ns", "pages", "segs")}
            nxt = txn.get(b"next_seg", db=dbs["meta"])
            if nxt is not None and len(nxt) != _U32:
                return IndexHealth(False, "next segment id is damaged")
            next_seg = int.from_bytes(nxt, "big") if nxt else 1
            segs: dict[int, SegInfo] = {}
            for k, v in txn.cursor(db=dbs["segs"]):
                if len(k) != _U32 or len(v) != _SEG_BYTES:
                    return IndexHealth(False, "a segment record is damaged")
                info = SegInfo.unpack(v)
                seg = int.from_bytes(k, "big")
                if not 0 < seg < next_seg or info.state not in (0, 1) or info.live > info.end:
                    return IndexHealth(False, f"segment record {seg} is damaged")
                segs[seg] = info
            sums: Counter = Counter()
            n = 0
            for k, v in txn.cursor(db=dbs["pages"]):
                if len(k) < 17 or k[16] not in (0, 1) or (k[16] == 1 and len(k) != 49) or len(v) != _REC_BYTES:
                    return IndexHealth(False, "a page record or key is damaged")
                r = Record.unpack(v)
                info = segs.get(r.seg)
                span = r.length + (trailer_size(bytes(k)) if r.flags & FRAMED else 0)
                if info is None or r.flags & ~(SEALED | FRAMED) or r.length == 0 or r.off + span > info.end:
                    return IndexHealth(False, "a page record points outside its segment")
                sums[(r.seg, 0)] += r.length
                sums[(r.seg, 1)] += r.raw_nbytes
                sums[(r.seg, 2)] += 1
                n += 1
            for seg, info in segs.items():  # I2: each segment's accounting is the sum over its records
                if (sums[(seg, 0)], sums[(seg, 1)], sums[(seg, 2)]) != (info.live, info.raw_live, info.count):
                    return IndexHealth(False, f"the accounting of segment {seg} does not match its records")
            for k, v in txn.cursor(db=dbs["ns"]):
                if len(k) != 16 or not isinstance(json.loads(bytes(v)), dict):
                    return IndexHealth(False, "a namespace record is damaged")
        return IndexHealth(True, "", n, next_seg)
    finally:
        env.close()


def _check_main(index_dir: str) -> int:
    try:
        health = _check_env(index_dir)
    except (lmdb.Error, ValueError, UnicodeDecodeError, OverflowError) as e:
        health = IndexHealth(False, f"{type(e).__name__}: {e}")
    print(json.dumps(health._asdict()))
    return 0


def _segment_files(seg_dir: str) -> list[tuple[int, str, int]]:
    """(id, path, size) of each segment file, by id."""
    out = []
    try:
        with os.scandir(seg_dir) as it:
            for e in it:
                if e.name.startswith("seg-") and e.name.endswith(".kvs") and len(e.name) == 16:
                    try:
                        out.append((int(e.name[4:12], 16), e.path, e.stat().st_size))
                    except (ValueError, OSError):
                        continue
    except FileNotFoundError:
        pass
    return sorted(out)


def check_index(path: str, *, timeout_s: float | None = None) -> IndexHealth:
    """Whether the index of store ``path`` can be trusted: it opens and every tree walks in a child process (a
    damaged LMDB file can crash the process reading it), every record is well-formed and inside its segment, each
    segment's accounting matches its records (I2), and no segment file holds bytes beyond the segments the index
    allocated (I3: an older or replaced index)."""
    index_dir = os.path.join(path, INDEX_DIR)
    files = _segment_files(os.path.join(path, SEGMENT_DIR))
    data = os.path.join(index_dir, "data.mdb")
    try:
        size = os.path.getsize(data)
    except OSError:
        size = -1
    if size <= 0:
        if any(sz for _, _, sz in files):
            return IndexHealth(False, "the index is missing while segment files hold pages")
        return IndexHealth(True, "")
    if timeout_s is None:
        timeout_s = 60 + size / (20 << 20)  # a walk reads well over 20 MiB/s
    code = "import sys; from kvdrive_sglang.tier.recovery import _check_main; sys.exit(_check_main(sys.argv[1]))"
    cmd = [sys.executable, "-c", code, index_dir]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False, close_fds=True)
    except subprocess.TimeoutExpired:
        return IndexHealth(False, f"the index check did not finish in {timeout_s:.0f}s")
    if done.returncode != 0:
        sig = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        return IndexHealth(False, f"reading the index crashed the checking process ({sig})")
    try:
        got = json.loads(done.stdout.decode().strip().splitlines()[-1])
        health = IndexHealth(bool(got["ok"]), str(got["problem"]), int(got["pages"]), int(got["next_seg"]))
    except (ValueError, KeyError, IndexError, TypeError):
        return IndexHealth(False, "the index check gave no answer")
    if not health.ok:
        return health
    with_bytes = [seg for seg, _, sz in files if sz]
    if with_bytes and max(with_bytes) >= health.next_seg:
        return IndexHealth(
            False, f"segment file {max(with_bytes)} holds bytes the index never allocated (an older or replaced index)"
        )
    return health


# --- rebuilding the index from the segment files (I11) ------------------------------------------------------------
def _usable_blob(t, blob) -> bool:
    if t.flags & SEALED:
        return is_envelope(blob)
    try:
        h = peek_header(blob)
    except CodecError:
        return False
    return h.codec == t.codec and h.raw_nbytes == t.raw_nbytes


def rebuild_index(path: str, *, map_size: int, now_ms: int | None = None) -> RebuildReport:
    """Write a new index for store ``path`` from its segment files alone, then put it in place of the old one (which
    is removed). The caller holds the store's exclusive lock. Raises OSError / lmdb.Error if it cannot."""
    now_ms = clock.now_ms() if now_ms is None else now_ms
    seg_dir = os.path.join(path, SEGMENT_DIR)
    files = _segment_files(seg_dir)
    best: dict[bytes, tuple[int, int, object]] = {}
    descs: dict[bytes, bytes] = {}
    ends: dict[int, int] = {}
    dropped = expired = intact = unframed = unreadable = scanned = 0
    for seg, fpath, _ in files:
        try:
            with open(fpath, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning(
                "kvdrive: rebuilding the index of store %s: cannot read %s (%s); its pages are lost",
                path,
                fpath,
                e.strerror,
            )
            unreadable += 1
            continue
        scanned += len(data)
        ends[seg] = len(data)
        found = 0
        for rec in scan(data):
            found += 1
            t = rec.trailer
            blob = memoryview(data)[rec.blob_off : rec.blob_off + t.length]
            if t.kind == Kind.NAMESPACE:
                if rec.intact:
                    try:
                        if isinstance(json.loads(bytes(blob)), dict):
                            descs[t.key] = bytes(blob)
                    except ValueError:
                        pass
                continue
            if not rec.intact or not _usable_blob(t, blob) or t.flags & ~SEALED:
                dropped += 1
                continue
            if t.expires_ms and t.expires_ms <= now_ms:
                expired += 1
                continue
            intact += 1
            best[t.key] = (seg, rec.blob_off, t)  # files by id, records by offset: the newest copy wins
        if not found and data:
            unframed += 1
    tmp = os.path.join(path, f"{INDEX_DIR}.rebuild-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=DIR_MODE)
    per_seg: dict[int, list[int]] = {seg: [0, 0, 0] for seg in ends}
    recs = []
    for pk, (seg, off, t) in best.items():
        recs.append(
            (
                pk,
                Record(
                    seg,
                    off,
                    t.length,
                    t.codec,
                    t.flags | FRAMED,
                    t.checksum,
                    t.raw_nbytes,
                    t.created_ms,
                    t.created_ms,
                    t.expires_ms,
                    0.0,
                ),
            )
        )
        acc = per_seg[seg]
        acc[0] += t.length
        acc[1] += t.raw_nbytes
        acc[2] += 1
    idx = Index(tmp, map_size=map_size)
    try:
        with idx.write() as txn:
            txn.put(b"next_seg", (max(ends, default=0) + 1).to_bytes(_U32, "big"), db=idx.meta)
            if any(r.expires_ms for _, r in recs):
                txn.put(b"ttl_used", b"1", db=idx.meta)
            for seg, (live, raw, count) in per_seg.items():
                txn.put(seg_key(seg), SegInfo(ends[seg], live, raw, count, SEG_SEALED).pack(), db=idx.segs)
            for nid, desc in descs.items():
                txn.put(nid, desc, db=idx.ns)
        recs.sort()
        for i in range(0, len(recs), _TXN_PAGES):
            with idx.write() as txn:
                for pk, r in recs[i : i + _TXN_PAGES]:
                    txn.put(pk, r.pack(), db=idx.pages)
        idx.env.sync(True)
    finally:
        idx.close()
    _swap_in(path, tmp)
    return RebuildReport(
        len(files), len(recs), dropped, expired, intact - len(recs), unframed, unreadable, len(descs), scanned
    )


def _swap_in(path: str, new_index: str) -> None:
    index_dir = os.path.join(path, INDEX_DIR)
    old = os.path.join(path, f"{INDEX_DIR}.damaged-{os.getpid()}")
    if os.path.lexists(index_dir):
        os.rename(index_dir, old)
    os.rename(new_index, index_dir)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)  # derived data, rebuilt: the log line says so


# --- the ladder ----------------------------------------------------------------------------------------------------
class _OpenLock:
    """DIR/open.lock, exclusive, blocking: one process at a time checks and repairs the store before using it."""

    def __init__(self, path: str):
        self.fd = os.open(os.path.join(path, OPEN_LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)


def move_aside(path: str) -> str:
    """Rename the store at ``path`` to ``path.damaged-<time>`` (kept, never deleted) and start an empty store there.
    Returns where the old one went."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 0
    while os.path.lexists(aside if not n else f"{aside}-{n}"):
        n += 1
    aside = aside if not n else f"{aside}-{n}"
    os.rename(path, aside)
    check_store_dir(path, create=True)
    return aside


def _lock(path: str, mode: str, *, wait_s: float) -> StoreLock:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return StoreLock(path, mode)
        except StoreLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def open_store(
    path: str, *, map_size: int, lock_mode: str = "shared", repair: bool = True, rebuild: bool = False
) -> OpenedStore:
    """Check the store at ``path`` and open its index, taking the ladder's steps (module docstring) where it is
    damaged. ``repair=False`` (the read-only ``kvdrive`` commands): a damaged store raises StoreFormatError naming
    ``kvdrive repair`` instead, and a locked one StoreLockedError. ``rebuild``: rebuild the index even if it checks
    out. Raises only for directories that are not kvdrive stores (and, without ``repair``, damaged ones)."""
    path = check_store_dir(path, create=True)
    recoveries: list[Recovery] = []

    def note(kind: RecoveryKind, detail: str) -> None:
        recoveries.append(Recovery(kind, detail))
        (log.error if kind in (RecoveryKind.MOVED_ASIDE, RecoveryKind.TIER_OFF) else log.warning)(
            "kvdrive: store %s: %s", path, detail
        )

    def off(detail: str) -> OpenedStore:
        note(RecoveryKind.TIER_OFF, f"{detail}; the disk tier is off in this process (requests recompute)")
        return OpenedStore(path, None, None, recoveries, detail)

    try:
        opening = _OpenLock(path)
    except OSError as e:
        if not repair:
            raise StoreDirError(f"cannot lock store {path}: {e.strerror}") from None
        return off(f"cannot take its open lock ({e.strerror})")
    try:
        check = inspect_store_dir(path)  # again: another opener may have repaired or moved it meanwhile
        if check.state is DirState.OTHER_VERSION:
            if not repair:
                raise StoreFormatError(check.problem)
            return off(
                f"it holds a store of format version {check.version!r} (this kvdrive reads version "
                f"{FORMAT_VERSION}); left as it is"
            )
        try:
            alone = StoreLock(path, "exclusive")
        except StoreLockedError:
            alone = None  # in use: the processes using it checked it when they opened it
        except StoreDirError as e:
            if not repair:
                raise
            return off(str(e))
        try:
            if alone is not None:
                _repair(path, check, map_size, repair, rebuild, note)
        except (OSError, lmdb.Error) as e:
            alone.release()
            alone = None
            try:
                aside = move_aside(path)
            except (OSError, StoreDirError) as e2:
                return off(f"repairing it failed ({e}) and so did moving it aside ({e2})")
            note(RecoveryKind.MOVED_ASIDE, f"repairing it failed ({e}); moved it to {aside} and started an empty store")
        finally:
            if alone is not None:
                alone.release()
        if (
            check.state is DirState.DAMAGED
            and alone is None
            and not any(r.kind is RecoveryKind.MOVED_ASIDE for r in recoveries)
        ):
            if not repair:
                raise StoreFormatError(f"store {path} is damaged ({check.problem}); `kvdrive repair {path}` repairs it")
            rewrite_stamp(path)  # atomic: safe while others use the store
            note(RecoveryKind.STAMP_REWRITTEN, f"{check.problem}; rewrote it")
        try:
            lock = _lock(path, lock_mode, wait_s=LOCK_WAIT_S if repair else 0.0)
        except StoreLockedError as e:
            if not repair:
                raise
            return off(str(e))
        try:
            index = Index(os.path.join(path, INDEX_DIR), map_size=map_size)
        except lmdb.Error as e:
            lock.release()
            if not repair:
                raise StoreDirError(f"cannot open the index of store {path}: {e}") from None
            return off(f"its index does not open ({e})")
        return OpenedStore(path, lock, index, recoveries, None)
    finally:
        opening.release()


def _repair(path: str, check, map_size: int, repair: bool, rebuild: bool, note) -> None:
    """Steps 1 of the ladder, alone with the store: stamp, directories, index. Raises OSError / lmdb.Error when a
    repair fails (the caller moves the store aside)."""

    def refuse(problem: str) -> None:
        raise StoreFormatError(f"store {path} is damaged ({problem}); `kvdrive repair {path}` repairs it")

    if check.state is DirState.DAMAGED:
        if not repair:
            refuse(check.problem)
        rewrite_stamp(path)
        note(RecoveryKind.STAMP_REWRITTEN, f"{check.problem}; rewrote it")
    missing = [sub for sub in (INDEX_DIR, SEGMENT_DIR) if not os.path.isdir(os.path.join(path, sub))]
    if missing:
        if not repair:
            refuse(f"{' and '.join(missing)}/ missing")
        for sub in missing:
            if os.path.lexists(os.path.join(path, sub)):
                os.unlink(os.path.join(path, sub))  # a file where the directory belongs
            os.makedirs(os.path.join(path, sub), mode=DIR_MODE)
        note(RecoveryKind.DIRS_RECREATED, f"{' and '.join(missing)}/ missing; recreated")
    health = check_index(path)
    if health.ok and not rebuild:
        return
    if not repair:
        refuse(f"its index: {health.problem}")
    t0 = time.monotonic()
    rep = rebuild_index(path, map_size=map_size)
    after = check_index(path)
    if not after.ok:
        raise OSError(f"the rebuilt index fails its check too: {after.problem}")
    why = "rebuilt on request" if health.ok else health.problem
    note(
        RecoveryKind.INDEX_REBUILT,
        f"index: {why}; rebuilt it from {rep.segments} segment file(s) in {time.monotonic() - t0:.1f}s: kept "
        f"{rep.kept} page(s), dropped {rep.dropped} damaged, {rep.expired} expired, {rep.superseded} older copies"
        + (
            f"; {rep.unframed_segments} segment file(s) held no whole record (written before segment format 2, "
            "or cut short)"
            if rep.unframed_segments
            else ""
        )
        + (f"; {rep.unreadable_segments} unreadable segment file(s)" if rep.unreadable_segments else ""),
    )
