"""Storage-tier benchmark: raw disk baseline vs the disk tier, codecs, index lookups and the engine, in one run.

    python bench/tier_bench.py                 # default sizes (< 3 minutes on 2 cores); writes bench/results/
    python bench/tier_bench.py --quick         # CI-sized, a few seconds; writes files only if --out / --md given
    python bench/tier_bench.py --dir /mnt/nvme/tmp --mib 1024 --reps 5

What is measured (every figure is the median of --reps repetitions; ratios are ratios of medians, the per-rep
paired ratios are in the JSON too):

1. raw baseline: sequential write of --mib MiB in 4 MiB chunks from a preallocated, touched buffer to a new file,
   one fsync; then a sequential read of it back (4 MiB preadv calls) into a preallocated, touched buffer.
2. disk tier: the same bytes as 256 KiB raw-codec page blobs (encoded before timing) through DiskStore.put_many
   (--batch pages per call: one pwritev + fdatasync + one LMDB commit) into a fresh store, then get_many (same
   batch) into preallocated page buffers; all pages are checked bit-exact. The same again with zstd blobs
   (GB/s of decoded bytes: the read side includes decoding).
3. codecs: ratio, single-thread encode / decode GB/s (of raw bytes) of raw, zstd, int8, fp8 on synthetic bf16 and
   fp16 pages; for the lossy ones max |error| relative to the row's absmax, and per-page cosine similarity.
4. index: DiskStore.exists_many over --lookup-keys 64-hex-char keys in one call (random order, all present),
   and DiskStore.contains over the same keys.
5. engine: TierEngine (zstd, write_through) with a DRAM budget smaller than the working set: put_many, flush,
   get_many of pages still in DRAM (hot) and of pages only on disk (cold).
6. encryption at rest: section 2's round trip (raw and zstd blobs, --encrypt-mib MiB) through a DiskStore without
   and with a key ring (AES-256-GCM per page, tier/crypto.py), interleaved per repetition; the cost is the ratio of
   the encrypted to the plain GB/s of the same run.

Reads are buffered (no O_DIRECT), "cold-ish": before every read phase the file(s) read are fsync'd and dropped from
the page cache with posix_fadvise(POSIX_FADV_DONTNEED) - the baseline file and the store's segment files alike.
The residency left after the drop is measured with mincore and reported. On a VM the host may still cache the disk,
so "cold" means "not in this guest's page cache", which is the same for both sides of every ratio.

Guest memory warm-up (--prefault, on by default): on some VMs (firecracker with free-page reporting / DAMON) guest
pages that were free for a moment are handed back to the host, and touching them again costs host page faults
(~0.4 GB/s here). A buffered write or read has to allocate page-cache pages, so without a warm-up a phase's speed
depends on whether the kernel hands it recycled or returned pages - a 5x swing unrelated to the code under test.
Before every timed disk / engine phase (both sides alike, untimed) the bench touches and frees phase-size + 128 MiB
of anonymous memory, so the page cache gets host-backed pages, as on a long-running server. --no-prefault turns
this off; the measured first-touch rate is in the output either way.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_common import add_allow_dirty, cpu_model, guard_results

from kvdrive_sglang.tier.codecs import CODEC_NAMES, decode_page, encode_page, get_codec
from kvdrive_sglang.tier.crypto import KeyRing, new_key
from kvdrive_sglang.tier.disk_store import DiskStore, DiskStoreConfig
from kvdrive_sglang.tier.dtypes import to_float32
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.namespace import Namespace, key_bytes
from kvdrive_sglang.tier.synthetic import kv_page

MiB = 1 << 20
CHUNK = 4 * MiB
PAGE_SHAPE = (2, 64, 8, 128)  # K/V x tokens x heads x head_dim: 256 KiB of bf16
ROW_LEN = PAGE_SHAPE[-1]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGETS = {  # figure -> (comparison, threshold, text)
    # the headline (issue 17): the tier's disk writes against raw O_DIRECT writes of the same bytes, like for like
    # (the tier appends with O_DIRECT too)
    "tier_raw_write_vs_direct": (">=", 0.8, ">= 0.8x raw O_DIRECT"),
    "tier_raw_write_vs_raw": (">=", 0.8, ">= 0.8x raw"),
    "tier_raw_read_vs_raw": (">=", 0.8, ">= 0.8x raw"),
    "zstd_ratio_bf16": (">=", 1.45, ">= 1.45x"),
    "zstd_decode_gbps_bf16": (">=", 2.0, ">= 2 GB/s/core"),
    "exists_many_keys_per_s": (">=", 500e3, ">= 500k/s"),
}


class BenchError(RuntimeError):
    """The benchmark measured something wrong (data mismatch, missing pages): never report such numbers."""


# ------------------------------------------------------------------------------------------------ helpers


def med(xs):
    return statistics.median(xs)


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


def hex_key(i: int, salt: str = "") -> str:
    """SGLang-style page key: 64 hex chars (SGLang uses a sha256 of the token prefix; here of a counter)."""
    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def make_ns(**kw) -> Namespace:
    d = dict(
        model="bench/synthetic-8x128",
        kv_dtype="bfloat16",
        layout="mha",
        page_size=PAGE_SHAPE[1],
        num_heads=PAGE_SHAPE[2],
        head_dim=PAGE_SHAPE[3],
        num_layers=1,
    )
    d.update(kw)
    return Namespace(**d)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PAGESZ = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (mincore), or None if it cannot be told."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n = (size + _PAGESZ - 1) // _PAGESZ
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return min(size, int((np.frombuffer(vec, np.uint8) & 1).sum()) * _PAGESZ)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_cache(paths) -> float | None:
    """fsync + POSIX_FADV_DONTNEED each file; returns the share of their bytes still resident afterwards."""
    total = resident = 0
    known = True
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        total += os.path.getsize(p)
        r = resident_bytes(p)
        if r is None:
            known = False
        else:
            resident += r
    return resident / total if (known and total) else None


def segment_files(store_dir: str) -> list[str]:
    seg = os.path.join(store_dir, "segments")
    return sorted(os.path.join(seg, f) for f in os.listdir(seg) if f.endswith(".kvs"))


def status(name: str, value: float) -> tuple[str, str]:
    op, thr, text = TARGETS[name]
    ok = value >= thr if op == ">=" else value <= thr
    return text, ("PASS" if ok else "MISS")


def log(msg: str) -> None:
    print(msg, flush=True)


class Prefault:
    """Touch and free anonymous memory before a timed phase (see the module doc); records the first-touch rate."""

    def __init__(self, on: bool):
        self.on = on
        self.rates = []

    def __call__(self, nbytes: int) -> None:
        if not self.on:
            return
        t0 = time.perf_counter()
        x = np.ones(nbytes + 128 * MiB, np.uint8)  # calloc'd fresh pages, every one written
        t = time.perf_counter() - t0
        del x
        self.rates.append(gbps(nbytes + 128 * MiB, t))


def cpu_sample():
    """(busy ticks of the whole machine, this process's CPU seconds) for telling how busy the rest of the box was."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # minus idle and iowait
    except (OSError, ValueError):
        busy = None
    r = os.times()
    return busy, r.user + r.system + r.children_user + r.children_system, time.monotonic()


def other_cpu(s0, s1) -> float | None:
    """Cores' worth of CPU used by everything except this process between two samples."""
    if s0[0] is None or s1[0] is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((s1[0] - s0[0]) / hz - (s1[1] - s0[1])) / max(1e-9, s1[2] - s0[2]))


