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
from kvdrive_sglang.tier.store_dir import INDEX_DIR
from tests.helpers import PinnedReader, small_page


def blobs(ns, seeds):
    return [encode_page(small_page(s, ns), ns.kv_dtype, "raw", ns.head_dim) for s in seeds]


def keys(batch, n=24):
    return [f"b{batch}-p{j}-" + "h" * 56 for j in range(n)]  # SGLang-like 64-character page hashes


@pytest.fixture
def pinned_reader():
    readers = []

    def pin(st):
        readers.append(PinnedReader(os.path.join(st.path, INDEX_DIR), st.config.map_size))
        return readers[-1]

    yield pin
    for r in readers:
        r.release()


def fill_until_refused(st, ns, first=1):
    for b in range(first, first + 150):
        if not all(st.put_many(ns, keys(b), blobs(ns, range(24)))):
            return b
    raise AssertionError(f"a {st.config.map_size}-byte map never filled: {st.stats()}")


def test_full_map_is_a_fault_then_room_is_made_and_writes_resume(tmp_path, ns, caplog, pinned_reader):
    """A map filled for real (a reader pinned in another process): one map_full fault, nothing else, with its log
    line; the store evicts what it can. Once the reader lets go the fault clears and writes resume by themselves
    after retry_after_s, and read back."""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=256 << 10, retry_after_s=0.2)) as st:
        assert all(st.put_many(ns, keys(0), blobs(ns, range(24))))
        reader = pinned_reader(st)
        with caplog.at_level(logging.WARNING, logger="kvdrive.tier"):
            fill_until_refused(st, ns)
        # only the full map, nothing else: a failed segment allocation used to leave its file flock'ed, so every
        # later allocation of that id failed with EAGAIN (counted as io_error) for the life of the process
        assert st.stats().faults == {"map_full": 1}, st.stats().faults
        assert [r.message for r in caplog.records if "is full (map_size" in r.message]
        reader.release()
        time.sleep(0.25)
        assert all(st.put_many(ns, keys(1000), blobs(ns, range(24)))), st.stats().faults  # came back by itself
        assert st.stats().faults == {"map_full": 1}, st.stats().faults
        outs = [np.empty_like(small_page(0, ns)) for _ in range(24)]
        assert st.get_many(ns, keys(1000), outs) == [True] * 24
        np.testing.assert_array_equal(outs[5], small_page(5, ns))


def test_a_reader_killed_inside_its_transaction_does_not_wedge_the_store(tmp_path, ns, caplog, pinned_reader):
    """kill -9 of a process inside a read transaction (a server, a tool) leaves its LMDB reader slot behind, and its
    old snapshot keeps every page freed since from reuse: the map filled and stayed full for good (seen: 33 faults in
    33 tries). The store clears dead readers when it comes back on after a fault (and on open and in maintain), so
    writes resume by themselves."""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=256 << 10, retry_after_s=0.05)) as st:
        assert all(st.put_many(ns, keys(0), blobs(ns, range(24))))
        reader = pinned_reader(st)
        reader.proc.kill()  # SIGKILL while its read transaction is open
        reader.proc.wait()
        with caplog.at_level(logging.WARNING, logger="kvdrive.tier"):
            full_at = fill_until_refused(st, ns)
            for b in range(full_at + 1, full_at + 20):
                time.sleep(0.06)  # past retry_after_s: the tier comes back on, and clears the dead reader
                if all(st.put_many(ns, keys(b), blobs(ns, range(24)))):
                    break
            else:
                raise AssertionError(f"writes never resumed: {st.stats().faults}")
        assert [r for r in caplog.records if "left by dead processes" in r.message]
        outs = [np.empty_like(small_page(0, ns)) for _ in range(24)]
        assert st.get_many(ns, keys(b), outs) == [True] * 24


def test_a_map_too_small_for_the_index_keeps_working(tmp_path, ns, caplog):
    """A 128 KiB map holds about two batches' index. Not a fault: the lowest-value pages are evicted before a commit
    could fail, with score updates between the writes as the server's reporter makes them, and the log says so.
    Every write succeeds and the newest pages read back. (Before: the trees used 2/3 of the map and the pages the
    last commit had freed -- not reusable until the next one commits -- the rest; no commit fitted, not even a
    delete, and the tier stayed off for good.)"""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=128 << 10, retry_after_s=60)) as st:
        with caplog.at_level(logging.INFO, logger="kvdrive.tier"):
            for b in range(60):
                assert all(st.put_many(ns, keys(b), blobs(ns, range(24)))), (b, st.stats().faults)
                recent = [k for i in range(max(0, b - 2), b + 1) for k in keys(i)]
                st.set_scores(ns, recent, [float(24 * b + i) for i in range(len(recent))])  # the newest worth most
                assert st.stats().faults == {}, (b, st.stats().faults)
        assert st.stats().evicted > 0
        assert [r.message for r in caplog.records if "above 80% of its map" in r.message]
        outs = [np.empty_like(small_page(0, ns)) for _ in range(24)]
        assert st.get_many(ns, keys(59), outs) == [True] * 24
        np.testing.assert_array_equal(outs[9], small_page(9, ns))


