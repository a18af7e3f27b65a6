"""The ``kvdrive`` radix-cache backend (``--radix-cache-backend kvdrive``, set by ``--kv-tier kvdrive``): what it adds
to SGLang's hierarchical radix cache, the same on every supported SGLang version.

SGLang's cache class differs by version (``HiRadixCache`` up to 0.5.20, ``UnifiedRadixCache`` from 0.5.21); each has
an adapter in ``kvdrive_sglang.compat`` that subclasses it with :class:`KvdriveCacheMixin` and overrides only the
methods whose names and signatures are its own. What the mixin adds, on both:

1. **Tenant-tagged storage keys.** Every storage key of a salted request carries its tenant id after the 64-hex
   chain hash (80 hex digits in all), so the storage backend knows each page's tenant (namespace, TTL, encryption
   key) even for keys SGLang computes on its I/O threads. SGLang's ``get_hash_str`` refuses (or, from 0.5.20,
   silently mis-reads) an 80-digit prior; kvdrive hooks that one function (an AROUND hook in SGLang's plugin hook
   registry): a tagged prior is split, the chain continues from its 64-digit hash, and the tag is appended to each
   result; any other call is passed through untouched. Where a chain starts (the tenant's root prior) is the
   adapter's business: kvdrive salts it on SGLang versions that do not, and only tags SGLang's own salted seed on
   versions that salt storage keys themselves (no double salting).
2. **Value-ordered eviction** (:class:`PromoterEviction`) where SGLang's default LRU was asked for.
3. **Reports** to kvdrive's storage backend (:class:`kvdrive_sglang.contract.RadixReports`): whole finished requests
   with their attention mass, pages leaving SGLang's host pool, and radix events.
4. **Rank consistency**: with several TP/PP ranks the promoter's inputs are synchronised (see _kvdrive_sync) so every
   rank evicts alike.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import numpy as np
import torch

from .attention_capture import CAPTURE
from .contract import RadixEvent, RadixReports, RankClock
from .tier.tenants import CHAIN_HEX, ID_HEX

log = logging.getLogger("kvdrive.sglang")

BACKEND_NAME = "kvdrive"
EVENT_KINDS = tuple(e.value for e in RadixEvent)

_TAGGED = CHAIN_HEX + ID_HEX
_SCORE_ATTR = "_kvdrive_score"  # tree-node attribute: (promoter, its group_score of the node's pages)
_HASH_TARGET = "sglang.srt.mem_cache.utils.get_hash_str"
# eviction priority of pages awaiting use, less their load sequence: above every promoter score (log2 scale, ~1e7 at
# most) and exact in a float for any sequence number a server reaches
AWAITING_FLOOR = 1e15


def tagged_hash(hash_fn, token_ids, prior_hash=None, page_size=None):
    """SGLang's page hash chain, carrying a tenant tag: a prior of 64 + 16 hex digits continues the chain from its
    first 64 and appends its last 16 to every result; any other prior is SGLang's own call, unchanged."""
    if type(prior_hash) is str and len(prior_hash) == _TAGGED:
        tag = prior_hash[CHAIN_HEX:]
        out = hash_fn(token_ids, prior_hash[:CHAIN_HEX], page_size=page_size)
        return [h + tag for h in out] if isinstance(out, list) else out + tag
    return hash_fn(token_ids, prior_hash, page_size=page_size)


def _sglang_get_hash_str():
    from sglang.srt.mem_cache.utils import get_hash_str

    return getattr(get_hash_str, "__wrapped__", get_hash_str)  # SGLang's own function, never our hook


def kvdrive_hash(token_ids, prior_hash=None, page_size=None):
    """``get_hash_str`` that understands tagged priors (see tagged_hash)."""
    return tagged_hash(_sglang_get_hash_str(), token_ids, prior_hash, page_size)


def _around_get_hash_str(original, token_ids, prior_hash=None, page_size=None):
    return tagged_hash(original, token_ids, prior_hash, page_size)


