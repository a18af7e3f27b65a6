"""Shared pieces of the e2e tests: prompt building, server launch/stop, the kvdrive CLI, waits, log and /metrics reads.

The session fixtures built on them (tiny model, prompts, radix-only reference outputs) live in conftest.py, so every
e2e module shares one reference server.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request

from .server import SGLangServer, gpu_present
from .tiny_model import WORDS

PAGE = 16
PROMPT_TOKENS = 24 * PAGE + 1  # 385
N_PROMPTS = 4  # 4 x ~393 tokens > the kvdrive server's device pool
N_ALL_PROMPTS = 16  # the reference also covers the fault tests' prompts (one radix server per session)
MAX_NEW = 8
HICACHE_CPU = [] if gpu_present() else ["--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first"]
COMMON = ["--page-size", str(PAGE)]
SERVER_TIMINGS: list[dict] = []


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


def server(name, model, e2e_dir, ext_dir, args, *, env=None, max_total_tokens=2048, pythonpath=(), sleep_on_idle=False):
    """``sleep_on_idle``: SGLang's ``--sleep-on-idle`` (its scheduler waits on its sockets, up to 1 s at a time, while
    it has nothing to run). Without it an idle scheduler loops without pause and holds one core: for a server that
    stays up while another starts beside it (test_second_server_same_dir_then_kill_9), which on 2 cores then started
    2-4x slower than alone (83-100 s instead of 17-27 s)."""
    return SGLangServer(
        model,
        COMMON + list(args) + (["--sleep-on-idle"] if sleep_on_idle else []),
        env=env,
        log_path=str(e2e_dir / f"{name}.log"),
        max_total_tokens=max_total_tokens,
        torch_extensions_dir=ext_dir,
        pythonpath=pythonpath,
    )


def stop(srv, name, graceful=True):
    srv.stop(graceful=graceful)
    SERVER_TIMINGS.append(
        {
            "name": name,
            "start_s": srv.start_seconds,
            "stop_s": srv.stop_seconds,
            "stop": "SIGTERM" if graceful else "SIGKILL",
        }
    )


def full_hit(r):
    return r["cached"] >= r["prompt_tokens"] - 1


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


def index_entries(d) -> int:
    """The store's entries as ``kvdrive stats`` counts them (the same read-only, shared-lock open of the store, its
    ``stats().entries``), read in this process: -1 where ``kvdrive stats`` would fail. For tests that poll the count
    dozens of times while a server writes (test_faults_cpu.py): each ``kvdrive stats`` run costs ~0.5-1 s of
    interpreter start on 2 cores. Tests about the command itself use ``kvdrive_entries``."""
    import lmdb

    from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
    from kvdrive_sglang.tier.errors import KvdriveError
    from kvdrive_sglang.tier.store_dir import check_store_dir

    try:
        store = DiskStore(DiskStoreConfig(path=check_store_dir(str(d), create=False)), lock_mode="shared", repair=False)
    except (KvdriveError, OSError, lmdb.Error):
        return -1
    try:
        return store.stats().entries
    finally:
        store.close()


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
    want = [
        ("enable_hierarchical_cache", "True"),
        ("hicache_storage_backend", "'dynamic'"),
        ("radix_cache_backend", "'kvdrive'"),
    ]
    if not gpu_present():
        want += [("hicache_io_backend", "'direct'"), ("hicache_mem_layout", "'layer_first'")]
    # SGLang logs its resolved arguments as ServerArgs(field=value, ...) up to 0.5.19, as a dict from 0.5.20
    missing = [f"{k}={v}" for k, v in want if f"{k}={v}" not in text and f"'{k}': {v}" not in text]
    assert not missing, f"server_args lack {missing}: --kv-tier kvdrive was not expanded\n{srv.log_tail(30)}"
    assert "source=registered('kvdrive')" in text, "SGLang did not build kvdrive's radix cache:\n" + "\n".join(
        grep_log(srv, "Tree cache initialized")
    )


def metric_text(srv) -> str:
    with urllib.request.urlopen(f"{srv.url}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(srv, name: str, label: str) -> float | None:
    """Sum of a metric's samples carrying ``label`` in the server's Prometheus text, or None."""
    vals = [
        float(line.rsplit(" ", 1)[1])
        for line in metric_text(srv).splitlines()
        if line.startswith(name + "{") and label in line
    ]
    return sum(vals) if vals else None
