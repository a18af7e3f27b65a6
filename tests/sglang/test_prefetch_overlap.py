"""Disk -> host prefetch overlaps the scheduler loop: issued when a request enters the waiting queue, run on HiCache's
I/O threads through kvdrive's tiers, and never waited on by the loop.

Real SGLang objects of the HiRadixCache generation (0.5.17 - 0.5.20) on CPU: kvdrive's radix cache built through SGLang's registry with real pools and kvdrive's
real ``KvdriveStorage`` (LMDB + segment files); the queue-entry step is SGLang's own ``Scheduler._prefetch_kvcache``
(called with the two attributes it reads); the loop is what the scheduler runs for a waiting request every
iteration (``check_hicache_events``, then ``check_prefetch_progress``). The disk is made slow by delaying ``os.preadv``
(the segment-file read) by 0.4 s per call, so a loop that waited on it could not hide it.
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
pytest.importorskip("sglang.srt.mem_cache.hiradix_cache",
                    reason="drives HiRadixCache's request API (cache_finished_req, rid-keyed prefetch); on SGLang "
                           "0.5.21 on the overlap is covered by the e2e storage-hit tests")

import torch  # noqa: E402

from kvdrive_sglang import cpu_fallbacks  # noqa: E402

cpu_fallbacks.install()

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
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


@pytest.fixture(scope="module", autouse=True)
def _group(process_group):  # tests/sglang/conftest.py
    yield


class _Worker:
    def register_hicache_layer_transfer_counter(self, counter):
        pass


def build(store_dir):
    kv = MHATokenToKVPool(size=512, page_size=PAGE, dtype=torch.float16, head_num=2, head_dim=8, layer_num=2,
                          device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size=512, dtype=torch.float16, device="cpu", kvcache=kv, need_sort=False)
    req_pool = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
    extra = {"backend_name": "kvdrive", "module_path": "kvdrive_sglang.storage_backend", "class_name": "KvdriveStorage",
             "interface_v1": 1, "prefetch_threshold": PAGE,
             # a prefill of 1 token/s: reloading always wins, so every stored page is claimed
             "kvdrive": {"dir": str(store_dir), "host_bytes": 1 << 20, "promoter": {"prefill_tokens_per_s": 1.0}}}
    server_args = ServerArgs(model_path="dummy", device="cpu", page_size=PAGE, enable_hierarchical_cache=True,
                             hicache_ratio=2.0, hicache_io_backend="direct", hicache_mem_layout="layer_first",
                             hicache_write_policy="write_through", radix_cache_backend="kvdrive",
                             hicache_storage_backend="dynamic", hicache_storage_prefetch_policy="wait_complete",
                             hicache_storage_backend_extra_config=json.dumps(extra))
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                             page_size=PAGE)
    ctx = TreeCacheBuildContext(server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                                enable_hierarchical_cache=True, disable_radix_cache=False,
                                effective_chunked_prefill_size=server_args.chunked_prefill_size, tp_worker=_Worker(),
                                model_config=None, tp_size=1, tp_rank=0, tp_group=None)
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


def test_prefetch_is_issued_at_queue_entry_and_the_loop_never_waits_on_disk(tmp_path, monkeypatch):
    first = build(tmp_path)
    write_prompt(first)
    first.shutdown()  # detaches the backend: close() writes kvdrive's DRAM tier down; a restart finds it on disk

    cache = build(tmp_path)  # "restarted": the pages are on disk only
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
        req = make_req("r1")
        t0 = time.monotonic()
        # what Scheduler._add_request_to_queue does before appending the request to the waiting queue
        Scheduler._prefetch_kvcache(SimpleNamespace(enable_hicache_storage=True, tree_cache=cache), req)
        issued_in = time.monotonic() - t0
        assert "r1" in cache.ongoing_prefetch, "no storage prefetch was started at queue entry"
        assert issued_in < LOOP_STEP_BUDGET_S, f"queue entry took {issued_in:.3f} s: it waited on the store"

        steps, slowest, done = 0, 0.0, False
        while not done:
            s0 = time.monotonic()
            cache.check_hicache_events()
            done = cache.check_prefetch_progress("r1")
            slowest = max(slowest, time.monotonic() - s0)
            steps += 1
            assert time.monotonic() - t0 < 30, "prefetch never completed"
            if not done:
                time.sleep(0.01)  # the rest of a scheduler iteration (a forward pass elsewhere)
        loaded = cache.pop_prefetch_loaded_tokens("r1")
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
    cache.shutdown()
