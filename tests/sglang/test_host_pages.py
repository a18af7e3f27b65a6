"""HostPages against SGLang's own per-page copy, on real SGLang host pools on CPU: every pool kind the storage backend
is registered with (MHA, MLA) x every layout x page sizes 1 and 16 x bf16 and uint8 (fp8 KV) that the installed
SGLang builds. The batched gather / scatter must move the very bytes ``get_data_page(start, flat=True)`` returns and
``set_from_flat_data_page`` takes, in the same order (pages stored under the per-page path stay readable), at
scattered, unordered page starts, and must be the path HostPages takes (issue 15: the GPU-default MLA layout,
``page_first_direct`` and ``page_head`` fell back to one SGLang call per page)."""

import pytest

torch = pytest.importorskip("torch")
sglang = pytest.importorskip("sglang")

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

from kvdrive_sglang import cpu_fallbacks
from kvdrive_sglang.compat import host_pools
from kvdrive_sglang.compat.host_pools import make_host_pool
from kvdrive_sglang.host_pages import HostPages
from kvdrive_sglang.tier.errors import ConfigError

KINDS = ["mha", "mla"]
LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head", "page_unified"]
PAGE_SIZES = [1, 16]
DTYPES = [torch.bfloat16, torch.uint8]
DEVICE_TOKENS = 64  # the host pool gets twice that (plus SGLang's padding page)


MHA_DIMS = {"head_num": 3, "head_dim": 5, "layer_num": 2}  # every dimension distinct: a swapped axis cannot hide
MLA_DIMS = {"kv_lora_rank": 12, "qk_rope_head_dim": 4, "layer_num": 3}


def make_pool(kind, layout, page_size, dtype, **dims):
    """A real SGLang host pool of ``kind`` in ``layout`` over a CPU device pool (ValueError where SGLang has none)."""
    cpu_fallbacks.install()
    device_cls, host_cls, defaults = (
        (MHATokenToKVPool, MHATokenToKVPoolHost, MHA_DIMS)
        if kind == "mha"
        else (MLATokenToKVPool, MLATokenToKVPoolHost, MLA_DIMS)
    )
    device = device_cls(
        size=DEVICE_TOKENS,
        page_size=page_size,
        dtype=dtype,
        device="cpu",
        enable_memory_saver=False,
        **{**defaults, **dims},
    )
    return make_host_pool(
        host_cls,
        device,
        host_to_device_ratio=2.0,
        host_size=0,
        page_size=page_size,
        layout=layout,
        pin_memory=False,
        device="cpu",
    )


def build_host(kind, layout, page_size, dtype):
    """:func:`make_pool`, or skip where the installed SGLang has no such pool or no flat-page copy for it."""
    try:
        host = make_pool(kind, layout, page_size, dtype)
    except ValueError as e:
        pytest.skip(f"SGLang {sglang.__version__} has no {kind} host pool in layout {layout}: {e}")
    try:
        host.get_data_page(0, flat=True)
    except (ValueError, NotImplementedError) as e:
        pytest.skip(
            f"SGLang {sglang.__version__}'s {kind} pool has no flat-page copy in {layout} (kvdrive refuses "
            f"it at registration: test_a_pool_without_a_flat_page_copy_is_refused): {e}"
        )
    return host


def fill_random(host, seed):
    """Random bytes over the whole pool (bf16 NaN patterns included: every comparison here is on bytes)."""
    g = torch.Generator().manual_seed(seed)
    raw = host.kv_buffer.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))


