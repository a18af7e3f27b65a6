"""Positional file I/O for segment files: POSIX pread/pwrite, or kvikio when it imports and a GPU is present.

Both read straight into the caller's buffers (scatter reads): a raw page goes from the file into the caller's host
buffer with no intermediate copy.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("kvdrive.tier")

_IOV_MAX = 1024


class PosixIO:
    name = "posix"

    def pwritev(self, fd: int, bufs: list, offset: int) -> int:
        """Write all of ``bufs`` at ``offset``; loops over short writes and IOV_MAX."""
        total = 0
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            batch = views[:_IOV_MAX]
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
            n = os.preadv(fd, views[:_IOV_MAX], offset + total)
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

    Writes stay POSIX: they are appends followed by fdatasync, which kvikio does not speed up.
    """

    name = "kvikio"

    def __init__(self, kvikio_mod):
        self._kvikio = kvikio_mod
        self._files: dict[str, object] = {}

    def preadv(self, fd: int, bufs: list, offset: int, path: str | None = None) -> int:
        if path is None:
            return super().preadv(fd, bufs, offset)
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = self._kvikio.CuFile(path, "r")
        total = 0
        for b in bufs:
            view = memoryview(b).cast("B")
            n = f.pread(view, len(view), offset + total).get()
            total += n
            if n < len(view):
                break
        return total

    def forget(self, path: str) -> None:
        f = self._files.pop(path, None)
        if f is not None:
            f.close()


def select_io(prefer: str = "auto"):
    """``auto``: kvikio when it imports and CUDA is available, else POSIX. ``posix``: always POSIX."""
    if prefer == "posix":
        return PosixIO()
    try:
        import kvikio  # noqa: F401
        import torch

        if torch.cuda.is_available():
            return KvikioIO(kvikio)
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        pass
    if prefer == "kvikio":
        log.warning("kvikio requested but not usable here (needs the kvikio package and a CUDA GPU); using POSIX I/O")
    return PosixIO()
