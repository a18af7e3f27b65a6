"""The promoter: where each KV page should live, decided from attention, reuse, recency and reload cost.

Pure Python, no SGLang, no I/O: the SGLang adapters feed it observations and act on its answers. Pages are named
by opaque string keys (SGLang's chained page hashes), so a key names a whole prefix, not just its own tokens.

Inputs
    ``observe_access(keys, tokens_per_page, bytes_per_page)``  a request hit or inserted these pages (reuse += 1,
        recency = now). Pass one request's pages in prefix order.
    ``observe_attention({key: mass})``  attention mass the pages received (softmax mass summed over heads and the
        sampled layers, accumulated over a request's decode steps). Any consistent unit works; the documented
        one is *fraction of one request's attention*: each request adds masses summing to at most 1.

The value of a page
    heat(t)   = M(t) + floor * 2^-((t - t_last_access) / half_life)
                M(t): the attention mass, every observation decaying by half each half-life
    value(t)  = heat(t) * reuse / reload_s
                reload_s = bytes_per_page / disk_gbps: the cost of getting the page back from the persistent tier,
                where an evicted page ends up. For pages of one size it is a constant factor; across page sizes it
                makes value a density (benefit per byte, per second of transfer), which is what a byte-bounded tier
                and a bandwidth-bounded prefetch both spend.

    With no attention signal a page's heat is the floor decayed from its last access, so among pages of equal reuse
    the order is exactly LRU, and a page used r times ranks like one used once log2(r) half-lives later. Attention
    mass lifts a page above the floor: one whose decayed mass is 10x the floor ranks like one accessed 3.3
    half-lives more recently.

    The half-life bounds how long reuse and attention can outweigh recency. bench/promoter_bench.py found the
    default of 120 s (about two think times of an agent session) as good as 600 s on Zipf document reuse and
    clearly better on multi-turn sessions, where a long half-life lets finished sessions' much-reused history
    outrank live sessions' newest turns (LFU pollution).

Tracked units
    The promoter keeps its state per *unit*: a page, or, for pages of fewer than 16 tokens, a run of up to
    ceil(unit_tokens / tokens_per_page) consecutive pages of a chain sharing one state (issue 15). Every page key
    still answers for itself through its unit. Units, their grouping and their bound (``max_tracked``) live in
    tier/page_tracker.py (its module doc says how and why); this module decides what they are worth.

Time-invariant scores
    Every term of heat decays at the same rate, so value(t) * 2^(t / half_life) never changes between observations.
    Its log2 (plus a constant offset) is the page's *score*: a fixed number that orders pages exactly as their value
    does at any later time. Scores handed to ``TierEngine.set_scores`` therefore stay comparable without rescoring,
    also across restarts when the clock is wall time (the default, ``time.time``; the disk tier keeps scores).
    Orderings (``eviction_order``, ``prefetch``) use scores only, so they do not depend on when they are asked.

Decisions
    eviction_order   lowest value first; ties: least recently accessed first (within one access, the later pages
                     of the prefix count as older, so a chain loses its tail first, as in a radix tree).
    admit            selective write-down: reuse >= admit_min_reuse (default 2), or value >= admit_min_value, or
                     the page was created by a *continuation*: a request whose chain runs through the last page of
                     an earlier request (a conversation's next turn, an agent's next step). Such pages will most
                     likely be continued again, so they are admitted at once and count as reused once more in their
                     value; a new question on a cached document does not pass through the previous answer, so it
                     stays a one-off. For this, call observe_access once per request with its whole chain (prompt
                     and output pages).
    prefetch         highest value first within a byte budget (the caller turns bandwidth x time into bytes), only
                     pages whose reload from the target tier would beat recomputing them.
    reload_or_recompute / plan_prefix
                     reload a hit only where that is faster than recomputing its prefill, so a slow tier never makes
                     a request slower than no cache. Reload time is latency + bytes / tier + bytes / PCIe (stages
                     in series: the conservative bound); recompute is tokens / prefill_tokens_per_s (linear: long
                     prefixes cost more than that, which again errs towards recompute, never towards a slow reload).
    codec_for        lossless zstd in DRAM and on disk; int8 on disk only with lossy_ok.

Determinism: decisions depend only on the sequence of observations and the clock readings at them, never on hash
order or on when a decision is asked. Two promoters fed the same trace with the same clock readings agree exactly;
across TP ranks, feed every rank the same (all-reduced) attention and a clock reading all ranks agree on
(``set_clock``): kvdrive's radix cache does both (radix_backend._kvdrive_sync).

Thread-safe: one lock. observe_access is O(1) per unit (plus C-level list work per key); orderings are O(n log n).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from .errors import ConfigError
from .page_tracker import NEG_INF as _NEG_INF
from .page_tracker import PageTracker, Unit, unit_span
from .promoter_config import LOSSY_CODECS, TIERS, Decision, PrefixPlan, PromoterConfig
from .promoter_config import check_tier as _check_tier
from .validate import integer, number

# Re-exported: importers of kvdrive_sglang.tier.promoter keep getting the config and result types from here
__all__ = ["LOSSY_CODECS", "TIERS", "Decision", "PrefixPlan", "Promoter", "PromoterConfig"]

_SCORE_OFFSET = 4096.0  # keeps scores positive: the engine treats score 0 as "no score"
_CHAIN_STEP = 1e-6  # log2 units: a prefix page outranks the pages after it by this much (0.00007 %)
_LN2 = math.log(2.0)
_GB = 1e9


def _lae2(a: float, b: float) -> float:
    """log2(2^a + 2^b) without overflow."""
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a < b:
        a, b = b, a
    return a + math.log1p(2.0 ** (b - a)) / _LN2


class Promoter:
    def __init__(self, config: PromoterConfig | None = None, clock: Callable[[], float] = time.time):
        self.config = config if config is not None else PromoterConfig()
        if not isinstance(self.config, PromoterConfig):
            raise ConfigError(f"promoter config must be a PromoterConfig, got {type(self.config).__name__}")
        self._clock = clock
        self._lock = threading.Lock()
        # the tracked units (page_tracker.py), read and changed only under self._lock
        self.tracker = PageTracker(self.config.max_tracked)
        self._seq = 0
        self._typical_bytes = 0  # bytes of the last page observed: stands in for pages seen only via attention
        self._typical_tokens = 0
        self._typical_span = 1  # pages per unit at the last observed page size
        self._last = None  # (keys, len, runs) of the last observe_access, for units_of
        self._log_floor = math.log2(self.config.attention_floor)
        self._inv_hl = 1.0 / self.config.half_life_s
        self._continuations = 0
        self._accesses = 0
        self._attention = 0
        # Measured costs (calibrate()); None: the config's assumption stands
        self._prefill_s_per_token: float | None = None
        self._tier_s_per_byte: dict[str, float] = {}
        self._reload_fixed_s: float | None = None
        self._remote_fixed_s: float | None = None  # the shared tier's measured round trip (calibrate)

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Read time from ``clock`` from now on (same scale as before: scores stay comparable). Several ranks
        that must decide alike give their promoters a clock they agree on."""
        if not callable(clock):
            raise ConfigError(f"promoter clock must be callable, got {clock!r}")
        self._clock = clock

    # --- measured costs -------------------------------------------------------------------------------------
    def calibrate(
        self,
        *,
        prefill_s_per_token: float | None = None,
        tier_s_per_byte: Mapping[str, float] | None = None,
        reload_fixed_s: float | None = None,
        remote_fixed_s: float | None = None,
    ) -> None:
        """Replace assumptions by what the server measured (None leaves a figure as it is):
        ``prefill_s_per_token`` the marginal prefill cost (slope of forward time over extend tokens);
        ``tier_s_per_byte`` seconds per decoded byte to read a page from "dram"/"queued"/"disk" into SGLang's host
        pool (decode, checksum, disk read); ``reload_fixed_s`` the fixed cost of one storage reload of a request
        (SGLang's prefetch round trip, whatever the page count), charged once per reloaded prefix; "remote" in
        ``tier_s_per_byte`` and ``remote_fixed_s``: the shared tier's read-through as the engine timed it
        (RemoteTieredEngine.remote_cost), its round trip charged on top of the local one."""

        def check(name, v, zero_ok=False):
            return number(v, f"promoter calibrate {name}", zero_ok=zero_ok)

        if prefill_s_per_token is not None:
            prefill_s_per_token = check("prefill_s_per_token", prefill_s_per_token)
        measured = {}
        for tier, v in (tier_s_per_byte or {}).items():
            if tier not in ("dram", "queued", "disk", "remote"):
                raise ConfigError(f"promoter calibrate: tier {tier!r} is not one of dram, queued, disk, remote")
            measured[tier] = check(f"tier_s_per_byte[{tier}]", v)
        if reload_fixed_s is not None:
            reload_fixed_s = check("reload_fixed_s", reload_fixed_s, zero_ok=True)
        if remote_fixed_s is not None:
            remote_fixed_s = check("remote_fixed_s", remote_fixed_s, zero_ok=True)
        with self._lock:
            if remote_fixed_s is not None:
                self._remote_fixed_s = remote_fixed_s
            if prefill_s_per_token is not None:
                self._prefill_s_per_token = prefill_s_per_token
            self._tier_s_per_byte.update(measured)
            if reload_fixed_s is not None:
                self._reload_fixed_s = reload_fixed_s

    def measured(self) -> dict:
        """The measured figures only, as calibrate() takes them (to keep them across a restart)."""
        with self._lock:
            out = {"tier_s_per_byte": dict(self._tier_s_per_byte)}
            if self._prefill_s_per_token is not None:
                out["prefill_s_per_token"] = self._prefill_s_per_token
            if self._reload_fixed_s is not None:
                out["reload_fixed_s"] = self._reload_fixed_s
            if self._remote_fixed_s is not None:
                out["remote_fixed_s"] = self._remote_fixed_s
        return out

    def costs(self) -> dict:
        """The cost figures decisions use now, and where each comes from ("measured" or "assumed")."""
        with self._lock:
            pre, tiers, fixed = self._prefill_s_per_token, dict(self._tier_s_per_byte), self._reload_fixed_s
            remote_fixed = self._remote_fixed_s
        cfg = self.config
        out = {
            "prefill_tokens_per_s": (1.0 / pre, "measured") if pre else (cfg.prefill_tokens_per_s, "assumed"),
            "reload_fixed_s": (fixed, "measured") if fixed is not None else (cfg.disk_latency_s, "assumed"),
        }
        for t in ("dram", "disk", "remote"):
            out[f"{t}_gbps"] = (1.0 / tiers[t] / _GB, "measured") if t in tiers else (cfg.tier_gbps(t), "assumed")
        out["remote_fixed_s"] = (
            (remote_fixed, "measured") if remote_fixed is not None else (cfg.remote_latency_s, "assumed")
        )
        return out

    def _recompute_s_per_token(self) -> float:
        pre = self._prefill_s_per_token
        return pre if pre is not None else 1.0 / self.config.prefill_tokens_per_s

    # --- observations -----------------------------------------------------------------------------------------
    def observe_access(
        self,
        keys: Sequence[str],
        tokens_per_page: int,
        bytes_per_page: int,
        *,
        whole_request: bool = True,
        reuse: bool = True,
    ) -> None:
        """These pages were hit or inserted now: one request's whole chain (prompt and output pages) in prefix
        order. ``whole_request=False`` for partial observations (a storage read or write of some of a request's
        pages): they count reuse and recency but neither mark the end of a chain nor detect a continuation.
        ``reuse=False``: recency and size only (a page being stored is not a use of it; a storage read whose
        request will be observed whole when it finishes must not count twice). Pages of fewer than
        ``unit_tokens`` tokens are tracked in units (module doc): one step per unit, not per page."""
        integer(tokens_per_page, "observe_access tokens_per_page")
        integer(bytes_per_page, "observe_access bytes_per_page")
        span = unit_span(tokens_per_page, self.config.unit_tokens)
        now = self._clock()
        with self._lock:
            runs = self.tracker.track(keys, span)
            # units_of right after this call, for the same list (a finished request's attention): no second walk
            self._last = (keys, len(keys), runs)
            # Continuation: the chain runs through the last page of an earlier request (a conversation's next turn,
            # an agent's next step), so its new pages will most likely be continued in turn.
            cont = False
            if whole_request:
                pos, last = 0, len(keys) - 1
                for p, off, take in runs:
                    inner = take if pos + take <= last else take - 1  # the chain's own last page does not count
                    if inner > 0 and (p.tails >> off) & ((1 << inner) - 1):
                        cont = True
                        break
                    pos += take
            if cont:
                self._continuations += 1
            # the first unit of the prefix gets the newest sequence number: on equal value the tail goes first
            self._seq += len(runs)
            seq = self._seq
            pages = self.tracker.pages
            for p, _, _ in runs:
                pages.move_to_end(p.name)
                if cont and p.reuse == 0:
                    p.extends = True
                p.reuse += 1 if reuse else 0
                p.t_access = now
                p.score = None
                p.seq = seq
                seq -= 1
                p.nbytes = bytes_per_page
                p.tokens = tokens_per_page
            if runs and whole_request:
                p, off, take = runs[-1]
                p.tails |= 1 << (off + take - 1)
            self._typical_bytes = bytes_per_page
            self._typical_tokens = tokens_per_page
            self._typical_span = span
            self._accesses += len(keys)
            self.tracker.bound()

    def observe_attention(self, key_to_mass: Mapping[str, float]) -> None:
        """Add attention mass received by pages now (decays by half every half-life from now on). Pages of one unit
        add to its mass; callers with many small pages sum them per unit first (``units_of``) to save the steps."""
        now_anchor = self._clock() * self._inv_hl
        with self._lock:
            for k, m in key_to_mass.items():
                m = float(m)
                if not m > 0.0:
                    if m == 0.0:
                        continue
                    raise ConfigError(f"attention mass for page {k!r} must be a non-negative number, got {m!r}")
                if not math.isfinite(m):
                    raise ConfigError(f"attention mass for page {k!r} must be finite, got {m!r}")
                p = self.tracker.touch(k)
                p.mass_log = _lae2(p.mass_log, math.log2(m) + now_anchor)
                p.score = None
            self._attention += len(key_to_mass)
            self.tracker.bound()

    def units_of(self, keys: Sequence[str]) -> tuple[list[str], list[int]]:
        """The tracked units along a chain of page keys: each run of consecutive pages of one unit as (a key that
        names the unit, the run's first position in ``keys``); an untracked page is a run of its own. For summing a
        request's per-page attention per unit before observe_attention (and before a sync over ranks)."""
        with self._lock:
            last = self._last
            if last is not None and last[0] is keys and last[1] == len(keys):
                runs = last[2]
            else:
                runs = self.tracker.runs(keys)
        names, starts, pos = [], [], 0
        for p, _, take in runs:
            names.append(keys[pos] if p is None else p.name)
            starts.append(pos)
            pos += take
        return names, starts

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the tracking state of pages (e.g. deleted everywhere): of the whole unit of each."""
        with self._lock:
            for k in keys:
                p = self.tracker.unit(k)
                if p is not None:
                    self.tracker.drop(p)

    # --- values -----------------------------------------------------------------------------------------------
    def value(self, key: str) -> float:
        """heat x reuse / reload seconds (from disk), now. 0 for a page never seen."""
        now_anchor = self._clock() * self._inv_hl
        with self._lock:
            s = self._log_score(self.tracker.unit(key))
        return 0.0 if s == _NEG_INF else 2.0 ** (s - now_anchor)

    def attention_mass(self, key: str) -> float:
        """The page's decayed attention mass now (no floor, no reuse): of a multi-page unit, an even share of the
        unit's (as the attention capture spreads a group's mass over its pages)."""
        now_anchor = self._clock() * self._inv_hl
        with self._lock:
            p = self.tracker.unit(key)
            if p is None or p.mass_log == _NEG_INF:
                return 0.0
            return 2.0 ** (p.mass_log - now_anchor) / (1 if p.members is None else len(p.members))

    def reuse(self, key: str) -> int:
        with self._lock:
            p = self.tracker.unit(key)
            return 0 if p is None else p.reuse

    def score_of(self, keys: Sequence[str], *, chain: bool = False) -> list[float]:
        """Time-invariant scores for ``TierEngine.set_scores`` (lowest evicted first; 0.0 for unknown pages).

        ``chain=True``: the keys are one prefix chain in order (a request's pages). A page is useless without the
        pages before it, so each is raised to just above the highest score after it: the chain then loses its tail
        first, and a valuable late page keeps its whole prefix."""
        raw: list[float] = []
        with self._lock:
            for p, _, take in self.tracker.runs(keys):  # one score per run of a unit's pages
                raw += [self._log_score(p)] * take
        out = [0.0 if s == _NEG_INF else max(s + _SCORE_OFFSET, 1e-9) for s in raw]
        if chain:
            after = 0.0
            for i in range(len(out) - 1, -1, -1):
                if after > 0.0 and out[i] < after + _CHAIN_STEP:
                    out[i] = after + _CHAIN_STEP
                after = out[i]
        return out

    def group_score(self, keys: Sequence[str]) -> float:
        """One score for a group evicted together (a radix node): log2 of the mean page value, same scale as
        score_of. 0.0 when no page is known. One step per unit the pages belong to."""
        with self._lock:
            raw = [(self._log_score(p), take) for p, _, take in self.tracker.runs(keys)]
        if not raw:
            return 0.0
        top = max(s for s, _ in raw)
        if top == _NEG_INF:
            return 0.0
        # log2 of the sum of 2^s over pages, relative to the largest (no overflow); unknown pages (-inf) add 0
        acc = top + math.log2(math.fsum(take * 2.0 ** (s - top) for s, take in raw))
        return max(acc - math.log2(len(keys)) + _SCORE_OFFSET, 1e-9)

    def access_score(self, t_access: float, reuse: int = 1, nbytes: int | None = None) -> float:
        """The score a page the promoter never observed would have, had it been accessed at ``t_access`` (this
        promoter's clock) ``reuse`` times with no attention: so pages it knows and pages it does not (e.g. radix
        nodes not yet written down) rank on one scale, the unknown ones by recency as in LRU. ``nbytes``: of the
        tracked unit (default: a whole unit of the last observed page size)."""
        with self._lock:
            heat = self._log_floor + t_access * self._inv_hl
            size = nbytes or self._typical_bytes * self._typical_span or 1
        reload_s = size / (self.config.disk_gbps * _GB)
        return max(heat + math.log2(max(int(reuse), 1)) - math.log2(reload_s) + _SCORE_OFFSET, 1e-9)

    # --- decisions --------------------------------------------------------------------------------------------
    def eviction_order(self, keys: Iterable[str]) -> list[str]:
        """The keys, lowest value first (unknown pages first); ties: least recently accessed first."""
        with self._lock:
            rows = []
            for k in dict.fromkeys(keys):
                p = self.tracker.unit(k)
                rows.append((self._log_score(p), p.seq if p is not None else -1, k))
        rows.sort()
        return [k for _, _, k in rows]

    def admit(self, key: str) -> bool:
        """Write this page down to DRAM/disk? reuse >= admit_min_reuse, or value >= admit_min_value."""
        cfg = self.config
        with self._lock:
            p = self.tracker.unit(key)
            if p is None:
                return False
            if p.reuse >= cfg.admit_min_reuse or (p.extends and cfg.admit_continuations):
                return True
            if cfg.admit_min_value is None:
                return False
            s = self._log_score(p)
        return s != _NEG_INF and 2.0 ** (s - self._clock() * self._inv_hl) >= cfg.admit_min_value

    def admitted(self, keys: Sequence[str]) -> list[str]:
        """The keys that ``admit`` would write down, decided once per run of a unit's pages."""
        out = []
        pos = 0
        for p, _, take in self._locked_runs(keys):
            if p is not None and self.admit(keys[pos]):
                out += keys[pos : pos + take]
            pos += take
        return out

    def _locked_runs(self, keys: Sequence[str]):
        with self._lock:
            return self.tracker.runs(keys)

    def prefetch(self, candidates: Sequence[str], budget_bytes: int, to_tier: str = "dram") -> list[str]:
        """Candidates to bring up into ``to_tier`` ahead of demand, highest value first, within ``budget_bytes``
        (bandwidth x time).

        A page whose reload from ``to_tier`` would not beat recomputing it is never worth the bandwidth and is left
        out. A candidate that does not fit the remaining budget is skipped and smaller ones after it may still be
        taken. Unknown candidates rank last (at the typical page size). Ties keep the candidates' order."""
        integer(budget_bytes, "prefetch budget_bytes", least=0)
        _check_tier(to_tier)
        per_byte, latency = self._per_byte(to_tier), self._latency(to_tier)
        with self._lock:
            rows = []
            for i, k in enumerate(dict.fromkeys(candidates)):
                p = self.tracker.unit(k)
                nbytes = p.nbytes if p is not None and p.nbytes else self._typical_bytes
                tokens = p.tokens if p is not None and p.tokens else self._typical_tokens
                if tokens and latency + nbytes * per_byte >= tokens * self._recompute_s_per_token():
                    continue  # it would be recomputed rather than reloaded from there anyway
                rows.append((-self._log_score(p), i, k, nbytes))
        rows.sort()
        picked, left = [], budget_bytes
        for _, _, k, nbytes in rows:
            if nbytes <= left:
                picked.append(k)
                left -= nbytes
        return picked

    def reload_or_recompute(self, tokens: int, nbytes: int, tier: str) -> Decision:
        """Reload ``nbytes`` of KV for ``tokens`` tokens from ``tier``, or recompute their prefill: the faster.

        reload_s = latency(tier) + nbytes / tier GB/s + nbytes / PCIe GB/s (none for "gpu"; PCIe only for SGLang's
        uncompressed "host" pool); recompute_s = tokens / prefill_tokens_per_s. Reload only when strictly faster."""
        integer(tokens, "reload_or_recompute tokens", least=0)
        integer(nbytes, "reload_or_recompute nbytes", least=0)
        _check_tier(tier)
        reload_s = self._latency(tier) + nbytes * self._per_byte(tier)
        recompute_s = tokens * self._recompute_s_per_token()
        return Decision("reload" if reload_s < recompute_s else "recompute", reload_s, recompute_s)

    def plan_prefix(self, tiers: Sequence[str], tokens_per_page: int, bytes_per_page: int) -> PrefixPlan:
        """For a prefix hit whose pages sit in ``tiers`` (one entry per page, in prefix order, as
        ``TierEngine.tiers_of`` gives them): how many leading pages to reload. KV of a prefix can only be extended
        at its end, so recomputing page i means recomputing every page after it; this picks the cut with the least
        modelled time (0 = recompute all of them)."""
        integer(tokens_per_page, "plan_prefix tokens_per_page")
        integer(bytes_per_page, "plan_prefix bytes_per_page")
        for t in set(tiers):
            _check_tier(t)
        per_page = {t: bytes_per_page * self._per_byte(t) for t in set(tiers)}
        recompute_page = tokens_per_page * self._recompute_s_per_token()
        n = len(tiers)
        best_k, best_reload, reload_s, used = 0, 0.0, 0.0, set()
        best_cost = n * recompute_page
        once = self._reload_fixed_s is not None  # a measured round trip is paid once per reload, not per tier
        apart = ("gpu", "host", "remote")  # not the local storage round trip: a remote read is one of its own
        for i, t in enumerate(tiers):
            if t not in used and (t == "remote" or not (once and used - set(apart) and t not in apart)):
                reload_s += self._latency(t)
            used.add(t)
            reload_s += per_page[t]
            cost = reload_s + (n - i - 1) * recompute_page
            if cost < best_cost:
                best_k, best_cost, best_reload = i + 1, cost, reload_s
        recompute_s = (n - best_k) * recompute_page
        return PrefixPlan(best_k, best_reload, recompute_s, n * recompute_page - best_cost)

    def codec_for(self, tier: str) -> str:
        """Codec for pages held in ``tier``: raw on GPU and in SGLang's host pool, lossless zstd in the DRAM tier
        (and its write-down queue) and on disk; the configured lossy codec on disk only with lossy_ok."""
        _check_tier(tier)
        if tier in ("gpu", "host"):
            return "raw"
        if tier == "disk" and self.config.lossy_ok:
            return self.config.lossy_codec
        return "zstd"

    def stats(self) -> dict:
        with self._lock:
            return {
                "tracked": len(self.tracker),
                "max_tracked": self.config.max_tracked,
                "forgotten": self.tracker.forgotten,
                "accesses": self._accesses,
                "continuations": self._continuations,
                "attention_updates": self._attention,
            }

    # --- internals --------------------------------------------------------------------------------------------
    def _log_score(self, p: Unit | None) -> float:
        """log2(value(t) * 2^(t / half_life)): constant between observations. -inf for an unknown page."""
        if p is None:
            return _NEG_INF
        if p.score is not None:
            return p.score
        heat = p.mass_log
        if p.t_access is not None:
            heat = _lae2(heat, self._log_floor + p.t_access * self._inv_hl)
        if heat == _NEG_INF:
            return _NEG_INF
        # value per byte of a whole unit: runs of small pages rank as one page of unit_tokens tokens would
        nbytes = p.nbytes * p.span if p.nbytes else self._typical_bytes * self._typical_span or 1
        reload_s = nbytes / (self.config.disk_gbps * _GB)
        reuse = p.reuse + 1 if p.extends else p.reuse
        score = heat + math.log2(max(reuse, 1)) - math.log2(reload_s)
        if p.nbytes:  # a page seen only through attention is sized by the typical page, which can change
            p.score = score
        return score

    def _per_byte(self, tier: str) -> float:
        cfg = self.config
        if tier == "gpu":
            return 0.0
        pcie = 1.0 / (cfg.pcie_gbps * _GB)
        if tier == "host":
            return pcie
        measured = self._tier_s_per_byte.get("dram" if tier == "staged" else tier)
        return (measured if measured is not None else 1.0 / (cfg.tier_gbps(tier) * _GB)) + pcie

    def _latency(self, tier: str) -> float:
        """Fixed cost of reloading from ``tier``: the measured storage round trip for kvdrive's tiers once known
        (charged once per plan in plan_prefix), else the assumed disk latency; the remote tier's own (measured or
        assumed) round trip for "remote"."""
        if tier in ("gpu", "host"):
            return 0.0
        if tier == "remote":
            return self._remote_fixed_s if self._remote_fixed_s is not None else self.config.remote_latency_s
        if self._reload_fixed_s is not None:
            return self._reload_fixed_s
        return self.config.disk_latency_s if tier == "disk" else 0.0
