"""load_compressed end to end on CPU (the torch references; kernels/compressed_load.py): blobs of every codec go into
a paged KV pool bit for bit as the numpy codecs decode them, and a damaged or mismatched blob is a miss that leaves
its pool page alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvdrive_sglang.kernels.compressed_load import CompressedLoader, MissReason, check_blob, load_compressed
from kvdrive_sglang.tier.codecs import HEADER, decode_page, encode_page
from kvdrive_sglang.tier.synthetic import kv_page

from .bplane_codec import bplane_registered

LAYERS, PAGE, HEADS, DIM, SLOTS = 3, 4, 2, 64, 12 * 4


def pool(dtype=torch.bfloat16, stacked=False):
    """2 x LAYERS per-layer buffers [slots, heads, dim] (K layers then V layers, as SGLang's MHA pool), seeded."""
    g = torch.Generator().manual_seed(5)
    bufs = [(torch.randn(SLOTS, HEADS, DIM, generator=g) * 3).to(dtype) for _ in range(2 * LAYERS)]
    return torch.stack(bufs) if stacked else bufs


def flat_pages(count, dtype="bfloat16", seed=0):
    """Layer_first flat pages [2 * LAYERS, PAGE, HEADS, DIM] that look like KV (kv_page per layer)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        per_layer = [kv_page(rng, page_size=PAGE, num_heads=HEADS, head_dim=DIM, dtype=dtype) for _ in range(LAYERS)]
        kv = np.stack(per_layer, axis=1)  # [2 (K, V), LAYERS, PAGE, HEADS, DIM]
        out.append(np.ascontiguousarray(kv.reshape(2 * LAYERS, PAGE, HEADS, DIM)))
    return out


def decoded(blob, dtype="bfloat16"):
    """What the numpy codecs decode a blob to, as the pool's per-layer rows [2 * LAYERS, PAGE, HEADS, DIM]."""
    storage = np.uint16 if dtype in ("bfloat16", "float16") else np.uint32
    out = np.empty((2 * LAYERS, PAGE, HEADS, DIM), storage)
    decode_page(blob, out, dtype)
    return out


def pool_page(layers, page_id, bits=torch.int16):
    rows = slice(page_id * PAGE, (page_id + 1) * PAGE)
    return np.stack([t[rows].view(bits).numpy() for t in layers])


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_every_codec_loads_bit_exact(bplane_codec, stacked):
    pages = flat_pages(10)
    codecs_used = ["bplane", "raw", "zstd", "int8", "fp8", "bplane", "bplane", "fp8", "zstd", "int8"]
    blobs = [encode_page(p, "bfloat16", c, DIM) for p, c in zip(pages, codecs_used)]
    layers = pool(stacked=stacked)
    before = [t.clone() for t in layers]
    ids = [7, 0, 3, 11, 5, 9, 1, 2, 8, 10]
    res = load_compressed(blobs, layers, ids, PAGE, checksums=[xxhash.xxh3_64_intdigest(b) for b in blobs])
    assert res.ok == (True,) * 10 and not res.misses and res.host_decoded == 2
    assert res.raw_bytes == 10 * pages[0].nbytes
    for blob, pid in zip(blobs, ids):
        assert np.array_equal(pool_page(layers, pid), decoded(blob).view(np.int16)), pid
    untouched = 4 * PAGE  # page 4 was not named
    for t, b in zip(layers, before):
        assert torch.equal(t[untouched : untouched + PAGE], b[untouched : untouched + PAGE])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_dtypes(bplane_codec, dtype):
    tdtype = getattr(torch, dtype)
    pages = flat_pages(3, dtype=dtype)
    names = ["bplane", "zstd", "int8"] if dtype == "float16" else ["raw", "zstd", "fp8"]
    blobs = [encode_page(p, dtype, c, DIM) for p, c in zip(pages, names)]
    layers = pool(tdtype)
    res = load_compressed(blobs, layers, [2, 6, 4], PAGE, checksums=None)
    assert all(res.ok)
    bits = torch.int16 if dtype == "float16" else torch.int32
    for blob, pid in zip(blobs, [2, 6, 4]):
        want = decoded(blob, dtype).view(np.int16 if dtype == "float16" else np.int32)
        assert np.array_equal(pool_page(layers, pid, bits), want)


def test_wire_carries_the_compressed_size(bplane_codec):
    pages = flat_pages(6)
    blobs = [encode_page(p, "bfloat16", "bplane", DIM) for p in pages]
    res = load_compressed(blobs, pool(), list(range(6)), PAGE, checksums=None)
    body = sum(len(b) - HEADER.size for b in blobs)
    assert body <= res.wire_bytes < body + 6 * 16 + 2 * 6 * 8 + 16  # bodies + alignment + ids + offsets
    assert res.raw_bytes / res.wire_bytes > 1.3


def test_damaged_and_mismatched_blobs_are_misses_and_leave_their_pages_alone(bplane_codec):
    pages = flat_pages(8)
    blobs = [encode_page(p, "bfloat16", "bplane" if i % 2 else "zstd", DIM) for i, p in enumerate(pages)]
    sums = [xxhash.xxh3_64_intdigest(b) for b in blobs]
    bad = list(blobs)
    flipped = bytearray(blobs[1])
    flipped[HEADER.size + 100] ^= 4
    bad[1] = bytes(flipped)  # checksum mismatch
    bad[2] = b"KVPX" + blobs[2][4:]  # not a page magic
    bad[3] = encode_page(flat_pages(1, "float16")[0], "float16", "bplane", DIM)  # another dtype
    desc = bytearray(blobs[5])
    desc[HEADER.size + 6] = 9  # bplane width 9: fails the descriptor check
    bad[5] = bytes(desc)
    z = bytearray(blobs[6])
    z[HEADER.size] = 7  # zstd body: plane 0 in an unknown storage mode (damage inside a zstd frame may decode
    bad[6] = bytes(z)  # without an error: that is what the checksum is for)
    bad[7] = blobs[7][:-1]  # truncated
    sums_for = list(sums)
    sums_for[2] = sums_for[3] = sums_for[5] = sums_for[6] = sums_for[7] = None  # unrecorded: the other checks decide
    layers = pool()
    before = [t.clone() for t in layers]
    res = load_compressed(bad, layers, list(range(8)), PAGE, checksums=sums_for)
    assert res.ok == (True, False, False, False, True, False, False, False)
    assert res.misses == {MissReason.CHECKSUM: 1, MissReason.HEADER: 1, MissReason.SHAPE: 1, MissReason.BODY: 3}
    # the same checks alone, as a prefetch would make them (a zstd body only fails when decoded, at load time)
    alone = [check_blob(b, layers, PAGE, checksum=c) for b, c in zip(bad, sums_for)]
    body, ck, hd, sh = MissReason.BODY, MissReason.CHECKSUM, MissReason.HEADER, MissReason.SHAPE
    assert alone == [None, ck, hd, sh, None, body, None, body]
    for pid in (1, 2, 3, 5, 6, 7):
        rows = slice(pid * PAGE, (pid + 1) * PAGE)
        assert all(torch.equal(t[rows], b[rows]) for t, b in zip(layers, before)), pid
    for pid in (0, 4):
        assert np.array_equal(pool_page(layers, pid), decoded(blobs[pid]).view(np.int16))


def test_a_bplane_header_naming_a_32_bit_dtype_is_a_miss(bplane_codec):
    """bplane only codes 16-bit values; a header that says float32 over a well-formed body of as many 16-bit values
    (no encoder writes one) must be a miss. Before the dtype check it passed the descriptor check and the load raised
    from inside (a 16-bit decode into a float32 staging buffer)."""
    from kvdrive_sglang.tier import bplane

    page = flat_pages(1, "float32")[0]
    raw = encode_page(page, "float32", "raw", DIM)
    body = bplane.encode_body(
        np.ascontiguousarray(page.view(np.uint16)[..., ::2]).reshape(-1).view(np.uint8), "bfloat16"
    )
    h = bytearray(raw[: HEADER.size])
    h[5] = 4  # codec code (HEADER: magic, version, codec, dtype, ...): bplane
    res = load_compressed([bytes(h) + body], pool(torch.float32), [3], PAGE, checksums=None)
    assert res.ok == (False,) and res.misses == {MissReason.HEADER: 1}


def test_small_chunks_give_the_same_pool(bplane_codec):
    pages = flat_pages(7)
    names = ["bplane", "zstd", "raw", "int8", "bplane", "fp8", "bplane"]
    blobs = [encode_page(p, "bfloat16", c, DIM) for p, c in zip(pages, names)]
    ids = [6, 2, 9, 0, 11, 3, 7]
    whole, chunked = pool(), pool()
    load_compressed(blobs, whole, ids, PAGE, checksums=None)
    loader = CompressedLoader("cpu", chunk_bytes=2 * pages[0].nbytes)  # four chunks
    res = loader.load(blobs, chunked, ids, PAGE, checksums=None)
    assert all(res.ok)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(whole, chunked))


