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


def to_bf16_bits(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    f32 = np.ascontiguousarray(f32, dtype=np.float32)
    u = f32.view(np.uint32)
    # Round to nearest even: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits. Overflow past the
    # largest finite bf16 carries into the exponent and gives Inf, which is what RNE asks for.
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    out = r.astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():  # the rounding add could turn a NaN with only low mantissa bits into Inf: force quiet NaN
        out[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bf16_bits_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    u16 = np.asarray(u16, dtype=np.uint16)
    out = u16.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def to_float32(data_u8: np.ndarray, dtype: str) -> np.ndarray:
    """A flat uint8 view of elements of ``dtype`` -> a new flat float32 array."""
    if dtype == "bfloat16":
        return bf16_bits_to_f32(data_u8.view(np.uint16))
    if dtype == "float16":
        return data_u8.view(np.float16).astype(np.float32)
    if dtype == "float32":
        return data_u8.view(np.float32).copy()
    raise CodecError(f"no float32 conversion for dtype {dtype!r}; supported: {', '.join(FLOAT32_CONVERTIBLE)}")


def from_float32(f32: np.ndarray, dtype: str, out_u8: np.ndarray) -> None:
    """Write float32 values into ``out_u8`` (a flat writable uint8 view) as ``dtype``, rounding to nearest even."""
    n = f32.size * DTYPES[dtype].itemsize if dtype in DTYPES else -1
    if out_u8.size != n:
        raise CodecError(f"output holds {out_u8.size} bytes, {f32.size} {dtype} elements need {n}")
    if dtype == "bfloat16":
        out_u8.view(np.uint16)[:] = to_bf16_bits(f32).reshape(-1)
    elif dtype == "float16":
        out_u8.view(np.float16)[:] = f32.reshape(-1)  # numpy's float32->float16 cast rounds to nearest even
    elif dtype == "float32":
        out_u8.view(np.float32)[:] = f32.reshape(-1)
    else:
        raise CodecError(f"no float32 conversion for dtype {dtype!r}; supported: {', '.join(FLOAT32_CONVERTIBLE)}")
