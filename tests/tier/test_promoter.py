"""The promoter: eviction order, attention decay, admission, prefetch, reload vs recompute, bounds, config, determinism.

Everything runs on a fake clock, so every number below is exact and reproducible.
"""

import math
import random
import threading

import pytest

from kvdrive_sglang.tier.errors import ConfigError
from kvdrive_sglang.tier.promoter import Decision, Promoter, PromoterConfig

MiB = 1 << 20
PAGE = 8 * MiB  # a 64-token page of an 8B-class model in bf16 (128 KiB/token)
TOK = 64


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def make(clock=None, **cfg):
    clock = clock or Clock()
    return Promoter(PromoterConfig(**cfg), clock=clock), clock


def lru_replay(trace):
    """Reference LRU over single-page accesses: least recently used first."""
    last = {}
    for i, k in enumerate(trace):
        last[k] = i
    return sorted(last, key=last.get)


# --- eviction order -----------------------------------------------------------------------------------------------


def test_eviction_order_is_lru_without_attention():
    p, clock = make()
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(40)]
    trace = keys * 3  # every page used three times, interleaved: equal reuse, so only recency can order them
    rng.shuffle(trace)
    for k in trace:
        clock.t += rng.choice([0.0, 0.5, 3.0])  # repeated timestamps too: ties go by access order
        p.observe_access([k], TOK, PAGE)
    assert p.eviction_order(keys) == lru_replay(trace)
    # and the order does not depend on when it is asked, nor on the order of the keys asked about
    clock.t += 10_000
    assert p.eviction_order(reversed(keys)) == lru_replay(trace)


def test_eviction_order_unknown_pages_go_first_and_chain_tail_before_head():
    p, clock = make()
    p.observe_access(["a", "b", "c"], TOK, PAGE)  # one request: a is the prefix head
    assert p.eviction_order(["a", "b", "c", "zz", "aa"]) == ["aa", "zz", "c", "b", "a"]


def test_reuse_counts_like_log2_half_lives_of_recency():
    p, clock = make(half_life_s=100.0)
    for _ in range(4):
        p.observe_access(["hot"], TOK, PAGE)  # reuse 4 at t=0: worth 2 half-lives of recency
    clock.t = 150.0
    p.observe_access(["new"], TOK, PAGE)
    assert p.eviction_order(["hot", "new"]) == ["new", "hot"]
    clock.t = 250.0
    p.observe_access(["newer"], TOK, PAGE)
    assert p.eviction_order(["hot", "newer"]) == ["hot", "newer"]


def test_attention_mass_reorders_eviction():
    p, clock = make(half_life_s=60.0, attention_floor=1e-3)
    for i in range(6):
        clock.t = float(i)
        p.observe_access([f"p{i}"], TOK, PAGE)
    assert p.eviction_order([f"p{i}" for i in range(6)]) == [f"p{i}" for i in range(6)]
    p.observe_attention({"p0": 0.4, "p1": 0.05})  # the oldest pages were attended heavily
    order = p.eviction_order([f"p{i}" for i in range(6)])
    assert order == ["p2", "p3", "p4", "p5", "p1", "p0"]
    # value is heat x reuse / reload seconds, at the disk bandwidth
    reload_s = PAGE / (1.5e9)
    heat0 = 0.4 + 1e-3 * 2 ** (-(5.0 - 0.0) / 60.0)
    assert p.value("p0") == pytest.approx(heat0 * 1 / reload_s, rel=1e-9)
    assert p.value("nope") == 0.0


def test_decay_halves_mass_after_one_half_life():
    p, clock = make(half_life_s=30.0)
    p.observe_attention({"a": 1.0})
    assert p.attention_mass("a") == pytest.approx(1.0)
    clock.t = 30.0
    assert p.attention_mass("a") == pytest.approx(0.5, rel=1e-12)
    p.observe_attention({"a": 0.5})  # fresh mass adds to the decayed mass
    assert p.attention_mass("a") == pytest.approx(1.0, rel=1e-12)
    clock.t = 90.0
    assert p.attention_mass("a") == pytest.approx(0.25, rel=1e-12)
    # the floor term decays with the same half-life, so the value halves too
    p.observe_access(["b"], TOK, PAGE)
    v = p.value("b")
    clock.t = 120.0
    assert p.value("b") == pytest.approx(v / 2, rel=1e-12)


