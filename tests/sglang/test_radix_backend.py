"""The kvdrive radix-cache backend on SGLang's HiRadixCache generation (0.5.17 - 0.5.20), on real objects, on CPU.

Caches are built through SGLang's radix-cache registry from real CPU pools (ReqToTokenPool, MHATokenToKVPool,
TokenToKVPoolAllocator) with hierarchical cache on; requests are real ``Req`` objects driven through the cache the way
SGLang's scheduler drives them (match, storage prefetch, load-back, finish); L3 is SGLang's ``dynamic`` storage backend
loading :class:`PageStore` below (a dict-backed ``HiCacheStorage``, interface_v1, like kvdrive's own). The only
stand-in is the model worker, of which the factory uses one method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from array import array

import pytest

pytest.importorskip("sglang")
pytest.importorskip(
    "sglang.srt.mem_cache.hiradix_cache",
    reason="HiRadixCache is gone from SGLang 0.5.21 on: tests/sglang/test_unified_cache.py covers that generation",
)

import torch  # noqa: E402

from kvdrive_sglang import cpu_fallbacks, radix_backend  # noqa: E402
from kvdrive_sglang.compat import hiradix  # noqa: E402
from kvdrive_sglang.tier.tenants import Tenants  # noqa: E402

cpu_fallbacks.install()  # unpinned host pools and torch page copies on a machine without a GPU

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InitLoadBackParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # noqa: E402
from sglang.srt.mem_cache.hiradix_cache import HiRadixCache  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402
from sglang.srt.mem_cache.registry import TreeCacheBuildContext  # noqa: E402
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

_sglang_get_hash_str = getattr(get_hash_str, "__wrapped__", get_hash_str)  # SGLang's own, not kvdrive's hook
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

PAGE = 4
LAYERS = 2
PROMPT = list(range(1000, 1016))  # four pages
TAIL = [7]  # SGLang never serves the last prompt token from cache: prompts are PROMPT + TAIL


# ----------------------------------------------------------------------------------------------- L3 test backend


class PageStore(HiCacheStorage):
    """A dict-backed SGLang storage backend (interface_v1). Instances naming the same ``store`` share their pages, as
    a restarted server shares its disk. Implements kvdrive's radix-cache contract, as kvdrive's KvdriveStorage does."""

    SHARED: dict[str, dict] = {}

    def __init__(self, storage_config, kwargs=None):
        name = storage_config.extra_config["store"]
        self.pages = self.SHARED.setdefault(name, {})
        self.written: list[str] = []  # keys in write order, this instance
        self.events: list[tuple[str, int]] = []
        self.requests: list[list[str]] = []
        self.host_evicted: list[str] = []

    # kvdrive's radix-cache contract (kvdrive_sglang.contract.RadixReports): the cache reports to a backend that
    # implements all of it; no promoter here (eviction stays SGLang's LRU), no operator tenant policy
    promoter = None
    tenants = None

    def expect_whole_requests(self) -> None:
        pass

    def record_radix_event(self, kind: str, tokens: int) -> None:
        self.events.append((kind, tokens))

    def record_request(self, keys) -> None:
        self.requests.append(list(keys))

    def record_attention(self, key_mass) -> None:
        pass

    def record_host_evicted(self, keys) -> None:
        self.host_evicted.extend(keys)

    def batch_set_v1(self, keys, host_indices, extra_info=None):
        for i, key in enumerate(keys):
            self.pages[key] = self.mem_pool_host.get_data_page(int(host_indices[i * PAGE]), flat=True).clone()
            self.written.append(key)
        return [True] * len(keys)

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        ok = []
        for i, key in enumerate(keys):
            page = self.pages.get(key)
            if page is not None:
                self.mem_pool_host.set_from_flat_data_page(int(host_indices[i * PAGE]), page)
            ok.append(page is not None)
        return ok

    def exists(self, key):
        return key in self.pages

    def get(self, key, target_location=None, target_sizes=None):
        return self.pages.get(key)

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        return [self.pages.get(k) for k in keys]

    def set(self, key, value=None, target_location=None, target_sizes=None):
        self.pages[key] = value
        return True

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        for k, v in zip(keys, values):
            self.pages[k] = v
        return True


# ------------------------------------------------------------------------------------------------------ fixtures


class _Worker:
    """Stands in for SGLang's TpModelWorker, of which the factory calls one method (as SGLang's default does)."""

    def __init__(self):
        self.counters = []

    def register_hicache_layer_transfer_counter(self, counter):
        self.counters.append(counter)


@pytest.fixture(scope="module", autouse=True)
def _group(process_group):  # tests/sglang/conftest.py
    yield


def _ctx(hicache=True, store=None, worker=None):
    kv = MHATokenToKVPool(
        size=512,
        page_size=PAGE,
        dtype=torch.float16,
        head_num=2,
        head_dim=8,
        layer_num=LAYERS,
        device="cpu",
        enable_memory_saver=False,
    )
    allocator = TokenToKVPoolAllocator(size=512, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False)
    req_pool = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
    storage = {}
    if store is not None:
        storage = dict(
            hicache_storage_backend="dynamic",
            hicache_storage_prefetch_policy="wait_complete",
            hicache_storage_backend_extra_config=json.dumps(
                {
                    "backend_name": "kvdrive-test",
                    "module_path": __name__,
                    "class_name": "PageStore",
                    "interface_v1": 1,
                    "prefetch_threshold": PAGE,
                    "store": store,
                }
            ),
        )
    server_args = ServerArgs(
        model_path="dummy",
        device="cpu",
        page_size=PAGE,
        enable_hierarchical_cache=hicache,
        hicache_ratio=2.0,
        hicache_io_backend="direct",
        hicache_mem_layout="layer_first",
        hicache_write_policy="write_through",
        radix_cache_backend="kvdrive",
        **storage,
    )
    params = CacheInitParams(
        disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator, page_size=PAGE
    )
    return TreeCacheBuildContext(
        server_args=server_args,
        params=params,
        is_hybrid_swa=False,
        is_hybrid_ssm=False,
        enable_hierarchical_cache=hicache,
        disable_radix_cache=False,
        effective_chunked_prefill_size=server_args.chunked_prefill_size,
        tp_worker=worker or _Worker(),
        model_config=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    )


def _build(**kw):
    return registry.get_radix_cache_factory("kvdrive")(_ctx(**kw))


@pytest.fixture
def caches():
    built = []

    def make(**kw):
        cache = _build(**kw)
        built.append(cache)
        return cache

    yield make
    for cache in built:
        if isinstance(cache, HiRadixCache):
            cache.shutdown()  # stops the storage threads


# ------------------------------------------------------------------------------------- driving a request through


def _kv_value(token: int) -> float:
    return float(token % 997) / 4.0  # exact in fp16


def _wait(pred, what, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _settle(cache):
    """Run the scheduler's per-step HiCache bookkeeping (check_hicache_events) until the background work is done:
    device->host write-through acks, which queue host->storage backups, and the backups' acks."""

    def idle():
        cache.check_hicache_events()
        return not cache.ongoing_write_through and not cache.ongoing_backup

    _wait(idle, "HiCache background work")


