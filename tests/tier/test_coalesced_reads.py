"""Coalesced disk reads (tier/read_runs.py, issue 18): a batch's neighbouring records are read with one preadv per
run, verified one by one (I8) and decoded on the worker pool; a bad record costs only itself."""

import glob
import json
import os

import numpy as np
import pytest

from kvdrive_sglang.tier.codecs import encode_page
from kvdrive_sglang.tier.crypto import KeyRing, new_key
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from kvdrive_sglang.tier.fileio import PosixIO
from kvdrive_sglang.tier.index import Record, page_key
from kvdrive_sglang.tier.namespace import key_bytes
from kvdrive_sglang.tier.read_runs import MAX_GAP, MAX_IOVECS, MAX_RUN_BYTES, Want, dest_of, plan_runs
from kvdrive_sglang.tier.tenants import tenant_id
from tests.helpers import make_ns, small_page


class CountingIO(PosixIO):
    """POSIX I/O that records each read's iovec count (and can fail reads on demand)."""

    def __init__(self):
        self.reads: list[int] = []
        self.fail: OSError | None = None

    def preadv(self, fd, bufs, offset, path=None):
        self.reads.append(len(bufs))
        if self.fail is not None:
            raise self.fail
        return super().preadv(fd, bufs, offset, path)


def open_store(path, keyring=None, **kw):
    kw.setdefault("capacity_bytes", 256 << 20)
    st = DiskStore(DiskStoreConfig(path=str(path), **kw), keyring=keyring)
    st._io = CountingIO()
    return st


def keys(seeds):
    return [f"k{s}" for s in seeds]


def put(st, ns, seeds, codec="raw"):
    blobs = [encode_page(small_page(s, ns), ns.kv_dtype, codec, ns.head_dim) for s in seeds]
    assert st.put_many(ns, keys(seeds), blobs) == [True] * len(seeds)


def read(st, ns, seeds):
    outs = [np.empty_like(small_page(0, ns)) for _ in seeds]
    st._io.reads.clear()
    got = st.get_many(ns, keys(seeds), outs)
    return got, outs


def assert_pages(ns, seeds, got, outs):
    for s, g, o in zip(seeds, got, outs):
        if g:
            np.testing.assert_array_equal(o, small_page(s, ns))


def record(st, ns, k) -> Record:
    with st.index.read() as txn:
        return Record.unpack(txn.get(page_key(ns.id, key_bytes(k)), db=st.index.pages))


