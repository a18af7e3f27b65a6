"""The wall clock kvdrive keeps expiry times on: integer milliseconds since the epoch.

Every tier compares expiry times (``expires_ms``, 0 = never) against this one clock, so a page's TTL means the same in
the DRAM pool, the staging area, the write-down queue and on disk (where they are stored as u64 milliseconds).
"""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)


def expires_at_ms(ttl_s: float | None) -> int:
    """The expiry time of a page stored now with ``ttl_s`` seconds to live; 0 (never) for no TTL."""
    return int(time.time() * 1000 + ttl_s * 1000) if ttl_s else 0


def expired(expires_ms: int, now: int | None = None) -> bool:
    """Whether an expiry time (0 = never) has passed at ``now`` (default: this instant)."""
    return bool(expires_ms) and expires_ms <= (now_ms() if now is None else now)
