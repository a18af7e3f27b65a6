"""bench/cost_model.py's decode over cores (issue 18): kvdrive's one-core decode GB/s scaled by the cores a reload
can use, the disk tier's within the device's bandwidth, and the promoter in the replay planning with the same
scaled figures."""

import os
import sys
from types import SimpleNamespace

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from cost_model import GB, CostModel  # noqa: E402


def _cost(**kw):
    base = dict(
        prefill_tokens_per_s=12000.0,
        pcie_gbps=25.0,
        bytes_per_token=131072,
        dram_gbps=2.0,
        disk_gbps=1.3,
        disk_latency_s=0.0,
        zstd_ratio=1.5,
    )
    return CostModel(**{**base, **kw})


def test_one_core_is_the_measured_figure():
    c = _cost()
    assert c.dram_rate_gbps(1000) == 2.0 and c.disk_rate_gbps(1000) == 1.3
    assert c.tier_reload_s("dram", 4) == pytest.approx(4 * c.page_bytes * (1 / (2.0 * GB) + 1 / (25.0 * GB)))


def test_scaling_is_by_the_64_token_pages_in_flight_up_to_the_cores():
    c = _cost(decode_cores=32)
    assert [c.dram_rate_gbps(n) for n in (1, 8, 32, 100)] == [2.0, 16.0, 64.0, 64.0]
    assert c.dram_rate_gbps() == 64.0  # what the promoter plans with: as many pages as cores
    coarse = _cost(decode_cores=32, page_tokens=1024)  # one trace page is 16 SGLang pages
    assert coarse.dram_rate_gbps(1) == 32.0 and coarse.dram_rate_gbps(2) == 64.0


def test_a_measured_two_thread_speedup_is_extrapolated_per_added_core():
    c = _cost(decode_cores=32, decode_speedup_2t=1.8)
    assert c.dram_rate_gbps(64) == pytest.approx(2.0 * (1 + 31 * 0.8))
    assert _cost(decode_cores=2, decode_speedup_2t=1.8).dram_rate_gbps(64) == pytest.approx(3.6)


def test_disk_decode_scaling_stops_at_the_device_bandwidth():
    # the device reads 2 GB/s of stored bytes: 3 GB/s of pages at a 1.5x zstd ratio
    c = _cost(decode_cores=32, device_read_gbps=2.0)
    assert c.disk_rate_gbps(2) == pytest.approx(2.6) and c.disk_rate_gbps(64) == pytest.approx(3.0)
    # a device slower than what one core measured through the tier (page cache, noise) never lowers that figure
    assert _cost(decode_cores=32, device_read_gbps=0.5).disk_rate_gbps(64) == pytest.approx(1.3)


@pytest.mark.parametrize("kw", [dict(decode_cores=0), dict(decode_speedup_2t=2.5), dict(decode_speedup_2t=0.9)])
def test_bad_scaling_settings_are_refused(kw):
    with pytest.raises(ValueError):
        _cost(**kw)


def test_replay_bench_flags_refuse_bad_scaling():
    import replay_bench

    assert replay_bench.parse_args(["--preset", "smoke"]).decode_cores == len(os.sched_getaffinity(0))
    for bad in (["--decode-cores", "0"], ["--decode-speedup-2t", "3"], ["--disk-write-share", "1"]):
        with pytest.raises(SystemExit):
            replay_bench.parse_args(["--preset", "smoke", *bad])


def test_the_replay_promoter_plans_with_the_scaled_figures(tmp_path):
    """At 1 GB/s on one core a DRAM-tier page (8 MiB) reloads slower than its 64 tokens prefill, on 32 cores
    faster: the promoter in the replay must recompute in the first case and reload in the second."""
    from replay import Config, Replay, SyntheticPages
    from workloads import Workload

    knobs = SimpleNamespace(
        half_life_s=600.0,
        prefetch_share=0.0,
        prefetch_tick_s=1.0,
        prefetch_window_s=30.0,
        prefetch_candidates=16,
        disk_gc_live_ratio=0.9,
    )
    wl = Workload("unit", [], 1, {}, page_tokens=64)
    budgets = {"gpu_pages": 8, "max_request_pages": 1, "l2_pages": 4, "host_bytes": 1 << 20, "disk_bytes": 8 << 20}
    cfg = Config("kvdrive_promoter", l2=True, l3="kvdrive", promoter=True)
    plans = {}
    for cores in (1, 32):
        cost = _cost(dram_gbps=1.0, decode_cores=cores)
        r = Replay(cfg, wl, budgets, cost, knobs, str(tmp_path / str(cores)), SyntheticPages(99))
        try:
            assert r.promoter.config.dram_gbps == cost.dram_rate_gbps()
            plans[cores] = r.promoter.plan_prefix(["dram"] * 4, 64, cost.page_bytes).reload_pages
        finally:
            r.engine.close()
    assert plans == {1: 0, 32: 4}


def test_measured_from_takes_an_earlier_runs_constants_or_says_why_not(tmp_path):
    import json

    import replay_bench
    from replay import ReplayError

    with pytest.raises(ReplayError, match="no measured constants"):
        replay_bench.measured_from(str(tmp_path / "absent.json"))
    meas = {k: 1.0 for k in (*replay_bench.MEASURED_KEYS, "zstd_ratio")}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"measured": meas}))
    with pytest.raises(ReplayError, match="device_read_gbps"):  # a result from before the disk device was measured
        replay_bench.measured_from(str(old))
    meas.update(device_read_gbps=2.0, device_write_gbps=1.0)
    old.write_text(json.dumps({"measured": meas}))
    got = replay_bench.measured_from(str(old))
    assert got["device_read_gbps"] == 2.0 and got["taken_from"].endswith("old.json")
