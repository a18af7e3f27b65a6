"""Which codec each tier stores pages with: chosen by measuring this machine, not fixed (issue 18).

A page in kvdrive's DRAM tier is worth keeping only if reloading it beats recomputing its prefill. A zstd page must be
decoded on the way back, so its reload runs at most at the decode bandwidth of the threads decoding it; a raw page is
a copy. When this machine's zstd decode (GB/s per core, measured here on synthetic KV pages, x the decode threads the
engine uses) is below the KV bandwidth of recomputing (prefill tokens/s x KV bytes per token), every zstd DRAM hit
would be recomputed instead, and the DRAM tier holds pages better raw -- unless DRAM capacity is what limits the
cache. The disk tier is about capacity: zstd there (~1.49x more pages), unless the user pinned a codec.

``TierConfig.codec = "auto"`` (the default) asks for this choice; any other codec is pinned for both tiers
(``disk_codec`` pins the disk's alone). ``choose`` answers with a ``CodecChoice``; the engine stores pages in DRAM
with ``.dram`` and the write-down re-encodes lossless pages to ``.disk`` (tier/writedown.py). Its ``reason`` goes to the
startup log and the summary log line (kvdrive_sglang/metrics.py).

The bandwidth to beat is an input (``TierConfig.recompute_gbps``), else ``DEFAULT_RECOMPUTE_GBPS``, a GPU server's
figure, at start. Once the server has measured its own prefill (kvdrive_sglang/cost_meter.py, the promoter's
calibration on each report tick), ``rechoose`` decides again against that figure x the model's KV bytes per token
(``TierEngine.recheck_codec``, called by kvdrive_sglang/upkeep.py): from then on the choice rests on this server's
model and hardware, not on the 8B assumption, and the reason in the log and summary line says so. Pages already
stored keep their codec (blobs describe themselves); new ones take the new one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import NamedTuple

import numpy as np

from .codecs import decode_page, encode_page, get_codec
from .parallel import threads_for
from .synthetic import kv_page

log = logging.getLogger("kvdrive.tier")

AUTO = "auto"  # TierConfig.codec: choose per tier by measurement
# Disk codecs a user may pin apart from the DRAM codec: lossless only, as the write-down re-encodes between them
# (a lossy page is never re-encoded, and a lossless page is never made lossy behind the user's back)
DISK_CODECS = ("raw", "zstd")
_GB = 1e9  # decimal GB, as the promoter's costs (tier/promoter.py) count them
# Before any measurement: an 8B-class model (Llama-3.1-8B: 32 layers x 8 KV heads x 128 dim x K,V x 2 B = 128 KiB of
# bf16 KV per token) prefilled at ~12k tokens/s on one datacenter GPU -- the assumption the production-day replay
# makes (bench/results/replay_bench-production-day.md): 12,000 x 131,072 B = 1.57 GB/s. A reload slower than this is
# slower than recomputing.
DEFAULT_PREFILL_TOKENS_PER_S = 12_000
DEFAULT_KV_BYTES_PER_TOKEN = 131_072
DEFAULT_RECOMPUTE_GBPS = DEFAULT_PREFILL_TOKENS_PER_S * DEFAULT_KV_BYTES_PER_TOKEN / _GB
# The measurement: a few 256 KiB bf16 pages (64 tokens x 8 heads x 128 dim, K and V; kv_page's default shape) decoded
# in rounds for ~50 ms; the fastest round counts (what a core can do: on a loaded machine the slower rounds measure
# the neighbours). At least _MIN_ROUNDS rounds, whatever the budget.
MEASURE_BUDGET_S = 0.05
_MEASURE_PAGES = 4
_MIN_ROUNDS = 3
HYSTERESIS = 0.10  # rechoose: a measured bound within 10% of the decode bandwidth keeps the codec in use


class DecodeSpeed(NamedTuple):
    """zstd on this machine's cores, measured on synthetic KV pages (``measure_zstd``)."""

    gbps_per_core: float  # decoded GB/s of one thread
    ratio: float  # raw bytes / encoded bytes


