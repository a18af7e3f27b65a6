"""The ``kvdrive`` console command, on real stores (real LMDB index, real segment files) in temp dirs."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvdrive_sglang.tier.cli import main
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.store_dir import FORMAT_FILE
from kvdrive_sglang.tier.synthetic import kv_page

SHAPE = dict(page_size=16, num_heads=4, head_dim=64)
RAW_PAGE_BYTES = 2 * 16 * 4 * 64 * 2  # bf16


def make_ns(tenant: str = "", model: str = "tiny-llama", tp_rank: int = 0, tp_size: int = 1) -> Namespace:
    return Namespace(
        model=model,
        kv_dtype="bfloat16",
        layout="mha",
        num_layers=2,
        tp_rank=tp_rank,
        tp_size=tp_size,
        tenant=tenant,
        **SHAPE,
    )


def page(seed: int) -> np.ndarray:
    return kv_page(np.random.default_rng(seed), **SHAPE)


def populate(d: Path, spec: dict[Namespace, int], *, seed0: int = 0, ttl_s: float | None = None) -> dict:
    """Write ``n`` pages per namespace through the real engine into small (64 KiB) segments, one group commit per
    page, so a store of a few dozen pages spans several segments. Returns {(ns, key): page}."""
    pages = {}
    eng = TierEngine(
        TierConfig(
            path=str(d),
            host_bytes=0,
            disk_bytes=64 << 20,
            writedown_batch_bytes=1,
            default_ttl_s=ttl_s,
            disk={"segment_bytes": 64 << 10},
        )
    )
    try:
        for j, (ns, n) in enumerate(spec.items()):
            keys = [f"{ns.tenant or 'ns'}-{i}" for i in range(n)]
            data = [page(seed0 + 1000 * j + i) for i in range(n)]
            assert all(eng.put_many(ns, keys, data))
            pages.update({(ns, k): p for k, p in zip(keys, data)})
    finally:
        eng.close()
    return pages


def read_back(d: Path, items) -> dict:
    """{(ns, key): page or None} read through a fresh engine (disk tier only)."""
    out = {}
    eng = TierEngine(TierConfig(path=str(d), host_bytes=0, disk_bytes=64 << 20))
    try:
        for ns, key in items:
            buf = np.empty_like(page(0))
            out[(ns, key)] = buf if eng.get_many(ns, [key], [buf])[0] else None
    finally:
        eng.close()
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def stats_json(capsys, d) -> dict:
    rc, out, err = run(capsys, "stats", d, "--json")
    assert rc == 0, err
    return json.loads(out)


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvdrive: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


def unique_prefix(nid: bytes, others: list[bytes]) -> str:
    h = nid.hex()
    n = 4
    while any(o.hex().startswith(h[:n]) for o in others):
        n += 1
    return h[:n]


def flip_byte_in_a_page(d: Path) -> None:
    """Corrupt one byte in the middle of the first page payload of the first segment file."""
    seg = sorted((d / "segments").glob("seg-*.kvs"))[0]
    data = bytearray(seg.read_bytes())
    assert data[:4] == b"KVPG"  # a segment starts with a page blob
    nxt = data.find(b"KVPG", 4)  # the next blob (or a chance match inside this one: still inside it)
    end = nxt if nxt > 0 else len(data)
    pos = end // 2
    assert pos > 64
    with open(seg, "r+b") as f:
        f.seek(pos)
        f.write(bytes([data[pos] ^ 0x5A]))


# --- stats ------------------------------------------------------------------------------------------------------------
def test_stats_text_and_json_two_namespaces(tmp_path, capsys):
    d = tmp_path / "store"
    a, b = make_ns("alice"), make_ns("bob", model="other-model", tp_rank=1, tp_size=2)
    populate(d, {a: 12, b: 5})

    rc, out, err = run(capsys, "stats", d)
    assert rc == 0, err
    assert str(d) in out
    assert re.search(r"^entries\s+17$", out, re.M), out
    assert re.search(r"^format\s+version 1$", out, re.M), out
    assert "KiB" in out  # human-readable sizes
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:16] in (a.id[:8].hex(), b.id[:8].hex())}
    assert set(rows) == {a.id[:8].hex(), b.id[:8].hex()}
    ra, rb = rows[a.id[:8].hex()], rows[b.id[:8].hex()]
    assert ra[1:7] == ["tiny-llama", "bfloat16", "mha", "0/1", "alice", "12"]
    assert rb[1:7] == ["other-model", "bfloat16", "mha", "1/2", "bob", "5"]

    j = stats_json(capsys, d)
    assert j["path"] == str(d) and j["format_version"] == 1
    assert j["entries"] == 17
    assert j["raw_bytes"] == 17 * RAW_PAGE_BYTES
    nss = {n["id"]: n for n in j["namespaces"]}
    assert set(nss) == {a.id.hex(), b.id.hex()}
    na, nb = nss[a.id.hex()], nss[b.id.hex()]
    assert (na["pages"], nb["pages"]) == (12, 5)
    assert na["short_id"] == a.id[:8].hex()
    assert (nb["model"], nb["tp_rank"], nb["tp_size"], nb["tenant"], nb["layout"], nb["kv_dtype"]) == (
        "other-model",
        1,
        2,
        "bob",
        "mha",
        "bfloat16",
    )
    assert na["bytes"] + nb["bytes"] == j["live_bytes"]
    assert j["file_bytes"] >= j["live_bytes"] > 0
    assert j["dead_bytes"] == j["file_bytes"] - j["live_bytes"]
    assert j["codec_ratio"] == pytest.approx(j["raw_bytes"] / j["live_bytes"], rel=1e-3)
    assert j["segments"] >= 2


# --- verify -----------------------------------------------------------------------------------------------------------
def test_verify_drops_a_corrupt_page_and_keeps_the_rest(tmp_path, capsys):
    d = tmp_path / "store"
    a, b = make_ns("a"), make_ns("b")
    pages = populate(d, {a: 10, b: 6})

    rc, out, err = run(capsys, "verify", d)
    assert rc == 0, err
    assert "checked 16 page(s)" in out and "ok 16, bad 0" in out
    assert re.search(r"in \d+\.\d\ds", out)  # elapsed time

    flip_byte_in_a_page(d)
    rc, out, err = run(capsys, "verify", d)
    assert rc == 1, (out, err)
    assert "checked 16 page(s)" in out and "ok 15, bad 1" in out

    rc, out, err = run(capsys, "verify", d)
    assert rc == 0, (out, err)
    assert "checked 15 page(s)" in out and "ok 15, bad 0" in out
    assert stats_json(capsys, d)["entries"] == 15

    got = read_back(d, pages)
    missing = [k for k, v in got.items() if v is None]
    assert len(missing) == 1
    for k, v in got.items():
        if v is not None:
            np.testing.assert_array_equal(v, pages[k])


# --- gc ---------------------------------------------------------------------------------------------------------------
def test_gc_reclaims_deleted_pages_and_keeps_live_ones_exact(tmp_path, capsys):
    d = tmp_path / "store"
    a = make_ns("a")
    pages = populate(d, {a: 30})
    keys = [k for _, k in pages]
    doomed = [k for i, k in enumerate(keys) if i % 5]  # 24 of 30, spread over every segment
    kept = [k for i, k in enumerate(keys) if i % 5 == 0]

    # with nothing dead, gc reclaims nothing and (capacity aside) never evicts
    rc, out, err = run(capsys, "gc", d)
    assert rc == 0, err
    assert "segments reclaimed 0" in out
    assert stats_json(capsys, d)["entries"] == 30

    with DiskStore(DiskStoreConfig(path=str(d))) as st:
        assert st.delete_many(a, doomed) == len(doomed)
    before = stats_json(capsys, d)
    assert before["entries"] == 6 and before["dead_share"] > 0.7

    rc, out, err = run(capsys, "gc", d)
    assert rc == 0, err
    m = re.search(r"segments reclaimed (\d+)", out)
    assert m and int(m.group(1)) >= 2, out
    assert "file bytes" in out and "->" in out
    after = stats_json(capsys, d)
    assert after["entries"] == 6
    assert after["file_bytes"] < before["file_bytes"] / 2
    assert after["live_bytes"] == before["live_bytes"]

    got = read_back(d, pages)
    for k in kept:
        np.testing.assert_array_equal(got[(a, k)], pages[(a, k)])
    assert all(got[(a, k)] is None for k in doomed)
    rc, out, _ = run(capsys, "verify", d)
    assert rc == 0 and "ok 6, bad 0" in out


def test_gc_expires_ttl_pages_only(tmp_path, capsys):
    d = tmp_path / "store"
    keep, short = make_ns("keep"), make_ns("short")
    kept = populate(d, {keep: 4})
    # a TTL runs from when the engine took the page: long enough for all four to reach the disk before expiring
    populate(d, {short: 4}, seed0=500, ttl_s=0.5)
    time.sleep(0.6)
    rc, out, err = run(capsys, "gc", d, "--live-ratio", "1")
    assert rc == 0, err
    assert "expired 4 page(s)" in out
    j = stats_json(capsys, d)
    assert j["entries"] == 4 and [n["id"] for n in j["namespaces"]] == [keep.id.hex()]
    for k, v in read_back(d, kept).items():
        np.testing.assert_array_equal(v, kept[k])


def test_gc_rejects_a_bad_live_ratio(tmp_path, capsys):
    d = tmp_path / "store"
    populate(d, {make_ns(): 1})
    rc, _, err = run(capsys, "gc", d, "--live-ratio", "0")
    assert rc == 2 and "live-ratio" in err


# --- clear ------------------------------------------------------------------------------------------------------------
def test_clear_namespace_prefix_removes_only_that_namespace(tmp_path, capsys):
    d = tmp_path / "store"
    a, b = make_ns("a"), make_ns("b")
    pages = populate(d, {a: 12, b: 6})
    before = stats_json(capsys, d)

    rc, out, err = run(capsys, "clear", d, "--namespace", unique_prefix(a.id, [b.id]))
    assert rc == 0, err
    assert "removed 12 page(s)" in out
    after = stats_json(capsys, d)
    assert after["entries"] == 6
    assert [n["id"] for n in after["namespaces"]] == [b.id.hex()]
    assert after["file_bytes"] < before["file_bytes"]

    got = read_back(d, pages)
    for (ns, k), v in got.items():
        if ns == b:
            np.testing.assert_array_equal(v, pages[(ns, k)])
        else:
            assert v is None


def test_clear_namespace_prefix_errors(tmp_path, capsys):
    d = tmp_path / "store"
    x = make_ns("x")
    # a second namespace whose id shares x's first hex digit, so that digit alone is ambiguous
    y = next(ns for ns in (make_ns(f"t{i}") for i in range(1000)) if ns.id.hex()[0] == x.id.hex()[0])
    populate(d, {x: 2, y: 2})

    rc, out, err = run(capsys, "clear", d, "--namespace", x.id.hex()[0])
    assert_one_line_error(rc, err, "matches 2 namespaces", x.id.hex(), y.id.hex())

    absent = next(c for c in "0123456789abcdef" if not x.id.hex().startswith(c) and not y.id.hex().startswith(c))
    rc, out, err = run(capsys, "clear", d, "--namespace", absent)
    assert_one_line_error(rc, err, "matches no namespace")

    rc, out, err = run(capsys, "clear", d, "--namespace", "xyz")
    assert_one_line_error(rc, err, "hex")
    assert stats_json(capsys, d)["entries"] == 4  # nothing removed by any of these


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_clear_all_asks_and_refuses_without_a_tty(tmp_path, capsys, monkeypatch):
    d = tmp_path / "store"
    populate(d, {make_ns("a"): 5, make_ns("b"): 3})

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # not a terminal, no --yes: refuse
    rc, out, err = run(capsys, "clear", d)
    assert_one_line_error(rc, err, "--yes", "not a terminal")
    assert stats_json(capsys, d)["entries"] == 8

    monkeypatch.setattr(sys, "stdin", _Tty("n\n"))  # asked, declined
    rc, out, err = run(capsys, "clear", d)
    assert rc == 1 and "nothing removed" in out and "8 page(s)" in out
    assert stats_json(capsys, d)["entries"] == 8

    monkeypatch.setattr(sys, "stdin", _Tty("y\n"))  # asked, accepted
    rc, out, err = run(capsys, "clear", d)
    assert rc == 0, err
    assert "removed 8 page(s)" in out
    j = stats_json(capsys, d)
    assert j["entries"] == 0 and j["namespaces"] == [] and j["file_bytes"] == 0


# --- errors: not a store ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [["stats"], ["stats", "--json"], ["verify"], ["gc"], ["clear", "--yes"]])
def test_missing_dir_is_an_error_and_is_not_created(tmp_path, capsys, cmd):
    d = tmp_path / "nope"
    rc, out, err = run(capsys, cmd[0], d, *cmd[1:])
    assert_one_line_error(rc, err, "does not exist", str(d))
    assert not d.exists()
    f = tmp_path / "file"
    f.write_text("x")
    rc, out, err = run(capsys, cmd[0], f, *cmd[1:])
    assert_one_line_error(rc, err, "not a directory")


@pytest.mark.parametrize("cmd", ["stats", "verify", "gc"])
def test_other_format_version_is_an_error(tmp_path, capsys, cmd):
    d = tmp_path / "store"
    d.mkdir()
    stamp = json.dumps({"format": "kvdrive-store", "version": 99})
    (d / FORMAT_FILE).write_text(stamp)
    rc, out, err = run(capsys, cmd, d)
    assert_one_line_error(rc, err, "version 99")
    assert sorted(os.listdir(d)) == [FORMAT_FILE] and (d / FORMAT_FILE).read_text() == stamp


@pytest.mark.parametrize("cmd", ["stats", "verify", "gc"])
def test_foreign_or_empty_dir_is_an_error(tmp_path, capsys, cmd):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    rc, out, err = run(capsys, cmd, d)
    assert_one_line_error(rc, err, "not a kvdrive store")
    assert os.listdir(d) == ["cat.jpg"]

    e = tmp_path / "empty"
    e.mkdir()
    rc, out, err = run(capsys, cmd, e)
    assert_one_line_error(rc, err, "not a kvdrive store")
    assert os.listdir(e) == []


# --- a store in use by another process --------------------------------------------------------------------------------
HOLDER = """
import sys, time
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
st = DiskStore(DiskStoreConfig(path=sys.argv[1]))  # shared lock, like a server
print("ready", flush=True)
time.sleep(60)
"""


def test_maintenance_refuses_a_store_a_server_has_open_but_stats_works(tmp_path, capsys):
    d = tmp_path / "store"
    populate(d, {make_ns("a"): 4})
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for argv in (["verify"], ["gc"], ["clear", "--yes"], ["clear", "--namespace", make_ns("a").id.hex()[:6]]):
            rc, out, err = run(capsys, argv[0], d, *argv[1:])
            assert_one_line_error(rc, err, "in use by another process")
            if "pid" in err:
                assert str(proc.pid) in err
        j = stats_json(capsys, d)
        assert j["entries"] == 4
        rc, out, err = run(capsys, "stats", d)
        assert rc == 0 and re.search(r"^entries\s+4$", out, re.M)
    finally:
        proc.kill()
        proc.wait()
    rc, out, err = run(capsys, "verify", d)
    assert rc == 0 and "ok 4, bad 0" in out


# --- the installed entry point ----------------------------------------------------------------------------------------
def _kvdrive() -> list[str]:
    here = Path(sys.executable).parent / "kvdrive"
    if here.exists():
        return [str(here)]
    found = shutil.which("kvdrive")
    return [found] if found else [sys.executable, "-m", "kvdrive_sglang.tier.cli"]


def test_console_script(tmp_path):
    exe = _kvdrive()
    d = tmp_path / "store"
    populate(d, {make_ns("a"): 3})

    def sh(*argv, stdin=subprocess.DEVNULL):
        return subprocess.run(exe + [str(a) for a in argv], stdin=stdin, capture_output=True, text=True, timeout=60)

    r = sh("--version")
    assert r.returncode == 0 and r.stdout.startswith("kvdrive ")
    r = sh("stats", d, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"] == 3
    r = sh("stats", tmp_path / "missing")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"kvdrive: error: store directory {tmp_path / 'missing'} does not exist"]
    assert not (tmp_path / "missing").exists()
    r = sh("clear", d)  # stdin is not a terminal
    assert r.returncode == 2 and "--yes" in r.stderr and "Traceback" not in r.stderr
    r = sh("clear", d, "--yes")
    assert r.returncode == 0 and "removed 3 page(s)" in r.stdout
    r = sh()
    assert r.returncode == 2 and "usage:" in r.stderr


def test_help_says_what_each_command_does(capsys):
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    for cmd in ("stats", "verify", "gc", "clear"):
        assert cmd in out
    for cmd, words in (("stats", "namespace"), ("verify", "checksum"), ("gc", "compact"), ("clear", "--yes")):
        assert main([cmd, "-h"]) == 0
        assert words in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kvdrive ")


# --- kvdrive repair (issue 17) --------------------------------------------------------------------------------------
def test_repair_by_hand_rebuilds_a_damaged_store_and_says_what_it_kept(tmp_path, capsys):
    d = tmp_path / "store"
    items = populate(d, {make_ns("a"): 6})
    (d / FORMAT_FILE).write_bytes(b"\x00\x01garbage")
    (d / "index" / "data.mdb").write_bytes(b"\xff" * 4096)
    for cmd in ("stats", "verify", "gc"):  # the other commands name the fix, and leave the store as it is
        rc, out, err = run(capsys, cmd, d)
        assert_one_line_error(rc, err, "damaged", f"kvdrive repair {d}")
    assert (d / FORMAT_FILE).read_bytes() == b"\x00\x01garbage"
    rc, out, err = run(capsys, "repair", d)
    assert rc == 1, (out, err)
    assert "stamp_rewritten:" in out and "index_rebuilt:" in out and "kept 6 page(s), dropped 0" in out
    got = read_back(d, items)
    assert all(got[k] is not None and np.array_equal(got[k], items[k]) for k in items)
    rc, out, err = run(capsys, "repair", d)  # nothing left to do
    assert rc == 0 and "the store was intact" in out and "kept 6 page(s)" in out


def test_repair_refuses_while_a_server_has_the_store_and_refuses_foreign_dirs(tmp_path, capsys):
    d = tmp_path / "store"
    populate(d, {make_ns("a"): 2})
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        rc, out, err = run(capsys, "repair", d)
        assert_one_line_error(rc, err, "in use by another process")
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    rc, out, err = run(capsys, "repair", tmp_path / "photos")
    assert_one_line_error(rc, err, "not a kvdrive store")
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]


def test_repair_of_a_store_with_only_its_lock_files_left_recreates_it(tmp_path, capsys):
    """Stamp, index/ and segments/ all deleted, kvdrive's lock files left: recognisably a store with nothing left to
    keep; repair recreates it empty instead of calling it "not a kvdrive store" (found by
    bench/stress/damage_stress.py seed 143991470, round 14). An empty directory is still not a store."""
    d = tmp_path / "store"
    populate(d, {make_ns("a"): 2})
    for name in os.listdir(d):
        if name not in ("store.lock", "gc.lock", "open.lock"):
            p = d / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert os.listdir(d)  # lock files only
    rc, out, err = run(capsys, "repair", d)
    assert rc == 1 and "recreated" in out and "kept 0 page(s)" in out, (rc, out, err)
    rc, out, err = run(capsys, "verify", d)
    assert rc == 0, (out, err)
    (tmp_path / "empty").mkdir()
    rc, out, err = run(capsys, "repair", tmp_path / "empty")
    assert_one_line_error(rc, err, "not a kvdrive store")
