"""SGLang's host KV pools, on every supported SGLang: building one from its device pool (benchmarks and tests build
pools by hand; a server gets them from SGLang), and where each pool kind keeps a page in its buffer for each layout
(what :class:`kvdrive_sglang.host_pages.HostPages` gathers and scatters a batch of pages by).

Up to 0.5.20 a host pool takes the device pool itself; from 0.5.21 it takes the device pool's buffer info and
capacity (what SGLang's own hybrid pool assembler hands it) and the layer range, and the MLA pool also its target
layer count.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any


def _params(host_cls) -> dict:
    return dict(inspect.signature(host_cls.__init__).parameters)


def _takes_buffer_info(host_cls) -> bool:
    return "device_capacity_tokens" in _params(host_cls)


def host_pool_args(host_cls, device_pool) -> tuple[tuple, dict]:
    """(leading positional arguments, extra keyword arguments) that name ``device_pool`` to ``host_cls``'s
    constructor on the installed SGLang; the caller adds the rest (ratio, size, page size, layout, ...)."""
    if not _takes_buffer_info(host_cls):
        return (device_pool,), {}
    extra = {
        "device_capacity_tokens": device_pool.size,
        "start_layer": device_pool.start_layer,
        "end_layer": device_pool.end_layer,
    }
    if "target_layer_num" in _params(host_cls):  # 0.5.21+'s MLA host pool: the device pool's own layers
        extra["target_layer_num"] = device_pool.layer_num
    return (device_pool.get_device_pool_infos()[0].buffer_info,), extra


def make_host_pool(host_cls, device_pool, *args: Any, **kwargs: Any):
    """``host_cls(<device_pool as this SGLang takes it>, *args, **kwargs)`` (``kwargs`` win over the extras)."""
    lead, extra = host_pool_args(host_cls, device_pool)
    return host_cls(*lead, *args, **{**extra, **kwargs})


class PoolKind(enum.Enum):
    """The host pools kvdrive's storage backend is registered with (SGLang's ``storage_host_pool``)."""

    MHA = "mha"  # MHATokenToKVPoolHost: K and V of one width in one kv_buffer [2, ...]
    MLA = "mla"  # MLATokenToKVPoolHost: one latent row per token and layer in kv_buffer


class AxisCounts(enum.Enum):
    """What the buffer axis a page is cut from counts."""

    TOKENS = "tokens"  # token slots: a page is page_size consecutive entries (get_data_page slices [s, s + ps))
    PAGES = "pages"  # pages: a page is one entry (get_data_page slices [s // ps, s // ps + 1))


@dataclass(frozen=True)
class PageAxis:
    """Where one page of a pool lives in its buffer: the flat page SGLang copies is the buffer's elements with
    ``axis`` cut to that page, in the buffer's own dimension order.

    Attributes:
        buffer: the pool attribute holding the tensor (``kv_buffer``).
        axis: the buffer dimension a page is cut from.
        counts: whether that dimension counts token slots or pages.
    """

    buffer: str
    axis: int
    counts: AxisCounts


_T, _P = AxisCounts.TOKENS, AxisCounts.PAGES

# Read off each pool's init_kv_buffer / get_data_page / set_from_flat_data_page, the same on 0.5.17 and 0.5.23:
#   MHA layer_first [2, layers, size, heads, dim]         page_first [2, size, layers, heads, dim]
#       page_first_direct [2, pages, layers, ps, heads, dim]   page_head [2, pages, heads, ps, layers, dim]
#   MLA layer_first [layers, size, 1, kv_dim]             page_first [size, layers, 1, kv_dim]
#       page_first_direct [pages, layers, ps, 1, kv_dim]
# page_unified (0.5.23) has no flat page (refused at registration); page_first_kv_split is Ascend's (split buffers,
# no flat page either). HostPages checks each entry against the pool's own get_data_page before it trusts it.
PAGE_AXES: dict[PoolKind, dict[str, PageAxis]] = {
    PoolKind.MHA: {
        "layer_first": PageAxis("kv_buffer", 2, _T),
        "page_first": PageAxis("kv_buffer", 1, _T),
        "page_first_direct": PageAxis("kv_buffer", 1, _P),
        "page_head": PageAxis("kv_buffer", 1, _P),
    },
    PoolKind.MLA: {
        "layer_first": PageAxis("kv_buffer", 1, _T),
        "page_first": PageAxis("kv_buffer", 0, _T),
        "page_first_direct": PageAxis("kv_buffer", 0, _P),
    },
}

_PAGE_COPY = ("get_data_page", "set_from_flat_data_page")


def _pool_classes() -> dict[PoolKind, type]:
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    return {PoolKind.MHA: MHATokenToKVPoolHost, PoolKind.MLA: MLATokenToKVPoolHost}


def pool_kind(host) -> PoolKind | None:
    """The kind of SGLang host pool ``host`` is, where it copies its pages SGLang's way: the pool class itself, or a
    subclass that overrides neither ``get_data_page`` nor ``set_from_flat_data_page`` (HiSparse's MHA pool). A
    subclass with a page copy of its own (MXFP8's scales beside the data, K and V of different widths), a wrapper
    (page interleave), a pool split over DCP ranks or any other pool: None."""
    cls = type(host)
    for kind, base in _pool_classes().items():
        if isinstance(host, base) and all(getattr(cls, m, None) is getattr(base, m) for m in _PAGE_COPY):
            return kind if int(getattr(host, "dcp_size", 1) or 1) == 1 else None
    return None


def page_axis(host) -> PageAxis | None:
    """Where ``host`` keeps a page, from its kind and layout, or None where kvdrive does not know it."""
    kind = pool_kind(host)
    return None if kind is None else PAGE_AXES[kind].get(getattr(host, "layout", None))


def device_layers(host) -> list | None:
    """The device KV pool's per-layer buffers that ``host``'s layer_first flat page spans, in its order (MHA: the K
    layers then the V layers, ``kv_buffer[2, layers, ...]``; MLA: the layers), for a decode that writes whole pages
    into them (``--kvdrive-gpu-decompress``). From 0.5.21 the host pool holds them itself (``device_k_buffers`` /
    ``device_v_buffers``, ``device_kv_buffers``: target layers, then any draft layers folded into it, as its own
    load copies them); up to 0.5.20 its ``device_pool`` does. None where the pool kind is unknown or the buffers
    are not one per layer of the page."""
    kind = pool_kind(host)
    if kind is None:
        return None
    dev = getattr(host, "device_pool", None)
    if kind is PoolKind.MHA:
        k, v = getattr(host, "device_k_buffers", None), getattr(host, "device_v_buffers", None)
        if k is None or v is None:
            k, v = getattr(dev, "k_buffer", None), getattr(dev, "v_buffer", None)
        layers = None if k is None or v is None else [*k, *v]
        want = 2 * int(host.layer_num)
    else:
        kv = getattr(host, "device_kv_buffers", None)
        if kv is None:
            kv = getattr(dev, "kv_buffer", None)
        layers = None if kv is None else list(kv)
        want = int(host.layer_num)
    if not layers or len(layers) != want or not all(hasattr(t, "dim") and t.dim() >= 1 for t in layers):
        return None
    return layers
