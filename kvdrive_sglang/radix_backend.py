"""The ``kvdrive`` radix-cache backend for SGLang 0.5.17 (``--radix-cache-backend kvdrive``, set by ``--kv-tier kvdrive``).

The factory builds exactly the cache SGLang's default chain would build, so every model keeps working. Where that cache
is ``HiRadixCache`` (dense models with ``--enable-hierarchical-cache``) it builds :class:`KvdriveRadixCache` instead, a
subclass that changes two things and nothing else:

1. **Tenant-isolated, tenant-tagged storage keys.** SGLang names L3 pages by a SHA-256 chain over token ids that
   leaves out the request's ``extra_key`` (cache salt, LoRA id, ...), so two tenants sending the same prompt share
   storage pages (the sglang#37160 bug class). Here a chain whose node carries a non-empty ``extra_key`` starts from
   the tenant's root prior (tier/tenants.py: a SHA-256 of the salt, or of its operator-set ``share_as`` group) and
   every key of it carries the tenant id: 64 hex digits of chain hash + 16 of tenant id. So the storage backend knows
   each page's tenant (namespace, TTL, encryption key) even for keys SGLang computes on its I/O threads. Unsalted
   chains are left exactly as SGLang computes them, so pages written by plain SGLang still match.

   SGLang hashes pages in several places (``compute_node_hash_values`` on insert, the controller's
   ``_storage_hit_query`` on its prefetch thread, KV events), all through ``mem_cache.utils.get_hash_str``, which
   refuses an 80-digit prior. kvdrive hooks that one function (an AROUND hook in SGLang's plugin hook registry, the
   same mechanism as its other hooks): a tagged prior is split, the chain continues from its 64-digit hash, and the tag
   is appended to each result; any other call is passed through untouched.
2. **Radix events** (device/host/storage hits, evictions, write-backs, load-backs, in tokens) counted here and
   forwarded to the storage backend when it has ``record_radix_event`` (kvdrive's ``KvdriveStorage``).

Everything is done by overriding methods and calling ``super()``: no SGLang source is patched and no method body is
copied (the factory mirrors the branch conditions of SGLang 0.5.17's default chain, see _default_builds_hiradix).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch

from sglang.srt.disaggregation.kv_events import StorageMedium
from sglang.srt.mem_cache import registry
from sglang.srt.mem_cache.evict_policy import EvictionStrategy
from sglang.srt.mem_cache.hiradix_cache import HiRadixCache
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.utils import get_hash_str

from .attention_capture import CAPTURE
from .tier.tenants import CHAIN_HEX, ID_HEX, Tenants

log = logging.getLogger("kvdrive.sglang")

BACKEND_NAME = "kvdrive"
EVENT_KINDS = ("device_hit", "host_hit", "storage_hit", "evicted", "written_back", "loaded_back")
_SALT_DOMAIN = b"kvdrive-salt\0"
_KEYED = "_kvdrive_keyed"  # TreeNode attribute: hash_value already holds kvdrive's chain for this node
_UNKNOWN = object()


_TAGGED = CHAIN_HEX + ID_HEX
_HASH_TARGET = "sglang.srt.mem_cache.utils.get_hash_str"
_NO_POLICY = Tenants()  # no operator policy (a storage backend other than kvdrive's): every salt on its own


def tagged_hash(hash_fn, token_ids, prior_hash=None, page_size=None):
    """SGLang's page hash chain, carrying a tenant tag: a prior of 64 + 16 hex digits continues the chain from its
    first 64 and appends its last 16 to every result; any other prior is SGLang's own call, unchanged."""
    if type(prior_hash) is str and len(prior_hash) == _TAGGED:
        tag = prior_hash[CHAIN_HEX:]
        out = hash_fn(token_ids, prior_hash[:CHAIN_HEX], page_size=page_size)
        return [h + tag for h in out] if isinstance(out, list) else out + tag
    return hash_fn(token_ids, prior_hash, page_size=page_size)


def kvdrive_hash(token_ids, prior_hash=None, page_size=None):
    """``get_hash_str`` that understands tagged priors (see tagged_hash)."""
    return tagged_hash(_sglang_hash, token_ids, prior_hash, page_size)


