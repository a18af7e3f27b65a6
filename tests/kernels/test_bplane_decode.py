"""The torch reference of the bplane decode (kernels/bplane_decode.py) against the numpy codec (tier/bplane.py), on
CPU: bit for bit, for bodies at any offset, in page-major and layer-major output, and placed among other pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvdrive_sglang.kernels.bplane_decode import bplane_decode, bplane_decode_ref
from kvdrive_sglang.tier import bplane
from kvdrive_sglang.tier.synthetic import kv_page


def pages_and_buffer(shapes, dtype="bfloat16", seed=0, gap=3):
    """Pages of one size, their bodies packed at odd offsets into one uint8 tensor (with junk between them)."""
    rng = np.random.default_rng(seed)
    pages = []
    for kind in shapes:
        if kind == "kv":
            p = kv_page(rng, page_size=8, num_heads=2, head_dim=130, dtype=dtype).reshape(-1).view(np.uint8)
        elif kind == "random":
            p = rng.integers(0, 1 << 16, 8 * 2 * 130 * 2).astype(np.uint16).view(np.uint8)
        else:  # constant
            p = np.full(8 * 2 * 130 * 2, 0x3F80, np.uint16).view(np.uint8)
        pages.append(p)
    buf, offsets = bytearray(b"\x5a"), []
    for p in pages:
        offsets.append(len(buf))
        buf += bplane.encode_body(p, dtype) + bytes(range(gap))
    return np.stack(pages).view(np.int16), torch.frombuffer(buf, dtype=torch.uint8), torch.tensor(offsets)


SHAPES = ("kv", "random", "kv", "constant", "kv")  # 4160 values a page: two full blocks and a partial one


def test_reference_is_bit_exact_with_the_numpy_codec_page_major():
    want, buf, offsets = pages_and_buffer(SHAPES)
    n = want.shape[1]
    out = bplane_decode_ref(buf, offsets, n)
    assert out.dtype == torch.int16 and np.array_equal(out.view(len(SHAPES), n).numpy(), want)
    assert torch.equal(bplane_decode(buf, offsets, n), out)  # the dispatcher runs the reference on CPU


@pytest.mark.parametrize("layers", [1, 2, 4, 13])
def test_layer_major_output_is_the_transpose(layers):
    """seg = one layer's values: out is [layers, P, seg], what scatter_pages_layers takes as staging."""
    want, buf, offsets = pages_and_buffer(SHAPES, dtype="float16", seed=layers)
    P, n = want.shape
    seg = n // layers
    out = bplane_decode_ref(buf, offsets, n, seg=seg)
    assert np.array_equal(out.view(layers, P, seg).numpy(), want.reshape(P, layers, seg).transpose(1, 0, 2))


def test_pages_land_at_first_among_total():
    want, buf, offsets = pages_and_buffer(SHAPES[:2])
    n = want.shape[1]
    out = torch.full((5 * n,), 7, dtype=torch.int16)
    bplane_decode_ref(buf, offsets, n, out=out, seg=n // 2, first=2, total=5)
    got = out.view(2, 5, n // 2).numpy()
    assert np.array_equal(got[:, 2:4], want.reshape(2, 2, n // 2).transpose(1, 0, 2))
    assert (got[:, [0, 1, 4]] == 7).all()


def test_out_may_be_any_16_bit_dtype_and_empty_inputs_do_nothing():
    want, buf, offsets = pages_and_buffer(SHAPES[:1])
    n = want.shape[1]
    out = torch.empty(n, dtype=torch.bfloat16)
    bplane_decode_ref(buf, offsets, n, out=out)
    assert np.array_equal(out.view(torch.int16).numpy(), want[0])
    assert bplane_decode_ref(buf, torch.tensor([], dtype=torch.int64), n).numel() == 0
    assert bplane_decode_ref(buf, offsets[:1], 0).numel() == 0


def test_damaged_bytes_decode_to_something_inside_the_buffers():
    """The kernels do not validate (the host does, and checksums): garbage in buf must still only read buf and
    write out. Every byte of a body replaced by random bytes: the call returns, out keeps its size."""
    want, buf, offsets = pages_and_buffer(SHAPES[:1])
    n = want.shape[1]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        junk = torch.randint(0, 256, buf.shape, generator=g, dtype=torch.uint8)
        assert bplane_decode_ref(junk, offsets, n).numel() == n
    assert bplane_decode_ref(buf[:40], offsets, n).numel() == n  # a body cut short


def test_bad_arguments_are_refused():
    want, buf, offsets = pages_and_buffer(SHAPES[:1])
    n = want.shape[1]
    with pytest.raises(ValueError, match="1-D uint8"):
        bplane_decode(buf.view(torch.int8), offsets, n)
    with pytest.raises(ValueError, match="offsets"):
        bplane_decode(buf, offsets.float(), n)
    with pytest.raises(ValueError, match="seg"):
        bplane_decode(buf, offsets, n, seg=7)
    with pytest.raises(ValueError, match="do not fit"):
        bplane_decode(buf, offsets, n, first=1)
    with pytest.raises(ValueError, match="16-bit"):
        bplane_decode(buf, offsets, n, out=torch.empty(n, dtype=torch.float32))
    with pytest.raises(ValueError, match="impl"):
        bplane_decode(buf, offsets, n, impl="cuda")
