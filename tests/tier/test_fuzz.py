"""Fuzzing everything a caller can hand the tier: config values, keys, page buffers, blobs, store directories,
namespaces. Each case must end as kvdrive's own clear error (naming the input) or a miss: never another exception
type, never a wrong page, never a valid page dropped because of the caller's mistake.

The number of cases tried is counted (CASES) and printed at the end of the module (``pytest -s`` shows it).
"""

import dataclasses
import json
import math
import os
import tempfile
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kvdrive_sglang.tier import cli
from kvdrive_sglang.tier.codecs import CODEC_NAMES, decode_page, encode_page, peek_header
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.errors import CodecError, ConfigError, KvdriveError, StoreDirError, StoreFormatError
from kvdrive_sglang.tier.namespace import Namespace, key_bytes
from kvdrive_sglang.tier.store_dir import FORMAT_FILE
from tests.helpers import make_ns, small_page

CASES = Counter()
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
# values near the edges of what each field accepts, mixed with anything at all
EDGY = st.one_of(
    ANY,
    st.sampled_from(
        [
            0,
            1,
            -1,
            0.5,
            1.0,
            1e-300,
            1e300,
            2**63,
            2**64,
            float("nan"),
            float("inf"),
            "1",
            "zstd",
            "raw",
            "posix",
            "kvikio",
            True,
            False,
        ]
    ),
)


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\ntier fuzz cases tried: {sum(CASES.values())} ({dict(CASES)})")
    out = os.environ.get("KVDRIVE_FUZZ_COUNTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"module": "tests/tier/test_fuzz.py", "cases": dict(CASES)}) + "\n")


def _roundtrip(engine_or_store, ns, key="k"):
    page = small_page(7, ns)
    out = np.empty_like(page)
    if isinstance(engine_or_store, TierEngine):
        engine_or_store.put_many(ns, [key], [page])
    else:
        engine_or_store.put_many(ns, [key], [encode_page(page, ns.kv_dtype, "zstd", ns.head_dim)])
    got = engine_or_store.get_many(ns, [key], [out])
    assert got == [False] or np.array_equal(out, page)


# --- configuration -------------------------------------------------------------------------------------------------
TIER_FIELDS = [f.name for f in dataclasses.fields(TierConfig) if f.name != "path"]
DISK_FIELDS = [f.name for f in dataclasses.fields(DiskStoreConfig) if f.name != "path"]


@FUZZ
@given(
    fields=st.dictionaries(st.sampled_from(TIER_FIELDS), EDGY, min_size=1, max_size=3),
    disk=st.one_of(st.none(), st.dictionaries(st.sampled_from(DISK_FIELDS + ["bogus"]), EDGY, max_size=2)),
)
# cases fuzzing found (each was a TypeError / ValueError deep inside, or a store that broke later)
@example(fields={"disk": None}, disk=None)
@example(fields={"writedown_queue_bytes": 1}, disk=None)  # close() waited forever for queue room
@example(fields={"maintain_interval_s": float("nan")}, disk=None)
@example(fields={"default_ttl_s": float("nan")}, disk=None)
@example(fields={"host_bytes": 1}, disk={"bogus": 1})
@example(fields={"host_bytes": 1}, disk={"retry_after_s": float("inf")})
@example(fields={"encrypt": "0"}, disk=None)  # "key file ./0: No such file" did not say it came from encrypt
def test_tier_config_values(fields, disk):
    CASES["tier_config"] += 1
    if disk is not None:
        fields = {**fields, "disk": disk}
    with tempfile.TemporaryDirectory() as d:
        try:
            cfg = TierConfig(path=d, **fields)
        except ConfigError as e:
            assert any(name in str(e) for name in [*fields, *(disk or {})]), str(e)
            return
        try:
            with TierEngine(cfg) as eng:
                _roundtrip(eng, make_ns())
        except KvdriveError as e:
            assert any(name in str(e) for name in [*fields, *(disk or {})]), str(e)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(DISK_FIELDS), EDGY, min_size=1, max_size=3))
