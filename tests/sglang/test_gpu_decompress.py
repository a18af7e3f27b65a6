"""``--kvdrive-gpu-decompress`` wired into SGLang's serving path (kvdrive_sglang/gpu_decompress.py), on real SGLang
pools on CPU through the test-only hook (``gpu_decompress.cpu_test_hook``: ``load_compressed`` runs its torch
references), on whichever SGLang runs the test (0.5.23: ``load_to_device_per_layer_physical``, 0.5.17:
``load_to_device_per_layer``; run it with both venvs).

With the flag on, a prefetch (``batch_get_v1``) records bplane / int8 pages instead of decoding them, and SGLang's
own per-layer load then leaves the device pool byte-identical to the flag-off path; a damaged blob is a host decode
or a miss, never an exception; a load_compressed that misses or raises falls back to the host; a recorded slot read
on the host (``get_data_page``, a backup to storage) is decoded first; a freed or backed-up-into slot's record goes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from kvdrive_sglang import gpu_decompress  # noqa: E402
from kvdrive_sglang.config import KvdriveSettings  # noqa: E402
from kvdrive_sglang.tier.codecs import HEADER  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402
from kvdrive_sglang.tier.namespace import key_bytes  # noqa: E402

from .backend_case import PAGE, fill  # noqa: E402
from .test_compressed_load_sglang import pools  # noqa: E402

N = 4  # pages per prefetch
DEVICE_PAGES = [6, 2, 9, 4]  # where SGLang's allocator put them: not in host order, not contiguous


def keys(n=N, base=0):
    return [f"{base + i:064x}" for i in range(n)]


def tokens(page_starts) -> torch.Tensor:
    return torch.tensor([s + j for s in page_starts for j in range(PAGE)], dtype=torch.int64)


def load_method(host) -> str:
    """The per-layer load SGLang's transfer calls on this generation (compat/unified.py, compat/hiradix.py)."""
    return (
        "load_to_device_per_layer_physical"
        if hasattr(type(host), "load_to_device_per_layer_physical")
        else "load_to_device_per_layer"
    )


def sglang_load(kv, host, host_starts, device_pages):
    """SGLang's own host -> device load, as its controller drives it with the direct I/O backend: host indices
    sorted (device indices permuted alike), one tensor pair for every layer, layers 0..n."""
    hi, di = tokens(host_starts), tokens([p * PAGE for p in device_pages])
    hi, order = hi.sort()
    di = di.index_select(0, order)
    load = getattr(host, load_method(host))
    for layer in range(host.layer_num):
        load(kv, hi, di, layer, "direct")


def backend(store_dir, host, codec, *, gpu_decompress_on):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config

    opts = KvdriveOptions(dir=str(store_dir), host_gb=0.01, disk_gb=1, codec=codec, reload="always")
    extra = json.loads(storage_extra_config(opts))
    extra["kvdrive"]["gpu_decompress"] = gpu_decompress_on
    mla = not hasattr(host, "head_num")
    cfg = HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="tiny",
        extra_config=extra,
    )
    be = StorageBackendFactory.create_backend("dynamic", cfg, host)
    be.register_mem_pool_host(host)
    return be


class Side:
    """One server's pools and backend, with N pages stored (encoded in its DRAM tier) under keys()."""

    def __init__(self, tmp_path, name, kind, codec, *, on):
        self.kv, self.host, self.layers = pools(kind)
        with gpu_decompress.cpu_test_hook():
            self.be = backend(tmp_path / name, self.host, codec, gpu_decompress_on=on)
        src = [int(s) for s in self.host.alloc(N * PAGE)[::PAGE]]
        fill(self.host, src, seed=5)
        self.src = [self.host.get_data_page(s, flat=True).clone() for s in src]
        assert all(self.be.batch_set_v1(keys(), tokens(src)))
        assert self.be.engine.flush(30)
        self.host.free(tokens(src))
        for t in self.layers:
            t.zero_()

    def prefetch(self, ks=None):
        """A prefetch into fresh host slots (SGLang's page transfer: alloc, batch_get_v1): (page starts, results)."""
        ks = ks or keys()
        idx = self.host.alloc(len(ks) * PAGE)
        starts = [int(s) for s in idx[::PAGE]]
        return starts, self.be.batch_get_v1(ks, idx)

    def device(self) -> list[np.ndarray]:
        return [t.view(torch.uint8).numpy().copy() for t in self.layers]

    def close(self):
        self.be.close()


