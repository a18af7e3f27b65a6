"""The promoter's per-unit tracking state: which pages it knows, grouped into units, bounded in number.

Tracked units
    The promoter keeps its state per *unit*: a page, or, for pages of fewer than 16 tokens (SGLang on CUDA defaults
    to one-token pages), a run of up to ceil(unit_tokens / tokens_per_page) consecutive pages of a chain (default
    unit_tokens 64: the size of a page-64 page), aligned on the chain's position, sharing one state (reuse, recency,
    attention mass summed over its pages, value per byte of a whole unit). Every page key still answers for itself
    (score_of, admit, reuse, ...) through its unit. Pages of 16 tokens or more are units of their own, exactly as
    before; at page size 1 the per-request work, the tracking state and the eviction priority's cost per node shrink
    64-fold, and ``max_tracked`` (counted in units) holds 64x the tokens (issue 15: at page size 1 the 262,144
    tracked pages were 262k tokens, forgotten before admission). A unit is created by the first observation of its
    pages; a later chain that runs into it and diverges inside it starts a unit of its own for the rest (as a radix
    tree splits a node).

``PageTracker`` holds the units (least recently observed first), the alias of every page key of a multi-page unit,
and the bound; the ``Promoter`` owns one and calls it under its own lock (the tracker has none). What a unit is worth
(scores, admission) is the promoter's business; the tracker only finds, creates, groups and forgets units. Split from
promoter.py (issue 16).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .errors import ConfigError

NEG_INF = float("-inf")
UNIT_PAGE_TOKENS = 16  # pages of at least this many tokens are tracked one by one (module doc: tracked units)


def unit_span(tokens_per_page: int, unit_tokens: int) -> int:
    """Pages per unit at this page size: 1 for pages of 16+ tokens, else ceil(unit_tokens / tokens_per_page)."""
    return 1 if tokens_per_page >= UNIT_PAGE_TOKENS else -(-unit_tokens // tokens_per_page)


class Unit:
    """A tracked unit: one page, or a run of consecutive pages of a chain (``members``; see the module doc)."""

    __slots__ = (
        "extends",
        "mass_log",
        "members",
        "name",
        "nbytes",
        "reuse",
        "score",
        "seq",
        "span",
        "t_access",
        "tails",
        "tokens",
    )

    def __init__(self, name: str, members: list[str] | None = None, span: int = 1):
        self.name = name  # its key in PageTracker.pages: the (first) page's key
        self.members = members  # the pages of a multi-page unit, in chain order (None: the page ``name`` alone)
        self.span = span  # pages of a whole unit at this page size: its value is per byte of a whole unit
        self.tails = 0  # bit i: member i is the last page of some request's chain
        self.extends = False  # created by a request that continued an earlier request's chain
        self.reuse = 0
        self.t_access = None  # clock reading of the last access (None: only attention seen)
        self.seq = -1  # access order; larger = more recent
        self.mass_log = NEG_INF  # log2(mass * 2^(t_obs / half_life)), summed over observations
        self.nbytes = 0  # of one page
        self.score = None  # the promoter's log score, cached: constant until the unit is observed again (None: not yet)
        self.tokens = 0  # of one page


Run = tuple[Unit | None, int, int]  # (unit or None for untracked pages, offset of the run's first page in it, pages)


class PageTracker:
    """Units by name, least recently observed first, at most ``max_tracked`` of them. Not thread-safe: the promoter
    calls it under its lock."""

    def __init__(self, max_tracked: int):
        self.max_tracked = max_tracked
        self.pages: OrderedDict[str, Unit] = OrderedDict()  # units by name, least recently observed first
        self.alias: dict[str, Unit] = {}  # every page key of a multi-page unit -> the unit
        self.singles = 0  # units of one page (members None)
        self.forgotten = 0  # units dropped by the bound

    def __len__(self) -> int:
        return len(self.pages)

    def unit(self, key: str) -> Unit | None:
        p = self.alias.get(key)
        return self.pages.get(key) if p is None else p

    def runs(self, keys: Sequence[str], grouped: bool = False) -> list[Run]:
        """``keys`` as runs of consecutive pages of one tracked unit, (unit, offset of the run's first page in it,
        pages), and of untracked pages, (None, 0, pages). A key names its whole prefix (a chain hash), so two chains
        that agree on a page agree on every page before it: where a run ends and where an untracked stretch ends
        are found by comparing a few keys (galloping, then bisecting), not every page. ``grouped``: find untracked
        stretches even while there are no multi-page units yet (to create them)."""
        pages, alias = self.pages, self.alias
        if not alias and not grouped:  # no multi-page units (pages of unit_tokens or more): every page is its own
            return [(pages.get(k), 0, 1) for k in keys]
        singles = self.singles

        def tracked(x):
            return x in alias or (singles and x in pages)

        out, i, n = [], 0, len(keys)
        while i < n:
            k = keys[i]
            p = alias.get(k)
            if p is not None:
                m = p.members
                off = 0 if m[0] == k else m.index(k)
                take = min(len(m) - off, n - i)
                if m[off + take - 1] != keys[i + take - 1]:  # the chain leaves the unit inside it: bisect
                    lo, hi = 1, take - 1  # pages [0, lo) agree, page hi does not
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if m[off + mid] == keys[i + mid]:
                            lo = mid + 1
                        else:
                            hi = mid
                    take = lo
                out.append((p, off, take))
                i += take
                continue
            p = pages.get(k) if singles else None
            if p is not None:  # a single page's unit
                out.append((p, 0, 1))
                i += 1
                continue
            # untracked: gallop to a tracked page (or the end), then bisect for the first one
            lo, step = i + 1, 1  # keys[i:lo] untracked
            while lo < n and not tracked(keys[min(lo + step, n) - 1]):
                lo = min(lo + step, n)
                step *= 2
            hi = min(lo + step, n)  # keys[hi - 1] tracked, or hi == n
            while lo < hi:
                mid = (lo + hi) // 2
                if tracked(keys[mid]):
                    hi = mid
                else:
                    lo = mid + 1
            out.append((None, 0, lo - i))
            i = lo
        return out

    def track(self, keys: Sequence[str], span: int) -> list[tuple[Unit, int, int]]:
        """Runs of ``keys`` (as runs), with units created for the untracked pages: of up to ``span`` pages each,
        aligned on the position in ``keys`` (a whole chain's position from its root)."""
        pages, alias = self.pages, self.alias
        keys = keys if isinstance(keys, list) else list(keys)
        out, pos = [], 0
        for p, off, take in self.runs(keys, grouped=span > 1):
            if p is not None:
                out.append((p, off, take))
                pos += take
                continue
            end_run = pos + take
            while pos < end_run:
                end = min(end_run, (pos // span + 1) * span)
                group = keys[pos:end]
                if not all(map(str.__instancecheck__, group)):  # one C-level pass
                    bad = next(k for k in group if not isinstance(k, str))
                    raise ConfigError(f"page key must be a str, got {type(bad).__name__}")
                name = group[0]
                u = pages.get(name)  # a page seen only through attention: its unit grows, its mass is kept
                if u is None:
                    u = pages[name] = Unit(name)
                    if span == 1:
                        self.singles += 1
                elif span > 1:
                    self.singles -= 1
                if span > 1:
                    u.members, u.span = group, span
                    alias.update(dict.fromkeys(group, u))
                out.append((u, 0, len(group)))
                pos = end
        return out

    def touch(self, key: str) -> Unit:
        """The unit of ``key``, now the most recently observed; a unit of its own if it had none."""
        p = self.unit(key)
        if p is None:
            if not isinstance(key, str):
                raise ConfigError(f"page key must be a str, got {type(key).__name__}")
            p = self.pages[key] = Unit(key)
            self.singles += 1
        else:
            self.pages.move_to_end(p.name)
        return p

    def drop(self, p: Unit) -> None:
        if self.pages.get(p.name) is p:
            del self.pages[p.name]
        self._unlink(p)

    def bound(self) -> None:
        """Forget the least recently observed units beyond ``max_tracked``."""
        over = len(self.pages) - self.max_tracked
        for _ in range(over):
            self._unlink(self.pages.popitem(last=False)[1])
        if over > 0:
            self.forgotten += over

    def _unlink(self, p: Unit) -> None:
        if p.members is None:
            self.singles -= 1
            return
        alias = self.alias
        for k in p.members:
            if alias.get(k) is p:
                del alias[k]
