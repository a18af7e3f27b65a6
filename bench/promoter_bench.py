"""Trace-driven comparison of LRU and the attention-aware promoter over SGLang's radix tree and kvdrive's tiers (CPU).

    python bench/promoter_bench.py            # default sizes (< 3 minutes on 2 cores); writes bench/results/
    python bench/promoter_bench.py --quick    # seconds; writes files only with --out

The pieces are shared with bench/replay_bench.py: trace generators in bench/workloads.py, calibration and the TTFT
model in bench/cost_model.py, the replay (SGLang's radix tree over kvdrive's tiers) in bench/replay/. Here the
hierarchy has no SGLang host pool: pages go from the GPU tree straight to kvdrive.

Two generated, seeded workloads (same trace for every policy):
  docs      D documents of 8K-64K tokens with Zipf popularity; each request = one document + a short question,
            followed by a short answer. Poisson arrivals.
  sessions  S agent sessions sharing a system prompt; each turn appends a user/tool message (prompt = the whole
            history) and an answer; think time between turns; sessions overlap in time.

The hierarchy each trace is replayed through, at the same budgets for every policy:
  GPU tier  SGLang 0.5.17's own RadixCache (sglang.srt.mem_cache.radix_cache) on CPU, with real MHATokenToKVPool,
            TokenToKVPoolAllocator and ReqToTokenPool objects, driven through match_prefix / inc_lock_ref / evict /
            alloc / insert / dec_lock_ref as the scheduler does. It runs at page granularity: one tree token stands
            for one 64-token page (every workload boundary is page-aligned, so the tree has the same shape and the
            same evictions as a token-level tree with page_size 64, at 1/64 of the cost).
  DRAM+disk kvdrive's real TierEngine (compressed DRAM pool, write-through to the LMDB-indexed disk store in a temp
            dir) holding small synthetic bf16 pages (4 KiB each), one per modelled page; byte budgets are set so
            each tier holds the intended number of pages. The disk store runs with gc_live_ratio 0.9
            (--disk-gc-live-ratio): with its default of 0.5 it wedges in these replays (see the notes it prints).
  Cost      TTFT is modelled per request, without queueing: reload time of the hits taken from DRAM/disk (latency +
            bytes / tier GB/s + bytes / PCIe GB/s, stages in series, at the bytes of a real model's page) plus
            prefill of everything else at prefill tokens/s. DRAM and disk GB/s and disk latency are measured in the
            same run (TierEngine get_many on 256 KiB bf16 pages, zstd, disk reads with the page cache dropped);
            prefill tokens/s, PCIe GB/s and bytes per token are stated assumptions, printed with the result.

Policies (same tiers, same budgets):
  gpu_only   the radix tree alone (no kvdrive): context for what the tiers add.
  lru        kvdrive today: LRU in the tree, every new page written down (write-through), scores 0 (LRU in both
             tiers), every tier hit reloaded.
  promoter   tree eviction by promoter value (radix EvictionStrategy whose priority is Promoter.group_score of the
             node's pages); write-down only of admitted pages (reuse >= 2, or a conversation's continuation; at
             insert and, for pages that qualify later, when the tree evicts them); TierEngine.set_scores from
             Promoter.score_of(chain=True);
             reload-vs-recompute per hit prefix (Promoter.plan_prefix); background prefetch disk -> DRAM of the
             highest-value disk-only pages among those that left the GPU tree (Promoter.prefetch, then
             TierEngine.promote, as the server does with pages leaving SGLang's host pool), within a bandwidth budget.
  promoter_noattn   the same with no attention signal (reuse and recency only): what attention adds.
  promoter_lrutiers the promoter everywhere except the tiers' eviction order (no set_scores: DRAM and disk stay LRU):
                    what value-ordered eviction in DRAM and on disk adds.
  promoter_admitall the promoter with admit_min_reuse=1 (write everything): what selective admission costs/saves.
  (continuations, pages of a request that runs through an earlier request's last page, are admitted at once.)

Attention mass is SYNTHETIC (no model runs here): per request it sums to 1 over the context pages — docs: 20% on the
first two pages (attention sinks), 30% on the last 8 pages (local window), 30% on 4 "relevant" pages (70% of the
time from 8 fixed hot pages of that document), 20% uniform; sessions: 20% sinks, 30% local window, 30% on the
last two turns, 20% uniform. It is fed to the promoter after each request, as kvdrive's capture hands it over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench_common import add_allow_dirty, guard_results, machine  # noqa: E402
from cost_model import CostModel, calibrate, percentile  # noqa: E402
from replay import Config, Replay, ReplayError, SyntheticPages  # noqa: E402
from replay.tiers import N_POOL_PAGES, SMALL_SHAPE  # noqa: E402
from workloads import PAGE_TOKENS, Workload, docs_workload, sessions_workload  # noqa: E402

from kvdrive_sglang.tier.engine import TierConfig, TierEngine  # noqa: E402
from kvdrive_sglang.tier.namespace import Namespace  # noqa: E402
from kvdrive_sglang.tier.promoter import Promoter, PromoterConfig  # noqa: E402

MiB = 1 << 20
VARIANTS = {  # promoter_bench's hierarchy: no host pool (L2); pages go GPU -> kvdrive
    "gpu_only": Config("gpu_only"),
    "lru": Config("lru", l3="kvdrive"),
    "promoter": Config("promoter", l3="kvdrive", promoter=True),
    "promoter_noattn": Config("promoter_noattn", l3="kvdrive", promoter=True, attention=False),
    "promoter_lrutiers": Config("promoter_lrutiers", l3="kvdrive", promoter=True, tier_scores=False),
    "promoter_admitall": Config("promoter_admitall", l3="kvdrive", promoter=True, admit_min_reuse=1),
}
SENS_RATES = (3000, 6000, 12000, 24000, 48000)


def ttft_from_records(records, cost: CostModel, rate: float, use_plan: bool) -> dict:
    """TTFT and hits used at prefill ``rate`` from the per-request hits a replay recorded: every found hit reloaded
    (use_plan False: lru) or as Promoter.plan_prefix decides at that rate. Exact for replays whose cache contents do
    not depend on the rate (gpu_only, lru); for promoter replays of another rate it is a post-hoc estimate."""
    cost = dataclasses.replace(cost, prefill_tokens_per_s=float(rate))
    p = Promoter(
        PromoterConfig(
            dram_gbps=cost.dram_gbps,
            disk_gbps=cost.disk_gbps,
            disk_latency_s=cost.disk_latency_s,
            pcie_gbps=cost.pcie_gbps,
            prefill_tokens_per_s=float(rate),
        )
    )
    page_bytes = cost.page_bytes
    ttft, slower, used, recomputed = [], 0, Counter(), 0
    for n, g, tiers, _ in records:
        tl = ["disk" if ch == "d" else "dram" for ch in tiers]
        k = p.plan_prefix(tl, PAGE_TOKENS, page_bytes).reload_pages if use_plan else len(tl)
        t = cost.ttft_s(Counter(tl[:k]), n - g - k)
        ttft.append(t)
        slower += t > n * PAGE_TOKENS / rate * (1 + 1e-9)
        used.update(tl[:k])
        recomputed += n - g - k
    return {
        "ttft": ttft,
        "slower": slower,
        "used_dram": used["dram"],
        "used_disk": used["disk"],
        "recomputed_pages": recomputed,
    }


def rescore(res: dict, records, cost: CostModel, rate: float, use_plan: bool) -> dict:
    """A replay's summary with the rate-dependent figures evaluated at ``rate`` (see ttft_from_records)."""
    e = ttft_from_records(records, cost, rate, use_plan)
    out = dict(res)
    prompt_pages = res["prompt_tokens"] // PAGE_TOKENS
    out.update(
        {
            "prefill_tokens": e["recomputed_pages"] * PAGE_TOKENS,
            "prefill_tokens_saved": res["prompt_tokens"] - e["recomputed_pages"] * PAGE_TOKENS,
            "saved_pct": 100.0 * (1 - e["recomputed_pages"] / max(1, prompt_pages)),
            "hit_tokens_dram_used": e["used_dram"] * PAGE_TOKENS,
            "hit_tokens_disk_used": e["used_disk"] * PAGE_TOKENS,
            "ttft_p50_s": percentile(e["ttft"], 50),
            "ttft_p90_s": percentile(e["ttft"], 90),
            "ttft_p99_s": percentile(e["ttft"], 99),
            "ttft_mean_s": float(np.mean(e["ttft"])) if e["ttft"] else 0.0,
            "requests_slower_than_no_cache": e["slower"],
        }
    )
    return out