@pytest.fixture
def sides(tmp_path, request):
    made = []

    def make(kind, codec, *, on):
        s = Side(tmp_path, f"{kind}-{codec}-{on}-{len(made)}", kind, codec, on=on)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def same_device(a: Side, b: Side) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.device(), b.device()))


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("codec", ["bplane", "int8"])
def test_prefetch_then_sglangs_load_leaves_the_device_pool_as_the_flag_off_path(sides, kind, codec):
    off, on = sides(kind, codec, on=False), sides(kind, codec, on=True)
    assert off.be.lazy is None and on.be.lazy is not None
    for side in (off, on):
        starts, got = side.prefetch()
        assert got == [True] * N
        extra = int(side.host.alloc(PAGE)[0])  # a page already in the host pool (backed up from the device)
        fill(side.host, [extra], seed=9)
        sglang_load(side.kv, side.host, [*starts, extra], [*DEVICE_PAGES, 7])
    # the flag's path ran: every prefetched page recorded (not decoded on the host), then loaded compressed
    assert on.be.lazy.counts["recorded"] == N and on.be.lazy.counts["loaded_compressed"] == N
    assert on.be.lazy.counts["host_decoded"] == 0 and on.be.lazy.counts["materialized"] == 0
    assert same_device(off, on)
    assert any(t.any() for t in on.device())
    assert on.be.tier_stats()["gpu_decompress"]["recorded_now"] == N  # slots stay lazy: a later load reuses them


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_a_second_load_of_the_same_slots_loads_them_again(sides, kind):
    """A node evicted from the device and loaded back again: its host slots are still recorded."""
    off, on = sides(kind, "bplane", on=False), sides(kind, "bplane", on=True)
    for side in (off, on):
        starts, _ = side.prefetch()
        sglang_load(side.kv, side.host, starts, DEVICE_PAGES)
        for t in side.layers:
            t.zero_()
        sglang_load(side.kv, side.host, starts, [1, 3, 5, 8])
    assert on.be.lazy.counts["loaded_compressed"] == 2 * N
    assert same_device(off, on)


def test_pages_read_from_the_disk_tier_are_recorded_too(sides):
    """A page only on disk comes as its verified blob (DiskStore.read_blobs: checksum, trailer, header)."""
    off, on = sides("mha", "bplane", on=False), sides("mha", "bplane", on=True)
    for side in (off, on):
        eng = side.be.engine
        eng.write_down(side.be.ns, keys())  # those the selective write-down has not written yet
        assert eng.flush(30) and all(eng.disk.contains(side.be.ns, keys()))
        eng.pool.drop_where(lambda e: True)  # DRAM tier empty: the disk serves them
        starts, got = side.prefetch()
        assert got == [True] * N
        sglang_load(side.kv, side.host, starts, DEVICE_PAGES)
    assert off.be.engine.stats().hits_disk == N  # the flag-off side decoded them from disk on the host
    assert on.be.engine.stats().hits_disk == 0  # read as blobs, not through get_many: no host decode of them
    assert on.be.lazy.counts["recorded"] == N and on.be.lazy.counts["loaded_compressed"] == N
    assert same_device(off, on)


def damaged(be, key, at: int, value: int) -> None:
    """The DRAM tier's blob of ``key`` with body byte ``at`` set to ``value`` (a pool put refreshes the entry)."""
    pk = (be.ns.id, key_bytes(key))
    blob = bytearray(be.engine.pool.get(pk))
    blob[HEADER.size + at] = value
    assert be.engine.pool.put(pk, bytes(blob), be.page_bytes, ns=be.ns)


def test_a_damaged_blob_is_a_miss_not_an_exception(sides):
    on = sides("mha", "bplane", on=True)
    ks = keys()
    damaged(on.be, ks[2], 6, 9)  # block 0's index width 9: an impossible descriptor (tests/tier/test_bplane.py)
    starts, got = on.prefetch()
    assert got == [True, True, False, False]  # the leading hits only; no exception into SGLang
    assert on.be.lazy.counts["check_body"] == 1  # refused by check_blob, then not decodable on the host either
    assert on.be.lazy.counts["recorded"] == 2
    assert [on.be.lazy.recorded(s) for s in starts] == [True, True, False, False]


def test_a_blob_the_device_check_refuses_but_the_host_decodes_is_a_host_hit(sides, monkeypatch):
    """check_blob is stricter than the host decode can be (say, device buffers of another shape): such a page is
    decoded on the host at prefetch, as without the flag, and SGLang copies it."""
    import kvdrive_sglang.kernels.compressed_load as cl

    off, on = sides("mla", "bplane", on=False), sides("mla", "bplane", on=True)
    refuse = keys()[1]
    real = cl.check_blob
    blob_of_refused = on.be.engine.pool.get((on.be.ns.id, key_bytes(refuse)))

    def check(blob, layers, page_size, *, checksum):
        return (
            cl.MissReason.SHAPE
            if bytes(blob) == bytes(blob_of_refused)
            else real(blob, layers, page_size, checksum=checksum)
        )

    monkeypatch.setattr(cl, "check_blob", check)
    for side in (off, on):
        starts, got = side.prefetch()
        assert got == [True] * N
        sglang_load(side.kv, side.host, starts, DEVICE_PAGES)
    assert on.be.lazy.counts["check_shape"] == 1 and on.be.lazy.counts["host_decoded"] == 1
    assert on.be.lazy.counts["loaded_compressed"] == N - 1
    assert same_device(off, on)


