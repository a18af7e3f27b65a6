"""kvdrive kernels: Triton vs torch reference, speed and agreement.

    python bench/kernels_bench.py [--reps 20]

On a CUDA GPU: for each kernel (page scatter over all layers, int8/fp8 dequantise-on-load, bplane decode, per-page
attention mass with and without a backend LSE) the median time of the Triton kernel and of the torch reference on
the same inputs, the bandwidth, and whether they agree (bit-exact for copies, dequantisation and decode, max abs
difference for attention mass); then the whole compressed load (``load_compressed``: host checks, one pinned copy,
decode, scatter) of bplane pages against raw pages, in decoded GB/s placed in the pool. As a yardstick for the
capture overhead, SGLang's own Triton decode attention on the same batch is timed too when it imports. On CPU: the
references only, on smaller inputs, and a line saying GPU timings were not measured.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvdrive_sglang.kernels import (
    attention_lse,
    bplane_decode,
    dequant_body,
    load_compressed,
    page_attention_mass,
    scatter_pages_layers,
)
from kvdrive_sglang.tier import bplane
from kvdrive_sglang.tier.codecs import HEADER, decode_page, encode_page
from kvdrive_sglang.tier.synthetic import kv_page


def timed(fn, reps: int, cuda: bool) -> float:
    """Median seconds per call (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    size = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.view(size), b.view(size))


def row(name: str, nbytes: int, t_triton: float | None, t_ref: float, agree: str) -> None:
    def fmt(t):
        return "      -      " if t is None else f"{t * 1e3:8.3f} ms {nbytes / t / 1e9:6.1f} GB/s"

    speed = "" if t_triton is None else f"  x{t_ref / t_triton:6.1f}"
    print(f"{name:<46} triton {fmt(t_triton)}   torch {fmt(t_ref)}{speed}   {agree}")


