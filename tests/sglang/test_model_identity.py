"""The model part of a namespace across machines, for the shared remote tier (issue 19): model_identity.py.

"Machines" here are two copies of one model directory at different paths with different mtimes (what two hosts with
their own download look like), and hub caches under different roots. Real files, real SHA-256; the storage config is
SGLang's own HiCacheStorageConfig with the extra config ``--kv-tier kvdrive --kvdrive-remote`` writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from types import SimpleNamespace

import pytest

from kvdrive_sglang import model_identity as mi
from kvdrive_sglang.model_identity import IdentitySource, cross_machine_identity, model_identity
from kvdrive_sglang.tier.remote import model_ids

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def make_model(d, *, shards: int = 2, shard_bytes: int = 3 << 20, seed: int = 0):
    """A model directory: config.json, a tokenizer, and safetensors-like shards (a JSON header and tensor bytes)."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}, fh)
    with open(os.path.join(d, "tokenizer.json"), "w") as fh:
        json.dump({"model": {"vocab": {"a": 0}}}, fh)
    for i in range(shards):
        header = json.dumps({"w": {"dtype": "BF16", "shape": [shard_bytes // 2], "data_offsets": [0, shard_bytes]}})
        body = bytes((j * 7 + i + seed) % 251 for j in range(256)) * (shard_bytes // 256)
        with open(os.path.join(d, f"model-{i:05d}.safetensors"), "wb") as fh:
            fh.write(len(header).to_bytes(8, "little") + header.encode() + body)
    return str(d)


def copy_elsewhere(src, dst):
    """The same files on "another machine": another path, other mtimes."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        os.utime(os.path.join(dst, name), ns=(1_000_000_000, 1_000_000_000))
    return str(dst)


def ident(path, **kw):
    return cross_machine_identity(path, local=model_identity(path), **kw)


def test_two_copies_of_one_model_share_a_content_identity_that_local_identities_lack(tmp_path):
    a = make_model(tmp_path / "host_a" / "m")
    b = copy_elsewhere(a, tmp_path / "host_b" / "m")
    assert model_identity(a) != model_identity(b)  # the local identity: path + mtimes
    ia, ib = ident(a), ident(b)
    assert ia.source is ib.source is IdentitySource.CONTENT
    assert ia.model == ib.model and ia.model.startswith("sha256:")


def test_one_byte_changed_deep_inside_a_tensor_changes_the_content_identity(tmp_path):
    # a fine-tune that changes one tensor away from the header and any sampled chunk: same names, same sizes
    a = make_model(tmp_path / "a")
    b = copy_elsewhere(a, tmp_path / "b")
    shard = os.path.join(b, "model-00001.safetensors")
    with open(shard, "r+b") as fh:
        fh.seek((5 << 19) + 12345)  # ~2.5 MiB in: neither the first nor the last MiB
        old = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([old[0] ^ 1]))
    assert os.path.getsize(shard) == os.path.getsize(os.path.join(a, "model-00001.safetensors"))
    assert ident(a).model != ident(b).model


def test_no_content_identity_without_weights_or_over_the_hash_budget(tmp_path):
    a = make_model(tmp_path / "a")
    big = ident(a, hash_max_bytes=1 << 20)  # the shards total 6 MiB
    assert big.source is IdentitySource.LOCAL and big.model == model_identity(a) and "model_hash_max_bytes" in big.why
    assert ident(a, hash_max_bytes=0).source is IdentitySource.LOCAL
    # weights kept below the top level are not hashed: no content identity (config alone would collide)
    c = tmp_path / "c"
    os.makedirs(c / "weights")
    shutil.copy(os.path.join(a, "config.json"), c)
    shutil.copy(os.path.join(a, "model-00000.safetensors"), c / "weights")
    assert ident(str(c)).source is IdentitySource.LOCAL


def make_snapshot(root, repo="org--tiny", commit=COMMIT_A, **kw):
    return make_model(root / f"models--{repo}" / "snapshots" / commit, **kw)


def test_hub_snapshots_share_by_commit_across_cache_roots(tmp_path):
    a = make_snapshot(tmp_path / "hostA_cache")
    b = make_snapshot(tmp_path / "hostB_cache")
    os.utime(os.path.join(b, "config.json"), ns=(1, 1))
    ia, ib = ident(a), ident(b)
    assert ia.source is IdentitySource.HF_SNAPSHOT and ia.model == ib.model
    assert ia.model.startswith(f"hf:org--tiny@{COMMIT_A}#")
    assert ident(make_snapshot(tmp_path / "c", commit=COMMIT_B)).model != ia.model  # another commit
    partial = make_snapshot(tmp_path / "d", shards=1)  # a shard missing: not the same files
    assert ident(partial).model != ia.model
    os.symlink(a, tmp_path / "served-model")  # a deployment's name for the snapshot
    assert ident(str(tmp_path / "served-model")).model == ia.model


def test_a_hub_name_resolves_through_the_cache_by_commit_or_ref(tmp_path):
    cache = tmp_path / "hub"
    snap = make_snapshot(cache)
    os.makedirs(cache / "models--org--tiny" / "refs")
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT_A)
    by_ref = cross_machine_identity("org/tiny", None, local="org/tiny", download_dir=str(cache))
    by_commit = cross_machine_identity("org/tiny", COMMIT_A, local="org/tiny", download_dir=str(cache))
    assert by_ref.source is by_commit.source is IdentitySource.HF_SNAPSHOT
    assert by_ref.model == by_commit.model == ident(snap).model
    # a branch the cache has no ref for, or a commit it does not hold: no cross-machine identity
    for rev in ("dev", COMMIT_B):
        got = cross_machine_identity("org/tiny", rev, local="org/tiny@revision=x", download_dir=str(cache))
        assert got.source is IdentitySource.LOCAL and got.model == "org/tiny@revision=x"


def test_server_flags_that_change_the_kv_are_part_of_the_identity(tmp_path):
    a = make_model(tmp_path / "a")
    plain = ident(a, load_fields={"dtype": "auto", "quantization": None})
    fp8 = ident(a, load_fields={"dtype": "auto", "quantization": "fp8"})
    assert plain.model != fp8.model and plain.model.startswith("sha256:")


# --- the server's: SGLang's storage config with --kvdrive-remote ------------------------------------------------------
def storage_config(store_dir, model_name, **remote_config):
    pytest.importorskip("sglang")
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config

    remote = (
        {} if remote_config.pop("off", False) else {"remote": "mooncake://127.0.0.1:1", "remote_config": remote_config}
    )
    extra = json.loads(storage_extra_config(KvdriveOptions(dir=str(store_dir), **remote)))
    return HiCacheStorageConfig(
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=False,
        enable_storage_metrics=False,
        is_page_first_layout=False,
        model_name=model_name,
        extra_config=extra,
    )


def server_args(path, served="same", **kw):
    # the ServerArgs fields server_model_identity reads (a real ServerArgs needs a loadable model to build)
    served = path if served == "same" else served
    return SimpleNamespace(model_path=path, served_model_name=served, revision=None, download_dir=None, **kw)


@pytest.fixture(autouse=True)
def fresh_registry():
    model_ids.forget_models()
    mi._done.clear()
    yield
    model_ids.forget_models()
    mi._done.clear()


def test_server_records_the_cross_machine_identity_and_keeps_its_local_one(tmp_path, caplog):
    a = make_model(tmp_path / "host_a" / "m")
    b = copy_elsewhere(a, tmp_path / "host_b" / "m")
    la = mi.server_model_identity(storage_config(tmp_path / "sa", a), server_args(a))
    lb = mi.server_model_identity(storage_config(tmp_path / "sb", b), server_args(b))
    assert la == model_identity(a) and lb == model_identity(b)  # local stores keep today's namespace
    assert model_ids.shared_model(la) == model_ids.shared_model(lb) == ident(a).model


def test_sglang_0_5_23_args_without_a_served_name_are_this_servers_model(tmp_path):
    # 0.5.23's ServerArgs keeps served_model_name None (SGLang resolves it to the model path later): found by
    # bench/remote_bench.py, whose B served its own copy and got no remote hits ("the server's model path is not known")
    a = make_model(tmp_path / "host_a" / "m")
    b = copy_elsewhere(a, tmp_path / "host_b" / "m")
    la = mi.server_model_identity(storage_config(tmp_path / "sa", a), server_args(a, served=None))
    lb = mi.server_model_identity(storage_config(tmp_path / "sb", b), server_args(b, served=None))
    assert la == model_identity(a) and model_ids.shared_model(la) == model_ids.shared_model(lb) == ident(a).model
    # a served name other than the path: nothing to fingerprint, the local identity stays
    lc = mi.server_model_identity(storage_config(tmp_path / "sc", "my-model"), server_args(b, served=None))
    assert model_ids.shared_model(lc) == lc == "my-model"


def test_without_a_remote_tier_nothing_is_hashed_or_recorded(tmp_path):
    a = make_model(tmp_path / "m")
    local = mi.server_model_identity(storage_config(tmp_path / "s", a, off=True), server_args(a))
    assert local == model_identity(a) and model_ids.shared_model(local) == local and not mi._done


def test_model_id_wins_and_a_fallback_says_once_how_to_set_it(tmp_path, caplog):
    a = make_model(tmp_path / "m")
    local = mi.server_model_identity(storage_config(tmp_path / "s", a, model_id="org/tiny@v1"), server_args(a))
    assert model_ids.shared_model(local) == "model_id:org/tiny@v1"
    model_ids.forget_models()
    mi._done.clear()
    cfg = storage_config(tmp_path / "s", a, model_hash_max_bytes=0)
    with caplog.at_level(logging.INFO, logger="kvdrive.sglang"):
        for _ in range(3):  # the KV pool and component pools each build a namespace: one line for all
            local = mi.server_model_identity(cfg, server_args(a))
    lines = [r.getMessage() for r in caplog.records if "remote tier" in r.getMessage()]
    assert len(lines) == 1 and '"model_id"' in lines[0] and "exact path and file mtimes" in lines[0]
    assert model_ids.shared_model(local) == local


def test_remote_namespace_changes_only_the_model_field(tmp_path):
    from kvdrive_sglang.tier.namespace import Namespace

    ns = Namespace("/host_a/m@123", "bfloat16", "mha", 16, 2, 64, 4, tp_rank=1, tp_size=2, tenant="t", extra={"x": "1"})
    model_ids.share_model(ns.model, "sha256:abc")
    r = model_ids.remote_namespace(ns)
    assert r.model == "sha256:abc" and r.id != ns.id
    assert {k: v for k, v in r.describe().items() if k != "model"} == {
        k: v for k, v in ns.describe().items() if k != "model"
    }
    other = Namespace(
        "/host_b/m@456", "bfloat16", "mha", 16, 2, 64, 4, tp_rank=1, tp_size=2, tenant="t", extra={"x": "1"}
    )
    model_ids.share_model(other.model, "sha256:abc")
    assert model_ids.remote_namespace(other).id == r.id  # two machines, one remote namespace
    from dataclasses import replace

    assert model_ids.remote_namespace(replace(ns, tenant="u")).id != r.id  # the rest of the namespace still counts
