"""kvdrive's radix cache on SGLang's UnifiedRadixCache generation (0.5.21 on), on real SGLang objects, on CPU.

Each test builds what SGLang's scheduler process builds and takes real ``Req`` objects through SGLang's own scheduler
code (tests/sglang/unified_driver.py: ServerArgs through kvdrive's ``--kv-tier kvdrive`` expansion, real device and
host pools, the cache from SGLang's registry over kvdrive's KvdriveStorage; queue entry through SGLang's own
Scheduler._prefetch_kvcache, PrefillAdder, ScheduleBatch.prepare_for_extend, release_kv_cache). The stand-ins: the
forward pass and the tp_worker, of which the factory calls one method.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from array import array

import pytest

pytest.importorskip("sglang")

from kvdrive_sglang.compat import radix_adapter, sglang_version  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402

try:
    _GENERATION = radix_adapter().name
except ConfigError as e:  # an SGLang with neither generation's seams
    pytest.skip(str(e), allow_module_level=True)
if _GENERATION != "unified":
    pytest.skip(
        f"SGLang {sglang_version()} is the {_GENERATION!r} radix-cache generation, not the unified one: "
        "tests/sglang/test_radix_backend.py and test_tenant_keys.py cover it",
        allow_module_level=True,
    )

import torch  # noqa: E402
from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.mem_cache import utils as sglang_utils  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.evict_policy import LFUStrategy  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixKey  # noqa: E402
from sglang.srt.mem_cache.unified_cache.components import ComponentType  # noqa: E402
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: E402
from sglang.srt.runtime_context import get_memory, restore_context, snapshot_context  # noqa: E402

from kvdrive_sglang import radix_backend  # noqa: E402
from kvdrive_sglang.compat import unified  # noqa: E402
from kvdrive_sglang.storage_backend import KvdriveStorage  # noqa: E402
from kvdrive_sglang.tier.tenants import group_id, tenant_id  # noqa: E402
from tests.sglang.unified_driver import EXT, PAGE, PROMPT, TAIL, Served, Server, kv_values, make_model_dir, sglang_keys

EVENTS_ZERO = dict.fromkeys(radix_backend.EVENT_KINDS, 0)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _group(process_group):  # tests/sglang/conftest.py: gloo group, kvdrive's backend registered, TP=1 topology
    yield


@pytest.fixture(scope="module", autouse=True)
def _runtime_context():
    """Each Server publishes its ServerArgs (as SGLang's scheduler process does); put back what was there."""
    saved = snapshot_context()
    yield
    restore_context(saved)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def servers(model_dir):
    made = []

    def make(store, **kw):
        srv = Server(store, model_dir, **kw)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ expected keys


def tenant_keys(tokens, name, *, extra_key=None, cache_salt=None) -> list[str]:
    """SGLang's own keys of a salted request, each followed by the id of the tenant ``name``."""
    return [k + tenant_id(name) for k in sglang_keys(tokens, extra_key=extra_key, cache_salt=cache_salt)]


def group_keys(tokens, group) -> list[str]:
    """Keys of a share_as group member's pages: the chain from the group's root prior (tier/tenants.py, pinned
    here), each followed by the group's id."""
    own_hash = inspect.unwrap(sglang_utils.get_hash_str)
    prior = hashlib.sha256(b"kvdrive-group-prior\0" + group.encode()).hexdigest()
    return [k + group_id(group) for k in own_hash(array("q", tokens), prior, page_size=PAGE)]


def assert_prefix_kv(served: Served, tokens):
    """The cached prefix the forward pass read is exactly ``tokens``' K/V, in every layer."""
    want = kv_values(tokens).view(-1, 1, 1).expand(-1, *served.prefix_kv[0][0].shape[1:])
    assert served.req.prefix_len == len(tokens)
    for k, v in served.prefix_kv:
        assert torch.equal(k, want) and torch.equal(v, -want)


# --------------------------------------------------------------------------------------------------------- tests


def test_factory_builds_kvdrive_cache_on_its_tree_core(tmp_path, servers):
    assert registry.get_radix_cache_factory("kvdrive") is unified.build_tree_cache
    srv = servers(tmp_path / "lru")
    cache = srv.cache
    assert type(cache) is unified.KvdriveUnifiedRadixCache and isinstance(cache, UnifiedRadixCache)
    assert cache._tree_core_backend == unified.TREE_CORE == "kvdrive"
    assert type(cache.tree_core) is unified.KvdriveTreeCore
    # SGLang's default LRU was asked for: kvdrive's value order instead
    assert get_memory().radix_eviction_policy == "lru"
    assert isinstance(cache.tree_core.eviction_strategy, radix_backend.PromoterEviction)
    assert cache.tree_core.eviction_strategy.cache is cache
    assert srv.worker.counters == [cache.cache_controller.layer_done_counter]
    assert type(srv.backend) is KvdriveStorage and cache.enable_storage
    assert cache.kvdrive_stats() == EVENTS_ZERO

    lfu = servers(tmp_path / "lfu", eviction_policy="lfu")
    assert type(lfu.cache) is unified.KvdriveUnifiedRadixCache and type(lfu.cache.tree_core) is unified.KvdriveTreeCore
    assert type(lfu.cache.tree_core.eviction_strategy) is LFUStrategy  # another policy: SGLang's own


def test_factory_without_hierarchical_cache_is_sglangs_default(tmp_path, servers, caplog):
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        srv = servers(tmp_path, hicache=False)
    assert type(srv.cache) is UnifiedRadixCache  # exactly what SGLang's default chain builds
    assert srv.cache.cache_controller is None and srv.worker.counters == []
    assert type(srv.cache.tree_core) is not unified.KvdriveTreeCore
    assert any("needs --enable-hierarchical-cache" in r.getMessage() for r in caplog.records)


def test_unsalted_keys_are_sglangs_salted_keys_its_namespace_chain_plus_the_tenant(tmp_path, servers):
    srv = servers(tmp_path)
    cases = [  # (rid, extra_key, cache_salt, tenant name)
        ("plain", None, None, None),
        ("salt", None, "alice", "alice"),
        ("extra", "lora-7", None, "lora-7"),
        ("both", "lora-7", "alice", "alice/lora-7"),
        ("other", None, "bob", "bob"),
    ]
    keys = {}
    for rid, extra_key, cache_salt, name in cases:
        assert unified.tenant_salt(extra_key, cache_salt) == name
        before = len(srv.written)
        srv.serve(rid, extra_key=extra_key, cache_salt=cache_salt)
        keys[rid] = srv.written[before:]
        assert srv.reported[-1] == keys[rid]  # the finished request's chain: the keys its pages were stored under
    # no salt: exactly SGLang's keys (64 hex digits), so a store plain SGLang wrote still matches
    assert keys["plain"] == sglang_keys(PROMPT) and all(len(k) == 64 for k in keys["plain"])
    # a salt: SGLang's own namespace-seeded chain, salted once (by SGLang), then tagged with the tenant
    for rid, extra_key, cache_salt, name in cases[1:]:
        assert keys[rid] == tenant_keys(PROMPT, name, extra_key=extra_key, cache_salt=cache_salt), rid
        assert [k[:64] for k in keys[rid]] == sglang_keys(PROMPT, extra_key=extra_key, cache_salt=cache_salt)
        assert all(len(k) == 80 for k in keys[rid])
    assert len({k for ks in keys.values() for k in ks}) == 4 * len(cases)  # every namespace its own pages
    assert srv.backend.tier_stats()["io"]["set_pages_ok"] == 4 * len(cases)  # and kvdrive stored every one
    assert keys["salt"] != keys["other"]
    # the backend files each page under its tenant's namespace
    assert srv.backend.ns_of(keys["salt"][0]).tenant == tenant_id("alice")
    assert srv.backend.ns_of(keys["both"][0]).tenant == tenant_id("alice/lora-7")
    assert srv.backend.ns_of(keys["plain"][0]).tenant == ""

    # a longer prompt of a tenant continues its tagged chain from the cached node
    before = len(srv.written)
    srv.serve("salt-long", PROMPT + EXT, cache_salt="alice")
    assert srv.written[before:] == tenant_keys(PROMPT + EXT, "alice", cache_salt="alice")[4:]
    assert srv.reported[-1] == tenant_keys(PROMPT + EXT, "alice", cache_salt="alice")


def test_share_as_group_members_share_keys_and_pages(tmp_path, servers):
    srv = servers(tmp_path, tenants={"x1": {"share_as": "team"}, "x2": {"share_as": "team"}})
    first = srv.serve("x1", cache_salt="x1")
    assert first.req.storage_hit_length == 0
    assert srv.written == group_keys(PROMPT, "team") and srv.reported == [group_keys(PROMPT, "team")]
    # x2 is another namespace in SGLang's tree (no device hit), but the same pages in storage: served from there
    second = srv.serve("x2", cache_salt="x2")
    assert second.req.storage_hit_length == 16 and second.req.cached_tokens_storage == 16
    assert_prefix_kv(second, PROMPT)
    assert srv.reported[-1] == group_keys(PROMPT, "team")
    # a salt spelling the group's name is not the group; a non-member is on its own
    srv.serve("team", cache_salt="team")
    assert srv.reported[-1] == tenant_keys(PROMPT, "team", cache_salt="team")
    third = srv.serve("x3", cache_salt="x3")
    assert third.req.storage_hit_length == 0 and srv.reported[-1] == tenant_keys(PROMPT, "x3", cache_salt="x3")


def test_finished_requests_reach_the_promoter_and_radix_events_are_counted(tmp_path, servers):
    srv = servers(tmp_path)
    cache, backend, promoter = srv.cache, srv.backend, srv.backend.promoter
    keys = sglang_keys(PROMPT + EXT)

    srv.serve("r1")
    assert srv.reported == [keys[:4]]  # the whole chain of the finished request, in prefix order
    assert [promoter.reuse(k) for k in keys] == [1, 1, 1, 1, 0, 0]
    assert promoter.stats()["accesses"] == 4  # only the whole request: its storage writes do not count
    assert cache.kvdrive_stats() == {**EVENTS_ZERO, "written_back": 16}

    r2 = srv.serve("r2")  # the same prompt: a device hit
    assert r2.req.cached_tokens_device == 16
    assert_prefix_kv(r2, PROMPT)
    assert srv.reported[-1] == keys[:4] and [promoter.reuse(k) for k in keys] == [2, 2, 2, 2, 0, 0]

    r3 = srv.serve("r3", PROMPT + EXT)  # extends the cached prompt: the chain runs from the root through both nodes
    assert r3.req.cached_tokens_device == 16
    assert srv.reported[-1] == keys and [promoter.reuse(k) for k in keys] == [3, 3, 3, 3, 1, 1]
    assert promoter.stats()["accesses"] == 4 + 4 + 6
    assert cache.kvdrive_stats() == {**EVENTS_ZERO, "device_hit": 32, "written_back": 24}

    assert cache.evict(EvictParams(num_tokens=10_000)).num_tokens_evicted == 24  # device copies go, host ones stay
    r4 = srv.serve("r4")  # a host hit, loaded back to the device
    assert (r4.req.cached_tokens_device, r4.req.cached_tokens_host, r4.req.cached_tokens_storage) == (0, 16, 0)
    assert_prefix_kv(r4, PROMPT)
    assert srv.reported[-1] == keys[:4]
    want = {**EVENTS_ZERO, "device_hit": 32, "host_hit": 16, "evicted": 24, "written_back": 24, "loaded_back": 16}
    assert cache.kvdrive_stats() == want
    assert backend.tier_stats()["radix"] == {k: v for k, v in want.items() if v}  # reported to the backend too


def test_host_pool_evictions_become_promotion_candidates(tmp_path, servers):
    srv = servers(tmp_path)
    cache, spilled = srv.cache, srv.backend.upkeep.spilled
    keys = tenant_keys(PROMPT + EXT, "alice", cache_salt="alice")
    srv.serve("a", cache_salt="alice")
    srv.serve("a-long", PROMPT + EXT, cache_salt="alice")
    assert not spilled

    assert cache.evict(EvictParams(num_tokens=10_000)).num_tokens_evicted == 24
    assert not spilled  # still in SGLang's host pool
    # the tree core's first eviction bound kvdrive's value order (installed after SGLang's __init__, before any use)
    bound = cache.components[ComponentType.FULL].session_ref_eviction_strategy
    assert bound.__self__ is cache.tree_core.eviction_strategy
    assert isinstance(bound.__self__, radix_backend.PromoterEviction)

    assert cache.evict_host(10_000) == 24
    # the salted, tenant-tagged keys of both nodes, the leaf first (a host leaf goes before its parent)
    assert list(spilled) == keys[4:] + keys[:4]
    assert cache.kvdrive_stats()["evicted"] == 24

    # the next request for them reloads from kvdrive: they are back in SGLang's host pool, no longer candidates
    again = srv.serve("a-again", cache_salt="alice")
    assert again.req.storage_hit_length == 16 and again.req.cached_tokens_storage == 16
    assert_prefix_kv(again, PROMPT)
    assert list(spilled) == keys[4:]


def test_eviction_follows_the_promoters_value(tmp_path, servers):
    """Two cached prompts; the older one received attention: eviction takes the newer, unattended one first
    (SGLang's LRU would take the older)."""
    srv = servers(tmp_path)
    older, newer = [11] * 16, [13] * 16
    srv.serve("old", older)
    srv.serve("new", newer)
    srv.backend.record_attention({k: 0.5 for k in sglang_keys(older)})
    assert srv.cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted == 16

    def on_device(tokens):
        return srv.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens + TAIL)))).device_prefix_len

    assert (on_device(older), on_device(newer)) == (16, 0)


