"""kvdrive's radix cache on SGLang's ``UnifiedRadixCache`` generation (0.5.21 on; see kvdrive_sglang/compat).

SGLang builds every model's cache as ``UnifiedRadixCache`` through ``registry.create_unified_radix_cache(ctx,
cache_class=...)``; kvdrive passes :class:`KvdriveUnifiedRadixCache`, which adds kvdrive's reports, events and
value-ordered eviction (kvdrive_sglang/radix_backend.py) by overriding this generation's methods and calling
``super()``. What is specific here:

- **Tree core.** Eviction order and page hashes live in the tree core. SGLang's default core (Rust, from 0.5.21)
  takes named eviction policies only and hashes backup keys natively, where neither kvdrive's promoter nor its tenant
  tags can reach. kvdrive registers its own tree core, ``kvdrive``: SGLang's Python core (``UnifiedTreeCore``) with
  the promoter's eviction order and a report of pages leaving SGLang's host pool. (Cost: see bench/results/
  tree-core.md; the Python core is SGLang's own reference implementation and its fallback wherever Rust is missing.)
- **Storage keys.** SGLang salts storage chains itself (``get_storage_hash_str``: a chain with an ``extra_key`` or
  ``cache_salt`` starts from ``storage_namespace_seed``). kvdrive does not salt again: an AROUND hook on
  ``get_storage_hash_str`` appends the tenant id to SGLang's own seed (or, for a member of an operator ``share_as``
  group, starts from the group's prior), and the tagged-prior hook on ``get_hash_str`` carries the tag down the chain.
  A request's tenant is named by its ``cache_salt``, else its ``extra_key`` (what SGLang up to 0.5.20 used as the
  salt, so tenant policies keep their names), and by ``<cache_salt>/<extra_key>`` when it has both.
- **Requests** end through ``checkpoint(req, up_to=...)`` then ``on_release(req, checkpointed=...)`` (there is no
  ``cache_finished_req``); nodes are ``NodeId`` handles into the tree core.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.unified_cache import tree_core_registry
from sglang.srt.mem_cache.unified_cache.unified_tree_core import UnifiedTreeCore
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from ..attention_capture import CAPTURE
from ..contract import RadixEvent
from ..radix_backend import KvdriveCacheMixin, PromoterEviction, ensure_hash_hooks
from ..tier.tenants import Tenants

log = logging.getLogger("kvdrive.sglang")

TREE_CORE = "kvdrive"
_STORAGE_HASH_TARGET = "sglang.srt.mem_cache.utils.get_storage_hash_str"
_NO_POLICY = Tenants()
_policy: Tenants = _NO_POLICY  # the operator's tenant policy, from kvdrive's storage backend (set when bound)
# Whether this process runs kvdrive's radix cache. The key hook is registered whenever the plugin loads; without
# kvdrive's cache (a plain SGLang server in the same environment) it must leave SGLang's keys exactly as they are.
_active = False


def tenant_salt(extra_key: str | None, cache_salt: str | None) -> str | None:
    """The tenant name of a request's namespace (see the module docstring); None when it has none."""
    extra_key = extra_key or None
    cache_salt = cache_salt or None
    if cache_salt is None:
        return extra_key
    return cache_salt if extra_key is None else f"{cache_salt}/{extra_key}"


def tagged_root_prior(key: Any) -> str | None:
    """Where the storage chain of ``key`` (a RadixKey) starts: SGLang's namespace seed + the tenant id, or the
    share_as group's prior; None for unsalted keys (SGLang's own chain, unchanged)."""
    from sglang.srt.mem_cache.utils import storage_namespace_seed

    extra_key, cache_salt = getattr(key, "extra_key", None), getattr(key, "cache_salt", None)
    salt = tenant_salt(extra_key, cache_salt)
    if salt is None:
        return None
    return _policy.tagged_seed(salt, storage_namespace_seed(extra_key, cache_salt))


def _around_get_storage_hash_str(original, key, prior_hash=None, page_size=None):
    if prior_hash is None and _active:  # a chain's first page: SGLang would seed it with its namespace seed
        prior_hash = tagged_root_prior(key)
    return original(key, prior_hash, page_size=page_size)


class KvdriveTreeCore(UnifiedTreeCore):
    """SGLang's Python tree core that reports the pages leaving SGLang's host pool (its one host-eviction step)."""

    on_host_evicted = None  # set by the cache: called with the node's storage keys

    def _evict_host_leaf(self, node, *args, **kwargs):
        if self.on_host_evicted is not None and node.hash_value:
            self.on_host_evicted(list(node.hash_value))
        return super()._evict_host_leaf(node, *args, **kwargs)


