"""A damaged store never takes a real server down (issue 17): a ``--kv-tier kvdrive`` CPU server (tiny generated Llama),
its store damaged between restarts, every start must succeed and every output equal the radix-only reference.

Rounds (fixed seed): random multi-byte flips in every file of the store (format stamp, LMDB data.mdb and lock.mdb,
every segment file, the lock files); then truncations (stamp emptied, data.mdb halved, segments cut at random,
lock.mdb deleted); then ``index/`` deleted (the index is rebuilt from the segment files alone, I11: the prompts come
back from storage); then the stamp and ``segments/`` deleted. Each restart goes through the launcher
(``--kvdrive-dir``), which must not refuse a damaged store; the server log carries kvdrive's recovery line and /metrics
counts ``kvdrive:store_recoveries_total{kind=...}``. At the end ``kvdrive verify`` finds the repaired store clean.
The tier-level loop of hundreds of rounds is bench/stress/damage_stress.py (20+ in tests/tier/test_recovery.py).
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil

import pytest


def _sglang_installed() -> bool:
    try:
        return importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        return False


if not _sglang_installed():
    pytest.skip("sglang is not installed: the e2e server tests need the [sglang] extra", allow_module_level=True)

from bench.stress.damage_stress import Damage, damage, flip, store_files

from .common import (
    MAX_NEW,
    PAGE,
    PROMPT_TOKENS,
    at_least,
    grep_log,
    kvdrive_cli,
    kvdrive_entries,
    metric_text,
    server,
    stop,
    wait_for,
)

pytestmark = pytest.mark.e2e

SEED = 1717
N = 3  # prompts per round: ~400 tokens each, more than the 1024-token device pool keeps


def recoveries(srv) -> dict[str, float]:
    out = {}
    for line in metric_text(srv).splitlines():
        if line.startswith("kvdrive:store_recoveries_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_damaged_store_between_restarts_never_stops_the_server(tiny_model, all_prompts, reference, e2e_dir, ext_dir):
    store = e2e_dir / "damage_store"
    shutil.rmtree(store, ignore_errors=True)
    args = ["--kv-tier", "kvdrive", "--kvdrive-dir", str(store), "--kvdrive-reload", "always", "--enable-metrics"]
    rng = random.Random(SEED)
    prompts, ref = all_prompts[:N], reference["all_ids"][:N]

    def serve(name: str) -> tuple[object, list[dict]]:
        srv = server(name, tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024).start()  # must start
        runs = [srv.generate(p, MAX_NEW) for p in prompts]
        assert [r["ids"] for r in runs] == ref, f"{name}: output differs from the radix-only server"
        return srv, runs

    srv, _ = serve("damage_0")
    try:
        # asked again, the prompts' pages are worth keeping: the promoter admits them to the disk (selective writes)
        assert [srv.generate(p, MAX_NEW)["ids"] for p in prompts] == ref
        got = wait_for(lambda: at_least(kvdrive_entries(store), N * (PROMPT_TOKENS // PAGE)), 30)
        assert got, f"the store holds {kvdrive_entries(store)} entries"
    finally:
        stop(srv, "damage_0")

    def round_(name: str, harm, *, want_kind: str | None, from_storage: bool = False) -> None:
        harm()
        srv, runs = serve(name)
        try:
            if from_storage:  # the rebuilt index serves the pages the segment files hold
                assert any(r["details"].get("storage", 0) > 0 for r in runs), runs
            lines = grep_log(srv, "kvdrive: store ")
            assert lines, f"{name}: no recovery line in the server log"
            if want_kind:
                counts = wait_for(lambda: recoveries(srv).get(want_kind), 30)  # the reporter feeds it every 10 s
                assert counts, f"{name}: /metrics lacks kvdrive:store_recoveries_total{{kind={want_kind!r}}}"
        finally:
            stop(srv, name)

    def flips():
        for f in store_files(str(store)):
            flip(rng, f)

    round_("damage_flips", flips, want_kind="stamp_rewritten")

    def truncations():
        damage(rng, str(store), Damage.TRUNCATE_EMPTY, str(store / "KVDRIVE_FORMAT"))
        damage(rng, str(store), Damage.TRUNCATE_HALF, str(store / "index" / "data.mdb"))
        for seg in sorted((store / "segments").glob("*.kvs"))[:2]:
            damage(rng, str(store), Damage.TRUNCATE_RANDOM, str(seg))
        if (store / "index" / "lock.mdb").exists():
            os.unlink(store / "index" / "lock.mdb")

    round_("damage_truncations", truncations, want_kind=None)

    round_("damage_no_index", lambda: shutil.rmtree(store / "index"), want_kind=None, from_storage=True)

    def no_stamp_no_segments():
        os.unlink(store / "KVDRIVE_FORMAT")
        shutil.rmtree(store / "segments")

    round_("damage_no_segments", no_stamp_no_segments, want_kind=None)
    # the index still names pages of the deleted segment files that no request read again: verify drops them (1)
    p = kvdrive_cli("verify", str(store), check=False)
    assert p.returncode in (0, 1), p.stdout + p.stderr
    kvdrive_cli("verify", str(store))  # and then the store is clean
