"""End to end: real SGLang servers (0.5.17 - 0.5.23, whichever is installed) serving the same workload in each cache
configuration, side by side.

    python bench/e2e_bench.py                     # --preset demo: tiny model, radix / HiCache host / kvdrive, ~130 s
    python bench/e2e_bench.py --preset cpu        # prefill-heavy CPU model, radix / HiCache+file / kvdrive (+ restarts)
    python bench/e2e_bench.py --preset gpu        # on a GPU machine: ~0.7B random Llama, long documents and sessions
    python bench/e2e_bench.py --preset gpu-defaults   # SGLang's own defaults: only --kv-tier kvdrive (graphs on)
    python bench/e2e_bench.py --preset gpu-defaults-mla-tp2 | gpu-defaults-fp8   # its MLA (TP=2) and fp8 KV variants

What it does, per configuration (one server at a time, same model, same device KV budget, same trace):
  radix          SGLang's radix cache alone (the reference for outputs and for cold prefill)
  hicache_host   SGLang HiCache's host pool alone: the control for ``--kv-tier kvdrive``, which turns that pool on
                 too, so kvdrive's own contribution is what it adds beyond this row
  hicache_file   SGLang HiCache: host pool + SGLang's own ``file`` storage backend
  kvdrive        ``--kv-tier kvdrive``: host pool + kvdrive's compressed DRAM tier + disk store
The trace is generated locally and seeded (no downloads): *docs* = D documents with Zipf popularity, each request one
document plus a short question, Poisson arrivals; *sessions* = S agent sessions whose prompt is the whole growing
history (tool calls, observations). Requests are sent at their arrival times over HTTP with streaming, so TTFT is the
time to the first streamed chunk. After the trace, servers with a persistent tier are stopped, started again on the
same directory and every document is asked again as it was first asked: the restart replay, whose TTFT is compared
with the same prompts' cold TTFT on the radix server after a cache flush.

Recorded per configuration: TTFT p50/p99, request and output-token rates at the trace's open-loop arrival rate (what
the trace asked for over its makespan: not capacity, which a closed-loop run would measure), prompt tokens served per
tier (device / host / storage, from SGLang's per-request ``cached_tokens_details``) and computed, greedy outputs
compared with the radix run (identical is expected with the lossless codec), server start time; for restarts, TTFT after
restart / cold.
Results: ``bench/results/e2e-<preset>.json`` and ``.md`` (``--out`` to change; the demo writes nothing unless asked).

The ``gpu-defaults`` presets give the server nothing beyond the model and ``--kv-tier kvdrive`` (plus what the
harness itself passes: host, port, ``--max-total-tokens`` for the device KV budget, and ``--kvdrive-dir``): CUDA graphs
on, SGLang's default attention backend, sampling backend and page size -- what a user who only adds kvdrive runs. Its
variants add exactly one thing each: ``--tp 2`` with a tiny DeepSeek-V2-style MLA model, or ``--kv-cache-dtype
fp8_e4m3``. On CPU (bench/first_device.py's dry run) see ``CPU_DRY_RUN`` for what a CPU server adds and why.

Machines are noisy and this one has 2 cores: read the ratios between configurations measured in the same run, not the
absolute times. On CPU the model is tiny, so server overheads weigh more than they would on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from enum import Enum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.bench_common import add_allow_dirty, cpu_model, guard_results, read_generate_stream
from bench.bench_common import machine as common_machine
from tests.e2e.server import ServerError, SGLangServer, gpu_present
from tests.e2e.tiny_mla_model import make_tiny_mla
from tests.e2e.tiny_model import WORDS, make_tiny_llama

CONFIGS = ("radix", "hicache_host", "hicache_file", "kvdrive")


class ModelKind(str, Enum):
    """Which generated checkpoint a preset serves."""

    LLAMA = "llama"  # tests/e2e/tiny_model.py: make_tiny_llama
    MLA = "mla"  # tests/e2e/tiny_mla_model.py: make_tiny_mla (DeepSeek-V2-style, 576-wide latent)


def make_model(kind: ModelKind, path: str, **kwargs) -> str:
    return (make_tiny_mla if ModelKind(kind) is ModelKind.MLA else make_tiny_llama)(path, **kwargs)


# What a CPU server adds to a preset's flags, in one place. tests/e2e/server.py (the harness) passes --device cpu (no
# CUDA device; SGLang would otherwise pick cuda) and sets SGLANG_USE_CPU_ENGINE=1 plus the import-only sgl_kernel stub
# on PYTHONPATH (SGLang imports sgl_kernel at module level even on CPU). Nothing else is needed for a Llama: on CPU
# SGLang itself skips CUDA-graph capture and picks its CPU attention backend (torch_native without AMX), and kvdrive's
# plugin picks the host-pool I/O flags a CPU needs (direct, layer_first). What a CPU server cannot run at all is named
# in CPU_UNSUPPORTED, so the dry run skips it with that reason instead of failing.
CPU_DRY_RUN = {"--device": "cpu"}
CPU_UNSUPPORTED = {
    "mla": "SGLang's CPU attention backends cannot serve MLA here: torch_native has no MLA path (its extend reads the "
    "576-wide latent pool as K: 'Expected size ... [16, 96] but got: [16, 576]', SGLang 0.5.17 and 0.5.23) "
    "and intel_amx needs sgl_kernel's CPU ops and AMX",
    "tp2": "SGLang's CPU tensor parallelism does not start here: with one NUMA node it refuses 2 ranks unless "
    "SGLANG_CPU_OMP_THREADS_BIND is set, and with it set its TP group builds a PyNccl communicator on the CPU "
    "('Expected a cuda device, but got: cpu', SGLang 0.5.23 with the CUDA build of torch on a CPU machine)",
    "fp8": "SGLang refuses an fp8 KV cache on a CPU without Intel AMX ('CPU FP8 KV cache requires Intel AMX "
    "support', 0.5.23; fp8 KV on CPU needs the intel_amx backend)",
}


@dataclass
class Preset:
    """Sizes of one run. Token counts are prompt lengths in tokens of the generated model's tokenizer."""

    model: dict  # make_tiny_llama / make_tiny_mla kwargs
    configs: tuple
    max_total_tokens: int  # device KV pool (tokens): deliberately smaller than the documents together
    page_size: int | None = 16  # None: SGLang's default (no --page-size)
    docs: int = 6
    doc_tokens: tuple = (512, 1024)
    doc_requests: int = 16
    zipf_s: float = 1.1
    question_tokens: int = 16
    sessions: int = 0
    turns: tuple = (4, 8)
    turn_tokens: int = 64
    think_s: float = 0.5
    rate: float = 4.0  # Poisson arrivals per second (docs)
    max_new_tokens: int = 8
    restart: bool = True
    context: int | None = 4096  # None: the model's own (no --context-length)
    extra_args: list = field(default_factory=list)
    model_kind: ModelKind = ModelKind.LLAMA