class TimedIO:
    """Wraps a DiskStore's I/O backend to add up the time spent in pwritev, sync and preadv (everything else in
    put_many / get_many is index work, checksums, headers, decoding and Python)."""

    def __init__(self, inner):
        self._inner = inner
        self.t = {"pwritev": 0.0, "sync": 0.0, "preadv": 0.0}

    def __getattr__(self, name):
        f = getattr(self._inner, name)
        if name not in self.t:
            return f

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                self.t[name] += time.perf_counter() - t0

        return timed

    def reset(self):
        for k in self.t:
            self.t[k] = 0.0


# ------------------------------------------------------------------------------------------------ 1 + 2: disk


def raw_baseline(root: str, src: np.ndarray, dst: np.ndarray, rep: int, prefault: Prefault) -> dict:
    """Sequential write (4 MiB chunks, one fsync at the end) of src to a new file, then read it into dst."""
    path = os.path.join(root, f"baseline-{rep}.bin")
    s = memoryview(src.reshape(-1).view(np.uint8))
    d = memoryview(dst.reshape(-1).view(np.uint8))
    n = len(s)
    prefault(n)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        t0 = time.perf_counter()
        off = 0
        while off < n:
            off += os.write(fd, s[off : off + CHUNK])
        t_copy = time.perf_counter() - t0
        os.fsync(fd)
        t_write = time.perf_counter() - t0
    finally:
        os.close(fd)
    resident = drop_cache([path])
    dst.reshape(-1).view(np.uint8).fill(0xA5)  # touched, and stale data cannot pass the check
    prefault(n)
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        off = 0
        while off < n:
            got = os.preadv(fd, [d[off : off + CHUNK]], off)
            if got <= 0:
                raise BenchError(f"baseline read stopped at {off} of {n} bytes")
            off += got
        t_read = time.perf_counter() - t0
    finally:
        os.close(fd)
    if not np.array_equal(src, dst):
        raise BenchError("baseline read-back differs from what was written")
    os.unlink(path)
    return {
        "write_s": t_write,
        "write_copy_s": t_copy,
        "write_fsync_s": t_write - t_copy,
        "read_s": t_read,
        "bytes": n,
        "resident_after_drop": resident,
    }


def raw_direct_write(root: str, src: np.ndarray, rep: int, prefault: Prefault) -> dict:
    """The same bytes written with O_DIRECT in 4 MiB chunks from an aligned buffer (copied in, as the tier does)
    plus one fsync: the fastest plain way to write this disk, shown beside the tier's O_DIRECT appends."""
    import mmap

    path = os.path.join(root, f"baseline-direct-{rep}.bin")
    s_ = memoryview(src.reshape(-1).view(np.uint8))
    n = len(s_)
    stage = mmap.mmap(-1, CHUNK)
    view = memoryview(stage)
    prefault(n)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        t0 = time.perf_counter()
        off = 0
        while off < n:
            k = min(CHUNK, n - off)
            view[:k] = s_[off : off + k]
            os.pwrite(fd, view[:k], off)
            off += k
        os.fsync(fd)
        t_write = time.perf_counter() - t0
    finally:
        os.close(fd)
        view.release()
        stage.close()
    os.unlink(path)
    return {"write_s": t_write, "read_s": float("nan"), "bytes": n}


