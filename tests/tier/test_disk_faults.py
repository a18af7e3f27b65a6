"""DiskStore under faults found by the server-level fault tests (tests/e2e/test_faults_cpu.py), at tier level:
a full LMDB map (for real: a tiny map), the writer's segment file deleted under it, a read fault in a batch, and
(where a tmpfs can be mounted) a file system that really fills up."""
import errno
import logging
import os
import subprocess
import time

import numpy as np
import pytest

from kvdrive_sglang.tier.codecs import encode_page
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from tests.helpers import small_page


def blobs(ns, seeds):
    return [encode_page(small_page(s, ns), ns.kv_dtype, "raw", ns.head_dim) for s in seeds]


def keys(batch, n=24):
    return [f"b{batch}-p{j}-" + "h" * 56 for j in range(n)]  # SGLang-like 64-character page hashes


def test_full_map_is_a_fault_then_room_is_made_and_writes_resume(tmp_path, ns, caplog):
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=128 << 10, retry_after_s=0.2)) as st:
        with caplog.at_level(logging.WARNING, logger="kvdrive.tier"):
            full_at = None
            for b in range(150):
                if not all(st.put_many(ns, keys(b), blobs(ns, range(24)))):
                    full_at = b
                    break
        assert full_at is not None, "a 128 KiB map never filled"
        # only the full map, nothing else: a failed segment allocation used to leave its file flock'ed, so every
        # later allocation of that id failed with EAGAIN (counted as io_error) for the life of the process
        assert st.stats().faults == {"map_full": 1}, st.stats().faults
        assert st.stats().evicted > 0
        assert [r.message for r in caplog.records if "is full (map_size" in r.message]
        time.sleep(0.25)
        assert all(st.put_many(ns, keys(1000), blobs(ns, range(24)))), st.stats().faults  # came back by itself
        outs = [np.empty_like(small_page(0, ns)) for _ in range(24)]
        assert st.get_many(ns, keys(1000), outs) == [True] * 24
        np.testing.assert_array_equal(outs[5], small_page(5, ns))


def test_failed_segment_allocation_leaves_no_lock_behind(tmp_path, ns, monkeypatch):
    """A segment allocation that fails after its file was created and flock'ed (its LMDB commit hit a full map, or
    as here the file's reset failed) must let go of the file: the retry allocates the same id, and a flock still held
    by the leaked descriptor made every later allocation fail with EAGAIN for the life of the process."""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), retry_after_s=0.05, direct_io=False)) as st:
        real = os.ftruncate
        failures = [OSError(errno.ENOSPC, "No space left on device")]

        def ftruncate_once(fd, n):
            if failures:
                raise failures.pop()
            return real(fd, n)
        monkeypatch.setattr(os, "ftruncate", ftruncate_once)
        assert st.put_many(ns, ["a"], blobs(ns, [1])) == [False]
        time.sleep(0.06)
        assert st.put_many(ns, ["b"], blobs(ns, [2])) == [True], st.stats().faults
        assert st.stats().faults == {"enospc": 1}


def test_deleted_writer_segment_is_noticed_and_replaced(tmp_path, ns, caplog):
    with DiskStore(DiskStoreConfig(path=str(tmp_path), direct_io=False)) as st:
        assert st.put_many(ns, ["a"], blobs(ns, [1])) == [True]
        seg_dir = tmp_path / "segments"
        (gone,) = os.listdir(seg_dir)
        os.unlink(seg_dir / gone)
        with caplog.at_level(logging.ERROR, logger="kvdrive.tier"):
            assert st.put_many(ns, ["b"], blobs(ns, [2])) == [True]
        assert [r for r in caplog.records if "was deleted while in use" in r.message]
        assert st.stats().faults == {"missing_file": 1}
        assert os.listdir(seg_dir) and gone not in os.listdir(seg_dir)  # "b" went to a new, visible segment
        out = np.empty_like(small_page(0, ns))
        assert st.get_many(ns, ["b"], [out]) == [True]
        np.testing.assert_array_equal(out, small_page(2, ns))
        assert st.get_many(ns, ["a"], [out]) == [False]  # lost with its file: a miss, and dropped
        assert st.stats().corrupt_dropped == 1


def test_read_fault_stops_the_batch(tmp_path, ns):
    with DiskStore(DiskStoreConfig(path=str(tmp_path), retry_after_s=60)) as st:
        ks = [f"k{i}" for i in range(8)]
        st.put_many(ns, ks, blobs(ns, range(8)))
        calls = []

        def eio(*a, **k):
            calls.append(a)
            raise OSError(errno.EIO, "Input/output error")
        st._io.preadv = eio
        outs = [np.empty_like(small_page(0, ns)) for _ in ks]
        assert st.get_many(ns, ks, outs) == [False] * 8
        assert len(calls) == 1, "the tier was off after the first failed read; the rest must not hit the disk"
        assert st.stats().faults == {"eio": 1}


