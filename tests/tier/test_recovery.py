"""A damaged store never takes its user down (issue 17; tier/recovery.py, I8, I11): real stores, real LMDB files and
segment files, damaged between opens. Every open succeeds; only pages proven intact are served."""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash

from bench.stress.crash_worker import NS, page_for
from bench.stress.damage_stress import Damage, check_pages, damage, run
from kvdrive_sglang.tier.codecs import encode_page, peek_header
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from kvdrive_sglang.tier.errors import StoreFormatError
from kvdrive_sglang.tier.index import Index, Record, SegInfo, page_key, seg_key
from kvdrive_sglang.tier.namespace import key_bytes
from kvdrive_sglang.tier.recovery import RecoveryKind, check_index
from kvdrive_sglang.tier.segment_records import scan
from kvdrive_sglang.tier.store_dir import FORMAT_FILE, DirState, check_store_dir, inspect_store_dir

KEYS = [f"page-{i}" for i in range(48)]
SEED = 20251205  # CI runs the damage rounds with a fixed seed; the bench (bench/stress/damage_stress.py) a random one


def open_store(path, **kw):
    kw.setdefault("capacity_bytes", 256 << 20)
    kw.setdefault("segment_bytes", 64 << 10)
    return DiskStore(DiskStoreConfig(path=str(path), **kw))


def fill(path, keys=KEYS, codec="zstd", ttl_s=None):
    with open_store(path) as st:
        blobs = [encode_page(page_for(k), NS.kv_dtype, codec, NS.head_dim) for k in keys]
        assert st.put_many(NS, keys, blobs, ttl_s=ttl_s) == [True] * len(keys)


def kinds(st) -> set[str]:
    return set(st.stats().recoveries)


def test_damage_rounds_at_ci_size(tmp_path):  # I8, I11: the bench's loop, 20+ rounds, fixed seed
    r = run(24, SEED, str(tmp_path / "s"), log=None)
    assert r.failed_opens == 0 and r.wrong_pages == 0, r.failures
    assert r.hits > 0 and r.checked > r.hits  # pages were served, and damage cost some
    assert {"index_rebuilt", "stamp_rewritten", "dirs_recreated"} <= set(r.recoveries), r.recoveries


TARGETS = {
    "stamp": FORMAT_FILE,
    "data.mdb": "index/data.mdb",
    "lock.mdb": "index/lock.mdb",
    "segment": "segments/seg-00000001.kvs",
}


@pytest.mark.parametrize(
    "kind", [Damage.FLIP, Damage.TRUNCATE_EMPTY, Damage.TRUNCATE_HALF, Damage.TRUNCATE_RANDOM, Damage.DELETE_FILE]
)
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_file_and_every_damage_opens_and_serves_only_good_pages(tmp_path, kind, target):
    fill(tmp_path)
    rng = random.Random(f"{kind}-{target}")
    for _ in range(3):  # several rounds of the same damage: it must hold on a store repaired before
        segs = sorted((tmp_path / "segments").glob("seg-*.kvs"))
        where = str(segs[0]) if target == "segment" and segs else str(tmp_path / TARGETS[target])
        if os.path.exists(where):
            damage(rng, str(tmp_path), kind, where)
        with open_store(tmp_path) as st:
            n, hits, wrong = check_pages(st, KEYS)
            assert wrong == []
            if target == "lock.mdb":  # LMDB's lock file is reset by its first opener: nothing is lost
                assert hits == n
            if target in ("stamp", "lock.mdb") and kind is not Damage.DELETE_FILE and st.stats().recoveries:
                assert kinds(st) <= {RecoveryKind.STAMP_REWRITTEN.value}
        fill(tmp_path)  # written again for the next round (pages already there are skipped)


@pytest.mark.parametrize("what", ["index", "segments"])
def test_missing_directories_are_recreated(tmp_path, what):
    fill(tmp_path)
    shutil.rmtree(tmp_path / what)
    with open_store(tmp_path) as st:
        _, hits, wrong = check_pages(st, KEYS)
        assert wrong == [] and RecoveryKind.DIRS_RECREATED.value in kinds(st)
        # the segment files alone rebuild the index (I11): every page comes back
        assert hits == (len(KEYS) if what == "index" else 0)
        assert st.put_many(NS, ["page-999"], [encode_page(page_for("page-999"), NS.kv_dtype, "raw", NS.head_dim)]) == [
            True
        ]


