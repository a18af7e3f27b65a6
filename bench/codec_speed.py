"""Codec ratio and single-thread speed on synthetic bf16 KV pages.

    python bench/codec_speed.py [--pages 200] [--reps 5] [--dtype bfloat16]

Prints, per codec, the compression ratio and the median (over reps) encode / decode throughput in GB/s of
decoded page bytes, one thread. Pages: 64 tokens x 8 heads x 128 head_dim, K with outlier channels (see
tier/synthetic.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from kvdrive_sglang.tier.codecs import CODEC_NAMES, decode_page, encode_page
from kvdrive_sglang.tier.synthetic import kv_page


def measure(pages, dtype: str, codec: str, reps: int, row_len: int) -> dict:
    nbytes = sum(p.nbytes for p in pages)
    blobs = [encode_page(p, dtype, codec, row_len) for p in pages]  # warm-up (per-thread contexts, scratch)
    out = np.empty_like(pages[0])
    enc, dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for p in pages:
            encode_page(p, dtype, codec, row_len)
        enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in blobs:
            decode_page(b, out, dtype)
        dec.append(time.perf_counter() - t0)
    return {
        "codec": codec,
        "ratio": nbytes / sum(len(b) for b in blobs),
        "enc_gbps": nbytes / statistics.median(enc) / 1e9,
        "dec_gbps": nbytes / statistics.median(dec) / 1e9,
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    pages = [kv_page(rng, dtype=a.dtype) for _ in range(a.pages)]
    print(
        f"{a.pages} synthetic {a.dtype} pages of {pages[0].nbytes} bytes, shape {pages[0].shape}, "
        f"median of {a.reps}, one thread"
    )
    print(f"{'codec':6} {'ratio':>7} {'enc GB/s':>9} {'dec GB/s':>9}")
    rows = []
    for codec in CODEC_NAMES:
        r = measure(pages, a.dtype, codec, a.reps, pages[0].shape[-1])
        rows.append(r)
        print(f"{codec:6} {r['ratio']:7.3f} {r['enc_gbps']:9.2f} {r['dec_gbps']:9.2f}")
    return rows


if __name__ == "__main__":
    main()
