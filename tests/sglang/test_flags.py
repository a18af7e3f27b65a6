"""--kv-tier kvdrive through the real plugin entry point, in a fresh process: expansion, conflicts, bad input."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    a_file = tmp_path_factory.mktemp("f") / "not-a-dir"
    a_file.write_text("x")
    p = subprocess.run(
        [sys.executable, "-m", "tests.sglang.flag_cases", str(d), str(a_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            c = json.loads(line)
            out[c["case"]] = c
    return d, out


def test_cli_expands_to_canonical_hicache_flags(cases):
    d, c = cases
    f = c["cli"]["fields"]
    assert f["enable_hierarchical_cache"] is True
    assert f["hicache_storage_backend"] == "dynamic" and f["radix_cache_backend"] == "kvdrive"
    extra = json.loads(f["hicache_storage_backend_extra_config"])
    assert extra["module_path"] == "kvdrive_sglang.storage_backend" and extra["class_name"] == "KvdriveStorage"
    assert extra["interface_v1"] == 1
    assert extra["kvdrive"] == {"dir": str(d), "host_bytes": 2 << 30, "disk_bytes": 10 << 30, "codec": "raw"}
    # no GPU here: the CPU copy path (direct I/O, layer-first host layout)
    assert (f["hicache_io_backend"], f["hicache_mem_layout"]) == ("direct", "layer_first")


def test_user_choices_that_do_not_conflict_are_kept(cases):
    f = cases[1]["cli-user-layout"]["fields"]
    assert f["hicache_mem_layout"] == "page_first" and f["radix_cache_backend"] == "kvdrive"
    assert json.loads(f["hicache_storage_backend_extra_config"])["kvdrive"]["codec"] == "auto"  # default (issue 18)


def test_without_the_flag_sglang_is_untouched(cases):
    f = cases[1]["no-tier"]["fields"]
    assert f["enable_hierarchical_cache"] is False and f["hicache_storage_backend"] is None
    assert f["radix_cache_backend"] is None


@pytest.mark.parametrize(
    "case,words",
    [
        ("conflict-backend", ["--hicache-storage-backend", "'file'"]),
        ("conflict-radix", ["--radix-cache-backend", "'lmcache'"]),
        ("conflict-disable-radix", ["--disable-radix-cache"]),
        ("bad-tier", ["invalid choice: 'lmcache'", "kvdrive"]),
        ("option-without-tier", ["--kvdrive-dir", "--kv-tier kvdrive"]),
        ("bad-codec", ["'lz4'", "zstd"]),
        ("bad-gb", ["--kvdrive-disk-gb", "-3"]),
        ("dir-is-a-file", ["not-a-dir", "not a directory"]),
    ],
)
def test_bad_and_conflicting_flags_exit_with_one_clear_line(cases, case, words):
    c = cases[1][case]
    assert c["ok"] is False and c["exit"] == 2, c
    line = c["error"][0]
    assert "Traceback" not in line
    for w in words:
        assert w in line, (w, line)


def test_engine_kwargs_expand_too(cases):
    c = cases[1]
    f = c["engine-kwargs"]["fields"]
    assert f["hicache_storage_backend"] == "dynamic" and f["radix_cache_backend"] == "kvdrive"
    assert json.loads(f["hicache_storage_backend_extra_config"])["kvdrive"]["host_bytes"] == 1 << 30
    assert c["engine-kwargs"]["type"] == "sglang.srt.server_args.ServerArgs"  # a plain record, whatever built it
    assert "--hicache-storage-backend" in c["engine-conflict"]["error"][0]


def test_engine_first_call_expands_kv_tier(tmp_path):
    """``sglang.Engine(kv_tier="kvdrive", ...)`` as a user calls it, first thing in a fresh process: the real
    Engine.__init__ loads the plugins itself and then builds its ServerArgs (on SGLang 0.5.20+ a sealed msgspec
    Struct that takes no unknown keyword). SGLANG_RUST_SERVER=1 stops Engine right after that, before it starts
    anything."""
    d = tmp_path / "store"
    env = {**os.environ, "SGLANG_RUST_SERVER": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "tests.sglang.flag_cases", "--engine", str(d)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    c = {r["case"]: r for r in map(json.loads, (ln for ln in p.stdout.splitlines() if ln.startswith("{")))}
    first = c["engine-first-call"]
    assert first["ok"] is True, first
    f = first["fields"]
    assert first["type"] == "sglang.srt.server_args.ServerArgs"
    assert f["enable_hierarchical_cache"] is True and f["radix_cache_backend"] == "kvdrive"
    assert f["hicache_storage_backend"] == "dynamic"
    assert json.loads(f["hicache_storage_backend_extra_config"])["kvdrive"] == {
        "dir": str(d),
        "host_bytes": 1 << 30,
        "disk_bytes": 64 << 30,
        "codec": "raw",
    }
    assert (f["hicache_io_backend"], f["hicache_mem_layout"]) == ("direct", "layer_first")
    plain = c["engine-plain"]["fields"]
    assert plain["enable_hierarchical_cache"] is False and plain["radix_cache_backend"] is None
    for case, words in (
        ("engine-first-conflict", ["--radix-cache-backend", "'lmcache'"]),
        ("engine-bad-codec", ["'lz4'", "zstd"]),
        ("engine-option-without-tier", ["kvdrive_dir", "kv_tier='kvdrive'"]),
    ):
        r = c[case]
        assert r["ok"] is False and len(r["error"]) == 1 and r["error"][0].startswith("ConfigError: "), r
        for w in words:
            assert w in r["error"][0], (w, r)


def test_the_adapter_matches_this_sglang():
    """The ServerArgs generation is chosen by feature: a msgspec Struct (0.5.20 on) or a dataclass (before)."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    from kvdrive_sglang.compat.server_args import server_args_adapter

    adapter = server_args_adapter()
    assert adapter.name == ("dataclass" if dataclasses.is_dataclass(ServerArgs) else "struct")
    assert any(a.dest == "enable_hierarchical_cache" for a in adapter.cli_parser()._actions)


