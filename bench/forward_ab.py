"""One forward pass, measured per server configuration and torch thread count (issue 18: why CPU TTFTs vary).

    python bench/forward_ab.py                                   # prints a table; writes nothing
    python bench/forward_ab.py --out bench/results/forward-ab.json   # (refused from a dirty tree)

Each server (the serving bench's cpu model: generated locally, 4 layers, hidden 1024) is sent --prompts distinct
prompts of --tokens tokens, one at a time, each after a ``/flush_cache`` and asking for one output token, so each
request is one prefill of the whole prompt (kvdrive's own tiers start empty and no prompt repeats: nothing is
reloaded; the log's cached-token counts are checked). Its latency is that forward pass plus the HTTP round trip.

Configurations: radix-only and ``--kv-tier kvdrive``, each with torch's default intra-op threads and with
``OMP_NUM_THREADS=1``. On a shared 2-core VM the default two threads meet at a barrier in every op and wait for a
descheduled one whenever another process holds a core; this bench shows how much that moves a forward pass, which is
why bench/serving_bench.py pins one thread (SERVER_ENV). Run it beside some load (a test run, a neighbour) to see
the effect; the load average is recorded.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time

import e2e_bench
from bench_common import add_allow_dirty, guard_results, machine, write_json
from serving import agent

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.e2e.server import SGLangServer  # noqa: E402

CONFIGS = {
    "radix": [],
    "kvdrive": ["--kv-tier", "kvdrive"],
}
THREADS = {"default": {}, "1": {"OMP_NUM_THREADS": "1"}}


def run_one(model: str, config: str, threads: str, prompts: list[str], workdir: str) -> dict:
    args = list(CONFIGS[config])
    if config == "kvdrive":
        args += ["--kvdrive-dir", os.path.join(workdir, f"store-{threads}")]
    log_path = os.path.join(workdir, f"{config}-{threads}.log")
    p = e2e_bench.PRESETS["cpu"]
    srv_args = ["--page-size", str(p.page_size), "--context-length", str(p.context), *args]
    with SGLangServer(model, srv_args, env=THREADS[threads], log_path=log_path, max_total_tokens=2048) as srv:
        for i in range(2):  # one-off costs of a fresh server
            agent.generate(srv.url, f"warm-up {i}: " + " ".join(["hello"] * 40), 4, 120)
        times = []
        for text in prompts:
            agent.flush(srv.url)
            t0 = time.perf_counter()
            agent.generate(srv.url, text, 1, 120)
            times.append(time.perf_counter() - t0)
    with open(log_path) as f:
        cached = [int(x) for x in re.findall(r"#new-token: \d+, #cached-token: (\d+)", f.read())]
    return {
        "seconds": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "prefills_with_cached_tokens": sum(1 for c in cached[-len(prompts) :] if c),  # expected 0: all computed
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=15, help="prompts per server (default 15)")
    ap.add_argument("--tokens", type=int, default=1000, help="tokens per prompt (default 1000)")
    ap.add_argument("--configs", default="radix,kvdrive", help="comma-separated subset of radix,kvdrive")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    add_allow_dirty(ap)
    a = ap.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or a.prompts < 1 or a.tokens < 16:
        ap.error(f"configs from {', '.join(CONFIGS)}; --prompts >= 1, --tokens >= 16 (got {bad or ''})")
    guard_results(a.out, REPO, a.allow_dirty)
    res = {"machine": machine(REPO), "params": vars(a), "results": {}}
    with tempfile.TemporaryDirectory(prefix="kvdrive-forward-ab-") as workdir:
        model = os.path.join(workdir, "model")
        e2e_bench.make_model(e2e_bench.ModelKind.LLAMA, model, **e2e_bench.PRESETS["cpu"].model)
        tok = e2e_bench.Tokenizer(model)
        rng = random.Random(7)
        for config in configs:
            for threads in THREADS:
                # new prompts per server: nothing any server saw before (kvdrive's tiers never hold them)
                prompts = [e2e_bench.text_of(rng, tok, a.tokens, f"{config} {threads} {i}") for i in range(a.prompts)]
                r = run_one(model, config, threads, prompts, workdir)
                res["results"][f"{config}/threads={threads}"] = r
                print(
                    f"{config:8s} threads={threads:7s}: forward + round trip median {r['median_s']:.3f} s, "
                    f"min {r['min_s']:.3f}, max {r['max_s']:.3f} ({a.prompts} prompts of {a.tokens} tokens; "
                    f"{r['prefills_with_cached_tokens']} with cached tokens)",
                    flush=True,
                )
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average {res['machine']['load_avg']} -> {res['load_avg_end']}")
    if a.out:
        write_json(a.out, res)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
