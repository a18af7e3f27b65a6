"""The LMDB index (tier/index.py) on real LMDB: the record layout, locations, prefix lookups, the index-room policy."""

import logging
from collections import Counter

import pytest

from kvdrive_sglang.tier.index import (
    EXPIRES_AT,
    SEALED,
    SEG_OPEN,
    Index,
    IndexRoom,
    Location,
    Record,
    SegInfo,
    page_key,
)
from kvdrive_sglang.tier.namespace import key_bytes
from tests.helpers import make_ns


def rec(seg=1, off=0, length=100, flags=0, expires_ms=0, score=0.0):
    return Record(seg, off, length, 1, flags, 0xABCDEF, 4096, 10, 20, expires_ms, score)


@pytest.fixture
def index(tmp_path):
    ix = Index(str(tmp_path / "index"), map_size=8 << 20)
    yield ix
    ix.close()


def test_record_layout_is_the_on_disk_format():
    """Existing stores stay readable only while this layout holds: 62 bytes, little-endian, fields in this order."""
    r = rec(seg=7, off=1 << 33, flags=SEALED, expires_ms=123456789, score=0.5)
    b = r.pack()
    assert len(b) == 62 and Record.unpack(b) == r
    assert b[EXPIRES_AT] == (123456789).to_bytes(8, "little")
    assert b[17] == SEALED and r.sealed and not rec().sealed  # the flags byte lookups test without unpacking
    assert SegInfo.unpack(SegInfo(1, 2, 3, 4, SEG_OPEN).pack()) == SegInfo(1, 2, 3, 4, SEG_OPEN)


def test_location_names_the_bytes_and_nothing_else():
    """I3: segments are append-only and never reuse ids, so an entry is unchanged exactly when its location is."""
    a = rec(seg=3, off=4096, length=100)
    assert a.location == Location(3, 4096, 100)
    assert a._replace(score=9.0, atime_ms=99).location == a.location  # a rescore or a touch: the same bytes
    assert a._replace(seg=4).location != a.location and a._replace(off=0).location != a.location


def test_live_records_and_long_keys():
    assert Record.unpack_live(None, 0) is None
    assert Record.unpack_live(rec(expires_ms=0).pack(), 10**15) is not None  # 0: never expires
    assert Record.unpack_live(rec(expires_ms=100).pack(), 100) is None
    assert Record.unpack_live(rec(expires_ms=101).pack(), 100) is not None
    ns = make_ns()
    long_key = key_bytes("x" * 500)
    assert len(page_key(ns.id, long_key)) == 16 + 1 + 32  # hashed: under LMDB's 511-byte key limit


def test_leading_present_counts_up_to_the_first_miss(index):
    ns = make_ns()
    with index.write() as txn:
        index.put_pages(
            txn,
            1,
            [
                (page_key(ns.id, key_bytes(k)), rec(off=i * 100, expires_ms=e, flags=f))
                for i, (k, e, f) in enumerate(
                    [("a", 0, 0), ("b", 0, 0), ("old", 5, 0), ("s", 0, SEALED), ("L" * 450, 0, 0)]
                )
            ],
            end=500,
        )
    with index.read() as txn:

        def count(keys, sealed=False, held=None):
            return index.leading_present(txn, ns.id, keys, now_ms=10, sealed=sealed, held=held)

        assert count(["a", "b", "c"]) == 2
        assert count(["a", "old", "b"]) == 1  # expired: a miss
        assert count(["a", "s"]) == 1 and count(["s"], sealed=True) == 1  # I6: only entries written this way
        assert count(["a", "L" * 450, b"b"]) == 3  # hashed long keys and bytes keys take the slow path, same answer
        assert count(["a", "c", "b"], held=lambda k: k == "c") == 3


def test_segment_accounting_moves_with_the_record(index):
    """I2: a record and its segment's accounting change in one transaction; a key's old record leaves its segment."""
    pk = b"p" * 17
    with index.write() as txn:
        for seg in (1, 2):
            index.alloc_segment(txn)
        index.put_pages(txn, 1, [(pk, rec(seg=1, length=100))], end=100)
        index.put_pages(txn, 2, [(pk, rec(seg=2, length=40))], end=40)
        segs = index.segments(txn)
        assert (segs[1].count, segs[1].live) == (0, 0) and (segs[2].count, segs[2].live) == (1, 40)
        assert index.delete_page(txn, pk).seg == 2 and index.seg_info(txn, 2).count == 0
        assert [pk for pk, _ in index.records(txn)] == []


def test_index_room_evicts_lowest_value_pages_above_its_high_mark(tmp_path, caplog):
    """I7: past INDEX_HIGH of the map the lowest-scored pages go, so commits keep room; commit_size never lets one
    commit take the map past it."""
    ix = Index(str(tmp_path / "index"), map_size=1 << 20)
    counts = Counter()
    faults = []
    room = IndexRoom(
        ix, store_path=str(tmp_path), low_watermark=0.8, counts=counts, on_fault=lambda e, during: faults.append(during)
    )
    try:
        n = 0
        while room.fill() < 0.85:  # fill past the high mark by hand (as other processes' writes could)
            with ix.write() as txn:
                ix.put_pages(
                    txn,
                    1,
                    [(b"k%08d" % (n + i), rec(off=(n + i) * 100, score=float(n + i))) for i in range(64)],
                    end=(n + 64) * 100,
                )
            n += 64
        with caplog.at_level(logging.INFO, logger="kvdrive.tier"):
            shape = room.keep_headroom()
        assert shape is not None and faults == [] and counts["evicted"] > 0
        assert room.fill() <= 0.8
        with ix.read() as txn:
            kept = sorted(r.score for _, r in ix.records(txn))
        assert kept and kept[0] >= counts["evicted"] - 1, "the lowest scores went first"
        size = room.commit_size(10_000)
        assert 0 < size < 10_000 and ix.shape().fill(size, room.last_txn_records) <= 0.8
    finally:
        ix.close()
