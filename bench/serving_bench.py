"""Real CPU SGLang servers driven by clients nobody here wrote: SGLang's own ``bench_serving`` and a multi-turn agent
client in the style of SGLang's benchmark/hicache/bench_multiturn.py (issue 18, "Measured with real clients").

    python bench/serving_bench.py --preset smoke --out /tmp/serving-smoke     # < 2 min: radix and kvdrive, 1 rep
    python bench/serving_bench.py --preset cpu                                # the full matrix (~25 min, 2 idle cores)
    python bench/serving_bench.py --preset cpu --neighbour                    # ... beside a CPU-busy neighbour

Per workload size (``fit``: the working set fits the host-DRAM budget; ``large``: 2-3x it) and per configuration
(radix, hicache_host, hicache_file, kvdrive: bench/e2e_bench.py's rows, flags and tiny generated model), one server
at a time, all at the same host-DRAM budget (bench/serving/budget.py: kvdrive's SGLang host pool + its compressed
DRAM tier = HiCache's host pool). On each server, ``reps`` repetitions, each with a new prompt seed (so each is cold)
and a /flush_cache before every client:
  gsp             bench_serving generated-shared-prefix, Zipf groups, open loop at the workload's request rate
  gsp_saturation  the same at --request-rate inf: input throughput at saturation
  gsp_multiturn   bench_serving --gsp-num-turns on the chat backend (each round's prompt is the whole history)
  agent           bench/serving/agent.py: conversations in rounds, /flush_cache between rounds
Then servers with a persistent tier (hicache_file, kvdrive) are stopped and started again on the same stores and the
last repetition's gsp prompts are sent again: TTFT after restart / cold. Results: median and min-max over the
repetitions, tokens per tier (SGLang's per-request cached_tokens_details), issue 18's ratios against their targets,
``bench/results/serving-<preset>.json`` / ``.md`` and plots (``--out`` to change; smoke writes nothing unless asked).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import e2e_bench
from bench.bench_common import add_allow_dirty, guard_results
from bench.bench_common import machine as common_machine
from bench.serving import agent, report
from bench.serving import sglang_client as sc
from bench.serving.budget import HostBudget, bytes_per_token, logged_host_pool_tokens
from bench.serving.neighbour import Neighbour
from bench.serving.sglang_client import Client, ClientError, Workload
from tests.e2e.server import ServerError, SGLangServer, gpu_present

PERSISTENT = ("hicache_file", "kvdrive")  # stores that outlive the server: the restart rows
KVDRIVE_HITS = re.compile(r"hits DRAM (\d+) disk (\d+) miss (\d+)")
# SGLang 0.5.23's line for each storage prefetch that finished (unified_radix_cache.py): tokens it put in the host pool
PREFETCH_DONE = re.compile(r"HiCache prefetch (success|dropped) req=\S+ completed=\d+ matched=\d+ loaded=(\d+)")


@dataclass(frozen=True)
class Preset:
    model: dict  # make_tiny_llama kwargs (e2e_bench's models)
    configs: tuple
    workloads: dict  # name -> Workload
    clients: tuple
    reps: int
    restart: bool
    max_total_tokens: int  # device KV pool (tokens)
    host_ratio: float  # HiCache's host pool / device pool: the host-DRAM budget
    pool_share: float  # kvdrive: share of the budget kept as SGLang's host pool (the rest: its compressed DRAM tier)
    agent_settle_s: float = 1.0  # agent client: think time before each between-round flush (bench/serving/agent.py)
    page_size: int = 16  # page_size, context and extra_args: read by e2e_bench.server_args
    context: int = 4096
    extra_args: tuple = ()
    est_start_s: float = 25.0  # estimate inputs (2 idle cores): server start, bench_serving's own start-up
    est_client_s: float = 2.0  # per bench_serving run in the warm worker (its own 1 s pause included)
    est_prefill_tok_s: float = 2500.0


DEMO_MODEL = e2e_bench.PRESETS["demo"].model  # 3 layers, hidden 768, 2 KV heads: 1.5 KiB of KV per token
CPU_MODEL = e2e_bench.PRESETS["cpu"].model  # 4 layers, hidden 1024, 2 KV heads: 2 KiB per token, prefill-heavy

PRESETS = {
    # CI's smoke: two servers, one repetition, a few requests: bench_serving once (at saturation, which also gives
    # TTFT and tiers) and the agent client once
    "smoke": Preset(
        model=DEMO_MODEL,
        configs=("radix", "kvdrive"),
        workloads={
            "fit": Workload(
                groups=2,
                per_group=3,
                system_tokens=256,
                question_tokens=16,
                output_tokens=4,
                zipf_alpha=1.1,
                rate=4.0,
                mt_groups=1,
                mt_per_group=2,
                mt_turns=2,
                agent_conversations=2,
                agent_rounds=2,
                agent_first_tokens=320,
                agent_turn_tokens=32,
            )
        },
        clients=(Client.GSP_SATURATION, Client.AGENT),
        reps=1,
        restart=False,
        max_total_tokens=768,
        host_ratio=2.0,
        pool_share=0.5,
        est_start_s=20.0,
    ),
    # the full matrix on CPU: a 16 MiB host budget (8192 tokens x 2 KiB) over a 2048-token device pool. fit's gsp
    # working set is ~5.2K tokens (0.63x the budget), large's ~17K (2.1x); estimate ~25 min on 2 idle cores
    "cpu": Preset(
        model=CPU_MODEL,
        configs=e2e_bench.CONFIGS,
        workloads={
            "fit": Workload(
                groups=6,
                per_group=3,
                system_tokens=768,
                question_tokens=32,
                output_tokens=8,
                zipf_alpha=1.1,
                rate=2.0,
                mt_groups=2,
                mt_per_group=2,
                mt_turns=3,
                agent_conversations=4,
                agent_rounds=3,
                agent_first_tokens=768,
                agent_turn_tokens=96,
            ),
            "large": Workload(
                groups=16,
                per_group=2,
                system_tokens=1024,
                question_tokens=32,
                output_tokens=8,
                zipf_alpha=0.8,
                rate=2.5,
                mt_groups=3,
                mt_per_group=1,
                mt_turns=3,
                agent_conversations=6,
                agent_rounds=3,
                agent_first_tokens=1280,
                agent_turn_tokens=96,
            ),
        },
        clients=(Client.GSP, Client.GSP_SATURATION, Client.GSP_MULTITURN, Client.AGENT),
        reps=3,
        restart=True,
        max_total_tokens=2048,
        host_ratio=4.0,
        pool_share=0.5,
    ),
}
CLIENT_SEED = {Client.GSP: 0, Client.GSP_SATURATION: 1000, Client.GSP_MULTITURN: 2000, Client.AGENT: 3000}


def estimate_s(p: Preset, configs: tuple) -> float:
    """Rough wall time on 2 idle cores, pessimistic (every prompt token computed, as radix-only after a flush):
    the model and the hash extension once, server starts (+ warm-up), then per client its start-up, the larger of its
    arrivals (open loop) and its prefill, the agent's think times before its flushes."""
    starts = len(p.workloads) * (len(configs) + (sum(c in PERSISTENT for c in configs) if p.restart else 0))
    total = 30.0 + starts * (p.est_start_s + 3.0)
    for w in p.workloads.values():
        for c in p.clients:
            if c is Client.AGENT:
                rounds = w.agent_conversations * sum(
                    w.agent_first_tokens + r * (w.agent_turn_tokens + w.output_tokens) for r in range(w.agent_rounds)
                )
                per = rounds / p.est_prefill_tok_s + (w.agent_rounds - 1) * (p.agent_settle_s + 0.5) + 1.0
            else:
                tokens = w.requests(c) * (w.system_tokens + w.question_tokens)
                arrivals = w.requests(c) / w.rate if c is not Client.GSP_SATURATION else 0.0
                per = max(tokens / p.est_prefill_tok_s, arrivals) + p.est_client_s
            total += (per + 0.5) * p.reps * len(configs)
        if p.restart:
            total += sum(c in PERSISTENT for c in configs) * (w.requests(Client.GSP) / w.rate + p.est_client_s)
    return total