def serve(cache, rid, salt, prompt=PROMPT):
    """One prefill-only request, in the order SGLang's scheduler calls the tree cache (scheduler._prefetch_kvcache,
    get_new_batch_prefill, PrefillAdder.add_one_req, ScheduleBatch.prepare_for_extend, release_kv_cache)."""
    tokens = list(prompt) + TAIL
    req = Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=1), extra_key=salt)
    req.init_next_round_input(cache)
    if cache.enable_storage and (cache.is_backuped(req.last_host_node) or cache.is_root(req.last_host_node)):
        matched = len(req.prefix_indices) + req.host_hit_length
        new_tokens = req.full_untruncated_fill_ids[matched : req._compute_max_prefix_len(len(tokens))]
        cache.prefetch_from_storage(rid, req.last_host_node, new_tokens, cache.get_last_hash_value(req.last_host_node))

        def prefetch_done():
            cache.check_hicache_events()
            return cache.check_prefetch_progress(rid)

        _wait(prefetch_done, "prefetch")
        req.storage_hit_length = cache.pop_prefetch_loaded_tokens(rid)
        req.init_next_round_input(cache)
    if req.host_hit_length > 0:
        new_indices, req.last_node = cache.init_load_back(
            InitLoadBackParams(best_match_node=req.best_match_node, host_hit_length=req.host_hit_length, req=req)
        )
        req.prefix_indices = torch.cat([req.prefix_indices, new_indices])
        cache.ready_to_load_host_cache()  # host -> device copies (synchronous on CPU)
        cache.check_hicache_events()
    cache.inc_lock_ref(req.last_node)
    # ScheduleBatch.prepare_for_extend's per-request cache breakdown (0.5.17)
    storage = min(req.host_hit_length, req.storage_hit_length)
    req.cached_tokens_device = max(0, len(req.prefix_indices) - req.host_hit_length)
    req.cached_tokens_host = req.host_hit_length - storage
    req.cached_tokens_storage = storage
    req._cache_breakdown_computed = True
    # the forward pass: KV for the uncached tokens
    kv = cache.token_to_kv_pool_allocator.get_kvcache()
    prefix = len(req.prefix_indices)
    new = cache.token_to_kv_pool_allocator.alloc(len(tokens) - prefix)
    values = torch.tensor([_kv_value(t) for t in tokens[prefix:]], dtype=torch.float16).view(-1, 1, 1)
    for layer in range(LAYERS):
        kv.k_buffer[layer][new] = values
        kv.v_buffer[layer][new] = -values
    cache.req_to_token_pool.alloc([req])
    cache.req_to_token_pool.write((req.req_pool_idx, slice(0, len(tokens))), torch.cat([req.prefix_indices, new]))
    req.cache_protected_len = prefix
    # KV of the cached prefix as the model would read it
    device_kv = kv.k_buffer[0][req.prefix_indices.long()].flatten(1)[:, 0].tolist()
    cache.cache_finished_req(req, kv_len_to_handle=len(tokens))
    cache.req_to_token_pool.free(req)
    _settle(cache)
    return req, device_kv