class CodecChoice(NamedTuple):
    """The codec per tier and why: ``reason`` is what the logs show, ``measured`` the figures it rests on."""

    dram: str  # codec of pages put into the DRAM tier
    disk: str  # codec of lossless pages written to disk (the write-down re-encodes to it)
    reason: str  # e.g. "zstd decode 3.1 GB/s x 2 threads < 4.0 GB/s needed"
    measured: dict  # zstd_decode_gbps_per_core, zstd_ratio, decode_threads, needed_gbps, needed_source (auto only)

    @property
    def writedown_codec(self) -> str | None:
        """The codec the write-down re-encodes lossless pages to (WriteDown's ``disk_codec``); None: pages go to disk
        as the DRAM tier holds them."""
        return self.disk if self.disk != self.dram else None


def recompute_gbps(prefill_tokens_per_s: float, kv_bytes_per_token: float) -> float:
    """The KV bandwidth of recomputing, GB/s: what a reload must beat (e.g. from the promoter's measured prefill
    cost, ``Promoter.costs()["prefill_tokens_per_s"]``, and the server's page bytes / page size)."""
    return prefill_tokens_per_s * kv_bytes_per_token / _GB


_measured: DecodeSpeed | None = None
_measure_lock = threading.Lock()


def measure_zstd(budget_s: float = MEASURE_BUDGET_S) -> DecodeSpeed:
    """This machine's zstd decode speed per core and ratio on synthetic KV pages; measured once per process (the
    first call takes ~``budget_s``), then remembered."""
    global _measured
    with _measure_lock:
        if _measured is None:
            _measured = _measure(budget_s)
            log.info(
                "kvdrive: zstd decodes %.2f GB/s per core on synthetic KV pages (ratio x%.2f; measured in %.0f ms)",
                _measured.gbps_per_core,
                _measured.ratio,
                budget_s * 1000,
            )
        return _measured


def _measure(budget_s: float) -> DecodeSpeed:
    rng = np.random.default_rng(18)
    pages = [kv_page(rng) for _ in range(_MEASURE_PAGES)]
    head_dim = pages[0].shape[-1]
    blobs = [encode_page(p, "bfloat16", "zstd", head_dim) for p in pages]
    out = np.empty_like(pages[0])
    raw = sum(p.nbytes for p in pages)
    best = float("inf")
    rounds = 0
    deadline = time.perf_counter() + budget_s
    while rounds < _MIN_ROUNDS or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for blob in blobs:
            decode_page(blob, out, "bfloat16")
        best = min(best, time.perf_counter() - t0)
        rounds += 1
    return DecodeSpeed(raw / max(best, 1e-9) / _GB, raw / sum(len(b) for b in blobs))


