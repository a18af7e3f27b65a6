"""Per-page attention mass: the capture's sampling of decode and extend passes, its accumulation per request, and
that the forward pass never reads a result back (samples wait for ``harvest``). Real SGLang ForwardBatch /
ForwardMode objects on CPU, kvdrive's real kernel (its torch reference on CPU)."""

import threading
import time
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from torch.utils._python_dispatch import TorchDispatchMode

from kvdrive_sglang import attention_capture
from kvdrive_sglang.attention_capture import AttentionCapture, PendingSample
from kvdrive_sglang.kernels import page_attention_mass_ref


def setup(bs=2, qh=4, kvh=2, d=8, page=4, lens=(10, 7), slots=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bs, qh, d, generator=g)
    k_buffer = torch.randn(slots, kvh, d, generator=g)
    req_to_token = torch.zeros(8, 32, dtype=torch.int64)
    perm = torch.randperm(slots, generator=g)
    req_to_token[3, : lens[0]] = perm[: lens[0]]
    req_to_token[5, : lens[1]] = perm[20 : 20 + lens[1]]
    return q, k_buffer, req_to_token, torch.tensor([3, 5]), torch.tensor(lens), page


def decode_batch(rpi, lens, mode=ForwardMode.DECODE, **kw):
    return ForwardBatch(
        forward_mode=mode,
        batch_size=len(rpi),
        input_ids=torch.zeros(len(rpi), dtype=torch.int64),
        req_pool_indices=rpi,
        seq_lens=lens,
        out_cache_loc=torch.zeros(len(rpi), dtype=torch.int64),
        seq_lens_sum=int(lens.sum()),
        seq_lens_cpu=lens.clone(),
        **kw,
    )


def extend_batch(rpi, prefix, new, mode=ForwardMode.EXTEND):
    lens = torch.tensor([p + n for p, n in zip(prefix, new)])
    return ForwardBatch(
        forward_mode=mode,
        batch_size=len(rpi),
        input_ids=torch.zeros(sum(new), dtype=torch.int64),
        req_pool_indices=rpi,
        seq_lens=lens,
        out_cache_loc=torch.zeros(sum(new), dtype=torch.int64),
        seq_lens_sum=int(lens.sum()),
        seq_lens_cpu=lens.clone(),
        extend_num_tokens=sum(new),
        extend_prefix_lens=torch.tensor(prefix),
        extend_seq_lens=torch.tensor(new),
        extend_prefix_lens_cpu=list(prefix),
        extend_seq_lens_cpu=list(new),
    )


class _Layer:
    def __init__(self, layer_id, qh=4, kvh=2, d=8, scaling=0.35, **extra):
        self.layer_id, self.tp_q_head_num, self.tp_k_head_num, self.qk_head_dim = layer_id, qh, kvh, d
        self.scaling, self.logit_cap, self.k_scale_float, self.sliding_window_size = scaling, 0.0, None, -1
        self.__dict__.update(extra)


def backend_for(kb, r2t, page):
    kv_pool = types.SimpleNamespace(page_size=page, get_key_buffer=lambda lid: kb)
    return types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(req_to_token=r2t), token_to_kv_pool=kv_pool)


def direct_mass(q, kb, r2t, row, n, page, scale=0.35, group=2, cap=0.0):
    """One query [h, d] over the first n tokens of req_to_token row `row`: softmax mass per page, summed over heads."""
    k = kb[r2t[row, :n]].float().repeat_interleave(group, dim=1)  # GQA
    s = (q.float()[:, None, :] * k.transpose(0, 1)).sum(-1) * scale
    if cap:
        s = cap * torch.tanh(s / cap)
    p = torch.softmax(s, dim=-1)
    return np.array([float(p[:, j : j + page].sum()) for j in range(0, n, page)])


def test_decode_mass_matches_a_direct_softmax_per_request():
    q, kb, r2t, rpi, lens, page = setup()
    cap = AttentionCapture(every_steps=1, layers={1})
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode_batch(rpi, lens), backend_for(kb, r2t, page))
    for i, slot in enumerate((3, 5)):
        want = direct_mass(q[i], kb, r2t, slot, int(lens[i]), page)
        got = cap.pop(slot)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert abs(got.sum() - 4.0) < 1e-5  # every head's softmax sums to 1


