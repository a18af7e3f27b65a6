"""Triton kernel vs torch reference agreement checks, shared by the GPU tests (device "cuda") and the CPU run
of the same Triton kernels under Triton's interpreter (``interpret_check.py``, device "cpu").

Copies and dequantisation must agree bit for bit; attention mass within a float tolerance (atomic adds, tensor-core
dot products). Each check raises AssertionError naming the case that disagreed and returns the number of cases.
"""

from __future__ import annotations

import torch

from kvdrive_sglang.kernels import (
    attention_lse,
    attention_lse_ref,
    dequant_body,
    dequant_body_ref,
    page_attention_mass,
    page_attention_mass_ref,
    scatter_pages_layers,
    scatter_pages_layers_ref,
)

FP8 = torch.float8_e4m3fn


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(size), b.view(size))
    return torch.equal(a, b)


def _rand(shape, dtype, g, device):
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g) * 4
        return x.to(dtype).to(device)
    return torch.randint(0, 250, shape, generator=g, dtype=torch.int64).to(dtype).to(device)


def check_page_copy(device: str, small: bool = False) -> int:
    """``small``: fewer cases (the interpreter runs every program in Python)."""
    g = torch.Generator().manual_seed(1)
    n = 0
    dtypes = (
        (torch.bfloat16, torch.float32, FP8)
        if small
        else (torch.bfloat16, torch.float16, torch.float32, torch.uint8, FP8)
    )
    ids = torch.tensor([7, 0, 3, 8, 1], device=device)
    for dtype in dtypes:
        for page_size, inner in ((1, (3, 5)), (16, (2, 64)), (64, (1, 7)), (5, (4, 24))):
            shape = (9 * page_size + 1,) + inner
            case = f"{dtype} page_size {page_size} inner {inner}"
            data = _rand((3, 5 * page_size) + inner, torch.float32, g, device).to(dtype)
            layers = [_rand(shape, torch.float32, g, device).to(dtype) for _ in range(3)]
            stacked = torch.stack(layers)
            dl, ds, dr = [t.clone() for t in layers], stacked.clone(), stacked.clone()
            scatter_pages_layers(dl, ids, page_size, data, impl="triton")
            scatter_pages_layers(ds, ids, page_size, data, impl="triton")
            scatter_pages_layers_ref(dr, ids, page_size, data)
            assert same_bits(torch.stack(dl), dr), f"scatter layers list {case}"
            assert same_bits(ds, dr), f"scatter layers stacked {case}"
            n += 1
    # strided paged buffer (the K half of a fused KV buffer) and an unaligned staging buffer
    kv = _rand((33, 2, 4, 8), torch.float32, g, device).to(torch.bfloat16)
    ref = kv.clone()
    ids2 = torch.tensor([3, 1], device=device, dtype=torch.int32)
    big = _rand((1 + 16 * 4 * 8,), torch.float32, g, device).to(torch.bfloat16)
    data = big[1:].view(1, 16, 4, 8)
    scatter_pages_layers([kv[:, 0]], ids2, 8, data, impl="triton")
    scatter_pages_layers_ref([ref[:, 0]], ids2, 8, data)
    assert same_bits(kv, ref), "strided layer, unaligned data"
    return n + 1


