"""bench/replay/queueing.py (issue 18): the FIFO GPU and the disk shared by reads and background writes, on cases
whose answer is known by hand."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from replay.queueing import FifoGpu, QueueingError, SharedDisk  # noqa: E402


def test_two_requests_arriving_together_the_second_waits_the_first():
    gpu = FifoGpu()
    a = gpu.finish(0.0, gpu.start(0.0), 1.5)
    b = gpu.finish(0.0, gpu.start(0.0), 2.0)
    assert (a.wait_s, a.ttft_s) == (0.0, 1.5)
    assert b.start_s == 1.5 and b.wait_s == 1.5 and b.ttft_s == 3.5  # its wait is the first one's TTFT
    # one arriving after the GPU went idle does not wait
    c = gpu.finish(10.0, gpu.start(10.0), 1.0)
    assert (c.wait_s, c.finish_s) == (0.0, 11.0)
    assert gpu.busy_s == 4.5 and gpu.span_s == 11.0


def test_a_request_arriving_mid_service_waits_the_rest():
    gpu = FifoGpu()
    gpu.finish(0.0, gpu.start(0.0), 4.0)
    s = gpu.finish(1.0, gpu.start(1.0), 1.0)
    assert s.wait_s == 3.0 and s.ttft_s == 4.0


def test_read_alone_runs_at_the_tier_rate_capped_by_the_device():
    disk = SharedDisk(read_gbps=2.0, write_gbps=1.0)
    assert disk.read(0.0, 1e9, rate_gbps=1.0).seconds == pytest.approx(1.0)
    r = disk.read(5.0, 4e9, rate_gbps=40.0)  # decode on many cores cannot read faster than the device
    assert r.seconds == pytest.approx(2.0) and r.contention_s == 0.0


def test_writes_just_before_a_read_halve_its_device_share_until_they_drain():
    # 1 GB written at t=0 at 1 GB/s: 1 device-second pending. A 2 GB read at t=0 gets 1 GB/s (half the device)
    # while the writes drain at half the device time: 2 s for what alone takes 1 s.
    disk = SharedDisk(read_gbps=2.0, write_gbps=1.0, write_share=0.5)
    disk.write(0.0, 1e9)
    r = disk.read(0.0, 2e9, rate_gbps=2.0)
    assert r.seconds == pytest.approx(2.0) and r.contention_s == pytest.approx(1.0)
    assert disk.backlog_s == pytest.approx(0.0)


def test_writes_drain_between_requests_and_the_rest_slows_the_read_less():
    disk = SharedDisk(read_gbps=2.0, write_gbps=1.0, write_share=0.5)
    disk.write(0.0, 1e9)
    # at t=0.5 half the writes are done: 1 s at 1 GB/s drains the rest, then the last 1 GB at 2 GB/s
    r = disk.read(0.5, 2e9, rate_gbps=2.0)
    assert r.seconds == pytest.approx(1.5) and r.contention_s == pytest.approx(0.5)
    late = SharedDisk(read_gbps=2.0, write_gbps=1.0)
    late.write(0.0, 1e9)
    assert late.read(1.0, 2e9, rate_gbps=2.0).contention_s == 0.0  # drained by then


def test_more_bytes_written_never_speed_a_read_up():
    times = []
    for written in (0, 1e8, 5e8, 2e9, 8e9):
        disk = SharedDisk(read_gbps=3.0, write_gbps=1.5)
        disk.write(0.0, written)
        times.append(disk.read(0.1, 3e9, rate_gbps=2.5).seconds)
    assert times == sorted(times) and times[-1] > times[0]


def test_a_decode_bound_read_leaves_the_writes_their_device_time():
    # the read takes 0.5 GB/s of a 2 GB/s device: under half, so it is not slowed, and the writes drain at 3/4
    disk = SharedDisk(read_gbps=2.0, write_gbps=1.0)
    disk.write(0.0, 1e9)
    r = disk.read(0.0, 0.5e9, rate_gbps=0.5)
    assert r.seconds == pytest.approx(1.0) and r.contention_s == pytest.approx(0.0)
    assert disk.backlog_s == pytest.approx(0.25)


def test_prefetch_reads_are_background_work_too():
    disk = SharedDisk(read_gbps=2.0, write_gbps=1.0)
    disk.prefetch(0.0, 2e9)  # one device-second of reading ahead of demand
    assert disk.read(0.0, 2e9, rate_gbps=2.0).contention_s == pytest.approx(1.0)
    assert disk.bytes_prefetched == 2e9 and disk.bytes_written == 0


@pytest.mark.parametrize(
    "kw",
    [dict(read_gbps=0, write_gbps=1), dict(read_gbps=1, write_gbps=-1), dict(read_gbps=1, write_gbps=1, write_share=1)],
)
def test_bad_disk_settings_are_refused(kw):
    with pytest.raises(QueueingError):
        SharedDisk(**kw)


# --- through the replay (bench/replay/core.py): real RadixCache, real TierEngine on a temp dir ---------------------


def _replay(tmp_path, cfg, requests, budgets, **cost_kw):
    from types import SimpleNamespace

    import numpy as np
    from cost_model import CostModel
    from replay import Replay, SyntheticPages
    from workloads import Request, Workload

    reqs = [Request(t, list(p), list(o), np.full(len(p), 1.0 / len(p))) for t, p, o in requests]
    pages = {x for _, p, o in requests for x in list(p) + list(o)}
    wl = Workload("unit", reqs, len(pages), {}, page_tokens=64)
    cost = CostModel(
        **{
            **dict(
                prefill_tokens_per_s=6400.0,  # 0.01 s per 64-token page
                pcie_gbps=25.0,
                bytes_per_token=4096,
                dram_gbps=1.0,
                disk_gbps=1.0,
                disk_latency_s=0.0,
                zstd_ratio=1.0,
            ),
            **cost_kw,
        }
    )
    knobs = SimpleNamespace(
        half_life_s=600.0,
        prefetch_share=0.0,
        prefetch_tick_s=1.0,
        prefetch_window_s=30.0,
        prefetch_candidates=16,
        disk_gc_live_ratio=0.9,
    )
    r = Replay(cfg, wl, budgets, cost, knobs, str(tmp_path), SyntheticPages(99))
    return r, r.run()


def test_replay_second_of_two_simultaneous_requests_waits_the_first_ttft(tmp_path):
    from replay import Config

    r, res = _replay(
        tmp_path,
        Config("radix_only"),
        [(0.0, range(0, 10), [10]), (0.0, range(20, 25), [25])],  # nothing shared: 10 and 5 pages prefilled
        {"gpu_pages": 64, "max_request_pages": 11},
    )
    assert list(r.ttft) == pytest.approx([0.10, 0.05])  # no queue: the prefill alone
    assert list(r.wait) == pytest.approx([0.0, 0.10])
    assert list(r.queued_ttft) == pytest.approx([0.10, 0.15])
    assert res["queued_ttft_p99_s"] > res["ttft_p99_s"]
    assert res["throughput_saturation_rps"] == pytest.approx(2 / 0.15)
    assert res["gpu_busy_pct"] == pytest.approx(100.0)


def _disk_replay(tmp_path, write_gbps):
    """Request A writes pages 0-9 down to a disk-only kvdrive, C (other pages) evicts them from the small GPU tree,
    and B, arriving with them, reads 0-9 back from the disk right after C's pages were written."""
    from replay import Config

    return _replay(
        tmp_path,
        Config("kvdrive_disk", l3="kvdrive"),
        [(0.0, range(0, 10), [10]), (0.0, range(100, 110), [110]), (0.0, range(0, 10), [11])],
        {"gpu_pages": 13, "max_request_pages": 11, "host_bytes": 0, "disk_bytes": 64 << 20},
        device_read_gbps=1.0,
        device_write_gbps=write_gbps,
    )


def test_replay_disk_read_is_slowed_by_the_writes_before_it(tmp_path):
    r, res = _disk_replay(tmp_path / "slow", write_gbps=0.5)
    assert res["hit_tokens_disk"] == 10 * 64  # B read its prompt from the disk tier
    assert res["disk_reads_slowed"] == 1 and res["disk_contention_s"] > 0
    assert r.service[2] == pytest.approx(r.ttft[2] + res["disk_contention_s"])
    assert res["throughput_saturation_rps"] < res["throughput_rps"]
    assert res["disk_device_gb_written"] > 0
    # the same trace on a disk that writes 1000x faster: the writes have drained before B reads
    fast, res_fast = _disk_replay(tmp_path / "fast", write_gbps=500.0)
    assert res_fast["hit_tokens_disk"] == 10 * 64
    assert list(fast.ttft) == pytest.approx(list(r.ttft))  # the no-queue model ignores the disk's writes
    assert res_fast["disk_contention_s"] < res["disk_contention_s"] / 100
