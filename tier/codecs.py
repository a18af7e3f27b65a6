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

A page decodes into a flat buffer or straight into a page spread over rows (``buffers.byte_view``'s [rows, row
bytes] form: a layer-first SGLang host pool's slots, kvdrive_sglang/host_pages.py): each codec's last step writes
the rows in place, so a reload needs no page-sized scratch and no second copy.
"""

from __future__ import annotations

import struct
import threading
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import zstandard

from . import bplane
from .buffers import byte_view, fill, is_rows
from .dtypes import (
    DTYPE_BY_CODE,
    DTYPES,
    FLOAT32_CONVERTIBLE,
    _has_nan,
    bf16_bits_to_f32,
    dtype_info,
    from_float32,
    scratch,
    to_float32,
)
from .errors import CodecError
from .validate import integer

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
    try:
        mv = memoryview(blob).cast("B")
    except TypeError as e:
        raise CodecError(f"page blob must be a contiguous bytes-like object, got {type(blob).__name__}: {e}") from None
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
            f"row_len {row_len} x itemsize {itemsize}"
        )
    return PageHeader(version, codec, dtype, flags, row_len, raw_nbytes)


class Codec(ABC):
    """One way of turning a page into a body and back. Subclasses implement ``_encode`` and ``_decode``; the
    public methods here check dtype, row length and sizes first, so a codec only ever sees consistent input."""

    name: str
    code: int  # stored in headers: never renumber
    lossless: bool

    def supports(self, dtype: str) -> bool:
        return dtype in DTYPES

    def encode_body(self, data_u8, dtype: str, row_len: int) -> bytes:
        return b"".join(self.encode_parts(data_u8, dtype, row_len))

    def encode_parts(self, data_u8, dtype: str, row_len: int) -> list:
        """The body as a list of bytes-like pieces, to be joined once (with the header, by encode_page): saves a
        copy of the whole page. Pieces may point into per-thread scratch: join them before the next encode on
        the same thread."""
        data_u8 = flat_page(data_u8)
        self._check(data_u8.size, dtype, row_len)
        return self._encode(data_u8, dtype, row_len)

    def decode_body(self, body, out_u8, dtype: str, row_len: int) -> None:
        """Decode ``body`` into ``out_u8`` (flat or in rows, see ``byte_view``), exactly ``out_u8.size`` bytes, or
        raise CodecError."""
        out_u8 = byte_view(out_u8, writable=True)
        self._check(out_u8.size, dtype, row_len)
        if is_rows(out_u8) and out_u8.shape[1] % DTYPES[dtype].itemsize:
            raise CodecError(
                f"output rows of {out_u8.shape[1]} bytes do not hold whole {dtype} elements "
                f"({DTYPES[dtype].itemsize} bytes each)"
            )
        try:
            self._decode(memoryview(body).cast("B"), out_u8, dtype, row_len)
        except CodecError:
            raise
        except (ValueError, TypeError, zstandard.ZstdError) as e:  # belt and braces: a damaged body is a CodecError
            raise CodecError(f"{self.name} page body cannot be decoded: {e}") from None

    def _check(self, nbytes: int, dtype: str, row_len: int) -> None:
        info = dtype_info(dtype)
        if not self.supports(dtype):
            ok = [d for d in DTYPES if self.supports(d)]
            raise CodecError(f"codec {self.name!r} does not handle dtype {dtype!r}; it handles {', '.join(ok)}")
        integer(row_len, "row_len", error=CodecError)
        group = info.itemsize * row_len
        if nbytes % group:
            raise CodecError(
                f"page is {nbytes} bytes, not a multiple of row_len {row_len} x {dtype} itemsize "
                f"{info.itemsize} = {group} bytes"
            )

    @abstractmethod
    def _encode(self, data_u8: np.ndarray, dtype: str, row_len: int) -> list:
        """Body pieces for a checked flat uint8 page."""

    @abstractmethod
    def _decode(self, body: memoryview, out_u8: np.ndarray, dtype: str, row_len: int) -> None:
        """Fill the checked uint8 ``out_u8`` (flat, or [rows, row bytes] of whole elements) from ``body``, or raise
        CodecError."""

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


# --------------------------------------------------------------------------------------------------------- raw


class RawCodec(Codec):
    # The body is exactly the page's bytes, nothing before or after: the disk store relies on this to read a raw
    # page straight from its file into the caller's buffer at offset HEADER.size. Keep it so.
    name, code, lossless = "raw", 0, True

    def _encode(self, data_u8, dtype, row_len):
        return [data_u8]

    def _decode(self, body, out_u8, dtype, row_len):
        if len(body) != out_u8.size:
            raise CodecError(f"raw page body is {len(body)} bytes, expected {out_u8.size}")
        fill(out_u8, np.frombuffer(body, dtype=np.uint8))


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
    compression_level=1,
    strategy=zstandard.STRATEGY_FAST,
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    write_content_size=True,
    write_checksum=False,
    write_dict_id=False,
)
_LE = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class _ZstdContexts(threading.local):
    """Per-thread zstd contexts: they are not thread-safe, and reusing one saves its setup on every page."""

    def __init__(self):
        self.cctx = zstandard.ZstdCompressor(compression_params=_ZSTD_PARAMS)
        self.dctx = zstandard.ZstdDecompressor()


_zstd = _ZstdContexts()


class ZstdCodec(Codec):
    """Byte-plane split + zstd per plane. Body: for each of the dtype's itemsize planes (least significant byte
    first): mode byte, u32 stored length, stored bytes. 8-bit dtypes have one plane (plain zstd)."""

    name, code, lossless = "zstd", 1, True

    def _encode(self, data_u8, dtype, row_len):
        k = DTYPES[dtype].itemsize
        if k == 1:
            planes = [data_u8]
        else:
            n = data_u8.size // k
            buf = scratch("cd.planes", np.uint8, data_u8.size)
            planes = [buf[i * n : (i + 1) * n] for i in range(k)]
            wide = data_u8.view(_LE[k])
            # Shift-and-truncate ufuncs vectorise; a strided copy (data_u8[i::k]) runs ~3x slower.
            np.copyto(planes[0], wide, casting="unsafe")
            for i in range(1, k):
                np.right_shift(wide, 8 * i, out=planes[i], casting="unsafe")
        parts = []
        for plane in planes:
            # Trying the (near-random) mantissa plane costs ~25 us of ~200 per bf16 page: zstd gives up quickly on
            # incompressible input, and a full try never misses a compressible plane (zero padding, constants).
            comp = _zstd.cctx.compress(plane) if plane.size else b""
            if plane.size and len(comp) <= plane.size * (1 - _MIN_SAVING):
                parts += [_PLANE.pack(_PLANE_ZSTD, len(comp)), comp]
            else:
                parts += [_PLANE.pack(_PLANE_RAW, plane.size), plane]
        return parts

    def _decode(self, body, out_u8, dtype, row_len):
        k = DTYPES[dtype].itemsize
        n = out_u8.size // k
        mv, pos = body, 0
        # each plane's n bytes: the body's own where stored raw, else decompressed into per-thread scratch (reused:
        # no page-sized allocation per decode), or straight into the caller's buffer where the one plane is the page
        planes = []
        for i in range(k):
            if pos + _PLANE.size > len(mv):
                raise CodecError(f"zstd page body is truncated: {len(mv)} bytes end inside plane {i}'s header")
            mode, length = _PLANE.unpack_from(mv, pos)
            pos += _PLANE.size
            if pos + length > len(mv):
                raise CodecError(f"zstd page body is truncated: plane {i} needs {length} bytes, {len(mv) - pos} remain")
            stored = mv[pos : pos + length]
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
                    plane = out_u8 if k == 1 else scratch(f"cd.plane{i}", np.uint8, n)
                    _decompress_into(stored, plane, i)
                except zstandard.ZstdError as e:
                    raise CodecError(f"zstd page plane {i} cannot be decompressed: {e}") from None
                planes.append(None if k == 1 else plane)
            else:
                raise CodecError(f"zstd page plane {i} has unknown storage mode {mode}")
        if pos != len(mv):
            raise CodecError(f"zstd page body has {len(mv) - pos} bytes after its last plane")
        if k == 1:
            if planes[0] is not None:  # stored raw
                fill(out_u8, planes[0])
            return
        # Interleave with widening shifts and ORs straight into the caller's buffer (vectorised, ~3x a strided
        # copy), row by row in place where the page lies in rows (a plane's element j is the page's element j, so
        # a plane cut to the rows' shape lines up); 32-bit elements need one scratch for the shifted middle planes.
        wide = out_u8.view(_LE[k])
        shape = wide.shape
        np.left_shift(planes[k - 1].reshape(shape), 8 * (k - 1), out=wide, dtype=wide.dtype)
        if k == 4:
            tmp = scratch("cd.wide", np.uint32, n).reshape(shape)
            for i in range(1, k - 1):
                np.left_shift(planes[i].reshape(shape), 8 * i, out=tmp, dtype=np.uint32)
                np.bitwise_or(wide, tmp, out=wide)
        np.bitwise_or(wide, planes[0].reshape(shape), out=wide, dtype=wide.dtype)


def _decompress_into(stored, out_u8: np.ndarray, plane: int) -> None:
    """Decompress the zstd frame ``stored`` into all of ``out_u8`` (flat, or row by row), no temporary: CodecError
    if it holds more or fewer bytes, or bytes follow the frame (its content size was checked already; this is a
    damaged frame)."""
    end = _frame_end(stored)
    if end != len(stored):  # what decompress(allow_extra_data=False) refused; a stream reader stops at the frame
        raise CodecError(f"zstd page plane {plane} has {len(stored) - end} bytes after its frame")
    reader = _zstd.dctx.stream_reader(stored, read_across_frames=False)
    done = 0
    for row in out_u8 if is_rows(out_u8) else (out_u8,):
        mv, pos = memoryview(row), 0
        while pos < len(mv):
            got = reader.readinto(mv[pos:])
            if not got:
                raise CodecError(f"zstd page plane {plane} decompressed to {done + pos} bytes, expected {out_u8.size}")
            pos += got
        done += pos
    if reader.read(1):
        raise CodecError(f"zstd page plane {plane} decompresses to more than {out_u8.size} bytes")


_BLOCK = 3  # a zstd block header: 3 bytes little-endian, bit 0 last block, bits 1-2 type, the rest its size
_RLE_BLOCK = 1  # an RLE block's content is one byte, whatever its size says


def _frame_end(stored) -> int:
    """Where the zstd frame at the start of ``stored`` ends (header, blocks, checksum): the frame format's own block
    headers walked, as python-zstandard exposes no compressed-size query. Past the end: CodecError."""
    pos = zstandard.frame_header_size(stored)
    last = False
    while not last:
        if pos + _BLOCK > len(stored):
            raise CodecError("zstd page plane ends inside a block header")
        head = int.from_bytes(stored[pos : pos + _BLOCK], "little")
        last, kind, size = bool(head & 1), (head >> 1) & 3, head >> 3
        pos += _BLOCK + (1 if kind == _RLE_BLOCK else size)
    return pos + (4 if zstandard.get_frame_parameters(stored).has_checksum else 0)


# ------------------------------------------------------------------------------------------------------- lossy

_SCALE = np.dtype("<f4")
# |x| of an IEEE-style float orders like its bits with the sign cleared, read as an unsigned integer; integer max
# reductions are faster than float ones and need no abs() temporary. Bits >= the Inf pattern are Inf or NaN.
_MAGNITUDE = {  # dtype: (bits dtype, magnitude mask, Inf bits)
    "bfloat16": (np.dtype("<u2"), 0x7FFF, 0x7F80),
    "float16": (np.dtype("<u2"), 0x7FFF, 0x7C00),
    "float32": (np.dtype("<u4"), 0x7FFFFFFF, 0x7F800000),
}


def _row_absmax(data_u8: np.ndarray, dtype: str, row_len: int, codec: str) -> np.ndarray:
    """float32 absmax per row of row_len elements; CodecError on NaN/Inf (a lossy codec cannot represent them,
    and one NaN would silently poison its whole row through the scale)."""
    bits_dtype, mask, inf = _MAGNITUDE[dtype]
    bits = data_u8.view(bits_dtype)
    mag = np.bitwise_and(bits, mask, out=scratch("cd.mag", bits_dtype, bits.size))
    m = mag.reshape(-1, row_len).max(axis=1)
    if (m >= inf).any():
        bad = int((mag >= inf).sum())
        raise CodecError(
            f"page holds {bad} non-finite value(s) (NaN/Inf); the lossy {codec} codec cannot encode "
            f"them - store this page with a lossless codec"
        )
    if dtype == "bfloat16":
        return bf16_bits_to_f32(m)
    return m.view(DTYPES[dtype].storage).astype(np.float32)


def _scaled(data_u8: np.ndarray, dtype: str, row_len: int, qmax: float, codec: str):
    """Per row: (scale = absmax / qmax as float32, y = x / absmax * qmax as float32 rows in [-qmax, qmax]).

    y lives in per-thread scratch."""
    absmax = _row_absmax(data_u8, dtype, row_len, codec)
    scale = (absmax / np.float32(qmax)).astype(_SCALE)
    # Round the scale down where float32 rounded it up, so that qmax * scale <= absmax: otherwise a row at the top
    # of float32's range would decode its largest element to Inf.
    up = scale.astype(np.float64) * qmax > absmax
    scale[up] = np.nextafter(scale[up], np.float32(0))
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(qmax) / absmax
    tiny = np.isinf(inv) & (absmax > 0)  # absmax below ~4e-37 (subnormals): qmax / absmax overflows float32
    inv[~np.isfinite(inv)] = 0  # all-zero rows: y = 0, scale = 0
    n = data_u8.size // DTYPES[dtype].itemsize
    y = scratch("cd.f32", np.float32, n).reshape(-1, row_len)
    x = data_u8.view(np.float32) if dtype == "float32" else to_float32(data_u8, dtype, out=y)
    np.multiply(x.reshape(-1, row_len), inv[:, None], out=y)
    if tiny.any():  # rare: redo those rows in float64
        x = to_float32(data_u8, dtype).reshape(-1, row_len)[tiny].astype(np.float64)
        y[tiny] = (x * (qmax / absmax[tiny].astype(np.float64))[:, None]).astype(np.float32)
    return scale, y


def _lossy_body(body, out_u8: np.ndarray, dtype: str, row_len: int, codec: str):
    """Split a lossy body into (row scales as float32, codes as uint8), checking sizes and scales."""
    n = out_u8.size // DTYPES[dtype].itemsize
    n_rows = n // row_len
    if len(body) != n_rows * 4 + n:
        raise CodecError(
            f"{codec} page body is {len(body)} bytes, expected {n_rows * 4 + n} ({n_rows} row scales + {n} codes)"
        )
    scale = np.frombuffer(body[: n_rows * 4], _SCALE).astype(np.float32)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise CodecError(f"{codec} page body has a negative or non-finite row scale: damaged blob")
    return scale, np.frombuffer(body[n_rows * 4 :], np.uint8)


def _from_float32_into(vals: np.ndarray, dtype: str, out_u8: np.ndarray) -> None:
    """A lossy decode's last step: float32 values into ``out_u8`` as ``dtype``. ``dtypes.from_float32`` rounds into a
    flat buffer only, so a page in rows is rounded into per-thread scratch (reused, not a fresh page) and copied
    into the rows once: the lossy codecs' one extra copy there."""
    if not is_rows(out_u8):
        from_float32(vals, dtype, out_u8)
        return
    flat = scratch("cd.rows", np.uint8, out_u8.size)
    from_float32(vals, dtype, flat)
    fill(out_u8, flat)