def _tree_core_factory(params, components):
    return KvdriveTreeCore(params, components)


class KvdriveUnifiedRadixCache(KvdriveCacheMixin, UnifiedRadixCache):
    """UnifiedRadixCache with kvdrive's additions (see the module docstring)."""

    def __init__(self, params):
        global _active
        _active = True  # before SGLang's __init__: its storage controller hashes from then on
        self._kvdrive_init_state()
        ensure_hash_hooks()  # before the controller attaches: it hashes with the hooked functions
        super().__init__(replace(params, tree_core_backend=TREE_CORE))
        self.tree_core.on_host_evicted = self._kvdrive_host_evicted
        if str(params.eviction_policy).lower() == "lru":  # value order only where SGLang's default LRU was asked for
            # SGLang's components read the strategy lazily, at their first eviction (FullComponent
            # _ensure_eviction_strategy); nothing evicts before this line
            self.tree_core.eviction_strategy = PromoterEviction(self, access_is_monotonic_time=False)
        self._kvdrive_started()

    def _kvdrive_on_bind(self, backend) -> None:
        global _policy
        policy = getattr(backend, "tenants", None)
        _policy = policy if isinstance(policy, Tenants) else _NO_POLICY

    def _kvdrive_chain_keys(self, node_id) -> list[str]:
        """Storage keys of the pages from the root to ``node_id``, in sequence order."""
        if node_id is None or self.tree_core.is_root(node_id):
            return []
        return list(self.tree_core.get_prefix_hash_values(node_id)) + list(self.tree_core.get_hash_values(node_id))

    # ------------------------------------------------------------------------------- SGLang's calls, this generation

    def checkpoint(self, req, *, up_to: int, **kwargs) -> None:
        finished = req.finished()
        # a finished request's row is freed right after its checkpoint (mem_cache/common.py release_kv_cache)
        mass = CAPTURE.pop(req.kv.req_pool_idx) if finished else None
        super().checkpoint(req, up_to=up_to, **kwargs)
        self._kvdrive_report_hits(req)
        if finished and self.enable_storage:
            # the request's whole chain as it now sits in the tree (prompt and output pages): the insert moved
            # req.last_node to the node it ended on
            leaf = None if req.last_node is None else self.tree_core.node_by_id(req.last_node)
            self._kvdrive_finished(self._kvdrive_chain_keys(req.last_node), mass, leaf)

    def on_release(self, req, *, checkpointed: bool) -> None:
        if not (checkpointed and req.finished()):
            # the row is freed without a finished request's report (aborted, barred from the tree, retracted): its
            # mass so far goes too, or the next request on this row would inherit it
            CAPTURE.pop(req.kv.req_pool_idx)
        super().on_release(req, checkpointed=checkpointed)

    def pop_prefetch_loaded_span(self, request):
        # Called once per request whose L3 prefetch completed: the tokens it actually got from storage.
        tokens, start = super().pop_prefetch_loaded_span(request)
        self._kvdrive_event(RadixEvent.STORAGE_HIT, tokens)
        return tokens, start

    def _evict(self, *args, **kwargs):  # both evict() and evict_for_alloc() end here
        result = super()._evict(*args, **kwargs)
        self._kvdrive_event(RadixEvent.EVICTED, result.num_tokens_evicted)
        return result

    def _execute_kv_backup(self, *args, **kwargs):
        # Device -> host copies. Host -> storage writes are counted by the storage backend itself.
        host_indices = super()._execute_kv_backup(*args, **kwargs)
        if host_indices is not None:
            self._kvdrive_event(RadixEvent.WRITTEN_BACK, len(host_indices))
        return host_indices

    def init_load_back(self, params):
        result = super().init_load_back(params)
        if result is not None:
            self._kvdrive_event(RadixEvent.LOADED_BACK, result[0])
        return result


def _kvdrive_applies(ctx) -> str | None:
    """Why SGLang's default chain would not build a plain hierarchical UnifiedRadixCache for ``ctx`` (mirrors
    registry.default_radix_cache_factory), or None when it would."""
    from sglang.srt.runtime_context import get_memory

    memory = get_memory()
    if ctx.disable_radix_cache:
        return "the radix cache is disabled"
    for flag in ("enable_lmcache", "enable_unified_cache_external_linker", "enable_flexkv"):
        if getattr(memory, flag, False):
            return f"--{flag.replace('_', '-')} selects another cache"
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or getattr(ctx, "is_dsa", False):
        return "hybrid (SWA/SSM) and DSA models keep host pools kvdrive does not store yet"
    return None


