"""Measured costs reach the promoter: the prefill meter on SGLang's forward hook, the storage reload round trip, and
per-tier read speeds, with real SGLang host pools and kvdrive's real tiers (CPU)."""

import logging
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

from kvdrive_sglang import cost_meter
from kvdrive_sglang.cost_meter import PrefillMeter
from tests.sglang.backend_case import PAGE, make_backend, make_host, pages_of, written


def test_prefill_meter_fits_the_marginal_cost_of_extend_passes_only():
    meter = PrefillMeter()
    calls = []

    def forward(runner, batch, *a, **kw):  # 2 ms fixed + 20 us per new token
        calls.append(batch)
        time.sleep(0.002 + 20e-6 * (batch.extend_num_tokens or 0))
        return "out"

    runner = SimpleNamespace(device="cpu")
    for n in (16, 64, 128, 256, 512, 32, 96, 384, 200, 300):
        batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_num_tokens=n)
        assert meter.around_forward(forward, runner, batch) == "out"
    for _ in range(5):  # decode passes are not prefill: not measured
        meter.around_forward(forward, runner, SimpleNamespace(forward_mode=ForwardMode.DECODE, extend_num_tokens=None))
    assert len(calls) == 15 and meter.fit.observed == 10
    assert meter.seconds_per_token() == pytest.approx(20e-6, rel=0.5)


def test_a_broken_batch_is_passed_through_unmeasured_logged_once_and_counted(caplog):
    """Issue 17: both of the meter's ``except Exception: pass`` dropped a measurement without a word."""
    meter = PrefillMeter()
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        for _ in range(3):
            out = meter.around_forward(lambda r, b: "ran", SimpleNamespace(device="cpu"), object())
            assert out == "ran"
    assert meter.fit.observed == 0 and meter.failures == 3
    assert caplog.text.count("prefill cost measurement failed") == 1


def _batch(mode, tokens=64):
    n = 2
    return ForwardBatch(
        forward_mode=mode,
        batch_size=n,
        input_ids=torch.zeros(tokens, dtype=torch.int64),
        req_pool_indices=torch.arange(n),
        seq_lens=torch.tensor([tokens, 1]),
        out_cache_loc=torch.zeros(tokens, dtype=torch.int64),
        seq_lens_sum=tokens + 1,
        extend_num_tokens=tokens,
    )


def test_only_the_target_models_own_extend_passes_are_timed():
    """Issue 15: the meter timed every pass ``is_extend()`` admits: a speculative draft model's runner, target-verify
    passes (draft tokens checked by the target), split-prefill and dLLM passes, and passes that wait for HiCache's
    layer-wise load-back (its LayerDoneCounter pointed at a pending load), none of which is the cost of a prefill."""
    from sglang.srt.managers.cache_controller import LayerDoneCounter

    meter = PrefillMeter()
    ran = []

    def forward(runner, batch):
        ran.append(batch.forward_mode)
        return "out"

    counter = LayerDoneCounter(4)
    target = SimpleNamespace(
        device="cpu", is_draft_worker=False, token_to_kv_pool=SimpleNamespace(layer_transfer_counter=counter)
    )
    draft = SimpleNamespace(device="cpu", is_draft_worker=True, token_to_kv_pool=SimpleNamespace())
    not_timed = [
        (draft, ForwardMode.EXTEND),
        (target, ForwardMode.TARGET_VERIFY),
        (target, ForwardMode.DRAFT_EXTEND_V2),
        (target, ForwardMode.SPLIT_PREFILL),
        (target, ForwardMode.DLLM_EXTEND),
        (target, ForwardMode.IDLE),
        (target, ForwardMode.DECODE),
    ]
    for runner, mode in not_timed:
        assert meter.around_forward(forward, runner, _batch(mode)) == "out"
    assert meter.fit.observed == 0
    counter.set_consumer(0)  # the tp worker: this batch consumes a pending load-back
    meter.around_forward(forward, target, _batch(ForwardMode.EXTEND))
    assert meter.fit.observed == 0
    counter.set_consumer(-1)
    for mode in (ForwardMode.EXTEND, ForwardMode.MIXED):  # a plain prefill and a chunked-prefill mixed pass
        meter.around_forward(forward, target, _batch(mode))
    assert meter.fit.observed == 2 and len(ran) == len(not_timed) + 3 and meter.failures == 0


def _keys(n, start=0):
    return [f"{i:064x}" for i in range(start, start + n)]


