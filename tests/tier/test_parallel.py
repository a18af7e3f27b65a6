"""tier/parallel.py: the process-wide worker pool the reload path decodes on (issue 18)."""

import os
import threading

import numpy as np
import pytest
import zstandard

from kvdrive_sglang.tier import parallel
from kvdrive_sglang.tier.parallel import INLINE_BELOW_BYTES, WorkerPool, split, threads_for, usable_cores


@pytest.fixture
def pool3():
    p = WorkerPool(3)
    yield p
    p.stop()


def test_split_covers_every_item_once_in_contiguous_chunks():
    for n in range(1, 40):
        for parts in range(1, 6):
            for weights in (None, [1] * n, [(i * 7919) % 13 + 1 for i in range(n)], [0] * n):
                b = split(n, parts, weights)
                assert b[0][0] == 0 and b[-1][1] == n
                assert all(a < c for a, c in b), b  # non-empty
                assert all(b[k][1] == b[k + 1][0] for k in range(len(b) - 1))  # contiguous
                assert len(b) <= min(parts, n)


def test_split_balances_by_weight():
    # one huge item first: it gets a chunk of its own, the small ones share the rest
    assert split(5, 2, [100, 1, 1, 1, 1]) == [(0, 1), (1, 5)]
    assert split(4, 2, [1, 1, 1, 100]) == [(0, 3), (3, 4)]
    assert split(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_every_item_runs_once_across_threads(pool3):
    seen = [0] * 1000
    names = set()

    def fn(i):
        seen[i] += 1
        names.add(threading.current_thread().name)

    pool3.parallel_for(fn, 1000, weights=[INLINE_BELOW_BYTES] * 1000)
    assert seen == [1] * 1000


def test_work_really_runs_on_several_threads(pool3):
    # each item waits until three threads are inside at once: only a pool that runs chunks concurrently gets past it
    barrier = threading.Barrier(3, timeout=10)
    names = set()

    def fn(i):
        names.add(threading.current_thread().name)
        barrier.wait()

    pool3.parallel_for(fn, 3)
    assert len(names) == 3 and threading.current_thread().name in names  # the caller ran a chunk itself


def test_small_batches_run_inline_on_the_caller(pool3):
    names = set()
    pool3.parallel_for(lambda i: names.add(threading.current_thread().name), 4, weights=[1024] * 4)
    assert names == {threading.current_thread().name}
    assert not pool3._workers  # never even started


def test_max_threads_one_runs_inline(pool3):
    names = set()
    pool3.parallel_for(lambda i: names.add(threading.current_thread().name), 10, max_threads=1)
    assert names == {threading.current_thread().name}


def test_the_first_exception_is_raised_after_every_chunk_stopped(pool3):
    running = []
    lock = threading.Lock()
    started = threading.Barrier(3, timeout=10)

    def fn(i):
        if i % 100 == 0:
            started.wait()  # all three chunks are inside before one fails
        with lock:
            running.append(i)
        if i == 150:
            raise ValueError("page 150 is damaged")

    with pytest.raises(ValueError, match="page 150"):
        pool3.parallel_for(fn, 300)
    n = len(running)
    # nothing runs after the call returned (the caller may reuse its buffers now)
    threading.Event().wait(0.05)
    assert len(running) == n
    # the chunks stopped early: far from every item ran
    assert n < 300


def test_a_failing_batch_leaves_the_pool_usable(pool3):
    with pytest.raises(KeyError):
        pool3.parallel_for(lambda i: {}[i], 6)
    out = [0] * 6
    pool3.parallel_for(lambda i: out.__setitem__(i, i * i), 6)
    assert out == [0, 1, 4, 9, 16, 25]


def test_nested_calls_run_inline_instead_of_deadlocking():
    p = WorkerPool(2)
    try:
        out = np.zeros((4, 4), dtype=np.int64)

        def row(i):
            p.parallel_for(lambda j: out.__setitem__((i, j), i * 4 + j), 4)

        p.parallel_for(row, 4)
        assert out.ravel().tolist() == list(range(16))
    finally:
        p.stop()


def test_many_callers_share_the_pool(pool3):
    # more concurrent callers than workers: each finishes (it takes back chunks no worker started)
    results = {}

    def caller(c):
        out = [None] * 50
        pool3.parallel_for(lambda i: out.__setitem__(i, c * 1000 + i), 50)
        results[c] = out

    ts = [threading.Thread(target=caller, args=(c,)) for c in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    assert all(results[c] == [c * 1000 + i for i in range(50)] for c in range(8))


def test_zstd_decodes_are_bit_exact_on_the_pool(pool3):
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 4, 256 * 1024, dtype=np.uint8) for _ in range(12)]
    blobs = [zstandard.ZstdCompressor().compress(s.tobytes()) for s in src]
    outs = [None] * 12
    pool3.parallel_for(
        lambda i: outs.__setitem__(i, zstandard.ZstdDecompressor().decompress(blobs[i])), 12, weights=[256 * 1024] * 12
    )
    assert all(o == s.tobytes() for o, s in zip(outs, src))


def test_threads_for_caps_by_cores_and_setting():
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert threads_for(0) == cores
    assert threads_for(None) == cores
    assert threads_for(1) == 1
    assert threads_for(10_000) == cores