def chain(tokens, salt):
    """Storage keys for pages of tokens, from SGLang's own hash function: a salted chain starts from the salt's
    digest, and each of its keys ends with the tenant id (16 hex digits, tier/tenants.py)."""
    if salt is None:
        return get_hash_str(tokens, None, page_size=PAGE)
    prior = hashlib.sha256(b"kvdrive-salt\0" + salt.encode()).hexdigest()
    tag = hashlib.blake2b(b"kvdrive-tenant\0" + salt.encode(), digest_size=8).hexdigest()
    return [h + tag for h in _sglang_get_hash_str(tokens, prior, page_size=PAGE)]


# --------------------------------------------------------------------------------------------------------- tests


def test_register_is_idempotent():
    radix_backend.register()
    radix_backend.register()
    assert "kvdrive" in registry.registered_radix_cache_backends()
    assert registry.get_radix_cache_factory("kvdrive") is hiradix.build_tree_cache


def test_factory_builds_kvdrive_hiradix():
    worker = _Worker()
    cache = registry.get_radix_cache_factory("kvdrive")(_ctx(worker=worker))
    try:
        assert isinstance(cache, hiradix.KvdriveRadixCache) and isinstance(cache, HiRadixCache)
        assert worker.counters == [cache.cache_controller.layer_done_counter]
        assert cache.kvdrive_stats() == dict.fromkeys(radix_backend.EVENT_KINDS, 0)
    finally:
        cache.shutdown()


def test_factory_without_hierarchical_cache_is_sglang_default(caplog):
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        cache = _build(hicache=False)
    assert type(cache) is RadixCache  # what SGLang's default chain builds
    assert any("needs --enable-hierarchical-cache" in r.getMessage() for r in caplog.records)


def test_factory_leaves_unified_radix_cache_to_sglang(monkeypatch, caplog):
    monkeypatch.setenv("SGLANG_ENABLE_UNIFIED_RADIX_TREE", "1")
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        cache = _build()
    assert type(cache) is UnifiedRadixCache  # with its HiCache controller, as SGLang builds it
    assert cache.cache_controller is not None
    assert any("HiRadixCache only" in r.getMessage() for r in caplog.records)


def test_unsalted_keys_are_sglangs_and_salted_keys_differ(caches):
    cache = caches(store="keys")
    store = cache.cache_controller.storage_backend
    serve(cache, "none", None)
    _wait(lambda: len(store.written) == 4, "4 unsalted pages")
    serve(cache, "a", "tenant-a")
    _wait(lambda: len(store.written) == 8, "4 pages of tenant-a")
    serve(cache, "b", "tenant-b")
    _wait(lambda: len(store.written) == 12, "4 pages of tenant-b")
    plain, salted_a, salted_b = store.written[:4], store.written[4:8], store.written[8:]

    # no salt: exactly SGLang's chain, so pages written by plain SGLang still match
    assert plain == get_hash_str(PROMPT, None, page_size=PAGE)
    # salts: different keys for the same tokens, pinned to the documented salt digest
    assert salted_a == chain(PROMPT, "tenant-a")
    assert salted_b == chain(PROMPT, "tenant-b")
    assert len(set(plain) | set(salted_a) | set(salted_b)) == 12
    assert Tenants().root_prior("") is None and Tenants().root_prior(None) is None  # empty salt: SGLang's keys

    # a longer prompt of the same tenant extends its chain from the salted parent node
    serve(cache, "a-long", "tenant-a", PROMPT + list(range(50, 58)))
    _wait(lambda: len(store.written) == 14, "2 more pages of tenant-a")
    assert store.written[12:] == chain(PROMPT + list(range(50, 58)), "tenant-a")[4:]

    # same salt after a restart (fresh cache and backend): the same keys
    again = caches(store="keys-restart")
    serve(again, "a2", "tenant-a")
    _wait(lambda: len(again.cache_controller.storage_backend.written) == 4, "4 pages after restart")
    assert again.cache_controller.storage_backend.written == salted_a