@example(fields={"map_size": 2**64})
@example(fields={"staging_bytes": 2**63 - 8190})
@example(fields={"default_ttl_s": 1e300})
@example(fields={"retry_after_s": float("nan")})
def test_disk_store_config_values(fields):
    CASES["disk_config"] += 1
    with tempfile.TemporaryDirectory() as d:
        try:
            cfg = DiskStoreConfig(path=d, **fields)
        except ConfigError as e:
            assert any(name in str(e) for name in fields), str(e)
            return
        try:
            st_ = DiskStore(cfg)
        except StoreDirError as e:  # e.g. an LMDB map size the platform refuses
            assert "map" in str(e) or d in str(e), str(e)
            return
        with st_:
            _roundtrip(st_, make_ns())
            st_.maintain()


@FUZZ
@given(ttl=EDGY)
@example(ttl=float("nan"))
@example(ttl=float("inf"))
@example(ttl=1e300)
def test_put_ttl_values(ttl):
    CASES["put_ttl"] += 1
    ns = make_ns()
    with tempfile.TemporaryDirectory() as d, DiskStore(DiskStoreConfig(path=d)) as s:
        blob = encode_page(small_page(1, ns), ns.kv_dtype, "raw", ns.head_dim)
        try:
            s.put_many(ns, ["a"], [blob], ttl_s=ttl)
        except ConfigError as e:
            assert "ttl" in str(e), str(e)
            return
        out = np.empty_like(small_page(1, ns))
        assert s.get_many(ns, ["a"], [out]) in ([True], [False])


PATHS = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=10),
    st.integers(),
    st.none(),
    st.sampled_from(
        [
            "",
            "\0",
            "a\0b",
            "/proc/kvdrive-nope",
            "/proc/self/status",
            "/dev/null/x",
            "FILE",
            "FILE/sub",
            "MISSING/deeper/store",
        ]
    ),
)


@FUZZ
@given(path=PATHS)
@example(path="\0")
@example(path="FILE/sub")
def test_store_paths(path):
    CASES["store_path"] += 1
    with tempfile.TemporaryDirectory() as d:
        a_file = os.path.join(d, "FILE")
        open(a_file, "w").close()
        if isinstance(path, str) and path.split("/")[0] in ("FILE", "MISSING"):
            path = os.path.join(d, path)
        elif (
            isinstance(path, (str, bytes))
            and path
            and not os.path.isabs(path if isinstance(path, str) else path.decode("latin-1"))
        ):
            path = os.path.join(d, path) if isinstance(path, str) else os.path.join(d.encode(), path)
        try:
            with DiskStore(DiskStoreConfig(path=path)) as s:
                _roundtrip(s, make_ns())
        except ConfigError as e:
            assert "path" in str(e), str(e)  # the one setting fuzzed here is named (never any ConfigError)
        except (StoreDirError, StoreFormatError) as e:
            named = [repr(path)]
            if isinstance(path, (str, bytes)) and path:
                named.append(os.path.abspath(os.fsdecode(path)))
            assert any(n in str(e) for n in named), str(e)


# --- keys ------------------------------------------------------------------------------------------------------------
KEYS = st.one_of(
    st.text(max_size=40),
    st.text(min_size=90, max_size=300),
    st.binary(max_size=40),
    st.binary(min_size=395, max_size=1100),
    st.integers(),
    st.none(),
    st.floats(),
    st.tuples(st.text()),
    st.builds(bytearray, st.binary(max_size=20)),
    st.builds(memoryview, st.binary(max_size=20)),
    st.sampled_from(["\ud800", "a\udfffb", "\0", "é" * 600, "x" * 1025, b"x" * 1025, "", b""]),
)


def _valid_key(k) -> bool:
    try:
        key_bytes(k)
        return True
    except ConfigError:
        return False


