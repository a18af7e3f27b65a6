"""A disk store's upkeep: TTL expiry, capacity and compaction in one periodic pass (``maintain``), and a full check
of every page (``verify``, the ``kvdrive verify`` command).

``DiskStore`` owns one (when its disk tier opened) and keeps the public methods, which skip the work while the tier is
off and turn a disk fault into its fault handling (I8). Expired and damaged entries leave the index through
``Index.delete_page`` (I2); a damaged entry is dropped only while it still names the bytes that were read (I3,
``DiskStore._drop_bad``). Split from disk_store.py (issue 16).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from . import clock
from .compaction import Compactor
from .disk_config import VerifyReport, fault_kind
from .index import Index, IndexRoom
from .page_writer import PageWriter
from .segment_fds import SegmentFds


class StoreUpkeep:
    def __init__(
        self,
        index: Index,
        *,
        room: IndexRoom,
        compactor: Compactor,
        fds: SegmentFds,
        pages: PageWriter,
        write_lock: threading.RLock,
        counts: Counter,
        faults: Counter,
        read_blob: Callable,
        drop_bad: Callable,
    ):
        self.index = index
        self.room = room
        self.compactor = compactor
        self.fds = fds
        self.pages = pages
        self.write_lock = write_lock
        self.counts = counts  # the store's: expired
        self.faults = faults  # the store's, by fault kind: verify's unreadable pages
        self.read_blob = read_blob  # DiskStore._read_blob: the verified blob or None (I8)
        self.drop_bad = drop_bad

    def maintain(self) -> None:
        """OSError / lmdb.Error propagate: the store's fault handling takes them."""
        self.room.clear_stale_readers()
        with self.write_lock:
            self.expire()
            self.room.keep_headroom()  # writes keep it per commit (commit_size); this catches other writers (I7)
            self.compactor.make_room(0)
            self.compactor.compact(None)
        with self.index.read() as txn:
            live = set(self.index.segments(txn))
        self.fds.close_stale(live)

    def expire(self) -> int:
        """Delete expired pages. A full index scan, skipped while no page in the store was ever given a TTL."""
        if not self.pages.ttl_used:
            with self.index.read() as txn:
                self.pages.ttl_used = txn.get(b"ttl_used", db=self.index.meta) is not None
            if not self.pages.ttl_used:
                return 0
        now = clock.now_ms()
        n = 0
        with self.write_lock, self.index.write() as txn:
            for pk, rec in list(self.index.records(txn)):
                if rec.expires_ms and rec.expires_ms <= now:
                    self.index.delete_page(txn, pk)  # I2
                    n += 1
        self.counts["expired"] += n
        return n

    def verify(self) -> VerifyReport:
        """Re-read every page, check header and checksum; drop bad entries from the index."""
        checked = ok = nbytes = io_errors = 0
        bad = []
        with self.index.read() as txn:
            items = list(self.index.records(txn))
        for pk, rec in items:
            checked += 1
            nbytes += rec.length
            try:
                blob = self.read_blob(rec, pk)
            except OSError as e:  # unreadable now: kept, the bytes may be fine
                io_errors += 1
                self.faults[fault_kind(e)] += 1
                continue
            if blob is not None:
                ok += 1
            else:
                bad.append((pk, rec))
        if bad:
            self.drop_bad(bad)
        return VerifyReport(checked, ok, len(bad), nbytes, io_errors)
