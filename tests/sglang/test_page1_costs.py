"""Page size 1 (SGLang's default on CUDA) must not stall the scheduler (issue 15): with a 10^6-token tree, an
eviction of a typical batch stays under 20 ms and finishing a 32k-token request under 5 ms.

These are the only timing assertions in the suite, so the bounds are the issue's own and the margins generous: the
costs they guard were 10x-100x over them (the eviction priority walked every page of every evictable leaf, and each
finished request took several Python steps per token). Time is the calling thread's CPU time (``thread_time``): on a
machine shared with other work, wall time would measure the other work; the median of several runs absorbs the
rest.

Real SGLang radix caches as kvdrive builds them on the installed generation (HiRadixCache subclass on 0.5.17,
UnifiedRadixCache on kvdrive's tree core on 0.5.23), real KvdriveStorage (tier engine, LMDB, segment files) and its
promoter, CPU pools, real ``Req`` objects finished through SGLang's own calls (``cache_finished_req``, or
``release_kv_cache`` where requests end through checkpoint/on_release). The tree is built from 32 real requests of
32k tokens each. SGLang's write-through threshold is raised out of reach, so no page is copied to its host pool and
on to storage: at page size 1 those copies are per-token work on SGLang's I/O threads, which would share the GIL
with the timed calls and time them instead (evictions then drop leaves, as write_through_selective does for pages
used once). The attention mass a finished request carries is a per-page array as the capture
hands it over (its GPU sampling is not run on CPU).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from array import array

import pytest

pytest.importorskip("sglang")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from kvdrive_sglang import cpu_fallbacks, radix_backend
from kvdrive_sglang.attention_capture import CAPTURE
from kvdrive_sglang.compat import radix_adapter
from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config

cpu_fallbacks.install()

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.registry import TreeCacheBuildContext
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

GEN = radix_adapter().name  # "hiradix" (0.5.17-0.5.20) or "unified" (0.5.21 on)
PAGE = 1
REQ_TOKENS = 32768
REQUESTS = 32  # 32 x 32k = 1,048,576 tokens in the tree
POOL = REQUESTS * REQ_TOKENS + 4 * REQ_TOKENS
EVICT_BOUND_S = 0.020  # issue 15's bounds
FINISH_BOUND_S = 0.005


@pytest.fixture(scope="module", autouse=True)
def _group(process_group):  # tests/sglang/conftest.py
    yield


class _Worker:
    def register_hicache_layer_transfer_counter(self, counter):
        pass


def _server_args(tmp_path, model_path):
    extra = json.loads(storage_extra_config(KvdriveOptions(dir=str(tmp_path / "store"), host_gb=0.05, disk_gb=1)))
    return ServerArgs(
        model_path=model_path,
        device="cpu",
        page_size=PAGE,
        enable_hierarchical_cache=True,
        hicache_ratio=1.5,
        hicache_io_backend="direct",
        hicache_mem_layout="layer_first",
        hicache_write_policy="write_through_selective",
        radix_cache_backend="kvdrive",
        hicache_storage_backend="dynamic",
        hicache_storage_backend_extra_config=json.dumps({**extra, "prefetch_threshold": 64}),
    )


def _pools():
    kv = MHATokenToKVPool(
        size=POOL,
        page_size=PAGE,
        dtype=torch.float16,
        head_num=1,
        head_dim=8,
        layer_num=1,
        device="cpu",
        enable_memory_saver=False,
    )
    allocator = TokenToKVPoolAllocator(size=POOL, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False)
    req_pool = ReqToTokenPool(size=4, max_context_len=REQ_TOKENS + 64, device="cpu", enable_memory_saver=False)
    return allocator, req_pool


def _build_hiradix(tmp_path):
    allocator, req_pool = _pools()
    server_args = _server_args(tmp_path, "dummy")
    params = CacheInitParams(
        disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator, page_size=PAGE
    )
    ctx = TreeCacheBuildContext(
        server_args=server_args,
        params=params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=True,
        disable_radix_cache=False,
        effective_chunked_prefill_size=server_args.chunked_prefill_size,
        tp_worker=_Worker(),
        model_config=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )
    return registry.get_radix_cache_factory("kvdrive")(ctx)


def _build_unified(tmp_path):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import get_memory, get_schedule, publish

    from tests.sglang.unified_driver import make_model_dir

    server_args = _server_args(tmp_path, make_model_dir(tmp_path / "model"))
    publish(server_args, role="scheduler")
    model_config = ModelConfig.from_server_args(server_args)
    allocator, req_pool = _pools()
    memory, schedule = get_memory(), get_schedule()
    params = CacheInitParams(
        disable=memory.disable_radix_cache,
        req_to_token_pool=req_pool,
        token_to_kv_pool_allocator=allocator,
        page_size=schedule.page_size,
        tp_cache_group=None,
        eviction_policy=memory.radix_eviction_policy,
        eviction_policy_config=memory.radix_eviction_policy_config,
        chunked_prefill_size=schedule.chunked_prefill_size,
    )
    ctx = TreeCacheBuildContext(
        server_args=server_args,
        params=params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=memory.enable_hierarchical_cache,
        disable_radix_cache=memory.disable_radix_cache,
        tp_worker=_Worker(),
        model_config=model_config,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )
    cache = registry.create_tree_cache(ctx)
    cache._test_vocab = model_config.vocab_size
    return cache


def _finish_hiradix(cache, rid, tokens) -> float:
    """One request whose prompt is ``tokens``: matched, its new tokens' KV allocated, then finished through SGLang's
    cache_finished_req (timed)."""
    req = Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=1))
    req.init_next_round_input(cache)
    cache.inc_lock_ref(req.last_node)
    prefix = len(req.prefix_indices)
    cache.req_to_token_pool.alloc([req])
    new = cache.token_to_kv_pool_allocator.alloc(len(tokens) - prefix)
    cache.req_to_token_pool.write((req.req_pool_idx, slice(0, len(tokens))), torch.cat([req.prefix_indices, new]))
    req.cache_protected_len = prefix
    t = time.thread_time()
    cache.cache_finished_req(req, kv_len_to_handle=len(tokens))
    spent = time.thread_time() - t
    cache.req_to_token_pool.free(req)
    return spent


def _finish_unified(cache, rid, tokens) -> float:
    """The same through 0.5.21+'s calls: match, lock, row and KV allocation, then release_kv_cache (timed), which
    checkpoints the finished request into the tree and releases it (mem_cache/common.py)."""
    from sglang.srt.mem_cache.common import release_kv_cache

    sampling = SamplingParams(max_new_tokens=1)
    sampling.normalize(None)
    req = Req(rid, "", array("q", tokens), sampling, vocab_size=cache._test_vocab)
    req.init_next_round_input(cache)
    req.lock = cache.lock(req.last_node)
    prefix = req.prefix_len
    cache.req_to_token_pool.alloc([req])
    new = cache.token_to_kv_pool_allocator.alloc(len(tokens) - prefix)
    cached = cache.path_device_indices(req.last_node)[:prefix].to(torch.int64)
    cache.req_to_token_pool.write(
        (req.kv.req_pool_idx, slice(0, len(tokens))), torch.cat([cached, new.to(torch.int64)])
    )
    req.kv.kv_allocated_len = req.kv.kv_committed_len = len(tokens)
    req.output_ids.append(5)
    req.update_finish_state()
    assert req.finished()
    t = time.thread_time()
    release_kv_cache(req, cache, checkpoint=True)
    return time.thread_time() - t


BUILD, FINISH = {"hiradix": (_build_hiradix, _finish_hiradix), "unified": (_build_unified, _finish_unified)}[GEN]


def _tokens(r: int, n: int = REQ_TOKENS) -> list[int]:
    """Request r's prompt: its own tokens from the first on (no shared prefix: 32 leaves of 32k tokens)."""
    return [(r * 7919 + i) % 30000 + 1 for i in range(n - 1)] + [30001 + r]


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    cache = BUILD(tmp_path_factory.mktemp("page1"))
    cache.write_through_threshold = 1 << 40  # the module docstring: no host/storage copies during the timings
    backend = cache.cache_controller.storage_backend
    assert backend is not None and backend.promoter is not None
    assert isinstance(
        cache.tree_core.eviction_strategy if GEN == "unified" else cache.eviction_strategy,
        radix_backend.PromoterEviction,
    )
    for r in range(REQUESTS):
        FINISH(cache, f"build{r}", _tokens(r))
    # the report tick's scoring of the 10^6 pages just built (the reporter's thread would do it, sharing the GIL
    # with the timed calls): done here, so the timings below are the scheduler's own work
    backend.upkeep.push_scores()
    gc.collect()  # the build's garbage, not a timed call, pays for its collection
    yield cache, backend
    cache.shutdown()


