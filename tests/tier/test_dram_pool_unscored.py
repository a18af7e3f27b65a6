"""DramPool: a page stored before its owner could score it is judged on its value once known, not evicted on arrival.

kvdrive's SGLang backend stores a request's prompt pages while the request still runs (SGLang backs them up as soon
as they reach its host pool) and the promoter learns of them only when the request finishes, so they arrive with no
score (0.0). A pool that holds scored pages used to rank them below every scored page: each was the first victim of
its own insertion and, not admitted for the disk, was dropped (issue 18's smoke: the agent's rounds after a flush found
none of their history). They now wait out a grace period for their score, and only then rank as unscored.
"""

import time

from kvdrive_sglang.tier.dram_pool import DramPool


def k(i):
    return (b"n" * 16, f"k{i}".encode())


def _pool(capacity, grace_s):
    demoted = []
    pool = DramPool(capacity, lambda v: demoted.extend(key for key, _ in v) or len(v))
    pool.unscored_grace_s = grace_s
    return pool, demoted


def test_unscored_page_is_not_evicted_on_arrival_by_scored_pages():
    pool, demoted = _pool(1000, grace_s=60.0)
    for i in range(10):
        pool.put(k(i), bytes(100), 100, score=float(100 + i))  # full of scored pages
    pool.put(k("new"), bytes(100), 100)  # stored before its request finished: no score yet
    assert pool.contains(k("new")), "an unscored page must not be the first victim of its own insertion"
    assert demoted and k("new") not in demoted and demoted[0] == k(0)  # the lowest-scored page went instead
    assert pool.stats().used_bytes <= 1000


def test_unscored_page_is_ranked_by_its_score_once_scored():
    pool, demoted = _pool(1000, grace_s=60.0)
    for i in range(9):
        pool.put(k(i), bytes(100), 100, score=float(100 + i))
    pool.put(k("new"), bytes(100), 100)
    pool.set_score(k("new"), 1.0)  # its request finished: worth less than anything held
    pool.put(k(9), bytes(100), 100, score=200.0)
    assert demoted[0] == k("new")


def test_unscored_pages_past_their_grace_go_first_and_fresh_ones_last():
    """Never the other way round for long: a page whose owner never scores it (an aborted request) is protected for
    the grace period only, then ranks as unscored (the lowest); fresh unscored pages go only when nothing else is
    left, oldest first, so the pool still keeps its bound."""
    pool, demoted = _pool(1000, grace_s=0.2)
    pool.put(k("stale"), bytes(100), 100)
    for i in range(8):
        pool.put(k(i), bytes(100), 100, score=float(100 + i))
    time.sleep(0.3)
    pool.put(k("fresh"), bytes(100), 100)
    pool.put(k(8), bytes(100), 100, score=300.0)  # over the bound
    assert demoted[0] == k("stale") and pool.contains(k("fresh"))
    demoted.clear()
    for i in range(20):  # a burst of unscored pages larger than the pool: oldest first, bound kept
        pool.put(k(f"b{i}"), bytes(100), 100)
    assert pool.stats().used_bytes <= 1000 and pool.contains(k("b19"))
    assert demoted.index(k("fresh")) < demoted.index(k("b0"))


def test_zero_score_never_erases_a_known_one():
    """0.0 is "no score" (the promoter's answer for a page it does not know): it carries no information, so neither
    set_score nor a refreshing put replaces a score with it."""
    pool, _ = _pool(1000, grace_s=60.0)
    pool.put(k(0), bytes(100), 100, score=5.0)
    pool.set_score(k(0), 0.0)
    assert pool.peek(k(0)).score == 5.0
    pool.put(k(0), bytes(100), 100)
    assert pool.peek(k(0)).score == 5.0


def test_unscored_pool_stays_lru():
    pool, demoted = _pool(500, grace_s=60.0)
    for i in range(6):
        pool.put(k(i), bytes(100), 100)  # no scores at all (a tier used without a promoter): plain LRU
    assert demoted[0] == k(0) and pool.contains(k(5))


def test_eviction_floor_skips_pages_waiting_for_their_score():
    """promote brings a page up only if it beats the first victim: a page waiting for its score is not one."""
    pool, _ = _pool(1000, grace_s=60.0)
    for i in range(9):
        pool.put(k(i), bytes(100), 100, score=float(100 + i))
    pool.put(k("new"), bytes(100), 100)
    assert pool.eviction_floor() == 100.0
