"""Triton kernel behind ``dequant``: int8 / fp8 (e4m3fn) codes times a float32 row scale, rounded to the output dtype.

Imported only when a dispatcher gets CUDA tensors (or ``impl="triton"``). e4m3fn codes are decoded with integer
arithmetic (exact, and independent of the GPU's native fp8 support, which Triton only has from sm89): normal
codes become float32 bit patterns, subnormals ``m * 2^-9``, 0x7F/0xFF NaN. The float32 product is a plain
multiply (no FMA to fuse with) and the conversion to bf16 (done on the bits) / fp16 rounds to nearest even, so
the result matches ``tier.codecs.decode_page``. Scales of a raw body are assembled from their four little-endian
bytes, so bodies need no alignment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import cdiv, next_pow2

_TILE = 4096  # elements per program


@triton.jit
def _dequant_kernel(
    codes_ptr,
    codes_page_stride,
    codes_row_stride,
    scale_ptr,
    scale_page_stride,
    out_ptr,
    out_page_stride,
    out_row_stride,
    n_rows,
    row_len,
    IS_FP8: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    page = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < row_len)[None, :]
    rows64 = rows.to(tl.int64)
    # scales: float32 little-endian at byte offset page * stride + row * 4 of the body, assembled from bytes
    sp = scale_ptr + page * scale_page_stride + rows64 * 4
    b0 = tl.load(sp, mask=rmask, other=0).to(tl.int32)
    b1 = tl.load(sp + 1, mask=rmask, other=0).to(tl.int32)
    b2 = tl.load(sp + 2, mask=rmask, other=0).to(tl.int32)
    b3 = tl.load(sp + 3, mask=rmask, other=0).to(tl.int32)
    scale = (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)
    c = tl.load(
        codes_ptr + page * codes_page_stride + rows64[:, None] * codes_row_stride + cols[None, :], mask=mask, other=0
    )
    if IS_FP8:
        ci = c.to(tl.int32)
        sign = (ci & 0x80) << 24
        e = (ci >> 3) & 15
        m = ci & 7
        normal = sign | ((e + 120) << 23) | (m << 20)
        sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True) | sign  # m * 2^-9, exact
        bits = tl.where(e == 0, sub, normal)
        bits = tl.where((ci & 0x7F) == 0x7F, sign | 0x7FC00000, bits)  # e4m3fn NaN (no Inf in e4m3fn)
        v = bits.to(tl.float32, bitcast=True)
    else:
        v = c.to(tl.int8, bitcast=True).to(tl.float32)
    y = v * scale[:, None]
    if OUT_BF16:  # round to nearest even on the bits, as tier.dtypes does (not left to the backend's default)
        u = y.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
        r = tl.where(y != y, (u >> 16).to(tl.uint16) | 0x40, r)  # NaN stays a quiet NaN
        o = r.to(tl.bfloat16, bitcast=True)
    else:
        o = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + page * out_page_stride + rows64[:, None] * out_row_stride + cols[None, :], o, mask=mask)


def _launch(codes, cps, crs, scale, sps, out, ops, ors, n_pages, n_rows, row_len, fmt):
    if n_pages == 0 or n_rows == 0 or row_len == 0:
        return
    block_c = min(next_pow2(row_len), _TILE)
    block_r = max(1, min(_TILE // block_c, next_pow2(n_rows)))
    grid = (cdiv(n_rows, block_r), cdiv(row_len, block_c), n_pages)
    _dequant_kernel[grid](
        codes,
        cps,
        crs,
        scale,
        sps,
        out,
        ops,
        ors,
        n_rows,
        row_len,
        IS_FP8=fmt == "fp8",
        OUT_BF16=out.dtype == torch.bfloat16,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )


def dequant_body(body: torch.Tensor, fmt: str, row_len: int, n_rows: int, out: torch.Tensor) -> None:
    b = body if body.dim() == 2 else body.unsqueeze(0)
    o = out if out.dim() == 2 else out.unsqueeze(0)
    if b.numel() and b.stride(1) != 1:
        b = b.contiguous()
    if o.numel() and o.stride(1) != 1:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        dequant_body(body, fmt, row_len, n_rows, tmp)
        out.copy_(tmp)
        return
    codes = b[:, n_rows * 4 :] if b.shape[0] else b
    _launch(codes, b.stride(0), row_len, b, b.stride(0), o, o.stride(0), row_len, b.shape[0], n_rows, row_len, fmt)