def test_scores_are_time_invariant_and_order_like_values():
    p, clock = make(half_life_s=50.0)
    p.observe_access(["old"], TOK, PAGE)
    p.observe_attention({"old": 0.2})
    s_old = p.score_of(["old"])[0]
    clock.t = 400.0
    p.observe_access(["new"], TOK, PAGE)
    assert p.score_of(["old"])[0] == s_old  # unchanged without new observations
    s_new = p.score_of(["new"])[0]
    assert (s_new > s_old) == (p.value("new") > p.value("old"))
    assert s_old > 0 and s_new > 0  # the engine reads 0 as "no score"
    assert p.score_of(["unknown"]) == [0.0]
    # log2 scale: a score one higher is twice the value
    assert s_new - s_old == pytest.approx(math.log2(p.value("new") / p.value("old")), abs=1e-9)


def test_chain_scores_drop_the_tail_first():
    p, clock = make()
    keys = [f"c{i}" for i in range(6)]
    p.observe_access(keys, TOK, PAGE)
    p.observe_attention({"c0": 0.3, "c4": 0.5})  # a sink page and one relevant late page
    flat = p.score_of(keys)
    chained = p.score_of(keys, chain=True)
    assert flat[4] > flat[1]
    assert all(chained[i] > chained[i + 1] for i in range(5))  # strictly decreasing: the tail goes first
    assert chained[4] == flat[4] and chained[5] == flat[5]
    assert chained[1] > flat[4]  # c1..c3 keep the valuable c4 reachable


def test_group_score_is_the_mean_value_on_the_score_scale():
    p, clock = make()
    p.observe_access(["a", "b"], TOK, PAGE)
    p.observe_attention({"a": 0.999})
    sa, sb = p.score_of(["a", "b"])
    g = p.group_score(["a", "b"])
    assert g == pytest.approx(math.log2((2 ** (sa - 4096) + 2 ** (sb - 4096)) / 2) + 4096, abs=1e-9)
    assert p.group_score([]) == 0.0 and p.group_score(["zz"]) == 0.0


# --- admission --------------------------------------------------------------------------------------------------


def test_admission_rejects_one_off_pages_and_admits_reused_ones():
    p, clock = make()
    doc = [f"doc{i}" for i in range(4)]
    p.observe_access(doc + ["q1"], TOK, PAGE)  # first request: the document and a question
    assert not any(p.admit(k) for k in doc + ["q1"])
    clock.t = 5
    p.observe_access(doc + ["q2"], TOK, PAGE)  # second request: same document, new question
    assert all(p.admit(k) for k in doc)
    assert not p.admit("q1") and not p.admit("q2")
    assert not p.admit("never-seen")


def test_continuations_are_admitted_at_once_and_document_questions_are_not():
    p, clock = make()
    history = ["sys0", "sys1", "u1", "a1"]  # turn 1: system prompt, user message, answer (one chain, one call)
    p.observe_access(history, TOK, PAGE)
    assert not any(p.admit(k) for k in history)  # nothing says yet that this is a conversation
    clock.t = 60
    turn2 = history + ["u2", "a2"]  # turn 2 runs through turn 1's last page: a continuation
    p.observe_access(turn2, TOK, PAGE)
    assert all(p.admit(k) for k in turn2)  # history by reuse, the new turn by continuation
    assert p.stats()["continuations"] == 1
    # the new turn's pages count as reused once more: they rank above equally recent one-off pages
    p.observe_access(["other"], TOK, PAGE)
    assert p.eviction_order(["other", "u2"]) == ["other", "u2"]
    # a second question on a cached document does not pass through the first answer
    doc = ["d0", "d1", "d2"]
    p.observe_access(doc + ["q1", "r1"], TOK, PAGE)
    p.observe_access(doc + ["q2", "r2"], TOK, PAGE)
    assert all(p.admit(k) for k in doc) and not any(p.admit(k) for k in ("q1", "r1", "q2", "r2"))
    assert p.stats()["continuations"] == 1
    # partial observations (storage reads/writes of some pages) neither end a chain nor continue one
    r, _ = make()
    r.observe_access(history, TOK, PAGE, whole_request=False)
    r.observe_access(turn2, TOK, PAGE, whole_request=False)
    assert r.stats()["continuations"] == 0 and not r.admit("u2") and r.admit("u1")
    r.observe_access(turn2 + ["u3"], TOK, PAGE)  # a whole request through a page no whole request ended on
    assert r.stats()["continuations"] == 0
    q, _ = make(admit_continuations=False)
    q.observe_access(history, TOK, PAGE)
    q.observe_access(turn2, TOK, PAGE)
    assert not q.admit("u2") and q.admit("u1")


