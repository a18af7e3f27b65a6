"""Two real CPU SGLang servers ("nodes") sharing kvdrive's remote tier on one real Mooncake master (kvdrive issue 19).

    python bench/remote_bench.py                        # 3 seeds x 6 documents; results in bench/results/remote-bench
    python bench/remote_bench.py --seeds 1 --docs 2 --out /tmp/rb   # a small check (~5 minutes on 2 loaded cores)

A shared long-document trace is split across the nodes: every document is first asked on node A, then (with another
question) on node B. What is measured is B's time to first token for those documents, three ways, each on a fresh
B with its own empty ``--kvdrive-dir``:

    shared   B with kvdrive's local tiers and the shared tier: the documents A saw are read from Mooncake Store
    local    B with kvdrive's local tiers only (no --kvdrive-remote): nothing cached, B recomputes
    cold     B as SGLang's radix cache alone (no kvdrive at all): the recompute reference, and the greedy outputs
             every other run must equal

Per seed: a master and one Mooncake "storage node" (a client process lending the cluster a segment, as dedicated
store nodes do in a cluster), then A, then each B, one server at a time (A and B lend no memory, so A can stop before
B starts and the B runs see the same machine load). B serves its own copy of the model (another directory, other
mtimes), as a second machine would: its pages match A's only through the remote tier's cross-machine model identity
(kvdrive_sglang/model_identity.py). Bytes moved per tier come from each kvdrive server's /metrics (remote bytes read
and written, disk bytes, DRAM pool usage), read after the metrics' 10 s report tick.

All kvdrive servers run with ``--kvdrive-reload always``: on this tiny CPU model prefilling a document is about as
cheap as reloading its KV, so kvdrive's measured-cost policy (``auto``) would often recompute instead, and the remote
read path, which is what this measures, would go unexercised (tests/e2e/test_server_cpu.py says the same of the
disk tier). With the promoter's ``admit_min_reuse`` 1 (as tests/e2e/test_remote_cpu.py), A's pages are admitted to
its disk, hence written behind to the shared tier, the first time they are seen.

Three seeds (different documents and questions); the report gives each figure's median and its spread (min-max).
Results: ``bench/results/remote-bench.json`` / ``.md`` with the commit, command, machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.bench_common import add_allow_dirty, guard_results, machine  # noqa: E402
from bench.e2e_bench import PRESETS, ModelKind, Tokenizer, make_model, stream_generate, text_of  # noqa: E402
from tests.e2e.common import metric_value  # noqa: E402
from tests.e2e.server import ServerError, SGLangServer  # noqa: E402
from tests.e2e.test_remote_cpu import node_args  # noqa: E402
from tests.tier.mooncake_master import Master  # noqa: E402

CONFIGS = ("shared", "local", "cold")
MODEL = PRESETS["cpu"].model  # prefill-heavy for a CPU model: 4 layers, hidden 1024, 2 KV heads (2 KiB KV / token)
PAGE = 16
MAX_TOTAL_TOKENS = 4096  # the device pool: one document at a time fits
HOLDER_SEGMENT = 512 << 20
METRICS_TICK_S = 10.0  # kvdrive's Reporter interval (kvdrive_sglang/metrics.py)
# the holder: one Mooncake client lending the cluster a segment, until killed
HOLDER = """
import sys, time
from kvdrive_sglang.tier.remote import ObjectId, open_remote, parse_remote
spec = parse_remote(sys.argv[1], {"global_segment_size": int(sys.argv[2]), "local_buffer_size": 16 << 20})
remote = open_remote(spec)
remote.exists([ObjectId(bytes(16), b"probe")])  # connects and mounts the segment
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


# ------------------------------------------------------------------------------------------------- trace
def build_docs(tok: Tokenizer, seed: int, docs: int, doc_tokens: tuple[int, int]) -> list[tuple[str, str, str]]:
    """(document, A's question, B's question) per document: long documents, short questions."""
    rng = random.Random(seed)
    out = []
    for d in range(docs):
        doc = text_of(rng, tok, rng.randint(*doc_tokens), f"Document {seed}-{d}:")
        out.append((doc, text_of(rng, tok, 16, "Question:"), text_of(rng, tok, 16, "Another question:")))
    return out


