"""SGLang's host pool seen as pages: the page I/O between it and kvdrive's tiers, apart from the storage backend.

``KvdriveStorage`` moves whole pages between SGLang's host pool (the uncompressed staging tier) and kvdrive's tiers;
everything that touches the pool's buffers lives here, behind :class:`HostPages`, so that the backend stays thin
and one module tracks how each SGLang release lays its host pool out.

A flat page is SGLang's own: what the pool's ``get_data_page(start, flat=True)`` returns and
``set_from_flat_data_page`` takes, in the byte order of the pool's layout. Pages of different layouts never meet
(the layout is part of the namespace).

Every torch call lets go of the GIL, and beside SGLang's scheduler loop each one may wait a switch interval to get
it back, so a batch of pages moves in one scatter and one gather per 8 MiB (:data:`GATHER_CHUNK_BYTES`), not two or
three torch calls a page (at page size 1 the per-page copy is a Python loop per token). The batch path is a strided view
of the pool's buffer as [pages, *page] (:class:`PageView`), whose row ``p`` holds exactly the elements SGLang's
``get_data_page(p * page_size)`` slices, in the same order: for every pool kind and layout of
``compat.host_pools.PAGE_AXES`` (MHA and MLA in ``layer_first``, ``page_first``, ``page_first_direct``; MHA also in
``page_head``). It is built from the pool's kind and layout, then checked against the pool's own per-page view;
anything else (a subclass with a page copy of its own, a wrapper, DCP shards, an unknown layout) takes SGLang's own
``get_data_page`` / ``set_from_flat_data_page``, so a layout kvdrive does not know is slower, never wrong.

Reloads land in place (issue 18): on the batched path each page's slot bytes in the pool's buffer are handed to the
tiers as a writable numpy view (:meth:`PageView.slots`), flat where a layout keeps a page in one run of bytes, else
[chunks, chunk bytes] rows (layer_first: one row per layer and K/V) in the flat page's byte order, and the tiers
decode straight into them: no scratch tensor, no second copy (:class:`Landing`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .compat.host_pools import AxisCounts, PageAxis, page_axis
from .tier.errors import ConfigError

# Layouts batched for some pool kind (MLA has no page_head); whether a given pool is, is PageView.of's call
BATCHED_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")

log = logging.getLogger(__name__)


def strided_form(t: torch.Tensor) -> tuple:
    """Which bytes of its storage ``t`` views, in which order: (byte offset, ((size, byte stride), ...)) with size-1
    dimensions dropped and dimensions that step as one merged. Two views of one storage with equal forms hold the
    same bytes in the same order, whatever their shapes and dtypes."""
    item = t.element_size()
    dims: list[tuple[int, int]] = []
    for size, stride in [*zip(t.shape, (st * item for st in t.stride())), (item, 1)]:
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return t.storage_offset() * item, tuple(dims)


# Largest fresh buffer one batched read allocates (see PageView.gather)
GATHER_CHUNK_BYTES = 8 << 20

WIDE_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def widest_view(buffer: torch.Tensor) -> torch.Tensor:
    """``buffer``'s bytes as the widest integer dtype its last dimension divides into: the gather / scatter kernels
    copy element by element, so a bf16 or fp8 page moved as int64 takes 4 or 8 times fewer steps (measured by
    bench/host_pages_bench.py); the bytes, and so the flat page, are the same."""
    raw = buffer.view(torch.uint8) if buffer.dtype != torch.uint8 else buffer
    for dtype in WIDE_DTYPES:
        try:
            return raw.view(dtype)
        except RuntimeError:  # the last dimension's bytes do not divide, or the storage offset is not aligned
            continue
    return buffer


class PageView:
    """A host pool's buffer seen as [pages, *page]: row ``p`` is a strided view of exactly the elements SGLang's
    ``get_data_page(p * page_size)`` slices, in its order, so ``rows[pages]`` gathers a batch of flat pages in one
    call and ``rows[pages] = new`` scatters one back (SGLang's byte order, so pages stored by the per-page copy
    read back the same).

    Args:
        host: the host pool.
        axis: where its layout keeps a page (``compat.host_pools.PAGE_AXES``).
    """

    def __init__(self, host, axis: PageAxis):
        self.host, self.axis, self.page_size = host, axis, int(host.page_size)
        self._buffer: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._slots: tuple[torch.Tensor, np.ndarray | None] | None = None  # (the buffer they view, slots)

    @classmethod
    def of(cls, host) -> PageView | None:
        """The page view of ``host`` where kvdrive knows its pool kind and layout and the view matches the pool's own
        per-page view, else None (SGLang's per-page copy)."""
        axis = page_axis(host)
        if axis is None:
            return None
        view = cls(host, axis)
        try:
            ok = view._matches_sglang()
        except Exception as e:  # noqa: BLE001 - a pool kvdrive cannot read is copied SGLang's way, never refused
            log.warning(
                "kvdrive: %s (%s): per-page copies (page view check failed: %s)", type(host).__name__, host.layout, e
            )
            return None
        if not ok:
            log.warning(
                "kvdrive: %s in layout %s does not keep its pages where compat.host_pools.PAGE_AXES says: "
                "per-page copies",
                type(host).__name__,
                host.layout,
            )
            return None
        return view

    def rows(self) -> torch.Tensor:
        """The [pages, *page] view of the pool's buffer (rebuilt if SGLang swapped the buffer)."""
        buffer = getattr(self.host, self.axis.buffer)
        if buffer is not self._buffer:
            ax, ps, wide = self.axis.axis, self.page_size, widest_view(buffer)
            if self.axis.counts is AxisCounts.TOKENS:
                pages = wide.shape[ax] // ps
                wide = wide.narrow(ax, 0, pages * ps).unflatten(ax, (pages, ps))
            self._rows, self._buffer = wide.movedim(ax, 0), buffer
        return self._rows

    def slots(self) -> np.ndarray | None:
        """Every page's slot bytes in the pool's buffer as one writable numpy uint8 view, [pages, page bytes] where
        a layout keeps a page in one run of bytes, else [pages, chunks, chunk bytes] (each chunk contiguous, chunks
        in the flat page's byte order: exactly the bytes and order of :meth:`rows`, which ``of`` checked against
        SGLang's own per-page view). None where a page's bytes do not form such rows (no known layout)."""
        rows = self.rows()
        cached = self._slots
        if cached is not None and cached[0] is self._buffer:
            return cached[1]
        offset, dims = strided_form(rows[0])
        view = None
        if 1 <= len(dims) <= 2 and dims[-1][1] == 1 and rows.dim() > 1:
            shape = (rows.shape[0], *(size for size, _ in dims))
            strides = (rows.stride(0) * rows.element_size(), *(stride for _, stride in dims))
            try:
                raw = self._buffer.view(torch.uint8)
            except RuntimeError:  # a buffer whose last dimension is strided: no byte view of it
                raw = None
            if raw is not None:
                view = torch.as_strided(raw, shape, strides, offset).numpy()
        self._slots = (self._buffer, view)
        return view

    def _matches_sglang(self) -> bool:
        """Whether rows hold what SGLang's own per-page view holds: same storage, elements and order, at the first,
        second, middle and last page, and the flat page's element count (no page bytes are written or compared:
        the check is on the views, so it costs nothing and touches no KV)."""
        host, ps = self.host, self.page_size
        rows = self.rows()
        buffer = self._buffer
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != host.dtype or rows.shape[0] * ps < int(host.size):
            return False
        dummy = host.get_dummy_flat_data_page()
        if rows[0].numel() * rows.element_size() != dummy.numel() * dummy.element_size():
            return False
        storage = buffer.untyped_storage().data_ptr()
        n = int(host.size) // ps
        for p in sorted({0, 1, n // 2, n - 1} & set(range(n))):
            ref = host.get_data_page(p * ps, flat=False)
            if not isinstance(ref, torch.Tensor) or ref.untyped_storage().data_ptr() != storage:
                return False
            if ref.dtype != buffer.dtype or strided_form(ref) != strided_form(rows[p]):
                return False
        return True

    def page_ids(self, starts: Sequence[int]) -> torch.Tensor:
        """Row of each page start (starts are page-aligned: :meth:`HostPages.starts` checks)."""
        return torch.from_numpy(np.asarray(starts, dtype=np.int64) // self.page_size)

    def gather(self, starts: Sequence[int]) -> list[torch.Tensor]:
        """The pages at ``starts`` as new [k, page bytes] uint8 tensors of up to :data:`GATHER_CHUNK_BYTES` each, in
        order (one gather each). Chunked because a fresh allocation past glibc's dynamic mmap threshold (32 MiB at
        most) is a new mapping whose every 4 KiB page faults on first touch: one 256 MiB gather (256 pages of 1 MiB)
        took 110-200 ms against 40-60 ms in 8 MiB chunks, which malloc recycles (bench/host_pages_bench.py). Advanced
        indexing, not ``index_select``: on a strided view torch's CPU index_select takes a slow generic path (3-8x
        slower here)."""
        rows, ids = self.rows(), self.page_ids(starts)
        per = max(1, GATHER_CHUNK_BYTES // (rows[0].numel() * rows.element_size()))
        return [
            rows[ids[a : a + per]].view(min(per, len(starts) - a), -1).view(torch.uint8)
            for a in range(0, len(starts), per)
        ]

    def scatter(self, starts: Sequence[int], pages: torch.Tensor) -> None:
        """Row ``i`` of ``pages`` (a [n, page elements] tensor in the pool's dtype) into the page at ``starts[i]``."""
        rows = self.rows()
        src = pages.reshape(len(starts), -1).contiguous().view(torch.uint8).view(rows.dtype)
        rows.index_put_((self.page_ids(starts),), src.view(len(starts), *rows.shape[1:]))


class Landing:
    """Where one batch of reloaded pages is decoded: ``outs[i]`` for the page at ``starts[i]``, then :meth:`land`
    with how many leading pages hit.

    On the batched path the outs are the pool's own slots (:meth:`PageView.slots`), written in place as they
    decode, and landing is a no-op. Pages after the first miss may be written too, and a damaged page may be left
    half-written: SGLang counts only the leading hits kvdrive reports and frees the other slots of the prefetch
    unread (HiCacheController's page transfer, both SGLang versions), so it never reads them. Elsewhere (SGLang's
    per-page copy) the outs are fresh page buffers, copied in with SGLang's own ``set_from_flat_data_page``.

    Attributes:
        outs: one writable page buffer per start, for the tiers' ``get_many``.
        direct: whether ``outs`` are the pool's own slots.
    """

    def __init__(self, outs: list, land: Callable[[int], None] | None):
        self.outs, self._land = outs, land
        self.direct = land is None

    def land(self, n: int) -> None:
        """The first ``n`` pages hit: make them SGLang's (copy them in where they are not in place)."""
        if n and self._land is not None:
            self._land(n)


def batched_layout(host) -> str | None:
    """The layout whose pages :class:`HostPages` gathers and scatters in one call each, or None for the per-page
    path (see :meth:`PageView.of`).

    Args:
        host: the host pool SGLang registered (any HostKVCache, or a wrapper around one).

    Returns:
        The pool's layout, or None.
    """
    return host.layout if PageView.of(host) is not None else None


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
            raise ConfigError(
                f"kvdrive cannot move pages of this host pool ({type(host).__name__}, layout "
                f"{getattr(host, 'layout', '?')}): {e}. Use another --hicache-mem-layout "
                f"(layer_first, page_first, page_first_direct)"
            ) from None
        self.page_numel = int(page.numel())
        self.page_bytes = int(page.numel() * page.element_size())
        self.view = PageView.of(host)  # the batch path; None: SGLang's per-page copy
        self.layout = host.layout if self.view is not None else None  # the layout batched (None: per page)

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
        if not (
            isinstance(host_indices, torch.Tensor)
            and host_indices.dim() == 1
            and not host_indices.is_floating_point()
            and not host_indices.is_complex()
        ):
            what = (
                f"a {tuple(host_indices.shape)} {host_indices.dtype} tensor"
                if isinstance(host_indices, torch.Tensor)
                else type(host_indices).__name__
            )
            raise ConfigError(f"{op}: host_indices must be a 1-D integer tensor, got {what}")
        if host_indices.numel() < n * ps:
            raise ConfigError(f"{op}: {n} keys need {n * ps} host indices ({ps} per page), got {host_indices.numel()}")
        starts = host_indices[: n * ps : ps].tolist()
        for s in starts:
            if not 0 <= s <= self.size - ps or s % ps:
                raise ConfigError(
                    f"{op}: host index {s} is not the start of a page in the host pool "
                    f"({self.size} slots, pages of {ps})"
                )
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
            One flat page per start, in order: on the batched path numpy byte rows of fresh gathered copies that
            nothing else refers to (the tiers may keep them, and encode them without a torch call per page), else
            contiguous tensors from the pool's own ``get_data_page``, which may be views of the pool where a page is
            contiguous in it: read them before
            the slots are reused (``TierEngine.put_many`` encodes before it returns).
        """
        if self.view is None or len(starts) == 1:
            return [self.host.get_data_page(s, flat=True).contiguous() for s in starts]
        return [row for chunk in self.view.gather(starts) for row in chunk.numpy()]

    def write(self, starts: Sequence[int], pages: torch.Tensor) -> None:
        """Copy flat pages into the host pool: row ``i`` of ``pages`` to the page at ``starts[i]``.

        Args:
            starts: page starts (checked by :meth:`starts`).
            pages: a [len(starts), page elements] tensor in the pool's dtype.
        """
        if self.view is None or len(starts) == 1:
            for s, p in zip(starts, pages):
                self.host.set_from_flat_data_page(s, p)
            return
        self.view.scatter(starts, pages)

    def landing(self, starts: Sequence[int]) -> Landing:
        """Where to decode the pages reloaded into the slots at ``starts``: the slots themselves where the pool's
        buffer allows (see :class:`Landing`), else new page buffers that SGLang's per-page copy takes in.

        Args:
            starts: page starts (checked by :meth:`starts`).
        """
        slots = self.view.slots() if self.view is not None else None
        if slots is not None:
            return Landing([slots[s // self.page_size] for s in starts], None)
        pages = torch.empty((len(starts), self.page_numel), dtype=self.host.dtype)
        return Landing(list(pages), lambda n: self.write(starts[:n], pages[:n]))

    def empty_page(self) -> torch.Tensor:
        """A new flat page buffer on the CPU (the older per-key API's output when the caller gives none)."""
        return torch.empty_like(self.host.get_dummy_flat_data_page(), device="cpu")