def test_prefetch_only_serves_the_writing_tenant(caches):
    first = caches(store="prefetch")
    serve(first, "w", "tenant-a")
    _wait(lambda: len(first.cache_controller.storage_backend.written) == 4, "tenant-a pages written")
    first.shutdown()

    cache = caches(store="prefetch")  # "restart": empty tree, same store
    store = cache.cache_controller.storage_backend
    assert cache.query_storage_hit_length(cache.root_node, PROMPT) == 0  # no match seen: unsalted lookup

    req, _ = serve(cache, "b", "tenant-b")
    assert req.storage_hit_length == 0 and req.cached_tokens_device == 0

    cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", PROMPT + TAIL), "tenant-a")))
    assert cache.query_storage_hit_length(cache.root_node, PROMPT) == 16
    req, device_kv = serve(cache, "a", "tenant-a")
    assert req.storage_hit_length == 16 and req.cached_tokens_storage == 16
    assert device_kv == [_kv_value(t) for t in PROMPT]  # the tenant's own KV, through storage, host and load-back

    # the prefetched pages were filed under the tenant's salt, not in the unsalted part of the tree
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", PROMPT + TAIL), None)))
    assert len(m.device_indices) == 0 and m.host_hit_length == 0
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", PROMPT + TAIL), "tenant-a")))
    assert len(m.device_indices) == 16

    req, _ = serve(cache, "plain", None)
    assert req.storage_hit_length == 0  # tenant-a's pages do not serve unsalted requests

    stats = cache.kvdrive_stats()
    assert stats["storage_hit"] == 16 and stats["loaded_back"] == 16
    assert ("storage_hit", 16) in store.events and ("loaded_back", 16) in store.events

    # a prefetch for a request whose salt was never seen is skipped, not guessed
    cache.prefetch_from_storage("never-matched", cache.root_node, PROMPT, None)
    assert "never-matched" not in cache.ongoing_prefetch


def test_events_count_hits_evictions_and_load_backs(caches):
    cache = caches()  # no storage backend: events go to the cache's own counters
    assert cache.cache_controller.storage_backend is None

    serve(cache, "r1", "t")
    assert cache.kvdrive_stats() == {
        "device_hit": 0,
        "host_hit": 0,
        "storage_hit": 0,
        "evicted": 0,
        "written_back": 16,
        "loaded_back": 0,
    }  # write-through of the new prefix

    req, _ = serve(cache, "r2", "t")
    assert req.cached_tokens_device == 16
    assert cache.kvdrive_stats()["device_hit"] == 16

    evicted = cache.evict(EvictParams(num_tokens=10_000)).num_tokens_evicted
    assert evicted >= 16
    assert cache.kvdrive_stats()["evicted"] == evicted

    req, device_kv = serve(cache, "r3", "t")
    assert req.cached_tokens_host == 16
    assert device_kv == [_kv_value(t) for t in PROMPT]
    stats = cache.kvdrive_stats()
    assert stats["host_hit"] == 16 and stats["loaded_back"] == 16 and stats["device_hit"] == 16


def test_with_kvdrive_storage_across_restart(tmp_path):
    """The same, with kvdrive's own storage backend (as --kv-tier kvdrive configures it) and a restart in between."""
    from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config

    def build():
        ctx = _ctx(store="unused")
        extra = json.loads(storage_extra_config(KvdriveOptions(dir=str(tmp_path), host_gb=0.01, disk_gb=1)))
        ctx.server_args.hicache_storage_backend_extra_config = json.dumps({**extra, "prefetch_threshold": PAGE})
        cache = registry.get_radix_cache_factory("kvdrive")(ctx)
        caches_built.append(cache)
        return cache

    caches_built = []
    try:
        first = build()
        serve(first, "a1", "tenant-a")
        serve(first, "a2", "tenant-a")
        assert first.cache_controller.storage_backend.tier_stats()["radix"] == {"written_back": 16, "device_hit": 16}
        first.shutdown()

        cache = build()
        assert serve(cache, "b", "tenant-b")[0].storage_hit_length == 0
        req, device_kv = serve(cache, "a", "tenant-a")
        assert req.storage_hit_length == 16 and device_kv == [_kv_value(t) for t in PROMPT]
        radix = cache.cache_controller.storage_backend.tier_stats()["radix"]
        assert radix["storage_hit"] == 16 and radix["loaded_back"] == 16
    finally:
        for c in caches_built:
            c.shutdown()


