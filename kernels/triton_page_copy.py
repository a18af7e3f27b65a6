"""Triton kernel behind ``page_copy``: one launch scatters the pages of every layer from staging into paged buffers.

Imported only when a dispatcher gets CUDA tensors (or ``impl="triton"``). Rows are moved as the widest integer
word (8/4/2/1 bytes) that divides the row, the strides and the addresses, so any dtype copies bit-exactly and a
bf16 row of 128 elements moves as 32 int64 words. Per-layer buffers given as a list are addressed through a device
table of their base addresses (cached: SGLang's per-layer buffers live as long as the server), a stacked tensor
through its layer stride.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ._dispatch import cdiv, next_pow2

log = logging.getLogger("kvdrive.kernels")

_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE = 4096  # words per program


@triton.jit
def _scatter_pages_kernel(
    paged_ptr,
    paged_table,
    paged_layer_stride,
    paged_row_stride,
    num_slots,
    stage_ptr,
    stage_layer_stride,
    stage_row_stride,
    page_ids_ptr,
    n_rows,
    page_size,
    row_words,
    USE_TABLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # staging rows
    rmask = rows < n_rows
    page = tl.load(page_ids_ptr + rows // page_size, mask=rmask, other=0).to(tl.int64)
    slot = page * page_size + (rows % page_size)
    inside = rmask & (slot >= 0) & (slot < num_slots)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < row_words
    if USE_TABLE:
        paged = tl.load(paged_table + layer).to(tl.pointer_type(stage_ptr.dtype.element_ty))
    else:
        paged = paged_ptr + layer * paged_layer_stride
    paged_offs = slot[:, None] * paged_row_stride + cols[None, :]
    stage = stage_ptr + layer * stage_layer_stride
    stage_offs = rows.to(tl.int64)[:, None] * stage_row_stride + cols[None, :]
    v = tl.load(stage + stage_offs, mask=inside[:, None] & cmask[None, :])
    tl.store(paged + paged_offs, v, mask=inside[:, None] & cmask[None, :])


def _inner_contiguous(t: torch.Tensor, lead: int) -> bool:
    expected = 1
    for size, stride in reversed(list(zip(t.shape[lead:], t.stride()[lead:]))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _rows(t: torch.Tensor, lead: int, row_elems: int) -> torch.Tensor:
    """``t`` as ``[lead dims..., row_elems]`` integers of its item size (a view: callers checked contiguity)."""
    v = t.view(*t.shape[:lead], row_elems)
    return v.view(_WORD[t.element_size()]) if t.element_size() in _WORD else v


def _word_size(views: list[torch.Tensor], row_bytes: int) -> int:
    for w in (8, 4, 2, 1):
        if w < views[0].element_size() or row_bytes % w:
            continue
        if all(v.data_ptr() % w == 0 and all((s * v.element_size()) % w == 0 for s in v.stride()[:-1]) for v in views):
            return w
    return views[0].element_size()


_tables: dict = {}


def _table(tensors, device) -> torch.Tensor:
    key = (str(device), tuple(t.data_ptr() for t in tensors))
    tab = _tables.get(key)
    if tab is None:
        if len(_tables) >= 64:
            _tables.clear()
        tab = _tables[key] = torch.tensor(key[1], dtype=torch.int64, device=device)
    return tab


def scatter_pages(ls, ids: torch.Tensor, page_size: int, stage: torch.Tensor) -> None:
    """Scatter ``stage [L, n * page_size, ...]`` into the pages ``ids`` of the layers ``ls`` (a page_copy._LayerSet)."""
    row_elems = 1
    for d in ls.inner:
        row_elems *= d
    n_rows = ids.numel() * page_size
    if row_elems == 0 or n_rows == 0 or ls.num_layers == 0:
        return
    itemsize = stage.element_size()
    layers = [ls.stacked] if ls.stacked is not None else list(ls.tensors)
    lead = 2 if ls.stacked is not None else 1
    ok = _inner_contiguous(stage, 2) and all(_inner_contiguous(t, lead) for t in layers)
    if ok and ls.stacked is None:
        ok = all(t.stride(0) == layers[0].stride(0) for t in layers)
    if not ok:
        from . import page_copy

        log.debug("kvdrive kernels: page scatter on non-contiguous rows, using the torch reference")
        dst = ls.stacked if ls.stacked is not None else list(ls.tensors)
        page_copy.scatter_pages_layers_ref(dst, ids, page_size, stage)
        return
    paged_rows = [_rows(t, lead, row_elems) for t in layers]
    stage_rows = _rows(stage, 2, row_elems)
    w = _word_size(paged_rows + [stage_rows], row_elems * itemsize)
    if w != itemsize:
        paged_rows = [v.view(_WORD[w]) for v in paged_rows]
        stage_rows = stage_rows.view(_WORD[w])
    row_words = row_elems * itemsize // w
    p0 = paged_rows[0]
    if ls.stacked is not None:
        table, use_table = p0, False  # unused placeholder pointer
        layer_stride, row_stride = p0.stride(0), p0.stride(1)
    else:
        table, use_table = _table(paged_rows, p0.device), True
        layer_stride, row_stride = 0, p0.stride(0)
    block_c = min(next_pow2(row_words), _TILE)
    block_r = max(1, min(_TILE // block_c, next_pow2(n_rows)))
    grid = (cdiv(n_rows, block_r), cdiv(row_words, block_c), ls.num_layers)
    _scatter_pages_kernel[grid](
        p0,
        table,
        layer_stride,
        row_stride,
        ls.num_slots,
        stage_rows,
        stage_rows.stride(0),
        stage_rows.stride(1),
        ids.contiguous(),
        n_rows,
        page_size,
        row_words,
        USE_TABLE=use_table,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )
