"""Aggregation (median and spread over repetitions), the issue's ratios against their targets, markdown and plots."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from enum import Enum

from bench.serving.sglang_client import Client

METRICS = ("ttft_p50_s", "ttft_p99_s", "e2e_p50_s", "e2e_p99_s", "input_tok_per_s", "req_per_s")
TOKENS = ("prompt_tokens", "computed_tokens", "device_tokens", "host_tokens", "storage_tokens")


class Verdict(str, Enum):
    MET = "met"
    MISSED = "missed"
    NO_DATA = "no data"  # a row the run did not have (a configuration or client left out)


@dataclass(frozen=True)
class Target:
    """One of issue 18's targets: ``numerator / denominator`` of ``metric`` on ``workload`` against ``bound``."""

    name: str
    workload: str
    client: Client
    metric: str
    numerator: str
    denominator: str
    bound: float
    at_most: bool  # True: ratio <= bound is met; False: ratio >= bound is met


TARGETS = (
    Target(
        "large: kvdrive TTFT p50 vs HiCache + file",
        "large",
        Client.GSP,
        "ttft_p50_s",
        "kvdrive",
        "hicache_file",
        0.8,
        True,
    ),
    Target(
        "large: kvdrive TTFT p99 vs HiCache + file",
        "large",
        Client.GSP,
        "ttft_p99_s",
        "kvdrive",
        "hicache_file",
        1.0,
        True,
    ),
    Target(
        "large: kvdrive input throughput at saturation vs HiCache host-only",
        "large",
        Client.GSP_SATURATION,
        "input_tok_per_s",
        "kvdrive",
        "hicache_host",
        1.2,
        False,
    ),
    Target(
        "fit: kvdrive TTFT p50 vs HiCache host-only",
        "fit",
        Client.GSP,
        "ttft_p50_s",
        "kvdrive",
        "hicache_host",
        1.05,
        True,
    ),
)
RESTART_BOUND = 0.5  # TTFT after a restart <= 0.5x cold