# ------------------------------------------------------------------------------------------------- one server
PREBUILD_HASH = (
    "from sglang.srt.mem_cache.cpp_utils.native_hash import _load_native_hash_module; _load_native_hash_module()"
)


def prebuild_hicache_hash(ext_dir: str) -> str:
    """Build SGLang's HiCache hash extension (hicache_hash_cpp) into ``ext_dir`` before any server starts.

    A HiCache server with a storage backend JIT-builds it on its first storage query, in its prefetch thread; on 2
    busy cores that took 26-40 s, and a /flush_cache meanwhile waits 10 s for that thread, then raises "Failed to
    stop HiCache storage threads cleanly" and the server dies (SGLang 0.5.23 cache_controller.reset; found by this
    runner's first hicache_file run). Built once here, every server loads the finished module. Returns a one-line
    outcome; a SGLang without that module (another version) only gets a line, not a failure."""
    built = os.path.join(ext_dir, "hicache_hash_cpp", "hicache_hash_cpp.so")
    if os.path.exists(built):
        return f"hicache_hash_cpp already built in {ext_dir}"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": ext_dir}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", PREBUILD_HASH], env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    if p.returncode != 0:
        return f"hicache_hash_cpp not prebuilt (servers build it themselves): {p.stderr.strip()[-300:]}"
    return f"hicache_hash_cpp ready in {ext_dir} ({time.monotonic() - t0:.0f} s)"


