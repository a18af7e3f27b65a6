"""Damage a store between restarts, hundreds of times; every open must succeed and no page may be served wrong.

    python -m bench.stress.damage_stress [--rounds 200] [--seed N (default: random)] [--dir DIR] [--json OUT]

Each round opens the store as a server would (DiskStore: the recovery ladder of tier/recovery.py runs), reads back
every key ever written and compares each page served with the page its key stands for, writes a new batch (raw and
zstd pages, some overwrites and deletes, now and then a compaction), closes it, and damages it: random multi-byte
flips in any file of the store (format stamp, LMDB data.mdb / lock.mdb, segment files, lock files), truncation (to 0,
to half, to a random length), deletion of a file, of ``index/`` or ``segments/``. Now and then the damaged store is
repaired by the real ``kvdrive repair`` instead of by the next open.

Printed (and written as JSON with --json): rounds, opens that raised (must be 0), pages served wrong (must be 0), pages
checked, hits, recoveries by kind, damage by kind, the seed (a failure reruns with --seed). CI runs
tests/tier/test_recovery.py::test_damage_rounds_at_ci_size (20 rounds, a fixed seed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from enum import Enum
from typing import NamedTuple

import numpy as np

from bench.stress.crash_worker import NS, page_for
from kvdrive_sglang.tier import cli
from kvdrive_sglang.tier.codecs import encode_page
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig

KEYSPACE = 400
SEGMENT_BYTES = 64 << 10  # small segments: many files to damage, seals and compactions every round


class Damage(str, Enum):
    FLIP = "flip"  # 1-6 runs of 1-8 bytes, xor'ed with random non-zero values
    TRUNCATE_EMPTY = "truncate_empty"
    TRUNCATE_HALF = "truncate_half"
    TRUNCATE_RANDOM = "truncate_random"
    DELETE_FILE = "delete_file"
    DELETE_INDEX_DIR = "delete_index_dir"
    DELETE_SEGMENT_DIR = "delete_segment_dir"


class Result(NamedTuple):
    seed: int
    rounds: int
    failed_opens: int
    wrong_pages: int
    checked: int
    hits: int
    recoveries: dict
    damage: dict
    failures: list  # (round, what) of the first few failures


def store_files(path: str) -> list[str]:
    out = []
    for root, _, files in os.walk(path):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def flip(rng: random.Random, fpath: str) -> None:
    size = os.path.getsize(fpath)
    if not size:
        return
    with open(fpath, "r+b") as f:
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(size)
            n = min(rng.randint(1, 8), size - at)
            f.seek(at)
            old = f.read(n)
            f.seek(at)
            f.write(bytes(b ^ rng.randint(1, 255) for b in old))


def damage(rng: random.Random, path: str, kind: Damage | None = None, target: str | None = None) -> tuple[Damage, str]:
    """Apply one damage (random kind and file unless given) to the store at ``path``. Returns (kind, what)."""
    kind = kind or rng.choice(list(Damage))
    if kind is Damage.DELETE_INDEX_DIR:
        shutil.rmtree(os.path.join(path, "index"), ignore_errors=True)
        return kind, "index/"
    if kind is Damage.DELETE_SEGMENT_DIR:
        shutil.rmtree(os.path.join(path, "segments"), ignore_errors=True)
        return kind, "segments/"
    files = store_files(path)
    if not files:
        return kind, "(no files)"
    fpath = target or rng.choice(files)
    if kind is Damage.FLIP:
        flip(rng, fpath)
    elif kind is Damage.DELETE_FILE:
        os.unlink(fpath)
    else:
        size = os.path.getsize(fpath)
        new = {
            Damage.TRUNCATE_EMPTY: 0,
            Damage.TRUNCATE_HALF: size // 2,
            Damage.TRUNCATE_RANDOM: rng.randrange(size) if size else 0,
        }[kind]
        os.truncate(fpath, new)
    return kind, os.path.relpath(fpath, path)


def open_store(path: str) -> DiskStore:
    return DiskStore(
        DiskStoreConfig(path=path, capacity_bytes=256 << 20, segment_bytes=SEGMENT_BYTES, retry_after_s=0.05)
    )


def check_pages(st: DiskStore, keys: list[str]) -> tuple[int, int, list[str]]:
    """(checked, hits, keys served wrong): every hit must be the page its key stands for."""
    outs = [np.empty_like(page_for(k)) for k in keys]
    got = st.get_many(NS, keys, outs) if keys else []
    wrong = [k for k, g, o in zip(keys, got, outs) if g and not np.array_equal(o, page_for(k))]
    return len(keys), sum(got), wrong


def write_round(rng: random.Random, st: DiskStore, written: set[str]) -> None:
    keys = sorted({f"page-{rng.randrange(KEYSPACE)}" for _ in range(rng.randint(10, 60))})
    codec = rng.choice(["raw", "zstd"])
    blobs = [encode_page(page_for(k), NS.kv_dtype, codec, NS.head_dim) for k in keys]
    st.put_many(NS, keys, blobs)
    written.update(keys)
    if rng.random() < 0.3:
        st.delete_many(NS, rng.sample(sorted(written), min(5, len(written))))
    if rng.random() < 0.3:
        st.compact(live_ratio=rng.choice([0.5, 1.0]))


def run(rounds: int, seed: int, path: str, log=print) -> Result:
    rng = random.Random(seed)
    written: set[str] = set()
    failed = wrong = checked = hits = 0
    recoveries: Counter = Counter()
    damaged: Counter = Counter()
    failures: list = []
    for rnd in range(rounds):
        if rnd and rng.random() < 0.15:
            rc = cli.main(["repair", path])  # by hand, like an operator: 0 intact, 1 repaired
            if rc not in (0, 1):
                failed += 1
                failures.append((rnd, f"kvdrive repair exited {rc}"))
        try:
            st = open_store(path)
        except Exception as e:  # noqa: BLE001 - any exception out of an open is the failure this bench counts
            failed += 1
            failures.append((rnd, f"open raised {type(e).__name__}: {e}"))
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            recoveries.update(st.stats().recoveries)
            n, h, bad = check_pages(st, sorted(written))
            checked, hits, wrong = checked + n, hits + h, wrong + len(bad)
            if bad:
                failures.append((rnd, f"{len(bad)} wrong page(s), e.g. {bad[0]}"))
            write_round(rng, st, written)
        finally:
            st.close()
        for _ in range(rng.randint(1, 3)):
            kind, what = damage(rng, path)
            damaged[kind.value] += 1
            if log:
                log(f"round {rnd}: {kind.value} {what}")
    return Result(seed, rounds, failed, wrong, checked, hits, dict(recoveries), dict(damaged), failures[:10])


def main(argv=None) -> int:
    from bench.bench_common import add_allow_dirty, guard_results, machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: a random seed (printed)")
    ap.add_argument("--dir", default=None, help="store directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the result here (e.g. bench/results/damage-stress.json)")
    ap.add_argument("--quiet", action="store_true")
    add_allow_dirty(ap)
    args = ap.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    guard_results(args.json, repo, args.allow_dirty)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    env = machine(repo)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or os.path.join(tmp, "store")
        t0 = time.monotonic()
        r = run(args.rounds, seed, path, log=None if args.quiet else print)
        elapsed = time.monotonic() - t0
    out = {**r._asdict(), "elapsed_s": round(elapsed, 1), "machine": env}
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if not r.failed_opens and not r.wrong_pages else 1


if __name__ == "__main__":
    sys.exit(main())
