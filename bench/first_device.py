"""The first hour on a GPU: one script, about 5 minutes, that checks what only a GPU can show and records every step.

    python bench/first_device.py                       # on the GPU machine (bash bench/first_device.sh sets it up)
    python bench/first_device.py --device cpu          # the CPU dry run (CI: tests/bench/test_first_device_dryrun.py)

Steps, in order; each is time-boxed and recorded (pass / fail / skip / timeout, seconds, figures) even when another
failed; the two variants at the end run only when their box fits in what is left of the budget (else skipped with
that reason), and a step a CPU cannot run is skipped there with the reason (bench/e2e_bench.py CPU_UNSUPPORTED):
  models        generate the tiny Llama and the tiny DeepSeek-V2-style MLA checkpoint (random weights, no downloads)
  server_start  a kvdrive server with bench/e2e_bench.py's ``gpu-defaults`` flags: nothing beyond ``--kv-tier kvdrive``
                (CUDA graphs captured, SGLang's default attention backend and page size). If SGLang's defaults do not
                start on this machine, the step fails with the reason and the later server steps run with
                WHEELHOUSE_ARGS (what the lent machines' trimmed SGLang needs, graphs still on), so one failure does
                not spend the hour
  requests      20 greedy requests, 4 long documents x 5 questions interleaved so the device pool (about 2.5
                documents) evicts between reuses: tokens served per tier, kvdrive's store stats, and the outputs
                compared with a radix-only server's (same flags without --kv-tier)
  kernel_tests  ``pytest tests/kernels -m gpu`` (Triton kernels vs torch references)
  page_mass     kvdrive's attention-mass kernel at MLA shapes (1 KV head, 576 dims, 16 and 128 query heads) vs its
                torch reference (on CPU: the Triton kernel under Triton's interpreter, small sizes)
  mla_config    SGLang's ModelConfig reads the MLA checkpoint as MLA with a 576-wide latent
  mla_tp2       the MLA model served with kvdrive at --tp 2 (TP=1 when the machine has one GPU; said in the result)
  fp8           the Llama served with kvdrive and --kv-cache-dtype fp8_e4m3
Results: ``bench/results/gpu-first-device.json`` and ``.md`` on a GPU; on CPU a temp dir unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.bench_common import add_allow_dirty, cpu_model, guard_results
from bench.bench_common import machine as common_machine
from bench.e2e_bench import (
    CPU_DRY_RUN,
    CPU_UNSUPPORTED,
    PRESETS,
    ModelKind,
    Tokenizer,
    make_model,
    server_args,
    text_of,
)
from tests.e2e.server import ServerError, SGLangServer

# What the lent GPU machines' SGLang wheelhouse (../shared/gpu/README.md) needs when SGLang's defaults cannot run
# there: FA3 (Hopper's default attention backend) and flashinfer's JIT sources (the default sampling backend) were
# removed from it, and --mm-feature-transport cpu keeps SGLang from reserving 1 GiB for a CUDA IPC pool. CUDA graphs
# stay on: capturing them with kvdrive's attention capture installed is what the server_start step is for.
WHEELHOUSE_ARGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--mm-feature-transport", "cpu"]
GRAPH_CAPTURED = re.compile(r"capture.*graph.*(end|elapsed)", re.IGNORECASE)
KVDRIVE_RADIX = "source=registered('kvdrive')"  # SGLang built kvdrive's radix cache (tests/e2e/common.py)


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    TIMEOUT = "timeout"


class StepSkipped(Exception):
    """Raised by a step that cannot run here; the message is the reason recorded."""


@dataclass
class StepResult:
    name: str
    status: Status
    seconds: float
    detail: str = ""
    figures: dict = field(default_factory=dict)


@dataclass
class Sizes:
    """Per device: the models, the 20-request workload and the servers' device KV budget."""

    llama: dict
    doc_tokens: int
    question_tokens: int
    max_total_tokens: int  # device pool: about 2.5 documents, so documents are evicted between their reuses
    max_new_tokens: int
    variant_requests: int  # requests sent to each of the MLA and fp8 servers
    page_mass: dict  # batch, tokens per request, page size for the MLA-shape check
    startup_timeout: float
    budget_s: float  # the whole run


