"""The replay benchmarks' cost model: tier constants measured in the same run, and TTFT / throughput arithmetic.

Measured here (``calibrate``, ``calibrate_file``, ``calibrate_device``), on 256 KiB bf16 pages [2, 64, 8, 128]:
  kvdrive DRAM tier read GB/s  TierEngine.get_many from the compressed pool (zstd decode into the caller's buffer),
                               one core: the engine decodes a batch on the calling thread
  kvdrive disk tier read GB/s  the same from the disk store with the page cache dropped (read, checksum, decode),
                               and its fixed latency (one-page read minus bytes / GB/s); write GB/s
  zstd ratio                   of those pages
  file backend read GB/s       SGLang's HiCacheFile.get of raw page files, page cache dropped, and its latency
  disk device read / write GB/s  plain buffered reads (page cache dropped) and fsynced writes of one large file in
                               the same directory: the device's own bandwidth, which the tiers share
Stated (flags, printed with every result): prefill tokens/s, PCIe GB/s, KV bytes per token of the modelled model,
and the decode scaling below.

Decode over cores (issue 18): kvdrive's DRAM-tier and disk-tier read GB/s are measured on one core; a reload of n
pages is modelled as decoded on k = min(decode_cores, pages in flight) cores, pages counted in SGLang's 64-token
pages, at 1 + (k - 1) x (decode_speedup_2t - 1) times the one-core figure: linear scaling when decode_speedup_2t is
2 (an assumption unless a measured two-thread speedup is passed). The disk tier's scaled rate never exceeds the
device's read GB/s (in uncompressed bytes: device GB/s x zstd ratio), nor drops below the measured one-core figure.
HiCacheFile is not scaled (SGLang reads its files on one thread).

TTFT of one request, no queueing (the figure every earlier result reports, kept beside the new ones): reload time
of the pages taken from each tier (per tier used: latency + bytes / tier GB/s + bytes / PCIe GB/s, stages in series;
a host-pool hit pays PCIe only) plus prefill of everything else at prefill tokens/s (linear in tokens: no quadratic
attention term, which understates what a hit saves). No-queue throughput is prefill-bound and serial: requests /
sum of TTFTs (one GPU, no overlap of reload and compute, decode not counted). The replay adds queueing and the disk
shared by reads and writes on top of these service times (bench/replay/queueing.py).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass

import numpy as np

from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.synthetic import kv_page

MiB = 1 << 20
GB = 1e9
SGLANG_PAGE_TOKENS = 64  # decode parallelism is counted in SGLang pages, whatever the trace's page size


class CalibrationError(RuntimeError):
    pass


def percentile(xs, q) -> float:
    if len(xs) == 0:
        return 0.0
    return float(np.percentile(np.asarray(xs), q))


def _drop_cache(path: str, suffix: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(suffix):
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _calib_pages(pages: int):
    rng = np.random.default_rng(1234)
    distinct = [kv_page(rng) for _ in range(min(48, pages))]
    return [distinct[i % len(distinct)] for i in range(pages)]


# One decode thread: the figures here are per core and the cost model scales them (CostModel.decode_factor). An
# engine that decodes a batch on several threads (TierConfig.decode_threads, tier/parallel.py) would otherwise be
# scaled twice.
ONE_THREAD = {"decode_threads": 1} if "decode_threads" in getattr(TierConfig, "__dataclass_fields__", {}) else {}


def calibrate(tmp: str, pages: int, reps: int) -> dict:
    """TierEngine read throughput from DRAM and from disk (cold), write throughput, disk latency, zstd ratio, on
    256 KiB bf16 pages [2, 64, 8, 128]."""
    ns = Namespace(
        model="calib", kv_dtype="bfloat16", layout="mha", page_size=64, num_heads=8, head_dim=128, num_layers=1
    )
    data = _calib_pages(pages)
    raw = sum(p.nbytes for p in data)
    outs = [np.zeros_like(data[0]) for _ in range(pages)]  # touched: no first-touch faults inside the timing
    res = {"page_bytes": data[0].nbytes, "pages": pages, "reps": reps}
    dram, disk, write, single = [], [], [], []
    path = os.path.join(tmp, "calib")
    for r in range(-1, reps):  # rep -1 warms up (allocator, page cache, zstd contexts) and is not counted
        if r == 0:
            dram, disk, write, single = [], [], [], []
        shutil.rmtree(path, ignore_errors=True)
        keys = [f"c{r}-{i}" for i in range(pages)]
        with TierEngine(TierConfig(path=path, host_bytes=4 * raw, disk_bytes=8 * raw + (64 * MiB), **ONE_THREAD)) as e:
            t0 = time.perf_counter()
            e.put_many(ns, keys, data)
            if not e.flush(timeout=120):
                raise CalibrationError("calibration: the disk tier did not take the pages")
            write.append(raw / (time.perf_counter() - t0) / GB)
            t0 = time.perf_counter()
            got = e.get_many(ns, keys, outs)
            dram.append(raw / (time.perf_counter() - t0) / GB)
            if not all(got):
                raise CalibrationError("calibration: DRAM read missed")
            st = e.stats().dram
            res["zstd_ratio"] = st.raw_bytes / st.used_bytes
        with TierEngine(TierConfig(path=path, host_bytes=0, disk_bytes=8 * raw + (64 * MiB), **ONE_THREAD)) as e:
            _drop_cache(path, ".kvs")
            t0 = time.perf_counter()
            got = e.get_many(ns, keys, outs)
            disk.append(raw / (time.perf_counter() - t0) / GB)
            if not all(got) or not np.array_equal(outs[-1], data[-1]):
                raise CalibrationError("calibration: disk read missed or differed")
            _drop_cache(path, ".kvs")
            for i in random.Random(r).sample(range(pages), min(24, pages)):
                t0 = time.perf_counter()
                e.get_many(ns, [keys[i]], [outs[0]])
                single.append(time.perf_counter() - t0)
    shutil.rmtree(path, ignore_errors=True)
    res["dram_read_gbps"] = statistics.median(dram)
    res["disk_read_gbps"] = statistics.median(disk)
    res["disk_write_gbps"] = statistics.median(write)
    res["single_page_disk_read_s"] = statistics.median(single)
    res["disk_latency_s"] = max(0.0, res["single_page_disk_read_s"] - res["page_bytes"] / (res["disk_read_gbps"] * GB))
    res["runs"] = {"dram_read_gbps": dram, "disk_read_gbps": disk, "disk_write_gbps": write}
    return res


def calibrate_file(tmp: str, pages: int, reps: int) -> dict:
    """SGLang's HiCacheFile (real files, raw pages) on the same 256 KiB bf16 pages: batch_set GB/s, cold batch_get
    GB/s (page cache dropped) and the fixed latency of a one-page get."""
    import torch
    from replay.tiers import file_storage_config
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile

    data = [torch.from_numpy(p.view(np.int16)).view(torch.bfloat16).flatten() for p in _calib_pages(pages)]
    raw = sum(p.numel() * 2 for p in data)
    outs = [torch.zeros_like(data[0]) for _ in range(pages)]
    reads, writes, single = [], [], []
    path = os.path.join(tmp, "calib-file")
    for r in range(-1, reps):
        if r == 0:
            reads, writes, single = [], [], []
        shutil.rmtree(path, ignore_errors=True)
        store = HiCacheFile(file_storage_config(max_bytes=0), file_path=path)
        keys = [f"{r}-{i:060x}" for i in range(pages)]
        t0 = time.perf_counter()
        if not store.batch_set(keys, data):
            raise CalibrationError("calibration: HiCacheFile.batch_set failed")
        writes.append(raw / (time.perf_counter() - t0) / GB)
        _drop_cache(path, ".bin")
        t0 = time.perf_counter()
        got = store.batch_get(keys, outs)
        reads.append(raw / (time.perf_counter() - t0) / GB)
        if any(g is None for g in got) or not torch.equal(outs[-1], data[-1]):
            raise CalibrationError("calibration: HiCacheFile read missed or differed")
        _drop_cache(path, ".bin")
        for i in random.Random(r).sample(range(pages), min(24, pages)):
            t0 = time.perf_counter()
            store.batch_get([keys[i]], [outs[0]])
            single.append(time.perf_counter() - t0)
    shutil.rmtree(path, ignore_errors=True)
    res = {
        "file_read_gbps": statistics.median(reads),
        "file_write_gbps": statistics.median(writes),
        "single_page_file_read_s": statistics.median(single),
        "runs": {"file_read_gbps": reads, "file_write_gbps": writes},
    }
    page_read_s = data[0].numel() * 2 / (res["file_read_gbps"] * GB)
    res["file_latency_s"] = max(0.0, res["single_page_file_read_s"] - page_read_s)
    return res


def calibrate_device(tmp: str, nbytes: int, reps: int) -> dict:
    """The disk device's own bandwidth in ``tmp``: one file of ``nbytes`` written in 4 MiB chunks then fsynced, and
    read back in 4 MiB chunks with the page cache dropped. The tiers' reads and writes share this bandwidth
    (bench/replay/queueing.py)."""
    chunk = os.urandom(4 * MiB)  # incompressible: no filesystem compression can flatter the figure
    n = max(1, nbytes // len(chunk))
    path = os.path.join(tmp, "calib-device.bin")
    reads, writes = [], []
    for r in range(-1, reps):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                os.write(fd, chunk)
            os.fsync(fd)
            w = n * len(chunk) / (time.perf_counter() - t0) / GB
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            got = 0
            while True:
                b = os.read(fd, len(chunk))
                if not b:
                    break
                got += len(b)
            rd = got / (time.perf_counter() - t0) / GB
        finally:
            os.close(fd)
        if got != n * len(chunk):
            raise CalibrationError(f"calibration: read {got} of {n * len(chunk)} bytes back from {path}")
        if r >= 0:  # rep -1 warms up
            reads.append(rd)
            writes.append(w)
    os.unlink(path)
    return {
        "device_read_gbps": statistics.median(reads),
        "device_write_gbps": statistics.median(writes),
        "device_bytes": n * len(chunk),
        "runs": {"device_read_gbps": reads, "device_write_gbps": writes},
    }


@dataclass(frozen=True)
class CostModel:
    """Seconds for reloads and prefill. Tiers: "host" (SGLang's host pool: PCIe only), "dram"/"queued" (kvdrive's
    compressed pool), "disk" (kvdrive's disk store), "file" (SGLang's HiCacheFile)."""

    prefill_tokens_per_s: float
    pcie_gbps: float
    bytes_per_token: int
    dram_gbps: float
    disk_gbps: float
    disk_latency_s: float
    file_gbps: float = 0.0
    file_latency_s: float = 0.0
    zstd_ratio: float = 1.0  # measured; converts page counts to stored bytes (reports, the disk device's time)
    page_tokens: int = 64
    decode_cores: int = 1  # cores a reload's decode may use (module docstring)
    decode_speedup_2t: float = 2.0  # two cores' decode over one core's: 2 = linear (assumed unless measured)
    device_read_gbps: float = 0.0  # the disk device's own read GB/s (stored bytes); 0: not measured, no cap
    device_write_gbps: float = 0.0

    def __post_init__(self):
        if self.decode_cores < 1:
            raise ValueError(f"cost model: decode_cores must be >= 1, got {self.decode_cores}")
        if not 1.0 <= self.decode_speedup_2t <= 2.0:
            raise ValueError(f"cost model: decode_speedup_2t must be in [1, 2], got {self.decode_speedup_2t}")

    @property
    def page_bytes(self) -> int:
        return self.bytes_per_token * self.page_tokens

    def decode_factor(self, pages: int | None = None) -> float:
        """How many times the one-core decode rate a reload of ``pages`` pages gets (None: as many pages as cores,
        the rate the promoter plans with: nearly every prefix reload has that many 64-token pages)."""
        inflight = self.decode_cores if pages is None else max(1, pages * self.page_tokens // SGLANG_PAGE_TOKENS)
        k = min(self.decode_cores, inflight)
        return 1.0 + (k - 1) * (self.decode_speedup_2t - 1.0)

    def dram_rate_gbps(self, pages: int | None = None) -> float:
        """kvdrive's DRAM tier read GB/s (uncompressed bytes) for a reload of ``pages`` pages."""
        return self.dram_gbps * self.decode_factor(pages)

    def disk_rate_gbps(self, pages: int | None = None) -> float:
        """kvdrive's disk tier read GB/s (uncompressed bytes) for a reload of ``pages`` pages: the one-core figure
        scaled, within the device's read GB/s."""
        scaled = self.disk_gbps * self.decode_factor(pages)
        if self.device_read_gbps <= 0:
            return scaled
        return min(scaled, max(self.disk_gbps, self.device_read_gbps * self.zstd_ratio))

    def tier_reload_s(self, tier: str, pages: int) -> float:
        """Reload ``pages`` pages from ``tier`` into GPU memory (one fixed latency per tier and request)."""
        if pages <= 0:
            return 0.0
        nbytes = pages * self.page_bytes
        pcie = nbytes / (self.pcie_gbps * GB)
        if tier == "host":
            return pcie
        if tier in ("dram", "queued"):
            return nbytes / (self.dram_rate_gbps(pages) * GB) + pcie
        if tier == "disk":
            return self.disk_latency_s + nbytes / (self.disk_rate_gbps(pages) * GB) + pcie
        if tier == "file":
            if self.file_gbps <= 0:
                raise ValueError("cost model: the file backend's read GB/s was not measured")
            return self.file_latency_s + nbytes / (self.file_gbps * GB) + pcie
        raise ValueError(f"cost model: unknown tier {tier!r}")

    def prefill_s(self, pages: int) -> float:
        return pages * self.page_tokens / self.prefill_tokens_per_s

    def ttft_s(self, reloads: dict, recompute_pages: int) -> float:
        """``reloads``: tier -> pages reloaded from it for this request."""
        return sum(self.tier_reload_s(t, n) for t, n in reloads.items()) + self.prefill_s(recompute_pages)
