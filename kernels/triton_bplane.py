"""Triton kernel behind ``bplane_decode``: one program per 2048-value block of a bplane page body.

Imported only when the dispatcher gets CUDA tensors (or ``impl="triton"``). A program reads its block's 8-byte
descriptor, unpacks each value's ``width``-bit index from the two bytes it may straddle, looks it up in the
block's dictionary or, for an escape, takes the next escape byte (an escape's place in the list is an exclusive
prefix sum over the block: ``tl.cumsum``), joins it with the value's low byte and stores the 16-bit value where the
caller's ``seg`` layout puts it. Bytes are read one by one, so bodies need no alignment. Every load is clamped into
``buf`` and every store masked to the page, so a damaged body (which the host-side check and the checksum keep
from getting here) cannot touch memory outside the two tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tier.bplane import BLOCK_ELEMS, RAW_WIDTH, num_blocks
from .bplane_decode import DESC_BYTES


@triton.jit
def _u8(buf_ptr, at, last):
    """Bytes at ``at`` as int32, reads clamped into [0, last] (what lies past a body is masked off by callers)."""
    return tl.load(buf_ptr + tl.minimum(tl.maximum(at, 0), last)).to(tl.int32)


@triton.jit
def _bplane_kernel(
    buf_ptr,
    offsets_ptr,
    out_ptr,
    buf_last,
    n,
    blocks_per_page,
    first,
    total,
    seg,
    DESC: tl.constexpr,
    RAW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    page = pid // blocks_per_page
    block = pid % blocks_per_page
    body = tl.load(offsets_ptr + page)
    d = body + block * DESC
    offset = (
        _u8(buf_ptr, d, buf_last)
        | (_u8(buf_ptr, d + 1, buf_last) << 8)
        | (_u8(buf_ptr, d + 2, buf_last) << 16)
        | (_u8(buf_ptr, d + 3, buf_last).to(tl.int64) << 24)
    )
    n_esc = _u8(buf_ptr, d + 4, buf_last) | (_u8(buf_ptr, d + 5, buf_last) << 8)
    width = tl.minimum(_u8(buf_ptr, d + 6, buf_last), RAW)
    n_dict = _u8(buf_ptr, d + 7, buf_last)
    plane = body + blocks_per_page * DESC
    start = plane + n + offset
    count = tl.minimum(n - block * BLOCK, BLOCK)
    k = tl.arange(0, BLOCK)
    valid = k < count
    e = block * BLOCK + k  # value index in the page
    pos = k * width
    at = start + n_dict + (pos >> 3)
    pair = _u8(buf_ptr, at, buf_last) | (_u8(buf_ptr, at + 1, buf_last) << 8)
    idx = (pair >> (pos & 7)) & ((1 << width) - 1)
    raw = width == RAW
    esc = (idx >= n_dict) & valid & (width != RAW)
    esc_i = esc.to(tl.int32)
    ordinal = tl.minimum(tl.cumsum(esc_i, axis=0) - esc_i, tl.maximum(n_esc - 1, 0))
    packed_len = (count * width + 7) // 8
    esc_byte = _u8(buf_ptr, start + n_dict + packed_len + ordinal, buf_last)
    dict_byte = _u8(buf_ptr, start + tl.minimum(idx, tl.maximum(n_dict - 1, 0)), buf_last)
    hi = tl.where(raw, idx, tl.where(esc, esc_byte, dict_byte))
    lo = _u8(buf_ptr, plane + e, buf_last)
    val = ((hi << 8) | lo).to(tl.int16)  # truncates to the low 16 bits
    dest = (e // seg) * (total * seg) + (first + page) * seg + e % seg
    tl.store(out_ptr + dest, val, mask=valid)


def bplane_decode(
    buf: torch.Tensor, offsets: torch.Tensor, n: int, out: torch.Tensor, seg: int, first: int, total: int
) -> None:
    """Launch one program per block of every page (arguments checked by ``bplane_decode.bplane_decode``)."""
    P, nb = offsets.numel(), num_blocks(n)
    if P == 0 or nb == 0 or buf.numel() == 0:
        return
    _bplane_kernel[(P * nb,)](
        buf,
        offsets.contiguous(),
        out,
        buf.numel() - 1,
        n,
        nb,
        first,
        total,
        seg,
        DESC=DESC_BYTES,
        RAW=RAW_WIDTH,
        BLOCK=BLOCK_ELEMS,
        num_warps=8,
    )
