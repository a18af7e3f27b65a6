"""Synthetic KV pages that look like real ones, for tests, the demo and the bench.

Real K caches are roughly Gaussian per channel except for a few outlier channels (the same few channels in every
token of a head, ~10-20x larger), which is what makes per-row quantisation and exponent compression behave the
way they do on real pages. V caches are closer to plain Gaussian. Random bytes would flatter no codec and
constant pages would flatter every codec, so neither is used here.
"""

from __future__ import annotations

import numpy as np

from .dtypes import DTYPES, to_bf16_bits

SYNTHETIC_DTYPES = ("bfloat16", "float16", "float32")


def _outliers(num_heads: int, head_dim: int, outlier_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-head outlier channels and their scales. Fixed for a given shape (like a model's): every page shares them."""
    g = np.random.default_rng([num_heads, head_dim, outlier_channels, 0x4B56])
    k = min(outlier_channels, head_dim)
    chans = np.stack([g.choice(head_dim, size=k, replace=False) for _ in range(num_heads)]) if k else None
    scales = g.uniform(10.0, 20.0, size=(num_heads, k))
    return chans, scales


def kv_page(
    rng: np.random.Generator,
    *,
    page_size: int = 64,
    num_heads: int = 8,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    outlier_channels: int = 4,
) -> np.ndarray:
    """One page, shape [2 (K, V), page_size, num_heads, head_dim], C-contiguous.

    bfloat16 comes back as uint16 bit patterns (numpy has no bfloat16); float16 / float32 as themselves.
    """
    if dtype not in SYNTHETIC_DTYPES:
        raise ValueError(f"kv_page dtype must be one of {', '.join(SYNTHETIC_DTYPES)}, got {dtype!r}")
    page = rng.standard_normal((2, page_size, num_heads, head_dim), dtype=np.float32)
    if outlier_channels > 0:
        chans, scales = _outliers(num_heads, head_dim, outlier_channels)
        heads = np.arange(num_heads)[:, None]
        page[0][:, heads, chans] *= scales.astype(np.float32)
    if dtype == "bfloat16":
        return to_bf16_bits(page)
    return page.astype(DTYPES[dtype].storage)
