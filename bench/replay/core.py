"""One replay of a trace through one configuration of the cache hierarchy, with its accounting.

    L1   SGLang's RadixCache (replay.gpu.Gpu), always; LRU, or eviction by promoter value.
    L2   optional: HiCache's host pool (replay.tiers.HostTier), write-through.
    L3   optional: SGLang's HiCacheFile (replay.tiers.FileTier) or kvdrive's TierEngine (compressed DRAM pool over the
         LMDB-indexed disk store, in a temp dir), the latter with LRU or the attention-aware promoter.

Without L2 and with kvdrive as L3 this is bench/promoter_bench.py's hierarchy (pages go GPU -> kvdrive); with L2 it
is a HiCache server whose storage backend is HiCacheFile or kvdrive. Every step is one request: match in the tree,
leading hits in L2, then (if at least ``storage_min_pages`` remain) leading hits in L3 read into host slots or
buffers; the request's modelled TTFT (cost_model.CostModel); then the finished request goes into the tree and the
write-through of its new pages down the tiers. Pages are small synthetic bf16 pages standing in for real ones
(replay.tiers.SyntheticPages); bytes are reported both as moved here and scaled to the modelled page size.

Two TTFTs per request (issue 18). No queue: the service time alone (reloads + prefill), as every earlier result
reports it. Queued: the request arrives at its trace time at one GPU serving requests first come first served
(replay.queueing.FifoGpu), so its TTFT is its wait plus its service time, and its reads of the disk share the device
with the write-down's writes and the promoter's prefetch reads (replay.queueing.SharedDisk): the bytes the disk tier
wrote (kvdrive: what its disk store reports written, compaction included, read at each flush of the writer; file
backend: its files) go onto the disk's timeline when the request that wrote them finishes and slow the reads
issued while they drain. The replay's own order of events is unchanged: what each hierarchy hits does not depend on
the modelled times (the writer is still awaited every ``flush_every`` requests).
"""

from __future__ import annotations

import os
import shutil
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
from cost_model import CostModel, percentile
from workloads import Request, Workload, trace_digest

from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.promoter import Promoter, PromoterConfig

from .gpu import Gpu, PromoterStrategy, ReplayError
from .queueing import FifoGpu, SharedDisk
from .tiers import SMALL_SHAPE, FileTier, HostTier, SyntheticPages

TIMELINE_WINDOWS = 60


