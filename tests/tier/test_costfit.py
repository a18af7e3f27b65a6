"""LinearFit: measured costs as lines (seconds = fixed + per_unit * units) over a sliding window."""

import random

import pytest

from kvdrive_sglang.tier.costfit import LinearFit
from kvdrive_sglang.tier.errors import ConfigError


def test_recovers_a_noisy_line():
    rng = random.Random(0)
    fit = LinearFit(window=200, min_samples=8)
    for _ in range(200):
        n = rng.randint(16, 4096)
        fit.add(n, 0.02 + 1e-4 * n + rng.gauss(0, 1e-3))
    line = fit.line()
    assert line.samples == 200
    assert line.per_unit_s == pytest.approx(1e-4, rel=0.02)
    assert line.fixed_s == pytest.approx(0.02, abs=2e-3)


def test_no_answer_until_enough_spread_samples():
    fit = LinearFit(min_samples=4, min_spread=2.0)
    for _ in range(10):
        fit.add(100, 0.01)  # all at one x: no slope can be told from these
    assert fit.line() is None
    for n in (20, 40, 300):
        fit.add(n, n * 1e-4)
    assert fit.line() is not None


def test_window_forgets_old_regime():
    fit = LinearFit(window=16, min_samples=8)
    for n in range(1, 17):
        fit.add(n * 100, n * 100 * 1e-3)  # slow machine
    for n in range(1, 17):
        fit.add(n * 100, n * 100 * 1e-5)  # now fast: the window holds only these
    assert fit.line().per_unit_s == pytest.approx(1e-5, rel=1e-6)


def test_negative_intercept_is_clamped_and_negative_slope_refused():
    fit = LinearFit(min_samples=3)
    for n, s in ((100, 0.0), (200, 0.5), (400, 1.5)):  # OLS gives a negative intercept
        fit.add(n, s)
    line = fit.line()
    assert line.fixed_s == 0.0 and line.per_unit_s > 0
    down = LinearFit(min_samples=3)
    for n, s in ((100, 1.0), (200, 0.5), (400, 0.1)):
        down.add(n, s)
    assert down.line() is None


def test_bad_observations_are_ignored_and_bad_config_refused():
    fit = LinearFit(min_samples=2)
    for n, s in ((0, 1.0), (-5, 1.0), (10, -1.0), (float("nan"), 1.0), (10, float("inf")), ("10", 1.0)):
        fit.add(n, s)
    assert fit.observed == 0 and fit.line() is None
    for kw in ({"window": 1}, {"min_samples": 1}, {"window": 4, "min_samples": 5}, {"min_spread": 0.5}):
        with pytest.raises(ConfigError):
            LinearFit(**kw)
