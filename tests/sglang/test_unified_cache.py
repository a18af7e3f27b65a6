"""kvdrive's radix cache on SGLang's UnifiedRadixCache generation (0.5.21 on), on real SGLang objects, on CPU.

What SGLang's scheduler process builds, built the way it builds it: ServerArgs (through kvdrive's own ``--kv-tier
kvdrive`` expansion, flags.expand_kwargs) published into SGLang's runtime context, a ModelConfig read from a model
directory (a config.json only: nothing here runs the model), the device pools sized from it (MHATokenToKVPool,
ReqToTokenPool, and the PagedTokenToKVPoolAllocator SGLang uses for --page-size > 1), CacheInitParams and a
TreeCacheBuildContext as mem_cache/kv_cache_builder.py fills them, and the cache from registry.create_tree_cache,
which calls the registered ``kvdrive`` factory. L3 is kvdrive's KvdriveStorage (real tier engine, LMDB index,
segment files) loaded by SGLang's ``dynamic`` storage backend.

Requests are real ``Req`` objects taken through SGLang's own code in the scheduler's order (see Server.serve):
storage prefetch, the prefetch poll, PrefillAdder.add_one_req (match, load-back, lock), ScheduleBatch.init_new /
prepare_for_extend (slots, cache-hit breakdown), the prefill's output token and finish check, and
mem_cache.common.release_kv_cache (checkpoint into the tree, release), with the scheduler's per-step
check_hicache_events in between. The stand-ins: the forward pass (it writes each new token's K/V, a value derived
from the token, into the device pool, and reads the cached prefix's K/V as attention would) and the tp_worker, of
which the factory calls one method.
"""
from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import logging
import time
from array import array
from typing import NamedTuple

import pytest

pytest.importorskip("sglang")

from kvdrive_sglang.compat import radix_adapter, sglang_version  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402

try:
    _GENERATION = radix_adapter().name
except ConfigError as e:  # an SGLang with neither generation's seams
    pytest.skip(str(e), allow_module_level=True)
if _GENERATION != "unified":
    pytest.skip(f"SGLang {sglang_version()} is the {_GENERATION!r} radix-cache generation, not the unified one: "
                "tests/sglang/test_radix_backend.py and test_tenant_keys.py cover it", allow_module_level=True)

import torch  # noqa: E402

from kvdrive_sglang import cpu_fallbacks, radix_backend  # noqa: E402
from kvdrive_sglang.compat import unified  # noqa: E402
from kvdrive_sglang.flags import expand_kwargs  # noqa: E402
from kvdrive_sglang.storage_backend import KvdriveStorage  # noqa: E402
from kvdrive_sglang.tier.tenants import group_id, tenant_id  # noqa: E402

cpu_fallbacks.install()  # unpinned host pools and torch page copies on a machine without a GPU (a no-op with one)

from sglang.srt.configs.model_config import ModelConfig  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder  # noqa: E402
from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker  # noqa: E402
from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.mem_cache import utils as sglang_utils  # noqa: E402
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.common import release_kv_cache  # noqa: E402
from sglang.srt.mem_cache.evict_policy import LFUStrategy  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache  # noqa: E402
from sglang.srt.mem_cache.unified_cache.components import ComponentType  # noqa: E402
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: E402
from sglang.srt.runtime_context import (get_memory, get_schedule, publish, restore_context,  # noqa: E402
                                        snapshot_context)
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

PAGE = 4
PROMPT = list(range(1000, 1016))  # four pages
EXT = list(range(2000, 2008))  # two more pages after PROMPT
TAIL = [7]  # SGLang never serves a prompt's last token from cache: prompts are ... + TAIL
OUT = 5  # the prefill's output token
EVENTS_ZERO = dict.fromkeys(radix_backend.EVENT_KINDS, 0)


# --------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def _group(process_group):  # tests/sglang/conftest.py: gloo group, kvdrive's backend registered, TP=1 topology
    yield