class Int8Codec(Codec):
    """Body: float32 scale per row, then int8 q per element; x ~= q * scale, scale = row absmax / 127."""

    name, code, lossless = "int8", 2, False

    def supports(self, dtype):
        return dtype in FLOAT32_CONVERTIBLE

    def _encode(self, data_u8, dtype, row_len):
        scale, y = _scaled(data_u8, dtype, row_len, 127.0, self.name)
        np.rint(y, out=y)  # round half to even; |y| <= 127 * (1 + 2^-23) so it never rounds to 128
        q = scratch("cd.codes", np.int8, y.size)
        np.copyto(q, y.reshape(-1), casting="unsafe")
        return [scale.tobytes(), q]

    def _decode(self, body, out_u8, dtype, row_len):
        scale, codes = _lossy_body(body, out_u8, dtype, row_len, self.name)
        vals = scratch("cd.f32", np.float32, codes.size)
        np.copyto(vals, codes.view(np.int8))  # cast first: a mixed int8 * float32 ufunc runs ~3x slower
        vals = vals.reshape(-1, row_len)
        np.multiply(vals, scale[:, None], out=vals)
        _from_float32_into(vals, dtype, out_u8)


def _e4m3_lut() -> np.ndarray:
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    mag = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    lut = np.where(c >= 128, -mag, mag).astype(np.float32)
    lut[[0x7F, 0xFF]] = np.nan  # e4m3fn has no Inf; S.1111.111 is NaN
    return lut


