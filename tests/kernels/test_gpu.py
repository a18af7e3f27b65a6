"""Triton kernels vs torch references on a CUDA GPU: copies and dequantisation bit-exact (dequantisation also
against ``tier.codecs.decode_page``), attention mass within tolerance, bf16 included."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvdrive_sglang.kernels import (  # noqa: E402
    dequant_body,
    load_compressed,
    page_attention_mass,
    page_attention_mass_ref,
    scatter_pages_layers,
)
from kvdrive_sglang.tier.codecs import HEADER, decode_page, encode_page  # noqa: E402
from kvdrive_sglang.tier.synthetic import kv_page  # noqa: E402

from . import agreement, agreement_bplane  # noqa: E402
from .bplane_codec import bplane_registered  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: Triton kernels vs torch references"),
]


def test_page_copy_agrees():
    assert agreement.check_page_copy("cuda") > 0


def test_dequant_agrees():
    assert agreement.check_dequant("cuda") > 0


def test_attention_mass_agrees():
    assert agreement.check_attention_mass("cuda") > 0


def test_bplane_decode_agrees():
    assert agreement_bplane.check_bplane("cuda") > 0


def test_compressed_load_agrees():
    assert agreement_bplane.check_compressed_load("cuda") > 0


def test_auto_dispatch_runs_triton_on_cuda(monkeypatch):
    from kvdrive_sglang.kernels import triton_bplane, triton_dequant, triton_page_copy

    calls = []
    kernels = ((triton_page_copy, "scatter_pages"), (triton_bplane, "bplane_decode"), (triton_dequant, "dequant_body"))
    for mod, name in kernels:
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    k, v = (torch.zeros(64, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ones = torch.ones(1, 32, 8, 128, device="cuda", dtype=torch.bfloat16)
    scatter_pages_layers([k], torch.tensor([1, 3], device="cuda"), 16, ones)
    assert calls == ["scatter_pages"]
    rng = np.random.default_rng(2)
    pages = [kv_page(rng, page_size=16, num_heads=8, head_dim=128) for _ in range(2)]  # [K/V, 16, 8, 128]
    with bplane_registered():
        blobs = [encode_page(pages[0], "bfloat16", "bplane", 128), encode_page(pages[1], "bfloat16", "int8", 128)]
        res = load_compressed(blobs, [k, v], [0, 2], 16, checksums=None)
    assert all(res.ok) and set(calls) == {"scatter_pages", "bplane_decode", "dequant_body"}, calls


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32")]
)
@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_dequant_on_gpu_is_bit_exact_with_decode_page(dtype, torch_dtype, codec):
    rng = np.random.default_rng(1)
    pages = [kv_page(rng, page_size=64, num_heads=8, head_dim=128, dtype=dtype) for _ in range(3)]
    blobs = [encode_page(p, dtype, codec, 128) for p in pages]
    bodies = torch.stack([torch.frombuffer(bytearray(b[HEADER.size :]), dtype=torch.uint8) for b in blobs]).cuda()
    got = dequant_body(bodies, codec, 128, getattr(torch, torch_dtype)).cpu()
    for i, (blob, page) in enumerate(zip(blobs, pages)):
        out = np.empty_like(page)
        decode_page(blob, out, dtype)
        assert got[i].view(torch.uint8).numpy().tobytes() == out.tobytes()


def test_attention_mass_fp8_k_and_large_batch():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, slots, width = 32, 32, 8, 128, 200_000, 4096
    q = torch.randn(B, Hq, D, generator=g).to(torch.bfloat16).cuda()
    kb = torch.randn(slots, Hkv, D, generator=g).cuda()
    k8 = (kb / 2).to(torch.float8_e4m3fn)
    r2t = torch.randint(0, slots, (B, width), generator=g, dtype=torch.int32).cuda()
    seq_lens = torch.randint(1, width + 1, (B,), generator=g).cuda()
    got = page_attention_mass(q, k8, r2t, seq_lens, 64, k_scale=2.0)
    ref = page_attention_mass_ref(q, k8, r2t, seq_lens, 64, k_scale=2.0)
    assert (got - ref).abs().max().item() < 2e-3 * Hq
    torch.testing.assert_close(got.sum(1), torch.full((B,), float(Hq), device="cuda"), rtol=1e-3, atol=1e-3)