@pytest.mark.parametrize("failure", ["raises", "misses"])
def test_a_load_compressed_that_fails_decodes_on_the_host_instead(sides, monkeypatch, failure):
    import kvdrive_sglang.kernels.compressed_load as cl

    off, on = sides("mha", "bplane", on=False), sides("mha", "bplane", on=True)
    real = cl.load_compressed

    def failing(blobs, layers, page_ids, page_size, *, checksums, impl="auto"):
        if failure == "raises":
            raise RuntimeError("CUDA out of memory (injected)")
        res = real(blobs, layers, page_ids, page_size, checksums=checksums, impl=impl)
        # the second page missed (its device page untouched): a zeroed pool proves SGLang's copy filled it
        for t in layers:
            t.view(-1, *t.shape[1:])[page_ids[1] * page_size : (page_ids[1] + 1) * page_size] = 0
        return res._replace(ok=tuple(o and i != 1 for i, o in enumerate(res.ok)))

    monkeypatch.setattr(cl, "load_compressed", failing)
    for side in (off, on):
        starts, _ = side.prefetch()
        sglang_load(side.kv, side.host, starts, DEVICE_PAGES)
    assert same_device(off, on)
    want = N if failure == "raises" else 1
    assert on.be.lazy.counts["load_fallback"] == want and on.be.lazy.counts["materialized"] == want


def test_a_recorded_slot_read_on_the_host_is_decoded_first(sides):
    on = sides("mha", "bplane", on=True)
    starts, _ = on.prefetch()
    assert all(on.be.lazy.recorded(s) for s in starts)
    # SGLang's own host-side read of one page (its storage backends' per-page copy)
    page = on.host.get_data_page(starts[1], flat=True)
    assert torch.equal(page.view(torch.uint8), on.src[1].view(torch.uint8))
    assert not on.be.lazy.recorded(starts[1]) and on.be.lazy.recorded(starts[0])
    # kvdrive's own backup of recorded slots to storage (batch_set_v1 reads the slots in one gather)
    on.be.batch_set_v1(keys(2, base=100), tokens(starts[2:4]))
    assert not on.be.lazy.recorded(starts[2]) and not on.be.lazy.recorded(starts[3])
    for s, want in zip(starts[2:4], on.src[2:4]):
        assert torch.equal(on.host.get_data_page(s, flat=True).view(torch.uint8), want.view(torch.uint8))


def test_freed_and_backed_up_slots_drop_their_records(sides):
    on = sides("mha", "bplane", on=True)
    starts, _ = on.prefetch()
    on.host.free(tokens(starts[:2]))  # SGLang evicts the node from the host pool
    assert not on.be.lazy.recorded(starts[0]) and not on.be.lazy.recorded(starts[1])
    assert on.be.lazy.recorded(starts[2])
    # a device page backed up into a recorded slot (write-back): the slot holds that page now, not the blob
    backup = next(
        getattr(on.host, m)
        for m in ("backup_from_device_all_layer_physical", "backup_from_device_all_layer")
        if hasattr(on.host, m)
    )
    backup(on.kv, tokens(starts[2:3]), tokens([5 * PAGE]), "direct")
    assert not on.be.lazy.recorded(starts[2]) and on.be.lazy.recorded(starts[3])
    assert on.be.lazy.counts["materialized"] == 0  # nothing was decoded for slots that were dropped


def test_the_flag_is_refused_on_cpu_in_one_line_and_checked(tmp_path):
    values = {"kvdrive_dir": str(tmp_path), "kvdrive_gpu_decompress": "on"}
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^--kvdrive-gpu-decompress needs a CUDA device") as e:
            KvdriveSettings.from_flags(values)
        assert "\n" not in str(e.value)
    with gpu_decompress.cpu_test_hook():
        assert KvdriveSettings.from_flags(values).gpu_decompress is True
        s = KvdriveSettings.from_flags({**values, "kvdrive_gpu_decompress": "off"})
        assert s.gpu_decompress is False and "gpu_decompress" not in s.to_section()
        on = KvdriveSettings.from_flags(values)
        assert KvdriveSettings.from_extra_config(on.to_extra_config()) == on
    with pytest.raises(ConfigError, match="--kvdrive-gpu-decompress must be on or off"):
        KvdriveSettings.from_flags({**values, "kvdrive_gpu_decompress": "maybe"})
    with pytest.raises(ConfigError, match="kvdrive gpu_decompress must be true or false"):
        KvdriveSettings.from_extra_config({"kvdrive": {"dir": str(tmp_path), "gpu_decompress": "yes"}})


def test_the_plain_per_layer_load_called_directly_never_copies_a_stale_slot(sides):
    """HiSparse's coordinator calls a pool's load_to_device_per_layer itself (0.5.23), not through the physical one
    the transfer engine calls: recorded slots are decoded on the host first there (on 0.5.17 that call is the
    wrapped load itself, which loads them compressed)."""
    off, on = sides("mha", "bplane", on=False), sides("mha", "bplane", on=True)
    for side in (off, on):
        starts, _ = side.prefetch()
        hi, di = tokens(starts), tokens([p * PAGE for p in DEVICE_PAGES])
        for layer in range(side.host.layer_num):
            side.host.load_to_device_per_layer(side.kv, hi, di, layer, "direct")
    assert on.be.lazy.counts["materialized"] + on.be.lazy.counts["loaded_compressed"] == N
    assert same_device(off, on)
