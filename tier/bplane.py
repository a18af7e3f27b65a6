"""The "bplane" page codec: a lossless byte-plane code for bf16 / fp16 pages that a GPU decodes one block per program.

zstd cannot be decoded by a Triton kernel (its entropy stages are sequential), so pages that are to stay compressed
until they reach the GPU need a code with fixed-size work per block. Each 16-bit value is split into its low byte
(mostly mantissa: close to random in KV caches, stored raw) and its high byte (sign + exponent bits: a handful of
values dominate each region of a page). The high bytes are cut into blocks of :data:`BLOCK_ELEMS` values (the 4 KiB
of raw page each block covers), and each block is coded on its own as

    a dictionary of its ``n_dict`` most frequent high bytes, one fixed-width ``width``-bit index per value
    (``width`` 0..7, chosen per block for the fewest bytes), and an escape list: a value outside the dictionary is
    written as the index ``n_dict`` and its byte follows, in order, after the indices;

or stored raw (``width`` 8). Measured on ``tier.synthetic.kv_page`` bf16 pages (64 tokens x 8 heads x 128, outlier
channels): the high plane codes to ~3.5 bits per value, a page ratio of ~1.39 (zstd's planes: 1.49); fp16 keeps two
mantissa bits in its high byte and gets ~1.11 (zstd 1.17). A per-block base + bit-packed deltas code was measured too
and lost (bf16 1.27, fp16 1.04): the few values far from a block's bulk widen every delta, where the dictionary pays
one escape byte for each. Blocks of 1024 and 8192 values were within 0.01 of 2048 (dictionary cost vs locality).

Body (little-endian), for a page of ``n`` 16-bit values in ``nb = ceil(n / BLOCK_ELEMS)`` blocks:

    descriptors  nb x 8 bytes: u32 payload offset, u16 n_esc, u8 width, u8 n_dict
    low plane    n bytes: the low byte of every value, in page order
    payloads     per block, at its offset (from the start of the payload area), back to back in block order:
                 n_dict dictionary bytes, ceil(count * width / 8) bytes of indices, n_esc escape bytes

Indices are packed little-endian: value ``k`` of a block occupies bits ``k * width ...`` of its index bytes, bit
``j`` being bit ``j % 8`` of byte ``j // 8``. A width-8 block has no dictionary and no escapes: its index bytes are
the high bytes themselves. The decoder checks every descriptor against this layout (the offsets are what the sizes
say, the payloads end where the body ends) and that each block holds exactly ``n_esc`` escapes, so a damaged body is
a :class:`CodecError`, never a wrong page.

``encode_parts`` / ``decode_into`` are the body functions (``tier/codecs.py`` frames them with the page header);
``check_body`` is the descriptor check alone, which the GPU path (``kernels/compressed_load.py``) runs on the host
before it copies a body to the device. ``kernels/bplane_decode.py`` (torch) and ``kernels/triton_bplane.py`` (one
Triton program per block) decode the same bodies bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .errors import CodecError

NAME = "bplane"
CODE = 4  # the codec code for tier/codecs.py headers: never renumber
DTYPES = ("bfloat16", "float16")  # 16-bit floats only: the high byte is what codes well
BLOCK_ELEMS = 2048  # values per block: 4 KiB of raw page
RAW_WIDTH = 8  # a block stored raw
DESC = np.dtype([("offset", "<u4"), ("n_esc", "<u2"), ("width", "u1"), ("n_dict", "u1")])


class BodyLayout(NamedTuple):
    """Where the parts of a bplane body are, for a page of ``n`` values (checked by :func:`check_body`)."""

    n: int  # 16-bit values in the page
    blocks: int  # descriptors
    lo_at: int  # byte offset of the low plane
    payload_at: int  # byte offset of the payload area
    desc: np.ndarray  # the descriptors (DESC)


def num_blocks(n: int) -> int:
    return -(-n // BLOCK_ELEMS)


def _counts(n: int, nb: int) -> np.ndarray:
    """Values per block: BLOCK_ELEMS each, the rest in the last."""
    counts = np.full(nb, BLOCK_ELEMS, np.int64)
    if nb:
        counts[-1] = n - BLOCK_ELEMS * (nb - 1)
    return counts


def _payload_sizes(counts: np.ndarray, width: np.ndarray, n_dict: np.ndarray, n_esc: np.ndarray) -> np.ndarray:
    return n_dict.astype(np.int64) + (counts * width.astype(np.int64) + 7) // 8 + n_esc.astype(np.int64)


def _planes(data_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    wide = data_u8.view("<u2")
    lo = np.empty(wide.size, np.uint8)
    hi = np.empty(wide.size, np.uint8)
    np.copyto(lo, wide, casting="unsafe")  # truncates to the low byte
    np.right_shift(wide, 8, out=hi, casting="unsafe")
    return lo, hi


def _choose_widths(hist: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block: (width, n_dict, n_esc) giving the fewest payload bytes. ``hist`` [nb, 256] is sorted descending."""
    nb = hist.shape[0]
    distinct = (hist > 0).sum(axis=1)
    covered = np.cumsum(hist, axis=1)  # covered[:, k - 1]: values the k most frequent bytes account for
    best_cost = counts.copy()  # width 8: the raw bytes
    best = (np.full(nb, RAW_WIDTH, np.int64), np.zeros(nb, np.int64), np.zeros(nb, np.int64))
    for w in range(RAW_WIDTH):
        cap = 1 << w
        fits = distinct <= cap  # every value has an index: no escapes
        if w == 0:
            n_dict, n_esc = np.ones(nb, np.int64), np.zeros(nb, np.int64)
        else:
            n_dict = np.where(fits, distinct, cap - 1)  # with escapes, index cap - 1 is the escape
            n_esc = np.where(fits, 0, counts - covered[:, cap - 2])
        ok = fits if w == 0 else np.ones(nb, bool)
        cost = n_dict + (counts * w + 7) // 8 + n_esc
        better = ok & (cost < best_cost)
        best_cost = np.where(better, cost, best_cost)
        for arr, new in zip(best, (np.full(nb, w), n_dict, n_esc)):
            arr[better] = new[better]
    return best