# gpu-defaults' Llama: 8 layers, hidden 1024, 8 heads of 128 (4 KV heads): ~100M parameters, 16 KiB of KV per token
GPU_DEFAULTS_LLAMA = {"num_layers": 8, "hidden": 1024, "heads": 8, "kv_heads": 4, "intermediate": 2816}

PRESETS = {
    # README's main command: a small model whose prefill costs more than moving its KV (3 layers, hidden 768,
    # 2 KV heads: 1.5 KiB of KV per token); the whole run (two servers and a restart) takes ~100 s on 2 cores
    "demo": Preset(
        model={"num_layers": 3, "hidden": 768, "heads": 12, "kv_heads": 2, "intermediate": 2048},
        configs=("radix", "hicache_host", "kvdrive"),
        max_total_tokens=768,
        docs=4,
        doc_tokens=(320, 512),
        doc_requests=10,
        rate=1.5,
    ),
    # CPU, prefill-heavy: hidden 1024, 4 layers, 2 KV heads (2 KiB of KV per token) so that prefill dominates
    "cpu": Preset(
        model={"num_layers": 4, "hidden": 1024, "heads": 16, "kv_heads": 2, "intermediate": 2816},
        configs=CONFIGS,
        max_total_tokens=2048,
        docs=8,
        doc_tokens=(768, 1536),
        doc_requests=24,
        sessions=3,
        turns=(4, 6),
        turn_tokens=96,
        rate=0.5,
    ),
    # GPU: ~0.7B random Llama (bf16), documents of 8K-32K tokens, a device budget of 64K tokens
    "gpu": Preset(
        model={"num_layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 8, "intermediate": 5632},
        configs=CONFIGS,
        max_total_tokens=65536,
        page_size=64,
        docs=12,
        doc_tokens=(8192, 32768),
        doc_requests=120,
        sessions=8,
        turns=(10, 20),
        turn_tokens=512,
        rate=2.0,
        max_new_tokens=32,
        context=65536 + 1024,
        extra_args=[
            "--attention-backend",
            "triton",
            "--sampling-backend",
            "pytorch",
            "--disable-cuda-graph",
            "--mm-feature-transport",
            "cpu",
        ],
    ),
    # GPU with SGLang's defaults: no page size, context, backend or graph flag (see the module docstring). A ~100M
    # random Llama (head_dim 128) whose documents fit its own 4K context; the 16K-token device budget holds about four
    # of the twelve documents, so the host and disk tiers serve the rest.
    "gpu-defaults": Preset(
        model=GPU_DEFAULTS_LLAMA,
        configs=("radix", "kvdrive"),
        max_total_tokens=16384,
        page_size=None,
        context=None,
        docs=12,
        doc_tokens=(2048, 3584),
        doc_requests=60,
        sessions=4,
        turns=(4, 8),
        turn_tokens=256,
        rate=2.0,
        max_new_tokens=32,
    ),
    # ... with a tiny DeepSeek-V2-style MLA model at TP=2 (kvdrive's mla layout; one writer rank)
    "gpu-defaults-mla-tp2": Preset(
        model={},
        model_kind=ModelKind.MLA,
        configs=("radix", "kvdrive"),
        max_total_tokens=16384,
        page_size=None,
        context=None,
        docs=12,
        doc_tokens=(2048, 3584),
        doc_requests=60,
        rate=2.0,
        max_new_tokens=32,
        extra_args=["--tp", "2"],
    ),
    # ... with an fp8 KV cache (SGLang's uint8 pools; kvdrive's fp8_e4m3 namespace)
    "gpu-defaults-fp8": Preset(
        model=GPU_DEFAULTS_LLAMA,
        configs=("radix", "kvdrive"),
        max_total_tokens=16384,
        page_size=None,
        context=None,
        docs=12,
        doc_tokens=(2048, 3584),
        doc_requests=60,
        rate=2.0,
        max_new_tokens=32,
        extra_args=["--kv-cache-dtype", "fp8_e4m3"],
    ),
}
GPU_ONLY_PRESETS = ("gpu", "gpu-defaults", "gpu-defaults-mla-tp2", "gpu-defaults-fp8")


# ------------------------------------------------------------------------------------------------- workload
class Tokenizer:
    def __init__(self, model_path: str):
        from tokenizers import Tokenizer as _T

        self._tok = _T.from_file(os.path.join(model_path, "tokenizer.json"))

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=True).ids)