SIZES = {
    "cuda": Sizes(
        llama=PRESETS["gpu-defaults"].model,
        doc_tokens=3000,
        question_tokens=24,
        max_total_tokens=8192,
        max_new_tokens=16,
        variant_requests=10,
        page_mass={"batch": 32, "tokens": 4096, "page": 64},
        startup_timeout=240.0,
        budget_s=300.0,
    ),
    "cpu": Sizes(
        llama={},
        doc_tokens=400,
        question_tokens=16,
        max_total_tokens=1024,
        max_new_tokens=8,
        variant_requests=6,
        page_mass={"batch": 2, "tokens": 40, "page": 16},
        startup_timeout=180.0,
        budget_s=170.0,
    ),
}
DOCS, QUESTIONS = 4, 5  # 20 requests


@dataclass
class Step:
    name: str
    box_s: float  # time box on a GPU; CPU boxes scale by cpu_factor
    fn: Callable[[Run], dict]
    cpu_factor: float = 1.0
    optional: bool = False  # run only when its whole box fits in what is left of the budget ("if time allows")
    cpu_skip: str | None = None  # why a CPU cannot run it (recorded as the skip reason in the dry run)


class Run:
    """State shared by the steps: the device, a work dir, generated models, the live servers (stopped on a timeout)
    and the flags every server gets."""

    def __init__(self, device: str, workdir: str):
        self.device, self.workdir = device, workdir
        self.sizes = SIZES[device]
        self.models: dict[str, str] = {}
        self.servers: list[SGLangServer] = []
        self.lock = threading.Lock()
        self.fallback: list[str] = []  # WHEELHOUSE_ARGS once SGLang's defaults failed to start
        self.kvdrive_server: SGLangServer | None = None  # server_start's server, used by the requests step
        self.step_deadline = 0.0
        self.logs = os.path.join(workdir, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def server(self, tag: str, args: list[str], model: str | None = None) -> SGLangServer:
        srv = SGLangServer(
            model or self.models["llama"],
            [*args, *self.fallback],
            log_path=os.path.join(self.logs, f"{tag}.log"),
            max_total_tokens=self.sizes.max_total_tokens,
            startup_timeout=self.sizes.startup_timeout,
            request_timeout=120.0,
            torch_extensions_dir=os.path.join(self.workdir, "torch_ext"),
        )
        with self.lock:
            self.servers.append(srv)
        return srv

    def box_left(self) -> float:
        """Seconds left in the running step's time box (a subprocess's timeout)."""
        return max(1.0, self.step_deadline - time.monotonic())

    def stop(self, srv: SGLangServer, graceful: bool = True) -> None:
        try:
            srv.stop(graceful=graceful)
        finally:
            with self.lock:
                if srv in self.servers:
                    self.servers.remove(srv)

    def stop_all(self) -> None:
        with self.lock:
            live = list(self.servers)
        for srv in live:
            try:
                self.stop(srv, graceful=False)
            except ServerError as e:
                print(f"  could not stop a server: {e}", file=sys.stderr)

    def kvdrive_args(self, preset: str, store: str) -> list[str]:
        p = PRESETS[preset]
        args, _ = server_args("kvdrive", p, self.workdir)
        return [*args[: args.index("--kvdrive-dir") + 1], os.path.join(self.workdir, store)]

    def radix_args(self, preset: str) -> list[str]:
        return server_args("radix", PRESETS[preset], self.workdir)[0]


# ------------------------------------------------------------------------------------------------- workload
def prompts(run: Run) -> list[str]:
    """DOCS documents x QUESTIONS questions, interleaved (doc 0 q 0, doc 1 q 0, ...): each document comes back after
    the others have pushed it out of the device pool, so its prefix is served from host or disk."""
    import random

    tok = Tokenizer(run.models["llama"])
    rng = random.Random(15)
    docs = [text_of(rng, tok, run.sizes.doc_tokens, f"Document {d}:") for d in range(DOCS)]
    return [
        f"{docs[d]}\n{text_of(rng, tok, run.sizes.question_tokens, 'Question:')}"
        for _ in range(QUESTIONS)
        for d in range(DOCS)
    ]


def send_all(srv: SGLangServer, texts: list[str], max_new: int) -> list[dict]:
    out = []
    for t in texts:
        r = srv.generate(t, max_new)
        out.append(
            {
                "ids": r["ids"],
                "prompt_tokens": r["prompt_tokens"],
                "cached": r["cached"],
                **{k: int(r["details"].get(k) or 0) for k in ("device", "host", "storage")},
            }
        )
    return out


def tier_figures(results: list[dict]) -> dict:
    return {
        "requests": len(results),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
        "cached_tokens": sum(r["cached"] for r in results),
        **{f"{k}_tokens": sum(r[k] for r in results) for k in ("device", "host", "storage")},
    }


def kvdrive_stats(store: str) -> dict:
    """``kvdrive stats DIR --json`` (the store's own count of entries and bytes), or the error."""
    cmd = [sys.executable, "-m", "kvdrive_sglang.tier.cli", "stats", store, "--json"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()[-500:]}
    s = json.loads(p.stdout)
    return {k: v for k, v in s.items() if isinstance(v, (int, float, str))}


def log_lines(srv: SGLangServer, pattern: re.Pattern) -> list[str]:
    return [ln.strip()[-200:] for ln in srv.log_text().splitlines() if pattern.search(ln)]


# ------------------------------------------------------------------------------------------------- steps
def step_models(run: Run) -> dict:
    run.models["llama"] = make_model(ModelKind.LLAMA, os.path.join(run.workdir, "llama"), **run.sizes.llama)
    run.models["mla"] = make_model(ModelKind.MLA, os.path.join(run.workdir, "mla"))
    return {"llama": run.sizes.llama or "tests/e2e/tiny_model.py defaults", "mla": "tests/e2e/tiny_mla_model.py"}


def start_checked(run: Run, tag: str, args: list[str], model: str | None = None) -> tuple[SGLangServer, dict]:
    """Start a kvdrive server and check that SGLang built kvdrive's radix cache (and captured graphs on a GPU)."""
    srv = run.server(tag, args, model).start()
    figs = {"start_s": srv.start_seconds, "args": srv.extra_args}
    if KVDRIVE_RADIX not in srv.log_text():
        run.stop(srv, graceful=False)
        raise AssertionError(f"SGLang did not build kvdrive's radix cache (no {KVDRIVE_RADIX} in the log)")
    if run.device == "cuda":
        captured = log_lines(srv, GRAPH_CAPTURED)
        figs["graph_capture"] = captured[:4]
        if not captured:
            run.stop(srv, graceful=False)
            raise AssertionError("no CUDA-graph capture in the server log: graphs are expected on by default")
    else:
        figs["graph_capture"] = "n/a on CPU (SGLang captures no CUDA graphs there)"
    return srv, figs


def step_server_start(run: Run) -> dict:
    args = run.kvdrive_args("gpu-defaults", "store-llama")
    try:
        run.kvdrive_server, figs = start_checked(run, "kvdrive", args)
        return figs
    except (ServerError, AssertionError) as e:
        if run.device != "cuda":
            raise
        first = str(e)
    # SGLang's defaults failed here: the later steps run with what the lent machines' wheelhouse needs
    run.fallback = list(WHEELHOUSE_ARGS)
    shutil.rmtree(os.path.join(run.workdir, "store-llama"), ignore_errors=True)
    try:
        run.kvdrive_server, figs = start_checked(run, "kvdrive-fallback", args)
        note = f"started with {' '.join(WHEELHOUSE_ARGS)} (later steps use them too)"
    except (ServerError, AssertionError) as e:
        note = f"with {' '.join(WHEELHOUSE_ARGS)} too: {str(e)[-1500:]}"
        figs = {}
    raise AssertionError(f"SGLang's defaults failed to start: {first[-2500:]}\nretry {note}") from None


def step_requests(run: Run) -> dict:
    texts = prompts(run)
    srv = run.kvdrive_server
    if srv is None:  # server_start failed: a server of its own
        srv, _ = start_checked(run, "kvdrive-requests", run.kvdrive_args("gpu-defaults", "store-llama"))
    try:
        got = send_all(srv, texts, run.sizes.max_new_tokens)
    finally:
        run.stop(srv)
        run.kvdrive_server = None
    figs = {"kvdrive": tier_figures(got), "store": kvdrive_stats(os.path.join(run.workdir, "store-llama"))}
    ref_srv = run.server("radix", run.radix_args("gpu-defaults")).start()
    try:
        ref = send_all(ref_srv, texts, run.sizes.max_new_tokens)
    finally:
        run.stop(ref_srv)
    same = [a["ids"] == b["ids"] for a, b in zip(got, ref)]
    figs["radix"] = tier_figures(ref)
    figs["identical_outputs"] = f"{sum(same)}/{len(same)}"
    figs["differing_requests"] = [i for i, s in enumerate(same) if not s]
    k = figs["kvdrive"]
    problems = []
    if k["host_tokens"] + k["storage_tokens"] == 0:
        problems.append("no prompt token was served from kvdrive's host or disk tier")
    if not all(same):
        problems.append(f"greedy outputs differ from the radix-only run in requests {figs['differing_requests']}")
    if problems:
        raise AssertionError("; ".join(problems) + f" (figures: {json.dumps(figs)[:1500]})")
    return figs


def step_kernel_tests(run: Run) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:warnings",
        "-p",
        "no:cacheprovider",
        "tests/kernels",
        "-m",
        "gpu",
    ]
    p = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=run.box_left())
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail[0])}
    figs = {"command": " ".join(cmd[2:]), "rc": p.returncode, "summary": tail[0], **counts}
    if p.returncode == 0 and run.device == "cpu" and counts.get("skipped") and not counts.get("passed"):
        raise StepSkipped(f"no CUDA device: {counts['skipped']} GPU tests collected and skipped ({tail[0]})")
    if p.returncode != 0 or not counts.get("passed"):
        raise AssertionError(f"rc {p.returncode}: {tail[0]}\n{(p.stdout + p.stderr)[-3000:]}")
    return figs


