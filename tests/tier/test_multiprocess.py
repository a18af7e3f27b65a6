"""Several processes on one store, and kill -9 during writes and compaction: no lost, mixed or torn pages."""
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from tests.tier.store_worker import NS, page_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(path, wid, n, *extra):
    return subprocess.Popen([sys.executable, "-m", "tests.tier.store_worker", str(path), str(wid), str(n), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_every_page(path) -> int:
    """Open the store, verify it, and read every indexed page back comparing with the bytes its key implies."""
    with DiskStore(DiskStoreConfig(path=str(path), capacity_bytes=1 << 30)) as st:
        rep = st.verify()
        assert rep.bad == 0, rep
        keys = st.keys(NS)
        outs = [np.empty_like(page_for(b"x-0")) for _ in keys]
        got = st.get_many(NS, keys, outs)
        assert all(got)
        for k, o in zip(keys, outs):
            np.testing.assert_array_equal(o, page_for(k))
        return len(keys)


def test_four_writer_processes_share_a_store(tmp_path):
    procs = [worker(tmp_path, w, 25, "--compact") for w in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    n = check_every_page(tmp_path)
    # each worker: 25 batches x 2 own keys, minus 2 deleted per 5 batches; 50 shared keys in all
    assert n == 4 * (50 - 2 * 5) + 50


@pytest.mark.slow
def test_kill_9_loop_leaves_a_consistent_store(tmp_path):
    rng = random.Random(1234)
    kills = 0
    for i in range(30):
        p = worker(tmp_path, i % 3, 0, "--compact")
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        # let it run into the middle of writes, fsyncs, commits and compactions
        try:
            p.wait(timeout=rng.uniform(0.0, 0.4))
        except subprocess.TimeoutExpired:
            pass
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += p.returncode == -signal.SIGKILL
        if i % 5 == 4 or i == 29:
            check_every_page(tmp_path)
    assert kills == 30
    assert check_every_page(tmp_path) > 0
