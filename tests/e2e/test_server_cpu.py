"""End to end: real ``sglang.launch_server`` processes (CPU, tiny generated Llama) serving from kvdrive's tiers.

One server at a time (each ≈20 s to start and ≈2 GB on this CPU machine), five starts in all:
1. radix only: a long prompt twice -> the second is served from the device cache; greedy outputs = the reference.
2. SGLang's own HiCache + ``file`` storage backend (baseline, known to work): restart -> served from storage.
3. ``--kv-tier kvdrive --kvdrive-dir D`` with a device pool too small for the prompts: distinct long prompts evict
   the first one from the device, which then comes back from the host/storage tiers; restart on the same D -> served
   from kvdrive's disk store; every greedy output equals the radix-only reference; ``kvdrive stats``/``verify`` on D.

All prompts are 24 pages of 16 tokens + 1 token long, so that with ``--page-size 16`` every full page of the prompt
is cacheable and ``cached == prompt_tokens - 1`` on a full hit, whatever the tier.

Run: ``.venv/bin/python -m pytest tests/e2e -m e2e --durations=0`` (≈3-4 min on the 2-core CPU machine; server logs
stay in pytest's basetemp, e.g. /tmp/pytest-of-$USER/pytest-current/e2e0/*.log). Skipped when sglang is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

import pytest


def _sglang_installed() -> bool:
    try:
        return importlib.util.find_spec("sglang") is not None  # no import: `import sglang` takes seconds
    except (ImportError, ValueError):
        return False


if not _sglang_installed():
    pytest.skip("sglang is not installed: the e2e server tests need the [sglang] extra (on CPU: "
                "requirements/sglang-cpu*.txt, see README.md)", allow_module_level=True)

from .conftest import SERVER_TIMINGS
from .server import SGLangServer, gpu_present
from .tiny_model import WORDS, make_tiny_llama

pytestmark = pytest.mark.e2e

PAGE = 16
PROMPT_TOKENS = 24 * PAGE + 1   # 385
N_PROMPTS = 4                   # 4 x ~393 tokens > the kvdrive server's device pool
MAX_NEW = 8
HICACHE_CPU = [] if gpu_present() else ["--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first"]
COMMON = ["--page-size", str(PAGE)]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def tiny_model(e2e_dir):
    return make_tiny_llama(e2e_dir / "tiny-llama")


@pytest.fixture(scope="session")
def ext_dir(e2e_dir):
    """Private torch extensions folder for this test session (HiCache's C++ hash module is built there once)."""
    d = e2e_dir / "torch_ext"
    d.mkdir()
    return str(d)


def build_prompts(model_path, n=N_PROMPTS, tokens=PROMPT_TOKENS) -> list[str]:
    """n distinct texts of exactly ``tokens`` tokens (no shared prefix beyond the first word or two)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_path, "tokenizer.json"))
    out = []
    for i in range(n):
        for attempt in range(50):
            rng = random.Random(1000 * i + attempt)
            words = [f"Document {i}:"]
            while True:
                words.append(rng.choice(WORDS))
                text = " ".join(words)
                count = len(tok.encode(text, add_special_tokens=True).ids)
                if count >= tokens:
                    break
            if count == tokens:
                out.append(text)
                break
        else:
            raise AssertionError(f"could not build a {tokens}-token prompt #{i}")
    return out


@pytest.fixture(scope="session")
def prompts(tiny_model):
    return build_prompts(tiny_model)


def server(name, model, e2e_dir, ext_dir, args, *, env=None, max_total_tokens=2048):
    return SGLangServer(model, COMMON + list(args), env=env, log_path=str(e2e_dir / f"{name}.log"),
                        max_total_tokens=max_total_tokens, torch_extensions_dir=ext_dir)


def stop(srv, name, graceful=True):
    srv.stop(graceful=graceful)
    SERVER_TIMINGS.append({"name": name, "start_s": srv.start_seconds, "stop_s": srv.stop_seconds,
                           "stop": "SIGTERM" if graceful else "SIGKILL"})


def full_hit(r):
    return r["cached"] >= r["prompt_tokens"] - 1


@pytest.fixture(scope="session")
def reference(tiny_model, prompts, e2e_dir, ext_dir):
    """Radix-only server: greedy outputs of every prompt, and prompt 0 twice (the second from the device cache)."""
    srv = server("radix", tiny_model, e2e_dir, ext_dir, []).start()
    try:
        first = srv.generate(prompts[0], MAX_NEW)
        second = srv.generate(prompts[0], MAX_NEW)
        others = [srv.generate(p, MAX_NEW) for p in prompts[1:]]
    finally:
        stop(srv, "radix", graceful=False)
    return {"first": first, "second": second, "ids": [first["ids"]] + [r["ids"] for r in others]}


# ---------------------------------------------------------------------------------------------------- helpers
def kvdrive_cli(*args, check=True):
    exe = os.path.join(os.path.dirname(sys.executable), "kvdrive")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "kvdrive_sglang.tier.cli"]
    p = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"kvdrive {' '.join(args)} -> rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def kvdrive_entries(d) -> int:
    p = kvdrive_cli("stats", str(d), "--json", check=False)
    if p.returncode != 0:
        return -1
    return json.loads(p.stdout)["entries"]


def wait_for(pred, timeout, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def at_least(v: int, n: int) -> int:
    """v when v >= n, else 0 (for wait_for)."""
    return v if v >= n else 0


def grep_log(srv, *needles):
    return [ln for ln in srv.log_text().splitlines() if any(n in ln for n in needles)]


def assert_plugin_ok(srv, steps=("cpu_fallbacks", "flags", "radix_backend")):
    """None of these steps of kvdrive's plugin failed in the server processes (SGLang logs and swallows plugin
    errors, so a failed step would otherwise only show up as a missing feature)."""
    bad = grep_log(srv, "Failed to execute general plugin: kvdrive", *(f"kvdrive: plugin step {s}." for s in steps))
    assert not bad, "kvdrive plugin failed in the server:\n" + "\n".join(bad) + "\n" + srv.log_tail(30)


def assert_kvdrive_wiring(srv):
    """--kv-tier kvdrive was expanded into SGLang's flags and SGLang built kvdrive's radix cache (the storage backend
    shows in every request's cached_tokens_details["storage_backend"])."""
    text = srv.log_text()
    want = ["enable_hierarchical_cache=True", "hicache_storage_backend='dynamic'", "radix_cache_backend='kvdrive'"]
    if not gpu_present():
        want += ["hicache_io_backend='direct'", "hicache_mem_layout='layer_first'"]
    missing = [w for w in want if w not in text]
    assert not missing, f"server_args lack {missing}: --kv-tier kvdrive was not expanded\n{srv.log_tail(30)}"
    assert "source=registered('kvdrive')" in text, "SGLang did not build kvdrive's radix cache:\n" + \
        "\n".join(grep_log(srv, "Tree cache initialized"))


# ---------------------------------------------------------------------------------------------------- tests
def test_radix_only_device_cache(reference, prompts):
    first, second = reference["first"], reference["second"]
    assert first["prompt_tokens"] == PROMPT_TOKENS, first
    assert first["cached"] < PAGE, first                      # nothing of it was cached before
    assert full_hit(second), second                            # all but the last prompt token from the device
    assert second["details"]["device"] == second["cached"] and second["details"]["host"] == 0, second
    assert second["ids"] == first["ids"]
    assert len(set(map(tuple, reference["ids"]))) == N_PROMPTS, reference["ids"]  # outputs depend on the prompt


def test_hicache_file_backend_restart(tiny_model, prompts, reference, e2e_dir, ext_dir):
    """Baseline: SGLang's own HiCache + 'file' L3 survives a restart on this machine (no kvdrive storage involved,
    but kvdrive's plugin provides the CPU fallbacks HiCache needs)."""
    store = e2e_dir / "file_l3"
    args = ["--enable-hierarchical-cache", *HICACHE_CPU, "--hicache-storage-backend", "file"]
    env = {"SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": str(store)}
    srv = server("file_1", tiny_model, e2e_dir, ext_dir, args, env=env).start()
    try:
        assert_plugin_ok(srv, steps=("cpu_fallbacks",))
        a = srv.generate(prompts[0], MAX_NEW)
        b = srv.generate(prompts[0], MAX_NEW)
        # write-through to L3 is asynchronous: wait until the prompt's pages are files
        wait_for(lambda: len(os.listdir(store)) >= PROMPT_TOKENS // PAGE if store.exists() else False, 30)
    finally:
        stop(srv, "file_1")
    assert full_hit(b) and b["details"]["device"] == b["cached"], b
    srv = server("file_2", tiny_model, e2e_dir, ext_dir, args, env=env).start()
    try:
        c = srv.generate(prompts[0], MAX_NEW)
    finally:
        stop(srv, "file_2", graceful=False)
    assert full_hit(c) and c["details"]["storage"] >= PROMPT_TOKENS - PAGE, c
    assert a["ids"] == b["ids"] == c["ids"] == reference["ids"][0]


def metric_value(srv, name: str, label: str) -> float | None:
    """Sum of a metric's samples carrying ``label`` in the server's Prometheus text, or None."""
    with urllib.request.urlopen(f"{srv.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and label in line]
    return sum(vals) if vals else None


def test_kvdrive_tiers_and_restart(tiny_model, prompts, reference, e2e_dir, ext_dir):
    store = e2e_dir / "kvdrive_store"
    # device pool of 1024 tokens: the 4 prompts (~393 tokens each) cannot all stay on the device
    args = ["--kv-tier", "kvdrive", "--kvdrive-dir", str(store)]
    srv = server("kvdrive_1", tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024).start()
    try:
        assert_plugin_ok(srv)
        assert_kvdrive_wiring(srv)
        runs = [srv.generate(p, MAX_NEW) for p in prompts]
        again = srv.generate(prompts[0], MAX_NEW)
        # the store is readable while the server runs; wait (bounded) until prompt 0's pages reached the disk
        entries_live = wait_for(lambda: at_least(kvdrive_entries(store), PROMPT_TOKENS // PAGE), 30) \
            or kvdrive_entries(store)
    finally:
        stop(srv, "kvdrive_1")
    for r in runs:
        assert r["prompt_tokens"] == PROMPT_TOKENS and r["cached"] < PAGE, runs
    # prompt 0 was evicted from the device by the later prompts, and came back from host or storage
    d = again["details"]
    assert full_hit(again), again
    assert d["device"] < again["cached"] and d["host"] + d["storage"] > 0, again
    assert d.get("storage_backend") == "KvdriveStorage", again
    assert [r["ids"] for r in runs] == reference["ids"], "kvdrive server output differs from the radix-only server"
    assert again["ids"] == reference["ids"][0]
    assert entries_live >= PROMPT_TOKENS // PAGE, f"kvdrive stats showed {entries_live} entries while serving"

    # restart on the same directory: the disk tier serves; with --enable-metrics kvdrive's figures reach /metrics
    srv = server("kvdrive_2", tiny_model, e2e_dir, ext_dir, args + ["--enable-metrics"],
                 max_total_tokens=1024).start()
    try:
        assert_plugin_ok(srv)
        replay = [srv.generate(p, MAX_NEW) for p in prompts]
        # kvdrive's reporter feeds Prometheus every 10 s: wait (bounded) for the disk hits to show
        want = N_PROMPTS * (PROMPT_TOKENS // PAGE)
        disk_hits = wait_for(lambda: at_least(int(metric_value(srv, "kvdrive:hit_pages_total", 'tier="disk"') or 0),
                                              want), 30) or metric_value(srv, "kvdrive:hit_pages_total", 'tier="disk"')
    finally:
        stop(srv, "kvdrive_2")
    assert disk_hits and disk_hits >= want, f"kvdrive disk hits in /metrics: {disk_hits}"
    assert "kvdrive: DRAM" in srv.log_text(), "kvdrive's summary line is missing from the server log"
    for r in replay:
        assert full_hit(r) and r["details"]["storage"] >= PROMPT_TOKENS - PAGE, replay
        assert r["details"].get("storage_backend") == "KvdriveStorage", r
    assert [r["ids"] for r in replay] == reference["ids"], "output after restart differs from the radix-only server"

    stats = json.loads(kvdrive_cli("stats", str(store), "--json").stdout)
    assert stats["entries"] >= N_PROMPTS * (PROMPT_TOKENS // PAGE), stats
    assert len(stats["namespaces"]) == 1, stats
    kvdrive_cli("verify", str(store))
