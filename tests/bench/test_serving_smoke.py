"""bench/serving_bench.py --preset smoke: real CPU SGLang servers (radix-only and kvdrive) driven by SGLang's own
``python -m sglang.bench_serving`` and the agent client, once, into a temp dir; then its results held to what must
be true whatever the numbers are (~1.5 min on 2 idle cores: two server starts). The budget, parsing and ratio
helpers get their own server-free tests below.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from bench.serving import report
from bench.serving.budget import HostBudget, bytes_per_token, logged_host_pool_tokens
from bench.serving.sglang_client import Client, summarise

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "serving_bench.py")
TIERS = ("device", "host", "storage")
NUMBERS = ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "input_tok_per_s")


# ------------------------------------------------------------------------------------------------- no server
def test_budget_is_equal_for_hicache_and_kvdrive(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 768,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "num_hidden_layers": 3,
                "torch_dtype": "bfloat16",
            }
        )  # fmt: skip
    )
    bpt = bytes_per_token(str(tmp_path))
    assert bpt == 2 * 3 * 2 * 64 * 2  # K and V x layers x KV heads x head dim x bf16
    b = HostBudget(bpt, device_tokens=2048, host_ratio=4.0, pool_share=0.5)
    d = b.describe()
    assert d["kvdrive_host_pool_bytes"] + d["kvdrive_dram_tier_bytes"] == d["hicache_host_pool_bytes"] == 8192 * bpt
    assert b.args("hicache_host") == b.args("hicache_file") == ["--hicache-ratio", "4"]
    k = b.args("kvdrive")
    assert k[:2] == ["--hicache-ratio", "2"] and k[2] == "--kvdrive-host-gb"
    assert abs(float(k[3]) * (1 << 30) - 4096 * bpt) < 1, "the rest of the budget is kvdrive's DRAM tier"
    assert b.args("radix") == []


def test_host_pool_size_read_from_sglang_log():
    log = (
        "[2026-12-05] Allocating kv hierarchical KV host pool: 784 tokens, 0.00 GB host memory.\n"
        "Allocating mamba hierarchical KV host pool: 16 tokens, 0.00 GB host memory.\n"
    )
    assert logged_host_pool_tokens(log) == 784
    assert logged_host_pool_tokens("no hicache here") is None


def test_prefetched_tokens_read_from_sglang_log_and_reported(tmp_path):
    """SGLang's own line per finished storage prefetch (0.5.23's unified_radix_cache), summed and set against the
    storage tokens that reached requests: the figure that showed prefetched pages lost before their request ran."""
    from bench.serving_bench import prefetch_loaded

    log = (
        "[2026-12-05 10:13:37] HiCache prefetch success req=724eef91 completed=1040 matched=0 loaded=1040 occupied=0\n"
        "[2026-12-05 10:13:38] HiCache prefetch success req=ecdb3944 completed=1040 matched=1024 loaded=16 occupied=4\n"
        "[2026-12-05 10:13:39] HiCache prefetch success req=0a0a0a0a completed=0 matched=0 loaded=0 occupied=0\n"
        "[2026-12-05 10:13:40] HiCache prefetch dropped req=1b1b1b1b completed=512 matched=0 loaded=512 occupied=0\n"
    )
    assert prefetch_loaded(log) == {"prefetches": 3, "tokens": 1568, "dropped": 1}
    assert prefetch_loaded("no storage tier here") is None
    # the report line, on a recorded run's rows (bench/results/serving-cpu-kvdrive-awaiting.json)
    with open(os.path.join(REPO, "bench", "results", "serving-cpu-kvdrive-awaiting.json")) as f:
        run = json.load(f)
    row = run["results"]["large"]["kvdrive"]
    row["prefetch_loaded"] = prefetch_loaded(log)
    used = sum(rep["summary"]["storage_tokens"] for c in row["clients"].values() for rep in c["reps"])
    assert f"kvdrive 1568 / {used} (3 prefetches)" in report.markdown(run)


def test_bench_serving_result_parsed_and_tiers_summed():
    raw = {
        "completed": 3, "duration": 2.0, "median_ttft_ms": 100.0, "p99_ttft_ms": 300.0,
        "median_e2e_latency_ms": 200.0, "p99_e2e_latency_ms": 500.0, "request_throughput": 1.5,
        "input_throughput": 600.0, "output_throughput": 6.0, "errors": ["", "", ""],
        "cache_report": {"total_prompt_tokens": 1200, "total_cached_tokens": 704},
        "cached_tokens_details": [{"device": 0, "host": 0}, {"device": 256, "host": 64, "storage": 128},
                                  {"device": 256, "storage": 0}],
    }  # fmt: skip
    s = summarise(raw)
    assert (s["ttft_p50_s"], s["ttft_p99_s"], s["e2e_p99_s"]) == (0.1, 0.3, 0.5)
    assert (s["device_tokens"], s["host_tokens"], s["storage_tokens"]) == (512, 64, 128)
    assert s["computed_tokens"] == 1200 - 704 and s["failed"] == 0


@pytest.mark.parametrize(
    "flags,msg",
    [
        ("--hicache-ratio 3", "--kvdrive-flags takes --kvdrive-\\* server flags only"),
        ("--kvdrive-promoter '{", "--kvdrive-flags: No closing quotation"),
    ],
)
def test_kvdrive_flags_are_checked_before_any_server_starts(flags, msg):
    """A diagnostic run's extra flags go to the kvdrive server only, and only kvdrive's own: a flag that would change
    what SGLang does would make the rows incomparable. Refused in the argument parsing, before a model is built."""
    p = subprocess.run([sys.executable, SCRIPT, "--kvdrive-flags", flags], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert re.search(msg, p.stderr), p.stderr


@pytest.mark.parametrize("share", ["0", "1.5", "-0.1"])
def test_a_pool_share_outside_0_to_1_is_refused_before_any_server_starts(share):
    p = subprocess.run([sys.executable, SCRIPT, "--pool-share", share], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--pool-share must be in (0, 1]" in p.stderr and "Traceback" not in p.stderr


def test_the_whole_budget_as_sglangs_host_pool_leaves_kvdrive_no_dram_tier():
    b = HostBudget(2048, 2048, 4.0, 1.0)
    assert b.args("kvdrive") == ["--hicache-ratio", "4", "--kvdrive-host-gb", "0.000000000"]
    assert b.args("hicache_file") == ["--hicache-ratio", "4"]


def test_ratio_verdicts_met_missed_and_missing():
    def row(ttft):
        agg = report.aggregate([{**{k: ttft for k in report.METRICS}, **{k: 0 for k in report.TOKENS}}])
        return {"clients": {Client.GSP.value: {"aggregate": agg}}}

    res = {"large": {"kvdrive": row(0.5), "hicache_file": row(1.0)}, "fit": {"kvdrive": row(1.2)}}
    by = {v["target"]: v for v in report.verdicts(res)}
    assert by["large: kvdrive TTFT p50 vs HiCache + file"]["verdict"] == "met"
    assert by["large: kvdrive TTFT p50 vs HiCache + file"]["ratio"] == 0.5
    assert by["fit: kvdrive TTFT p50 vs HiCache host-only"]["verdict"] == "no data"
    assert report.median_spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


# ------------------------------------------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the serving bench sizes CPU servers")
    tmp = tmp_path_factory.mktemp("serving-smoke")
    out = tmp / "serving-smoke"
    p = subprocess.run(
        [sys.executable, "-W", "ignore", SCRIPT, "--preset", "smoke", "--out", str(out), "--workdir", str(tmp / "w"),
         "--no-plots"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert p.returncode == 0 and os.path.exists(f"{out}.json"), (
        f"smoke failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    with open(f"{out}.json") as f:
        res = json.load(f)
    with open(f"{out}.md") as f:
        md = f.read()
    return res, md


@pytest.mark.e2e
def test_results_complete_and_every_row_has_numbers(smoke):
    res, md = smoke
    for key in ("command", "machine", "machine_line", "date", "budget", "results", "verdicts", "wall_s"):
        assert res.get(key) is not None, f"results lack {key}"
    assert res["machine"]["git"] and res["machine"]["load_avg"], res["machine"]
    # every server with one torch intra-op thread (SERVER_ENV: steady per-pass times), and the results say so
    assert res["server_env"] == {"OMP_NUM_THREADS": "1"} and "Servers: every server runs with OMP_NUM_THREADS=1" in md
    rows = res["results"]["fit"]
    assert set(rows) == {"radix", "kvdrive"}
    for config, row in rows.items():
        assert set(row["clients"]) == {"gsp_saturation", "agent"}, row["clients"].keys()
        for client, r in row["clients"].items():
            s = r["reps"][0]["summary"]
            assert s["requests"] > 0 and s["failed"] == 0, (config, client, s)
            for k in NUMBERS:
                assert isinstance(s[k], float) and math.isfinite(s[k]) and s[k] > 0, (config, client, k, s[k])
            assert f"| {config} |" in md
    # bench_serving ran for real: its own command line, SGLang's module, our JSON parse of its output file
    cmd = rows["kvdrive"]["clients"]["gsp_saturation"]["reps"][0]["command"]
    assert "-m sglang.bench_serving" in cmd and "--request-rate inf" in cmd and "--cache-report" in cmd


@pytest.mark.e2e
def test_tokens_per_tier_are_consistent(smoke):
    res, _ = smoke
    for config, row in res["results"]["fit"].items():
        for client, r in row["clients"].items():
            s = r["reps"][0]["summary"]
            tiers = sum(s[f"{t}_tokens"] for t in TIERS)
            assert tiers == s["cached_tokens"], (config, client, s)  # every cached token comes from one tier
            assert 0 <= s["cached_tokens"] <= s["prompt_tokens"], (config, client, s)
            assert s["computed_tokens"] == s["prompt_tokens"] - s["cached_tokens"]
            if config == "radix":
                assert s["host_tokens"] == s["storage_tokens"] == 0, "radix-only has no host or storage tier"
            rep = s.get("cache_report")
            if rep:  # bench_serving's own sums agree with ours
                assert rep["total_cached_tokens"] == s["cached_tokens"], (rep, s)
                assert (rep["device_cached_tokens"] or 0) == s["device_tokens"], (rep, s)


@pytest.mark.e2e
def test_equal_host_budget_as_allocated(smoke):
    res, md = smoke
    b = res["budget"]
    assert b["kvdrive_host_pool_bytes"] + b["kvdrive_dram_tier_bytes"] == b["hicache_host_pool_bytes"]
    rows = res["results"]["fit"]
    assert rows["radix"]["host_pool_tokens"] is None, "radix-only allocates no host pool"
    pool = rows["kvdrive"]["host_pool_tokens"]
    want = b["kvdrive_host_pool_bytes"] // b["bytes_per_token"]
    assert want <= pool <= want + 16, f"SGLang allocated {pool} host tokens for kvdrive, budget says {want} (+1 page)"
    tiers = rows["kvdrive"]["kvdrive_tiers"]
    assert tiers and "DRAM" in tiers["line"], "kvdrive's summary line (its DRAM and disk tiers) was read"
    assert "compressed DRAM tier" in md


def test_multi_turn_input_throughput_from_server_prompt_tokens():
    """bench_serving's multi-turn mode reports input_throughput 0 (its metrics get no dataset rows): the runner's
    figure is the server-reported prompt tokens over the run (found by the first gsp_multiturn run: 0 tok/s)."""
    raw = {
        "completed": 4, "duration": 2.0, "median_ttft_ms": 100.0, "p99_ttft_ms": 300.0,
        "median_e2e_latency_ms": 200.0, "p99_e2e_latency_ms": 500.0, "request_throughput": 2.0,
        "input_throughput": 0.0, "output_throughput": 8.0, "errors": ["", "", "", ""],
        "cache_report": {"total_prompt_tokens": 1462, "total_cached_tokens": 976},
        "cached_tokens_details": [{"device": 976}],
    }  # fmt: skip
    assert summarise(raw)["input_tok_per_s"] == 1462 / 2.0
