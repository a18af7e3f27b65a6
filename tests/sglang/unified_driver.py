"""A scheduler-process driver for kvdrive's radix cache on SGLang's UnifiedRadixCache generation (0.5.21 on), on real
SGLang objects, on CPU. Shared by tests/sglang/test_unified_cache.py, test_prefetch_overlap.py and (in its rank
processes) tp_rank_worker.py; import it only where ``kvdrive_sglang.compat.radix_adapter().name == "unified"``.

What SGLang's scheduler process builds, built the way it builds it: ServerArgs (through kvdrive's own ``--kv-tier
kvdrive`` expansion, flags.expand_kwargs) published into SGLang's runtime context, a ModelConfig read from a model
directory (a config.json only: nothing here runs the model), the device pools sized from it (MHATokenToKVPool,
ReqToTokenPool, and the PagedTokenToKVPoolAllocator SGLang uses for --page-size > 1), CacheInitParams and a
TreeCacheBuildContext as mem_cache/kv_cache_builder.py fills them, and the cache from registry.create_tree_cache,
which calls the registered ``kvdrive`` factory. L3 is kvdrive's KvdriveStorage (real tier engine, LMDB index,
segment files) loaded by SGLang's ``dynamic`` storage backend.

Requests are real ``Req`` objects taken through SGLang's own code in the scheduler's order (see Server.serve):
queue entry (SGLang's own Scheduler._prefetch_kvcache: the storage prefetch), the prefetch poll,
PrefillAdder.add_one_req (match, load-back, lock), ScheduleBatch.init_new / prepare_for_extend (slots, cache-hit
breakdown), the prefill's output token and finish check, and mem_cache.common.release_kv_cache (checkpoint into the
tree, release), with the scheduler's per-step check_hicache_events in between. The stand-ins: the forward pass (it
writes each new token's K/V, a value derived from the token, into the device pool, and reads the cached prefix's K/V
as attention would) and the tp_worker, of which the factory calls one method.

Several TP ranks (``tp_size`` > 1, one Server per process): the ServerArgs carry the TP width and are published with
the rank's placement (SpawnRanks, as SGLang's launcher does), and the cache's TP group is the given gloo group
(kv_cache_builder.py passes the DP-TP group's CPU group; with TP only that is every rank). Every rank must make the
same sequence of calls; the polls that call check_hicache_events wait on state SGLang all-reduces over the ranks.
"""

from __future__ import annotations

import atexit
import inspect
import json
import time
from array import array
from types import SimpleNamespace
from typing import NamedTuple

import torch

from kvdrive_sglang import cpu_fallbacks
from kvdrive_sglang.flags import expand_kwargs

cpu_fallbacks.install()  # unpinned host pools and torch page copies on a machine without a GPU (a no-op with one)

from sglang.srt.configs.model_config import ModelConfig  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch  # noqa: E402
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker  # noqa: E402
from sglang.srt.mem_cache import utils as sglang_utils  # noqa: E402
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.common import release_kv_cache  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache  # noqa: E402
from sglang.srt.runtime_context import SpawnRanks, get_memory, get_schedule, publish  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

PAGE = 4
PROMPT = list(range(1000, 1016))  # four pages
EXT = list(range(2000, 2008))  # two more pages after PROMPT
TAIL = [7]  # SGLang never serves a prompt's last token from cache: prompts are ... + TAIL
OUT = 5  # the prefill's output token


def make_model_dir(path) -> str:
    """A model directory as SGLang reads it: config.json only (2 layers, 2 KV heads of 8). No weights: no forward."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=32,
        vocab_size=1024,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float16",
    ).save_pretrained(path)
    return str(path)


class Worker:
    """Stands in for SGLang's tp_worker: the factory hands it the HiCache layer-transfer counter."""

    def __init__(self):
        self.counters = []

    def register_hicache_layer_transfer_counter(self, counter):
        self.counters.append(counter)


