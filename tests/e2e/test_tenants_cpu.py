"""End to end, tenants and encryption: a real CPU ``sglang.launch_server`` with ``--kv-tier kvdrive
--kvdrive-encrypt KEYFILE`` (its expansion, with write-through write-down); two tenants (``extra_key`` in /generate)
send the same prompt; restart; tenant A is served from the encrypted disk store, tenant B, whose key was deleted in
between, is recomputed; every greedy output equals the radix-only reference. Two server starts (≈20 s each on the
2-core CPU machine when it is otherwise idle)."""

from __future__ import annotations

import json
import os

import pytest

from .test_server_cpu import _sglang_installed

if not _sglang_installed():
    pytest.skip("sglang is not installed", allow_module_level=True)

from .common import MAX_NEW, PAGE, PROMPT_TOKENS, full_hit, kvdrive_cli, kvdrive_entries, server, stop  # noqa: E402

pytestmark = pytest.mark.e2e


def kvdrive_flags(store, keys) -> list[str]:
    """SGLang's flags for ``--kv-tier kvdrive --kvdrive-dir STORE --kvdrive-encrypt KEYS`` (flags.canonical), with
    write-through write-down in the storage config (no --kvdrive-* flag reaches it): the server's default,
    selective write-down, keeps a one-off request's pages in DRAM, which a restart does not keep."""
    from kvdrive_sglang.flags import KvdriveOptions, canonical, flag_of

    from .server import gpu_present

    fields = canonical(KvdriveOptions(dir=str(store), encrypt=str(keys)), gpu=gpu_present())
    extra = json.loads(fields["hicache_storage_backend_extra_config"])
    assert extra["kvdrive"]["encrypt"] == str(keys)
    extra["kvdrive"]["write_policy"] = "write_through"
    extra["kvdrive"]["reload"] = "always"  # these checks are about the tiers serving: not the promoter's choice
    fields["hicache_storage_backend_extra_config"] = json.dumps(extra)
    out = []
    for field, value in fields.items():
        out += [flag_of(field)] if value is True else [flag_of(field), str(value)]
    return out


def generate(srv, text, salt):
    r = srv.post(
        "/generate",
        {"text": text, "extra_key": salt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0.0}},
    )
    m = r["meta_info"]
    return {
        "ids": r["output_ids"],
        "cached": m["cached_tokens"],
        "prompt_tokens": m.get("prompt_tokens"),
        "details": {"device": 0, "host": 0, "storage": 0, **(m.get("cached_tokens_details") or {})},
    }


def test_encrypted_tenants_across_restart(tiny_model, prompts, reference, e2e_dir, ext_dir):
    from kvdrive_sglang.tier.crypto import new_key
    from kvdrive_sglang.tier.tenants import tenant_id

    store, keys = e2e_dir / "kvdrive_tenants", e2e_dir / "tenant_keys.json"
    key_a = new_key()
    keys.write_text(json.dumps({"tenant-a": key_a, "tenant-b": new_key()}))
    os.chmod(keys, 0o600)
    args = kvdrive_flags(store, keys)
    pages = PROMPT_TOKENS // PAGE
    srv = server("tenants_1", tiny_model, e2e_dir, ext_dir, args).start()
    try:
        first = {t: generate(srv, prompts[0], t) for t in ("tenant-a", "tenant-b")}
    finally:
        stop(srv, "tenants_1")  # a graceful stop writes down what is not on disk yet
    entries = kvdrive_entries(store)
    assert all(r["ids"] == reference["ids"][0] and r["cached"] < PAGE for r in first.values()), first
    assert entries >= 2 * pages, f"{entries} pages on disk"
    ns = json.loads(kvdrive_cli("stats", str(store), "--json").stdout)["namespaces"]
    assert sorted(n["tenant"] for n in ns) == sorted([tenant_id("tenant-a"), tenant_id("tenant-b")]), ns

    keys.write_text(json.dumps({"tenant-a": key_a}))  # tenant B's key deleted: B's pages are crypto-erased
    srv = server("tenants_2", tiny_model, e2e_dir, ext_dir, args).start()
    try:
        a = generate(srv, prompts[0], "tenant-a")
        b = generate(srv, prompts[0], "tenant-b")
        plain = generate(srv, prompts[0], None)  # no "" key: unsalted traffic is not cached by kvdrive
    finally:
        stop(srv, "tenants_2")
    assert full_hit(a) and a["details"]["storage"] >= PROMPT_TOKENS - PAGE, a  # decrypted from disk
    assert b["details"]["storage"] == 0 and b["cached"] < PAGE, b  # recomputed
    assert plain["details"]["storage"] == 0, plain
    assert a["ids"] == b["ids"] == plain["ids"] == reference["ids"][0]
    kvdrive_cli("verify", str(store))  # envelopes and checksums intact, without keys