def tier_roundtrip(
    root: str,
    name: str,
    ns: Namespace,
    keys: list[str],
    blobs: list[bytes],
    src: np.ndarray,
    dst: np.ndarray,
    batch: int,
    io: str,
    prefault: Prefault,
    keyring: KeyRing | None = None,
) -> dict:
    """put_many the blobs into a fresh store, drop its segments from the page cache, get_many into dst."""
    path = os.path.join(root, name)
    store = DiskStore(DiskStoreConfig(path=path, io=io), keyring=keyring)
    tio = None
    if hasattr(store, "_io"):  # private, but the breakdown is worth it; skipped if the store changes shape
        tio = store._io = TimedIO(store._io)
    n = len(keys)
    try:
        prefault(src.nbytes)
        t0 = time.perf_counter()
        for b in range(0, n, batch):
            ok = store.put_many(ns, keys[b : b + batch], blobs[b : b + batch])
            if not all(ok):
                raise BenchError(f"{name}: put_many refused {ok.count(False)} page(s) of batch {b // batch}")
        t_write = time.perf_counter() - t0
        wio = dict(tio.t) if tio else {}
        segs = segment_files(path)
        resident = drop_cache(segs)
        dst.reshape(-1).view(np.uint8).fill(0xA5)
        outs = list(dst)  # one [2, 64, 8, 128] view per page, preallocated and touched
        prefault(src.nbytes)
        if tio:
            tio.reset()
        t0 = time.perf_counter()
        for b in range(0, n, batch):
            got = store.get_many(ns, keys[b : b + batch], outs[b : b + batch])
            if not all(got):
                raise BenchError(f"{name}: get_many missed {got.count(False)} page(s) of batch {b // batch}")
        t_read = time.perf_counter() - t0
        rio = dict(tio.t) if tio else {}
        if not np.array_equal(src, dst):
            bad = int(np.count_nonzero((src != dst).reshape(len(src), -1).any(axis=1)))
            raise BenchError(f"{name}: {bad} page(s) read back differ from what was written")
        st = store.stats()
        io_name = store._io.name
    finally:
        store.close()
    file_bytes = sum(os.path.getsize(p) for p in segs)
    shutil.rmtree(path)
    return {
        "write_s": t_write,
        "read_s": t_read,
        "raw_bytes": src.nbytes,
        "stored_bytes": st.live_bytes,
        "file_bytes": file_bytes,
        "segments": len(segs),
        "entries": st.entries,
        "io": io_name,
        "resident_after_drop": resident,
        "write_breakdown_s": {
            "pwritev": wio.get("pwritev"),
            "fdatasync": wio.get("sync"),
            "other": t_write - wio["pwritev"] - wio["sync"] if wio else None,
        },
        "read_breakdown_s": {"preadv": rio.get("preadv"), "other": t_read - rio["preadv"] if rio else None},
    }


def bench_disk(a, root: str, pages: np.ndarray, keys: list[str], prefault: Prefault) -> dict:
    ns = make_ns()
    dst = np.empty_like(pages)
    dst.reshape(-1).view(np.uint8).fill(0)  # touch
    t0 = time.perf_counter()
    raw_blobs = [encode_page(p, "bfloat16", "raw", ROW_LEN) for p in pages]
    t_raw_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    z_blobs = [encode_page(p, "bfloat16", "zstd", ROW_LEN) for p in pages]
    t_z_enc = time.perf_counter() - t0
    log(
        f"  blobs encoded before timing: raw {t_raw_enc:.2f}s, zstd {t_z_enc:.2f}s "
        f"(zstd ratio {pages.nbytes / sum(map(len, z_blobs)):.3f})"
    )
    runs = {"raw_baseline": [], "raw_direct": [], "tier_raw": [], "tier_zstd": []}
    for rep in range(a.disk_reps):  # interleaved, so drift in the (virtual) disk hits every side alike
        r = raw_baseline(root, pages, dst, rep, prefault)
        runs["raw_baseline"].append(r)
        runs["raw_direct"].append(raw_direct_write(root, pages, rep, prefault))
        t = tier_roundtrip(root, f"store-raw-{rep}", ns, keys, raw_blobs, pages, dst, a.batch, a.io, prefault)
        runs["tier_raw"].append(t)
        z = tier_roundtrip(root, f"store-zstd-{rep}", ns, keys, z_blobs, pages, dst, a.batch, a.io, prefault)
        runs["tier_zstd"].append(z)
        log(
            f"  rep {rep}: raw w {gbps(r['bytes'], r['write_s']):.2f} r {gbps(r['bytes'], r['read_s']):.2f} | "
            f"tier raw w {gbps(t['raw_bytes'], t['write_s']):.2f} r {gbps(t['raw_bytes'], t['read_s']):.2f} | "
            f"tier zstd w {gbps(z['raw_bytes'], z['write_s']):.2f} r {gbps(z['raw_bytes'], z['read_s']):.2f} GB/s"
        )
    n = pages.nbytes
    out = {
        "bytes": n,
        "pages": len(pages),
        "batch_pages": a.batch,
        "io": runs["tier_raw"][0]["io"],
        "blob_encode_s": {"raw": t_raw_enc, "zstd": t_z_enc},
        "runs": runs,
    }
    for side in runs:
        out[side] = {
            "write_gbps": gbps(n, med([r["write_s"] for r in runs[side]])),
            "read_gbps": gbps(n, med([r["read_s"] for r in runs[side]])),
            "write_gbps_all": [gbps(n, r["write_s"]) for r in runs[side]],
            "read_gbps_all": [gbps(n, r["read_s"]) for r in runs[side]],
        }
    for side in ("tier_raw", "tier_zstd"):
        for d in ("write", "read"):
            out[side][f"{d}_vs_raw"] = out[side][f"{d}_gbps"] / out["raw_baseline"][f"{d}_gbps"]
            out[side][f"{d}_vs_raw_paired"] = [
                b[f"{d}_s"] / t[f"{d}_s"] for b, t in zip(runs["raw_baseline"], runs[side])
            ]
        out[side]["stored_ratio"] = n / runs[side][0]["stored_bytes"]
        for d, parts in (("write", ("pwritev", "fdatasync", "other")), ("read", ("preadv", "other"))):
            vals = [r[f"{d}_breakdown_s"] for r in runs[side]]
            if all(v.get(parts[0]) is not None for v in vals):
                out[side][f"{d}_breakdown_s_median"] = {p: med([v[p] for v in vals]) for p in parts}
    b = runs["raw_baseline"]
    out["raw_baseline"]["write_breakdown_s_median"] = {
        "write": med([r["write_copy_s"] for r in b]),
        "fsync": med([r["write_fsync_s"] for r in b]),
    }
    return out