def build_tree_cache(ctx):
    """The registered factory: SGLang's default cache, as KvdriveUnifiedRadixCache where that is the hierarchical
    UnifiedRadixCache."""
    if not ctx.enable_hierarchical_cache:
        log.warning(
            "kvdrive: --radix-cache-backend kvdrive needs --enable-hierarchical-cache (use --kv-tier kvdrive); "
            "running SGLang's default radix cache without kvdrive"
        )
        return registry.default_radix_cache_factory(ctx)
    why = _kvdrive_applies(ctx)
    if why is not None:
        cache = registry.default_radix_cache_factory(ctx)
        log.warning(
            "kvdrive: %s, so SGLang's %s runs as in plain SGLang (no kvdrive radix cache)", why, type(cache).__name__
        )
        return cache
    cache = registry.create_unified_radix_cache(ctx, cache_class=KvdriveUnifiedRadixCache)
    log.info(
        "kvdrive: radix cache %s on tree core %r (storage keys tagged with their tenant id)",
        type(cache).__name__,
        TREE_CORE,
    )
    return cache


def wrap_host_transfers(host, lazy) -> None:
    """``--kvdrive-gpu-decompress`` on this generation's host pool (kvdrive_sglang/gpu_decompress.py): the
    L2TransferEngine's per-layer load (``load_to_device_per_layer_physical``, layers 0..n on the host-to-device
    stream, a draft folded into the pool with ``is_draft``) loads recorded pages compressed and copies only the
    others; a backup from the device into slots drops their records. Wrapped on the instance: SGLang's class and
    every other pool stay as they are.

    The plain ``load_to_device_per_layer`` (what the physical one calls; HiSparse's coordinator calls it directly) is
    wrapped too: called from anywhere but the physical wrapper, it decodes recorded slots among its indices on the
    host first, so no path copies a recorded slot's stale bytes (slower there, never wrong)."""
    import threading

    load, plain = host.load_to_device_per_layer_physical, host.load_to_device_per_layer
    inside = threading.local()  # set while the physical wrapper runs SGLang's load (which calls the plain one)
    backups = {
        name: getattr(host, name) for name in ("backup_from_device_all_layer_physical", "backup_from_device_all_layer")
    }

    def load_to_device_per_layer_physical(device_pool, host_indices, device_indices, layer_id, io_backend, **kw):
        try:
            host_indices, device_indices = lazy.before_load(
                host_indices, device_indices, layer_id, bool(kw.get("is_draft", False))
            )
        except Exception:  # a bug here must not break SGLang's load: every recorded page is decoded on the host
            log.exception("kvdrive: gpu-decompress load hook failed; decoding the transfer's pages on the host")
            lazy.materialize_indices(host_indices)
        if host_indices.numel():
            inside.on = True
            try:
                load(device_pool, host_indices, device_indices, layer_id, io_backend, **kw)
            finally:
                inside.on = False

    def load_to_device_per_layer(device_pool, host_indices, device_indices, layer_id, io_backend, **kw):
        if not getattr(inside, "on", False):
            lazy.materialize_indices(host_indices)
        return plain(device_pool, host_indices, device_indices, layer_id, io_backend, **kw)

    def backup_wrapper(original):
        def backup(device_pool, host_indices, device_indices, io_backend, **kw):
            lazy.forget(host_indices)
            return original(device_pool, host_indices, device_indices, io_backend, **kw)

        return backup

    host.load_to_device_per_layer_physical = load_to_device_per_layer_physical
    host.load_to_device_per_layer = load_to_device_per_layer
    for name, original in backups.items():
        setattr(host, name, backup_wrapper(original))


class _UnifiedAdapter:
    name = "unified"
    key_scheme = "sglang-ns-v1"  # SGLang's namespace-seeded chains (storage_namespace_seed) + kvdrive's tenant tag

    build_tree_cache = staticmethod(build_tree_cache)
    wrap_host_transfers = staticmethod(wrap_host_transfers)

    def register_key_hooks(self) -> None:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(_STORAGE_HASH_TARGET, _around_get_storage_hash_str, HookType.AROUND)
        if tree_core_registry.get_tree_core_factory(TREE_CORE) is None:
            tree_core_registry.register_tree_core_backend(TREE_CORE, _tree_core_factory)

    def namespace_fields(self) -> dict[str, str]:
        return {"keys": self.key_scheme}

    def request_slot(self, req):
        kv = getattr(req, "kv", None)
        return getattr(kv, "req_pool_idx", None)


ADAPTER = _UnifiedAdapter()
