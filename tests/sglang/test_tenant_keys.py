"""Tenants end to end on real SGLang 0.5.17 objects on CPU: kvdrive's radix cache (a real HiRadixCache) over kvdrive's
own storage backend (real tier engine, LMDB index, segment files, AES-GCM), driven the way SGLang's scheduler drives
them (see test_radix_backend.serve). A "restart" is a fresh cache and backend on the same store directory."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sglang")

from sglang.srt.mem_cache import registry  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config  # noqa: E402
from kvdrive_sglang.tier.crypto import new_key  # noqa: E402
from kvdrive_sglang.tier.tenants import group_id, tenant_id  # noqa: E402
from tests.sglang.test_radix_backend import PAGE, PROMPT, _ctx, _group, _kv_value, chain, serve  # noqa: E402,F401

EXPECTED_KV = [_kv_value(t) for t in PROMPT]


class Server:
    """kvdrive's radix cache + KvdriveStorage as --kv-tier kvdrive builds them, on ``store``."""

    def __init__(self, store, **opts):
        ctx = _ctx(store="unused")
        extra = json.loads(storage_extra_config(KvdriveOptions(dir=str(store), host_gb=0.01, disk_gb=1, **opts)))
        ctx.server_args.hicache_storage_backend_extra_config = json.dumps({**extra, "prefetch_threshold": PAGE})
        self.cache = registry.get_radix_cache_factory("kvdrive")(ctx)
        self.backend = self.cache.cache_controller.storage_backend
        self.written: list[str] = []  # keys as SGLang's controller hands them to the backend
        real_set = self.backend.batch_set_v1

        def spy(keys, *a, **kw):
            self.written.extend(keys)
            return real_set(keys, *a, **kw)

        self.backend.batch_set_v1 = spy

    def serve(self, rid, salt):
        """(tokens served from kvdrive's storage, the cached prefix's KV as the model reads it; [] when none)."""
        req, device_kv = serve(self.cache, rid, salt)
        return req.storage_hit_length, device_kv

    def shutdown(self):
        self.cache.shutdown()


@pytest.fixture
def servers():
    made = []

    def make(store, **opts):
        s = Server(store, **opts)
        made.append(s)
        return s

    yield make
    for s in made:
        s.shutdown()


def test_salted_keys_carry_the_tenant_and_land_in_its_namespace(tmp_path, servers):
    srv = servers(tmp_path)
    for rid, salt in (("plain", None), ("a", "alice"), ("b", "bob")):
        srv.serve(rid, salt)
    plain, alice, bob = srv.written[:4], srv.written[4:8], srv.written[8:12]
    assert plain == get_hash_str(PROMPT, None, page_size=PAGE)  # unsalted: exactly SGLang's keys
    assert alice == chain(PROMPT, "alice") and all(k.endswith(tenant_id("alice")) for k in alice)
    assert bob == chain(PROMPT, "bob") and len(set(plain) | set(alice) | set(bob)) == 12
    assert srv.backend.ns_of(alice[0]).tenant == tenant_id("alice") and srv.backend.ns_of(plain[0]).tenant == ""
    srv.shutdown()
    srv = servers(tmp_path)  # reopen: what the store holds, per namespace
    held = {(d["tenant"]): n for _, d, n, _ in srv.backend.engine.disk.namespaces()}
    assert held == {"": 4, tenant_id("alice"): 4, tenant_id("bob"): 4}
    srv.backend.clear()  # SGLang's clear-HiCache-storage request: every tenant's pages of this server, of any run
    assert srv.backend.engine.disk.namespaces() == []


def test_tenants_never_share_pages_unless_the_operator_groups_them(tmp_path, servers):
    tenants = {"x1": {"share_as": "team"}, "x2": {"share_as": "team"}}
    first = servers(tmp_path, tenants=tenants)
    first.serve("a", "alice")
    first.serve("x1", "x1")
    assert first.written[4:8] == [k[:64] + group_id("team") for k in first.written[4:8]]
    first.shutdown()

    srv = servers(tmp_path, tenants=tenants)
    assert srv.serve("b", "bob") == (0, [])  # same prompt, other salt: nothing cached, never alice's pages
    assert srv.serve("team", "team") == (0, [])  # a salt spelling the group's name is not the group
    assert srv.serve("x2", "x2") == (16, EXPECTED_KV)  # same share_as group: x1's pages serve x2
    assert srv.serve("a", "alice") == (16, EXPECTED_KV)


