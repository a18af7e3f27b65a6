"""A child process for the multi-process and kill -9 tests: writes pages whose bytes follow from their key.

    python store_worker.py DIR WORKER_ID N_BATCHES [--compact]
Prints "ready" after its first committed batch, then keeps going (or exits after N_BATCHES when N_BATCHES > 0).
"""
import sys

import numpy as np

from kvdrive_sglang.tier.codecs import encode_page
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from tests.helpers import make_ns, small_page

NS = make_ns()
CODECS = ("raw", "zstd")


def seed_of(key: bytes) -> int:
    return int(key.split(b"-")[-1])


def page_for(key: bytes) -> np.ndarray:
    return small_page(seed_of(key), NS)


def main():
    path, wid, n_batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    compact = "--compact" in sys.argv
    st = DiskStore(DiskStoreConfig(path=path, capacity_bytes=1 << 30, segment_bytes=128 << 10))
    b = 0
    while n_batches <= 0 or b < n_batches:
        # half the keys are shared by all workers (same key -> same bytes), half are the worker's own
        keys = [f"shared-{b * 4 + j}" if j % 2 else f"w{wid}-{b * 4 + j}" for j in range(4)]
        blobs = [encode_page(small_page(seed_of(k.encode()), NS), NS.kv_dtype, CODECS[(b + j) % 2], NS.head_dim)
                 for j, k in enumerate(keys)]
        assert all(st.put_many(NS, keys, blobs))
        if b == 0:
            print("ready", flush=True)
        if compact and b % 5 == 4:
            st.delete_many(NS, [f"w{wid}-{(b - 4) * 4 + j}" for j in range(0, 4, 2)])
            st.compact()
        b += 1
    st.close()


if __name__ == "__main__":
    main()
