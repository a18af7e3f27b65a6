"""Page codecs: self-describing encoded KV pages ("blobs").

A blob is ``HEADER + body``. The header says which codec and dtype made it, how long a quantisation row is and
how many bytes the decoded page has, so a blob can be decoded (or rejected) without any outside metadata.

Codecs:
  raw   the bytes as they are.
  zstd  lossless. 16/32-bit elements are split into byte planes first: the high byte of a bf16/fp16 value (sign +
        exponent) is very skewed and compresses ~2.9x, the low byte (mantissa) is close to random and is kept raw.
  int8  lossy, per-row absmax scale: ~1.94x on bf16 with 128-element rows.
  fp8   lossy, float8 e4m3fn with per-row scale absmax/448: same size as int8, relative (not absolute) precision.

A codec never returns data of the wrong length or dtype: every size and every decompression problem is a
CodecError, and lossy decoders refuse blobs that would decode to NaN.
"""
from __future__ import annotations

import struct
import threading
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import zstandard

from .buffers import byte_view
from .dtypes import DTYPE_BY_CODE, DTYPES, FLOAT32_CONVERTIBLE, dtype_info, from_float32, to_float32
from .errors import CodecError

MAGIC = b"KVPG"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBBIQ")  # magic, version, codec code, dtype code, flags, row_len, raw_nbytes


class PageHeader(NamedTuple):
    version: int
    codec: int  # codec code
    dtype: int  # dtype code
    flags: int
    row_len: int  # elements per quantisation row (head_dim)
    raw_nbytes: int  # decoded page length in bytes

    @property
    def codec_name(self) -> str:
        return _BY_CODE[self.codec].name

    @property
    def dtype_name(self) -> str:
        return DTYPE_BY_CODE[self.dtype]