def step_page_mass(run: Run) -> dict:
    env = dict(os.environ)
    if run.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # must be set before Triton is imported: a subprocess
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--page-mass-check",
        "--device",
        run.device,
        "--page-mass-sizes",
        json.dumps(run.sizes.page_mass),
    ]
    p = subprocess.run(cmd, cwd=REPO, check=False, capture_output=True, text=True, timeout=run.box_left(), env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise AssertionError(f"rc {p.returncode}\n{(p.stdout + p.stderr)[-3000:]}")
    figs = json.loads(lines[-1])
    bad = [c for c in figs["cases"] if not c["ok"]]
    if bad:
        raise AssertionError(f"Triton vs torch reference out of tolerance: {bad}")
    return figs


def page_mass_check(device: str, sizes: dict) -> dict:
    """Run in a subprocess: page_attention_mass (Triton) vs page_attention_mass_ref at MLA shapes."""
    import torch

    if device == "cpu":
        from tests.kernels.interpret_check import _patch_interpreter_index

        _patch_interpreter_index()
    from kvdrive_sglang.kernels import page_attention_mass, page_attention_mass_ref

    dev = "cuda" if device == "cuda" else "cpu"
    # bf16 is SGLang's MLA cache dtype; Triton's interpreter multiplies bf16 operands' raw bits (interpret_check.py)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    B, L, page = sizes["batch"], sizes["tokens"], sizes["page"]
    g = torch.Generator().manual_seed(576)
    cases = []
    for hq in (16, 128):
        D, slots = 576, B * L + 7
        q = torch.randn(B, hq, D, generator=g).to(dtype).to(dev)
        k = torch.randn(slots, 1, D, generator=g).to(dtype).to(dev)
        r2t = torch.randperm(slots, generator=g)[: B * L].view(B, L).to(torch.int32).to(dev)
        seq_lens = torch.randint(max(1, L // 2), L + 1, (B,), generator=g).to(dev)
        got = page_attention_mass(q, k, r2t, seq_lens, page, impl="triton")
        ref = page_attention_mass_ref(q, k, r2t, seq_lens, page)
        err = (got - ref).abs().max().item()
        sums = got.sum(1)
        case = {
            "q_heads": hq,
            "kv_heads": 1,
            "head_dim": D,
            "batch": B,
            "tokens": L,
            "page": page,
            "dtype": str(dtype).replace("torch.", ""),
            "max_abs_err": err,
            "tol": 2e-3 * hq,
            "row_sum_err": (sums - hq).abs().max().item(),
        }
        case["ok"] = err < case["tol"] and case["row_sum_err"] < 1e-3 * hq
        if dev == "cuda":
            for _ in range(3):
                page_attention_mass(q, k, r2t, seq_lens, page)
            torch.cuda.synchronize()
            t0, n = time.perf_counter(), 20
            for _ in range(n):
                page_attention_mass(q, k, r2t, seq_lens, page)
            torch.cuda.synchronize()
            case["ms_per_call"] = round((time.perf_counter() - t0) / n * 1e3, 3)
        cases.append(case)
    return {"impl": "triton" + (" (interpreter)" if dev == "cpu" else ""), "cases": cases}


def step_mla_config(run: Run) -> dict:
    code = (
        "import json, sys; from sglang.srt.configs.model_config import ModelConfig; m = ModelConfig(sys.argv[1]); "
        "print(json.dumps({'arch': m.attention_arch.name, 'kv_lora_rank': m.kv_lora_rank, "
        "'qk_rope_head_dim': m.qk_rope_head_dim, 'layers': m.num_hidden_layers}))"
    )
    p = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, run.models["mla"]],
        check=False,
        capture_output=True,
        text=True,
        timeout=run.box_left(),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise AssertionError(f"rc {p.returncode}\n{(p.stdout + p.stderr)[-2000:]}")
    figs = json.loads(lines[-1])
    if not figs["arch"].endswith("MLA") or figs["kv_lora_rank"] + figs["qk_rope_head_dim"] != 576:
        raise AssertionError(f"not read as a 576-wide MLA model: {figs}")
    return figs


def variant(run: Run, tag: str, preset: str, model: str, extra_note: str = "") -> dict:
    texts = prompts(run)[: run.sizes.variant_requests]
    args = run.kvdrive_args(preset, f"store-{tag}")
    if "--tp" in args:
        import torch

        n = torch.cuda.device_count() if run.device == "cuda" else 2
        if n < 2:
            i = args.index("--tp")
            args = args[:i] + args[i + 2 :]
            extra_note = f"TP=1: this machine has {n} GPU (--tp 2 needs two)"
    srv, figs = start_checked(run, tag, args, model)
    try:
        got = send_all(srv, texts, run.sizes.max_new_tokens)
    finally:
        run.stop(srv)
    figs.update(tier_figures(got), store=kvdrive_stats(os.path.join(run.workdir, f"store-{tag}")))
    if extra_note:
        figs["note"] = extra_note
    if figs["host_tokens"] + figs["storage_tokens"] == 0:
        raise AssertionError(f"no prompt token was served from kvdrive's host or disk tier: {figs}")
    return figs


def step_mla_tp2(run: Run) -> dict:
    return variant(run, "mla", "gpu-defaults-mla-tp2", run.models["mla"])


def step_fp8(run: Run) -> dict:
    return variant(run, "fp8", "gpu-defaults-fp8", run.models["llama"])


STEPS = [
    Step("models", 60, step_models),
    # on a GPU the first start JIT-compiles SGLang's CUDA kernels (~10 s each, ../shared/gpu/README.md) and captures
    # graphs; the radix-only server in requests finds them compiled
    Step("server_start", 240, step_server_start, cpu_factor=0.75),
    Step("requests", 180, step_requests),
    Step("kernel_tests", 90, step_kernel_tests),
    Step("page_mass", 60, step_page_mass),
    Step("mla_config", 30, step_mla_config),
    Step("mla_tp2", 100, step_mla_tp2, optional=True, cpu_skip=f"{CPU_UNSUPPORTED['mla']}; {CPU_UNSUPPORTED['tp2']}"),
    Step("fp8", 80, step_fp8, optional=True, cpu_skip=CPU_UNSUPPORTED["fp8"]),
]
# On CPU every step but these must pass (tests/bench/test_first_device_dryrun.py); these skip with their reason
CPU_SKIPS = {"kernel_tests"} | {s.name for s in STEPS if s.cpu_skip}  # kernel_tests: no CUDA device


# ------------------------------------------------------------------------------------------------- runner
def run_steps(run: Run, budget_s: float, only: set[str] | None = None) -> list[StepResult]:
    t_end = time.monotonic() + budget_s
    results = []
    for step in STEPS:
        if only and step.name not in only:
            continue
        box = step.box_s * (step.cpu_factor if run.device == "cpu" else 1.0)
        left = t_end - time.monotonic()
        if run.device == "cpu" and step.cpu_skip:
            results.append(StepResult(step.name, Status.SKIP, 0.0, f"CPU: {step.cpu_skip}"))
            continue
        if step.optional and box > left:  # the first steps always run; the variants only if time allows
            results.append(
                StepResult(
                    step.name,
                    Status.SKIP,
                    0.0,
                    f"no time left: {max(left, 0):.0f} s of the "
                    f"{budget_s:.0f} s budget, the step is boxed at {box:.0f} s",
                )
            )
            continue
        results.append(run_one(run, step, box))
        r = results[-1]
        print(f"[{r.status.value:>7}] {r.name} ({r.seconds:.1f} s) {r.detail[:200]}", file=sys.stderr, flush=True)
    return results


def run_one(run: Run, step: Step, box: float) -> StepResult:
    """Run a step in a thread boxed at ``box`` seconds: on a timeout its servers are killed (which ends its
    requests) and the run moves on."""
    out: dict = {}
    run.step_deadline = time.monotonic() + box
    t0 = time.monotonic()

    def body():
        try:
            out["figures"] = step.fn(run) or {}
        except StepSkipped as e:
            out["skip"] = str(e)
        except BaseException as e:  # noqa: BLE001 - a failed step is recorded, never the end of the run
            out["error"] = f"{type(e).__name__}: {e}"

    th = threading.Thread(target=body, name=f"step-{step.name}", daemon=True)
    th.start()
    th.join(box)
    secs = round(time.monotonic() - t0, 1)
    if th.is_alive():
        run.stop_all()
        th.join(30)
        return StepResult(step.name, Status.TIMEOUT, secs, f"did not finish in its {box:.0f} s box")
    if "skip" in out:
        return StepResult(step.name, Status.SKIP, secs, out["skip"])
    if "error" in out:
        if step.name != "server_start":  # a failed server_start may leave no server; the requests step starts one
            run.stop_all()
        return StepResult(step.name, Status.FAIL, secs, out["error"])
    return StepResult(step.name, Status.PASS, secs, figures=out["figures"])


# ------------------------------------------------------------------------------------------------- report
def report(res: dict) -> str:
    lines = [
        f"# First device run ({res['device']})",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}  ",
        f"Commit: {res['commit']}  ",
        f"Date: {res['date']}  ",
        f"Wall time: {res['wall_s']} s of a {res['budget_s']:.0f} s budget",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in res["steps"]:
        detail = s["detail"].replace("\n", " ").replace("|", "/")[:300] or _brief(s["figures"])
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    lines += ["", "Figures per step:", ""]
    for s in res["steps"]:
        if s["figures"]:
            lines.append(f"- {s['name']}: `{json.dumps(s['figures'])[:1200]}`")
    return "\n".join(lines) + "\n"


def _brief(figs: dict) -> str:
    keys = ("start_s", "identical_outputs", "host_tokens", "storage_tokens", "summary", "arch")
    parts = [f"{k} {figs[k]}" for k in keys if k in figs]
    if "kvdrive" in figs:
        k = figs["kvdrive"]
        parts.append(
            f"kvdrive tokens device/host/storage {k['device_tokens']}/{k['host_tokens']}/{k['storage_tokens']}"
        )
    if "cases" in figs:
        parts += [
            f"Hq {c['q_heads']}: err {c['max_abs_err']:.2e}"
            + (f", {c['ms_per_call']} ms" if "ms_per_call" in c else "")
            for c in figs["cases"]
        ]
    return "; ".join(parts)


def machine_line(device: str) -> tuple[str, str]:
    m = common_machine(REPO)
    gpu = ""
    if device == "cuda":
        import torch

        gpu = f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (
        (
            f"{cpu_model()} ({os.cpu_count()} cores){gpu}, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}; SGLang {m['sglang']}, torch {m['torch']}"
        ),
        m["git"],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument(
        "--out",
        help="write <out>.json and <out>.md (default: bench/results/gpu-first-device on cuda, a temp dir on cpu)",
    )
    ap.add_argument("--workdir", help="keep models, stores and server logs here (default: a temp dir, removed)")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default: 300 on cuda, 170 on cpu)")
    ap.add_argument("--steps", help=f"comma-separated subset of {','.join(s.name for s in STEPS)} (models always)")
    ap.add_argument("--page-mass-check", action="store_true", help=argparse.SUPPRESS)  # the page_mass subprocess
    ap.add_argument("--page-mass-sizes", help=argparse.SUPPRESS)
    add_allow_dirty(ap)
    a = ap.parse_args(argv)
    if a.page_mass_check:
        print(json.dumps(page_mass_check(a.device, json.loads(a.page_mass_sizes))))
        return 0
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error(
            "--device cuda needs a CUDA GPU (torch.cuda.is_available() is False here); --device cpu is the dry run"
        )
    if a.device == "cpu" and torch.cuda.is_available():
        ap.error("--device cpu is the dry run for CPU-only machines: the server harness would start GPU servers here")
    names = {s.name for s in STEPS}
    only = set(a.steps.split(",")) | {"models"} if a.steps else None
    if only and only - names:
        ap.error(f"unknown steps {sorted(only - names)}; known: {', '.join(s.name for s in STEPS)}")
    budget = a.budget or SIZES[a.device].budget_s
    tmp_out = None
    if a.out:
        out = a.out
    elif a.device == "cuda":
        out = os.path.join(REPO, "bench", "results", "gpu-first-device")
    else:
        tmp_out = tempfile.mkdtemp(prefix="kvdrive-first-device-")
        out = os.path.join(tmp_out, "first-device-cpu")
    guard_results(out + ".json", REPO, a.allow_dirty)
    workdir = a.workdir or tempfile.mkdtemp(prefix="kvdrive-first-device-work-")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    mach, commit = machine_line(a.device)
    run = Run(a.device, workdir)
    try:
        steps = run_steps(run, budget, only)
    finally:
        run.stop_all()
    res = {
        "device": a.device,
        "machine": mach,
        "commit": commit,
        "command": "python "
        + " ".join(
            shlex.quote(x) for x in [os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])
        ),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget_s": budget,
        "wall_s": round(time.time() - t0, 1),
        "load_average_at_end": os.getloadavg(),
        "cpu_dry_run": CPU_DRY_RUN if a.device == "cpu" else None,
        "fallback_args": run.fallback,
        "steps": [{**asdict(s), "status": s.status.value} for s in steps],
    }
    md = report(res)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(out + ".md", "w") as f:
        f.write(md)
    failed = [s.name for s in steps if s.status in (Status.FAIL, Status.TIMEOUT)]
    if failed:  # the server logs go next to the results (they come back from the GPU machine with them)
        shutil.copytree(run.logs, out + "-logs", dirs_exist_ok=True)
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(md)
    print(f"wrote {out}.json and {out}.md" + (f" (server logs in {out}-logs)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
