"""SGLang's host pool seen as pages: the page I/O between it and kvdrive's tiers, apart from the storage backend.

``KvdriveStorage`` moves whole pages between SGLang's host pool (the uncompressed staging tier) and kvdrive's tiers;
everything that touches the pool's buffers lives here, behind :class:`HostPages`, so that the backend stays thin
and one module tracks how each SGLang release lays its host pool out.

A flat page is SGLang's own: what the pool's ``get_data_page(start, flat=True)`` returns and
``set_from_flat_data_page`` takes, in the byte order of the pool's layout. Pages of different layouts never meet
(the layout is part of the namespace).

Every torch call lets go of the GIL, and beside SGLang's scheduler loop each one may wait a switch interval to get
it back. So where SGLang's MHA host pool keeps its KV in the one token-indexed buffer its own per-page copy slices
(``layer_first``, ``page_first``), a batch of pages moves in one gather / one scatter (about four torch calls a batch
instead of two a page). That is decided from the pool's class and the buffer's exact shape, on both SGLang
generations (0.5.17's and 0.5.21+'s MHA host pool keep these two buffers alike): any other layout (``page_first_direct``
and ``page_head``, indexed by page; ``page_unified``), any subclass that overrides the per-page copy (MXFP8, K/V of
different widths), any wrapper (page interleave) or any other pool (MLA, ...) takes SGLang's own per-page
``get_data_page`` / ``set_from_flat_data_page``, so a layout kvdrive does not know is slower, never wrong.
"""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from .tier.errors import ConfigError

BATCHED_LAYOUTS = ("layer_first", "page_first")


class PageScratch:
    """Reusable decode buffers for ``cap`` pages: one [cap, page elements] tensor and its numpy byte view, whose
    rows the tiers decode into without a torch call per page.

    Args:
        like: a flat page of the host pool (its element count and dtype are copied).
        cap: pages the buffers hold.
    """

    def __init__(self, like: torch.Tensor, cap: int):
        self.cap = cap
        self.pages = torch.empty((cap, like.numel()), dtype=like.dtype)
        self.rows = self.pages.view(torch.uint8).numpy()


def batched_layout(host) -> str | None:
    """The layout whose pages :class:`HostPages` may gather and scatter in one call each, or None for the per-page
    path.

    Only SGLang's own MHA host pool qualifies (``MHATokenToKVPoolHost`` or a subclass that overrides neither
    ``get_data_page`` nor ``set_from_flat_data_page``), in ``layer_first`` or ``page_first`` layout, with K and V
    of one width and a single ``kv_buffer`` of exactly the shape that layout's per-page copy slices:
    [2, layers, size, heads, head_dim] (layer_first) or [2, size, layers, heads, head_dim] (page_first), in the
    pool's dtype. The batched copy then moves the very elements the per-page copy would, in the same order.

    Args:
        host: the host pool SGLang registered (any HostKVCache, or a wrapper around one).

    Returns:
        ``"layer_first"``, ``"page_first"`` or None.
    """
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    cls = type(host)
    if not isinstance(host, MHATokenToKVPoolHost):
        return None
    for method in ("get_data_page", "set_from_flat_data_page"):
        if getattr(cls, method, None) is not getattr(MHATokenToKVPoolHost, method):
            return None  # the pool copies its pages its own way (scales beside the data, split K/V, ...)
    layout = getattr(host, "layout", None)
    if layout not in BATCHED_LAYOUTS:
        return None
    kv = getattr(host, "kv_buffer", None)
    try:
        size, layers, heads, dim = (int(host.size), int(host.layer_num), int(host.head_num), int(host.head_dim))
        v_dim = int(getattr(host, "v_head_dim", dim))
    except (AttributeError, TypeError, ValueError):
        return None
    if not isinstance(kv, torch.Tensor) or kv.dtype != host.dtype or v_dim != dim:
        return None
    want = (2, layers, size, heads, dim) if layout == "layer_first" else (2, size, layers, heads, dim)
    return layout if tuple(kv.shape) == want else None