def peek_header(blob) -> PageHeader:
    """Parse and validate a blob's header (the body is not looked at)."""
    mv = memoryview(blob).cast("B") if not isinstance(blob, (bytes, bytearray)) else blob
    if len(mv) < HEADER.size:
        raise CodecError(f"page blob is {len(mv)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, codec, dtype, flags, row_len, raw_nbytes = HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError(f"page blob starts with {bytes(magic)!r}, not the page magic {MAGIC!r}: not a page or damaged")
    if version != FORMAT_VERSION:
        raise CodecError(f"page blob has format version {version}; this build reads version {FORMAT_VERSION}")
    if codec not in _BY_CODE:
        raise CodecError(f"page blob names unknown codec code {codec}; known: {_codes_text()}")
    if dtype not in DTYPE_BY_CODE:
        raise CodecError(f"page blob names unknown dtype code {dtype}; known: {sorted(DTYPE_BY_CODE)}")
    if flags != 0:
        raise CodecError(f"page blob has flags {flags:#x}; this build knows none")
    itemsize = DTYPES[DTYPE_BY_CODE[dtype]].itemsize
    if row_len < 1 or raw_nbytes % (itemsize * row_len):
        raise CodecError(
            f"page blob header is inconsistent: raw_nbytes {raw_nbytes} is not a multiple of "
            f"row_len {row_len} x itemsize {itemsize}")
    return PageHeader(version, codec, dtype, flags, row_len, raw_nbytes)


class Codec(ABC):
    name: str
    code: int  # stored in headers: never renumber
    lossless: bool

    def supports(self, dtype: str) -> bool:
        return dtype in DTYPES

    def _check_dtype(self, dtype: str) -> None:
        if not self.supports(dtype):
            ok = [d for d in DTYPES if self.supports(d)]
            raise CodecError(f"codec {self.name!r} cannot encode dtype {dtype!r}; it supports {', '.join(ok)}")

    def encode_body(self, data_u8: np.ndarray, dtype: str, row_len: int) -> bytes:
        return b"".join(self.encode_parts(data_u8, dtype, row_len))

    @abstractmethod
    def encode_parts(self, data_u8: np.ndarray, dtype: str, row_len: int) -> list:
        """The body as a list of bytes-like pieces, joined once by the caller (saves a copy of the whole page).

        Pieces may point into per-thread scratch: join them before the next encode on this thread."""

    @abstractmethod
    def decode_body(self, body, out_u8: np.ndarray, dtype: str, row_len: int) -> None:
        """Decode ``body`` into ``out_u8`` (exactly ``len(out_u8)`` bytes), or raise CodecError."""

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


# --------------------------------------------------------------------------------------------------------- raw


class RawCodec(Codec):
    # The body is exactly the page's bytes, nothing before or after: the disk store relies on this to read a raw
    # page straight from its file into the caller's buffer at offset HEADER.size. Keep it so.
    name, code, lossless = "raw", 0, True

    def encode_parts(self, data_u8, dtype, row_len):
        return [data_u8]

    def decode_body(self, body, out_u8, dtype, row_len):
        if len(body) != out_u8.size:
            raise CodecError(f"raw page body is {len(body)} bytes, expected {out_u8.size}")
        out_u8[:] = np.frombuffer(body, dtype=np.uint8)


# -------------------------------------------------------------------------------------------------------- zstd

_PLANE = struct.Struct("<BI")  # per byte plane: mode, stored length
_PLANE_RAW, _PLANE_ZSTD = 0, 1
# A plane is stored compressed only when that saves at least 3%: decoding a raw plane is a plain copy.
_MIN_SAVING = 0.03
# Measured on synthetic bf16 pages (64 tok x 8 heads x 128): the high-byte plane is skewed but has few repeats, so
# Huffman-coded literals do all the work and match finding only costs time. The fast strategy with a tiny hash
# table and min_match 7 finds almost no matches: hi plane 2.91x at ~0.9 GB/s, against 2.59x at 0.27 GB/s for
# plain level 1. target_length must stay 0: fast + target_length > 0 turns literal (Huffman) compression off.
# window_log 17 keeps each 128 KiB plane in one block (one Huffman table); smaller blocks cost ratio and speed.
_ZSTD_PARAMS = zstandard.ZstdCompressionParameters(
    compression_level=1, strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6,
    search_log=1, min_match=7, target_length=0,
    write_content_size=True, write_checksum=False, write_dict_id=False)
_LE = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class _ZstdState(threading.local):
    """Per-thread compressor, decompressor and scratch (zstd contexts are not thread-safe)."""

    def __init__(self):
        self.cctx = zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMS)
        self.dctx = zstandard.ZstdDecompressor()
        self.planes = np.empty(0, np.uint8)
        self.wide = np.empty(0, np.uint32)

    def scratch(self, nbytes: int) -> np.ndarray:
        if self.planes.size < nbytes:
            self.planes = np.empty(nbytes, np.uint8)
        return self.planes[:nbytes]

    def wide_scratch(self, n: int) -> np.ndarray:
        if self.wide.size < n:
            self.wide = np.empty(n, np.uint32)
        return self.wide[:n]


_zstd = _ZstdState()


