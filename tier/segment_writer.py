"""This process's writer segment: allocate (a fresh id, flock'ed), append (O_DIRECT through staging, or buffered),
fdatasync on one I/O thread, seal, abandon after a fault.

Each process appends to a segment of its own, so no two writers ever touch the same file (I4 in docs/invariants.md);
segment ids come from the index and are never reused (I3). A payload is durable before any index entry points at it
(I1): ``append`` returns a future the caller waits on before it commits.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import lmdb

from .fileio import ALIGN, Staging, direct_append, open_direct
from .index import SEG_SEALED, Index, seg_key
from .segment_fds import segment_path
from .store_dir import FILE_MODE

log = logging.getLogger("kvdrive.tier")


class SegmentWriter:
    """``seg``: the open segment (0: none); ``end``: the offset the next append goes to. ``io_thread``: the single
    thread that runs every write and sync, in order."""

    def __init__(
        self,
        index: Index,
        seg_dir: str,
        io,
        *,
        segment_bytes: int,
        direct_io: bool,
        staging_bytes: int,
        faults: Counter,
        store_path: str,
    ):
        self.index = index
        self.seg_dir = seg_dir
        self.io = io
        self.segment_bytes = segment_bytes
        self.direct_io = direct_io
        self.staging_bytes = staging_bytes
        self.faults = faults
        self.store_path = store_path
        self.io_thread = ThreadPoolExecutor(1, thread_name_prefix="kvdrive-fsync")
        self.seg = 0
        self.end = 0
        self._fd = -1
        self._direct = None  # O_DIRECT descriptor of the writer segment (None: buffered appends)
        self._staging: Staging | None = None
        # namespaces whose description is already in the writer segment: each segment holding a namespace's pages
        # also holds its NAMESPACE record, so a rebuild from any surviving segments knows them (I11)
        self.described: set[bytes] = set()

    def reserve(self, incoming: int) -> tuple[int, int]:
        """(segment, offset) where ``incoming`` bytes go: the open segment, or a new one when it would overflow."""
        if self.seg and self.end and self.end + incoming > self.segment_bytes:
            self.seal()
        if self.seg and os.fstat(self._fd).st_nlink == 0:
            # our segment file was deleted under us (by hand, or a cleanup job): appending to the orphaned inode
            # would index pages no reader can ever open. Its indexed pages read as misses (dropped); start afresh.
            self.faults["missing_file"] += 1
            log.error(
                "kvdrive: segment file %s of store %s was deleted while in use; its pages are lost (served as "
                "misses) and writes go to a new segment",
                segment_path(self.seg_dir, self.seg),
                self.store_path,
            )
            self.seal()
        if not self.seg:
            self._allocate()
        return self.seg, self.end

    def _allocate(self) -> None:
        fd = -1
        try:
            with self.index.write() as txn:
                seg = self.index.alloc_segment(txn)  # I3: a fresh id, never reused
                # create and flock the file before the commit makes the segment visible: no other process can
                # ever see an open segment without its writer's lock (and mistake it for a dead writer's)
                # A file of this id may exist: left by a process killed inside this same (aborted) allocation.
                # Nothing references an uncommitted id and we hold LMDB's writer lock, so it is ours to reset.
                fd = os.open(segment_path(self.seg_dir, seg), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, 0)
        except BaseException:
            # the allocation did not commit (e.g. a full map): let go of the file, or its flock would make the
            # next allocation of the same id fail (EAGAIN) for as long as this process lives
            if fd >= 0:
                os.close(fd)
            raise
        self.seg, self._fd, self.end = seg, fd, 0
        self.described = set()
        self._direct = open_direct(segment_path(self.seg_dir, seg)) if self.direct_io else None

    def append(self, bufs: list, off: int, each=None) -> tuple[int, Future]:
        """Append blobs at ``off`` to the writer segment and fdatasync it, on the I/O thread.

        Returns (new end, ALIGN-padded for O_DIRECT; future that completes once the bytes are durable).
        ``each(i, buf)`` runs on the caller's thread before buffer i is written (as it is staged), in order: it may
        fill buffers that come after i (the page writer fills each blob's trailer with the blob's checksum).
        """
        fd = self._fd
        if self._direct is not None and off % ALIGN == 0:
            if self._staging is None:
                self._staging = Staging(self.staging_bytes)
            end, writes = direct_append(self._direct, self._staging, bufs, off, self._submit, each)
        else:
            writes = []
            if each is not None:  # before the write: each may fill a later buffer (a trailer)
                for i, b in enumerate(bufs):
                    each(i, b)
            end = off + self.io.pwritev(fd, bufs, off)
        # the same single I/O thread runs the sync after every write above; its future fails if any write did
        return end, self._submit(self._sync_after_writes, fd, writes)

    def seal_if_full(self) -> None:
        if self.end >= self.segment_bytes:
            self.seal()

    def seal(self) -> None:
        """Close the writer segment and mark it sealed in the index (compaction may then rewrite it)."""
        if not self.seg:
            return
        seg, fd = self.seg, self._fd
        self.seg, self._fd, self.end = 0, -1, 0
        self.described = set()
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        try:
            with self.index.write() as txn:
                info = self.index.seg_info(txn, seg)
                if info is not None:
                    txn.put(seg_key(seg), info._replace(state=SEG_SEALED).pack(), db=self.index.segs)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """After a write fault: stop appending to this segment (its tail may be torn); compaction reclaims it."""
        try:
            self.seal()
        except (OSError, lmdb.Error):
            pass

    def close(self) -> None:
        """Stop the I/O thread (after its queued work) and free the staging buffer; seal first."""
        self.io_thread.shutdown(wait=True)
        if self._staging is not None:
            self._staging.close()

    def _submit(self, fn, *args) -> Future:
        """``fn`` on the I/O thread; inline once Python's executors refuse work. At interpreter exit (SGLang's
        scheduler detaches its storage backend from an exit hook, after concurrent.futures has stopped accepting
        work) the final write-down of the DRAM tier must still reach the disk."""
        try:
            return self.io_thread.submit(fn, *args)
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
        self.io.sync(fd)