def hash_hook_active() -> bool:
    """Whether SGLang's get_hash_str (as its modules call it) accepts tagged priors."""
    from sglang.srt.mem_cache import utils

    try:
        return utils.get_hash_str([0], "0" * _TAGGED, page_size=1) == kvdrive_hash([0], "0" * _TAGGED, 1)
    except Exception:  # noqa: BLE001 - SGLang's own refuses the prior (ValueError) or its native hash does
        return False


def ensure_hash_hooks() -> None:
    """The plugin registers the key hooks in the processes of a server that selected kvdrive, and SGLang applies
    them (load_plugins); a cache built without that (an embedding that registers the backend by hand, tests) registers
    and applies them here, before its controller picks up the hash functions."""
    if _hooks_registered and hash_hook_active():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry

    register_hash_hooks()
    HookRegistry.apply_hooks()
    if not hash_hook_active():
        raise RuntimeError(
            f"kvdrive: the tenant-key hook on {_HASH_TARGET} could not be applied; kvdrive's radix "
            "cache cannot tag storage keys by tenant"
        )


_hooks_registered = False


def register_hash_hooks() -> None:
    """Register the tagged-prior hook on get_hash_str, and the adapter's own key hooks (applied by SGLang)."""
    global _hooks_registered
    if _hooks_registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .compat import radix_adapter

    HookRegistry.register(_HASH_TARGET, _around_get_hash_str, HookType.AROUND)
    radix_adapter().register_key_hooks()
    _hooks_registered = True


class PromoterEviction:
    """GPU (and host) eviction order by the promoter's value (decayed attention mass x reuse / reload cost) instead
    of LRU. Duck-typed as SGLang's ``EvictionStrategy`` (its one method, ``get_priority``).

    A node's priority is the promoter's score of its pages where the promoter knows them. A node it does not know
    (never part of a finished request: rare among evictable nodes) gets, on a single rank whose SGLang stamps nodes
    with monotonic time, the score the promoter gives an access at the node's last access time with its hit count,
    so known and unknown nodes interleave on one scale; otherwise (several ranks, whose clocks differ, or an SGLang
    whose access stamps are a logical counter) it goes first, in SGLang's own order (last access), which every rank
    agrees on. Scores are time-invariant, so heap entries SGLang built earlier in an eviction stay valid. Without a
    promoter (storage off) this is SGLang's LRU.

    Above all of those, on a single rank: nodes whose pages kvdrive just loaded into SGLang's host pool for a request
    that has not run yet (kvdrive_sglang/awaiting_use.py), the latest loaded evicted first. SGLang's LRU took the
    earliest, whose requests run next.

    SGLang asks for the priority of every evictable leaf on every eviction, so a node's promoter score is kept on
    the node (``_kvdrive_score``) until a finished request through it makes it stale (KvdriveCacheMixin._kvdrive_stale):
    each eviction then costs O(1) per leaf, not a walk over every page of every leaf (issue 15: 10^5-10^6 steps per
    eviction at page size 1; guarded by tests/sglang/test_page1_costs.py)."""

    def __init__(self, cache: KvdriveCacheMixin, *, access_is_monotonic_time: bool):
        self.cache = cache
        self.access_is_monotonic_time = access_is_monotonic_time

    def get_priority(self, node) -> float:
        backend = self.cache._kvdrive_backend()
        promoter = None if backend is None else backend.promoter
        if promoter is None:
            return node.last_access_time
        awaiting = getattr(backend, "awaiting", None)
        if awaiting is not None and node.hash_value and not self.cache._kvdrive_ranks:
            # loaded for a request still waiting to run: evicted last, the latest loaded first (awaiting_use.py).
            # One rank only: load order is each rank's own, and every rank must evict alike
            loaded = awaiting.order(node.hash_value[0])
            if loaded is not None:
                return AWAITING_FLOOR - loaded
        if node.hash_value:
            kept = getattr(node, _SCORE_ATTR, None)
            if kept is not None and kept[0] is promoter:
                score = kept[1]
            else:
                score = promoter.group_score(node.hash_value)
                setattr(node, _SCORE_ATTR, (promoter, score))
            if score:
                return score
        if self.cache._kvdrive_ranks or not self.access_is_monotonic_time:
            return 0.0
        wall = time.time() - (time.monotonic() - node.last_access_time)
        return promoter.access_score(wall, max(int(getattr(node, "hit_count", 0)), 1))


