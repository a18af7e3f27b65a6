"""Positional file I/O for segment files: POSIX pread/pwrite, or kvikio when asked for and usable.

Both read straight into the caller's buffers (scatter reads): a raw page goes from the file into the caller's host
buffer with no intermediate copy. POSIX is the default (issue 15): kvikio was not measured faster for page-sized reads
into host memory, and its default thread pool of one serialised every read.
"""

from __future__ import annotations

import logging
import mmap
import os

from .handle_cache import HandleCache

log = logging.getLogger("kvdrive.tier")

IOV_MAX = 1024  # Linux's UIO_MAXIOV: iovecs one preadv/pwritev takes (tier/read_runs.py sizes its runs by it)
ALIGN = 4096  # O_DIRECT offset/length/address alignment (the logical block size of any current SSD is <= 4 KiB)


def open_direct(path: str) -> int | None:
    """A second, O_DIRECT write descriptor for an already open file; None where the file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return None  # tmpfs and some FUSE file systems: buffered writes instead


class Staging:
    """Two reused, page-aligned halves for O_DIRECT appends (anonymous mmap: aligned, and touched once).

    While one half is being written by the I/O thread, the caller fills the other: the copy (and the checksums
    computed beside it) overlap with the device write.
    """

    def __init__(self, nbytes: int):
        self.half = max(ALIGN, -(-(nbytes // 2) // ALIGN) * ALIGN)
        self.buf = mmap.mmap(-1, 2 * self.half)
        self.views = [memoryview(self.buf)[: self.half], memoryview(self.buf)[self.half :]]

    def close(self) -> None:
        try:
            for v in self.views:
                v.release()
            self.buf.close()
        except BufferError:
            pass  # a slice is still referenced (e.g. by a traceback): the mapping goes when the last one does


def direct_append(fd: int, staging: Staging, bufs: list, offset: int, submit, each=None) -> tuple[int, list]:
    """Write ``bufs`` back to back at the aligned ``offset`` through ``staging``, zero-padding the end to ALIGN.

    ``submit(fn, *args) -> Future`` runs the pwrites on one I/O thread, in order; ``each(i, buf)`` is called after
    buffer i is staged (for checksums), overlapping with the writes. Returns (aligned end offset, the write futures
    not yet waited on); the caller must check them (e.g. from a fdatasync queued behind them on the same thread).

    Writing from the staging buffer skips the page cache: no copy into it, no write-back storm at fdatasync time,
    and nothing evicted from the cache that reads and the index rely on.
    """
    if offset % ALIGN:
        raise ValueError(f"direct append at unaligned offset {offset}")
    cap = staging.half
    pending = [None, None]
    cur, fill = 0, 0

    def flush(nbytes: int):
        nonlocal cur, fill, offset
        pending[cur] = submit(_pwrite_all, fd, staging.views[cur][:nbytes], offset)
        offset += nbytes
        cur, fill = 1 - cur, 0
        if pending[cur] is not None:
            pending[cur].result()  # the other half must be written before it is refilled (raises its error)
            pending[cur] = None

    for i, b in enumerate(bufs):
        src = memoryview(b).cast("B")
        if each is not None:
            each(i, src)
        while len(src):
            view = staging.views[cur]
            n = min(len(src), cap - fill)
            view[fill : fill + n] = src[:n]
            fill += n
            src = src[n:]
            if fill == cap:
                flush(cap)
    if fill:
        padded = -(-fill // ALIGN) * ALIGN
        staging.views[cur][fill:padded] = bytes(padded - fill)
        flush(padded)
    return offset, [f for f in pending if f is not None]


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class PosixIO:
    name = "posix"

    def pwritev(self, fd: int, bufs: list, offset: int) -> int:
        """Write all of ``bufs`` at ``offset``; loops over short writes and IOV_MAX."""
        total = 0
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            batch = views[:IOV_MAX]
            n = os.pwritev(fd, batch, offset + total)
            total += n
            # drop fully written buffers; trim a partly written one
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch.pop(0)
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        return total

    def preadv(self, fd: int, bufs: list, offset: int, path: str | None = None) -> int:
        """Read into ``bufs`` from ``offset``; returns the byte count (short at end of file)."""
        total = 0
        want = sum(len(memoryview(b).cast("B")) for b in bufs)
        views = [memoryview(b).cast("B") for b in bufs]
        while views and total < want:
            n = os.preadv(fd, views[:IOV_MAX], offset + total)
            if n == 0:
                break
            total += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        return total

    def sync(self, fd: int) -> None:
        os.fdatasync(fd)

    def forget(self, path: str) -> None:
        """Drop any handle kept for ``path`` (a segment that was compacted away)."""


class KvikioIO(PosixIO):
    """kvikio's parallel pread (its thread pool splits large reads; GDS where the file system allows it).

    Writes stay POSIX: they are appends followed by fdatasync, which kvikio does not speed up. Its handles (one per
    segment path) are cached like the store's descriptors (tier/handle_cache.py): pinned across each read, so
    ``forget`` (compaction deleting a segment) closes a handle only once no read uses it (I5).
    """

    name = "kvikio"

    def __init__(self, kvikio_mod, handles: int = 256):
        self._kvikio = kvikio_mod
        self._files = HandleCache(lambda path: kvikio_mod.CuFile(path, "r"), _close_handle, handles)
        _size_thread_pool(kvikio_mod)

    def preadv(self, fd: int, bufs: list, offset: int, path: str | None = None) -> int:
        if path is None:
            return super().preadv(fd, bufs, offset)
        total = 0
        with self._files.pinned(path) as f:
            for b in bufs:
                view = memoryview(b).cast("B")
                n = f.pread(view, len(view), offset + total).get()
                total += n
                if n < len(view):
                    break
        return total

    def forget(self, path: str) -> None:
        self._files.forget(path)

    def close(self) -> None:
        self._files.close_all()


def _close_handle(key, handle, replaced: bool) -> None:
    handle.close()


# kvikio's thread pool defaults to one thread (KVIKIO_NTHREADS unset): every read of every SGLang thread waited on it
# in turn. Several concurrent page reads need several threads; more than this buys nothing for page-sized reads.
KVIKIO_THREADS = 8


def kvikio_threads(cpus: int | None, env: str | None) -> int | None:
    """The thread count to give kvikio's pool: None when KVIKIO_NTHREADS (``env``) already says."""
    if env:
        return None
    return max(1, min(KVIKIO_THREADS, cpus or 1))