_sglang_hash = getattr(get_hash_str, "__wrapped__", get_hash_str)  # SGLang's own function, never our hook


def _around_get_hash_str(original, token_ids, prior_hash=None, page_size=None):
    return tagged_hash(original, token_ids, prior_hash, page_size)


def _hash_hook_active() -> bool:
    """Whether SGLang's get_hash_str (as its modules call it) accepts tagged priors."""
    from sglang.srt.mem_cache import utils

    try:
        return utils.get_hash_str([0], "0" * _TAGGED, page_size=1) == kvdrive_hash([0], "0" * _TAGGED, 1)
    except ValueError:
        return False


def _ensure_hash_hook() -> None:
    """SGLang applies plugin hooks in every process (load_plugins); a cache built without that (an embedding that
    registers the backend by hand) applies them here, before its controller picks up get_hash_str."""
    if _hash_hook_active():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry

    _register_hash_hook()
    HookRegistry.apply_hooks()
    if not _hash_hook_active():
        raise RuntimeError(f"kvdrive: the tenant-key hook on {_HASH_TARGET} could not be applied; kvdrive's radix "
                           "cache cannot tag storage keys by tenant")


_hook_registered = False


def _register_hash_hook() -> None:
    global _hook_registered
    if _hook_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_HASH_TARGET, _around_get_hash_str, HookType.AROUND)
    _hook_registered = True


def salt_prior(extra_key: Any) -> Optional[str]:
    """The prior hash a salted chain starts from: sha256(b"kvdrive-salt\\0" + extra_key), hex; None when unsalted.

    A fixed function of the salt alone, so keys stay identical across restarts and processes (TP ranks)."""
    if extra_key is None or extra_key == "" or extra_key == b"":
        return None
    raw = extra_key if isinstance(extra_key, bytes) else str(extra_key).encode("utf-8")
    return hashlib.sha256(_SALT_DOMAIN + raw).hexdigest()


class PromoterEviction(EvictionStrategy):
    """GPU (and host) eviction order by the promoter's value (decayed attention mass x reuse / reload cost) instead
    of LRU.

    A node's priority is the promoter's score of its pages where the promoter knows them. A node it does not know
    (never part of a finished request: rare among evictable nodes) gets, on a single rank, the score the promoter
    gives an access at the node's last access time with its hit count, so known and unknown nodes interleave on one
    scale; with several ranks, whose clocks differ, it goes first, in SGLang's own order (last access time), which
    every rank agrees on. Scores are time-invariant, so heap entries SGLang built earlier in an eviction stay valid.
    Without a promoter (storage off) this is SGLang's LRU."""

    def __init__(self, cache: "KvdriveRadixCache"):
        self.cache = cache

    def get_priority(self, node) -> float:
        promoter = self.cache._kvdrive_promoter()
        if promoter is None:
            return node.last_access_time
        if node.hash_value:
            score = promoter.group_score(node.hash_value)
            if score:
                return score
        if self.cache._kvdrive_ranks:
            return 0.0
        wall = time.time() - (time.monotonic() - node.last_access_time)  # SGLang stamps nodes with monotonic time
        return promoter.access_score(wall, max(int(getattr(node, "hit_count", 0)), 1))