class ZstdCodec(Codec):
    """Byte-plane split + zstd per plane. Body: for each of the dtype's itemsize planes (least significant byte
    first): mode byte, u32 stored length, stored bytes. 8-bit dtypes have one plane (plain zstd)."""

    name, code, lossless = "zstd", 1, True

    def encode_parts(self, data_u8, dtype, row_len):
        k = DTYPES[dtype].itemsize
        st = _zstd
        if k == 1:
            planes = [data_u8]
        else:
            n = data_u8.size // k
            scratch = st.scratch(data_u8.size)
            planes = [scratch[i * n:(i + 1) * n] for i in range(k)]
            wide = data_u8.view(_LE[k])
            # Shift-and-truncate ufuncs vectorise; a strided copy (data_u8[i::k]) runs ~3x slower.
            np.copyto(planes[0], wide, casting="unsafe")
            for i in range(1, k):
                np.right_shift(wide, 8 * i, out=planes[i], casting="unsafe")
        parts = []
        for plane in planes:
            comp = st.cctx.compress(plane) if plane.size else b""
            if plane.size and len(comp) <= plane.size * (1 - _MIN_SAVING):
                parts += [_PLANE.pack(_PLANE_ZSTD, len(comp)), comp]
            else:
                parts += [_PLANE.pack(_PLANE_RAW, plane.size), plane]
        return parts

    def decode_body(self, body, out_u8, dtype, row_len):
        k = DTYPES[dtype].itemsize
        n = out_u8.size // k
        st = _zstd
        mv = memoryview(body).cast("B")
        pos = 0
        planes = []
        for i in range(k):
            if pos + _PLANE.size > len(mv):
                raise CodecError(f"zstd page body is truncated: {len(mv)} bytes end inside plane {i}'s header")
            mode, length = _PLANE.unpack_from(mv, pos)
            pos += _PLANE.size
            if pos + length > len(mv):
                raise CodecError(f"zstd page body is truncated: plane {i} needs {length} bytes, "
                                 f"{len(mv) - pos} remain")
            stored = mv[pos:pos + length]
            pos += length
            if mode == _PLANE_RAW:
                if length != n:
                    raise CodecError(f"zstd page plane {i} is stored raw with {length} bytes, expected {n}")
                planes.append(np.frombuffer(stored, np.uint8))
            elif mode == _PLANE_ZSTD:
                try:
                    size = zstandard.frame_content_size(stored)
                    if size != n:  # checked before decompressing: a damaged size must not allocate or overrun
                        raise CodecError(f"zstd page plane {i} decodes to {size} bytes, expected {n}")
                    plain = st.dctx.decompress(stored, allow_extra_data=False)
                except zstandard.ZstdError as e:
                    raise CodecError(f"zstd page plane {i} cannot be decompressed: {e}") from None
                if len(plain) != n:
                    raise CodecError(f"zstd page plane {i} decompressed to {len(plain)} bytes, expected {n}")
                planes.append(np.frombuffer(plain, np.uint8))
            else:
                raise CodecError(f"zstd page plane {i} has unknown storage mode {mode}")
        if pos != len(mv):
            raise CodecError(f"zstd page body has {len(mv) - pos} bytes after its last plane")
        if k == 1:
            out_u8[:] = planes[0]
            return
        # Interleave with widening shifts and ORs straight into the caller's buffer: vectorised, no page-sized
        # temporaries beyond one reusable scratch for 32-bit elements.
        wide = out_u8.view(_LE[k])
        np.left_shift(planes[k - 1], 8 * (k - 1), out=wide, dtype=wide.dtype)
        if k == 2:
            np.bitwise_or(wide, planes[0], out=wide, dtype=wide.dtype)
            return
        tmp = st.wide_scratch(n)
        for i in range(1, k - 1):
            np.left_shift(planes[i], 8 * i, out=tmp, dtype=np.uint32)
            np.bitwise_or(wide, tmp, out=wide)
        np.bitwise_or(wide, planes[0], out=wide, dtype=np.uint32)


# ------------------------------------------------------------------------------------------------------- lossy

_SCALE = np.dtype("<f4")


def _rows(data_u8: np.ndarray, dtype: str, row_len: int) -> np.ndarray:
    """The page as float32 rows of row_len elements (a new array)."""
    return to_float32(data_u8, dtype).reshape(-1, row_len)


def _scaled(x: np.ndarray, qmax: float, codec: str):
    """Per row: (stored scale = absmax / qmax as float32, x / absmax * qmax as float32 in [-qmax, qmax]).

    Refuses NaN/Inf: a lossy codec cannot represent them, and a NaN absmax would silently poison the whole row."""
    absmax = np.abs(x).max(axis=1) if x.size else np.zeros(x.shape[0], np.float32)
    if not np.isfinite(absmax).all():
        bad = int((~np.isfinite(x)).sum())
        raise CodecError(f"page holds {bad} non-finite value(s) (NaN/Inf); the lossy {codec} codec cannot encode "
                         f"them - store this page with a lossless codec")
    scale = (absmax / np.float32(qmax)).astype(_SCALE)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(qmax) / absmax
    inv[absmax == 0] = 0  # all-zero rows: q = 0, scale = 0
    tiny = ~np.isfinite(inv)  # absmax below ~4e-37 (subnormal territory): 1/absmax overflows float32
    y = x * inv[:, None]
    if tiny.any():
        y[tiny] = (x[tiny].astype(np.float64) * (qmax / absmax[tiny].astype(np.float64))[:, None]).astype(np.float32)
    np.clip(y, -qmax, qmax, out=y)
    return scale, y


