"""SGLang's own tiers below the GPU in the replay: HiCache's host pool (L2) and its file storage backend (L3).

Both hold one small synthetic bf16 page (4 KiB: ``SyntheticPages``) per modelled 64-token page, so the data really
moves (host pool slots are written and read, files are created, read and evicted) at 1/2048 of a real page's bytes.

``HostTier`` models HiCache's default ``write_through`` policy (sglang/srt/mem_cache/hiradix_cache.py, threshold 1):
  - every page a finished request inserts into the GPU tree is backed up to the host pool at once, in prefix order
    (``write_backup`` needs the parent backed up: a page that finds no room stops the rest of its chain);
  - a full host pool first evicts host-only pages (``evict_host`` frees only nodes already evicted from the GPU),
    least recently used first and, among equally recent ones, the deepest first (leaves before their parents);
  - GPU eviction of a backed-up page keeps its host copy (``_evict_backuped``);
  - a prompt's pages found in the host pool after the GPU prefix are loaded back (``load_back``) and become
    GPU-resident again; pages fetched from storage land in the host pool first (``_insert_helper_host``).
With a storage backend, every page newly backed up to the host pool is also written to storage
(``write_backup_storage`` after the host write's ack), through the backend's ``batch_set`` (``_generic_page_set``);
prefetch reads go through ``batch_exists`` then ``batch_get`` into host slots (``_generic_page_get``) and are only
issued when the storage part of the prompt is at least ``prefetch_threshold`` tokens (SGLang default 256).
Not modelled: the asynchrony (writes complete before the next request; prefetch completes as with
``wait_complete``), host-pool fragmentation, and node splits (a page is its own node here).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from .gpu import ReplayError

SMALL_SHAPE = dict(page_size=16, num_heads=1, head_dim=64)  # 4 KiB bf16 pages stand in for the real ones
N_POOL_PAGES = 64  # distinct synthetic page contents, cycled by page id


class SyntheticPages:
    """N_POOL_PAGES realistic synthetic bf16 KV pages (tier.synthetic.kv_page), as numpy uint16 and as flat torch
    bfloat16 views of the same bytes; page id ``pid`` has content ``pid % N_POOL_PAGES``."""

    def __init__(self, seed: int = 99):
        import torch

        from kvdrive_sglang.tier.synthetic import kv_page

        rng = np.random.default_rng(seed)
        self.numpy = [kv_page(rng, **SMALL_SHAPE) for _ in range(N_POOL_PAGES)]
        self.torch = [torch.from_numpy(p.view(np.int16)).view(torch.bfloat16).flatten() for p in self.numpy]
        self.nbytes = self.numpy[0].nbytes

    def np_page(self, pid: int) -> np.ndarray:
        return self.numpy[pid % N_POOL_PAGES]

    def torch_page(self, pid: int):
        return self.torch[pid % N_POOL_PAGES]


class HostTier:
    """HiCache's L2: a real MHATokenToKVPoolHost (CPU, layer_first, page_size 1) of ``pages`` slots, one synthetic
    page per slot, with the write-through policy described in the module docstring."""

    def __init__(self, pages: int, synth: SyntheticPages):
        import torch
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

        from kvdrive_sglang.compat.host_pools import make_host_pool

        if pages < 1:
            raise ReplayError(f"host tier of {pages} pages")
        head_dim = synth.nbytes // (2 * 2)  # K and V, bf16: one token of head_dim elements is one synthetic page
        dev = MHATokenToKVPool(
            size=1,
            page_size=1,
            dtype=torch.bfloat16,
            head_num=1,
            head_dim=head_dim,
            layer_num=1,
            device="cpu",
            enable_memory_saver=False,
        )
        # SGLang sizes the host pool as device size x ratio (then one page more); ratio = pages makes it ``pages``
        self.pool = make_host_pool(
            MHATokenToKVPoolHost,
            dev,
            host_to_device_ratio=pages + 0.5,
            host_size=0,
            page_size=1,
            layout="layer_first",
            pin_memory=False,
            device="cpu",
        )
        self.capacity = self.pool.available_size()
        self.synth = synth
        self.slot: OrderedDict[int, int] = OrderedDict()  # page id -> host index; front = least recently used
        self.written = self.read = self.evicted = self.refused = 0
        self.on_evict = None  # called with the page ids make_room evicts (kvdrive: promotion candidates)

    def leading_hits(self, pids, start: int) -> int:
        n = 0
        for pid in pids[start:]:
            if pid not in self.slot:
                break
            n += 1
        return n

    def load_back(self, pids, counted: bool = True) -> None:
        """Host -> GPU copy of ``pids`` (all host-resident): reads the slots, checks the first and last page;
        ``counted``: a host hit (not a storage page passing through)."""
        import torch

        for pid in (pids[0], pids[-1]):
            got = self.pool.get_data_page(self.slot[pid], flat=True)
            if not torch.equal(got, self.synth.torch_page(pid)):
                raise ReplayError(f"host pool page {pid} read back wrong")
        if counted:
            self.read += len(pids)

    def touch(self, chain) -> None:
        """A request used ``chain`` (prefix order): most recent, the root most of all (leaves are evicted first)."""
        slot = self.slot
        for pid in reversed(chain):
            if pid in slot:
                slot.move_to_end(pid)

    def make_room(self, need: int, keep, also=()) -> list:
        """Evict host-only pages (in neither ``keep``, the GPU-resident pages, nor ``also``, the current request's)
        until ``need`` slots are free or nothing more may go; returns the evicted page ids."""
        short = need - self.pool.available_size()
        if short <= 0:
            return []
        victims = []
        for pid in self.slot:
            if pid not in keep and pid not in also:
                victims.append(pid)
                if len(victims) >= short:
                    break
        if victims:
            import torch

            idx = torch.tensor([self.slot.pop(p) for p in victims], dtype=torch.int64)
            self.pool.free(idx)
            self.evicted += len(victims)
            if self.on_evict is not None:
                self.on_evict(victims)
        return victims

    def alloc(self, pids, keep, also=()) -> list:
        """Host slots for ``pids`` (prefix order), evicting as needed; returns the slots of the leading pids that got
        one (the rest of the chain gets none, as write_backup needs the parent backed up)."""
        self.make_room(len(pids), keep, also)
        n = min(len(pids), self.pool.available_size())
        self.refused += len(pids) - n
        if n == 0:
            return []
        idx = self.pool.alloc(n)
        if idx is None:
            raise ReplayError(f"host pool refused {n} slots with {self.pool.available_size()} free")
        slots = [int(i) for i in idx]
        for pid, s in zip(pids, slots):
            self.slot[pid] = s
        return slots

    def write(self, pids, keep) -> list:
        """Back up ``pids`` (prefix order, none host-resident) from the 'GPU' into the pool; returns those written."""
        slots = self.alloc(pids, keep)
        for pid, s in zip(pids, slots):
            self.pool.set_from_flat_data_page(s, self.synth.torch_page(pid))
        self.written += len(slots)
        return list(pids[: len(slots)])

    def page(self, pid: int):
        return self.pool.get_data_page(self.slot[pid], flat=True)

    def set_page(self, slot: int, page: np.ndarray) -> None:
        """Write a decoded page (numpy bf16 bits) into a host slot."""
        import torch

        self.pool.set_from_flat_data_page(slot, torch.from_numpy(page.view(np.int16)).view(torch.bfloat16).flatten())

    def release(self, pids) -> None:
        """Give back the slots of ``pids`` (allocated for pages that then did not arrive)."""
        if len(pids):
            import torch

            self.pool.free(torch.tensor([self.slot.pop(p) for p in pids], dtype=torch.int64))


def file_storage_config(max_bytes: int):
    """The HiCacheStorageConfig SGLang builds for a single-rank MHA server, with HiCacheFile's LRU byte cap."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="bench-8b",
        extra_config={"max_size": int(max_bytes)} if max_bytes else {},
    )


