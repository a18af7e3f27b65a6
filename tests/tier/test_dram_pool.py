"""DramPool (kvdrive's compressed DRAM tier): byte bound, LRU until scores exist, value order after, demotion
before removal."""

import threading

import pytest

from kvdrive_sglang.tier.dram_pool import DramPool
from kvdrive_sglang.tier.errors import ConfigError


def k(i):
    return (b"n" * 16, f"k{i}".encode())


def test_byte_bound_and_lru_order():
    demoted = []
    pool = DramPool(1000, lambda v: demoted.extend(key for key, _ in v) or len(v))
    for i in range(10):
        pool.put(k(i), bytes(100), 200)
    pool.get(k(0))  # refresh: 0 is now most recent
    pool.put(k(10), bytes(100), 200)
    s = pool.stats()
    assert s.used_bytes <= 1000 and s.entries == s.used_bytes // 100
    assert k(1) in demoted and k(0) not in demoted  # least recently used first
    assert pool.contains(k(0)) and pool.contains(k(10))
    assert s.raw_bytes == 2 * s.used_bytes and s.demoted == len(demoted)


def test_scores_override_recency():
    demoted = []
    pool = DramPool(500, lambda v: demoted.extend(key for key, _ in v) or len(v))
    for i in range(5):
        pool.put(k(i), bytes(100), 100, score=float(10 - i))  # k(4) has the lowest value
    pool.put(k(5), bytes(100), 100, score=100.0)
    assert demoted[0] == k(4)
    assert pool.contains(k(0)) and pool.contains(k(5))


def test_on_disk_pages_leave_without_demotion_and_drops_counted():
    pool = DramPool(300, None)  # no disk tier: victims are dropped, and counted
    pool.put(k(0), bytes(100), 100, on_disk=True)
    for i in range(1, 5):
        pool.put(k(i), bytes(100), 100)
    s = pool.stats()
    assert s.used_bytes <= 300 and s.dropped + s.demoted == 5 - s.entries and s.demoted >= 1


def test_victim_stays_visible_until_demote_returns():
    seen = []
    pool = None

    def demote(victims):
        seen.extend(pool.get(key) is not None for key, _ in victims)  # still readable during hand-over
        return len(victims)

    pool = DramPool(200, demote)
    for i in range(4):
        pool.put(k(i), bytes(100), 100)
    assert seen and all(seen)


def test_oversized_page_refused_and_bad_capacity():
    pool = DramPool(100)
    assert pool.put(k(0), bytes(101), 101) is False
    with pytest.raises(ConfigError):
        DramPool(-5)


def test_threads_keep_the_bound():
    pool = DramPool(10_000, lambda v: len(v))

    def work(t):
        for i in range(500):
            pool.put((b"n" * 16, f"{t}-{i}".encode()), bytes(100), 100)
            pool.get((b"n" * 16, f"{t}-{i // 2}".encode()))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = pool.stats()
    assert s.used_bytes <= 10_000 and s.inserts == 2000 and s.entries * 100 == s.used_bytes
