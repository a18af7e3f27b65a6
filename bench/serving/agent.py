"""A multi-turn agent client in the style of SGLang's benchmark/hicache/bench_multiturn.py, with a flush per round.

N conversations, R rounds. Round 0 sends each conversation's first prompt; every later round sends the whole history
so far: the previous prompt, the answer the server streamed back, and a new turn (tool observation or user text).
Requests go to SGLang's native ``/generate`` with streaming and ``ignore_eos`` (as bench_multiturn's payload), at
most ``max_parallel`` at a time. Unlike bench_multiturn, the runner flushes the server's cache (``/flush_cache``)
between rounds: the device tree and SGLang's host pool are emptied, so whatever of the history a round reuses comes
from the tiers a flush does not clear (HiCache's file backend, kvdrive's DRAM and disk tiers) or is computed again.
Before each flush it waits ``settle_s`` (an agent's think time): HiCache copies device -> host -> storage behind the
requests, and a flush drops whatever is still in flight (SGLang 0.5.23's UnifiedRadixCache.reset clears its ongoing
write-through and backup maps), so flushing the instant a round ends would measure the flush, not the tiers.
TTFT is the time to the first streamed chunk; cached tokens by tier come from the last chunk's meta_info.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from bench.bench_common import read_generate_stream


@dataclass
class Turn:
    conversation: int
    round: int
    ttft: float
    latency: float
    prompt_tokens: int
    completion_tokens: int
    cached: int
    device: int
    host: int
    storage: int


def generate(url: str, text: str, max_new: int, timeout: float) -> tuple[str, dict, float, float]:
    """One streamed greedy /generate: (output text, last meta_info, TTFT, latency)."""
    body = {
        "text": text,
        "stream": True,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True},
    }
    req = urllib.request.Request(f"{url}/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    last, ttft, latency = read_generate_stream(req, timeout)
    if last is None:
        raise RuntimeError(f"no streamed chunk from {url}/generate")
    return last.get("text", ""), last.get("meta_info") or {}, ttft, latency


def flush(url: str, timeout: float = 60.0) -> None:
    """POST /flush_cache until the server takes it: SGLang refuses (HTTP 400) while requests are still running."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/flush_cache", b"", method="POST"), timeout=30):
                return
        except urllib.error.HTTPError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/flush_cache refused for {timeout:.0f} s: HTTP {e.code}") from e
            time.sleep(0.2)


def run(
    url: str,
    texts,  # callable (rng, tokens, head) -> text of about that many tokens
    *,
    conversations: int,
    rounds: int,
    first_tokens: int,
    turn_tokens: int,
    output_tokens: int,
    seed: int,
    max_parallel: int = 8,
    timeout: float = 600.0,
    flush_between_rounds: bool = True,
    settle_s: float = 1.0,
) -> dict:
    rng = random.Random(seed)
    history = [
        texts(rng, first_tokens, f"Agent {seed}-{c} system: solve task {rng.randrange(10**9)}.")
        for c in range(conversations)
    ]
    turns: list[Turn] = []
    t0 = time.perf_counter()
    for rnd in range(rounds):
        if rnd:
            if flush_between_rounds:
                time.sleep(settle_s)
                flush(url)
            for c in range(conversations):
                kind = rng.choice(("observation", "tool result", "user"))
                history[c] += "\n" + texts(rng, turn_tokens, f"[{kind} {rnd}]")

        def one(c: int, rnd: int = rnd) -> Turn:
            out, m, ttft, lat = generate(url, history[c], output_tokens, timeout)
            history[c] += out
            d = m.get("cached_tokens_details") or {}
            return Turn(
                c,
                rnd,
                ttft,
                lat,
                int(m.get("prompt_tokens", 0)),
                int(m.get("completion_tokens", 0)),
                int(m.get("cached_tokens", 0)),
                int(d.get("device") or 0),
                int(d.get("host") or 0),
                int(d.get("storage") or 0),
            )

        with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, conversations))) as ex:
            turns.extend(ex.map(one, range(conversations)))
    wall = time.perf_counter() - t0
    return {"turns": [asdict(t) for t in turns], "wall_s": wall, "summary": summarise(turns, wall)}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(turns: list[Turn], wall: float) -> dict:
    """Figures over the rounds after the first (those that can reuse their history), plus round 0's TTFT p50."""
    later = [t for t in turns if t.round > 0] or turns
    prompt = sum(t.prompt_tokens for t in later)
    cached = sum(t.cached for t in later)
    return {
        "requests": len(turns),
        "failed": 0,
        "duration_s": wall,
        "ttft_p50_s": _pct([t.ttft for t in later], 0.5),
        "ttft_p99_s": _pct([t.ttft for t in later], 0.99),
        "e2e_p50_s": _pct([t.latency for t in later], 0.5),
        "e2e_p99_s": _pct([t.latency for t in later], 0.99),
        "first_round_ttft_p50_s": statistics.median([t.ttft for t in turns if t.round == 0]),
        "req_per_s": len(turns) / wall,
        "input_tok_per_s": sum(t.prompt_tokens for t in turns) / wall,
        "output_tok_per_s": sum(t.completion_tokens for t in turns) / wall,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "computed_tokens": prompt - cached,
        "device_tokens": sum(t.device for t in later),
        "host_tokens": sum(t.host for t in later),
        "storage_tokens": sum(t.storage for t in later),
        "first_error": None,
    }
