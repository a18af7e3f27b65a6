"""The promoter's upkeep on SGLang's path: what it learns between SGLang's calls, and the report tick that acts on it.

``KvdriveStorage`` answers SGLang's calls; this module keeps the promoter's side of them apart from that, so the
backend stays thin. :class:`Upkeep` (one per storage backend, which owns it) collects

- accesses: stores and hits from the storage calls, or whole finished requests and their attention from kvdrive's
  radix cache (then only those: the storage calls run on each rank's I/O threads at its own pace, and with several
  ranks the promoter's state must be the same on every rank, since it orders their radix trees' evictions);
- promotion candidates: pages that left SGLang's host pool (kvdrive's radix cache reports them) and may now sit
  only on disk;

and on each report tick (the metrics reporter's thread, never the scheduler's) hands the promoter's scores to both
tiers (with selective write-down, queueing the pages it now admits for the disk), calibrates the promoter with what
reloads and prefill measurably cost here (kept in the store, so a restarted server reloads or recomputes on
measurements from its first request), and brings the most valuable spilled pages back up from disk into kvdrive's
DRAM tier within a share of the disk's read bandwidth. Each step runs even if another failed (logged once,
counted in ``io.tick_errors``): background upkeep must never stop the reporter.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from .cost_meter import PREFILL, ReloadMeter
from .tier.codec_choice import recompute_gbps
from .tier.engine import TierEngine
from .tier.errors import ConfigError
from .tier.namespace import Namespace
from .tier.promoter import Promoter

log = logging.getLogger("kvdrive.sglang")

ByTenant = Callable[[Sequence[str]], "list[tuple[Namespace, list[int]]]"]


class Upkeep:
    """The promoter's inputs and the report tick's steps for one storage backend.

    Args:
        engine: the backend's tier engine (scores, write-down, promotion, notes).
        promoter: the backend's promoter (shared: the engine's admission and kvdrive's radix cache read it too).
        reload_meter: the backend's storage-reload timer (its fixed round trip calibrates the promoter).
        by_tenant: groups page keys by namespace: ``keys -> [(namespace, positions in keys), ...]``.
        selective: the write policy is selective: admitted pages go down at the tick.
        read_only: this rank never writes (an MLA rank other than the writer): no write-down, no cost notes.
    """

    SPILLED_MAX = 16384  # promotion candidates remembered (keys; the oldest are forgotten first)
    PROMOTE_WINDOW_S = 30.0  # bandwidth left unused longer ago than this is not saved up
    # Pages scored per hold of the promoter's lock on the reporter's thread: the scheduler's thread reports finished
    # requests to the same promoter, and at page size 1 a tick can score 10^6 pages; in one piece that held the lock
    # (and the GIL) for seconds and stalled request finishes by 100s of ms (tests/sglang/test_page1_costs.py)
    SCORE_SLICE = 2048

    def __init__(
        self,
        engine: TierEngine,
        promoter: Promoter,
        reload_meter: ReloadMeter,
        *,
        by_tenant: ByTenant,
        selective: bool,
        read_only: bool,
    ):
        self.engine = engine
        self.promoter = promoter
        self.reload_meter = reload_meter
        self._by_tenant = by_tenant
        self.selective = selective
        self.read_only = read_only
        self.ns: Namespace | None = None  # this server's base namespace (set by bind, on register)
        self.page_size = 0
        self.page_bytes = 0
        self.whole_requests = False  # kvdrive's radix cache reports whole requests (record_request)
        # Pages observed since their score was last handed to the engine, as the observed lists: kept whole, not
        # copied key by key, because a request's report runs on the scheduler's thread and at page size 1 a 32k-token
        # request has 32k pages (issue 15); push_scores, on the reporter's thread, flattens them
        self._scored: list[Sequence[str]] = []
        # Pages that left SGLang's host pool (kvdrive's radix cache reports them), newest last: the candidates the
        # promoter may bring back up from disk into kvdrive's DRAM tier ahead of demand (promote_tick)
        self.spilled: OrderedDict[str, None] = OrderedDict()
        self.last_promote = time.monotonic()
        self._costs_saved: dict | None = None  # measured costs last kept in the store
        self._timing_seen: dict[str, tuple[float, int]] = {}  # tier -> engine (seconds, pages) at the last calibration
        self._counts = Counter()  # promoted_pages, attention_pages, tick_errors (the backend's io figures)
        self._lock = threading.Lock()
        self.closing = False

    def bind(self, ns: Namespace, page_size: int, page_bytes: int) -> None:
        """The host pool is registered: this server's namespace and page geometry are known; costs an earlier run
        measured in the same namespace are loaded.

        Args:
            ns: this server's base namespace (its costs note is named after it).
            page_size: tokens per page.
            page_bytes: bytes of one uncompressed page.
        """
        self.ns, self.page_size, self.page_bytes = ns, int(page_size), int(page_bytes)
        self.load_costs()

    def close(self) -> None:
        """The server is stopping: later ticks bring nothing up from disk."""
        self.closing = True

    def counts(self) -> dict:
        """Counters for the backend's ``io`` figures: ``promoted_pages``, ``attention_pages``, ``tick_errors``."""
        with self._lock:
            return dict(self._counts)

    # --- accesses ------------------------------------------------------------------------------------------------
    def observe(self, keys: Sequence[str], *, use: bool) -> None:
        """Stores and hits from the storage calls (``use``: count it as a reuse); scores reach the tiers at the next
        tick. Once kvdrive's radix cache reports whole requests, these only mark the keys for scoring (see the
        module docstring).

        Args:
            keys: page keys just stored or hit, in chain order.
            use: a hit (a reuse), not a store.
        """
        if not keys:
            return
        if not self.whole_requests:
            # storage-level calls see part of a request: they must not mark chain ends (whole_request=False)
            self.promoter.observe_access(keys, self.page_size, self.page_bytes, whole_request=False, reuse=use)
        with self._lock:
            self._scored.append(list(keys))  # SGLang's list: not ours to keep

    def expect_whole_requests(self) -> None:
        """kvdrive's radix cache reports every finished request (record_request): from now on storage-level
        calls no longer feed the promoter."""
        self.whole_requests = True

    def record_request(self, keys: list[str]) -> None:
        """A finished request's whole page chain, in prefix order (from kvdrive's radix cache): one access.

        Args:
            keys: the chain's page keys; ignored before the host pool is registered.
        """
        if not keys or self.ns is None:
            return
        self.whole_requests = True
        self.promoter.observe_access(keys, self.page_size, self.page_bytes, whole_request=True)
        with self._lock:
            self._scored.append(keys)

    def record_attention(self, key_mass: dict) -> None:
        """Per-page attention mass of a finished request (from kvdrive's radix cache): the promoter's signal.

        Args:
            key_mass: page key -> attention mass.
        """
        if not key_mass:
            return
        self.promoter.observe_attention(key_mass)
        with self._lock:
            self._scored.append(list(key_mass))
            self._counts["attention_pages"] += len(key_mass)

    # --- promotion candidates ----------------------------------------------------------------------------------
    def record_host_evicted(self, keys: Sequence[str]) -> None:
        """Pages that just left SGLang's host pool (from kvdrive's radix cache): a later request for them reloads
        from kvdrive's tiers, so the valuable ones are worth holding in DRAM rather than only on disk.

        Args:
            keys: their page keys (the most recent :attr:`SPILLED_MAX` are remembered).
        """
        if not keys:
            return
        with self._lock:
            for k in keys:
                self.spilled[k] = None
                self.spilled.move_to_end(k)
            while len(self.spilled) > self.SPILLED_MAX:
                self.spilled.popitem(last=False)

    def loaded(self, keys: Sequence[str]) -> None:
        """Pages just loaded back into SGLang's host pool: no longer promotion candidates.

        Args:
            keys: their page keys.
        """
        if keys and self.spilled:
            with self._lock:
                for k in keys:
                    self.spilled.pop(k, None)

    # --- the report tick -----------------------------------------------------------------------------------------
    def tick(self) -> None:
        """One report tick: scores reach the tiers, measured costs reach the promoter and valuable pages come back
        up from disk; each runs even if another failed (logged once, counted in ``tick_errors``)."""
        for step in (self.push_scores, self.calibrate, self.promote_tick):
            if step == self.promote_tick and self.closing:
                continue  # nothing to bring up for a server that is stopping
            try:
                step()
            except Exception:  # background upkeep must never stop the reporter
                with self._lock:
                    self._counts["tick_errors"] += 1
                    first = self._counts["tick_errors"] == 1
                if first:
                    log.exception(
                        "kvdrive: %s failed on the reporter thread (further failures are counted "
                        "in io.tick_errors, not logged)",
                        step.__name__,
                    )

    def push_scores(self) -> int:
        """Hand the promoter's scores of recently observed pages to both tiers (lowest value leaves first), and
        queue for the disk those of them it now admits.

        Returns:
            Pages scored.
        """
        with self._lock:
            observed, self._scored = self._scored, []
        keys = list(dict.fromkeys(itertools.chain.from_iterable(observed)))
        if keys and self.ns is not None:
            for ns, idx in self._by_tenant(keys):
                for at in range(0, len(idx), self.SCORE_SLICE):
                    part = [keys[i] for i in idx[at : at + self.SCORE_SLICE]]
                    # 0.0: a page the promoter does not know (yet: its request has not finished, or a restart), no
                    # information; handed down it erased the score the tiers held, on disk the one kept across a
                    # restart (tests/tier/test_dram_pool_stored_before_scored.py)
                    scored = [(k, s) for k, s in zip(part, self.promoter.score_of(part)) if s]
                    if scored:
                        self.engine.set_scores(ns, *map(list, zip(*scored)))
                    if self.selective and not self.read_only:
                        # pages admitted since they were stored (reused, continued) go down now: not lost in a crash
                        self.engine.write_down(ns, self.promoter.admitted(part))
                    time.sleep(0)  # let the scheduler's thread in between slices
        return len(keys)

    def calibrate(self) -> None:
        """Hand the promoter what reloads and prefill measurably cost here (see cost_meter): the prefill slope,
        the fixed round trip of a storage reload, and each kvdrive tier's read time per byte since the last call
        (only once enough pages were read to mean something); keep new measurements in the store."""
        s = self.engine.stats()
        tiers = {}
        for tier, seconds, pages in (
            ("dram", s.decode_s, s.hits_dram + s.hits_queued),
            ("disk", s.disk_get_s, s.disk_get_pages),
        ):
            s0, p0 = self._timing_seen.get(tier, (0.0, 0))
            if pages - p0 >= 32:  # else keep measuring over a longer span
                if seconds > s0:
                    tiers[tier] = (seconds - s0) / ((pages - p0) * self.page_bytes)
                self._timing_seen[tier] = (seconds, pages)
        if "dram" in tiers:
            tiers["queued"] = tiers["dram"]
        self.promoter.calibrate(
            prefill_s_per_token=PREFILL.seconds_per_token(),
            tier_s_per_byte=tiers,
            reload_fixed_s=self.reload_meter.fixed_seconds(),
        )
        self.recheck_codec()
        measured = self.promoter.measured()
        nothing = measured == {"tier_s_per_byte": {}}  # never overwrite kept costs with no measurement
        if not nothing and measured != self._costs_saved and self.ns is not None and not self.read_only:
            blob = json.dumps(measured, sort_keys=True).encode()
            if self.engine.put_note(self.costs_note(), blob):
                self._costs_saved = measured

    def recheck_codec(self) -> None:
        """The DRAM tier's codec chosen again on this server's measured prefill (tier/codec_choice.py ``rechoose``):
        the bandwidth a reload must beat is that prefill x this model's KV bytes per token, not the 8B assumption
        the engine started with. Nothing until the prefill is measured (here, or kept from an earlier run)."""
        tok_s, source = self.promoter.costs()["prefill_tokens_per_s"]
        if source != "measured" or not self.page_size:
            return
        per_token = self.page_bytes / self.page_size
        self.engine.recheck_codec(
            recompute_gbps(tok_s, per_token), f"measured prefill {tok_s:.0f} tok/s x {per_token:.0f} B/token"
        )

    def promote_tick(self) -> int:
        """Promotion ahead of demand: bring the most valuable pages that left SGLang's host pool and now sit only
        on disk up into kvdrive's DRAM tier, spending at most ``promote_share`` of the disk's read bandwidth (measured
        or assumed) over the time since the last tick, and only pages whose reload from DRAM beats recomputing
        them and that outrank what the full DRAM pool would evict for them. Runs on the reporter thread, never on
        the scheduler's.

        Returns:
            Pages brought up.
        """
        now = time.monotonic()
        window, self.last_promote = min(now - self.last_promote, self.PROMOTE_WINDOW_S), now
        share = self.promoter.config.promote_share
        if share <= 0 or self.ns is None or self.engine.disk is None:
            return 0
        budget = int(share * self.promoter.costs()["disk_gbps"][0] * 1e9 * window)
        with self._lock:
            keys = list(reversed(self.spilled))  # newest first: on equal value, the most recently spilled win
        if not keys or budget < self.page_bytes:
            return 0
        promoted, gone, left = 0, [], budget
        for ns, idx in self._by_tenant(keys):
            part = [keys[i] for i in idx]
            tiers = self.engine.tiers_of(ns, part)
            gone += [k for k, t in zip(part, tiers) if t != "disk"]  # in memory already, or no longer stored
            picked = self.promoter.prefetch(
                [k for k, t in zip(part, tiers) if t == "disk"], left // self.page_bytes * self.page_bytes
            )
            if not picked:
                continue
            done = self.engine.promote(ns, picked, self.promoter.score_of(picked))
            promoted += done.promoted
            left -= done.promoted * self.page_bytes
            gone += [k for k, t in zip(picked, self.engine.tiers_of(ns, picked)) if t != "disk"]
        with self._lock:
            for k in gone:
                self.spilled.pop(k, None)
            self._counts["promoted_pages"] += promoted
        return promoted

    # --- measured costs kept in the store --------------------------------------------------------------------------
    def costs_note(self) -> str:
        """The store note the measured costs are kept under: one per namespace (model, shapes, layout)."""
        return f"costs:{self.ns.id.hex()}"

    def load_costs(self) -> None:
        """Costs measured by an earlier run of this server (same namespace: model, shapes, layout), so that
        reload-vs-recompute runs on measurements from the first request after a restart."""
        raw = self.engine.get_note(self.costs_note())
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
        log.info(
            "kvdrive: costs measured by an earlier run: prefill %.0f tok/s, reload round trip %.1f ms",
            c["prefill_tokens_per_s"][0],
            c["reload_fixed_s"][0] * 1000,
        )
