"""SGLang's own benchmark client, ``python -m sglang.bench_serving``, run as a subprocess against one server.

Its ``generated-shared-prefix`` dataset (SGLang 0.5.23: ``--gsp-*``) makes G system prompts shared by P questions each;
``--gsp-group-distribution zipf`` draws each request's group with Zipf popularity, ``--gsp-num-turns`` turns every
prompt into a conversation that the chat backend replays round by round (each round's prompt is the whole history),
and ``--cache-report`` reads each response's cached tokens by tier (device / host / storage). We read its JSON result
(``--output-file`` with ``--output-details``), not its printout. The runs for one server go through one worker
process (bench/serving/bs_worker.py) that calls bench_serving's own ``cli_main`` with each run's arguments, exactly
as ``python -m sglang.bench_serving ARGS`` does, paying its imports once.

What 0.5.23's client lacks, and how the runner covers it: multi-turn runs only on a chat backend (sglang-oai-chat),
whose per-round cached tokens come from the ``sglext`` block; there is no flush between rounds (our agent client,
bench/serving/agent.py, does that); ``--gsp-num-turns`` cannot use ``--tokenize-prompt``, so multi-turn prompts are
text re-tokenised by the server.

SGLang's benchmark package imports Hugging Face ``datasets`` at module level for its MMMU loader alone. Where that
package is not installed, the subprocess gets ``bench/serving/shim/`` on its PYTHONPATH: a ``datasets`` module whose
only function raises (nothing here loads MMMU); the result records which one ran (``hf_datasets``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from enum import Enum

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "shim")


class Client(str, Enum):
    """The closed set of clients a run drives."""

    GSP = "gsp"  # bench_serving generated-shared-prefix, Zipf groups, open loop at the workload's rate
    GSP_SATURATION = "gsp_saturation"  # the same dataset at --request-rate inf: input throughput at saturation
    GSP_MULTITURN = "gsp_multiturn"  # bench_serving --gsp-num-turns on the chat backend
    AGENT = "agent"  # bench/serving/agent.py: conversations in rounds, /flush_cache between rounds


BENCH_SERVING_CLIENTS = (Client.GSP, Client.GSP_SATURATION, Client.GSP_MULTITURN)


class ClientError(RuntimeError):
    """A client run that produced no usable result (its log tail is in the message)."""


@dataclass(frozen=True)
class Workload:
    """One workload size. Token counts are in the served model's tokenizer."""

    groups: int  # gsp: system prompts
    per_group: int  # gsp: questions per system prompt (requests = groups x per_group)
    system_tokens: int
    question_tokens: int
    output_tokens: int
    zipf_alpha: float
    rate: float  # gsp: open-loop requests per second
    mt_groups: int  # gsp multi-turn: system prompts; conversations = mt_groups x mt_per_group
    mt_per_group: int
    mt_turns: int
    agent_conversations: int
    agent_rounds: int
    agent_first_tokens: int  # agent: the first round's prompt
    agent_turn_tokens: int  # agent: what each later round appends besides the previous answer

    def working_set_tokens(self, client: Client) -> int:
        """Distinct prompt tokens the client sends (an upper bound for Zipf draws, which may skip cold groups)."""
        if client in (Client.GSP, Client.GSP_SATURATION):
            return self.groups * self.system_tokens + self.groups * self.per_group * self.question_tokens
        if client is Client.GSP_MULTITURN:
            conv = self.mt_groups * self.mt_per_group
            return self.mt_groups * self.system_tokens + conv * self.mt_turns * (
                self.question_tokens + self.output_tokens
            )
        return self.agent_conversations * (
            self.agent_first_tokens + (self.agent_rounds - 1) * (self.agent_turn_tokens + self.output_tokens)
        )

    def requests(self, client: Client) -> int:
        if client in (Client.GSP, Client.GSP_SATURATION):
            return self.groups * self.per_group
        if client is Client.GSP_MULTITURN:
            return self.mt_groups * self.mt_per_group * self.mt_turns
        return self.agent_conversations * self.agent_rounds


def hf_datasets_installed() -> bool:
    return importlib.util.find_spec("datasets") is not None


def command(url: str, model: str, w: Workload, client: Client, seed: int, out_file: str) -> list[str]:
    """The ``sglang.bench_serving`` command line for one run (python -W ignore: its deprecation notice is noise)."""
    common = [
        "--base-url",
        url,
        "--model",
        model,
        "--tokenizer",
        model,
        "--dataset-name",
        "generated-shared-prefix",
        "--gsp-system-prompt-len",
        str(w.system_tokens),
        "--gsp-question-len",
        str(w.question_tokens),
        "--gsp-output-len",
        str(w.output_tokens),
        "--seed",
        str(seed),
        "--cache-report",
        "--output-file",
        out_file,
        "--output-details",
        "--warmup-requests",
        "0",  # its warm-up sends the run's first prompt, which would then be cached: the runner warms up instead
        "--disable-tqdm",
    ]
    if client is Client.GSP_MULTITURN:
        specific = [
            "--backend",
            "sglang-oai-chat",
            "--gsp-num-groups",
            str(w.mt_groups),
            "--gsp-prompts-per-group",
            str(w.mt_per_group),
            "--gsp-num-turns",
            str(w.mt_turns),
            "--request-rate",
            str(w.rate),
        ]
    elif client in (Client.GSP, Client.GSP_SATURATION):
        specific = [
            "--backend",
            "sglang",
            "--tokenize-prompt",  # exact token counts and exact shared prefixes (token ids, not re-tokenised text)
            "--gsp-num-groups",
            str(w.groups),
            "--gsp-prompts-per-group",
            str(w.per_group),
            "--gsp-group-distribution",
            "zipf",
            "--gsp-zipf-alpha",
            str(w.zipf_alpha),
            "--request-rate",
            "inf" if client is Client.GSP_SATURATION else str(w.rate),
        ]
    else:
        raise ValueError(f"{client.value} is not a bench_serving client")
    return [sys.executable, "-W", "ignore", "-m", "sglang.bench_serving", *specific, *common]


