"""Per-page attention mass reference against a float64 loop over requests, heads and tokens, on CPU."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvdrive_sglang.kernels import attention_lse, attention_lse_ref, page_attention_mass, page_attention_mass_ref


def naive(q, kb, r2t, seq_lens, page_size, num_pages, *, scale=None, rpi=None, cap=0.0, lse=None, k_scale=1.0):
    """float64, one token at a time: (mass [B, num_pages] summed over heads, lse [B, Hq])."""
    q, kb = q.double().numpy(), kb.double().numpy() * k_scale
    B, Hq, D = q.shape
    G = Hq // kb.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    mass = np.zeros((B, num_pages))
    lses = np.full((B, Hq), -np.inf)
    for b in range(B):
        row = b if rpi is None else int(rpi[b])
        L = int(seq_lens[b])
        for h in range(Hq):
            s = []
            for t in range(L):
                x = float(np.dot(q[b, h], kb[int(r2t[row, t]), h // G])) * scale
                s.append(cap * math.tanh(x / cap) if cap else x)
            if not s:
                continue
            m = max(s)
            lses[b, h] = m + math.log(sum(math.exp(x - m) for x in s))
            norm = lses[b, h] if lse is None else float(lse[b, h])
            for t, x in enumerate(s):
                mass[b, t // page_size] += math.exp(x - norm)
    return mass, lses


def make(B, Hq, Hkv, D, slots, width, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    kb = (torch.randn(slots, Hkv, D, generator=g) * 1.5).to(dtype)
    r2t = torch.randint(0, slots, (B + 2, width), generator=g, dtype=torch.int32)
    return q, kb, r2t


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (7, 1), (6, 3)])
@pytest.mark.parametrize("page_size", [1, 16, 64, 5])
def test_mass_matches_float64_loop(Hq, Hkv, page_size):
    D, width = 24, 130
    q, kb, r2t = make(4, Hq, Hkv, D, 500, width, Hq * 100 + page_size)
    seq_lens = torch.tensor([130, 0, 1, 64])
    rpi = torch.tensor([5, 0, 2, 3])
    num_pages = -(-width // page_size)
    got = page_attention_mass(q, kb, r2t, seq_lens, page_size, req_pool_indices=rpi)
    expect, lse = naive(q, kb, r2t, seq_lens, page_size, num_pages, rpi=rpi)
    assert got.shape == (4, num_pages) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), [Hq, 0, Hq, Hq], rtol=1e-5)  # each head's softmax sums to 1
    lse_ref = attention_lse_ref(q, kb, r2t, seq_lens, req_pool_indices=rpi)
    np.testing.assert_allclose(lse_ref.numpy(), lse, rtol=1e-5)
    assert torch.equal(attention_lse(q, kb, r2t, seq_lens, req_pool_indices=rpi), lse_ref)
    # the backend-LSE path: same result as recomputing (bit-equal when it is the same LSE)
    assert torch.equal(page_attention_mass(q, kb, r2t, seq_lens, page_size, req_pool_indices=rpi, lse=lse_ref), got)
    lse64 = torch.from_numpy(lse).float()
    np.testing.assert_allclose(
        page_attention_mass(q, kb, r2t, seq_lens, page_size, req_pool_indices=rpi, lse=lse64).numpy(),
        expect,
        rtol=1e-4,
        atol=1e-6,
    )


def test_given_lse_is_used_not_recomputed():
    q, kb, r2t = make(2, 4, 2, 16, 100, 40, 1)
    seq_lens = torch.tensor([40, 17])
    lse = attention_lse_ref(q, kb, r2t, seq_lens)
    base = page_attention_mass(q, kb, r2t, seq_lens, 8)
    shifted = page_attention_mass(q, kb, r2t, seq_lens, 8, lse=lse + math.log(2))  # a normaliser twice as large
    torch.testing.assert_close(shifted, base / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_cap_scale_and_k_scale(dtype):
    q, kb, r2t = make(3, 8, 2, 40, 300, 90, 7, dtype)
    seq_lens = torch.tensor([90, 33, 2])
    expect, _ = naive(q.float(), kb.float(), r2t, seq_lens, 16, 6, scale=0.3, cap=5.0, k_scale=0.5)
    got = page_attention_mass(q, kb, r2t, seq_lens, 16, scale=0.3, logit_cap=5.0, k_scale=0.5)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4, atol=1e-6)


def test_fp8_k_buffer():
    q, kb, r2t = make(2, 4, 2, 32, 200, 50, 8)
    k8 = (kb / 2).to(torch.float8_e4m3fn)
    seq_lens = torch.tensor([50, 31])
    got = page_attention_mass(q, k8, r2t, seq_lens, 16, k_scale=2.0)
    expect, _ = naive(q, k8.float(), r2t, seq_lens, 16, 4, k_scale=2.0)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4, atol=1e-6)


def test_mean_accumulate_and_num_pages():
    q, kb, r2t = make(2, 6, 2, 16, 100, 64, 9)
    seq_lens = torch.tensor([64, 20])
    total = page_attention_mass(q, kb, r2t, seq_lens, 16)
    mean = page_attention_mass(q, kb, r2t, seq_lens, 16, head_reduce="mean")
    torch.testing.assert_close(mean, total / 6)
    torch.testing.assert_close(mean.sum(1), torch.ones(2))
    out = torch.full((2, 4), 1.0)
    res = page_attention_mass(q, kb, r2t, seq_lens, 16, out=out, accumulate=True)
    assert res is out
    torch.testing.assert_close(out, total + 1)
    page_attention_mass(q, kb, r2t, seq_lens, 16, out=out)  # without accumulate: overwritten
    torch.testing.assert_close(out, total)
    wide = page_attention_mass(q, kb, r2t, seq_lens, 16, num_pages=10)
    assert wide.shape == (2, 10) and torch.equal(wide[:, :4], total) and not wide[:, 4:].any()
    assert not total[1, 2:].any()  # pages past the request's 20 tokens


def test_attention_lands_on_the_page_the_query_matches():
    D, page_size = 32, 16
    kb = torch.randn(128, 1, D) * 0.1
    key = torch.randn(D)
    kb[70:74, 0] = key * 3  # slots 70..73 hold a key the query matches strongly
    r2t = torch.arange(128, dtype=torch.int32)[None]
    q = key[None, None, :].repeat(1, 2, 1) * 3
    mass = page_attention_mass(q, kb, r2t, torch.tensor([128]), page_size, head_reduce="mean")
    assert mass[0].argmax().item() == 70 // page_size and mass[0, 70 // page_size] > 0.9


def test_bad_inputs_are_refused():
    q, kb, r2t = make(2, 6, 2, 16, 100, 40, 1)
    ok = torch.tensor([40, 10])
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        page_attention_mass(q, kb[:, :1].repeat(1, 4, 1), r2t, ok, 8)
    with pytest.raises(ValueError, match="does not fit"):
        page_attention_mass(q, kb, r2t, torch.tensor([41, 1]), 8)
    with pytest.raises(ValueError, match="does not fit"):
        page_attention_mass(q, kb, r2t, ok, 8, num_pages=4)
    with pytest.raises(ValueError, match="accumulate"):
        page_attention_mass(q, kb, r2t, ok, 8, accumulate=True)
    with pytest.raises(ValueError, match="lse must be"):
        page_attention_mass(q, kb, r2t, ok, 8, lse=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="head_dim"):
        page_attention_mass(q[..., :8], kb, r2t, ok, 8)
    with pytest.raises(ValueError, match="head_reduce"):
        page_attention_mass(q, kb, r2t, ok, 8, head_reduce="max")
    with pytest.raises(ValueError, match="req_pool_indices"):
        page_attention_mass(q, kb, r2t[:1], ok, 8)
    with pytest.raises(ValueError, match="out must be"):
        page_attention_mass(q, kb, r2t, ok, 8, out=torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(page_attention_mass(q, kb, r2t, ok, 8, impl="torch"), page_attention_mass_ref(q, kb, r2t, ok, 8))


def test_k_scale_and_logit_cap_match_the_float64_loop_in_the_reference():
    """The capture passes a layer's ``k_scale_float`` (fp8 KV stores K / k_scale) and ``logit_cap``: both change the
    mass, and the reference follows the float64 loop for each, alone and together."""
    q, kb, r2t = make(3, 8, 2, 32, 300, 70, 11)
    seq_lens = torch.tensor([70, 41, 3])
    plain = page_attention_mass(q, kb, r2t, seq_lens, 16)
    for k_scale, cap in ((0.25, 0.0), (1.0, 2.0), (3.0, 4.0)):
        got = page_attention_mass(q, kb, r2t, seq_lens, 16, k_scale=k_scale, logit_cap=cap)
        expect, _ = naive(q, kb, r2t, seq_lens, 16, 5, k_scale=k_scale, cap=cap)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got, plain, atol=1e-3)


def test_mla_geometry_one_latent_head_of_576():
    """DeepSeek MLA: 16 (or 128) query heads over one 576-wide latent KV head (512 + 64 rope)."""
    q, kb, r2t = make(2, 16, 1, 576, 200, 40, 12)
    kb = kb * 0.05
    seq_lens = torch.tensor([40, 17])
    got = page_attention_mass(q, kb, r2t, seq_lens, 16, scale=576**-0.5)
    expect, _ = naive(q, kb, r2t, seq_lens, 16, 3, scale=576**-0.5)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), [16, 16], rtol=1e-5)


_TRITON_CHECK = """
import torch
from tests.kernels.interpret_check import _patch_interpreter_index
_patch_interpreter_index()
from kvdrive_sglang.kernels import page_attention_mass, page_attention_mass_ref
g = torch.Generator().manual_seed(13)
cases = [  # (q heads, kv heads, head dim, page size, k_scale, logit_cap, fp8 K)
    (8, 2, 32, 16, 0.5, 0.0, False), (8, 2, 32, 4, None, 3.0, False), (4, 4, 16, 1, 2.0, 5.0, False),
    (16, 1, 576, 16, None, 0.0, False), (16, 1, 576, 64, 1.5, 0.0, False), (4, 2, 32, 16, 2.0, 4.0, True)]
