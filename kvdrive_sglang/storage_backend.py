"""kvdrive as SGLang's L3: a ``HiCacheStorage`` (v1 batch API) over the tier engine.

SGLang's host pool stays the uncompressed staging tier for fast host<->GPU copies; behind it this backend puts
kvdrive's compressed DRAM pool and the persistent disk store. SGLang builds it through the ``dynamic`` storage
backend (``--kv-tier kvdrive`` writes that config) as ``KvdriveStorage(storage_config, kwargs)``, then calls
``register_mem_pool_host``; pages move with ``batch_set_v1`` / ``batch_get_v1`` / ``batch_exists`` (keys: SGLang's
chained page hashes; salted per tenant by kvdrive's radix-cache backend).

Pages of different models, dtypes, layouts, page sizes, shapes or TP ranks never meet: every page lives in a
namespace built from the host pool and the storage config (SGLang's own file backend has served wrong output from
keys that lacked the dtype). MLA caches are identical on every TP rank: one namespace for all, written by rank 0.
"""
from __future__ import annotations

import glob
import json
import hashlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import replace
from typing import Any, List, Optional

import numpy as np
import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from .cost_meter import PREFILL, ReloadMeter
from .flags import RELOAD_POLICIES, checked_gil_switch_ms
from .metrics import Reporter, TierMetrics
from .tier.engine import TierConfig, TierEngine
from .tier.errors import ConfigError
from .tier.namespace import Namespace, key_bytes
from .tier.promoter import Promoter, PromoterConfig
from .tier.tenants import split_key

log = logging.getLogger("kvdrive.sglang")

_TORCH_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                 torch.uint8: "uint8", torch.int8: "int8"}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_DTYPES[getattr(torch, _name)] = _name

RADIX_EVENTS = ("device_hit", "host_hit", "storage_hit", "evicted", "written_back", "loaded_back")


def kv_dtype_name(dtype: torch.dtype) -> str:
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"kvdrive cannot store KV pages of dtype {dtype}; supported: "
                          f"{', '.join(_TORCH_DTYPES.values())}") from None


_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.json")


def model_identity(model: str | None) -> str:
    """The model part of the namespace: its name or path, plus (for a local directory) a fingerprint of its config and
    weight files (names, sizes, modification times). Weights replaced in place give a new namespace, never old pages;
    the same weights copied elsewhere miss the store (safe) rather than risk a wrong match."""
    if not model:
        return "unknown-model"
    if not os.path.isdir(model):
        return model
    h = hashlib.blake2b(digest_size=12)
    for pattern in _WEIGHT_GLOBS:
        for f in sorted(glob.glob(os.path.join(model, pattern))):
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cfg = os.path.join(model, "config.json")
    if os.path.exists(cfg):
        with open(cfg, "rb") as fh:
            h.update(fh.read())
    return f"{os.path.abspath(model)}@{h.hexdigest()}"


def namespace_for(config: HiCacheStorageConfig, host_pool, *, tenant: str = "") -> Namespace:
    """Everything that makes this server's pages incompatible with another's, from SGLang's own objects."""
    mla = bool(config.is_mla_model)
    if mla:
        num_heads, head_dim = 1, int(host_pool.kv_lora_rank + host_pool.qk_rope_head_dim)
        tp_rank, tp_size = 0, 1  # every rank holds the same latent cache
    else:
        num_heads, head_dim = int(host_pool.head_num), int(host_pool.head_dim)
        tp_rank, tp_size = int(config.tp_rank), int(config.tp_size)
    extra = {"mem_layout": host_pool.layout, "pp": f"{config.pp_rank}/{config.pp_size}",
             "attn_cp": f"{config.attn_cp_rank}/{config.attn_cp_size}"}
    if config.should_split_heads:
        extra["split_heads_lcm"] = str(config.tp_lcm_size)
    return Namespace(model=model_identity(config.model_name), kv_dtype=kv_dtype_name(host_pool.dtype),
                     layout="mla" if mla else "mha", page_size=int(host_pool.page_size), num_heads=num_heads,
                     head_dim=head_dim, num_layers=int(host_pool.layer_num), tp_rank=tp_rank, tp_size=tp_size,
                     tenant=tenant, extra=tuple(extra.items()))