def test_admission_by_value_threshold():
    p, clock = make(admit_min_reuse=3)
    p.observe_access(["hot", "cold"], TOK, PAGE)
    p.observe_attention({"hot": 0.5})
    threshold = p.value("hot") * 0.9
    q, _ = make(clock, admit_min_reuse=3, admit_min_value=threshold)
    q.observe_access(["hot", "cold"], TOK, PAGE)
    q.observe_attention({"hot": 0.5})
    assert q.admit("hot") and not q.admit("cold")
    assert not p.admit("hot")  # no threshold configured: reuse only
    clock.t += 120.0  # a half-life (the default) later its value fell below the threshold
    assert not q.admit("hot")


# --- prefetch ---------------------------------------------------------------------------------------------------


def test_prefetch_respects_budget_and_picks_by_value():
    p, clock = make()
    keys = [f"s{i}" for i in range(10)]
    p.observe_access(keys, TOK, PAGE)
    p.observe_attention({"s7": 0.9, "s2": 0.5, "s9": 0.1})
    assert p.prefetch(keys, 3 * PAGE) == ["s7", "s2", "s9"]
    assert p.prefetch(keys, 3 * PAGE + PAGE - 1) == ["s7", "s2", "s9"]  # a page that does not fit is not taken
    assert p.prefetch(keys, 0) == []
    picked = p.prefetch(keys + ["unknown"], 100 * PAGE)
    assert picked[:3] == ["s7", "s2", "s9"] and picked[-1] == "unknown" and len(picked) == 11
    # a smaller page still fits where a large one does not
    p.observe_access(["small"], TOK, PAGE // 4)
    assert p.prefetch(["s7", "s2", "small"], PAGE + PAGE // 4) == ["s7", "small"]


def test_prefetch_skips_pages_that_would_be_recomputed_anyway():
    # DRAM tier at 1 GB/s + PCIe: 8 MiB take ~8.7 ms; prefilling 64 tokens at 10k tok/s takes 6.4 ms
    p, _ = make(dram_gbps=1.0, prefill_tokens_per_s=10000.0)
    p.observe_access(["a", "b"], TOK, PAGE)
    assert p.prefetch(["a", "b"], 10 * PAGE) == []
    assert p.prefetch(["a", "b"], 10 * PAGE, to_tier="host") == ["a", "b"]  # SGLang's host pool: PCIe only
    q, _ = make(dram_gbps=4.0, prefill_tokens_per_s=10000.0)
    q.observe_access(["a", "b"], TOK, PAGE)
    assert q.prefetch(["a", "b"], 10 * PAGE) == ["a", "b"]
    with pytest.raises(ConfigError, match="tier 'l4'"):
        q.prefetch(["a"], PAGE, to_tier="l4")


def test_prefetch_of_a_session_history_prefers_recent_sessions():
    p, clock = make(half_life_s=60.0)
    a = [f"a{i}" for i in range(5)]
    b = [f"b{i}" for i in range(5)]
    p.observe_access(a, TOK, PAGE)
    clock.t = 120.0
    p.observe_access(b, TOK, PAGE)  # session b was active more recently
    got = p.prefetch(a + b, 5 * PAGE)
    assert sorted(got) == sorted(b)


# --- reload vs recompute ----------------------------------------------------------------------------------------


def test_reload_or_recompute_picks_recompute_when_the_tier_is_slower_than_prefill():
    p, _ = make(disk_gbps=0.5, dram_gbps=4.0, pcie_gbps=25.0, disk_latency_s=1e-3, prefill_tokens_per_s=10000.0)
    nbytes = 4 * PAGE  # 256 tokens
    d = p.reload_or_recompute(256, nbytes, "disk")
    reload = 1e-3 + nbytes / 0.5e9 + nbytes / 25e9
    assert d == Decision("recompute", pytest.approx(reload), pytest.approx(256 / 10000.0))
    assert d.reload_s == pytest.approx(0.0694, abs=1e-4) and d.recompute_s == pytest.approx(0.0256)
    d = p.reload_or_recompute(256, nbytes, "dram")
    assert d.action == "reload"
    assert d.reload_s == pytest.approx(nbytes / 4e9 + nbytes / 25e9) and d.reload_s < d.recompute_s
    assert p.reload_or_recompute(256, nbytes, "queued") == d  # TierEngine.tiers_of's in-memory write-down queue
    assert p.reload_or_recompute(256, nbytes, "host").reload_s == pytest.approx(nbytes / 25e9)
    assert p.reload_or_recompute(256, nbytes, "gpu") == Decision("reload", 0.0, 0.0256)
    # a fast disk with few bytes per token reloads
    fast, _ = make(disk_gbps=7.0, prefill_tokens_per_s=10000.0)
    assert fast.reload_or_recompute(256, 256 * 32 * 1024, "disk").action == "reload"
    # nothing to gain: recompute (no I/O for nothing)
    assert p.reload_or_recompute(0, 0, "disk").action == "recompute"
    with pytest.raises(ConfigError, match="tier 'nvme'"):
        p.reload_or_recompute(1, 1, "nvme")
    with pytest.raises(ConfigError, match="nbytes"):
        p.reload_or_recompute(1, -1, "disk")


def test_plan_prefix_cuts_where_the_slow_tier_begins():
    p, _ = make(disk_gbps=0.5, dram_gbps=4.0, pcie_gbps=25.0, disk_latency_s=0.0, prefill_tokens_per_s=10000.0)
    per_dram = PAGE / 4e9 + PAGE / 25e9
    per_recompute = TOK / 10000.0
    plan = p.plan_prefix(["dram"] * 3 + ["disk"] * 4, TOK, PAGE)
    assert plan.reload_pages == 3
    assert plan.reload_s == pytest.approx(3 * per_dram)
    assert plan.recompute_s == pytest.approx(4 * per_recompute)
    assert plan.saved_s == pytest.approx(3 * (per_recompute - per_dram))
    # a slow page first: worth reloading through it only if enough fast pages follow
    assert p.plan_prefix(["disk"] + ["dram"] * 2, TOK, PAGE).reload_pages == 0
    assert p.plan_prefix(["disk"] + ["dram"] * 40, TOK, PAGE).reload_pages == 41
    assert p.plan_prefix([], TOK, PAGE) == (0, 0.0, 0.0, 0.0)


# --- codecs, bounds, config, determinism, threads ---------------------------------------------------------------


def test_codec_choice_is_lossless_unless_opted_in():
    p, _ = make()
    assert [p.codec_for(t) for t in ("gpu", "host", "dram", "queued", "disk")] == ["raw", "raw", "zstd", "zstd", "zstd"]
    q, _ = make(lossy_ok=True)
    assert [q.codec_for(t) for t in ("dram", "disk")] == ["zstd", "int8"]
    r, _ = make(lossy_ok=True, lossy_codec="fp8")
    assert r.codec_for("disk") == "fp8"


def test_tracking_is_bounded_lru():
    p, clock = make(max_tracked=100)
    for i in range(100):
        p.observe_access([f"k{i}"], TOK, PAGE)
    p.observe_attention({"k0": 1.0})  # observed again: now the most recent
    for i in range(100, 150):
        p.observe_access([f"k{i}"], TOK, PAGE)
    s = p.stats()
    assert s["tracked"] == 100 and s["forgotten"] == 50
    assert p.reuse("k0") == 1 and p.attention_mass("k0") == 1.0
    assert p.reuse("k50") == 0 and p.value("k50") == 0.0  # forgotten: an unknown page again
    assert p.reuse("k51") == 1 and p.reuse("k149") == 1


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("half_life_s", 0, "half_life_s"),
        ("half_life_s", float("nan"), "half_life_s"),
        ("attention_floor", -1.0, "attention_floor"),
        ("admit_min_reuse", 0, "admit_min_reuse"),
        ("admit_min_reuse", 2.5, "admit_min_reuse"),
        ("admit_min_value", -3.0, "admit_min_value"),
        ("dram_gbps", 0.0, "dram_gbps"),
        ("disk_gbps", "fast", "disk_gbps"),
        ("pcie_gbps", float("inf"), "pcie_gbps"),
        ("disk_latency_s", -1e-3, "disk_latency_s"),
        ("prefill_tokens_per_s", 0, "prefill_tokens_per_s"),
        ("lossy_ok", "yes", "lossy_ok"),
        ("admit_continuations", 1, "admit_continuations"),
        ("lossy_codec", "jpeg", "lossy_codec"),
        ("max_tracked", 0, "max_tracked"),
        ("max_tracked", True, "max_tracked"),
        ("promote_share", 1.5, "promote_share must be a number from 0 to 1"),  # a share of the disk's bandwidth
        ("remote_latency_s", float("nan"), "remote_latency_s must be a non-negative number"),
    ],
)
def test_bad_config_names_the_field(field, value, expect):
    with pytest.raises(ConfigError, match=expect):
        PromoterConfig(**{field: value})


