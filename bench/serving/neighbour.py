"""A CPU-busy neighbour: real work on every core beside the servers, as on a host that runs other things.

One process per core, each compressing and decompressing 1 MiB of mixed data with zstd (level 3) in a loop: the same
kind of work as kvdrive's own codec and HiCache's file I/O copies, started before the servers and stopped after the
last one. Its CPU share (its processes' CPU seconds over wall seconds x cores) is measured from /proc and recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

LOOP = r"""
import os, zstandard
data = (os.urandom(1 << 19) + bytes(1 << 19))  # half noise, half zeros: zstd does real work on both halves
c, d = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
while True:
    d.decompress(c.compress(data))
"""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (Linux /proc), 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Neighbour:
    def __init__(self, processes: int | None = None):
        self.n = processes or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.t0 = 0.0
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def start(self) -> Neighbour:
        self.t0 = time.monotonic()
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", LOOP],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        return self

    def share(self) -> float:
        """Its CPU seconds so far over (wall seconds x cores): 1.0 would be every core, all the time."""
        wall = time.monotonic() - self.t0
        cpu = sum(_cpu_seconds(p.pid) for p in self.procs)
        return cpu / max(wall * (os.cpu_count() or 1), 1e-9)

    def stop(self) -> dict:
        self.cpu_s = sum(_cpu_seconds(p.pid) for p in self.procs)
        self.wall_s = time.monotonic() - self.t0
        for p in self.procs:  # only the processes this object started, by their own id
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(30)
        self.procs = []
        return self.describe()

    def describe(self) -> dict:
        cores = os.cpu_count() or 1
        return {
            "processes": self.n,
            "work": "zstd level-3 compress + decompress of 1 MiB in a loop, one process per core",
            "cpu_s": round(self.cpu_s, 1),
            "wall_s": round(self.wall_s, 1),
            "cpu_share_of_machine": round(self.cpu_s / max(self.wall_s * cores, 1e-9), 3),
        }

    def __enter__(self) -> Neighbour:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.procs:
            self.stop()
