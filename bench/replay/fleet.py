"""N replicas of one server configuration behind round-robin routing, with and without kvdrive's shared remote tier
(kvdrive issue 19), in the trace replay.

Each node is one ``Replay`` (its own GPU tree, SGLang host pool and kvdrive DRAM + disk tiers, at the single-node
budgets) and request i of the trace goes to node i mod N, in trace order. With the shared tier, every node's engine
is kvdrive's real ``RemoteTieredEngine`` (write-behind of the pages it writes down, read-through of local misses
verified and promoted into the node's tiers, longest-prefix exists across local and remote tiers), all of them on one
``SharedStore``: an in-process object store with an LRU byte cap standing in for the Mooncake cluster (its transport
is what the replay does not exercise; tests/tier/test_remote.py runs the same engine on a real master). Remote reads
are costed as ``FleetCost`` says: a fixed latency per request plus the objects' (compressed) bytes over the network,
decode at the DRAM tier's measured speed, then PCIe. The network figures are flags (default: batched Mooncake gets
over loopback TCP on these machines, ../shared/notes/mooncake-cpu.md); RDMA moves ~10x the bytes per second.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from cost_model import GB, CostModel, percentile
from workloads import Workload

from kvdrive_sglang.tier.remote import ObjectId, parse_remote
from kvdrive_sglang.tier.remote.tiered import RemoteTieredEngine

from .core import Config, Replay
from .tiers import SyntheticPages

TIERS = ("gpu", "host", "dram", "disk", "remote")


class SharedStore:
    """A RemoteTier (tier/remote) in this process, shared by the replay's nodes: objects kept whole, least recently
    used evicted over ``capacity_bytes`` (a Mooncake segment past its high watermark evicts too)."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.bytes = 0
        self.counts: Counter = Counter()
        self._objects: OrderedDict[ObjectId, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def exists(self, ids: Sequence[ObjectId]) -> list[bool]:
        with self._lock:
            return [i in self._objects for i in ids]

    def get(self, ids: Sequence[ObjectId]) -> list[bytes | None]:
        with self._lock:
            out = []
            for i in ids:
                obj = self._objects.get(i)
                if obj is not None:
                    self._objects.move_to_end(i)
                out.append(obj)
            self.counts["got"] += sum(o is not None for o in out)
            return out

    def put(self, ids: Sequence[ObjectId], objects: Sequence[bytes]) -> None:
        with self._lock:
            for i, obj in zip(ids, objects):
                if i in self._objects:
                    continue
                self._objects[i] = bytes(obj)
                self.bytes += len(obj)
                self.counts["put"] += 1
            while self.bytes > self.capacity and self._objects:
                _, old = self._objects.popitem(last=False)
                self.bytes -= len(old)
                self.counts["evicted"] += 1

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"engine": "in-process (trace replay)", "capacity_bytes": self.capacity}


@dataclass(frozen=True)
class FleetCost(CostModel):
    """CostModel with the shared tier: ``remote_latency_s`` once per request that reads it, the objects' bytes
    (``zstd_ratio`` smaller than the pages) at ``remote_gbps``, decode at the DRAM tier's rate (``dram_rate_gbps``:
    scaled over the decode cores), then PCIe."""

    remote_gbps: float = 1.3
    remote_latency_s: float = 0.0005

    def tier_reload_s(self, tier: str, pages: int) -> float:
        if tier != "remote":
            return super().tier_reload_s(tier, pages)
        if pages <= 0:
            return 0.0
        nbytes = pages * self.page_bytes
        return (
            self.remote_latency_s
            + nbytes / self.zstd_ratio / (self.remote_gbps * GB)
            + nbytes / (self.dram_rate_gbps(pages) * GB)
            + nbytes / (self.pcie_gbps * GB)
        )


def _node_workload(wl: Workload, node: int, nodes: int) -> Workload:
    return wl._replace(requests=wl.requests[node::nodes])


def run_fleet(
    cfg: Config,
    wl: Workload,
    budgets: dict,
    cost: FleetCost,
    knobs,
    tmp: str,
    synth: SyntheticPages,
    nodes: int,
    shared_bytes: int | None,
    progress=None,
) -> dict:
    """Replay ``wl`` over ``nodes`` replicas (round-robin); ``shared_bytes``: the shared tier's capacity in stored
    bytes here (None: no shared tier). Returns the fleet's totals and each node's summary."""
    store = SharedStore(shared_bytes) if shared_bytes is not None else None
    make_engine = None
    if store is not None:
        # generous bounds: the replay's calls never fault (a busy 2-core machine must not turn the tier off)
        spec = parse_remote("mooncake://replay:1", {"timeout_s": 30.0, "put_timeout_s": 60.0, "retry_s": 1.0})

        def make_engine(tc):
            return RemoteTieredEngine(tc, spec, remote=store)

    replays = []
    t0 = time.perf_counter()
    try:
        for i in range(nodes):
            d = os.path.join(tmp, f"node{i}")
            os.makedirs(d, exist_ok=True)
            kw = {"make_engine": make_engine} if make_engine is not None else {}
            replays.append(Replay(cfg, _node_workload(wl, i, nodes), budgets, cost, knobs, d, synth, **kw))
        for j, req in enumerate(wl.requests):
            replays[j % nodes].step(req)
            if progress is not None:
                progress(j + 1)
        for r in replays:
            if r.engine is not None:
                r.engine.flush(timeout=120)
        wall = time.perf_counter() - t0
        per_node = [r.summary(wall) for r in replays]
        remote = [r.engine.remote_stats()._asdict() for r in replays if hasattr(r.engine, "remote_stats")]
    finally:
        for r in replays:
            if r.engine is not None:
                r.engine.close()
            shutil.rmtree(r.dir, ignore_errors=True)
    return fleet_summary(cfg, nodes, replays, per_node, remote, store, wall)