def test_bad_observations_are_refused():
    p, _ = make()
    with pytest.raises(ConfigError, match="bytes_per_page"):
        p.observe_access(["a"], TOK, 0)
    with pytest.raises(ConfigError, match="tokens_per_page"):
        p.observe_access(["a"], 1.5, PAGE)
    with pytest.raises(ConfigError, match="attention mass"):
        p.observe_attention({"a": -0.1})
    with pytest.raises(ConfigError, match="prefetch budget_bytes"):
        p.prefetch(["a"], -1)
    with pytest.raises(ConfigError, match="page key"):
        p.observe_access([b"bytes"], TOK, PAGE)


def synthetic_trace(seed, n=400):
    rng = random.Random(seed)
    events, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1.0)
        doc = min(int(rng.paretovariate(1.2)), 30)
        keys = [f"d{doc}p{j}" for j in range(rng.randint(2, 12))] + [f"q{i}"]
        mass = {k: rng.random() / len(keys) for k in keys if rng.random() < 0.5}
        events.append((t, keys, mass))
    return events


def replay(events, **cfg):
    clock = Clock()
    p = Promoter(PromoterConfig(**cfg), clock=clock)
    for t, keys, mass in events:
        clock.t = t
        p.observe_access(keys, TOK, PAGE)
        clock.t = t + 0.5
        p.observe_attention(mass)
    return p, clock


