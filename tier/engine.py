"""TierEngine: the compressed DRAM pool over the disk store, behind one batched page API.

    put_many   encode (codec per page, recorded in its header) -> DRAM pool; with write_through also queued for disk
    stage_many put_many acknowledged after a cheap copy: raw pages staged, encoded by encoder threads (tier/staging.py)
    get_many   DRAM pool (decode into the caller's buffer) -> disk store (checksum-verified, decoded in place); a
               batch's decodes (and put_many's encodes) are split across the cores (tier/parallel.py)
    exists_many  leading hits across both tiers, the way SGLang's storage API counts them

Pages leaving the pool, and write-through copies, go to a bounded write-down queue that one writer thread drains to
disk in large batches (group commit). Queued pages stay readable until they are on disk. When the queue is full a
write-down is dropped and counted, never blocking the caller. ``close()`` writes down everything not yet on disk, so a
clean restart serves all of it; after a crash, only what reached the disk (its index commit) is served.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from . import clock, codec_choice
from .buffers import byte_view
from .codec_choice import CodecChoice
from .codecs import decode_page, encode_page, get_codec, peek_header
from .crypto import KeyRing
from .disk_store import DiskStats, DiskStore, DiskStoreConfig
from .dram_pool import DramPool, DramPoolStats, PoolKey
from .engine_config import MIRROR_MODES, WRITE_POLICIES, TierConfig
from .errors import CodecError, ConfigError
from .namespace import Namespace, key_bytes
from .parallel import parallel_for, threads_for
from .read_runs import dest_of
from .replica_mirror import ReplicaMirror
from .staging import StagedPage, StagingArea
from .tenants import Tenants
from .tiers import Tier
from .writedown import QueuedPage, WriteDown

# Re-exported: importers of kvdrive_sglang.tier.engine keep getting the settings and the queue's item type from here
__all__ = ["MIRROR_MODES", "WRITE_POLICIES", "Promotion", "QueuedPage", "TierConfig", "TierEngine", "TierStats"]

log = logging.getLogger("kvdrive.tier")


class TierStats(NamedTuple):
    """Figures of every tier the engine holds pages in (``Tier.STAGED``, ``DRAM``, ``QUEUED``, ``DISK``). Built by
    keyword (``TierEngine.stats``)."""

    dram: DramPoolStats  # kvdrive's compressed DRAM pool (Tier.DRAM), not SGLang's host pool
    disk: DiskStats | None
    writedown_queued_bytes: int
    writedown_dropped: int
    hits_dram: int  # get_many hits served from the DRAM pool (the replica mirror's included)
    hits_queued: int
    hits_disk: int
    misses: int
    encode_s: float
    decode_s: float  # get_many's in-memory part (DRAM pool and queue lookups and decodes)
    disk_get_s: float  # get_many's disk part (index lookups, reads, checksums, decodes)
    disk_get_pages: int  # pages asked of the disk by get_many (hits and misses)
    not_admitted: int  # selective: pages stored in DRAM only (not worth a disk write when stored)
    not_admitted_dropped: int  # selective: of those, pages that left the DRAM pool unadmitted, the disk busy or full
    unkeyed_refused: int = 0  # encryption on: pages not cached because their tenant has no key
    erased: int = 0  # encryption on: in-memory pages dropped because their tenant's key was deleted
    promoted: int = 0  # pages brought up from disk into the DRAM pool ahead of demand (promote)
    promote_below_floor: int = 0  # promote candidates left on disk: worth less than what the full pool holds
    hits_staged: int = 0  # get_many hits served from staged raw pages (not yet encoded)
    staged_bytes: int = 0  # raw bytes staged now (stage_many), waiting for the encoder threads
    staging_refused: int = 0  # pages stage_many refused: the staging area was full
    mirror: dict | None = None  # the replica mirror's counts (published, dropped, hits, queued); None: no mirror
    dram_corrupt_dropped: int = 0  # in-memory pages that failed to decode: dropped and served as misses (I8)
    not_admitted_spilled: int = 0  # selective: pages that left the DRAM pool unadmitted, written on spare bandwidth


class Promotion(NamedTuple):
    """What one ``TierEngine.promote`` call did with its candidates."""

    promoted: int  # brought up into the DRAM pool
    below_floor: int  # left on disk: worth less than what the full pool would evict for them
    not_on_disk: int  # already in memory, or not (no longer) on disk


class TierEngine:
    def __init__(self, config: TierConfig):
        self.config = config
        # raw or zstd per tier, chosen by measuring this machine unless pinned (tier/codec_choice.py, issue 18): the
        # DRAM tier's codec here, the disk's in the write-down (which re-encodes lossless pages to it)
        self.codec_choice = codec_choice.for_config(config)
        self.codec = get_codec(self.codec_choice.dram)
        self.tenants = Tenants(config.tenants)
        # With encryption at rest, a tenant's pages are cached (in any tier) only while its key is held.
        try:
            self.keyring = KeyRing(config.encrypt) if config.encrypt is not None else None
        except ConfigError as e:  # say which setting the key file came from (fuzzing found "key file ./0: ...")
            raise ConfigError(f"tier encrypt: {e}") from None
        self._warned_unkeyed: set[str] = set()
        # threads a batch's decodes and encodes may use, the caller's included (issue 18; 0: every usable core)
        self.decode_threads = threads_for(config.decode_threads)
        self.disk: DiskStore | None = None
        if config.path is not None:
            self.disk = DiskStore(
                DiskStoreConfig(
                    path=config.path,
                    capacity_bytes=config.disk_bytes,
                    default_ttl_s=config.default_ttl_s,
                    **config.disk,
                ),
                keyring=self.keyring,
            )
            self.disk.decode_threads = self.decode_threads
        # the write-down queue and its writer thread (tier/writedown.py): pages on their way to the disk, readable
        # until their batch commits (I9)
        self.writedown = WriteDown(
            self.disk,
            queue_bytes=config.writedown_queue_bytes,
            # the disk refuses a batch over a quarter of its capacity whole (compaction.make_room): a small disk
            # (--kvdrive-disk-gb 0.05 under the 16 MiB default) lost every batch, counted rejected_full (found by
            # tests/tier/test_engine.py::test_selective_write_down_keeps_unadmitted_pages_off_a_full_disk)
            batch_bytes=min(config.writedown_batch_bytes, max(1, config.disk_bytes // 8)),
            maintain_interval_s=config.maintain_interval_s,
            selective=config.write_policy == "selective",
            admitted=self._admitted,
            maintain=self.maintain,
            disk_codec=self.codec_choice.writedown_codec,
        )
        self.pool = DramPool(config.host_bytes, self.writedown.demote)
        self.mirror = (
            None
            if config.mirror == "off"
            else ReplicaMirror.open(
                config.path,
                config.host_bytes,
                self.keyring,
                publisher=config.mirror == "publish",
                root=config.mirror_root,
            )
        )
        self._counts = Counter()
        self._times = Counter()
        # selective write-down: (namespace, key bytes) -> worth a disk write? Set by the owner (kvdrive's SGLang
        # backend: the promoter's admission). None admits everything.
        self.admit = None
        # on_written_down(ns, keys, blobs): called on the writer thread with each batch of encoded pages that landed
        # on disk (the remote tier's write-behind takes them from here); must not block. None: no hook
        self.on_written_down = None
        self.writedown.on_written = self._written_down
        self._warned_codec: set[str] = set()
        self._closed = False
        self._executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="kvdrive-io")
        self._staging = StagingArea(
            config.staging_bytes,
            config.encode_threads if config.staging_bytes else 0,
            self._encode_staged,
            self._land_staged,
        )
        self.writedown.start(self.pool)

    # --- page API --------------------------------------------------------------------------------------------
    def put_many(
        self, ns: Namespace, keys: Sequence, pages: Sequence, *, scores: Sequence[float] | None = None
    ) -> list[bool]:
        """Store pages (caller buffers are copied/encoded before this returns). True for each page now held."""
        if len(keys) != len(pages) or (scores is not None and len(scores) != len(keys)):
            raise ConfigError(f"put_many got {len(keys)} keys and {len(pages)} pages; they must match")
        if not self._keyed(ns, len(keys)):
            return [False] * len(keys)
        codec = self._codec_for(ns)
        ttl = self.tenants.ttl_s(ns.tenant, self.config.default_ttl_s)
        expires = clock.expires_at_ms(ttl)
        t0 = time.perf_counter()
        blobs: list = [None] * len(pages)

        def encode(i: int) -> None:  # on the worker pool
            blobs[i] = encode_page(pages[i], ns.kv_dtype, codec, ns.head_dim)

        parallel_for(encode, len(pages), weights=[_nbytes(p) for p in pages], max_threads=self.decode_threads)
        self._times["encode_s"] += time.perf_counter() - t0
        ok = []
        for i, (k, blob) in enumerate(zip(keys, blobs)):
            score = float(scores[i]) if scores is not None else 0.0
            ok.append(self._store_blob((ns.id, key_bytes(k)), ns, blob, score, expires))
        return ok

    def stage_many(
        self, ns: Namespace, keys: Sequence, pages: Sequence, *, scores: Sequence[float] | None = None
    ) -> list[bool]:
        """put_many acknowledged after a cheap copy (kvdrive issue 15): takes ownership of ``pages``, which must be
        copies the caller never changes or reuses, and returns at once; encoder threads encode them into the tiers
        exactly as put_many does (admission, TTL from now, tenant keys, scores). A staged page is already served by
        get_many (its raw bytes), exists_many and tiers_of ("staged"); flush() waits for it, clear() drops it.

        True for each page staged. False: not stored -- the staging area (``staging_bytes``) is full (counted in
        ``staging_refused``; this never waits for room), or the tenant has no key. Like a DRAM page, a staged page may
        still find no room when it lands (counted where put_many's would be). With ``staging_bytes`` 0 this is
        put_many. The caller's errors (page size) raise here, as put_many raises them."""
        if not self.config.staging_bytes:
            return self.put_many(ns, keys, pages, scores=scores)
        if len(keys) != len(pages) or (scores is not None and len(scores) != len(keys)):
            raise ConfigError(f"stage_many got {len(keys)} keys and {len(pages)} pages; they must match")
        if not self._keyed(ns, len(keys)):
            return [False] * len(keys)
        codec = self._codec_for(ns)
        ttl = self.tenants.ttl_s(ns.tenant, self.config.default_ttl_s)
        expires = clock.expires_at_ms(ttl)
        items = []
        for i, (k, page) in enumerate(zip(keys, pages)):
            data = byte_view(page)
            codec._check(data.size, ns.kv_dtype, ns.head_dim)  # the checks encode_page makes, on this thread
            score = float(scores[i]) if scores is not None else 0.0
            items.append(((ns.id, key_bytes(k)), StagedPage(ns, data, page, score, expires)))
        return self._staging.add(items)

    def get_many(self, ns: Namespace, keys: Sequence, outs: Sequence) -> list[bool]:
        """Fill the caller's buffers. False is a miss (that buffer is then undefined)."""
        if len(keys) != len(outs):
            raise ConfigError(f"get_many got {len(keys)} keys and {len(outs)} buffers; they must match")
        self._refresh_keys()
        result = [False] * len(keys)
        rest = []
        staged: list[tuple[int, StagedPage]] = []
        blobs: list[tuple[int, bytes]] = []
        hits = Counter()
        t0 = time.perf_counter()
        for i, k in enumerate(keys):
            pk = (ns.id, key_bytes(k))
            # staged first: a page moves staged -> pool -> queue -> disk, so looking in that order never misses one
            # that moves meanwhile
            item = self._staging.get(pk)
            if item is not None:
                staged.append((i, item))
                continue
            blob = self.pool.get(pk)
            where = "hits_dram"
            if blob is None:
                blob = self.writedown.queued_blob(pk)
                where = "hits_queued"
            if blob is None:
                rest.append(i)
                continue
            blobs.append((i, blob))
            hits[where] += 1
        staged_s = 0.0
        if staged:  # a copy, not a decode: timed apart from decode_s (the dram cost the promoter calibrates on)
            t1 = time.perf_counter()
            parallel_for(
                lambda j: self._copy_staged(staged[j][1], outs[staged[j][0]], keys[staged[j][0]]),
                len(staged),
                weights=[item.data.nbytes for _, item in staged],
                max_threads=self.decode_threads,
            )
            staged_s = time.perf_counter() - t1
        if blobs:
            damaged: list[int] = []  # list.append is atomic: the workers share it

            def decode(j: int) -> None:  # on the worker pool
                i, blob = blobs[j]
                try:
                    decode_page(blob, outs[i], ns.kv_dtype)
                except CodecError as e:
                    if _fits(blob, outs[i]):
                        damaged.append(j)  # the page's own bytes are bad: a miss, dropped (I8), never a raise
                        return
                    # wrong-size buffer etc.: the caller's mistake, reported as such rather than as a miss
                    raise CodecError(f"page {keys[i]!r}: {e}") from None

            weights = [_decoded_nbytes(b) for _, b in blobs]  # the work is in the decoded bytes
            parallel_for(decode, len(blobs), weights=weights, max_threads=self.decode_threads)
            if damaged:
                self._drop_damaged(ns, [keys[blobs[j][0]] for j in damaged])
                bad = set(damaged)
                blobs = [b for j, b in enumerate(blobs) if j not in bad]
        for i, _ in staged:
            result[i] = True
        for i, _ in blobs:
            result[i] = True
        self._counts["hits_staged"] += len(staged)
        self._counts.update(hits)
        self._times["decode_s"] += time.perf_counter() - t0 - staged_s
        if rest and self.mirror is not None:  # the writing rank's DRAM tier, for a rank holding the same KV
            got = self.mirror.get_many(ns, [keys[i] for i in rest], [outs[i] for i in rest])
            for i, g in zip(rest, got):
                result[i] = g
            self._counts["hits_dram"] += sum(got)
            rest = [i for i, g in zip(rest, got) if not g]
        if rest and self.disk is not None:
            t1 = time.perf_counter()
            got = self.disk.get_many(ns, [keys[i] for i in rest], [outs[i] for i in rest])
            self._times["disk_get_s"] += time.perf_counter() - t1
            self._counts["disk_get_pages"] += len(rest)
            for i, g in zip(rest, got):
                result[i] = g
            self._counts["hits_disk"] += sum(got)
        self._counts["misses"] += len(keys) - sum(result)
        return result

    def exists_many(self, ns: Namespace, keys: Sequence) -> int:
        """Leading keys held in any tier (a prefix stops at its first miss)."""
        self._refresh_keys()
        nid = ns.id

        def held(k) -> bool:
            pk = (nid, key_bytes(k))
            return (
                self._staging.get(pk) is not None
                or self.pool.contains(pk)
                or self.writedown.queued_blob(pk) is not None
            )

        n = 0
        for k in keys:  # the DRAM tiers first: no index lookups for a prefix held in memory
            if not held(k):
                break
            n += 1
        if n < len(keys) and self.mirror is not None:
            mirrored = self.mirror.held(ns, keys[n:])
            in_memory = held

            def held(k) -> bool:  # noqa: F811 - the memory tiers, the mirror included
                return in_memory(k) or key_bytes(k) in mirrored

            while n < len(keys) and held(keys[n]):
                n += 1
        if n == len(keys) or self.disk is None:
            return n
        return n + self.disk.exists_many(ns, keys[n:], held=held)

    def tiers_of(self, ns: Namespace, keys: Sequence) -> list[Tier | None]:
        """Where each page would be read from: ``Tier.STAGED`` (raw, not yet encoded: stage_many), ``DRAM``, ``QUEUED``
        (waiting for the disk, in memory), ``DISK`` or None. Tiers equal their strings ("staged", "dram", ...)."""
        self._refresh_keys()
        nid = ns.id
        out: list[Tier | None] = []
        for k in keys:
            pk = (nid, key_bytes(k))
            out.append(
                Tier.STAGED
                if self._staging.get(pk) is not None
                else Tier.DRAM
                if self.pool.contains(pk)
                else Tier.QUEUED
                if self.writedown.queued_blob(pk) is not None
                else None
            )
        missing = [i for i, t in enumerate(out) if t is None]
        if missing and self.mirror is not None:  # shared memory: read like the DRAM tier
            mirrored = self.mirror.held(ns, [keys[i] for i in missing])
            for i in missing:
                if key_bytes(keys[i]) in mirrored:
                    out[i] = Tier.DRAM
            missing = [i for i, t in enumerate(out) if t is None]
        if missing and self.disk is not None:
            for i, on_disk in zip(missing, self.disk.contains(ns, [keys[i] for i in missing])):
                if on_disk:
                    out[i] = Tier.DISK
        return out

    def submit_get_many(self, ns, keys, outs) -> Future:
        """get_many on the I/O threads; keep ``outs`` alive and untouched until the future is done."""
        return self._executor.submit(self.get_many, ns, keys, outs)

    def submit_put_many(self, ns, keys, pages, *, scores=None) -> Future:
        """put_many on the I/O threads; keep ``pages`` unchanged until the future is done."""
        return self._executor.submit(self.put_many, ns, keys, pages, scores=scores)

    def write_down(self, ns: Namespace, keys: Sequence) -> int:
        """Queue for the disk the pages among ``keys`` that sit in the DRAM pool but not yet on disk (selective
        write-down: pages admitted after they were stored). Never blocks; returns how many were queued."""
        if self.disk is None:
            return 0
        n = 0
        for k in keys:
            pk = (ns.id, key_bytes(k))
            e = self.pool.peek(pk)
            if e is not None and not e.on_disk and pk not in self.writedown:
                n += self.writedown.enqueue(pk, e.ns, e.blob, e.score, e.expires_ms)
        return n

    def promote(self, ns: Namespace, keys: Sequence, scores: Sequence[float] | None = None) -> Promotion:
        """Bring pages that sit only on disk up into the DRAM pool ahead of demand (the promoter's prefetch: a
        later reload then costs a decode, not a disk read). Blobs move as stored (no decode, no re-encode) with
        their expiry, and stay marked as on disk (never written again). With ``scores``, a page is brought up only
        if it outranks what the pool would evict to make room for it."""
        if scores is not None and len(scores) != len(keys):
            raise ConfigError(f"promote got {len(keys)} keys and {len(scores)} scores; they must match")
        if self.disk is None or not self.config.host_bytes or not keys:
            return Promotion(0, 0, len(keys))
        self._refresh_keys()
        pks = [(ns.id, key_bytes(k)) for k in keys]
        todo = [
            i
            for i, pk in enumerate(pks)
            if not self.pool.contains(pk) and self.writedown.queued_blob(pk) is None and self._staging.get(pk) is None
        ]
        below = 0
        if scores is not None and todo:
            floor = self.pool.eviction_floor()
            if floor is not None:
                keep = [i for i in todo if scores[i] > floor]
                below, todo = len(todo) - len(keep), keep
        n = 0
        for i, got in zip(todo, self.disk.read_blobs(ns, [keys[i] for i in todo]) if todo else ()):
            if got is None:
                continue
            blob, expires_ms = bytes(got[0]), got[1]
            score = float(scores[i]) if scores is not None else 0.0
            n += self.pool.put(
                pks[i], blob, peek_header(blob).raw_nbytes, ns=ns, score=score, on_disk=True, expires_ms=expires_ms
            )
        self._counts["promoted"] += n
        self._counts["promote_below_floor"] += below
        return Promotion(n, below, len(keys) - n - below)

    def set_scores(self, ns: Namespace, keys: Sequence, scores: Sequence[float]) -> None:
        """The promoter's value for pages; the lowest go first in both tiers."""
        for k, s in zip(keys, scores):
            pk = (ns.id, key_bytes(k))
            self._staging.set_score(pk, s)  # lands with it
            self.pool.set_score(pk, s)
        if self.disk is not None:
            self.disk.set_scores(ns, keys, scores)

    def clear(self, ns: Namespace | None = None) -> None:
        nid = ns.id if ns is not None else None
        # staged pages first: once dropped they never land (StagingArea.drop_where), so none reaches the pool, the
        # queue or the disk after they were cleared (test_clear_drops_staged_pages_even_mid_encode)
        self._staging.drop_where(lambda pk, item: nid is None or pk[0] == nid)
        self.pool.clear(nid)
        self.writedown.drop_where(lambda pk, item: nid is None or pk[0] == nid)
        if self.mirror is not None:
            self.mirror.clear(nid)
        if self.disk is not None:
            self.disk.clear(nid)

    def flush(self, timeout: float | None = None) -> bool:
        """Encode everything staged, then write down everything queued; with write_back also every pool page not yet
        on disk. True when done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._staging.wait_empty(deadline):
            return False
        if self.disk is None:
            return True
        for pk, e in self.pool.entries_not_on_disk():
            if not e.expired():
                self.writedown.enqueue(pk, e.ns, e.blob, e.score, e.expires_ms, block=True)
        return self.writedown.wait_written(deadline)

    def get_note(self, name: str) -> bytes | None:
        """A small value kept with the disk store (None without one, or when never set)."""
        return self.disk.get_note(name) if self.disk is not None else None

    def put_note(self, name: str, value: bytes) -> bool:
        return self.disk.put_note(name, value) if self.disk is not None else False

    def maintain(self) -> None:
        self.pool.expire()
        if self.disk is not None:
            self.disk.maintain()

    def stats(self) -> TierStats:
        c, t, w = self._counts, self._times, self.writedown.counts
        st = self._staging.stats()
        return TierStats(
            dram=self.pool.stats(),
            disk=self.disk.stats() if self.disk else None,
            writedown_queued_bytes=self.writedown.queued_bytes,
            writedown_dropped=w["writedown_dropped"],
            hits_dram=c["hits_dram"],
            hits_queued=c["hits_queued"],
            hits_disk=c["hits_disk"],
            misses=c["misses"],
            encode_s=t["encode_s"] + st.encode_s,
            decode_s=t["decode_s"],
            disk_get_s=t["disk_get_s"],
            disk_get_pages=c["disk_get_pages"],
            not_admitted=c["not_admitted"],
            not_admitted_dropped=w["not_admitted_dropped"],
            not_admitted_spilled=w["not_admitted_spilled"],
            unkeyed_refused=c["unkeyed_refused"],
            erased=c["erased"],
            promoted=c["promoted"],
            promote_below_floor=c["promote_below_floor"],
            hits_staged=c["hits_staged"],
            staged_bytes=st.bytes,
            staging_refused=st.refused,
            mirror=self.mirror.stats() if self.mirror is not None else None,
            dram_corrupt_dropped=c["dram_corrupt_dropped"],
        )

    def close(self, timeout: float = 120.0) -> None:
        """Encode what is staged (waiting at most ``timeout`` seconds), then write down what is queued (as long
        again), then stop; what could not be finished is dropped (logged), never waited for."""
        if self._closed:
            return
        self._staging.wait_empty(time.monotonic() + timeout)
        dropped = self._staging.close()  # nothing staged lands after this (test_close_with_held_encoders_...)
        if dropped:
            log.warning("kvdrive: %d staged page(s) could not be encoded before close; dropped", dropped)
        if self.disk is not None and not self.flush(timeout=timeout):
            log.warning(
                "kvdrive: %d bytes of pages could not be written down before close", self.writedown.queued_bytes
            )
        self._closed = True
        self.writedown.stop(timeout=30)
        self._executor.shutdown(wait=True)
        if self.mirror is not None:
            self.mirror.close()
        if self.disk is not None:
            self.disk.close()
        # Free the DRAM tier now: the pool's demote callback points back at this engine (through the write-down's
        # admission and upkeep callbacks), so a closed engine would otherwise hold up to host_bytes until a full
        # cyclic GC (found by bench/stress/soak.py's reopens).
        self.pool.clear()
        self.writedown.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- internals ---------------------------------------------------------------------------------------------
    def _drop_damaged(self, ns: Namespace, keys: list) -> None:
        """Pages whose in-memory blob failed to decode: out of the DRAM pool (a later lookup is a clean miss), counted,
        logged once. A queued copy leaves the queue when its batch commits; the disk verifies its own copy."""
        for k in keys:
            self.pool.discard((ns.id, key_bytes(k)))
        self._counts["dram_corrupt_dropped"] += len(keys)
        if self._counts["dram_corrupt_dropped"] == len(keys):
            log.warning(
                "kvdrive: %d page(s) in the DRAM tier failed to decode (memory damage?): dropped, served as misses; "
                "further ones are counted in dram_corrupt_dropped",
                len(keys),
            )

    def _written_down(self, ns: Namespace, keys: list, blobs: list) -> None:
        hook = self.on_written_down
        if hook is not None:
            hook(ns, keys, blobs)

    def _store_blob(self, pk: PoolKey, ns: Namespace, blob: bytes, score: float, expires: int) -> bool:
        """An encoded page into the DRAM pool and, as the write policy says, the write-down queue. True if held."""
        held = (
            self.pool.put(pk, blob, peek_header(blob).raw_nbytes, ns=ns, score=score, expires_ms=expires)
            if self.config.host_bytes
            else False
        )
        if held and self.mirror is not None and self.mirror.publisher:
            self.mirror.publish(ns, pk[1], blob, score, expires)  # for the ranks that hold the same KV
        if self.disk is not None and self._write_now(pk, ns, held):
            held = self.writedown.enqueue(pk, ns, blob, score, expires) or held
        return held

    def _encode_staged(self, item: StagedPage) -> bytes:
        """On an encoder thread (tests hold it back by overriding this)."""
        return encode_page(item.data, item.ns.kv_dtype, self._codec_for(item.ns), item.ns.head_dim)

    def _land_staged(self, pk: PoolKey, item: StagedPage, blob: bytes) -> None:
        self._store_blob(pk, item.ns, blob, item.score, item.expires_ms)

    @staticmethod
    def _copy_staged(item: StagedPage, out, key) -> None:
        dest = dest_of(out)  # a strided host-pool slot too (rows of a layer-first layout)
        if dest.nbytes != item.data.size:  # the caller's mistake, as decode_page reports it for DRAM pages
            raise CodecError(f"page {key!r}: page holds {item.data.size} bytes, output buffer holds {dest.nbytes}")
        at = 0
        for part in dest.parts:
            part[:] = item.data[at : at + part.size]
            at += part.size

    def recheck_codec(self, needed_gbps: float, source: str) -> CodecChoice:
        """Choose the DRAM tier's codec again against a measured bandwidth to beat (tier/codec_choice.py
        ``rechoose``: ``auto`` only; pages already stored keep theirs). A change of codec is logged.

        Args:
            needed_gbps: the KV bandwidth of recomputing here, GB/s (measured prefill x KV bytes per token).
            source: where that figure comes from, for the reason.

        Returns:
            The choice now in force.
        """
        old = self.codec_choice
        new = codec_choice.rechoose(self.config, old, needed_gbps, source)
        if new is old:
            return old
        if new.dram != old.dram:  # most ticks only restate the reason: the codecs in force change only here
            log.info("kvdrive: codec dram=%s -> %s (%s)", old.dram, new.dram, new.reason)
            # the write-down's target first, and the disk's codec even where DRAM now uses it too: pages queued in
            # the old DRAM codec are still re-encoded on their way down (one already in the target passes as it is)
            self.writedown.disk_codec = get_codec(new.disk)
            self.codec = get_codec(new.dram)
        self.codec_choice = new
        return new

    def _codec_for(self, ns: Namespace):
        if self.codec.supports(ns.kv_dtype):
            return self.codec
        if ns.kv_dtype not in self._warned_codec:
            self._warned_codec.add(ns.kv_dtype)
            log.warning(
                "kvdrive: codec %s does not apply to %s pages; storing them with lossless zstd",
                self.codec.name,
                ns.kv_dtype,
            )
        return get_codec("zstd")

    def _write_now(self, pk: PoolKey, ns: Namespace, held: bool) -> bool:
        policy = self.config.write_policy
        if policy == "write_through":
            return True
        if policy == "write_back":
            return not held
        if self._admitted(ns, pk[1]):
            return True
        if not self.config.host_bytes:
            # selective write-down keeps a page in DRAM until the promoter's verdict; with no DRAM tier there is
            # nowhere to wait, and dropping it left a --kvdrive-host-gb 0 server with an empty disk
            # (bench/results/serving-cpu-kvdrive-pool-share-1.md; tests/tier/test_engine.py)
            return True
        self._counts["not_admitted"] += 1
        return False

    def _admitted(self, ns: Namespace, key: bytes) -> bool:
        if self.admit is None:
            return True
        try:
            return bool(self.admit(ns, key))
        except Exception:  # a broken policy must not lose pages: keep them
            log.exception("kvdrive: write-down admission failed; writing the page down")
            return True

    def _keyed(self, ns: Namespace, n: int) -> bool:
        """Whether pages of ``ns``'s tenant may be cached: always without encryption; with it, while its key is held."""
        if self.keyring is None:
            return True
        self._refresh_keys()
        if self.keyring.has_key(ns.tenant):
            return True
        self._counts["unkeyed_refused"] += n
        if ns.tenant not in self._warned_unkeyed:
            self._warned_unkeyed.add(ns.tenant)
            log.warning(
                "kvdrive: %s has no key for tenant %s; its pages are not cached (encryption at rest is on; "
                "further refusals are counted, not logged)",
                self.keyring.describe(),
                ns.tenant or "'' (unsalted)",
            )
        return False

    def _refresh_keys(self) -> None:
        """Crypto-erase: once a tenant's key is deleted from the key source, drop its pages from memory too (staged,
        the DRAM pool and the write-down queue hold them in the clear); those on disk are unreadable without the key."""
        if self.keyring is None:
            return
        gone = self.keyring.refresh()
        if not gone:
            return
        n = self._staging.drop_where(lambda pk, item: item.ns.tenant in gone)
        n += self.pool.drop_where(lambda e: e.ns is not None and e.ns.tenant in gone)
        n += self.writedown.drop_where(lambda pk, item: item.ns.tenant in gone)
        if self.mirror is not None:
            n += self.mirror.drop_queued(lambda ns: ns.tenant in gone)
        self._counts["erased"] += n
        self._warned_unkeyed -= gone
        if n:
            log.warning("kvdrive: dropped %d in-memory page(s) of %d tenant(s) whose key was removed", n, len(gone))


def _nbytes(page) -> int:
    """A page's size in bytes (numpy arrays and torch tensors have nbytes; other buffers their byte length); 0 for
    what is no buffer at all (encode_page then says so, naming the page)."""
    n = getattr(page, "nbytes", None)
    if isinstance(n, int):
        return n
    try:
        return memoryview(page).nbytes
    except TypeError:
        return 0


def _fits(blob, out) -> bool:
    """Whether ``blob``'s header names a page of ``out``'s size: then a failed decode is the page's fault (damaged),
    not the caller's (a wrong buffer)."""
    try:
        return peek_header(blob).raw_nbytes == byte_view(out, writable=True).size
    except (CodecError, TypeError, ValueError):
        return False


def _decoded_nbytes(blob) -> int:
    """What a blob decodes to (its header says); its own length if the header is damaged (decode_page says how)."""
    try:
        return peek_header(blob).raw_nbytes
    except CodecError:
        return len(blob)