def _check_body(body, n_rows: int, n: int, codec: str) -> memoryview:
    mv = memoryview(body).cast("B")
    if len(mv) != n_rows * 4 + n:
        raise CodecError(f"{codec} page body is {len(mv)} bytes, expected {n_rows * 4 + n} "
                         f"({n_rows} row scales + {n} codes)")
    return mv


def _unscale(vals: np.ndarray, mv: memoryview, n_rows: int, codec: str) -> np.ndarray:
    scale = np.frombuffer(mv[:n_rows * 4], _SCALE)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise CodecError(f"{codec} page body has a negative or non-finite row scale: damaged blob")
    vals *= scale.astype(np.float32)[:, None]
    return vals


class Int8Codec(Codec):
    """Body: float32 scale per row, then int8 q per element; x ~= q * scale, scale = row absmax / 127."""

    name, code, lossless = "int8", 2, False

    def supports(self, dtype):
        return dtype in FLOAT32_CONVERTIBLE

    def encode_parts(self, data_u8, dtype, row_len):
        self._check_dtype(dtype)
        scale, y = _scaled(_rows(data_u8, dtype, row_len), 127.0, self.name)
        q = np.rint(y, out=y).astype(np.int8)  # rint: round half to even
        return [scale.tobytes(), q]

    def decode_body(self, body, out_u8, dtype, row_len):
        self._check_dtype(dtype)
        n = out_u8.size // DTYPES[dtype].itemsize
        n_rows = n // row_len
        mv = _check_body(body, n_rows, n, self.name)
        vals = np.frombuffer(mv[n_rows * 4:], np.int8).astype(np.float32).reshape(n_rows, row_len)
        from_float32(_unscale(vals, mv, n_rows, self.name), dtype, out_u8)


def _e4m3_lut() -> np.ndarray:
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    lut = np.where(c >= 128, -mag, mag).astype(np.float32)
    lut[[0x7F, 0xFF]] = np.nan  # e4m3fn has no Inf; S.1111.111 is NaN
    return lut


_E4M3_LUT = _e4m3_lut()
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = np.float32(2.0 ** -6)


def f32_to_e4m3(y: np.ndarray) -> np.ndarray:
    """float32 (|y| <= 448, finite) -> e4m3fn codes (uint8), round to nearest even.

    Normals: round the float32 mantissa to 3 bits (add 0x7FFFF + lowest kept bit, as in bf16 rounding), then
    rebias the exponent 127 -> 7. Subnormals (|y| < 2^-6, step 2^-9): rint(|y| * 512) gives codes 0..8, and code 8
    is exactly the smallest normal, so rounding up across the boundary comes out right too."""
    a = np.abs(y)
    u = a.view(np.uint32)
    r = (u >> 20) & 1
    r += 0x7FFFF
    r += u
    code = ((r >> 23) - (127 - 7)) << 3
    code |= (r >> 20) & 7
    sub = a < _E4M3_MIN_NORMAL
    code[sub] = np.rint(a[sub] * np.float32(512)).astype(np.uint32)
    code[np.signbit(y)] |= 0x80
    return code.astype(np.uint8)


