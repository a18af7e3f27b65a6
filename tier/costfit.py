"""Measured costs as lines: seconds = fixed + per_unit * units, fitted over a sliding window of observations.

The promoter's reload-vs-recompute choice needs two slopes and one intercept that only the running server knows:
prefill seconds per token (the *marginal* cost: the fixed cost of a forward pass is paid with or without a cache hit,
so only the slope is saved by a hit), and what one storage reload costs (a fixed part -- thread hand-offs, the
scheduler noticing the prefetch is done -- plus a per-page part). ``LinearFit`` turns (units, seconds) observations into
those numbers with ordinary least squares over the last ``window`` observations.

It answers ``None`` until the window holds ``min_samples`` observations spread over at least ``min_spread`` x in
units (a slope from nearly equal x values is noise); a negative slope (noise again) is refused the same way, and a
negative intercept is clamped to 0 with the slope refitted through the origin. Pure Python, thread-safe.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import NamedTuple

from .validate import integer, number


class Line(NamedTuple):
    fixed_s: float  # seconds at zero units
    per_unit_s: float  # seconds per unit
    samples: int


class LinearFit:
    def __init__(self, window: int = 256, min_samples: int = 8, min_spread: float = 2.0):
        integer(window, "LinearFit window", least=2)
        integer(min_samples, "LinearFit min_samples", least=2, most=window)
        number(min_spread, "LinearFit min_spread", least=1)
        self.min_samples = min_samples
        self.min_spread = float(min_spread)
        self._obs: deque[tuple[float, float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.observed = 0

    def add(self, units: float, seconds: float) -> None:
        """One observation; non-finite or negative values, and zero units, are ignored (they carry no slope)."""
        if not (isinstance(units, (int, float)) and isinstance(seconds, (int, float))):
            return
        if not (math.isfinite(units) and math.isfinite(seconds)) or units <= 0 or seconds < 0:
            return
        with self._lock:
            self._obs.append((float(units), float(seconds)))
            self.observed += 1

    def line(self) -> Line | None:
        with self._lock:
            obs = list(self._obs)
        n = len(obs)
        if n < self.min_samples:
            return None
        xs = [x for x, _ in obs]
        if max(xs) < self.min_spread * min(xs):
            return None
        mx = sum(xs) / n
        my = sum(y for _, y in obs) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        sxy = sum((x - mx) * (y - my) for x, y in obs)
        slope = sxy / sxx
        fixed = my - slope * mx
        if fixed < 0:  # through the origin instead: no negative fixed cost
            fixed, slope = 0.0, sum(x * y for x, y in obs) / sum(x * x for x in xs)
        if slope <= 0:
            return None
        return Line(fixed, slope, n)
