"""The shared remote tier seen from SGLang's side (issue 19): a real KvdriveStorage with --kvdrive-remote on a real
Mooncake master (tests/tier/mooncake_master.py), its per-tier metrics and summary line, and the remote settings it
records for `kvdrive stats`."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")
prom = pytest.importorskip("prometheus_client")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config  # noqa: E402
from kvdrive_sglang.metrics import TierMetrics, summary_line  # noqa: E402
from kvdrive_sglang.tier.cli import main as kvdrive_cli  # noqa: E402
from tests.sglang.backend_case import PAGE, fill, make_host  # noqa: E402
from tests.tier.mooncake_master import Master, mooncake_or_skip  # noqa: E402

MiB = 1 << 20
REMOTE_CONFIG = {
    "timeout_s": 2.0,
    "retry_s": 60.0,
    "global_segment_size": 16 * MiB,
    "local_buffer_size": 16 * MiB,
    "batch_bytes": 4 * MiB,
}


def backend(store_dir, host, model_name="tiny-llama", **settings):
    extra = json.loads(
        storage_extra_config(
            KvdriveOptions(dir=str(store_dir), host_gb=0.01, disk_gb=1, write_policy="write_through", **settings)
        )
    )
    cfg = HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=host.layout == "page_first",
        model_name=model_name,
        extra_config=extra,
    )
    be = StorageBackendFactory.create_backend("dynamic", cfg, host)
    be.register_mem_pool_host(host)
    return be


@pytest.fixture
def master(tmp_path):
    mooncake_or_skip()
    m = Master(str(tmp_path / "master.log")).start()
    yield m
    m.kill()


def test_remote_tier_metrics_summary_and_recorded_settings(tmp_path, master, capsys):
    host = make_host()
    be = backend(tmp_path / "node", host, remote=master.url, remote_config=REMOTE_CONFIG)
    idx = host.alloc(4 * PAGE)
    fill(host, [idx[i * PAGE] for i in range(4)], 3)
    keys = [f"{i:064x}" for i in range(4)]
    be.batch_set_v1(keys, idx)
    assert be.engine.flush(30)  # written down, then written behind to the shared tier
    be.engine.clear(be.ns)  # this node forgets them; the shared tier's copies stay
    assert be.batch_get_v1(keys, host.alloc(4 * PAGE)) == [True] * 4
    reg = prom.CollectorRegistry()
    m = TierMetrics({"tp_rank": 0}, registry=reg)
    st = be.tier_stats()
    m.update(st)
    m.update(be.tier_stats())  # no change, no increments
    v = lambda name, **lab: reg.get_sample_value(name, {"tp_rank": "0", **lab})  # noqa: E731
    assert v("kvdrive:hit_pages_total", tier="remote") == 4
    assert v("kvdrive:remote_bytes_total", direction="written") == st["remote"]["bytes_written"] > 0
    assert v("kvdrive:remote_bytes_total", direction="read") == st["remote"]["bytes_read"] > 0
    assert v("kvdrive:remote_calls_total", op="get") >= 1 and v("kvdrive:remote_seconds_total", op="get") > 0
    assert v("kvdrive:remote_calls_total", op="put") >= 1 and v("kvdrive:remote_calls_total", op="exists") >= 1
    assert v("kvdrive:remote_up") == 1
    line = summary_line(st)
    assert " | remote hits 4 miss 0 read " in line and "ms/call" in line and "OFF" not in line

    master.kill()  # the master dies: the next remote read is a fault, counted, and the tier is off
    other = [f"{i + 100:064x}" for i in range(2)]
    assert be.batch_get_v1(other, host.alloc(2 * PAGE)) == [False, False]
    st = be.tier_stats()
    m.update(st)
    faults = st["remote"]["faults"]
    assert sum(faults.values()) >= 1
    assert sum(v("kvdrive:remote_faults_total", kind=k) for k in faults) == sum(faults.values())
    assert v("kvdrive:remote_up") == 0
    assert " OFF for " in summary_line(st)
    be.close()

    assert kvdrive_cli(["stats", str(tmp_path / "node"), "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)["remote"]
    assert recorded["url"] == master.url and recorded["global_segment_size"] == 16 * MiB
    # a later server on the store without --kvdrive-remote: stats no longer show a remote tier it does not use
    backend(tmp_path / "node", host).close()
    assert kvdrive_cli(["stats", str(tmp_path / "node"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["remote"]["url"] is None


def test_summary_line_without_a_remote_tier_is_unchanged(tmp_path):
    host = make_host()
    be = backend(tmp_path / "plain", host)
    st = be.tier_stats()
    assert "remote" not in st and "remote" not in summary_line(st)
    reg = prom.CollectorRegistry()
    TierMetrics({"tp_rank": 0}, registry=reg).update(st)
    assert reg.get_sample_value("kvdrive:hit_pages_total", {"tp_rank": "0", "tier": "remote"}) is None
    be.close()


def test_copies_of_one_model_on_two_machines_get_one_remote_namespace(tmp_path, monkeypatch):
    # the wiring from SGLang's side: KvdriveStorage's namespace (storage_backend.namespace_for) records the model's
    # cross-machine identity, and the engine addresses remote objects under it; local namespaces stay path-bound
    from kvdrive_sglang import model_identity as mi
    from kvdrive_sglang.compat import server_args

    # backends built by hand, as no server publishes args for them: an earlier test of the suite may have left SGLang's
    # process-wide server args set (another model path), which made these fall back to local identities
    monkeypatch.setattr(server_args, "running_server_args", lambda: None)
    from kvdrive_sglang.tier.remote import model_ids
    from tests.sglang.test_model_identity import copy_elsewhere, make_model

    model_ids.forget_models()
    mi._done.clear()
    a = make_model(tmp_path / "host_a" / "model")
    b = copy_elsewhere(a, tmp_path / "host_b" / "model")
    other = make_model(tmp_path / "host_c" / "model", seed=1)  # other weights, same names and sizes
    url = "mooncake://127.0.0.1:1"  # never called here: no connection is made
    nodes = [backend(tmp_path / f"s{i}", make_host(), model_name=m, remote=url) for i, m in enumerate((a, b, other))]
    try:
        local = [n.ns for n in nodes]
        remote = [n.engine.remote_ns(ns) for n, ns in zip(nodes, local)]
        assert len({ns.id for ns in local}) == 3
        assert remote[0].id == remote[1].id != remote[2].id
        assert remote[0].model.startswith("sha256:") and remote[0].tenant == local[0].tenant
    finally:
        for n in nodes:
            n.close()
        model_ids.forget_models()
        mi._done.clear()