def bench_encrypt(a, root: str, pages: np.ndarray, keys: list[str], prefault: Prefault) -> dict:
    """Section 6: the disk tier's round trip without and with AES-GCM sealing, interleaved per repetition."""
    ns = make_ns()
    key_file = os.path.join(root, "keys.json")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"": new_key()}, f)  # unsalted traffic's key: the bench namespace has no tenant
    ring = KeyRing(key_file)
    dst = np.empty_like(pages)
    dst.reshape(-1).view(np.uint8).fill(0)
    blobs = {
        "raw": [encode_page(p, "bfloat16", "raw", ROW_LEN) for p in pages],
        "zstd": [encode_page(p, "bfloat16", "zstd", ROW_LEN) for p in pages],
    }
    runs = {f"{codec}_{mode}": [] for codec in blobs for mode in ("plain", "aesgcm")}
    for rep in range(a.disk_reps):
        for codec, bl in blobs.items():
            for mode, kr in (("plain", None), ("aesgcm", ring)):
                r = tier_roundtrip(
                    root, f"enc-{codec}-{mode}-{rep}", ns, keys, bl, pages, dst, a.batch, a.io, prefault, keyring=kr
                )
                runs[f"{codec}_{mode}"].append(r)
        log(
            f"  rep {rep}: "
            + " | ".join(
                f"{side} w {gbps(r[-1]['raw_bytes'], r[-1]['write_s']):.2f} "
                f"r {gbps(r[-1]['raw_bytes'], r[-1]['read_s']):.2f}"
                for side, r in runs.items()
            )
            + " GB/s"
        )
    n = pages.nbytes
    out = {"bytes": n, "pages": len(pages), "batch_pages": a.batch, "runs": runs}
    for side, rs in runs.items():
        out[side] = {
            "write_gbps": gbps(n, med([r["write_s"] for r in rs])),
            "read_gbps": gbps(n, med([r["read_s"] for r in rs])),
            "stored_bytes": rs[0]["stored_bytes"],
        }
    for codec in blobs:
        plain, sealed = runs[f"{codec}_plain"], runs[f"{codec}_aesgcm"]
        for d in ("write", "read"):
            out[f"{codec}_aesgcm"][f"{d}_vs_plain"] = (
                out[f"{codec}_aesgcm"][f"{d}_gbps"] / out[f"{codec}_plain"][f"{d}_gbps"]
            )
            out[f"{codec}_aesgcm"][f"{d}_vs_plain_paired"] = [p[f"{d}_s"] / e[f"{d}_s"] for p, e in zip(plain, sealed)]
    return out


# ------------------------------------------------------------------------------------------------ 3: codecs


def quality(orig: list[np.ndarray], dec: np.ndarray, dtype: str) -> dict:
    """Max |error| / row absmax over all rows; per-page cosine similarity (min, mean) of decoded vs original."""
    worst_rel = 0.0
    cos = []
    for o, d in zip(orig, dec):
        x = to_float32(o.reshape(-1).view(np.uint8), dtype).reshape(-1, ROW_LEN).astype(np.float64)
        y = to_float32(d.reshape(-1).view(np.uint8), dtype).reshape(-1, ROW_LEN).astype(np.float64)
        amax = np.abs(x).max(axis=1)
        err = np.abs(x - y).max(axis=1)
        nz = amax > 0
        if nz.any():
            worst_rel = max(worst_rel, float((err[nz] / amax[nz]).max()))
        xf, yf = x.ravel(), y.ravel()
        cos.append(float(xf @ yf / (np.linalg.norm(xf) * np.linalg.norm(yf))))
    return {"max_abs_err_rel_row_absmax": worst_rel, "cos_min": min(cos), "cos_mean": float(np.mean(cos))}


def bench_codecs(a) -> dict:
    res = {}
    for dtype in ("bfloat16", "float16"):
        rng = np.random.default_rng(a.seed + 1)
        pages = [kv_page(rng, dtype=dtype) for _ in range(a.codec_pages)]
        nbytes = sum(p.nbytes for p in pages)
        outs = np.empty((len(pages),) + pages[0].shape, pages[0].dtype)
        outs.reshape(-1).view(np.uint8).fill(0)
        res[dtype] = {}
        for codec in CODEC_NAMES:
            blobs = [encode_page(p, dtype, codec, ROW_LEN) for p in pages]  # warm-up: thread-local contexts
            for b, o in zip(blobs, outs):
                decode_page(b, o, dtype)
            enc, dec = [], []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                for p in pages:
                    encode_page(p, dtype, codec, ROW_LEN)
                enc.append(time.perf_counter() - t0)
                outs.reshape(-1).view(np.uint8).fill(0)
                t0 = time.perf_counter()
                for b, o in zip(blobs, outs):
                    decode_page(b, o, dtype)
                dec.append(time.perf_counter() - t0)
            r = {
                "ratio": nbytes / sum(len(b) for b in blobs),
                "encode_gbps": gbps(nbytes, med(enc)),
                "decode_gbps": gbps(nbytes, med(dec)),
                "encode_gbps_all": [gbps(nbytes, t) for t in enc],
                "decode_gbps_all": [gbps(nbytes, t) for t in dec],
            }
            exact = all(np.array_equal(p, o) for p, o in zip(pages, outs))
            if get_codec(codec).lossless:
                if not exact:
                    raise BenchError(f"lossless codec {codec} did not round-trip {dtype} pages bit-exact")
                r["bit_exact"] = True
            else:
                r.update(quality(pages, outs, dtype))
            res[dtype][codec] = r
            log(
                f"  {dtype:8} {codec:5} ratio {r['ratio']:.3f}  enc {r['encode_gbps']:.2f}  "
                f"dec {r['decode_gbps']:.2f} GB/s"
                + (
                    ""
                    if codec in ("raw", "zstd")
                    else f"  max err/absmax {r['max_abs_err_rel_row_absmax']:.4f}  cos min {r['cos_min']:.6f} "
                    f"mean {r['cos_mean']:.6f}"
                )
            )
        res[dtype]["pages"] = len(pages)
        res[dtype]["page_bytes"] = pages[0].nbytes
    return res


# ------------------------------------------------------------------------------------------------ 4: index


