"""Dequantise-on-load for kvdrive's lossy page codecs (``tier/codecs.py``: ``Int8Codec``, ``Fp8Codec``).

A lossy page body (the blob after its ``HEADER.size``-byte header) is ``R`` float32 row scales (little-endian)
followed by ``R * row_len`` one-byte codes, with ``row_len`` = head_dim. Element ``j`` of row ``r`` decodes to

    int8: float32(int8(code)) * scale[r]          fp8: float32(e4m3fn(code)) * scale[r]

computed in float32 and rounded to the output dtype (nearest even). For an output dtype equal to the page's dtype
this is bit for bit what ``tier.codecs.decode_page`` produces. The kernels do not validate: an e4m3 NaN code (0x7F,
0xFF) decodes to NaN, where ``decode_page`` raises (blobs are checksummed before they get here).

    dequant_body(body u8 [nbytes] or [N, nbytes], fmt, row_len, out_dtype)  -> [R * row_len] or [N, R * row_len]
    split_lossy_body(body, row_len)                                         -> (scales, codes)
    dequant_rows_ref(codes [..., R, row_len], scales [..., R], fmt, out_dtype)  (the reference's row step)

``dequant_body`` takes the raw body bytes (or N equal-sized bodies, one per row of a 2-D uint8 tensor: the lossy
pages of a batch copied host -> GPU at half the bf16 size by ``compressed_load``, which is what calls it) and reads
the scales from them directly, whatever their alignment. ``fmt`` is "int8" or "fp8" (also "fp8_e4m3"). It runs the
Triton kernel (``triton_dequant``) on CUDA tensors and the torch reference otherwise; ``impl="torch"|"triton"``
forces one. (A row-level dispatcher and a torch quantiser existed until issue 18's audit: nothing served them.)
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton

FORMATS = ("int8", "fp8")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fmt(fmt: str) -> str:
    if fmt == "fp8_e4m3":
        return "fp8"
    if fmt not in FORMATS:
        raise ValueError(f"dequant format must be one of {', '.join(FORMATS)} (or fp8_e4m3), got {fmt!r}")
    return fmt


def _out_dtype(dtype) -> torch.dtype:
    if dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {dtype!r}")
    return dtype


def _code_bytes(codes: torch.Tensor) -> torch.Tensor:
    if codes.dtype not in (torch.uint8, torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"codes must be uint8/int8 (or float8_e4m3fn for fp8), got {codes.dtype}")
    return codes.view(torch.uint8)


def _row_len(row_len) -> int:
    if isinstance(row_len, bool) or not isinstance(row_len, int) or row_len < 1:
        raise ValueError(f"row_len must be a positive int, got {row_len!r}")
    return row_len


def body_rows(nbytes: int, row_len: int) -> int:
    """Rows in a lossy body of ``nbytes`` bytes: each row is a 4-byte scale plus ``row_len`` codes."""
    row_len = _row_len(row_len)
    if nbytes % (4 + row_len):
        raise ValueError(f"a lossy body of {nbytes} bytes is not whole rows of 4 + row_len {row_len} bytes")
    return nbytes // (4 + row_len)


def split_lossy_body(body: torch.Tensor, row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``body`` uint8 ``[nbytes]`` or ``[N, nbytes]`` -> (scales float32 ``[..., R]``, codes uint8
    ``[..., R, row_len]``).

    Codes are a view; scales are a view when their bytes are 4-aligned, a small copy otherwise."""
    if body.dtype != torch.uint8 or body.dim() not in (1, 2):
        raise ValueError(f"body must be a 1-D or 2-D uint8 tensor, got {tuple(body.shape)} {body.dtype}")
    R = body_rows(body.shape[-1], row_len)
    raw = body[..., : R * 4]
    try:
        scales = raw.view(torch.float32)
    except RuntimeError:  # unaligned: copy the (small) scale block
        scales = raw.clone(memory_format=torch.contiguous_format).view(torch.float32)
    codes = body[..., R * 4 :].unflatten(-1, (R, row_len))
    return scales, codes


# ------------------------------------------------------------------------------------------------- references


def dequant_rows_ref(
    codes: torch.Tensor,
    scales: torch.Tensor,
    fmt: str,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference: ``(float32(decode(codes)) * scales[..., None]).to(out_dtype)``."""
    fmt, out_dtype = _fmt(fmt), _out_dtype(out_dtype)
    u8 = _code_bytes(codes)
    if scales.shape != u8.shape[:-1]:
        raise ValueError(f"scales must have shape {tuple(u8.shape[:-1])} (one per row), got {tuple(scales.shape)}")
    vals = u8.view(torch.int8 if fmt == "int8" else torch.float8_e4m3fn).to(torch.float32)
    vals = vals * scales.to(torch.float32)[..., None]
    if out is None:
        return vals.to(out_dtype)
    if out.shape != vals.shape or out.dtype != out_dtype:
        raise ValueError(f"out must be {tuple(vals.shape)} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    out.copy_(vals)
    return out


def dequant_body_ref(
    body: torch.Tensor,
    fmt: str,
    row_len: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of ``dequant_body``."""
    scales, codes = split_lossy_body(body, row_len)
    res = dequant_rows_ref(codes, scales, fmt, out_dtype)
    res = res.flatten(-2)
    if out is None:
        return res
    _check_out(out, res.shape, out_dtype)
    out.copy_(res)
    return out


def _check_out(out: torch.Tensor, shape, dtype) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be {tuple(shape)} {dtype}, got {tuple(out.shape)} {out.dtype}")


# ------------------------------------------------------------------------------------------------ dispatchers


def dequant_body(
    body: torch.Tensor,
    fmt: str,
    row_len: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Dequantise a lossy page body (uint8 ``[nbytes]``) or N equal-sized bodies (``[N, nbytes]``) -> flat
    ``[R * row_len]`` / ``[N, R * row_len]`` of ``out_dtype``, reading scales and codes straight from the bytes."""
    fmt, out_dtype, row_len = _fmt(fmt), _out_dtype(out_dtype), _row_len(row_len)
    if not use_triton(impl, body):
        return dequant_body_ref(body, fmt, row_len, out_dtype, out=out)
    if body.dtype != torch.uint8 or body.dim() not in (1, 2):
        raise ValueError(f"body must be a 1-D or 2-D uint8 tensor, got {tuple(body.shape)} {body.dtype}")
    R = body_rows(body.shape[-1], row_len)
    shape = tuple(body.shape[:-1]) + (R * row_len,)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=body.device)
    _check_out(out, shape, out_dtype)
    from . import triton_dequant

    triton_dequant.dequant_body(body, fmt, row_len, R, out)
    return out