PREFIX = ["-W", "ignore", "-m", "sglang.bench_serving"]  # what command() puts between the interpreter and ARGS


class Worker:
    """One bench_serving process for a server's runs (bench/serving/bs_worker.py: SGLang's own ``cli_main`` per
    job, imported once). ``run`` takes a ``command()`` line, runs its ARGS there and returns bench_serving's last
    JSON line from ``--output-file``; a failure, or no answer in ``timeout`` s, is a ClientError with the log's
    tail (and the worker is ended)."""

    def __init__(self, scratch: str, log_path: str):
        self.scratch, self.log_path = scratch, log_path
        self.proc: subprocess.Popen | None = None
        self.jobs = 0

    def start(self) -> Worker:
        env = dict(os.environ)
        env["HOME"] = self.scratch  # its generated-prompt cache (~/.cache/sglang/benchmark) stays in the scratch
        env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        if not hf_datasets_installed():
            env["PYTHONPATH"] = os.pathsep.join([SHIM] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        os.makedirs(self.scratch, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-W", "ignore", os.path.join(HERE, "bs_worker.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                cwd=self.scratch,
                text=True,
            )
        return self

    def run(self, cmd: list[str], timeout: float) -> dict:
        if cmd[1 : 1 + len(PREFIX)] != PREFIX:
            raise ValueError(f"not a command() line: {cmd[:6]}")
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        out_file = cmd[cmd.index("--output-file") + 1]
        self.jobs += 1
        with open(self.log_path, "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
        self.proc.stdin.write(json.dumps({"id": self.jobs, "argv": cmd[1 + len(PREFIX) :]}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        reply = self.proc.stdout.readline() if ready else ""
        if not reply:
            self.stop()
            why = f"no answer in {timeout:.0f} s" if not ready else "its process ended"
            raise ClientError(f"bench_serving: {why} (log {self.log_path})\n{_tail(self.log_path)}")
        rc = json.loads(reply)["rc"]
        if rc != 0 or not os.path.exists(out_file):
            raise ClientError(f"bench_serving exited rc={rc} (log {self.log_path})\n{_tail(self.log_path)}")
        with open(out_file) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if not lines:
            raise ClientError(
                f"bench_serving wrote nothing to {out_file} (log {self.log_path})\n{_tail(self.log_path)}"
            )
        return json.loads(lines[-1])

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            p.stdin.close()  # its loop ends at EOF
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()  # only this worker, by its own handle
                p.wait(15)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def summarise(r: dict) -> dict:
    """One bench_serving result -> the runner's figures (seconds, tokens/s) and tokens by tier.

    Tiers are summed from the per-request ``cached_tokens_details`` (device / host / storage); ``cache_report`` is
    bench_serving's own sum of the same, kept beside them so the two can be checked against each other."""
    details = r.get("cached_tokens_details") or []
    errors = [e for e in r.get("errors") or [] if e]
    tiers = {t: sum(int((d or {}).get(t) or 0) for d in details) for t in ("device", "host", "storage")}
    report = r.get("cache_report") or {}
    prompt = int(report.get("total_prompt_tokens") or sum(r.get("input_lens") or []))
    cached = int(report.get("total_cached_tokens") or sum(r.get("cached_tokens") or []))
    return {
        "requests": int(r["completed"]),
        "failed": len(errors),
        "duration_s": r["duration"],
        "ttft_p50_s": r["median_ttft_ms"] / 1000,
        "ttft_p99_s": r["p99_ttft_ms"] / 1000,
        "e2e_p50_s": r["median_e2e_latency_ms"] / 1000,
        "e2e_p99_s": r["p99_e2e_latency_ms"] / 1000,
        "req_per_s": r["request_throughput"],
        # multi-turn runs pass bench_serving's metrics no dataset rows (input_requests=None), so its
        # input_throughput is 0 there: the server-reported prompt tokens over the same duration instead
        "input_tok_per_s": r["input_throughput"] or (prompt / r["duration"] if r["duration"] else 0.0),
        "output_tok_per_s": r["output_throughput"],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        **{f"{t}_tokens": v for t, v in tiers.items()},
        "cache_report": report,
        "first_error": errors[0][:300] if errors else None,
    }


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])
    except OSError:
        return ""