def bench_lookups(a, root: str) -> dict:
    ns = make_ns()
    path = os.path.join(root, "store-index")
    keys = [hex_key(i, "idx-") for i in range(a.lookup_keys)]
    tiny = encode_page(np.zeros(8, np.uint16), "bfloat16", "raw", 8)  # 40-byte blob: the index is what's measured
    store = DiskStore(DiskStoreConfig(path=path, io=a.io))
    try:
        fill_batch = 8192
        t0 = time.perf_counter()
        for b in range(0, len(keys), fill_batch):
            chunk = keys[b : b + fill_batch]
            if not all(store.put_many(ns, chunk, [tiny] * len(chunk))):
                raise BenchError("index fill: put_many refused pages")
        t_fill = time.perf_counter() - t0
        shuffled = keys[:]
        random.Random(a.seed).shuffle(shuffled)
        ex, co = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            n = store.exists_many(ns, shuffled)
            ex.append(time.perf_counter() - t0)
            if n != len(keys):
                raise BenchError(f"exists_many found {n} leading keys of {len(keys)}, all were stored")
            t0 = time.perf_counter()
            hits = store.contains(ns, shuffled)
            co.append(time.perf_counter() - t0)
            if not all(hits):
                raise BenchError(f"contains missed {hits.count(False)} stored keys")
        missing = [hex_key(i, "absent-") for i in range(1000)]
        if store.exists_many(ns, missing[:1] + shuffled[:10]) != 0 or any(store.contains(ns, missing)):
            raise BenchError("lookups report keys that were never stored")
        entries = store.stats().entries
    finally:
        store.close()
    shutil.rmtree(path)
    n = len(keys)
    r = {
        "keys": n,
        "key_len": len(keys[0]),
        "entries": entries,
        "fill_batch": fill_batch,
        "fill_keys_per_s": n / t_fill,
        "exists_many_keys_per_s": n / med(ex),
        "contains_keys_per_s": n / med(co),
        "exists_many_keys_per_s_all": [n / t for t in ex],
        "contains_keys_per_s_all": [n / t for t in co],
    }
    log(
        f"  {n} keys: fill {r['fill_keys_per_s'] / 1e3:.0f}k/s, "
        f"exists_many {r['exists_many_keys_per_s'] / 1e3:.0f}k/s, contains {r['contains_keys_per_s'] / 1e3:.0f}k/s"
    )
    return r


# ------------------------------------------------------------------------------------------------ 5: engine


def bench_engine(a, root: str, pages: np.ndarray, keys: list[str], prefault: Prefault) -> dict:
    ns = make_ns()
    n = min(len(pages), a.engine_mib * MiB // pages[0].nbytes)
    src, keys = pages[:n], keys[:n]
    raw = src.nbytes
    dst = np.empty_like(src)
    dst.reshape(-1).view(np.uint8).fill(0)
    outs = list(dst)
    runs = []
    for rep in range(a.reps):
        path = os.path.join(root, f"engine-{rep}")
        eng = TierEngine(
            TierConfig(
                path=path,
                host_bytes=a.engine_host_mib * MiB,
                codec="zstd",
                write_policy="write_through",
                disk={"io": a.io},
            )
        )
        try:
            prefault(raw)
            t0 = time.perf_counter()
            for b in range(0, n, a.batch):
                ok = eng.put_many(ns, keys[b : b + a.batch], list(src[b : b + a.batch]))
                if not all(ok):
                    raise BenchError(f"engine put_many refused {ok.count(False)} page(s)")
            t_put = time.perf_counter() - t0
            if not eng.flush(timeout=300):
                raise BenchError("engine flush did not finish")
            t_flush = time.perf_counter() - t0 - t_put
            st0 = eng.stats()
            if st0.writedown_dropped:
                raise BenchError(f"engine dropped {st0.writedown_dropped} write-downs")
            hot = [i for i, k in enumerate(keys) if eng.pool.contains((ns.id, key_bytes(k)))]
            hot_set = set(hot)
            cold = [i for i in range(n) if i not in hot_set]
            dst.reshape(-1).view(np.uint8).fill(0xA5)
            res = {"pages": n, "hot_pages": len(hot), "cold_pages": len(cold), "put_s": t_put, "flush_s": t_flush}
            for label, idx in (("hot", hot), ("cold", cold)):
                if label == "cold":
                    res["resident_after_drop"] = drop_cache(segment_files(path))
                prefault(len(idx) * src[0].nbytes)
                s0 = eng.stats()
                t0 = time.perf_counter()
                for b in range(0, len(idx), a.batch):
                    sel = idx[b : b + a.batch]
                    got = eng.get_many(ns, [keys[i] for i in sel], [outs[i] for i in sel])
                    if not all(got):
                        raise BenchError(f"engine get_many ({label}) missed {got.count(False)} page(s)")
                res[f"get_{label}_s"] = time.perf_counter() - t0
                s1 = eng.stats()
                res[f"get_{label}_where"] = {
                    "dram": s1.hits_dram - s0.hits_dram,
                    "queued": s1.hits_queued - s0.hits_queued,
                    "disk": s1.hits_disk - s0.hits_disk,
                }
            if not np.array_equal(src, dst):
                raise BenchError("engine get_many returned pages that differ from what was put")
            st = eng.stats()
            res["dram_used_bytes"] = st.dram.used_bytes
            res["dram_raw_bytes"] = st.dram.raw_bytes
            res["disk_live_bytes"] = st.disk.live_bytes
        finally:
            eng.close()
        shutil.rmtree(path)
        runs.append(res)
        log(
            f"  rep {rep}: put {gbps(raw, t_put):.2f} GB/s, put+flush {gbps(raw, t_put + t_flush):.2f}, "
            f"hot get {gbps(len(hot) * src[0].nbytes, res['get_hot_s']):.2f} ({len(hot)} pages), "
            f"cold get {gbps(len(cold) * src[0].nbytes, res['get_cold_s']):.2f} ({len(cold)} pages)"
        )
    pb = src[0].nbytes
    out = {
        "pages": n,
        "raw_bytes": raw,
        "host_budget_bytes": a.engine_host_mib * MiB,
        "codec": "zstd",
        "write_policy": "write_through",
        "batch_pages": a.batch,
        "runs": runs,
        "put_gbps": gbps(raw, med([r["put_s"] for r in runs])),
        "put_flush_gbps": gbps(raw, med([r["put_s"] + r["flush_s"] for r in runs])),
        "get_hot_gbps": med([gbps(r["hot_pages"] * pb, r["get_hot_s"]) for r in runs if r["hot_pages"]] or [0]),
        "get_cold_gbps": med([gbps(r["cold_pages"] * pb, r["get_cold_s"]) for r in runs if r["cold_pages"]] or [0]),
    }
    return out


# ------------------------------------------------------------------------------------------------ report


def machine_info(root: str) -> dict:
    cpu = cpu_model()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    fs = None
    try:
        real = os.path.realpath(root)
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ, opts = line.split()[:4]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fs = mnt, {"device": dev, "mount": mnt, "type": typ, "options": opts}
    except OSError:
        pass
    vers = {}
    for mod in ("numpy", "zstandard", "lmdb", "xxhash"):
        try:
            m = __import__(mod)
            vers[mod] = getattr(m, "__version__", None) or getattr(m, "VERSION", None)
        except ImportError:
            vers[mod] = None
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if commit and dirty:
            commit += " (dirty tree)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": vers,
        "bench_dir": os.path.realpath(root),
        "filesystem": fs,
        "git_commit": commit,
    }


