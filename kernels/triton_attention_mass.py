"""Triton kernels behind ``attention_mass``.

Imported only when a dispatcher gets CUDA tensors (or ``impl="triton"``). Grid ``(batch, kv_heads, splits)``: a
program takes one request, one kv head with its ``q_heads / kv_heads`` query heads (GQA: K is read once per
group, padded to 16 rows for ``tl.dot``), and one contiguous share of the request's tokens, in tiles of
``BLOCK_T`` tokens (64; 16 for head dims over 256). Without a backend LSE, a first kernel computes per-split running
max / sum (flash-decoding style) that torch folds into the LSE; the mass kernel then turns each tile's logits into
probabilities, sums them over the group's heads and adds them into the output pages with atomics:

    page_size a multiple of BLOCK_T   one atomic per tile (the tile lies in one page)
    BLOCK_T a multiple of page_size   the tile reshaped to [pages, page_size], one atomic per page
    otherwise (page_size 1 or not a power of two)   one atomic per token into its page

Shares start at multiples of BLOCK_T, so tiles never straddle pages in the first two cases. Atomic float adds make
the low bits depend on scheduling; tests compare with a tolerance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import cdiv, next_pow2

BLOCK_T = 64
_MAX_SPLITS = 64

_FP8 = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


@triton.jit
def _tile_logits(
    q,
    k_ptr,
    stride_ks,
    stride_kh,
    stride_kd,
    r2t_ptr,
    kvh,
    t0,
    end,
    scale,
    k_scale,
    logit_cap,
    D,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    K_SCALED: tl.constexpr,
    HAS_CAP: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Logits [G_PAD, BLOCK] of one tile of tokens t0 .. t0+BLOCK (invalid tokens are masked by the caller)."""
    t = t0 + tl.arange(0, BLOCK)
    tmask = t < end
    slots = tl.load(r2t_ptr + t, mask=tmask, other=0).to(tl.int64)
    d = tl.arange(0, D_PAD)
    k = tl.load(
        k_ptr + slots[:, None] * stride_ks + kvh * stride_kh + d[None, :] * stride_kd,
        mask=tmask[:, None] & (d < D)[None, :],
        other=0.0,
    )
    if K_SCALED:
        k = k.to(tl.float32) * k_scale
    k = k.to(COMPUTE)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if HAS_CAP:
        # logit_cap * tanh(s / logit_cap), with tanh(x) = 1 - 2 / (exp(2x) + 1) (saturates cleanly for large |x|)
        s = logit_cap * (1.0 - 2.0 / (tl.exp(2.0 * s / logit_cap) + 1.0))
    return s, t, tmask


@triton.jit
def _load_q(
    q_ptr,
    stride_qb,
    stride_qh,
    stride_qd,
    b,
    kvh,
    D,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    j = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * G + j
    hmask = j < G
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=hmask[:, None] & (d < D)[None, :],
        other=0.0,
    )
    return q.to(COMPUTE), heads, hmask


@triton.jit
def _request(seq_lens_ptr, rpi_ptr, b, max_tokens, num_splits, split, HAS_RPI: tl.constexpr, BLOCK: tl.constexpr):
    """(row of req_to_token, first token, end token) of this program's share."""
    seq_len = tl.minimum(tl.load(seq_lens_ptr + b).to(tl.int64), max_tokens)
    if HAS_RPI:
        row = tl.load(rpi_ptr + b).to(tl.int64)
    else:
        row = b
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK) * BLOCK
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    return row, start, end