def _size_thread_pool(kvikio_mod) -> None:
    n = kvikio_threads(os.cpu_count(), os.environ.get("KVIKIO_NTHREADS"))
    if n is None:
        return
    defaults = kvikio_mod.defaults
    try:
        if hasattr(defaults, "set"):  # kvikio >= 25.02
            defaults.set("num_threads", n)
        else:
            defaults.num_threads_reset(n)
    except Exception as e:  # noqa: BLE001 - a kvikio without either call: its own default, said once
        log.warning("kvdrive: could not size kvikio's thread pool to %d threads (%s); set KVIKIO_NTHREADS", n, e)


def select_io(prefer: str = "posix", *, handles: int = 256):
    """``posix``: POSIX. ``auto``: kvikio when it imports and CUDA is available, else POSIX. ``kvikio``: the same,
    with a warning when it falls back. ``handles``: kvikio file handles kept open (as the store's fd_cache)."""
    if prefer == "posix":
        return PosixIO()
    try:
        import kvikio
        import torch

        if torch.cuda.is_available():
            return KvikioIO(kvikio, handles)
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        log.debug("kvikio not usable: %s", e)
    if prefer == "kvikio":
        log.warning("kvikio requested but not usable here (needs the kvikio package and a CUDA GPU); using POSIX I/O")
    return PosixIO()