@pytest.fixture(scope="module", autouse=True)
def _runtime_context():
    """Each Server publishes its ServerArgs (as SGLang's scheduler process does); put back what was there."""
    saved = snapshot_context()
    yield
    restore_context(saved)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory as SGLang reads it: config.json only (2 layers, 2 KV heads of 8). No weights: no forward."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                intermediate_size=32, vocab_size=1024, max_position_embeddings=512,
                architectures=["LlamaForCausalLM"], torch_dtype="float16").save_pretrained(path)
    return str(path)


@pytest.fixture
def servers(model_dir):
    made = []

    def make(store, **kw):
        srv = Server(store, model_dir, **kw)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.shutdown()


class _Worker:
    """Stands in for SGLang's tp_worker: the factory hands it the HiCache layer-transfer counter."""

    def __init__(self):
        self.counters = []

    def register_hicache_layer_transfer_counter(self, counter):
        self.counters.append(counter)


def _wait(pred, what, timeout=20.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _kv_values(tokens) -> torch.Tensor:
    """The K the stand-in forward pass writes for ``tokens`` (V is its negation); exact in fp16."""
    return torch.tensor([float(t % 997) / 4.0 for t in tokens], dtype=torch.float16)


class Served(NamedTuple):
    req: Req
    prefix_kv: list  # per layer: (K, V) of the cached prefix's rows, as attention reads them in the forward pass


class Server:
    """kvdrive's radix cache + KvdriveStorage as an SGLang 0.5.23 scheduler process builds them (module docstring)."""

    def __init__(self, store, model_dir, *, hicache=True, eviction_policy=None, tenants=None):
        kw = dict(model_path=model_dir, device="cpu", page_size=PAGE, hicache_ratio=2.0,
                  hicache_write_policy="write_through", hicache_storage_prefetch_policy="wait_complete")
        if hicache:
            opts = {"kv_tier": "kvdrive", "kvdrive_dir": str(store), "kvdrive_host_gb": "0.01",
                    "kvdrive_disk_gb": "1"}
            if tenants is not None:
                opts["kvdrive_tenants"] = json.dumps(tenants)
            tier = expand_kwargs(opts, gpu=False)  # what sglang.Engine(kv_tier="kvdrive", ...) passes ServerArgs
            extra = json.loads(tier["hicache_storage_backend_extra_config"])
            extra["prefetch_threshold"] = PAGE  # SGLang's default (256 tokens) is longer than these prompts
            tier["hicache_storage_backend_extra_config"] = json.dumps(extra)
            kw.update(tier)
        else:
            kw["radix_cache_backend"] = "kvdrive"  # the backend, without --enable-hierarchical-cache
        if eviction_policy is not None:
            kw["radix_eviction_policy"] = eviction_policy
        self.server_args = ServerArgs(**kw)
        publish(self.server_args, role="scheduler")
        self.model_config = ModelConfig.from_server_args(self.server_args)
        mc = self.model_config
        kv = MHATokenToKVPool(size=512, page_size=PAGE, dtype=torch.float16, head_num=mc.get_num_kv_heads(1),
                              head_dim=mc.head_dim, layer_num=mc.num_hidden_layers, device="cpu",
                              enable_memory_saver=False)
        allocator = PagedTokenToKVPoolAllocator(size=512, page_size=PAGE, dtype=torch.float16, device="cpu",
                                                kvcache=kv, need_sort=False)
        req_pool = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
        memory, schedule = get_memory(), get_schedule()
        params = CacheInitParams(  # the single-rank subset of kv_cache_builder.py's
            disable=memory.disable_radix_cache, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
            page_size=schedule.page_size, eviction_policy=memory.radix_eviction_policy,
            eviction_policy_config=memory.radix_eviction_policy_config,
            chunked_prefill_size=schedule.chunked_prefill_size)
        self.worker = _Worker()
        self.ctx = TreeCacheBuildContext(
            server_args=self.server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
            enable_hierarchical_cache=memory.enable_hierarchical_cache,
            disable_radix_cache=memory.disable_radix_cache, tp_worker=self.worker, model_config=mc, tp_size=1,
            tp_rank=0, tp_group=None)
        self.cache = create_tree_cache(self.ctx)  # -> registry.get_radix_cache_factory("kvdrive")(ctx)
        self.backend = getattr(self.cache.cache_controller, "storage_backend", None)
        self.written: list[str] = []  # page keys as SGLang's controller hands them to the backend, in order
        self.reported: list[list[str]] = []  # record_request calls: each a finished request's chain
        if self.backend is not None:
            _spy(self.backend, "batch_set_v1", lambda keys, *a, **k: self.written.extend(keys))
            _spy(self.backend, "record_request", lambda keys: self.reported.append(list(keys)))
        self._closed = False

    # --- the scheduler's calls, in its order -------------------------------------------------------------------
    def serve(self, rid, prompt=PROMPT, *, extra_key=None, cache_salt=None) -> Served:
        """One prefill-only request (max_new_tokens=1), from arrival to release."""
        cache = self.cache
        sampling = SamplingParams(max_new_tokens=1)
        sampling.normalize(None)  # the tokenizer manager's step (no tokenizer: token ids in)
        req = Req(rid, "", array("q", list(prompt) + TAIL), sampling, vocab_size=self.model_config.vocab_size,
                  extra_key=extra_key, cache_salt=cache_salt)
        self._prefetch_kvcache(req)  # Scheduler._add_request_to_queue
        # Scheduler.get_new_batch_prefill
        handle = req.cache_request_handle

        def prefetched():
            cache.check_hicache_events()  # once per scheduler loop iteration
            return cache.check_prefetch_progress(handle)

        _wait(prefetched, f"{rid}: storage prefetch")
        loaded_tokens, loaded_start = cache.pop_prefetch_loaded_span(handle)
        if loaded_tokens > 0:
            req.storage_hit_length = loaded_tokens
            req.storage_hit_start = loaded_start
            req.host_hit_is_storage = False
        req.init_next_round_input(cache)
        schedule = get_schedule()
        adder = PrefillAdder(PAGE, cache, cache.token_to_kv_pool_allocator, ScheduleBatch(reqs=[], batch_is_full=False),
                             NewTokenRatioTracker.from_config().current, schedule.max_prefill_tokens,
                             schedule.chunked_prefill_size)
        assert adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) == AddReqResult.CONTINUE
        assert adder.can_run_list == [req]
        cache.storage_prefetch_retries.cancel(req.rid)
        batch = ScheduleBatch.init_new(adder.can_run_list, cache.req_to_token_pool, cache.token_to_kv_pool_allocator,
                                       cache, self.model_config, False, SpeculativeAlgorithm.NONE)
        consumer = cache.ready_to_load_host_cache()
        batch.prepare_for_extend()
        # the forward pass (stand-in): attention waits for the host->device load-back, reads the cached prefix and
        # writes the new tokens' K/V
        _wait(lambda: cache.is_load_back_event_done(consumer), f"{rid}: load-back")
        kv = cache.token_to_kv_pool_allocator.get_kvcache()
        rows = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :req.prefix_len].long()
        prefix_kv = [(kv.get_key_buffer(layer)[rows].clone(), kv.get_value_buffer(layer)[rows].clone())
                     for layer in range(kv.layer_num)]
        new = _kv_values(req.full_untruncated_fill_ids[req.prefix_len:req.extend_end]).view(-1, 1, 1)
        for layer in range(kv.layer_num):
            kv.get_key_buffer(layer)[batch.out_cache_loc] = new
            kv.get_value_buffer(layer)[batch.out_cache_loc] = -new
        # Scheduler.process_batch_result_prefill
        req.output_ids.append(OUT)
        req.update_finish_state()
        assert req.finished()
        release_kv_cache(req, cache, checkpoint=True)
        self.settle()
        return Served(req, prefix_kv)

    def _prefetch_kvcache(self, req):
        """Scheduler._prefetch_kvcache (scheduler.py), cache mode: a storage lookup of what the device and host
        tiers do not hold, anchored at the deepest host-backed node."""
        cache = self.cache
        req.init_next_round_input(cache, cow_mamba=False)
        last_host_node = req.last_host_node
        matched_len = req.prefix_len + req.host_hit_length
        req.storage_prefetch_last_match_len = matched_len
        if cache.is_backuped(last_host_node) or cache.is_root(last_host_node):
            match_end = req._compute_max_prefix_len(len(req.full_untruncated_fill_ids))
            cache.prefetch_from_storage(
                req.cache_request_handle, last_host_node, req.full_untruncated_fill_ids[matched_len:match_end],
                cache.get_last_hash_value(last_host_node),
                cache.get_prefix_hash_values(last_host_node) if cache.hicache_storage_pass_prefix_keys else None,
                matched_prefix_tokens=req.full_untruncated_fill_ids[:matched_len], extra_key=req.extra_key,
                cache_salt=req.cache_salt)

    def settle(self):
        """The scheduler's per-step check_hicache_events until HiCache's background work is done: device->host
        write-through acks, the host->storage backups they queue, and those backups' acks."""
        cache = self.cache

        def idle():
            cache.check_hicache_events()
            return not (cache.ongoing_write_through or cache.ongoing_backup or cache.ongoing_load_back)

        _wait(idle, "HiCache background work")

    def shutdown(self):
        if self._closed:
            return
        self._closed = True
        if self.cache.cache_controller is not None:
            self.cache.shutdown()  # detaches the storage backend: KvdriveStorage.close
            atexit.unregister(self.cache.shutdown)  # init_hicache registered it


