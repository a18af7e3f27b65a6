"""Tenant isolation and secrets, measured: bytes one tenant can obtain of another's pages, plaintext left at rest,
pages readable after crypto-erase or ``kvdrive clear --tenant`` (all should be 0), with controls showing each check
finds what it looks for.

    python bench/trust_tenants.py            # ~15 s on 2 cores; writes bench/results/trust-tenants.{md,json}
    python bench/trust_tenants.py --quick    # seconds; writes files only with --out / --md

Everything is real: SGLang 0.5.17's CPU host pool (MHATokenToKVPoolHost) and kvdrive's KvdriveStorage over the tier
engine (LMDB index, segment files, AES-256-GCM). Page keys are the ones kvdrive's radix cache gives a salted request
(SGLang's get_hash_str chain from the tenant's root prior, tagged with the tenant id; tests/sglang/test_tenant_keys.py
checks the radix cache produces exactly these). Every tenant sends the *same* prompts, each tenant's KV pages hold
different values, and pages are stored with the raw codec so plaintext would be recognisable on disk.

Checks:
  isolation   each tenant reads the prompts back with its own keys: every page must be its own (bytes of another
              tenant's page served = leak); a tenant that never wrote finds nothing (pages found = leak).
  sharing     two salts in one operator share_as group: the second finds the first's pages (control: sharing works).
  at rest     segment files are scanned for a 64-byte run from the start and the middle of every page: found = leak;
              control: the same run without encryption finds them.
  erase       one tenant's key is deleted while the store is open: its pages readable afterwards (0), others (all).
  clear       ``kvdrive clear --tenant`` on an unencrypted store: bytes of that tenant's pages left in segment files
              (0); the other tenants' pages all still read back.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from bench_common import add_allow_dirty, guard_results, machine
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvdrive_sglang import cpu_fallbacks
from kvdrive_sglang.compat.host_pools import make_host_pool
from kvdrive_sglang.flags import KvdriveOptions, storage_extra_config
from kvdrive_sglang.radix_backend import kvdrive_hash
from kvdrive_sglang.tier.cli import main as kvdrive_cli
from kvdrive_sglang.tier.crypto import new_key
from kvdrive_sglang.tier.tenants import Tenants

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 16
WINDOW = 64


def host_pool(pages: int):
    cpu_fallbacks.install()
    kv = MHATokenToKVPool(
        size=pages * PAGE,
        page_size=PAGE,
        dtype=torch.bfloat16,
        head_num=2,
        head_dim=64,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
    )
    return make_host_pool(
        MHATokenToKVPoolHost,
        kv,
        host_to_device_ratio=2.0,
        host_size=0,
        page_size=PAGE,
        layout="layer_first",
        pin_memory=False,
        device="cpu",
    )


class Store:
    """A KvdriveStorage on ``path`` over its own host pool (what one server process holds)."""

    def __init__(self, path, pages, **opts):
        self.host = host_pool(pages)
        extra = json.loads(
            storage_extra_config(KvdriveOptions(dir=str(path), host_gb=0, disk_gb=1, codec="raw", **opts))
        )
        extra["kvdrive"]["write_policy"] = "write_through"
        cfg = HiCacheStorageConfig(
            tp_rank=0,
            tp_size=1,
            pp_rank=0,
            pp_size=1,
            attn_cp_rank=0,
            attn_cp_size=1,
            is_mla_model=False,
            enable_storage_metrics=False,
            is_page_first_layout=False,
            model_name="trust-bench",
            extra_config=extra,
        )
        self.be = StorageBackendFactory.create_backend("dynamic", cfg, self.host)
        self.be.register_mem_pool_host(self.host)
        self.idx = self.host.alloc(pages * PAGE)

    def write(self, keys, pages):
        for i, p in enumerate(pages):
            self.host.set_from_flat_data_page(int(self.idx[i * PAGE]), p)
        ok = self.be.batch_set_v1(keys, self.idx[: len(keys) * PAGE])
        assert all(ok), f"{ok.count(False)} page(s) refused"

    def read(self, keys):
        """Pages the backend serves for ``keys`` (leading hits, as SGLang uses them)."""
        n = self.be.batch_exists(keys)
        if n == 0:
            return []
        got = self.be.batch_get_v1(keys[:n], self.idx[: n * PAGE])
        k = got.index(False) if False in got else n
        return [self.host.get_data_page(int(self.idx[i * PAGE]), flat=True).clone() for i in range(k)]

    def close(self):
        self.be.close()


def segment_bytes(path) -> bytes:
    seg = os.path.join(path, "segments")
    return b"".join(open(os.path.join(seg, f), "rb").read() for f in sorted(os.listdir(seg)) if f.endswith(".kvs"))


def windows(page: torch.Tensor) -> list[bytes]:
    b = page.view(torch.uint8).numpy().tobytes()
    mid = (len(b) // 2) // WINDOW * WINDOW
    return [b[:WINDOW], b[mid : mid + WINDOW]]


def run(a) -> dict:
    rng = np.random.default_rng(a.seed)
    salts = [f"tenant-{i}" for i in range(a.tenants)]
    group = {"grp-a": {"share_as": "grp"}, "grp-b": {"share_as": "grp"}}
    policy = Tenants(group)
    prompts = [rng.integers(0, 32000, a.pages_per_prompt * PAGE).tolist() for _ in range(a.prompts)]
    n_pages = a.prompts * a.pages_per_prompt
    dummy = host_pool(1).get_dummy_flat_data_page()
    contents = {}  # (salt, prompt) -> pages: every tenant's KV differs

    def keys_of(salt, p):
        return kvdrive_hash(prompts[p], policy.root_prior(salt), PAGE)

    def pages_of(salt, p):
        if (salt, p) not in contents:
            g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
            contents[salt, p] = [
                torch.randn(dummy.shape, generator=g).to(dummy.dtype) for _ in range(a.pages_per_prompt)
            ]
        return contents[salt, p]

    def sampled_bytes(disk: bytes, salt) -> int:
        """Bytes of the sampled 64-byte runs of ``salt``'s pages found in ``disk``."""
        return sum(WINDOW * sum(w in disk for w in windows(pg)) for p in range(a.prompts) for pg in pages_of(salt, p))

    root = tempfile.mkdtemp(prefix="kvdrive-trust-")
    out = {
        "tenants": len(salts) + 2,
        "prompts": a.prompts,
        "pages_per_tenant": n_pages,
        "page_bytes": dummy.numel() * dummy.element_size(),
    }
    try:
        keyfile = os.path.join(root, "keys.json")
        keys = {s: new_key() for s in salts + ["@grp"]}
        with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(keys, f)
        for encrypted in (True, False):
            path = os.path.join(root, "enc" if encrypted else "plain")
            opts = {"tenants": group, **({"encrypt": keyfile} if encrypted else {})}
            st = Store(path, a.pages_per_prompt, **opts)
            t0 = time.perf_counter()
            for s in salts + ["grp-a"]:
                for p in range(a.prompts):
                    st.write(keys_of(s, p), pages_of(s, p))
            assert st.be.engine.flush(timeout=120)
            write_s = time.perf_counter() - t0
            leak_bytes = own_pages = 0
            for s in salts:  # isolation: only ever one's own pages
                for p in range(a.prompts):
                    got = st.read(keys_of(s, p))
                    own_pages += sum(torch.equal(g, w) for g, w in zip(got, pages_of(s, p)))
                    leak_bytes += sum(
                        g.numel() * g.element_size() for g, w in zip(got, pages_of(s, p)) if not torch.equal(g, w)
                    )
            stranger = sum(len(st.read(keys_of("never-wrote", p))) for p in range(a.prompts))
            shared = sum(
                sum(torch.equal(g, w) for g, w in zip(st.read(keys_of("grp-b", p)), pages_of("grp-a", p)))
                for p in range(a.prompts)
            )
            disk = segment_bytes(path)
            plain_found = sum(any(w in disk for w in windows(pg)) for pages in contents.values() for pg in pages)
            side = {
                "write_s": write_s,
                "own_pages_read": own_pages,
                "cross_tenant_bytes_served": leak_bytes,
                "pages_found_by_a_tenant_that_never_wrote": stranger,
                "share_as_pages_served": shared,
                "pages_with_plaintext_on_disk": plain_found,
                "pages_stored": len(contents) * a.pages_per_prompt,
            }
            if encrypted:  # crypto-erase tenant-0 while the store is open
                with open(keyfile, "w") as f:
                    json.dump({k: v for k, v in keys.items() if k != salts[0]}, f)
                side["erased_tenant_pages_readable"] = sum(len(st.read(keys_of(salts[0], p))) for p in range(a.prompts))
                side["other_tenants_pages_readable"] = sum(
                    len(st.read(keys_of(s, p))) for s in salts[1:] for p in range(a.prompts)
                )
                side["erased_in_memory"] = st.be.engine.stats().erased
            st.close()
            if not encrypted:  # kvdrive clear --tenant, then scan and read back
                side["cleared_tenant_bytes_on_disk_before"] = sampled_bytes(disk, salts[0])
                rc = kvdrive_cli(["clear", path, "--tenant", salts[0]])
                disk = segment_bytes(path)
                side["clear_rc"] = rc
                side["cleared_tenant_bytes_left_on_disk"] = sampled_bytes(disk, salts[0])
                st = Store(path, a.pages_per_prompt, **opts)
                side["cleared_tenant_pages_readable"] = sum(
                    len(st.read(keys_of(salts[0], p))) for p in range(a.prompts)
                )
                side["other_tenants_pages_readable_after_clear"] = sum(
                    sum(torch.equal(g, w) for g, w in zip(st.read(keys_of(s, p)), pages_of(s, p)))
                    for s in salts[1:]
                    for p in range(a.prompts)
                )
                st.close()
            out["encrypted" if encrypted else "plaintext_control"] = side
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def markdown(res: dict, cmd: str) -> str:
    e, c = res["encrypted"], res["plaintext_control"]
    n_t, per = res["tenants"], res["pages_per_tenant"]
    salted = n_t - 2
    rows = [
        ("tenants (same prompts, different KV)", f"{salted} + 2 in one share_as group", "", ""),
        ("pages per tenant", per, "", ""),
        ("bytes of another tenant's pages served", e["cross_tenant_bytes_served"], c["cross_tenant_bytes_served"], "0"),
        (
            "own pages read back exact",
            f"{e['own_pages_read']} / {salted * per}",
            f"{c['own_pages_read']} / {salted * per}",
            "all",
        ),
        (
            "pages found by a tenant that never wrote",
            e["pages_found_by_a_tenant_that_never_wrote"],
            c["pages_found_by_a_tenant_that_never_wrote"],
            "0",
        ),
        (
            "share_as group: pages of member A served to member B",
            f"{e['share_as_pages_served']} / {per}",
            f"{c['share_as_pages_served']} / {per}",
            "all (allowed)",
        ),
        (
            "pages with plaintext found in segment files",
            f"{e['pages_with_plaintext_on_disk']} / {e['pages_stored']}",
            f"{c['pages_with_plaintext_on_disk']} / {c['pages_stored']}",
            "0 encrypted (control: all)",
        ),
        ("key deleted: that tenant's pages readable", e["erased_tenant_pages_readable"], "-", "0"),
        (
            "key deleted: other tenants' pages readable",
            f"{e['other_tenants_pages_readable']} / {(salted - 1) * per}",
            "-",
            "all",
        ),
        (
            "`kvdrive clear --tenant`: that tenant's sampled bytes in segment files before / after",
            "-",
            f"{c['cleared_tenant_bytes_on_disk_before']} / {c['cleared_tenant_bytes_left_on_disk']}",
            "before > 0, after 0",
        ),
        ("`kvdrive clear --tenant`: that tenant's pages readable", "-", c["cleared_tenant_pages_readable"], "0"),
        (
            "`kvdrive clear --tenant`: other tenants' pages read back exact",
            "-",
            f"{c['other_tenants_pages_readable_after_clear']} / {(salted - 1) * per}",
            "all",
        ),
    ]
    lines = [
        "# Tenants and secrets: measured",
        "",
        f"Produced by `{cmd}` on {res['date']} ({res['elapsed_s']:.0f} s). Machine: {res['machine']}.",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "| figure | encrypted store | unencrypted (control) | expected |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    lines += [
        "",
        f"Page size: {res['page_bytes']} bytes (bf16, raw codec). Encryption cost in throughput: "
        "`bench/results/tier_bench-encrypt.md` (bench/tier_bench.py section 6). Exit status 1 if any figure "
        "is off.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tenants", type=int, default=None, help="salted tenants (default 8, quick 3)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per tenant (default 4, quick 2)")
    ap.add_argument("--pages-per-prompt", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    add_allow_dirty(ap)
    a = ap.parse_args(argv)
    a.tenants = a.tenants or (3 if a.quick else 8)
    a.prompts = a.prompts or (2 if a.quick else 4)
    if not a.quick:
        a.out = a.out or os.path.join(REPO, "bench", "results", "trust-tenants.json")
        a.md = a.md or os.path.join(REPO, "bench", "results", "trust-tenants.md")
    guard_results(a.out, REPO, a.allow_dirty)
    cmd = " ".join(
        shlex.quote(x) for x in ["python", "bench/trust_tenants.py", *(sys.argv[1:] if argv is None else argv)]
    )
    t0 = time.perf_counter()
    res = run(a)
    res["elapsed_s"] = time.perf_counter() - t0
    res["date"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    m = machine(REPO)
    res["machine"] = (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, commit {m.get('git', '?')}"
        if isinstance(m, dict)
        else str(m)
    )
    md = markdown(res, cmd)
    print(md)
    e, c = res["encrypted"], res["plaintext_control"]
    bad = (
        e["cross_tenant_bytes_served"]
        or c["cross_tenant_bytes_served"]
        or e["pages_with_plaintext_on_disk"]
        or e["erased_tenant_pages_readable"]
        or c["cleared_tenant_bytes_left_on_disk"]
        or c["cleared_tenant_pages_readable"]
        or not c["pages_with_plaintext_on_disk"]
        or not c["cleared_tenant_bytes_on_disk_before"]
    )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