# ------------------------------------------------------------------------------------------------- processes
class StorageNode:
    """A Mooncake client process lending ``segment`` bytes to the cluster store."""

    def __init__(self, url: str, segment: int, log_path: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, str(segment)],
            stdout=subprocess.PIPE,
            stderr=open(log_path, "ab"),
            text=True,
            cwd=REPO,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.kill()
            raise ServerError(f"the Mooncake storage node did not start (log {log_path})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def kvdrive_flags(store: str, url: str | None) -> list[str]:
    """tests/e2e/test_remote_cpu.py's node flags (reload always, admit at first sight, the shared tier); the nodes
    lend no segment (the storage node holds the objects). ``url`` None: the same without the shared tier."""
    args = node_args(store, url or "mooncake://unused:1", global_segment_size=0) + ["--enable-metrics"]
    if url is None:
        i = args.index("--kvdrive-remote")
        del args[i : i + 4]  # --kvdrive-remote URL --kvdrive-remote-config JSON
    return args


def start_server(name: str, model: str, args: list[str], workdir: str, timeout: float) -> SGLangServer:
    srv = SGLangServer(
        model,
        ["--page-size", str(PAGE), "--context-length", str(MAX_TOTAL_TOKENS), *args],
        log_path=os.path.join(workdir, "logs", f"{name}.log"),
        max_total_tokens=MAX_TOTAL_TOKENS,
        request_timeout=timeout,
        torch_extensions_dir=os.path.join(workdir, "torch_ext"),
    )
    print(f"  [{name}] starting", file=sys.stderr)
    return srv.start()


# ------------------------------------------------------------------------------------------------- metrics
def tier_bytes(srv: SGLangServer) -> dict:
    """Bytes and pages per tier from a kvdrive server's /metrics (0 where a counter never moved)."""

    def v(name: str, label: str) -> float:
        return metric_value(srv, name, label) or 0.0

    return {
        "remote_read_bytes": int(v("kvdrive:remote_bytes_total", 'direction="read"')),
        "remote_written_bytes": int(v("kvdrive:remote_bytes_total", 'direction="written"')),
        "disk_read_bytes": int(v("kvdrive:bytes_total", 'direction="read"')),
        "disk_written_bytes": int(v("kvdrive:bytes_total", 'direction="written"')),
        "dram_used_bytes": int(v("kvdrive:usage_bytes", 'tier="dram"')),
        "hit_pages": {t: int(v("kvdrive:hit_pages_total", f'tier="{t}"')) for t in ("dram", "disk", "remote")},
        "remote_queue_bytes": int(v("kvdrive:usage_bytes", 'tier="remote_queue"')),
        "remote_rejected_pages": int(v("kvdrive:remote_rejected_pages_total", "reason=")),
        "remote_faults": int(v("kvdrive:remote_faults_total", "kind=")),
    }


def settled_tier_bytes(srv: SGLangServer, *, written: bool, timeout: float = 120.0) -> dict:
    """tier_bytes once two report ticks agree (and, with ``written``, the write-behind has written and emptied)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        time.sleep(METRICS_TICK_S + 1)
        now = tier_bytes(srv)
        done = now == last and (not written or (now["remote_written_bytes"] > 0 and not now["remote_queue_bytes"]))
        if done or time.monotonic() > deadline:
            now["settled"] = bool(done)
            return now
        last = now


# ------------------------------------------------------------------------------------------------- one seed
def ask(srv: SGLangServer, prompts: list[str], max_new: int, timeout: float) -> list[dict]:
    """One request at a time (TTFT without queueing), greedy."""
    return [stream_generate(srv.url, p, max_new, timeout) for p in prompts]


def run_seed(seed: int, a_model: str, b_model: str, tok: Tokenizer, opts, workdir: str) -> dict:
    docs = build_docs(tok, seed, opts.docs, tuple(opts.doc_tokens))
    a_prompts = [f"{d}\n{q}" for d, q, _ in docs]
    b_prompts = [f"{d}\n{q}" for d, _, q in docs]
    out: dict = {"seed": seed, "docs": len(docs), "doc_tokens": [tok.count(d) for d, _, _ in docs], "b": {}}
    base = os.path.join(workdir, f"seed{seed}")
    shutil.rmtree(base, ignore_errors=True)  # every B starts with empty local tiers, even in a reused --workdir
    os.makedirs(base)
    master = Master(os.path.join(workdir, "logs", f"master-{seed}.log")).start()
    holder = None
    try:
        holder = StorageNode(master.url, HOLDER_SEGMENT, os.path.join(workdir, "logs", f"holder-{seed}.log"))
        a = start_server(
            f"A-{seed}", a_model, kvdrive_flags(os.path.join(base, "a"), master.url), workdir, opts.timeout
        )
        try:
            out["a"] = {"results": ask(a, a_prompts, opts.max_new, opts.timeout), "start_s": a.start_seconds}
            out["a"]["tiers"] = settled_tier_bytes(a, written=True)  # A's pages reached the shared tier
        finally:
            a.stop(graceful=True)
        for config in opts.configs:
            url = master.url if config == "shared" else None
            args = [] if config == "cold" else kvdrive_flags(os.path.join(base, f"b-{config}"), url)
            b = start_server(f"B-{config}-{seed}", b_model, args, workdir, opts.timeout)
            try:
                row = {"results": ask(b, b_prompts, opts.max_new, opts.timeout), "start_s": b.start_seconds}
                if config != "cold":
                    row["tiers"] = settled_tier_bytes(b, written=False)
                out["b"][config] = row
            finally:
                b.stop(graceful=True)
    finally:
        if holder is not None:
            holder.kill()
        master.kill()
    return out


# ------------------------------------------------------------------------------------------------- report
def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


def summarise(seeds: list[dict], configs: tuple) -> dict:
    """Per configuration, over seeds: the median TTFT of B's requests (median, min-max over seeds), storage-hit
    tokens, outputs equal to cold, and tier bytes."""
    out = {}
    for c in configs:
        rows = [s["b"][c] for s in seeds if c in s["b"]]
        per_seed_ttft = [statistics.median(r["ttft"] for r in row["results"]) for row in rows]
        summary = {
            "ttft_median_s": spread(per_seed_ttft),
            "storage_tokens": spread([sum(r["storage"] for r in row["results"]) for row in rows]),
            "prompt_tokens": spread([sum(r["prompt_tokens"] for r in row["results"]) for row in rows]),
        }
        if "cold" in configs and c != "cold":
            same = [
                sum(x["text"] == y["text"] for x, y in zip(s["b"][c]["results"], s["b"]["cold"]["results"]))
                for s in seeds
            ]
            summary["outputs_equal_cold"] = f"{sum(same)}/{sum(len(s['b'][c]['results']) for s in seeds)}"
        if rows and "tiers" in rows[0]:
            summary["tiers"] = {
                k: spread([row["tiers"][k] for row in rows])
                for k in ("remote_read_bytes", "disk_written_bytes", "disk_read_bytes", "dram_used_bytes")
            }
            summary["tiers"]["remote_hit_pages"] = spread([row["tiers"]["hit_pages"]["remote"] for row in rows])
        out[c] = summary
    a_rows = [s["a"] for s in seeds]
    out["a"] = {
        "ttft_median_s": spread([statistics.median(r["ttft"] for r in row["results"]) for row in a_rows]),
        "remote_written_bytes": spread([row["tiers"]["remote_written_bytes"] for row in a_rows]),
        "disk_written_bytes": spread([row["tiers"]["disk_written_bytes"] for row in a_rows]),
        "settled": all(row["tiers"]["settled"] for row in a_rows),
    }
    return out


def fmt(s: dict, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    if not s:
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)}{unit} ({f.format(s['min'] * scale)}-{f.format(s['max'] * scale)})"


def report(run: dict) -> str:
    s, m = run["summary"], run["machine"]
    configs = [c for c in CONFIGS if c in s]
    lines = [
        "# Shared remote tier: two CPU SGLang servers on one Mooncake master",
        "",
        f"Command: `{m['command']}`  ",
        f"Commit: {m['git']}; SGLang {m['sglang']}, torch {m['torch']}  ",
        f"Machine: {m['cpu']} ({m['cores']} cores), {m['platform']}; load average at start {m['load_avg']}  ",
        f"Date: {m['date']}; wall time {run['wall_s']:.0f} s",
        "",
        (
            f"{len(run['seeds'])} seeds x {run['options']['docs']} documents of {run['options']['doc_tokens'][0]}-"
            f"{run['options']['doc_tokens'][1]} tokens (the e2e bench's `cpu` model: 4 layers, hidden 1024, 2 KiB of "
            f"KV per token; page size {PAGE}). Each document is asked first on node A, then with another question "
            "on node B; B's requests go one at a time. Figures: the median over seeds of each run's median TTFT, "
            "(min-max over seeds). Every kvdrive server runs `--kvdrive-reload always`: on this tiny CPU model a "
            "prefill costs about what a reload does, so the measured-cost policy would often recompute and leave "
            "the remote read path unexercised."
        ),
        "",
        "| B's configuration | TTFT (s) | storage-hit tokens | of prompt tokens | outputs = cold |",
        "|---|---|---|---|---|",
    ]
    for c in configs:
        r = s[c]
        lines.append(
            f"| {c} | {fmt(r['ttft_median_s'])} | {fmt(r['storage_tokens'], digits=0)} | "
            f"{fmt(r['prompt_tokens'], digits=0)} | {r.get('outputs_equal_cold', 'reference')} |"
        )
    if "cold" in s and s["cold"]["ttft_median_s"]:
        cold = s["cold"]["ttft_median_s"]["median"]
        lines += [
            "",
            "TTFT against cold (medians): "
            + ", ".join(f"{c} {s[c]['ttft_median_s']['median'] / cold:.2f}x" for c in configs if c != "cold"),
        ]
    mib = 1 / 2**20
    lines += [
        "",
        "Bytes moved per tier (MiB, median over seeds (min-max)):",
        "",
        "| node | remote read | remote written | disk written | disk read | DRAM pool held | remote hit pages |",
        "|---|---|---|---|---|---|---|",
        (
            f"| A (first sight) | - | {fmt(s['a']['remote_written_bytes'], mib, digits=1)} | "
            f"{fmt(s['a']['disk_written_bytes'], mib, digits=1)} | - | - | - |"
        ),
    ]
    for c in configs:
        t = s[c].get("tiers")
        if t:
            lines.append(
                f"| B {c} | {fmt(t['remote_read_bytes'], mib, digits=1)} | - | "
                f"{fmt(t['disk_written_bytes'], mib, digits=1)} | {fmt(t['disk_read_bytes'], mib, digits=1)} | "
                f"{fmt(t['dram_used_bytes'], mib, digits=1)} | {fmt(t['remote_hit_pages'], digits=0)} |"
            )
    if run.get("b_model_dir") == "its own copy":
        lines += [
            "",
            "B serves its own copy of the model directory (another path, other mtimes), as a second machine would: "
            "its local namespaces differ from A's, and its pages match A's only through the remote tier's "
            "cross-machine model identity (here the SHA-256 of the model's files).",
        ]
    lines += [
        "",
        "The machine is shared and loaded (load average above): compare the rows of one run, not absolute times.",
    ]
    if "shared" in s and not s["shared"]["storage_tokens"].get("max"):
        lines += ["", "WARNING: B's shared runs got no storage hits: the remote tier served nothing (see the logs)."]
    if not s["a"]["settled"]:
        lines += ["", "Note: A's write-behind had not settled within its wait in every seed (see the JSON)."]
    if run.get("dirty_note"):
        lines += ["", run["dirty_note"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, default=3, help="repetitions, each with its own documents and questions")
    ap.add_argument("--docs", type=int, default=6, help="documents per seed")
    ap.add_argument("--doc-tokens", type=int, nargs=2, default=[1024, 1536], metavar=("MIN", "MAX"))
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"B's configurations, of {','.join(CONFIGS)}")
    ap.add_argument("--same-model-dir", action="store_true", help="B serves A's model directory, not its own copy")
    ap.add_argument("--workdir", help="keep models, stores and logs here (default: a temp dir, removed)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "remote-bench"), help="<out>.json/.md")
    ap.add_argument("--dirty-note", default="", help="a line for the report naming the uncommitted files, if any")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    add_allow_dirty(ap)
    opts = ap.parse_args(argv)
    opts.configs = tuple(c for c in opts.configs.split(",") if c)
    bad = [c for c in opts.configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {bad}; known: {', '.join(CONFIGS)}")
    guard_results(opts.out + ".json", REPO, opts.allow_dirty)
    info = machine(REPO)  # at the start: the load before this run's servers
    workdir = opts.workdir or tempfile.mkdtemp(prefix="kvdrive-remote-bench-")
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    t0 = time.time()
    try:
        a_model = os.path.join(workdir, "model-a")
        if not os.path.exists(os.path.join(a_model, "config.json")):
            make_model(ModelKind.LLAMA, a_model, **MODEL)
        b_model = a_model
        if not opts.same_model_dir:  # B's own copy: another path, other mtimes (a second machine's download)
            b_model = os.path.join(workdir, "model-b")
            if not os.path.exists(os.path.join(b_model, "config.json")):
                shutil.copytree(a_model, b_model)
        tok = Tokenizer(a_model)
        seeds = []
        for seed in range(opts.seeds):
            print(f"seed {seed}", file=sys.stderr)
            seeds.append(run_seed(seed, a_model, b_model, tok, opts, workdir))
        run = {
            "machine": info,
            "options": {k: v for k, v in vars(opts).items() if k not in ("allow_dirty",)},
            "model": MODEL,
            "b_model_dir": "A's" if opts.same_model_dir else "its own copy",
            "seeds": seeds,
            "summary": summarise(seeds, opts.configs),
            "wall_s": time.time() - t0,
            "dirty_note": opts.dirty_note,
        }
        md = report(run)
        print(md)
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out + ".json", "w") as f:
            json.dump(run, f, indent=1)
        with open(opts.out + ".md", "w") as f:
            f.write(md)
        print(f"wrote {opts.out}.json and {opts.out}.md", file=sys.stderr)
        return 0
    except ServerError as e:
        print(f"remote bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not opts.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
