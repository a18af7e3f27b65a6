"""Decode "bplane" page bodies (``tier/bplane.py``) on the device the bytes are on: a torch reference and the Triton
kernel behind one dispatcher.

``buf`` is one uint8 tensor holding the bodies of ``P`` pages (any alignment), ``offsets`` an int64 tensor of each
body's first byte in ``buf``, and every page has ``n`` 16-bit values (one batch is one page shape). The decoded
values land in ``out`` (16-bit, ``P * n`` elements, contiguous), value ``e`` of page ``p`` at

    (e // seg) * (total * seg) + (first + p) * seg + e % seg

``total`` (default ``P``) is the pages ``out`` holds and ``first`` (default 0) where these ``P`` go, so pages decoded
here can sit beside pages that reached ``out`` another way. With ``seg = n`` (the default) that is page after page,
``[total, n]``. With ``seg`` = the values of one layer's part of
a page (a layer_first page is ``[layers, page_size, *inner]``), ``out`` comes out layer-major, ``[layers, P *
page_size, *inner]``: the staging layout ``page_copy.scatter_pages_layers`` takes, so no transpose is needed between
the decode and the scatter into the KV pool.

The kernels do not validate: ``tier.bplane.check_body`` does that on the host before a body is copied to the device
(and the blobs are checksummed). Whatever the bytes, they never read outside ``buf`` or write outside ``out``; a
damaged body only decodes to wrong values.

    bplane_decode(buf, offsets, n, *, out=None, seg=None, first=0, total=None, impl="auto") -> out
"""

from __future__ import annotations

import torch

from ..tier.bplane import BLOCK_ELEMS, DESC, RAW_WIDTH, num_blocks
from ._dispatch import use_triton

DESC_BYTES = DESC.itemsize
# Blocks the reference decodes per step: its int64 temporaries stay ~1 MiB each (measured on CPU, one thread: 9 ms
# per 256 KiB page at 64 blocks, 12 ms at 256).
_REF_BLOCKS = 64


def _check(buf, offsets, n: int, out, seg: int | None, first: int, total: int | None):
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"buf must be a 1-D uint8 tensor, got {tuple(buf.shape)} {buf.dtype}")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets must be a 1-D int64/int32 tensor, got {tuple(offsets.shape)} {offsets.dtype}")
    if offsets.device != buf.device:
        raise ValueError(f"offsets are on {offsets.device}, buf on {buf.device}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    seg = (n or 1) if seg is None else seg
    if isinstance(seg, bool) or not isinstance(seg, int) or seg < 1 or n % seg:
        raise ValueError(f"seg must be a positive divisor of n = {n}, got {seg!r}")
    P = offsets.numel()
    total = P if total is None else total
    if isinstance(first, bool) or not isinstance(first, int) or first < 0 or first + P > total:
        raise ValueError(f"pages {first}..{first + P - 1} do not fit in total = {total} pages")
    if out is None:
        out = torch.empty(total * n, dtype=torch.int16, device=buf.device)
    if out.element_size() != 2 or out.numel() != total * n or not out.is_contiguous() or out.device != buf.device:
        raise ValueError(
            f"out must be a contiguous 16-bit tensor of {total * n} elements on {buf.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out, seg, total


def _u(buf: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Bytes of ``buf`` at ``at`` as int64, reads past the end clamped to the last byte (never used: masked)."""
    return buf[at.clamp(0, buf.numel() - 1)].to(torch.int64)


def bplane_decode_ref(
    buf: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    *,
    out: torch.Tensor | None = None,
    seg: int | None = None,
    first: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """Torch reference of ``bplane_decode`` (any device): the same arithmetic as the Triton kernel, on all blocks
    of a step at once."""
    out, seg, total = _check(buf, offsets, n, out, seg, first, total)
    P, nb = offsets.numel(), num_blocks(n)
    if P == 0 or n == 0 or buf.numel() == 0:
        return out
    flat = out.view(torch.int16).view(-1)
    base = offsets.to(torch.int64)
    k = torch.arange(BLOCK_ELEMS, device=buf.device, dtype=torch.int64)
    for step in range(0, P * nb, _REF_BLOCKS):
        pb = torch.arange(step, min(step + _REF_BLOCKS, P * nb), device=buf.device, dtype=torch.int64)
        page, block = pb // nb, pb % nb
        body = base[page]
        d = body[:, None] + block[:, None] * DESC_BYTES + torch.arange(DESC_BYTES, device=buf.device)
        d = _u(buf, d)
        offset = d[:, 0] | (d[:, 1] << 8) | (d[:, 2] << 16) | (d[:, 3] << 24)
        n_esc, width, n_dict = d[:, 4] | (d[:, 5] << 8), d[:, 6].clamp(max=RAW_WIDTH), d[:, 7]
        start = body + nb * DESC_BYTES + n + offset
        count = (n - block * BLOCK_ELEMS).clamp(max=BLOCK_ELEMS)
        e = block[:, None] * BLOCK_ELEMS + k  # value index in the page
        valid = k < count[:, None]
        pos = k * width[:, None]
        at = start[:, None] + n_dict[:, None] + (pos >> 3)
        pair = _u(buf, at) | (_u(buf, at + 1) << 8)
        idx = (pair >> (pos & 7)) & ((1 << width[:, None]) - 1)
        raw = (width == RAW_WIDTH)[:, None]
        esc = ~raw & (idx >= n_dict[:, None]) & valid
        ordinal = torch.minimum(torch.cumsum(esc, dim=1) - esc.to(torch.int64), (n_esc[:, None] - 1).clamp(min=0))
        packed_len = (count * width + 7) // 8
        esc_byte = _u(buf, start[:, None] + n_dict[:, None] + packed_len[:, None] + ordinal)
        dict_byte = _u(buf, start[:, None] + torch.minimum(idx, (n_dict[:, None] - 1).clamp(min=0)))
        hi = torch.where(raw, idx, torch.where(esc, esc_byte, dict_byte))
        lo = _u(buf, (body + nb * DESC_BYTES)[:, None] + e)
        val = (hi << 8) | lo
        val = val - ((val >> 15) << 16)  # as a signed 16-bit value
        dest = (e // seg) * (total * seg) + (first + page[:, None]) * seg + e % seg
        flat[dest[valid]] = val[valid].to(torch.int16)
    return out


def bplane_decode(
    buf: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    *,
    out: torch.Tensor | None = None,
    seg: int | None = None,
    first: int = 0,
    total: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Decode ``P = offsets.numel()`` bplane bodies from ``buf`` into pages ``first ... first + P - 1`` of ``out``
    (``total`` pages of ``n`` values, default ``P``; see the module docstring)."""
    if not use_triton(impl, buf, offsets):
        return bplane_decode_ref(buf, offsets, n, out=out, seg=seg, first=first, total=total)
    out, seg, total = _check(buf, offsets, n, out, seg, first, total)
    from . import triton_bplane

    triton_bplane.bplane_decode(buf, offsets.to(torch.int64), n, out.view(torch.int16), seg, first, total)
    return out