def test_the_process_pool_is_one_and_sized_to_the_machine():
    assert parallel.pool() is parallel.pool()
    assert parallel.pool().threads == usable_cores()
    out = [0] * 8
    parallel.parallel_for(lambda i: out.__setitem__(i, 1), 8)
    assert out == [1] * 8


# ---------------------------------------------------------------------------------------------- the engine on the pool


def _big_ns():
    from tests.helpers import make_ns

    return make_ns(page_size=16, num_heads=8, head_dim=128)  # 64 KiB pages: a batch of 8 is past INLINE_BELOW_BYTES


def _pages(ns, seeds):
    from tests.helpers import small_page

    return [small_page(s, ns) for s in seeds]


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores")
@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_engine_decodes_a_batch_of_dram_hits_on_two_threads_at_once(monkeypatch, codec):
    from kvdrive_sglang.tier import engine as engine_mod
    from kvdrive_sglang.tier.engine import TierConfig, TierEngine

    ns = _big_ns()
    seeds = list(range(8))
    pages = _pages(ns, [0, 0, 1, 2, 3, 4, 0, 0])  # the four read under the barrier encode to blobs of one size
    with TierEngine(TierConfig(host_bytes=64 << 20, codec=codec, staging_bytes=0)) as eng:
        assert eng.decode_threads == usable_cores()
        eng.put_many(ns, [f"k{s}" for s in seeds], pages)
        barrier = threading.Barrier(2, timeout=10)
        real = engine_mod.decode_page
        names = set()

        def spy(blob, out, dtype):  # only gets past the barrier with a second decode running at the same time
            names.add(threading.current_thread().name)
            barrier.wait()
            return real(blob, out, dtype)

        monkeypatch.setattr(engine_mod, "decode_page", spy)
        outs = [np.empty_like(p) for p in pages]
        # chunks of equal weight: two pages per thread
        got = eng.get_many(ns, [f"k{s}" for s in seeds[:2] + seeds[6:]], outs[:2] + outs[6:])
        assert got == [True] * 4 and len(names) == 2
        monkeypatch.setattr(engine_mod, "decode_page", real)
        assert eng.get_many(ns, [f"k{s}" for s in seeds], outs) == [True] * 8
        assert all(np.array_equal(o, p) for o, p in zip(outs, pages))
        st = eng.stats()
        assert st.hits_dram == 12 and st.misses == 0 and st.decode_s > 0


def test_engine_parallel_decode_reports_the_callers_mistake():
    from kvdrive_sglang.tier.engine import TierConfig, TierEngine
    from kvdrive_sglang.tier.errors import CodecError

    ns = _big_ns()
    pages = _pages(ns, range(8))
    with TierEngine(TierConfig(host_bytes=64 << 20, staging_bytes=0)) as eng:
        eng.put_many(ns, [f"k{s}" for s in range(8)], pages)
        outs = [np.empty_like(p) for p in pages]
        outs[5] = np.empty(100, dtype=np.uint8)
        with pytest.raises(CodecError, match="page 'k5'"):
            eng.get_many(ns, [f"k{s}" for s in range(8)], outs)


@pytest.mark.parametrize("codec", ["zstd", "int8"])
def test_engine_put_many_encodes_on_the_pool_exactly_as_one_thread_does(codec):
    from kvdrive_sglang.tier.codecs import encode_page
    from kvdrive_sglang.tier.engine import TierConfig, TierEngine

    ns = _big_ns()
    pages = _pages(ns, range(12))
    with TierEngine(TierConfig(host_bytes=64 << 20, codec=codec, staging_bytes=0)) as eng:
        assert eng.put_many(ns, [f"k{s}" for s in range(12)], pages) == [True] * 12
        for s, p in enumerate(pages):
            blob = eng.pool.get((ns.id, f"k{s}".encode()))
            assert bytes(blob) == encode_page(p, ns.kv_dtype, codec, ns.head_dim)
        assert eng.stats().encode_s > 0


def test_staged_pages_are_copied_into_strided_outputs_row_by_row():
    from kvdrive_sglang.tier.engine import TierConfig, TierEngine

    ns = _big_ns()
    pages = _pages(ns, range(4))
    nbytes = pages[0].nbytes
    rows = 16
    host = np.zeros((rows, 8 * nbytes // rows), dtype=np.uint8)  # 4 slots with a slot-wide gap after each
    w = nbytes // rows
    outs = [host[:, 2 * p * w : (2 * p + 1) * w] for p in range(4)]
    cfg = TierConfig(host_bytes=64 << 20, staging_bytes=64 << 20, encode_threads=1)
    with TierEngine(cfg) as eng:
        gate = threading.Event()
        real = eng._staging._encode
        eng._staging._encode = lambda item: (gate.wait(10), real(item))[1]  # hold the encoder: pages stay staged
        assert eng.stage_many(ns, [f"k{s}" for s in range(4)], [p.copy() for p in pages]) == [True] * 4
        assert eng.get_many(ns, [f"k{s}" for s in range(4)], outs) == [True] * 4
        assert eng.stats().hits_staged == 4
        gate.set()
    for p, o in zip(pages, outs):
        assert o.tobytes() == p.tobytes()
    for p in range(4):
        assert not host[:, (2 * p + 1) * w : (2 * p + 2) * w].any()
