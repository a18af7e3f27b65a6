"""Trace replay on CPU: radix-only vs SGLang HiCache (host pool, + file backend) vs kvdrive (LRU, promoter).

    python bench/replay_bench.py --preset smoke              # seconds (the test runs it)
    python bench/replay_bench.py --preset default            # a few minutes; writes results/replay_bench-default.*
    python bench/replay_bench.py --preset production-day     # >= 100k requests, < 30 min on 2 cores
    ... --decode-cores 32 --measured-from X.json             # kvdrive's decode scaled to a 32-core host, on the
                                                             # constants another run measured (issue 18)
    python bench/replay_bench.py --nodes 2,4,8               # N replicas (round-robin), with and without the
                                                             # shared remote tier (bench/replay/fleet.py); writes
                                                             # results/remote-replay-<preset>.*
    ... --resume                                             # skip (workload, configuration) pairs already done

Workloads (bench/workloads.py, seeded, sizes as flags): docs (long-document reuse, Zipf popularity, Poisson
arrivals) and sessions (agent sessions with growing histories and think time). Every configuration replays the same
trace (its digest is in each result) at the same budgets:
  GPU     the same number of pages in SGLang's RadixCache for every configuration.
  host    the same host-DRAM bytes H for KV. HiCache configurations give all of H to SGLang's host pool
          (uncompressed). kvdrive configurations split it as --kv-tier kvdrive deploys: SGLang's host pool at its
          default size (--hicache-ratio 2: twice the GPU pages; write-through mirrors every GPU page there, and
          storage hits land there) and kvdrive's compressed DRAM pool gets the rest of H, in stored bytes.
  disk    the same byte cap D for HiCacheFile (LRU files, raw pages) and kvdrive's disk store (compressed).
Configurations (bench/replay/core.py):
  radix_only        SGLang's RadixCache alone.
  hicache_host      + HiCache's host pool, default write_through policy (see bench/replay/tiers.py for what is
                    modelled).
  hicache_file      + SGLang's HiCacheFile as L3 (real files in a temp dir, real batch_set/batch_get/batch_exists).
  kvdrive_lru       + kvdrive's TierEngine as L3 (compressed DRAM pool over the disk store), LRU everywhere.
  kvdrive_promoter  the same with kvdrive's promoter: GPU eviction by value, selective write-down as the server
                    does it (every page enters the DRAM pool; those the promoter admits, when stored or after a
                    later use, go on to the disk; the rest go down on spare bandwidth when DRAM evicts them, or are
                    dropped while the disk is busy or full), value-ordered tiers, reload-vs-recompute per prefix,
                    background prefetch disk -> DRAM.
Storage is consulted as SGLang does: only when at least prefetch_threshold (256 tokens) remain after the GPU and
host hits. Page granularity: one tree token = one page of --page-tokens tokens (64, SGLang's page size, except in
production-day), one 4 KiB synthetic bf16 page stands in for each modelled page, and bytes are reported scaled to
the modelled page (KV bytes/token x page tokens). Every page read or written is real I/O through SGLang's and
kvdrive's code, ~0.05-0.2 ms each here, so 64-token pages cost ~50-90 ms per request per tiered configuration:
production-day uses 1024-token pages to fit 100k requests in 30 minutes. That coarsening rounds every part of a
trace up to whole pages (a question or an answer becomes 1024 tokens, a session turn ~2K tokens instead of ~1K), so
its unique tokens and session histories are inflated; document reuse keeps its shape. production-day also waits for
kvdrive's disk writer every 16 requests instead of after each (pages still queued are read from the queue, as in a
server). TTFT and throughput come from bench/cost_model.py, its tier constants measured in this run, the rest stated
assumptions printed with the result: kvdrive's decode, measured on one core, is scaled over --decode-cores (default:
this machine's usable cores) by --decode-speedup-2t per added core (2 = linear: assumed), the disk tier's within the
disk device's measured read GB/s, and the promoter plans with the same scaled figures. Each request has two TTFTs
(bench/replay/queueing.py): without queueing (the earlier results' figure, kept for continuity) and queued (one GPU
serving the trace's arrivals first come first served, its disk reads sharing the device with the write-down's
writes and the prefetch's reads); throughput is requests / service time both ways (the queued one with the
contention the reads met), i.e. at saturation. Attention mass (promoter input) is synthetic. Results:
bench/results/<name>.json, .md and PNG plots; --jobs 2 replays two (workload, configuration) pairs at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench_common import Progress, add_allow_dirty, guard_results, machine  # noqa: E402
from cost_model import CostModel, calibrate, calibrate_device, calibrate_file, percentile  # noqa: E402
from replay import Config, Replay, ReplayError, SyntheticPages  # noqa: E402
from replay.tiers import N_POOL_PAGES, SMALL_SHAPE  # noqa: E402
from workloads import GENERATORS, trace_digest  # noqa: E402

from kvdrive_sglang.tier.engine import TierConfig, TierEngine  # noqa: E402
from kvdrive_sglang.tier.namespace import Namespace  # noqa: E402
from kvdrive_sglang.tier.promoter import PromoterConfig  # noqa: E402

MiB = 1 << 20
PREFETCH_THRESHOLD_TOKENS = 256  # SGLang's default: storage is asked only for at least this many tokens
CONFIGS = {
    "radix_only": Config("radix_only"),
    "hicache_host": Config("hicache_host", l2=True),
    "hicache_file": Config("hicache_file", l2=True, l3="file"),
    "kvdrive_lru": Config("kvdrive_lru", l2=True, l3="kvdrive"),
    "kvdrive_promoter": Config("kvdrive_promoter", l2=True, l3="kvdrive", promoter=True),
}


def config_for(name: str, page_tokens: int) -> Config:
    cfg = CONFIGS[name]
    if cfg.l3 is None:
        return cfg
    return dataclasses.replace(cfg, storage_min_pages=-(-PREFETCH_THRESHOLD_TOKENS // page_tokens))


# Sizes per preset (flags override). Budgets are fractions of the workload's distinct pages.
PRESETS = {
    "smoke": dict(
        docs=8,
        doc_requests=30,
        sessions=10,
        turns_min=10,
        turns_max=16,
        session_spread_s=120.0,
        gpu_frac=0.05,
        host_frac=0.45,
        disk_frac=0.7,
        calib_pages=16,
        calib_reps=1,
    ),
    "default": dict(docs=90, doc_requests=1000, sessions=64, turns_min=10, turns_max=60, session_spread_s=1800.0),
    # a day: 66.5k document requests (Poisson, 1.3 s apart) and 680 agent sessions of 10-90 turns (~34k requests)
    # starting over 22 hours; 1024-token pages (see the docstring) and the disk writer awaited every 16 requests
    "production-day": dict(
        docs=5000,
        doc_requests=66500,
        doc_gap_s=1.3,
        sessions=680,
        turns_min=10,
        turns_max=90,
        session_spread_s=80000.0,
        think_s=120.0,
        page_tokens=1024,
        flush_every=16,
        calib_pages=192,
        calib_reps=5,
    ),
}
DEFAULTS = dict(
    zipf=1.0,
    doc_gap_s=4.0,
    system_pages=64,
    think_s=60.0,
    decode_tps=40.0,
    gpu_frac=0.02,
    host_frac=0.1,
    disk_frac=0.5,
    page_tokens=64,
    flush_every=1,
    calib_pages=96,
    calib_reps=3,
)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument(
        "--out", default=None, help="output path without extension (default bench/results/replay_bench-<preset>)"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the (workload, configuration) results a previous run of the same command saved",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="only rewrite the Markdown and the plots of a results JSON (next to it), replaying nothing",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workloads", default="docs,sessions")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    ap.add_argument("--dir", default=None, help="scratch directory for the disk tiers (default: a temp dir)")
    g = ap.add_argument_group("workload sizes (default: the preset's)")
    for k in ("docs", "doc_requests", "sessions", "turns_min", "turns_max", "system_pages"):
        g.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    for k in ("zipf", "doc_gap_s", "think_s", "session_spread_s", "decode_tps"):
        g.add_argument("--" + k.replace("_", "-"), type=float, default=None)
    b = ap.add_argument_group("budgets, as fractions of the workload's distinct pages (same for every configuration)")
    b.add_argument("--gpu-frac", type=float, default=None)
    b.add_argument("--host-frac", type=float, default=None, help="host DRAM for KV, in uncompressed pages")
    b.add_argument("--disk-frac", type=float, default=None, help="disk cap, in uncompressed page bytes")
    b.add_argument(
        "--kvdrive-l2-gpu-ratio",
        type=float,
        default=2.0,
        help="kvdrive configurations keep SGLang's host pool at this many times the GPU pages (SGLang's "
        "default --hicache-ratio) and give the rest of the host budget to kvdrive's DRAM pool",
    )
    ap.add_argument(
        "--page-tokens",
        type=int,
        default=None,
        help="tokens per trace page (a multiple of 64; default: the preset's): coarser pages make long runs feasible",
    )
    c = ap.add_argument_group("cost model assumptions (no GPU here)")
    c.add_argument(
        "--bytes-per-token",
        type=int,
        default=131072,
        help="KV bytes per token of the modelled model (Llama-3.1-8B bf16: 32 layers x 8 KV heads x 128 x 2 x 2 B)",
    )
    c.add_argument("--prefill-tps", type=float, default=12000.0, help="prefill tokens/s")
    c.add_argument("--pcie-gbps", type=float, default=25.0)
    c.add_argument(
        "--decode-cores",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="cores kvdrive's decode may use for one reload (default: this machine's usable cores); the one-core "
        "DRAM and disk tier read GB/s measured here are scaled by min(this, 64-token pages in flight)",
    )
    c.add_argument(
        "--decode-speedup-2t",
        type=float,
        default=2.0,
        help="two decode threads' speedup over one (default 2.0: linear scaling, assumed); pass the one "
        "bench/reload_bench.py measures to extrapolate from it instead",
    )
    c.add_argument(
        "--disk-write-share",
        type=float,
        default=0.5,
        help="the disk device's share that background writes and prefetch reads keep while a request reads",
    )
    p = ap.add_argument_group("promoter")
    p.add_argument("--half-life-s", type=float, default=PromoterConfig().half_life_s)
    p.add_argument("--prefetch-share", type=float, default=PromoterConfig().promote_share)
    p.add_argument("--prefetch-tick-s", type=float, default=1.0)
    p.add_argument("--prefetch-window-s", type=float, default=30.0)
    p.add_argument("--prefetch-candidates", type=int, default=16384)
    p.add_argument("--disk-gc-live-ratio", type=float, default=0.9)
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="replay this many (workload, configuration) pairs at once, in worker processes",
    )
    ap.add_argument(
        "--flush-every",
        type=int,
        default=None,
        help="wait for kvdrive's disk writer every N requests (default: the preset's; 1 = deterministic)",
    )
    ap.add_argument("--calib-pages", type=int, default=None)
    ap.add_argument(
        "--measured-from",
        metavar="JSON",
        default=None,
        help="take the measured constants from this earlier results JSON instead of calibrating (e.g. a 32-core "
        "replay on the same constants as the 2-core one, so that only the decode scaling differs)",
    )
    f = ap.add_argument_group("N replicas with a shared remote tier (bench/replay/fleet.py; issue 19)")
    f.add_argument(
        "--nodes",
        default=None,
        help="comma-separated replica counts, e.g. 2,4,8: replay the trace "
        "round-robin over that many nodes, with and without the shared tier",
    )
    f.add_argument("--fleet-config", default="kvdrive_lru", help="each node's configuration (a kvdrive one)")
    f.add_argument(
        "--shared-frac",
        type=float,
        default=1.0,
        help="the shared tier's capacity, as a fraction of the workload's distinct pages (stored bytes)",
    )
    f.add_argument(
        "--remote-gbps",
        type=float,
        default=1.3,
        help="shared tier read GB/s (default: batched Mooncake gets over loopback TCP measured on these "
        "machines; RDMA: ~10x)",
    )
    f.add_argument("--remote-latency-s", type=float, default=0.0005, help="shared tier latency per request")
    ap.add_argument("--calib-reps", type=int, default=None)
    add_allow_dirty(ap)
    args = ap.parse_args(argv)
    for k, v in {**DEFAULTS, **PRESETS[args.preset]}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("gpu_frac", "host_frac", "disk_frac"):
        if not 0 < getattr(args, k) <= 1:
            ap.error(f"--{k.replace('_', '-')} must be in (0, 1], got {getattr(args, k)}")
    if not args.kvdrive_l2_gpu_ratio > 1:
        ap.error(f"--kvdrive-l2-gpu-ratio must be > 1 (the host pool mirrors the GPU), got {args.kvdrive_l2_gpu_ratio}")
    if args.decode_cores < 1:
        ap.error(f"--decode-cores must be >= 1, got {args.decode_cores}")
    if not 1.0 <= args.decode_speedup_2t <= 2.0:
        ap.error(f"--decode-speedup-2t must be in [1, 2], got {args.decode_speedup_2t}")
    if not 0 <= args.disk_write_share < 1:
        ap.error(f"--disk-write-share must be in [0, 1), got {args.disk_write_share}")
    if args.page_tokens < 64 or args.page_tokens % 64:
        ap.error(f"--page-tokens must be a multiple of 64, got {args.page_tokens}")
    if args.turns_min < 1 or args.turns_max < args.turns_min:
        ap.error(f"--turns-min/--turns-max must satisfy 1 <= min <= max, got {args.turns_min}, {args.turns_max}")
    for name in ("docs", "doc_requests", "sessions"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.config_list = [x for x in args.configs.split(",") if x]
    args.node_list = []
    if args.nodes is not None:
        try:
            args.node_list = [int(x) for x in args.nodes.split(",") if x]
        except ValueError:
            args.node_list = []
        if not args.node_list or min(args.node_list) < 1:
            ap.error(f"--nodes must be a comma-separated list of replica counts >= 1, got {args.nodes!r}")
        if CONFIGS.get(args.fleet_config, Config("")).l3 != "kvdrive":
            ap.error(f"--fleet-config must be a kvdrive configuration, got {args.fleet_config!r}")
        if not 0 < args.shared_frac:
            ap.error(f"--shared-frac must be > 0, got {args.shared_frac}")
    for x in args.config_list:
        if x not in CONFIGS:
            ap.error(f"unknown configuration {x!r}; known: {', '.join(CONFIGS)}")
    args.workload_list = [x for x in args.workloads.split(",") if x]
    for x in args.workload_list:
        if x not in GENERATORS:
            ap.error(f"unknown workload {x!r}; known: {', '.join(GENERATORS)}")
    return args


def budgets_for(wl, args, small_page: int, small_encoded: float) -> dict:
    """The budgets every configuration gets, and how each configuration spends the host bytes."""
    max_req = max(len(r.prompt) + len(r.output) for r in wl.requests)
    gpu = max(int(args.gpu_frac * wl.footprint_pages), max_req + 16)
    host_pages = int(args.host_frac * wl.footprint_pages)
    host_bytes = host_pages * small_page
    kv_l2 = int(args.kvdrive_l2_gpu_ratio * gpu)
    out = {
        "gpu_pages": gpu,
        "max_request_pages": max_req,
        "host_bytes_here": host_bytes,
        "host_pages_uncompressed": host_pages,
        "hicache_l2_pages": host_pages,
        "kvdrive_l2_pages": kv_l2,
        "kvdrive_dram_bytes_here": host_bytes - kv_l2 * small_page,
        "kvdrive_dram_pages_est": int((host_bytes - kv_l2 * small_page) / small_encoded),
        "disk_bytes_here": max(1 << 20, int(args.disk_frac * wl.footprint_pages * small_page)),
    }
    if host_pages <= kv_l2:
        raise ReplayError(
            f"{wl.name}: the host budget ({host_pages} pages) leaves kvdrive nothing beyond SGLang's "
            f"host pool ({args.kvdrive_l2_gpu_ratio:g} x {gpu} GPU pages); raise --host-frac or lower "
            "--gpu-frac or --kvdrive-l2-gpu-ratio"
        )
    return out


def config_budgets(cfg: Config, b: dict) -> dict:
    out = {"gpu_pages": b["gpu_pages"], "max_request_pages": b["max_request_pages"]}
    if cfg.l2:
        out["l2_pages"] = b["kvdrive_l2_pages"] if cfg.l3 == "kvdrive" else b["hicache_l2_pages"]
    if cfg.l3 == "kvdrive":
        out["host_bytes"] = b["kvdrive_dram_bytes_here"]
    if cfg.l3:
        out["disk_bytes"] = b["disk_bytes_here"]
    return out


# --- resume -------------------------------------------------------------------------------------------------------


def fingerprint(args) -> dict:
    skip = {"out", "resume", "no_plots", "dir", "configs", "workloads", "config_list", "workload_list", "jobs"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip}


class Checkpoints:
    """One JSON file per finished (workload, configuration) and one for the calibration, in <out>.partial/."""

    def __init__(self, out: str, args, resume: bool):
        self.dir = out + ".partial"
        fp = fingerprint(args)
        fp_path = os.path.join(self.dir, "fingerprint.json")
        if resume and os.path.exists(fp_path):
            with open(fp_path) as f:
                old = json.load(f)
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise SystemExit(
                    f"--resume: {self.dir} was made with other settings ({', '.join(diff)}); run "
                    "without --resume to start over"
                )
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, exist_ok=True)
        with open(fp_path, "w") as f:
            json.dump(fp, f, indent=1)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name + ".json")

    def load(self, name: str):
        try:
            with open(self._path(name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def save(self, name: str, obj) -> None:
        self.write(self.dir, name, obj)

    @staticmethod
    def write(directory: str, name: str, obj) -> None:
        path = os.path.join(directory, name + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, default=float)
        os.replace(path + ".tmp", path)

    def done(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --- report -------------------------------------------------------------------------------------------------------


def gb(x) -> str:
    return f"{x / 1e9:,.1f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if b else "-"


def throughput_lines(report) -> list:
    """Issue 18's target, per workload: kvdrive_promoter's throughput at saturation (queued model, disk contention
    included) >= 1.2x hicache_host's, at this run's decode cores."""
    out = []
    cores = report["assumptions"].get("decode_cores", 1)
    for name, w in report["workloads"].items():
        c = w["configs"]
        if (
            "kvdrive_promoter" not in c
            or "hicache_host" not in c
            or "throughput_saturation_rps" not in c["hicache_host"]
        ):
            continue
        a, b = c["kvdrive_promoter"], c["hicache_host"]
        x = a["throughput_saturation_rps"] / b["throughput_saturation_rps"] if b["throughput_saturation_rps"] else 0.0
        old = a["throughput_rps"] / b["throughput_rps"] if b["throughput_rps"] else 0.0
        out.append(
            f"{name}: kvdrive_promoter throughput at saturation {a['throughput_saturation_rps']:.3f} vs hicache_host "
            f"{b['throughput_saturation_rps']:.3f} req/s = {x:.2f}x with decode on {cores} core(s) (target >= 1.2x): "
            f"{'met' if x >= 1.2 else 'NOT met'} (no-queue model: {old:.2f}x)"
        )
    return out


def target_lines(report) -> list:
    """The issue's targets on long-document reuse, checked against this run (not tuned for)."""
    w = report["workloads"].get("docs")
    if not w:
        return ["(no docs workload in this run)"] + throughput_lines(report)
    c = w["configs"]
    out = []
    for k in ("kvdrive_lru", "kvdrive_promoter"):
        if k not in c:
            continue
        r = c[k]
        for label, base, need in (("vs radix_only", "radix_only", 1.5), ("vs hicache_file", "hicache_file", 1.0)):
            if base in c and c[base]["prefill_tokens_saved"]:
                x = r["prefill_tokens_saved"] / c[base]["prefill_tokens_saved"]
                out.append(
                    f"{k}: prefill tokens saved {label} {x:.2f}x (target >= {need}x): "
                    f"{'met' if x >= need else 'NOT met'}"
                )
    if "kvdrive_promoter" in c and "kvdrive_lru" in c:
        a, b = c["kvdrive_promoter"]["bytes"]["disk"]["read"], c["kvdrive_lru"]["bytes"]["disk"]["read"]
        out.append(
            f"kvdrive_promoter reads {gb(a)} GB from disk vs kvdrive_lru {gb(b)} GB (target: fewer): "
            f"{'met' if a < b else 'NOT met'}"
        )
    return out + throughput_lines(report)


