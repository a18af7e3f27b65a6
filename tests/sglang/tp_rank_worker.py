"""One rank of a two-rank (TP=2) kvdrive radix cache on CPU, for tests/sglang/test_tp_consistency.py.

Run as ``python -m tests.sglang.tp_rank_worker RANK INIT_FILE STORE_DIR OUT_JSON``. Both ranks join one gloo group
(as SGLang's TP workers join their CPU group), build kvdrive's radix cache with kvdrive's storage through SGLang's
registry, and serve the same two prompts in the same order. Each rank sees different attention (its own heads):
rank 0 sees the older prompt attended, rank 1 the newer one; rank 1 also runs behind rank 0 by a fraction of a
second, so their wall clocks differ at every step. Then one prompt's worth of GPU KV is evicted, and the rank writes
down what its tree kept and what its promoter knows.

The cache and the request path are the installed SGLang's generation's (kvdrive_sglang.compat.radix_adapter()):
- ``hiradix`` (0.5.17 - 0.5.20): the cache from tests/sglang/test_radix_backend._ctx's pools, requests driven by its
  ``serve`` (HiRadixCache's request API), the TP topology set by overriding SGLang's parallel context;
- ``unified`` (0.5.21 on): tests/sglang/unified_driver.Server with tp_size=2, i.e. the ServerArgs carry the TP width
  and are published with this rank's placement, the cache's TP group is the gloo group, and requests go through
  SGLang's own scheduler code (Scheduler._prefetch_kvcache, PrefillAdder, prepare_for_extend, release_kv_cache).
"""

from __future__ import annotations

import json
import os
import sys
import time
from array import array

OLDER, NEWER = [7] * 16, [9] * 16  # four pages each
# each rank's heads' share of each request's attention per page (the two ranks' shares differ)
MASS = {0: {"older": 0.2, "newer": 0.0}, 1: {"older": 0.0, "newer": 0.05}}


def serve_both(rank, serve):
    """The same two prompts on every rank, in the same order; rank 1's clock reads later at every step."""
    import numpy as np

    from kvdrive_sglang import radix_backend

    for name, prompt in (("older", OLDER), ("newer", NEWER)):
        if rank == 1:
            time.sleep(0.35)  # this rank's clock reads later at every step
        # what the attention capture hands over when the request finishes: this rank's mass per page
        radix_backend.CAPTURE.pop = lambda slot, m=MASS[rank][name]: np.full(4, m)
        serve(name, prompt)


def report(cache, backend, *, evict, on_device, keys_of, promoter_eviction):
    """The scheduler's next iterations (the ranks sync their inputs), one prompt's worth of eviction, and what this
    rank's tree kept and its promoter knows."""
    for _ in range(cache._SYNC_EVERY):
        cache.check_hicache_events()
    evicted = evict(16)
    kept = {name: on_device(p) for name, p in (("older", OLDER), ("newer", NEWER))}
    promoter = backend.promoter
    keys = {name: keys_of(p) for name, p in (("older", OLDER), ("newer", NEWER))}
    return {
        "evicted": evicted,
        "kept": kept,
        "clock": promoter._clock(),
        "promoter_eviction": promoter_eviction,
        "mass": {n: [promoter.attention_mass(k) for k in ks] for n, ks in keys.items()},
        "scores": {n: promoter.group_score(ks) for n, ks in keys.items()},
    }


def run_hiradix(rank: int, store_dir: str, out_path: str) -> dict:
    from sglang.srt.mem_cache import registry
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.runtime_context import get_parallel

    from kvdrive_sglang import radix_backend
    from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config
    from tests.sglang import test_radix_backend as rb

    with get_parallel().override(tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1):
        ctx = rb._ctx(store="unused")
        extra = json.loads(storage_extra_config(KvdriveOptions(dir=store_dir, host_gb=0.01, disk_gb=1)))
        ctx.server_args.hicache_storage_backend_extra_config = json.dumps({**extra, "prefetch_threshold": rb.PAGE})
        cache = registry.get_radix_cache_factory("kvdrive")(ctx)
        try:
            serve_both(rank, lambda name, prompt: rb.serve(cache, name, None, prompt=prompt))
            return report(
                cache,
                cache.cache_controller.storage_backend,
                evict=lambda n: cache.evict(EvictParams(num_tokens=n)).num_tokens_evicted,
                on_device=lambda p: len(
                    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", p)))).device_indices
                ),
                keys_of=lambda p: rb.chain(p, None),
                promoter_eviction=isinstance(cache.eviction_strategy, radix_backend.PromoterEviction),
            )
        finally:
            cache.shutdown()


def run_unified(rank: int, store_dir: str, out_path: str) -> dict:
    import torch.distributed as dist
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from kvdrive_sglang import radix_backend
    from tests.sglang import unified_driver as d

    model_dir = d.make_model_dir(os.path.join(os.path.dirname(out_path), f"model-rank{rank}"))
    srv = d.Server(store_dir, model_dir, tp_size=2, tp_rank=rank, tp_group=dist.group.WORLD)
    cache = srv.cache
    try:
        assert cache.tp_world_size == 2, cache.tp_world_size
        serve_both(rank, lambda name, prompt: srv.serve(name, prompt))
        return report(
            cache,
            srv.backend,
            evict=lambda n: cache.evict(EvictParams(num_tokens=n)).num_tokens_evicted,
            # SGLang never serves a prompt's last token from cache: match the prompt + one token
            on_device=lambda p: (
                cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", p + d.TAIL)))).device_prefix_len
            ),
            keys_of=d.sglang_keys,
            promoter_eviction=isinstance(cache.tree_core.eviction_strategy, radix_backend.PromoterEviction),
        )
    finally:
        srv.shutdown()


def main(rank: int, init_file: str, store_dir: str, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from kvdrive_sglang import radix_backend
    from kvdrive_sglang.compat import radix_adapter

    radix_backend.register()
    run = {"hiradix": run_hiradix, "unified": run_unified}[radix_adapter().name]
    out = run(rank, store_dir, out_path)
    with open(out_path, "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
