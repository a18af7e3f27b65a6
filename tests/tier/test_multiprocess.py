"""Several processes on one store, and kill -9 during writes and compaction: no lost, mixed or torn pages.

The writer process and the after-crash check live in bench/stress/crash_worker.py, shared with the kill -9 stress
benchmark (bench/stress/kill_stress.py); the last test here is that benchmark at CI size.
"""

import os
import subprocess
import sys

import pytest

from bench.stress.crash_worker import check_every_page
from bench.stress.kill_stress import run as kill_stress
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_four_writer_processes_share_a_store(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.stress.crash_worker", str(tmp_path), "--wid", str(w), "--batches", "25"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    c = check_every_page(tmp_path)
    assert (c.corrupt, c.unreadable, c.verify_bad) == (0, 0, 0)
    # each worker: 25 batches x 2 own keys, minus 2 deleted per 5 batches; 50 shared keys in all
    assert c.pages == 4 * (50 - 2 * 5) + 50


@pytest.mark.slow
def test_kill_9_stress_at_ci_size(tmp_path):
    r = kill_stress(kills=10, seed=1234, path=str(tmp_path), log=None)
    assert r["kills"] == 10 and r["errors"] == [], r["errors"]
    assert r["pages_served_corrupt"] == 0 and r["durable_pages_lost"] == 0
    assert r["kills_survived"] == 10 and r["ok"]
    assert r["pages_checked"] > 0


CHILD = """
import os, sys
from kvdrive_sglang.tier.codecs import encode_page
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from bench.stress.crash_worker import NS, page_for
st = DiskStore(DiskStoreConfig(path=sys.argv[1], capacity_bytes=1 << 30))
for b in range(2):
    keys = [f"c-{b * 4 + j}" for j in range(4)]
    assert all(st.put_many(NS, keys, [encode_page(page_for(k), NS.kv_dtype, "raw", NS.head_dim) for k in keys]))
    print("committed", b, flush=True)
    sys.stdin.readline()
os._exit(0)  # dies like kill -9 after its commit: segment still open, flock released by the kernel
"""


def test_dead_writer_recovery_cuts_at_the_committed_end_not_a_stale_one(tmp_path):
    # Found by bench/stress/kill_stress.py (two writers, one killed while the other compacted): recovery truncated a
    # dead writer's segment at the end it had read *before* the writer's last commit, cutting committed pages
    # (verify then found their entries pointing past the end of the file).
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().startswith("committed 0"), p.stderr.read()
    with DiskStore(DiskStoreConfig(path=str(tmp_path), capacity_bytes=1 << 30)) as st:
        with st.index.read() as txn:
            stale = st.index.segments(txn)  # what a compaction running right now has read
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith("committed 1")
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(timeout=30) == 0
        st.compactor.recover_dead_writers(stale)  # the compaction carries on: the writer is dead by now
    c = check_every_page(tmp_path)
    assert (c.pages, c.corrupt, c.unreadable, c.verify_bad) == (8, 0, 0, 0), c