@dataclass(frozen=True)
class Config:
    name: str
    l2: bool = False  # HiCache host pool in front of L3
    l3: str | None = None  # None, "file" or "kvdrive"
    promoter: bool = False  # kvdrive's attention-aware promoter (kvdrive L3 only)
    attention: bool = True  # feed the (synthetic) attention mass to the promoter
    tier_scores: bool = True  # promoter scores order the kvdrive tiers' eviction (set_scores)
    admit_min_reuse: int | None = None  # promoter admission override
    storage_min_pages: int = 0  # SGLang's prefetch_threshold in pages: shorter storage hits are not fetched


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Replay:
    """``budgets``: gpu_pages, max_request_pages, and as the configuration needs: l2_pages, host_bytes (kvdrive's
    compressed pool, in stored bytes), disk_bytes (kvdrive's store or HiCacheFile's cap, in stored bytes).
    ``knobs``: an object with the promoter settings (half_life_s, prefetch_share, prefetch_tick_s,
    prefetch_window_s, prefetch_candidates), disk_gc_live_ratio, and optionally flush_every (default 1: wait for the
    disk writer after every request)."""

    def __init__(
        self,
        cfg: Config,
        wl: Workload,
        budgets: dict,
        cost: CostModel,
        knobs,
        tmp: str,
        synth: SyntheticPages,
        make_engine=TierEngine,
    ):
        if cfg.promoter and cfg.l3 != "kvdrive":
            raise ReplayError(f"configuration {cfg.name}: the promoter needs kvdrive as L3")
        if cost.page_tokens != wl.page_tokens:
            raise ReplayError(f"cost model pages of {cost.page_tokens} tokens, trace pages of {wl.page_tokens}")
        self.cfg, self.wl, self.budgets, self.cost, self.knobs = cfg, wl, budgets, cost, knobs
        self.pt = wl.page_tokens
        self.clock = Clock()
        pcfg = dict(
            half_life_s=knobs.half_life_s,
            # the same decode scaling as the TTFT model (CostModel.decode_factor), at as many pages as cores
            dram_gbps=cost.dram_rate_gbps(),
            disk_gbps=cost.disk_rate_gbps(),
            disk_latency_s=cost.disk_latency_s,
            pcie_gbps=cost.pcie_gbps,
            prefill_tokens_per_s=cost.prefill_tokens_per_s,
            max_tracked=1 << 22,
        )
        if cfg.admit_min_reuse is not None:
            pcfg["admit_min_reuse"] = cfg.admit_min_reuse
        self.promoter = Promoter(PromoterConfig(**pcfg), clock=self.clock) if cfg.promoter else None
        self.gpu = Gpu(budgets["gpu_pages"], PromoterStrategy(self.promoter) if cfg.promoter else None)
        self.synth = synth
        self.page_bytes = cost.page_bytes  # modelled bytes of one page
        self.scale = self.page_bytes / synth.nbytes  # modelled bytes per byte moved here
        self.dir = os.path.join(tmp, cfg.name)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.host = HostTier(budgets["l2_pages"], synth) if cfg.l2 else None
        self.file = None
        self.engine = None
        self.ns = Namespace(model="bench-8b", kv_dtype="bfloat16", layout="mha", num_layers=1, **SMALL_SHAPE)
        if cfg.l3 == "file":
            if self.host is None:
                raise ReplayError(f"configuration {cfg.name}: the file backend sits behind the host pool (l2)")
            self.file = FileTier(self.dir, budgets["disk_bytes"], self.host)
        elif cfg.l3 == "kvdrive":
            # make_engine: TierEngine, or (bench/replay/fleet.py) a node's engine with a shared remote tier behind it
            self.engine = make_engine(
                TierConfig(
                    path=self.dir,
                    host_bytes=budgets["host_bytes"],
                    disk_bytes=budgets["disk_bytes"],
                    codec="zstd",
                    disk={"gc_live_ratio": knobs.disk_gc_live_ratio},
                    # as the server (KvdriveConfig.write_policy): every page enters the DRAM tier, the admitted go
                    # on to the disk, the rest wait in DRAM and go down on spare bandwidth when DRAM evicts them
                    write_policy="selective" if cfg.promoter else "write_through",
                )
            )
            if self.promoter is not None:
                promoter = self.promoter
                self.engine.admit = lambda ns, key: promoter.admit(key.decode("utf-8"))
        elif cfg.l3 is not None:
            raise ReplayError(f"configuration {cfg.name}: unknown L3 {cfg.l3!r}")
        self.outs = [np.empty_like(synth.numpy[0]) for _ in range(budgets["max_request_pages"])]
        self.gpu_set: set = set()
        self.prefetched: set = set()  # keys brought up by prefetch and not used since
        # promotion candidates, as KvdriveStorage keeps them: pages that left the tier above kvdrive (SGLang's host
        # pool, or the GPU tree without one) since, newest last; pages loaded back up leave the list
        self.spilled: OrderedDict = OrderedDict()
        if self.host is not None and cfg.l3 == "kvdrive":
            self.host.on_evict = self._spill
        self.flush_every = max(1, getattr(knobs, "flush_every", 1))
        self.fifo = FifoGpu()
        self.disk = None  # the disk device's timeline: with an L3 and the device's bandwidth measured
        if cfg.l3 is not None and cost.device_read_gbps > 0 and cost.device_write_gbps > 0:
            self.disk = SharedDisk(
                cost.device_read_gbps, cost.device_write_gbps, getattr(knobs, "disk_write_share", 0.5)
            )
        self.disk_written_seen = 0  # the L3's bytes written (here) already on the disk's timeline
        self.last_tick = None
        self.c = Counter()
        # per request, for TTFT, the timeline and post-hoc re-scoring
        self.ttft = array("d")
        self.nocache = array("d")
        self.queued_ttft = array("d")  # wait + service
        self.wait = array("d")
        self.service = array("d")  # the no-queue TTFT plus what write contention added to its disk read
        self.per_req = {k: array("i") for k in ("prompt", "gpu", "host", "dram", "disk", "remote", "recomputed")}
        self.records = []  # promoter_bench: (prompt pages, gpu hit pages, L3 tiers found "m"/"d" string, reloaded)

    # --- helpers ----------------------------------------------------------------------------------------------------
    def _put(self, keys, with_scores: bool):
        if not keys:
            return
        scores = self.promoter.score_of(keys) if with_scores else None
        self.engine.put_many(self.ns, keys, [self.synth.np_page(int(k)) for k in keys], scores=scores)
        self.c["pages_put"] += len(keys)

    def run(self, progress=None) -> dict:
        t0 = time.perf_counter()
        try:
            for i, req in enumerate(self.wl.requests):
                self.step(req)
                if progress is not None:
                    progress(i + 1)
            wall = time.perf_counter() - t0
            return self.summary(wall)
        finally:
            if self.engine is not None:
                self.engine.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- one request ------------------------------------------------------------------------------------------------
    def step(self, req: Request) -> None:
        cfg, c = self.cfg, self.c
        self.clock.t = req.t
        if self.promoter is not None and self.knobs.prefetch_share > 0:
            self.prefetch(req.t)
        P, O = req.prompt, req.output
        keys = [str(x) for x in P]
        m = self.gpu.match(P)
        g = len(self.gpu.hit(m))
        h = 0
        if self.host is not None:
            h = self.host.leading_hits(P, g)
            if h:
                self.host.load_back(P[g : g + h])
        s = g + h
        tiers, k = [], 0  # L3 tiers of the leading hits after s; k of them reloaded
        if cfg.l3 is not None and len(P) - s > 0 and len(P) - s >= cfg.storage_min_pages:
            if self.file is not None:
                tiers = ["file"] * self.file.exists(P[s:])
                k = len(tiers)
            else:
                n_t = self.engine.exists_many(self.ns, keys[s:])
                if n_t:
                    tiers = self.engine.tiers_of(self.ns, keys[s : s + n_t])
                    if None in tiers:  # evicted between the two calls (the writer thread): a shorter hit
                        tiers = tiers[: tiers.index(None)]
                # the promoter plans a remote page as a disk read, as KvdriveStorage does until it has a remote cost
                k = (
                    self.promoter.plan_prefix(
                        ["disk" if t == "remote" else t for t in tiers], self.pt, self.page_bytes
                    ).reload_pages
                    if self.promoter is not None
                    else len(tiers)
                )
            if k:
                k = self._fetch(P, keys, s, k)
        used = tiers[:k]
        reloads = Counter(used)
        if h:
            reloads["host"] += h
        recompute = len(P) - s - k
        ttft = self.cost.ttft_s(reloads, recompute)
        nocache = self.cost.prefill_s(len(P))
        start = self.fifo.start(req.t)
        contention = self._disk_read(start, reloads) if self.disk is not None else 0.0
        if contention > 0:
            c["disk_reads_slowed"] += 1
        served = self.fifo.finish(req.t, start, ttft + contention)
        self.queued_ttft.append(served.ttft_s)
        self.wait.append(served.wait_s)
        self.service.append(served.service_s)
        self.ttft.append(ttft)
        self.nocache.append(nocache)
        if ttft > nocache * (1 + 1e-9):
            c["slower_than_no_cache"] += 1
        c["requests"] += 1
        c["prompt_pages"] += len(P)
        c["gpu_hit_pages"] += g
        c["host_hit_pages"] += h
        for t in tiers:
            c["found_" + ("dram" if t in ("dram", "queued") else "remote" if t == "remote" else "disk")] += 1
        n_dram = sum(1 for t in used if t in ("dram", "queued"))
        n_remote = sum(1 for t in used if t == "remote")  # the shared tier (fleet.py), read through to this node
        c["used_dram"] += n_dram
        c["used_remote"] += n_remote
        c["used_disk"] += k - n_dram - n_remote
        if self.prefetched:
            for key, t in zip(keys[s : s + k], used):
                if t not in ("disk", "remote") and key in self.prefetched:
                    self.prefetched.discard(key)
                    c["prefetch_used"] += 1
        c["recomputed_pages"] += recompute
        pr = self.per_req
        pr["prompt"].append(len(P))
        pr["gpu"].append(g)
        pr["host"].append(h)
        pr["dram"].append(n_dram)
        pr["disk"].append(k - n_dram - n_remote)
        pr["remote"].append(n_remote)
        pr["recomputed"].append(recompute)
        if self.host is None:
            self.records.append((len(P), g, "".join("d" if t == "disk" else "m" for t in tiers), k))

        # the request ran: into the tree (evicting as needed), then observations and write-down
        full = P + O
        fkeys = keys + [str(x) for x in O]
        if self.promoter is not None:
            self.promoter.observe_access(fkeys, self.pt, self.page_bytes)
            if cfg.attention:
                self.promoter.observe_attention({keys[i]: float(v) for i, v in enumerate(req.mass) if v > 0})
        evicted = self.gpu.insert(m, full)
        self.gpu_set.update(full[g:])
        self.gpu_set.difference_update(evicted)
        c["gpu_evicted_pages"] += len(evicted)
        if self.host is not None:
            self._write_through_host(full)
        elif self.engine is not None:
            self._write_down(full, fkeys, g, len(tiers), evicted)
        if self.engine is not None:
            if self.host is None:
                self._spill(evicted)
            # every request (promoter_bench): the disk holds what was written before the next one; long runs may
            # flush every few requests (pages still queued are read from the queue meanwhile, as in a server)
            if c["requests"] % self.flush_every == 0:
                self.engine.flush(timeout=120)
                if self.disk is not None:
                    self._disk_written(served.finish_s, self.engine.stats().disk.bytes_written)
        elif self.file is not None and self.disk is not None:
            self._disk_written(served.finish_s, self.file.files_written * self.synth.nbytes)

    def _disk_read(self, start: float, reloads: Counter) -> float:
        """The request's read of the disk tier from ``start`` on the shared disk: seconds added by contention."""
        if reloads.get("file"):
            return self.disk.read(start, reloads["file"] * self.page_bytes, self.cost.file_gbps).contention_s
        n = reloads.get("disk", 0)
        if not n:
            return 0.0
        r = self.cost.zstd_ratio  # the device moves stored bytes
        return self.disk.read(start, n * self.page_bytes / r, self.cost.disk_rate_gbps(n) / r).contention_s

    def _disk_written(self, t: float, total_here: int) -> None:
        """The L3 has written ``total_here`` bytes (here) in all: the new ones go onto the disk's timeline at t."""
        new = total_here - self.disk_written_seen
        self.disk_written_seen = total_here
        self.disk.write(t, new * self.scale)

    def _fetch(self, P, keys, s: int, k: int) -> int:
        """Read the k L3 pages after s (into host slots with L2, else into buffers); returns how many arrived."""
        if self.host is not None:
            slots = self.host.alloc(P[s : s + k], keep=self.gpu_set, also=set(P[:s]))
            if len(slots) < k:
                self.c["storage_hits_dropped_no_host_room"] += k - len(slots)
            if self.file is not None:
                got = self.file.fetch(P[s : s + len(slots)], slots)
            else:
                n = len(slots)
                ok = self.engine.get_many(self.ns, keys[s : s + n], self.outs[:n]) if n else []
                got = ok.index(False) if False in ok else n
                if got < n:
                    self.c["vanished"] += 1
                for i in range(got):  # as KvdriveStorage does: decoded into a host buffer, then into the slot
                    self.host.set_page(slots[i], self.outs[i])
            self.host.release(P[s + got : s + len(slots)])  # slots of pages that did not arrive go back
            if got and self.engine is not None:
                self._unspill(keys[s : s + got])
            if got:
                self.host.load_back(P[s : s + got], counted=False)  # on to the GPU; counted as L3 reads, not host hits
            return got
        got = self.engine.get_many(self.ns, keys[s : s + k], self.outs[:k])
        if not all(got):
            k = got.index(False)
            self.c["vanished"] += 1
        self._unspill(keys[s : s + k])
        if k and not np.array_equal(self.outs[0], self.synth.np_page(P[s])):
            raise ReplayError(f"page {P[s]} read back wrong")
        return k

    def _write_through_host(self, full) -> None:
        """HiCache write_through: the new pages of the finished request go to the host pool (and on to L3)."""
        host = self.host
        new = [p for p in full if p not in host.slot]
        written = host.write(new, keep=self.gpu_set) if new else []
        host.touch(full)
        if not written:
            return
        if self.file is not None:
            if not self.file.store_pages(written):
                self.c["file_set_failed"] += 1
            return
        if self.engine is None:
            return
        wkeys = [str(p) for p in written]
        where = self.engine.tiers_of(self.ns, wkeys)
        fresh = [key for key, t in zip(wkeys, where) if t is None]
        if self.promoter is None:
            self._put(fresh, with_scores=False)
            return
        fkeys = [str(p) for p in full]
        held = [key for key, t in zip(fkeys, self.engine.tiers_of(self.ns, fkeys)) if t is not None]
        self._record_request(held, self.promoter.score_of(held, chain=True) if held and self.cfg.tier_scores else None)
        self._put(fresh, with_scores=self.cfg.tier_scores)

    def _write_down(self, full, fkeys, g: int, found: int, evicted) -> None:
        """No L2 (promoter_bench's hierarchy): pages go from the GPU tree straight to kvdrive."""
        if self.promoter is not None:
            wb = [str(x) for x in evicted]
            where = self.engine.tiers_of(self.ns, fkeys + wb)
            held = [key for key, t in zip(fkeys, where) if t is not None]
            new = [key for key, t in zip(fkeys[g:], where[g : len(fkeys)]) if t is None]
            new += [key for key, t in zip(wb, where[len(fkeys) :]) if t is None]  # write-back on tree eviction
            new = list(dict.fromkeys(new))
            scores = None
            if held and self.cfg.tier_scores:
                by_key = dict(zip(fkeys, self.promoter.score_of(fkeys, chain=True)))
                scores = [by_key[key] for key in held]
            self._record_request(held, scores)
            self._put(new, with_scores=self.cfg.tier_scores)
        else:
            rest = fkeys[g + found :]
            self._put(
                [key for key, t in zip(rest, self.engine.tiers_of(self.ns, rest)) if t is None], with_scores=False
            )

    def _record_request(self, held, scores) -> None:
        """The request's pages kvdrive holds, after it ran (as Upkeep.push_scores does in the server): their new
        ``scores`` (with tier_scores), and those the promoter admits now go down from DRAM (selective write-down of
        pages admitted after they were stored; a no-op for pages already on disk)."""
        if not held:
            return
        if self.cfg.tier_scores:
            self.engine.set_scores(self.ns, held, scores)
        self.engine.write_down(self.ns, self.promoter.admitted(held))

    def _spill(self, pids) -> None:
        """Pages that left the tier above kvdrive: promotion candidates (as KvdriveStorage.record_host_evicted)."""
        if self.promoter is None or self.knobs.prefetch_share <= 0:
            return
        sp = self.spilled
        for p in pids:
            k = str(p)
            sp[k] = None
            sp.move_to_end(k)
        while len(sp) > self.knobs.prefetch_candidates:
            sp.popitem(last=False)

    def _unspill(self, keys) -> None:
        """Pages loaded back up (into the host pool, or the GPU without one): no longer candidates."""
        for k in keys:
            self.spilled.pop(k, None)

    def prefetch(self, now: float) -> None:
        """Promotion disk -> kvdrive DRAM ahead of demand, as KvdriveStorage.promote_tick: of the pages that left
        the tier above kvdrive and sit only on disk, the most valuable (Promoter.prefetch, newest first on equal
        value), within prefetch_share of the disk's read bandwidth over the time since the last tick."""
        if self.last_tick is None:
            self.last_tick = now
            return
        window = min(now - self.last_tick, self.knobs.prefetch_window_s)
        if window < self.knobs.prefetch_tick_s:
            return
        self.last_tick = now
        budget = int(self.knobs.prefetch_share * self.cost.disk_rate_gbps() * 1e9 * window)
        cands = list(reversed(self.spilled))
        if not cands or budget < self.page_bytes:
            return
        tiers = self.engine.tiers_of(self.ns, cands)
        self._unspill([k for k, t in zip(cands, tiers) if t != "disk"])  # in memory already, or no longer stored
        picked = self.promoter.prefetch(
            [k for k, t in zip(cands, tiers) if t == "disk"], budget // self.page_bytes * self.page_bytes
        )
        if not picked:
            return
        scores = self.promoter.score_of(picked) if self.cfg.tier_scores else None
        done = self.engine.promote(self.ns, picked, scores)
        self.c["prefetch_skipped_low"] += done.below_floor
        self.c["prefetched_pages"] += done.promoted
        if self.disk is not None and done.promoted:  # background reads on the disk's timeline
            self.disk.prefetch(now, done.promoted * self.page_bytes / self.cost.zstd_ratio)
        if done.promoted:  # which pages came up: those now in the DRAM pool
            up = [k for k, t in zip(picked, self.engine.tiers_of(self.ns, picked)) if t == "dram"]
            self.prefetched.update(up)
            self._unspill(up)

    # --- results ----------------------------------------------------------------------------------------------------
    def timeline(self, windows: int = TIMELINE_WINDOWS) -> dict:
        """Per window of consecutive requests: share of prompt tokens hit in each tier, and the window's end time."""
        n = len(self.ttft)
        edges = np.linspace(0, n, min(windows, n) + 1).astype(int) if n else np.array([0])
        pr = {k: np.frombuffer(v, dtype=np.int32) if len(v) else np.zeros(0, np.int32) for k, v in self.per_req.items()}
        times = [r.t for r in self.wl.requests]
        out = {"t_end_s": [], "requests_end": [], "gpu": [], "host": [], "dram": [], "disk": []}
        for a, b in zip(edges[:-1], edges[1:]):
            if b <= a:
                continue
            tot = max(1, int(pr["prompt"][a:b].sum()))
            out["t_end_s"].append(float(times[b - 1]))
            out["requests_end"].append(int(b))
            for t in ("gpu", "host", "dram", "disk"):
                out[t].append(float(pr[t][a:b].sum()) / tot)
        return out

    def queue_summary(self) -> dict:
        """The queued figures (FIFO GPU at the trace's arrival times, disk shared with the writes)."""
        c, q, f = self.c, self.queued_ttft, self.fifo
        service = float(sum(self.service))
        out = {
            "queued_ttft_p50_s": percentile(q, 50),
            "queued_ttft_p90_s": percentile(q, 90),
            "queued_ttft_p99_s": percentile(q, 99),
            "queued_ttft_mean_s": float(sum(q)) / len(q) if len(q) else 0.0,
            "wait_p50_s": percentile(self.wait, 50),
            "wait_p99_s": percentile(self.wait, 99),
            # at saturation the GPU is never idle: requests / service time (with the disk contention they met)
            "throughput_saturation_rps": c["requests"] / service if service > 0 else 0.0,
            "served_rps": c["requests"] / f.span_s if f.span_s > 0 else 0.0,  # at the trace's arrival rate
            "gpu_busy_pct": 100.0 * f.busy_s / f.span_s if f.span_s > 0 else 0.0,
            "disk_contention_s": 0.0,
            "disk_reads_slowed": c["disk_reads_slowed"],
        }
        d = self.disk
        if d is not None:
            out.update(
                disk_contention_s=d.contention_s,
                disk_backlog_max_s=d.max_backlog_s,
                disk_device_gb_written=d.bytes_written / 1e9,
                disk_device_gb_prefetched=d.bytes_prefetched / 1e9,
            )
        return out

    def summary(self, wall: float) -> dict:
        c = self.c
        tok = self.pt
        prompt = c["prompt_pages"] * tok
        ttft = np.frombuffer(self.ttft, dtype=np.float64) if len(self.ttft) else np.zeros(0)
        out = {
            "configuration": self.cfg.name,
            "trace_digest": trace_digest(self.wl.requests),
            "requests": c["requests"],
            "prompt_tokens": prompt,
            "prefill_tokens": c["recomputed_pages"] * tok,
            "prefill_tokens_saved": prompt - c["recomputed_pages"] * tok,
            "saved_pct": 100.0 * (1 - c["recomputed_pages"] / max(1, c["prompt_pages"])),
            "hit_tokens_gpu": c["gpu_hit_pages"] * tok,
            "hit_tokens_host": c["host_hit_pages"] * tok,
            "hit_tokens_dram": c["used_dram"] * tok,
            "hit_tokens_disk": c["used_disk"] * tok,
            "hit_tokens_remote": c["used_remote"] * tok,
            "hit_tokens_dram_found": c["found_dram"] * tok,
            "hit_tokens_dram_used": c["used_dram"] * tok,
            "hit_tokens_disk_found": c["found_disk"] * tok,
            "hit_tokens_disk_used": c["used_disk"] * tok,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "ttft_mean_s": float(ttft.mean()) if len(ttft) else 0.0,
            "throughput_rps": c["requests"] / float(ttft.sum()) if len(ttft) and ttft.sum() > 0 else 0.0,
            "nocache_ttft_p50_s": percentile(self.nocache, 50),
            "nocache_ttft_p99_s": percentile(self.nocache, 99),
            "nocache_throughput_rps": c["requests"] / max(1e-12, float(sum(self.nocache))),
            "requests_slower_than_no_cache": c["slower_than_no_cache"],
            **self.queue_summary(),
            "gpu_evicted_tokens": c["gpu_evicted_pages"] * tok,
            "wall_s": wall,
            # bytes, modelled (at the model's page bytes; kvdrive's from the bytes it really stored, scaled)
            "bytes": {t: {"read": 0.0, "written": 0.0} for t in ("host", "dram", "disk")},
            "disk_bytes_at_end": 0.0,
            "disk_bytes_at_end_here": 0,
            "timeline": self.timeline(),
        }
        b = out["bytes"]
        if self.host is not None:
            hs = self.host
            l3 = c["used_dram"] + c["used_disk"] + c["used_remote"]  # L3 pages pass through
            b["host"]["read"] = (hs.read + l3) * self.page_bytes
            b["host"]["written"] = (hs.written + l3) * self.page_bytes
            out.update(
                {
                    "host_pool_pages": hs.capacity,
                    "host_pages_written": hs.written,
                    "host_pages_evicted": hs.evicted,
                    "host_writes_refused_full": hs.refused,
                    "storage_hits_dropped_no_host_room": c["storage_hits_dropped_no_host_room"],
                }
            )
        if self.file is not None:
            f = self.file
            b["disk"]["read"] = f.pages_read * self.page_bytes
            b["disk"]["written"] = f.files_written * self.page_bytes
            here = f.disk_bytes()
            out.update(
                {
                    "disk_pages_written": f.files_written,
                    "disk_pages_read": f.pages_read,
                    "disk_evicted_pages": f.files_evicted,
                    "disk_pages_read_never_written": f.read_unwritten,
                    "disk_bytes_at_end_here": here,
                    "disk_bytes_at_end": here * self.scale,
                    "disk_set_failures": c["file_set_failed"],
                }
            )
        if self.engine is not None:
            s = self.engine.stats()
            d = s.disk
            enc_page = self.page_bytes / self.cost.zstd_ratio if self.host is None else None
            mean_enc = s.dram.used_bytes / s.dram.entries if s.dram.entries else self.synth.nbytes
            b["dram"]["read"] = c["used_dram"] * self.page_bytes
            b["dram"]["written"] = c["pages_put"] * mean_enc * self.scale  # encoded bytes into the pool
            b["disk"]["read"] = d.bytes_read * self.scale
            b["disk"]["written"] = d.bytes_written * self.scale
            out.update(
                {
                    "pages_written_down": c["pages_put"],
                    # selective write-down (the engine's counts): stored in DRAM only, and of those, the pages
                    # that left DRAM unadmitted and were dropped (disk busy or full) or written on spare bandwidth
                    "pages_not_admitted": s.not_admitted,
                    "not_admitted_dropped": s.not_admitted_dropped,
                    "not_admitted_spilled": s.not_admitted_spilled,
                    "disk_pages_written": d.pages_written,
                    "disk_pages_read": d.hits,
                    "prefetched_pages": c["prefetched_pages"],
                    "prefetched_pages_used": c["prefetch_used"],
                    "disk_evicted_pages": d.evicted,
                    "disk_writes_refused_full": d.rejected_full,
                    "disk_segments_compacted": d.segments_compacted,
                    "disk_entries_at_end": d.entries,
                    "disk_live_pct_of_cap_at_end": 100.0 * d.live_bytes / max(1, d.capacity_bytes),
                    "disk_bytes_at_end_here": d.live_bytes,
                    "disk_bytes_at_end": d.live_bytes * self.scale,
                    "dram_dropped_pages": s.dram.dropped,
                    "writedown_dropped": s.writedown_dropped,
                    "vanished_between_lookup_and_read": c["vanished"],
                    "engine_small_bytes_written": d.bytes_written,
                    "engine_small_bytes_read": d.bytes_read,
                }
            )
            if enc_page is not None:  # promoter_bench's figures: pages x modelled page bytes / zstd ratio
                out["disk_gb_written_model"] = d.pages_written * enc_page / 1e9
                out["disk_gb_read_model"] = d.hits * enc_page / 1e9
        return out
