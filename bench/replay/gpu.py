"""L1 of the replay: SGLang's own RadixCache (0.5.17 - 0.5.23) on CPU with real pools, one tree token per 64-token
page.

The tree is driven as the scheduler drives it: match_prefix + inc_lock_ref, then evict / alloc / insert /
dec_lock_ref when the request finishes. Every trace boundary is page-aligned, so a page-id tree has the shape and the
evictions of a token-level tree with page_size 64 (see bench/workloads.py).
"""

from __future__ import annotations

from array import array

from kvdrive_sglang.tier.promoter import Promoter


class ReplayError(RuntimeError):
    pass


class Gpu:
    """SGLang's RadixCache on CPU with real pools, one tree token per 64-token page."""

    def __init__(self, pages: int, strategy=None):
        import torch
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.mem_cache.radix_cache import RadixCache

        class BenchRadixCache(RadixCache):
            removed: list

            def _delete_leaf(self, node):  # eviction's one removal step, on every supported SGLang
                self.removed.extend(node.key.token_ids)
                super()._delete_leaf(node)

        self.torch = torch
        kv = MHATokenToKVPool(
            size=pages,
            page_size=1,
            dtype=torch.float16,
            head_num=1,
            head_dim=1,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
        )
        self.alloc = TokenToKVPoolAllocator(size=pages, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False)
        req_pool = ReqToTokenPool(size=4, max_context_len=8, device="cpu", enable_memory_saver=False)
        self.tree = BenchRadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=req_pool,
                token_to_kv_pool_allocator=self.alloc,
                page_size=1,
                eviction_policy="lru",
            )
        )
        self.tree.removed = []
        if strategy is not None:
            self.tree.eviction_strategy = strategy
        self.pages = pages

    def hit(self, m):
        """The device indices of a match's cached prefix (a MatchResult field up to SGLang 0.5.20; later ones give
        its length and the node, whose path holds them)."""
        if hasattr(m, "device_indices"):
            return m.device_indices
        return self.tree.path_device_indices(m.last_device_node)[: m.device_prefix_len]

    def match(self, ids):
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        m = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", ids))))
        self.tree.inc_lock_ref(m.last_device_node)
        return m

    def insert(self, m, ids) -> list:
        """Insert the finished request (prompt + answer); returns the page ids the tree evicted to make room."""
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        prefix = self.hit(m)
        g = len(prefix)
        need = len(ids) - g
        avail = self.alloc.available_size()
        if avail < need:
            self.tree.evict(EvictParams(num_tokens=need - avail))
        new = self.alloc.alloc(need)
        if new is None:
            raise ReplayError(f"GPU tier of {self.pages} pages cannot hold one request of {len(ids)} pages")
        value = self.torch.cat([prefix.to(new.dtype), new])
        res = self.tree.insert(InsertParams(key=RadixKey(array("q", ids)), value=value))
        if res.prefix_len > g:
            self.alloc.free(value[g : res.prefix_len])
        self.tree.dec_lock_ref(m.last_device_node)
        removed, self.tree.removed = self.tree.removed, []
        return removed


class PromoterStrategy:
    """SGLang EvictionStrategy: a radix node's priority is the promoter's score of its pages (then recency)."""

    def __init__(self, promoter: Promoter):
        self.p = promoter

    def get_priority(self, node):
        return (self.p.group_score([str(t) for t in node.key.token_ids]), node.last_access_time)
