"""Per-page attention mass: the capture's sampling and accumulation, and its mass against a direct softmax."""
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from kvdrive_sglang.attention_capture import AttentionCapture, page_mass  # noqa: E402


def setup(bs=2, qh=4, kvh=2, d=8, page=4, lens=(10, 7), slots=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bs, qh, d, generator=g)
    k_buffer = torch.randn(slots, kvh, d, generator=g)
    req_to_token = torch.zeros(8, 32, dtype=torch.int64)
    perm = torch.randperm(slots, generator=g)
    req_to_token[3, :lens[0]] = perm[:lens[0]]
    req_to_token[5, :lens[1]] = perm[20:20 + lens[1]]
    return q, k_buffer, req_to_token, torch.tensor([3, 5]), torch.tensor(lens), page


def test_page_mass_matches_a_direct_softmax_per_request():
    q, kb, r2t, rpi, lens, page = setup()
    mass = page_mass(q, kb, r2t, rpi, lens, page, scale=0.35)
    assert mass.shape == (2, 3)
    for i in range(2):
        n = int(lens[i])
        k = kb[r2t[int(rpi[i]), :n]].repeat_interleave(2, dim=1)  # GQA 4 q heads over 2 kv heads
        p = torch.softmax((q[i][:, None, :] * k.transpose(0, 1)).sum(-1) * 0.35, dim=-1)  # [h, n]
        want = [float(p[:, j:j + page].sum()) for j in range(0, n, page)]
        np.testing.assert_allclose(mass[i, :len(want)], want, rtol=1e-5)
        assert abs(mass[i].sum() - 4.0) < 1e-5  # every head's softmax sums to 1
        assert not mass[i, len(want):].any()


class _Layer:
    def __init__(self, layer_id):
        self.layer_id, self.tp_q_head_num, self.qk_head_dim, self.scaling = layer_id, 4, 8, 0.35


def test_capture_samples_steps_and_layers_and_accumulates_per_request():
    q, kb, r2t, rpi, lens, page = setup()
    kv_pool = types.SimpleNamespace(page_size=page, get_key_buffer=lambda lid: kb)
    backend = types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(req_to_token=r2t), token_to_kv_pool=kv_pool)
    decode = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=rpi, seq_lens=lens)
    extend = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, req_pool_indices=rpi, seq_lens=lens)
    cap = AttentionCapture(every_steps=2, layers={1})
    for step in range(4):  # layers 0 and 1 each step; only layer 1, every 2nd step, is sampled
        for lid in (0, 1):
            cap.on_forward(_Layer(lid), q.reshape(2, -1), decode, backend)
    cap.on_forward(_Layer(1), q.reshape(2, -1), extend, backend)  # prefill: not sampled
    assert cap.samples == 2
    one = page_mass(q, kb, r2t, rpi, lens, page, 0.35)
    np.testing.assert_allclose(cap.pop(3), 2 * one[0, :3])
    np.testing.assert_allclose(cap.pop(5), 2 * one[1, :2])
    assert cap.pop(3) is None and cap.pop(None) is None


def test_capture_off_and_missing_pools_disable_quietly():
    q, kb, r2t, rpi, lens, page = setup()
    decode = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=rpi, seq_lens=lens)
    off = AttentionCapture(every_steps=0)
    off.on_forward(_Layer(1), q.reshape(2, -1), decode, object())
    assert off.samples == 0
    cap = AttentionCapture(every_steps=1, layers={1})
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode, object())  # a backend without pools
    assert cap.samples == 0 and "no KV pools" in cap._disabled_reason


def test_nothing_is_sampled_or_counted_while_sglang_captures_cuda_graphs():
    """SGLang captures decode CUDA graphs at start-up (warm-ups and one captured forward per batch size) in its
    capture mode; a sample there reads back to the host (invalidating the capture: the server fails to start) and
    those steps are nobody's requests. Simulated with SGLang's own capture-mode context."""
    from sglang.srt.model_executor.runner_utils.capture_mode import model_capture_mode

    q, kb, r2t, rpi, lens, page = setup()
    kv_pool = types.SimpleNamespace(page_size=page, get_key_buffer=lambda lid: kb)
    backend = types.SimpleNamespace(req_to_token_pool=types.SimpleNamespace(req_to_token=r2t), token_to_kv_pool=kv_pool)
    decode = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=rpi, seq_lens=lens)
    cap = AttentionCapture(every_steps=1, layers={1})
    with model_capture_mode():
        for _ in range(3):
            cap.on_forward(_Layer(1), q.reshape(2, -1), decode, backend)
    assert cap.samples == 0 and cap.pop(3) is None and cap._step == 0
    cap.on_forward(_Layer(1), q.reshape(2, -1), decode, backend)  # after capture: sampled as usual
    assert cap.samples == 1 and cap.pop(3) is not None