def recomputed_hits(r: dict) -> int:
    """Storage hits the promoter chose to recompute (reloading them would have been slower)."""
    return r["hit_tokens_dram_found"] + r["hit_tokens_disk_found"] - r["hit_tokens_dram"] - r["hit_tokens_disk"]


def queued(r: dict, fmt: str) -> str:
    """A figure the replay added later (the queueing model, issue 18; the selective write-down's counts), or "-" in
    results from before it (--render of an old JSON) and for configurations without it."""
    try:
        return fmt.format(**r)
    except KeyError:
        return "-"


ROWS = [
    ("prefill tokens saved", lambda r, c: f"{r['prefill_tokens_saved']:,}"),
    ("  saved % of prompt tokens", lambda r, c: f"{r['saved_pct']:.1f}%"),
    (
        "  vs radix_only",
        lambda r, c: ratio(r["prefill_tokens_saved"], c.get("radix_only", {}).get("prefill_tokens_saved", 0)),
    ),
    (
        "  vs hicache_file",
        lambda r, c: ratio(r["prefill_tokens_saved"], c.get("hicache_file", {}).get("prefill_tokens_saved", 0)),
    ),
    ("hit tokens: GPU", lambda r, c: f"{r['hit_tokens_gpu']:,}"),
    ("hit tokens: host pool", lambda r, c: f"{r['hit_tokens_host']:,}"),
    ("hit tokens: kvdrive DRAM (compressed)", lambda r, c: f"{r['hit_tokens_dram']:,}"),
    ("hit tokens: disk", lambda r, c: f"{r['hit_tokens_disk']:,}"),
    ("storage hits found but recomputed (tokens)", lambda r, c: f"{recomputed_hits(r):,}"),
    (
        "host pool GB read / written",
        lambda r, c: f"{gb(r['bytes']['host']['read'])} / {gb(r['bytes']['host']['written'])}",
    ),
    (
        "kvdrive DRAM GB read / written",
        lambda r, c: f"{gb(r['bytes']['dram']['read'])} / {gb(r['bytes']['dram']['written'])}",
    ),
    ("disk GB read / written", lambda r, c: f"{gb(r['bytes']['disk']['read'])} / {gb(r['bytes']['disk']['written'])}"),
    ("disk usage at end, GB", lambda r, c: gb(r["disk_bytes_at_end"])),
    (
        "pages kept off the disk when stored / of them written on spare bandwidth / dropped",
        lambda r, c: queued(r, "{pages_not_admitted:,} / {not_admitted_spilled:,} / {not_admitted_dropped:,}"),
    ),
    ("TTFT p50 / p99, queued (s)", lambda r, c: queued(r, "{queued_ttft_p50_s:.3f} / {queued_ttft_p99_s:.3f}")),
    ("  of which waiting for the GPU, p50 / p99 (s)", lambda r, c: queued(r, "{wait_p50_s:.3f} / {wait_p99_s:.3f}")),
    ("  GPU busy at the trace's arrivals", lambda r, c: queued(r, "{gpu_busy_pct:.0f}%")),
    (
        "  disk reads slowed by writes: requests / seconds added",
        lambda r, c: queued(r, "{disk_reads_slowed:,} / {disk_contention_s:,.1f}"),
    ),
    (
        "throughput at saturation, with disk contention (req/s)",
        lambda r, c: queued(r, "{throughput_saturation_rps:.3f}"),
    ),
    ("TTFT p50 / p99, no queue — earlier model (s)", lambda r, c: f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f}"),
    ("throughput, no queue or contention — earlier model (req/s)", lambda r, c: f"{r['throughput_rps']:.3f}"),
    ("requests slower than no cache", lambda r, c: f"{r['requests_slower_than_no_cache']:,}"),
    ("replay wall time (s)", lambda r, c: f"{r['wall_s']:.1f}"),
]