def _spy(obj, name, record):
    """Record the arguments of ``obj.name`` calls, then make the real call."""
    real = getattr(obj, name)

    def call(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)

    setattr(obj, name, call)


# ------------------------------------------------------------------------------------------ expected keys

def sglang_keys(tokens, *, extra_key=None, cache_salt=None) -> list[str]:
    """Storage keys of ``tokens``' pages as SGLang itself names them: its own get_storage_hash_str, not kvdrive's
    hook on it (a namespace-seeded chain when the request has an extra_key or cache_salt)."""
    own = inspect.unwrap(sglang_utils.get_storage_hash_str)
    return own(RadixKey(array("q", tokens), extra_key, cache_salt=cache_salt), None, page_size=PAGE)


def tenant_keys(tokens, name, *, extra_key=None, cache_salt=None) -> list[str]:
    """SGLang's own keys of a salted request, each followed by the id of the tenant ``name``."""
    return [k + tenant_id(name) for k in sglang_keys(tokens, extra_key=extra_key, cache_salt=cache_salt)]


def group_keys(tokens, group) -> list[str]:
    """Keys of a share_as group member's pages: the chain from the group's root prior (tier/tenants.py, pinned
    here), each followed by the group's id."""
    own_hash = inspect.unwrap(sglang_utils.get_hash_str)
    prior = hashlib.sha256(b"kvdrive-group-prior\0" + group.encode()).hexdigest()
    return [k + group_id(group) for k in own_hash(array("q", tokens), prior, page_size=PAGE)]