def test_failed_segment_allocation_leaves_no_lock_behind(tmp_path, ns, monkeypatch):  # I4
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


def test_scores_on_a_full_map_are_a_fault_not_an_exception(tmp_path, ns, pinned_reader):
    """The server's reporter hands scores to the store every tick: a full map there used to raise out of every tick
    (no stats, no metrics, a traceback in the log each time) instead of counting as the tier's fault."""
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=256 << 10, retry_after_s=0.05)) as st:
        pinned_reader(st)  # the map fills for real and stays full
        b = fill_until_refused(st, ns, first=0)
        time.sleep(0.06)
        before = st.stats().faults["map_full"]
        st.set_scores(ns, [k for i in range(b) for k in keys(i)], [float(i) for i in range(24 * b)])
        assert st.stats().faults["map_full"] == before + 1


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB tmpfs (needs root with CAP_SYS_ADMIN, as in this project's CI container; skipped elsewhere)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=False, capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


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


def test_index_is_kept_below_its_map(tmp_path, ns):  # I7
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


def test_a_batch_too_big_for_the_map_is_indexed_in_parts(tmp_path, ns, caplog):
    """200 pages at once into a 128 KiB map: one commit would need more room than the map has. They go in commits the
    map has room for, evicting older pages between them -- no fault -- and put_many's answer is what really stayed
    (each True reads back, each False is a miss); the log says the map is too small. In a map of ordinary size the
    same batch is one commit (the control)."""
    batch = blobs(ns, range(200))
    with DiskStore(DiskStoreConfig(path=str(tmp_path / "tiny"), map_size=128 << 10, retry_after_s=60)) as st:
        with caplog.at_level(logging.WARNING, logger="kvdrive.tier"):
            for b in range(3):
                got = st.put_many(ns, keys(b, 200), batch)
                assert st.stats().faults == {}, st.stats().faults
                outs = [np.empty_like(small_page(0, ns)) for _ in range(200)]
                assert st.get_many(ns, keys(b, 200), outs) == got
                last = st.index_room.last_txn_records
                assert 0 < sum(got) < 200 and last < 200, (sum(got), last)
        assert [r for r in caplog.records if "is too small to keep pages" in r.message]
    with DiskStore(DiskStoreConfig(path=str(tmp_path / "ordinary"), map_size=64 << 20)) as st:
        assert all(st.put_many(ns, keys(0, 200), batch)) and st.index_room.last_txn_records == 200


def test_score_updates_on_a_nearly_full_map_fit(tmp_path, ns):
    """A report tick rescores every page observed since the last one. In one transaction a few thousand scattered
    updates copy every index leaf at once: room for a copy of the whole tree, which a map just under its high mark
    does not have (the e2e map-full server saw "map_full during scores" with nothing left to evict). In the store's
    small transactions they fit: every score recorded, nothing evicted, no fault. On a map past its high mark they
    go in smaller transactions still, or are dropped: a hint never evicts a page nor faults the tier."""
    from kvdrive_sglang.tier.index import Record, page_key
    from kvdrive_sglang.tier.namespace import key_bytes
    from kvdrive_sglang.tier.store_catalog import SCORES_PER_TXN

    def scores(st, ks):
        with st.index.read() as txn:
            return [Record.unpack(txn.get(page_key(ns.id, key_bytes(k)), db=st.index.pages)).score for k in ks]

    # a tree of many more leaves than one small transaction touches: 2 MiB holds ~300 leaves (~10k pages)
    with DiskStore(DiskStoreConfig(path=str(tmp_path), map_size=2 << 20, retry_after_s=60)) as st:
        b, batch = 0, blobs(ns, range(24))
        while st.index_room.fill(SCORES_PER_TXN) < 0.75:
            assert all(st.put_many(ns, keys(b), batch)), st.stats().faults
            b += 1
            assert b < 1000 and st.stats().evicted == 0, (b, st.stats())
        every = [k for i in range(b) for k in keys(i)]
        assert st.index_room.fill(len(every)) > 0.8, "one transaction for them all would not fit (the control)"
        st.set_scores(ns, every, [float(i + 1) for i in range(len(every))])
        assert st.stats().faults == {} and st.stats().evicted == 0, st.stats()
        assert scores(st, every) == [float(i + 1) for i in range(len(every))]
        # past the high mark (as another process's writes could leave it): no eviction, no fault
        while st.index_room.fill(SCORES_PER_TXN) <= 0.8:
            with st.index.write() as txn:  # filler in the meta tree, which the store does not evict
                txn.put(b"filler-%d" % b, bytes(2000), db=st.index.meta)
            b += 1
        st.set_scores(ns, every, [-1.0] * len(every))
        assert st.stats().faults == {} and st.stats().evicted == 0, st.stats()
