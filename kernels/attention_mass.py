"""Per-page attention mass: how much softmax weight each KV page of each request received from one query row.

A row is a decode step's query, or one query token of an extend pass with its causal span as its length (the capture in
``kvdrive_sglang.attention_capture`` samples both). For row ``b``, query head ``h`` and token position
``t < seq_lens[b]`` of the request, with ``slot = req_to_token[row_b, t]`` and kv head
``g = h // (q_heads // kv_heads)`` (GQA):

    s[h, t] = scale * dot(q[b, h], k_buffer[slot, g] * k_scale)      (then logit_cap * tanh(s / logit_cap) if set)
    p[h, t] = exp(s[h, t] - lse[b, h])      lse = log(sum_t exp(s[h, t])), natural log, over the same tokens
    out[b, i] = sum over heads h of sum over t in page i of p[h, t]      page i = positions i*page_size ... +page_size

Pages are the request's logical pages (token positions), in order: ``out[b, i]`` is the mass of the request's i-th
page, whose tokens live in whatever slots ``req_to_token`` names. With ``head_reduce="sum"`` (default) each
request's row sums to ``q_heads`` (1 per head); ``head_reduce="mean"`` divides by ``q_heads`` so rows sum to 1.
Pages past a request's length get 0. A request with ``seq_lens == 0`` gets a zero row.

``lse`` ``[batch, q_heads]``: when the attention backend already computed the log-sum-exp of the same (scaled,
capped) logits over the same tokens, pass it and the softmax normaliser is not recomputed (one pass over K instead
of two). It must be the natural log; a base-2 LSE is ``lse2 * ln(2)``. Row sums then show how well it agrees.

``req_to_token`` is SGLang's ``[rows, max_len]`` token-slot table; row ``b`` serves request ``b`` unless
``req_pool_indices [batch]`` maps requests to rows (SGLang's ``req_to_token_pool.req_to_token`` with
``forward_batch.req_pool_indices``). ``num_pages`` (output width) defaults to ``ceil(max_len / page_size)``;
``seq_lens`` must not exceed ``max_len`` nor ``num_pages * page_size`` (the reference raises, the Triton kernel
ignores tokens past either bound). ``out`` receives the result (``accumulate=True`` adds to it, e.g. to sum a
sample of layers). ``k_scale`` multiplies K (SGLang's fp8 KV cache stores K / k_scale).

``page_attention_mass`` runs the Triton kernels (``triton_attention_mass``) when q and k_buffer are CUDA tensors
(index tensors elsewhere are moved to q's device) and the torch reference ``page_attention_mass_ref`` otherwise;
``impl="torch"|"triton"`` forces one. The reference computes in float32, one request at a time over its valid
length only. (The functions are not called ``attention_mass``: that name is
this module's, and a package attribute cannot be both.)
"""

from __future__ import annotations

import math

import torch

from ._dispatch import cdiv, use_triton

HEAD_REDUCE = ("sum", "mean")


