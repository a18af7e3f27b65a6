import subprocess
import sys

import numpy as np

from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.synthetic import kv_page


def make_ns(**over) -> Namespace:
    base = dict(
        model="tiny-llama", kv_dtype="bfloat16", layout="mha", page_size=16, num_heads=2, head_dim=64, num_layers=2
    )
    base.update(over)
    return Namespace(**base)


def small_page(seed: int, ns: Namespace | None = None) -> np.ndarray:
    ns = ns or make_ns()
    return kv_page(
        np.random.default_rng(seed),
        page_size=ns.page_size,
        num_heads=ns.num_heads,
        head_dim=ns.head_dim,
        dtype=ns.kv_dtype,
    )


class PinnedReader:
    """Another process holding one LMDB read transaction open on a store's index (``index_dir``), as a hung
    ``kvdrive stats`` or a backup copying the index would: LMDB cannot reuse a page freed after that snapshot, so
    every commit takes fresh pages and a small map fills for real, whatever the store evicts."""

    def __init__(self, index_dir: str, map_size: int):
        code = (
            "import lmdb, sys; env = lmdb.open(sys.argv[1], readonly=True, lock=True, max_dbs=8, "
            "map_size=int(sys.argv[2])); txn = env.begin(); print('ready', flush=True); sys.stdin.read()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(index_dir), str(map_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the pinned reader on {index_dir} did not start (exit {self.proc.wait()})")

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)
