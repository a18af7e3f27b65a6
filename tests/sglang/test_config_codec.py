"""--kvdrive-codec auto (issue 18): the default, accepted by the flags and the extra config alike, handed on to the
tier; pinned codecs keep their meaning."""

import json

import pytest

pytest.importorskip("sglang")

from kvdrive_sglang.config import FLAGS, KvdriveSettings  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402


def test_auto_is_the_default_from_the_flags_to_the_tier(tmp_path):
    s = KvdriveSettings.from_flags({"kvdrive_dir": str(tmp_path)})
    assert s.codec == "auto"
    extra = json.loads(json.dumps(s.to_extra_config()))  # as SGLang hands it over
    assert extra["kvdrive"]["codec"] == "auto"
    back = KvdriveSettings.from_extra_config(extra)
    assert back == s and back.tier_config().codec == "auto"


@pytest.mark.parametrize("codec", ["auto", "raw", "zstd", "int8", "fp8"])
def test_every_codec_is_accepted_and_kept(tmp_path, codec):
    s = KvdriveSettings.from_flags({"kvdrive_dir": str(tmp_path), "kvdrive_codec": codec})
    assert s.tier_config().codec == codec
    assert KvdriveSettings.from_extra_config(s.to_extra_config()).codec == codec


def test_a_bad_codec_names_the_flag_and_lists_auto(tmp_path):
    with pytest.raises(ConfigError, match=r"--kvdrive-codec 'lz4' is not one of auto, raw, zstd, int8, fp8"):
        KvdriveSettings.from_flags({"kvdrive_dir": str(tmp_path), "kvdrive_codec": "lz4"})
    with pytest.raises(ConfigError, match=r"kvdrive codec 'AUTO' is not one of auto, raw"):
        KvdriveSettings.from_extra_config({"kvdrive": {"dir": str(tmp_path), "codec": "AUTO"}})


def test_the_help_says_what_auto_does():
    flag = next(f for f in FLAGS if f.flag == "--kvdrive-codec")
    assert flag.shown_default == "auto" and "auto: raw or zstd per tier" in flag.help