class _Args:
    """Validated arguments, shared by the reference and the Triton path."""

    def __init__(
        self,
        q,
        k_buffer,
        req_to_token,
        seq_lens,
        page_size,
        scale,
        lse,
        req_pool_indices,
        num_pages,
        k_scale,
        logit_cap,
        head_reduce,
        out,
        accumulate,
    ):
        if q.dim() != 3:
            raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
        if k_buffer.dim() != 3:
            raise ValueError(f"k_buffer must be [num_slots, kv_heads, head_dim], got {tuple(k_buffer.shape)}")
        B, Hq, D = q.shape
        Hkv = k_buffer.shape[1]
        if k_buffer.shape[2] != D:
            raise ValueError(f"q head_dim {D} != k_buffer head_dim {k_buffer.shape[2]}")
        if Hkv < 1 or Hq % Hkv:
            raise ValueError(f"q_heads {Hq} must be a multiple of kv_heads {Hkv}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if req_to_token.dim() != 2 or req_to_token.dtype.is_floating_point:
            raise ValueError(
                f"req_to_token must be a 2-D integer tensor, got {tuple(req_to_token.shape)} {req_to_token.dtype}"
            )
        if seq_lens.shape != (B,) or seq_lens.dtype.is_floating_point:
            raise ValueError(
                f"seq_lens must be an integer tensor of shape ({B},), got {tuple(seq_lens.shape)} {seq_lens.dtype}"
            )
        if req_pool_indices is not None:
            if req_pool_indices.shape != (B,) or req_pool_indices.dtype.is_floating_point:
                raise ValueError(
                    f"req_pool_indices must be an integer tensor of shape ({B},), got "
                    f"{tuple(req_pool_indices.shape)} {req_pool_indices.dtype}"
                )
        elif req_to_token.shape[0] < B:
            raise ValueError(
                f"req_to_token has {req_to_token.shape[0]} rows for a batch of {B}; pass "
                "req_pool_indices to map requests to rows"
            )
        if lse is not None and (lse.shape != (B, Hq) or not lse.dtype.is_floating_point):
            raise ValueError(f"lse must be a float tensor of shape ({B}, {Hq}), got {tuple(lse.shape)} {lse.dtype}")
        if head_reduce not in HEAD_REDUCE:
            raise ValueError(f"head_reduce must be one of {', '.join(HEAD_REDUCE)}, got {head_reduce!r}")
        if num_pages is None:
            num_pages = cdiv(req_to_token.shape[1], page_size)
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 0:
            raise ValueError(f"num_pages must be a non-negative int, got {num_pages!r}")
        if out is not None:
            if out.shape != (B, num_pages) or out.dtype != torch.float32 or out.device != q.device:
                raise ValueError(
                    f"out must be float32 ({B}, {num_pages}) on {q.device}, got {out.dtype} "
                    f"{tuple(out.shape)} on {out.device}"
                )
        elif accumulate:
            raise ValueError("accumulate=True needs out= to accumulate into")
        self.B, self.Hq, self.Hkv, self.D, self.G = B, Hq, Hkv, D, Hq // Hkv
        self.q, self.k_buffer, self.req_to_token, self.seq_lens = q, k_buffer, req_to_token, seq_lens
        self.page_size, self.lse, self.rpi, self.num_pages = page_size, lse, req_pool_indices, num_pages
        self.scale = float(1.0 / math.sqrt(D) if scale is None else scale)
        self.k_scale = None if k_scale is None else float(k_scale)
        self.logit_cap = float(logit_cap or 0.0)
        self.head_weight = 1.0 if head_reduce == "sum" else 1.0 / Hq
        self.out, self.accumulate = out, accumulate

    def output(self) -> torch.Tensor:
        if self.out is None:
            return torch.zeros(self.B, self.num_pages, dtype=torch.float32, device=self.q.device)
        if not self.accumulate:
            self.out.zero_()
        return self.out


def _on(device, *tensors):
    """Index tensors on the kernel's device (SGLang also keeps CPU copies of seq_lens; a copy is one small H2D)."""
    return tuple(t if t is None or t.device == device else t.to(device, non_blocking=True) for t in tensors)


def _logits(a: _Args, b: int, row: int, L: int) -> torch.Tensor:
    """Scaled (and capped) float32 logits ``[q_heads, L]`` of request ``b`` over its first L tokens."""
    slots = a.req_to_token[row, :L].to(torch.int64)
    k = a.k_buffer[slots].to(torch.float32)  # [L, Hkv, D]
    if a.k_scale is not None:
        k = k * a.k_scale
    qb = a.q[b].to(torch.float32).view(a.Hkv, a.G, a.D)
    s = torch.einsum("kgd,lkd->kgl", qb, k).reshape(a.Hq, L) * a.scale
    if a.logit_cap > 0:
        s = a.logit_cap * torch.tanh(s / a.logit_cap)
    return s


def page_attention_mass_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    req_pool_indices: torch.Tensor | None = None,
    num_pages: int | None = None,
    k_scale: float | None = None,
    logit_cap: float = 0.0,
    head_reduce: str = "sum",
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """Torch reference of ``page_attention_mass`` (float32, one request at a time over its valid length)."""
    a = _Args(
        q,
        k_buffer,
        req_to_token,
        seq_lens,
        page_size,
        scale,
        lse,
        req_pool_indices,
        num_pages,
        k_scale,
        logit_cap,
        head_reduce,
        out,
        accumulate,
    )
    lens = a.seq_lens.tolist()
    rows = a.rpi.tolist() if a.rpi is not None else list(range(a.B))
    max_len = a.req_to_token.shape[1]
    for b, (L, _row) in enumerate(zip(lens, rows)):
        if L < 0 or L > max_len or cdiv(L, a.page_size) > a.num_pages:
            raise ValueError(
                f"seq_lens[{b}] = {L} does not fit req_to_token's {max_len} columns and "
                f"{a.num_pages} output pages of {a.page_size}"
            )
    res = a.output()
    for b, (L, row) in enumerate(zip(lens, rows)):
        if L == 0:
            continue
        s = _logits(a, b, row, L)
        norm = a.lse[b].to(torch.float32) if a.lse is not None else torch.logsumexp(s, dim=1)
        tok = torch.exp(s - norm[:, None]).sum(0)  # [L]: summed over heads
        n = cdiv(L, a.page_size)
        padded = torch.zeros(n * a.page_size, dtype=torch.float32, device=tok.device)
        padded[:L] = tok
        res[b, :n] += padded.view(n, a.page_size).sum(1) * a.head_weight
    return res


def attention_lse_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    req_pool_indices: torch.Tensor | None = None,
    k_scale: float | None = None,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Natural-log LSE ``[batch, q_heads]`` float32 of the decode logits (what a backend's ``lse`` should equal);
    ``-inf`` for empty requests."""
    a = _Args(
        q,
        k_buffer,
        req_to_token,
        seq_lens,
        1,
        scale,
        None,
        req_pool_indices,
        None,
        k_scale,
        logit_cap,
        "sum",
        None,
        False,
    )
    res = torch.full((a.B, a.Hq), -math.inf, dtype=torch.float32, device=q.device)
    rows = a.rpi.tolist() if a.rpi is not None else list(range(a.B))
    for b, (L, row) in enumerate(zip(a.seq_lens.tolist(), rows)):
        if L > 0:
            res[b] = torch.logsumexp(_logits(a, b, row, L), dim=1)
    return res


def page_attention_mass(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    req_pool_indices: torch.Tensor | None = None,
    num_pages: int | None = None,
    k_scale: float | None = None,
    logit_cap: float = 0.0,
    head_reduce: str = "sum",
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    num_splits: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-page softmax mass ``[batch, num_pages]`` float32 (see the module docstring). ``num_splits``: how many
    programs share one request's tokens in the Triton kernels (default: enough to fill the GPU)."""
    if not use_triton(impl, q, k_buffer):
        return page_attention_mass_ref(
            q,
            k_buffer,
            req_to_token,
            seq_lens,
            page_size,
            scale=scale,
            lse=lse,
            req_pool_indices=req_pool_indices,
            num_pages=num_pages,
            k_scale=k_scale,
            logit_cap=logit_cap,
            head_reduce=head_reduce,
            out=out,
            accumulate=accumulate,
        )
    req_to_token, seq_lens, lse, req_pool_indices = _on(q.device, req_to_token, seq_lens, lse, req_pool_indices)
    a = _Args(
        q,
        k_buffer,
        req_to_token,
        seq_lens,
        page_size,
        scale,
        lse,
        req_pool_indices,
        num_pages,
        k_scale,
        logit_cap,
        head_reduce,
        out,
        accumulate,
    )
    from . import triton_attention_mass

    res = a.output()
    triton_attention_mass.attention_mass(a, res, num_splits)
    return res


def attention_lse(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    req_pool_indices: torch.Tensor | None = None,
    k_scale: float | None = None,
    logit_cap: float = 0.0,
    num_splits: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Natural-log LSE ``[batch, q_heads]`` float32 of the decode logits (Triton on CUDA tensors, else
    ``attention_lse_ref``): the normaliser ``page_attention_mass`` computes when it is given no ``lse``."""
    if not use_triton(impl, q, k_buffer):
        return attention_lse_ref(
            q,
            k_buffer,
            req_to_token,
            seq_lens,
            scale=scale,
            req_pool_indices=req_pool_indices,
            k_scale=k_scale,
            logit_cap=logit_cap,
        )
    req_to_token, seq_lens, req_pool_indices = _on(q.device, req_to_token, seq_lens, req_pool_indices)
    a = _Args(
        q,
        k_buffer,
        req_to_token,
        seq_lens,
        1,
        scale,
        None,
        req_pool_indices,
        None,
        k_scale,
        logit_cap,
        "sum",
        None,
        False,
    )
    from . import triton_attention_mass

    return triton_attention_mass.attention_lse(a, num_splits)
