"""KV element types the tier knows, and float32 conversions for the float ones (numpy has no bfloat16).

bfloat16 is held as uint16 bit patterns. Conversions round to nearest even and keep NaN a NaN, the way
torch's ``.to(torch.bfloat16)`` does, so a page decoded here matches what the GPU would have produced.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import CodecError


class DType(NamedTuple):
    code: int  # stored in page headers: never renumber
    itemsize: int  # bytes per element
    is_float: bool
    storage: np.dtype  # numpy dtype that holds the bits


DTYPES: dict[str, DType] = {
    "bfloat16": DType(1, 2, True, np.dtype(np.uint16)),
    "float16": DType(2, 2, True, np.dtype(np.float16)),
    "float32": DType(3, 4, True, np.dtype(np.float32)),
    "float8_e4m3fn": DType(4, 1, True, np.dtype(np.uint8)),
    "float8_e5m2": DType(5, 1, True, np.dtype(np.uint8)),
    "uint8": DType(6, 1, False, np.dtype(np.uint8)),
    "int8": DType(7, 1, False, np.dtype(np.int8)),
}
DTYPE_BY_CODE: dict[int, str] = {d.code: name for name, d in DTYPES.items()}
# Dtypes with a float32 conversion here (the ones the lossy codecs accept).
FLOAT32_CONVERTIBLE = ("bfloat16", "float16", "float32")


def dtype_info(dtype: str) -> DType:
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise CodecError(f"unknown KV dtype {dtype!r}; known: {', '.join(DTYPES)}") from None


def _bf16_round(u32: np.ndarray, out16: np.ndarray) -> None:
    """Round float32 bit patterns ``u32`` (modified in place) to bfloat16, nearest even, into ``out16``.

    Add 0x7FFF plus the lowest kept bit, then drop the low 16 bits; a carry into the exponent is the correct
    rounding, up to Inf past the largest finite bfloat16. Works with no temporaries (out16 holds the
    rounding bit in between). NaN is the caller's business."""
    np.right_shift(u32, 16, out=out16, casting="unsafe")
    np.bitwise_and(out16, 1, out=out16)
    np.add(u32, out16, out=u32)
    np.add(u32, 0x7FFF, out=u32)
    np.right_shift(u32, 16, out=out16, casting="unsafe")


def _has_nan(f32: np.ndarray) -> bool:
    return f32.size > 0 and bool(np.isnan(f32.max()))  # max propagates NaN: one reduction, no temporary


def to_bf16_bits(f32: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    f32 = np.ascontiguousarray(f32, dtype=np.float32)
    if out is None:
        out = np.empty(f32.shape, np.uint16)
    out16 = out.reshape(f32.shape)
    _bf16_round(f32.view(np.uint32).copy(), out16)
    if _has_nan(f32):  # the rounding add can carry a NaN into Inf or flip its sign: rebuild them as quiet NaNs
        nan = np.isnan(f32)
        out16[nan] = ((f32.view(np.uint32)[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bf16_bits_to_f32(u16: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    u16 = np.asarray(u16, dtype=np.uint16)
    if out is None:
        out = np.empty(u16.shape, np.float32)
    np.left_shift(u16, 16, out=out.reshape(u16.shape).view(np.uint32), dtype=np.uint32)
    return out


def to_float32(data_u8: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """A flat uint8 view of elements of ``dtype`` -> flat float32 (a new array, or ``out``)."""
    if dtype not in FLOAT32_CONVERTIBLE:
        raise CodecError(f"no float32 conversion for dtype {dtype!r}; supported: {', '.join(FLOAT32_CONVERTIBLE)}")
    src = data_u8.view(DTYPES[dtype].storage)
    if out is None:
        out = np.empty(src.size, np.float32)
    if dtype == "bfloat16":
        bf16_bits_to_f32(src, out)
    else:
        np.copyto(out, src)
    return out


def from_float32(f32: np.ndarray, dtype: str, out_u8: np.ndarray, *, inplace: bool = False) -> None:
    """Write float32 values into ``out_u8`` (a flat writable uint8 view) as ``dtype``, rounding to nearest even.

    ``inplace=True`` lets the bfloat16 path use ``f32``'s memory as scratch (its contents are lost)."""
    if dtype not in FLOAT32_CONVERTIBLE:
        raise CodecError(f"no float32 conversion for dtype {dtype!r}; supported: {', '.join(FLOAT32_CONVERTIBLE)}")
    n = f32.size * DTYPES[dtype].itemsize
    if out_u8.size != n:
        raise CodecError(f"output holds {out_u8.size} bytes, {f32.size} {dtype} elements need {n}")
    flat = f32.reshape(-1)
    if dtype == "bfloat16":
        out16 = out_u8.view(np.uint16)
        if inplace and flat.flags.c_contiguous and flat.dtype == np.float32 and not _has_nan(flat):
            _bf16_round(flat.view(np.uint32), out16)
        else:
            to_bf16_bits(flat, out16)
    else:  # numpy's float32 -> float16 cast rounds to nearest even
        np.copyto(out_u8.view(DTYPES[dtype].storage), flat, casting="same_kind")