class Runner:
    def __init__(
        self,
        p: Preset,
        model: str,
        budget: HostBudget,
        workdir: str,
        timeout: float,
        ext_dir: str,
        kvdrive_flags: tuple = (),
    ):
        self.p, self.model, self.budget, self.workdir, self.timeout = p, model, budget, workdir, timeout
        self.ext_dir = ext_dir
        self.kvdrive_flags = tuple(kvdrive_flags)  # --kvdrive-flags: more flags for the kvdrive server only
        self.tok = e2e_bench.Tokenizer(model)
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
        # one bench_serving process for every run of every server (its imports paid once; see sglang_client.Worker)
        self.worker = sc.Worker(os.path.join(workdir, "clients"), os.path.join(workdir, "logs", "bench_serving.log"))

    def texts(self, rng, tokens: int, head: str) -> str:
        return e2e_bench.text_of(rng, self.tok, tokens, head)

    def start(self, config: str, wdir: str, tag: str) -> SGLangServer:
        args, env = e2e_bench.server_args(config, self.p, wdir)
        env = {**env, **SERVER_ENV}
        logs = os.path.join(self.workdir, "logs")
        os.makedirs(logs, exist_ok=True)
        srv = SGLangServer(
            self.model,
            args + self.budget.args(config) + list(self.kvdrive_flags if config == "kvdrive" else ()),
            env=env,
            log_path=os.path.join(logs, f"{os.path.basename(wdir)}-{config}-{tag}.log"),
            max_total_tokens=self.p.max_total_tokens,
            request_timeout=self.timeout,
            torch_extensions_dir=self.ext_dir,
        )
        print(f"[{os.path.basename(wdir)}/{config}] starting server ({tag})", file=sys.stderr, flush=True)
        srv.start()
        # the first requests of a fresh server pay one-off costs (allocations, lazy imports): two short prompts that
        # share nothing with any workload, then a flush
        for i in range(2):
            agent.generate(srv.url, f"warm-up {tag} {i}: " + " ".join(["hello"] * 40), 4, self.timeout)
        agent.flush(srv.url)
        return srv

    def client(self, srv: SGLangServer, w: Workload, client: Client, seed: int, tag: str) -> dict:
        if client is Client.AGENT:
            r = agent.run(
                srv.url,
                self.texts,
                conversations=w.agent_conversations,
                rounds=w.agent_rounds,
                first_tokens=w.agent_first_tokens,
                turn_tokens=w.agent_turn_tokens,
                output_tokens=w.output_tokens,
                seed=seed,
                timeout=self.timeout,
                settle_s=self.p.agent_settle_s,
            )
            return {"seed": seed, "summary": r["summary"], "turns": r["turns"]}
        out_file = os.path.join(self.worker.scratch, f"{tag}-{client.value}-{seed}.jsonl")
        cmd = sc.command(srv.url, self.model, w, client, seed, out_file)
        raw = self.worker.run(cmd, self.timeout * 4)
        return {"seed": seed, "summary": sc.summarise(raw), "command": " ".join(shlex.quote(x) for x in cmd)}

    def run_config(self, wname: str, w: Workload, config: str, seeds: list[int]) -> dict:
        wdir = os.path.join(self.workdir, wname)
        os.makedirs(wdir, exist_ok=True)
        srv = self.start(config, wdir, "run")
        row: dict = {"args": srv.extra_args, "start_s": srv.start_seconds, "clients": {}}
        reps: dict[str, list[dict]] = {c.value: [] for c in self.p.clients}
        try:
            for i, seed in enumerate(seeds):
                for c in self.p.clients:
                    agent.flush(srv.url)
                    print(f"[{wname}/{config}] rep {i + 1}/{len(seeds)}: {c.value}", file=sys.stderr, flush=True)
                    reps[c.value].append(self.client(srv, w, c, seed + CLIENT_SEED[c], f"{wname}-{config}"))
        finally:
            srv.stop(graceful=True)
        log = srv.log_text()
        row["host_pool_tokens"] = logged_host_pool_tokens(log)
        row["kvdrive_tiers"] = kvdrive_tiers(log) if config == "kvdrive" else None
        row["prefetch_loaded"] = prefetch_loaded(log)
        for c, rs in reps.items():
            row["clients"][c] = {"reps": rs, "aggregate": report.aggregate([r["summary"] for r in rs])}
        if self.p.restart and config in PERSISTENT and Client.GSP in self.p.clients:
            srv = self.start(config, wdir, "restart")
            try:
                again = self.client(srv, w, Client.GSP, seeds[-1] + CLIENT_SEED[Client.GSP], f"{wname}-{config}-rs")
            finally:
                srv.stop(graceful=True)
            cold = reps[Client.GSP.value][-1]["summary"]["ttft_p50_s"]
            row["restart"] = {
                "start_s": srv.start_seconds,
                "summary": again["summary"],
                "prefetch_loaded": prefetch_loaded(srv.log_text()),
                "cold_ttft_p50_s": cold,
                "ratio": again["summary"]["ttft_p50_s"] / cold if cold else None,
            }
        return row