def test_capture_samples_steps_and_layers_and_accumulates_per_request():
    q, kb, r2t, rpi, lens, page = setup()
    backend, decode = backend_for(kb, r2t, page), decode_batch(rpi, lens)
    cap = AttentionCapture(every_steps=2, layers={1})
    for _ in range(4):  # layers 0 and 1 each step; only layer 1, every 2nd step, is sampled
        for lid in (0, 1):
            cap.on_forward(_Layer(lid), q.reshape(2, -1), decode, backend)
    assert cap.launched == 2
    one = page_attention_mass_ref(q, kb, r2t, lens, page, scale=0.35, req_pool_indices=rpi).double().numpy()
    np.testing.assert_allclose(cap.pop(3), 2 * one[0, :3], rtol=1e-6)
    np.testing.assert_allclose(cap.pop(5), 2 * one[1, :2], rtol=1e-6)
    assert cap.samples == 2 and cap.pop(3) is None and cap.pop(None) is None


class _HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value back to Python (``.item()``, ``int(t)``, ``bool(t)``...) while
    ``counting()`` says so."""

    def __init__(self, counting):
        super().__init__()
        self.counting, self.reads = counting, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.counting():
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_the_forward_never_reads_a_result_back(monkeypatch):
    """Issue 15: each sampled layer read its result back (``.tolist()`` of the slots and lengths, ``.cpu()`` of the
    mass), three host syncs per sampled layer on a GPU. Now on_forward only launches: outside the kernel (on a GPU a
    Triton launch; on CPU its reference runs here) nothing is read back but SGLang's own host copy of the lengths,
    and the sample waits, pending, until harvest."""
    q, kb, r2t, rpi, lens, page = setup()
    batch = decode_batch(rpi, lens)
    host_lens = batch.seq_lens_cpu.untyped_storage().data_ptr()
    inside_kernel = threading.local()
    kernel = attention_capture._kernel

    def kernel_call(*a, **kw):
        inside_kernel.on = True
        try:
            return kernel(*a, **kw)
        finally:
            inside_kernel.on = False

    reads = []

    def guarded(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            if not getattr(inside_kernel, "on", False) and self.untyped_storage().data_ptr() != host_lens:
                reads.append(name)
            return orig(self, *a, **kw)

        return read

    monkeypatch.setattr(attention_capture, "_kernel", kernel_call)
    cap = AttentionCapture(every_steps=1, layers={1})
    with monkeypatch.context() as m:
        for name in ("tolist", "numpy", "item", "cpu", "__int__", "__float__", "__bool__"):
            m.setattr(torch.Tensor, name, guarded(name))
        with _HostReads(lambda: not getattr(inside_kernel, "on", False)) as mode:
            cap.on_forward(_Layer(1), q.reshape(2, -1), batch, backend_for(kb, r2t, page))
    assert reads == [] and mode.reads == [] and cap.launched == 1
    assert cap.pending == 1 and cap.samples == 0 and not cap._mass  # nothing folded in the forward
    assert cap.harvest() == 1 and cap.pending == 0 and set(cap._mass) == {3, 5}


def test_extend_passes_feed_the_mass_of_the_cached_prefix_pages():
    """Issue 17: on a GPU decode runs in CUDA graphs, where no hook runs, so the capture fed nothing. Extend passes
    are never graph-replayed: each request's last query tokens (each over its causal span) give the mass of its
    cached prefix pages. A request whose prefix is shorter than a page has no cached page and costs nothing."""
    page, slots = 4, 128
    g = torch.Generator().manual_seed(4)
    kb = torch.randn(slots, 2, 8, generator=g)
    r2t = torch.zeros(8, 64, dtype=torch.int64)
    perm = torch.randperm(slots, generator=g)
    prefix, new = [12, 2, 8], [5, 3, 1]
    rows = [3, 5, 6]
    for i, row in enumerate(rows):
        r2t[row, : prefix[i] + new[i]] = perm[i * 40 : i * 40 + prefix[i] + new[i]]
    q = torch.randn(sum(new), 4, 8, generator=g)
    batch = extend_batch(torch.tensor(rows), prefix, new)
    cap = AttentionCapture(every_steps=8, layers={1}, extend_rows=3)
    for lid in (0, 1, 2):
        cap.on_forward(_Layer(lid), q.reshape(sum(new), -1), batch, backend_for(kb, r2t, page))
    assert cap.launched == 1
    starts = np.cumsum([0] + new)
    for i, row in enumerate(rows):
        cached = prefix[i] // page
        got = cap.pop(row)
        if not cached:
            assert got is None
            continue
        want = np.zeros(cached)
        for j in range(min(3, new[i])):  # the last query tokens, causal
            tok = starts[i] + new[i] - 1 - j
            want += direct_mass(q[tok], kb, r2t, row, prefix[i] + new[i] - j, page)[:cached]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # chunked prefill (MIXED) is an extend pass too; extend capture can be turned off
    cap.on_forward(
        _Layer(1),
        q.reshape(sum(new), -1),
        extend_batch(torch.tensor(rows), prefix, new, ForwardMode.MIXED),
        backend_for(kb, r2t, page),
    )
    assert cap.launched == 2
    off = AttentionCapture(every_steps=8, layers={1}, extend_rows=0)
    off.on_forward(_Layer(1), q.reshape(sum(new), -1), batch, backend_for(kb, r2t, page))
    assert off.launched == 0


def test_speculative_verify_and_draft_passes_are_not_sampled():
    q, kb, r2t, rpi, lens, page = setup()
    backend = backend_for(kb, r2t, page)
    cap = AttentionCapture(every_steps=1, layers={1}, extend_rows=4)
    for mode in (ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND_V2, ForwardMode.IDLE):
        cap.on_forward(_Layer(1), q.reshape(2, -1), decode_batch(rpi, lens, mode), backend)
    draft = decode_batch(rpi, lens, spec_info=object())  # a draft model's decode step carries its spec input
    cap.on_forward(_Layer(1), q.reshape(2, -1), draft, backend)
    cap.on_forward(_Layer(1, sliding_window_size=4), q.reshape(2, -1), decode_batch(rpi, lens), backend)
    assert cap.launched == 0


def test_the_layers_k_scale_and_logit_cap_enter_the_mass():
    """Issue 15: an fp8 KV cache stores K / k_scale and a soft-capped model caps its logits; the capture ignored
    both, so the mass was not the model's attention."""
    q, kb, r2t, rpi, lens, page = setup()
    k8 = (kb / 2).to(torch.float8_e4m3fn)
    layer = _Layer(1, k_scale_float=2.0, logit_cap=3.0, scaling=0.9)
    cap = AttentionCapture(every_steps=1, layers={1})
    cap.on_forward(layer, q.reshape(2, -1), decode_batch(rpi, lens), backend_for(k8, r2t, page))
    kf = k8.float() * 2.0
    for i, slot in enumerate((3, 5)):
        want = direct_mass(q[i], kf, r2t, slot, int(lens[i]), page, scale=0.9, cap=3.0)
        np.testing.assert_allclose(cap.pop(slot), want, rtol=1e-5)


