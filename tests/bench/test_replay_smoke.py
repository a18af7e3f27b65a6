"""bench/replay_bench.py --preset smoke, interrupted once and resumed, then its accounting checked.

One run of the real harness (real RadixCache, host pool, HiCacheFile, TierEngine, temp dirs) is shared by the checks:
the first attempt is interrupted (SIGINT) as soon as its first (workload, configuration) result is saved, the second
attempt resumes from it; the checks then hold the results to what must be true whatever the numbers are.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "replay_bench.py")
LRU_CONFIGS = ("radix_only", "hicache_host", "hicache_file", "kvdrive_lru")  # same LRU radix tree
TIERS = ("gpu", "host", "dram", "disk")


def _cmd(out, scratch, *extra):
    return [sys.executable, SCRIPT, "--preset", "smoke", "--out", str(out), "--dir", str(scratch), "--no-plots", *extra]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay-smoke")
    out, scratch = tmp / "smoke", tmp / "scratch"
    partial = out.parent / (out.name + ".partial")
    # Ctrl-C as a user at a terminal sends it: with SIGINT's default action. A run started in the background by a
    # non-interactive shell (`cmd &`, as CI scripts may be) inherits SIGINT ignored, and a Python started that way
    # never turns it into KeyboardInterrupt (the first attempt then ran to its end, and this test failed).
    proc = subprocess.Popen(
        _cmd(out, scratch),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(partial.glob("*__*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(partial.glob("*__*.json")), (
        f"no result was saved: {proc.stderr.read() if proc.poll() is not None else ''}"
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    interrupted = proc.returncode != 0
    assert not (out.parent / "smoke.json").exists() or not interrupted
    res = subprocess.run(_cmd(out, scratch, "--resume"), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(str(out) + ".json") as f:
        report = json.load(f)
    return {"report": report, "stderr": res.stderr, "interrupted": interrupted, "md": (tmp / "smoke.md").read_text()}


def configs(smoke):
    for w, wres in smoke["report"]["workloads"].items():
        for name, r in wres["configs"].items():
            yield w, wres, name, r


def test_resume_skipped_what_was_done(smoke):
    assert smoke["interrupted"], "the first attempt finished before the interrupt: the resume path went untested"
    assert "docs/radix_only        (resumed)" in smoke["stderr"]  # the first pair when run one at a time
    assert smoke["report"]["resumed"] is True
    assert set(smoke["report"]["workloads"]) == {"docs", "sessions"}
    for wres in smoke["report"]["workloads"].values():
        assert list(wres["configs"]) == [
            "radix_only",
            "hicache_host",
            "hicache_file",
            "kvdrive_lru",
            "kvdrive_promoter",
        ]


def test_every_configuration_replays_the_same_trace(smoke):
    for w, wres, name, r in configs(smoke):
        assert r["trace_digest"] == wres["trace_digest"], (w, name)
        assert r["requests"] == wres["params"]["requests"], (w, name)
    for wres in smoke["report"]["workloads"].values():
        assert len({r["prompt_tokens"] for r in wres["configs"].values()}) == 1


def test_tokens_saved_are_the_tier_hits(smoke):
    for w, _, name, r in configs(smoke):
        hits = sum(r[f"hit_tokens_{t}"] for t in TIERS)
        assert r["prefill_tokens_saved"] == hits, (w, name)
        assert r["prefill_tokens_saved"] + r["prefill_tokens"] == r["prompt_tokens"], (w, name)
        assert sum(r["timeline"]["requests_end"][-1:]) == r["requests"], (w, name)


def test_radix_only_touches_no_lower_tier(smoke):
    for w, wres in smoke["report"]["workloads"].items():
        r = wres["configs"]["radix_only"]
        assert r["hit_tokens_gpu"] > 0, w
        assert r["hit_tokens_host"] == r["hit_tokens_dram"] == r["hit_tokens_disk"] == 0, w
        assert all(v == 0 for tier in r["bytes"].values() for v in tier.values()), w
        assert r["disk_bytes_at_end"] == 0, w
        # the same LRU tree at the same GPU budget sees the same GPU hits whatever sits below it
        assert {wres["configs"][c]["hit_tokens_gpu"] for c in LRU_CONFIGS} == {r["hit_tokens_gpu"]}, w


def test_host_only_has_no_storage(smoke):
    for w, wres in smoke["report"]["workloads"].items():
        r = wres["configs"]["hicache_host"]
        assert r["hit_tokens_host"] > 0, w  # the smoke trace outgrows the GPU: the host pool must be hit
        assert r["hit_tokens_dram"] == r["hit_tokens_disk"] == 0, w
        assert r["bytes"]["disk"] == {"read": 0, "written": 0} and r["disk_bytes_at_end"] == 0, w
        assert r["bytes"]["host"]["written"] > 0, w


def test_file_backend_reads_only_what_it_wrote(smoke):
    pt = smoke["report"]["page_tokens"]
    page_bytes = smoke["report"]["cost_model"]["bytes_per_token"] * pt
    for w, wres in smoke["report"]["workloads"].items():
        r = wres["configs"]["hicache_file"]
        assert r["disk_pages_read"] > 0, w  # the trace outgrows the host pool: storage must be hit
        assert r["disk_pages_read_never_written"] == 0, w
        assert r["disk_pages_read"] == r["hit_tokens_disk"] // pt, w
        assert r["bytes"]["disk"]["read"] == r["disk_pages_read"] * page_bytes, w
        assert r["bytes"]["disk"]["written"] == r["disk_pages_written"] * page_bytes, w
        assert r["hit_tokens_dram"] == 0, w
        cap = wres["budgets"]["disk_bytes_here"]
        assert 0 < r["disk_bytes_at_end_here"] <= cap, w
        # every file on disk at the end was written and not evicted since (files are one raw small page each)
        files = r["disk_pages_written"] - r["disk_evicted_pages"]
        assert r["disk_bytes_at_end_here"] == files * smoke["report"]["small_page_bytes"], w


def test_kvdrive_disk_reads_are_its_hits_and_prefetches(smoke):
    pt = smoke["report"]["page_tokens"]
    for w, wres in smoke["report"]["workloads"].items():
        for name in ("kvdrive_lru", "kvdrive_promoter"):
            r = wres["configs"][name]
            assert r["disk_pages_read"] == r["hit_tokens_disk"] // pt + r["prefetched_pages"], (w, name)
            assert r["disk_bytes_at_end_here"] <= wres["budgets"]["disk_bytes_here"], (w, name)
            assert r["vanished_between_lookup_and_read"] == 0, (w, name)
        assert wres["configs"]["kvdrive_lru"]["prefetched_pages"] == 0, w
        assert wres["configs"]["kvdrive_lru"]["hit_tokens_disk"] > 0, w


def test_modelled_times_are_consistent(smoke):
    for w, wres, name, r in configs(smoke):
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"], (w, name)
        assert r["throughput_rps"] > 0, (w, name)
    for w, wres in smoke["report"]["workloads"].items():
        r = wres["configs"]["radix_only"]  # GPU hits cost nothing: never slower than no cache
        assert r["requests_slower_than_no_cache"] == 0
        assert r["throughput_rps"] >= wres["nocache"]["throughput_rps"], w


def test_report_states_constants_and_targets(smoke):
    rep, md = smoke["report"], smoke["md"]
    for k in ("dram_read_gbps", "disk_read_gbps", "file_read_gbps", "zstd_ratio"):
        assert rep["measured"][k] > 0, k
    assert rep["assumptions"]["prefill_tokens_per_s"] > 0 and rep["assumptions"]["pcie_gbps"] > 0
    assert any("vs radix_only" in t for t in rep["targets"]) and any("vs hicache_file" in t for t in rep["targets"])
    assert "prefill tokens/s" in md and "HiCacheFile read GB/s" in md and "## Targets" in md


def test_queued_figures_never_beat_the_no_queue_ones(smoke):
    """Issue 18: waiting and disk contention only add time; the earlier (no-queue) figures stay beside them."""
    for w, _, name, r in configs(smoke):
        for q in ("p50", "p99", "mean"):
            assert r[f"queued_ttft_{q}_s"] >= r[f"ttft_{q}_s"] - 1e-9, (w, name, q)
        assert 0 <= r["wait_p50_s"] <= r["wait_p99_s"], (w, name)
        assert 0 < r["throughput_saturation_rps"] <= r["throughput_rps"] * (1 + 1e-9), (w, name)
        assert 0 < r["gpu_busy_pct"] <= 100 + 1e-9, (w, name)
        assert r["disk_contention_s"] >= 0, (w, name)
        if name in ("radix_only", "hicache_host"):  # no disk: nothing contends
            assert r["throughput_saturation_rps"] == pytest.approx(r["throughput_rps"]), (w, name)
    rep, md = smoke["report"], smoke["md"]
    assert rep["measured"]["device_read_gbps"] > 0 and rep["measured"]["device_write_gbps"] > 0
    assert rep["assumptions"]["decode_cores"] >= 1
    assert "TTFT p50 / p99, queued" in md and "no queue — earlier model" in md and "**Queued**" in md
    assert any("throughput at saturation" in t for t in rep["targets"])


def test_promoter_replay_writes_down_as_the_server_does(smoke):
    """kvdrive_promoter's write-down is the engine's selective policy, as in the server (a790666): every page enters
    the DRAM pool, the unadmitted ones wait there, and those DRAM evicts go down on spare bandwidth or are dropped.
    The replay used to keep unadmitted pages out of kvdrive altogether, so none was ever counted by the engine."""
    for w, wres in smoke["report"]["workloads"].items():
        r = wres["configs"]["kvdrive_promoter"]
        assert r["pages_not_admitted"] > 0, w  # one-off pages (the questions, answers) are stored, not admitted
        assert r["not_admitted_spilled"] + r["not_admitted_dropped"] <= r["pages_not_admitted"], w
        assert r["pages_written_down"] >= r["pages_not_admitted"], w
        lru = wres["configs"]["kvdrive_lru"]  # write-through: everything admitted
        assert lru["pages_not_admitted"] == lru["not_admitted_spilled"] == lru["not_admitted_dropped"] == 0, w
