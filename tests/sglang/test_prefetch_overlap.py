"""Disk -> host prefetch overlaps the scheduler loop: issued when a request enters the waiting queue, run on HiCache's
I/O threads through kvdrive's tiers, and never waited on by the loop.

Real SGLang objects on CPU, on either radix-cache generation: kvdrive's radix cache built through SGLang's registry
with real pools and kvdrive's real ``KvdriveStorage`` (LMDB + segment files). A prompt is served once and the server
restarted, so its pages are on disk only. The queue-entry step is SGLang's own ``Scheduler._prefetch_kvcache``
(called with the scheduler attributes it reads); the loop is what the scheduler runs for a waiting request every
iteration (``check_hicache_events``, then ``check_prefetch_progress``). The disk is made slow by delaying
``os.preadv`` (the segment-file read) by 0.4 s per call, so a loop that waited on it could not hide it.

- HiRadixCache generation (0.5.17 - 0.5.20): the cache built from hand-made pools as in test_radix_backend.py; the
  prompt written through ``cache_finished_req``; prefetches keyed by request id.
- UnifiedRadixCache generation (0.5.21 on): the scheduler process of tests/sglang/unified_driver.py (the prompt
  served through SGLang's PrefillAdder, prepare_for_extend and release_kv_cache); prefetches keyed by the request's
  ``cache_request_handle``, handed over by ``pop_prefetch_loaded_span``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from array import array
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from kvdrive_sglang.compat import radix_adapter  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402

try:
    _GENERATION = radix_adapter().name
except ConfigError as e:  # an SGLang with neither generation's seams
    pytest.skip(str(e), allow_module_level=True)

import torch  # noqa: E402

from kvdrive_sglang import cpu_fallbacks  # noqa: E402

cpu_fallbacks.install()

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.registry import TreeCacheBuildContext  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from kvdrive_sglang.storage_backend import KvdriveStorage  # noqa: E402

PAGE = 4
PROMPT = list(range(2000, 2032))  # 8 pages
DISK_DELAY_S = 0.4
LOOP_STEP_BUDGET_S = 0.1  # one scheduler iteration's cache calls: far below one disk read
# kvdrive's settings on both generations. A prefill of 1 token/s: reloading always wins, so every stored page is
# claimed
KVDRIVE = {"host_bytes": 1 << 20, "promoter": {"prefill_tokens_per_s": 1.0}}


@pytest.fixture(scope="module", autouse=True)
def _group(process_group):  # tests/sglang/conftest.py
    yield


@pytest.fixture(autouse=True)
def _runtime_context():
    """The unified generation's Server publishes its ServerArgs (as SGLang's scheduler process does); put back what
    was there."""
    if _GENERATION != "unified":
        yield
        return
    from sglang.srt.runtime_context import restore_context, snapshot_context

    saved = snapshot_context()
    yield
    restore_context(saved)


# ------------------------------------------------------------------------------- HiRadixCache generation (0.5.17)


class _Worker:
    def register_hicache_layer_transfer_counter(self, counter):
        pass


def build(store_dir):
    kv = MHATokenToKVPool(
        size=512,
        page_size=PAGE,
        dtype=torch.float16,
        head_num=2,
        head_dim=8,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
    )
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    allocator = TokenToKVPoolAllocator(size=512, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False)
    req_pool = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
    extra = {
        "backend_name": "kvdrive",
        "module_path": "kvdrive_sglang.storage_backend",
        "class_name": "KvdriveStorage",
        "interface_v1": 1,
        "prefetch_threshold": PAGE,
        "kvdrive": {"dir": str(store_dir), **KVDRIVE},
    }
    server_args = ServerArgs(
        model_path="dummy",
        device="cpu",
        page_size=PAGE,
        enable_hierarchical_cache=True,
        hicache_ratio=2.0,
        hicache_io_backend="direct",
        hicache_mem_layout="layer_first",
        hicache_write_policy="write_through",
        radix_cache_backend="kvdrive",
        hicache_storage_backend="dynamic",
        hicache_storage_prefetch_policy="wait_complete",
        hicache_storage_backend_extra_config=json.dumps(extra),
    )
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
    cache = registry.get_radix_cache_factory("kvdrive")(ctx)
    assert isinstance(cache.cache_controller.storage_backend, KvdriveStorage)
    return cache


def make_req(rid):
    return Req(rid, "", array("q", PROMPT + [7]), SamplingParams(max_new_tokens=1))


def write_prompt(cache):
    """Serve PROMPT once so its KV goes device -> host -> kvdrive (then shutdown() puts it on disk)."""
    req = make_req("writer")
    req.init_next_round_input(cache)
    alloc = cache.token_to_kv_pool_allocator
    new = alloc.alloc(len(PROMPT) + 1)
    kv = alloc.get_kvcache()
    vals = torch.tensor([float(t % 997) / 4 for t in PROMPT + [7]], dtype=torch.float16).view(-1, 1, 1)
    for layer in range(2):
        kv.k_buffer[layer][new] = vals
        kv.v_buffer[layer][new] = -vals
    cache.req_to_token_pool.alloc([req])
    cache.req_to_token_pool.write((req.req_pool_idx, slice(0, len(PROMPT) + 1)), new)
    req.cache_protected_len = 0
    cache.cache_finished_req(req, kv_len_to_handle=len(PROMPT) + 1)
    cache.req_to_token_pool.free(req)
    end = time.monotonic() + 20
    while cache.ongoing_write_through or cache.ongoing_backup:
        cache.check_hicache_events()
        assert time.monotonic() < end, "write-through never finished"
        time.sleep(0.005)


class _HiRadix:
    """The HiRadixCache generation's scheduler steps for one request (prefetches keyed by request id)."""

    def __init__(self, tmp_path):
        self.store = tmp_path
        self.cache = None

    def restarted(self):
        first = build(self.store)
        try:
            write_prompt(first)
        finally:
            first.shutdown()  # detaches the backend: close() writes kvdrive's DRAM tier down (to disk)
        self.cache = build(self.store)  # "restarted": the pages are on disk only
        return self.cache

    def new_req(self, rid):
        return make_req(rid)

    def enter_queue(self, req):
        """What Scheduler._add_request_to_queue does before appending the request to the waiting queue."""
        Scheduler._prefetch_kvcache(SimpleNamespace(enable_hicache_storage=True, tree_cache=self.cache), req)

    def prefetch_of(self, req):
        return req.rid

    def pop_loaded(self, prefetch):
        return self.cache.pop_prefetch_loaded_tokens(prefetch)

    def shutdown(self):
        if self.cache is not None:
            self.cache.shutdown()