def test_page1_evict_of_a_typical_batch_is_bounded(big_tree):
    cache, _ = big_tree
    assert cache.evictable_size() >= REQUESTS * REQ_TOKENS - REQUESTS  # the whole tree is evictable
    spent = []
    for _ in range(7):
        before = cache.evictable_size()
        t = time.thread_time()
        cache.evict(EvictParams(num_tokens=4096))  # a prefill chunk's worth: one 32k-token leaf goes
        spent.append(time.thread_time() - t)
        assert cache.evictable_size() < before
    print(f"page-1 evict of 4096 tokens, 10^6-token tree ({GEN}): ms", [round(s * 1e3, 2) for s in spent])
    assert statistics.median(spent) < EVICT_BOUND_S, [round(s * 1e3, 2) for s in spent]


def _timed(cls, name: str, acc: list):
    """``cls.name`` wrapped to add its calling thread's CPU time to ``acc[0]``."""
    inner = getattr(cls, name)

    def wrapper(self, *a, **k):
        t = time.thread_time()
        try:
            return inner(self, *a, **k)
        finally:
            acc[0] += time.thread_time() - t

    return wrapper


def test_page1_finishing_a_32k_token_request_is_bounded(big_tree, monkeypatch):
    """kvdrive's own work in finishing a request (its chain keys, the promoter's observation, attention per unit)
    stays under the issue's 5 ms. The whole call also runs SGLang's own tree work (a 32k-token match and insert in
    its Python tree core), which on this shared 2-core machine varies with the load on the other core: it gets a
    3x margin (the cost this guards was 48-139 ms)."""
    cache, backend = big_tree
    spent, ours = [], []
    for r in range(REQUESTS - 5, REQUESTS):  # leaves the eviction test did not take (it takes the oldest)
        tokens = _tokens(r) + [30100 + k for k in range(16)]  # a next turn: the cached 32k prompt + 16 new tokens
        mass = np.full(len(tokens), 1.0 / len(tokens))  # the request's attention, per page, as the capture pops it
        monkeypatch.setattr(CAPTURE, "pop", lambda slot, m=mass: m)
        acc = [0.0]
        for name in ("_kvdrive_chain_keys", "_kvdrive_finished"):
            monkeypatch.setattr(type(cache), name, _timed(type(cache), name, acc))
        seen = backend.promoter.stats()
        spent.append(FINISH(cache, f"turn{r}", tokens))
        ours.append(acc[0])
        monkeypatch.undo()
        # the promoter saw the whole chain (every page of it, nothing forgotten) and its attention
        now = backend.promoter.stats()
        assert now["accesses"] - seen["accesses"] == len(tokens) and now["forgotten"] == 0
        assert now["attention_updates"] > seen["attention_updates"]
    print(
        f"page-1 finish of a 32k-token request ({GEN}): ms",
        [round(s * 1e3, 2) for s in spent],
        "kvdrive's part:",
        [round(s * 1e3, 2) for s in ours],
    )
    assert 0 < statistics.median(ours) < FINISH_BOUND_S, [round(s * 1e3, 2) for s in ours]
    assert statistics.median(spent) < 3 * FINISH_BOUND_S, [round(s * 1e3, 2) for s in spent]
