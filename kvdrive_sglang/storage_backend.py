"""kvdrive as SGLang's L3: a ``HiCacheStorage`` (v1 batch API) over the tier engine.

SGLang's host pool stays the uncompressed staging tier for fast host<->GPU copies; behind it this backend puts
kvdrive's compressed DRAM pool and the persistent disk store. SGLang builds it through the ``dynamic`` storage
backend (``--kv-tier kvdrive`` writes that config) as ``KvdriveStorage(storage_config, kwargs)``, then calls
``register_mem_pool_host``; pages move with ``batch_set_v1`` / ``batch_get_v1`` / ``batch_exists`` (keys: SGLang's
chained page hashes; salted per tenant by kvdrive's radix-cache backend).

Pages of different models, dtypes, layouts, page sizes, shapes or TP ranks never meet: every page lives in a
namespace built from the host pool and the storage config (SGLang's own file backend has served wrong output from
keys that lacked the dtype). MLA caches are identical on every TP rank: one namespace for all, written by one rank
(SGLang's storage writer; rank 0 where the config does not say).

This module stays thin: the page I/O on SGLang's host pool lives in ``host_pages`` (batched where the pool's buffer
allows it, SGLang's own per-page copy elsewhere), the promoter's inputs and the report tick's upkeep (scores,
measured costs, promotion ahead of demand) in ``upkeep``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from .awaiting_use import AwaitingUse
from .compat import radix_adapter
from .config import KvdriveSettings
from .cost_meter import ReloadMeter
from .host_pages import HostPages
from .metrics import Reporter, TierMetrics
from .model_identity import model_identity, server_model_identity
from .pool_components import DRAFT, group_entries, model_kind, pool_kind, split_component, unsupported
from .tier.engine import TierEngine
from .tier.errors import ConfigError
from .tier.namespace import Namespace, key_bytes
from .tier.promoter import Promoter
from .tier.remote import SETTINGS_NOTE, settings_note
from .tier.tenants import split_key
from .tier.tiers import Tier
from .upkeep import Upkeep

log = logging.getLogger("kvdrive.sglang")

_TORCH_DTYPES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.uint8: "uint8",
    torch.int8: "int8",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _TORCH_DTYPES[getattr(torch, _name)] = _name

RADIX_EVENTS = ("device_hit", "host_hit", "storage_hit", "evicted", "written_back", "loaded_back")


def kv_dtype_name(dtype: torch.dtype) -> str:
    try:
        return _TORCH_DTYPES[dtype]
    except KeyError:
        raise ConfigError(
            f"kvdrive cannot store KV pages of dtype {dtype}; supported: {', '.join(_TORCH_DTYPES.values())}"
        ) from None


MIRROR_ROOT = "/dev/shm"  # where replicated MLA ranks share the writer's DRAM tier (a memory-backed file system)


def namespace_for(config: HiCacheStorageConfig, host_pool, *, tenant: str = "", component: str = "") -> Namespace:
    """Everything that makes this server's pages incompatible with another's, from SGLang's own objects.

    ``component``: "" for the target model's KV pool; else the SGLang pool name of another host pool kvdrive stores
    (``"draft"``: speculative decoding's draft KV, see pool_components), whose pages get a namespace of their own:
    its own geometry (read from that pool) and, for the draft, the draft model."""
    from .compat.server_args import running_server_args

    args = running_server_args()  # what SGLang published for the server this process runs (None: none)
    mla = bool(config.is_mla_model) if not component else pool_kind(host_pool) == "mla"
    if mla:
        num_heads, head_dim = 1, int(host_pool.kv_lora_rank + host_pool.qk_rope_head_dim)
        tp_rank, tp_size = 0, 1  # every rank holds the same latent cache
    else:
        num_heads, head_dim = int(host_pool.head_num), int(host_pool.head_dim)
        tp_rank, tp_size = int(config.tp_rank), int(config.tp_size)
    extra = {
        "mem_layout": host_pool.layout,
        "pp": f"{config.pp_rank}/{config.pp_size}",
        "attn_cp": f"{config.attn_cp_rank}/{config.attn_cp_size}",
    }
    if config.should_split_heads:
        extra["split_heads_lcm"] = str(config.tp_lcm_size)
    extra.update(_newer_ranks(config))
    # how SGLang derives page keys on this version: a store written under another scheme is missed, never misread
    extra.update(radix_adapter().namespace_fields())
    extra.update(_fp8_kind(host_pool, args))
    if component:
        extra.update(component_fields(component, args))
    return Namespace(
        model=server_model_identity(config, args),
        kv_dtype=kv_dtype_name(host_pool.dtype),
        layout="mla" if mla else "mha",
        page_size=int(host_pool.page_size),
        num_heads=num_heads,
        head_dim=head_dim,
        num_layers=int(host_pool.layer_num),
        tp_rank=tp_rank,
        tp_size=tp_size,
        tenant=tenant,
        extra=tuple(extra.items()),
    )


def component_fields(component: str, args) -> dict[str, str]:
    """Namespace fields of a component pool's pages: its name and, for the draft, the draft model (path + revision,
    or the speculative algorithm where the draft has no weights of its own: NGRAM, the target's MTP layers). Two
    servers of one target with different drafts never share draft pages."""
    out = {"component": component}
    if component == DRAFT:
        path = getattr(args, "speculative_draft_model_path", None)
        rev = getattr(args, "speculative_draft_model_revision", None)
        algo = getattr(args, "speculative_algorithm", None)
        out["draft_model"] = (
            (model_identity(path) + (f"@revision={rev}" if rev else "")) if path else f"{algo or 'unknown'}:target"
        )
    return out


def _fp8_kind(host_pool, args) -> dict[str, str]:
    """SGLang keeps fp8 KV (``--kv-cache-dtype fp8_e4m3`` and ``fp8_e5m2`` alike) as uint8 in its pools, so the
    pool's dtype cannot tell the two apart, and the same bytes read as the other format are wrong KV: the server's
    own KV cache dtype (and the scales file it was given, by its fingerprint) name the format. Only uint8 pools get
    the field, so every other namespace is what it was."""
    if host_pool.dtype != torch.uint8:
        return {}
    kind = str(getattr(args, "kv_cache_dtype", None) or "unknown")
    out = {"kv_cache_dtype": kind}
    scales = getattr(args, "quantization_param_path", None)
    if scales:
        out["kv_scales"] = model_identity(scales) if os.path.isdir(scales) else _file_fingerprint(scales)
    return out


def _file_fingerprint(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _newer_ranks(config: HiCacheStorageConfig) -> dict[str, str]:
    """Namespace fields from ranks newer SGLang configs carry (0.5.23: ``dp_rank``, ``dcp_size`` / ``dcp_rank``,
    ``logical_page_size``), each only where it differs from its default, so a config without them (0.5.17) or with
    their defaults gives the very namespace (and pages) it always had.

    - ``dp_rank``: with DP attention ``tp_rank`` counts within an attention-DP group, so every group has a rank 0 (the
      MLA writer) and a rank 1 (the same heads): the DP rank gives each group's ranks a namespace of their own, one
      writing process per namespace as everywhere else.
    - ``dcp``: with decode context parallelism each MLA rank holds its DCP shard of every page, not the whole latent
      cache; shards are keyed like SGLang's own file backend keys them (DCP rank and size, TP size, logical page size).
    """
    out = {}
    dp_rank = int(getattr(config, "dp_rank", 0) or 0)
    if dp_rank:
        out["dp"] = str(dp_rank)
    dcp_rank, dcp_size = int(getattr(config, "dcp_rank", 0) or 0), int(getattr(config, "dcp_size", 1) or 1)
    if dcp_size != 1 or dcp_rank:
        out["dcp"] = f"{dcp_rank}/{dcp_size}"
        out["dcp_tp_size"] = str(config.tp_size)
    logical = getattr(config, "logical_page_size", None)
    if logical is not None:
        out["logical_page_size"] = str(int(logical))
    return out


def storage_writer(config: HiCacheStorageConfig) -> bool:
    """Whether this rank writes pages. SGLang 0.5.23's config says so itself (``is_storage_writer``: MLA replicas
    share one writer per DCP shard, in the first DCP group; every MHA rank writes); before that, MLA ranks other
    than TP rank 0 only read (every rank holds the same latent cache; SGLang lets rank 0 write, and so do we)."""
    writer = getattr(config, "is_storage_writer", None)
    if writer is not None:
        return bool(writer)
    return not (config.is_mla_model and config.tp_rank != 0)


def server_device() -> str:
    """The device this process serves on: the published ServerArgs' ``device``, else "cuda" where torch sees a GPU."""
    from .compat.server_args import running_server_args

    device = getattr(running_server_args(), "device", None)
    if isinstance(device, str) and device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def apply_gil_switch(seconds: float) -> None:
    """Shorten the interpreter's GIL switch interval to ``seconds`` (never lengthen one already shorter)."""
    import sys

    before = sys.getswitchinterval()
    if seconds and seconds < before:
        sys.setswitchinterval(seconds)
        log.info(
            "kvdrive: Python's GIL switch interval %.2f -> %.2f ms, so HiCache's I/O threads get the GIL back "
            "soon while the scheduler loop runs (set kvdrive gil_switch_ms to change)",
            before * 1000,
            seconds * 1000,
        )


class KvdriveStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None):
        self.storage_config = storage_config
        self.settings = KvdriveSettings.from_extra_config(storage_config.extra_config)  # checked; names a bad key
        # MLA: every rank has the same cache, and one rank writes it (see storage_writer)
        self.read_only = not storage_writer(storage_config)
        self.tier_config = self.settings.tier_config()
        if storage_config.is_mla_model and int(storage_config.tp_size) > 1:
            # replicas: the writer's DRAM tier is shared with the other ranks of this node (tier/replica_mirror.py),
            # so every rank counts the same hits and reads them from memory, not each from disk (issue 15)
            self.tier_config = replace(
                self.tier_config, mirror="read" if self.read_only else "publish", mirror_root=MIRROR_ROOT
            )
        self.promoter = Promoter(self.settings.promoter_config())
        self.reload_policy = self.settings.reload
        apply_gil_switch(self.settings.gil_switch_s(server_device()))
        self.engine = self._open_engine()
        # selective write-down: a page reaches the disk only once the promoter finds it worth keeping (reused, a
        # conversation's continuation, ...), so disk bandwidth is not spent on one-off prompts
        # (a draft page "<key>.draft" follows its target page's admission)
        self.engine.admit = lambda ns, key: self.promoter.admit(split_component(key.decode("utf-8", "replace")).key)
        self.ns: Namespace | None = None
        self._tenant_ns: dict[str, Namespace] = {}  # tenant id -> this server's namespace for that tenant
        # component pools stored beside the KV pool (pool_components): name -> (namespace, its pages or None where
        # SGLang's per-key calls bring the pages without registering the pool), and their tenants' namespaces
        self._components: dict[str, tuple[Namespace, HostPages | None]] = {}
        self._component_tenant_ns: dict[tuple[str, str], Namespace] = {}
        self.off_reason: str | None = None  # set when this server's host pools include one kvdrive cannot store
        self.tenants = self.engine.tenants  # the operator's tenant policy (the radix cache reads share_as here)
        self.mem_pool_host = None
        self.pages: HostPages | None = None  # page I/O on SGLang's host pool (set on register)
        # --kvdrive-gpu-decompress: the KV pool's slots held as checked blobs until the GPU decodes them (set on
        # register where the flag is on and the pool allows it; kvdrive_sglang/gpu_decompress.py)
        self.lazy = None
        self._events = Counter()
        self._io = Counter()
        self._lock = threading.Lock()
        self.reload_meter = ReloadMeter()
        # pages loaded into SGLang's host pool for requests not yet run: the eviction order keeps them (awaiting_use.py)
        self.awaiting = AwaitingUse()
        # the promoter's inputs and the report tick's steps (scores, costs, promotion): kvdrive_sglang/upkeep.py
        self.upkeep = Upkeep(
            self.engine,
            self.promoter,
            self.reload_meter,
            by_tenant=self._by_tenant,
            selective=self.tier_config.write_policy == "selective",
            read_only=self.read_only,
        )
        self._reporter: Reporter | None = None
        from . import cpu_fallbacks

        log.info(
            "kvdrive: storage backend on %s (DRAM tier %.1f GiB, disk cap %.1f GiB, codec %s, rank %d/%d%s)",
            self.tier_config.path,
            self.tier_config.host_bytes / 2**30,
            self.tier_config.disk_bytes / 2**30,
            self.tier_config.codec,
            storage_config.tp_rank,
            storage_config.tp_size,
            ", CPU fallbacks for HiCache copies" if cpu_fallbacks.installed() else "",
        )

    def _open_engine(self) -> TierEngine:
        """The tier engine; with --kvdrive-remote, one with the shared remote tier behind its local tiers."""
        spec = self.settings.remote_spec()
        if spec is None:
            engine = TierEngine(self.tier_config)
            if not self.read_only and engine.get_note(SETTINGS_NOTE) is not None:
                # `kvdrive stats` shows the remote settings the last server recorded: not a tier this one lacks
                engine.put_note(SETTINGS_NOTE, settings_note(None))
            return engine
        from .tier.remote.tiered import RemoteTieredEngine

        return RemoteTieredEngine(self.tier_config, spec)

    # --- SGLang wiring -----------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        entries = group_entries(mem_pool_host)  # a HostPoolGroup (SGLang 0.5.21+: hybrid models, drafts): its pools
        anchor = mem_pool_host if entries is None else entries[0][1]
        for name, pool in [("kv", anchor)] + (entries or [])[1:]:
            why = unsupported(name, pool)
            if why is not None:
                return self._turn_off(why)
        self.ns = namespace_for(self.storage_config, anchor)
        self.pages = HostPages(anchor)
        self.page_size, self.page_bytes = self.pages.page_size, self.pages.page_bytes
        log.info(
            "kvdrive: namespace %s = %s (host pool %s, %s page copies)",
            self.ns.id.hex()[:16],
            self.ns.describe(),
            type(anchor).__name__,
            f"batched {self.pages.layout}" if self.pages.layout else "per-page",
        )
        self.upkeep.bind(self.ns, self.page_size, self.page_bytes)
        from . import gpu_decompress

        codec = getattr(getattr(self.engine, "codec_choice", None), "dram", None)
        self.lazy = gpu_decompress.setup(anchor, self.pages, self.settings.gpu_decompress, codec=codec)
        for name, pool in (entries or [])[1:]:
            self._add_component(name, pool)
        if self._reporter is None:
            self._reporter = Reporter(self._tick_stats, _metrics_for(self.storage_config))

    def register_mem_host_pool_v2(self, host_pool, host_pool_name) -> None:
        """SGLang 0.5.21+ registers each further host pool (a HostPoolGroup's entries, the draft KV pool) by name."""
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        name = str(getattr(host_pool_name, "value", host_pool_name))
        if self.off_reason is not None or name == "kv" or name in self._components:
            return
        why = unsupported(name, host_pool)
        if why is not None:
            return self._turn_off(why)
        self._add_component(name, host_pool)

    def _add_component(self, name: str, pool) -> None:
        ns = namespace_for(self.storage_config, pool, component=name)
        self._components[name] = (ns, HostPages(pool))
        log.info("kvdrive: %s pages in namespace %s = %s", name, ns.id.hex()[:16], ns.describe())

    def _legacy_component(self, name: str, page: torch.Tensor) -> bool:
        """A component whose pages come through SGLang's per-key calls (0.5.17's draft path) without its pool being
        registered: its namespace from the pages themselves (dtype, elements) and the component fields. False for a
        component kvdrive does not store."""
        if name in self._components:
            return True
        if name != DRAFT or self.ns is None:
            return False
        from .compat.server_args import running_server_args

        base = self._require_ns()
        n = int(page.numel())
        extra = {**dict(base.extra), **component_fields(name, running_server_args()), "page_elements": str(n)}
        ns = replace(
            base,
            kv_dtype=kv_dtype_name(page.dtype),
            num_heads=1,
            head_dim=base.head_dim if n % base.head_dim == 0 else n,
            tenant="",
            extra=tuple(extra.items()),
        )
        self._components[name] = (ns, None)
        log.info("kvdrive: %s pages in namespace %s = %s", name, ns.id.hex()[:16], ns.describe())
        return True

    def _turn_off(self, why: str) -> None:
        """Leave this server's cache to SGLang: a model whose host pools kvdrive cannot store whole is served by
        SGLang's own GPU and host cache, and every kvdrive call is a miss (a KV page brought back without its state
        pages would be a wrong prefix; a crash at attach would take the server down)."""
        from .compat.server_args import running_server_args

        self.off_reason = why
        log.warning(
            "kvdrive: off for %s: %s; SGLang's own cache (GPU and host memory) serves it, kvdrive's tiers stay empty",
            model_kind(running_server_args()),
            why,
        )

    def _page_starts(self, op: str, keys, host_indices) -> list[int]:
        """The host-pool slot of each key's page (HostPages.starts), the keys checked first: a bad key is a
        ConfigError naming it, before any page is read or observed."""
        for k in keys:
            key_bytes(k)
        return self.pages.starts(op, len(keys), host_indices)

    def _require_ns(self) -> Namespace:
        if self.ns is None:
            raise RuntimeError("kvdrive storage used before SGLang registered its host pool")
        return self.ns

    def ns_of(self, key) -> Namespace:
        """The namespace of a page key: a salted request's key carries its tenant id (its last 16 hex digits, see
        radix_backend), and its pages live in this server's namespace with that tenant; other keys in the base one.
        A component key ``"<key>.<pool>"`` (a draft page) lives in that component's namespace, with the tenant of
        the page key it belongs to."""
        base = self._require_ns()
        key, component = split_component(key)
        tid = split_key(key)[1]
        if component:
            comp = self._components[component][0]
            if not tid:
                return comp
            ns = self._component_tenant_ns.get((component, tid))
            return (
                ns
                if ns is not None
                else self._component_tenant_ns.setdefault((component, tid), replace(comp, tenant=tid))
            )
        if not tid:
            return base
        ns = self._tenant_ns.get(tid)
        if ns is None:
            ns = self._tenant_ns.setdefault(tid, replace(base, tenant=tid))
        return ns

    def _by_tenant(self, keys) -> list[tuple[Namespace, list[int]]]:
        """Positions of ``keys`` per namespace, in first-seen order (one group for a request's batch)."""
        groups: dict[tuple[str, str], tuple[Namespace, list[int]]] = {}
        for i, k in enumerate(keys):
            key, component = split_component(k)
            gk = (component, split_key(key)[1])
            g = groups.get(gk)
            if g is None:
                g = groups[gk] = (self.ns_of(k), [])
            g[1].append(i)
        return list(groups.values())

    def _get(self, keys, outs) -> list[bool]:
        got = [False] * len(keys)
        for ns, idx in self._by_tenant(keys):
            for i, g in zip(idx, self.engine.get_many(ns, [keys[i] for i in idx], [outs[i] for i in idx])):
                got[i] = g
        return got

    def _get_into(self, pages: HostPages, keys, starts) -> tuple[int, list[bool]]:
        """Reload ``keys`` into the host-pool pages at ``starts``, decoded straight into SGLang's slots where the
        pool allows (HostPages.landing). SGLang uses the leading run of hits: (its length n, the results with only
        those n pages reported loaded; a hit after a miss is reported a miss, its slot left for SGLang to free)."""
        landing = pages.landing(starts)
        lazy = self.lazy if pages is self.pages else None  # the target KV pool's only (gpu_decompress)
        if lazy is None:
            got = self._get(keys, landing.outs)
        else:  # bplane / int8 / fp8 hits recorded for the device to decode, checked now: the rest decoded here
            got, recordable = lazy.get(self.engine, self._by_tenant(keys), keys, landing.outs, self._get)
        n = got.index(False) if False in got else len(got)
        landing.land(n)
        if lazy is not None:
            lazy.settle(starts, n, recordable)
        return n, [True] * n + [False] * (len(keys) - n)

    def _put(self, keys, pages, *, staged: bool = False) -> list[bool]:
        """Store pages (a chain in prefix order) with the promoter's scores as of now: stored unscored (0.0, the
        lowest value) they were the first evicted until the next report tick scored them. ``staged``: ``pages`` are
        copies the tiers may keep, acknowledged at once and encoded off this thread (TierEngine.stage_many)."""
        put = self.engine.stage_many if staged else self.engine.put_many
        ok = [False] * len(keys)
        for ns, idx in self._by_tenant(keys):
            part = [keys[i] for i in idx]
            scores = self.promoter.score_of(part, chain=True)
            for i, o in zip(idx, put(ns, part, [pages[i] for i in idx], scores=scores)):
                ok[i] = o
        return ok

    # --- v1 batch API (interface_v1) -----------------------------------------------------------------------------
    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        if self.off_reason is not None:
            return [False] * len(keys)
        self._require_ns()
        if self.read_only or not keys:
            return [True] * len(keys)
        t0 = time.perf_counter()
        starts = self._page_starts("batch_set_v1", keys, host_indices)
        if self.lazy is not None:  # a slot whose page the GPU was to decode is read here: decode it first
            self.lazy.materialize(starts)
        # SGLang keeps these host-pool nodes locked until this returns, and encoding (zstd: ~0.6 GB/s a core) is far
        # slower than the KV a model writes through (kvdrive issue 15): the tiers take copies of the pages and encode
        # them on their own threads. The batched read is one gathered copy already (numpy rows); SGLang's per-page
        # copy may be a view of the pool, so it is cloned (test_batch_set_v1_acknowledges_before_encoding_...)
        pages = [p.clone() if isinstance(p, torch.Tensor) else p for p in self.pages.read(starts)]
        self.upkeep.observe(keys, use=False)  # before the put: admission sees the page's size and recency
        ok = self._put(keys, pages, staged=True)  # False where the staging area was full: not backed up
        self._count("set", len(keys), sum(ok), len(keys) * self.page_bytes, t0)
        return ok

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        if self.off_reason is not None:
            return [False] * len(keys)
        self._require_ns()
        if not keys:
            return []
        t0 = time.perf_counter()
        starts = self._page_starts("batch_get_v1", keys, host_indices)
        n, got = self._get_into(self.pages, keys, starts)
        self._count("get", len(keys), n, n * self.page_bytes, t0)
        self.upkeep.loaded(keys[:n])  # back in SGLang's host pool: no longer promotion candidates
        self.awaiting.loaded([split_component(k).key for k in keys[:n]])  # as the radix nodes name them
        self.upkeep.observe(keys[:n], use=True)
        self.reload_meter.get_done(keys[0], n)
        return got

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """Leading pages worth loading: held in a kvdrive tier *and* faster to reload than to recompute (the
        promoter's plan over the tiers they sit in), so a slow disk never makes a request slower than no cache."""
        if self.off_reason is not None:
            return 0
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
    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None):
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None):
        if self.off_reason is not None or not keys:
            return [None] * len(keys)
        self._require_ns()
        outs = list(target_locations) if target_locations is not None else [self.pages.empty_page() for _ in keys]
        if not self._components_known(keys, outs):
            return [None] * len(keys)
        got = self._get(keys, outs)
        return [o if g else None for o, g in zip(outs, got)]

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        if self.off_reason is not None:
            return False
        if self.read_only or not keys:
            return True
        self._require_ns()
        pages = [v.contiguous() for v in values]
        if not self._components_known(keys, pages):
            return False
        return all(self._put(keys, pages))

    def _components_known(self, keys, pages) -> bool:
        """Whether every component key among ``keys`` (``"<key>.draft"`` from SGLang's per-key calls) names a
        component kvdrive stores, its namespace set up from its pages where its pool was never registered."""
        for k, page in zip(keys, pages):
            component = split_component(k).component
            if component and not self._legacy_component(component, page):
                return False
        return True

    # --- the multi-pool API (SGLang 0.5.21+: a draft KV pool beside the KV pool) ---------------------------------
    def batch_exists_v2(self, keys: list[str], pool_transfers=None, extra_info: HiCacheStorageExtraInfo | None = None):
        """Leading pages held for the KV pool *and* every component pool named (SGLang's ALL_PAGES policy: a
        draft page missing ends the prefix, as SGLang's own backends count it)."""
        from sglang.srt.mem_cache.hicache_storage import PoolTransferResult

        n = self.batch_exists(keys, extra_info)
        extra: dict[str, int] = {}
        for t in pool_transfers or []:
            name = _pool_name(t.name)
            if name == "kv":
                continue
            if name not in self._components or str(getattr(t.hit_policy, "value", t.hit_policy)) != "all_pages":
                return PoolTransferResult(kv_hit_pages=0, extra_pool_hit_pages={})
            ck = [f"{k}.{name}" for k in keys[:n]]
            extra[name] = self.engine.exists_many(self.ns_of(ck[0]), ck) if ck else 0
            n = min(n, extra[name])
        return PoolTransferResult(kv_hit_pages=n, extra_pool_hit_pages=extra)

    def batch_get_v2(self, transfers, extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        return {_pool_name(t.name): self._transfer(t, extra_info, get=True) for t in transfers}

    def batch_set_v2(self, transfers, extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        return {_pool_name(t.name): self._transfer(t, extra_info, get=False) for t in transfers}

    def _transfer(self, t, extra_info, *, get: bool) -> list[bool]:
        """One pool's part of a v2 call: the KV pool's through the v1 calls, a component's (draft) on its own pool's
        pages under ``"<key>.<pool>"`` keys; any other pool is a miss / not stored."""
        name, keys = _pool_name(t.name), list(t.keys or [])
        if name == "kv":
            return (self.batch_get_v1 if get else self.batch_set_v1)(keys, t.host_indices, extra_info)
        comp = self._components.get(name)
        if self.off_reason is not None or comp is None or comp[1] is None or not keys:
            return [False] * len(keys)
        if not get and self.read_only:
            return [True] * len(keys)
        pages = comp[1]
        starts = pages.starts(f"batch_{'get' if get else 'set'}_v2 {name}", len(keys), t.host_indices)
        ckeys = [f"{k}.{name}" for k in keys]
        if not get:
            return self._put(ckeys, pages.read(starts))
        return self._get_into(pages, ckeys, starts)[1]

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
        self.upkeep.close()
        if self._reporter is not None:
            self._reporter.close()
            self._reporter = None
        self.engine.close()

    # --- kvdrive's own reporting (the radix-cache contract, kvdrive_sglang/contract.py) ------------------------
    def record_radix_event(self, kind: str, tokens: int) -> None:
        """Radix-tree events from kvdrive's radix-cache backend: the inputs the promoter will use."""
        if kind not in RADIX_EVENTS:
            raise ValueError(f"unknown radix event {kind!r}; known: {', '.join(RADIX_EVENTS)}")
        with self._lock:
            self._events[kind] += int(tokens)

    def expect_whole_requests(self) -> None:
        """kvdrive's radix cache reports every finished request (record_request): from now on storage-level
        calls no longer feed the promoter."""
        self.upkeep.expect_whole_requests()

    def record_request(self, keys: list[str]) -> None:
        """A finished request's whole page chain, in prefix order (from kvdrive's radix cache): one access."""
        self.awaiting.used(keys)
        self.upkeep.record_request(keys)

    def record_attention(self, key_mass: dict) -> None:
        """Per-page attention mass of a finished request (from kvdrive's radix cache): the promoter's signal."""
        self.upkeep.record_attention(key_mass)

    def record_host_evicted(self, keys: list[str]) -> None:
        """Pages that just left SGLang's host pool (from kvdrive's radix cache): promotion candidates."""
        self.awaiting.used(keys)
        self.upkeep.record_host_evicted(keys)

    def promote_tick(self) -> int:
        """Bring valuable spilled pages up from disk into kvdrive's DRAM tier (Upkeep.promote_tick); pages brought
        up."""
        return self.upkeep.promote_tick()

    def push_scores(self) -> int:
        """Hand the promoter's scores of recently observed pages to both tiers (Upkeep.push_scores); pages scored."""
        return self.upkeep.push_scores()

    def _count(self, op: str, pages: int, ok: int, nbytes: int, t0: float) -> None:
        with self._lock:
            c = self._io
            c[f"{op}_calls"] += 1
            c[f"{op}_pages"] += pages
            c[f"{op}_pages_ok"] += ok
            c[f"{op}_bytes"] += nbytes
            c[f"{op}_seconds"] += time.perf_counter() - t0

    def _tick_stats(self) -> dict:
        # The reporter's tick is also the promoter's upkeep (scores, measured costs, promotion: Upkeep.tick)
        self.upkeep.tick()
        cost = getattr(self.engine, "remote_cost", lambda: None)()  # the shared tier's read-through, as timed
        if cost is not None:
            self.promoter.calibrate(tier_s_per_byte={"remote": cost.per_unit_s}, remote_fixed_s=cost.fixed_s)
        return self.tier_stats()

    def tier_stats(self) -> dict:
        """Per-tier figures: engine and store stats, SGLang-side I/O counters and radix events."""
        s = self.engine.stats()
        with self._lock:
            io, ev = dict(self._io), dict(self._events)
        io.update(self.upkeep.counts())
        out = {
            Tier.DRAM.value: s.dram._asdict(),
            Tier.DISK.value: s.disk._asdict() if s.disk else None,
            "hits": {
                Tier.DRAM.value: s.hits_dram,
                Tier.QUEUED.value: s.hits_queued,
                Tier.DISK.value: s.hits_disk,
                "miss": s.misses,
            },
            "writedown_queued_bytes": s.writedown_queued_bytes,
            "writedown_dropped": s.writedown_dropped,
            # selective write-down: pages kept off the disk when stored, and those that then left DRAM unadmitted:
            # dropped (the disk busy or full) or written on its spare bandwidth
            "not_admitted": s.not_admitted,
            "not_admitted_dropped": s.not_admitted_dropped,
            "not_admitted_spilled": s.not_admitted_spilled,
            "io": io,
            "radix": ev,
            "tenants": {"seen": len(self._tenant_ns), "unkeyed_refused": s.unkeyed_refused, "erased": s.erased},
            "promoter": self.promoter.stats(),
            "costs": self.promoter.costs(),
            "codec": self.engine.codec_choice._asdict(),  # per tier, with its reason (tier/codec_choice.py)
            "dram_corrupt_dropped": s.dram_corrupt_dropped,  # in-memory pages that failed to decode (misses)
        }
        out["hooks"] = hook_times()
        if self.lazy is not None:
            out["gpu_decompress"] = self.lazy.stats()
        remote_stats = getattr(self.engine, "remote_stats", None)  # with --kvdrive-remote (RemoteTieredEngine)
        if remote_stats is not None:
            out["remote"] = remote_stats()._asdict()
            out["hits"]["remote"] = out["remote"]["hits"]
        if io.get("get_pages_ok"):
            out["reload_ms_per_page"] = (
                1000 * io["get_seconds"] / max(io["get_calls"], 1) / max(io["get_pages"] / max(io["get_calls"], 1), 1)
            )
        return out


def hook_times() -> dict:
    """kvdrive's own hooks' host time in this process against its forward passes' (attention_capture.HOOK_TIME,
    cost_meter.FORWARDS): the capture's overhead as a share of forward time."""
    from .attention_capture import HOOK_TIME
    from .cost_meter import FORWARDS

    return {
        "capture_s": HOOK_TIME["seconds"],
        "capture_calls": HOOK_TIME["calls"],
        "forward_s": FORWARDS["seconds"],
        "forwards": FORWARDS["passes"],
    }


def _pool_name(name) -> str:
    return str(getattr(name, "value", name))


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