def test_two_promoters_fed_the_same_trace_decide_identically():
    events = synthetic_trace(3)
    (a, ca), (b, cb) = replay(events), replay(events)
    keys = sorted({k for _, ks, _ in events for k in ks})
    cb.t = ca.t + 1234.5  # asked later: orderings depend on the observations only
    assert a.eviction_order(keys) == b.eviction_order(list(reversed(keys)))
    assert a.score_of(keys) == b.score_of(keys)
    assert a.prefetch(keys, 20 * PAGE) == b.prefetch(keys, 20 * PAGE)
    assert [a.admit(k) for k in keys] == [b.admit(k) for k in keys]
    # and a different trace gives a different order (the test would pass vacuously otherwise)
    c, _ = replay(synthetic_trace(4))
    assert c.eviction_order(keys) != a.eviction_order(keys)


def test_concurrent_observers_lose_nothing():
    p, _ = make()

    def work(tid):
        for i in range(500):
            p.observe_access([f"shared{i % 50}"], TOK, PAGE)
            p.observe_attention({f"t{tid}-{i}": 0.01})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(p.reuse(f"shared{i}") for i in range(50)) == 2000
    assert p.stats()["tracked"] == 50 + 2000


# --- measured costs (calibrate) --------------------------------------------------------------------------------------
def test_measured_prefill_cost_turns_a_reload_into_a_recompute():
    """A disk reload that beats the assumed prefill (10k tok/s) loses once the server measures a 100x faster prefill:
    kvdrive must never make a request slower than no cache, whatever the assumption said."""
    p, _ = make(disk_gbps=4.0)
    tiers = ["disk"] * 8
    assert p.plan_prefix(tiers, TOK, PAGE).reload_pages == 8  # 8 MiB: 2.4 ms to reload < 6.4 ms to recompute
    p.calibrate(prefill_s_per_token=1e-6)  # measured 1M tokens/s: 64 us a page to recompute
    assert p.plan_prefix(tiers, TOK, PAGE).reload_pages == 0
    assert p.costs()["prefill_tokens_per_s"] == (pytest.approx(1e6), "measured")


