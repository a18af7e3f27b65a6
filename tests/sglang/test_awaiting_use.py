"""AwaitingUse: pages loaded into SGLang's host pool for requests that have not run yet, in load order."""

from kvdrive_sglang.awaiting_use import AwaitingUse


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_pages_await_use_in_load_order_until_used():
    clock = Clock()
    a = AwaitingUse(clock)
    a.loaded(["a0", "a1"])
    a.loaded(["b0"])
    assert a.order("a0") == a.order("a1") < a.order("b0")  # one batch, one number; later batches rank after
    assert a.order("nope") is None
    a.used(["a0", "a1", "unknown"])  # a finished request ran through them (or they left the host pool)
    assert a.order("a0") is None and a.order("b0") is not None and len(a) == 1


def test_a_reload_moves_a_page_to_the_back_and_an_abandoned_one_expires():
    clock = Clock()
    a = AwaitingUse(clock)
    a.loaded(["p"])
    a.loaded(["q"])
    a.loaded(["p"])  # loaded again for a later request: ranks as the latest
    assert a.order("q") < a.order("p")
    clock.t += AwaitingUse.HOLD_S + 1  # its request never ran (aborted): the page ranks as any other again
    assert a.order("p") is None and a.order("q") is None and len(a) == 0


def test_bounded():
    a = AwaitingUse(Clock())
    a.MAX_KEYS = 4
    a.loaded([f"k{i}" for i in range(6)])
    assert len(a) == 4 and a.order("k0") is None and a.order("k5") is not None  # the oldest forgotten first


def test_the_backend_marks_what_it_loads_and_clears_what_runs_or_leaves(tmp_path):
    """KvdriveStorage on a real SGLang host pool: pages batch_get_v1 loads await use (in load order) until a finished
    request through them is reported or they leave the host pool."""
    import pytest

    pytest.importorskip("sglang")
    from tests.sglang.backend_case import PAGE, make_backend, make_host, written

    host = make_host()
    be = make_backend(tmp_path, host)
    try:
        first, second = [f"a{i:063x}" for i in range(3)], [f"b{i:063x}" for i in range(2)]
        for ks, seed in ((first, 1), (second, 2)):
            idx, _ = written(host, len(ks), seed)
            assert all(be.batch_set_v1(ks, idx))
            host.free(idx)
        assert len(be.awaiting) == 0  # stored, not loaded for anyone
        for ks in (first, second):
            assert all(be.batch_get_v1(ks, host.alloc(len(ks) * PAGE)))
        assert be.awaiting.order(first[0]) < be.awaiting.order(second[0])
        be.record_request(first)  # the first request ran
        be.record_host_evicted(second[:1])  # and one of the second's pages left the host pool
        assert be.awaiting.order(first[0]) is None and be.awaiting.order(second[0]) is None
        assert be.awaiting.order(second[1]) is not None
    finally:
        be.close()