def test_odd_keys_round_trip_or_fail_clearly(tmp_path):
    ns = make_ns()
    page = small_page(3, ns)
    blob = encode_page(page, ns.kv_dtype, "raw", ns.head_dim)
    with (
        DiskStore(DiskStoreConfig(path=str(tmp_path / "d"))) as s,
        TierEngine(TierConfig(path=str(tmp_path / "e"), host_bytes=1 << 20)) as eng,
    ):

        @FUZZ
        @given(key=KEYS, other=KEYS)
        @example(key="\ud800", other="a")
        @example(key="0", other="\udfff")
        def check(key, other):
            CASES["keys"] += 1
            out = np.empty_like(page)
            s.clear()  # each example starts from empty stores: earlier examples' keys must not answer for `other`
            eng.clear()
            for target, put in (
                (s, lambda: s.put_many(ns, [key], [blob])),
                (eng, lambda: eng.put_many(ns, [key], [page])),
            ):
                ops = [put, lambda: target.get_many(ns, [key], [out]), lambda: target.exists_many(ns, [key])]
                if target is s:
                    ops += [
                        lambda: s.contains(ns, [key]),
                        lambda: s.delete_many(ns, [key]),
                        lambda: s.set_scores(ns, [key], [1.0]),
                    ]
                else:
                    ops += [lambda: eng.tiers_of(ns, [key]), lambda: eng.set_scores(ns, [key], [1.0])]
                if not _valid_key(key):
                    for op in ops:
                        with pytest.raises(ConfigError, match="page key"):
                            op()
                    continue
                assert all(put())
                out[...] = 0
                assert target.get_many(ns, [key], [out]) == [True]
                assert np.array_equal(out, page)
                assert target.exists_many(ns, [key]) == 1
                if _valid_key(other) and key_bytes(other) != key_bytes(key):
                    assert target.get_many(ns, [other], [out]) == [False]
                    assert target.exists_many(ns, [other]) == 0

        check()