def test_measured_reload_round_trip_is_charged_once_per_plan():
    p, _ = make(prefill_tokens_per_s=10000.0, pcie_gbps=1e6)  # 6.4 ms to recompute a 64-token page
    p.calibrate(tier_s_per_byte={"dram": 1e-12, "disk": 1e-12}, reload_fixed_s=0.05)
    # 50 ms of fixed round trip: 8 pages (51 ms of prefill) pay for it, 7 pages (45 ms) do not
    assert p.plan_prefix(["dram"] * 4 + ["disk"] * 4, TOK, PAGE).reload_pages == 8
    assert p.plan_prefix(["dram"] * 3 + ["disk"] * 4, TOK, PAGE).reload_pages == 0
    assert p.reload_or_recompute(TOK * 8, PAGE * 8, "disk").action == "reload"
    assert p.reload_or_recompute(TOK * 7, PAGE * 7, "disk").action == "recompute"
    costs = p.costs()
    assert costs["reload_fixed_s"] == (0.05, "measured") and costs["disk_gbps"][1] == "measured"


def test_measured_tier_speed_replaces_the_assumed_one():
    p, _ = make(dram_gbps=2.0, pcie_gbps=1e6, prefill_tokens_per_s=10000.0)
    assert p.reload_or_recompute(TOK, PAGE, "dram").action == "reload"  # 4 ms < 6.4 ms
    p.calibrate(tier_s_per_byte={"dram": 1.0 / 0.5e9})  # measured 0.5 GB/s: 17 ms
    assert p.reload_or_recompute(TOK, PAGE, "dram").action == "recompute"
    assert p.costs()["dram_gbps"] == (pytest.approx(0.5), "measured")
    assert p.costs()["disk_gbps"][1] == "assumed"


@pytest.mark.parametrize(
    "kw",
    [
        {"prefill_s_per_token": 0},
        {"prefill_s_per_token": float("nan")},
        {"tier_s_per_byte": {"gpu": 1e-9}},
        {"tier_s_per_byte": {"disk": -1.0}},
        {"reload_fixed_s": -0.1},
        {"prefill_s_per_token": True},
    ],
)
def test_calibrate_rejects_bad_figures(kw):
    p, _ = make()
    with pytest.raises(ConfigError):
        p.calibrate(**kw)
    assert all(src == "assumed" for _, src in p.costs().values())


def test_cached_page_scores_always_equal_freshly_computed_ones():
    """Scores are cached per page (the GPU eviction order asks for every evictable leaf on each evict); the cache
    must never go stale, whatever mix of observations comes in."""
    p, clock = make()
    rng = random.Random(1)
    nodes = [[f"n{i}p{j}" for j in range(8)] for i in range(60)]
    for step in range(1500):
        clock.t += rng.random()
        ks = rng.choice(nodes)
        r = rng.random()
        if r < 0.5:
            p.observe_access(ks, TOK, PAGE)
        elif r < 0.8:
            p.observe_attention({k: rng.random() for k in ks})
        else:
            p.observe_access(ks[:3], TOK, PAGE, whole_request=False, reuse=False)
        if step % 25 == 0:
            cached = [p.group_score(n) for n in nodes]
            for page in p.tracker.pages.values():
                page.score = None
            assert cached == [p.group_score(n) for n in nodes], step