def _blocked(plane: np.ndarray, nb: int) -> np.ndarray:
    """``plane`` as [nb, BLOCK_ELEMS], the last block padded with zeros."""
    out = np.zeros((nb, BLOCK_ELEMS), np.uint8)
    out.reshape(-1)[: plane.size] = plane
    return out


@functools.cache
def _bit_positions(w: int) -> tuple[np.ndarray, np.ndarray]:
    """For w-bit indices: the byte each of a block's values starts in, and the shift within it."""
    pos = np.arange(BLOCK_ELEMS, dtype=np.int64) * w
    return pos >> 3, (pos & 7).astype(np.uint16)


def _unpack_bits(src: np.ndarray, w: int) -> np.ndarray:
    """[rows, 256 * w] index bytes -> [rows, BLOCK_ELEMS] w-bit indices (little-endian bit order): each value
    reads the two bytes it may straddle (a zero column is appended for the last one), shifts and masks."""
    at, shift = _bit_positions(w)
    src = np.concatenate((src, np.zeros((src.shape[0], 1), np.uint8)), axis=1)
    pair = src[:, at].astype(np.uint16) | (src[:, at + 1].astype(np.uint16) << 8)
    return ((pair >> shift) & ((1 << w) - 1)).astype(np.uint8)


def _pack_bits(idx: np.ndarray, w: int) -> np.ndarray:
    """[rows, BLOCK_ELEMS] indices < 2**w -> [rows, 256 * w] index bytes (inverse of _unpack_bits): every 8
    values make 8 * w <= 64 bits, built in one little-endian uint64 whose first w bytes are theirs."""
    rows = idx.shape[0]
    eights = idx.reshape(rows, BLOCK_ELEMS // 8, 8)
    word = eights[:, :, 0].astype("<u8")
    for j in range(1, 8):  # eight strided passes: far faster than a reduce over an axis of length 8
        word |= eights[:, :, j].astype("<u8") << np.uint64(j * w)
    return np.ascontiguousarray(word.view(np.uint8).reshape(rows, BLOCK_ELEMS // 8, 8)[:, :, :w]).reshape(rows, -1)


def encode_parts(data_u8: np.ndarray, dtype: str) -> list:
    """The body of a page (flat uint8 array, a whole number of 16-bit values) as a list of bytes-like parts."""
    _check_dtype(dtype)
    if data_u8.size % 2:
        raise CodecError(f"bplane page is {data_u8.size} bytes, not a whole number of 16-bit values")
    n = data_u8.size // 2
    nb = num_blocks(n)
    lo, hi = _planes(data_u8)
    if nb == 0:
        return [lo]
    counts = _counts(n, nb)
    hi2 = _blocked(hi, nb)
    rows = np.arange(nb)[:, None]
    key = (hi2 + (rows << 8)).reshape(-1)  # (block, byte) -> one flat index
    hist = np.bincount(key, minlength=nb * 256).reshape(nb, 256)
    hist[-1, 0] -= nb * BLOCK_ELEMS - n  # the last block's zero padding is no value of the page
    order = np.argsort(-hist, axis=1, kind="stable")  # bytes by falling frequency, ties by value
    width, n_dict, n_esc = _choose_widths(np.take_along_axis(hist, order, axis=1), counts)
    rank = np.empty((nb, 256), np.uint8)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(256, dtype=np.uint8), order.shape), axis=1)
    idx = np.take(rank.reshape(-1), key).reshape(nb, BLOCK_ELEMS)  # each value's place in its block's dictionary
    escaped = idx >= n_dict[:, None]
    escaped[width == RAW_WIDTH] = False
    escaped.reshape(-1)[n:] = False  # padding
    np.minimum(idx, n_dict[:, None].astype(np.uint8), out=idx)  # escapes all take index n_dict
    idx[width == RAW_WIDTH] = hi2[width == RAW_WIDTH]
    packed: list = [b""] * nb
    for w in np.unique(width):
        w = int(w)
        if w == 0:
            continue
        blocks = np.flatnonzero(width == w)
        stream = _pack_bits(idx[blocks], w)
        for j, b in enumerate(blocks):
            packed[b] = stream[j, : (int(counts[b]) * w + 7) // 8]  # the last block: only its own values
    sizes = _payload_sizes(counts, width, n_dict, n_esc)
    desc = np.zeros(nb, DESC)
    desc["offset"] = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    desc["n_esc"], desc["width"], desc["n_dict"] = n_esc, width, n_dict
    esc_bytes = hi2[escaped]  # block by block, in order
    esc_at = np.concatenate(([0], np.cumsum(n_esc)))
    dicts = order.astype(np.uint8)
    parts = [desc.tobytes(), lo]
    for b in range(nb):
        parts += [dicts[b, : n_dict[b]], packed[b], esc_bytes[esc_at[b] : esc_at[b + 1]]]
    return parts


def encode_body(data_u8: np.ndarray, dtype: str) -> bytes:
    return b"".join(encode_parts(data_u8, dtype))


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CodecError(f"codec {NAME!r} does not handle dtype {dtype!r}; it handles {', '.join(DTYPES)}")


def check_body(body, n: int) -> BodyLayout:
    """Check a body's descriptors against the layout for a page of ``n`` 16-bit values; CodecError if they do not
    fit. What it does not check (each block's escape count) only a decode can; the blobs are checksummed."""
    mv = memoryview(body).cast("B")
    nb = num_blocks(n)
    lo_at = nb * DESC.itemsize
    payload_at = lo_at + n
    if len(mv) < payload_at:
        raise CodecError(f"bplane page body is {len(mv)} bytes, shorter than its {payload_at}-byte descriptors + plane")
    desc = np.frombuffer(mv[:lo_at], DESC)
    width = desc["width"].astype(np.int64)
    n_dict = desc["n_dict"].astype(np.int64)
    n_esc = desc["n_esc"].astype(np.int64)
    counts = _counts(n, nb)
    bad = width > RAW_WIDTH
    bad |= (width == RAW_WIDTH) & ((n_dict != 0) | (n_esc != 0))
    cap = np.left_shift(1, np.minimum(width, RAW_WIDTH - 1))
    coded = width < RAW_WIDTH
    bad |= coded & ((n_dict < 1) | (n_dict > cap) | (n_esc > counts))
    bad |= coded & (n_esc > 0) & (n_dict >= cap)  # an escape needs index n_dict to exist
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"bplane page block {b} has an impossible descriptor (width {width[b]}, n_dict {n_dict[b]}, "
            f"n_esc {n_esc[b]}): damaged blob"
        )
    sizes = _payload_sizes(counts, width, n_dict, n_esc)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if not np.array_equal(desc["offset"].astype(np.int64), starts):
        b = int(np.flatnonzero(desc["offset"].astype(np.int64) != starts)[0])
        raise CodecError(f"bplane page block {b} payload offset {desc['offset'][b]} is not {starts[b]}: damaged blob")
    total = int(ends[-1]) if nb else 0
    if len(mv) != payload_at + total:
        raise CodecError(f"bplane page body is {len(mv)} bytes; its descriptors add up to {payload_at + total}")
    return BodyLayout(n, nb, lo_at, payload_at, desc)


def decode_into(body, out_u8: np.ndarray, dtype: str) -> None:
    """Decode ``body`` into the flat uint8 ``out_u8`` (the whole page), or raise CodecError."""
    _check_dtype(dtype)
    if out_u8.size % 2:
        raise CodecError(f"bplane output is {out_u8.size} bytes, not a whole number of 16-bit values")
    n = out_u8.size // 2
    lay = check_body(body, n)
    buf = np.frombuffer(memoryview(body).cast("B"), np.uint8)
    lo = buf[lay.lo_at : lay.payload_at]
    if n == 0:
        return
    nb, desc = lay.blocks, lay.desc
    width = desc["width"].astype(np.int64)
    n_dict = desc["n_dict"].astype(np.int64)
    n_esc = desc["n_esc"].astype(np.int64)
    counts = _counts(n, nb)
    packed_len = (counts * width + 7) // 8
    start = lay.payload_at + desc["offset"].astype(np.int64)
    idx = np.zeros((nb, BLOCK_ELEMS), np.uint8)
    for w in np.unique(width):
        w = int(w)
        if w == 0:
            continue
        blocks = np.flatnonzero(width == w)
        src = np.zeros((blocks.size, 256 * w), np.uint8)
        for j, b in enumerate(blocks):
            at = start[b] + n_dict[b]
            src[j, : packed_len[b]] = buf[at : at + packed_len[b]]
        idx[blocks] = src if w == RAW_WIDTH else _unpack_bits(src, w)
    table = np.zeros((nb, 256), np.uint8)  # each block's dictionary
    esc_parts = []
    for b in range(nb):
        table[b, : n_dict[b]] = buf[start[b] : start[b] + n_dict[b]]
        at = start[b] + n_dict[b] + packed_len[b]
        esc_parts.append(buf[at : at + n_esc[b]])
    hi = np.take(table.reshape(-1), idx + (np.arange(nb)[:, None] << 8)).astype(np.uint8)
    raw = width == RAW_WIDTH
    hi[raw] = idx[raw]
    escaped = idx >= n_dict[:, None]
    escaped[raw] = False
    escaped.reshape(-1)[n:] = False  # the last block's padding
    got = escaped.sum(axis=1)
    if not np.array_equal(got, n_esc):
        b = int(np.flatnonzero(got != n_esc)[0])
        raise CodecError(f"bplane page block {b} holds {got[b]} escapes, its descriptor says {n_esc[b]}: damaged blob")
    hi[escaped] = np.concatenate(esc_parts)  # block by block, in order, as the encoder wrote them
    wide = out_u8.view("<u2")
    np.left_shift(hi.reshape(-1)[:n], 8, out=wide, dtype=np.uint16)
    np.bitwise_or(wide, lo, out=wide)


def decode_body(body, out_u8: np.ndarray, dtype: str) -> None:
    decode_into(body, out_u8, dtype)