def assert_prefix_kv(served: Served, tokens):
    """The cached prefix the forward pass read is exactly ``tokens``' K/V, in every layer."""
    want = _kv_values(tokens).view(-1, 1, 1).expand(-1, *served.prefix_kv[0][0].shape[1:])
    assert served.req.prefix_len == len(tokens)
    for k, v in served.prefix_kv:
        assert torch.equal(k, want) and torch.equal(v, -want)


# --------------------------------------------------------------------------------------------------------- tests

def test_factory_builds_kvdrive_cache_on_its_tree_core(tmp_path, servers):
    assert registry.get_radix_cache_factory("kvdrive") is unified.build_tree_cache
    srv = servers(tmp_path / "lru")
    cache = srv.cache
    assert type(cache) is unified.KvdriveUnifiedRadixCache and isinstance(cache, UnifiedRadixCache)
    assert cache._tree_core_backend == unified.TREE_CORE == "kvdrive"
    assert type(cache.tree_core) is unified.KvdriveTreeCore
    # SGLang's default LRU was asked for: kvdrive's value order instead
    assert get_memory().radix_eviction_policy == "lru"
    assert isinstance(cache.tree_core.eviction_strategy, radix_backend.PromoterEviction)
    assert cache.tree_core.eviction_strategy.cache is cache
    assert srv.worker.counters == [cache.cache_controller.layer_done_counter]
    assert type(srv.backend) is KvdriveStorage and cache.enable_storage
    assert cache.kvdrive_stats() == EVENTS_ZERO

    lfu = servers(tmp_path / "lfu", eviction_policy="lfu")
    assert type(lfu.cache) is unified.KvdriveUnifiedRadixCache and type(lfu.cache.tree_core) is unified.KvdriveTreeCore
    assert type(lfu.cache.tree_core.eviction_strategy) is LFUStrategy  # another policy: SGLang's own


