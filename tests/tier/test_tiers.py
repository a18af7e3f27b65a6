"""Tier: one name per tier, equal to the strings kvdrive's stats, metrics and promoter have always used."""

import json
import logging

from kvdrive_sglang.tier.promoter import TIERS
from kvdrive_sglang.tier.tiers import KVDRIVE_TIERS, Tier


def test_members_are_their_strings():
    assert [t.value for t in Tier] == ["gpu", "host", "dram", "staged", "queued", "disk", "remote"]
    for t in Tier:
        assert t == t.value and hash(t) == hash(t.value) and {t.value: 1}[t] == 1
        # printed, formatted, logged and serialised as the plain string (not "Tier.DRAM") on every Python
        assert str(t) == f"{t}" == f"{t:>0}" == "{}".format(t) == t.value  # noqa: UP032 - format() is what's tested
        assert json.dumps({t: t}) == json.dumps({t.value: t.value})
    assert Tier("dram") is Tier.DRAM


def test_promoter_tiers_are_tier_values(caplog):
    # the promoter compares tiers_of's answers with its own strings: every tier kvdrive reports is one it knows
    assert set(KVDRIVE_TIERS) <= set(TIERS) and {Tier.GPU, Tier.HOST} <= set(TIERS)
    with caplog.at_level(logging.INFO, logger="kvdrive.test"):
        logging.getLogger("kvdrive.test").info("page in %s", Tier.QUEUED)
    assert caplog.records[-1].getMessage() == "page in queued"
