"""kvdrive's radix cache on SGLang's ``HiRadixCache`` generation (0.5.17 - 0.5.20; see kvdrive_sglang/compat).

The factory builds exactly the cache SGLang's default chain would build, so every model keeps working. Where that cache
is ``HiRadixCache`` (dense models with ``--enable-hierarchical-cache``) it builds :class:`KvdriveRadixCache` instead, a
subclass with kvdrive's additions (kvdrive_sglang/radix_backend.py) and, specific to this generation:

**Tenant-isolated storage keys.** SGLang names L3 pages by a SHA-256 chain over token ids that leaves out the
request's ``extra_key`` (cache salt, LoRA id, ...), so two tenants sending the same prompt share storage pages (the
sglang#37160 bug class). Here a chain whose node carries a non-empty ``extra_key`` starts from the tenant's root prior
(tier/tenants.py: a SHA-256 of the salt, or of its operator-set ``share_as`` group) followed by the tenant id, and the
tagged-prior hook (radix_backend) carries the tag down the chain. Unsalted chains are left exactly as SGLang computes
them. SGLang hashes pages in several places (``compute_node_hash_values`` on insert, the controller's
``_storage_hit_query`` on its prefetch thread, KV events), all through ``mem_cache.utils.get_hash_str``.

Everything is done by overriding methods and calling ``super()``: no SGLang source is patched and no method body is
copied (the factory mirrors the branch conditions of SGLang 0.5.17's default chain, see _default_builds_hiradix).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from sglang.srt.disaggregation.kv_events import StorageMedium
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.hiradix_cache import HiRadixCache
from sglang.srt.mem_cache.radix_cache import RadixKey

from ..attention_capture import CAPTURE
from ..contract import RadixEvent
from ..radix_backend import KvdriveCacheMixin, PromoterEviction, ensure_hash_hooks, kvdrive_hash
from ..tier.tenants import Tenants

log = logging.getLogger("kvdrive.sglang")

_KEYED = "_kvdrive_keyed"  # TreeNode attribute: hash_value already holds kvdrive's chain for this node
_UNKNOWN = object()
_NO_POLICY = Tenants()  # no operator policy (a storage backend other than kvdrive's): every salt on its own


class KvdriveRadixCache(KvdriveCacheMixin, HiRadixCache):
    """HiRadixCache with kvdrive's additions and salted storage keys (see the module docstring)."""

    # Salts of recently matched requests, by rid: prefetch_from_storage gets only a rid and, when nothing matched,
    # the root node, whose key carries no extra_key. Bounded (LRU); a request's salt never changes.
    _SALT_MEMORY = 16384

    def __init__(self, params, server_args):
        self._kvdrive_init_state()
        self._kvdrive_salt_by_rid: OrderedDict[str, Any] = OrderedDict()
        self._kvdrive_last_salt = None
        ensure_hash_hooks()  # before super().__init__: the storage controller takes get_hash_str when it attaches
        super().__init__(params=params, server_args=server_args)
        if self.eviction_policy == "lru":  # value-ordered eviction only where SGLang's default LRU was asked for
            self.eviction_strategy = PromoterEviction(self, access_is_monotonic_time=True)
        self._kvdrive_started()

    def _kvdrive_root_prior(self, salt) -> str | None:
        """Where a chain of ``salt``'s pages starts (tagged with its tenant id); None when unsalted. The operator's
        share_as groups come from kvdrive's storage backend, looked up each time (it can be attached at runtime)."""
        policy = self._kvdrive_tenants()
        return (policy if isinstance(policy, Tenants) else _NO_POLICY).root_prior(salt)

    # ------------------------------------------------------------------------------- SGLang's calls, this generation

    def cache_unfinished_req(self, req, *args, **kwargs):
        result = super().cache_unfinished_req(req, *args, **kwargs)
        self._kvdrive_report_hits(req)
        return result

    def cache_finished_req(self, req, *args, **kwargs):
        mass = CAPTURE.pop(getattr(req, "req_pool_idx", None))  # before super(): it frees the request's pool slot
        result = super().cache_finished_req(req, *args, **kwargs)
        # the request's whole chain as it now sits in the tree (prompt and output pages): req.last_node marks only
        # what the last cache_unfinished_req inserted (none of a request that finished at its prefill)
        keys, leaf = (
            self._kvdrive_chain_keys(self._kvdrive_finished_key(req, kwargs.get("kv_len_to_handle")))
            if self.enable_storage
            else ([], None)
        )
        self._kvdrive_report_hits(req)
        self._kvdrive_finished(keys, mass, leaf)
        return result

    def _kvdrive_finished_key(self, req, kv_len):
        """The page-aligned RadixKey SGLang's cache_finished_req inserts for ``req`` (radix_cache.py, 0.5.17)."""
        token_ids = req.origin_input_ids + req.output_ids
        if kv_len is not None:
            token_ids = token_ids[:kv_len]
        return RadixKey(token_ids, req.extra_key, is_bigram=self.is_eagle).page_aligned(self.page_size)

    def _kvdrive_chain_keys(self, key) -> tuple[list[str], Any]:
        """Storage keys of the pages of ``key`` held in the tree, in sequence order, from the root as far as the
        tree holds them, and the deepest node they reach (None: none). Read-only: unlike match_prefix it splits no
        node and stamps no access time."""
        node, ps, out, leaf = self.root_node, self.page_size, [], None
        while len(key):
            child = node.children.get(key.child_key(ps))
            if child is None:
                break
            n = child.key.match(key, page_size=ps)
            if not child.hash_value:
                break  # not hashed (storage attached later): nothing below it is either
            self._kvdrive_fix_keys(child)
            out.extend(child.hash_value[: n // ps])
            leaf = child
            if n < len(child.key):
                break
            node, key = child, key[n:]
        return out, leaf

    def pop_prefetch_loaded_tokens(self, req_id: str) -> int:
        # Called once per request whose L3 prefetch completed: the tokens it actually got from storage.
        tokens = super().pop_prefetch_loaded_tokens(req_id)
        self._kvdrive_event(RadixEvent.STORAGE_HIT, tokens)
        return tokens

    def evict(self, params):
        result = super().evict(params)
        self._kvdrive_event(RadixEvent.EVICTED, result.num_tokens_evicted)
        return result

    def write_backup(self, node, write_back: bool = False) -> int:
        # Device -> host copies (write-through on hit, or staging on write-back eviction). Host -> storage writes
        # are counted by the storage backend itself.
        tokens = super().write_backup(node, write_back=write_back)
        self._kvdrive_event(RadixEvent.WRITTEN_BACK, tokens)
        return tokens

    def load_back(self, node, mem_quota=None):
        device_indices = super().load_back(node, mem_quota)
        if device_indices is not None:
            self._kvdrive_event(RadixEvent.LOADED_BACK, len(device_indices))
        return device_indices

    # ------------------------------------------------------- salted storage keys

    def _kvdrive_rehash(self, node) -> None:
        """Set node.hash_value, and that of any unhashed ancestors, to kvdrive's chain over the node's whole prefix:
        SGLang's chain, except that a root-level salted node starts from its tenant's root prior."""
        path = [node]
        while path[-1].parent is not self.root_node and not path[-1].parent.hash_value:
            path.append(path[-1].parent)
        for n in reversed(path):
            parent = n.parent
            prior = self._kvdrive_root_prior(n.key.extra_key) if parent is self.root_node else parent.hash_value[-1]
            n.hash_value = kvdrive_hash(n.key, prior, page_size=self.page_size)
            setattr(n, _KEYED, True)

    def _kvdrive_fix_keys(self, node) -> None:
        """Make node.hash_value kvdrive's chain before anything reads it.

        HiRadixCache.insert (0.5.17) computes a new node's hash_value with utils.compute_node_hash_values and
        immediately calls _record_store_event(new_node); host->storage backup reads hash_value only later (on the
        write-through ack). So this runs, via the _record_*_event overrides, before any key leaves the tree.
        Only a root-level salted node needs rehashing: deeper nodes chain from their parent's (already salted and
        tagged) last hash through the hooked get_hash_str, and split nodes keep slices of a tagged chain.
        Recomputing is idempotent (same tokens, same prior), so nodes that reach here again without the marker are
        harmless."""
        if node is self.root_node or node.key is None or getattr(node, _KEYED, False):
            return
        if node.hash_value is None:
            # Nothing has keyed it yet. KV events would compute it lazily with SGLang's unsalted chain: do it here.
            if self.enable_kv_cache_events:
                self._kvdrive_rehash(node)
            return
        parent = node.parent
        if parent is self.root_node:
            if self._kvdrive_root_prior(node.key.extra_key) is not None:
                self._kvdrive_rehash(node)
        elif not parent.hash_value:
            # SGLang chained this node from "no prior" because its parent was never hashed (storage attached at
            # runtime after the parent was inserted): its keys would name a sequence *starting* with these tokens.
            self._kvdrive_rehash(node)

    def _record_store_event(self, node, medium=None):
        self._kvdrive_fix_keys(node)
        super()._record_store_event(node, medium=medium)

    def _record_remove_event(self, node, medium=None):
        self._kvdrive_fix_keys(node)
        super()._record_remove_event(node, medium=medium)
        if medium == StorageMedium.CPU and node.hash_value:
            self._kvdrive_host_evicted(node.hash_value)  # the node's pages leave the host pool

    def match_prefix(self, params):
        result = super().match_prefix(params)
        if self.enable_storage:
            salt = params.key.extra_key
            # query_storage_hit_length gets no rid; SGLang calls it right after this match for the same request.
            self._kvdrive_last_salt = salt
            rid = getattr(params.req, "rid", None)  # the scheduler's matches carry the request
            if rid is not None:
                self._kvdrive_salt_by_rid[rid] = salt
                self._kvdrive_salt_by_rid.move_to_end(rid)
                while len(self._kvdrive_salt_by_rid) > self._SALT_MEMORY:
                    self._kvdrive_salt_by_rid.popitem(last=False)
        return result

    def _kvdrive_chain_start(self, last_host_node, salt) -> str | None:
        """The prior hash for storage keys of tokens that follow last_host_node."""
        if last_host_node is self.root_node:
            return self._kvdrive_root_prior(salt)  # None when unsalted: SGLang's own chain
        if not last_host_node.hash_value:
            self._kvdrive_rehash(last_host_node)
        else:
            self._kvdrive_fix_keys(last_host_node)
        return last_host_node.get_last_hash_value()

    def query_storage_hit_length(self, last_host_node, new_input_tokens, last_hash=None, prefix_keys=None):
        salt = self._kvdrive_last_salt if last_host_node is self.root_node else last_host_node.key.extra_key
        last_hash = self._kvdrive_chain_start(last_host_node, salt)
        return super().query_storage_hit_length(last_host_node, new_input_tokens, last_hash, prefix_keys)

    def prefetch_from_storage(self, req_id, last_host_node, new_input_tokens, last_hash=None, prefix_keys=None):
        at_root = last_host_node is self.root_node
        if at_root:
            salt = self._kvdrive_salt_by_rid.pop(req_id, _UNKNOWN)
            if salt is _UNKNOWN:
                # Guessing a salt could serve one tenant's pages to another: skip this prefetch instead.
                if self.enable_storage and "nosalt" not in self._kvdrive_warned:
                    self._kvdrive_warned.add("nosalt")
                    log.warning(
                        "kvdrive: no prefix match was seen for request %s, so its cache salt is unknown;"
                        " skipping its storage prefetch (further cases are not logged)",
                        req_id,
                    )
                return
        else:
            salt = last_host_node.key.extra_key
        last_hash = self._kvdrive_chain_start(last_host_node, salt)
        super().prefetch_from_storage(req_id, last_host_node, new_input_tokens, last_hash, prefix_keys)
        if at_root and salt is not None and req_id in self.ongoing_prefetch:
            # SGLang gives the prefetched pages the anchor node's extra_key, which is None at the root, so they would
            # be filed in the unsalted part of the tree (visible to every tenant, invisible to this one). The key is
            # a fresh RadixKey owned by this prefetch; the I/O threads hash only its token ids.
            self.ongoing_prefetch[req_id][1].extra_key = salt


def _default_builds_hiradix(ctx) -> bool:
    """Whether SGLang's default chain would build HiRadixCache for this context.

    Mirrors sglang 0.5.17 mem_cache/registry.py default_radix_cache_factory, branch by branch up to the HiRadixCache
    one; every other outcome is left to that function itself."""
    if ctx.effective_chunked_prefill_size is not None and ctx.disable_radix_cache:
        return False  # chunk caches
    if registry.envs.SGLANG_EXPERIMENTAL_CPP_RADIX_TREE.get():
        return False
    if registry.envs.SGLANG_ENABLE_UNIFIED_RADIX_TREE.get() or registry.use_mlx():
        return False
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        return False
    return bool(ctx.enable_hierarchical_cache) and not ctx.is_dsa


def build_tree_cache(ctx):
    """The registered factory: SGLang's default cache, as KvdriveRadixCache where that is HiRadixCache."""
    if not ctx.enable_hierarchical_cache:
        log.warning(
            "kvdrive: --radix-cache-backend kvdrive needs --enable-hierarchical-cache (use --kv-tier kvdrive); "
            "running SGLang's default radix cache without kvdrive"
        )
        return registry.default_radix_cache_factory(ctx)
    if not _default_builds_hiradix(ctx):
        cache = registry.default_radix_cache_factory(ctx)
        log.warning(
            "kvdrive: SGLang uses %s for this model/configuration; kvdrive's tenant-salted storage keys and radix "
            "events apply to HiRadixCache only, so this cache runs as in plain SGLang",
            type(cache).__name__,
        )
        return cache
    cache = KvdriveRadixCache(params=ctx.params, server_args=ctx.server_args)
    # As the default chain does for HiRadixCache: the model runner waits on this counter for per-layer load-back.
    ctx.tp_worker.register_hicache_layer_transfer_counter(cache.cache_controller.layer_done_counter)
    log.info(
        "kvdrive: radix cache %s (storage keys salted by extra_key and tagged with its tenant id)", type(cache).__name__
    )
    return cache


def wrap_host_transfers(host, lazy) -> None:
    """``--kvdrive-gpu-decompress`` on this generation's host pool (kvdrive_sglang/gpu_decompress.py): its per-layer
    load (``HiCacheController.start_loading`` calls ``load_to_device_per_layer`` for layers 0..n on the load stream)
    loads recorded pages compressed and copies only the others; a backup from the device into slots drops their
    records. Wrapped on the instance: SGLang's class and every other pool stay as they are."""
    load, backup = host.load_to_device_per_layer, host.backup_from_device_all_layer

    def load_to_device_per_layer(device_pool, host_indices, device_indices, layer_id, io_backend):
        try:
            host_indices, device_indices = lazy.before_load(host_indices, device_indices, layer_id)
        except Exception:  # a bug here must not break SGLang's load: every recorded page is decoded on the host
            log.exception("kvdrive: gpu-decompress load hook failed; decoding the transfer's pages on the host")
            lazy.materialize_indices(host_indices)
        if host_indices.numel():
            load(device_pool, host_indices, device_indices, layer_id, io_backend)

    def backup_from_device_all_layer(device_pool, host_indices, device_indices, io_backend):
        lazy.forget(host_indices)
        return backup(device_pool, host_indices, device_indices, io_backend)

    host.load_to_device_per_layer = load_to_device_per_layer
    host.backup_from_device_all_layer = backup_from_device_all_layer


class _HiRadixAdapter:
    name = "hiradix"
    key_scheme = "kvdrive-salt-v1"  # unsalted: SGLang's chain; salted: kvdrive's salt prior + tenant tag

    build_tree_cache = staticmethod(build_tree_cache)
    wrap_host_transfers = staticmethod(wrap_host_transfers)

    def register_key_hooks(self) -> None:
        """Nothing beyond the tagged-prior hook: this cache computes salted root priors itself."""

    def namespace_fields(self) -> dict[str, str]:
        return {}  # the scheme every store was written under before SGLang 0.5.21

    def request_slot(self, req):
        return getattr(req, "req_pool_idx", None)


ADAPTER = _HiRadixAdapter()