def test_bad_calls_are_refused_with_clear_errors(bplane_codec):
    blobs = [encode_page(p, "bfloat16", "bplane", DIM) for p in flat_pages(2)]
    layers = pool()
    with pytest.raises(ValueError, match="one pool page per blob"):
        load_compressed(blobs, layers, [1], PAGE, checksums=None)
    with pytest.raises(ValueError, match="repeat"):
        load_compressed(blobs, layers, [1, 1], PAGE, checksums=None)
    with pytest.raises(IndexError, match="0 .. 11"):
        load_compressed(blobs, layers, [1, 12], PAGE, checksums=None)
    with pytest.raises(ValueError, match="checksums"):
        load_compressed(blobs, layers, [1, 2], PAGE, checksums=[None])
    with pytest.raises(ValueError, match="chunk_bytes"):
        CompressedLoader("cpu", chunk_bytes=0)
    assert load_compressed([], layers, [], PAGE, checksums=None).ok == ()


@settings(max_examples=40, deadline=None)
@given(
    codec=st.sampled_from(["bplane", "zstd", "raw", "int8", "fp8"]),
    cuts=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4),
    truncate=st.integers(0, 40),
)
def test_fuzz_damaged_blobs_never_raise_and_touch_only_their_page(codec, cuts, truncate):
    """No checksum recorded (a DRAM-tier blob): whatever the bytes, the load returns; a page is either loaded or a
    miss, and the pages not named stay as they were."""
    with bplane_registered():
        page = flat_pages(1, seed=3)[0]
        blob = bytearray(encode_page(page, "bfloat16", codec, DIM))
        for at, value in cuts:
            blob[at % len(blob)] = value
        blob = bytes(blob[: len(blob) - truncate])
        layers = pool()
        before = [t.clone() for t in layers]
        res = load_compressed([blob], layers, [5], PAGE, checksums=None)
    assert len(res.ok) == 1 and (res.ok[0] or sum(res.misses.values()) == 1)
    rest = torch.ones(SLOTS, dtype=torch.bool)
    rest[5 * PAGE : 6 * PAGE] = False
    assert all(torch.equal(t[rest], b[rest]) for t, b in zip(layers, before))