# --- driver ---------------------------------------------------------------------------------------------------------


def budgets_for(wl: Workload, args, small_encoded: float) -> dict:
    max_req = max(len(r.prompt) + len(r.output) for r in wl.requests)
    gpu = max(int(args.gpu_frac * wl.footprint_pages), max_req + 16)
    dram = int(args.dram_frac * wl.footprint_pages)
    disk = int(args.disk_frac * wl.footprint_pages)
    return {
        "gpu_pages": gpu,
        "dram_pages": dram,
        "disk_pages": disk,
        "max_request_pages": max_req,
        "host_bytes": max(1, int(dram * small_encoded)),
        "disk_bytes": max(1 << 20, int(disk * small_encoded)),
    }


ROWS = [  # (label, key, format)
    ("requests", "requests", "{:d}"),
    ("prompt tokens", "prompt_tokens", "{:,}"),
    ("prefill tokens saved", "prefill_tokens_saved", "{:,}"),
    ("  saved %", "saved_pct", "{:.1f}%"),
    ("hit tokens: GPU", "hit_tokens_gpu", "{:,}"),
    ("hit tokens: DRAM (reloaded / found)", ("hit_tokens_dram_used", "hit_tokens_dram_found"), "{:,} / {:,}"),
    ("hit tokens: disk (reloaded / found)", ("hit_tokens_disk_used", "hit_tokens_disk_found"), "{:,} / {:,}"),
    ("modelled TTFT p50 (s)", "ttft_p50_s", "{:.3f}"),
    ("modelled TTFT p99 (s)", "ttft_p99_s", "{:.3f}"),
    ("modelled TTFT mean (s)", "ttft_mean_s", "{:.3f}"),
    ("requests slower than no cache", "requests_slower_than_no_cache", "{:d}"),
    ("pages written down (DRAM+disk)", "pages_written_down", "{:,}"),
    ("pages not admitted", "pages_not_admitted", "{:,}"),
    ("disk written: pages / GB (model)", ("disk_pages_written", "disk_gb_written_model"), "{:,} / {:.1f}"),
    ("disk read: pages / GB (model)", ("disk_pages_read", "disk_gb_read_model"), "{:,} / {:.1f}"),
    (
        "  of which prefetch: pages / later reloaded from DRAM",
        ("prefetched_pages", "prefetched_pages_used"),
        "{:,} / {:,}",
    ),
    ("disk pages evicted", "disk_evicted_pages", "{:,}"),
    ("disk writes refused (store full)", "disk_writes_refused_full", "{:,}"),
    ("disk segments compacted", "disk_segments_compacted", "{:,}"),
    ("disk live bytes at end, % of cap", "disk_live_pct_of_cap_at_end", "{:.0f}%"),
    ("replay wall time (s)", "wall_s", "{:.1f}"),
]


