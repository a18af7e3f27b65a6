"""Promotion ahead of demand on SGLang's path: pages that left SGLang's host pool and sit only on kvdrive's disk come
back up into kvdrive's DRAM tier on the reporter's tick, most valuable first, within a share of the disk bandwidth;
a later storage read of them is then a DRAM hit (decode only), not a disk read. Real SGLang host pools, real
KvdriveStorage over real LMDB, segment files and zstd."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from tests.sglang.backend_case import PAGE, make_backend, make_host, pages_of, written  # noqa: E402


def _keys(prefix, n):
    return [f"{prefix}{i:062x}" for i in range(n)]


def _stored_then_restarted(tmp_path, groups, **kw):
    """Store each group of pages (as SGLang writes them through), stop cleanly (all of DRAM is written down), and
    start a new backend on the same directory: every page is then on disk only. Returns it and the pages' data."""
    host = make_host(size=512)
    be = make_backend(tmp_path, host)
    data = {}
    for seed, keys in enumerate(groups, 1):
        idx, pages = written(host, len(keys), seed)
        assert all(be.batch_set_v1(keys, idx))
        host.free(idx)
        data.update(zip(keys, pages))
    be.close()
    be = make_backend(tmp_path, host, **kw)
    for keys in groups:
        assert set(be.engine.tiers_of(be.ns, keys)) == {"disk"}
    return be, host, data


def test_spilled_pages_come_back_up_and_are_then_served_from_dram(tmp_path):
    doc = _keys("d", 4)
    be, host, data = _stored_then_restarted(tmp_path, [doc])
    be.record_request(doc)
    be.record_request(doc)
    be.record_host_evicted(doc)  # kvdrive's radix cache: these pages just left SGLang's host pool
    be.upkeep.last_promote -= 1.0  # a second of disk bandwidth to spend
    assert be.promote_tick() == 4
    assert be.engine.tiers_of(be.ns, doc) == ["dram"] * 4
    assert be.tier_stats()["io"]["promoted_pages"] == 4
    disk_reads = be.engine.disk.stats().hits
    out = host.alloc(4 * PAGE)
    assert all(be.batch_get_v1(doc, out))
    got = pages_of(host, out, 4)
    assert all(torch.equal(g, data[k]) for g, k in zip(got, doc))  # the same bytes, from DRAM
    assert be.engine.disk.stats().hits == disk_reads and be.engine.stats().hits_dram == 4
    be.upkeep.last_promote -= 1.0
    assert be.promote_tick() == 0  # promoted (and now loaded) pages are no longer candidates
    be.close()


def test_the_bandwidth_share_bounds_promotion_and_value_orders_it(tmp_path):
    hot, cold = _keys("h", 2), _keys("c", 2)
    be, host, _ = _stored_then_restarted(tmp_path, [hot, cold])
    # a second's budget of 2.5 pages at the assumed disk bandwidth
    be.promoter.config.promote_share = 2.5 * be.page_bytes / (be.promoter.costs()["disk_gbps"][0] * 1e9)
    for _ in range(3):
        be.record_request(hot)  # reused three times
    be.record_request(cold)  # once, and more recently
    be.record_host_evicted(hot + cold)
    be.upkeep.last_promote -= 1.0
    assert be.promote_tick() == 2
    assert be.engine.tiers_of(be.ns, hot + cold) == ["dram", "dram", "disk", "disk"]
    be.upkeep.last_promote -= 1.0
    assert be.promote_tick() == 2  # the next tick's budget brings up the rest
    assert be.engine.tiers_of(be.ns, cold) == ["dram", "dram"]
    be.close()


# promotion off; and a prefill so fast that recomputing a page beats decoding it from DRAM: never worth the bandwidth
@pytest.mark.parametrize("promoter", [{"promote_share": 0}, {"prefill_tokens_per_s": 1e15}])
def test_promotion_off_and_pages_not_worth_a_reload(tmp_path, promoter):
    keys = _keys("k", 2)
    be, _, _ = _stored_then_restarted(tmp_path, [keys], promoter=promoter)
    be.record_request(keys)
    be.record_host_evicted(keys)
    be.upkeep.last_promote -= 1.0
    assert be.promote_tick() == 0 and set(be.engine.tiers_of(be.ns, keys)) == {"disk"}
    be.close()


def test_promote_share_is_checked():
    from kvdrive_sglang.tier.errors import ConfigError
    from kvdrive_sglang.tier.promoter import PromoterConfig

    for bad in (-0.1, 1.5, float("nan"), "0.2"):
        with pytest.raises(ConfigError, match="promote_share"):
            PromoterConfig(promote_share=bad)
