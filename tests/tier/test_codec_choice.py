"""The codec per tier chosen by measurement (tier/codec_choice.py, issue 18), its settings, and the write-down's
re-encoding of lossless pages to the disk's codec (tier/writedown.py)."""

import numpy as np
import pytest

from kvdrive_sglang.tier import codec_choice, parallel
from kvdrive_sglang.tier.codec_choice import DEFAULT_RECOMPUTE_GBPS, CodecChoice, DecodeSpeed, choose
from kvdrive_sglang.tier.codecs import encode_page, peek_header
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.errors import ConfigError
from kvdrive_sglang.tier.namespace import key_bytes
from kvdrive_sglang.tier.writedown import WriteDown
from tests.helpers import make_ns, small_page

GiB = 1 << 30
SLOW = DecodeSpeed(gbps_per_core=0.5, ratio=1.49)  # 2 threads: 1.0 GB/s, below the 1.57 GB/s default
FAST = DecodeSpeed(gbps_per_core=3.1, ratio=1.49)


@pytest.fixture(autouse=True)
def eight_cores(monkeypatch):
    """Decode threads are capped at the usable cores (tier/parallel.py): the decisions below assume a machine of 8."""
    monkeypatch.setattr(parallel, "usable_cores", lambda: 8)


def cfg(tmp_path, **over):
    base = dict(path=str(tmp_path), host_bytes=4 * GiB, disk_bytes=64 * GiB, decode_threads=2)
    return TierConfig(**{**base, **over})


# --- the decision ----------------------------------------------------------------------------------------------------
def test_dram_stays_raw_when_decode_is_slower_than_a_reload_must_be(tmp_path):
    c = choose(cfg(tmp_path), speed=SLOW)
    assert (c.dram, c.disk) == ("raw", "zstd")
    assert c.reason == "zstd decode 0.5 GB/s x 2 threads < 1.6 GB/s needed"
    assert c.measured["needed_gbps"] == pytest.approx(DEFAULT_RECOMPUTE_GBPS)
    assert c.measured["decode_threads"] == 2 and "assumed" in c.measured["needed_source"]


def test_dram_is_zstd_when_decode_beats_a_reload(tmp_path):
    c = choose(cfg(tmp_path), speed=FAST)
    assert (c.dram, c.disk) == ("zstd", "zstd")
    assert c.reason == "zstd decode 3.1 GB/s x 2 threads >= 1.6 GB/s needed"


def test_the_bandwidth_to_beat_and_the_threads_are_inputs(tmp_path):
    # 3.1 GB/s x 2 = 6.2 GB/s: too slow for a prefill at 8 GB/s of KV (a fast GPU, a big model), enough with 4 threads
    c = choose(cfg(tmp_path, recompute_gbps=8.0), speed=FAST)
    assert c.dram == "raw" and c.measured["needed_source"] == "given"
    assert choose(cfg(tmp_path, recompute_gbps=8.0, decode_threads=4), speed=FAST).dram == "zstd"
    every_core = choose(cfg(tmp_path, decode_threads=0), speed=SLOW)  # 0: every usable core
    assert every_core.measured["decode_threads"] == 8
    assert choose(cfg(tmp_path, decode_threads=64), speed=SLOW).measured["decode_threads"] == 8  # no more than cores


def test_zstd_in_dram_anyway_where_dram_is_the_constraint(tmp_path):
    no_disk = choose(TierConfig(path=None, host_bytes=GiB, decode_threads=2), speed=SLOW)
    assert (no_disk.dram, no_disk.disk) == ("zstd", "zstd") and "no disk tier" in no_disk.reason
    # a disk cap below what the DRAM tier holds compressed (4 GiB x 1.49): DRAM is most of the cache
    small_disk = choose(cfg(tmp_path, disk_bytes=5 * GiB), speed=SLOW)
    assert (small_disk.dram, small_disk.disk) == ("zstd", "zstd") and "DRAM capacity counts" in small_disk.reason
    assert choose(cfg(tmp_path, disk_bytes=6 * GiB), speed=SLOW).dram == "raw"  # 6 >= 4 x 1.49


def test_no_dram_tier_encodes_once_for_the_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(codec_choice, "measure_zstd", _no_measuring)
    c = choose(cfg(tmp_path, host_bytes=0))
    assert (c.dram, c.disk) == ("zstd", "zstd")


def _no_measuring(*a, **k):
    raise AssertionError("a pinned codec needs no measurement")


@pytest.mark.parametrize(
    "over,want",
    [
        (dict(codec="zstd"), ("zstd", "zstd")),
        (dict(codec="raw"), ("raw", "raw")),
        (dict(codec="int8"), ("int8", "int8")),
        (dict(codec="fp8"), ("fp8", "fp8")),
        (dict(codec="raw", disk_codec="zstd"), ("raw", "zstd")),
        (dict(codec="zstd", disk_codec="raw"), ("zstd", "raw")),
    ],
)
def test_pinned_codecs_keep_their_meaning(tmp_path, monkeypatch, over, want):
    monkeypatch.setattr(codec_choice, "measure_zstd", _no_measuring)
    c = choose(cfg(tmp_path, **over))
    assert (c.dram, c.disk) == want and c.reason.startswith("pinned: codec ") and c.measured == {}
    assert c.writedown_codec == (want[1] if want[1] != want[0] else None)