def test_one_settings_object_from_flags_to_the_storage_backend(tmp_path):
    """The flags' settings, written into SGLang's extra config and read back by the storage backend's one call, are
    the same settings; both ends run the same checks, each naming the setting as its input spelled it."""
    from kvdrive_sglang.config import KvdriveSettings
    from kvdrive_sglang.tier.errors import ConfigError

    s = KvdriveSettings.from_flags(
        {
            "kvdrive_dir": str(tmp_path),
            "kvdrive_host_gb": "0.5",
            "kvdrive_disk_gb": 2,
            "kvdrive_codec": "raw",
            "kvdrive_reload": "always",
            "kvdrive_promoter": '{"half_life_s": 30}',
            "kvdrive_gil_switch_ms": "1",
            "kvdrive_tenants": '{"t": {"ttl_s": 5}}',
        }
    )
    extra = json.loads(json.dumps(s.to_extra_config()))  # as SGLang hands it over: plain JSON
    assert extra["kvdrive"] == {
        "dir": str(tmp_path),
        "host_bytes": 1 << 29,
        "disk_bytes": 2 << 30,
        "codec": "raw",
        "tenants": {"t": {"ttl_s": 5}},
        "promoter": {"half_life_s": 30},
        "reload": "always",
        "gil_switch_ms": 1.0,
    }
    back = KvdriveSettings.from_extra_config(extra)
    assert back == s
    tier = back.tier_config()
    assert (tier.path, tier.host_bytes, tier.disk_bytes, tier.codec, tier.write_policy) == (
        str(tmp_path),
        1 << 29,
        2 << 30,
        "raw",
        "selective",
    )
    assert back.promoter_config().half_life_s == 30 and back.gil_switch_s() == 0.001
    for flags, extra_section, flag_msg, key_msg in (
        ({"kvdrive_codec": "lz4"}, {"codec": "lz4"}, "--kvdrive-codec 'lz4'", "kvdrive codec 'lz4'"),
        ({"kvdrive_reload": "x"}, {"reload": "x"}, "--kvdrive-reload 'x'", "kvdrive reload 'x'"),
        ({"kvdrive_gil_switch_ms": "500"}, {"gil_switch_ms": 500}, "--kvdrive-gil-switch-ms", "kvdrive gil_switch_ms"),
        (
            {"kvdrive_promoter": "[1]"},
            {"promoter": [1]},
            "--kvdrive-promoter must be a JSON object",
            "kvdrive promoter must be a JSON object",
        ),
        ({"kvdrive_promoter": '{"colour": 1}'}, {"promoter": {"colour": 1}}, "--kvdrive-promoter: ", "colour"),
    ):
        with pytest.raises(ConfigError, match=flag_msg):
            KvdriveSettings.from_flags({"kvdrive_dir": str(tmp_path), **flags})
        with pytest.raises(ConfigError, match=key_msg):
            KvdriveSettings.from_extra_config({"kvdrive": {"dir": str(tmp_path), **extra_section}})
    with pytest.raises(ConfigError, match="unknown kvdrive storage option"):
        KvdriveSettings.from_extra_config({"kvdrive": {"dir": str(tmp_path), "host_gb": 1}})