def summary_rows(res: dict) -> list[dict]:
    rows = []

    def row(section, name, value, unit, key=None, fmt="{:.2f}"):
        target, st = status(key, value) if key else ("-", "info")
        rows.append(
            {
                "section": section,
                "figure": name,
                "value": value,
                "unit": unit,
                "text": fmt.format(value),
                "target": target,
                "status": st,
                "key": key,
            }
        )

    d = res.get("disk")
    if d:
        mb = f"{d['bytes'] // MiB} MiB"
        row("disk", f"raw baseline write ({mb}, 4 MiB chunks, 1 fsync)", d["raw_baseline"]["write_gbps"], "GB/s")
        row("disk", "raw baseline read (4 MiB preadv, cold-ish)", d["raw_baseline"]["read_gbps"], "GB/s")
        bp = d["batch_pages"]
        row(
            "disk",
            f"raw O_DIRECT write ({mb}, 4 MiB chunks via aligned buffer, 1 fsync)",
            d["raw_direct"]["write_gbps"],
            "GB/s",
        )
        row("disk", f"tier raw put_many ({bp} pages/call)", d["tier_raw"]["write_gbps"], "GB/s")
        row(
            "disk",
            "tier raw put_many / raw O_DIRECT write (headline)",
            d["tier_raw"]["write_gbps"] / d["raw_direct"]["write_gbps"],
            "x",
            "tier_raw_write_vs_direct",
        )
        row("disk", "tier raw put_many / raw write", d["tier_raw"]["write_vs_raw"], "x", "tier_raw_write_vs_raw")
        row("disk", f"tier raw get_many ({bp} pages/call)", d["tier_raw"]["read_gbps"], "GB/s")
        row("disk", "tier raw get_many / raw read", d["tier_raw"]["read_vs_raw"], "x", "tier_raw_read_vs_raw")
        row("disk", "tier zstd put_many (decoded bytes; pre-encoded)", d["tier_zstd"]["write_gbps"], "GB/s")
        row("disk", "tier zstd put_many / raw write", d["tier_zstd"]["write_vs_raw"], "x")
        row("disk", "tier zstd get_many (decoded bytes, incl. decode)", d["tier_zstd"]["read_gbps"], "GB/s")
        row("disk", "tier zstd get_many / raw read", d["tier_zstd"]["read_vs_raw"], "x")
    c = res.get("codecs")
    if c:
        for dtype, short in (("bfloat16", "bf16"), ("float16", "fp16")):
            for codec in CODEC_NAMES:
                r = c[dtype][codec]
                row(
                    "codec",
                    f"{codec} {short} ratio",
                    r["ratio"],
                    "x",
                    "zstd_ratio_bf16" if (codec, dtype) == ("zstd", "bfloat16") else None,
                    "{:.3f}",
                )
                row("codec", f"{codec} {short} encode (1 thread)", r["encode_gbps"], "GB/s")
                row(
                    "codec",
                    f"{codec} {short} decode (1 thread)",
                    r["decode_gbps"],
                    "GB/s",
                    "zstd_decode_gbps_bf16" if (codec, dtype) == ("zstd", "bfloat16") else None,
                )
                if "cos_min" in r:
                    row(
                        "codec",
                        f"{codec} {short} max |err| / row absmax",
                        r["max_abs_err_rel_row_absmax"],
                        "",
                        fmt="{:.4f}",
                    )
                    row(
                        "codec",
                        f"{codec} {short} cosine per page min / mean",
                        r["cos_min"],
                        "",
                        fmt="{:.6f} / " + f"{r['cos_mean']:.6f}",
                    )
    lk = res.get("lookups")
    if lk:
        row(
            "index",
            f"exists_many, {lk['keys']} x {lk['key_len']}-hex keys, 1 call, random order",
            lk["exists_many_keys_per_s"],
            "keys/s",
            "exists_many_keys_per_s",
            "{:,.0f}",
        )
        row("index", "contains, same keys", lk["contains_keys_per_s"], "keys/s", fmt="{:,.0f}")
        row(
            "index",
            f"index fill (put_many of 40 B pages, {lk['fill_batch']}/call)",
            lk["fill_keys_per_s"],
            "keys/s",
            fmt="{:,.0f}",
        )
    e = res.get("engine")
    if e:
        hot = med([r["hot_pages"] for r in e["runs"]])
        cold = med([r["cold_pages"] for r in e["runs"]])
        w = f"{e['raw_bytes'] // MiB} MiB, DRAM {e['host_budget_bytes'] // MiB} MiB, zstd"
        row("engine", f"put_many ({w}; encode + pool + queue)", e["put_gbps"], "GB/s")
        row("engine", "put_many + flush (durable)", e["put_flush_gbps"], "GB/s")
        row("engine", f"get_many hot ({hot:.0f} pages in DRAM)", e["get_hot_gbps"], "GB/s")
        row("engine", f"get_many cold ({cold:.0f} pages on disk, cold-ish)", e["get_cold_gbps"], "GB/s")
    en = res.get("encrypt")
    if en:
        for codec in ("raw", "zstd"):
            sealed, plain = en[f"{codec}_aesgcm"], en[f"{codec}_plain"]
            row("encrypt", f"tier {codec} put_many, plain ({en['bytes'] // MiB} MiB)", plain["write_gbps"], "GB/s")
            row("encrypt", f"tier {codec} put_many, AES-256-GCM", sealed["write_gbps"], "GB/s")
            row("encrypt", f"tier {codec} put_many, AES-GCM / plain (same run)", sealed["write_vs_plain"], "x")
            row("encrypt", f"tier {codec} get_many, plain", plain["read_gbps"], "GB/s")
            row("encrypt", f"tier {codec} get_many, AES-256-GCM (incl. decrypt + decode)", sealed["read_gbps"], "GB/s")
            row("encrypt", f"tier {codec} get_many, AES-GCM / plain (same run)", sealed["read_vs_plain"], "x")
    return rows