def test_auto_with_a_pinned_disk_codec(tmp_path):
    assert choose(cfg(tmp_path, disk_codec="raw"), speed=SLOW)[:2] == ("raw", "raw")
    assert choose(cfg(tmp_path, disk_codec="raw"), speed=FAST)[:2] == ("zstd", "raw")


def test_this_machine_is_measured_once_per_process():
    speed = codec_choice.measure_zstd()
    assert speed is codec_choice.measure_zstd()  # remembered
    # real zstd on real-looking pages: any machine decodes faster than 50 MB/s per core, and byte planes compress
    assert speed.gbps_per_core > 0.05 and 1.2 < speed.ratio < 2.0


# --- chosen again on a measured prefill (the upkeep's calibration) ---------------------------------------------------
def test_a_measured_bound_decides_again_and_says_where_it_came_from(tmp_path):
    config = cfg(tmp_path)
    start = choose(config, speed=FAST)  # 6.2 GB/s of decode against the 8B assumption (1.57 GB/s): zstd
    assert start.dram == "zstd" and "assumed" in start.measured["needed_source"]
    big = codec_choice.rechoose(config, start, 20.0, "measured prefill 160000 tok/s x 131072 B/token")
    assert (big.dram, big.disk, big.writedown_codec) == ("raw", "zstd", "zstd")
    assert big.reason == (
        "zstd decode 3.1 GB/s x 2 threads < 20.0 GB/s needed (measured prefill 160000 tok/s x 131072 B/token)"
    )
    assert big.measured["needed_source"].startswith("measured prefill")
    cpu = codec_choice.rechoose(config, big, 0.006, "measured prefill 3000 tok/s x 2048 B/token")
    assert cpu.dram == "zstd" and "< " not in cpu.reason and ">= 0.006 GB/s needed (measured prefill" in cpu.reason


def test_a_bound_near_the_decode_speed_keeps_the_codec_in_use(tmp_path):
    """A measured prefill wanders from tick to tick: within 10% of the decode bandwidth the codec stays put."""
    config = cfg(tmp_path)
    start = choose(config, speed=FAST)  # decode 6.2 GB/s
    near = codec_choice.rechoose(config, start, 6.5, "measured")  # above, but within 10%: stays zstd
    assert near.dram == "zstd" and "kept zstd: within 10% of the bound" in near.reason
    assert codec_choice.rechoose(config, start, 7.0, "measured").dram == "raw"  # 13% above: raw
    raw = codec_choice.rechoose(config, start, 7.0, "measured")
    assert codec_choice.rechoose(config, raw, 5.8, "measured").dram == "raw"  # 6% below: kept raw
    assert codec_choice.rechoose(config, raw, 5.0, "measured").dram == "zstd"


def test_pinned_codecs_and_no_dram_tier_are_never_chosen_again(tmp_path, monkeypatch):
    monkeypatch.setattr(codec_choice, "measure_zstd", _no_measuring)
    for over in (dict(codec="zstd"), dict(codec="raw"), dict(host_bytes=0)):
        config = cfg(tmp_path, **over)
        c = choose(config)
        assert codec_choice.rechoose(config, c, 1000.0, "measured") is c


def test_the_engine_switches_codec_at_runtime_and_every_page_reads_back(tmp_path):
    """Pages stored before and after a switch (raw -> zstd and back) read back bit-exact from DRAM and from disk,
    and the disk holds zstd throughout: raw pages queued before a switch are still re-encoded on their way down."""
    ns = make_ns()
    config = TierConfig(path=str(tmp_path), host_bytes=8 << 20, disk_bytes=64 << 20, recompute_gbps=1000.0)
    with TierEngine(config) as e:
        assert e.codec_choice.dram == "raw"
        assert all(e.put_many(ns, _keys(range(0, 8)), [small_page(s) for s in range(0, 8)]))
        assert e.recheck_codec(0.001, "measured prefill 500 tok/s x 2048 B/token").dram == "zstd"
        assert e.codec.name == "zstd" and "measured prefill" in e.codec_choice.reason
        assert all(e.put_many(ns, _keys(range(8, 16)), [small_page(s) for s in range(8, 16)]))
        assert e.recheck_codec(1000.0, "measured").dram == "raw"
        assert all(e.put_many(ns, _keys(range(16, 24)), [small_page(s) for s in range(16, 24)]))
        in_dram = {s: peek_header(bytes(e.pool.peek((ns.id, key_bytes(k))).blob)).codec_name for s, k in _seeded()}
        assert in_dram == {s: "zstd" if 8 <= s < 16 else "raw" for s in range(24)}
        assert e.flush(timeout=30)
        _assert_exact(e, ns, range(24))
        on_disk = e.disk.read_blobs(ns, _keys(range(24)))
        assert {peek_header(bytes(b[0])).codec_name for b in on_disk} == {"zstd"}
        e.pool.clear()
        _assert_exact(e, ns, range(24))  # from disk


