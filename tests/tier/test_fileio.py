"""Segment file I/O: short-I/O loops, IOV_MAX batching, O_DIRECT double-buffered appends, backend selection."""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kvdrive_sglang.tier.fileio import (
    ALIGN,
    PosixIO,
    Staging,
    direct_append,
    open_direct,
    select_io,
)


def chunks(rng, sizes):
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def test_pwritev_preadv_many_odd_buffers(tmp_path):
    rng = np.random.default_rng(0)
    bufs = chunks(rng, rng.integers(1, 300, 2500))  # more buffers than IOV_MAX (1024)
    io = PosixIO()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        total = sum(len(b) for b in bufs)
        assert io.pwritev(fd, bufs, 7) == total
        outs = [np.empty_like(b) for b in bufs]
        assert io.preadv(fd, outs, 7) == total
        assert all(np.array_equal(a, b) for a, b in zip(bufs, outs))
        short = [np.empty(10, np.uint8), np.empty(total, np.uint8)]
        assert io.preadv(fd, short, 7) == total  # end of file: a short read, reported as such
    finally:
        os.close(fd)


@pytest.mark.parametrize("stage_kib", [8, 64, 1024])
def test_direct_append_stages_pads_and_keeps_bytes(tmp_path, stage_kib):
    path = str(tmp_path / "seg")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    dfd = open_direct(path)
    if dfd is None:
        pytest.skip("this file system refuses O_DIRECT")
    rng = np.random.default_rng(1)
    bufs = chunks(rng, [5000, 123, 70000, 1, 4096, 30000])
    staging = Staging(stage_kib << 10)
    seen = []
    with ThreadPoolExecutor(1) as pool:
        end, writes = direct_append(dfd, staging, bufs, 0, pool.submit, lambda i, b: seen.append(i))
        for w in writes:
            w.result()
        end2, writes = direct_append(dfd, staging, bufs[:2], end, pool.submit)
        for w in writes:
            w.result()
    os.fdatasync(fd)
    total = sum(len(b) for b in bufs)
    assert seen == list(range(len(bufs)))
    assert end % ALIGN == 0 and total <= end < total + ALIGN
    assert end2 % ALIGN == 0 and os.path.getsize(path) == end2
    data = np.fromfile(path, dtype=np.uint8)
    np.testing.assert_array_equal(data[:total], np.concatenate(bufs))
    assert not data[total:end].any()  # padding is zeros
    np.testing.assert_array_equal(data[end : end + 5123], np.concatenate(bufs[:2]))
    with pytest.raises(ValueError, match="unaligned"):
        direct_append(dfd, staging, bufs, 100, None)
    staging.close()
    os.close(dfd)
    os.close(fd)


def test_select_io_is_posix_without_a_gpu():
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    assert select_io("auto").name == "posix" and select_io("posix").name == "posix"
    assert select_io("kvikio").name == "posix"  # asked for, not usable here: POSIX with a warning