# The lengths and the output width change with every batch; specialising on them (Triton's default: ints equal to 1
# or divisible by 16) would compile new variants mid-request. Not specialised, the kernels compiled once per layer
# geometry (attention_capture.KernelWarmup, on small inputs) serve every batch.
@triton.jit(do_not_specialize=["max_tokens", "num_splits"])
def _lse_partial_kernel(
    q_ptr,
    stride_qb,
    stride_qh,
    stride_qd,
    k_ptr,
    stride_ks,
    stride_kh,
    stride_kd,
    r2t_ptr,
    stride_r2t,
    seq_lens_ptr,
    rpi_ptr,
    m_ptr,
    l_ptr,  # [B, Hq, num_splits] float32, contiguous
    max_tokens,
    num_splits,
    D,
    scale,
    k_scale,
    logit_cap,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    K_SCALED: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_RPI: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    row, start, end = _request(seq_lens_ptr, rpi_ptr, b, max_tokens, num_splits, split, HAS_RPI, BLOCK)
    q, heads, hmask = _load_q(q_ptr, stride_qb, stride_qh, stride_qd, b, kvh, D, G, G_PAD, D_PAD, COMPUTE)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    for t0 in range(start, end, BLOCK):
        s, _, tmask = _tile_logits(
            q,
            k_ptr,
            stride_ks,
            stride_kh,
            stride_kd,
            r2t_ptr + row * stride_r2t,
            kvh,
            t0,
            end,
            scale,
            k_scale,
            logit_cap,
            D,
            COMPUTE,
            IEEE,
            K_SCALED,
            HAS_CAP,
            D_PAD,
            BLOCK,
        )
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(s - m_use[:, None]), axis=1)
        m_i = m_new
    idx = (b * (tl.num_programs(1) * G) + heads) * num_splits + split
    tl.store(m_ptr + idx, m_i, mask=hmask)
    tl.store(l_ptr + idx, l_i, mask=hmask)


