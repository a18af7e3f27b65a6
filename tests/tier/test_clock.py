"""tier/clock.py: the one wall clock (ms) every tier's expiry times are kept on."""

import time

from kvdrive_sglang.tier import clock


def test_expiry_times():
    before = int(time.time() * 1000)
    now = clock.now_ms()
    assert before <= now <= int(time.time() * 1000)
    assert not clock.expired(0) and not clock.expired(0, now=10**15)  # 0: never expires
    assert clock.expired(now, now=now) and not clock.expired(now + 1, now=now)
    assert clock.expires_at_ms(None) == 0 and clock.expires_at_ms(0) == 0
    assert now + 2000 <= clock.expires_at_ms(2) <= clock.now_ms() + 2000
    assert clock.expired(clock.now_ms() - 1) and not clock.expired(clock.now_ms() + 60_000)
