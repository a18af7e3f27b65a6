"""Fuzzing what a user or SGLang hands kvdrive's SGLang side: the ``{"kvdrive": {...}}`` extra config (types, ranges,
unknown keys, paths that are files, missing or unwritable, promoter options), the ``--kvdrive-*`` flags (through the
real plugin entry point, many cases in one subprocess), and KvdriveStorage calls with odd keys and host indices.
Each case must end as a clear ConfigError / exit 2 naming the input, or a miss: never another exception type, never a
wrong page. Cases tried are counted (CASES) and printed at the end of the module (``pytest -s`` shows them).
"""

import dataclasses
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402

from kvdrive_sglang.config import KvdriveSettings  # noqa: E402
from kvdrive_sglang.storage_backend import KvdriveStorage  # noqa: E402
from kvdrive_sglang.tier.engine import TierConfig  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError, KvdriveError  # noqa: E402
from kvdrive_sglang.tier.promoter import PromoterConfig  # noqa: E402
from tests.sglang.backend_case import PAGE, fill, make_backend, make_host, pages_of  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 1 << 30
CASES = Counter()
FUZZ = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
EDGY = st.one_of(
    ANY,
    st.sampled_from(
        [
            0,
            1,
            -1,
            0.5,
            1e-300,
            1e300,
            2**63,
            float("nan"),
            float("inf"),
            "1",
            "zstd",
            "raw",
            "int8",
            "write_back",
            True,
            False,
            1 << 20,
            1 << 30,
        ]
    ),
)


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\nsglang-side fuzz cases tried: {sum(CASES.values())} ({dict(CASES)})")
    out = os.environ.get("KVDRIVE_FUZZ_COUNTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"module": "tests/sglang/test_fuzz_config.py", "cases": dict(CASES)}) + "\n")


def storage_config(extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name="fuzz-model",
        extra_config=extra,
    )


def names_input(msg: str, *inputs) -> bool:
    return "kvdrive" in msg and (not inputs or any(str(i) in msg for i in inputs))


# --- the extra config ------------------------------------------------------------------------------------------------
SECTION_KEYS = ["dir", "host_bytes", "disk_bytes", "codec", "write_policy", "ttl_s", "promoter", "bogus", "Dir", ""]
DIRS = st.sampled_from(
    ["OK", "OK/nested/deeper", "FILE", "FILE/sub", "/proc/kvdrive-fuzz", "/dev/null", "a\0b", "", "relative-dir"]
)


def test_extra_config_sections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "FILE"
    a_file.write_text("x")

    def resolve(d):
        return str(tmp_path / d) if isinstance(d, str) and d.split("/")[0] in ("OK", "FILE") else d

    @FUZZ
    @given(
        section=st.dictionaries(st.sampled_from(SECTION_KEYS), st.one_of(EDGY, DIRS), max_size=4),
        dir_=st.one_of(DIRS, EDGY),
        shape=st.sampled_from(["dict", "kvdrive-not-dict", "extra-not-dict", "none"]),
    )
    @example(section={}, dir_="OK", shape="extra-not-dict")  # was an AttributeError
    def check(section, dir_, shape):
        CASES["extra_config"] += 1
        section = {**section, "dir": resolve(section.get("dir", dir_))}
        extra = {
            "dict": {"kvdrive": section},
            "kvdrive-not-dict": {"kvdrive": [section]},
            "extra-not-dict": [section],
            "none": None,
        }[shape]
        try:
            be = KvdriveStorage(storage_config(extra))
        except KvdriveError as e:
            # ConfigError for values, StoreDirError / StoreFormatError for directories: each names its input
            msg = str(e)
            assert "kvdrive" in msg or "store" in msg or "tier" in msg or "promoter" in msg, msg
            promoter = section.get("promoter")
            named = [*section, *(promoter if isinstance(promoter, dict) else [])]
            assert any(str(k) in msg for k in named if k) or "dir" in msg or "store" in msg, msg
            return
        try:
            assert isinstance(be.tier_config, TierConfig) and isinstance(be.promoter.config, PromoterConfig)
        finally:
            be.close()

    check()


PROMOTER_FIELDS = [f.name for f in dataclasses.fields(PromoterConfig)]


@FUZZ
@given(opts=st.one_of(st.dictionaries(st.sampled_from(PROMOTER_FIELDS + ["bogus"]), EDGY, max_size=3), ANY))
def test_promoter_options(opts):
    CASES["promoter"] += 1
    try:
        cfg = KvdriveSettings.from_extra_config({"kvdrive": {"dir": "/tmp/x", "promoter": opts}}).promoter_config()
    except ConfigError as e:
        assert "promoter" in str(e) and (not isinstance(opts, dict) or any(k in str(e) for k in opts)), str(e)
        return
    assert isinstance(cfg, PromoterConfig)


@FUZZ
@given(extra=ANY)
@example(extra=True)
@example(extra=[{"kvdrive": {}}])
@example(extra={"kvdrive": ["x"]})
def test_extra_config_that_is_not_an_object(extra):
    CASES["extra_not_object"] += 1
    for fn in (
        lambda x: KvdriveSettings.from_extra_config(x).tier_config(),
        lambda x: KvdriveSettings.from_extra_config(x).promoter_config(),
    ):
        try:
            fn(extra)
        except ConfigError as e:
            assert "kvdrive" in str(e) or "promoter" in str(e), str(e)


# --- --kvdrive-* flags, through the plugin, many cases in one process -----------------------------------------------
GB_VALUES = [
    "0",
    "1",
    "-1",
    "-0",
    "0.5",
    "1e-12",
    "1e-300",
    "1e12",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "abc",
    "",
    " 2 ",
    "0x10",
    "1_000",
    "2GB",
    "4",
]
CODECS = ["zstd", "raw", "int8", "fp8", "fp8_e4m3", "lz4", "ZSTD", "", "raw ", "none"]


def _flag_cases(tmp, n=50, seed=7):
    rng = random.Random(seed)
    a_file = os.path.join(tmp, "a-file")
    open(a_file, "w").close()
    dirs = [
        os.path.join(tmp, "ok"),
        os.path.join(tmp, "new", "deeper"),
        a_file,
        os.path.join(a_file, "sub"),
        "/proc/kvdrive-fuzz",
        "",
        "x" * 5000,
        os.path.join(tmp, "é-dir"),
        "relative-store",
    ]
    cases = []
    for i in range(n):
        argv = ["--kv-tier", "kvdrive"] if rng.random() < 0.9 else []
        if rng.random() < 0.8:
            argv += ["--kvdrive-dir", rng.choice(dirs)]
        if rng.random() < 0.6:
            argv += ["--kvdrive-host-gb", rng.choice(GB_VALUES)]
        if rng.random() < 0.6:
            argv += ["--kvdrive-disk-gb", rng.choice(GB_VALUES)]
        if rng.random() < 0.5:
            argv += ["--kvdrive-codec", rng.choice(CODECS)]
        if rng.random() < 0.1:
            argv += ["--kvdrive-codec"]  # a flag missing its value
        cases.append({"case": f"f{i}", "argv": argv})
    # found by this fuzzing: a cap that rounds to 0 bytes passed the launcher and failed in the scheduler
    cases.append(
        {"case": "tiny-disk", "argv": ["--kv-tier", "kvdrive", "--kvdrive-dir", dirs[0], "--kvdrive-disk-gb", "1e-12"]}
    )
    return cases


def test_flag_values_through_the_plugin(tmp_path):
    cases = _flag_cases(str(tmp_path))
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    # run from tmp_path: the relative --kvdrive-dir cases create their store there, not in the source tree
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    p = subprocess.run(
        [sys.executable, "-m", "tests.sglang.flag_cases", "--argv", str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = {c["case"]: c for c in map(json.loads, (ln for ln in p.stdout.splitlines() if ln.startswith("{")))}
    assert len(results) == len(cases)
    for c in cases:
        CASES["flags"] += 1
        r = results[c["case"]]
        argv = c["argv"]
        if r["ok"]:
            extra_json = r["fields"]["hicache_storage_backend_extra_config"]
            if "--kv-tier" not in argv:
                assert extra_json is None, c
                continue
            # what the launcher accepted, the storage backend (in the scheduler) must accept too
            tier = KvdriveSettings.from_extra_config(json.loads(extra_json)).tier_config()
            assert os.path.isdir(tier.path), (c, tier)
            continue
        assert r["exit"] == 2, (c, r)  # never a traceback (exit None) or another status
        line = r["error"][0] if r["error"] else ""
        assert "Traceback" not in line
        given = [argv[i] for i in range(len(argv)) if argv[i].startswith("--")]
        shown = [v for v in argv if v] + [os.path.abspath(v) for v in argv if v and not v.startswith("--")]
        assert any(f in line for f in given) or any(v in line for v in shown), (c, line)


FLAG_VALUES = {
    "kvdrive_host_gb": st.one_of(st.sampled_from(GB_VALUES), EDGY),
    "kvdrive_disk_gb": st.one_of(st.sampled_from(GB_VALUES), EDGY),
    "kvdrive_codec": st.one_of(st.sampled_from(CODECS), EDGY),
    "kvdrive_reload": st.one_of(st.sampled_from(["auto", "always", "never", ""]), EDGY),
    "kvdrive_gil_switch_ms": st.one_of(st.sampled_from(["0", "0.5", "100", "101", "-1", "fast"]), EDGY),
    "kvdrive_promoter": st.one_of(
        st.sampled_from(['{"half_life_s": 30}', '{"promote_share": 2}', "[1]", "{nope", '{"bogus": 1}', "{}"]), EDGY
    ),
    "kvdrive_tenants": st.one_of(
        st.sampled_from(['{"t": {"ttl_s": 5}}', '{"t": {"ttl_s": "soon"}}', '{"t": {"share_as": "g"}}', "{}"]), EDGY
    ),
}


def test_settings_from_flags_round_trip_through_the_extra_config(tmp_path):
    """Engine keywords / flag values in any shape: the settings the launcher accepts come back identical from the
    extra config the storage backend reads (one object, one check); the rest fail as a ConfigError naming the
    flag, or a value it was given."""
    from kvdrive_sglang.config import FLAGS, KvdriveSettings

    flag_of = {f.dest: f.flag for f in FLAGS}

    @FUZZ
    @given(values=st.fixed_dictionaries({}, optional=FLAG_VALUES))
    @example(values={"kvdrive_disk_gb": "1e-12"})  # rounds to 0 bytes: refused in the launcher
    @example(values={"kvdrive_host_gb": True})
    @example(values={"kvdrive_host_gb": 1e300})  # was an OverflowError (no byte count)
    @example(values={"kvdrive_promoter": "{}", "kvdrive_tenants": "{}"})  # was read back as None, not {}
    def check(values):
        CASES["settings_round_trip"] += 1
        try:
            s = KvdriveSettings.from_flags({"kvdrive_dir": str(tmp_path), **values})
        except ConfigError as e:
            msg = str(e)
            assert "\n" not in msg
            assert any(flag_of[k] in msg for k in values) or "tenants" in msg or "promoter" in msg, (values, msg)
            return
        back = KvdriveSettings.from_extra_config(json.loads(json.dumps(s.to_extra_config())))
        assert back == s and back.tier_config() == s.tier_config()

    check()


# --- KvdriveStorage calls ---------------------------------------------------------------------------------------------
def test_storage_calls_with_odd_keys_and_host_indices(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    good_idx = host.alloc(4 * PAGE)
    fill(host, [good_idx[i * PAGE] for i in range(4)], seed=3)
    want = pages_of(host, good_idx, 4)
    good_keys = [f"{i:064x}" for i in range(4)]
    assert be.batch_set_v1(good_keys, good_idx) == [True] * 4
    size = host.size

    index_kinds = st.sampled_from(
        ["good", "short", "long", "negative", "past-end", "last-page", "float", "2d", "list", "empty", "unaligned"]
    )
    key_lists = st.lists(
        st.one_of(
            st.sampled_from(good_keys),
            st.text(max_size=70),
            st.binary(max_size=8),
            st.integers(),
            st.none(),
            st.just(""),
        ),
        max_size=4,
    )

    def indices(kind, n):
        base = host.alloc(max(n, 1) * PAGE)
        assert base is not None
        pool_free = base
        if kind == "good":
            return base[: n * PAGE], pool_free
        return {
            "short": base[: max(0, n * PAGE - 1)],
            "long": torch.cat([base, base])[: n * PAGE + PAGE],
            "negative": torch.full((n * PAGE,), -PAGE, dtype=torch.int64),
            "past-end": torch.full((n * PAGE,), size, dtype=torch.int64),
            "last-page": torch.full((n * PAGE,), size - PAGE + 1, dtype=torch.int64),
            "float": base[: n * PAGE].float(),
            "2d": base[: n * PAGE].reshape(1, -1),
            "list": base[: n * PAGE].tolist(),
            "empty": torch.empty(0, dtype=torch.int64),
            "unaligned": base[: n * PAGE] + 1,
        }[kind], pool_free

    @settings(FUZZ, max_examples=120)
    @given(keys=key_lists, kind=index_kinds, op=st.sampled_from(["set", "get", "exists"]))
    # found by this fuzzing: pages sliced short past the pool's end, or wrapped round from a negative index
    @example(keys=["a"], kind="past-end", op="set")
    @example(keys=["a"], kind="last-page", op="set")
    @example(keys=["a"], kind="negative", op="set")
    @example(keys=[good_keys[0]], kind="negative", op="get")
    @example(keys=["a", "b"], kind="short", op="set")
    @example(keys=["a"], kind="float", op="set")
    def check(keys, kind, op):
        CASES["storage_calls"] += 1
        if op == "set":  # a key names its content (SGLang's keys are content hashes): never re-set a stored key
            keys = ["s" + k if k in good_keys else k for k in keys]
        idx, allocated = indices(kind, len(keys))
        try:
            if op == "set":
                r = be.batch_set_v1(keys, idx)
                assert len(r) == len(keys) and all(isinstance(x, bool) for x in r)
            elif op == "get":
                r = be.batch_get_v1(keys, idx)
                assert len(r) == len(keys)
                n = r.index(False) if False in r else len(r)
                for i in range(n):  # every page claimed is the page stored under that key, exactly
                    j = good_keys.index(keys[i]) if keys[i] in good_keys else None
                    if j is not None:
                        got = host.get_data_page(int(idx[i * PAGE]), flat=True)
                        assert torch.equal(got, want[j]), (keys, kind)
            else:
                r = be.batch_exists(keys)
                assert 0 <= r <= len(keys)
        except (ConfigError, ValueError) as e:
            assert "key" in str(e) or "indices" in str(e) or "index" in str(e), str(e)
        finally:
            host.free(allocated)
        # the stored pages are intact whatever was asked before
        dst = host.alloc(4 * PAGE)
        try:
            assert be.batch_get_v1(good_keys, dst) == [True] * 4
            for a, b in zip(pages_of(host, dst, 4), want):
                assert torch.equal(a, b)
        finally:
            host.free(dst)

    try:
        check()
    finally:
        be.close()