def choose(config, *, speed: DecodeSpeed | None = None, needed_source: str | None = None) -> CodecChoice:
    """The codec per tier for ``config`` (a checked TierConfig). ``speed``: zstd's figures (None: measure them here,
    once per process); only ``codec="auto"`` with a DRAM tier needs them. ``needed_source``: where
    ``config.recompute_gbps`` came from, for the reason (default "given").

    With ``auto``, the DRAM tier stays raw when zstd decode x decode threads is below the bandwidth a reload must
    beat (``config.recompute_gbps``, else ``DEFAULT_RECOMPUTE_GBPS``) AND DRAM is not the constraint; it is zstd
    otherwise. DRAM counts as the constraint when no disk tier backs it, or when the disk cap is smaller than what the
    DRAM tier would hold compressed (host_bytes x zstd ratio): then the DRAM tier's capacity is most of the cache's.
    With a disk at least that large, the pages a raw DRAM tier has no room for are still kept, on disk, so DRAM's job
    is speed. The disk tier gets ``config.disk_codec``, else zstd (capacity)."""
    codec, disk_pin = config.codec, config.disk_codec
    if codec != AUTO:  # pinned: the same codec in both tiers unless the disk's is pinned too
        disk = disk_pin or get_codec(codec).name
        reason = f"pinned: codec {codec}" + (f", disk_codec {disk_pin}" if disk_pin else "")
        return CodecChoice(get_codec(codec).name, disk, reason, {})
    disk = disk_pin or "zstd"
    if config.host_bytes == 0:  # nothing is held in DRAM: pages are encoded once, for the disk
        return CodecChoice(disk, disk, "no DRAM tier: pages go to disk as " + disk, {})
    speed = speed if speed is not None else measure_zstd()
    threads = threads_for(config.decode_threads)  # as many as the engine's parallel decode uses (tier/parallel.py)
    needed = config.recompute_gbps
    source = (needed_source or "given") if needed is not None else "assumed: 8B model, 12k tok/s x 128 KiB/token"
    needed = needed if needed is not None else DEFAULT_RECOMPUTE_GBPS
    decode = speed.gbps_per_core * threads
    fast = decode >= needed
    reason = (
        f"zstd decode {speed.gbps_per_core:.1f} GB/s x {threads} thread{'s' if threads != 1 else ''} "
        f"{'>=' if fast else '<'} {_gbps(needed)} GB/s needed"
    ) + (f" ({needed_source})" if needed_source else "")
    measured = {
        "zstd_decode_gbps_per_core": speed.gbps_per_core,
        "zstd_ratio": speed.ratio,
        "decode_threads": threads,
        "needed_gbps": needed,
        "needed_source": source,
    }
    if config.path is None:
        dram = "zstd"
        if not fast:
            reason += "; zstd anyway: no disk tier, DRAM's capacity is the whole cache"
    elif fast:
        dram = "zstd"
    elif config.disk_bytes < config.host_bytes * speed.ratio:
        dram = "zstd"
        reason += (
            f"; zstd anyway: the disk cap ({config.disk_bytes / 2**30:.1f} GiB) is below what DRAM holds compressed "
            f"({config.host_bytes / 2**30:.1f} GiB x{speed.ratio:.2f}), so DRAM capacity counts"
        )
    else:
        dram = "raw"
    if config.path is None:
        disk = dram  # no disk tier: nothing is written down
    return CodecChoice(dram, disk, reason, measured)


def _gbps(x: float) -> str:
    """A bandwidth for the reason: one decimal, more where that would print 0.0 (a CPU server's prefill needs MB/s)."""
    return f"{x:.1f}" if x >= 0.95 else f"{x:.2g}"


def rechoose(config, current: CodecChoice, needed_gbps: float, source: str) -> CodecChoice:
    """``current`` chosen again against a *measured* bandwidth to beat (``needed_gbps``, from ``source``: e.g. the
    server's measured prefill x its KV bytes per token), on the zstd speed measured at start. Only ``auto`` with a
    DRAM tier changes; the DRAM codec flips only when the decode is more than ``HYSTERESIS`` away from the new bound on
    the other side (a measured prefill wanders; pages of both codecs decode alike, but the log should not flap). The
    reason always names the new figure."""
    m = current.measured
    if config.codec != AUTO or not m:
        return current
    speed = DecodeSpeed(m["zstd_decode_gbps_per_core"], m["zstd_ratio"])
    new = choose(dataclasses.replace(config, recompute_gbps=needed_gbps), speed=speed, needed_source=source)
    decode = speed.gbps_per_core * m["decode_threads"]
    near = abs(decode - needed_gbps) <= HYSTERESIS * needed_gbps
    if new.dram != current.dram and near:
        return current._replace(reason=new.reason + f"; kept {current.dram}: within {HYSTERESIS:.0%} of the bound")
    return new


def for_config(config, *, speed: DecodeSpeed | None = None) -> CodecChoice:
    """``choose``, logged once: what TierEngine calls when it opens."""
    choice = choose(config, speed=speed)
    if config.codec == AUTO:
        log.info("kvdrive: codec dram=%s disk=%s (%s)", choice.dram, choice.disk, choice.reason)
    return choice