def fmt_row(res: dict, key, f: str) -> str:
    if isinstance(key, tuple):
        if any(k not in res for k in key):
            return "-"
        return f.format(*[res[k] for k in key])
    if key not in res:
        return "-"
    return f.format(res[key])


PREFILL_NOTES = {
    12000: "8B model on one H100, long prompts (~25 GFLOP/token at 32K context incl. attention, ~30% of bf16 dense "
    "peak)",
    3000: "the same model on a GPU ~4x slower at prefill (A100/L40S-class), or a larger model",
}


def markdown(report: dict) -> str:
    a, m, mach = report["assumptions"], report["measured"], report["machine"]
    lines = [
        "# Promoter vs LRU: trace-driven replay (CPU)",
        "",
        f"`{report['command']}` — {mach['cpu']}, {mach['cores']} cores, {mach['platform']}; sglang {mach['sglang']}, "
        f"torch {mach['torch']}, python {mach['python']}; git {mach['git']}; {mach['date']}; "
        f"total {report['total_wall_s']:.0f} s.",
        "",
        "GPU tier: SGLang's real `RadixCache` (CPU, real pools, one tree token per 64-token page). DRAM and disk: "
        "kvdrive's real `TierEngine` (zstd, write-through, temp dir) with 4 KiB synthetic pages standing in for the "
        "modelled ones. TTFT is modelled per request without queueing. **Attention mass is synthetic** (see "
        "`bench/promoter_bench.py`).",
        "",
        "## Cost model",
        "",
        "| constant | value | source |",
        "|---|---:|---|",
        f"| KV bytes per token | {a['bytes_per_token']:,} ({a['bytes_per_token'] * PAGE_TOKENS / MiB:.0f} MiB a "
        f"64-token page) | assumption: {a['model']} |",
    ]
    for sc in report["scenarios"]:
        lines.append(
            f"| prefill tokens/s, scenario {sc['name']} | {sc['prefill_tokens_per_s']:,.0f} | assumption: "
            f"{sc['note']}; break-even tier speed {sc['break_even_gbps']:.2f} GB/s |"
        )
    lines += [
        f"| PCIe GB/s | {a['pcie_gbps']:g} | assumption: {a['pcie_note']} |",
        f"| DRAM tier read GB/s (decode into host buffer) | {m['dram_read_gbps']:.2f} | measured: TierEngine.get_many, "
        f"256 KiB bf16 pages, median of {m['reps']} "
        f"(runs: {', '.join(f'{x:.2f}' for x in m['runs']['dram_read_gbps'])}) |",
        f"| disk tier read GB/s (cold, checksum + decode) | {m['disk_read_gbps']:.2f} | measured, page cache dropped "
        f"(runs: {', '.join(f'{x:.2f}' for x in m['runs']['disk_read_gbps'])}) |",
        f"| disk latency | {m['disk_latency_s'] * 1e6:.0f} µs | measured: one-page read minus bytes / GB/s |",
        f"| disk tier write GB/s (encode + write + fsync) | {m['disk_write_gbps']:.2f} | measured (off the TTFT "
        f"path) |",
        f"| zstd ratio | {m['zstd_ratio']:.3f} | measured (disk GB below = pages x page bytes / ratio) |",
        "",
        "A tier pays off only where its end-to-end speed (tier read, then PCIe) beats bytes per token x prefill "
        f"tokens/s. Prefetch may use {a['prefetch_share']:.0%} of the measured disk read bandwidth between requests "
        f"(background, off the TTFT path). Promoter: half-life {a['half_life_s']:g} s, admission reuse >= 2 or "
        "continuation (promoter_admitall: everything), other settings default. gpu_only and lru do not depend on the "
        "prefill rate: they "
        "are replayed once and their TTFT evaluated at each rate; the promoter variants are replayed per scenario.",
    ]
    for name, w in report["workloads"].items():
        b = w["budgets"]
        lines += [
            "",
            f"## {name}",
            "",
            "workload: "
            + ", ".join(f"{k} {v}" for k, v in w["params"].items())
            + f"; {w['footprint_pages'] * PAGE_TOKENS:,} distinct tokens.",
            "",
            f"budgets (same for every policy): GPU {b['gpu_pages'] * PAGE_TOKENS:,} tokens "
            f"({b['gpu_pages'] * a['bytes_per_token'] * PAGE_TOKENS / 2**30:.0f} GiB modelled), DRAM tier "
            f"{b['dram_pages'] * PAGE_TOKENS:,} tokens, disk {b['disk_pages'] * PAGE_TOKENS:,} tokens (the "
            "disk store evicts from 95% to 80% of its cap).",
        ]
        for sc in report["scenarios"]:
            ws = w["scenarios"][sc["name"]]
            lines += [
                "",
                f"### {name}, scenario {sc['name']}: prefill {sc['prefill_tokens_per_s']:,.0f} tok/s "
                f"(break-even {sc['break_even_gbps']:.2f} GB/s)",
                "",
                f"no cache at all: TTFT p50 {ws['no_cache']['ttft_p50_s']:.3f} s, p99 "
                f"{ws['no_cache']['ttft_p99_s']:.3f} s.",
                "",
            ]
            vs = list(ws["variants"])
            lines.append("| | " + " | ".join(vs) + " |")
            lines.append("|---|" + "---:|" * len(vs))
            for label, key, f in ROWS:
                lines.append(f"| {label} | " + " | ".join(fmt_row(ws["variants"][v], key, f) for v in vs) + " |")
        if w.get("post_hoc"):
            ph = w["post_hoc"]
            cols = list(ph["columns"])
            lines += [
                "",
                f"Post hoc, other prefill rates (TTFT p50 / p99 in s): each request's hits as found in the "
                f"runs above, re-decided at that rate; exact for gpu_only and lru, an estimate for "
                f"{ph['promoter_from']} (its cache contents are those of scenario {ph['scenario']}).",
                "",
                "| prefill tok/s | " + " | ".join(cols) + " |",
                "|---:|" + "---:|" * len(cols),
            ]
            for rate in SENS_RATES:
                lines.append(
                    f"| {rate:,} | "
                    + " | ".join(
                        f"{ph['columns'][c][str(rate)][0]:.3f} / {ph['columns'][c][str(rate)][1]:.3f}" for c in cols
                    )
                    + " |"
                )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="seconds-sized run; writes files only with --out")
    ap.add_argument(
        "--out",
        default=None,
        help="output path without extension (default bench/results/promoter_bench; --quick: none)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workloads", default="docs,sessions")
    ap.add_argument(
        "--variants",
        default="gpu_only,lru,promoter,promoter_noattn,promoter_lrutiers",
        help=f"any of {', '.join(VARIANTS)}",
    )
    ap.add_argument("--dir", default=None, help="scratch directory for the disk tiers (default: a temp dir)")
    # docs
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--doc-requests", type=int, default=300)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--doc-gap-s", type=float, default=4.0, help="mean time between document requests")
    # sessions
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--turns-min", type=int, default=6)
    ap.add_argument("--turns-max", type=int, default=16)
    ap.add_argument("--system-pages", type=int, default=64, help="shared system prompt, in 64-token pages")
    ap.add_argument("--think-s", type=float, default=60.0, help="mean think/tool time between turns")
    ap.add_argument("--session-spread-s", type=float, default=900.0, help="session starts spread over this long")
    ap.add_argument("--decode-tps", type=float, default=40.0, help="decode tokens/s (spaces the turns)")
    # budgets, as fractions of the workload's distinct tokens
    ap.add_argument("--gpu-frac", type=float, default=0.08)
    ap.add_argument("--dram-frac", type=float, default=0.25)
    ap.add_argument("--disk-frac", type=float, default=0.6)
    # cost model assumptions
    ap.add_argument(
        "--bytes-per-token",
        type=int,
        default=131072,
        help="KV bytes per token of the modelled model (Llama-3.1-8B bf16: 32 layers x 8 KV heads x 128 x 2 x 2 B)",
    )
    ap.add_argument("--prefill-tps", default="12000,3000", help="prefill tokens/s, one scenario each")
    ap.add_argument("--pcie-gbps", type=float, default=25.0)
    # promoter
    ap.add_argument("--half-life-s", type=float, default=PromoterConfig().half_life_s)
    ap.add_argument("--prefetch-share", type=float, default=PromoterConfig().promote_share)
    ap.add_argument("--prefetch-tick-s", type=float, default=1.0)
    ap.add_argument("--prefetch-window-s", type=float, default=30.0)
    ap.add_argument(
        "--prefetch-candidates",
        type=int,
        default=16384,
        help="pages that left the tier above kvdrive remembered as prefetch candidates (as the server)",
    )
    ap.add_argument(
        "--disk-gc-live-ratio",
        type=float,
        default=0.9,
        help="DiskStore gc_live_ratio for the replays (the store's default 0.5 wedges: see the notes)",
    )
    ap.add_argument("--calib-pages", type=int, default=192)
    ap.add_argument("--calib-reps", type=int, default=5)
    add_allow_dirty(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.docs, args.doc_requests = 12, 60
        args.sessions, args.turns_min, args.turns_max = 10, 4, 8
        args.session_spread_s = 200.0
        args.calib_pages, args.calib_reps = 64, 2
    out = (
        args.out
        if args.out is not None
        else (None if args.quick else os.path.join(REPO, "bench", "results", "promoter_bench"))
    )
    guard_results(out + ".json" if out else None, REPO, args.allow_dirty)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    try:
        rates = [float(x) for x in args.prefill_tps.split(",") if x]
        assert rates and all(r > 0 for r in rates)
    except (ValueError, AssertionError):
        ap.error(f"--prefill-tps must be positive numbers separated by commas, got {args.prefill_tps!r}")
    t_start = time.perf_counter()
    tmp = args.dir or tempfile.mkdtemp(prefix="kvdrive-promoter-bench-")
    os.makedirs(tmp, exist_ok=True)
    try:
        print("calibrating the tier constants (TierEngine, 256 KiB bf16 pages) ...", flush=True)
        meas = calibrate(tmp, args.calib_pages, args.calib_reps)
        print(
            f"  DRAM read {meas['dram_read_gbps']:.2f} GB/s, disk read {meas['disk_read_gbps']:.2f} GB/s, "
            f"disk write {meas['disk_write_gbps']:.2f} GB/s, disk latency {meas['disk_latency_s'] * 1e6:.0f} us, "
            f"zstd {meas['zstd_ratio']:.3f}x",
            flush=True,
        )
        base_cost = CostModel(
            prefill_tokens_per_s=rates[0],
            pcie_gbps=args.pcie_gbps,
            bytes_per_token=args.bytes_per_token,
            dram_gbps=meas["dram_read_gbps"],
            disk_gbps=meas["disk_read_gbps"],
            disk_latency_s=meas["disk_latency_s"],
            zstd_ratio=meas["zstd_ratio"],
            page_tokens=PAGE_TOKENS,
        )
        scenarios = []
        for i, rate in enumerate(rates):
            scenarios.append(
                {
                    "name": chr(ord("A") + i),
                    "prefill_tokens_per_s": rate,
                    "note": PREFILL_NOTES.get(int(rate), "stated on the command line"),
                    "break_even_gbps": rate * args.bytes_per_token / 1e9,
                }
            )
        synth = SyntheticPages(99)
        ns = Namespace(model="probe", kv_dtype="bfloat16", layout="mha", num_layers=1, **SMALL_SHAPE)
        with TierEngine(TierConfig(path=None, host_bytes=64 * MiB)) as e:
            e.put_many(ns, [f"p{i}" for i in range(N_POOL_PAGES)], synth.numpy)
            small_encoded = e.stats().dram.used_bytes / N_POOL_PAGES
        print("importing sglang ...", flush=True)
        mach = machine(REPO)
        report = {
            "command": "python "
            + " ".join(
                shlex.quote(a)
                for a in [os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else list(argv))
            ),
            "machine": mach,
            "assumptions": {
                "bytes_per_token": args.bytes_per_token,
                "model": "Llama-3.1-8B-class, bf16 KV (32 layers x 8 KV heads x 128 dim x K,V x 2 B)",
                "pcie_gbps": args.pcie_gbps,
                "pcie_note": "PCIe 4.0 x16, effective",
                "prefetch_share": args.prefetch_share,
                "half_life_s": args.half_life_s,
            },
            "scenarios": scenarios,
            "measured": meas,
            "args": vars(args),
            "workloads": {},
            "notes": [
                "Attention mass is synthetic (fixed shapes: sinks, local window, hot passages / recent turns), not "
                "captured from a model; the promoter_noattn column shows how much of any difference depends on it.",
                "TTFT is modelled per request with no queueing and no contention between requests; reloads are "
                "charged in series (tier read, then PCIe), prefill linearly in tokens (no quadratic attention term, "
                "which understates the cost of recomputing long prefixes, and so understates what the tiers save).",
                "The DRAM and disk constants are this VM's (virtual disk cached by its host, one core decoding; the "
                "machine drifts between a fast and a slow phase, see the calibration runs); an NVMe server with "
                "more decode threads would have faster tiers, which moves the outcome towards scenario B.",
                f"The disk stores run with gc_live_ratio={args.disk_gc_live_ratio} (DiskStore default 0.5). With "
                "the default the store wedges in these replays: file bytes reach the cap while live bytes sit "
                "below the low watermark (~55% of the cap) and no sealed segment is under 50% live, so "
                "DiskStore._make_room neither evicts (live < target) nor compacts (no segment qualifies, and "
                "copying forward needs headroom) and refuses every write from then on (rejected_full). "
                "Value-ordered eviction spreads deletions over more segments and wedges sooner (it wedged at 0.75, "
                "LRU did not). Bytes moved by compaction are not in 'disk written'.",
                "Prefetch is TierEngine.promote (disk blobs moved into the DRAM pool as stored, marked on disk; "
                "with scores, only pages scoring above the full pool's lowest score). Candidates are the disk-only "
                "pages among those the GPU tree evicted "
                "(up to --prefetch-candidates, newest first on equal value), every >= 1 s of replay time; no "
                "arrival-time (queue) prefetch is modelled.",
                "The GPU tier holds finished requests only (one request at a time); SGLang's uncompressed host pool "
                "(L2) is not modelled: pages go GPU -> kvdrive DRAM tier / disk.",
                "'saved %' counts prompt tokens not prefilled; a policy that recomputes a slow tier's hits saves "
                "fewer tokens on purpose, so compare TTFT.",
            ],
        }
        for wname in [w for w in args.workloads.split(",") if w]:
            wl = {"docs": docs_workload, "sessions": sessions_workload}[wname](args, args.seed)
            b = budgets_for(wl, args, small_encoded)
            print(
                f"\n[{wname}] {len(wl.requests)} requests, {wl.footprint_pages * PAGE_TOKENS:,} distinct tokens; "
                f"GPU {b['gpu_pages']} pages, DRAM {b['dram_pages']}, disk {b['disk_pages']}",
                flush=True,
            )
            w = {
                "params": wl.params,
                "footprint_pages": wl.footprint_pages,
                "budgets": b,
                "scenarios": {sc["name"]: {"variants": {}} for sc in scenarios},
            }
            once = {}  # rate-independent replays: variant -> (summary, records)
            promoter_records = {}
            for sc in scenarios:
                cost = dataclasses.replace(base_cost, prefill_tokens_per_s=sc["prefill_tokens_per_s"])
                rate = sc["prefill_tokens_per_s"]
                nc = [len(r.prompt) * PAGE_TOKENS / rate for r in wl.requests]
                ws = w["scenarios"][sc["name"]]
                ws["no_cache"] = {"ttft_p50_s": percentile(nc, 50), "ttft_p99_s": percentile(nc, 99)}
                for v in variants:
                    if v in ("gpu_only", "lru"):
                        if v not in once:
                            rep = Replay(VARIANTS[v], wl, b, cost, args, tmp, synth)
                            once[v] = (rep.run(), rep.records)
                            del once[v][0]["timeline"], once[v][0]["trace_digest"]
                        res = rescore(once[v][0], once[v][1], cost, rate, use_plan=False)
                    else:
                        rep = Replay(VARIANTS[v], wl, b, cost, args, tmp, synth)
                        res = rep.run()
                        del res["timeline"], res["trace_digest"]
                        if v == "promoter" and sc is scenarios[0]:
                            promoter_records = rep.records
                    ws["variants"][v] = res
                    print(
                        f"  {sc['name']} {v:18s} saved {res['saved_pct']:5.1f}%  TTFT p50 {res['ttft_p50_s']:.3f} s"
                        f"  p99 {res['ttft_p99_s']:.3f} s  disk wr {res.get('disk_pages_written', 0):6d} rd "
                        f"{res.get('disk_pages_read', 0):6d} pages  slower-than-no-cache "
                        f"{res['requests_slower_than_no_cache']}  ({res['wall_s']:.1f} s)",
                        flush=True,
                    )
            cols = {
                "no cache": {
                    str(r): (
                        percentile([len(q.prompt) * PAGE_TOKENS / r for q in wl.requests], 50),
                        percentile([len(q.prompt) * PAGE_TOKENS / r for q in wl.requests], 99),
                    )
                    for r in SENS_RATES
                }
            }
            for v, (_, recs) in once.items():
                cols[v] = {}
                for r in SENS_RATES:
                    e = ttft_from_records(recs, base_cost, r, use_plan=False)
                    cols[v][str(r)] = (percentile(e["ttft"], 50), percentile(e["ttft"], 99))
            if promoter_records:
                cols["promoter"] = {}
                for r in SENS_RATES:
                    e = ttft_from_records(promoter_records, base_cost, r, use_plan=True)
                    cols["promoter"][str(r)] = (percentile(e["ttft"], 50), percentile(e["ttft"], 99))
            w["post_hoc"] = {"columns": cols, "promoter_from": "promoter", "scenario": scenarios[0]["name"]}
            report["workloads"][wname] = w
        report["total_wall_s"] = time.perf_counter() - t_start
        md = markdown(report)
        print("\n" + md)
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".json", "w") as f:
                json.dump(report, f, indent=1, default=float)
            with open(out + ".md", "w") as f:
                f.write(md)
            print(f"wrote {out}.json and {out}.md")
    except ReplayError as e:
        print(f"promoter_bench: {e}", file=sys.stderr)
        return 2
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