def test_rebuild_from_segments_alone_keeps_pages_namespaces_and_expiry(tmp_path):  # I11
    fill(tmp_path, KEYS[:20], codec="raw")
    fill(tmp_path, KEYS[20:], codec="zstd", ttl_s=3600)
    with open_store(tmp_path) as st:
        assert st.delete_many(NS, KEYS[:2]) == 2
        st.compact(live_ratio=1.0)  # moves pages: the newest copy must win in the rebuild
        before = {r.seg for _, r in st.index.records(st.index.read())}
    shutil.rmtree(tmp_path / "index")
    os.makedirs(tmp_path / "index")
    with open_store(tmp_path) as st:
        assert RecoveryKind.INDEX_REBUILT.value in kinds(st)
        _, hits, wrong = check_pages(st, KEYS)
        assert wrong == [] and hits >= len(KEYS) - 2  # deleted pages may come back: intact, and right for their key
        [(nid, desc, _, _)] = st.namespaces()
        assert nid == NS.id and desc["model"] == NS.model  # namespace descriptions are in the segments too
        with st.index.read() as txn:
            recs = {k: Record.unpack(txn.get(page_key(NS.id, key_bytes(k)), db=st.index.pages)) for k in KEYS[2:]}
        assert all(r.expires_ms for k, r in recs.items() if k in KEYS[20:])
        assert not any(r.expires_ms for k, r in recs.items() if k in KEYS[:20])
        assert {r.seg for r in recs.values()} <= before


def test_damaged_index_key_never_serves_another_pages_bytes(tmp_path):  # I8: the trailer names the page
    fill(tmp_path, ["page-1", "page-2"], codec="raw")
    with open_store(tmp_path) as st, st.index.write() as txn:
        # what a flipped key byte does: a's record under b's key (a's checksum still matches a's bytes)
        a = txn.get(page_key(NS.id, key_bytes("page-1")), db=st.index.pages)
        txn.put(page_key(NS.id, key_bytes("page-2")), a, db=st.index.pages)
    with open_store(tmp_path) as st:
        out = np.empty_like(page_for("page-2"))
        assert st.get_many(NS, ["page-2"], [out]) == [False]  # format 1 served a's page here
        assert st.stats().corrupt_dropped == 1


def write_format1_store(path: Path, keys) -> None:
    """A store as kvdrive wrote it before segment format 2: blobs back to back, records without FRAMED."""
    fill(path, ["page-997"], codec="raw")  # stamp, directories, index databases
    with open_store(path) as st:
        st.clear()
        st.compact(live_ratio=1.0)
        idx: Index = st.index
        with idx.write() as txn:
            seg = idx.alloc_segment(txn)
        data, recs = b"", []
        for k in keys:
            blob = encode_page(page_for(k), NS.kv_dtype, "zstd", NS.head_dim)
            h = peek_header(blob)
            recs.append(
                (
                    page_key(NS.id, key_bytes(k)),
                    Record(
                        seg,
                        len(data),
                        len(blob),
                        h.codec,
                        0,
                        xxhash.xxh3_64_intdigest(blob),
                        h.raw_nbytes,
                        1,
                        1,
                        0,
                        0.0,
                    ),
                )
            )
            data += blob
        (path / "segments" / f"seg-{seg:08x}.kvs").write_bytes(data)
        with idx.write() as txn:
            idx.put_pages(txn, seg, recs, end=len(data))
            txn.put(
                seg_key(seg), SegInfo.unpack(txn.get(seg_key(seg), db=idx.segs))._replace(state=1).pack(), db=idx.segs
            )
            txn.put(NS.id, NS.canonical, db=idx.ns)


def test_format1_segments_read_back_and_compaction_rewrites_them_in_format2(tmp_path):
    write_format1_store(tmp_path, KEYS[:10])
    with open_store(tmp_path) as st:
        assert st.stats().recoveries == {}  # an older store is not damage
        _, hits, wrong = check_pages(st, KEYS[:10])
        assert (hits, wrong) == (10, [])
        st.compact(live_ratio=1.01)  # every sealed segment
        with st.index.read() as txn:
            assert all(r.framed for _, r in st.index.records(txn))
    shutil.rmtree(tmp_path / "index")  # rewritten in format 2, the pages now survive a lost index
    with open_store(tmp_path) as st:
        _, hits, wrong = check_pages(st, KEYS[:10])
        assert (hits, wrong) == (10, [])


def test_segment_trailers_name_every_page(tmp_path):  # I11
    fill(tmp_path, KEYS[:5], codec="raw")
    data = (tmp_path / "segments" / "seg-00000001.kvs").read_bytes()
    found = list(scan(data))
    assert all(f.intact for f in found)
    assert sorted(f.trailer.key for f in found if f.trailer.kind == 1) == sorted(
        page_key(NS.id, key_bytes(k)) for k in KEYS[:5]
    )
    assert [f.trailer.key for f in found if f.trailer.kind == 2] == [NS.id]


def test_failed_repair_moves_the_store_aside_and_starts_empty(tmp_path):
    d = tmp_path / "s"
    fill(d)
    (d / "index" / "data.mdb").write_bytes(b"\xff" * 8192)  # the index needs a rebuild...
    (d / f"index.rebuild-{os.getpid()}").write_text("in the way")  # ...which cannot write its new index
    with open_store(d) as st:
        assert RecoveryKind.MOVED_ASIDE.value in kinds(st) and st.off_reason is None
        assert check_pages(st, KEYS)[1] == 0
        assert st.put_many(NS, ["page-999"], [encode_page(page_for("page-999"), NS.kv_dtype, "raw", NS.head_dim)]) == [
            True
        ]
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("s.damaged-")]
    assert (aside / "segments" / "seg-00000001.kvs").exists()  # kept for a look, never deleted


