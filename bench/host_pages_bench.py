"""HostPages' batched page copies against SGLang's own per-page copy, per call, on real SGLang host pools on CPU.

One call moves ``--pages`` pages (default 256) at scattered, unordered page starts between the host pool and flat
pages, both ways: ``read`` (what ``batch_set_v1`` hands the tiers) and ``write`` (what ``batch_get_v1`` copies back),
for every pool kind and layout HostPages batches, at page sizes 1 and 64, bf16. The per-page figures are HostPages
with its batch path switched off (``get_data_page(flat=True).contiguous()`` / ``set_from_flat_data_page`` a page);
``read_ms_per_page_owned`` adds the clone ``batch_set_v1`` makes of each per-page page (they may be views of the
pool, and the tiers keep what they are given), which the batched read needs not (its rows are one fresh copy).

    python bench/host_pages_bench.py [--pages 256] [--repeats 5] [--threads 1] [--out bench/results/host-pages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import add_allow_dirty, guard_results, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MHA_DIMS = {"head_num": 8, "head_dim": 128, "layer_num": 4}  # 16 KiB a token in bf16
MLA_DIMS = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "layer_num": 8}  # DeepSeek's latent row, 9 KiB a token
CASES = [
    ("mha", "layer_first"),
    ("mha", "page_first"),
    ("mha", "page_first_direct"),
    ("mha", "page_head"),
    ("mla", "layer_first"),
    ("mla", "page_first"),
    ("mla", "page_first_direct"),
]


def make_pool(kind: str, layout: str, page_size: int, tokens: int):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    from kvdrive_sglang import cpu_fallbacks
    from kvdrive_sglang.compat.host_pools import make_host_pool

    cpu_fallbacks.install()
    device_cls, host_cls, dims = (
        (MHATokenToKVPool, MHATokenToKVPoolHost, MHA_DIMS)
        if kind == "mha"
        else (MLATokenToKVPool, MLATokenToKVPoolHost, MLA_DIMS)
    )
    device = device_cls(
        size=tokens, page_size=page_size, dtype=torch.bfloat16, device="cpu", enable_memory_saver=False, **dims
    )
    return make_host_pool(
        host_cls,
        device,
        host_to_device_ratio=1.0,
        host_size=0,
        page_size=page_size,
        layout=layout,
        pin_memory=False,
        device="cpu",
    )


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(kind: str, layout: str, page_size: int, pages: int, repeats: int) -> dict:
    """Per-call times for one pool: batched and per-page, read and write, at ``pages`` scattered page starts."""
    from kvdrive_sglang.host_pages import HostPages

    host = make_pool(kind, layout, page_size, tokens=pages * page_size + page_size)
    batched, per_page = HostPages(host), HostPages(host)
    assert batched.layout == layout, f"{kind} {layout}: HostPages did not batch"
    per_page.view, per_page.layout = None, None
    g = torch.Generator().manual_seed(0)
    starts = [p * page_size for p in torch.randperm(int(host.size) // page_size, generator=g)[:pages].tolist()]
    src = torch.empty((pages, batched.page_numel), dtype=host.dtype)
    row = {
        "kind": kind,
        "layout": layout,
        "page_size": page_size,
        "pages": pages,
        "page_kib": batched.page_bytes / 1024,
    }
    for name, pg in (("batched", batched), ("per_page", per_page)):
        row[f"read_ms_{name}"] = per_call_ms(lambda pg=pg: pg.read(starts), repeats)
        row[f"write_ms_{name}"] = per_call_ms(lambda pg=pg: pg.write(starts, src), repeats)
    row["read_ms_per_page_owned"] = per_call_ms(lambda: [p.clone() for p in per_page.read(starts)], repeats)
    return row


def run(pages: int, repeats: int) -> list[dict]:
    out = []
    for page_size in (1, 64):
        for kind, layout in CASES:
            row = measure(kind, layout, page_size, pages, repeats)
            out.append(row)
            print(
                f"{kind} {layout:18s} page {page_size:2d} ({row['page_kib']:6.1f} KiB): read "
                f"{row['read_ms_batched']:7.2f} ms batched / {row['read_ms_per_page']:7.2f} per page "
                f"({row['read_ms_per_page_owned']:7.2f} owned); write {row['write_ms_batched']:7.2f} / "
                f"{row['write_ms_per_page']:7.2f} ms",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default). On a box "
        "with more runnable threads than cores a 2-thread copy waits a scheduler slice (~8 ms) for its "
        "second thread: measure with 1 there",
    )
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    add_allow_dirty(ap)
    args = ap.parse_args()
    guard_results(args.out, REPO, args.allow_dirty)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.pages, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "machine": machine(REPO),
                    "torch_threads": torch.get_num_threads(),
                    "load_avg": os.getloadavg(),
                    "mha_dims": MHA_DIMS,
                    "mla_dims": MLA_DIMS,
                    "results": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