def test_scores_on_a_full_map_are_a_fault_not_an_exception(tmp_path, ns, monkeypatch):
    """The server's reporter hands scores to the store every tick: a full map there used to raise out of every tick
    (no stats, no metrics, a traceback in the log each time) instead of counting as the tier's fault."""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=128 << 10, retry_after_s=0.05)) as st:
        monkeypatch.setattr(st, "_free_index_room", lambda: None)  # the map stays full
        b = 0
        while all(st.put_many(ns, keys(b), blobs(ns, range(24)))):
            b += 1
            assert b < 100, "a 128 KiB map never filled"
        time.sleep(0.06)
        before = st.stats().faults["map_full"]
        st.set_scores(ns, [k for i in range(b) for k in keys(i)], [float(i) for i in range(24 * b)])
        assert st.stats().faults["map_full"] == before + 1


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB tmpfs (needs root with CAP_SYS_ADMIN, as in this project's CI container; skipped elsewhere)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_file_system(small_fs, ns):
    """No injection: a file system that really fills up under an open store is an ``enospc`` fault, what was stored
    stays readable, and the tier comes back once space is freed. (A real read-only remount cannot be had under an
    open store -- the kernel refuses it, "mount point is busy", while files are open for writing -- and root ignores
    chmod, so read-only is injected: tests/e2e/test_faults_cpu.py.)"""
    filler = small_fs / "someone-elses-file"
    filler.write_bytes(b"x" * (512 << 10))
    with DiskStore(DiskStoreConfig(path=str(small_fs / "store"), retry_after_s=0.1)) as st:
        b = 0
        while all(st.put_many(ns, [f"b{b}-{j}" for j in range(8)], blobs(ns, range(8)))):
            b += 1
            assert b < 1000, "a 2 MiB file system never filled"
        assert st.stats().faults == {"enospc": 1}, st.stats().faults
        outs = [np.empty_like(small_page(0, ns)) for _ in range(8)]
        time.sleep(0.12)
        assert st.get_many(ns, [f"b0-{j}" for j in range(8)], outs) == [True] * 8  # what was stored is intact
        np.testing.assert_array_equal(outs[3], small_page(3, ns))
        filler.unlink()  # the fault clears: space is back
        assert all(st.put_many(ns, [f"after-{j}" for j in range(8)], blobs(ns, range(8)))), st.stats().faults

        outs = [np.empty_like(small_page(0, ns)) for _ in range(8)]
        assert st.get_many(ns, [f"after-{j}" for j in range(8)], outs) == [True] * 8
        np.testing.assert_array_equal(outs[5], small_page(5, ns))


def test_index_is_kept_below_its_map(tmp_path, ns):
    """Past 80% of the map the lowest-value pages are evicted (down to 60%), while LMDB still has the free pages a
    delete needs: 3600 pages written through a 512 KiB map that holds ~2100 never fill it. (Without this, a map
    filled to the last page could not even commit the deletes meant to make room: the tier stayed off for good.)"""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=512 << 10, retry_after_s=60)) as st:
        for b in range(150):
            assert all(st.put_many(ns, keys(b), blobs(ns, range(24)))), (b, st.stats().faults)
        s = st.stats()
        assert s.faults == {} and s.evicted > 0 and 0 < s.entries < 150 * 24, s
        outs = [np.empty_like(small_page(0, ns)) for _ in range(24)]
        assert st.get_many(ns, keys(149), outs) == [True] * 24  # the newest pages are the ones kept
        np.testing.assert_array_equal(outs[7], small_page(7, ns))


@pytest.mark.parametrize("per_txn", [None, 1 << 30])
def test_score_updates_on_a_nearly_full_map_fit(tmp_path, ns, monkeypatch, per_txn):
    """A report tick rescores every page observed since the last one. In one transaction a few thousand scattered
    updates copy every index leaf at once, more free pages than a map just under its high mark has: the e2e map-full
    server saw "map_full during scores" with nothing left to evict. Small transactions fit (per_txn=None, the
    store's own); one big one does not (the control)."""
    from kvdrive_sglang.tier import disk_store

    if per_txn is not None:
        monkeypatch.setattr(disk_store, "_SCORES_PER_TXN", per_txn)
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=512 << 10, retry_after_s=60)) as st:
        b = 0
        while st._index_fill() < 0.75:
            assert all(st.put_many(ns, keys(b), blobs(ns, range(24)))), st.stats().faults
            b += 1
        every = [k for i in range(b) for k in keys(i)]
        st.set_scores(ns, every, [float(i + 1) for i in range(len(every))])
        if per_txn is None:
            assert st.stats().faults == {}, st.stats().faults
        else:
            assert st.stats().faults.get("map_full") == 1
