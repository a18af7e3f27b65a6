"""Soak: a long replay through TierEngine, sampling memory, file descriptors and disk use; checks they stay bounded.

    nice -n 10 python -m bench.stress.soak [--minutes 20] [--sample-s 10] [--host-mb 32] [--disk-mb 192]
                                           [--reopen-min 5] [--seed 1] [--json OUT]

The replay: two models (namespaces) serve requests for documents drawn from a Zipf-like distribution over a growing
set; a request is a chain of pages. Each asks ``exists_many`` for its chain, reads the leading hits (``get_many``:
DRAM pool, write-down queue or disk) and checks every page byte for byte, then puts the rest (write-through).
Alongside: TTL expiry, deletes of whole documents, promoter scores, a namespace clear now and then, maintenance
(eviction, compaction) on the writer thread, and the engine closed and reopened every few minutes.

Sampled every ``--sample-s``: RSS (VmRSS, RssAnon, RssFile from /proc/self/status), tracemalloc's traced bytes, open
fds (/proc/self/fd), threads, the pool's accounted bytes against its budget, write-down queue bytes, the disk store's
segment-file bytes against its cap, and the store directory's size on disk. Pool, queue and disk bytes are also
checked about once a second between samples.

Verdict (each must hold): pool <= budget, queue <= its cap, segment files <= disk cap, always; no page served wrong;
no disk fault (the tier never turned itself off);
after warm-up, open fds within FD_SLACK of each other and RssAnon growth below RSS_GROWTH_BOUND.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import Counter

import numpy as np

from bench.bench_common import add_allow_dirty, guard_results, machine
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.synthetic import kv_page

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


MiB = 1 << 20
FD_SLACK = 24  # fds after warm-up: max - min. One read fd per segment is cached: their number moves with compaction
RSS_GROWTH_BOUND = 48 * MiB  # RssAnon, end of warm-up -> end of run (the pool's budget is accounted separately)
PAGE = dict(page_size=32, num_heads=4, head_dim=128, dtype="bfloat16")  # 64 KiB raw pages
NAMESPACES = [
    Namespace(
        model=m,
        kv_dtype="bfloat16",
        layout="mha",
        page_size=PAGE["page_size"],
        num_heads=PAGE["num_heads"],
        head_dim=PAGE["head_dim"],
        num_layers=4,
    )
    for m in ("soak-model-a", "soak-model-b")
]
_BASES = [kv_page(np.random.default_rng(i), **PAGE) for i in range(32)]


def expected_page(ns_i: int, key: str) -> np.ndarray:
    """A key's page: one of a few realistic base pages, stamped with the key's hash so no two keys share bytes."""
    h = hashlib.blake2b(f"{ns_i}:{key}".encode(), digest_size=16).digest()
    page = _BASES[h[0] % len(_BASES)].copy()
    page.reshape(-1).view(np.uint8)[:16] = np.frombuffer(h, np.uint8)
    return page


def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0]) * (1024 if k != "Threads" else 1)
    return out


def _dir_bytes(path: str) -> int:
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                n += os.stat(os.path.join(root, f)).st_blocks * 512  # allocated: the LMDB map file is sparse
            except FileNotFoundError:
                pass
    return n


class Replay:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.docs = [0, 0]  # documents seen per namespace

    def request(self) -> tuple[int, str, list[str]]:
        ns_i = 0 if self.rng.random() < 0.7 else 1
        if self.docs[ns_i] == 0 or self.rng.random() < 0.15:
            self.docs[ns_i] += 1  # a new document
            doc = self.docs[ns_i] - 1
        else:  # Zipf-like reuse: recent and popular documents come back most
            doc = self.docs[ns_i] - 1 - min(self.docs[ns_i] - 1, int(self.rng.paretovariate(1.1)) - 1)
        n_pages = 4 + (doc * 7919) % 13  # a document's length is fixed
        return ns_i, f"doc{doc}", [f"doc{doc}-p{i}" for i in range(n_pages)]


def run(
    seconds: float = 1200,
    sample_s: float = 10,
    host_bytes: int = 32 * MiB,
    disk_bytes: int = 192 * MiB,
    reopen_s: float = 300,
    ttl_s: float = 120,
    warmup_s: float | None = None,
    seed: int = 1,
    path: str | None = None,
    pace_s: float = 0.002,
    use_tracemalloc: bool = True,
    log=print,
) -> dict:
    rng = random.Random(seed)
    own_dir = path is None
    path = path or tempfile.mkdtemp(prefix="kvdrive-soak-")
    warmup_s = min(120.0, seconds * 0.2) if warmup_s is None else warmup_s
    queue_bytes = 16 * MiB
    cfg = TierConfig(
        path=path,
        host_bytes=host_bytes,
        disk_bytes=disk_bytes,
        codec="zstd",
        writedown_queue_bytes=queue_bytes,
        writedown_batch_bytes=2 * MiB,
        maintain_interval_s=2.0,
        default_ttl_s=ttl_s,
    )
    if use_tracemalloc:
        tracemalloc.start(1)
    replay = Replay(rng)
    counts = dict(requests=0, pages_put=0, pages_got=0, wrong_pages=0, deletes=0, clears=0, reopens=0, score_updates=0)
    maxes = dict(pool_bytes=0, queue_bytes=0, disk_file_bytes=0)
    samples = []
    faults = Counter()  # disk faults (the tier turns itself off for a while): none may happen here
    bufs = [np.empty_like(_BASES[0]) for _ in range(16)]
    eng = TierEngine(cfg)
    t0 = time.monotonic()
    next_sample = t0
    next_check = t0
    next_reopen = t0 + reopen_s if reopen_s else float("inf")
    last_hits = (0, 0, 0, 0)

    def check_bounds() -> None:
        st = eng.stats()
        maxes["pool_bytes"] = max(maxes["pool_bytes"], st.dram.used_bytes)
        maxes["queue_bytes"] = max(maxes["queue_bytes"], st.writedown_queued_bytes)
        maxes["disk_file_bytes"] = max(maxes["disk_file_bytes"], st.disk.file_bytes)

    try:
        while True:
            now = time.monotonic()
            if now >= next_check:
                check_bounds()
                next_check = now + 1.0
            if now >= next_sample:
                st = eng.stats()
                ps = _proc_status()
                hits = (st.hits_dram, st.hits_queued, st.hits_disk, st.misses)
                s = dict(
                    t=round(now - t0, 1),
                    rss=ps["VmRSS"],
                    rss_anon=ps["RssAnon"],
                    rss_file=ps["RssFile"],
                    threads=ps["Threads"],
                    fds=len(os.listdir("/proc/self/fd")),
                    traced=tracemalloc.get_traced_memory()[0] if use_tracemalloc else None,
                    pool_bytes=st.dram.used_bytes,
                    pool_entries=st.dram.entries,
                    queue_bytes=st.writedown_queued_bytes,
                    disk_file_bytes=st.disk.file_bytes,
                    disk_entries=st.disk.entries,
                    disk_segments=st.disk.segments,
                    dir_bytes=_dir_bytes(path),
                    requests=counts["requests"],
                    wrong=counts["wrong_pages"],
                    hits=[h - l for h, l in zip(hits, last_hits)],
                )
                last_hits = hits
                samples.append(s)
                if log:
                    log(_row(s))
                next_sample = now + sample_s
            if now - t0 >= seconds:
                break
            if now >= next_reopen:  # a restart: everything written down, the DRAM tier starts empty
                faults.update(eng.stats().disk.faults)
                eng.close()
                eng = TierEngine(cfg)
                last_hits = (0, 0, 0, 0)  # a new engine counts from zero
                counts["reopens"] += 1
                next_reopen = now + reopen_s
            ns_i, doc, keys = replay.request()
            ns = NAMESPACES[ns_i]
            n = eng.exists_many(ns, keys)
            got = eng.get_many(ns, keys[:n], bufs[:n]) if n else []
            for k, g, b in zip(keys, got, bufs):
                if g:
                    counts["pages_got"] += 1
                    if not np.array_equal(b, expected_page(ns_i, k)):
                        counts["wrong_pages"] += 1
            lead = got.index(False) if False in got else n
            rest = keys[lead:]
            if rest:
                eng.put_many(ns, rest, [expected_page(ns_i, k) for k in rest])
                counts["pages_put"] += len(rest)
            counts["requests"] += 1
            r = rng.random()
            if r < 0.02:  # a document invalidated: its pages deleted from disk (the pool copy ages out)
                eng.disk.delete_many(ns, keys)
                counts["deletes"] += 1
            elif r < 0.06:  # the promoter's scores for this chain
                eng.set_scores(ns, keys, [rng.random() for _ in keys])
                counts["score_updates"] += 1
            elif r < 0.0605:  # rare: model b's pages all dropped (e.g. `kvdrive clear --namespace`)
                eng.clear(NAMESPACES[1])
                counts["clears"] += 1
            if pace_s:
                time.sleep(pace_s)
        check_bounds()
        faults.update(eng.stats().disk.faults)
    finally:
        eng.close()
        if use_tracemalloc:
            tracemalloc.stop()
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
    counts["disk_faults"] = dict(faults)
    return _report(samples, counts, maxes, cfg, queue_bytes, warmup_s, seconds, sample_s)


def _row(s: dict) -> str:
    m = lambda v: f"{v / MiB:7.1f}"  # noqa: E731
    tr = m(s["traced"]) if s["traced"] is not None else "      -"
    return (
        f"{s['t']:7.1f}s rss {m(s['rss'])} anon {m(s['rss_anon'])} traced {tr} fds {s['fds']:3d} "
        f"thr {s['threads']:2d} pool {m(s['pool_bytes'])} queue {m(s['queue_bytes'])} "
        f"disk {m(s['disk_file_bytes'])} dir {m(s['dir_bytes'])} segs {s['disk_segments']:3d} "
        f"req {s['requests']:7d} hits dram/q/disk/miss {'/'.join(map(str, s['hits']))} wrong {s['wrong']}"
    )


def _report(samples, counts, maxes, cfg, queue_bytes, warmup_s, seconds, sample_s) -> dict:
    warm = [s for s in samples if s["t"] >= warmup_s] or samples[-1:]
    head, tail = warm[:3], warm[-3:]
    rss_growth = statistics.median(s["rss_anon"] for s in tail) - statistics.median(s["rss_anon"] for s in head)
    fds = [s["fds"] for s in warm]
    traced = [s["traced"] for s in warm if s["traced"] is not None]
    verdict = {
        "pool_within_budget": maxes["pool_bytes"] <= cfg.host_bytes,
        "queue_within_cap": maxes["queue_bytes"] <= queue_bytes,
        "disk_within_cap": maxes["disk_file_bytes"] <= cfg.disk_bytes,
        "no_wrong_pages": counts["wrong_pages"] == 0,
        "no_disk_faults": not counts["disk_faults"],
        "fds_flat": max(fds) - min(fds) <= FD_SLACK,
        "rss_growth_bounded": rss_growth <= RSS_GROWTH_BOUND,
    }
    return dict(
        seconds=seconds,
        sample_s=sample_s,
        warmup_s=warmup_s,
        samples=samples,
        counts=counts,
        maxes=maxes,
        budgets=dict(host_bytes=cfg.host_bytes, queue_bytes=queue_bytes, disk_bytes=cfg.disk_bytes),
        after_warmup=dict(
            rss_anon_growth=rss_growth,
            rss_anon_min=min(s["rss_anon"] for s in warm),
            rss_anon_max=max(s["rss_anon"] for s in warm),
            rss_max=max(s["rss"] for s in warm),
            fds_min=min(fds),
            fds_max=max(fds),
            traced_min=min(traced) if traced else None,
            traced_max=max(traced) if traced else None,
            threads_max=max(s["threads"] for s in warm),
            threads_min=min(s["threads"] for s in warm),
        ),
        bounds=dict(fd_slack=FD_SLACK, rss_growth_bound=RSS_GROWTH_BOUND),
        verdict=verdict,
        ok=all(verdict.values()),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stress.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--sample-s", type=float, default=10)
    p.add_argument("--host-mb", type=int, default=32)
    p.add_argument("--disk-mb", type=int, default=192)
    p.add_argument("--reopen-min", type=float, default=5, help="close and reopen the engine this often (0: never)")
    p.add_argument("--ttl-s", type=float, default=120)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", help="store directory (default: a fresh temporary one, removed afterwards)")
    p.add_argument("--no-tracemalloc", action="store_true")
    p.add_argument("--json", help="also write the samples and verdict here")
    add_allow_dirty(p)
    a = p.parse_args(argv)
    guard_results(a.json, _REPO, a.allow_dirty)
    started = machine(_REPO)  # load average and commit at the start of the run
    print(
        f"soak: {a.minutes} min, DRAM budget {a.host_mb} MiB, disk cap {a.disk_mb} MiB, reopen every "
        f"{a.reopen_min} min, TTL {a.ttl_s} s, seed {a.seed}"
    )
    r = run(
        a.minutes * 60,
        a.sample_s,
        a.host_mb * MiB,
        a.disk_mb * MiB,
        a.reopen_min * 60,
        a.ttl_s,
        seed=a.seed,
        path=a.dir,
        use_tracemalloc=not a.no_tracemalloc,
    )
    c, w = r["counts"], r["after_warmup"]
    print(
        f"requests {c['requests']}, pages put {c['pages_put']}, got {c['pages_got']} (wrong {c['wrong_pages']}), "
        f"deletes {c['deletes']}, clears {c['clears']}, reopens {c['reopens']}, disk faults {c['disk_faults']}"
    )
    print(
        f"max pool {r['maxes']['pool_bytes'] / MiB:.1f} / {a.host_mb} MiB, max queue "
        f"{r['maxes']['queue_bytes'] / MiB:.1f} / {r['budgets']['queue_bytes'] / MiB:.0f} MiB, max segment files "
        f"{r['maxes']['disk_file_bytes'] / MiB:.1f} / {a.disk_mb} MiB"
    )
    print(
        f"after warm-up ({r['warmup_s']:.0f} s): RssAnon {w['rss_anon_min'] / MiB:.1f}.."
        f"{w['rss_anon_max'] / MiB:.1f} MiB, growth {w['rss_anon_growth'] / MiB:+.1f} MiB "
        f"(bound {RSS_GROWTH_BOUND / MiB:.0f}); fds "
        f"{w['fds_min']}..{w['fds_max']} (slack {FD_SLACK}); threads {w['threads_min']}..{w['threads_max']}"
    )
    for k, v in r["verdict"].items():
        print(f"  {'ok  ' if v else 'FAIL'} {k}")
    print("PASS" if r["ok"] else "FAIL")
    if a.json:
        r = {**r, "machine": started}
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