def _kvdrive_cache(tmp_path):
    """kvdrive's radix cache over a real KvdriveStorage in ``tmp_path`` (a 10 MiB DRAM tier, prefetch at one page)."""
    from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config

    ctx = _ctx(store="unused")
    extra = json.loads(storage_extra_config(KvdriveOptions(dir=str(tmp_path), host_gb=0.01, disk_gb=1)))
    ctx.server_args.hicache_storage_backend_extra_config = json.dumps({**extra, "prefetch_threshold": PAGE})
    return registry.get_radix_cache_factory("kvdrive")(ctx)


def test_gpu_eviction_follows_the_promoters_value(tmp_path):
    """Two cached prompts; the older one received attention: eviction takes the newer, unattended one first
    (plain LRU would take the older)."""
    cache = _kvdrive_cache(tmp_path)
    try:
        assert isinstance(cache.eviction_strategy, radix_backend.PromoterEviction)
        older, newer = [7] * 16, [9] * 16
        backend = cache.cache_controller.storage_backend
        old_keys = chain(older, None)
        serve(cache, "old", None, prompt=older)
        reuse_before = backend.promoter.reuse(old_keys[0])
        serve(cache, "old-again", None, prompt=older)  # a device hit: no storage call, still an access
        assert backend.promoter.reuse(old_keys[0]) == reuse_before + 1
        serve(cache, "new", None, prompt=newer)  # now the newest: plain LRU would evict "older" first
        backend.record_attention({k: 0.5 for k in old_keys})
        cache.evict(EvictParams(num_tokens=16))
        old_hit = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", older)))).device_indices
        new_hit = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", newer)))).device_indices
        assert len(old_hit) == 16 and len(new_hit) < 16, (len(old_hit), len(new_hit))
    finally:
        cache.shutdown()


def test_host_evictions_reach_kvdrive_storage_as_promotion_candidates(tmp_path):
    """Pages leaving SGLang's host pool are handed to kvdrive's storage backend (record_host_evicted): the promoter
    may bring the valuable ones back up from disk into kvdrive's DRAM ahead of the next request for them."""
    cache = _kvdrive_cache(tmp_path)
    try:
        backend = cache.cache_controller.storage_backend
        serve(cache, "a", "tenant-a")
        assert not backend.upkeep.spilled
        cache.evict(EvictParams(num_tokens=10_000))  # GPU copies go; the host pool still holds the pages
        assert not backend.upkeep.spilled
        cache.evict_host(10_000)
        assert list(backend.upkeep.spilled) == chain(PROMPT, "tenant-a")  # the salted, tenant-tagged keys
    finally:
        cache.shutdown()


def test_host_eviction_keeps_pages_loaded_for_requests_not_yet_run(tmp_path):
    """Pages kvdrive loaded into SGLang's host pool for requests still waiting are evicted after every other page,
    the latest loaded first; SGLang's LRU took the earliest loaded, whose request runs next (awaiting_use.py)."""
    cache = _kvdrive_cache(tmp_path)
    try:
        backend = cache.cache_controller.storage_backend
        older, newer = [7] * 16, [9] * 16
        serve(cache, "old", None, prompt=older)
        serve(cache, "new", None, prompt=newer)
        cache.evict(EvictParams(num_tokens=10_000))  # the device copies go; SGLang's host pool holds both prompts

        def on_host(tokens):
            return cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens + TAIL)))).host_hit_length

        assert on_host(older) >= 16 and on_host(newer) >= 16
        backend.awaiting.loaded(chain(older, None))  # loaded again for waiting requests, the older first
        backend.awaiting.loaded(chain(newer, None))
        cache.evict_host(1)
        assert on_host(older) >= 16 and on_host(newer) == 0  # LRU would have taken the older
        backend.record_request(chain(older, None))  # its request ran: an ordinary page again
        cache.evict_host(1)
        assert on_host(older) == 0
    finally:
        cache.shutdown()