def test_factory_without_hierarchical_cache_is_sglangs_default(tmp_path, servers, caplog):
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        srv = servers(tmp_path, hicache=False)
    assert type(srv.cache) is UnifiedRadixCache  # exactly what SGLang's default chain builds
    assert srv.cache.cache_controller is None and srv.worker.counters == []
    assert type(srv.cache.tree_core) is not unified.KvdriveTreeCore
    assert any("needs --enable-hierarchical-cache" in r.getMessage() for r in caplog.records)


def test_unsalted_keys_are_sglangs_salted_keys_its_namespace_chain_plus_the_tenant(tmp_path, servers):
    srv = servers(tmp_path)
    cases = [  # (rid, extra_key, cache_salt, tenant name)
        ("plain", None, None, None),
        ("salt", None, "alice", "alice"),
        ("extra", "lora-7", None, "lora-7"),
        ("both", "lora-7", "alice", "alice/lora-7"),
        ("other", None, "bob", "bob"),
    ]
    keys = {}
    for rid, extra_key, cache_salt, name in cases:
        assert unified.tenant_salt(extra_key, cache_salt) == name
        before = len(srv.written)
        srv.serve(rid, extra_key=extra_key, cache_salt=cache_salt)
        keys[rid] = srv.written[before:]
        assert srv.reported[-1] == keys[rid]  # the finished request's chain: the keys its pages were stored under
    # no salt: exactly SGLang's keys (64 hex digits), so a store plain SGLang wrote still matches
    assert keys["plain"] == sglang_keys(PROMPT) and all(len(k) == 64 for k in keys["plain"])
    # a salt: SGLang's own namespace-seeded chain, salted once (by SGLang), then tagged with the tenant
    for rid, extra_key, cache_salt, name in cases[1:]:
        assert keys[rid] == tenant_keys(PROMPT, name, extra_key=extra_key, cache_salt=cache_salt), rid
        assert [k[:64] for k in keys[rid]] == sglang_keys(PROMPT, extra_key=extra_key, cache_salt=cache_salt)
        assert all(len(k) == 80 for k in keys[rid])
    assert len({k for ks in keys.values() for k in ks}) == 4 * len(cases)  # every namespace its own pages
    assert srv.backend.tier_stats()["io"]["set_pages_ok"] == 4 * len(cases)  # and kvdrive stored every one
    assert keys["salt"] != keys["other"]
    # the backend files each page under its tenant's namespace
    assert srv.backend.ns_of(keys["salt"][0]).tenant == tenant_id("alice")
    assert srv.backend.ns_of(keys["both"][0]).tenant == tenant_id("alice/lora-7")
    assert srv.backend.ns_of(keys["plain"][0]).tenant == ""

    # a longer prompt of a tenant continues its tagged chain from the cached node
    before = len(srv.written)
    srv.serve("salt-long", PROMPT + EXT, cache_salt="alice")
    assert srv.written[before:] == tenant_keys(PROMPT + EXT, "alice", cache_salt="alice")[4:]
    assert srv.reported[-1] == tenant_keys(PROMPT + EXT, "alice", cache_salt="alice")