for hq, hkv, d, page, k_scale, cap, fp8 in cases:
    q = torch.randn(3, hq, d, generator=g)
    kb = torch.randn(120, hkv, d, generator=g) * (0.05 if d > 256 else 1.0)
    if fp8:
        kb = kb.to(torch.float8_e4m3fn)
    r2t = torch.randint(0, 120, (4, 48), generator=g, dtype=torch.int32)
    lens, rpi = torch.tensor([48, 1, 29]), torch.tensor([3, 0, 1])
    kw = dict(req_pool_indices=rpi, k_scale=k_scale, logit_cap=cap, scale=d ** -0.5)
    ref = page_attention_mass_ref(q, kb, r2t, lens, page, **kw)
    got = page_attention_mass(q, kb, r2t, lens, page, impl="triton", num_splits=2, **kw)
    err = (got - ref).abs().max().item()
    assert err < 2e-3 * hq, (hq, hkv, d, page, k_scale, cap, fp8, err)
    print("ok", hq, hkv, d, page, k_scale, cap, fp8)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_agrees_on_k_scale_logit_cap_and_mla_under_the_interpreter():
    """The Triton kernels against the reference with k_scale (fp8 and float K), logit_cap and MLA's launch shape (one
    KV head, 576 dims: the 16-token tiles), run by Triton's interpreter on CPU (a subprocess: TRITON_INTERPRET must be
    set before Triton is imported)."""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK],
        cwd=root,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("ok ") == 6
