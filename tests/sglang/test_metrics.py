"""kvdrive's metrics: Prometheus counters/gauges fed from real tier stats, and the periodic log line."""

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")
prom = pytest.importorskip("prometheus_client")

from kvdrive_sglang.metrics import Reporter, TierMetrics, summary_line  # noqa: E402
from tests.sglang.backend_case import PAGE, fill, make_backend, make_host  # noqa: E402


def test_metrics_follow_the_tiers(tmp_path):
    host = make_host()
    be = make_backend(tmp_path, host)
    idx = host.alloc(4 * PAGE)
    fill(host, [idx[i * PAGE] for i in range(4)], 3)
    keys = [f"{i:064x}" for i in range(4)]
    be.batch_set_v1(keys, idx)
    be.engine.flush()
    be.batch_get_v1(keys + ["f" * 64], host.alloc(5 * PAGE))
    be.record_radix_event("storage_hit", 16)
    reg = prom.CollectorRegistry()
    m = TierMetrics({"tp_rank": 0}, registry=reg)
    m.update(be.tier_stats())
    m.update(be.tier_stats())  # a second update with no change adds nothing
    v = lambda name, **lab: reg.get_sample_value(name, {"tp_rank": "0", **lab})  # noqa: E731
    assert v("kvdrive:hit_pages_total", tier="dram") == 4
    assert v("kvdrive:miss_pages_total") == 1
    assert v("kvdrive:reload_pages_total") == 4 and v("kvdrive:reload_seconds_total") > 0
    assert v("kvdrive:radix_tokens_total", event="storage_hit") == 16
    assert v("kvdrive:usage_bytes", tier="disk") > 0 and v("kvdrive:capacity_bytes", tier="disk") == 1 << 30
    assert v("kvdrive:codec_ratio", tier="dram") > 1.0
    assert v("kvdrive:bytes_total", direction="written") > 0
    be.close()


def test_reporter_logs_a_summary_line(tmp_path, caplog):
    host = make_host()
    be = make_backend(tmp_path, host)
    line = summary_line(be.tier_stats())
    assert line.startswith("kvdrive: DRAM 0 pages") and "disk 0 pages" in line
    with caplog.at_level(logging.INFO, logger="kvdrive.sglang"):
        r = Reporter(be.tier_stats, None, interval_s=3600)
        r.close()  # a closing line is always logged
    assert any(rec.message.startswith("kvdrive: DRAM") for rec in caplog.records)
    be.close()


def test_the_summary_line_shows_the_codec_per_tier_and_why(tmp_path, monkeypatch):
    """Issue 18: the codec each tier uses and the reason (measured, or pinned) appear in the summary line."""
    from dataclasses import replace

    from kvdrive_sglang.tier import parallel
    from kvdrive_sglang.tier.codec_choice import DecodeSpeed, choose

    host = make_host()
    be = make_backend(tmp_path, host, codec="auto")  # 10 MiB DRAM tier over a 1 GiB disk
    choice = be.engine.codec_choice  # measured on this machine when the engine opened
    line = summary_line({**be.tier_stats(), "codec": choice._asdict()})
    assert f"| codec dram={choice.dram} disk={choice.disk} (zstd decode " in line and " GB/s needed) |" in line
    # the same tiers on a machine of two cores decoding 0.5 GB/s each: raw in DRAM, zstd on disk
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    slow = choose(replace(be.engine.config, decode_threads=2), speed=DecodeSpeed(gbps_per_core=0.5, ratio=1.49))
    line = summary_line({**be.tier_stats(), "codec": slow._asdict()})
    assert "| codec dram=raw disk=zstd (zstd decode 0.5 GB/s x 2 threads < 1.6 GB/s needed) |" in line
    be.close()
    pinned = make_backend(tmp_path / "pinned", make_host(), codec="raw")
    line = summary_line({**pinned.tier_stats(), "codec": pinned.engine.codec_choice._asdict()})
    assert "| codec dram=raw disk=raw (pinned: codec raw) |" in line
    assert "codec" not in summary_line({**pinned.tier_stats(), "codec": None})  # a tier_stats without it
    pinned.close()