def kvdrive_tiers(log_text: str) -> dict | None:
    """kvdrive's last summary line (logged at shutdown): page hits in its DRAM tier and on disk over the server's
    life, which SGLang's cached_tokens_details count together as 'storage'."""
    lines = [ln for ln in log_text.splitlines() if "kvdrive: DRAM" in ln and "hits DRAM" in ln]
    if not lines:
        return None
    m = KVDRIVE_HITS.search(lines[-1])
    line = lines[-1][lines[-1].index("kvdrive: DRAM") :]
    return {"dram_hit_pages": int(m[1]), "disk_hit_pages": int(m[2]), "miss_pages": int(m[3]), "line": line}


def prefetch_loaded(log_text: str) -> dict | None:
    """What SGLang's storage prefetches put into its host pool over the server's life, from its own log: the
    prefetches that loaded tokens and those tokens. Set against the storage tokens that reached requests (the cache
    report), it shows prefetched pages lost before their request ran (kvdrive_sglang/awaiting_use.py). None: no
    such line (no storage tier, or an SGLang that does not log it)."""
    done = [(m[1], int(m[2])) for m in PREFETCH_DONE.finditer(log_text)]
    if not done:
        return None
    return {
        "prefetches": sum(1 for _, n in done if n),
        "tokens": sum(n for _, n in done),
        "dropped": sum(1 for kind, _ in done if kind == "dropped"),  # loaded, then not inserted into the tree
    }


# ------------------------------------------------------------------------------------------------- main
def workload_note(name: str, w: Workload, budget: HostBudget, clients: tuple) -> str:
    parts = []
    for c in clients:
        ws = w.working_set_tokens(c)
        parts.append(
            f"{c.value}: {w.requests(c)} requests, working set <= {ws} tokens "
            f"({ws / budget.host_tokens:.2f}x the host budget)"
        )
    return (
        f"gsp: {w.groups} groups x {w.per_group} questions, system prompt {w.system_tokens} tokens, question "
        f"{w.question_tokens}, output {w.output_tokens}, Zipf alpha {w.zipf_alpha}, open-loop rate {w.rate}/s; "
        f"gsp_multiturn: {w.mt_groups * w.mt_per_group} conversations x {w.mt_turns} turns; agent: "
        f"{w.agent_conversations} conversations x {w.agent_rounds} rounds, first prompt {w.agent_first_tokens} tokens, "
        f"+{w.agent_turn_tokens} per round. " + "; ".join(parts) + "."
    )


# Every server, whatever its configuration, runs torch with one intra-op thread. With torch's default (two threads
# on these 2-core VMs) one forward pass of the same 1000-token prompt took 0.19-1.64 s (median 0.86 s, 15 runs,
# radix-only) depending on whether another process held a core at that moment -- the two threads meet at a barrier
# and wait for the descheduled one -- against 0.37-0.54 s with one thread (one outlier 1.24 s); the configurations of
# a run each run in their own time window, so with two threads their TTFTs measured the machine's load at that
# window as much as the cache (found by this bench's py-spy profiles of the neighbour run, issue 18).
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
SERVER_ENV_NOTE = (
    "every server runs with OMP_NUM_THREADS=1 (one torch intra-op thread: steady per-pass times on a shared 2-core "
    "VM; see SERVER_ENV in bench/serving_bench.py)"
)

