"""Two CPU SGLang servers ("nodes"), each with its own --kvdrive-dir, sharing one Mooncake Store master (issue 19).

A long document sent to node A reaches the shared tier behind A's local tiers (write-behind of the pages A's
promoter admits); sent then to node B, whose own tiers are empty, it is served from the remote tier: storage-hit
tokens > 0 and greedy output equal to the radix-only reference. Then A is killed while it serves (kill -9 of its
process group): B keeps answering every prompt with the reference output -- the objects held in A's segment stay
listed for a while but cannot be read, which B must take as misses (and recompute), never as pages.
"""

from __future__ import annotations

import importlib.util
import json
import threading

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("sglang is not installed: the e2e server tests need the [sglang] extra", allow_module_level=True)

from tests.tier.mooncake_master import Master, mooncake_or_skip

from .common import MAX_NEW, PAGE, PROMPT_TOKENS, assert_plugin_ok, at_least, kvdrive_entries, server, stop, wait_for

pytestmark = pytest.mark.e2e

PAGES = PROMPT_TOKENS // PAGE
# small segments and buffers (the tiny model's pages are a few KiB); a short retry window so B retries within the test
REMOTE_CONFIG = {"global_segment_size": 64 << 20, "local_buffer_size": 32 << 20, "retry_s": 2.0, "timeout_s": 2.0}


def node_args(store, url, **remote) -> list[str]:
    # --kvdrive-reload always: a 2-layer model's prefill is rightly cheaper than a reload (test_server_cpu.py says
    # why); admit_min_reuse 1: a page seen once is admitted to the disk, hence to the shared tier, at once
    return [
        "--kv-tier",
        "kvdrive",
        "--kvdrive-dir",
        str(store),
        "--kvdrive-reload",
        "always",
        "--kvdrive-promoter",
        json.dumps({"admit_min_reuse": 1}),
        "--kvdrive-remote",
        url,
        "--kvdrive-remote-config",
        json.dumps({**REMOTE_CONFIG, **remote}),
    ]


def test_two_nodes_share_a_remote_tier_and_survive_a_node_killed(tiny_model, all_prompts, reference, e2e_dir, ext_dir):
    mooncake_or_skip()
    master = Master(str(e2e_dir / "mooncake_master.log")).start()
    a = b = None
    try:
        store_a, store_b = e2e_dir / "remote_a", e2e_dir / "remote_b"
        # A idles while B starts: with SGLang's default idle loop its scheduler would spin a core and double B's
        # start on 2 cores (tests/e2e/common.py server(); found by CI's durations: B's start 76 s vs 44 s)
        a = server(
            "remote_a",
            tiny_model,
            e2e_dir,
            ext_dir,
            node_args(store_a, master.url),
            max_total_tokens=1024,
            sleep_on_idle=True,
        ).start()
        assert_plugin_ok(a)
        doc = all_prompts[0]
        first = a.generate(doc, MAX_NEW)
        assert first["ids"] == reference["all_ids"][0]
        # A's pages reach its disk (admitted), and from its write-down the shared tier
        assert wait_for(lambda: at_least(kvdrive_entries(store_a), PAGES), 60), kvdrive_entries(store_a)
        # B lends the store no memory: every shared object lives in A's segment, so A's death takes them all
        b = server(
            "remote_b",
            tiny_model,
            e2e_dir,
            ext_dir,
            node_args(store_b, master.url, global_segment_size=0),
            max_total_tokens=1024,
        ).start()
        assert_plugin_ok(b)
        on_b = b.generate(doc, MAX_NEW)
        assert on_b["details"]["storage"] > 0, (on_b, b.log_tail(30))  # B's own tiers were empty: remote pages
        assert on_b["ids"] == reference["all_ids"][0], "B's output from remote pages differs from the reference"

        # traffic on both nodes; A killed (-9, whole process group) while it serves
        others = all_prompts[1:5]
        for i, p in enumerate(others[:2], start=1):
            assert a.generate(p, MAX_NEW)["ids"] == reference["all_ids"][i]
        wait_for(lambda: at_least(kvdrive_entries(store_a), 3 * PAGES), 30)
        busy = threading.Thread(target=lambda: _swallow(a.generate, others[2], MAX_NEW), daemon=True)
        busy.start()
        stop(a, "remote_a", graceful=False)
        a = None
        busy.join(30)
        # B: the documents A wrote (listed, maybe unreadable now) and one nobody wrote, twice each
        for _ in range(2):
            for i, p in enumerate(others, start=1):
                r = b.generate(p, MAX_NEW)
                assert r["ids"] == reference["all_ids"][i], f"B's output for prompt {i} differs after A died"
        assert b.generate(doc, MAX_NEW)["ids"] == reference["all_ids"][0]
    finally:
        for srv, name in ((a, "remote_a"), (b, "remote_b")):
            if srv is not None:
                stop(srv, name, graceful=False)
        master.kill()
    assert "remote tier mooncake://" in b.log_text(), "B never logged its remote tier:\n" + b.log_tail(30)


def _swallow(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the node is being killed under this request
        pass
