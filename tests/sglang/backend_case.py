"""Real SGLang CPU pools + KvdriveStorage, shared by the contract test and its restart subprocess."""

import json

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvdrive_sglang import cpu_fallbacks
from kvdrive_sglang.compat.host_pools import host_pool_args, make_host_pool
from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config

PAGE = 4


def make_host(layout="layer_first", dtype=torch.bfloat16, heads=2, head_dim=16, layers=2, size=64):
    cpu_fallbacks.install()
    kv = MHATokenToKVPool(
        size=size,
        page_size=PAGE,
        dtype=dtype,
        head_num=heads,
        head_dim=head_dim,
        layer_num=layers,
        device="cpu",
        enable_memory_saver=False,
    )
    return make_host_pool(
        MHATokenToKVPoolHost,
        kv,
        host_to_device_ratio=2.0,
        host_size=0,
        page_size=PAGE,
        layout=layout,
        pin_memory=False,
        device="cpu",
    )


def make_mla_host(layout="layer_first", dtype=torch.bfloat16, size=64):
    cpu_fallbacks.install()
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    kv = MLATokenToKVPool(
        size=size,
        page_size=PAGE,
        dtype=dtype,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
    )
    extra = {"target_layer_num": kv.layer_num} if host_pool_args(MLATokenToKVPoolHost, kv)[1] else {}
    return make_host_pool(
        MLATokenToKVPoolHost,
        kv,
        host_to_device_ratio=2.0,
        host_size=0,
        page_size=PAGE,
        layout=layout,
        pin_memory=False,
        device="cpu",
        **extra,
    )


def make_backend(
    store_dir,
    host,
    *,
    tp_rank=0,
    tp_size=1,
    model="tiny-llama",
    mla=False,
    codec="zstd",
    host_gb=0.01,
    promoter=None,
    reload=None,
    config=None,
):
    """A KvdriveStorage as SGLang builds it (``config``: further HiCacheStorageConfig fields, e.g. 0.5.23's
    dp_rank / dcp_size / dcp_rank / logical_page_size)."""
    extra = json.loads(
        storage_extra_config(KvdriveOptions(dir=str(store_dir), host_gb=host_gb, disk_gb=1, codec=codec))
    )
    if promoter:
        extra["kvdrive"]["promoter"] = promoter
    if reload:
        extra["kvdrive"]["reload"] = reload
    cfg = HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=host.layout == "page_first",
        model_name=model,
        extra_config=extra,
        **(config or {}),
    )
    be = StorageBackendFactory.create_backend("dynamic", cfg, host)
    be.register_mem_pool_host(host)
    return be


def fill(host, indices, seed):
    """Write a deterministic pattern into the host pages at ``indices`` (page starts)."""
    g = torch.Generator().manual_seed(seed)
    for i, idx in enumerate(indices):
        page = host.get_dummy_flat_data_page()
        page.copy_(torch.randn(page.shape, generator=g).to(page.dtype))
        host.set_from_flat_data_page(int(idx), page)


def written(host, n, seed=1):
    """n host pages filled with a deterministic pattern: (their host indices, a copy of each page)."""
    idx = host.alloc(n * PAGE)
    fill(host, [idx[i * PAGE] for i in range(n)], seed)
    return idx, pages_of(host, idx, n)


def pages_of(host, host_indices, n):
    return [host.get_data_page(int(host_indices[i * PAGE]), flat=True).clone() for i in range(n)]


if __name__ == "__main__":  # restart check: a new process opens the same store and reads the pages back
    import sys

    store, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    host = make_host()
    be = make_backend(store, host)
    keys = [f"{i:064x}" for i in range(n)]
    idx = host.alloc(n * PAGE)
    hits = be.batch_exists(keys)
    ok = be.batch_get_v1(keys, idx)
    ref_host = make_host()
    ref_idx = ref_host.alloc(n * PAGE)
    fill(ref_host, [ref_idx[i * PAGE] for i in range(n)], seed)
    same = all(torch.equal(a, b) for a, b in zip(pages_of(host, idx, n), pages_of(ref_host, ref_idx, n)))
    be.close()
    print(json.dumps({"exists": hits, "got": sum(ok), "identical": same}))