def test_restart_serves_the_tenant_from_storage_and_no_one_else(tmp_path, servers):
    store = tmp_path / "store"
    first = servers(store)
    first.serve("a", cache_salt="alice")
    assert first.written == tenant_keys(PROMPT, "alice", cache_salt="alice")
    first.shutdown()  # the store is closed; a fresh server opens it

    srv = servers(store)
    cache = srv.cache
    other = srv.serve("b", cache_salt="bob")  # same prompt, another tenant: nothing in storage for it
    assert other.req.storage_hit_length == 0 and other.req.prefix_len == 0
    plain = srv.serve("plain")  # nor for unsalted traffic
    assert plain.req.storage_hit_length == 0 and plain.req.prefix_len == 0

    again = srv.serve("a", cache_salt="alice")
    assert again.req.storage_hit_length == 16
    breakdown = (again.req.cached_tokens_device, again.req.cached_tokens_host, again.req.cached_tokens_storage)
    assert breakdown == (0, 0, 16)
    assert_prefix_kv(again, PROMPT)  # alice's own K/V: from disk, through the host pool and load-back
    assert srv.reported[-1] == tenant_keys(PROMPT, "alice", cache_salt="alice")
    want = {**EVENTS_ZERO, "storage_hit": 16, "loaded_back": 16, "written_back": 32}
    assert cache.kvdrive_stats() == want
    assert srv.backend.tier_stats()["radix"] == {k: v for k, v in want.items() if v}
    assert srv.backend.tier_stats()["disk"]["hits"] == 4