def median_spread(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate(reps: list[dict]) -> dict:
    """Per metric and token count: median, min and max over the repetitions' summaries."""
    return {k: median_spread([r[k] for r in reps]) for k in (*METRICS, *TOKENS)}


def ratio(results: dict, workload: str, client: Client, metric: str, num: str, den: str) -> float | None:
    try:
        a = results[workload][num]["clients"][client.value]["aggregate"][metric]["median"]
        b = results[workload][den]["clients"][client.value]["aggregate"][metric]["median"]
    except KeyError:
        return None
    if a is None or not b:
        return None
    return a / b


def verdicts(results: dict) -> list[dict]:
    out = []
    for t in TARGETS:
        r = ratio(results, t.workload, t.client, t.metric, t.numerator, t.denominator)
        v = (
            Verdict.NO_DATA
            if r is None
            else Verdict.MET
            if (r <= t.bound if t.at_most else r >= t.bound)
            else (Verdict.MISSED)
        )
        out.append(
            {
                "target": t.name,
                "ratio": r,
                "bound": ("<= " if t.at_most else ">= ") + f"{t.bound:g}",
                "verdict": v.value,
            }
        )
    for w, configs in results.items():
        for c, row in configs.items():
            rs = row.get("restart")
            if rs and rs.get("ratio") is not None:
                ok = rs["ratio"] <= RESTART_BOUND
                out.append(
                    {
                        "target": f"{w}: {c} TTFT p50 after restart vs cold",
                        "ratio": rs["ratio"],
                        "bound": f"<= {RESTART_BOUND:g}",
                        "verdict": (Verdict.MET if ok else Verdict.MISSED).value,
                    }
                )
    return out


def _cell(a: dict, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    if a["median"] is None:
        return "n/a"
    m = fmt.format(a["median"] * scale)
    if a["n"] > 1:
        return f"{m} ({fmt.format(a['min'] * scale)}-{fmt.format(a['max'] * scale)})"
    return m


def markdown(run: dict) -> str:
    lines = [
        f"# Serving bench (SGLang's bench_serving + agent client) — preset `{run['preset']}`",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {run['machine_line']}  ",
        f"Date: {run['date']}; wall time {run.get('wall_s', '?')} s",
        "",
        f"Budget: {run['budget_line']}.",
        "",
        f"Servers: {run.get('server_env_note') or 'torch default threads (before SERVER_ENV existed)'}.",
        "",
        (
            f"Neighbour: {run['neighbour']['work']}, {run['neighbour']['processes']} processes, "
            f"{run['neighbour']['cpu_share_of_machine']:.0%} of the machine's CPU over the run."
            if run.get("neighbour")
            else "Neighbour: none (idle apart from the servers and the clients; see the load average above)."
        ),
        "",
        f"Clients: {run['clients_note']}",
        "",
        "Each cell: median over the repetitions (a new prompt seed each, so each is cold), min-max in brackets. "
        "TTFT and E2E in seconds, input tokens/s; tokens per tier summed over a repetition's requests (median). "
        "The agent client's figures cover the rounds after the first (those that can reuse their history).",
    ]
    for w, configs in run["results"].items():
        spec = run["workloads"][w]
        lines += ["", f"## Workload `{w}`", "", spec["note"], ""]
        clients = [c for c in run["clients"] if any(c in r["clients"] for r in configs.values())]
        for c in clients:
            lines += [
                f"### {c}",
                "",
                "| configuration | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | input tok/s | prompt tokens | computed | "
                "device | host | storage |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for name, row in configs.items():
                if c not in row["clients"]:
                    continue
                a = row["clients"][c]["aggregate"]
                tok = [_cell(a[k], fmt="{:.0f}") for k in TOKENS]
                lines.append(
                    f"| {name} | {_cell(a['ttft_p50_s'])} | {_cell(a['ttft_p99_s'])} | {_cell(a['e2e_p50_s'])} | "
                    f"{_cell(a['e2e_p99_s'])} | {_cell(a['input_tok_per_s'], fmt='{:.0f}')} | " + " | ".join(tok) + " |"
                )
            lines.append("")
        restarts = {n: r["restart"] for n, r in configs.items() if r.get("restart")}
        if restarts:
            lines += [
                "Restart: the server stopped (gracefully) and started again on the same stores, then the last "
                "repetition's gsp prompts sent again (same seed); cold = that repetition's first pass.",
                "",
                "| configuration | TTFT p50 cold | TTFT p50 after restart | restart / cold | "
                "storage tokens after restart |",
                "|---|---|---|---|---|",
            ]
            for n, rs in restarts.items():
                lines.append(
                    f"| {n} | {rs['cold_ttft_p50_s']:.3f} | {rs['summary']['ttft_p50_s']:.3f} | "
                    f"{rs['ratio']:.2f} | {rs['summary']['storage_tokens']} |"
                )
            lines.append("")
        kv = {n: r["kvdrive_tiers"] for n, r in configs.items() if r.get("kvdrive_tiers")}
        for n, t in kv.items():
            lines.append(f"kvdrive's own count over that server's life ({n}, pages): {t['line']}")
        loaded = {n: r["prefetch_loaded"] for n, r in configs.items() if r.get("prefetch_loaded")}
        if loaded:
            # storage tokens that reached requests, every client and repetition of that server
            used = {
                n: sum(rep["summary"]["storage_tokens"] for c in configs[n]["clients"].values() for rep in c["reps"])
                for n in loaded
            }
            lines.append(
                "Prefetched from storage into SGLang's host pool (its log, the whole run) / storage tokens that "
                "reached requests: "
                + "; ".join(f"{n} {p['tokens']} / {used[n]} ({p['prefetches']} prefetches)" for n, p in loaded.items())
            )
        pools = {n: r.get("host_pool_tokens") for n, r in configs.items()}
        lines.append(
            "Host pool SGLang allocated (tokens, from its log): "
            + ", ".join(f"{n} {v if v is not None else 'none'}" for n, v in pools.items())
        )
    lines += ["", "## Targets (issue 18; reported, the workload not tuned to them)", ""]
    lines += ["| target | ratio | bound | verdict |", "|---|---|---|---|"]
    for v in run["verdicts"]:
        r = "n/a" if v["ratio"] is None else f"{v['ratio']:.2f}"
        lines.append(f"| {v['target']} | {r} | {v['bound']} | {v['verdict']} |")
    if run.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in run["plots"])]
    return "\n".join(lines) + "\n"


def plots(run: dict, out: str) -> list[str]:
    """TTFT p50 by configuration (gsp and agent clients) and tokens per tier; [] and one line without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')", flush=True)
        return []
    made = []
    ws = list(run["results"])
    clients = list(run["clients"])
    fig, axes = plt.subplots(len(ws), len(clients), figsize=(4 * len(clients), 3.2 * len(ws)), squeeze=False)
    for i, w in enumerate(ws):
        for j, c in enumerate(clients):
            ax = axes[i][j]
            rows = {
                n: r["clients"][c]["aggregate"]["ttft_p50_s"] for n, r in run["results"][w].items() if c in r["clients"]
            }
            names = list(rows)
            med = [rows[n]["median"] or 0 for n in names]
            err = [
                [m - (rows[n]["min"] or m) for n, m in zip(names, med)],
                [(rows[n]["max"] or m) - m for n, m in zip(names, med)],
            ]
            ax.bar(range(len(names)), med, yerr=err, color="#4c72b0", capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_title(f"{w} / {c}: TTFT p50 (s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out + "-ttft.png", dpi=110)
    plt.close(fig)
    made.append(out + "-ttft.png")

    colors = {
        "computed_tokens": "#999999",
        "device_tokens": "#4c72b0",
        "host_tokens": "#55a868",
        "storage_tokens": "#c44e52",
    }
    fig, axes = plt.subplots(len(ws), len(clients), figsize=(4 * len(clients), 3.2 * len(ws)), squeeze=False)
    for i, w in enumerate(ws):
        for j, c in enumerate(clients):
            ax = axes[i][j]
            names = [n for n, r in run["results"][w].items() if c in r["clients"]]
            bottom = [0.0] * len(names)
            for k, col in colors.items():
                vals = [run["results"][w][n]["clients"][c]["aggregate"][k]["median"] or 0 for n in names]
                ax.bar(range(len(names)), vals, bottom=bottom, color=col, label=k.replace("_tokens", ""))
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_title(f"{w} / {c}: prompt tokens by tier", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + "-tiers.png", dpi=110)
    plt.close(fig)
    made.append(out + "-tiers.png")
    return made