# --- the settings ----------------------------------------------------------------------------------------------------
def test_auto_is_the_default_and_bad_settings_name_themselves(tmp_path):
    assert TierConfig().codec == "auto" and TierConfig().disk_codec is None and TierConfig().decode_threads == 0
    for over, msg in (
        (dict(codec="lz4"), r"tier codec 'lz4' is not one of auto, raw, zstd, int8, fp8"),
        (dict(disk_codec="int8"), r"tier disk_codec 'int8' is not one of raw, zstd \(lossless"),
        (dict(disk_codec="auto"), r"tier disk_codec 'auto' is not one of raw, zstd"),
        (dict(codec="int8", disk_codec="zstd"), r"codec int8 is lossy, and lossy pages are never re-encoded"),
        (dict(decode_threads=-1), r"tier decode_threads must be an integer from 0 to 1024, got -1"),
        (dict(decode_threads=True), r"tier decode_threads must be .*, got True"),
        (dict(decode_threads=1025), r"tier decode_threads must be"),
        (dict(recompute_gbps=0), r"tier recompute_gbps must be a positive number of GB/s, got 0"),
        (dict(recompute_gbps=float("nan")), r"tier recompute_gbps must be"),
    ):
        with pytest.raises(ConfigError, match=msg):
            cfg(tmp_path, **over)


# --- through the engine: raw DRAM, zstd disk -------------------------------------------------------------------------
def test_raw_dram_and_zstd_disk_round_trip_bit_exact(tmp_path):
    """A reload must beat 1000 GB/s: no decode does, so the DRAM tier holds raw pages and the write-down re-encodes
    them to zstd for the disk; read back from disk after the DRAM tier dropped them, every page is bit-exact."""
    ns, seeds = make_ns(), list(range(24))
    config = TierConfig(path=str(tmp_path), host_bytes=8 << 20, disk_bytes=64 << 20, recompute_gbps=1000.0)
    with TierEngine(config) as e:
        assert (e.codec_choice.dram, e.codec_choice.disk) == ("raw", "zstd")
        assert "GB/s needed" in e.codec_choice.reason
        assert all(e.put_many(ns, _keys(seeds), [small_page(s) for s in seeds]))
        assert e.flush(timeout=30)
        s = e.stats()
        assert s.dram.raw_bytes <= s.dram.used_bytes  # raw pages (plus their headers) in DRAM
        assert s.disk.raw_bytes / s.disk.live_bytes > 1.3  # zstd on disk
        assert e.writedown.counts["writedown_reencoded"] == len(seeds)
        stored = e.disk.read_blobs(ns, _keys(seeds))
        assert {peek_header(bytes(b[0])).codec_name for b in stored} == {"zstd"}
        e.pool.clear()  # the DRAM tier drops them: only the disk has them now
        _assert_exact(e, ns, seeds)
        assert e.stats().hits_disk == len(seeds)
    with TierEngine(TierConfig(path=str(tmp_path), host_bytes=8 << 20, codec="raw")) as again:  # blobs describe
        _assert_exact(again, ns, seeds)  # themselves: a server with another codec reads them all the same


def test_the_write_down_never_re_encodes_lossy_pages_and_keeps_damaged_ones(tmp_path):
    ns = make_ns()
    page = small_page(3)
    wd = _write_down("zstd")
    lossy = encode_page(page, ns.kv_dtype, "int8", ns.head_dim)
    assert wd._for_disk(lossy) is lossy
    raw = encode_page(page, ns.kv_dtype, "raw", ns.head_dim)
    damaged = raw[:-5]  # a raw body shorter than its header says: written as it is, a miss when read
    assert wd._for_disk(damaged) is damaged
    zstd = wd._for_disk(raw)
    assert peek_header(zstd).codec_name == "zstd" and len(zstd) < len(raw)
    back = _write_down("raw")._for_disk(zstd)  # and the other way
    assert back == raw
    assert wd.counts["writedown_reencoded"] == 1
    with pytest.raises(ConfigError, match="lossless pages only"):
        _write_down("int8")


def test_codec_choice_is_a_named_result():
    c = CodecChoice("raw", "zstd", "why", {})
    assert c._asdict() == {"dram": "raw", "disk": "zstd", "reason": "why", "measured": {}}
    assert c.writedown_codec == "zstd" and CodecChoice("zstd", "zstd", "", {}).writedown_codec is None


def _write_down(disk_codec):
    return WriteDown(
        None,
        queue_bytes=1 << 20,
        batch_bytes=1 << 20,
        maintain_interval_s=30.0,
        selective=False,
        admitted=lambda ns, key: True,
        maintain=lambda: None,
        disk_codec=disk_codec,
    )


def _seeded():
    return [(s, f"p{s}") for s in range(24)]


def _keys(seeds):
    return [f"p{s}" for s in seeds]


def _assert_exact(engine, ns, seeds):
    outs = [np.empty_like(small_page(0)) for _ in seeds]
    assert all(engine.get_many(ns, _keys(seeds), outs))
    for s, o in zip(seeds, outs):
        np.testing.assert_array_equal(o, small_page(s))
