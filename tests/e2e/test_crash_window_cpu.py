"""Crash persistence under the shipped write policy (issue 17): what a ``kill -9`` loses.

With the defaults, kvdrive writes selectively: a page SGLang backs up lands in kvdrive's compressed DRAM tier and goes
to disk once the promoter admits it (reused, or continued by a conversation's next turn). Admitted pages are queued
for the disk on the report tick after their reuse (``Upkeep.push_scores``, every ``Reporter`` interval: 10 s), so the
bound is: **a page reused before the crash is on disk within one report tick plus one write-down batch.** Pages used
once are never written while they sit in DRAM, so a crash loses them (a miss later, never a wrong page).

This test measures that with a real server: two prompts used once, two reused; it times how long after the reuse the
reused prompts' pages are on disk (``kvdrive stats``, readable while the server runs), SIGKILLs the whole process
group, restarts on the same directory and asks every prompt again. Of the pages reused before the kill, the share
served from disk after the restart must be all of them; the prompts used once must be recomputed; every output must
equal the radix-only reference. The figures go to ``crash-window.json`` beside the server logs.

``--kvdrive-reload always``: the tiny CPU model recomputes faster than it reloads, so ``auto`` would (rightly)
recompute and hide what the disk holds (tests/sglang/test_cost_meter.py).
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest


def _sglang_installed() -> bool:
    try:
        return importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        return False


if not _sglang_installed():
    pytest.skip("sglang is not installed: the e2e server tests need the [sglang] extra", allow_module_level=True)

from .common import MAX_NEW, PAGE, PROMPT_TOKENS, assert_plugin_ok, kvdrive_entries, server, stop, wait_for

pytestmark = pytest.mark.e2e

REPORT_TICK_S = 10.0  # kvdrive_sglang/metrics.py Reporter's interval: the tick that queues admitted pages
PAGES = PROMPT_TOKENS // PAGE  # full pages per prompt (the last, partial page is never stored)


def test_reused_pages_survive_kill_9_within_one_tick(tiny_model, all_prompts, reference, e2e_dir, ext_dir):
    store = e2e_dir / "crash_window_store"
    texts = all_prompts[4:8]  # prompts of their own: the window is not helped by another test's store
    ref = reference["all_ids"][4:8]
    reused, once = [0, 1], [2, 3]
    args = ["--kv-tier", "kvdrive", "--kvdrive-dir", str(store), "--kvdrive-reload", "always"]
    srv = server("crash_window_1", tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024).start()
    try:
        assert_plugin_ok(srv)
        first = [srv.generate(t, MAX_NEW) for t in texts]
        assert kvdrive_entries(store) == 0, "a page used once went to disk under selective write-down"
        again = [srv.generate(texts[i], MAX_NEW) for i in reused]
        t_reused = time.monotonic()
        want = len(reused) * PAGES
        # bounded by the promise: one report tick plus a write-down batch (a generous 2x margin on a shared machine)
        on_disk = wait_for(lambda: kvdrive_entries(store) >= want, 2 * REPORT_TICK_S + 10, interval=0.25)
        window_s = time.monotonic() - t_reused
        entries_before_kill = kvdrive_entries(store)
    finally:
        stop(srv, "crash_window_1", graceful=False)  # SIGKILL to the whole process group: no clean stop
    assert on_disk, f"the reused prompts' {want} pages were not on disk {window_s:.1f} s after their reuse"
    assert [r["ids"] for r in first] == ref
    assert [r["ids"] for r in again] == [ref[i] for i in reused]

    srv = server("crash_window_2", tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024).start()
    try:
        assert_plugin_ok(srv)
        after = [srv.generate(t, MAX_NEW) for t in texts]
    finally:
        stop(srv, "crash_window_2")
    assert [r["ids"] for r in after] == ref, "output after kill -9 and restart differs from the radix-only server"
    served = sum(after[i]["details"]["storage"] for i in reused) // PAGE
    for i in reused:
        assert after[i]["details"]["storage"] >= PAGES * PAGE, after[i]
    for i in once:  # used once before the crash: never admitted, so lost with the process (recomputed)
        assert after[i]["details"]["storage"] == 0, after[i]
    figures = {
        "report_tick_s": REPORT_TICK_S,
        "reused_pages_before_kill": want,
        "seconds_from_reuse_to_on_disk": round(window_s, 2),
        "entries_on_disk_at_kill": entries_before_kill,
        "reused_pages_served_from_disk_after_restart": served,
        "share_served_from_disk": round(served / want, 3),
        "once_used_pages_served_from_disk": sum(after[i]["details"]["storage"] for i in once) // PAGE,
    }
    (e2e_dir / "crash-window.json").write_text(json.dumps(figures, indent=2))
    print("crash window:", figures)
