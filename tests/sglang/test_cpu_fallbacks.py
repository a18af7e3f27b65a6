"""kvdrive's CPU fallbacks for SGLang's GPU-only HiCache paths, exercised through SGLang's own objects."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

if torch.cuda.is_available():
    pytest.skip("the fallbacks are only installed without a GPU", allow_module_level=True)

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402

from kvdrive_sglang import cpu_fallbacks  # noqa: E402
from kvdrive_sglang.compat.host_pools import make_host_pool  # noqa: E402 - the constructor differs by version


def device_pool(page=4, size=64):
    return MHATokenToKVPool(
        size=size,
        page_size=page,
        dtype=torch.bfloat16,
        head_num=2,
        head_dim=8,
        layer_num=3,
        device="cpu",
        enable_memory_saver=False,
    )


def test_install_is_idempotent_and_host_pools_come_unpinned():
    assert cpu_fallbacks.install() is True and cpu_fallbacks.install() is True
    # pin_memory=True passed positionally, as SGLang's builders may: still constructs on a CPU-only machine
    kv = device_pool()
    host = make_host_pool(MHATokenToKVPoolHost, kv, 2.0, 0, 4, "layer_first", True, "cpu")
    assert host.pin_memory is False and not host.kv_buffer.is_pinned()


@pytest.mark.parametrize("layout", ["layer_first"])
def test_device_to_host_and_back_through_the_direct_io_backend(layout):
    cpu_fallbacks.install()
    kv = device_pool()
    host = make_host_pool(MHATokenToKVPoolHost, kv, 2.0, 0, 4, layout, pin_memory=False, device="cpu")
    dev_idx = torch.arange(8, 16)
    for layer in range(kv.layer_num):
        kv.k_buffer[layer][dev_idx] = torch.randn(8, 2, 8).to(torch.bfloat16)
        kv.v_buffer[layer][dev_idx] = torch.randn(8, 2, 8).to(torch.bfloat16)
    want_k = [kv.k_buffer[layer][dev_idx].clone() for layer in range(kv.layer_num)]
    host_idx = host.alloc(8)
    host.backup_from_device_all_layer(kv, host_idx, dev_idx, io_backend="direct")
    back_idx = torch.arange(32, 40)
    for layer in range(kv.layer_num):
        host.load_to_device_per_layer(kv, host_idx, back_idx, layer, io_backend="direct")
        assert torch.equal(kv.k_buffer[layer][back_idx], want_k[layer])
        assert torch.equal(kv.v_buffer[layer][back_idx], kv.v_buffer[layer][dev_idx])


def test_paged_allocator_runs_without_triton():
    cpu_fallbacks.install()
    page = 4
    alloc = PagedTokenToKVPoolAllocator(
        size=64, page_size=page, dtype=torch.bfloat16, device="cpu", kvcache=device_pool(page), need_sort=False
    )
    prefix = torch.tensor([0, 0])
    seq = torch.tensor([5, 3])
    out = alloc.alloc_extend(prefix, prefix, seq, seq, torch.tensor([-1, -1]), int(seq.sum()))
    assert out is not None and len(out) == 8 and len(set(out.tolist())) == 8
    first, second = out[:5].tolist(), out[5:].tolist()
    assert first[0] % page == 0 and second[0] % page == 0  # each request starts on its own page
    assert first == list(range(first[0], first[0] + 5))
    # decode: request 0 (5 tokens) stays in its page; request 1 (3 tokens) fills its page's last slot
    dec = alloc.alloc_decode(torch.tensor([6, 4]), torch.tensor([6, 4]), torch.tensor([first[-1], second[-1]]))
    assert dec.tolist() == [first[-1] + 1, second[-1] + 1]
    # crossing a page boundary takes a fresh page
    dec2 = alloc.alloc_decode(torch.tensor([5]), torch.tensor([5]), torch.tensor([first[3]]))
    assert dec2[0] % page == 0 and dec2[0] not in out.tolist()