def test_encrypted_store_serves_keyed_tenants_and_forgets_erased_ones(tmp_path, servers):
    keys = tmp_path / "keys.json"
    ka = new_key()
    keys.write_text(json.dumps({"alice": ka, "bob": new_key()}))
    keys.chmod(0o600)
    store = tmp_path / "store"
    first = servers(store, encrypt=str(keys))
    first.serve("a", "alice")
    first.serve("b", "bob")
    assert first.backend.engine.stats().unkeyed_refused == 0  # both tenants have keys: both cached
    first.shutdown()

    keys.write_text(json.dumps({"alice": ka}))  # bob's key deleted: his pages are crypto-erased
    srv = servers(store, encrypt=str(keys))
    assert srv.serve("a", "alice") == (16, EXPECTED_KV)  # decrypted from disk, exact
    assert srv.serve("b", "bob") == (0, [])  # nothing served from the store: recomputed
    assert srv.serve("plain", None) == (0, [])  # no "" key: unsalted traffic is not cached by kvdrive either
    stats = srv.backend.engine.stats()
    assert stats.unkeyed_refused > 0 and stats.disk.hits == 4 and stats.disk.sealed.get("bad_tag", 0) == 0


def test_flags_pass_keys_and_tenant_policy_to_the_backend(tmp_path):
    from kvdrive_sglang.config import KvdriveSettings
    from kvdrive_sglang.flags import options_from
    from kvdrive_sglang.tier.errors import ConfigError

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"alice": new_key()}))
    keys.chmod(0o600)
    policy = tmp_path / "tenants.json"
    policy.write_text('{"x1": {"share_as": "team", "ttl_s": 60}}')
    opts = options_from(
        {"kvdrive_dir": str(tmp_path / "s"), "kvdrive_encrypt": str(keys), "kvdrive_tenants": str(policy)}
    )
    cfg = KvdriveSettings.from_extra_config(json.loads(storage_extra_config(opts))).tier_config()
    assert cfg.encrypt == str(keys) and cfg.tenants == {"x1": {"share_as": "team", "ttl_s": 60}}
    inline = options_from({"kvdrive_dir": str(tmp_path / "s"), "kvdrive_tenants": '{"t": {"ttl_s": 5}}'})
    assert inline.tenants == {"t": {"ttl_s": 5}} and inline.encrypt is None
    keys.chmod(0o644)
    with pytest.raises(ConfigError, match="mode 0644"):  # in the launcher, before any server process starts
        options_from({"kvdrive_dir": str(tmp_path / "s"), "kvdrive_encrypt": str(keys)})
    with pytest.raises(ConfigError, match=r"tenants\['t'\].ttl_s"):
        options_from({"kvdrive_dir": str(tmp_path / "s"), "kvdrive_tenants": '{"t": {"ttl_s": "soon"}}'})
    with pytest.raises(ConfigError, match="not a JSON object, and not a readable file"):
        options_from({"kvdrive_dir": str(tmp_path / "s"), "kvdrive_tenants": str(tmp_path / "missing.json")})


def test_split_nodes_keep_the_tenant_tagged_chain(tmp_path, servers):
    from tests.sglang.test_radix_backend import serve as serve_prompt

    srv = servers(tmp_path)
    serve_prompt(srv.cache, "a", "alice", PROMPT)
    other = PROMPT[:8] + list(range(70, 78))  # shares 2 of the 4 pages: the cached node is split after page 2
    serve_prompt(srv.cache, "a2", "alice", other)
    assert srv.written[:4] == chain(PROMPT, "alice")
    assert srv.written[4:] == chain(other, "alice")[2:]  # the new branch continues the tagged chain of the split
    split = next(iter(srv.cache.root_node.children.values()))
    assert len(split.hash_value) == 2 and len(split.children) == 2  # the shared 2 pages, then the two branches
    node = srv.cache.root_node
    while node.children:  # walk down alice's branch: every node's keys are tagged slices of the chain
        node = next(iter(node.children.values()))
        assert node.hash_value and all(len(h) == 80 and h.endswith(tenant_id("alice")) for h in node.hash_value)