def scattered_starts(host, seed):
    """Page starts out of order and not adjacent: most pages of the pool, shuffled, some left out."""
    g = torch.Generator().manual_seed(seed)
    pages = int(host.size) // int(host.page_size)
    order = torch.randperm(pages, generator=g).tolist()
    return [p * int(host.page_size) for p in order[: max(2, pages * 2 // 3)]]


def as_bytes(page) -> bytes:
    return bytes(torch.as_tensor(page).contiguous().view(torch.uint8).reshape(-1).numpy())


class PerPageCalls:
    """Counts SGLang's per-page copies on one pool instance (the fallback path HostPages must not take)."""

    def __init__(self, host):
        self.n = 0
        get, put = host.get_data_page, host.set_from_flat_data_page

        def counted_get(*a, **kw):
            self.n += 1
            return get(*a, **kw)

        def counted_put(*a, **kw):
            self.n += 1
            return put(*a, **kw)

        host.get_data_page, host.set_from_flat_data_page = counted_get, counted_put


CASES = [
    pytest.param(k, lay, ps, dt, id=f"{k}-{lay}-p{ps}-{str(dt).removeprefix('torch.')}")
    for k in KINDS
    for lay in LAYOUTS
    for ps in PAGE_SIZES
    for dt in DTYPES
]


@pytest.mark.parametrize("kind,layout,page_size,dtype", CASES)
def test_batched_read_is_sglangs_own_flat_page(kind, layout, page_size, dtype):
    host = build_host(kind, layout, page_size, dtype)
    pages = HostPages(host)
    assert pages.layout == layout, "HostPages fell back to SGLang's per-page copy"
    fill_random(host, seed=1)
    starts = scattered_starts(host, seed=2)
    calls = PerPageCalls(host)
    got = pages.read(starts)
    assert calls.n == 0, f"{calls.n} per-page copies for one batched read"
    assert len(got) == len(starts)
    for s, row in zip(starts, got):
        assert as_bytes(row) == as_bytes(host.get_data_page(s, flat=True)), s


@pytest.mark.parametrize("kind,layout,page_size,dtype", CASES)
def test_batched_write_is_what_sglangs_per_page_write_does(kind, layout, page_size, dtype):
    """The scatter writes exactly the bytes SGLang's per-page set writes, and nothing else (a twin pool written
    per page must end byte-identical: a round trip alone would miss a permutation that read and write both made),
    and SGLang's per-page read gives the written pages back."""
    host = build_host(kind, layout, page_size, dtype)
    twin = build_host(kind, layout, page_size, dtype)
    pages = HostPages(host)
    assert pages.layout == layout
    fill_random(host, seed=3)
    twin.kv_buffer.copy_(host.kv_buffer)
    starts = scattered_starts(host, seed=4)
    g = torch.Generator().manual_seed(5)
    new = torch.empty((len(starts), pages.page_numel), dtype=dtype)
    new.view(torch.uint8).copy_(torch.randint(0, 256, new.view(torch.uint8).shape, generator=g, dtype=torch.uint8))
    calls = PerPageCalls(host)
    pages.write(starts, new)
    assert calls.n == 0, f"{calls.n} per-page copies for one batched write"
    for s, p in zip(starts, new):
        twin.set_from_flat_data_page(s, p)
    assert torch.equal(host.kv_buffer.view(torch.uint8), twin.kv_buffer.view(torch.uint8))
    for s, p in zip(starts, new):
        assert as_bytes(host.get_data_page(s, flat=True)) == as_bytes(p), s


@pytest.mark.parametrize("kind", KINDS)
def test_a_pool_without_a_flat_page_copy_is_refused(kind):
    """``page_unified`` (SGLang 0.5.23) keeps no flat page: refused when SGLang registers the pool, naming it."""
    dims = {"head_dim": 16} if kind == "mha" else {"kv_lora_rank": 32, "qk_rope_head_dim": 8}  # rows of 16n bytes
    try:
        host = make_pool(kind, "page_unified", 16, torch.bfloat16, **dims)
    except ValueError as e:
        pytest.skip(f"SGLang {sglang.__version__} has no page_unified {kind} host pool: {e}")
    with pytest.raises(ConfigError, match="page_unified"):
        HostPages(host)


def test_a_pool_that_copies_its_own_pages_keeps_its_own_copy():
    """A pool class overriding SGLang's per-page copy (as MXFP8's keeps scales beside the data) is never gathered
    from its buffer behind its back: HostPages takes its own get_data_page / set_from_flat_data_page."""

    class OwnCopy(MHATokenToKVPoolHost):
        def get_data_page(self, index, flat=True):
            return super().get_data_page(index, flat)

        def set_from_flat_data_page(self, index, data_page):
            super().set_from_flat_data_page(index, data_page)

    host = build_host("mha", "page_first", 16, torch.bfloat16)
    host.__class__ = OwnCopy
    pages = HostPages(host)
    assert pages.layout is None
    fill_random(host, seed=6)
    starts = scattered_starts(host, seed=7)
    calls = PerPageCalls(host)
    got = pages.read(starts)
    assert calls.n == len(starts)
    assert [as_bytes(r) for r in got] == [as_bytes(host.get_data_page(s, flat=True)) for s in starts]


@pytest.mark.parametrize("kind,layout", [("mha", "page_head"), ("mla", "page_first")])
def test_a_page_axis_that_is_not_sglangs_falls_back_to_the_per_page_copy(monkeypatch, kind, layout):
    """Should an SGLang release move a page elsewhere in a buffer of the same shape, the page view no longer matches
    the pool's own per-page view: HostPages copies SGLang's way (slower, never wrong) rather than move the wrong
    bytes. Simulated by pointing kvdrive's table at another axis of the same pool."""
    kind_enum = host_pools.PoolKind(kind)
    wrong = host_pools.PageAxis(
        "kv_buffer", host_pools.PAGE_AXES[kind_enum][layout].axis + 1, host_pools.AxisCounts.TOKENS
    )
    monkeypatch.setitem(host_pools.PAGE_AXES[kind_enum], layout, wrong)
    host = build_host(kind, layout, 1, torch.bfloat16)
    pages = HostPages(host)
    assert pages.layout is None
    fill_random(host, seed=8)
    starts = scattered_starts(host, seed=9)
    assert [as_bytes(r) for r in pages.read(starts)] == [as_bytes(host.get_data_page(s, flat=True)) for s in starts]


@pytest.mark.parametrize(
    "kind,layout,page_size", [("mha", "page_head", 16), ("mla", "page_first", 1), ("mha", "layer_first", 1)]
)
def test_a_read_gathered_in_chunks_is_still_sglangs_pages_in_order(monkeypatch, kind, layout, page_size):
    """A big read is gathered in chunks of GATHER_CHUNK_BYTES (fresh buffers malloc recycles: one 256 MiB gather
    faulted in every page); chunk boundaries, a short last chunk included, keep every page and the order."""
    from kvdrive_sglang import host_pages

    host = build_host(kind, layout, page_size, torch.bfloat16)
    pages = HostPages(host)
    fill_random(host, seed=10)
    starts = scattered_starts(host, seed=11)
    per = next(k for k in (3, 4, 5) if len(starts) % k)  # pages a chunk: the last chunk is short
    monkeypatch.setattr(host_pages, "GATHER_CHUNK_BYTES", per * pages.page_bytes)
    assert len(pages.view.gather(starts)) == -(-len(starts) // per)
    got = pages.read(starts)
    assert [as_bytes(r) for r in got] == [as_bytes(host.get_data_page(s, flat=True)) for s in starts]