def test_share_as_group_members_share_keys_and_pages(tmp_path, servers):
    srv = servers(tmp_path, tenants={"x1": {"share_as": "team"}, "x2": {"share_as": "team"}})
    first = srv.serve("x1", cache_salt="x1")
    assert first.req.storage_hit_length == 0
    assert srv.written == group_keys(PROMPT, "team") and srv.reported == [group_keys(PROMPT, "team")]
    # x2 is another namespace in SGLang's tree (no device hit), but the same pages in storage: served from there
    second = srv.serve("x2", cache_salt="x2")
    assert second.req.storage_hit_length == 16 and second.req.cached_tokens_storage == 16
    assert_prefix_kv(second, PROMPT)
    assert srv.reported[-1] == group_keys(PROMPT, "team")
    # a salt spelling the group's name is not the group; a non-member is on its own
    srv.serve("team", cache_salt="team")
    assert srv.reported[-1] == tenant_keys(PROMPT, "team", cache_salt="team")
    third = srv.serve("x3", cache_salt="x3")
    assert third.req.storage_hit_length == 0 and srv.reported[-1] == tenant_keys(PROMPT, "x3", cache_salt="x3")


def test_finished_requests_reach_the_promoter_and_radix_events_are_counted(tmp_path, servers):
    srv = servers(tmp_path)
    cache, backend, promoter = srv.cache, srv.backend, srv.backend.promoter
    keys = sglang_keys(PROMPT + EXT)

    srv.serve("r1")
    assert srv.reported == [keys[:4]]  # the whole chain of the finished request, in prefix order
    assert [promoter.reuse(k) for k in keys] == [1, 1, 1, 1, 0, 0]
    assert promoter.stats()["accesses"] == 4  # only the whole request: its storage writes do not count
    assert cache.kvdrive_stats() == {**EVENTS_ZERO, "written_back": 16}

    r2 = srv.serve("r2")  # the same prompt: a device hit
    assert r2.req.cached_tokens_device == 16
    assert_prefix_kv(r2, PROMPT)
    assert srv.reported[-1] == keys[:4] and [promoter.reuse(k) for k in keys] == [2, 2, 2, 2, 0, 0]

    r3 = srv.serve("r3", PROMPT + EXT)  # extends the cached prompt: the chain runs from the root through both nodes
    assert r3.req.cached_tokens_device == 16
    assert srv.reported[-1] == keys and [promoter.reuse(k) for k in keys] == [3, 3, 3, 3, 1, 1]
    assert promoter.stats()["accesses"] == 4 + 4 + 6
    assert cache.kvdrive_stats() == {**EVENTS_ZERO, "device_hit": 32, "written_back": 24}

    assert cache.evict(EvictParams(num_tokens=10_000)).num_tokens_evicted == 24  # device copies go, host ones stay
    r4 = srv.serve("r4")  # a host hit, loaded back to the device
    assert (r4.req.cached_tokens_device, r4.req.cached_tokens_host, r4.req.cached_tokens_storage) == (0, 16, 0)
    assert_prefix_kv(r4, PROMPT)
    assert srv.reported[-1] == keys[:4]
    want = {**EVENTS_ZERO, "device_hit": 32, "host_hit": 16, "evicted": 24, "written_back": 24, "loaded_back": 16}
    assert cache.kvdrive_stats() == want
    assert backend.tier_stats()["radix"] == {k: v for k, v in want.items() if v}  # reported to the backend too