class FileTier:
    """SGLang's HiCacheFile (one raw file per page in ``path``, LRU byte cap ``max_bytes``) behind ``host``, called
    as HiCacheController calls it: batch_exists, batch_get into dummy pages then set_from_flat_data_page, batch_set
    of host pages."""

    def __init__(self, path: str, max_bytes: int, host: HostTier):
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        if os.environ.get("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"):
            raise ReplayError(
                "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR is set: HiCacheFile would ignore the replay's "
                "directory; unset it"
            )
        self.path = path
        self.store = HiCacheFile(file_storage_config(max_bytes), file_path=path)
        self.host = host
        self.max_bytes = max_bytes
        self.files_written = self.files_evicted = self.pages_read = 0
        self.ever_written: set = set()
        self.read_unwritten = 0
        ev = self.store._evictor
        commit, evict_one = ev.commit, ev._evict_one_lru_locked

        def counted_commit(suffixed_key):  # called once per file that really lands on disk
            self.files_written += 1
            self.ever_written.add(suffixed_key)
            return commit(suffixed_key)

        def counted_evict():
            out = evict_one()
            self.files_evicted += 1
            return out

        ev.commit, ev._evict_one_lru_locked = counted_commit, counted_evict

    @staticmethod
    def key(pid: int) -> str:
        return f"{pid:064x}"  # SGLang's keys are 64-hex page hashes; a page id is unique with its prefix here

    def exists(self, pids) -> int:
        return self.store.batch_exists([self.key(p) for p in pids])

    def fetch(self, pids, slots) -> int:
        """Read ``pids`` into host ``slots``; returns how many leading pages arrived."""
        keys = [self.key(p) for p in pids]
        got = self.store.batch_get(keys, [self.host.pool.get_dummy_flat_data_page() for _ in keys])
        n = 0
        for k, s, data in zip(keys, slots, got):
            if data is None:
                break
            if self.store._get_suffixed_key(k) not in self.ever_written:
                self.read_unwritten += 1
            self.host.pool.set_from_flat_data_page(s, data)
            n += 1
        self.pages_read += n
        return n

    def store_pages(self, pids) -> bool:
        if not pids:
            return True
        return self.store.batch_set([self.key(p) for p in pids], [self.host.page(p) for p in pids])

    def disk_bytes(self) -> int:
        total = 0
        with os.scandir(self.path) as it:
            for e in it:
                if e.name.endswith(".bin") and e.is_file():
                    total += e.stat().st_size
        return total
