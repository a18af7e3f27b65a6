"""KvdriveStorage against SGLang's HiCacheStorage v1 semantics, with real SGLang host pools on CPU."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from tests.sglang.backend_case import PAGE, make_backend, make_host, make_mla_host, pages_of, written  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def keys(n, start=0):
    return [f"{i:064x}" for i in range(start, start + n)]


@pytest.mark.parametrize("layout", ["layer_first", "page_first"])
@pytest.mark.parametrize("codec", ["zstd", "raw"])
def test_set_then_get_into_other_host_slots_is_bit_exact(tmp_path, layout, codec):
    host = make_host(layout)
    be = make_backend(tmp_path, host, codec=codec)
    idx, want = written(host, 6)
    assert be.batch_set_v1(keys(6), idx) == [True] * 6
    assert be.batch_exists(keys(6)) == 6
    dst = host.alloc(6 * PAGE)
    assert be.batch_get_v1(keys(6), dst) == [True] * 6
    for a, b in zip(pages_of(host, dst, 6), want):
        assert torch.equal(a, b)
    be.close()


def test_partial_hits_count_leading_pages_only(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    idx, want = written(host, 4)
    be.batch_set_v1(keys(4), idx)
    probe = keys(2) + keys(1, start=99) + keys(1, start=3)  # hit, hit, miss, hit
    assert be.batch_exists(probe) == 2
    dst = host.alloc(4 * PAGE)
    got = be.batch_get_v1(probe, dst)
    assert got == [True, True, False, False]  # SGLang uses the leading run; nothing after a miss is claimed
    for a, b in zip(pages_of(host, dst, 2), want[:2]):
        assert torch.equal(a, b)
    assert be.batch_exists([]) == 0 and be.batch_get_v1([], dst[:0]) == []
    be.close()


@pytest.mark.parametrize(
    "change",
    [
        dict(tp_rank=1, tp_size=2),
        dict(model="other-model"),
        dict(dtype=torch.float16),
        dict(layout="page_first"),
        dict(head_dim=8),
    ],
)
def test_incompatible_servers_never_share_pages(tmp_path, change):
    host = make_host()
    be = make_backend(tmp_path, host)
    idx, _ = written(host, 3)
    be.batch_set_v1(keys(3), idx)
    be.close()
    host_args = {k: change[k] for k in ("dtype", "layout", "head_dim") if k in change}
    be_args = {k: change[k] for k in ("tp_rank", "tp_size", "model") if k in change}
    other = make_backend(tmp_path, make_host(**host_args), **({"tp_size": 1} | be_args))
    assert other.batch_exists(keys(3)) == 0
    other.close()


def test_restart_in_a_new_process_still_hits(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    idx, _ = written(host, 5, seed=7)
    assert all(be.batch_set_v1(keys(5), idx))
    be.close()
    p = subprocess.run(
        [sys.executable, "-m", "tests.sglang.backend_case", str(tmp_path), "7", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"exists": 5, "got": 5, "identical": True}


def test_corrupted_page_is_a_miss(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host, codec="raw")
    idx, want = written(host, 3)
    be.batch_set_v1(keys(3), idx)
    be.close()  # everything written down
    second = want[1].view(torch.uint8).numpy().tobytes()  # raw codec: the payload is the page's own bytes
    for seg in glob.glob(str(tmp_path / "segments" / "*.kvs")):
        data = open(seg, "rb").read()
        at = data.find(second)
        if at >= 0:
            with open(seg, "r+b") as f:  # flip a byte inside the 2nd page's payload
                f.seek(at + len(second) // 2)
                f.write(bytes([data[at + len(second) // 2] ^ 0xFF]))
            break
    else:
        pytest.fail("second page not found in any segment")
    be = make_backend(tmp_path, host, codec="raw")
    dst = host.alloc(3 * PAGE)
    got = be.batch_get_v1(keys(3), dst)
    assert got == [True, False, False]
    assert torch.equal(pages_of(host, dst, 1)[0], want[0])
    assert be.batch_exists(keys(3)) == 1  # the bad page was dropped, never served
    assert be.tier_stats()["disk"]["corrupt_dropped"] == 1
    be.close()


def test_mla_ranks_share_one_namespace_and_only_rank0_writes(tmp_path, monkeypatch):
    """MLA replicas: one namespace, rank 0 writes, and rank 1 counts and reads rank 0's DRAM-tier pages through the
    node-shared replica mirror, with nothing on disk. Before the mirror, rank 1 saw only what had reached the disk
    (this test used to flush rank 0 to disk first), so SGLang's minimum over ranks capped every hit at the disk."""
    from kvdrive_sglang import storage_backend

    monkeypatch.setattr(storage_backend, "MIRROR_ROOT", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    host = make_mla_host()
    r0 = make_backend(tmp_path / "store", host, tp_rank=0, tp_size=2, mla=True, host_gb=0.2)
    r1 = make_backend(tmp_path / "store", host, tp_rank=1, tp_size=2, mla=True, host_gb=0.2)
    try:
        assert r0.ns.id == r1.ns.id and r0.ns.layout == "mla" and r0.ns.head_dim == 32 + 8
        assert r0.engine.mirror.publisher and not r1.engine.mirror.publisher
        dst = host.alloc(2 * PAGE)
        idx, _ = written(host, 2)
        assert r1.batch_set_v1(keys(2), idx) == [True, True]  # accepted, not written (rank 0 writes)
        assert r1.engine.stats().dram.inserts == 0
        assert r0.batch_set_v1(keys(2), idx) == [True, True]
        deadline = time.monotonic() + 30  # staged -> encoded -> published: milliseconds, on a loaded CI box more
        while r1.batch_exists(keys(2)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r1.batch_exists(keys(2)) == 2 == r0.batch_exists(keys(2))
        assert r1.batch_get_v1(keys(2), dst) == [True, True]
        assert all(torch.equal(a, b) for a, b in zip(pages_of(host, dst, 2), pages_of(host, idx, 2)))
        assert r0.engine.stats().disk.entries == 0  # not through the disk (selective write-down admitted nothing)
        s1 = r1.engine.stats()
        assert s1.hits_disk == 0 and s1.mirror["hits"] == 2 and r0.engine.stats().mirror["published"] == 2
    finally:
        r0.close()
        r1.close()


def test_legacy_api_and_events(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    page = host.get_dummy_flat_data_page().normal_()
    assert be.set("k", page) is True and be.exists("k")
    out = be.get("k")
    assert torch.equal(out, page)
    assert be.batch_get(["k", "nope"])[1] is None
    be.record_radix_event("storage_hit", 64)
    with pytest.raises(ValueError, match="unknown radix event"):
        be.record_radix_event("bogus", 1)
    st = be.tier_stats()
    assert st["radix"]["storage_hit"] == 64 and st["dram"]["entries"] == 1
    be.clear()
    assert not be.exists("k")
    be.close()


def test_missing_kvdrive_config_is_a_clear_error(tmp_path):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    from kvdrive_sglang.storage_backend import KvdriveStorage
    from kvdrive_sglang.tier.errors import ConfigError

    cfg = HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="m",
        extra_config={"backend_name": "kvdrive"},
    )
    with pytest.raises(ConfigError, match="--kv-tier kvdrive"):
        KvdriveStorage(cfg, {})
    cfg.extra_config = {"kvdrive": {"dir": str(tmp_path), "colour": "blue"}}
    with pytest.raises(ConfigError, match="colour"):
        KvdriveStorage(cfg, {})
    # disk-store options reach the store (the e2e fault tests set a short retry and a tiny map this way) ...
    cfg.extra_config = {"kvdrive": {"dir": str(tmp_path), "disk": {"retry_after_s": 2, "map_size": 1 << 20}}}
    be = KvdriveStorage(cfg, {})
    assert be.engine.disk.config.retry_after_s == 2 and be.engine.disk.config.map_size == 1 << 20
    be.close()
    # ... and a bad one is a one-line error naming it
    for disk, named in (
        ({"retry_afterr_s": 2}, "retry_afterr_s"),
        ({"retry_after_s": -1}, "retry_after_s"),
        ("fast", "disk"),
    ):
        cfg.extra_config = {"kvdrive": {"dir": str(tmp_path), "disk": disk}}
        with pytest.raises(ConfigError, match=named):
            KvdriveStorage(cfg, {})


def test_model_identity_changes_when_weights_change_in_place(tmp_path):
    from kvdrive_sglang.storage_backend import model_identity

    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text('{"hidden_size": 64}')
    (m / "model.safetensors").write_bytes(b"a" * 100)
    first = model_identity(str(m))
    assert first.startswith(str(m) + "@") and model_identity(str(m)) == first
    os.utime(m / "model.safetensors", ns=(1, 1))  # a new fine-tune written over the old one
    assert model_identity(str(m)) != first
    assert model_identity("org/hub-model") == "org/hub-model" and model_identity(None) == "unknown-model"


def test_disk_hits_slower_than_recompute_are_not_claimed(tmp_path):
    host = make_host()
    idx, _ = written(host, 4)
    be = make_backend(tmp_path, host)
    be.batch_set_v1(keys(4), idx)
    be.close()  # all four pages now on disk only
    # a disk this slow (1 KB/s) loses to recomputing 4 tokens a page at 10k tokens/s: kvdrive must say "miss"
    slow = make_backend(tmp_path, make_host(), promoter={"disk_gbps": 1e-6})
    assert slow.batch_exists(keys(4)) == 0
    assert slow.tier_stats()["io"]["recompute_pages"] == 4
    slow.close()
    fast = make_backend(tmp_path, make_host())
    assert fast.batch_exists(keys(4)) == 4  # the default model: reloading beats recomputing
    fast.close()


def test_attention_and_accesses_become_eviction_scores(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    idx, _ = written(host, 3)
    be.batch_set_v1(keys(3), idx)
    assert be.engine.flush(timeout=30)  # staged pages reach the DRAM pool (TierEngine.stage_many)
    be.record_attention({keys(3)[2]: 0.9})
    assert be.push_scores() == 3 and be.push_scores() == 0
    pool = be.engine.pool
    scores = [pool._map[(be.ns.id, k.encode())].score for k in keys(3)]
    assert all(sc > 0 for sc in scores) and scores[2] == max(scores)  # the attended page is worth most
    assert be.tier_stats()["promoter"]["attention_updates"] >= 1
    be.close()


def test_bad_promoter_options_are_clear_errors(tmp_path):
    from kvdrive_sglang.tier.errors import ConfigError

    with pytest.raises(ConfigError, match="disk_gbps"):
        make_backend(tmp_path, make_host(), promoter={"disk_gbps": -1})
    with pytest.raises(ConfigError, match="colour"):
        make_backend(tmp_path, make_host(), promoter={"colour": 1})


def test_gil_switch_interval_is_shortened_for_hicache_io_threads(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kvdrive_sglang.compat import server_args as compat_args
    from kvdrive_sglang.config import GIL_SWITCH_MS, KvdriveSettings
    from kvdrive_sglang.storage_backend import apply_gil_switch
    from kvdrive_sglang.tier.errors import ConfigError

    def gil_switch_s_from(extra, device="cpu"):  # what the server's backend reads back
        return KvdriveSettings.from_extra_config(extra).gil_switch_s(device)

    assert gil_switch_s_from({"kvdrive": {"dir": "x"}}) == GIL_SWITCH_MS["cpu"] / 1000
    assert gil_switch_s_from({"kvdrive": {"dir": "x", "gil_switch_ms": 0}}) == 0
    # a GPU server keeps Python's own interval unless told (config.GIL_SWITCH_MS says why); the setting wins anywhere
    assert gil_switch_s_from({"kvdrive": {"dir": "x"}}, "cuda") == 0
    assert gil_switch_s_from({"kvdrive": {"dir": "x"}}, "cuda:1") == 0
    assert gil_switch_s_from({"kvdrive": {"dir": "x", "gil_switch_ms": 1}}, "cuda") == 0.001
    for bad in (-1, 1000, "fast", True, float("nan")):
        with pytest.raises(ConfigError, match="gil_switch_ms"):
            gil_switch_s_from({"kvdrive": {"dir": "x", "gil_switch_ms": bad}})
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # Python's default
        monkeypatch.setattr(compat_args, "running_server_args", lambda: SimpleNamespace(device="cuda"))
        make_backend(tmp_path / "gpu", make_host()).close()
        assert sys.getswitchinterval() == pytest.approx(0.005)  # a GPU server's scheduler thread: untouched
        monkeypatch.setattr(compat_args, "running_server_args", lambda: SimpleNamespace(device="cpu"))
        make_backend(tmp_path / "cpu", make_host()).close()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_MS["cpu"] / 1000)
        apply_gil_switch(0.002)  # never lengthened
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_MS["cpu"] / 1000)
        apply_gil_switch(0)  # 0: leave it
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_MS["cpu"] / 1000)
    finally:
        sys.setswitchinterval(before)


# Every host-pool layout name SGLang's MHA host pool has had (0.5.17 - 0.5.23); each test below skips the ones the
# installed SGLang cannot build on CPU or cannot copy flat pages of (page_unified: no per-page copy).
MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head", "page_unified"]


def flat_page_host(layout, **kw):
    """A real SGLang MHA host pool in ``layout`` whose flat-page copy works, or skip."""
    try:
        host = make_host(layout, **kw)
        host.get_data_page(0, flat=True)
    except (ValueError, NotImplementedError) as e:
        pytest.skip(f"this SGLang has no flat-page copy for MHA layout {layout}: {e}")
    return host


@pytest.mark.parametrize("layout", MHA_LAYOUTS)
def test_batched_host_copies_are_exact_at_scattered_slots(tmp_path, layout):
    """Pages move between SGLang's host pool and the tiers in one gather / one scatter per batch (fewer GIL
    hand-overs beside the scheduler loop) where the pool's buffer allows it, SGLang's own per-page copy elsewhere:
    out-of-order, non-adjacent host slots both ways stay bit-exact in every layout."""
    from kvdrive_sglang.host_pages import BATCHED_LAYOUTS

    host = flat_page_host(layout, size=256)
    be = make_backend(tmp_path, host)
    assert be.pages.layout == (layout if layout in BATCHED_LAYOUTS else None)
    idx, want = written(host, 8)
    order = [5, 0, 7, 2, 6, 1, 3, 4]
    src = torch.cat([idx[i * PAGE : (i + 1) * PAGE] for i in order])
    assert all(be.batch_set_v1(keys(8), src))
    host.alloc(4 * PAGE)  # a gap
    out = host.alloc(8 * PAGE)
    perm = [3, 7, 0, 5, 1, 6, 2, 4]
    dst = torch.cat([out[i * PAGE : (i + 1) * PAGE] for i in perm])
    assert be.batch_get_v1(keys(8), dst) == [True] * 8
    for j in range(8):
        assert torch.equal(host.get_data_page(int(dst[j * PAGE]), flat=True), want[order[j]]), j
    be.close()


@pytest.mark.parametrize("layout", MHA_LAYOUTS)
def test_host_pages_copy_exactly_what_sglangs_own_page_copy_does(layout):
    """HostPages against SGLang's own get_data_page / set_from_flat_data_page on the same real pool, byte for byte,
    with every dimension distinct (a transposed layers/heads/tokens axis cannot hide) and pages out of order: the
    batched gather reads what the per-page copy reads, and the batched scatter writes the very buffer the per-page
    copy writes (a round trip alone would miss a permutation that read and write both made)."""
    from kvdrive_sglang.host_pages import HostPages

    shape = dict(dtype=torch.float32, heads=3, head_dim=5, layers=2, size=128)
    host = flat_page_host(layout, **shape)
    pages = HostPages(host)
    starts = [7 * PAGE, 2 * PAGE, 11 * PAGE, 0, 5 * PAGE]
    g = torch.Generator().manual_seed(7)
    host.kv_buffer.copy_(torch.randn(host.kv_buffer.shape, generator=g))
    got = pages.read(starts)
    for s, row in zip(starts, got):
        want = host.get_data_page(s, flat=True)
        assert bytes(torch.as_tensor(row).view(torch.uint8).reshape(-1).numpy()) == bytes(
            want.contiguous().view(torch.uint8).numpy()
        ), s
    new = torch.randn((len(starts), pages.page_numel), generator=g)
    twin = make_host(layout, **shape)
    twin.kv_buffer.copy_(host.kv_buffer)
    pages.write(starts, new)
    for s, p in zip(starts, new):
        twin.set_from_flat_data_page(s, p)
    assert torch.equal(host.kv_buffer.view(torch.int32), twin.kv_buffer.view(torch.int32))
    assert pages.read(starts[:1])[0].equal(host.get_data_page(starts[0], flat=True))  # one page: SGLang's own copy


def test_a_host_pool_without_a_flat_page_copy_is_refused_at_start(tmp_path):
    """SGLang 0.5.23's MHA host pool builds a page_unified buffer but copies no flat pages out of it: kvdrive refuses
    it when SGLang registers the pool, naming the layout, rather than failing every backup on SGLang's I/O thread."""
    from kvdrive_sglang.tier.errors import ConfigError

    try:
        host = make_host("page_unified")
    except ValueError as e:
        pytest.skip(f"this SGLang has no page_unified MHA host pool: {e}")
    with pytest.raises(ConfigError, match="page_unified"):
        make_backend(tmp_path, host)


def test_mla_host_pools_are_batched_too():
    """SGLang's MLA host pool moves its pages in one gather / scatter a batch too, in its layer_first and (GPU
    default) page_first layouts; tests/sglang/test_host_pages.py checks every kind and layout bit-exact."""
    from kvdrive_sglang.host_pages import HostPages

    assert HostPages(make_mla_host()).layout == "layer_first"
    assert HostPages(make_mla_host("page_first")).layout == "page_first"


# The namespace ids of these configs before SGLang 0.5.23's config fields existed: a config without them, or with
# their defaults, must keep its namespace (and so every page a server stored) on every supported SGLang.
PINNED_NAMESPACES = [
    (dict(layout="layer_first"), dict(), "dc078dc05e3d8bdc18da3a17fc2da664"),
    (dict(layout="page_first"), dict(tp_rank=1, tp_size=2), "54b7f2cf251d430bd828022eb309f40d"),
    (dict(layout="layer_first"), dict(tp_lcm_size=4, should_split_heads=True), "67010e88b3815006bd0cf6db6e73329a"),
    (dict(mla=True), dict(tp_rank=1, tp_size=2, is_mla_model=True), "b78d73e018496cd2f15e4fcce8c0a239"),
]


def _storage_config(**kw):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    base = dict(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="tiny-llama",
    )
    return HiCacheStorageConfig(**{**base, **kw})


def _newer_config_fields():
    import dataclasses

    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return {f.name for f in dataclasses.fields(HiCacheStorageConfig)} >= {
        "dp_rank",
        "dcp_size",
        "dcp_rank",
        "logical_page_size",
    }


@pytest.mark.parametrize("host_kw,cfg,pinned", PINNED_NAMESPACES)
def test_namespaces_stay_what_they_were(host_kw, cfg, pinned):
    from kvdrive_sglang.storage_backend import namespace_for

    host = make_mla_host() if host_kw.get("mla") else make_host(host_kw["layout"])
    assert _without_key_scheme(namespace_for(_storage_config(**cfg), host)).id.hex() == pinned
    if _newer_config_fields():  # 0.5.23's fields at their defaults change nothing
        explicit = _storage_config(**cfg, dp_rank=0, dcp_size=1, dcp_rank=0, logical_page_size=None)
        assert _without_key_scheme(namespace_for(explicit, host)).id.hex() == pinned


def _without_key_scheme(ns):
    """The namespace as it was before SGLang generations were told apart (no ``keys`` field)."""
    from dataclasses import replace

    return replace(ns, extra=tuple((k, v) for k, v in ns.extra if k != "keys"))


@pytest.mark.parametrize("host_kw,cfg,pinned", PINNED_NAMESPACES[:1])
def test_the_key_scheme_of_the_sglang_generation_is_part_of_the_namespace(host_kw, cfg, pinned):
    """SGLang 0.5.21+ derives page keys differently (it salts chains itself, kvdrive tags them): pages written under
    the other generation's keys must be missed, never read as this one's. The HiRadixCache generation keeps the
    namespace every existing store was written under."""
    from kvdrive_sglang.compat import radix_adapter
    from kvdrive_sglang.storage_backend import namespace_for

    ns = namespace_for(_storage_config(**cfg), make_host(host_kw["layout"]))
    if radix_adapter().name == "hiradix":
        assert "keys" not in dict(ns.extra) and ns.id.hex() == pinned
    else:
        assert dict(ns.extra)["keys"] == radix_adapter().key_scheme == "sglang-ns-v1"
        assert ns.id.hex() != pinned


def test_dp_and_dcp_ranks_get_namespaces_of_their_own(tmp_path):
    """SGLang 0.5.23: with DP attention tp_rank counts within a DP group, so dp_rank tells the groups' ranks apart;
    with decode context parallelism each MLA rank holds its DCP shard of every page, and SGLang names the writer of
    each shard (is_storage_writer: the first DCP group), not TP rank 0."""
    if not _newer_config_fields():
        pytest.skip("this SGLang's HiCacheStorageConfig has no dp_rank / dcp fields")
    from kvdrive_sglang.storage_backend import namespace_for

    host = make_host()
    base = namespace_for(_storage_config(), host)
    dp1 = namespace_for(_storage_config(dp_rank=1), host)
    assert dp1.id != base.id and dict(dp1.extra)["dp"] == "1"
    mla = make_mla_host()

    def dcp(tp_rank, dp_rank=0):
        return dict(
            tp_rank=tp_rank,
            tp_size=4,
            is_mla_model=True,
            dcp_size=2,
            dcp_rank=tp_rank % 2,
            logical_page_size=2 * PAGE,
            dp_rank=dp_rank,
        )

    ns = {r: namespace_for(_storage_config(**dcp(r)), mla) for r in range(4)}
    assert ns[0].id == ns[2].id and ns[1].id == ns[3].id and ns[0].id != ns[1].id  # one namespace per DCP shard
    assert dict(ns[1].extra)["dcp"] == "1/2" and dict(ns[1].extra)["logical_page_size"] == str(2 * PAGE)
    no_dcp = namespace_for(_storage_config(tp_rank=0, tp_size=4, is_mla_model=True), mla)
    assert no_dcp.id not in (ns[0].id, ns[1].id)
    assert namespace_for(_storage_config(**dcp(0, dp_rank=1)), mla).id != ns[0].id
    # the writers are SGLang's: ranks 0 and 1 (each its shard), ranks 2 and 3 only read
    backends = [
        make_backend(
            tmp_path,
            mla,
            mla=True,
            tp_rank=r,
            tp_size=4,
            config={k: v for k, v in dcp(r).items() if k not in ("tp_rank", "tp_size", "is_mla_model")},
        )
        for r in range(4)
    ]
    try:
        assert [b.read_only for b in backends] == [False, False, True, True]
        assert [b.ns.id for b in backends] == [ns[r].id for r in range(4)]
        idx, _ = written(mla, 2)
        assert backends[3].batch_set_v1(keys(2), idx) == [True, True]  # accepted, not written (rank 1 writes)
        assert backends[3].engine.stats().dram.inserts == 0
        assert backends[1].batch_set_v1(keys(2), idx) == [True, True]
        assert backends[1].engine.flush(timeout=30)
        assert backends[1].engine.stats().dram.inserts == 2
    finally:
        for b in backends:
            b.close()


def test_the_writer_rule_on_every_sglang():
    """Which ranks write, on SGLang's real config: 0.5.23's says so itself (is_storage_writer), 0.5.17's has no such
    property and kvdrive's own rule applies (MLA: TP rank 0 only). Without DCP both give the same answer."""
    from kvdrive_sglang.storage_backend import storage_writer

    assert [storage_writer(_storage_config(is_mla_model=True, tp_rank=r, tp_size=3)) for r in range(3)] == [
        True,
        False,
        False,
    ]
    assert all(storage_writer(_storage_config(tp_rank=r, tp_size=3)) for r in range(3))


def test_checkpoints_served_under_one_name_never_share_a_namespace(tmp_path, monkeypatch):
    """--served-model-name names the model to SGLang's storage config; two checkpoints (or revisions) served under one
    name must still get namespaces of their own (a shared one serves one model's KV to the other: wrong output)."""
    from types import SimpleNamespace

    from kvdrive_sglang.compat import server_args as compat_args
    from kvdrive_sglang.storage_backend import namespace_for

    dirs = []
    for i in range(2):
        d = tmp_path / f"ckpt{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "seed": i}))
        dirs.append(str(d))
    host = make_host()
    config = _storage_config(model_name="shared-name")

    def ns_served(path, revision=None, name="shared-name"):
        # the three fields kvdrive reads of the ServerArgs SGLang publishes in a scheduler process (a real
        # ServerArgs would load the model's config here)
        args = SimpleNamespace(model_path=path, served_model_name=name, revision=revision)
        monkeypatch.setattr(compat_args, "running_server_args", lambda: args)
        return namespace_for(config, host)

    a, b = ns_served(dirs[0]), ns_served(dirs[1])
    assert a.id != b.id and a.model.startswith(dirs[0] + "@") and b.model.startswith(dirs[1] + "@")
    assert ns_served(dirs[0]).id == a.id  # the same checkpoint again: the same namespace (a restart finds its pages)
    r1, r2 = ns_served(dirs[0], "r1"), ns_served(dirs[0], "r2")
    assert len({a.id, r1.id, r2.id}) == 3 and r1.model.endswith("@revision=r1")
    # no server published in this process, or another server's args: SGLang's name, as before
    monkeypatch.setattr(compat_args, "running_server_args", lambda: None)
    assert namespace_for(config, host).model == "shared-name"
    assert ns_served(dirs[0], name="other-name").model == "shared-name"


def test_fp8_formats_never_share_a_namespace(tmp_path, monkeypatch):
    """fp8_e4m3 and fp8_e5m2 KV are both uint8 in SGLang's pools: the server's --kv-cache-dtype (and its scales
    file) must tell their namespaces apart, or one format's bytes are served as the other's."""
    from types import SimpleNamespace

    from kvdrive_sglang.compat import server_args as compat_args
    from kvdrive_sglang.storage_backend import namespace_for

    host = make_host(dtype=torch.float8_e4m3fn)
    assert host.dtype == torch.uint8  # what SGLang stores fp8 KV as
    config = _storage_config()
    scales = tmp_path / "kv_scales.json"
    scales.write_text("{}")

    def ns(kv_cache_dtype, scales_path=None):
        args = SimpleNamespace(
            model_path="tiny-llama",
            served_model_name="other",
            revision=None,
            kv_cache_dtype=kv_cache_dtype,
            quantization_param_path=scales_path,
        )
        monkeypatch.setattr(compat_args, "running_server_args", lambda: args)
        return namespace_for(config, host)

    e4m3, e5m2 = ns("fp8_e4m3"), ns("fp8_e5m2")
    assert e4m3.id != e5m2.id and dict(e4m3.extra)["kv_cache_dtype"] == "fp8_e4m3"
    assert ns("fp8_e4m3").id == e4m3.id
    with_scales = ns("fp8_e4m3", str(scales))
    assert with_scales.id != e4m3.id
    scales.write_text('{"k": 0.5}')  # other scales, same path
    assert ns("fp8_e4m3", str(scales)).id != with_scales.id
    bf16 = make_host()  # other dtypes: no field, their namespaces as they were
    assert "kv_cache_dtype" not in dict(namespace_for(config, bf16).extra)


# --- batch_set_v1 acknowledges after a cheap copy; kvdrive's encoder threads encode (kvdrive issue 15) -------------
@pytest.mark.parametrize("mla", [False, True])
def test_batch_set_v1_acknowledges_before_encoding_and_serves_staged_pages_bit_exact(tmp_path, mla):
    from tests.sglang.backend_case import fill

    # MLA page_first, one page: SGLang's per-page copy is a view of the pool, so the backend must copy it itself
    host = make_mla_host("page_first") if mla else make_host()
    be = make_backend(tmp_path, host, mla=mla)
    n = 1 if mla else 4
    idx, want = written(host, n, seed=5)
    with be.engine._staging._landing:  # the encoder threads may encode, not store: the pages stay staged
        assert be.batch_set_v1(keys(n), idx) == [True] * n
        assert be.engine.tiers_of(be.ns, keys(n)) == ["staged"] * n
        fill(host, [idx[i * PAGE] for i in range(n)], seed=6)  # SGLang reuses the slots once the write is acked
        assert be.batch_exists(keys(n)) == n  # the promoter plans a staged page like a DRAM one
        dst = host.alloc(n * PAGE)
        assert be.batch_get_v1(keys(n), dst) == [True] * n
        for a, b in zip(pages_of(host, dst, n), want):
            assert torch.equal(a, b)
    assert be.engine.flush(timeout=30)
    assert be.engine.tiers_of(be.ns, keys(n)) == ["dram"] * n
    dst = host.alloc(n * PAGE)
    assert be.batch_get_v1(keys(n), dst) == [True] * n
    for a, b in zip(pages_of(host, dst, n), want):
        assert torch.equal(a, b)
    be.close()


def test_batch_set_v1_never_encodes_on_sglangs_backup_thread(tmp_path, monkeypatch):
    import threading

    from kvdrive_sglang.tier import engine as engine_mod

    encoded_on, real = [], engine_mod.encode_page

    def recording(*args, **kw):  # the real encoder, noting which thread runs it
        encoded_on.append(threading.current_thread())
        return real(*args, **kw)

    monkeypatch.setattr(engine_mod, "encode_page", recording)
    host = make_host()
    be = make_backend(tmp_path, host)
    idx, want = written(host, 8)
    assert be.batch_set_v1(keys(8), idx) == [True] * 8
    assert be.engine.flush(timeout=30)
    assert len(encoded_on) == 8 and threading.current_thread() not in encoded_on
    dst = host.alloc(8 * PAGE)
    assert be.batch_get_v1(keys(8), dst) == [True] * 8
    for a, b in zip(pages_of(host, dst, 8), want):
        assert torch.equal(a, b)
    be.close()