def test_host_pool_evictions_become_promotion_candidates(tmp_path, servers):
    srv = servers(tmp_path)
    cache, spilled = srv.cache, srv.backend.upkeep.spilled
    keys = tenant_keys(PROMPT + EXT, "alice", cache_salt="alice")
    srv.serve("a", cache_salt="alice")
    srv.serve("a-long", PROMPT + EXT, cache_salt="alice")
    assert not spilled

    assert cache.evict(EvictParams(num_tokens=10_000)).num_tokens_evicted == 24
    assert not spilled  # still in SGLang's host pool
    # the tree core's first eviction bound kvdrive's value order (installed after SGLang's __init__, before any use)
    bound = cache.components[ComponentType.FULL].session_ref_eviction_strategy
    assert bound.__self__ is cache.tree_core.eviction_strategy
    assert isinstance(bound.__self__, radix_backend.PromoterEviction)

    assert cache.evict_host(10_000) == 24
    # the salted, tenant-tagged keys of both nodes, the leaf first (a host leaf goes before its parent)
    assert list(spilled) == keys[4:] + keys[:4]
    assert cache.kvdrive_stats()["evicted"] == 24

    # the next request for them reloads from kvdrive: they are back in SGLang's host pool, no longer candidates
    again = srv.serve("a-again", cache_salt="alice")
    assert again.req.storage_hit_length == 16 and again.req.cached_tokens_storage == 16
    assert_prefix_kv(again, PROMPT)
    assert list(spilled) == keys[4:]


def test_eviction_follows_the_promoters_value(tmp_path, servers):
    """Two cached prompts; the older one received attention: eviction takes the newer, unattended one first
    (SGLang's LRU would take the older)."""
    srv = servers(tmp_path)
    older, newer = [11] * 16, [13] * 16
    srv.serve("old", older)
    srv.serve("new", newer)
    srv.backend.record_attention({k: 0.5 for k in sglang_keys(older)})
    assert srv.cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted == 16

    def on_device(tokens):
        return srv.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens + TAIL)))).device_prefix_len

    assert (on_device(older), on_device(newer)) == (16, 0)


def test_restart_serves_the_tenant_from_storage_and_no_one_else(tmp_path, servers):
    store = tmp_path / "store"
    first = servers(store)
    first.serve("a", cache_salt="alice")
    assert first.written == tenant_keys(PROMPT, "alice", cache_salt="alice")
    first.shutdown()  # the store is closed; a fresh server opens it

    srv = servers(store)
    cache = srv.cache
    other = srv.serve("b", cache_salt="bob")  # same prompt, another tenant: nothing in storage for it
    assert other.req.storage_hit_length == 0 and other.req.prefix_len == 0
    plain = srv.serve("plain")  # nor for unsalted traffic
    assert plain.req.storage_hit_length == 0 and plain.req.prefix_len == 0

    again = srv.serve("a", cache_salt="alice")
    assert again.req.storage_hit_length == 16
    breakdown = (again.req.cached_tokens_device, again.req.cached_tokens_host, again.req.cached_tokens_storage)
    assert breakdown == (0, 0, 16)
    assert_prefix_kv(again, PROMPT)  # alice's own K/V: from disk, through the host pool and load-back
    assert srv.reported[-1] == tenant_keys(PROMPT, "alice", cache_salt="alice")
    want = {**EVENTS_ZERO, "storage_hit": 16, "loaded_back": 16, "written_back": 32}
    assert cache.kvdrive_stats() == want
    assert srv.backend.tier_stats()["radix"] == {k: v for k, v in want.items() if v}
    assert srv.backend.tier_stats()["disk"]["hits"] == 4


def test_without_kvdrives_cache_in_the_process_salted_keys_stay_sglangs(monkeypatch):
    """The key hook is registered wherever the plugin loads; a plain SGLang server in the same environment (no
    kvdrive radix cache built in its process) must compute exactly SGLang's keys."""
    from sglang.srt.mem_cache.radix_cache import RadixKey

    monkeypatch.setattr(unified, "_active", False)
    tokens = list(range(300, 316))
    key = RadixKey(array("q", tokens), "lora-1", cache_salt="alice")
    assert sglang_utils.get_storage_hash_str(key, None, page_size=PAGE) == \
        sglang_keys(tokens, extra_key="lora-1", cache_salt="alice")
    monkeypatch.setattr(unified, "_active", True)  # the same call where kvdrive's cache runs: tagged
    assert sglang_utils.get_storage_hash_str(key, None, page_size=PAGE) == \
        tenant_keys(tokens, "alice/lora-1", extra_key="lora-1", cache_salt="alice")
