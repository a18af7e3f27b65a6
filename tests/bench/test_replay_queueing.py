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