def fleet_summary(cfg: Config, nodes: int, replays: list, per_node: list, remote: list, store, wall: float) -> dict:
    tot = {
        k: sum(s[k] for s in per_node) for k in ("requests", "prompt_tokens", "prefill_tokens", "prefill_tokens_saved")
    }
    ttft = np.concatenate([np.frombuffer(r.ttft, dtype=np.float64) for r in replays if len(r.ttft)])
    scale = replays[0].scale
    out = {
        "configuration": cfg.name,
        "nodes": nodes,
        "shared_tier": store is not None,
        **tot,
        "saved_pct": 100.0 * tot["prefill_tokens_saved"] / max(1, tot["prompt_tokens"]),
        **{f"hit_tokens_{t}": sum(s[f"hit_tokens_{t}"] for s in per_node) for t in TIERS},
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else 0.0,
        # each node queues its own requests (replay.queueing): the fleet's queued TTFTs are all of them together
        "queued_ttft_p50_s": percentile(np.concatenate([np.frombuffer(r.queued_ttft) for r in replays]), 50),
        "queued_ttft_p99_s": percentile(np.concatenate([np.frombuffer(r.queued_ttft) for r in replays]), 99),
        # each node serves its share at once: the fleet's rate is the sum of the nodes' (serial per node)
        "throughput_rps": sum(s["throughput_rps"] for s in per_node),
        "bytes": {
            t: {d: sum(s["bytes"][t][d] for s in per_node) for d in ("read", "written")}
            for t in ("host", "dram", "disk")
        },
        "wall_s": wall,
        "per_node_saved_pct": [round(s["saved_pct"], 2) for s in per_node],
    }
    if store is not None:
        out["bytes"]["remote"] = {
            "read": sum(r["bytes_read"] for r in remote) * scale,
            "written": sum(r["bytes_written"] for r in remote) * scale,
        }
        out["remote"] = {
            "hits": sum(r["hits"] for r in remote),
            "misses": sum(r["misses"] for r in remote),
            "rejected": sum(sum(r["rejected"].values()) for r in remote),
            "faults": sum(sum(r["faults"].values()) for r in remote),
            "write_behind_dropped": sum(sum(r["dropped"].values()) for r in remote),
            "objects_written": store.counts["put"],
            "objects_evicted": store.counts["evicted"],
            "bytes_at_end": store.bytes * scale,
        }
    return out


def fleet_markdown(report: dict) -> str:
    a = report["assumptions"]
    lines = [
        f"# Trace replay: N replicas, round-robin, with and without the shared tier — preset `{report['preset']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Per node: configuration `{report['configuration']}` at the single-node budgets; shared tier: "
        f"{report['shared_frac']:g} x the workload's distinct pages (stored bytes). Remote reads: "
        f"{a['remote_latency_s'] * 1e3:g} ms + compressed bytes at {a['remote_gbps']:g} GB/s "
        f"({a['remote_note']}); prefill {a['prefill_tokens_per_s']:,.0f} tok/s, PCIe {a['pcie_gbps']:g} GB/s "
        "(assumed, as the single-node replay). TTFT is modelled (bench/cost_model.py), not measured.",
        "",
    ]
    for wname, w in report["workloads"].items():
        lines += [
            f"## {wname}: {w['requests']:,} requests, {w['footprint_tokens']:,} distinct tokens",
            "",
            "| nodes | shared tier | prefill tokens | saved | remote hit tokens | TTFT p50 | TTFT p99 | "
            "remote GB read / written | disk GB read |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in w["runs"]:
            rb = r["bytes"].get("remote")
            lines.append(
                f"| {r['nodes']} | {'yes' if r['shared_tier'] else 'no'} | {r['prefill_tokens']:,} | "
                f"{r['saved_pct']:.1f}% | {r['hit_tokens_remote']:,} | {r['ttft_p50_s']:.3f} s | "
                f"{r['ttft_p99_s']:.3f} s | "
                + (f"{rb['read'] / 1e9:,.1f} / {rb['written'] / 1e9:,.1f}" if rb else "-")
                + f" | {r['bytes']['disk']['read'] / 1e9:,.1f} |"
            )
        lines.append("")
    lines += [
        "Bytes are modelled (scaled from the 4 KiB pages moved here to the modelled page); remote bytes are "
        "the verified objects (compressed pages in their envelopes).",
        "",
    ]
    return "\n".join(lines)