def tier_config_from(extra: dict | None) -> TierConfig:
    """The ``kvdrive`` section of SGLang's storage extra config -> TierConfig (ConfigError names a bad key)."""
    section = extra.get("kvdrive") if isinstance(extra, dict) else None
    if not isinstance(section, dict) or not section.get("dir"):
        raise ConfigError("the kvdrive storage backend needs {'kvdrive': {'dir': ...}} in "
                          "--hicache-storage-backend-extra-config; use --kv-tier kvdrive, which writes it")
    known = {"dir": "path", "host_bytes": "host_bytes", "disk_bytes": "disk_bytes", "codec": "codec",
             "write_policy": "write_policy", "ttl_s": "default_ttl_s",
             "disk": "disk",  # further disk store options (retry_after_s, map_size, ...), checked by TierConfig
             "tenants": "tenants",  # per-tenant ttl_s / share_as (tier/tenants.py)
             "encrypt": "encrypt"}  # encryption at rest: key file path or "env" (tier/crypto.py)
    unknown = sorted(set(section) - set(known) - {"promoter", "reload", "gil_switch_ms"})
    if unknown:
        raise ConfigError(f"unknown kvdrive storage option(s) {', '.join(unknown)}; known: "
                          f"{', '.join([*known, 'promoter', 'reload', 'gil_switch_ms'])}")
    # SGLang's server writes down selectively by default: only pages the promoter admits reach the disk
    return TierConfig(**{"write_policy": "selective", **{known[k]: v for k, v in section.items() if k in known}})


def reload_policy_from(extra: dict | None) -> str:
    """``{'kvdrive': {'reload': 'auto' | 'always'}}``: whether storage hits are reloaded only where that beats
    recomputing them (auto, the default) or always."""
    section = (extra or {}).get("kvdrive") if isinstance(extra, dict) else None
    policy = (section or {}).get("reload", "auto")
    if policy not in RELOAD_POLICIES:
        raise ConfigError(f"kvdrive reload {policy!r} is not one of {', '.join(RELOAD_POLICIES)}")
    return policy


GIL_SWITCH_MS = 0.5  # default: see gil_switch_s_from


def gil_switch_s_from(extra: dict | None) -> float:
    """``{'kvdrive': {'gil_switch_ms': ...}}``: Python's GIL switch interval for the server process, in ms (0 leaves
    Python's own 5 ms). SGLang's scheduler loop holds the GIL whenever it runs Python (an idle CPU server spins at
    100%), and a HiCache I/O thread that releases the GIL for a read, a decode or a copy may then wait a whole
    interval to get it back, many times per page: storage reloads measured ~9 ms per page at 5 ms against 0.5-1 ms
    at 0.5 ms beside a spinning thread (0.04-0.16 ms uncontended). A shorter interval only costs while another
    thread is runnable, i.e. while the overlap it buys is happening."""
    section = (extra or {}).get("kvdrive") if isinstance(extra, dict) else None
    return checked_gil_switch_ms((section or {}).get("gil_switch_ms", GIL_SWITCH_MS), "kvdrive gil_switch_ms") / 1000


def apply_gil_switch(seconds: float) -> None:
    """Shorten the interpreter's GIL switch interval to ``seconds`` (never lengthen one already shorter)."""
    import sys

    before = sys.getswitchinterval()
    if seconds and seconds < before:
        sys.setswitchinterval(seconds)
        log.info("kvdrive: Python's GIL switch interval %.2f -> %.2f ms, so HiCache's I/O threads get the GIL back "
                 "soon while the scheduler loop runs (set kvdrive gil_switch_ms to change)", before * 1000,
                 seconds * 1000)


def promoter_config_from(extra: dict | None) -> PromoterConfig:
    """``{'kvdrive': {'promoter': {...}}}``: PromoterConfig fields (bandwidths, prefill tokens/s, half-life)."""
    kvdrive = extra.get("kvdrive") if isinstance(extra, dict) else None
    section = (kvdrive.get("promoter") if isinstance(kvdrive, dict) else None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"kvdrive promoter options must be an object, got {section!r}")
    try:
        return PromoterConfig(**section)
    except TypeError as e:
        raise ConfigError(f"kvdrive promoter options: {e}") from None


class KvdriveStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.storage_config = storage_config
        self.tier_config = tier_config_from(storage_config.extra_config)
        self.promoter = Promoter(promoter_config_from(storage_config.extra_config))
        self.reload_policy = reload_policy_from(storage_config.extra_config)
        apply_gil_switch(gil_switch_s_from(storage_config.extra_config))
        self.engine = TierEngine(self.tier_config)
        # selective write-down: a page reaches the disk only once the promoter finds it worth keeping (reused, a
        # conversation's continuation, ...), so disk bandwidth is not spent on one-off prompts
        self.engine.admit = lambda ns, key: self.promoter.admit(key.decode("utf-8", "replace"))
        self._whole_requests = False  # kvdrive's radix cache reports whole requests (record_request)
        self._scored: set[str] = set()  # pages observed since their score was last handed to the engine
        self.ns: Namespace | None = None
        self._tenant_ns: dict[str, Namespace] = {}  # tenant id -> this server's namespace for that tenant
        self.tenants = self.engine.tenants  # the operator's tenant policy (the radix cache reads share_as here)
        self.mem_pool_host = None
        # MLA: every rank has the same cache; SGLang lets rank 0 write, and so do we
        self.read_only = bool(storage_config.is_mla_model and storage_config.tp_rank != 0)
        self._scratch = threading.local()
        self._batched_layout: str | None = None  # host pool layout _to_host scatters in one call (set on register)
        self._events = Counter()
        self._io = Counter()
        self._lock = threading.Lock()
        self.reload_meter = ReloadMeter()
        self._costs_saved: dict | None = None  # measured costs last kept in the store
        self._timing_seen: dict[str, tuple[float, int]] = {}  # tier -> engine (seconds, pages) at the last calibration
        self._reporter: Reporter | None = None
        # Pages that left SGLang's host pool (kvdrive's radix cache reports them), newest last: the candidates the
        # promoter may bring back up from disk into kvdrive's DRAM tier ahead of demand (promote_tick)
        self._spilled: OrderedDict[str, None] = OrderedDict()
        self._last_promote = time.monotonic()
        self._closing = False
        from . import cpu_fallbacks

        log.info("kvdrive: storage backend on %s (DRAM tier %.1f GiB, disk cap %.1f GiB, codec %s, rank %d/%d%s)",
                 self.tier_config.path, self.tier_config.host_bytes / 2**30, self.tier_config.disk_bytes / 2**30,
                 self.tier_config.codec, storage_config.tp_rank, storage_config.tp_size,
                 ", CPU fallbacks for HiCache copies" if cpu_fallbacks.installed() else "")

    # --- SGLang wiring -----------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.ns = namespace_for(self.storage_config, mem_pool_host)
        self.page_size = int(mem_pool_host.page_size)
        page = mem_pool_host.get_dummy_flat_data_page()  # allocates: measured once, not per lookup
        self.page_bytes = int(page.numel() * page.element_size())
        self._batched_layout = _batched_layout(mem_pool_host)
        log.info("kvdrive: namespace %s = %s", self.ns.id.hex()[:16], self.ns.describe())
        self._load_costs()
        if self._reporter is None:
            self._reporter = Reporter(self._tick_stats, _metrics_for(self.storage_config))

    def _page_scratch(self, n: int) -> "_PageScratch":
        """This thread's reusable page buffers for at least ``n`` pages (SGLang calls get from its prefetch I/O
        thread)."""
        sc = getattr(self._scratch, "pages", None)
        if sc is None or sc.cap < n:
            sc = self._scratch.pages = _PageScratch(self.mem_pool_host.get_dummy_flat_data_page(),
                                                    max(n, 2 * sc.cap if sc is not None else 16))
        return sc

    def _page_tokens(self, starts: list[int]) -> torch.Tensor:
        """Host-pool token slots of the pages starting at ``starts``, in page order (a page's slots are contiguous)."""
        return torch.from_numpy((np.asarray(starts, dtype=np.int64)[:, None] + np.arange(self.page_size)).reshape(-1))

    def _from_host(self, starts: list[int]) -> list:
        """The host pool's pages at ``starts`` as flat page buffers (copies): gathered in one call for the layouts
        _to_host scatters in one (see there), numpy byte rows the tiers encode without a torch call per page."""
        host, n, ps = self.mem_pool_host, len(starts), self.page_size
        if self._batched_layout is None or n == 1:
            return [host.get_data_page(s, flat=True).contiguous() for s in starts]
        layers, heads, dim = host.layer_num, host.head_num, host.head_dim
        tokens = self._page_tokens(starts)
        if self._batched_layout == "layer_first":  # [2, layers, n*ps, heads, dim] -> [n, 2, layers, ps, heads, dim]
            got = host.kv_buffer[:, :, tokens].view(2, layers, n, ps, heads, dim).permute(2, 0, 1, 3, 4, 5)
        else:  # page_first: [2, n*ps, layers, heads, dim] -> [n, 2, ps, layers, heads, dim]
            got = host.kv_buffer[:, tokens].view(2, n, ps, layers, heads, dim).permute(1, 0, 2, 3, 4, 5)
        rows = got.reshape(n, -1).view(torch.uint8).numpy()
        return [rows[i] for i in range(n)]

    def _to_host(self, starts: list[int], pages: torch.Tensor) -> None:
        """Copy decoded flat pages (rows of ``pages``) into SGLang's host pool at page starts ``starts``.

        Every torch call lets go of the GIL, and beside SGLang's scheduler loop each one may wait a switch interval
        to get it back: for the MHA host pool's layer_first and page_first layouts all pages go in one scatter
        (about four torch calls a batch instead of two a page); any other pool takes its own per-page copy."""
        host, n, ps = self.mem_pool_host, len(starts), self.page_size
        if self._batched_layout is None or n == 1:
            for s, p in zip(starts, pages):
                host.set_from_flat_data_page(s, p)
            return
        layers, heads, dim = host.layer_num, host.head_num, host.head_dim
        tokens = self._page_tokens(starts)
        if self._batched_layout == "layer_first":  # kv_buffer [2, layers, tokens, heads, dim]
            src = pages.view(n, 2, layers, ps, heads, dim).permute(1, 2, 0, 3, 4, 5)
            host.kv_buffer[:, :, tokens] = src.reshape(2, layers, n * ps, heads, dim)
        else:  # page_first: kv_buffer [2, tokens, layers, heads, dim]
            src = pages.view(n, 2, ps, layers, heads, dim).permute(1, 0, 2, 3, 4, 5)
            host.kv_buffer[:, tokens] = src.reshape(2, n * ps, layers, heads, dim)

    def _page_starts(self, op: str, keys, host_indices) -> list[int]:
        """The host-pool slot of each key's page, checked first (found by tests/sglang/test_fuzz_config.py): a page
        start outside the pool sliced a short page, or wrapped round from the end, and stored it under the key."""
        for k in keys:
            key_bytes(k)  # a bad key is a ConfigError naming it, before any page is read or observed
        ps = self.page_size
        if not (isinstance(host_indices, torch.Tensor) and host_indices.dim() == 1
                and not host_indices.is_floating_point() and not host_indices.is_complex()):
            what = f"a {tuple(host_indices.shape)} {host_indices.dtype} tensor" \
                if isinstance(host_indices, torch.Tensor) else type(host_indices).__name__
            raise ConfigError(f"{op}: host_indices must be a 1-D integer tensor, got {what}")
        if host_indices.numel() < len(keys) * ps:
            raise ConfigError(f"{op}: {len(keys)} keys need {len(keys) * ps} host indices ({ps} per page), "
                              f"got {host_indices.numel()}")
        starts = host_indices[:len(keys) * ps:ps].tolist()
        size = int(self.mem_pool_host.size)
        for s in starts:
            if not 0 <= s <= size - ps or s % ps:
                raise ConfigError(f"{op}: host index {s} is not the start of a page in the host pool "
                                  f"({size} slots, pages of {ps})")
        return starts

    def _require_ns(self) -> Namespace:
        if self.ns is None:
            raise RuntimeError("kvdrive storage used before SGLang registered its host pool")
        return self.ns

    def ns_of(self, key) -> Namespace:
        """The namespace of a page key: a salted request's key carries its tenant id (its last 16 hex digits, see
        radix_backend), and its pages live in this server's namespace with that tenant; other keys in the base one."""
        base = self._require_ns()
        tid = split_key(key)[1]
        if not tid:
            return base
        ns = self._tenant_ns.get(tid)
        if ns is None:
            ns = self._tenant_ns.setdefault(tid, replace(base, tenant=tid))
        return ns

    def _by_tenant(self, keys) -> list[tuple[Namespace, list[int]]]:
        """Positions of ``keys`` per namespace, in first-seen order (one group for a request's batch)."""
        groups: dict[str, tuple[Namespace, list[int]]] = {}
        for i, k in enumerate(keys):
            tid = split_key(k)[1]
            g = groups.get(tid)
            if g is None:
                g = groups[tid] = (self.ns_of(k), [])
            g[1].append(i)
        return list(groups.values())

    def _get(self, keys, outs) -> list[bool]:
        got = [False] * len(keys)
        for ns, idx in self._by_tenant(keys):
            for i, g in zip(idx, self.engine.get_many(ns, [keys[i] for i in idx], [outs[i] for i in idx])):
                got[i] = g
        return got

    def _put(self, keys, pages) -> list[bool]:
        """Store pages (a chain in prefix order) with the promoter's scores as of now: stored unscored (0.0, the
        lowest value) they were the first evicted until the next report tick scored them."""
        ok = [False] * len(keys)
        for ns, idx in self._by_tenant(keys):
            part = [keys[i] for i in idx]
            scores = self.promoter.score_of(part, chain=True)
            for i, o in zip(idx, self.engine.put_many(ns, part, [pages[i] for i in idx], scores=scores)):
                ok[i] = o
        return ok

    # --- v1 batch API (interface_v1) -----------------------------------------------------------------------------
    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        self._require_ns()
        if self.read_only or not keys:
            return [True] * len(keys)
        t0 = time.perf_counter()
        starts = self._page_starts("batch_set_v1", keys, host_indices)
        pages = self._from_host(starts)
        self._observe(keys, use=False)  # before the put: admission sees the page's size and recency
        ok = self._put(keys, pages)
        self._count("set", len(keys), sum(ok), len(keys) * self.page_bytes, t0)
        return ok

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        self._require_ns()
        if not keys:
            return []
        t0 = time.perf_counter()
        starts = self._page_starts("batch_get_v1", keys, host_indices)
        scratch = self._page_scratch(len(keys))
        got = self._get(keys, [scratch.rows[i] for i in range(len(keys))])
        # SGLang uses the leading run of hits: stop copying into the host pool at the first miss
        n = got.index(False) if False in got else len(got)
        if n:
            self._to_host(starts[:n], scratch.pages[:n])
        self._count("get", len(keys), n, n * self.page_bytes, t0)
        if n and self._spilled:
            with self._lock:  # back in SGLang's host pool: no longer a promotion candidate
                for k in keys[:n]:
                    self._spilled.pop(k, None)
        self._observe(keys[:n], use=True)
        self.reload_meter.get_done(keys[0], n)
        return got[:n] + [False] * (len(keys) - n)

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """Leading pages worth loading: held in a kvdrive tier *and* faster to reload than to recompute (the
        promoter's plan over the tiers they sit in), so a slow disk never makes a request slower than no cache."""
        self._require_ns()
        if keys:
            self.reload_meter.exists_called(keys[0], extra_info.prefix_keys if extra_info is not None else None)
            ns = self.ns_of(keys[0])
            # a chain never mixes tenants: the leading run of the first key's tenant is all that can hit
            tid = split_key(keys[0])[1]
            same = next((i for i, k in enumerate(keys) if split_key(k)[1] != tid), len(keys))
            keys = keys[:same]
        else:
            ns = self.ns
        n = self.engine.exists_many(ns, keys)
        if n == 0:
            return 0
        if self.reload_policy == "always":
            return n
        tiers = self.engine.tiers_of(ns, keys[:n])  # all found: exists_many counted them
        plan = self.promoter.plan_prefix(tiers, self.page_size, self.page_bytes)
        if plan.reload_pages < n:
            with self._lock:
                self._io["recompute_pages"] += n - plan.reload_pages
        return plan.reload_pages

    # --- the older per-key API (SGLang uses it when interface_v1 is off) ----------------------------------------
    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None):
        self._require_ns()
        outs = list(target_locations) if target_locations is not None else \
            [torch.empty_like(self.mem_pool_host.get_dummy_flat_data_page(), device="cpu") for _ in keys]
        got = self._get(keys, outs)
        return [o if g else None for o, g in zip(outs, got)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if self.read_only:
            return True
        self._require_ns()
        return all(self._put(keys, [v.contiguous() for v in values]))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> None:
        """Drop this server's pages: its namespace, for every tenant (also those only on disk, from earlier runs)."""
        if self.ns is None:
            return
        base = {k: v for k, v in self.ns.describe().items() if k != "tenant"}
        doomed = {self.ns.id: self.ns, **{ns.id: ns for ns in self._tenant_ns.values()}}
        if self.engine.disk is not None:
            for nid, desc, _, _ in self.engine.disk.namespaces():
                if desc is not None and {k: v for k, v in desc.items() if k != "tenant"} == base:
                    doomed.setdefault(nid, Namespace.from_canonical(json.dumps(desc).encode()))
        for ns in doomed.values():
            self.engine.clear(ns)

    def close(self) -> None:
        self._closing = True
        if self._reporter is not None:
            self._reporter.close()
            self._reporter = None
        self.engine.close()

    # --- kvdrive's own reporting -------------------------------------------------------------------------------
    def record_radix_event(self, kind: str, tokens: int) -> None:
        """Radix-tree events from kvdrive's radix-cache backend: the inputs the promoter will use."""
        if kind not in RADIX_EVENTS:
            raise ValueError(f"unknown radix event {kind!r}; known: {', '.join(RADIX_EVENTS)}")
        with self._lock:
            self._events[kind] += int(tokens)

    def _observe(self, keys: list[str], *, use: bool) -> None:
        """Stores and hits for the promoter (``use``: count it as a reuse); scores reach the tiers at the next
        report tick. With kvdrive's radix cache, the promoter learns from whole requests (record_request) only:
        these calls run on each rank's I/O threads at its own pace, and with several ranks the promoter's state
        must be the same on every rank (it orders their radix trees' evictions)."""
        if not keys:
            return
        if not self._whole_requests:
            # storage-level calls see part of a request: they must not mark chain ends (whole_request=False)
            self.promoter.observe_access(keys, self.page_size, self.page_bytes, whole_request=False, reuse=use)
        with self._lock:
            self._scored.update(keys)

    def expect_whole_requests(self) -> None:
        """kvdrive's radix cache reports every finished request (record_request): from now on storage-level
        calls no longer feed the promoter."""
        self._whole_requests = True

    def record_request(self, keys: list[str]) -> None:
        """A finished request's whole page chain, in prefix order (from kvdrive's radix cache): one access."""
        if not keys or self.mem_pool_host is None:
            return
        self._whole_requests = True
        self.promoter.observe_access(keys, self.page_size, self.page_bytes, whole_request=True)
        with self._lock:
            self._scored.update(keys)

    def record_attention(self, key_mass: dict) -> None:
        """Per-page attention mass of a finished request (from kvdrive's radix cache): the promoter's signal."""
        if not key_mass:
            return
        self.promoter.observe_attention(key_mass)
        with self._lock:
            self._scored.update(key_mass)
            self._io["attention_pages"] += len(key_mass)

    _SPILLED_MAX = 16384  # promotion candidates remembered (keys; the oldest are forgotten first)
    _PROMOTE_WINDOW_S = 30.0  # bandwidth left unused longer ago than this is not saved up

    def record_host_evicted(self, keys: list[str]) -> None:
        """Pages that just left SGLang's host pool (from kvdrive's radix cache): a later request for them reloads
        from kvdrive's tiers, so the valuable ones are worth holding in DRAM rather than only on disk."""
        if not keys:
            return
        with self._lock:
            for k in keys:
                self._spilled[k] = None
                self._spilled.move_to_end(k)
            while len(self._spilled) > self._SPILLED_MAX:
                self._spilled.popitem(last=False)

    def promote_tick(self) -> int:
        """Promotion ahead of demand: bring the most valuable pages that left SGLang's host pool and now sit only
        on disk up into kvdrive's DRAM tier, spending at most ``promote_share`` of the disk's read bandwidth (measured
        or assumed) over the time since the last tick, and only pages whose reload from DRAM beats recomputing
        them and that outrank what the full DRAM pool would evict for them. Runs on the reporter thread, never on
        the scheduler's. Returns pages brought up."""
        now = time.monotonic()
        window, self._last_promote = min(now - self._last_promote, self._PROMOTE_WINDOW_S), now
        share = self.promoter.config.promote_share
        if share <= 0 or self.ns is None or self.engine.disk is None:
            return 0
        budget = int(share * self.promoter.costs()["disk_gbps"][0] * 1e9 * window)
        with self._lock:
            keys = list(reversed(self._spilled))  # newest first: on equal value, the most recently spilled win
        if not keys or budget < self.page_bytes:
            return 0
        promoted, gone, left = 0, [], budget
        for ns, idx in self._by_tenant(keys):
            part = [keys[i] for i in idx]
            tiers = self.engine.tiers_of(ns, part)
            gone += [k for k, t in zip(part, tiers) if t != "disk"]  # in memory already, or no longer stored
            picked = self.promoter.prefetch([k for k, t in zip(part, tiers) if t == "disk"],
                                            left // self.page_bytes * self.page_bytes)
            if not picked:
                continue
            done = self.engine.promote(ns, picked, self.promoter.score_of(picked))
            promoted += done.promoted
            left -= done.promoted * self.page_bytes
            gone += [k for k, t in zip(picked, self.engine.tiers_of(ns, picked)) if t != "disk"]
        with self._lock:
            for k in gone:
                self._spilled.pop(k, None)
            self._io["promoted_pages"] += promoted
        return promoted

    def push_scores(self) -> int:
        """Hand the promoter's scores of recently observed pages to both tiers (lowest value leaves first), and
        queue for the disk those of them it now admits."""
        with self._lock:
            keys, self._scored = list(self._scored), set()
        if keys and self.ns is not None:
            for ns, idx in self._by_tenant(keys):
                part = [keys[i] for i in idx]
                self.engine.set_scores(ns, part, self.promoter.score_of(part))
                if self.tier_config.write_policy == "selective" and not self.read_only:
                    # pages admitted since they were stored (reused, continued) go down now: not lost in a crash
                    self.engine.write_down(ns, [k for k in part if self.promoter.admit(k)])
        return len(keys)

    def _calibrate(self) -> None:
        """Hand the promoter what reloads and prefill measurably cost here (see cost_meter): the prefill slope,
        the fixed round trip of a storage reload, and each kvdrive tier's read time per byte since the last call
        (only once enough pages were read to mean something)."""
        s = self.engine.stats()
        tiers = {}
        for tier, seconds, pages in (("dram", s.decode_s, s.hits_host + s.hits_queued),
                                     ("disk", s.disk_get_s, s.disk_get_pages)):
            s0, p0 = self._timing_seen.get(tier, (0.0, 0))
            if pages - p0 >= 32:  # else keep measuring over a longer span
                if seconds > s0:
                    tiers[tier] = (seconds - s0) / ((pages - p0) * self.page_bytes)
                self._timing_seen[tier] = (seconds, pages)
        if "dram" in tiers:
            tiers["queued"] = tiers["dram"]
        self.promoter.calibrate(prefill_s_per_token=PREFILL.seconds_per_token(), tier_s_per_byte=tiers,
                                reload_fixed_s=self.reload_meter.fixed_seconds())
        measured = self.promoter.measured()
        nothing = measured == {"tier_s_per_byte": {}}  # never overwrite kept costs with no measurement
        if not nothing and measured != self._costs_saved and self.ns is not None and not self.read_only:
            blob = json.dumps(measured, sort_keys=True).encode()
            if self.engine.put_note(self._costs_note(), blob):
                self._costs_saved = measured

    def _costs_note(self) -> str:
        return f"costs:{self.ns.id.hex()}"

    def _load_costs(self) -> None:
        """Costs measured by an earlier run of this server (same namespace: model, shapes, layout), so that
        reload-vs-recompute runs on measurements from the first request after a restart."""
        raw = self.engine.get_note(self._costs_note())
        if raw is None:
            return
        try:
            measured = json.loads(raw)
            self.promoter.calibrate(**measured)
        except (ValueError, TypeError, ConfigError) as e:
            log.warning("kvdrive: ignoring the costs kept from an earlier run (%s); measuring afresh", e)
            return
        self._costs_saved = self.promoter.measured()
        c = self.promoter.costs()
        log.info("kvdrive: costs measured by an earlier run: prefill %.0f tok/s, reload round trip %.1f ms",
                 c["prefill_tokens_per_s"][0], c["reload_fixed_s"][0] * 1000)

    def _count(self, op: str, pages: int, ok: int, nbytes: int, t0: float) -> None:
        with self._lock:
            c = self._io
            c[f"{op}_calls"] += 1
            c[f"{op}_pages"] += pages
            c[f"{op}_pages_ok"] += ok
            c[f"{op}_bytes"] += nbytes
            c[f"{op}_seconds"] += time.perf_counter() - t0

    def _tick_stats(self) -> dict:
        # The reporter's tick is also when scores reach the tiers, measured costs reach the promoter and valuable
        # pages come back up from disk; each runs even if another failed (logged once, counted).
        for step in (self.push_scores, self._calibrate, self.promote_tick):
            if step == self.promote_tick and self._closing:
                continue  # nothing to bring up for a server that is stopping
            try:
                step()
            except Exception:  # noqa: BLE001 - background upkeep must never stop the reporter
                with self._lock:
                    self._io["tick_errors"] += 1
                    first = self._io["tick_errors"] == 1
                if first:
                    log.exception("kvdrive: %s failed on the reporter thread (further failures are counted "
                                  "in io.tick_errors, not logged)", step.__name__)
        return self.tier_stats()

    def tier_stats(self) -> dict:
        """Per-tier figures: engine and store stats, SGLang-side I/O counters and radix events."""
        s = self.engine.stats()
        with self._lock:
            io, ev = dict(self._io), dict(self._events)
        out = {"host": s.host._asdict(), "disk": s.disk._asdict() if s.disk else None,
               "hits": {"dram": s.hits_host, "queued": s.hits_queued, "disk": s.hits_disk, "miss": s.misses},
               "writedown_queued_bytes": s.writedown_queued_bytes, "writedown_dropped": s.writedown_dropped,
               "io": io, "radix": ev,
               "tenants": {"seen": len(self._tenant_ns), "unkeyed_refused": s.unkeyed_refused, "erased": s.erased},
               "promoter": self.promoter.stats(), "costs": self.promoter.costs()}
        if io.get("get_pages_ok"):
            out["reload_ms_per_page"] = 1000 * io["get_seconds"] / max(io["get_calls"], 1) / \
                max(io["get_pages"] / max(io["get_calls"], 1), 1)
        return out


class _PageScratch:
    """Reusable decode buffers for ``cap`` pages: one [cap, page elements] tensor and its numpy byte view, whose
    rows the tiers decode into without a torch call per page."""

    def __init__(self, like: torch.Tensor, cap: int):
        self.cap = cap
        self.pages = torch.empty((cap, like.numel()), dtype=like.dtype)
        self.rows = self.pages.view(torch.uint8).numpy()


def _batched_layout(host) -> str | None:
    """The layout whose pages _to_host can scatter in one call: SGLang's own MHA host pool (its per-page copy not
    overridden) in layer_first or page_first layout, with the buffer shape that layout has; else None."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    if type(host).set_from_flat_data_page is not MHATokenToKVPoolHost.set_from_flat_data_page:
        return None
    kv = getattr(host, "kv_buffer", None)
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
        return None
    inner = (host.layer_num, host.head_num, host.head_dim)
    if host.layout == "layer_first" and (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4]) == (2, *inner):
        return "layer_first"
    if host.layout == "page_first" and (kv.shape[0], *kv.shape[2:]) == (2, *inner):
        return "page_first"
    return None


_METRICS: dict[int, TierMetrics] = {}


def _metrics_for(config: HiCacheStorageConfig) -> TierMetrics | None:
    """Prometheus metrics when SGLang's metrics are on (--enable-metrics); one set per rank and process."""
    if not config.enable_storage_metrics:
        return None
    try:
        if config.tp_rank not in _METRICS:
            _METRICS[config.tp_rank] = TierMetrics({"tp_rank": config.tp_rank, "pp_rank": config.pp_rank})
        return _METRICS[config.tp_rank]
    except ImportError:
        log.warning("kvdrive: prometheus_client is not installed; kvdrive's metrics go to the log only")
        return None
