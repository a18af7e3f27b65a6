"""batch_set_v1 wall time per call, encoded on SGLang's backup thread (before issue 15) or staged (after).

Real SGLang MHA host pool on CPU and kvdrive's real tiers (zstd, write-through to a disk store in a temp dir):
64 pages of 256 KiB per call (bf16, 16 layers x 8 heads x 128 dims x 4 tokens x K/V). "sync" is stage_many's
fallback with staging_bytes 0 (put_many on the caller's thread: the code before issue 15); "staged" is the default.

    .venv/bin/python -m bench.batch_set_v1_bench [--calls 8]

Two readings for "staged": one call at a time (each after the previous one's pages were encoded: the latency SGLang's
backup thread sees) and back to back (calls arriving faster than the encoders keep up: the staging area fills, and
the pages it refuses are not backed up; their count is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from tests.sglang.backend_case import PAGE, fill, make_backend, make_host

PAGES = 64


def _backend(tmp: str, staged: bool):
    host = make_host(heads=8, head_dim=128, layers=16, size=2 * PAGES * PAGE)
    be = make_backend(tmp, host, host_gb=1.0)
    if not staged:
        be.engine.config.staging_bytes = 0  # stage_many is put_many then
    return host, be


def run(calls: int) -> dict:
    out = {}
    for mode in ("sync", "staged", "staged_back_to_back"):
        with tempfile.TemporaryDirectory() as tmp:
            host, be = _backend(tmp, mode != "sync")
            idx = host.alloc(PAGES * PAGE)
            fill(host, [idx[i * PAGE] for i in range(PAGES)], seed=1)
            page_bytes = be.page_bytes
            times, refused = [], 0
            for c in range(calls):
                keys = [f"{c:08x}{i:056x}" for i in range(PAGES)]
                t0 = time.perf_counter()
                ok = be.batch_set_v1(keys, idx)
                times.append(time.perf_counter() - t0)
                refused += ok.count(False)
                if mode != "staged_back_to_back":
                    assert be.engine.flush(timeout=120)
            t_drain = time.perf_counter()
            assert be.engine.flush(timeout=300)
            out[mode] = {
                "ms_per_call_median": round(1000 * statistics.median(times), 2),
                "ms_per_call_min": round(1000 * min(times), 2),
                "ms_per_call_max": round(1000 * max(times), 2),
                "page_kib": page_bytes // 1024,
                "pages_per_call": PAGES,
                "calls": calls,
                "pages_refused": refused,
                "drain_s_after_last_call": round(time.perf_counter() - t_drain, 3),
            }
            be.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=8)
    print(json.dumps(run(ap.parse_args().calls), indent=1))


if __name__ == "__main__":
    main()
