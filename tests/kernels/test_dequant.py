"""Dequantise-on-load references: bit-exact against kvdrive's own codec (``tier.codecs``) on synthetic KV pages,
and against a plain per-element loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvdrive_sglang.kernels import dequant_body, dequant_rows_ref, split_lossy_body
from kvdrive_sglang.tier.codecs import _E4M3_LUT, HEADER, decode_page, encode_page
from kvdrive_sglang.tier.dtypes import from_float32
from kvdrive_sglang.tier.synthetic import kv_page

TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CODECS = ("int8", "fp8")


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A numpy page (bf16 as uint16 bits) as a torch tensor of that dtype, same bytes."""
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def body_of(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob[HEADER.size :]), dtype=torch.uint8)


def codec_decode(blob: bytes, like: np.ndarray, dtype: str) -> bytes:
    out = np.empty_like(like)
    decode_page(blob, out, dtype)
    return out.tobytes()


@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("page_size,heads,head_dim", [(64, 8, 128), (16, 2, 64), (1, 3, 24), (5, 1, 576)])
def test_dequant_body_is_bit_exact_with_decode_page(dtype, codec, page_size, heads, head_dim):
    rng = np.random.default_rng([page_size, heads, head_dim])
    page = kv_page(rng, page_size=page_size, num_heads=heads, head_dim=head_dim, dtype=dtype)
    blob = encode_page(page, dtype, codec, head_dim)
    got = dequant_body(body_of(blob), codec, head_dim, TORCH[dtype])
    assert got.shape == (page.size,) and got.dtype == TORCH[dtype]
    assert got.view(torch.uint8).numpy().tobytes() == codec_decode(blob, page, dtype)


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_of_bodies_decodes_like_each_page(codec):
    rng = np.random.default_rng(5)
    pages = [kv_page(rng, page_size=16, num_heads=2, head_dim=64) for _ in range(4)]
    blobs = [encode_page(p, "bfloat16", codec, 64) for p in pages]
    bodies = torch.stack([body_of(b) for b in blobs])
    got = dequant_body(bodies, codec, 64, torch.bfloat16)
    assert got.shape == (4, pages[0].size)
    for i, (blob, page) in enumerate(zip(blobs, pages)):
        assert got[i].view(torch.uint8).numpy().tobytes() == codec_decode(blob, page, "bfloat16")
    # into a caller's buffer, from bodies at an odd byte offset (scales unaligned)
    raw = torch.zeros(bodies.numel() + 1, dtype=torch.uint8)
    raw[1:] = bodies.reshape(-1)
    out = torch.empty_like(got)
    assert dequant_body(raw[1:].view(4, -1), codec, 64, torch.bfloat16, out=out) is out
    assert torch.equal(out.view(torch.int16), got.view(torch.int16))


@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("codec", CODECS)
def test_extreme_rows_decode_as_the_codec_does(dtype, codec):
    """All-zero rows (scale 0), a subnormal absmax (the codec's float64 path) and the format's extremes."""
    rng = np.random.default_rng(11)
    page = kv_page(rng, page_size=16, num_heads=4, head_dim=64, dtype=dtype)
    x = to_torch(page, dtype).reshape(-1, 64).clone()
    x[0] = 0
    x[1] = x[1] * 1e-38 if dtype == "float32" else x[1]
    x[2, :3] = torch.tensor([65504.0, -3.0e38 if dtype != "float16" else -65504.0, 1.0]).to(x.dtype)
    blob = encode_page(x.view(torch.uint8).numpy(), dtype, codec, 64)
    got = dequant_body(body_of(blob), codec, 64, TORCH[dtype])
    assert got.view(torch.uint8).numpy().tobytes() == codec_decode(blob, x.view(torch.uint8).numpy(), dtype)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", list(TORCH))
def test_rows_match_a_per_element_loop(codec, dtype):
    g = torch.Generator().manual_seed(3)
    rows, row_len = 7, 13
    codes = torch.randint(0, 256, (rows, row_len), generator=g, dtype=torch.int64).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x11  # no NaN codes
    scales = torch.rand(rows, generator=g) * 0.1
    got = dequant_rows_ref(codes, scales, codec, TORCH[dtype])
    vals = np.empty((rows, row_len), np.float32)
    for r in range(rows):
        for j in range(row_len):
            c = int(codes[r, j])
            v = np.float32(c - 256 if c > 127 else c) if codec == "int8" else _E4M3_LUT[c]
            vals[r, j] = np.float32(v) * np.float32(scales[r].item())
    expect = np.empty(rows * row_len * torch.empty(0, dtype=TORCH[dtype]).element_size(), np.uint8)
    from_float32(vals, dtype, expect)
    assert got.view(torch.uint8).numpy().reshape(-1).tobytes() == expect.tobytes()


def test_every_fp8_code_decodes_to_the_codec_table():
    codes = torch.arange(256, dtype=torch.uint8)
    got = dequant_rows_ref(codes[None], torch.ones(1), "fp8", torch.float32)[0].numpy()
    nan = np.isnan(_E4M3_LUT)
    assert np.array_equal(np.isnan(got), nan) and nan.sum() == 2
    assert got[~nan].tobytes() == _E4M3_LUT[~nan].tobytes()  # signed zeros included
    got8 = dequant_rows_ref(codes[None].view(torch.int8), torch.full((1,), 2.0), "int8", torch.float32)[0]
    assert torch.equal(got8, codes.view(torch.int8).float() * 2)


def test_split_and_bad_inputs():
    body = torch.zeros(3 * (4 + 8), dtype=torch.uint8)
    body[:12].view(torch.float32)[:] = torch.tensor([1.0, 2.0, 3.0])
    scales, codes = split_lossy_body(body, 8)
    assert scales.tolist() == [1.0, 2.0, 3.0] and codes.shape == (3, 8)
    odd = torch.zeros(body.numel() + 1, dtype=torch.uint8)
    odd[1:] = body
    assert split_lossy_body(odd[1:], 8)[0].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="whole rows"):
        dequant_body(body[:-1], "int8", 8)
    with pytest.raises(ValueError, match="format"):
        dequant_body(body, "int4", 8)
    with pytest.raises(ValueError, match="out_dtype"):
        dequant_body(body, "fp8", 8, torch.int32)
    with pytest.raises(ValueError, match="one per row"):
        dequant_rows_ref(codes, scales[:2], "int8")
    with pytest.raises(TypeError, match="codes"):
        dequant_rows_ref(codes.float(), scales, "int8")
    assert dequant_body(body, "fp8_e4m3", 8, torch.float16).shape == (24,)
