"""``--kvdrive-gpu-decompress``: pages stay compressed until they reach the GPU (docs/architecture.md, "Compressed to
the GPU"; issue 18).

Without the flag a storage hit is decoded on a core into SGLang's host-pool slot, and SGLang's per-layer copy moves
the raw bytes to the device. With it, :class:`LazySlots` changes two places, for the target KV pool only (a draft or
other component pool, and every page below, take the host path as before):

- **The prefetch** (``KvdriveStorage.batch_get_v1`` / ``batch_get_v2`` -> :meth:`LazySlots.get`): a page whose blob
  is bplane, int8 or fp8 is checked (``check_blob``: header, dtype and size against the device pool, a bplane body's
  descriptors; the disk tier verified its checksum already) and *recorded* as host slot -> blob instead of decoded.
  This is the last point where a bad page can still be a miss to SGLang; one that fails the check is decoded on the
  host as today (a miss where that fails too). Other pages (zstd, raw, staged, mirrored, remote) decode on the host.
- **The load** (the host pool's ``load_to_device_per_layer(_physical)``, wrapped by the SGLang generation's adapter in
  ``compat/``; :meth:`LazySlots.before_load`): at a transfer's first call (layer 0) the recorded pages among its
  ``host_indices`` go to their device pages through ``kernels.compressed_load.load_compressed`` (all layers in one
  call), and SGLang's own copy is handed only the other pages' indices, at every layer. A page it misses, or every
  page when it raises, or a page whose indices are not one whole device page, is decoded on the host into its slot
  first and copied by SGLang: slower, never a wrong page, never an exception into SGLang.

A record is dropped when SGLang frees its slot or backs a device page up into it (the adapters wrap ``free`` and the
backup), and a recorded slot is decoded on the host before anything else reads it: ``get_data_page`` and
``get_page_buffer_meta`` (wrapped here), kvdrive's own backup of it to storage (``batch_set_v1`` calls
:meth:`LazySlots.materialize`).

Only on a CUDA device (``check_device``: the launcher refuses the flag elsewhere, in one line). Tests run the same
path on CPU through :func:`cpu_test_hook` (there ``load_compressed`` runs its torch references).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .tier.codecs import decode_page, peek_header
from .tier.errors import CodecError, ConfigError
from .tier.namespace import Namespace, key_bytes
from .tier.parallel import parallel_for

log = logging.getLogger("kvdrive.sglang")

LAZY_CODECS = frozenset({"bplane", "int8", "fp8"})  # what the device decodes; zstd crosses PCIe raw, so no gain
_TRANSFERS_KEPT = 8  # transfers in flight whose filtered indices are remembered (one per host pool in practice)

_cpu_hook = False  # set only by cpu_test_hook


@contextlib.contextmanager
def cpu_test_hook():
    """Test-only: allow ``--kvdrive-gpu-decompress`` without CUDA, so CI runs the recording and load path on CPU
    (``load_compressed`` runs its torch references there). Never for a server: a CPU has no copy to save."""
    global _cpu_hook
    before, _cpu_hook = _cpu_hook, True
    try:
        yield
    finally:
        _cpu_hook = before


def device_supported() -> bool:
    return _cpu_hook or torch.cuda.is_available()


def check_device(what: str) -> None:
    """ConfigError (one line) where the flag cannot apply: no CUDA device."""
    if not device_supported():
        raise ConfigError(
            f"{what} needs a CUDA device (pages are decoded by a GPU kernel next to the host-to-device copy); "
            "this machine has none: remove the flag"
        )


def encoded_blobs(engine, ns: Namespace, keys: Sequence) -> list | None:
    """Each key's stored page as its encoded blob, for the device to decode: the DRAM tier's blob, else the write-down
    queue's, else the disk's (``DiskStore.read_blobs``: checksum, trailer and header verified, opened if sealed);
    None for a page that is staged (not encoded yet), held only by a mirror or a remote tier, or missing (the caller
    reads those through ``get_many``). None for the whole call where the engine cannot hand blobs out safely:
    encryption at rest (``get_many`` erases a tenant whose key went first), or an engine without these tiers.

    TierEngine has no method for this; a ``get_blobs(ns, keys)`` there would also count these hits in its stats."""
    pool, queue = getattr(engine, "pool", None), getattr(engine, "writedown", None)
    staging = getattr(engine, "_staging", None)
    if pool is None or queue is None or staging is None or getattr(engine, "keyring", None) is not None:
        return None
    out: list = [None] * len(keys)
    rest = []
    for i, k in enumerate(keys):
        pk = (ns.id, key_bytes(k))
        if staging.get(pk) is not None:  # newer than any blob below it: get_many copies it
            continue
        blob = pool.get(pk)
        if blob is None:
            blob = queue.queued_blob(pk)
        if blob is None:
            rest.append(i)
        else:
            out[i] = blob
    disk = getattr(engine, "disk", None)
    if rest and disk is not None:
        for i, got in zip(rest, disk.read_blobs(ns, [keys[i] for i in rest])):
            if got is not None:
                out[i] = got[0]
    return out


class Geometry(NamedTuple):
    """The device pool a host pool's pages load into: its per-layer buffers in the flat page's layer order."""

    layers: list  # device tensors, [slots, *inner] each
    page_size: int
    dtype_name: str  # kvdrive's name of the pool's dtype ("bfloat16", ...)


class GetResult(NamedTuple):
    got: list  # per key: a hit (decoded into its slot, or recorded)
    lazy: dict  # key index -> blob: pages to record, not decoded


class LazySlots:
    """Host slots whose page is held as a checked blob, not decoded (see the module docstring); one per KV host
    pool. Thread-safe: SGLang's prefetch thread records, its scheduler loads and frees, its backup thread reads."""

    def __init__(self, pages, geometry: Geometry):
        self.pages = pages  # kvdrive_sglang.host_pages.HostPages of the pool
        self.geo = geometry
        self.page_size = int(geometry.page_size)
        self._records: dict[int, object] = {}  # host page start -> blob
        # held across a materialize's decode, so no reader finds the record gone before the slot holds the page
        self._lock = threading.Lock()
        self._transfers: OrderedDict[int, tuple] = OrderedDict()  # id(host_indices) -> (it, host idx, device idx)
        self.counts = Counter()

    # --- the prefetch ------------------------------------------------------------------------------------------
    def get(self, engine, groups, keys, outs, host_get: Callable[[list, list], list]) -> GetResult:
        """Pages for ``keys``: recordable ones as their blobs, every other hit decoded into ``outs`` (the slots).
        ``groups``: (namespace, key positions) per tenant; ``host_get(keys, outs)``: the host path (get_many)."""
        from .kernels.compressed_load import check_blob

        got = [False] * len(keys)
        lazy: dict[int, object] = {}
        decode: list[tuple[int, object, str]] = []
        fallback: list[int] = []
        for ns, idx in groups:
            blobs = encoded_blobs(engine, ns, [keys[i] for i in idx])
            if blobs is None:
                fallback.extend(idx)
                continue
            for i, blob in zip(idx, blobs):
                if blob is None:
                    fallback.append(i)
                elif self._recordable(blob, check_blob):
                    lazy[i] = blob
                else:  # another codec, or a blob the device load would miss: the host decodes it (a miss if bad)
                    decode.append((i, blob, ns.kv_dtype))
        if decode:

            def one(j: int) -> None:
                i, blob, dtype = decode[j]
                try:
                    decode_page(blob, outs[i], dtype)
                    got[i] = True
                except CodecError as e:
                    log.debug("kvdrive: gpu-decompress: page %r not decodable on the host either: %s", keys[i], e)

            parallel_for(one, len(decode), max_threads=getattr(engine, "decode_threads", None))
        if fallback:
            for i, g in zip(fallback, host_get([keys[i] for i in fallback], [outs[i] for i in fallback])):
                got[i] = g
        for i in lazy:
            got[i] = True
        self.counts["host_decoded"] += sum(got[i] for i, _, _ in decode) + sum(got[i] for i in fallback)
        self.counts["check_failed"] += sum(1 for i, _, _ in decode if not got[i])
        return GetResult(got, lazy)

    def _recordable(self, blob, check_blob) -> bool:
        try:
            if peek_header(blob).codec_name not in LAZY_CODECS:
                return False
        except (CodecError, KeyError):
            return False
        try:
            reason = check_blob(blob, self.geo.layers, self.page_size, checksum=None)
        except Exception as e:  # noqa: BLE001 - a check that cannot run is a host decode, never an error
            log.debug("kvdrive: gpu-decompress: check_blob failed: %s", e)
            return False
        if reason is not None:
            self.counts[f"check_{reason.value}"] += 1
        return reason is None

    def settle(self, starts: Sequence[int], n: int, lazy: dict) -> None:
        """After a prefetch into ``starts`` of which the leading ``n`` pages are reported: record those of them in
        ``lazy`` and drop any record of the others (a slot written on the host holds its own bytes now)."""
        with self._lock:
            for s in starts:
                self._records.pop(int(s), None)
            for i, blob in lazy.items():
                if i < n:
                    self._records[int(starts[i])] = blob
        self.counts["recorded"] += sum(1 for i in lazy if i < n)

    # --- slots freed, overwritten, read ----------------------------------------------------------------------
    def forget(self, host_indices) -> None:
        """SGLang frees these host slots, or backs device pages up into them: their records go."""
        if not self._records:
            return
        starts = self._starts_of(host_indices)
        with self._lock:
            for s in starts:
                self._records.pop(s, None)

    def materialize(self, starts: Sequence[int]) -> int:
        """Decode the recorded pages among ``starts`` into their slots on the host (before something reads them);
        their records go. Returns how many were decoded."""
        if not self._records:
            return 0
        with self._lock:
            todo = [(int(s), self._records.pop(int(s))) for s in dict.fromkeys(starts) if int(s) in self._records]
            if not todo:
                return 0
            landing = self.pages.landing([s for s, _ in todo])
            ok = 0
            for (s, blob), out in zip(todo, landing.outs):
                try:
                    decode_page(blob, out, self.geo.dtype_name)
                    ok += 1
                except CodecError as e:  # checked at record time: only a bug gets here; say so loudly
                    log.error("kvdrive: gpu-decompress: recorded page at host slot %d does not decode: %s", s, e)
            landing.land(len(todo))
        self.counts["materialized"] += ok
        return ok

    def materialize_indices(self, host_indices) -> int:
        return self.materialize(self._starts_of(host_indices)) if self._records else 0

    def recorded(self, start: int) -> bool:
        return int(start) in self._records

    def _starts_of(self, host_indices) -> list[int]:
        if isinstance(host_indices, torch.Tensor):
            hi = host_indices.detach().to("cpu", torch.int64).reshape(-1).numpy()
        else:
            hi = np.asarray(host_indices, dtype=np.int64).reshape(-1)
        return np.unique(hi - hi % self.page_size).tolist()

    # --- the load ----------------------------------------------------------------------------------------------
    def before_load(self, host_indices, device_indices, layer_id: int, is_draft: bool = False):
        """SGLang is about to copy ``host_indices`` -> ``device_indices`` for one layer: the indices its own copy
        should take (all of them where nothing is recorded). At a transfer's first call the recorded pages are
        loaded compressed, all layers at once; later layers of the same transfer reuse that answer."""
        key = id(host_indices)
        entry = self._transfers.get(key)
        if entry is not None and entry[0] is host_indices and (layer_id != 0 or is_draft):
            return entry[1], entry[2]
        if not self._records:
            return host_indices, device_indices
        rest = self._load_recorded(host_indices, device_indices)
        self._transfers[key] = (host_indices, *rest)  # a strong reference: the id cannot be reused meanwhile
        self._transfers.move_to_end(key)
        while len(self._transfers) > _TRANSFERS_KEPT:
            self._transfers.popitem(last=False)
        return rest

    def _load_recorded(self, host_indices, device_indices):
        from .kernels.compressed_load import load_compressed

        ps = self.page_size
        hi = host_indices.detach().to("cpu", torch.int64).reshape(-1).numpy()
        starts = hi - hi % ps
        with self._lock:
            blobs = {s: self._records[s] for s in np.unique(starts).tolist() if s in self._records}
        if not blobs:
            return host_indices, device_indices
        di = device_indices.detach().to("cpu", torch.int64).reshape(-1).numpy()
        pages, page_ids, host_decode = [], [], []
        skip = np.zeros(hi.size, dtype=bool)
        for s in blobs:
            pos = np.flatnonzero(starts == s)
            base = di[pos] - (hi[pos] - s)
            # one whole device page, token j of the host page to token j of it: load_compressed writes whole pages
            whole = pos.size == ps and base[0] % ps == 0 and (base == base[0]).all() and np.unique(hi[pos]).size == ps
            if whole:
                pages.append((s, pos))
                page_ids.append(int(base[0]) // ps)
            else:
                host_decode.append(s)
        if pages:
            try:
                res = load_compressed([blobs[s] for s, _ in pages], self.geo.layers, page_ids, ps, checksums=None)
                ok = res.ok
            except Exception as e:  # noqa: BLE001 - device memory, a kernel: the host decodes them, SGLang copies
                log.warning("kvdrive: gpu-decompress: load_compressed failed (%s); decoding on the host", e)
                self.counts["load_errors"] += 1
                ok = (False,) * len(pages)
            for (s, pos), good in zip(pages, ok):
                if good:
                    skip[pos] = True
                else:
                    host_decode.append(s)
            self.counts["loaded_compressed"] += sum(ok)
        if host_decode:
            self.counts["load_fallback"] += len(host_decode)
            self.materialize(host_decode)
        if not skip.any():
            return host_indices, device_indices
        keep = torch.from_numpy(np.flatnonzero(~skip))
        return (
            host_indices.index_select(0, keep.to(host_indices.device)),
            device_indices.index_select(0, keep.to(device_indices.device)),
        )

    def stats(self) -> dict:
        return {"recorded_now": len(self._records), **self.counts}


def wrap_readers(host, lazy: LazySlots) -> None:
    """Decode recorded slots on the host before SGLang's own host-side reads of them (``get_data_page``: its storage
    backends' per-page copy; ``get_page_buffer_meta``: zero-copy backends' pointers)."""
    get_data_page = host.get_data_page

    def get_data_page_lazy(index, flat: bool = True):
        lazy.materialize([int(index) - int(index) % lazy.page_size])
        return get_data_page(index, flat=flat)

    host.get_data_page = get_data_page_lazy
    meta = getattr(host, "get_page_buffer_meta", None)
    if meta is not None:

        def get_page_buffer_meta_lazy(indices, *a, **k):
            lazy.materialize_indices(indices)
            return meta(indices, *a, **k)

        host.get_page_buffer_meta = get_page_buffer_meta_lazy
    free = host.free

    def free_lazy(indices, *a, **k):
        lazy.forget(indices)
        return free(indices, *a, **k)

    host.free = free_lazy


def setup(host, pages, settings_on: bool, *, codec: str | None = None) -> LazySlots | None:
    """The LazySlots for the KV host pool ``host`` when the flag is on and the pool allows it (a layout whose flat
    page is the device layers' pages in order: layer_first; a pool kind kvdrive knows; device buffers that match),
    with SGLang's calls on the pool wrapped; None otherwise (said in one log line)."""
    if not settings_on:
        return None
    from .compat import radix_adapter
    from .compat.host_pools import device_layers
    from .storage_backend import kv_dtype_name

    why = None
    if not device_supported():
        why = "no CUDA device"
    elif getattr(host, "layout", None) != "layer_first":
        why = f"host layout {getattr(host, 'layout', None)!r} (the device decode writes layer_first pages)"
    layers = None if why else device_layers(host)
    if why is None and layers is None:
        why = f"{type(host).__name__}: its device buffers are not one per layer of its flat page"
    if why is None:
        elems = sum(int(t[0].numel()) for t in layers) * int(host.page_size)
        if elems != pages.page_numel or any(t.dtype != host.dtype for t in layers):
            why = f"{type(host).__name__}: device buffers ({elems} elements a page) do not match its pages"
    wrap = getattr(radix_adapter(), "wrap_host_transfers", None)
    if why is None and wrap is None:
        why = "this SGLang generation's adapter has no load wrapper"
    if why is not None:
        log.warning("kvdrive: --kvdrive-gpu-decompress is off for this pool: %s; pages decode on the host", why)
        return None
    lazy = LazySlots(pages, Geometry(layers, int(host.page_size), kv_dtype_name(host.dtype)))
    wrap_readers(host, lazy)
    wrap(host, lazy)
    log.info(
        "kvdrive: --kvdrive-gpu-decompress: %s pages (%s) load compressed to %s",
        "/".join(sorted(LAZY_CODECS)),
        type(host).__name__,
        layers[0].device,
    )
    if codec is not None and codec not in LAZY_CODECS:
        log.warning(
            "kvdrive: --kvdrive-gpu-decompress with DRAM codec %s: only pages stored as %s load compressed "
            "(--kvdrive-codec bplane for lossless bf16/fp16 KV)",
            codec,
            "/".join(sorted(LAZY_CODECS)),
        )
    return lazy