def wait(pred, what, timeout=20.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def kv_values(tokens) -> torch.Tensor:
    """The K the stand-in forward pass writes for ``tokens`` (V is its negation); exact in fp16."""
    return torch.tensor([float(t % 997) / 4.0 for t in tokens], dtype=torch.float16)


class Served(NamedTuple):
    req: Req
    prefix_kv: list  # per layer: (K, V) of the cached prefix's rows, as attention reads them in the forward pass


class Server:
    """kvdrive's radix cache + KvdriveStorage as an SGLang 0.5.23 scheduler process builds them (module docstring).

    ``kvdrive``: settings merged into kvdrive's section of the storage extra config (e.g. host_bytes, promoter).
    ``tp_size`` / ``tp_rank`` / ``tp_group``: this process's rank of a TP group (a torch.distributed gloo group)."""

    def __init__(
        self,
        store,
        model_dir,
        *,
        hicache=True,
        eviction_policy=None,
        tenants=None,
        kvdrive=None,
        tp_size=1,
        tp_rank=0,
        tp_group=None,
    ):
        kw = dict(
            model_path=model_dir,
            device="cpu",
            page_size=PAGE,
            hicache_ratio=2.0,
            hicache_write_policy="write_through",
            hicache_storage_prefetch_policy="wait_complete",
        )
        if tp_size > 1:
            kw["tp_size"] = tp_size
        if hicache:
            opts = {"kv_tier": "kvdrive", "kvdrive_dir": str(store), "kvdrive_host_gb": "0.01", "kvdrive_disk_gb": "1"}
            if tenants is not None:
                opts["kvdrive_tenants"] = json.dumps(tenants)
            tier = expand_kwargs(opts, gpu=False)  # what sglang.Engine(kv_tier="kvdrive", ...) passes ServerArgs
            extra = json.loads(tier["hicache_storage_backend_extra_config"])
            extra["prefetch_threshold"] = PAGE  # SGLang's default (256 tokens) is longer than these prompts
            extra["kvdrive"].update(kvdrive or {})
            tier["hicache_storage_backend_extra_config"] = json.dumps(extra)
            kw.update(tier)
        else:
            kw["radix_cache_backend"] = "kvdrive"  # the backend, without --enable-hierarchical-cache
        if eviction_policy is not None:
            kw["radix_eviction_policy"] = eviction_policy
        self.server_args = ServerArgs(**kw)
        # the scheduler process's entry publishes its config (and, with several ranks, its placement)
        publish(self.server_args, role="scheduler", ranks=SpawnRanks(world_rank=tp_rank) if tp_size > 1 else None)
        self.model_config = ModelConfig.from_server_args(self.server_args)
        mc = self.model_config
        kv = MHATokenToKVPool(
            size=512,
            page_size=PAGE,
            dtype=torch.float16,
            head_num=mc.get_num_kv_heads(tp_size),
            head_dim=mc.head_dim,
            layer_num=mc.num_hidden_layers,
            device="cpu",
            enable_memory_saver=False,
        )
        allocator = PagedTokenToKVPoolAllocator(
            size=512, page_size=PAGE, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False
        )
        req_pool = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
        memory, schedule = get_memory(), get_schedule()
        params = CacheInitParams(  # the TP-only subset of kv_cache_builder.py's
            disable=memory.disable_radix_cache,
            req_to_token_pool=req_pool,
            token_to_kv_pool_allocator=allocator,
            page_size=schedule.page_size,
            tp_cache_group=tp_group,
            eviction_policy=memory.radix_eviction_policy,
            eviction_policy_config=memory.radix_eviction_policy_config,
            chunked_prefill_size=schedule.chunked_prefill_size,
        )
        self.worker = Worker()
        self.ctx = TreeCacheBuildContext(
            server_args=self.server_args,
            params=params,
            is_hybrid_swa=False,
            is_hybrid_ssm=False,
            enable_hierarchical_cache=memory.enable_hierarchical_cache,
            disable_radix_cache=memory.disable_radix_cache,
            tp_worker=self.worker,
            model_config=mc,
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_group=tp_group,
        )
        self.cache = create_tree_cache(self.ctx)  # -> registry.get_radix_cache_factory("kvdrive")(ctx)
        self.backend = getattr(self.cache.cache_controller, "storage_backend", None)
        self.written: list[str] = []  # page keys as SGLang's controller hands them to the backend, in order
        self.reported: list[list[str]] = []  # record_request calls: each a finished request's chain
        if self.backend is not None:
            spy(self.backend, "batch_set_v1", lambda keys, *a, **k: self.written.extend(keys))
            spy(self.backend, "record_request", lambda keys: self.reported.append(list(keys)))
        # what Scheduler._prefetch_kvcache reads of its scheduler (set as Scheduler.__init__ sets them)
        self.scheduler = SimpleNamespace(
            enable_hicache_storage=memory.hicache_storage_backend is not None,
            enable_lmcache=memory.enable_lmcache,
            tree_cache=self.cache,
        )
        self._closed = False

    # --- the scheduler's calls, in its order -------------------------------------------------------------------
    def new_req(self, rid, prompt=PROMPT, *, extra_key=None, cache_salt=None) -> Req:
        """A prefill-only request (max_new_tokens=1) as the tokenizer manager hands it over (token ids in)."""
        sampling = SamplingParams(max_new_tokens=1)
        sampling.normalize(None)  # the tokenizer manager's step (no tokenizer: token ids in)
        return Req(
            rid,
            "",
            array("q", list(prompt) + TAIL),
            sampling,
            vocab_size=self.model_config.vocab_size,
            extra_key=extra_key,
            cache_salt=cache_salt,
        )

    def enter_queue(self, req):
        """What Scheduler._add_request_to_queue does before appending the request to the waiting queue: SGLang's
        own Scheduler._prefetch_kvcache (a storage lookup of what the device and host tiers do not hold, anchored
        at the deepest host-backed node), called on the scheduler attributes it reads."""
        Scheduler._prefetch_kvcache(self.scheduler, req)

    def serve(self, rid, prompt=PROMPT, *, extra_key=None, cache_salt=None) -> Served:
        """One prefill-only request (max_new_tokens=1), from arrival to release."""
        cache = self.cache
        req = self.new_req(rid, prompt, extra_key=extra_key, cache_salt=cache_salt)
        self.enter_queue(req)  # Scheduler._add_request_to_queue
        # Scheduler.get_new_batch_prefill
        handle = req.cache_request_handle

        def prefetched():
            cache.check_hicache_events()  # once per scheduler loop iteration
            return cache.check_prefetch_progress(handle)

        wait(prefetched, f"{rid}: storage prefetch")
        loaded_tokens, loaded_start = cache.pop_prefetch_loaded_span(handle)
        if loaded_tokens > 0:
            req.storage_hit_length = loaded_tokens
            req.storage_hit_start = loaded_start
            req.host_hit_is_storage = False
        req.init_next_round_input(cache)
        schedule = get_schedule()
        adder = PrefillAdder(
            PAGE,
            cache,
            cache.token_to_kv_pool_allocator,
            ScheduleBatch(reqs=[], batch_is_full=False),
            NewTokenRatioTracker.from_config().current,
            schedule.max_prefill_tokens,
            schedule.chunked_prefill_size,
        )
        assert adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None) == AddReqResult.CONTINUE
        assert adder.can_run_list == [req]
        cache.storage_prefetch_retries.cancel(req.rid)
        batch = ScheduleBatch.init_new(
            adder.can_run_list,
            cache.req_to_token_pool,
            cache.token_to_kv_pool_allocator,
            cache,
            self.model_config,
            False,
            SpeculativeAlgorithm.NONE,
        )
        consumer = cache.ready_to_load_host_cache()
        batch.prepare_for_extend()
        # the forward pass (stand-in): attention waits for the host->device load-back, reads the cached prefix and
        # writes the new tokens' K/V
        wait(lambda: cache.is_load_back_event_done(consumer), f"{rid}: load-back")
        kv = cache.token_to_kv_pool_allocator.get_kvcache()
        rows = cache.req_to_token_pool.req_to_token[req.kv.req_pool_idx, : req.prefix_len].long()
        prefix_kv = [
            (kv.get_key_buffer(layer)[rows].clone(), kv.get_value_buffer(layer)[rows].clone())
            for layer in range(kv.layer_num)
        ]
        new = kv_values(req.full_untruncated_fill_ids[req.prefix_len : req.extend_end]).view(-1, 1, 1)
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

    def settle(self):
        """The scheduler's per-step check_hicache_events until HiCache's background work is done: device->host
        write-through acks, the host->storage backups they queue, and those backups' acks."""
        cache = self.cache

        def idle():
            cache.check_hicache_events()
            return not (cache.ongoing_write_through or cache.ongoing_backup or cache.ongoing_load_back)

        wait(idle, "HiCache background work")

    def shutdown(self):
        if self._closed:
            return
        self._closed = True
        if self.cache.cache_controller is not None:
            self.cache.shutdown()  # detaches the storage backend: KvdriveStorage.close
            atexit.unregister(self.cache.shutdown)  # init_hicache registered it


def spy(obj, name, record):
    """Record the arguments of ``obj.name`` calls, then make the real call."""
    real = getattr(obj, name)

    def call(*args, **kwargs):
        record(*args, **kwargs)
        return real(*args, **kwargs)

    setattr(obj, name, call)


def sglang_keys(tokens, *, extra_key=None, cache_salt=None) -> list[str]:
    """Storage keys of ``tokens``' pages as SGLang itself names them: its own get_storage_hash_str, not kvdrive's
    hook on it (a namespace-seeded chain when the request has an extra_key or cache_salt)."""
    own = inspect.unwrap(sglang_utils.get_storage_hash_str)
    return own(RadixKey(array("q", tokens), extra_key, cache_salt=cache_salt), None, page_size=PAGE)
