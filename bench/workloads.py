"""Seeded trace generators shared by the replay benchmarks (bench/promoter_bench.py, bench/replay_bench.py).

Traces are at page granularity: every id is one 64-token KV page (SGLang's page size), and every boundary in a trace
(document, question, answer, turn) falls on a page boundary, so a radix tree over page ids has the shape and the
evictions of a token-level tree with page_size 64, at 1/64 of the cost. ``args.page_tokens`` (a multiple of 64)
makes a coarser trace for long runs: the same draws, every part rounded up to whole pages of that many tokens.

  docs      D documents of 8K-64K tokens with Zipf popularity; each request = one document + a short question,
            followed by a short answer. Poisson arrivals.
  sessions  S agent sessions sharing a system prompt; each turn appends a user/tool message (prompt = the whole
            history) and an answer; think time between turns; sessions overlap in time.

Both take an object with the size attributes (an argparse namespace) and a seed; the same (sizes, seed) always gives
the same trace.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

PAGE_TOKENS = 64


class Request(NamedTuple):
    t: float
    prompt: list  # page ids, prefix order
    output: list  # page ids of the answer (inserted after decode)
    mass: np.ndarray  # synthetic attention mass per prompt page (sums to 1)


class Workload(NamedTuple):
    name: str
    requests: list
    footprint_pages: int  # distinct pages of prompts and answers
    params: dict
    page_tokens: int = PAGE_TOKENS  # tokens per page id (64 unless the caller asked for a coarser trace)


def _spread(mass: np.ndarray, idx, weight: float) -> None:
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx):
        np.add.at(mass, idx, weight / len(idx))


def _units(args):
    """(page tokens of the trace, tokens -> pages rounded up). Draws are made in 64-token pages whatever the page
    size, so a 64-token trace is the same for every caller and a coarser one has the same documents, turns and
    times, each part rounded up to whole pages."""
    pt = getattr(args, "page_tokens", PAGE_TOKENS)
    if pt < PAGE_TOKENS or pt % PAGE_TOKENS:
        raise ValueError(f"page tokens must be a multiple of {PAGE_TOKENS}, got {pt}")
    return pt, lambda pages64: max(1, -(-pages64 * PAGE_TOKENS // pt))


def docs_workload(args, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 1])
    pt, u = _units(args)
    win = u(8)  # the local attention window: the last 512 tokens
    next_id = 1
    docs = []
    for _ in range(args.docs):
        n = u(int(rng.integers(8192 // PAGE_TOKENS, 65536 // PAGE_TOKENS + 1)))
        hot = rng.choice(np.arange(2, n), size=min(8, n - 2), replace=False)
        docs.append((list(range(next_id, next_id + n)), hot))
        next_id += n
    ranks = rng.permutation(args.docs) + 1
    pop = 1.0 / ranks.astype(np.float64) ** args.zipf
    pop /= pop.sum()
    reqs, t = [], 0.0
    for _ in range(args.doc_requests):
        t += float(rng.exponential(args.doc_gap_s))
        d = int(rng.choice(args.docs, p=pop))
        pages, hot = docs[d]
        q = list(range(next_id, next_id + u(int(rng.integers(1, 4)))))
        next_id += len(q)
        out = list(range(next_id, next_id + u(int(rng.integers(1, 5)))))
        next_id += len(out)
        prompt = pages + q
        n = len(prompt)
        mass = np.zeros(n)
        _spread(mass, [0], 0.14)
        _spread(mass, [1], 0.06)
        _spread(mass, range(n - win, n), 0.30)
        rel = [int(rng.choice(hot)) if rng.random() < 0.7 else int(rng.integers(0, len(pages))) for _ in range(4)]
        _spread(mass, rel, 0.30)
        _spread(mass, range(n), 0.20)
        reqs.append(Request(t, prompt, out, mass))
    return Workload(
        "docs",
        reqs,
        next_id - 1,
        dict(
            docs=args.docs,
            requests=args.doc_requests,
            doc_tokens="8K-64K",
            zipf_s=args.zipf,
            mean_gap_s=args.doc_gap_s,
            question_tokens="64-192",
            answer_tokens="64-256",
            page_tokens=pt,
        ),
        pt,
    )


def sessions_workload(args, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 2])
    pt, u = _units(args)
    win = u(8)
    sys_pages = list(range(1, 1 + u(args.system_pages)))
    next_id = 1 + len(sys_pages)
    reqs = []
    for _ in range(args.sessions):
        t = float(rng.uniform(0, args.session_spread_s))
        history = list(sys_pages)
        turns = []  # page index ranges of the turns, for the attention pattern
        for _ in range(int(rng.integers(args.turns_min, args.turns_max + 1))):
            n_in = u(min(32, 2 + int(rng.exponential(8.0))))
            out_tokens = int(rng.integers(2, 9)) * PAGE_TOKENS
            n_out = u(out_tokens // PAGE_TOKENS)
            start = len(history)
            history = history + list(range(next_id, next_id + n_in))
            next_id += n_in
            prompt = history
            n = len(prompt)
            mass = np.zeros(n)
            _spread(mass, [0], 0.14)
            _spread(mass, [1], 0.06)
            _spread(mass, range(max(0, n - win), n), 0.30)
            recent_from = turns[-1][0] if turns else start
            _spread(mass, range(recent_from, n), 0.30)
            _spread(mass, range(n), 0.20)
            out = list(range(next_id, next_id + n_out))
            next_id += n_out
            reqs.append(Request(t, prompt, out, mass))
            turns.append((start, n + n_out))
            history = history + out
            t += out_tokens / args.decode_tps + float(rng.exponential(args.think_s))
    reqs.sort(key=lambda r: r.t)
    return Workload(
        "sessions",
        reqs,
        next_id - 1,
        dict(
            sessions=args.sessions,
            requests=len(reqs),
            turns=f"{args.turns_min}-{args.turns_max}",
            system_prompt_tokens=args.system_pages * PAGE_TOKENS,
            turn_input_tokens="128-2048",
            answer_tokens="128-512",
            mean_think_s=args.think_s,
            decode_tps=args.decode_tps,
            session_starts_s=f"0-{args.session_spread_s:g}",
            page_tokens=pt,
        ),
        pt,
    )


GENERATORS = {"docs": docs_workload, "sessions": sessions_workload}


def trace_digest(requests) -> str:
    """A short digest of a trace (arrival times and page ids), to show every configuration replayed the same one."""
    h = hashlib.blake2b(digest_size=8)
    for r in requests:
        h.update(np.asarray([r.t], dtype=np.float64).tobytes())
        h.update(np.asarray(r.prompt, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(r.output, dtype=np.int64).tobytes())
    return h.hexdigest()