class Fp8Codec(Codec):
    """Body: float32 scale per row, then e4m3fn code per element; x ~= e4m3(code) * scale, scale = absmax / 448."""

    name, code, lossless = "fp8", 3, False

    def supports(self, dtype):
        return dtype in FLOAT32_CONVERTIBLE

    def encode_parts(self, data_u8, dtype, row_len):
        self._check_dtype(dtype)
        scale, y = _scaled(_rows(data_u8, dtype, row_len), _E4M3_MAX, self.name)
        return [scale.tobytes(), f32_to_e4m3(y)]

    def decode_body(self, body, out_u8, dtype, row_len):
        self._check_dtype(dtype)
        n = out_u8.size // DTYPES[dtype].itemsize
        n_rows = n // row_len
        mv = _check_body(body, n_rows, n, self.name)
        codes = np.frombuffer(mv[n_rows * 4:], np.uint8)
        if np.any((codes & 0x7F) == 0x7F):
            raise CodecError(f"{self.name} page body holds the e4m3 NaN code: damaged blob")
        vals = _E4M3_LUT.take(codes).reshape(n_rows, row_len)
        from_float32(_unscale(vals, mv, n_rows, self.name), dtype, out_u8)


# ----------------------------------------------------------------------------------------------------- lookup

_CODECS = (RawCodec(), ZstdCodec(), Int8Codec(), Fp8Codec())
_BY_CODE = {c.code: c for c in _CODECS}
_BY_NAME = {c.name: c for c in _CODECS} | {"fp8_e4m3": _BY_CODE[3]}
CODEC_NAMES = tuple(c.name for c in _CODECS)


def _codes_text() -> str:
    return ", ".join(f"{c.code} ({c.name})" for c in _CODECS)


def get_codec(name_or_code) -> Codec:
    """A codec by name ("raw", "zstd", "int8", "fp8" / "fp8_e4m3"), header code, or a Codec (returned as is)."""
    if isinstance(name_or_code, Codec):
        return name_or_code
    if isinstance(name_or_code, int) and not isinstance(name_or_code, bool):
        if name_or_code in _BY_CODE:
            return _BY_CODE[name_or_code]
        raise CodecError(f"unknown codec code {name_or_code}; known: {_codes_text()}")
    if isinstance(name_or_code, str) and name_or_code in _BY_NAME:
        return _BY_NAME[name_or_code]
    raise CodecError(f"unknown codec {name_or_code!r}; valid names: {', '.join(_BY_NAME)}")


def encode_page(data, dtype: str, codec, row_len: int) -> bytes:
    """Encode one page (anything ``byte_view`` accepts) into a self-describing blob (header + body)."""
    c = get_codec(codec)
    info = dtype_info(dtype)
    c._check_dtype(dtype)
    if not isinstance(row_len, int) or isinstance(row_len, bool) or row_len < 1:
        raise CodecError(f"row_len must be a positive integer, got {row_len!r}")
    data_u8 = byte_view(data)
    group = info.itemsize * row_len
    if data_u8.size % group:
        raise CodecError(f"page is {data_u8.size} bytes, not a multiple of row_len {row_len} x {dtype} itemsize "
                         f"{info.itemsize} = {group} bytes")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, c.code, info.code, 0, row_len, data_u8.size)
    return b"".join([header, *c.encode_parts(data_u8, dtype, row_len)])


def decode_page(blob, out, dtype: str) -> PageHeader:
    """Decode ``blob`` into the writable buffer ``out`` (exactly its length), checking dtype and size first."""
    h = peek_header(blob)
    out_u8 = byte_view(out, writable=True)
    if h.dtype_name != dtype:
        raise CodecError(f"page blob holds dtype {h.dtype_name!r}, caller asked for {dtype!r}")
    if h.raw_nbytes != out_u8.size:
        raise CodecError(f"page blob decodes to {h.raw_nbytes} bytes, output buffer holds {out_u8.size}")
    c = _BY_CODE[h.codec]
    c._check_dtype(dtype)
    body = memoryview(blob).cast("B")[HEADER.size:]
    try:
        c.decode_body(body, out_u8, dtype, h.row_len)
    except CodecError:
        raise
    except (ValueError, TypeError, zstandard.ZstdError) as e:  # belt and braces: nothing else escapes as data
        raise CodecError(f"{c.name} page blob cannot be decoded: {e}") from None
    return h
