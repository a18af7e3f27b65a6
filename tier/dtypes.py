"""KV element types the tier knows, and float32 conversions for the float ones (numpy has no bfloat16).

bfloat16 is held as uint16 bit patterns. Conversions round to nearest even and keep NaN a NaN, the way
torch's ``.to(torch.bfloat16)`` does, so a page decoded here matches what the GPU would have produced.

The float16 conversions are done on the bits too: numpy's own float16 casts run one element at a time (measured
0.26-0.4 ms from and 0.4-0.9 ms to float16 for a 128k-element page, against ~0.17 / ~0.23 ms for the vectorised
bit versions here).
All conversions compute into per-thread scratch rather than page-sized temporaries (see ``scratch``).
"""

from __future__ import annotations

import threading
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


class _Scratch(threading.local):
    """Per-thread reusable arrays, by key. Page-sized temporaries are not free: freshly mapped memory costs a page
    fault per 4 KiB on every call (measured ~0.4 ms per 512 KiB temporary on this VM against ~15 us for the
    arithmetic on it). Only functions that never call one another share a key, so no caller's scratch is clobbered
    by a callee. Held per thread for the thread's life: a few MiB for 256 KiB pages."""

    def __init__(self):
        self.bufs: dict = {}

    def __call__(self, key: str, dtype, n: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = self.bufs.get((key, dtype))
        if buf is None or buf.size < n:
            buf = self.bufs[(key, dtype)] = np.empty(n, dtype)
        return buf[:n]


scratch = _Scratch()

_U32 = np.dtype(np.uint32)


def _u32(v: int) -> np.uint32:
    return np.uint32(v % (1 << 32))  # constants for wrap-around integer arithmetic


def _has_nan(f32: np.ndarray) -> bool:
    return f32.size > 0 and bool(np.isnan(f32.max()))  # max propagates NaN: one reduction, no temporary


def _contiguous(a, dtype) -> np.ndarray:
    a = np.asarray(a, dtype=dtype)  # unlike ascontiguousarray, keeps 0-d input 0-d
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _flat_out(out: np.ndarray, n: int, dtype) -> np.ndarray:
    flat = out.reshape(-1)
    if flat.size != n or flat.dtype != np.dtype(dtype) or not np.shares_memory(flat, out):
        raise CodecError(f"conversion output must be a contiguous {np.dtype(dtype)} array of {n} elements")
    return flat


# ---------------------------------------------------------------------------------------------------- bfloat16


def _f32_bits_to_bf16(u: np.ndarray, out16: np.ndarray) -> None:
    """float32 bits -> bfloat16 bits, nearest even: add 0x7FFF plus the lowest kept bit, drop the low 16 bits.
    A carry into the exponent is the correct rounding, up to Inf past the largest finite bfloat16. NaN: caller."""
    r = scratch("dt.bf16", _U32, u.size)
    np.right_shift(u, 16, out=r)
    np.bitwise_and(r, 1, out=r)
    np.add(r, u, out=r)
    np.add(r, 0x7FFF, out=r)
    np.right_shift(r, 16, out=r)
    np.copyto(out16, r, casting="unsafe")  # same-kind-free ops only: mixed-type ufuncs run ~5x slower


def to_bf16_bits(f32: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    f32 = _contiguous(f32, np.float32)
    if out is None:
        out = np.empty(f32.shape, np.uint16)
    flat, out16 = f32.reshape(-1), _flat_out(out, f32.size, np.uint16)
    _f32_bits_to_bf16(flat.view(np.uint32), out16)
    if _has_nan(flat):  # the rounding add can carry a NaN into Inf or flip its sign: rebuild them as quiet NaNs
        nan = np.isnan(flat)
        out16[nan] = ((flat.view(np.uint32)[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bf16_bits_to_f32(u16: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    u16 = _contiguous(u16, np.uint16)
    if out is None:
        out = np.empty(u16.shape, np.float32)
    o = _flat_out(out, u16.size, np.float32).view(np.uint32)
    np.copyto(o, u16.reshape(-1))
    np.left_shift(o, 16, out=o)
    return out


# ----------------------------------------------------------------------------------------------------- float16
# After F. Giesen's half_to_float_fast / float_to_half_fast3_rtne, done on whole arrays. Subnormals go through a
# float add/subtract of normal numbers, so the result is right even with flush-to-zero / denormals-are-zero set.


def _f16_bits_to_f32(h: np.ndarray, out: np.ndarray) -> None:
    o = out.view(np.uint32)
    s = scratch("dt.f16.sign", _U32, h.size)
    np.copyto(o, h)
    np.bitwise_and(o, 0x8000, out=s)
    np.bitwise_xor(o, s, out=o)  # magnitude
    np.left_shift(o, 13, out=o)
    np.add(o, (127 - 15) << 23, out=o)  # rebias: right for normals
    if o.size == 0:
        return
    if o.max() >= (143 << 23):  # Inf / NaN (exponent 31): push the exponent on to 255
        m = o >= (143 << 23)
        o[m] += _u32((128 - 16) << 23)
    if o.min() < (113 << 23):  # zero / subnormal (exponent 0): 2^-14 * (1 + m/1024) - 2^-14 = 2^-14 * m/1024
        m = np.less(o, 113 << 23, out=scratch("dt.f16.mask", np.bool_, o.size))
        t = scratch("dt.f16.tmp", np.float32, o.size)
        np.add(o, 1 << 23, out=t.view(np.uint32))
        np.subtract(t, np.float32(2.0**-14), out=t)
        np.copyto(o, t.view(np.uint32), where=m)
    np.left_shift(s, 16, out=s)
    np.bitwise_or(o, s, out=o)


def _f32_bits_to_f16(u: np.ndarray, out16: np.ndarray) -> None:
    n = u.size
    a = scratch("dt.f16.mag", _U32, n)
    s = scratch("dt.f16.sign", _U32, n)
    r = scratch("dt.f16.round", _U32, n)
    np.bitwise_and(u, 0x7FFFFFFF, out=a)
    np.right_shift(u, 16, out=s)
    np.bitwise_and(s, 0x8000, out=s)
    # Normals: rebias the exponent and round the mantissa to 10 bits, nearest even (0xFFF + lowest kept bit).
    np.right_shift(a, 13, out=r)
    np.bitwise_and(r, 1, out=r)
    np.add(r, a, out=r)
    np.add(r, _u32(((15 - 127) << 23) + 0xFFF), out=r)
    np.right_shift(r, 13, out=r)
    if n and a.min() < (113 << 23):  # below the smallest normal float16: let the FPU round |x| + 0.5
        m = np.less(a, 113 << 23, out=scratch("dt.f16.mask", np.bool_, n))
        t = scratch("dt.f16.tmp", np.float32, n)
        with np.errstate(all="ignore"):  # the masked-off lanes may hold NaN/Inf bits
            np.add(a.view(np.float32), np.float32(0.5), out=t)
        tu = t.view(np.uint32)
        np.subtract(tu, 126 << 23, out=tu)
        np.copyto(r, tu, where=m)
    if n and a.max() >= (143 << 23):  # 65520 and up rounds to Inf; NaN stays a (quiet) NaN
        m = a >= (143 << 23)
        r[m] = np.where(a[m] > 0x7F800000, 0x7E00, 0x7C00)
    np.bitwise_or(r, s, out=r)
    np.copyto(out16, r, casting="unsafe")


# ------------------------------------------------------------------------------------------------------ public


def to_float32(data_u8: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """A flat uint8 view of elements of ``dtype`` -> flat float32 (a new array, or ``out``), exact."""
    if dtype not in FLOAT32_CONVERTIBLE:
        raise CodecError(f"no float32 conversion for dtype {dtype!r}; supported: {', '.join(FLOAT32_CONVERTIBLE)}")
    src = data_u8.view(np.uint32 if dtype == "float32" else np.uint16)
    if out is None:
        out = np.empty(src.size, np.float32)
    o = _flat_out(out, src.size, np.float32)
    if dtype == "bfloat16":
        bf16_bits_to_f32(src, o)
    elif dtype == "float16":
        _f16_bits_to_f32(src, o)
    else:
        np.copyto(o.view(np.uint32), src)
    return out


def from_float32(f32: np.ndarray, dtype: str, out_u8: np.ndarray) -> None:
    """Write float32 values into ``out_u8`` (a flat writable uint8 view) as ``dtype``, rounding to nearest even."""
    if dtype not in FLOAT32_CONVERTIBLE:
        raise CodecError(f"no float32 conversion for dtype {dtype!r}; supported: {', '.join(FLOAT32_CONVERTIBLE)}")
    n = f32.size * DTYPES[dtype].itemsize
    if out_u8.size != n:
        raise CodecError(f"output holds {out_u8.size} bytes, {f32.size} {dtype} elements need {n}")
    flat = _contiguous(f32, np.float32).reshape(-1)
    if dtype == "bfloat16":
        to_bf16_bits(flat, out_u8.view(np.uint16))
    elif dtype == "float16":
        _f32_bits_to_f16(flat.view(np.uint32), out_u8.view(np.uint16))
    else:
        np.copyto(out_u8.view(np.float32), flat)
