"""The embedded demo: spill a generated KV workload through both tiers, restart, read everything back, verify.

    python -m kvdrive_sglang.tier.demo [--pages N] [--dir DIR] [--codec zstd|raw|int8|fp8]

Pages are synthetic bf16 KV pages shaped like a Llama layer's (K with outlier channels, V Gaussian), generated
from seeds, so the read-back check compares against regenerated originals: bit-exact for lossless codecs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time

import numpy as np

from .dtypes import bf16_bits_to_f32
from .engine import TierConfig, TierEngine
from .namespace import Namespace
from .synthetic import kv_page

MiB = 1 << 20


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _ratio(raw: int, stored: int) -> str:
    return f"x{raw / stored:.2f} compressed" if stored else "empty"


def _page(seed: int) -> np.ndarray:
    return kv_page(np.random.default_rng(seed), page_size=64, num_heads=8, head_dim=128)


def _print_stats(title: str, engine: TierEngine) -> None:
    s = engine.stats()
    h, d = s.dram, s.disk
    print(f"  {title}")
    print(
        f"    DRAM tier : {h.entries:5d} pages  {_size(h.used_bytes):>10} of {_size(h.capacity_bytes)}"
        f"  ({_ratio(h.raw_bytes, h.used_bytes)})  demoted {h.demoted}, dropped {h.dropped}"
    )
    if d is not None:
        print(
            f"    disk tier : {d.entries:5d} pages  {_size(d.file_bytes):>10} in {d.segments} segment(s)"
            f"  ({_ratio(d.raw_bytes, d.live_bytes)})  written {_size(d.bytes_written)},"
            f" read {_size(d.bytes_read)}, corrupt dropped {d.corrupt_dropped}"
        )
    print(
        f"    hits      : DRAM {s.hits_dram}, write-down queue {s.hits_queued}, disk {s.hits_disk}; misses {s.misses}"
    )


def run(pages: int, path: str, codec: str, host_mib: int) -> int:
    ns = Namespace(
        model="demo-llama-1b (synthetic)",
        kv_dtype="bfloat16",
        layout="mha",
        page_size=64,
        num_heads=8,
        head_dim=128,
        num_layers=1,
        tenant="demo",
    )
    keys = [f"{i:064x}" for i in range(pages)]  # SGLang hands 64-hex-char chained page hashes
    cfg = TierConfig(path=path, host_bytes=host_mib * MiB, disk_bytes=4 * pages * 256 * 1024 + 64 * MiB, codec=codec)
    print(
        f"kvdrive demo: {pages} KV pages of 256 KiB ({_size(pages * 256 * 1024)}), DRAM tier {host_mib} MiB, "
        f"codec {codec}, store {path}"
    )

    t0 = time.perf_counter()
    with TierEngine(cfg) as engine:
        for i in range(0, pages, 16):
            engine.put_many(ns, keys[i : i + 16], [_page(s) for s in range(i, min(i + 16, pages))])
        engine.flush()
        print(f"1. wrote {pages} pages in {time.perf_counter() - t0:.2f}s (GPU evictions spilling down)")
        _print_stats("before restart:", engine)

    print("2. server stopped; starting again on the same store")
    t0 = time.perf_counter()
    bad = 0
    worst_cos = 1.0
    with TierEngine(cfg) as engine:
        n = engine.exists_many(ns, keys)
        print(f"   {n} of {pages} pages found after restart (exists_many, {time.perf_counter() - t0:.3f}s)")
        out = [np.empty((2, 64, 8, 128), dtype=np.uint16) for _ in range(16)]
        for i in range(0, pages, 16):
            chunk = keys[i : i + 16]
            got = engine.get_many(ns, chunk, out[: len(chunk)])
            for j, ok in enumerate(got):
                want = _page(i + j)
                if not ok:
                    bad += 1
                elif engine.codec.lossless:
                    bad += not np.array_equal(out[j], want)
                else:
                    x, y = bf16_bits_to_f32(want).ravel(), bf16_bits_to_f32(out[j]).ravel()
                    worst_cos = min(worst_cos, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
        print(f"3. read back {pages} pages in {time.perf_counter() - t0:.2f}s and compared with the originals")
        _print_stats("after restart:", engine)
        rep = engine.disk.verify()
        print(f"4. verify: {rep.checked} pages on disk re-read, {rep.ok} ok, {rep.bad} bad")
    if engine.codec.lossless:
        verdict = "all pages bit-exact" if bad == 0 else f"{bad} pages MISSING or WRONG"
    else:
        verdict = f"lossy codec {codec}: worst cosine {worst_cos:.5f}" + (f", {bad} missing" if bad else "")
    print(f"RESULT: {verdict}")
    return 0 if bad == 0 and rep.bad == 0 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvdrive_sglang.tier.demo", description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=256, help="KV pages to spill (256 KiB each; default 256)")
    p.add_argument("--dir", default=None, help="store directory (default: a temporary one, removed afterwards)")
    p.add_argument("--codec", default="zstd", choices=["zstd", "raw", "int8", "fp8"])
    p.add_argument("--host-mib", type=int, default=16, help="DRAM tier budget in MiB (default 16)")
    a = p.parse_args(argv)
    if a.pages < 1 or a.host_mib < 0:
        p.error("--pages must be >= 1 and --host-mib >= 0")
    logging.basicConfig(level=logging.WARNING, format="kvdrive: %(message)s")
    tmp = None if a.dir else tempfile.mkdtemp(prefix="kvdrive-demo-")
    try:
        return run(a.pages, a.dir or tmp, a.codec, a.host_mib)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
