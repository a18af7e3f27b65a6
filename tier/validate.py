"""Setting checks, written once: "a positive integer", "a positive number of seconds below X", "in (0, 1]".

Each check returns the value (as int or float) or raises ``ConfigError`` (or the ``error`` given) with the message
"<what> must be <a positive integer | a non-negative number of seconds below 3153600000 | ...>, got <value!r>", where
``what`` names the setting as the user wrote it (tests and users match on it: "tier io_threads", "--kvdrive-host-gb").

What every check refuses, and why:
- bool where a number is asked: True is an int in Python, so ``io_threads=True`` would quietly be 1.
- NaN and the infinities: NaN compares false with everything, so a NaN TTL or retry delay passed range checks and
  broke the store later (found by fuzzing the settings); an infinite byte count or interval is never meant.
- anything not an int (integers) or not an int or float (numbers): strings from JSON are refused, not coerced.
"""

from __future__ import annotations

import math

from .errors import ConfigError


def integer(
    v,
    what: str,
    *,
    least: int = 1,
    most: int | None = None,
    below: int | None = None,
    error: type[Exception] = ConfigError,
) -> int:
    """An int (not a bool) with ``least <= v`` (default 1: positive) and, if given, ``v <= most`` or ``v < below``."""
    hi, hi_in = (most, True) if most is not None else (below, False)
    ok = (
        isinstance(v, int) and not isinstance(v, bool) and v >= least and (hi is None or (v <= hi if hi_in else v < hi))
    )
    if not ok:
        raise error(f"{what} must be {_describe('integer', least, True, hi, hi_in, '')}, got {v!r}")
    return v


def number(
    v,
    what: str,
    *,
    zero_ok: bool = False,
    least: float | None = None,
    most: float | None = None,
    below: float | None = None,
    unit: str = "",
    error: type[Exception] = ConfigError,
) -> float:
    """A finite int or float (not a bool): positive (> 0), or ``>= 0`` with ``zero_ok``, or ``>= least``; and, if
    given, ``<= most`` or ``< below``. ``unit`` names what it counts in the message ("seconds": "a positive number
    of seconds")."""
    lo, lo_in = (least, True) if least is not None else (0, zero_ok)
    hi, hi_in = (most, True) if most is not None else (below, False)
    ok = (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (v >= lo if lo_in else v > lo)
        and (hi is None or (v <= hi if hi_in else v < hi))
    )
    if not ok:
        raise error(f"{what} must be {_describe('number', lo, lo_in, hi, hi_in, unit)}, got {v!r}")
    return float(v)


def fraction(v, what: str, *, error: type[Exception] = ConfigError) -> float:
    """A share in (0, 1] (watermarks, ratios)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:  # NaN fails 0 < v
        raise error(f"{what} must be in (0, 1], got {v!r}")
    return float(v)


def _describe(kind: str, lo, lo_in: bool, hi, hi_in: bool, unit: str) -> str:
    noun = f"{kind} of {unit}" if unit else kind
    article = "an" if kind == "integer" else "a"
    if hi is not None and hi_in:
        if lo == 0 and not lo_in:
            return f"a positive {noun} up to {_num(hi)}"
        return f"{article} {noun} from {_num(lo)} to {_num(hi)}"
    if lo == 0:
        text = f"a {'non-negative' if lo_in else 'positive'} {noun}"
    elif lo == 1 and lo_in and kind == "integer":
        text = f"a positive {noun}"
    else:
        text = f"{article} {noun} {'>=' if lo_in else '>'} {_num(lo)}"
    return text if hi is None else f"{text} below {_num(hi)}"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
