"""A writer process to kill -9, and the check that follows: shared by bench/stress/kill_stress.py and the tests.

    python -m bench.stress.crash_worker DIR --wid W [--mode disk|compact|engine] [--batches N] [--start S]
                                            [--keyspace K] [--compact-every C]

Every page's bytes follow from its key (``page_for``), so whoever reopens the store can check each page it serves
byte for byte without knowing what the writer did. The worker tells its parent, on stdout, what it promised:
    ready          after its first committed batch
    P k1 k2 ...    those pages are durable (DiskStore.put_many returned, or TierEngine.flush succeeded)
    A k1 k2 ...    TierEngine.put_many accepted them (in DRAM / queued; durable only after the next P line)
    D k1 k2 ...    about to delete them (from here on they may be gone)
    G / g          compaction starts / has finished (a kill between the two landed inside GC)
A page named in a P line and not in a later D line must survive a crash; one only named in an A line may be lost
(the unflushed tail).

Modes: ``disk`` (DiskStore: batches, deletes, compaction every few batches), ``compact`` (DiskStore, mostly deletes
and full compactions, so kills land inside GC), ``engine`` (TierEngine with write-through: a small DRAM pool that
demotes, a small write-down batch, frequent maintenance and a flush every few batches).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import NamedTuple

import numpy as np

from kvdrive_sglang.tier.codecs import encode_page
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.synthetic import kv_page

NS = Namespace(
    model="stress-model", kv_dtype="bfloat16", layout="mha", page_size=16, num_heads=2, head_dim=64, num_layers=2
)
CODECS = ("raw", "zstd")
MODES = ("disk", "compact", "engine")
SEGMENT_BYTES = 128 << 10  # small segments: seals, compactions and segment deletions happen often
CAPACITY = 1 << 30  # far above what a run writes: nothing is evicted, so a missing durable page is a real loss


def seed_of(key: bytes) -> int:
    return int(key.split(b"-")[-1])


def page_for(key) -> np.ndarray:
    """The page a key stands for: the same bytes whichever worker wrote it, with whichever codec. Read-only."""
    return _page_of_seed(seed_of(key.encode() if isinstance(key, str) else key))


@functools.lru_cache(maxsize=8192)  # checking thousands of pages after every kill would otherwise regenerate them
def _page_of_seed(seed: int) -> np.ndarray:
    page = kv_page(
        np.random.default_rng(seed),
        page_size=NS.page_size,
        num_heads=NS.num_heads,
        head_dim=NS.head_dim,
        dtype=NS.kv_dtype,
    )
    page.setflags(write=False)
    return page


def keys_of_batch(wid: int, b: int, start: int, keyspace: int) -> list[str]:
    """Four keys: odd slots shared by all workers (same key -> same bytes), even slots the worker's own."""
    out = []
    for j in range(4):
        n = start + b * 4 + j
        if keyspace:
            n %= keyspace
        out.append(f"shared-{n}" if j % 2 else f"w{wid}-{n}")
    return out


def _say(tag: str, keys) -> None:
    print(tag, *keys, flush=True)


def _run_store(args) -> None:
    st = DiskStore(DiskStoreConfig(path=args.dir, capacity_bytes=CAPACITY, segment_bytes=SEGMENT_BYTES))
    every = args.compact_every or (2 if args.mode == "compact" else 5)
    b = 0
    while args.batches <= 0 or b < args.batches:
        keys = keys_of_batch(args.wid, b, args.start, args.keyspace)
        blobs = [encode_page(page_for(k), NS.kv_dtype, CODECS[(b + j) % 2], NS.head_dim) for j, k in enumerate(keys)]
        if not all(st.put_many(NS, keys, blobs)):
            raise SystemExit(f"worker {args.wid}: put_many refused batch {b}")
        _say("P", keys)
        if b == 0:
            print("ready", flush=True)
        if b % every == every - 1:
            # delete the worker's own keys of a few batches back, then compact: segments go sparse and get rewritten
            doomed = [k for k in keys_of_batch(args.wid, b - every + 1, args.start, args.keyspace)[0::2]]
            _say("D", doomed)
            st.delete_many(NS, doomed)
            print("G", flush=True)
            st.compact(live_ratio=1.0 if args.mode == "compact" else None)
            print("g", flush=True)
        b += 1
    st.close()


def _run_engine(args) -> None:
    from kvdrive_sglang.tier.engine import TierConfig, TierEngine

    eng = TierEngine(
        TierConfig(
            path=args.dir,
            host_bytes=256 << 10,
            disk_bytes=CAPACITY,
            codec="zstd",
            writedown_batch_bytes=64 << 10,
            maintain_interval_s=0.2,
            disk={"segment_bytes": SEGMENT_BYTES},
        )
    )
    every = args.compact_every or 4
    pending: list[str] = []
    b = 0
    while args.batches <= 0 or b < args.batches:
        keys = keys_of_batch(args.wid, b, args.start, args.keyspace)
        if not all(eng.put_many(NS, keys, [page_for(k) for k in keys])):
            raise SystemExit(f"worker {args.wid}: put_many refused batch {b}")
        _say("A", keys)
        pending += keys
        outs = [np.empty_like(page_for(keys[0])) for _ in keys]
        eng.get_many(NS, keys, outs)  # reads from the pool and the queue while the writer drains
        if b % every == every - 1:
            if not eng.flush(timeout=30):
                raise SystemExit(f"worker {args.wid}: flush timed out at batch {b}")
            if eng.stats().writedown_dropped:  # a full queue may drop write-downs: then nothing is promised
                raise SystemExit(f"worker {args.wid}: write-downs dropped at batch {b}")
            _say("P", pending)
            pending = []
            if b == every - 1:
                print("ready", flush=True)
        b += 1
    eng.close()
    _say("P", pending)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stress.crash_worker")
    p.add_argument("dir")
    p.add_argument("--wid", type=int, default=0)
    p.add_argument("--mode", choices=MODES, default="disk")
    p.add_argument("--batches", type=int, default=0, help="stop after this many batches (0: run until killed)")
    p.add_argument("--start", type=int, default=0, help="first key number")
    p.add_argument("--keyspace", type=int, default=0, help="key numbers wrap at this (0: never)")
    p.add_argument("--compact-every", type=int, default=0)
    args = p.parse_args(argv)
    (_run_engine if args.mode == "engine" else _run_store)(args)


# --- the check after a crash -----------------------------------------------------------------------------------
class CheckResult(NamedTuple):
    pages: int  # pages the index holds for NS (each read back and compared)
    corrupt: int  # served (get returned True) with bytes other than the key's page: must be 0
    unreadable: int  # indexed but not served (a miss on an entry the index holds): must be 0 right after verify
    verify_bad: int  # entries verify found pointing at torn / missing bytes: must be 0
    held: set  # the keys held, as str


def check_every_page(path) -> CheckResult:
    """Open the store as a server would, verify it, and read every indexed page back comparing it byte for byte."""
    with DiskStore(DiskStoreConfig(path=str(path), capacity_bytes=CAPACITY, segment_bytes=SEGMENT_BYTES)) as st:
        rep = st.verify()
        keys = st.keys(NS)
        outs = [np.empty_like(page_for(b"x-0")) for _ in keys]
        got = st.get_many(NS, keys, outs) if keys else []
        corrupt = sum(1 for k, o, g in zip(keys, outs, got) if g and not np.array_equal(o, page_for(k)))
        return CheckResult(len(keys), corrupt, len(keys) - sum(got), rep.bad, {k.decode() for k in keys})


if __name__ == "__main__":
    sys.exit(main())
