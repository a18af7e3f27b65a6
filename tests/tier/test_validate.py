"""tier/validate.py: the one setting check (positive, finite, not bool) and its variants, with the setting named."""

import math

import pytest

from kvdrive_sglang.tier.errors import CodecError, ConfigError
from kvdrive_sglang.tier.validate import fraction, integer, number


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.0, "3", None, math.nan])
def test_integer_refuses_non_positive_bool_float_and_text(bad):
    with pytest.raises(ConfigError, match=rf"^tier io_threads must be a positive integer, got {bad!r}$"):
        integer(bad, "tier io_threads")


def test_integer_bounds_and_error_class():
    assert integer(0, "x", least=0) == 0 and integer(2, "x", least=2) == 2 and integer(5, "x", below=6) == 5
    with pytest.raises(ConfigError, match="x must be a non-negative integer, got -1"):
        integer(-1, "x", least=0)
    with pytest.raises(ConfigError, match="window must be an integer >= 2, got 1"):
        integer(1, "window", least=2)
    with pytest.raises(ConfigError, match="s must be a positive integer below 1024, got 1024"):
        integer(1024, "s", below=1024)
    with pytest.raises(CodecError, match="row_len must be a positive integer"):
        integer(0, "row_len", error=CodecError)


@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf, -math.inf, True, "1", None])
def test_number_refuses_non_positive_non_finite_bool_and_text(bad):
    with pytest.raises(ConfigError, match=r"^tier maintain_interval_s must be a positive number, got "):
        number(bad, "tier maintain_interval_s")


def test_number_bounds_and_units():
    assert number(3, "x") == 3.0 and isinstance(number(3, "x"), float)
    assert number(0, "x", zero_ok=True) == 0.0 and number(100, "g", zero_ok=True, most=100) == 100.0
    with pytest.raises(ConfigError, match=r"ttl_s must be a positive number of seconds below 10, got 10"):
        number(10, "ttl_s", below=10, unit="seconds")
    with pytest.raises(ConfigError, match="gil must be a number of milliseconds from 0 to 100, got 101"):
        number(101, "gil", zero_ok=True, most=100, unit="milliseconds")
    with pytest.raises(ConfigError, match="spread must be a number >= 1, got 0.5"):
        number(0.5, "spread", least=1)
    with pytest.raises(ConfigError, match="share must be a non-negative number, got inf"):
        number(math.inf, "share", zero_ok=True)


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, math.nan, True, "0.5"])
def test_fraction(bad):
    assert fraction(1, "w") == 1.0 and fraction(0.25, "w") == 0.25
    with pytest.raises(ConfigError, match=r"^disk store low_watermark must be in \(0, 1\], got "):
        fraction(bad, "disk store low_watermark")