class KvdriveCacheMixin:
    """What kvdrive adds to SGLang's hierarchical radix cache, on every version (see the module docstring). The
    adapter class lists it before SGLang's cache class, calls _kvdrive_init_state before SGLang's __init__ and
    _kvdrive_started after it, and routes SGLang's version-specific calls to the _kvdrive_* methods below."""

    # Several ranks (TP/PP): check_hicache_events calls between two syncs of the promoter's inputs (SGLang's
    # scheduler calls it once per loop iteration on every rank, in step), and pending attention pages that force one.
    _SYNC_EVERY = 8
    _SYNC_MAX_PAGES = 65536

    def _kvdrive_init_state(self) -> None:
        # Set before SGLang's __init__: it calls reset() and may attach the storage backend.
        self._kvdrive_counts = dict.fromkeys(EVENT_KINDS, 0)
        self._kvdrive_warned: set[str] = set()
        self._kvdrive_attached = None  # what SGLang had attached at the last look (see _kvdrive_backend)
        self._kvdrive_bound = None  # ... as kvdrive's contract: None when it is not kvdrive's backend
        self._kvdrive_ranks = False

    def _kvdrive_started(self) -> None:
        """After SGLang's __init__. Several ranks must keep identical trees, so every input of the eviction order
        must be identical on every rank: the promoter's clock is a time the ranks agree on (their clocks averaged at
        each sync) and attention masses, of which each rank sees its own heads (TP) or layers (PP), are summed over
        the ranks before the promoter sees them (_kvdrive_sync). Storage-level observations, made on each rank's I/O
        threads at its own pace, do not feed the promoter when the radix cache reports whole requests
        (KvdriveStorage._observe)."""
        self._kvdrive_ranks = self.tp_world_size > 1 or self.pp_size > 1
        self._kvdrive_now = time.time()
        self._kvdrive_pending: list[tuple[list[str], Any]] = []  # finished requests' (keys, mass) since the last sync
        self._kvdrive_pending_pages = 0
        self._kvdrive_calls = 0
        if self._kvdrive_ranks:
            self._kvdrive_sync()  # every rank builds its cache at start-up: the first agreed time
        self._kvdrive_attached = None  # bind again: a backend SGLang attached during its __init__ was bound before
        self._kvdrive_backend()  # the ranks were known (its promoter's clock)

    # ------------------------------------------------------------------------------------------ the storage backend

    def _kvdrive_backend(self) -> RadixReports | None:
        """kvdrive's storage backend, looked up each time (SGLang can attach and detach one at runtime); None when
        the attached backend is not kvdrive's. A new one is told that this cache reports whole requests and, with
        several ranks, to run its promoter on the ranks' agreed clock: before it serves any page, as the cache looks
        it up on every event."""
        attached = getattr(getattr(self, "cache_controller", None), "storage_backend", None)
        if attached is self._kvdrive_attached:  # the common case: checked once per attachment, not per call (the
            return self._kvdrive_bound  # eviction order asks for every node it ranks)
        self._kvdrive_attached = attached
        backend = self._kvdrive_bound = attached if isinstance(attached, RadixReports) else None
        if backend is not None:
            backend.expect_whole_requests()
            if self._kvdrive_ranks and isinstance(backend.promoter, RankClock):
                backend.promoter.set_clock(self._kvdrive_clock)
        self._kvdrive_on_bind(backend)
        return backend

    def _kvdrive_on_bind(self, backend: RadixReports | None) -> None:
        """A storage backend was attached (or detached: None); adapters that keep per-backend state refresh it."""

    def _kvdrive_tenants(self):
        """The operator's tenant policy (share_as groups), from kvdrive's storage backend; None without one."""
        backend = self._kvdrive_backend()
        return None if backend is None else backend.tenants

    def _kvdrive_report(self, what: str, call, *args) -> None:
        """Call ``call(*args)`` on the storage backend: statistics and hints must never take the scheduler down."""
        try:
            call(*args)
        except Exception:  # statistics and hints must never take the scheduler down
            if what not in self._kvdrive_warned:
                self._kvdrive_warned.add(what)
                log.warning("kvdrive: storage backend %s failed (further failures are not logged)", what, exc_info=True)

    # ------------------------------------------------------------------------------------------ ranks

    def _kvdrive_clock(self) -> float:
        """The promoter's clock with several ranks: the wall time the ranks agreed on at the last sync."""
        return self._kvdrive_now

    def _kvdrive_sync(self) -> None:
        """One collective over SGLang's cache groups (its own _all_reduce: TP, attention CP/TP, then PP): the ranks'
        wall clocks, averaged into the time they all use until the next sync, and the attention masses of the
        requests finished since the last sync, summed over ranks (each rank sees its own heads). The pending list is
        the same on every rank (the same requests finish in the same order), so the payload lines up."""
        pending, self._kvdrive_pending, self._kvdrive_pending_pages = self._kvdrive_pending, [], 0
        payload = torch.zeros(2 + sum(len(u) for u, _, _ in pending), dtype=torch.float64)
        payload[0], payload[1] = 1.0, time.time()
        off = 2
        for units, mass, _ in pending:  # per tracked unit of the promoter (_kvdrive_finished), not per page
            if mass is not None:
                n = min(len(units), len(mass))
                payload[off : off + n] = torch.from_numpy(np.ascontiguousarray(mass[:n], dtype=np.float64))
            off += len(units)
        self._all_reduce(payload, torch.distributed.ReduceOp.SUM)
        self._kvdrive_now = float(payload[1]) / float(payload[0])
        summed = payload[2:].tolist()
        off = 0
        for units, _, leaf in pending:
            key_mass = {k: m for k, m in zip(units, summed[off : off + len(units)]) if m > 0.0}
            off += len(units)
            if key_mass:
                self._kvdrive_attention(key_mass)
                self._kvdrive_stale(leaf)

    def check_hicache_events(self, *args, **kwargs):
        result = super().check_hicache_events(*args, **kwargs)
        self._kvdrive_backend()
        if self._kvdrive_ranks:
            self._kvdrive_calls += 1
            if self._kvdrive_calls % self._SYNC_EVERY == 0 or self._kvdrive_pending_pages > self._SYNC_MAX_PAGES:
                self._kvdrive_sync()
        return result

    # ------------------------------------------------------------------------------------------ events and reports

    def kvdrive_stats(self) -> dict:
        """Tokens per radix event since start (kinds: EVENT_KINDS)."""
        return dict(self._kvdrive_counts)

    def _kvdrive_event(self, kind: RadixEvent, tokens: int) -> None:
        tokens = int(tokens)
        if tokens <= 0:
            return
        self._kvdrive_counts[kind.value] += tokens
        backend = self._kvdrive_backend()
        if backend is not None:
            self._kvdrive_report("record_radix_event", backend.record_radix_event, kind.value, tokens)

    def _kvdrive_report_hits(self, req) -> None:
        # Hits per tier are taken from SGLang's own per-request breakdown (ScheduleBatch.prepare_for_extend sets
        # cached_tokens_device/host/storage once, on the first prefill chunk). match_prefix runs many times per
        # request (queue admission, priority passes, every scheduling round), so counting there would overcount.
        # Storage hits are reported when the prefetch result is handed over (the adapter's pop_prefetch_*).
        if getattr(req, "_kvdrive_hits_reported", False) or not getattr(req, "_cache_breakdown_computed", False):
            return
        req._kvdrive_hits_reported = True
        self._kvdrive_event(RadixEvent.DEVICE_HIT, getattr(req, "cached_tokens_device", 0))
        self._kvdrive_event(RadixEvent.HOST_HIT, getattr(req, "cached_tokens_host", 0))

    def _kvdrive_finished(self, keys: list[str], mass, leaf=None) -> None:
        """A finished request's whole chain (prompt and output pages, as they now sit in the tree), the attention
        mass captured for it and the deepest tree node of the chain: one access for the promoter, and its attention
        (summed over ranks first). The attention is summed per tracked unit of the promoter here (one step per unit,
        not per page: pages of one token are tracked in runs, tier/promoter.py), and so is the payload of the sync
        over ranks."""
        backend = self._kvdrive_backend()
        if not keys or backend is None:
            return
        self._kvdrive_report("record_request", backend.record_request, keys)
        self._kvdrive_stale(leaf)
        if self._kvdrive_ranks:
            if CAPTURE.every:  # the same on every rank (environment), so the sync's payload lines up
                units, unit_mass = self._kvdrive_unit_mass(backend, keys, mass)
                self._kvdrive_pending.append((units, unit_mass, leaf))  # summed over ranks at the next sync
                self._kvdrive_pending_pages += len(units)
        elif mass is not None:
            units, unit_mass = self._kvdrive_unit_mass(backend, keys, mass)
            self._kvdrive_attention(dict(zip(units, unit_mass.tolist())))

    @staticmethod
    def _kvdrive_unit_mass(backend, keys: list[str], mass) -> tuple[list[str], np.ndarray | None]:
        """The promoter's units along ``keys`` (a key naming each) and ``mass`` (per page, or None) summed per unit.
        The units are the same on every rank (the promoter's state is), so summed payloads line up."""
        units, starts = backend.promoter.units_of(keys)
        if mass is None:
            return units, None
        n = min(len(keys), len(mass))
        cut = bisect.bisect_left(starts, n)
        if cut == 0:
            return [], np.zeros(0)
        per_unit = np.add.reduceat(np.ascontiguousarray(mass[:n], dtype=np.float64), np.asarray(starts[:cut]))
        return units[:cut], per_unit

    def _kvdrive_stale(self, leaf) -> None:
        """The promoter just observed the pages from the root to ``leaf``: the eviction scores kept on those nodes
        (PromoterEviction) are stale. O(depth)."""
        node = leaf
        while node is not None:
            if getattr(node, _SCORE_ATTR, None) is not None:
                setattr(node, _SCORE_ATTR, None)
            node = node.parent

    def _kvdrive_attention(self, key_mass: dict) -> None:
        backend = self._kvdrive_backend()
        if backend is not None:
            self._kvdrive_report("record_attention", backend.record_attention, key_mass)

    def _kvdrive_host_evicted(self, keys: list[str]) -> None:
        """Pages leaving SGLang's host pool: from now on a request for them reloads from kvdrive's tiers, so the
        promoter may bring the valuable ones back up into kvdrive's DRAM ahead of demand."""
        backend = self._kvdrive_backend()
        if keys and backend is not None and self.enable_storage:
            self._kvdrive_report("record_host_evicted", backend.record_host_evicted, list(keys))


def register() -> None:
    """Register the ``kvdrive`` radix-cache backend's name with SGLang (through the adapter for the installed
    SGLang): a registry entry only, called when a server selects it; its key hooks are ``register_hash_hooks``.
    Idempotent (the plugin runs once per process)."""
    from sglang.srt.mem_cache import registry

    from .compat import radix_adapter

    if registry.get_radix_cache_factory(BACKEND_NAME) is not None:
        return
    registry.register_radix_cache_backend(BACKEND_NAME, radix_adapter().build_tree_cache)
