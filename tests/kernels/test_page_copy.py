"""Page gather / scatter references against plain loops, on CPU (the dispatchers run the references here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvdrive_sglang.kernels import (
    gather_pages,
    gather_pages_layers,
    gather_pages_ref,
    page_slots,
    scatter_pages,
    scatter_pages_layers,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int32, torch.float8_e4m3fn)
SHAPES = ((1, ()), (16, (2, 64)), (64, (3, 5)), (5, (1, 7)), (3, (4, 24)))


def rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 8).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


def as_np(t: torch.Tensor) -> np.ndarray:
    """Bits as numpy (numpy has no bf16 / fp8)."""
    size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(size).numpy() if t.dtype.is_floating_point else t.numpy()


def naive_gather(src: np.ndarray, ids, page_size):
    out = np.empty((len(ids) * page_size,) + src.shape[1:], src.dtype)
    for i, p in enumerate(ids):
        for j in range(page_size):
            out[i * page_size + j] = src[p * page_size + j]
    return out


def naive_scatter(dst: np.ndarray, ids, page_size, data: np.ndarray):
    dst = dst.copy()
    for i, p in enumerate(ids):
        for j in range(page_size):
            dst[p * page_size + j] = data[i * page_size + j]
    return dst


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size,inner", SHAPES)
def test_gather_and_scatter_match_loops(dtype, page_size, inner):
    num_pages = 11
    src = rand((num_pages * page_size + 2,) + inner, dtype, page_size)  # + 2: a partial page at the end
    ids = [9, 0, 4, 10, 2, 3]
    out = gather_pages(src, torch.tensor(ids), page_size)
    assert out.dtype == dtype and out.shape == (len(ids) * page_size,) + inner
    np.testing.assert_array_equal(as_np(out), naive_gather(as_np(src), ids, page_size))
    data = rand(out.shape, dtype, 99)
    dst = rand(src.shape, dtype, 98)
    expect = naive_scatter(as_np(dst), ids, page_size, as_np(data))
    scatter_pages(dst, torch.tensor(ids, dtype=torch.int32), page_size, data)
    np.testing.assert_array_equal(as_np(dst), expect)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_layers_match_per_layer_loops(stacked, page_size):
    layers = [rand((6 * page_size, 2, 3), torch.bfloat16, 10 + i) for i in range(4)]
    arg = torch.stack(layers) if stacked else layers
    ids = [5, 1, 3]
    out = gather_pages_layers(arg, torch.tensor(ids), page_size)
    assert out.shape == (4, 3 * page_size, 2, 3)
    for l, t in enumerate(layers):
        np.testing.assert_array_equal(as_np(out[l]), naive_gather(as_np(t), ids, page_size))
    data = rand(out.shape, torch.bfloat16, 7)
    dst = [torch.zeros_like(t) for t in layers]
    dst_arg = torch.stack(dst) if stacked else dst
    scatter_pages_layers(dst_arg, torch.tensor(ids), page_size, data)
    for l, t in enumerate(dst):
        got = dst_arg[l] if stacked else t
        np.testing.assert_array_equal(
            as_np(got), naive_scatter(as_np(torch.zeros_like(t)), ids, page_size, as_np(data[l]))
        )


def test_round_trip_touches_only_the_named_pages():
    src = rand((64, 2, 8), torch.float16, 1)
    dst = rand((64, 2, 8), torch.float16, 2)
    before = dst.clone()
    ids = torch.tensor([2, 5])
    scatter_pages(dst, ids, 8, gather_pages(src, ids, 8))
    slots = page_slots(ids, 8)
    assert torch.equal(dst[slots], src[slots])
    rest = torch.ones(64, dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(dst[rest], before[rest])


def test_out_strided_sources_and_empty():
    kv = rand((40, 2, 4, 8), torch.bfloat16, 3)  # a fused [slots, K/V, heads, dim] buffer: the K half is strided
    k = kv[:, 0]
    out = torch.empty(16, 4, 8, dtype=torch.bfloat16)
    res = gather_pages(k, [4, 0], 8, out=out)
    assert res is out
    np.testing.assert_array_equal(as_np(out), naive_gather(as_np(k.contiguous()), [4, 0], 8))
    assert gather_pages(k, torch.tensor([], dtype=torch.int64), 8).shape == (0, 4, 8)
    assert torch.equal(page_slots(torch.tensor([3, 1]), 2), torch.tensor([6, 7, 2, 3]))


def test_bad_inputs_are_refused():
    src = torch.zeros(32, 2, 4)
    with pytest.raises(IndexError, match="page id 4"):
        gather_pages(src, [1, 4], 8)  # 32 slots = pages 0..3
    with pytest.raises(IndexError, match="page id -1"):
        gather_pages(src, [-1], 8)
    with pytest.raises(ValueError, match="1-D"):
        gather_pages(src, torch.zeros(2, 2, dtype=torch.int64), 8)
    with pytest.raises(TypeError, match="integer"):
        gather_pages(src, torch.tensor([1.0]), 8)
    with pytest.raises(ValueError, match="page_size"):
        gather_pages(src, [0], 0)
    with pytest.raises(ValueError, match="out must be"):
        gather_pages(src, [0], 8, out=torch.empty(8, 2, 5))
    with pytest.raises(ValueError, match="data must be"):
        scatter_pages(src, [0, 1], 8, torch.zeros(8, 2, 4))
    with pytest.raises(ValueError, match="all layers must agree"):
        gather_pages_layers([src, torch.zeros(32, 2, 5)], [0], 8)
    with pytest.raises(ValueError, match="impl"):
        gather_pages(src, [0], 8, impl="cuda")
    assert torch.equal(gather_pages(src, [0], 8, impl="torch"), gather_pages_ref(src, [0], 8))