def bench_scatter(dev: str, cuda: bool, reps: int) -> None:
    L, pages, page_size, heads, dim = (8, 1024, 64, 8, 128) if cuda else (4, 64, 16, 8, 128)
    n = pages // 4
    layers = [torch.zeros(pages * page_size, heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    ids = torch.randperm(pages, device=dev)[:n]
    data = torch.randn(L, n * page_size, heads, dim, device=dev).to(torch.bfloat16)
    nbytes = L * n * page_size * heads * dim * 2
    dst_ref = [torch.zeros_like(t) for t in layers]
    t_ref = timed(lambda: scatter_pages_layers(dst_ref, ids, page_size, data, check=False, impl="torch"), reps, cuda)
    t_tri, agree = None, "reference only"
    if cuda:
        t_tri = timed(lambda: scatter_pages_layers(layers, ids, page_size, data, check=False), reps, cuda)
        agree = "bit-exact" if all(same_bits(a, b) for a, b in zip(layers, dst_ref)) else "DIFFERENT"
    row(f"scatter {n} pages x {L} layers (bf16 {page_size}x{heads}x{dim})", nbytes, t_tri, t_ref, agree)


def bench_bplane(dev: str, cuda: bool, reps: int) -> None:
    n = 256 if cuda else 8
    rng = np.random.default_rng(0)
    pages = [kv_page(rng, page_size=64, num_heads=8, head_dim=128).reshape(-1).view(np.uint8) for _ in range(16)]
    bodies = [bplane.encode_body(p, "bfloat16") for p in pages]
    buf, offsets = bytearray(), []
    for i in range(n):
        offsets.append(len(buf))
        buf += bodies[i % len(bodies)]
    buf_t = torch.frombuffer(buf, dtype=torch.uint8).to(dev)
    offs = torch.tensor(offsets, device=dev)
    values = pages[0].size // 2
    nbytes = n * pages[0].size  # decoded bytes
    want = torch.from_numpy(np.stack([pages[i % len(pages)] for i in range(n)]).view(np.int16).copy())
    ref = bplane_decode(buf_t, offs, values, impl="torch")
    exact = torch.equal(ref.cpu().view(n, values), want)
    t_ref = timed(lambda: bplane_decode(buf_t, offs, values, impl="torch"), max(1, reps // 4), cuda)
    t_tri, agree = None, "reference only"
    if cuda:
        t_tri = timed(lambda: bplane_decode(buf_t, offs, values), reps, cuda)
        agree = "bit-exact" if torch.equal(bplane_decode(buf_t, offs, values), ref) else "DIFFERENT"
    agree += ", reference = numpy codec" if exact else ", reference != numpy codec"
    ratio = nbytes / len(buf)
    row(f"bplane decode, {n} pages of 64x8x128 bf16 (x{ratio:.2f})", nbytes, t_tri, t_ref, agree)


def bench_load(dev: str, cuda: bool, reps: int) -> None:
    """load_compressed end to end: bplane blobs (PCIe carries ~1/1.39 of the page) against raw blobs of the same
    pages, into a 2 x 16-layer pool; the time includes the host checks and packing, the copy, decode and scatter."""
    # the codec's test registration, until tier/codecs.py registers it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernels.bplane_codec import bplane_registered

    layers, page_size, heads, dim = 16, 64, 8, 128
    n = 64 if cuda else 4
    slots = 4 * n * page_size
    pool = [torch.zeros(slots, heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(2 * layers)]
    rng = np.random.default_rng(1)
    per_page = [
        np.stack([kv_page(rng, page_size=page_size, num_heads=heads, head_dim=dim) for _ in range(layers)], 1)
        for _ in range(min(n, 8))
    ]
    ids = list(range(0, 4 * n, 4))
    with bplane_registered():
        for codec in ("raw", "bplane"):
            flat = [np.ascontiguousarray(per_page[i % len(per_page)]) for i in range(n)]
            blobs = [encode_page(p, "bfloat16", codec, dim) for p in flat]
            res = load_compressed(blobs, pool, ids, page_size, checksums=None)
            t = timed(lambda: load_compressed(blobs, pool, ids, page_size, checksums=None), reps, cuda)
            path = "Triton" if cuda else "torch references"
            print(
                f"load_compressed {codec:<6} {n} pages of {res.raw_bytes // n >> 10} KiB ({path}): {t * 1e3:8.3f} ms, "
                f"{res.raw_bytes / t / 1e9:6.2f} GB/s placed, PCIe {res.wire_bytes / t / 1e9:6.2f} GB/s "
                f"(wire {res.wire_bytes / res.raw_bytes:.3f} of the page bytes), {sum(res.ok)}/{n} loaded"
            )


def bench_dequant(dev: str, cuda: bool, reps: int) -> None:
    n = 256 if cuda else 16
    rng = np.random.default_rng(0)
    pages = [kv_page(rng, page_size=64, num_heads=8, head_dim=128) for _ in range(min(n, 16))]
    for codec in ("int8", "fp8"):
        blobs = [encode_page(p, "bfloat16", codec, 128) for p in pages]
        bodies = torch.stack([torch.frombuffer(bytearray(b[HEADER.size :]), dtype=torch.uint8) for b in blobs])
        bodies = bodies.repeat(-(-n // len(blobs)), 1)[:n].to(dev)
        nbytes = n * pages[0].nbytes  # decoded bytes
        ref = dequant_body(bodies, codec, 128, torch.bfloat16, impl="torch")
        first = np.empty_like(pages[0])
        decode_page(blobs[0], first, "bfloat16")
        codec_ok = ref[0].view(torch.uint8).cpu().numpy().tobytes() == first.tobytes()
        t_ref = timed(lambda: dequant_body(bodies, codec, 128, torch.bfloat16, impl="torch"), reps, cuda)
        t_tri, agree = None, "reference only"
        if cuda:
            t_tri = timed(lambda: dequant_body(bodies, codec, 128, torch.bfloat16), reps, cuda)
            agree = "bit-exact" if same_bits(dequant_body(bodies, codec, 128, torch.bfloat16), ref) else "DIFFERENT"
        agree += ", reference = decode_page" if codec_ok else ", reference != decode_page"
        row(f"dequant {codec} -> bf16, {n} pages of 64x8x128", nbytes, t_tri, t_ref, agree)


def sglang_decode_attention(q, kb, vb, r2t, seq_lens, scale):
    """A closure running SGLang's Triton decode attention on the same batch, or (None, why)."""
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    except Exception as e:  # noqa: BLE001 - a yardstick only
        return None, f"{type(e).__name__}: {e}"
    B, H, D = q.shape
    splits = 16
    indptr = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = torch.cumsum(seq_lens, 0)
    indices = torch.cat([r2t[b, : int(seq_lens[b])] for b in range(B)]).to(torch.int64)
    o = torch.empty_like(q)
    logits = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    num_splits = torch.full((B,), splits, dtype=torch.int32, device=q.device)

    def run():
        decode_attention_fwd(q, kb, vb, o, indptr, indices, logits, lse, num_splits, splits, scale, 1.0, 1.0)

    try:
        run()
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    return run, ""


def bench_mass(dev: str, cuda: bool, reps: int) -> None:
    B, Hq, Hkv, D, L, page_size = (32, 32, 8, 128, 4096, 64) if cuda else (4, 32, 8, 128, 1024, 64)
    g = torch.Generator().manual_seed(0)
    slots = B * L + 1
    q = torch.randn(B, Hq, D, generator=g).to(torch.bfloat16).to(dev)
    kb = torch.randn(slots, Hkv, D, generator=g).to(torch.bfloat16).to(dev)
    r2t = (1 + torch.randperm(slots - 1, generator=g)[: B * L].view(B, L)).to(torch.int32).to(dev)
    seq_lens = torch.full((B,), L, device=dev)
    nbytes = B * L * Hkv * D * 2  # K read once
    scale = 1 / math.sqrt(D)
    ref = page_attention_mass(q, kb, r2t, seq_lens, page_size, impl="torch")
    lse = attention_lse(q, kb, r2t, seq_lens, impl="torch")  # stands in for the attention backend's LSE
    print(f"attention mass: batch {B}, {Hq} q / {Hkv} kv heads, head_dim {D}, {L} tokens each, page {page_size}, bf16")
    for name, kw in (("mass, LSE recomputed", {}), ("mass, backend LSE given", {"lse": lse})):
        t_ref = timed(
            lambda: page_attention_mass(q, kb, r2t, seq_lens, page_size, impl="torch", **kw), max(1, reps // 4), cuda
        )
        t_tri, agree = None, "reference only"
        if cuda:
            t_tri = timed(lambda: page_attention_mass(q, kb, r2t, seq_lens, page_size, **kw), reps, cuda)
            got = page_attention_mass(q, kb, r2t, seq_lens, page_size, **kw)
            agree = f"max |diff| {(got - ref).abs().max().item():.2e} (row sums {got.sum(1).mean().item():.3f})"
        row(name, nbytes, t_tri, t_ref, agree)
    if cuda:
        vb = torch.randn_like(kb)
        run, why = sglang_decode_attention(q, kb, vb, r2t, seq_lens, scale)
        if run is None:
            print(f"SGLang decode attention yardstick not run: {why}")
        else:
            t_attn = timed(run, reps, cuda)
            t_mass = timed(lambda: page_attention_mass(q, kb, r2t, seq_lens, page_size, lse=lse), reps, cuda)
            print(
                f"SGLang Triton decode attention, same batch, one layer: {t_attn * 1e3:.3f} ms; mass with LSE = "
                f"{t_mass / t_attn * 100:.0f}% of it (per sampled layer)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    else:
        print(
            f"device: CPU (torch {torch.__version__}). GPU timings were not measured: no CUDA device, so only the "
            "torch references run, on smaller inputs."
        )
    bench_scatter(dev, cuda, args.reps)
    bench_dequant(dev, cuda, args.reps)
    bench_bplane(dev, cuda, args.reps)
    bench_load(dev, cuda, args.reps)
    bench_mass(dev, cuda, args.reps)


if __name__ == "__main__":
    main()
