"""Agreement checks of the compressed-load path: the bplane decode kernel and load_compressed with the Triton kernels,
against the torch references and the numpy codecs. Shared, like ``agreement.py``, by the GPU tests (device "cuda")
and the CPU run under Triton's interpreter (``interpret_check.py``, device "cpu"); bit-exact throughout."""

from __future__ import annotations

import torch

from .agreement import same_bits


def _bplane_buffer(pages, dtype: str, device: str, g: torch.Generator):
    """bplane bodies of ``pages`` (numpy uint8) packed at odd offsets with junk between them."""
    from kvdrive_sglang.tier import bplane

    buf, offsets = bytearray(b"\x33"), []
    for p in pages:
        offsets.append(len(buf))
        buf += bplane.encode_body(p, dtype) + bytes(torch.randint(0, 256, (5,), generator=g).tolist())
    return torch.frombuffer(buf, dtype=torch.uint8).to(device), torch.tensor(offsets, device=device)


def check_bplane(device: str, small: bool = False) -> int:
    """bplane_decode's Triton kernel against the torch reference and the numpy codec: bit for bit, page-major and
    layer-major, among other pages; and on junk bytes the two agree too (same clamped reads, nothing out of bounds)."""
    import numpy as np

    from kvdrive_sglang.kernels.bplane_decode import bplane_decode, bplane_decode_ref
    from kvdrive_sglang.tier.synthetic import kv_page

    g = torch.Generator().manual_seed(4)
    rng = np.random.default_rng(4)
    n_cases = 0
    for dtype in ("bfloat16", "float16"):
        shape = dict(page_size=4 if small else 16, num_heads=2, head_dim=130, dtype=dtype)
        pages = [kv_page(rng, **shape).reshape(-1).view(np.uint8) for _ in range(2 if small else 4)]
        size = pages[0].size
        pages.append(rng.integers(0, 1 << 16, size // 2).astype(np.uint16).view(np.uint8))  # raw blocks
        pages.append(np.full(size // 2, 0x3C00, np.uint16).view(np.uint8))  # width 0
        hi = rng.geometric(0.3, size // 2).clip(max=255).astype(np.uint16) << 8  # escapes
        pages.append((hi | rng.integers(0, 256, size // 2).astype(np.uint16)).view(np.uint8))
        want = torch.from_numpy(np.stack(pages).view(np.int16).copy())
        buf, offsets = _bplane_buffer(pages, dtype, device, g)
        n, P = size // 2, len(pages)
        got = bplane_decode(buf, offsets, n, impl="triton")
        assert torch.equal(got.cpu().view(P, n), want), f"page-major {dtype}"
        assert torch.equal(got, bplane_decode_ref(buf, offsets, n)), f"page-major vs reference {dtype}"
        layers = 4  # a kv_page is [2, page_size, heads, dim]: four equal parts
        seg = n // layers
        out = torch.full(((P + 2) * n,), 9, dtype=torch.int16, device=device)
        bplane_decode(buf, offsets, n, out=out, seg=seg, first=1, total=P + 2, impl="triton")
        ref = torch.full_like(out, 9)
        bplane_decode_ref(buf, offsets, n, out=ref, seg=seg, first=1, total=P + 2)
        assert torch.equal(out, ref), f"layer-major {dtype}"
        assert torch.equal(out.cpu().view(layers, P + 2, seg)[:, 1 : P + 1], want.view(P, layers, seg).transpose(0, 1))
        junk = torch.randint(0, 256, buf.shape, generator=g, dtype=torch.uint8).to(device)
        assert torch.equal(bplane_decode(junk, offsets, n, impl="triton"), bplane_decode_ref(junk, offsets, n)), (
            f"junk {dtype}"
        )
        n_cases += 3
    return n_cases


def check_compressed_load(device: str, small: bool = False) -> int:
    """load_compressed with the Triton kernels (bplane decode, dequantise, page scatter) against the torch path and
    the numpy codecs: the same pool, bit for bit."""
    import numpy as np

    from kvdrive_sglang.kernels.compressed_load import load_compressed
    from kvdrive_sglang.tier.codecs import decode_page, encode_page
    from kvdrive_sglang.tier.synthetic import kv_page

    from .bplane_codec import bplane_registered

    layers, page, heads, dim, slots = 2, 4, 2, 64, 10 * 4
    rng = np.random.default_rng(6)
    g = torch.Generator().manual_seed(6)
    n = 0
    with bplane_registered():
        for dtype, tdtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            names = ["bplane", "raw", "int8", "bplane", "fp8", "zstd"][: 4 if small else 6]
            per_layer = dict(page_size=page, num_heads=heads, head_dim=dim, dtype=dtype)
            flat = [
                np.stack([kv_page(rng, **per_layer) for _ in range(layers)], 1).reshape(2 * layers, page, heads, dim)
                for _ in names
            ]
            blobs = [encode_page(np.ascontiguousarray(p), dtype, c, dim) for p, c in zip(flat, names)]
            ids = [7, 2, 9, 0, 4, 5][: len(names)]
            start = [(torch.randn(slots, heads, dim, generator=g) * 2).to(tdtype).to(device) for _ in range(2 * layers)]
            pools = {impl: [t.clone() for t in start] for impl in ("triton", "torch")}
            for impl, pool in pools.items():
                res = load_compressed(blobs, pool, ids, page, checksums=None, impl=impl)
                assert all(res.ok), f"{impl} {dtype}: {res.misses}"
            for a, b in zip(pools["triton"], pools["torch"]):
                assert same_bits(a, b), f"triton vs torch pool {dtype}"
            for blob, pid in zip(blobs, ids):
                want = np.empty((2 * layers, page, heads, dim), np.uint16)
                decode_page(blob, want, dtype)
                got = torch.stack([t[pid * page : (pid + 1) * page] for t in pools["triton"]]).cpu()
                assert np.array_equal(got.view(torch.int16).numpy(), want.view(np.int16)), f"page {pid} {dtype}"
            n += 1
    return n