def check_dequant(device: str, small: bool = False) -> int:
    """Lossy bodies made by kvdrive's codec (tier.codecs), dequantised by the Triton kernel: bit-exact with the torch
    reference and with the codec's own decode. ``small``: fewer cases (the interpreter runs every program in
    Python)."""
    import numpy as np

    from kvdrive_sglang.tier.codecs import HEADER, decode_page, encode_page

    g = torch.Generator().manual_seed(2)
    n = 0
    shapes = ((128, 37), (24, 5)) if small else ((128, 37), (64, 8), (24, 5), (576, 3))
    torch_of = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    for fmt in ("int8", "fp8"):
        for row_len, rows in shapes:
            x = torch.randn(rows, row_len, generator=g) * torch.rand(rows, 1, generator=g) * 30
            x[0] = 0  # an all-zero row: scale 0
            for dtype, out_dtype in torch_of.items():
                case = f"{fmt} row_len {row_len} {dtype}"
                page = x.to(out_dtype)
                blob = encode_page(page.view(torch.uint8).numpy(), dtype, fmt, row_len)
                body = torch.frombuffer(bytearray(blob[HEADER.size :]), dtype=torch.uint8).to(device)
                ref = dequant_body_ref(body, fmt, row_len, out_dtype)
                got = dequant_body(body, fmt, row_len, out_dtype, impl="triton")
                assert same_bits(got, ref), f"body {case}"
                want = np.empty(page.numel() * page.element_size(), np.uint8)
                decode_page(blob, want, dtype)
                assert got.view(torch.uint8).cpu().numpy().tobytes() == want.tobytes(), f"codec {case}"
                # three bodies in one 2-D tensor at an odd byte offset: scales read unaligned
                raw = torch.zeros(3 * body.numel() + 1, dtype=torch.uint8, device=device)
                bodies = raw[1:].view(3, -1)
                bodies.copy_(body.expand(3, -1))
                got = dequant_body(bodies, fmt, row_len, out_dtype, impl="triton")
                assert same_bits(got, dequant_body_ref(bodies, fmt, row_len, out_dtype)), f"bodies {case}"
                n += 1
        # every code, NaN codes included: a body of 8 rows of 32 codes, scale 1
        every = torch.cat([torch.ones(8).view(torch.uint8), torch.arange(256, dtype=torch.uint8)]).to(device)
        got = dequant_body(every, fmt, 32, torch.float32, impl="triton")
        ref = dequant_body_ref(every, fmt, 32, torch.float32)
        assert torch.equal(got.isnan(), ref.isnan()) and same_bits(got.nan_to_num(), ref.nan_to_num()), (
            f"every {fmt} code"
        )
        n += 1
    return n


def check_attention_mass(
    device: str, dtypes=(torch.bfloat16, torch.float16, torch.float32), tol: float = 2e-3, small: bool = False
) -> int:
    """``small``: fewer tokens (the interpreter runs every program in Python)."""
    g = torch.Generator().manual_seed(3)
    n = 0
    configs = (
        ((8, 2, 64), 16, 30.0),
        ((4, 4, 40), 1, 0.0),
        ((28, 4, 128), 64, 0.0),
        ((6, 1, 96), 3, 0.0),
        ((8, 8, 32), 256, 0.0),
        ((8, 2, 64), 16, 0.0),
        ((16, 1, 576), 64, 0.0),
        ((64, 1, 128), 32, 0.0),
    )
    for i, dtype in enumerate(dtypes):
        for (hq, hkv, d), page_size, cap in configs[i :: len(dtypes)][:2] if small else configs:
            B, slots, width = 4, 3000, (100 if small else 700)
            q = torch.randn(B, hq, d, generator=g).to(dtype).to(device)
            kb = (torch.randn(slots, hkv, d, generator=g) * 2).to(dtype).to(device)
            r2t = torch.randint(0, slots, (6, width), generator=g, dtype=torch.int32).to(device)
            seq_lens = torch.tensor([width, 0, 1, width // 2 - 17], device=device)
            rpi = torch.tensor([5, 0, 2, 3], device=device)
            case = f"{dtype} heads {hq}/{hkv} d {d} page_size {page_size} cap {cap}"
            kw = dict(req_pool_indices=rpi, logit_cap=cap)
            ref = page_attention_mass_ref(q, kb, r2t, seq_lens, page_size, **kw)
            for splits in (3,) if small else (None, 1, 5):
                got = page_attention_mass(q, kb, r2t, seq_lens, page_size, num_splits=splits, impl="triton", **kw)
                err = (got - ref).abs().max().item()
                assert err < tol * hq, f"mass {case} splits {splits}: max error {err}"
            lse_ref = attention_lse_ref(q, kb, r2t, seq_lens, **kw)
            lse = attention_lse(q, kb, r2t, seq_lens, impl="triton", **kw)
            fin = lse_ref.isfinite()
            assert torch.equal(lse.isfinite(), fin), f"lse finiteness {case}"
            assert (lse[fin] - lse_ref[fin]).abs().max().item() < tol * 10, f"lse {case}"
            got = page_attention_mass(q, kb, r2t, seq_lens, page_size, lse=lse_ref, impl="triton", **kw)
            assert (got - ref).abs().max().item() < tol * hq, f"mass with given lse {case}"
            acc = ref.clone()
            page_attention_mass(
                q, kb, r2t, seq_lens, page_size, out=acc, accumulate=True, head_reduce="mean", impl="triton", **kw
            )
            assert (acc - ref * (1 + 1 / hq)).abs().max().item() < tol * hq, f"accumulate mean {case}"
            n += 1
    return n