# -------------------------------------------------------------------------- UnifiedRadixCache generation (0.5.23)


class _Unified:
    """The UnifiedRadixCache generation's scheduler process (tests/sglang/unified_driver.py); prefetches keyed by the
    request's cache_request_handle."""

    def __init__(self, tmp_path):
        from tests.sglang import unified_driver

        self.driver = unified_driver
        self.store = tmp_path / "store"
        self.model_dir = unified_driver.make_model_dir(tmp_path / "model")
        self.srv = None

    def restarted(self):
        first = self.driver.Server(self.store, self.model_dir, kvdrive=KVDRIVE)
        try:
            first.serve("writer", PROMPT)  # its KV goes device -> host -> kvdrive
        finally:
            first.shutdown()  # detaches the backend: close() writes kvdrive's DRAM tier down
        self.srv = self.driver.Server(self.store, self.model_dir, kvdrive=KVDRIVE)  # the pages are on disk only
        assert isinstance(self.srv.backend, KvdriveStorage)
        return self.srv.cache

    def new_req(self, rid):
        return self.srv.new_req(rid, PROMPT)

    def enter_queue(self, req):
        """What Scheduler._add_request_to_queue does before appending the request to the waiting queue: SGLang's own
        Scheduler._prefetch_kvcache, called with the scheduler attributes it reads (Server.enter_queue)."""
        self.srv.enter_queue(req)

    def prefetch_of(self, req):
        return req.cache_request_handle

    def pop_loaded(self, prefetch):
        return self.srv.cache.pop_prefetch_loaded_span(prefetch)[0]

    def shutdown(self):
        if self.srv is not None:
            self.srv.shutdown()


@pytest.fixture
def generation(tmp_path):
    gen = {"hiradix": _HiRadix, "unified": _Unified}[_GENERATION](tmp_path)
    yield gen
    gen.shutdown()


# --------------------------------------------------------------------------------------------------------- test


def test_prefetch_is_issued_at_queue_entry_and_the_loop_never_waits_on_disk(generation, monkeypatch):
    cache = generation.restarted()  # PROMPT served once, then a restart: its pages are on disk only
    backend = cache.cache_controller.storage_backend
    assert backend.engine.stats().disk.entries >= len(PROMPT) // PAGE
    reads: list[tuple[float, str]] = []
    real_preadv = os.preadv

    def slow_preadv(fd, buffers, offset, *a):  # a slow disk: every segment read takes DISK_DELAY_S more
        reads.append((time.monotonic(), threading.current_thread().name))
        time.sleep(DISK_DELAY_S)
        return real_preadv(fd, buffers, offset, *a)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    try:
        req = generation.new_req("r1")
        prefetch = generation.prefetch_of(req)
        t0 = time.monotonic()
        generation.enter_queue(req)  # SGLang's Scheduler._prefetch_kvcache
        issued_in = time.monotonic() - t0
        assert prefetch in cache.ongoing_prefetch, "no storage prefetch was started at queue entry"
        assert issued_in < LOOP_STEP_BUDGET_S, f"queue entry took {issued_in:.3f} s: it waited on the store"

        steps, slowest, done = 0, 0.0, False
        while not done:
            s0 = time.monotonic()
            cache.check_hicache_events()
            done = cache.check_prefetch_progress(prefetch)
            slowest = max(slowest, time.monotonic() - s0)
            steps += 1
            assert time.monotonic() - t0 < 30, "prefetch never completed"
            if not done:
                time.sleep(0.01)  # the rest of a scheduler iteration (a forward pass elsewhere)
        loaded = generation.pop_loaded(prefetch)
    finally:
        monkeypatch.setattr(os, "preadv", real_preadv)
    assert reads, "the prefetch never read the disk"
    assert all(name != threading.main_thread().name for _, name in reads), "a disk read ran on the scheduler thread"
    assert slowest < LOOP_STEP_BUDGET_S, f"a scheduler step took {slowest:.3f} s while the prefetch was in flight"
    assert steps >= 3, f"the loop ran only {steps} steps while {len(reads)} reads of {DISK_DELAY_S} s were in flight"
    assert loaded == len(PROMPT), loaded
    # the prefetched pages are now in SGLang's host pool under the request's prefix: the next match finds them
    req.init_next_round_input(cache)
    assert req.host_hit_length == len(PROMPT)
