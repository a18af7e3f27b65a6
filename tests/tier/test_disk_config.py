"""tier/disk_config.py's checks, the put_many TTL check and `kvdrive gc --live-ratio`: the one setting check of
tier/validate.py (issue 16), refusing bool, NaN and infinities, messages naming the setting (and its unit)."""

import argparse
import math

import pytest

from kvdrive_sglang.tier import disk_config, tenants
from kvdrive_sglang.tier.cli import _ratio
from kvdrive_sglang.tier.disk_config import MAX_TTL_S, DiskStoreConfig
from kvdrive_sglang.tier.errors import ConfigError


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("capacity_bytes", True, "disk store capacity_bytes must be a positive integer, got True"),
        ("fd_cache", 0, "disk store fd_cache must be a positive integer, got 0"),
        ("staging_bytes", (1 << 30) + 1, "disk store staging_bytes must be a positive integer below 1073741825"),
        ("map_size", 1 << 46, "disk store map_size must be a positive integer below 70368744177664"),
        ("retry_after_s", math.nan, "disk store retry_after_s must be a positive number of seconds, got nan"),
        ("default_ttl_s", MAX_TTL_S, "disk store default_ttl_s must be a positive number of seconds below 3153600000"),
        # a bool is no share: True passed the hand-written watermark check as 1 (before tier/validate.py)
        ("high_watermark", True, r"disk store high_watermark must be in \(0, 1\], got True"),
        ("gc_live_ratio", math.nan, r"disk store gc_live_ratio must be in \(0, 1\], got nan"),
    ],
)
def test_bad_disk_settings_name_the_setting(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        DiskStoreConfig(path=str(tmp_path), **{field: value})


def test_max_ttl_is_defined_once():
    assert tenants.MAX_TTL_S is disk_config.MAX_TTL_S == 100 * 365 * 86400


@pytest.mark.parametrize("text", ["0", "1.5", "nan", "-0.1"])
def test_live_ratio_is_a_share(text):
    assert _ratio("1") == 1.0 and _ratio("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be in \(0, 1\], got "):
        _ratio(text)