def test_mla_geometry_joins_the_rope_query():
    """MLA (DeepSeek): one latent KV head of 576 (512 + 64 rope), 16 query heads; absorbed backends pass the query's
    rope part as ``q_rope``. Read from the layer, not assumed."""
    g = torch.Generator().manual_seed(5)
    hq, d, dv, page = 16, 576, 512, 16
    kb = torch.randn(200, 1, d, generator=g) * 0.05
    r2t = torch.zeros(4, 64, dtype=torch.int64)
    r2t[1, :40] = torch.randperm(200, generator=g)[:40]
    q_nope, q_rope = torch.randn(1, hq, dv, generator=g), torch.randn(1, hq, d - dv, generator=g)
    layer = _Layer(1, qh=hq, kvh=1, d=d, v_head_dim=dv, scaling=d**-0.5)
    cap = AttentionCapture(every_steps=1, layers={1})
    batch = decode_batch(torch.tensor([1]), torch.tensor([40]))
    cap.on_forward(layer, q_nope.reshape(1, -1), batch, backend_for(kb, r2t, page), q_rope=q_rope)
    want = direct_mass(torch.cat([q_nope, q_rope], -1)[0], kb, r2t, 1, 40, page, scale=d**-0.5, group=hq)
    got = cap.pop(1)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert len(got) == 3 and abs(got.sum() - hq) < 1e-3