class HostPages:
    """Page I/O on one SGLang host pool: checked page starts, flat pages out (for the tiers to encode) and decoded
    pages in, batched where :func:`batched_layout` allows.

    Args:
        host: the host pool SGLang registered with the storage backend (``register_mem_pool_host``).

    Raises:
        ConfigError: the pool has no flat-page copy (SGLang's MHA pool in ``page_unified`` layout).
    """

    def __init__(self, host):
        self.host = host
        self.page_size = int(host.page_size)
        self.size = int(host.size)
        page = host.get_dummy_flat_data_page()  # allocates: measured once, not per lookup
        try:
            host.get_data_page(0, flat=True)
        except (ValueError, NotImplementedError) as e:
            # SGLang 0.5.23's MHA pool builds a page_unified buffer but copies no flat pages out of it: refuse at
            # start-up rather than fail every backup on SGLang's I/O thread
            raise ConfigError(f"kvdrive cannot move pages of this host pool ({type(host).__name__}, layout "
                              f"{getattr(host, 'layout', '?')}): {e}. Use another --hicache-mem-layout "
                              f"(layer_first, page_first)") from None
        self.page_numel = int(page.numel())
        self.page_bytes = int(page.numel() * page.element_size())
        self.layout = batched_layout(host)  # the layout gathered / scattered in one call; None: per page
        self._scratch = threading.local()

    def starts(self, op: str, n: int, host_indices) -> list[int]:
        """The host-pool slot each of ``n`` pages starts at, checked (found by tests/sglang/test_fuzz_config.py: a
        page start outside the pool sliced a short page, or wrapped round from the end, and stored it under the
        key).

        Args:
            op: the calling operation, named in errors (``"batch_set_v1"``).
            n: pages the call moves (its keys).
            host_indices: SGLang's host indices for them, ``page_size`` per page.

        Returns:
            The first slot of each page, in key order.

        Raises:
            ConfigError: ``host_indices`` is not a 1-D integer tensor, is too short, or a page start is outside the
                pool or not on a page boundary.
        """
        ps = self.page_size
        if not (isinstance(host_indices, torch.Tensor) and host_indices.dim() == 1
                and not host_indices.is_floating_point() and not host_indices.is_complex()):
            what = f"a {tuple(host_indices.shape)} {host_indices.dtype} tensor" \
                if isinstance(host_indices, torch.Tensor) else type(host_indices).__name__
            raise ConfigError(f"{op}: host_indices must be a 1-D integer tensor, got {what}")
        if host_indices.numel() < n * ps:
            raise ConfigError(f"{op}: {n} keys need {n * ps} host indices ({ps} per page), "
                              f"got {host_indices.numel()}")
        starts = host_indices[:n * ps:ps].tolist()
        for s in starts:
            if not 0 <= s <= self.size - ps or s % ps:
                raise ConfigError(f"{op}: host index {s} is not the start of a page in the host pool "
                                  f"({self.size} slots, pages of {ps})")
        return starts

    def tokens(self, starts: Sequence[int]) -> torch.Tensor:
        """Host-pool token slots of the pages starting at ``starts``, in page order (a page's slots are contiguous).

        Args:
            starts: page starts (checked by :meth:`starts`).

        Returns:
            A 1-D int64 tensor of ``len(starts) * page_size`` slots.
        """
        return torch.from_numpy((np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.page_size)).reshape(-1))

    def read(self, starts: Sequence[int]) -> list:
        """The host pool's pages at ``starts`` as flat pages, for the tiers to encode.

        Args:
            starts: page starts (checked by :meth:`starts`).

        Returns:
            One flat page per start, in order: on the batched path numpy byte rows of one gathered copy (the tiers
            encode them without a torch call per page), else contiguous tensors from the pool's own
            ``get_data_page``, which may be views of the pool where a page is contiguous in it: read them before
            the slots are reused (``TierEngine.put_many`` encodes before it returns).
        """
        host, n, ps = self.host, len(starts), self.page_size
        if self.layout is None or n == 1:
            return [host.get_data_page(s, flat=True).contiguous() for s in starts]
        layers, heads, dim = host.layer_num, host.head_num, host.head_dim
        tokens = self.tokens(starts)
        if self.layout == "layer_first":  # [2, layers, n*ps, heads, dim] -> [n, 2, layers, ps, heads, dim]
            got = host.kv_buffer[:, :, tokens].view(2, layers, n, ps, heads, dim).permute(2, 0, 1, 3, 4, 5)
        else:  # page_first: [2, n*ps, layers, heads, dim] -> [n, 2, ps, layers, heads, dim]
            got = host.kv_buffer[:, tokens].view(2, n, ps, layers, heads, dim).permute(1, 0, 2, 3, 4, 5)
        rows = got.reshape(n, -1).view(torch.uint8).numpy()
        return [rows[i] for i in range(n)]

    def write(self, starts: Sequence[int], pages: torch.Tensor) -> None:
        """Copy decoded flat pages into the host pool: row ``i`` of ``pages`` to the page at ``starts[i]``.

        Args:
            starts: page starts (checked by :meth:`starts`).
            pages: a [len(starts), page elements] tensor in the pool's dtype (rows of :meth:`scratch`).
        """
        host, n, ps = self.host, len(starts), self.page_size
        if self.layout is None or n == 1:
            for s, p in zip(starts, pages):
                host.set_from_flat_data_page(s, p)
            return
        layers, heads, dim = host.layer_num, host.head_num, host.head_dim
        tokens = self.tokens(starts)
        if self.layout == "layer_first":  # kv_buffer [2, layers, tokens, heads, dim]
            src = pages.view(n, 2, layers, ps, heads, dim).permute(1, 2, 0, 3, 4, 5)
            host.kv_buffer[:, :, tokens] = src.reshape(2, layers, n * ps, heads, dim)
        else:  # page_first: kv_buffer [2, tokens, layers, heads, dim]
            src = pages.view(n, 2, ps, layers, heads, dim).permute(1, 0, 2, 3, 4, 5)
            host.kv_buffer[:, tokens] = src.reshape(2, n * ps, layers, heads, dim)

    def scratch(self, n: int) -> PageScratch:
        """This thread's reusable page buffers for at least ``n`` pages (SGLang calls get from its prefetch I/O
        thread, and set from its backup thread).

        Args:
            n: pages the caller decodes at once.

        Returns:
            A :class:`PageScratch` with ``cap >= n``, reused by later calls on this thread.
        """
        sc = getattr(self._scratch, "pages", None)
        if sc is None or sc.cap < n:
            sc = self._scratch.pages = PageScratch(self.host.get_dummy_flat_data_page(),
                                                   max(n, 2 * sc.cap if sc is not None else 16))
        return sc

    def empty_page(self) -> torch.Tensor:
        """A new flat page buffer on the CPU (the older per-key API's output when the caller gives none)."""
        return torch.empty_like(self.host.get_dummy_flat_data_page(), device="cpu")