def test_a_store_of_another_format_version_runs_with_the_tier_off_and_is_left_alone(tmp_path):
    fill(tmp_path)
    stamp = json.dumps({"format": "kvdrive-store", "version": 2})
    (tmp_path / FORMAT_FILE).write_text(stamp)
    before = sorted(os.listdir(tmp_path / "segments"))
    with open_store(tmp_path) as st:
        assert kinds(st) == {RecoveryKind.TIER_OFF.value} and "version 2" in st.off_reason
        assert not st.available() and check_pages(st, KEYS)[1] == 0 and st.stats().enabled is False
        blob = encode_page(page_for("page-998"), NS.kv_dtype, "raw", NS.head_dim)
        assert st.put_many(NS, ["page-998"], [blob]) == [False]
    assert (tmp_path / FORMAT_FILE).read_text() == stamp and sorted(os.listdir(tmp_path / "segments")) == before


def test_launcher_check_passes_damaged_stores_untouched_and_refuses_foreign_dirs(tmp_path):
    fill(tmp_path / "s")
    (tmp_path / "s" / FORMAT_FILE).write_bytes(b"\x00garbage")
    assert inspect_store_dir(tmp_path / "s").state is DirState.DAMAGED
    check_store_dir(str(tmp_path / "s"), create=True)  # what kvdrive_sglang/config.py runs in the launcher
    assert (tmp_path / "s" / FORMAT_FILE).read_bytes() == b"\x00garbage"  # repaired by the server, counted there
    with pytest.raises(StoreFormatError, match="kvdrive repair"):
        check_store_dir(str(tmp_path / "s"), create=False)  # the kvdrive commands name the fix
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreFormatError, match="not a kvdrive store"):
        check_store_dir(str(tmp_path / "photos"), create=True)
    (tmp_path / "photos" / "index").mkdir()  # kvdrive's layout next to foreign files is still not a store
    with pytest.raises(StoreFormatError, match="not a kvdrive store"):
        check_store_dir(str(tmp_path / "photos"), create=True)


def test_index_check_catches_a_broken_accounting(tmp_path):  # I2
    fill(tmp_path, KEYS[:4])
    with open_store(tmp_path) as st, st.index.write() as txn:
        info = SegInfo.unpack(txn.get(seg_key(1), db=st.index.segs))
        txn.put(seg_key(1), info._replace(count=info.count + 1).pack(), db=st.index.segs)
    health = check_index(str(tmp_path))
    assert not health.ok and "accounting" in health.problem
    with open_store(tmp_path) as st:
        assert RecoveryKind.INDEX_REBUILT.value in kinds(st)
        assert check_pages(st, KEYS[:4])[1:] == (4, [])


def test_a_commit_split_by_index_room_covers_its_trailers(tmp_path, monkeypatch):  # I2, I11
    """When the index-room policy lets a batch commit only part of its records (a map nearly full) and the rest never
    commits, the segment's recorded end must still cover the last committed record's trailer: it ended at the blob,
    so verify called the store damaged and dead-writer recovery could truncate into the trailer (found by
    tests/e2e/test_faults_cpu.py::test_lmdb_map_full)."""
    with open_store(tmp_path) as st:
        sizes = iter([2, 0])  # two records fit, then none: the rest of the batch is left uncommitted
        monkeypatch.setattr(st.index_room, "commit_size", lambda n, **kw: next(sizes, 0))
        blobs = [encode_page(page_for(k), NS.kv_dtype, "zstd", NS.head_dim) for k in KEYS[:4]]
        assert st.put_many(NS, KEYS[:4], blobs) == [True, True, False, False]
    health = check_index(str(tmp_path))
    assert health.ok, health.problem
    with open_store(tmp_path) as st:
        assert check_pages(st, KEYS[:2])[1:] == (2, [])


def test_recoveries_reach_prometheus_by_kind(tmp_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    from kvdrive_sglang.metrics import TierMetrics

    fill(tmp_path)
    (tmp_path / FORMAT_FILE).write_bytes(b'{"format": "kvdrive-st\xffre"')
    shutil.rmtree(tmp_path / "index")
    with open_store(tmp_path) as st:
        disk = st.stats()._asdict()
    reg = prometheus_client.CollectorRegistry()
    m = TierMetrics({"tp_rank": 0}, registry=reg)
    host = {"used_bytes": 0, "capacity_bytes": 0, "raw_bytes": 0}
    st_dict = {
        "dram": host,
        "disk": disk,
        "hits": {"dram": 0, "queued": 0, "disk": 0, "miss": 0},
        "io": {},
        "radix": {},
    }
    m.update(st_dict)
    m.update(st_dict)  # fed by deltas: counted once
    for kind in ("stamp_rewritten", "dirs_recreated", "index_rebuilt"):
        assert reg.get_sample_value("kvdrive:store_recoveries_total", {"tp_rank": "0", "kind": kind}) == 1.0