# --- page buffers ----------------------------------------------------------------------------------------------------
def _buffers(ns):
    page = small_page(5, ns)
    n = page.size
    return {
        "right": page.copy(),
        "short": np.zeros(n - 64, page.dtype),
        "long": np.zeros(n + 64, page.dtype),
        "half": np.zeros(n // 2, page.dtype),  # a whole number of rows, but not this page's size
        "odd-bytes": np.zeros(n * 2 - 3, np.uint8),
        "float32-same-bytes": np.zeros(n // 2, np.float32),
        "float64": np.zeros(n, np.float64),
        "transposed": np.zeros(page.shape[::-1], page.dtype).T,  # not C-contiguous
        "strided": np.zeros(n * 2, page.dtype)[::2],
        "read-only": np.frombuffer(bytes(page.nbytes), page.dtype),
        "2d-same-bytes": np.zeros((n // 64, 64), page.dtype),
        "bytes": bytes(page.nbytes),
        "bytearray": bytearray(page.nbytes),
        "list": [0] * n,
        "none": None,
        "empty": np.zeros(0, page.dtype),
    }


def test_wrong_page_buffers_are_errors_and_never_drop_the_stored_page(tmp_path):
    ns = make_ns()
    page = small_page(5, ns)
    bufs = _buffers(ns)
    with (
        TierEngine(TierConfig(path=str(tmp_path), host_bytes=1 << 20)) as eng,
        TierEngine(TierConfig(path=str(tmp_path / "nodram"), host_bytes=0)) as disk_only,
    ):
        for e in (eng, disk_only):
            assert all(e.put_many(ns, ["p"], [page]))
            assert e.flush(timeout=30)

        @FUZZ
        @given(
            name=st.sampled_from(sorted(bufs)),
            which=st.sampled_from(["dram", "disk"]),
            op=st.sampled_from(["get", "put"]),
        )
        @example(name="float64", which="disk", op="get")  # was a miss that dropped the stored page as corrupt
        @example(name="half", which="disk", op="get")
        def check(name, which, op):
            CASES["buffers"] += 1
            e = eng if which == "dram" else disk_only
            buf = bufs[name]
            out_ok = isinstance(buf, np.ndarray) and buf.flags.c_contiguous and buf.flags.writeable
            try:
                if op == "get":
                    got = e.get_many(ns, ["p"], [buf.copy() if out_ok else buf])
                    # only a buffer of exactly the page's bytes can take it: then the bytes are the page's
                    assert got == [True] and len(memoryview(buf).cast("B")) == page.nbytes, (name, got)
                else:
                    ok = e.put_many(ns, [f"new-{name}"], [buf])
                    assert ok == [True] or ok == [False]
            except (CodecError, ConfigError) as err:
                assert "page" in str(err) or "buffer" in str(err), str(err)
            # whatever the caller did, the stored page is still there and still exact
            out = np.empty_like(page)
            assert e.get_many(ns, ["p"], [out]) == [True], (name, which, op)
            assert np.array_equal(out, page)

        check()
        assert disk_only.stats().disk.corrupt_dropped == 0


def test_torch_buffers_of_the_wrong_kind_are_errors(tmp_path):
    torch = pytest.importorskip("torch")
    ns = make_ns()
    page = small_page(5, ns)
    with TierEngine(TierConfig(path=str(tmp_path), host_bytes=0)) as e:
        e.put_many(ns, ["p"], [page])
        assert e.flush(timeout=30)
        for buf in (
            torch.zeros(page.size, dtype=torch.bfloat16).view(2, -1).t(),  # non-contiguous
            torch.zeros(page.size - 8, dtype=torch.bfloat16),
        ):
            CASES["torch_buffers"] += 1
            with pytest.raises(CodecError):
                e.get_many(ns, ["p"], [buf])
        good = torch.zeros(page.size, dtype=torch.bfloat16)
        assert e.get_many(ns, ["p"], [good]) == [True]
        assert np.array_equal(good.view(torch.int16).numpy().view(np.uint16).reshape(page.shape), page)


def test_put_of_a_blob_with_another_dtype_is_refused(tmp_path):
    ns = make_ns()
    other = encode_page(small_page(1, make_ns(kv_dtype="float16")), "float16", "raw", ns.head_dim)
    with DiskStore(DiskStoreConfig(path=str(tmp_path))) as s:
        CASES["blob_dtype"] += 1
        with pytest.raises(CodecError, match="float16"):
            s.put_many(ns, ["x"], [other])
        assert s.keys(ns) == []


# --- blobs ------------------------------------------------------------------------------------------------------------
@FUZZ
@given(
    codec=st.sampled_from(CODEC_NAMES),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    extra=st.binary(max_size=8),
)
def test_damaged_blobs_decode_or_fail_with_a_codec_error(codec, edits, cut, extra):
    CASES["blobs"] += 1
    ns = make_ns()
    page = small_page(2, ns)
    blob = bytearray(encode_page(page, ns.kv_dtype, codec, ns.head_dim))
    for pos, val in edits:
        blob[pos % len(blob)] = val
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    blob += extra
    out = np.full_like(page, 0x5A5A)
    try:
        peek_header(bytes(blob))
        h = decode_page(bytes(blob), out, ns.kv_dtype)
    except CodecError:
        return
    assert h.raw_nbytes == page.nbytes  # never data of another length


def test_damaged_segment_bytes_are_misses_never_wrong_pages(tmp_path):
    ns = make_ns()
    seeds = list(range(16))

    @settings(FUZZ, max_examples=25)
    @given(
        codec=st.sampled_from(["raw", "zstd", "int8"]),
        flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6),
    )
    def check(codec, flips):
        CASES["segment_bytes"] += 1
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            with DiskStore(DiskStoreConfig(path=d, direct_io=False)) as s:
                expect = {}
                for i in seeds:
                    blob = encode_page(small_page(i, ns), ns.kv_dtype, codec, ns.head_dim)
                    expect[f"k{i}"] = blob
                    s.put_many(ns, [f"k{i}"], [blob])
            seg = [os.path.join(d, "segments", f) for f in os.listdir(os.path.join(d, "segments"))][0]
            with open(seg, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                for where, x in flips:
                    f.seek(int(where * size))
                    b = f.read(1)
                    f.seek(int(where * size))
                    f.write(bytes([b[0] ^ x]))
            with DiskStore(DiskStoreConfig(path=d)) as s:
                for k, blob in expect.items():
                    want = np.empty_like(small_page(0, ns))
                    decode_page(blob, want, ns.kv_dtype)
                    out = np.empty_like(want)
                    got = s.get_many(ns, [k], [out])
                    assert got == [False] or np.array_equal(out, want), k

    check()


# --- store directories and namespaces ----------------------------------------------------------------------------
JSONABLE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.sampled_from([0, 1, 2, 1.0, "1"]),
)
STAMPS = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda f, v: json.dumps({"format": f, "version": v}).encode(),
        st.sampled_from(["kvdrive-store", "other", None, 1]),
        JSONABLE,
    ),
    st.builds(lambda v: json.dumps(v).encode(), JSONABLE),
)


def test_store_dir_with_a_strange_stamp_is_refused_clearly(tmp_path, capsys):
    @FUZZ
    @given(stamp=STAMPS)
    def check(stamp):
        CASES["stamps"] += 1
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            with open(os.path.join(d, FORMAT_FILE), "wb") as f:
                f.write(stamp)
            try:
                stamp_ok = json.loads(stamp) == {"format": "kvdrive-store", "version": 1}
            except (ValueError, UnicodeDecodeError):
                stamp_ok = False
            try:
                DiskStore(DiskStoreConfig(path=d)).close()
                assert stamp_ok, stamp
            except StoreFormatError as e:
                assert not stamp_ok and d in str(e), str(e)
            capsys.readouterr()
            rc = cli.main(["verify", d])
            err = capsys.readouterr().err.strip().splitlines()
            if not stamp_ok:
                assert rc == 2 and len(err) == 1 and err[0].startswith("kvdrive: error:") and d in err[0], err

    check()


NS_FIELDS = [
    "model",
    "kv_dtype",
    "layout",
    "page_size",
    "num_heads",
    "head_dim",
    "num_layers",
    "tp_rank",
    "tp_size",
    "tenant",
    "extra",
]


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(NS_FIELDS), EDGY, min_size=1, max_size=2))
@example(fields={"extra": None})
@example(fields={"extra": 5})
def test_namespace_values(fields):
    CASES["namespace"] += 1
    base = dict(model="m", kv_dtype="bfloat16", layout="mha", page_size=16, num_heads=2, head_dim=64, num_layers=2)
    try:
        ns = Namespace(**{**base, **fields})
    except ConfigError as e:
        assert any(name in str(e) for name in fields), str(e)
        return
    assert len(ns.id) == 16 and Namespace.from_canonical(ns.canonical) == ns


