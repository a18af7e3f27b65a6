"""The promoter's cost of the shared remote tier (issue 19): its own bandwidth and round trip, assumed or measured,
in reload_or_recompute and plan_prefix (remote pages used to be planned as disk reads by the caller)."""

import pytest

from kvdrive_sglang.tier.errors import ConfigError
from kvdrive_sglang.tier.promoter import TIERS, Promoter, PromoterConfig

PAGE_TOKENS, PAGE_BYTES = 64, 64 * 131072  # an 8B-class model's 64-token page: 8 MiB


def promoter(**kw) -> Promoter:
    return Promoter(PromoterConfig(prefill_tokens_per_s=12000.0, **kw))


def test_remote_is_a_tier_with_its_own_settings():
    assert "remote" in TIERS
    for bad in ({"remote_gbps": 0}, {"remote_gbps": float("nan")}, {"remote_latency_s": -1}, {"remote_gbps": True}):
        with pytest.raises(ConfigError, match="remote_"):
            PromoterConfig(**bad)
    assert PromoterConfig(remote_gbps=10.0).tier_gbps("remote") == 10.0


def test_a_slow_remote_tier_is_recomputed_a_fast_one_reloaded():
    # 12k tok/s prefill of 8 MiB pages = 1.6 GB/s of KV: a 0.5 GB/s link loses to it, a 12 GB/s one wins
    slow, fast = promoter(remote_gbps=0.5, disk_gbps=4.0), promoter(remote_gbps=12.0)
    assert slow.reload_or_recompute(PAGE_TOKENS * 8, PAGE_BYTES * 8, "remote").action == "recompute"
    assert fast.reload_or_recompute(PAGE_TOKENS * 8, PAGE_BYTES * 8, "remote").action == "reload"
    tiers = ["dram"] * 4 + ["remote"] * 8
    assert slow.plan_prefix(tiers, PAGE_TOKENS, PAGE_BYTES).reload_pages == 4  # the local pages only
    assert fast.plan_prefix(tiers, PAGE_TOKENS, PAGE_BYTES).reload_pages == 12
    # the disk's cost is not the remote tier's: the same slow link planned as a disk read would be reloaded
    assert slow.plan_prefix(["dram"] * 4 + ["disk"] * 8, PAGE_TOKENS, PAGE_BYTES).reload_pages == 12


def test_remote_round_trip_is_paid_on_top_of_the_measured_local_one():
    p = promoter(remote_gbps=12.0, remote_latency_s=0.0)
    p.calibrate(reload_fixed_s=0.002)
    tiers = ["disk"] + ["remote"] * 40
    base = p.plan_prefix(tiers, PAGE_TOKENS, PAGE_BYTES)
    assert base.reload_pages == 41
    p.calibrate(remote_fixed_s=0.05)
    plan = p.plan_prefix(tiers, PAGE_TOKENS, PAGE_BYTES)
    assert plan.reload_pages == 41 and plan.reload_s == pytest.approx(base.reload_s + 0.05)


def test_measured_remote_figures_replace_the_assumed_ones():
    p = promoter(remote_gbps=12.0)
    assert p.costs()["remote_gbps"] == (12.0, "assumed") and p.costs()["remote_fixed_s"] == (1e-3, "assumed")
    assert p.plan_prefix(["remote"] * 8, PAGE_TOKENS, PAGE_BYTES).reload_pages == 8
    p.calibrate(tier_s_per_byte={"remote": 1 / 0.4e9}, remote_fixed_s=0.004)  # what a loopback read-through timed
    assert p.costs()["remote_gbps"] == (pytest.approx(0.4), "measured")
    assert p.costs()["remote_fixed_s"] == (0.004, "measured")
    assert p.plan_prefix(["remote"] * 8, PAGE_TOKENS, PAGE_BYTES).reload_pages == 0
    assert p.measured()["remote_fixed_s"] == 0.004 and "remote" in p.measured()["tier_s_per_byte"]
    with pytest.raises(ConfigError, match="remote_fixed_s"):
        p.calibrate(remote_fixed_s=-1.0)