def test_copies_stay_bounded_at_page_size_one():
    """Issue 15: at page 1 a sample copied [batch, seq_len] float64 to the host. Pages are summed on the device into
    at most max_groups groups; the mass is kept and spread over each group's pages."""
    g = torch.Generator().manual_seed(6)
    kb = torch.randn(300, 2, 8, generator=g)
    r2t = torch.randperm(300, generator=g)[None, :].repeat(2, 1)
    q, lens = torch.randn(2, 4, 8, generator=g), torch.tensor([300, 37])
    exact = AttentionCapture(every_steps=1, layers={1})
    exact.on_forward(_Layer(1), q.reshape(2, -1), decode_batch(torch.tensor([0, 1]), lens), backend_for(kb, r2t, 1))
    grouped = AttentionCapture(every_steps=1, layers={1}, max_groups=64)
    grouped.on_forward(_Layer(1), q.reshape(2, -1), decode_batch(torch.tensor([0, 1]), lens), backend_for(kb, r2t, 1))
    assert exact._pending[0].mass.shape == (2, 300) and grouped._pending[0].mass.shape == (2, 38)  # groups of 8
    for slot, n in ((0, 300), (1, 37)):
        e, gm = exact.pop(slot), grouped.pop(slot)
        assert len(e) == len(gm) == n and gm.sum() == pytest.approx(e.sum(), rel=1e-5)
        np.testing.assert_allclose(gm[:8].sum(), e[:8].sum(), rtol=1e-5)
        assert np.allclose(gm[:8], gm[0])  # spread evenly within the group


class _InFlight:
    """A device event of a sample still running (CPU has no CUDA events): query() is what the capture asks."""

    def __init__(self):
        self.complete = False

    def query(self):
        return self.complete


def test_a_sample_in_flight_when_its_request_finishes_is_dropped():
    """A request popped while a later sample of its slot is still on the device: the slot may be reused by the next
    request, which must not inherit it. Samples launched after the pop count for the new request."""
    cap = AttentionCapture(every_steps=1, layers={1})
    ev = _InFlight()
    with cap._lock:
        cap._pending.append(PendingSample(1, None, torch.tensor([3]), torch.ones(1, 2), [2], 1))
        cap._pending.append(PendingSample(2, ev, torch.tensor([3]), torch.full((1, 2), 5.0), [2], 1))
        cap._seq = 2
    np.testing.assert_array_equal(cap.pop(3), [1.0, 1.0])  # the completed one; the other is in flight
    ev.complete = True
    with cap._lock:
        cap._seq += 1
        cap._pending.append(PendingSample(cap._seq, None, torch.tensor([3]), torch.full((1, 2), 7.0), [2], 1))
    assert cap.harvest() == 2
    np.testing.assert_array_equal(cap.pop(3), [7.0, 7.0])


def test_samples_wait_for_the_kernels_warm_up():
    """On CUDA the Triton kernel for a layer geometry is compiled off the request path: its samples are skipped
    until the warm-up (a background thread) is done. Exercised on CPU with the same code."""
    q, kb, r2t, rpi, lens, page = setup()
    backend, decode = backend_for(kb, r2t, page), decode_batch(rpi, lens)
    cap = AttentionCapture(every_steps=1, layers={1}, warm_up=True)
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode, backend)
    assert cap.launched == 0 and cap.skipped == 1
    deadline = time.monotonic() + 30
    while "warming" in cap._warm._state.values() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(cap._warm._state.values()) == {"ready"}
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode, backend)
    assert cap.launched == 1 and cap.pop(3) is not None


def test_capture_off_and_missing_pools_disable_quietly():
    q, _, _, rpi, lens, _ = setup()
    decode = decode_batch(rpi, lens)
    off = AttentionCapture(every_steps=0)
    off.on_forward(_Layer(1), q.reshape(2, -1), decode, object())
    assert off.launched == 0
    cap = AttentionCapture(every_steps=1, layers={1})
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode, object())  # a backend without pools
    assert cap.launched == 0 and "no KV pools" in cap._disabled_reason


def test_nothing_is_sampled_or_counted_while_sglang_captures_cuda_graphs():
    """SGLang captures decode CUDA graphs at start-up (warm-ups and one captured forward per batch size) in its
    capture mode; a sample there reads back to the host (invalidating the capture: the server fails to start) and
    those steps are nobody's requests. Simulated with SGLang's own capture-mode context."""
    from sglang.srt.model_executor.runner_utils.capture_mode import model_capture_mode

    q, kb, r2t, rpi, lens, page = setup()
    backend, decode = backend_for(kb, r2t, page), decode_batch(rpi, lens)
    cap = AttentionCapture(every_steps=1, layers={1})
    with model_capture_mode():
        for _ in range(3):
            cap.on_forward(_Layer(1), q.reshape(2, -1), decode, backend)
        cap.on_forward(_Layer(1), q.reshape(2, -1), extend_batch(rpi, [8, 4], [2, 3]), backend)
    assert cap.launched == 0 and cap.pop(3) is None and cap._step == 0
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode, backend)  # after capture: sampled as usual
    assert cap.launched == 1 and cap.pop(3) is not None