def flip(st, path, ns, k, at):
    rec = record(st, ns, k)
    seg = os.path.join(str(path), "segments", f"seg-{rec.seg:08x}.kvs")
    with open(seg, "r+b") as f:
        f.seek(rec.off + at)
        b = f.read(1)
        f.seek(rec.off + at)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_a_batch_written_together_is_read_with_one_preadv_bit_exact(tmp_path, ns, codec):
    seeds = list(range(12))
    with open_store(tmp_path) as st:
        put(st, ns, seeds, codec)
        got, outs = read(st, ns, seeds[::-1])  # any order of keys: the runs follow the file
        assert got == [True] * 12
        assert_pages(ns, seeds[::-1], got, outs)
        assert len(st._io.reads) == 1  # 12 before issue 18: one pread per page
        assert st.stats().bytes_read == sum(record(st, ns, k).length for k in keys(seeds))


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_a_damaged_record_mid_run_is_the_only_miss(tmp_path, ns, codec):  # I8
    seeds = list(range(10))
    with open_store(tmp_path) as st:
        put(st, ns, seeds, codec)
        flip(st, tmp_path, ns, "k4", record(st, ns, "k4").length // 2)
        got, outs = read(st, ns, seeds)
        assert got == [True] * 4 + [False] + [True] * 5
        assert_pages(ns, seeds, got, outs)
        assert st.stats().corrupt_dropped == 1
        assert st.contains(ns, keys(seeds)) == [s != 4 for s in seeds]
        got, outs = read(st, ns, seeds)  # the dropped one is a plain miss now, the rest one run around it
        assert got == [s != 4 for s in seeds]


def test_a_damaged_trailer_mid_run_is_the_only_miss(tmp_path, ns):  # I8: the trailer must name the page
    seeds = list(range(6))
    with open_store(tmp_path) as st:
        put(st, ns, seeds)
        flip(st, tmp_path, ns, "k2", record(st, ns, "k2").length + 30)  # inside k2's trailer (its key bytes)
        got, outs = read(st, ns, seeds)
        assert got == [True, True, False, True, True, True]
        assert_pages(ns, seeds, got, outs)


def test_runs_bridge_small_gaps_between_commits(tmp_path, ns):
    with open_store(tmp_path, direct_io=True) as st:
        for s in range(6):  # six group commits: O_DIRECT padding (or nothing) between them
            put(st, ns, [s])
        recs = [record(st, ns, k) for k in keys(range(6))]
        assert all(0 <= b.off - (a.off + a.length) <= MAX_GAP for a, b in zip(recs, recs[1:]))
        got, outs = read(st, ns, range(6))
        assert got == [True] * 6
        assert_pages(ns, range(6), got, outs)
        assert len(st._io.reads) == 1


def test_a_gap_over_the_cap_splits_the_run():
    ns = make_ns()
    k1, k2 = page_key(ns.id, b"a"), page_key(ns.id, b"b")
    a = Record(1, 0, 1000, 0, 0, 0, 0, 0, 0, 0, 0.0)
    b = a._replace(off=1000 + MAX_GAP)
    c = a._replace(off=1000 + MAX_GAP + 1000 + MAX_GAP + 1)
    d = a._replace(seg=2, off=0)
    runs = plan_runs([Want(r, k, None) for r, k in ((a, k1), (b, k2), (c, k1), (d, k2))])
    assert [r.members for r in runs] == [[0, 1], [2], [3]]
    twice = plan_runs([Want(a, k1, None), Want(a, k1, None)])  # a key asked for twice: overlapping, two runs
    assert [r.members for r in twice] == [[0], [1]]


def test_runs_stop_at_max_run_bytes_so_a_batch_reads_in_parallel():
    ns = make_ns()
    k = page_key(ns.id, b"a")
    size = MAX_RUN_BYTES * 3 // 8
    recs = [Record(1, i * size, size, 0, 0, 0, 0, 0, 0, 0, 0.0) for i in range(7)]
    recs.append(Record(1, 7 * size, 2 * MAX_RUN_BYTES, 0, 0, 0, 0, 0, 0, 0, 0.0))  # larger than a run: alone
    runs = plan_runs([Want(r, k, None) for r in recs])
    assert [r.members for r in runs] == [[0, 1], [2, 3], [4, 5], [6], [7]]
    assert all(r.end - r.off <= MAX_RUN_BYTES for r in runs[:-1])


def test_a_run_longer_than_iov_max_is_split_and_read_whole(tmp_path):
    ns = make_ns(num_heads=1, head_dim=8, page_size=4, num_layers=1)  # 64-byte pages: thousands in a few KiB
    seeds = list(range(1200))
    with open_store(tmp_path) as st:
        put(st, ns, seeds)
        got, outs = read(st, ns, seeds)
        assert got == [True] * 1200
        assert_pages(ns, seeds, got, outs)
        assert max(st._io.reads) <= MAX_IOVECS
        # header, body, trailer, gap slot per page: 1200 pages need 5 runs, not 1200 reads
        assert len(st._io.reads) == -(-1200 * 4 // MAX_IOVECS)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_sealed_pages_read_in_runs(tmp_path, codec):
    kf = tmp_path / "keys"
    kf.write_text(json.dumps({"alice": new_key()}))
    os.chmod(kf, 0o600)
    ns = make_ns(tenant=tenant_id("alice"))
    seeds = list(range(8))
    with open_store(tmp_path / "s", keyring=KeyRing(str(kf))) as st:
        put(st, ns, seeds, codec)
        got, outs = read(st, ns, seeds)
        assert got == [True] * 8
        assert_pages(ns, seeds, got, outs)
        assert len(st._io.reads) == 1
        blobs = st.read_blobs(ns, keys(seeds))
        assert all(b is not None for b in blobs) and len(st._io.reads) == 2
        flip(st, tmp_path / "s", ns, "k3", 40)  # ciphertext damage: the checksum fails, only k3 is lost
        got, outs = read(st, ns, seeds)
        assert got == [s != 3 for s in seeds]
        assert_pages(ns, seeds, got, outs)


def test_read_blobs_uses_the_runs(tmp_path, ns):
    seeds = list(range(8))
    with open_store(tmp_path) as st:
        put(st, ns, seeds, "zstd")
        flip(st, tmp_path, ns, "k5", 100)
        st._io.reads.clear()
        got = st.read_blobs(ns, keys(seeds) + ["nope"])
        assert [g is not None for g in got] == [s != 5 for s in seeds] + [False]
        want = [encode_page(small_page(s, ns), ns.kv_dtype, "zstd", ns.head_dim) for s in seeds]
        for s in seeds:
            if s != 5:
                assert bytes(got[s][0]) == want[s] and got[s][1] == 0
        assert st.stats().corrupt_dropped == 1


def test_a_short_run_falls_back_to_page_reads(tmp_path, ns):  # I1, I8
    seeds = list(range(10))
    with open_store(tmp_path) as st:
        put(st, ns, seeds)
    seg = glob.glob(str(tmp_path / "segments" / "*.kvs"))[0]
    os.truncate(seg, os.path.getsize(seg) * 7 // 10 + 5)
    with open_store(tmp_path) as st:
        got, outs = read(st, ns, seeds)
        assert got == [True] * 7 + [False] * 3
        assert_pages(ns, seeds, got, outs)


def test_an_io_error_is_a_miss_and_keeps_the_entries(tmp_path, ns):
    seeds = list(range(4))
    with open_store(tmp_path, retry_after_s=60) as st:
        put(st, ns, seeds)
        st._io.fail = OSError(5, "Input/output error")
        got, _ = read(st, ns, seeds)
        assert got == [False] * 4
        s = st.stats()
        assert s.faults == {"eio": 1} and s.corrupt_dropped == 0 and not s.enabled
        st._io.fail = None
        assert st.contains(ns, keys(seeds)) == [True] * 4


def test_a_raw_page_is_read_straight_into_rows_of_a_strided_buffer(tmp_path, ns):
    # a layer-first host pool slot: the page's bytes are rows of a larger buffer (contiguous rows, strided as a whole)
    seeds = list(range(4))
    nbytes = small_page(0, ns).nbytes
    rows = 8
    host = np.zeros((rows, 4 * 2 * nbytes // rows), dtype=np.uint8)  # 4 pages side by side, with a gap
    with open_store(tmp_path) as st:
        put(st, ns, seeds)
        outs = [host[:, p * 2 * (nbytes // rows) : p * 2 * (nbytes // rows) + nbytes // rows] for p in range(4)]
        assert not outs[0].flags.c_contiguous and dest_of(outs[0]).nbytes == nbytes
        st._io.reads.clear()
        assert st.get_many(ns, keys(seeds), outs) == [True] * 4
        assert len(st._io.reads) == 1
        for s, o in zip(seeds, outs):
            assert o.tobytes() == small_page(s, ns).tobytes()
        # the columns between the slots are untouched
        for p in range(4):
            assert not host[:, p * 2 * (nbytes // rows) + nbytes // rows : (p + 1) * 2 * (nbytes // rows)].any()


def test_coalesced_results_match_page_by_page_reads(tmp_path, ns):
    # the same store read the old way (one key per call: no run has two records) and in one batch
    seeds = list(range(16))
    with open_store(tmp_path) as st:
        put(st, ns, seeds[:8], "zstd")
        put(st, ns, seeds[8:], "raw")
        one = [read(st, ns, [s])[1][0] for s in seeds]
        got, outs = read(st, ns, seeds)
        assert got == [True] * 16
        assert all(a.tobytes() == b.tobytes() for a, b in zip(one, outs))
