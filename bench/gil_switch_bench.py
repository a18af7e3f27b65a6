"""What Python's GIL switch interval costs a launch-bound scheduler thread, and what it buys kvdrive's I/O thread.

SGLang's scheduler loop holds the GIL while it runs Python; on a GPU server with CUDA graphs it is launch-bound
(Python work + kernel launches, the GIL held throughout). kvdrive's HiCache I/O thread decodes pages and releases the
GIL for each zstd call, then waits for it back: up to one switch interval per release. A shorter interval makes the
I/O thread's pages arrive sooner and costs the scheduler thread more forced switches. This bench measures both on
this machine, in one process, per interval:

- ``sched_ops_per_s``: a scheduler-like thread running small torch ops in a loop (each op is a launch stand-in: a
  C++ call with the GIL held), alone and beside the I/O thread; ``slowdown`` = its rate beside the I/O thread,
  against the same interval with the I/O thread idle;
- ``page_ms``: the I/O thread's time per page (zstd decode of a 256 KiB KV-like page, GIL released inside).

    python bench/gil_switch_bench.py [--seconds 3] [--repeats 3] [--out bench/results/gil-switch]

The result informs ``config.GIL_SWITCH_MS`` (the default per device); the README quotes only what the results file
shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch
import zstandard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import add_allow_dirty, guard_results, machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INTERVALS_MS = (0.5, 1.0, 2.0, 5.0)
PAGE_BYTES = 256 << 10


def _page_blob() -> bytes:
    rng = np.random.default_rng(0)
    page = (rng.standard_normal(PAGE_BYTES // 2) * 0.5).astype(np.float16)  # KV-like: compressible exponents
    return zstandard.ZstdCompressor(level=1).compress(page.tobytes())


def _scheduler(stop: threading.Event, out: list) -> None:
    x = torch.zeros(64)
    n = 0
    while not stop.is_set():
        for _ in range(100):
            x.add_(1.0)  # a launch stand-in: a short C++ call with the GIL held
        n += 100
    out.append(n)


def _io(stop: threading.Event, blob: bytes, out: list) -> None:
    d = zstandard.ZstdDecompressor()
    times = []
    while not stop.is_set():
        t0 = time.perf_counter()
        d.decompress(blob)
        times.append(time.perf_counter() - t0)
    out.append(times)


def _run(seconds: float, with_io: bool, blob: bytes) -> tuple[float, float | None]:
    stop = threading.Event()
    ops, pages = [], []
    threads = [threading.Thread(target=_scheduler, args=(stop, ops))]
    if with_io:
        threads.append(threading.Thread(target=_io, args=(stop, blob, pages)))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    page_ms = 1000 * statistics.median(pages[0]) if with_io and pages[0] else None
    return ops[0] / seconds, page_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write <out>.json and <out>.md")
    add_allow_dirty(ap)
    a = ap.parse_args()
    guard_results(a.out + ".json" if a.out else None, REPO, a.allow_dirty)
    meta = {**machine(REPO), "command": " ".join(["python"] + sys.argv), "load": os.getloadavg()}
    torch.set_num_threads(1)
    blob = _page_blob()
    before = sys.getswitchinterval()
    rows = []
    try:
        for ms in INTERVALS_MS:
            sys.setswitchinterval(ms / 1000)
            alone, beside, page = [], [], []
            for _ in range(a.repeats):
                alone.append(_run(a.seconds, False, blob)[0])
                r, p = _run(a.seconds, True, blob)
                beside.append(r)
                page.append(p)
            row = {
                "interval_ms": ms,
                "sched_ops_per_s_alone": statistics.median(alone),
                "sched_ops_per_s_beside_io": statistics.median(beside),
                "slowdown": statistics.median(alone) / statistics.median(beside),
                "slowdown_spread": [min(alone) / max(beside), max(alone) / min(beside)],
                "page_ms_p50": statistics.median(page),
                "page_ms_spread": [min(page), max(page)],
            }
            rows.append(row)
            print(
                f"interval {ms:4.1f} ms: scheduler {row['sched_ops_per_s_alone']:,.0f} ops/s alone, "
                f"{row['sched_ops_per_s_beside_io']:,.0f} beside I/O (x{row['slowdown']:.2f} slower); "
                f"I/O {row['page_ms_p50']:.2f} ms/page",
                flush=True,
            )
    finally:
        sys.setswitchinterval(before)
    if a.out:
        res = {**meta, "seconds": a.seconds, "repeats": a.repeats, "page_bytes": PAGE_BYTES, "rows": rows}
        with open(a.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        lines = [
            f"# GIL switch interval: scheduler cost vs I/O latency ({res['date']})",
            "",
            f"commit `{res['git']}`, `{res['command']}`, {res['cpu']} x{res['cores']}, Python {res['python']}, "
            f"torch {res['torch']}; load average at start {', '.join(f'{x:.2f}' for x in res['load'])}.",
            "",
            "| interval | scheduler ops/s alone | beside I/O | slowdown (spread) | I/O ms/page p50 (spread) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['interval_ms']} ms | {r['sched_ops_per_s_alone']:,.0f} | "
                f"{r['sched_ops_per_s_beside_io']:,.0f} | x{r['slowdown']:.2f} "
                f"({r['slowdown_spread'][0]:.2f}-{r['slowdown_spread'][1]:.2f}) | {r['page_ms_p50']:.2f} "
                f"({r['page_ms_spread'][0]:.2f}-{r['page_ms_spread'][1]:.2f}) |"
            )
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