@pytest.mark.gpu
def test_kvikio_reads_match_posix(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("kvikio")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    io = select_io("auto")
    assert io.name == "kvikio"
    data = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    path = str(tmp_path / "f")
    data.tofile(path)
    out = np.empty_like(data)
    fd = os.open(path, os.O_RDONLY)
    assert io.preadv(fd, [out], 0, path) == len(data)
    os.close(fd)
    np.testing.assert_array_equal(out, data)


# --- the handle cache (tier/handle_cache.py): I5, a handle is never closed under a read ----------------------------
# Tested with real POSIX file objects: the same code caches the store's descriptors and kvikio's CuFile handles.
def _file_cache(tmp_path, capacity, closed_log=None):
    from kvdrive_sglang.tier.handle_cache import HandleCache

    for name in "abcd":
        (tmp_path / name).write_bytes(name.encode() * 4096)

    def close(key, f, replaced):
        f.close()
        if closed_log is not None:
            closed_log.append((key, replaced))

    return HandleCache(lambda key: open(tmp_path / key, "rb", buffering=0), close, capacity)


def test_handle_forgotten_mid_read_closes_after_the_read(tmp_path):
    """Compaction forgetting a segment while a read uses its handle: the old kvikio cache closed it at once (issue
    15), so the read failed. Now it stays open until that read unpins it, then closes."""
    closed = []
    cache = _file_cache(tmp_path, 4, closed)
    p = cache.pin("a")
    assert cache.forget("a") and not p.handle.closed
    assert os.pread(p.handle.fileno(), 4, 0) == b"aaaa"  # the read goes on
    cache.unpin(p)
    assert p.handle.closed and closed == [("a", False)]
    with cache.pinned("a") as f:  # a later read opens it afresh
        assert not f.closed and f is not p.handle
    assert not cache.forget("zz")


def test_handle_cache_evicts_least_recent_but_never_a_pinned_handle(tmp_path):
    closed = []
    cache = _file_cache(tmp_path, 2, closed)
    pa = cache.pin("a")
    with cache.pinned("b"):
        pass
    with cache.pinned("c"):  # over capacity: "a" (least recent) leaves the cache, but a read still holds it
        pass
    assert cache.cached() == ["b", "c"] and not pa.handle.closed and closed == []
    with cache.pinned("d"):  # "b" leaves, unpinned: closed at once
        pass
    assert closed == [("b", False)]
    cache.unpin(pa)
    assert pa.handle.closed and closed[-1] == ("a", False)
    cache.close_all()
    assert cache.cached() == [] and sorted(k for k, _ in closed) == ["a", "b", "c", "d"]


def test_handle_cache_under_concurrent_reads_and_forgets(tmp_path):
    """Readers on several threads while another keeps forgetting (as compaction and LRU eviction do): every read
    returns its file's bytes, no read ever meets a closed handle, and every handle opened is closed exactly once."""
    import threading

    opened, closed = [], []
    cache = _file_cache(tmp_path, 2)
    real_open, real_close = cache._open, cache._close
    cache._open = lambda key: opened.append(key) or real_open(key)
    cache._close = lambda key, f, rep: (closed.append(f), real_close(key, f, rep))
    stop, errors = threading.Event(), []

    def reader(name):
        try:
            for _ in range(2000):
                with cache.pinned(name) as f:
                    assert os.pread(f.fileno(), 8, 100) == name.encode() * 8
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def forgetter():
        while not stop.is_set():
            for name in "abcd":
                cache.forget(name)

    threads = [threading.Thread(target=reader, args=(n,)) for n in "abcd"]
    f = threading.Thread(target=forgetter)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the old cache (close on forget) hit EBADF most runs so
    try:
        f.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        f.join()
        sys.setswitchinterval(interval)
    cache.close_all()
    assert errors == []
    assert len(closed) == len(opened) == len(set(map(id, closed)))


def test_segment_fds_read_a_segment_forgotten_mid_read(tmp_path):
    """The store's own descriptor cache (the same HandleCache): a read pinned across a forget reads the right bytes,
    and a forget of a segment never cached is passed on to the I/O backend."""
    from kvdrive_sglang.tier.segment_fds import SegmentFds

    forgotten = []

    class Io(PosixIO):
        def forget(self, path):
            forgotten.append(os.path.basename(path))

    fds = SegmentFds(str(tmp_path), Io(), 1)
    for seg in (1, 2):
        with open(fds.path(seg), "wb") as f:
            f.write(bytes([seg]) * 64)
    p = fds._cache.pin(1)
    fds.forget(1)
    assert os.pread(p.handle, 4, 0) == b"\x01" * 4
    fds._cache.unpin(p)
    assert forgotten == ["seg-00000001.kvs"]
    out = bytearray(8)
    assert fds.pread(2, 8, [out]) == 8 and out == b"\x02" * 8
    assert fds.pread(3, 0, [out]) is None  # no such segment file: compacted away
    fds.forget(7)
    assert forgotten[-1] == "seg-00000007.kvs"
    fds.close()


def test_io_defaults_to_posix_and_kvikio_threads_are_sized():
    """Issue 15: POSIX unless kvikio is asked for; kvikio's pool (one thread by default) gets several threads, unless
    KVIKIO_NTHREADS says how many."""
    from kvdrive_sglang.tier.disk_store import DiskStoreConfig
    from kvdrive_sglang.tier.fileio import KVIKIO_THREADS, kvikio_threads

    assert DiskStoreConfig(path="/nonexistent").io == "posix" and select_io().name == "posix"
    assert kvikio_threads(64, None) == KVIKIO_THREADS and kvikio_threads(2, None) == 2
    assert kvikio_threads(None, None) == 1 and kvikio_threads(64, "4") is None
