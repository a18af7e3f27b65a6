"""Page scatter from a contiguous staging buffer into a paged KV buffer: the last step of a compressed load
(``compressed_load``), after the pages are decoded on the device.

A paged buffer is SGLang's per-layer layout: ``[num_slots, ...]`` (MHA: ``[size, head_num, head_dim]``), where token
slot ``s`` belongs to page ``s // page_size``. Page ``p`` is the ``page_size`` consecutive slots
``p * page_size ... p * page_size + page_size - 1``. A staging buffer holds ``n`` pages of every layer back to back:
``[L, n * page_size, ...]``, page ``i`` of ``page_ids`` at rows ``i * page_size ...`` of each layer.

    scatter_pages_layers(layers, page_ids, page_size, data [L, n * page_size, ...])   layers[l][slots] = data[l]

``layers`` is a list/tuple of per-layer buffers (SGLang's ``k_buffer + v_buffer``), all the same shape, dtype and
device, or one stacked tensor ``[L, num_slots, ...]``; every layer moves in one launch.

Copies are bit-exact for every dtype (elements are moved as same-sized integers; fp8 included). ``page_ids`` must
be distinct (with repeats, which copy lands is unspecified). ``check=True`` (default) verifies that every page lies
inside the buffer and raises IndexError otherwise; on a GPU this reads one value back (a sync), so callers that
checked the ids on the host (``compressed_load``) pass ``check=False``. Unchecked, the Triton kernel still never
touches memory outside the buffer: a page out of range is skipped.

The dispatcher runs the Triton kernel (``triton_page_copy``) on CUDA tensors and the torch reference (``*_ref``)
otherwise; ``impl="torch"|"triton"`` forces one. (A gather, paged -> staging, and per-layer wrappers existed until
issue 18's audit: nothing served them. Git has them, for the day a GPU-side encode on write-back needs a gather.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._dispatch import use_triton

Layers = torch.Tensor | Sequence[torch.Tensor]

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory viewed as integers of the same size (index ops are not implemented for every dtype)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        sized = _SAME_SIZE_INT.get(t.element_size())
        if sized is not None:
            return t.view(sized)
    return t


def _page_ids(page_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(page_ids, device=device)
    if ids.dim() != 1:
        raise ValueError(f"page_ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"page_ids must be an integer tensor, got {ids.dtype}")
    return ids


def _page_size(page_size) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    return page_size


def page_slots(page_ids: torch.Tensor, page_size: int) -> torch.Tensor:
    """Token slots of the pages, in order: ``[n * page_size]`` int64."""
    ids = page_ids.to(torch.int64)
    return (ids[:, None] * page_size + torch.arange(page_size, device=ids.device)).reshape(-1)


def _check_range(ids: torch.Tensor, page_size: int, num_slots: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids.to(torch.int64)))
    if lo < 0 or (hi + 1) * page_size > num_slots:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"page id {bad} is outside a buffer of {num_slots} slots "
            f"({num_slots // page_size} whole pages of {page_size})"
        )


class _LayerSet:
    """Per-layer paged buffers, either a list or one stacked tensor, validated to agree."""

    def __init__(self, layers: Layers, what: str):
        if isinstance(layers, torch.Tensor):
            if layers.dim() < 2 or layers.shape[0] == 0:
                raise ValueError(
                    f"{what}: a stacked tensor must be [L >= 1, num_slots, ...], got {tuple(layers.shape)}"
                )
            self.stacked, self.tensors = layers, tuple(layers.unbind(0))
        else:
            self.stacked, self.tensors = None, tuple(layers)
            if not self.tensors:
                raise ValueError(f"{what}: no layers given")
            t0 = self.tensors[0]
            for i, t in enumerate(self.tensors):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{what}: layer {i} is {type(t).__name__}, not a tensor")
                if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
                    raise ValueError(
                        f"{what}: layer {i} is {tuple(t.shape)} {t.dtype} on {t.device}, layer 0 is "
                        f"{tuple(t0.shape)} {t0.dtype} on {t0.device}; all layers must agree"
                    )
            if t0.dim() < 1:
                raise ValueError(f"{what}: a layer must be [num_slots, ...], got a 0-d tensor")
        first = self.stacked[0] if self.stacked is not None else self.tensors[0]
        self.num_layers = len(self.tensors)
        self.num_slots = first.shape[0]
        self.inner = tuple(first.shape[1:])
        self.dtype, self.device = first.dtype, first.device


def _staging_shape(ls: _LayerSet, n_rows: int) -> tuple:
    return (ls.num_layers, n_rows) + ls.inner


def _check_staging(t: torch.Tensor, shape: tuple, ls: _LayerSet, name: str) -> None:
    if tuple(t.shape) != shape or t.dtype != ls.dtype or t.device != ls.device:
        raise ValueError(
            f"{name} must be {shape} {ls.dtype} on {ls.device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


# ------------------------------------------------------------------------------------------------- references


def scatter_pages_layers_ref(layers: Layers, page_ids, page_size: int, data: torch.Tensor) -> None:
    """Torch reference of ``scatter_pages_layers``: ``layers[l][page_slots(page_ids)] = data[l]``."""
    ls = _LayerSet(layers, "scatter_pages_layers")
    page_size = _page_size(page_size)
    ids = _page_ids(page_ids, ls.device)
    _check_range(ids, page_size, ls.num_slots)
    slots = page_slots(ids, page_size)
    _check_staging(data, _staging_shape(ls, slots.numel()), ls, "data")
    for d, t in zip(_bits(data).unbind(0), ls.tensors):
        _bits(t)[slots] = d


# ------------------------------------------------------------------------------------------------ dispatchers


def scatter_pages_layers(
    layers: Layers, page_ids, page_size: int, data: torch.Tensor, *, check: bool = True, impl: str = "auto"
) -> None:
    """Scatter ``data [L, n * page_size, ...]`` into the pages of every layer in one launch."""
    ls = _LayerSet(layers, "scatter_pages_layers")
    if not use_triton(impl, ls.tensors[0], data):
        return scatter_pages_layers_ref(layers, page_ids, page_size, data)
    page_size = _page_size(page_size)
    ids = _page_ids(page_ids, ls.device)
    if check:
        _check_range(ids, page_size, ls.num_slots)
    _check_staging(data, _staging_shape(ls, ids.numel() * page_size), ls, "data")
    from . import triton_page_copy

    triton_page_copy.scatter_pages(ls, ids, page_size, data)