def text_of(rng: random.Random, tok: Tokenizer, tokens: int, head: str) -> str:
    """A text of about ``tokens`` tokens (within a few), starting with ``head`` (so texts differ from the start)."""
    words = [head]
    n = 0
    while True:
        chunk = [rng.choice(WORDS) for _ in range(max(8, (tokens - n) // 2))]
        words.extend(chunk)
        n = tok.count(" ".join(words))
        if n >= tokens:
            break
    while n > tokens and len(words) > 2:  # trim back to the target
        words.pop()
        n = tok.count(" ".join(words))
    return " ".join(words)


@dataclass
class Request:
    at: float  # arrival, seconds from the start
    prompt: str
    kind: str  # "doc" | "session"
    group: int  # document or session id
    follows: int = -1  # session turn: index of the request this one continues (sent after it completes)
    think_s: float = 0.0


def build_trace(p: Preset, tok: Tokenizer, seed: int) -> tuple[list[Request], list[str]]:
    rng = random.Random(seed)
    docs = [text_of(rng, tok, rng.randint(*p.doc_tokens), f"Document {d}:") for d in range(p.docs)]
    weights = [1.0 / (d + 1) ** p.zipf_s for d in range(p.docs)]
    trace, t = [], 0.0
    for _ in range(p.doc_requests):
        t += rng.expovariate(p.rate)
        d = rng.choices(range(p.docs), weights)[0]
        q = text_of(rng, tok, p.question_tokens, "Question:")
        trace.append(Request(at=t, prompt=f"{docs[d]}\n{q}", kind="doc", group=d))
    for s in range(p.sessions):
        history = text_of(rng, tok, p.turn_tokens * 2, f"Session {s} system: you are agent {s}.")
        prev = -1
        start = rng.uniform(0, max(t, 1.0) / 2)
        for turn in range(rng.randint(*p.turns)):
            kind = rng.choice(("tool call", "observation", "user"))
            history += "\n" + text_of(rng, tok, p.turn_tokens, f"[{kind} {turn}]")
            trace.append(
                Request(
                    at=start if prev < 0 else 0.0,
                    prompt=history,
                    kind="session",
                    group=s,
                    follows=prev,
                    think_s=rng.uniform(0, 2 * p.think_s),
                )
            )
            prev = len(trace) - 1
    return trace, docs


# ------------------------------------------------------------------------------------------------- client
def stream_generate(url: str, prompt: str, max_new: int, timeout: float) -> dict:
    """One streamed greedy /generate: TTFT (first chunk), latency, output text, cached tokens by tier."""
    body = json.dumps(
        {"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0}}
    ).encode()
    req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
    last, ttft, latency = read_generate_stream(req, timeout)
    if last is None:
        raise ServerError(f"no streamed chunk from {url}/generate")
    m = last["meta_info"]
    d = m.get("cached_tokens_details") or {}
    return {
        "ttft": ttft,
        "latency": latency,
        "text": last.get("text", ""),
        "prompt_tokens": m.get("prompt_tokens", 0),
        "completion_tokens": m.get("completion_tokens", 0),
        "cached": m.get("cached_tokens", 0),
        "device": d.get("device", 0),
        "host": d.get("host", 0),
        "storage": d.get("storage", 0),
    }


def replay(url: str, trace: list[Request], max_new: int, timeout: float, progress: str) -> tuple[list[dict], float]:
    """Send every request at its arrival time (sessions: a turn goes out think time after the previous one
    finished). Returns per-request results (trace order) and the makespan."""
    results: list[dict | None] = [None] * len(trace)
    done = [threading.Event() for _ in trace]
    errors: list[str] = []
    t0 = time.perf_counter()

    def run(i: int) -> None:
        r = trace[i]
        try:
            if r.follows >= 0:
                done[r.follows].wait()
                time.sleep(r.think_s)
            else:
                time.sleep(max(0.0, r.at - (time.perf_counter() - t0)))
            results[i] = stream_generate(url, r.prompt, max_new, timeout)
        except Exception as e:  # noqa: BLE001 - any failure is reported after the run; never a hang
            errors.append(f"request {i}: {type(e).__name__}: {e}")
        finally:
            done[i].set()
            n = sum(ev.is_set() for ev in done)
            print(f"\r  {progress}: {n}/{len(trace)} requests", end="", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(trace))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + 60)
    print(file=sys.stderr)
    if errors:
        raise ServerError(f"{len(errors)} request(s) failed: " + "; ".join(errors[:3]))
    return results, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- configurations
def server_args(config: str, p: Preset, workdir: str) -> tuple[list[str], dict]:
    """Launch flags (beyond the model, host, port and --max-total-tokens, which the harness adds) and extra env."""
    cpu = [] if gpu_present() else ["--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first"]
    base = [
        *(["--page-size", str(p.page_size)] if p.page_size is not None else []),
        *(["--context-length", str(p.context)] if p.context is not None else []),
        *p.extra_args,
    ]
    if config == "radix":
        return base, {}
    if config == "hicache_host":
        return base + ["--enable-hierarchical-cache", *cpu], {}
    if config == "hicache_file":
        store = os.path.join(workdir, "hicache-file")
        return base + ["--enable-hierarchical-cache", *cpu, "--hicache-storage-backend", "file"], {
            "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR": store
        }
    if config == "kvdrive":
        return base + ["--kv-tier", "kvdrive", "--kvdrive-dir", os.path.join(workdir, "kvdrive-store")], {}
    raise ValueError(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(results: list[dict], makespan: float) -> dict:
    ttft = [r["ttft"] for r in results]
    prompt = sum(r["prompt_tokens"] for r in results)
    tiers = {t: sum(r[t] for r in results) for t in ("device", "host", "storage")}
    return {
        "requests": len(results),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "ttft_mean_s": statistics.fmean(ttft),
        "makespan_s": makespan,
        "req_per_s": len(results) / makespan,
        "output_tok_per_s": sum(r["completion_tokens"] for r in results) / makespan,
        "prompt_tokens": prompt,
        "cached_tokens": sum(r["cached"] for r in results),
        "computed_tokens": prompt - sum(r["cached"] for r in results),
        **{f"{k}_tokens": v for k, v in tiers.items()},
    }


def run_config(
    config: str, p: Preset, model: str, trace: list[Request], restart_prompts: list[str], workdir: str, timeout: float
) -> dict:
    args, env = server_args(config, p, workdir)
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    out = {"args": args, "env": env}

    def start(tag: str) -> SGLangServer:
        srv = SGLangServer(
            model,
            args,
            env=env,
            log_path=os.path.join(logs, f"{config}-{tag}.log"),
            max_total_tokens=p.max_total_tokens,
            request_timeout=timeout,
            torch_extensions_dir=os.path.join(workdir, "torch_ext"),
        )
        return srv.start()

    print(f"[{config}] starting server", file=sys.stderr)
    srv = start("run")
    try:
        out["start_s"] = srv.start_seconds
        results, makespan = replay(srv.url, trace, p.max_new_tokens, timeout, config)
        out["results"], out["summary"] = results, summarise(results, makespan)
        if config == "radix" and p.restart:
            # cold prefill of the restart prompts, one at a time as the restart replay sends them: the cache is
            # flushed first, so nothing of them is cached (the same prompts run first thing after a restart)
            srv.flush_cache()
            out["cold"] = [stream_generate(srv.url, q, p.max_new_tokens, timeout) for q in restart_prompts]
    finally:
        srv.stop(graceful=True)
    hooks = HOOK_LINE.findall(srv.log_text())  # kvdrive's summary line at shutdown: its hooks' own host time
    if hooks:
        ms, passes, share = hooks[-1]
        out["hooks"] = {
            "capture_ms": int(ms),
            "forward_passes": int(passes),
            "share_of_forward_time": float(share) / 100,
        }
    if p.restart and config != "radix":
        print(f"[{config}] restarting on the same store", file=sys.stderr)
        srv = start("restart")
        try:
            out["restart"] = [stream_generate(srv.url, q, p.max_new_tokens, timeout) for q in restart_prompts]
        finally:
            srv.stop(graceful=True)
    return out


# ------------------------------------------------------------------------------------------------- report
HOOK_LINE = re.compile(r"attention capture (\d+) ms over (\d+) forward passes = ([\d.]+)% of their host time")


def compare_outputs(ref: list[dict], other: list[dict]) -> int:
    return sum(a["text"] == b["text"] for a, b in zip(ref, other))


def report(run: dict) -> str:
    rows = run["configs"]
    ref = rows.get("radix")
    lines = [
        f"# e2e bench — preset `{run['preset']}` ({run['device']})",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {run['machine']}  ",
        f"Date: {run['date']}",
        "",
        (
            f"Trace: {run['trace']['requests']} requests ({run['trace']['doc_requests']} document, "
            f"{run['trace']['session_requests']} session turns), {run['trace']['prompt_tokens']} prompt tokens; "
            f"device KV pool {run['preset_values']['max_total_tokens']} tokens, page size "
            f"{run['preset_values']['page_size'] or 'SGLang default'}."
        ),
        "",
        (
            f"req/s and output tok/s are at the trace's open-loop arrival rate ({run['preset_values']['rate']} "
            "document requests/s): served over the makespan, not the server's capacity."
        ),
        "",
        (
            "| configuration | TTFT p50 (s) | TTFT p99 (s) | req/s | output tok/s | prompt tokens computed | "
            "from device | from host | from storage | outputs = radix |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        s = r["summary"]
        same = (
            "reference"
            if name == "radix"
            else (f"{compare_outputs(ref['results'], r['results'])}/{s['requests']}" if ref else "n/a")
        )
        lines.append(
            f"| {name} | {s['ttft_p50_s']:.3f} | {s['ttft_p99_s']:.3f} | {s['req_per_s']:.2f} | "
            f"{s['output_tok_per_s']:.1f} | {s['computed_tokens']} "
            f"({s['computed_tokens'] / max(s['prompt_tokens'], 1):.0%}) | "
            f"{s['device_tokens']} | {s['host_tokens']} | {s['storage_tokens']} | {same} |"
        )
    if ref:
        lines += ["", "Ratios against radix-only in this run:", ""]
        rs = ref["summary"]
        for name, r in rows.items():
            if name == "radix":
                continue
            s = r["summary"]
            lines.append(
                f"- {name}: TTFT p50 {s['ttft_p50_s'] / rs['ttft_p50_s']:.2f}x, p99 "
                f"{s['ttft_p99_s'] / rs['ttft_p99_s']:.2f}x, output tokens/s (open loop) "
                f"{s['output_tok_per_s'] / rs['output_tok_per_s']:.2f}x, prompt tokens computed "
                f"{s['computed_tokens'] / max(rs['computed_tokens'], 1):.2f}x"
            )
    hooked = {n: r["hooks"] for n, r in rows.items() if "hooks" in r}
    if hooked:
        lines += [
            "",
            "kvdrive's own hooks (attention capture on every attention layer call, sampled passes only doing "
            "work), host time against the forward passes' host time in the same server: "
            + "; ".join(
                f"{n} {h['capture_ms']} ms over {h['forward_passes']} passes = {h['share_of_forward_time']:.1%}"
                for n, h in hooked.items()
            )
            + ". The radix and HiCache rows run with no kvdrive hook at all (the plugin is inert without "
            "--kv-tier kvdrive).",
        ]
    cold = (ref or {}).get("cold")
    restarts = {n: r["restart"] for n, r in rows.items() if "restart" in r}
    if restarts and cold:
        lines += [
            "",
            (
                "Restart: the server stopped and started again on the same store, every document asked again "
                "as it was first asked (cold = the same prompts on the radix-only server after /flush_cache):"
            ),
            "",
            (
                "| configuration | docs served from storage | storage tokens | TTFT after restart / cold (median) "
                "| outputs = cold |"
            ),
            "|---|---|---|---|---|",
        ]
        for name, again in restarts.items():
            ratios = [a["ttft"] / c["ttft"] for a, c in zip(again, cold)]
            served = sum(a["storage"] > 0 for a in again)
            lines.append(
                f"| {name} | {served}/{len(again)} | {sum(a['storage'] for a in again)} | "
                f"{statistics.median(ratios):.2f} | {compare_outputs(cold, again)}/{len(again)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)} (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="an existing model directory (default: generate the preset's model)")
    ap.add_argument("--workdir", help="keep models, stores and server logs here (default: a temp dir, removed)")
    ap.add_argument(
        "--out", help="write <out>.json and <out>.md (default for presets other than demo: bench/results/e2e-<preset>)"
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    add_allow_dirty(ap)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    configs = tuple(a.configs.split(",")) if a.configs else p.configs
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c!r}; known: {', '.join(CONFIGS)}")
    if a.preset in GPU_ONLY_PRESETS and not gpu_present():
        ap.error(
            f"--preset {a.preset} needs a CUDA GPU (torch.cuda.is_available() is False here); "
            "bench/first_device.py --device cpu is its CPU dry run"
        )
    out = (
        a.out
        if a.out is not None
        else (None if a.preset == "demo" else os.path.join(REPO, "bench", "results", f"e2e-{a.preset}"))
    )
    guard_results(out + ".json" if out else None, REPO, a.allow_dirty)
    workdir = a.workdir or tempfile.mkdtemp(prefix="kvdrive-e2e-bench-")
    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()
    try:
        model = a.model or os.path.join(workdir, f"model-{a.preset}")
        if not a.model and not os.path.exists(os.path.join(model, "config.json")):
            print(f"generating the {a.preset} model in {model}", file=sys.stderr)
            make_model(p.model_kind, model, **p.model)
        tok = Tokenizer(model)
        trace, _docs = build_trace(p, tok, a.seed)
        # after a restart every document is asked again as it was first asked (document + its first question)
        firsts = {}
        for r in trace:
            if r.kind == "doc":
                firsts.setdefault(r.group, r.prompt)
        restart_prompts = [firsts[d] for d in sorted(firsts)]
        run = {
            "preset": a.preset,
            "device": "GPU" if gpu_present() else "CPU",
            "machine": machine(),
            "command": "python "
            + " ".join(
                shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])
            ),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "preset_values": asdict(p),
            "trace": {
                "requests": len(trace),
                "doc_requests": sum(r.kind == "doc" for r in trace),
                "session_requests": sum(r.kind == "session" for r in trace),
                "prompt_tokens": sum(tok.count(r.prompt) for r in trace),
            },
            "configs": {},
        }
        for c in configs:
            run["configs"][c] = run_config(c, p, model, trace, restart_prompts, workdir, a.timeout)
        run["wall_s"] = round(time.time() - t_start, 1)
        md = report(run)
        print(md)
        print(
            f"(wall time {run['wall_s']} s; server logs in {workdir}/logs"
            f"{'' if a.workdir else ', removed now: pass --workdir to keep them'})"
        )
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".json", "w") as f:
                json.dump(run, f, indent=1)
            with open(out + ".md", "w") as f:
                f.write(md)
            print(f"wrote {out}.json and {out}.md")
        return 0
    except ServerError as e:
        print(f"e2e bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def machine() -> str:
    gpu = ""
    if gpu_present():
        import torch

        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    m = common_machine(REPO)  # versions and the commit this ran (+uncommitted when the tree was dirty)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_model()} ({os.cpu_count()} cores), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}{gpu}; SGLang {m['sglang']}, torch {m['torch']}; commit {m['git']}; "
        f"load average at start {load}"
    )


if __name__ == "__main__":
    sys.exit(main())
