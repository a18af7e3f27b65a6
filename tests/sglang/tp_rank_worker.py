"""One rank of a two-rank (TP=2) kvdrive radix cache on CPU, for tests/sglang/test_tp_consistency.py.

Run as ``python -m tests.sglang.tp_rank_worker RANK INIT_FILE STORE_DIR OUT_JSON``. Both ranks join one gloo group
(as SGLang's TP workers join their CPU group), build kvdrive's radix cache with kvdrive's storage through SGLang's
registry, and serve the same two prompts in the same order. Each rank sees different attention (its own heads):
rank 0 sees the older prompt attended, rank 1 the newer one; rank 1 also runs behind rank 0 by a fraction of a
second, so their wall clocks differ at every step. Then one prompt's worth of GPU KV is evicted, and the rank writes
down what its tree kept and what its promoter knows."""
from __future__ import annotations

import json
import sys
import time


def main(rank: int, init_file: str, store_dir: str, out_path: str) -> None:
    import numpy as np
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from kvdrive_sglang import radix_backend
    from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config
    from sglang.srt.mem_cache import registry
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from array import array

    from tests.sglang import test_radix_backend as rb

    radix_backend.register()
    older, newer = [7] * 16, [9] * 16  # four pages each
    # this rank's heads' share of each request's attention per page (the two ranks' shares differ)
    mass = {0: {"older": 0.2, "newer": 0.0}, 1: {"older": 0.0, "newer": 0.05}}[rank]
    with get_parallel().override(tp_rank=rank, tp_size=2, pp_rank=0, pp_size=1):
        ctx = rb._ctx(store="unused")
        extra = json.loads(storage_extra_config(KvdriveOptions(dir=store_dir, host_gb=0.01, disk_gb=1)))
        ctx.server_args.hicache_storage_backend_extra_config = json.dumps({**extra, "prefetch_threshold": rb.PAGE})
        cache = registry.get_radix_cache_factory("kvdrive")(ctx)
        try:
            backend = cache.cache_controller.storage_backend
            for name, prompt in (("older", older), ("newer", newer)):
                if rank == 1:
                    time.sleep(0.35)  # this rank's clock reads later at every step
                # what the attention capture hands over when the request finishes: this rank's mass per page
                radix_backend.CAPTURE.pop = lambda slot, m=mass[name]: np.full(4, m)
                rb.serve(cache, name, None, prompt=prompt)
            for _ in range(cache._SYNC_EVERY):  # the scheduler's next iterations: the ranks sync their inputs
                cache.check_hicache_events()
            evicted = cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted
            kept = {name: len(cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", p)))).device_indices)
                    for name, p in (("older", older), ("newer", newer))}
            promoter = backend.promoter
            keys = {name: rb.chain(p, None) for name, p in (("older", older), ("newer", newer))}
            out = {"evicted": evicted, "kept": kept, "clock": promoter._clock(),
                   "promoter_eviction": isinstance(cache.eviction_strategy, radix_backend.PromoterEviction),
                   "mass": {n: [promoter.attention_mass(k) for k in ks] for n, ks in keys.items()},
                   "scores": {n: promoter.group_score(ks) for n, ks in keys.items()}}
        finally:
            cache.shutdown()
    with open(out_path, "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
