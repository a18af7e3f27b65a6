"""Host pools beside the KV pool (kvdrive_sglang/pool_components.py), on real SGLang pools and calls:
speculative decoding's draft KV gets its own namespace under the right tenant (issue 15: draft pages landed in the
default tenant's namespace with the target's geometry), and a server whose host pools include state kvdrive cannot
store (hybrid / DSA models' HostPoolGroup) runs with kvdrive off instead of crashing at attach."""

import logging
from types import SimpleNamespace

import pytest
import torch

from kvdrive_sglang.compat import server_args as compat_args
from kvdrive_sglang.pool_components import split_component
from kvdrive_sglang.tier.tenants import tenant_id

from .backend_case import PAGE, make_backend, make_host, pages_of, written

CHAIN = "ab" * 32  # a 64-hex chain hash as SGLang makes them


def _draft_args(monkeypatch, draft_path="draft-a"):
    args = SimpleNamespace(
        model_path="tiny-llama",
        served_model_name="other",
        revision=None,
        speculative_draft_model_path=draft_path,
        speculative_draft_model_revision=None,
        speculative_algorithm="EAGLE",
    )
    monkeypatch.setattr(compat_args, "running_server_args", lambda: args)


def test_component_keys_split_only_on_sglang_pool_names():
    assert split_component(CHAIN + ".draft") == (CHAIN, "draft")
    assert split_component(CHAIN) == (CHAIN, "")
    assert split_component("doc.v2") == ("doc.v2", "")  # not a pool name: an ordinary key
    assert split_component(".draft") == (".draft", "")


def _legacy_controller(backend, draft_host):
    """The fields of SGLang 0.5.17's HiCacheController that its generic draft L3 path reads."""
    return SimpleNamespace(storage_backend=backend, mem_pool_host_draft=draft_host, page_size=PAGE)


@pytest.fixture
def legacy_draft_calls():
    cc = pytest.importorskip("sglang.srt.managers.cache_controller")
    ctl = cc.HiCacheController
    if not hasattr(ctl, "_draft_page_set_generic"):
        pytest.skip("this SGLang moves draft pages through the *_v2 calls (tested below)")
    return ctl._draft_page_set_generic, ctl._draft_page_get_generic


def test_legacy_draft_pages_live_under_their_tenant_in_a_draft_namespace(tmp_path, monkeypatch, legacy_draft_calls):
    """SGLang 0.5.17's generic draft path, run as SGLang runs it: ``"<key>.draft"`` pages of the draft's own
    geometry. They come back bit-exact, in a namespace of the draft's (component, draft model) under the tenant of
    the target key, never in the default tenant's or the target's."""
    set_draft, get_draft = legacy_draft_calls
    _draft_args(monkeypatch)
    target, draft = make_host(layers=2), make_host(layers=1, heads=1)
    be = make_backend(tmp_path / "s", target)
    tid = tenant_id("alice")
    keys = [CHAIN[:-2] + f"{i:02x}" + tid for i in range(3)]
    idx, want = written(draft, 3, seed=7)
    set_draft(_legacy_controller(be, draft), keys, idx)

    ns = be.ns_of(keys[0] + ".draft")
    assert ns.tenant == tid and dict(ns.extra)["component"] == "draft" and dict(ns.extra)["draft_model"] == "draft-a"
    assert ns.id not in (be.ns.id, be.ns_of(keys[0]).id)
    assert be.engine.exists_many(ns, [k + ".draft" for k in keys]) == 3
    default_draft = be.ns_of(CHAIN + ".draft")  # the same component, no tenant: holds none of alice's pages
    assert default_draft.tenant == "" and be.engine.exists_many(default_draft, [k + ".draft" for k in keys]) == 0
    assert be.batch_exists(keys) == 0  # draft pages are not target pages

    back = draft.alloc(3 * PAGE)
    get_draft(_legacy_controller(be, draft), keys, back)
    for got, w in zip(pages_of(draft, back, 3), want):
        assert torch.equal(got, w)
    be.close()


def test_legacy_draft_pages_of_another_draft_model_are_a_miss(tmp_path, monkeypatch, legacy_draft_calls):
    set_draft, get_draft = legacy_draft_calls
    draft = make_host(layers=1, heads=1)
    _draft_args(monkeypatch, "draft-a")
    be = make_backend(tmp_path / "s", make_host())
    idx, want = written(draft, 2, seed=3)
    keys = [CHAIN[:-1] + str(i) for i in range(2)]
    set_draft(_legacy_controller(be, draft), keys, idx)
    be.close()

    _draft_args(monkeypatch, "draft-b")  # the same target served with another draft model, same store
    be = make_backend(tmp_path / "s", make_host())
    assert be.batch_get([k + ".draft" for k in keys], [draft.get_dummy_flat_data_page() for _ in keys]) == [None] * 2
    be.close()


def _v2():
    hs = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
    if not hasattr(hs, "PoolTransfer"):
        pytest.skip("this SGLang has no multi-pool (*_v2) storage calls")
    return hs