CLIENTS_NOTE = (
    "SGLang {sglang}'s `python -m sglang.bench_serving` (generated-shared-prefix with --gsp-group-distribution zipf, "
    "--gsp-num-turns on sglang-oai-chat, --cache-report, --output-file/--output-details; its cli_main run per job "
    "in one worker process, bench/serving/bs_worker.py; Hugging Face datasets {datasets}) and bench/serving/agent.py "
    "(bench_multiturn-style, /flush_cache between rounds after a 1 s think time). Not in this bench_serving: a flush "
    "between multi-turn rounds, multi-turn on the native /generate backend, token-id prompts for multi-turn, and an "
    "input throughput for multi-turn runs (it reports 0: the runner divides the server-reported prompt tokens by the "
    "run's duration instead)."
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--configs", help=f"comma-separated subset of {','.join(e2e_bench.CONFIGS)}")
    ap.add_argument("--workloads", help="comma-separated subset of the preset's workloads (fit, large)")
    ap.add_argument("--clients", help=f"comma-separated subset of {','.join(c.value for c in Client)}")
    ap.add_argument("--restart", action="store_true", help="add the restart rows even where the preset has none")
    ap.add_argument("--agent-settle-s", type=float, help="agent client: think time before each flush, s")
    ap.add_argument("--reps", type=int, help="repetitions per (configuration, workload) (default: the preset's)")
    ap.add_argument("--seed", type=int, default=1, help="first repetition's prompt seed (then +1 per repetition)")
    ap.add_argument("--neighbour", action="store_true", help="run a CPU-busy neighbour process on every core")
    ap.add_argument("--model", help="an existing model directory (default: generate the preset's model)")
    ap.add_argument("--workdir", help="keep models, stores, logs and client outputs here (default: a temp dir)")
    ap.add_argument("--out", help="write <out>.json/.md (+ plots) (default for cpu: bench/results/serving-<preset>)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    ap.add_argument(
        "--pool-share",
        type=float,
        help="kvdrive's share of the host budget kept as SGLang's host pool, the rest its compressed DRAM tier "
        "(default: the preset's, 0.5; 1.0: all of it SGLang's host pool, kvdrive's DRAM tier off, its disk on)",
    )
    ap.add_argument(
        "--kvdrive-flags",
        default="",
        help="more server flags for the kvdrive configuration only, as one string of --kvdrive-* flags (a "
        "diagnostic run, e.g. another promoter setting); recorded in the command and in each row's args",
    )
    add_allow_dirty(ap)
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    try:
        kvdrive_flags = tuple(shlex.split(a.kvdrive_flags))
    except ValueError as e:
        ap.error(f"--kvdrive-flags: {e}")
    if kvdrive_flags and not all(f.startswith("--kvdrive-") for f in kvdrive_flags if f.startswith("--")):
        ap.error("--kvdrive-flags takes --kvdrive-* server flags only (the other configurations must stay comparable)")
    configs = tuple(a.configs.split(",")) if a.configs else p.configs
    for c in configs:
        if c not in e2e_bench.CONFIGS:
            ap.error(f"unknown configuration {c!r}; known: {', '.join(e2e_bench.CONFIGS)}")
    wnames = tuple(a.workloads.split(",")) if a.workloads else tuple(p.workloads)
    for w in wnames:
        if w not in p.workloads:
            ap.error(f"unknown workload {w!r} for preset {a.preset}; known: {', '.join(p.workloads)}")
    if a.reps is not None and a.reps < 1:
        ap.error("--reps must be at least 1")
    reps = a.reps or p.reps
    if a.pool_share is not None and not 0.0 < a.pool_share <= 1.0:
        ap.error(f"--pool-share must be in (0, 1], got {a.pool_share}")
    if gpu_present():
        ap.error("this runner sizes CPU servers (tiny model, CPU flags); on a GPU use bench/e2e_bench.py --preset gpu")
    out = a.out if a.out is not None else (None if a.preset == "smoke" else f"{REPO}/bench/results/serving-{a.preset}")
    guard_results(out + ".json" if out else None, REPO, a.allow_dirty)
    try:
        clients = tuple(Client(c) for c in a.clients.split(",")) if a.clients else p.clients
    except ValueError as e:
        ap.error(f"{e}; known clients: {', '.join(c.value for c in Client)}")
    settle = p.agent_settle_s if a.agent_settle_s is None else a.agent_settle_s
    p = replace(
        p,
        workloads={w: p.workloads[w] for w in wnames},
        reps=reps,
        clients=clients,
        restart=p.restart or a.restart,
        pool_share=p.pool_share if a.pool_share is None else a.pool_share,
        agent_settle_s=settle,
    )
    est = estimate_s(p, configs)
    print(
        f"serving bench, preset {a.preset}: {len(configs)} configurations x {len(wnames)} workloads x {reps} "
        f"repetitions; estimate ~{est / 60:.0f} min on 2 idle cores",
        file=sys.stderr,
        flush=True,
    )
    m = common_machine(REPO)  # at the start: the load average before any server
    workdir = a.workdir or tempfile.mkdtemp(prefix="kvdrive-serving-bench-")
    os.makedirs(workdir, exist_ok=True)
    neighbour = Neighbour().start() if a.neighbour else None
    t0 = time.time()
    try:
        model = a.model or os.path.join(workdir, f"model-{a.preset}")
        if not a.model and not os.path.exists(os.path.join(model, "config.json")):
            print(f"generating the {a.preset} model in {model}", file=sys.stderr, flush=True)
            e2e_bench.make_model(e2e_bench.ModelKind.LLAMA, model, **p.model)
        budget = HostBudget(bytes_per_token(model), p.max_total_tokens, p.host_ratio, p.pool_share)
        print(budget.line(), file=sys.stderr, flush=True)
        # the test suite's own folder when it runs us (tests/conftest.py), so the extension is built once per machine
        ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(workdir, "torch_ext")
        print(prebuild_hicache_hash(ext_dir), file=sys.stderr, flush=True)
        runner = Runner(p, model, budget, workdir, a.timeout, ext_dir, kvdrive_flags)
        seeds = [a.seed + i for i in range(reps)]
        results: dict = {}
        try:
            for wname in wnames:
                results[wname] = {}
                for c in configs:
                    results[wname][c] = runner.run_config(wname, p.workloads[wname], c, seeds)
        finally:
            runner.worker.stop()
        nb = neighbour.stop() if neighbour else None
        run = {
            "preset": a.preset,
            "command": "python "
            + " ".join(
                shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])
            ),
            "machine": m,
            "machine_line": f"{m['cpu']} ({m['cores']} cores), {m['platform']}, Python {m['python']}; SGLang "
            f"{m['sglang']}, torch {m['torch']}; commit {m['git']}; load average at start "
            + ", ".join(f"{x:.2f}" for x in m["load_avg"]),
            "date": m["date"],
            "estimate_s": round(est),
            "neighbour": nb,
            "server_env": dict(SERVER_ENV),
            "server_env_note": SERVER_ENV_NOTE,
            "budget": budget.describe(),
            "budget_line": budget.line(),
            "configs": list(configs),
            "clients": [c.value for c in p.clients],
            "clients_note": CLIENTS_NOTE.format(
                sglang=m["sglang"],
                datasets="installed"
                if sc.hf_datasets_installed()
                else "not installed: bench/serving/shim stood in for its import",
            ),
            "seeds": seeds,
            "workloads": {
                w: {**asdict(p.workloads[w]), "note": workload_note(w, p.workloads[w], budget, p.clients)}
                for w in wnames
            },
            "preset_values": {k: v for k, v in asdict(p).items() if k != "workloads"},
            "results": results,
        }
        run["verdicts"] = report.verdicts(results)
        run["wall_s"] = round(time.time() - t0, 1)
        if out and not a.no_plots:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            run["plots"] = [os.path.relpath(x, os.path.dirname(os.path.abspath(out))) for x in report.plots(run, out)]
        md = report.markdown(run)
        print(md)
        print(
            f"(wall time {run['wall_s']} s, estimate {est:.0f} s; logs in {workdir}/logs"
            f"{'' if a.workdir else ', removed now: pass --workdir to keep them'})"
        )
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".json", "w") as f:
                json.dump(run, f, indent=1, default=str)
            with open(out + ".md", "w") as f:
                f.write(md)
            print(f"wrote {out}.json and {out}.md")
        return 0
    except (ServerError, ClientError, RuntimeError, OSError) as e:
        print(f"serving bench failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if neighbour is not None and neighbour.procs:
            neighbour.stop()
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