def test_without_kvdrives_cache_in_the_process_salted_keys_stay_sglangs(monkeypatch):
    """The key hook is registered wherever the plugin loads; a plain SGLang server in the same environment (no
    kvdrive radix cache built in its process) must compute exactly SGLang's keys."""
    from sglang.srt.mem_cache.radix_cache import RadixKey

    monkeypatch.setattr(unified, "_active", False)
    tokens = list(range(300, 316))
    key = RadixKey(array("q", tokens), "lora-1", cache_salt="alice")
    assert sglang_utils.get_storage_hash_str(key, None, page_size=PAGE) == sglang_keys(
        tokens, extra_key="lora-1", cache_salt="alice"
    )
    monkeypatch.setattr(unified, "_active", True)  # the same call where kvdrive's cache runs: tagged
    assert sglang_utils.get_storage_hash_str(key, None, page_size=PAGE) == tenant_keys(
        tokens, "alice/lora-1", extra_key="lora-1", cache_salt="alice"
    )


def test_host_eviction_keeps_pages_loaded_for_requests_not_yet_run(tmp_path, servers):
    """Pages kvdrive loaded into SGLang's host pool for requests still waiting are evicted after every other page,
    the latest loaded first. SGLang's LRU took the earliest loaded, whose request runs next: the serving bench's
    restart and agent rounds logged "prefetch success ... loaded=1040", then prefilled those prefixes with 0 cached
    tokens (kvdrive_sglang/awaiting_use.py)."""
    srv = servers(tmp_path)
    older, newer = [11] * 16, [13] * 16
    srv.serve("old", older)
    srv.serve("new", newer)
    srv.cache.evict(EvictParams(num_tokens=10_000))  # the device copies go; SGLang's host pool holds both prompts

    def on_host(tokens):
        return srv.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens + TAIL)))).host_hit_length

    assert on_host(older) >= 16 and on_host(newer) >= 16
    # both loaded again for waiting requests, the older first: what batch_get_v1 records as it fills the host slots
    srv.backend.awaiting.loaded(sglang_keys(older))
    srv.backend.awaiting.loaded(sglang_keys(newer))
    assert srv.cache.evict_host(1) > 0
    assert on_host(older) >= 16 and on_host(newer) == 0  # LRU would have taken the older
    srv.backend.record_request(sglang_keys(older))  # its request ran: an ordinary page again
    assert srv.cache.evict_host(1) > 0 and on_host(older) == 0