def print_table(rows: list[dict]) -> None:
    w = max(len(r["figure"]) for r in rows)
    log(f"\n{'section':7} {'figure':{w}} {'value':>22} {'unit':6} {'target':15} status")
    for r in rows:
        log(f"{r['section']:7} {r['figure']:{w}} {r['text']:>22} {r['unit']:6} {r['target']:15} {r['status']}")


def markdown(res: dict, rows: list[dict]) -> str:
    m = res["machine"]
    fs = m.get("filesystem") or {}
    lines = [
        "# Storage-tier benchmark",
        "",
        f"Produced by `{res['command']}` on {res['date']} ({res['elapsed_s']:.0f} s).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{(m['mem_bytes'] or 0) / 2**30:.0f} GiB RAM, Linux {m['kernel']}, Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Store directory {m['bench_dir']} on {fs.get('type', '?')} ({fs.get('device', '?')}). "
        f"Commit {m['git_commit']}.",
        "",
        f"Every figure is the median of {res['params']['reps']} repetitions ({res['params']['disk_reps']} for the "
        f"raw-vs-tier disk section). {res['read_mode']}",
        "",
        "Guest memory warm-up before each timed disk/engine phase: "
        + ("on" if res["prefault"]["on"] else "off")
        + (
            f" (first touch of fresh guest memory measured at {res['prefault']['first_touch_gbps_median']:.2f} GB/s; "
            "see the bench's module doc)"
            if res["prefault"]["first_touch_gbps_median"]
            else ""
        )
        + (
            f". Other processes on the machine used {res['other_cpu_cores']:.2f} cores on average during the run."
            if res.get("other_cpu_cores") is not None
            else "."
        ),
        "",
        "| section | figure | value | unit | target | status |",
        "|---|---|---:|---|---|---|",
    ]
    for r in rows:
        cells = [r["section"], r["figure"], r["text"], r["unit"], r["target"], r["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    d = res.get("disk")
    if d:
        lines += ["", "Per-repetition GB/s (write / read):", ""]
        for side in ("raw_baseline", "tier_raw", "tier_zstd"):
            ws = ", ".join(f"{x:.2f}" for x in d[side]["write_gbps_all"])
            rs = ", ".join(f"{x:.2f}" for x in d[side]["read_gbps_all"])
            paired = ""
            if side != "raw_baseline":
                pw = ", ".join(f"{x:.2f}" for x in d[side]["write_vs_raw_paired"])
                pr = ", ".join(f"{x:.2f}" for x in d[side]["read_vs_raw_paired"])
                paired = f" (vs the baseline of the same rep: write {pw}; read {pr})"
            lines.append(f"- {side}: write {ws}; read {rs}{paired}")
        lines += ["", "Where the write / read time goes (median seconds for the whole working set):", ""]
        bw = d["raw_baseline"].get("write_breakdown_s_median")
        if bw:
            lines.append(f"- raw baseline write: write() {bw['write']:.3f}, fsync {bw['fsync']:.3f}")
        for side in ("tier_raw", "tier_zstd"):
            for kind in ("write", "read"):
                bd = d[side].get(f"{kind}_breakdown_s_median")
                if bd:
                    lines.append(f"- {side} {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in bd.items()))
    lines += [
        "",
        "Raw numbers, parameters and machine details: the JSON file next to this one "
        f"(`{os.path.basename(res['json_path']) if res.get('json_path') else 'not written'}`).",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--quick", action="store_true", help="CI-sized run (a few seconds); smaller defaults")
    ap.add_argument("--dir", default=None, help="where files and stores go (default: a temp dir under $TMPDIR)")
    ap.add_argument(
        "--out", default=None, help="JSON results (default bench/results/tier_bench-<date>.json; none with --quick)"
    )
    ap.add_argument(
        "--md", default=None, help="Markdown table (default bench/results/tier_bench.md; none with --quick)"
    )
    ap.add_argument("--mib", type=int, default=None, help="disk working set in MiB (default 512, quick 32)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3)")
    ap.add_argument(
        "--disk-reps",
        type=int,
        default=None,
        help="repetitions of the raw-vs-tier disk section, the noisiest (default 5, quick 3)",
    )
    ap.add_argument(
        "--no-prefault",
        dest="prefault",
        action="store_false",
        help="don't warm guest memory before timed disk/engine phases (see the module doc)",
    )
    ap.add_argument("--batch", type=int, default=64, help="pages per put_many / get_many call (default 64 = 16 MiB)")
    ap.add_argument("--codec-pages", type=int, default=None, help="synthetic pages per dtype (default 200, quick 24)")
    ap.add_argument(
        "--lookup-keys", type=int, default=None, help="keys for the index test (default 131072, quick 8192)"
    )
    ap.add_argument("--engine-mib", type=int, default=None, help="engine working set MiB (default 256, quick 32)")
    ap.add_argument("--engine-host-mib", type=int, default=None, help="engine DRAM budget MiB (default 64, quick 8)")
    ap.add_argument("--io", default="auto", choices=("auto", "posix", "kvikio"), help="DiskStoreConfig.io")
    ap.add_argument("--only", default="disk,codecs,lookups,engine,encrypt", help="comma list of sections to run")
    ap.add_argument(
        "--encrypt-mib",
        type=int,
        default=None,
        help="working set of the encryption section in MiB (default 128, quick 16)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the bench directory (default: removed)")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed (data errors always exit 2)")
    add_allow_dirty(ap)
    a = ap.parse_args(argv)
    q = a.quick
    for name, full, quick in (
        ("mib", 512, 32),
        ("reps", 3, 3),
        ("disk_reps", 5, 3),
        ("codec_pages", 200, 24),
        ("lookup_keys", 131072, 8192),
        ("engine_mib", 256, 32),
        ("engine_host_mib", 64, 8),
        ("encrypt_mib", 128, 16),
    ):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    if min(a.reps, a.disk_reps, a.mib, a.batch) < 1:
        ap.error("--reps, --disk-reps, --mib and --batch must be positive")
    if not q:
        today = _dt.date.today().isoformat()
        a.out = a.out or os.path.join(REPO, "bench", "results", f"tier_bench-{today}.json")
        a.md = a.md or os.path.join(REPO, "bench", "results", "tier_bench.md")
    guard_results(a.out, REPO, a.allow_dirty)
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()]
    return a


def main(argv=None) -> int:
    a = parse(argv)
    started = time.perf_counter()
    own_dir = a.dir is None
    root = (
        tempfile.mkdtemp(prefix="kvdrive-tier-bench-")
        if own_dir
        else tempfile.mkdtemp(prefix="kvdrive-tier-bench-", dir=a.dir)
    )
    exe = sys.executable
    if exe.startswith(os.getcwd() + os.sep):
        exe = os.path.relpath(exe)
    script = os.path.relpath(os.path.abspath(sys.argv[0])) if argv is None else "bench/tier_bench.py"
    cmd = " ".join(shlex.quote(x) for x in [exe, script, *(sys.argv[1:] if argv is None else argv)])
    read_mode = (
        "Reads are buffered (no O_DIRECT), cold-ish: before each read phase the files read (baseline file, "
        "store segment files) are fsync'd and dropped with posix_fadvise(POSIX_FADV_DONTNEED); the share "
        "still resident afterwards (mincore) is in the JSON (resident_after_drop). The LMDB index stays "
        "cached. On a VM the host may still cache the virtual disk."
    )
    res = {
        "command": cmd,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "params": {k: v for k, v in vars(a).items()},
        "read_mode": read_mode,
        "machine": machine_info(root),
    }
    log(f"tier bench in {root} ({res['machine']['cpu_model']}, {res['machine']['cores']} cores); {read_mode}")
    rc = 0
    prefault = Prefault(a.prefault)
    cpu0 = cpu_sample()
    try:
        need_pages = {"disk", "engine", "encrypt"} & set(a.sections)
        if need_pages:
            n_pages = (
                max(
                    a.mib if "disk" in a.sections else 0,
                    a.engine_mib if "engine" in a.sections else 0,
                    a.encrypt_mib if "encrypt" in a.sections else 0,
                )
                * MiB
                // (2 * np.prod(PAGE_SHAPE))
            )
            t0 = time.perf_counter()
            rng = np.random.default_rng(a.seed)
            pages = np.empty((n_pages,) + PAGE_SHAPE, np.uint16)  # preallocated; filled = touched
            for i in range(n_pages):
                pages[i] = kv_page(rng)
            keys = [hex_key(i, "page-") for i in range(n_pages)]
            log(f"{n_pages} synthetic bf16 pages ({pages.nbytes / MiB:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
        if "disk" in a.sections:
            n_disk = a.mib * MiB // pages[0].nbytes
            log(f"[1+2] raw baseline vs disk tier, {n_disk} pages, {a.disk_reps} reps")
            res["disk"] = bench_disk(a, root, pages[:n_disk], keys[:n_disk], prefault)
            gc.collect()
        if "codecs" in a.sections:
            log(f"[3] codecs, {a.codec_pages} pages per dtype, 1 thread")
            res["codecs"] = bench_codecs(a)
        if "lookups" in a.sections:
            log(f"[4] index lookups, {a.lookup_keys} keys")
            res["lookups"] = bench_lookups(a, root)
        if "engine" in a.sections:
            log(f"[5] engine, {a.engine_mib} MiB of pages, DRAM budget {a.engine_host_mib} MiB")
            res["engine"] = bench_engine(a, root, pages, keys, prefault)
        if "encrypt" in a.sections:
            n_enc = a.encrypt_mib * MiB // pages[0].nbytes
            log(f"[6] encryption at rest, {n_enc} pages, plain vs AES-256-GCM, {a.disk_reps} reps")
            res["encrypt"] = bench_encrypt(a, root, pages[:n_enc], keys[:n_enc], prefault)
            gc.collect()
    except BenchError as e:
        log(f"BENCH ERROR: {e}")
        rc = 2
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if rc:
        return rc
    res["elapsed_s"] = time.perf_counter() - started
    res["other_cpu_cores"] = other_cpu(cpu0, cpu_sample())
    res["loadavg_end"] = os.getloadavg()
    res["prefault"] = {
        "on": a.prefault,
        "first_touch_gbps_median": med(prefault.rates) if prefault.rates else None,
        "first_touch_gbps_all": prefault.rates,
    }
    log(
        f"guest memory first touch: {res['prefault']['first_touch_gbps_median'] or float('nan'):.2f} GB/s "
        f"(prefault {'on' if a.prefault else 'off'}); other processes used "
        f"{res['other_cpu_cores'] if res['other_cpu_cores'] is not None else float('nan'):.2f} cores on average"
    )
    rows = summary_rows(res)
    res["summary"] = rows
    print_table(rows)
    missed = [r["figure"] for r in rows if r["status"] == "MISS"]
    log(
        f"\n{len(rows) - sum(r['status'] == 'info' for r in rows) - len(missed)} target(s) met, "
        f"{len(missed)} missed{': ' + '; '.join(missed) if missed else ''}. {res['elapsed_s']:.0f} s."
    )
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        res["json_path"] = a.out
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
            f.write("\n")
        log(f"wrote {a.out}")
    if a.md:
        os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
        with open(a.md, "w") as f:
            f.write(markdown(res, rows))
        log(f"wrote {a.md}")
    return 1 if (missed and a.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
