"""What kvdrive's tree core costs on SGLang's UnifiedRadixCache generation (0.5.21 on), against SGLang's own cores.

kvdrive's radix cache needs the tree's eviction order (the promoter's value) and its page hashes (tenant tags) in
Python, so on SGLang 0.5.21+ it runs on its own tree core ``kvdrive``: SGLang's Python core (``UnifiedTreeCore``)
with the promoter's eviction strategy and a host-eviction report. SGLang's default there is its Rust core. This
measures the price of that choice on the operations the scheduler runs per request: insert, match_prefix and
eviction, through the real ``UnifiedRadixCache`` API (real CPU pools, no HiCache: the tree alone), for each core:

- ``rust``: SGLang's default core (LRU);
- ``python``: SGLang's Python core (LRU);
- ``kvdrive``: kvdrive's core, with PromoterEviction over a real promoter that has scored every inserted page.

Workload: documents with Zipf popularity plus a per-request suffix (the e2e bench's shape), page sizes 16 and 1.
Repeated (median and spread of the per-op time over the repeats); ratios against ``rust`` measured in the same run.

    .venv/bin/python bench/tree_core_bench.py [--requests 400] [--repeats 5] [--out bench/results/tree-core.md]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.bench_common import add_allow_dirty, guard_results, machine  # noqa: E402


def _build(core: str, page: int, tokens: int):
    import torch
    from sglang.srt.mem_cache import registry
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext
    from sglang.srt.server_args import ServerArgs

    from kvdrive_sglang.compat import unified

    kv = MHATokenToKVPool(
        size=tokens,
        page_size=page,
        dtype=torch.float16,
        head_num=1,
        head_dim=8,
        layer_num=1,
        device="cpu",
        enable_memory_saver=False,
    )
    if page == 1:
        allocator = TokenToKVPoolAllocator(size=tokens, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False)
    else:
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

        allocator = PagedTokenToKVPoolAllocator(
            size=tokens, page_size=page, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False
        )
    req_pool = ReqToTokenPool(size=8, max_context_len=4096, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=req_pool,
        token_to_kv_pool_allocator=allocator,
        page_size=page,
        tree_core_backend=None if core == "kvdrive" else core,
    )
    server_args = ServerArgs(model_path="dummy", device="cpu", page_size=page)
    from sglang.srt.runtime_context import publish

    publish(server_args, role="scheduler")  # the config bags a scheduler process publishes before building its cache
    ctx = TreeCacheBuildContext(
        server_args=server_args,
        params=params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=False,
        disable_radix_cache=False,
        tp_worker=None,
        model_config=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )
    cls = unified.KvdriveUnifiedRadixCache if core == "kvdrive" else None
    return registry.create_unified_radix_cache(ctx, cache_class=cls)


class _PromoterBackend:
    """kvdrive's real promoter, reached the way the cache reaches kvdrive's storage backend (RadixReports)."""

    def __init__(self):
        from kvdrive_sglang.tier.promoter import Promoter, PromoterConfig
        from kvdrive_sglang.tier.tenants import Tenants

        self.promoter = Promoter(PromoterConfig())
        self.tenants = Tenants()

    def expect_whole_requests(self):
        pass

    def record_radix_event(self, kind, tokens):
        pass

    def record_request(self, keys):
        self.promoter.observe_access(keys, 16, 4096, whole_request=True)

    def record_attention(self, key_mass):
        pass

    def record_host_evicted(self, keys):
        pass


def _workload(requests: int, seed: int = 7):
    rng = random.Random(seed)
    docs = [[rng.randrange(1, 30000) for _ in range(rng.randrange(320, 513))] for _ in range(24)]
    weights = [1.0 / (i + 1) for i in range(len(docs))]
    out = []
    for _ in range(requests):
        doc = rng.choices(docs, weights)[0]
        out.append(doc + [rng.randrange(1, 30000) for _ in range(rng.randrange(16, 64))])
    return out


def _run_once(core: str, page: int, reqs) -> dict[str, float]:
    from array import array

    import torch
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    total = sum(len(r) for r in reqs) + 4096
    cache = _build(core, page, total)
    if core == "kvdrive":
        backend = _PromoterBackend()
        cache._kvdrive_backend = lambda: backend  # the promoter the storage backend would hand over
    alloc = cache.token_to_kv_pool_allocator
    t_match = t_insert = 0.0
    for toks in reqs:
        n = len(toks) // page * page
        key = RadixKey(array("q", toks[:n]))
        t0 = time.perf_counter()
        m = cache.match_prefix(MatchPrefixParams(key=key))
        t_match += time.perf_counter() - t0
        hit = m.device_prefix_len
        prefix = cache.path_device_indices(m.last_device_node)[:hit] if hit else torch.empty(0, dtype=torch.int64)
        new = alloc.alloc(n - hit) if n > hit else torch.empty(0, dtype=torch.int64)
        value = torch.cat([prefix.to(torch.int64), new.to(torch.int64)])
        t0 = time.perf_counter()
        res = cache.insert(InsertParams(key=key, value=value))
        t_insert += time.perf_counter() - t0
        if res.prefix_len > hit:  # pages the tree already held: give back this request's duplicates
            alloc.free(value[hit : res.prefix_len])
        if core == "kvdrive":
            from sglang.srt.mem_cache.utils import get_storage_hash_str

            backend.record_request(get_storage_hash_str(key, None, page_size=page))
    t0 = time.perf_counter()
    evicted = cache.evict(EvictParams(num_tokens=total)).num_tokens_evicted
    t_evict = time.perf_counter() - t0
    return {
        "match_us": 1e6 * t_match / len(reqs),
        "insert_us": 1e6 * t_insert / len(reqs),
        "evict_all_ms": 1e3 * t_evict,
        "evicted_tokens": evicted,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write a results file (markdown)")
    add_allow_dirty(ap)
    args = ap.parse_args(argv)
    guard_results(args.out, os.path.dirname(HERE), args.allow_dirty)

    from kvdrive_sglang import cpu_fallbacks, radix_backend
    from kvdrive_sglang.compat import radix_adapter

    if radix_adapter().name != "unified":
        print(
            f"tree_core_bench: SGLang's {radix_adapter().name} generation has no pluggable tree core; nothing to "
            "measure"
        )
        return 0
    cpu_fallbacks.install()
    radix_backend.register()
    from sglang.srt.plugins.hook_registry import HookRegistry

    HookRegistry.apply_hooks()
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", init_method=f"file://{tempfile.mktemp(prefix='kvdrive-pg-')}", rank=0, world_size=1
        )
    from sglang.srt.runtime_context import get_parallel

    load_start = os.getloadavg()
    reqs = _workload(args.requests)
    rows = []
    with get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1):
        for page in (16, 1):
            per_core = {}
            for core in ("rust", "python", "kvdrive"):
                runs = [_run_once(core, page, reqs) for _ in range(args.repeats)]
                per_core[core] = runs
            base = {
                k: statistics.median(r[k] for r in per_core["rust"]) for k in ("match_us", "insert_us", "evict_all_ms")
            }
            for core, runs in per_core.items():
                row = {"page": page, "core": core}
                for k in ("match_us", "insert_us", "evict_all_ms"):
                    vals = [r[k] for r in runs]
                    row[k] = (statistics.median(vals), min(vals), max(vals), statistics.median(vals) / base[k])
                row["evicted"] = runs[0]["evicted_tokens"]
                rows.append(row)
    lines = [
        "| page | core | match_prefix µs/req (min-max) | x rust | insert µs/req (min-max) | x rust | "
        "evict all ms (min-max) | x rust | tokens evicted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for k in ("match_us", "insert_us", "evict_all_ms"):
            med, lo, hi, ratio = r[k]
            cells += [f"{med:.1f} ({lo:.1f}-{hi:.1f})", f"{ratio:.2f}"]
        lines.append(f"| {r['page']} | {r['core']} | " + " | ".join(cells) + f" | {r['evicted']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        m = machine(os.path.dirname(HERE))
        m["loadavg_start"] = load_start
        header = "".join(f"- {k}: {v}\n" for k, v in m.items())
        command = " ".join(argv if argv is not None else sys.argv[1:])
        header += f"- command: `python bench/tree_core_bench.py {command}`\n"
        with open(args.out, "w") as f:
            f.write(
                "# Tree cores on SGLang's UnifiedRadixCache: kvdrive's vs SGLang's\n\n"
                + header
                + "\n"
                + table
                + f"\n\n{args.requests} requests (Zipf over 24 documents of 320-512 tokens + a 16-63-token suffix), "
                f"{args.repeats} repeats each; per request: one match_prefix and one insert; then one eviction of "
                "the whole tree.\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