def test_another_models_pages_are_misses(tmp_path):
    ns = make_ns()
    with TierEngine(TierConfig(path=str(tmp_path), host_bytes=1 << 20)) as e:
        e.put_many(ns, ["a", "b"], [small_page(1, ns), small_page(2, ns)])
        assert e.flush(timeout=30)

    variants = st.one_of(
        st.builds(lambda m: {"model": m}, st.text(min_size=1, max_size=20)),
        st.builds(lambda t: {"tenant": t}, st.text(min_size=1, max_size=8)),
        st.builds(lambda r: {"tp_rank": r, "tp_size": r + 1}, st.integers(1, 7)),
        st.builds(lambda p: {"page_size": p}, st.sampled_from([1, 8, 32, 64])),
        st.builds(lambda d: {"kv_dtype": d}, st.sampled_from(["float16", "float32", "int8", "uint8"])),
        st.builds(lambda x: {"extra": (("pp", x),)}, st.text(max_size=4)),
        st.just({"layout": "mla", "num_heads": 1}),
        st.just({"num_layers": 3}),
    )

    with TierEngine(TierConfig(path=str(tmp_path), host_bytes=1 << 20)) as e:

        @FUZZ
        @given(over=variants)
        def check(over):
            CASES["other_model"] += 1
            other = make_ns(**over)
            assume(other.id != ns.id)
            out = np.empty(small_page(1, ns).nbytes, np.uint8)
            assert e.get_many(other, ["a", "b"], [out, out.copy()]) == [False, False]
            assert e.exists_many(other, ["a", "b"]) == 0
            assert e.tiers_of(other, ["a"]) == [None]

        check()
        out = np.empty_like(small_page(1, ns))
        assert e.get_many(ns, ["a"], [out]) == [True] and np.array_equal(out, small_page(1, ns))
        assert not math.isnan(e.stats().encode_s)
