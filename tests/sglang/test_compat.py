"""The supported SGLang range and the per-generation adapters (kvdrive_sglang/compat), on the installed SGLang."""

import importlib.util
import logging

import pytest

pytest.importorskip("sglang")

from kvdrive_sglang import compat, plugin  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402


@pytest.mark.parametrize("version", ["0.5.17", "0.5.20", "0.5.23", "0.5.23.post1", "0.5.23rc2"])
def test_supported_versions_pass(version):
    assert compat.check_supported(version) == version


@pytest.mark.parametrize("version", ["0.5.16", "0.5.24", "0.6.0", "1.0", "dev", ""])
def test_unsupported_versions_are_refused_in_one_line(version):
    with pytest.raises(ConfigError) as e:
        compat.check_supported(version or "unknown")
    msg = str(e.value)
    assert "\n" not in msg and "0.5.17 - 0.5.23" in msg and (version or "unknown") in msg


def test_the_installed_sglang_is_supported_and_gets_the_adapter_of_its_generation():
    compat.check_supported()
    has_hiradix = importlib.util.find_spec("sglang.srt.mem_cache.hiradix_cache") is not None
    adapter = compat.radix_adapter()
    assert adapter.name == ("hiradix" if has_hiradix else "unified")
    assert adapter.namespace_fields() == ({} if has_hiradix else {"keys": "sglang-ns-v1"})


def test_plugin_stays_off_on_an_unsupported_sglang(monkeypatch, caplog):
    """One error line and nothing registered: SGLang then runs as if kvdrive were not installed."""
    monkeypatch.setattr(compat, "sglang_version", lambda: "0.5.24")
    called = []
    for module in ("cpu_fallbacks", "flags", "attention_capture", "cost_meter"):
        mod = importlib.import_module(f"kvdrive_sglang.{module}")
        monkeypatch.setattr(mod, "install", lambda m=module: called.append(m))
    monkeypatch.setattr(
        importlib.import_module("kvdrive_sglang.radix_backend"), "register", lambda: called.append("radix_backend")
    )
    with caplog.at_level(logging.INFO, logger="kvdrive.sglang"):
        plugin.register()
    assert called == []
    records = [r for r in caplog.records if r.name == "kvdrive.sglang"]
    assert len(records) == 1 and records[0].levelno == logging.ERROR
    assert "kvdrive supports SGLang 0.5.17 - 0.5.23; this is SGLang 0.5.24" in records[0].getMessage()
