"""load_compressed (kernels/compressed_load.py) on SGLang's real pools: pages read from a real layer_first host pool
(SGLang's own ``get_data_page``, what kvdrive stores), encoded, and loaded into the device pool's per-layer buffers
land exactly where SGLang's own host -> device load puts them, for MHA (``k_buffer + v_buffer``) and MLA
(``kv_buffer``). This is the layout claim the GPU path rests on; on CPU the torch references run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from kvdrive_sglang.kernels.compressed_load import load_compressed  # noqa: E402
from kvdrive_sglang.tier.codecs import encode_page  # noqa: E402
from tests.kernels.bplane_codec import bplane_registered  # noqa: E402

from .backend_case import PAGE, fill  # noqa: E402


def pools(kind: str):
    """(device pool, layer_first host pool over it), as backend_case builds them, keeping the device pool."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    from kvdrive_sglang import cpu_fallbacks
    from kvdrive_sglang.compat.host_pools import make_host_pool

    cpu_fallbacks.install()
    common = dict(size=64, page_size=PAGE, dtype=torch.bfloat16, device="cpu", enable_memory_saver=False)
    if kind == "mha":
        kv = MHATokenToKVPool(head_num=2, head_dim=16, layer_num=2, **common)
        host_cls = MHATokenToKVPoolHost
    else:
        kv = MLATokenToKVPool(kv_lora_rank=32, qk_rope_head_dim=8, layer_num=2, **common)
        host_cls = MLATokenToKVPoolHost
    host = make_host_pool(
        host_cls, kv, host_to_device_ratio=2.0, host_size=0, page_size=PAGE, layout="layer_first", pin_memory=False,
        device="cpu",
    )  # fmt: skip
    layers = list(kv.k_buffer) + list(kv.v_buffer) if kind == "mha" else list(kv.kv_buffer)
    return kv, host, layers


def sglang_load(kv, host, host_starts, device_pages):
    """SGLang's own host -> device load of those pages, layer by layer (io_backend direct, as on CPU)."""
    hi = torch.cat([torch.arange(s, s + PAGE) for s in host_starts])
    di = torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in device_pages])
    for layer in range(host.layer_num):
        host.load_to_device_per_layer(kv, hi, di, layer, "direct")


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("codec", ["bplane", "zstd", "raw", "int8"])
def test_loaded_pages_are_where_sglangs_own_load_puts_them(kind, codec):
    kv, host, layers = pools(kind)
    host_starts = [PAGE * p for p in (5, 1, 9, 3)]
    device_pages = [6, 2, 4, 8]
    fill(host, host_starts, seed=11)
    dtype = str(host.dtype).removeprefix("torch.")
    row_len = host.get_data_page(0, flat=False).shape[-1]
    with bplane_registered():
        blobs = [encode_page(host.get_data_page(s, flat=True).contiguous(), dtype, codec, row_len) for s in host_starts]
        for t in layers:
            t.zero_()
        if codec in ("bplane", "zstd", "raw"):  # lossless: SGLang's own load of the host pages is the answer
            sglang_load(kv, host, host_starts, device_pages)
            want = [t.clone() for t in layers]
            for t in layers:
                t.zero_()
        else:  # lossy: the host pages as the codec decodes them, loaded by SGLang
            from kvdrive_sglang.tier.codecs import decode_page

            for s, blob in zip(host_starts, blobs):
                page = host.get_dummy_flat_data_page()
                decode_page(blob, page, dtype)
                host.set_from_flat_data_page(s, page)
            sglang_load(kv, host, host_starts, device_pages)
            want = [t.clone() for t in layers]
            for t in layers:
                t.zero_()
        res = load_compressed(blobs, layers, device_pages, PAGE, checksums=None)
    assert all(res.ok), res.misses
    for i, (got, w) in enumerate(zip(layers, want)):
        assert np.array_equal(got.view(torch.int16).numpy(), w.view(torch.int16).numpy()), f"layer buffer {i}"
    assert any(bool(t.any()) for t in layers)  # something was loaded at all