def test_v2_draft_pool_round_trips_beside_the_kv_pool(tmp_path, monkeypatch):
    """SGLang 0.5.21+'s multi-pool calls with a draft pool registered by name: set, exists (a missing draft page
    ends the prefix, SGLang's ALL_PAGES policy) and get, bit-exact for both pools."""
    hs = _v2()
    _draft_args(monkeypatch)
    target, draft = make_host(), make_host(layers=1, heads=1)
    be = make_backend(tmp_path / "s", target)
    be.register_mem_host_pool_v2(draft, hs.PoolName.DRAFT)
    keys = [CHAIN[:-1] + str(i) for i in range(4)]
    idx, want_kv = written(target, 4, seed=1)
    didx = idx  # SGLang's draft transfers reuse the KV pool's host indices (indices_from_pool=KV)
    draft_want = []
    for i in range(4):
        page = draft.get_dummy_flat_data_page()
        page.copy_(torch.randn(page.shape, generator=torch.Generator().manual_seed(50 + i)).to(page.dtype))
        draft.set_from_flat_data_page(int(didx[i * PAGE]), page)
        draft_want.append(page.clone())
    res = be.batch_set_v2(
        [
            hs.PoolTransfer(name=hs.PoolName.KV, host_indices=idx, keys=keys),
            hs.PoolTransfer(name=hs.PoolName.DRAFT, host_indices=didx, keys=keys[:3]),
        ]
    )
    assert res == {"kv": [True] * 4, "draft": [True] * 3}

    draft_t = hs.PoolTransfer(name=hs.PoolName.DRAFT, keys=keys, indices_from_pool=hs.PoolName.KV)
    hit = be.batch_exists_v2(keys, [draft_t])
    assert hit.kv_hit_pages == 3 and hit.extra_pool_hit_pages == {"draft": 3}

    back = target.alloc(4 * PAGE)
    got = be.batch_get_v2(
        [
            hs.PoolTransfer(name=hs.PoolName.KV, host_indices=back, keys=keys),
            hs.PoolTransfer(name=hs.PoolName.DRAFT, host_indices=back, keys=keys),
        ]
    )
    assert got == {"kv": [True] * 4, "draft": [True] * 3 + [False]}
    for g, w in zip(pages_of(target, back, 4), want_kv):
        assert torch.equal(g, w)
    for i in range(3):
        assert torch.equal(draft.get_data_page(int(back[i * PAGE]), flat=True), draft_want[i])
    be.close()


def test_host_pool_group_with_state_pools_turns_kvdrive_off_not_the_server(tmp_path, monkeypatch, caplog):
    """A hybrid model's HostPoolGroup (here the KV pool plus a state pool kvdrive does not store): attach succeeds,
    one warning names the model type and the pool, and every call is a miss; before, attach raised
    AttributeError reading head_num from the group and took the server down."""
    hs = _v2()
    group_mod = pytest.importorskip("sglang.srt.mem_cache.pool_host.group")
    model = tmp_path / "qwen3-next"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"]}')
    monkeypatch.setattr(compat_args, "running_server_args", lambda: SimpleNamespace(model_path=str(model)))
    kv, state = make_host(), make_host(layers=1)
    entries = [
        group_mod.PoolEntry(
            name=hs.PoolName.KV, host_pool=kv, device_pool=None, layer_mapper=lambda i: i, is_primary_index_anchor=True
        ),
        group_mod.PoolEntry(name=hs.PoolName.MAMBA, host_pool=state, device_pool=None, layer_mapper=lambda i: i),
    ]
    group = group_mod.HostPoolGroup(entries)
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        be = make_backend(tmp_path / "s", group)
    lines = [r.getMessage() for r in caplog.records if "off for" in r.getMessage()]
    assert len(lines) == 1 and "qwen3_next" in lines[0] and "'mamba'" in lines[0]
    keys = [CHAIN[:-1] + str(i) for i in range(2)]
    idx = kv.alloc(2 * PAGE)
    assert be.batch_set_v1(keys, idx) == [False, False]
    assert be.batch_exists(keys) == 0 and be.batch_get_v1(keys, idx) == [False, False]
    state_t = hs.PoolTransfer(name=hs.PoolName.MAMBA, keys=keys[-1:], hit_policy=hs.PoolHitPolicy.TRAILING_PAGES)
    assert be.batch_exists_v2(keys, [state_t]).kv_hit_pages == 0
    assert be.batch_set_v2([state_t]) == {"mamba": [False]}
    be.close()


def test_unknown_pool_registered_later_turns_kvdrive_off(tmp_path, monkeypatch, caplog):
    """A state pool registered after attach (SGLang's dynamic sidecars) turns kvdrive off from then on: pages
    stored before stay, but nothing is served without its state."""
    hs = _v2()
    monkeypatch.setattr(compat_args, "running_server_args", lambda: None)
    target = make_host()
    be = make_backend(tmp_path / "s", target)
    keys = [CHAIN[:-1] + str(i) for i in range(2)]
    idx, _ = written(target, 2)
    assert be.batch_set_v1(keys, idx) == [True, True] and be.batch_exists(keys) == 2
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        be.register_mem_host_pool_v2(make_host(layers=1), hs.PoolName.SWA)
    assert any("off for" in r.getMessage() for r in caplog.records)
    assert be.batch_exists(keys) == 0
    be.close()
