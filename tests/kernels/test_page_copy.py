"""Page scatter reference against plain loops, on CPU (the dispatcher runs the reference here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvdrive_sglang.kernels import page_slots, scatter_pages_layers, scatter_pages_layers_ref

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


def naive_scatter(dst: np.ndarray, ids, page_size, data: np.ndarray):
    dst = dst.copy()
    for i, p in enumerate(ids):
        for j in range(page_size):
            dst[p * page_size + j] = data[i * page_size + j]
    return dst


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size,inner", SHAPES)
def test_scatter_matches_loops(dtype, page_size, inner):
    num_pages = 11
    ids = [9, 0, 4, 10, 2, 3]
    layers = [rand((num_pages * page_size + 2,) + inner, dtype, page_size + i) for i in range(2)]  # + 2: partial page
    data = rand((2, len(ids) * page_size) + inner, dtype, 99)
    expect = [naive_scatter(as_np(t), ids, page_size, as_np(data[i])) for i, t in enumerate(layers)]
    scatter_pages_layers(layers, torch.tensor(ids, dtype=torch.int32), page_size, data)
    for t, e in zip(layers, expect):
        np.testing.assert_array_equal(as_np(t), e)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_layers_match_per_layer_loops(stacked, page_size):
    layers = [rand((6 * page_size, 2, 3), torch.bfloat16, 10 + i) for i in range(4)]
    ids = [5, 1, 3]
    data = rand((4, 3 * page_size, 2, 3), torch.bfloat16, 7)
    dst = [torch.zeros_like(t) for t in layers]
    dst_arg = torch.stack(dst) if stacked else dst
    scatter_pages_layers(dst_arg, torch.tensor(ids), page_size, data)
    for l, t in enumerate(dst):
        got = dst_arg[l] if stacked else t
        np.testing.assert_array_equal(
            as_np(got), naive_scatter(as_np(torch.zeros_like(t)), ids, page_size, as_np(data[l]))
        )


def test_only_the_named_pages_change():
    dst = rand((64, 2, 8), torch.float16, 2)
    before = dst.clone()
    ids = torch.tensor([2, 5])
    data = rand((1, 16, 2, 8), torch.float16, 1)
    scatter_pages_layers([dst], ids, 8, data)
    slots = page_slots(ids, 8)
    assert torch.equal(dst[slots], data[0])
    rest = torch.ones(64, dtype=torch.bool)
    rest[slots] = False
    assert torch.equal(dst[rest], before[rest])


def test_strided_layers_and_empty():
    kv = rand((40, 2, 4, 8), torch.bfloat16, 3)  # a fused [slots, K/V, heads, dim] buffer: the K half is strided
    k = kv[:, 0]
    data = rand((1, 16, 4, 8), torch.bfloat16, 4)
    expect = naive_scatter(as_np(k.contiguous()), [4, 0], 8, as_np(data[0]))
    scatter_pages_layers([k], [4, 0], 8, data)
    np.testing.assert_array_equal(as_np(k.contiguous()), expect)
    scatter_pages_layers([k], torch.tensor([], dtype=torch.int64), 8, data[:, :0])
    assert torch.equal(page_slots(torch.tensor([3, 1]), 2), torch.tensor([6, 7, 2, 3]))


def test_bad_inputs_are_refused():
    dst = [torch.zeros(32, 2, 4)]
    one = torch.zeros(1, 8, 2, 4)
    with pytest.raises(IndexError, match="page id 4"):
        scatter_pages_layers(dst, [1, 4], 8, torch.zeros(1, 16, 2, 4))  # 32 slots = pages 0..3
    with pytest.raises(IndexError, match="page id -1"):
        scatter_pages_layers(dst, [-1], 8, one)
    with pytest.raises(ValueError, match="1-D"):
        scatter_pages_layers(dst, torch.zeros(2, 2, dtype=torch.int64), 8, one)
    with pytest.raises(TypeError, match="integer"):
        scatter_pages_layers(dst, torch.tensor([1.0]), 8, one)
    with pytest.raises(ValueError, match="page_size"):
        scatter_pages_layers(dst, [0], 0, one)
    with pytest.raises(ValueError, match="data must be"):
        scatter_pages_layers(dst, [0, 1], 8, one)
    with pytest.raises(ValueError, match="all layers must agree"):
        scatter_pages_layers([dst[0], torch.zeros(32, 2, 5)], [0], 8, one)
    with pytest.raises(ValueError, match="impl"):
        scatter_pages_layers(dst, [0], 8, one, impl="cuda")
    ref = [torch.zeros(32, 2, 4)]
    scatter_pages_layers_ref(ref, [0], 8, one + 1)
    scatter_pages_layers(dst, [0], 8, one + 1, impl="torch")
    assert torch.equal(dst[0], ref[0])