def markdown(report: dict) -> str:
    m, a, mach = report["measured"], report["assumptions"], report["machine"]
    pt = report["page_tokens"]
    lines = [
        f"# Trace replay (CPU): radix-only vs HiCache vs kvdrive — preset `{report['preset']}`",
        "",
        f"`{report['command']}` — {mach['cpu']}, {mach['cores']} cores, {mach['platform']}; sglang "
        f"{mach['sglang']}, torch {mach['torch']}, python {mach['python']}; git {mach['git']}; {mach['date']}; "
        f"total {report['total_wall_s']:.0f} s" + (" (resumed)" if report.get("resumed") else "") + ".",
        "",
        f"GPU: SGLang's real `RadixCache` (CPU, real pools, one tree token per {pt}-token page"
        + (
            ""
            if pt == 64
            else " — coarser than SGLang's 64 to fit the run's length: every part of the trace is "
            "rounded up to whole pages"
        )
        + "). Host: a real "
        "`MHATokenToKVPoolHost` with HiCache's write-through policy modelled page by page. L3: SGLang's "
        "`HiCacheFile` (real files) or kvdrive's `TierEngine` (real zstd, LMDB, segment files), temp dirs. "
        "4 KiB synthetic bf16 pages stand in for the modelled pages; bytes are scaled to the modelled page "
        f"({a['bytes_per_token'] * pt / MiB:.0f} MiB). **Attention mass is synthetic.**"
        + (
            f" kvdrive's disk writer is awaited every {report['args'].get('flush_every')} requests."
            if report["args"].get("flush_every", 1) > 1
            else ""
        ),
        "",
        "Method (bench/cost_model.py, bench/replay/queueing.py): a request's service time is its reloads (per tier "
        "used: latency + bytes / tier GB/s + bytes / PCIe GB/s) plus the prefill of the rest. **Queued** figures: "
        "requests arrive at their trace times at one GPU that serves them first come first served (TTFT = wait + "
        "reload + prefill; reloads occupy the GPU's turn, decode is not modelled), and a request's disk read shares "
        "the disk device with the tier's background work — the bytes the write-down wrote and the prefetch read, "
        "queued as device time when issued and draining at the device's measured rate; while any is pending a read "
        f"gets at most {1 - a.get('disk_write_share', 0.5):.0%} of the device's read bandwidth. Throughput at "
        "saturation = requests / sum of service times (with the contention met at the trace's pacing). **No "
        "queue** figures are the earlier results' model, kept for continuity: TTFT = service time without the "
        "wait or the contention, throughput = requests / sum of those. Decode: kvdrive's DRAM and disk tier read "
        f"GB/s are measured on one core and scaled to **{a.get('decode_cores', 1)} core(s)** "
        f"({a.get('decode_note', 'not scaled')}; this machine has {a.get('usable_cores_here', '?')}): x "
        "(1 + (k - 1) x (two-thread speedup - 1)), k = min(cores, 64-token pages in flight), the disk tier within "
        "the device's read GB/s; the promoter's reload-vs-recompute choice and prefetch budget use the same "
        "scaled figures. Not modelled: CPU contention between encode, decode and the server, the page cache.",
        "",
        "## Cost model",
        "",
        "| constant | value | source |",
        "|---|---:|---|",
        f"| prefill tokens/s | {a['prefill_tokens_per_s']:,.0f} | assumption: {a['prefill_note']} |",
        f"| PCIe GB/s | {a['pcie_gbps']:g} | assumption: {a['pcie_note']} |",
        f"| KV bytes per token | {a['bytes_per_token']:,} | assumption: {a['model']} |",
        f"| kvdrive DRAM read GB/s (zstd decode) | {m['dram_read_gbps']:.2f} | measured (runs "
        f"{', '.join(f'{x:.2f}' for x in m['runs']['dram_read_gbps'])}) |",
        f"| kvdrive disk read GB/s (cold) | {m['disk_read_gbps']:.2f} | measured (runs "
        f"{', '.join(f'{x:.2f}' for x in m['runs']['disk_read_gbps'])}) |",
        f"| kvdrive disk latency | {m['disk_latency_s'] * 1e6:.0f} µs | measured |",
        f"| kvdrive disk write GB/s | {m['disk_write_gbps']:.2f} | measured (off the TTFT path) |",
        f"| zstd ratio | {m['zstd_ratio']:.3f} | measured |",
        f"| HiCacheFile read GB/s (cold) | {m['file_read_gbps']:.2f} | measured (runs "
        f"{', '.join(f'{x:.2f}' for x in m['runs']['file_read_gbps'])}) |",
        f"| HiCacheFile latency | {m['file_latency_s'] * 1e6:.0f} µs | measured |",
        f"| HiCacheFile write GB/s | {m['file_write_gbps']:.2f} | measured (off the TTFT path) |",
    ]
    if "device_read_gbps" in m:
        cm = report["cost_model"]
        cost = CostModel(**cm)
        lines += [
            f"| disk device read / write GB/s | {m['device_read_gbps']:.2f} / {m['device_write_gbps']:.2f} | "
            f"measured (raw file, page cache dropped; runs read "
            f"{', '.join(f'{x:.2f}' for x in m['runs']['device_read_gbps'])}) |",
            f"| decode cores | {cm['decode_cores']} | assumption ({a['decode_note']}; two-thread speedup "
            f"{cm['decode_speedup_2t']:g}) |",
            f"| kvdrive DRAM / disk read GB/s on {cm['decode_cores']} core(s) | {cost.dram_rate_gbps():.2f} / "
            f"{cost.disk_rate_gbps():.2f} | scaled (what the promoter plans with) |",
        ]
    if m.get("taken_from"):
        lines += [
            "",
            f"The measured constants are those of `{m['taken_from']}` (--measured-from), not measured again in "
            "this run: runs compared with each other use the same constants.",
        ]
    lines += [
        "",
        "## Targets (long-document reuse, equal GPU budget; reported, not tuned for)",
        "",
    ]
    lines += [f"- {x}" for x in target_lines(report)]
    for name, w in report["workloads"].items():
        b = w["budgets"]
        scale = a["bytes_per_token"] * pt / report["small_page_bytes"]
        lines += [
            "",
            f"## {name}",
            "",
            "workload: "
            + ", ".join(f"{k} {v}" for k, v in w["params"].items())
            + f"; {w['footprint_pages'] * pt:,} distinct tokens "
            f"({w['footprint_pages'] / b['host_pages_uncompressed']:.1f}x the host budget); trace "
            f"{w['trace_digest']}.",
            "",
            f"budgets: GPU {b['gpu_pages'] * pt:,} tokens; host {gb(b['host_bytes_here'] * scale)} GB "
            f"({b['host_pages_uncompressed'] * pt:,} tokens uncompressed) — HiCache: all in its host "
            f"pool; kvdrive: host pool {b['kvdrive_l2_pages'] * pt:,} tokens + compressed DRAM pool "
            f"{gb(b['kvdrive_dram_bytes_here'] * scale)} GB (~{b['kvdrive_dram_pages_est'] * pt:,} "
            f"tokens); disk cap {gb(b['disk_bytes_here'] * scale)} GB for HiCacheFile and kvdrive alike.",
            "",
            f"no cache: TTFT p50 {w['nocache']['ttft_p50_s']:.3f} s, p99 {w['nocache']['ttft_p99_s']:.3f} s, "
            f"{w['nocache']['throughput_rps']:.3f} req/s.",
            "",
        ]
        cs = list(w["configs"])
        lines.append("| | " + " | ".join(cs) + " |")
        lines.append("|---|" + "---:|" * len(cs))
        for label, f in ROWS:
            lines.append(f"| {label} | " + " | ".join(f(w["configs"][k], w["configs"]) for k in cs) + " |")
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in report["plots"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plots(report: dict, out: str) -> list:
    """PNG plots next to the results; an empty list (and one line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')", flush=True)
        return []
    ws = list(report["workloads"])
    made = []
    colors = {"gpu": "#4c72b0", "host": "#55a868", "dram": "#c44e52", "disk": "#8172b2"}

    fig, axes = plt.subplots(2, len(ws), figsize=(6 * len(ws), 7), squeeze=False)
    for j, name in enumerate(ws):
        c = report["workloads"][name]["configs"]
        ks = list(c)
        x = range(len(ks))
        axes[0][j].bar([i - 0.2 for i in x], [c[k]["throughput_saturation_rps"] for k in ks], width=0.4, label="sat.")
        axes[0][j].bar([i + 0.2 for i in x], [c[k]["throughput_rps"] for k in ks], width=0.4, label="no queue")
        axes[0][j].set_title(f"{name}: modelled throughput (req/s)")
        axes[0][j].legend(fontsize=7)
        for off, key, label in (
            (-0.3, "queued_ttft_p50_s", "p50 queued"),
            (-0.1, "queued_ttft_p99_s", "p99 queued"),
            (0.1, "ttft_p50_s", "p50 no queue"),
            (0.3, "ttft_p99_s", "p99 no queue"),
        ):
            axes[1][j].bar([i + off for i in x], [c[k][key] for k in ks], width=0.2, label=label)
        axes[1][j].set_yscale("log")
        axes[1][j].set_title(f"{name}: modelled TTFT (s)")
        axes[1][j].legend()
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(list(x))
            ax.set_xticklabels(ks, rotation=20, fontsize=8)
    fig.tight_layout()
    made.append(out + "-throughput-ttft.png")
    fig.savefig(made[-1], dpi=90)
    plt.close(fig)

    ncfg = max(len(report["workloads"][n]["configs"]) for n in ws)
    fig, axes = plt.subplots(len(ws), ncfg, figsize=(3.2 * ncfg, 2.8 * len(ws)), squeeze=False, sharey=True)
    for i, name in enumerate(ws):
        c = report["workloads"][name]["configs"]
        for j, k in enumerate(c):
            tl = c[k]["timeline"]
            t = [x / 3600 for x in tl["t_end_s"]]
            axes[i][j].stackplot(t, *[tl[tier] for tier in colors], labels=list(colors), colors=list(colors.values()))
            axes[i][j].set_title(f"{name}: {k}", fontsize=9)
            axes[i][j].set_ylim(0, 1)
            axes[i][j].set_xlabel("trace time (h)", fontsize=8)
        axes[i][0].set_ylabel("share of prompt tokens hit")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    made.append(out + "-hits-over-time.png")
    fig.savefig(made[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ws), figsize=(6 * len(ws), 4), squeeze=False)
    for j, name in enumerate(ws):
        c = report["workloads"][name]["configs"]
        ks = list(c)
        width = 0.13
        series = [(t, d) for t in ("host", "dram", "disk") for d in ("read", "written")]
        for s, (t, d) in enumerate(series):
            axes[0][j].bar(
                [i + (s - 2.5) * width for i in range(len(ks))],
                [c[k]["bytes"][t][d] / 1e12 for k in ks],
                width=width,
                label=f"{t} {d}",
                color=colors[t],
                alpha=1.0 if d == "read" else 0.5,
            )
        axes[0][j].set_xticks(range(len(ks)))
        axes[0][j].set_xticklabels(ks, rotation=20, fontsize=8)
        axes[0][j].set_title(f"{name}: bytes moved per tier (TB, modelled pages)")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    made.append(out + "-bytes.png")
    fig.savefig(made[-1], dpi=90)
    plt.close(fig)
    return made


NOTES = [
    "HiCache is modelled page by page, not run: SGLang's HiRadixCache needs a scheduler, a torch.distributed group "
    "and its transfer threads. The policy is its default write_through (bench/replay/tiers.py says exactly what is "
    "modelled); the host pool and the file backend are SGLang's own objects and calls.",
    "What each hierarchy hits does not depend on the modelled times: writes and storage prefetches complete before "
    "the next request (no prefetch timeout); the queued figures then place the requests and the disk's writes on "
    "one timeline (bench/replay/queueing.py), so contention slows reads but never turns a hit into a miss.",
    "kvdrive configurations sit behind SGLang's host pool as the real deployment does (--kv-tier kvdrive): L3 pages "
    "land in the host pool, then go to the GPU. Their host pool evicts LRU here; the real kvdrive radix cache orders "
    "host-pool victims by the promoter's value too (every rank alike).",
    "The promoter's reload-vs-recompute plan and its prefetch use the same constants as the TTFT model, scaled over "
    "the decode cores as it is.",
    "kvdrive_promoter promotes ahead of demand as the server does (KvdriveStorage.promote_tick): of the pages that "
    "left the host pool and sit only on disk, the most valuable come back up into kvdrive's DRAM tier "
    "(TierEngine.promote), within --prefetch-share of the measured disk bandwidth over the replay time since the "
    "last tick (>= --prefetch-tick-s).",
    "Within one (workload, configuration) replay there is no checkpoint (the radix tree and the stores are live "
    "objects); --resume skips the pairs already finished.",
]


_WORKLOADS: dict = {}


def workload(args, name: str):
    """The trace (generated once per process: it is deterministic in args and seed)."""
    if name not in _WORKLOADS:
        _WORKLOADS[name] = GENERATORS[name](args, args.seed)
    return _WORKLOADS[name]


def run_pair(args, wname: str, cname: str, cost: CostModel, small_encoded: float, tmp: str, ck_dir: str) -> dict:
    """Replay one (workload, configuration) and save its result for --resume (also in a worker process)."""
    wl = workload(args, wname)
    synth = SyntheticPages(99)
    b = budgets_for(wl, args, synth.nbytes, small_encoded)
    cfg = config_for(cname, args.page_tokens)
    scratch = os.path.join(tmp, wname)
    os.makedirs(scratch, exist_ok=True)
    res = Replay(cfg, wl, config_budgets(cfg, b), cost, args, scratch, synth).run(
        Progress(f"  {wname}/{cname}", len(wl.requests))
    )
    Checkpoints.write(ck_dir, f"{wname}__{cname}", res)
    return res


def print_result(wname: str, cname: str, res: dict) -> None:
    print(
        f"  {wname}/{cname:17s} saved {res['saved_pct']:5.1f}%  TTFT queued p50 {res['queued_ttft_p50_s']:.3f} s "
        f"p99 {res['queued_ttft_p99_s']:.3f} s (no queue {res['ttft_p50_s']:.3f} / {res['ttft_p99_s']:.3f})  "
        f"{res['throughput_saturation_rps']:.3f} req/s  disk rd "
        f"{res['bytes']['disk']['read'] / 1e9:,.0f} GB wr {res['bytes']['disk']['written'] / 1e9:,.0f} GB  "
        f"({res['wall_s']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


MEASURED_KEYS = ("dram_read_gbps", "disk_read_gbps", "disk_latency_s", "file_read_gbps", "file_latency_s")


def measured_from(path: str) -> dict:
    """The measured constants of an earlier results JSON (--measured-from), with the file they came from."""
    try:
        with open(path) as f:
            meas = json.load(f)["measured"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReplayError(f"--measured-from {path!r}: no measured constants there ({e})") from None
    missing = [k for k in (*MEASURED_KEYS, "zstd_ratio", "device_read_gbps", "device_write_gbps") if k not in meas]
    if missing:
        raise ReplayError(f"--measured-from {path!r}: lacks {', '.join(missing)} (made before issue 18?)")
    return {**meas, "taken_from": os.path.relpath(os.path.abspath(path), REPO)}


def render(path: str, with_plots: bool) -> int:
    """Markdown and plots again from a results JSON (e.g. after a change to the report's layout)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"replay_bench: cannot read results {path!r}: {e}", file=sys.stderr)
        return 2
    out = path[:-5] if path.endswith(".json") else path
    report["plots"] = [os.path.basename(p) for p in plots(report, out)] if with_plots else report.get("plots", [])
    with open(out + ".md", "w") as f:
        f.write(markdown(report))
    print(f"wrote {out}.md" + "".join(", " + p for p in report["plots"]), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args.render, not args.no_plots)
    if args.node_list:
        return fleet_main(args, argv)
    out = args.out or os.path.join(REPO, "bench", "results", f"replay_bench-{args.preset}")
    guard_results(out + ".json", REPO, args.allow_dirty)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    ck = Checkpoints(out, args, args.resume)
    t_start = time.perf_counter()
    tmp = args.dir or tempfile.mkdtemp(prefix="kvdrive-replay-bench-")
    os.makedirs(tmp, exist_ok=True)
    resumed = False
    try:
        meas = ck.load("calibration")
        if meas is not None:
            resumed = True
        elif args.measured_from:
            meas = measured_from(args.measured_from)
            ck.save("calibration", meas)
        else:
            print("calibrating (TierEngine and HiCacheFile, 256 KiB bf16 pages) ...", file=sys.stderr, flush=True)
            meas = calibrate(tmp, args.calib_pages, args.calib_reps)
            f = calibrate_file(tmp, args.calib_pages, args.calib_reps)
            meas.update({k: v for k, v in f.items() if k != "runs"})
            meas["runs"].update(f["runs"])
            d = calibrate_device(tmp, max(8 * MiB, 2 * args.calib_pages * meas["page_bytes"]), args.calib_reps)
            meas.update({k: v for k, v in d.items() if k != "runs"})
            meas["runs"].update(d["runs"])
            ck.save("calibration", meas)
        print(
            f"  kvdrive DRAM read {meas['dram_read_gbps']:.2f} GB/s, disk read {meas['disk_read_gbps']:.2f} GB/s "
            f"(+{meas['disk_latency_s'] * 1e6:.0f} us), HiCacheFile read {meas['file_read_gbps']:.2f} GB/s "
            f"(+{meas['file_latency_s'] * 1e6:.0f} us), zstd {meas['zstd_ratio']:.3f}x, device read "
            f"{meas['device_read_gbps']:.2f} GB/s write {meas['device_write_gbps']:.2f} GB/s (measured); prefill "
            f"{args.prefill_tps:,.0f} tok/s, PCIe {args.pcie_gbps:g} GB/s, {args.bytes_per_token:,} KV bytes/token "
            "(assumed)",
            file=sys.stderr,
            flush=True,
        )
        cost = CostModel(
            prefill_tokens_per_s=args.prefill_tps,
            pcie_gbps=args.pcie_gbps,
            bytes_per_token=args.bytes_per_token,
            dram_gbps=meas["dram_read_gbps"],
            disk_gbps=meas["disk_read_gbps"],
            disk_latency_s=meas["disk_latency_s"],
            file_gbps=meas["file_read_gbps"],
            file_latency_s=meas["file_latency_s"],
            zstd_ratio=meas["zstd_ratio"],
            page_tokens=args.page_tokens,
            decode_cores=args.decode_cores,
            decode_speedup_2t=args.decode_speedup_2t,
            device_read_gbps=meas["device_read_gbps"],
            device_write_gbps=meas["device_write_gbps"],
        )
        synth = SyntheticPages(99)
        ns = Namespace(model="probe", kv_dtype="bfloat16", layout="mha", num_layers=1, **SMALL_SHAPE)
        with TierEngine(TierConfig(path=None, host_bytes=64 * MiB)) as e:
            e.put_many(ns, [f"p{i}" for i in range(N_POOL_PAGES)], synth.numpy)
            small_encoded = e.stats().dram.used_bytes / N_POOL_PAGES
        report = {
            "command": "python "
            + " ".join(
                shlex.quote(x)
                for x in [os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else list(argv))
            ),
            "preset": args.preset,
            "machine": machine(REPO),
            "small_page_bytes": synth.nbytes,
            "page_tokens": args.page_tokens,
            "small_page_encoded_bytes": small_encoded,
            "assumptions": {
                "prefill_tokens_per_s": args.prefill_tps,
                "prefill_note": "8B model on one H100, long prompts; no recorded GPU run in "
                "bench/results to take it from",
                "pcie_gbps": args.pcie_gbps,
                "pcie_note": "PCIe 4.0 x16, effective; no recorded GPU run",
                "bytes_per_token": args.bytes_per_token,
                "model": "Llama-3.1-8B-class, bf16 KV (32 layers x 8 KV heads x 128 dim x K,V x 2 B)",
                "decode_cores": args.decode_cores,
                "usable_cores_here": len(os.sched_getaffinity(0)),
                "decode_speedup_2t": args.decode_speedup_2t,
                "decode_note": "linear scaling (assumed)"
                if args.decode_speedup_2t == 2.0
                else "extrapolated from the two-thread speedup given",
                "disk_write_share": args.disk_write_share,
            },
            "cost_model": dataclasses.asdict(cost),
            "measured": meas,
            "args": fingerprint(args),
            "workloads": {},
            "notes": NOTES,
        }
        pending = []
        for wname in args.workload_list:
            wl = workload(args, wname)
            b = budgets_for(wl, args, synth.nbytes, small_encoded)
            nc = [cost.prefill_s(len(r.prompt)) for r in wl.requests]
            report["workloads"][wname] = {
                "params": wl.params,
                "footprint_pages": wl.footprint_pages,
                "budgets": b,
                "trace_digest": trace_digest(wl.requests),
                "nocache": {
                    "ttft_p50_s": percentile(nc, 50),
                    "ttft_p99_s": percentile(nc, 99),
                    "throughput_rps": len(nc) / sum(nc),
                },
                "configs": {},
            }
            print(
                f"[{wname}] {len(wl.requests):,} requests, {wl.footprint_pages * args.page_tokens:,} distinct "
                f"tokens ({wl.footprint_pages / b['host_pages_uncompressed']:.1f}x the host budget); GPU "
                f"{b['gpu_pages']:,} pages, host {b['host_pages_uncompressed']:,} pages, disk cap "
                f"{b['disk_bytes_here'] / MiB:.0f} MiB here ({args.page_tokens}-token pages)",
                file=sys.stderr,
                flush=True,
            )
            for cname in args.config_list:
                res = ck.load(f"{wname}__{cname}") if args.resume else None
                if res is not None:
                    resumed = True
                    report["workloads"][wname]["configs"][cname] = res
                    print(f"  {wname}/{cname:17s} (resumed)", file=sys.stderr, flush=True)
                else:
                    pending.append((wname, cname))
        done = {}
        # with workers, longest first (a rough cost per request of each configuration, measured here), so that they
        # finish together
        weight = {
            "radix_only": 0.1,
            "hicache_host": 0.3,
            "hicache_file": 1.0,
            "kvdrive_lru": 1.0,
            "kvdrive_promoter": 1.6,
        }
        if args.jobs > 1 and len(pending) > 1:
            pending.sort(key=lambda p: -weight[p[1]] * len(workload(args, p[0]).requests))
            import multiprocessing as mp

            # workers ignore Ctrl-C: the parent catches it and terminates them (their pairs are not saved)
            pool = mp.get_context("fork").Pool(
                min(args.jobs, len(pending)), initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
            )
            try:
                running = {p: pool.apply_async(run_pair, (args, *p, cost, small_encoded, tmp, ck.dir)) for p in pending}
                while running:
                    for p in [p for p, r in running.items() if r.ready()]:
                        done[p] = running.pop(p).get()
                        print_result(*p, done[p])
                    time.sleep(0.2)
                pool.close()
            finally:
                pool.terminate()
                pool.join()
        else:
            for wn, cn in pending:
                done[(wn, cn)] = run_pair(args, wn, cn, cost, small_encoded, tmp, ck.dir)
                print_result(wn, cn, done[(wn, cn)])
        for wname in args.workload_list:  # configurations in the order asked for
            cs = report["workloads"][wname]["configs"]
            for cname in args.config_list:
                if (wname, cname) in done:
                    cs[cname] = done[(wname, cname)]
            report["workloads"][wname]["configs"] = {c: cs[c] for c in args.config_list}
        report["total_wall_s"] = time.perf_counter() - t_start
        report["resumed"] = resumed
        report["targets"] = target_lines(report)
        report["plots"] = [] if args.no_plots else [os.path.basename(p) for p in plots(report, out)]  # beside .md
        md = markdown(report)
        with open(out + ".json", "w") as f:
            json.dump(report, f, indent=1, default=float)
        with open(out + ".md", "w") as f:
            f.write(md)
        print(md)
        print(f"wrote {out}.json, {out}.md" + "".join(", " + p for p in report["plots"]), file=sys.stderr)
        ck.done()
    except ReplayError as e:
        print(f"replay_bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nreplay_bench: interrupted; finished (workload, configuration) results are kept in {ck.dir}: run "
            "the same command with --resume to go on",
            file=sys.stderr,
        )
        return 130
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def fleet_main(args, argv) -> int:
    """--nodes: the trace round-robin over N replicas, with and without the shared tier (bench/replay/fleet.py)."""
    from replay.fleet import FleetCost, fleet_markdown, run_fleet

    out = args.out or os.path.join(REPO, "bench", "results", f"remote-replay-{args.preset}")
    guard_results(out + ".json", REPO, args.allow_dirty)
    tmp = args.dir or tempfile.mkdtemp(prefix="kvdrive-fleet-bench-")
    os.makedirs(tmp, exist_ok=True)
    try:
        print("calibrating (TierEngine, 256 KiB bf16 pages) ...", file=sys.stderr, flush=True)
        meas = calibrate(tmp, args.calib_pages, args.calib_reps)
        cost = FleetCost(
            prefill_tokens_per_s=args.prefill_tps,
            pcie_gbps=args.pcie_gbps,
            bytes_per_token=args.bytes_per_token,
            dram_gbps=meas["dram_read_gbps"],
            disk_gbps=meas["disk_read_gbps"],
            disk_latency_s=meas["disk_latency_s"],
            zstd_ratio=meas["zstd_ratio"],
            page_tokens=args.page_tokens,
            remote_gbps=args.remote_gbps,
            remote_latency_s=args.remote_latency_s,
            decode_cores=args.decode_cores,
            decode_speedup_2t=args.decode_speedup_2t,
        )
        synth = SyntheticPages(99)
        ns = Namespace(model="probe", kv_dtype="bfloat16", layout="mha", num_layers=1, **SMALL_SHAPE)
        with TierEngine(TierConfig(path=None, host_bytes=64 * MiB)) as e:
            e.put_many(ns, [f"p{i}" for i in range(N_POOL_PAGES)], synth.numpy)
            small_encoded = e.stats().dram.used_bytes / N_POOL_PAGES
        cfg = config_for(args.fleet_config, args.page_tokens)
        report = {
            "command": "python "
            + " ".join(
                shlex.quote(x)
                for x in [os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else list(argv))
            ),
            "preset": args.preset,
            "machine": machine(REPO),
            "configuration": cfg.name,
            "shared_frac": args.shared_frac,
            "measured": meas,
            "args": fingerprint(args),
            "assumptions": {
                "prefill_tokens_per_s": args.prefill_tps,
                "pcie_gbps": args.pcie_gbps,
                "bytes_per_token": args.bytes_per_token,
                "remote_gbps": args.remote_gbps,
                "remote_latency_s": args.remote_latency_s,
                "remote_note": "batched Mooncake gets over loopback TCP measured here",
            },
            "workloads": {},
        }
        for wname in args.workload_list:
            wl = workload(args, wname)
            b = budgets_for(wl, args, synth.nbytes, small_encoded)
            shared_bytes = int(args.shared_frac * wl.footprint_pages * small_encoded)
            runs = []
            for n in args.node_list:
                for shared in (False, True):
                    label = f"  {wname} x{n} {'shared' if shared else 'local only'}"
                    res = run_fleet(
                        cfg,
                        wl,
                        config_budgets(cfg, b),
                        cost,
                        args,
                        os.path.join(tmp, wname),
                        synth,
                        n,
                        shared_bytes if shared else None,
                        Progress(label, len(wl.requests)),
                    )
                    runs.append(res)
                    print(
                        f"{label}: saved {res['saved_pct']:.1f}%, remote hit tokens {res['hit_tokens_remote']:,}, "
                        f"TTFT p50 {res['ttft_p50_s']:.3f} s ({res['wall_s']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            report["workloads"][wname] = {
                "requests": len(wl.requests),
                "trace_digest": trace_digest(wl.requests),
                "footprint_tokens": wl.footprint_pages * args.page_tokens,
                "budgets": b,
                "runs": runs,
            }
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".json", "w") as f:
            json.dump(report, f, indent=1, default=float)
        md = fleet_markdown(report)
        with open(out + ".md", "w") as f:
            f.write(md)
        print(md)
        print(f"wrote {out}.json, {out}.md", file=sys.stderr)
    except ReplayError as e:
        print(f"replay_bench: {e}", file=sys.stderr)
        return 2
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
