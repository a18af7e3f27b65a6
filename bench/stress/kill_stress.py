"""kill -9 a writer at random moments, hundreds of times; after each kill reopen the store and check every page.

    python -m bench.stress.kill_stress [--kills 200] [--seed 1] [--dir DIR] [--json OUT]

Each round starts one or two writer processes (bench/stress/crash_worker.py: DiskStore batches with deletes and
compaction, compaction-heavy runs, or a TierEngine with write-through and a demoting DRAM pool), lets them run for a
random time and kills them with SIGKILL: mid-write, mid-fsync, mid-commit, mid-compaction. Then the store is opened
as a server would open it, verified, and every page the index holds is read and compared byte for byte with the page
its key stands for. Every few rounds the real ``kvdrive verify`` command runs on it too.

Printed: kills, kills survived (the store opened, verified clean and served every page it indexes correctly, and
lost nothing promised durable), pages checked, pages served corrupt (must be 0), durable pages lost (must be 0),
pages lost in the unflushed tail (accepted by TierEngine.put_many but not yet flushed: informational).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from bench.bench_common import add_allow_dirty, guard_results, machine
from bench.stress.crash_worker import MODES, check_every_page

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYSPACE = 1000  # key numbers wrap: the store stays a few thousand pages, so checking all of them stays quick


class Worker:
    """One crash_worker child, its stdout drained by a thread (a full pipe would stall it at a print)."""

    def __init__(self, path: str, wid: int, mode: str, start: int):
        self.mode = mode
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.stress.crash_worker",
                path,
                "--wid",
                str(wid),
                "--mode",
                mode,
                "--start",
                str(start),
                "--keyspace",
                str(KEYSPACE),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line == "ready":
                self.ready.set()
            else:
                self.lines.append(line)
        self.ready.set()  # EOF: it died (or was killed) before or after its first batch

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join()
        return self.proc.returncode

    def stderr_tail(self) -> str:
        return self.proc.stderr.read()[-2000:]


def _verify_cli(path: str) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-m", "kvdrive_sglang.tier.cli", "verify", path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode, lines[-1] if lines else ""


def run(
    kills: int = 200,
    seed: int = 1,
    path: str | None = None,
    max_run_s: float = 0.4,
    cli_verify_every: int = 10,
    log=print,
) -> dict:
    rng = random.Random(seed)
    own_dir = path is None
    path = path or tempfile.mkdtemp(prefix="kvdrive-kill-stress-")
    durable: set[str] = set()  # promised durable (P) and not since announced for deletion (D)
    t0 = time.monotonic()
    r = dict(
        kills=0,
        kills_survived=0,
        rounds=0,
        pages_checked=0,
        pages_served_corrupt=0,
        unreadable_entries=0,
        verify_bad=0,
        durable_pages_lost=0,
        tail_pages_lost=0,
        tail_pages_accepted=0,
        cli_verify_runs=0,
        cli_verify_failures=0,
        worker_errors=0,
        kills_during_compaction=0,
        check_errors=0,
        by_mode={m: 0 for m in MODES},
        errors=[],
    )
    try:
        while r["kills"] < kills:
            r["rounds"] += 1
            n_workers = 2 if rng.random() < 0.2 and kills - r["kills"] >= 2 else 1
            # the first rounds take each mode in turn, so even a short run kills every kind of writer
            modes = [
                MODES[r["rounds"] - 1] if r["rounds"] <= len(MODES) else rng.choice(MODES) for _ in range(n_workers)
            ]
            workers = [
                Worker(path, wid, mode, rng.randrange(KEYSPACE))
                for wid, mode in zip(rng.sample(range(3), n_workers), modes)
            ]
            for w in workers:
                w.ready.wait(60)
            time.sleep(rng.uniform(0.0, max_run_s))  # into the middle of writes, fsyncs, commits and compactions
            accepted: set[str] = set()
            killed = []
            for w in workers:
                time.sleep(rng.uniform(0.0, 0.05))
                rc = w.kill()
                if rc != -signal.SIGKILL:
                    r["worker_errors"] += 1
                    r["errors"].append(
                        f"round {r['rounds']}: {w.mode} worker exited {rc} before the kill: {w.stderr_tail()}"
                    )
                    continue
                killed.append(w)
                r["by_mode"][w.mode] += 1
                in_gc = False
                for line in w.lines:
                    tag, *keys = line.split()
                    in_gc = {"G": True, "g": False}.get(tag, in_gc)
                    if tag == "P":
                        durable.update(keys)
                        accepted.difference_update(keys)
                    elif tag == "A":
                        accepted.update(keys)
                    elif tag == "D":
                        durable.difference_update(keys)
                        accepted.difference_update(keys)
                r["kills_during_compaction"] += in_gc
            r["kills"] += len(killed)
            try:
                c = check_every_page(path)
            except Exception as e:  # noqa: BLE001 - a store that won't open after a crash is exactly what we count
                r["check_errors"] += 1
                r["errors"].append(f"round {r['rounds']}: reopening the store failed: {type(e).__name__}: {e}")
                continue
            lost = durable - c.held
            tail_lost = accepted - c.held - durable
            r["pages_checked"] += c.pages
            r["pages_served_corrupt"] += c.corrupt
            r["unreadable_entries"] += c.unreadable
            r["verify_bad"] += c.verify_bad
            r["durable_pages_lost"] += len(lost)
            r["tail_pages_accepted"] += len(accepted)
            r["tail_pages_lost"] += len(tail_lost)
            if lost:
                r["errors"].append(f"round {r['rounds']}: {len(lost)} durable page(s) lost, e.g. {sorted(lost)[:3]}")
                durable -= lost
            if c.corrupt or c.unreadable or c.verify_bad:
                r["errors"].append(
                    f"round {r['rounds']}: corrupt {c.corrupt}, unreadable {c.unreadable}, verify bad {c.verify_bad}"
                )
            elif not lost:
                r["kills_survived"] += len(killed)
            if cli_verify_every and (r["rounds"] % cli_verify_every == 0 or r["kills"] >= kills):
                rc, last = _verify_cli(path)
                r["cli_verify_runs"] += 1
                if rc != 0:
                    r["cli_verify_failures"] += 1
                    r["errors"].append(f"round {r['rounds']}: kvdrive verify exited {rc}: {last}")
            if log and (r["rounds"] % 20 == 0 or r["kills"] >= kills):
                log(
                    f"  {r['kills']:4d} kills  survived {r['kills_survived']:4d}  store {c.pages:5d} pages  "
                    f"corrupt {r['pages_served_corrupt']}  durable lost {r['durable_pages_lost']}  "
                    f"tail lost {r['tail_pages_lost']}  {time.monotonic() - t0:6.1f} s"
                )
    finally:
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)
    r["seconds"] = round(time.monotonic() - t0, 1)
    r["ok"] = (
        r["kills_survived"] == r["kills"]
        and not r["pages_served_corrupt"]
        and not r["durable_pages_lost"]
        and not r["unreadable_entries"]
        and not r["verify_bad"]
        and not r["check_errors"]
        and not r["worker_errors"]
        and not r["cli_verify_failures"]
    )
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stress.kill_stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", help="store directory (default: a fresh temporary one, removed afterwards)")
    p.add_argument("--max-run-s", type=float, default=0.4, help="a writer runs up to this long before its kill")
    p.add_argument("--json", help="also write the figures here")
    add_allow_dirty(p)
    a = p.parse_args(argv)
    guard_results(a.json, _REPO, a.allow_dirty)
    started = machine(_REPO)  # load average and commit at the start of the run
    print(f"kill -9 stress: {a.kills} kills, seed {a.seed}")
    r = run(a.kills, a.seed, a.dir, a.max_run_s)
    print(
        f"kills:                      {r['kills']}  ({', '.join(f'{m} {n}' for m, n in r['by_mode'].items())}; "
        f"{r['rounds']} rounds)"
    )
    print(
        f"kills inside compaction:    {r['kills_during_compaction']}  (DiskStore writers killed between the start "
        "and end of compact())"
    )
    print(f"kills survived:             {r['kills_survived']}")
    print(f"pages checked:              {r['pages_checked']}")
    print(f"pages served corrupt:       {r['pages_served_corrupt']}  (must be 0)")
    print(f"durable pages lost:         {r['durable_pages_lost']}  (must be 0)")
    print(f"index entries unreadable:   {r['unreadable_entries']}  verify bad: {r['verify_bad']}  (must be 0)")
    print(
        f"unflushed tail lost:        {r['tail_pages_lost']} of {r['tail_pages_accepted']} accepted, unflushed "
        "(informational)"
    )
    print(f"kvdrive verify runs:        {r['cli_verify_runs']}  failures {r['cli_verify_failures']}")
    print(f"time:                       {r['seconds']} s")
    for e in r["errors"][:20]:
        print("  !", e)
    print("PASS" if r["ok"] else "FAIL")
    if a.json:
        r = {**r, "machine": started}
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