# --- page size 1 (issue 15) ---------------------------------------------------------------------------------------
def _chain(tag, n):
    return [f"{tag}{i:062x}" for i in range(n)]


def test_a_million_one_token_pages_stay_tracked():
    """At page size 1 (SGLang's CUDA default) 10^6 tokens are 10^6 pages: with one state per page the default
    max_tracked (262,144) forgot three quarters of them before any could be admitted. Units of 64 one-token pages
    keep them all, and every page still answers for itself."""
    p, clock = make()
    chains = [_chain(f"{r:02x}", 32768) for r in range(31)] + [_chain("zz", 1048576 - 31 * 32768)]
    for keys in chains:
        clock.t += 1
        p.observe_access(keys, 1, 512)
    assert sum(map(len, chains)) == 1_000_000 + 48576
    s = p.stats()
    assert s["forgotten"] == 0 and s["tracked"] == 1048576 // 64
    first = chains[0]
    assert p.reuse(first[0]) == 1 and p.reuse(first[-1]) == 1 and p.value(first[12345]) > 0
    p.observe_access(first[:1000], 1, 512)  # a second request over the first 1000 tokens of the first document
    assert p.admit(first[0]) and p.admit(first[959])  # reused: admitted, through their units
    assert not p.admit(first[1024]) and p.reuse(first[1024]) == 1  # beyond the reused prefix's units


def test_one_token_pages_rank_and_admit_like_sixty_four_token_pages():
    """A unit of 64 one-token pages carries the state a 64-token page would: the same eviction order, the same
    admission, the same score for the same bytes; a chain that leaves a unit inside it gets a unit of its own."""
    small, clock_s = make()
    big, clock_b = make()
    doc = _chain("d", 256)  # 256 one-token pages = 4 units
    big_doc = [doc[i] for i in range(63, 256, 64)]  # the same tokens as four 64-token pages
    small.observe_access(doc, 1, 512)
    big.observe_access(big_doc, 64, 64 * 512)
    assert small.stats()["tracked"] == 4
    assert small.score_of(doc)[::64] == big.score_of(big_doc)
    clock_s.t = clock_b.t = 10.0
    small.observe_access(doc[:128] + _chain("q", 64), 1, 512)  # a question after the first half
    big.observe_access(big_doc[:2] + ["q-page"], 64, 64 * 512)
    assert [small.admit(doc[i]) for i in (0, 127, 128, 255)] == [True, True, False, False]
    assert small.eviction_order([doc[0], doc[200]]) == [doc[200], doc[0]]  # the unreused half goes first
    assert big.eviction_order([big_doc[0], big_doc[3]]) == [big_doc[3], big_doc[0]]
    # a chain leaving a unit inside it: the shared part counts for the unit, the rest is a new unit
    branch = doc[:100] + _chain("b", 60)
    small.observe_access(branch, 1, 512)
    assert small.reuse(doc[99]) == 3 and small.reuse(branch[100]) == 1 and small.reuse(doc[150]) == 1
    names, starts = small.units_of(branch)
    assert starts == [0, 64, 100, 128] and names[2:] == [branch[100], branch[128]]  # aligned on position
    # attention mass summed per unit reaches every page of it
    small.observe_attention({names[2]: 0.5})
    assert small.attention_mass(branch[127]) == pytest.approx(0.5 / 28)  # an even share of the unit's (28 pages)
    assert small.attention_mass(branch[128]) == 0.0


def test_group_score_of_a_node_of_one_token_pages_steps_per_unit():
    p, _ = make()
    keys = _chain("n", 4096)
    p.observe_access(keys, 1, 512)
    assert len(p.tracker.runs(keys[10:4000])) == 63  # 3990 pages in 63 runs of units, not 3990 steps
    assert p.group_score(keys[10:4000]) == pytest.approx(p.group_score(keys[:64]))
