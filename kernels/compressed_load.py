"""Reload kvdrive pages into the device KV pool while they are still compressed: PCIe carries the encoded bytes, the
device decodes them (docs/architecture.md, "Compressed to the GPU").

    load_compressed(blobs, layers, page_ids, page_size, *, checksums) -> LoadResult
    check_blob(blob, layers, page_size, *, checksum) -> MissReason | None    (the host checks alone)

``blobs`` are kvdrive page blobs (``tier/codecs.py``: header + body), as the tiers hand them out; ``layers`` the
device KV pool's per-layer buffers (``[num_slots, *inner]`` each: SGLang's ``k_buffer + v_buffer`` for MHA,
``kv_buffer`` for MLA; a list or one stacked tensor, as ``page_copy`` takes them); ``page_ids[i]`` the pool page blob
``i`` goes to. A blob's decoded page must be the layer_first flat page of those buffers, ``[layers, page_size,
*inner]`` of their dtype (what SGLang's layer_first host pool stores, and so what kvdrive stored).

Per call, on the host: each blob's xxh3_64 is checked against ``checksums[i]`` (the disk index's; ``None`` where
there is none, e.g. a page from the DRAM tier), its header parsed (``peek_header``) and its size and dtype checked
against the pool, and a bplane body's descriptors checked (``tier.bplane.check_body``). A blob failing any of these
is a miss: ``LoadResult.ok[i]`` is False and its pool page is not touched. Then, per chunk of at most
``chunk_bytes`` of decoded pages: the page ids, the bplane body offsets and every body are packed into one staging
buffer (pinned on CUDA; two of them, so packing the next chunk overlaps the copy of this one), copied to the device
in one ``non_blocking`` copy on the current stream, decoded there, and scattered into the pool's slots with
``page_copy.scatter_pages_layers``. By codec:

    bplane       decoded by ``bplane_decode`` (the Triton kernel on CUDA) straight into layer-major staging
    int8 / fp8   dequantised by ``dequant.dequant_body`` (Triton on CUDA): the lossy codecs' dequantise-on-load
    raw          copied as they are
    zstd         not decodable on the device: decoded on the host into the staging buffer, then copied raw

Everything is queued on the caller's current stream (in SGLang: the cache controller's host-to-device stream,
inside its transfer submission), so SGLang's events order it against the forward pass as they order its own copy.
On a CPU device the same steps run the torch references, without a copy: that is how it is tested here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

import numpy as np
import torch
import xxhash

from ..tier import bplane
from ..tier.codecs import HEADER, decode_page, peek_header
from ..tier.errors import CodecError
from . import page_copy
from .bplane_decode import bplane_decode
from .dequant import OUT_DTYPES, dequant_body

log = logging.getLogger("kvdrive.kernels")

DEFAULT_CHUNK_BYTES = 64 << 20  # decoded bytes per chunk: bounds the device staging one call holds
_ALIGN = 16  # every part of the staging buffer starts 16-byte aligned (int64 views; lossy scales as float32)


class MissReason(str, Enum):
    CHECKSUM = "checksum"  # the blob's xxh3_64 is not the one recorded for it
    HEADER = "header"  # not a page blob, or a format, codec or dtype code this build does not read
    SHAPE = "shape"  # a page of another dtype or size than the pool's
    BODY = "body"  # the body does not fit its codec (lengths, bplane descriptors) or zstd cannot decode it


class Route(str, Enum):
    """How a page gets to the device."""

    BPLANE = "bplane"  # compressed; decoded on the device
    LOSSY = "lossy"  # int8 / fp8 codes + scales; dequantised on the device
    RAW = "raw"  # raw body, copied as is
    HOST = "host"  # zstd: decoded on the host into the staging buffer, copied raw


class LoadResult(NamedTuple):
    ok: tuple[bool, ...]  # per blob: its page is in the pool now
    wire_bytes: int  # bytes copied host -> device (page ids, offsets, bodies)
    raw_bytes: int  # decoded bytes placed in the pool
    host_decoded: int  # pages decoded on the host first (zstd)
    misses: dict[MissReason, int]  # why the others are not


class _Page(NamedTuple):
    i: int  # index in the caller's blobs
    route: Route
    key: tuple  # pages of one route and key go through one launch (lossy: (codec, row_len))
    body: memoryview


class _Geometry(NamedTuple):
    layers: int
    page_size: int
    seg: int  # elements of one layer's part of a page
    dtype: torch.dtype
    dtype_name: str
    page_bytes: int

    @property
    def elems(self) -> int:
        return self.layers * self.seg


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _StagingRing:
    """Two host staging buffers, pinned on CUDA, reused round-robin: a buffer is refilled only after the copy out of
    it has finished (its event), so packing the next chunk overlaps the copy of this one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self.bufs: list[torch.Tensor | None] = [None, None]
        self.events: list = [None, None]
        self.turn = 0

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        slot, self.turn = self.turn, 1 - self.turn
        if self.events[slot] is not None:
            self.events[slot].synchronize()
            self.events[slot] = None
        buf = self.bufs[slot]
        if buf is None or buf.numel() < nbytes:
            size = max(nbytes, 1 << 20)
            size = 1 << (size - 1).bit_length()  # grow by powers of two: few reallocations of pinned memory
            buf = self.bufs[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return slot, buf

    def sent(self, slot: int) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self.events[slot] = ev


class CompressedLoader:
    """Loads blobs into one device's KV pool; holds that device's staging buffers. Not thread-safe: one per
    loading thread (``load_compressed`` keeps one per thread and device)."""

    def __init__(self, device, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes
        self.ring = _StagingRing(self.device)

    # ------------------------------------------------------------------------------------------------ triage

    def _triage(self, blobs, checksums, geo: _Geometry, misses: dict) -> list[_Page]:
        pages = []
        for i, blob in enumerate(blobs):
            reason, page = self._triage_one(i, blob, None if checksums is None else checksums[i], geo)
            if reason is None:
                pages.append(page)
            else:
                misses[reason] = misses.get(reason, 0) + 1
        return pages

    @staticmethod
    def _triage_one(i: int, blob, checksum, geo: _Geometry):
        try:
            mv = memoryview(blob).cast("B")
        except TypeError:
            return MissReason.HEADER, None
        if checksum is not None and xxhash.xxh3_64_intdigest(mv) != checksum:
            return MissReason.CHECKSUM, None
        try:
            h = peek_header(mv)
        except CodecError:
            return MissReason.HEADER, None
        if h.dtype_name != geo.dtype_name or h.raw_nbytes != geo.page_bytes:
            return MissReason.SHAPE, None
        body = mv[HEADER.size :]
        name = h.codec_name
        if name == bplane.NAME:
            if h.dtype_name not in bplane.DTYPES:  # no encoder writes this: a crafted or damaged header
                return MissReason.HEADER, None
            try:
                bplane.check_body(body, geo.elems)
            except CodecError:
                return MissReason.BODY, None
            return None, _Page(i, Route.BPLANE, (), body)
        if name == "raw":
            if len(body) != geo.page_bytes:
                return MissReason.BODY, None
            return None, _Page(i, Route.RAW, (), body)
        if name in ("int8", "fp8"):
            if geo.dtype not in OUT_DTYPES or geo.elems % h.row_len:
                return MissReason.SHAPE, None
            if len(body) != geo.elems // h.row_len * 4 + geo.elems:
                return MissReason.BODY, None
            return None, _Page(i, Route.LOSSY, (name, h.row_len), body)
        return None, _Page(i, Route.HOST, (), mv)  # zstd (or a codec added later): the host decodes it

    # ------------------------------------------------------------------------------------------------- load

    def load(
        self, blobs: Sequence, layers, page_ids, page_size: int, *, checksums: Sequence | None, impl: str = "auto"
    ) -> LoadResult:
        """Load ``blobs[i]`` into pool page ``page_ids[i]`` of ``layers`` (see the module docstring)."""
        ls = page_copy._LayerSet(layers, "load_compressed")
        if ls.device != self.device:
            raise ValueError(f"the KV buffers are on {ls.device}; this loader stages for {self.device}")
        page_size = page_copy._page_size(page_size)
        geo = _geometry(ls, page_size)
        ids = np.asarray(page_ids.cpu() if isinstance(page_ids, torch.Tensor) else page_ids, dtype=np.int64)
        blobs = list(blobs)
        if ids.shape != (len(blobs),):
            raise ValueError(f"page_ids must hold one pool page per blob ({len(blobs)}), got shape {ids.shape}")
        if checksums is not None and len(checksums) != len(blobs):
            raise ValueError(f"checksums must hold one entry per blob ({len(blobs)}), got {len(checksums)}")
        if ids.size and (ids.min() < 0 or (ids.max() + 1) * page_size > ls.num_slots):
            last = ls.num_slots // page_size - 1
            raise IndexError(f"page ids must lie in 0 .. {last}, got {ids.min()} .. {ids.max()}")
        if np.unique(ids).size != ids.size:
            raise ValueError("page_ids repeat a page: each blob needs a page of its own")
        misses: dict[MissReason, int] = {}
        pages = self._triage(blobs, checksums, geo, misses)
        ok = [False] * len(blobs)
        wire = raw = host_decoded = 0
        per_chunk = max(1, self.chunk_bytes // max(geo.page_bytes, 1))
        for at in range(0, len(pages), per_chunk):
            chunk = pages[at : at + per_chunk]
            placed, sent, decoded = self._load_chunk(chunk, ls, ids, geo, impl, misses)
            wire += sent
            host_decoded += decoded
            for p in placed:
                ok[p.i] = True
                raw += geo.page_bytes
        if misses:
            log.debug("kvdrive load_compressed: %d of %d pages missed: %s", sum(misses.values()), len(blobs), misses)
        return LoadResult(tuple(ok), wire, raw, host_decoded, misses)

    def _load_chunk(self, chunk: list[_Page], ls, ids: np.ndarray, geo: _Geometry, impl: str, misses: dict):
        # Host-decoded pages first: a zstd body that fails here is a miss before anything is laid out.
        order = {Route.RAW: 0, Route.HOST: 0, Route.LOSSY: 1, Route.BPLANE: 2}
        chunk = sorted(chunk, key=lambda p: (order[p.route], p.key))
        P = len(chunk)
        # Layout: [page ids: P x int64][bplane offsets: B x int64][raw / host pages][lossy bodies][bplane bodies]
        n_bp = sum(p.route is Route.BPLANE for p in chunk)
        at = _align(8 * P) + _align(8 * n_bp)
        places = []
        for p in chunk:
            size = geo.page_bytes if p.route in (Route.RAW, Route.HOST) else len(p.body)
            # lossy bodies of one key sit back to back (a [N, nbytes] view); everything else aligned
            if p.route is not Route.LOSSY:
                at = _align(at)
            places.append(at)
            at += size
        total = at
        slot, host = self.ring.take(total)
        hv = host[:total].numpy()
        kept, kept_at = [], []
        for p, place in zip(chunk, places):
            if p.route is Route.HOST:
                try:
                    decode_page(p.body, hv[place : place + geo.page_bytes], geo.dtype_name)
                except CodecError:
                    misses[MissReason.BODY] = misses.get(MissReason.BODY, 0) + 1
                    continue
            else:
                hv[place : place + len(p.body)] = np.frombuffer(p.body, np.uint8)
            kept.append(p)
            kept_at.append(place)
        if len(kept) < P:  # a zstd page failed: its slot stays in the buffer, unused; drop it from the page list
            chunk, places, P = kept, kept_at, len(kept)
        if P == 0:
            return [], 0, 0
        hv[: 8 * P].view(np.int64)[:] = ids[[p.i for p in chunk]]
        bp_pos = [j for j, p in enumerate(chunk) if p.route is Route.BPLANE]
        bp_at = _align(8 * P)
        hv[bp_at : bp_at + 8 * len(bp_pos)].view(np.int64)[:] = [places[j] for j in bp_pos]
        if self.device.type == "cpu":
            dev = host[:total]  # no device to copy to: the reference path reads the staging buffer itself
        else:
            dev = torch.empty(total, dtype=torch.uint8, device=self.device)
            dev.copy_(host[:total], non_blocking=True)
        self.ring.sent(slot)
        stage = torch.empty((geo.layers, P * geo.page_size) + ls.inner, dtype=geo.dtype, device=self.device)
        by_layer = stage.view(geo.layers, P, geo.seg)
        j = 0
        while j < P:  # runs of one route and key, in chunk order
            end = j
            while end < P and (chunk[end].route, chunk[end].key) == (chunk[j].route, chunk[j].key):
                end += 1
            self._decode_run(chunk[j:end], dev, places[j:end], j, P, by_layer, stage, geo, impl)
            j = end
        dev_ids = dev[: 8 * P].view(torch.int64)
        dst = ls.stacked if ls.stacked is not None else list(ls.tensors)
        # check=False: the ids were range-checked on the host (a device-side check would sync)
        page_copy.scatter_pages_layers(dst, dev_ids, geo.page_size, stage, check=False, impl=impl)
        decoded = sum(p.route is Route.HOST for p in chunk)
        return chunk, total, decoded

    @staticmethod
    def _decode_run(run, dev, places, j, P, by_layer, stage, geo: _Geometry, impl: str) -> None:
        route = run[0].route
        n = len(run)
        if route is Route.BPLANE:  # one run, last in the chunk: the offsets table is all of its pages
            bp_at = _align(8 * P)
            offs = dev[bp_at : bp_at + 8 * n].view(torch.int64)
            bplane_decode(
                dev, offs, geo.elems, out=stage.view(-1).view(torch.int16), seg=geo.seg, first=j, total=P, impl=impl
            )
            return
        start = places[0]
        if route is Route.LOSSY:  # bodies of one key lie back to back: one [n, body bytes] view
            fmt, row_len = run[0].key
            bodies = dev[start : start + n * len(run[0].body)].view(n, -1)
            pages = dequant_body(bodies, fmt, row_len, geo.dtype, impl=impl)
        else:
            pages = dev[start : start + n * geo.page_bytes]
            if any(places[k] != start + k * geo.page_bytes for k in range(n)):  # aligned gaps: gather page by page
                pages = torch.cat([dev[a : a + geo.page_bytes] for a in places])
            pages = pages.view(geo.dtype)
        by_layer[:, j : j + n] = pages.view(n, geo.layers, geo.seg).transpose(0, 1)


def _geometry(ls, page_size: int) -> _Geometry:
    inner = 1
    for d in ls.inner:
        inner *= d
    seg = page_size * inner
    name = str(ls.dtype).removeprefix("torch.")
    return _Geometry(ls.num_layers, page_size, seg, ls.dtype, name, ls.num_layers * seg * ls.dtype.itemsize)


def check_blob(blob, layers, page_size: int, *, checksum: int | None) -> MissReason | None:
    """The host-side checks ``load_compressed`` makes on one blob for this pool (checksum, header, dtype and size,
    codec layout): None when it would load, else why not. For a caller that must decide a hit before the load (the
    prefetch into a lazy host slot: docs/architecture.md, "Compressed to the GPU"). A zstd page is decoded only at
    load time, so its body is checked only then."""
    ls = page_copy._LayerSet(layers, "check_blob")
    reason, _ = CompressedLoader._triage_one(0, blob, checksum, _geometry(ls, page_copy._page_size(page_size)))
    return reason


class _Loaders(threading.local):
    def __init__(self):
        self.by_device: dict[str, CompressedLoader] = {}


_loaders = _Loaders()


def load_compressed(
    blobs: Sequence,
    layers,
    page_ids,
    page_size: int,
    *,
    checksums: Sequence | None,
    impl: str = "auto",
) -> LoadResult:
    """Load ``blobs[i]`` into pool page ``page_ids[i]`` of ``layers`` with this thread's loader for their device."""
    ls = page_copy._LayerSet(layers, "load_compressed")
    key = str(ls.device)
    loader = _loaders.by_device.get(key)
    if loader is None:
        loader = _loaders.by_device[key] = CompressedLoader(ls.device)
    return loader.load(blobs, layers, page_ids, page_size, checksums=checksums, impl=impl)