@triton.jit(do_not_specialize=["stride_ob", "num_pages", "max_tokens", "num_splits"])
def _mass_kernel(
    q_ptr,
    stride_qb,
    stride_qh,
    stride_qd,
    k_ptr,
    stride_ks,
    stride_kh,
    stride_kd,
    r2t_ptr,
    stride_r2t,
    seq_lens_ptr,
    rpi_ptr,
    lse_ptr,
    stride_lb,
    stride_lh,
    out_ptr,
    stride_ob,
    num_pages,
    max_tokens,
    num_splits,
    D,
    scale,
    k_scale,
    logit_cap,
    head_weight,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
    IEEE: tl.constexpr,
    K_SCALED: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_RPI: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGE_MODE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    row, start, end = _request(seq_lens_ptr, rpi_ptr, b, max_tokens, num_splits, split, HAS_RPI, BLOCK)
    q, heads, hmask = _load_q(q_ptr, stride_qb, stride_qh, stride_qd, b, kvh, D, G, G_PAD, D_PAD, COMPUTE)
    # padded heads get lse = +inf, so exp(s - lse) = 0 for them
    lse = tl.load(lse_ptr + b * stride_lb + heads * stride_lh, mask=hmask, other=float("inf")).to(tl.float32)
    out_row = out_ptr + b * stride_ob
    for t0 in range(start, end, BLOCK):
        s, t, tmask = _tile_logits(
            q,
            k_ptr,
            stride_ks,
            stride_kh,
            stride_kd,
            r2t_ptr + row * stride_r2t,
            kvh,
            t0,
            end,
            scale,
            k_scale,
            logit_cap,
            D,
            COMPUTE,
            IEEE,
            K_SCALED,
            HAS_CAP,
            D_PAD,
            BLOCK,
        )
        p = tl.exp(s - lse[:, None])
        p = tl.where(tmask[None, :] & hmask[:, None], p, 0.0)
        tok = tl.sum(p, axis=0) * head_weight  # [BLOCK]
        if PAGE_MODE == 0:  # the tile lies inside one page
            page = t0 // PAGE_SIZE
            tl.atomic_add(out_row + page, tl.sum(tok, axis=0), mask=page < num_pages)
        elif PAGE_MODE == 1:  # whole pages inside the tile
            per_page = tl.sum(tl.reshape(tok, (BLOCK // PAGE_SIZE, PAGE_SIZE)), axis=1)
            pages = t0 // PAGE_SIZE + tl.arange(0, BLOCK // PAGE_SIZE)
            tl.atomic_add(out_row + pages, per_page, mask=(pages * PAGE_SIZE < end) & (pages < num_pages))
        else:  # one atomic per token into its page
            pages = t // PAGE_SIZE
            tl.atomic_add(out_row + pages, tok, mask=tmask & (pages < num_pages))


def _compute(q: torch.Tensor, k: torch.Tensor):
    """(Triton compute dtype for tl.dot, IEEE fp32 flag)."""
    if q.dtype in (torch.bfloat16, torch.float16) and (k.dtype == q.dtype or k.dtype in _FP8):
        return (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16), False
    return tl.float32, True


def _block_t(d_pad: int) -> int:
    """Tokens per tile: 64, fewer for very wide heads (MLA's 576) so the K tile stays small."""
    return BLOCK_T if d_pad <= 256 else 16


def _common(a):
    q, k = a.q, a.k_buffer
    compute, ieee = _compute(q, k)
    k_scaled = a.k_scale is not None or k.dtype in _FP8
    max_tokens = min(a.req_to_token.shape[1], a.num_pages * a.page_size)
    r2t = a.req_to_token if a.req_to_token.stride(1) == 1 else a.req_to_token.contiguous()
    rpi = a.rpi.contiguous() if a.rpi is not None else a.seq_lens
    d_pad = max(16, next_pow2(a.D))
    consts = {
        "G": a.G,
        "G_PAD": max(16, next_pow2(a.G)),
        "D_PAD": d_pad,
        "BLOCK": _block_t(d_pad),
        "COMPUTE": compute,
        "IEEE": ieee,
        "K_SCALED": k_scaled,
        "HAS_CAP": a.logit_cap > 0,
        "HAS_RPI": a.rpi is not None,
    }
    scalars = (a.D, a.scale, 1.0 if a.k_scale is None else a.k_scale, a.logit_cap or 1.0)
    args = (
        q,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        r2t,
        r2t.stride(0),
        a.seq_lens.contiguous(),
        rpi,
    )
    return args, scalars, consts, max_tokens


def _splits(a, max_tokens: int, num_splits: int | None, block: int) -> int:
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
        return num_splits
    sms = torch.cuda.get_device_properties(a.q.device).multi_processor_count if a.q.is_cuda else 4
    want = cdiv(4 * sms, max(1, a.B * a.Hkv))
    return max(1, min(want, _MAX_SPLITS, cdiv(max(max_tokens, 1), block)))


def attention_lse(a, num_splits: int | None = None) -> torch.Tensor:
    """Natural-log LSE [B, Hq] float32 of the scaled, capped logits (``-inf`` for empty requests)."""
    args, scalars, consts, max_tokens = _common(a)
    splits = _splits(a, max_tokens, num_splits, consts["BLOCK"])
    m = torch.empty(a.B, a.Hq, splits, dtype=torch.float32, device=a.q.device)
    l = torch.empty_like(m)
    if a.B and a.Hq:
        _lse_partial_kernel[(a.B, a.Hkv, splits)](*args, m, l, max_tokens, splits, *scalars, **consts, num_warps=4)
    return torch.logsumexp(m + torch.log(l), dim=-1)


def attention_mass(a, out: torch.Tensor, num_splits: int | None = None) -> None:
    """Add the per-page mass of ``a`` (an attention_mass._Args) into ``out [B, num_pages]`` float32."""
    if a.B == 0 or a.num_pages == 0:
        return
    if out.stride(1) != 1:
        tmp = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        attention_mass(a, tmp, num_splits)
        out += tmp
        return
    lse = a.lse if a.lse is not None else attention_lse(a, num_splits)
    args, scalars, consts, max_tokens = _common(a)
    block = consts["BLOCK"]
    splits = _splits(a, max_tokens, num_splits, block)
    ps = a.page_size
    if ps % block == 0:
        mode = 0
    elif ps & (ps - 1) == 0 and ps > 1 and block % ps == 0:
        mode = 1
    else:
        mode = 2
    _mass_kernel[(a.B, a.Hkv, splits)](
        *args,
        lse,
        lse.stride(0),
        lse.stride(1),
        out,
        out.stride(0),
        a.num_pages,
        max_tokens,
        splits,
        *scalars,
        a.head_weight,
        **consts,
        PAGE_SIZE=ps,
        PAGE_MODE=mode,
        num_warps=4,
    )