def test_help_lists_kvdrive_options(cases):
    assert cases[1]["help"]["ok"] is True


def test_reload_policy_flag(tmp_path):
    from kvdrive_sglang.flags import options_from, storage_extra_config
    from kvdrive_sglang.tier.errors import ConfigError

    opts = options_from({"kvdrive_dir": str(tmp_path), "kvdrive_reload": "always"})
    assert json.loads(storage_extra_config(opts))["kvdrive"]["reload"] == "always"
    assert "reload" not in json.loads(storage_extra_config(options_from({"kvdrive_dir": str(tmp_path)})))["kvdrive"]
    with pytest.raises(ConfigError, match="--kvdrive-reload 'never'"):
        options_from({"kvdrive_dir": str(tmp_path), "kvdrive_reload": "never"})


def test_promoter_and_gil_flags(tmp_path):
    from kvdrive_sglang.config import KvdriveSettings
    from kvdrive_sglang.flags import options_from, storage_extra_config
    from kvdrive_sglang.tier.errors import ConfigError

    opts = options_from(
        {
            "kvdrive_dir": str(tmp_path),
            "kvdrive_promoter": '{"half_life_s": 300, "promote_share": 0.1}',
            "kvdrive_gil_switch_ms": "1.5",
        }
    )
    extra = json.loads(storage_extra_config(opts))
    assert extra["kvdrive"]["promoter"] == {"half_life_s": 300, "promote_share": 0.1}
    read = KvdriveSettings.from_extra_config(extra)  # what the server's backend reads back
    cfg = read.promoter_config()
    assert cfg.half_life_s == 300 and cfg.promote_share == 0.1
    assert read.gil_switch_s() == 0.0015
    plain = json.loads(storage_extra_config(options_from({"kvdrive_dir": str(tmp_path)})))["kvdrive"]
    assert "promoter" not in plain and "gil_switch_ms" not in plain
    for bad, msg in (
        ('{"half_life": 3}', "half_life"),
        ('{"promote_share": 2}', "promote_share"),
        ("[1]", "JSON object"),
        ("{nope", "not valid JSON"),
    ):
        with pytest.raises(ConfigError, match=msg):
            options_from({"kvdrive_dir": str(tmp_path), "kvdrive_promoter": bad})
    for bad in ("fast", "-1", "500"):
        with pytest.raises(ConfigError, match="--kvdrive-gil-switch-ms"):
            options_from({"kvdrive_dir": str(tmp_path), "kvdrive_gil_switch_ms": bad})


def test_gpu_decompress_on_a_gpu_asks_for_the_layer_first_host_layout():
    """--kvdrive-gpu-decompress decodes pages layer by layer on the device: on a GPU (whose SGLang default host
    layout is page_first) --kv-tier kvdrive asks for layer_first, unless the user chose a layout."""
    from kvdrive_sglang.config import KvdriveSettings
    from kvdrive_sglang.flags import canonical, merge

    on = canonical(KvdriveSettings(dir="/tmp/kvd", gpu_decompress=True), gpu=True)
    assert on["hicache_mem_layout"] == "layer_first"
    assert "hicache_mem_layout" not in canonical(KvdriveSettings(dir="/tmp/kvd"), gpu=True)
    assert merge(on, {"hicache_mem_layout": "page_first"})["hicache_mem_layout"] == "page_first"