class KvdriveRadixCache(HiRadixCache):
    """HiRadixCache with salted storage keys and radix events (see the module docstring)."""

    # Salts of recently matched requests, by rid: prefetch_from_storage gets only a rid and, when nothing matched,
    # the root node, whose key carries no extra_key. Bounded (LRU); a request's salt never changes.
    _SALT_MEMORY = 16384
    # Several ranks (TP/PP): check_hicache_events calls between two syncs of the promoter's inputs (SGLang's
    # scheduler calls it once per loop iteration on every rank, in step), and pending attention pages that force one.
    _SYNC_EVERY = 8
    _SYNC_MAX_PAGES = 65536

    def __init__(self, params, server_args):
        # Set before super().__init__: it calls reset() and may attach the storage backend.
        self._kvdrive_counts = dict.fromkeys(EVENT_KINDS, 0)
        self._kvdrive_salt_by_rid: OrderedDict[str, Any] = OrderedDict()
        self._kvdrive_last_salt = None
        self._kvdrive_warned: set[str] = set()
        self._kvdrive_bound = None  # the storage backend last bound (see _kvdrive_backend)
        self._kvdrive_ranks = False
        _ensure_hash_hook()  # before super().__init__: the storage controller takes get_hash_str when it attaches
        super().__init__(params=params, server_args=server_args)
        # Several ranks must keep identical trees, so every input of the eviction order must be identical on every
        # rank: the promoter's clock is a time the ranks agree on (their clocks averaged at each sync) and attention
        # masses, of which each rank sees its own heads (TP) or layers (PP), are summed over the ranks before the
        # promoter sees them (_kvdrive_sync). Storage-level observations, made on each rank's I/O threads at its own
        # pace, do not feed the promoter when the radix cache reports whole requests (KvdriveStorage._observe).
        self._kvdrive_ranks = self.tp_world_size > 1 or self.pp_size > 1
        self._kvdrive_now = time.time()
        self._kvdrive_pending: list[tuple[list[str], Any]] = []  # finished requests' (keys, mass) since the last sync
        self._kvdrive_pending_pages = 0
        self._kvdrive_calls = 0
        if self._kvdrive_ranks:
            self._kvdrive_sync()  # every rank builds its cache at start-up: the first agreed time
        if self.eviction_policy == "lru":  # value-ordered eviction only where SGLang's default LRU was asked for
            self.eviction_strategy = PromoterEviction(self)
        self._kvdrive_backend()

    def _kvdrive_root_prior(self, salt) -> Optional[str]:
        """Where a chain of ``salt``'s pages starts (tagged with its tenant id); None when unsalted. The operator's
        share_as groups come from kvdrive's storage backend, looked up each time (it can be attached at runtime)."""
        policy = getattr(self._kvdrive_backend(), "tenants", None)
        return (policy if isinstance(policy, Tenants) else _NO_POLICY).root_prior(salt)

    def _kvdrive_promoter(self):
        promoter = getattr(self._kvdrive_backend(), "promoter", None)
        return promoter if hasattr(promoter, "access_score") else None

    def _kvdrive_backend(self):
        """The storage backend, looked up each time (SGLang can attach and detach one at runtime). A new kvdrive
        backend is told that this cache reports whole requests and, with several ranks, to run its promoter on the
        ranks' agreed clock: before it serves any page, as the cache looks it up on every event."""
        backend = getattr(getattr(self, "cache_controller", None), "storage_backend", None)
        if backend is not None and backend is not self._kvdrive_bound:
            self._kvdrive_bound = backend
            expect = getattr(backend, "expect_whole_requests", None)
            if expect is not None:
                expect()
            promoter = getattr(backend, "promoter", None)
            if self._kvdrive_ranks and hasattr(promoter, "set_clock"):
                promoter.set_clock(self._kvdrive_clock)
        return backend

    def _kvdrive_clock(self) -> float:
        """The promoter's clock with several ranks: the wall time the ranks agreed on at the last sync."""
        return self._kvdrive_now

    def _kvdrive_sync(self) -> None:
        """One collective over SGLang's cache groups (its own _all_reduce: TP, attention CP/TP, then PP): the ranks'
        wall clocks, averaged into the time they all use until the next sync, and the attention masses of the
        requests finished since the last sync, summed over ranks (each rank sees its own heads). The pending list is
        the same on every rank (the same requests finish in the same order), so the payload lines up."""
        pending, self._kvdrive_pending, self._kvdrive_pending_pages = self._kvdrive_pending, [], 0
        payload = torch.zeros(2 + sum(len(k) for k, _ in pending), dtype=torch.float64)
        payload[0], payload[1] = 1.0, time.time()
        off = 2
        for keys, mass in pending:
            if mass is not None:
                n = min(len(keys), len(mass))
                payload[off:off + n] = torch.from_numpy(np.ascontiguousarray(mass[:n], dtype=np.float64))
            off += len(keys)
        self._all_reduce(payload, torch.distributed.ReduceOp.SUM)
        self._kvdrive_now = float(payload[1]) / float(payload[0])
        summed = payload[2:].tolist()
        off = 0
        for keys, _ in pending:
            key_mass = {k: m for k, m in zip(keys, summed[off:off + len(keys)]) if m > 0.0}
            off += len(keys)
            if key_mass:
                self._kvdrive_attention(key_mass)

    def check_hicache_events(self):
        super().check_hicache_events()
        self._kvdrive_backend()
        if self._kvdrive_ranks:
            self._kvdrive_calls += 1
            if self._kvdrive_calls % self._SYNC_EVERY == 0 or self._kvdrive_pending_pages > self._SYNC_MAX_PAGES:
                self._kvdrive_sync()

    # ---------------------------------------------------------------- events

    def kvdrive_stats(self) -> dict:
        """Tokens per radix event since start (kinds: EVENT_KINDS)."""
        return dict(self._kvdrive_counts)

    def _kvdrive_event(self, kind: str, tokens: int) -> None:
        tokens = int(tokens)
        if tokens <= 0:
            return
        self._kvdrive_counts[kind] += tokens
        # Looked up on every event: the storage backend can be attached and detached at runtime.
        record = getattr(self._kvdrive_backend(), "record_radix_event", None)
        if record is None:
            return
        try:
            record(kind, tokens)
        except Exception:  # statistics must never take the scheduler down
            self._kvdrive_warn_once("event", "kvdrive: storage backend record_radix_event failed", exc_info=True)

    def _kvdrive_warn_once(self, tag: str, msg: str, *args, **kw) -> None:
        if tag not in self._kvdrive_warned:
            self._kvdrive_warned.add(tag)
            log.warning(msg, *args, **kw)

    def _kvdrive_report_hits(self, req) -> None:
        # Hits per tier are taken from SGLang's own per-request breakdown (ScheduleBatch.prepare_for_extend sets
        # cached_tokens_device/host/storage once, on the first prefill chunk). match_prefix runs many times per
        # request (queue admission, priority passes, every scheduling round), so counting there would overcount.
        if getattr(req, "_kvdrive_hits_reported", False) or not getattr(req, "_cache_breakdown_computed", False):
            return
        req._kvdrive_hits_reported = True
        self._kvdrive_event("device_hit", getattr(req, "cached_tokens_device", 0))
        self._kvdrive_event("host_hit", getattr(req, "cached_tokens_host", 0))
        # storage hits are reported when the prefetch result is handed over: pop_prefetch_loaded_tokens

    def cache_unfinished_req(self, req, *args, **kwargs):
        result = super().cache_unfinished_req(req, *args, **kwargs)
        self._kvdrive_report_hits(req)
        return result

    def cache_finished_req(self, req, *args, **kwargs):
        mass = CAPTURE.pop(getattr(req, "req_pool_idx", None))  # before super(): it frees the request's pool slot
        result = super().cache_finished_req(req, *args, **kwargs)
        # the request's whole chain as it now sits in the tree (prompt and output pages): req.last_node marks only
        # what the last cache_unfinished_req inserted (none of a request that finished at its prefill)
        keys = self._kvdrive_chain_keys(self._kvdrive_finished_key(req, kwargs.get("kv_len_to_handle"))) \
            if self.enable_storage else []
        self._kvdrive_report_hits(req)
        if keys:
            self._kvdrive_to_backend("record_request", keys)  # one access of the request's whole chain
            if self._kvdrive_ranks:
                if CAPTURE.every:  # the same on every rank (environment), so the sync's payload lines up
                    self._kvdrive_pending.append((keys, mass))  # summed over ranks at the next sync
                    self._kvdrive_pending_pages += len(keys)
            elif mass is not None:
                n = min(len(keys), len(mass))
                self._kvdrive_attention({k: float(m) for k, m in zip(keys[:n], mass[:n])})
        return result

    def _kvdrive_finished_key(self, req, kv_len):
        """The page-aligned RadixKey SGLang's cache_finished_req inserts for ``req`` (radix_cache.py, 0.5.17)."""
        token_ids = req.origin_input_ids + req.output_ids
        if kv_len is not None:
            token_ids = token_ids[:kv_len]
        return RadixKey(token_ids, req.extra_key, is_bigram=self.is_eagle).page_aligned(self.page_size)

    def _kvdrive_chain_keys(self, key) -> list[str]:
        """Storage keys of the pages of ``key`` held in the tree, in sequence order, from the root as far as the
        tree holds them. Read-only: unlike match_prefix it splits no node and stamps no access time."""
        node, ps, out = self.root_node, self.page_size, []
        while len(key):
            child = node.children.get(key.child_key(ps))
            if child is None:
                break
            n = child.key.match(key, page_size=ps)
            if not child.hash_value:
                break  # not hashed (storage attached later): nothing below it is either
            self._kvdrive_fix_keys(child)
            out.extend(child.hash_value[:n // ps])
            if n < len(child.key):
                break
            node, key = child, key[n:]
        return out

    def _kvdrive_attention(self, key_mass: dict) -> None:
        self._kvdrive_to_backend("record_attention", key_mass)

    def _kvdrive_to_backend(self, method: str, arg) -> None:
        fn = getattr(self._kvdrive_backend(), method, None)
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:  # statistics must never take the scheduler down
            self._kvdrive_warn_once(method, f"kvdrive: storage backend {method} failed", exc_info=True)

    def pop_prefetch_loaded_tokens(self, req_id: str) -> int:
        # Called once per request whose L3 prefetch completed: the tokens it actually got from storage.
        tokens = super().pop_prefetch_loaded_tokens(req_id)
        self._kvdrive_event("storage_hit", tokens)
        return tokens

    def evict(self, params):
        result = super().evict(params)
        self._kvdrive_event("evicted", result.num_tokens_evicted)
        return result

    def write_backup(self, node, write_back: bool = False) -> int:
        # Device -> host copies (write-through on hit, or staging on write-back eviction). Host -> storage writes
        # are counted by the storage backend itself.
        tokens = super().write_backup(node, write_back=write_back)
        self._kvdrive_event("written_back", tokens)
        return tokens

    def load_back(self, node, mem_quota=None):
        device_indices = super().load_back(node, mem_quota)
        if device_indices is not None:
            self._kvdrive_event("loaded_back", len(device_indices))
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
        if medium == StorageMedium.CPU and self.enable_storage and node.hash_value:
            # the node's pages leave the host pool: from now on a request for them reloads from kvdrive's tiers,
            # so the promoter may bring the valuable ones back up into kvdrive's DRAM ahead of demand
            self._kvdrive_to_backend("record_host_evicted", list(node.hash_value))

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

    def _kvdrive_chain_start(self, last_host_node, salt) -> Optional[str]:
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
                if self.enable_storage:
                    self._kvdrive_warn_once(
                        "nosalt", "kvdrive: no prefix match was seen for request %s, so its cache salt is unknown;"
                        " skipping its storage prefetch (further cases are not logged)", req_id)
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
            "running SGLang's default radix cache without kvdrive")
        return registry.default_radix_cache_factory(ctx)
    if not _default_builds_hiradix(ctx):
        cache = registry.default_radix_cache_factory(ctx)
        log.warning(
            "kvdrive: SGLang uses %s for this model/configuration; kvdrive's tenant-salted storage keys and radix events apply to "
            "HiRadixCache only, so this cache runs as in plain SGLang", type(cache).__name__)
        return cache
    cache = KvdriveRadixCache(params=ctx.params, server_args=ctx.server_args)
    # As the default chain does for HiRadixCache: the model runner waits on this counter for per-layer load-back.
    ctx.tp_worker.register_hicache_layer_transfer_counter(cache.cache_controller.layer_done_counter)
    log.info("kvdrive: radix cache %s (storage keys salted by extra_key and tagged with its tenant id)",
             type(cache).__name__)
    return cache


def register() -> None:
    """Register the ``kvdrive`` radix-cache backend with SGLang. Idempotent (the plugin runs once per process)."""
    _register_hash_hook()  # SGLang applies it with the other plugins' hooks
    if registry.get_radix_cache_factory(BACKEND_NAME) is not None:
        return
    registry.register_radix_cache_backend(BACKEND_NAME, build_tree_cache)
