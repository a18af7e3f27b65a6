"""Segment files on the read side: their paths and a cache of read descriptors, pinned across each read (I5)."""

from __future__ import annotations

import os

from .handle_cache import HandleCache


def segment_path(seg_dir: str, seg: int) -> str:
    return f"{seg_dir}/seg-{seg:08x}.kvs"


class SegmentFds:
    """Read descriptors of segment files, LRU, at most ``capacity`` (tier/handle_cache.py: a descriptor is closed by
    its last reader, never under one). ``io`` (tier/fileio.py) may keep handles of its own per path (kvikio): they
    are dropped with the descriptor unless a newer descriptor of the segment took over."""

    def __init__(self, seg_dir: str, io, capacity: int):
        self.seg_dir = seg_dir
        self.io = io
        self._cache: HandleCache[int] = HandleCache(self._open, self._close, capacity)

    def path(self, seg: int) -> str:
        return segment_path(self.seg_dir, seg)

    def pread(self, seg: int, off: int, bufs: list) -> int | None:
        """Read segment ``seg`` at ``off`` into ``bufs``; the byte count (short at end of file), or None when the
        segment file is gone (compacted or deleted). An I/O error propagates."""
        try:
            p = self._cache.pin(seg)
        except FileNotFoundError:
            return None
        try:
            return self.io.preadv(p.handle, bufs, off, self.path(seg))
        finally:
            self._cache.unpin(p)

    def forget(self, seg: int) -> None:
        """The segment is gone (or going): close its descriptor once no read uses it."""
        if not self._cache.forget(seg):
            self.io.forget(self.path(seg))

    def close_stale(self, live: set[int]) -> None:
        """Forget the descriptors of segments no longer in ``live`` (compacted away by another process)."""
        for seg in self._cache.cached():
            if seg not in live:
                self.forget(seg)

    def close(self) -> None:
        self._cache.close_all()

    def _open(self, seg: int) -> int:
        return os.open(self.path(seg), os.O_RDONLY | os.O_CLOEXEC)

    def _close(self, seg: int, fd: int, replaced: bool) -> None:
        os.close(fd)
        if not replaced:  # kvikio keeps its own handle per path: drop it unless a newer fd took over
            self.io.forget(self.path(seg))