_E4M3_LUT = _e4m3_lut()
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = np.float32(2.0**-6)


def _f32_to_e4m3(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 (finite; overwritten) -> e4m3fn codes in ``out`` (uint8), round to nearest even, saturating at 448.

    Normals: round the float32 mantissa to 3 bits (add 0x7FFFF + lowest kept bit, as in bf16 rounding), then
    rebias the exponent 127 -> 7. Subnormals (|y| < 2^-6, step 2^-9): rint(|y| * 512) gives codes 0..8, and code 8
    is exactly the smallest normal, so rounding up across the boundary comes out right too. Checked against a
    brute-force nearest-even search over all 127 magnitudes (tests/tier/test_codecs.py)."""
    y = y.reshape(-1)
    yu = y.view(np.uint32)
    n = y.size
    sign = scratch("cd.sign", np.uint32, n)
    np.right_shift(yu, 24, out=sign)
    np.bitwise_and(sign, 0x80, out=sign)
    np.bitwise_and(yu, 0x7FFFFFFF, out=yu)  # y = |y|
    np.minimum(y, np.float32(_E4M3_MAX), out=y)  # saturate: float rounding in the scaling may overshoot 448
    r = scratch("cd.round", np.uint32, n)
    np.right_shift(yu, 20, out=r)
    np.bitwise_and(r, 1, out=r)
    np.add(r, yu, out=r)
    np.add(r, 0x7FFFF, out=r)
    np.right_shift(r, 20, out=r)
    np.subtract(r, (127 - 7) << 3, out=r)  # wraps for subnormals; those are overwritten below
    sub = np.less(y, _E4M3_MIN_NORMAL, out=scratch("cd.sub", np.bool_, n))
    if sub.any():
        np.multiply(y, np.float32(512), out=y)
        np.rint(y, out=y)
        np.copyto(r, y, casting="unsafe", where=sub)
    np.bitwise_or(r, sign, out=r)
    np.copyto(out, r, casting="unsafe")
    return out


def f32_to_e4m3(y: np.ndarray) -> np.ndarray:
    """float32 (finite, |y| <= 448 or saturated) -> e4m3fn codes (new uint8 array, input untouched)."""
    y = np.array(y, dtype=np.float32, copy=True).reshape(-1)
    return _f32_to_e4m3(y, np.empty(y.size, np.uint8))


class Fp8Codec(Codec):
    """Body: float32 scale per row, then e4m3fn code per element; x ~= e4m3(code) * scale, scale = absmax / 448."""

    name, code, lossless = "fp8", 3, False

    def supports(self, dtype):
        return dtype in FLOAT32_CONVERTIBLE

    def _encode(self, data_u8, dtype, row_len):
        scale, y = _scaled(data_u8, dtype, row_len, _E4M3_MAX, self.name)
        return [scale.tobytes(), _f32_to_e4m3(y, scratch("cd.codes", np.uint8, y.size))]

    def _decode(self, body, out_u8, dtype, row_len):
        scale, codes = _lossy_body(body, out_u8, dtype, row_len, self.name)
        vals = scratch("cd.f32", np.float32, codes.size)
        np.take(_E4M3_LUT, codes, out=vals, mode="clip")  # clip: codes are < 256 anyway; avoids a buffered copy
        if _has_nan(vals):
            raise CodecError(f"{self.name} page body holds the e4m3 NaN code: damaged blob")
        vals2 = vals.reshape(-1, row_len)
        np.multiply(vals2, scale[:, None], out=vals2)
        _from_float32_into(vals2, dtype, out_u8)


# ----------------------------------------------------------------------------------------------------- lookup

# ------------------------------------------------------------------------------------------------------ bplane


class BplaneCodec(Codec):
    """Byte planes of a bf16 / fp16 page, the high bytes coded per 4 KiB block so a GPU decodes one block per program
    (tier/bplane.py; kernels/bplane_decode.py and kernels/triton_bplane.py decode it on the device). Lossless; its
    host encode is ~20x slower than zstd's, so it is for pages meant to travel compressed to the GPU."""

    name, code, lossless = bplane.NAME, bplane.CODE, True

    def supports(self, dtype):
        return dtype in bplane.DTYPES

    def _encode(self, data_u8, dtype, row_len):
        return bplane.encode_parts(data_u8, dtype)

    def _decode(self, body, out_u8, dtype, row_len):
        if is_rows(out_u8):  # the plane decode writes a flat page: through per-thread scratch into the rows
            flat = scratch("cd.bplane", np.uint8, out_u8.size)
            bplane.decode_into(body, flat, dtype)
            fill(out_u8, flat)
        else:
            bplane.decode_into(body, out_u8, dtype)


_CODECS = (RawCodec(), ZstdCodec(), Int8Codec(), Fp8Codec(), BplaneCodec())
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


def flat_page(data) -> np.ndarray:
    """A page to encode as one flat run of bytes (what the encoders read): ``byte_view``'s, or for a page in rows (a
    host pool's slots, as the remote tier keeps a hit it decoded into them) the rows gathered into this thread's
    scratch (one copy; read it before this thread's next encode)."""
    data_u8 = byte_view(data)
    if not is_rows(data_u8):
        return data_u8
    flat = scratch("cd.gather", np.uint8, data_u8.size)
    flat.reshape(data_u8.shape)[...] = data_u8
    return flat


def encode_page(data, dtype: str, codec, row_len: int) -> bytes:
    """Encode one page (anything ``byte_view`` views, flat or in rows) into a self-describing blob (header + body)."""
    c = get_codec(codec)
    data_u8 = flat_page(data)
    parts = c.encode_parts(data_u8, dtype, row_len)  # checks dtype, row_len and length
    header = HEADER.pack(MAGIC, FORMAT_VERSION, c.code, DTYPES[dtype].code, 0, row_len, data_u8.size)
    return b"".join([header, *parts])


def decode_page(blob, out, dtype: str) -> PageHeader:
    """Decode ``blob`` into the writable buffer ``out`` (all of it: flat, or a page in rows, see ``byte_view``),
    after checking its dtype and size."""
    h = peek_header(blob)
    out_u8 = byte_view(out, writable=True)
    if h.dtype_name != dtype:
        raise CodecError(f"page blob holds dtype {h.dtype_name!r}, caller asked for {dtype!r}")
    if h.raw_nbytes != out_u8.size:
        raise CodecError(f"page blob decodes to {h.raw_nbytes} bytes, output buffer holds {out_u8.size}")
    body = memoryview(blob).cast("B")[HEADER.size :]
    _BY_CODE[h.codec].decode_body(body, out_u8, dtype, h.row_len)
    return h