def test_measured_costs_decide_reload_vs_recompute(tmp_path, monkeypatch):
    """A prefill measured 1000x faster than the assumed 10k tokens/s makes DRAM hits not worth reloading: the backend
    stops claiming them, and says why in its stats."""
    host = make_host(size=256)
    be = make_backend(tmp_path, host)
    idx, _ = written(host, 40, seed=3)
    assert all(be.batch_set_v1(_keys(40), idx))
    assert be.engine.flush(timeout=30)  # encoded into the DRAM tier, whose reads the tier timings measure
    assert be.batch_exists(_keys(40)) == 40  # assumed costs: reload
    for _ in range(3):  # round trips: exists then get, as SGLang's prefetch does
        assert be.batch_exists(_keys(40)) == 40
        out = host.alloc(40 * PAGE)
        assert all(be.batch_get_v1(_keys(40), out))
        host.free(out)
    for n in (8, 16, 24, 32):
        be.batch_exists(_keys(n))
        out = host.alloc(n * PAGE)
        be.batch_get_v1(_keys(n), out)
        host.free(out)
    fast = PrefillMeter()
    for n in range(1, 20):
        fast.fit.add(n * 100, 1e-3 + n * 100 * 1e-8)  # 100M tokens/s
    monkeypatch.setattr(cost_meter, "PREFILL", fast)
    monkeypatch.setattr("kvdrive_sglang.upkeep.PREFILL", fast)
    be.upkeep.calibrate()
    costs = be.tier_stats()["costs"]
    assert costs["prefill_tokens_per_s"] == (pytest.approx(1e8, rel=1e-3), "measured")
    assert costs["dram_gbps"][1] == "measured"
    assert be.reload_meter.fit.observed == 7  # every exists -> get round trip was timed (its line needs spread)
    assert be.batch_exists(_keys(40)) == 0
    assert be.tier_stats()["io"]["recompute_pages"] >= 40
    be.close()


def test_measured_costs_outlive_a_restart(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    be.promoter.calibrate(prefill_s_per_token=1e-5, tier_s_per_byte={"disk": 2e-9}, reload_fixed_s=0.02)
    be.upkeep.calibrate()
    be.close()
    again = make_backend(tmp_path, make_host())  # a new server on the same store: no measurement yet
    costs = again.tier_stats()["costs"]
    assert costs["prefill_tokens_per_s"] == (pytest.approx(1e5), "measured")
    assert costs["reload_fixed_s"] == (pytest.approx(0.02), "measured")
    assert costs["disk_gbps"] == (pytest.approx(0.5), "measured")
    assert costs["dram_gbps"][1] == "assumed"
    again.close()
    other = make_backend(tmp_path / "other", make_host())  # another store knows nothing of them
    assert all(src == "assumed" for _, src in other.tier_stats()["costs"].values())
    other.close()


def test_a_damaged_costs_note_is_ignored(tmp_path, caplog):
    be = make_backend(tmp_path, make_host())
    be.engine.put_note(be.upkeep.costs_note(), b'{"prefill_s_per_token": -3}')
    be.close()
    with caplog.at_level(logging.WARNING, logger="kvdrive.sglang"):
        again = make_backend(tmp_path, make_host())
    assert again.tier_stats()["costs"]["prefill_tokens_per_s"][1] == "assumed"
    assert "ignoring the costs kept" in caplog.text
    again.close()


def test_reload_always_claims_hits_the_promoter_would_recompute(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    idx, _ = written(host, 4, seed=5)
    be.batch_set_v1(_keys(4), idx)
    be.close()  # on disk only
    slow = {"disk_gbps": 1e-6}  # a disk slower than any prefill
    auto = make_backend(tmp_path, make_host(), promoter=slow)
    assert auto.batch_exists(_keys(4)) == 0
    auto.close()
    always = make_backend(tmp_path, make_host(), promoter=slow, reload="always")
    assert always.batch_exists(_keys(4)) == 4
    always.close()
    with pytest.raises(Exception, match="sometimes"):
        make_backend(tmp_path, make_host(), reload="sometimes")


def test_the_dram_codec_is_chosen_again_on_the_measured_prefill(tmp_path, caplog):
    """Issue 18: with --kvdrive-codec auto the engine starts on an assumed bound (an 8B model at 12k tok/s); once
    this server's prefill is measured, the upkeep's calibration decides again on it x this model's KV bytes per
    token, and the choice and its source reach the log and the backend's stats."""
    host = make_host()
    be = make_backend(tmp_path, host, codec="auto")
    assert "assumed" in be.engine.codec_choice.measured["needed_source"]
    per_token = be.upkeep.page_bytes / be.upkeep.page_size
    # a prefill so fast that no decode keeps up (1e12 tok/s): the DRAM tier goes raw, the disk stays zstd
    be.promoter.calibrate(prefill_s_per_token=1e-12)
    with caplog.at_level(logging.INFO, logger="kvdrive.tier"):
        be.upkeep.calibrate()
    codec = be.tier_stats()["codec"]
    assert (codec["dram"], codec["disk"]) == ("raw", "zstd")
    assert f"measured prefill 1000000000000 tok/s x {per_token:.0f} B/token" in codec["reason"]
    assert any("codec dram=zstd -> raw" in r.getMessage() for r in caplog.records)
    idx, pages = written(host, 8, seed=5)
    assert all(be.batch_set_v1(_keys(8), idx))  # stored raw now, and still read back right
    assert be.engine.flush(timeout=30)
    out = host.alloc(8 * PAGE)
    assert all(be.batch_get_v1(_keys(8), out))
    assert all(torch.equal(a, b) for a, b in zip(pages_of(host, out, 8), pages))
    host.free(out)
    # this CPU's own prefill (a few thousand tok/s of a tiny model): far below any decode: zstd again
    be.promoter.calibrate(prefill_s_per_token=1 / 3000)
    be.upkeep.calibrate()
    assert be.tier_stats()["codec"]["dram"] == "zstd"
    be.close()
