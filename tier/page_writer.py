"""The write path of the disk store, step by step: check a batch, plan it (what is not stored yet, sealed when
encryption is on), write it durably to the writer segment (I1), index it in commits the map has room for (I2, I7).
Also the access times reads leave behind, written with the next index commit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import xxhash

from .codecs import CodecError, peek_header
from .crypto import PageSealer
from .disk_config import MAX_TTL_S
from .errors import ConfigError
from .fileio import ALIGN
from .index import FRAMED, SEALED, Index, IndexRoom, Record
from .namespace import Namespace
from .segment_records import Kind, fill_trailer, trailer, trailer_size
from .segment_writer import SegmentWriter
from .validate import number


def record_end(page_key: bytes, rec: Record) -> int:
    """Where a record's bytes end in its segment: its blob, and its trailer when it has one (FRAMED, format 2)."""
    return rec.off + rec.length + (trailer_size(page_key) if rec.flags & FRAMED else 0)


class Batch(NamedTuple):
    """A put_many batch planned for the disk: ``todo`` indexes the pages to write, ``blobs`` holds what goes to
    disk (envelopes at ``todo`` when sealed), ``flags`` their Record flags."""

    todo: list[int]
    blobs: Sequence
    flags: int


class PageWriter:
    """``touched``: page key -> access time, flushed with the next write transaction. ``ttl_used``: a page with an
    expiry was written to this store (by any process) as far as this process knows."""

    def __init__(self, index: Index, room: IndexRoom, writer: SegmentWriter, sealer: PageSealer | None):
        self.index, self.room, self.writer, self.sealer = index, room, writer, sealer
        self.touched: dict[bytes, int] = {}
        self.known_ns: set[bytes] = set()
        self.ttl_used = False

    def forget(self, namespace_id: bytes | None) -> None:
        """A namespace (or all) was cleared: its access times go, and its description is written again when used."""
        if namespace_id is None:
            self.known_ns.clear()
            self.touched.clear()
        else:
            self.known_ns.discard(namespace_id)
            for pk in [pk for pk in self.touched if pk.startswith(namespace_id)]:
                self.touched.pop(pk, None)

    @staticmethod
    def check(ns: Namespace, keys: Sequence, blobs: Sequence, scores, ttl_s, expires_ms) -> list:
        """The blobs' headers; ConfigError / CodecError for arguments that do not fit together."""
        if len(keys) != len(blobs) or (scores is not None and len(scores) != len(keys)):
            raise ConfigError(
                f"put_many got {len(keys)} keys, {len(blobs)} blobs"
                f"{'' if scores is None else f', {len(scores)} scores'}; they must match"
            )
        # refuse anything that is not a well-formed page blob before it reaches the disk
        headers = [peek_header(b) for b in blobs]
        for k, h in zip(keys, headers):
            if h.dtype_name != ns.kv_dtype:  # it could never be read back: a read would drop it as damaged
                raise CodecError(f"page {k!r} is a {h.dtype_name} blob; its namespace holds {ns.kv_dtype} pages")
        if ttl_s is not None:
            number(ttl_s, "put_many ttl_s", below=MAX_TTL_S, unit="seconds")
        if expires_ms is not None and len(expires_ms) != len(keys):
            raise ConfigError(f"put_many got {len(keys)} keys and {len(expires_ms)} expiry times; they must match")
        return headers

    def plan(
        self, ns: Namespace, pkeys: list[bytes], blobs: Sequence, have: list[bool], expiry: list[int], now: int
    ) -> Batch | None:
        """What to write: pages not stored yet, each once, not yet expired; sealed when encryption is on. None when
        the tenant's key went away since put_many checked it (refused: nothing of it reaches the disk)."""
        todo, seen = [], set()
        for i, h in enumerate(have):
            # skip pages already stored, duplicates within the batch, and pages whose expiry has passed
            if not h and pkeys[i] not in seen and not 0 < expiry[i] <= now:
                seen.add(pkeys[i])
                todo.append(i)
        if not todo or self.sealer is None:
            return Batch(todo, blobs, 0)
        sealed = self.sealer.seal_batch(ns.tenant, pkeys, blobs, todo)
        if sealed is None:
            self.sealer.refuse_unkeyed(ns.tenant, len(pkeys))
            return None
        return Batch(todo, sealed, SEALED)

    @staticmethod
    def append_bytes(ns: Namespace, pkeys: list[bytes], batch: Batch) -> int:
        """The most a batch adds to the segment files: its blobs, their trailers, the namespace's description record
        and the O_DIRECT padding of the append. What capacity must make room for (make_room counted only the blobs,
        so format 2's trailers took the files 4 KiB over the cap in bench/stress/soak.py)."""
        return (
            sum(len(batch.blobs[i]) + trailer_size(pkeys[i]) for i in batch.todo)
            + len(ns.canonical)
            + trailer_size(ns.id)
            + ALIGN
        )

    def write_durably(
        self, ns: Namespace, pkeys: list[bytes], headers: list, batch: Batch, expiry: list[int], scores, now: int
    ) -> tuple[int, list[tuple[bytes, Record]], int]:
        """Append the batch to the writer segment and wait until it is durable (I1: before the index may point at
        it). Each blob is followed by its trailer (I11: the segment alone names its pages), and the first page of a
        namespace in a segment by the namespace's description. Returns (segment, the records to index, the
        segment's new end)."""
        blobs, todo = batch.blobs, batch.todo
        tails = [bytearray(trailer_size(pkeys[i])) for i in todo]
        size = sum(len(blobs[i]) for i in todo) + sum(len(t) for t in tails)
        seg, off0 = self.writer.reserve(size + len(ns.canonical) + trailer_size(ns.id))
        bufs: list = []
        for j, i in enumerate(todo):
            bufs += [blobs[i], tails[j]]
        if ns.id not in self.writer.described:  # after the pages: their offsets stay those of format 1 batches
            bufs += [ns.canonical, trailer(Kind.NAMESPACE, 0, 0, ns.id, ns.canonical, 0, now, 0)]
        # checksums are taken as each blob is staged, while the I/O thread writes the previous chunk; the blob's
        # trailer (staged next) is filled with it
        sums = []

        def each(n: int, b) -> None:
            if n < 2 * len(todo) and n % 2 == 0:
                j = n // 2
                i, h = todo[j], headers[todo[j]]
                sums.append(xxhash.xxh3_64_intdigest(b))
                fill_trailer(
                    tails[j], Kind.PAGE, batch.flags, h.codec, pkeys[i], len(b), h.raw_nbytes, sums[j], now, expiry[i]
                )

        end, synced = self.writer.append(bufs, off0, each)
        recs, off = [], off0
        for j, i in enumerate(todo):
            b, h = blobs[i], headers[i]
            recs.append(
                (
                    pkeys[i],
                    Record(
                        seg,
                        off,
                        len(b),
                        h.codec,
                        batch.flags | FRAMED,
                        sums[j],
                        h.raw_nbytes,
                        now,
                        now,
                        expiry[i],
                        float(scores[i]) if scores is not None else 0.0,
                    ),
                )
            )
            off += len(b) + len(tails[j])
        synced.result()  # durable before the index can point at it
        self.writer.end = end
        self.writer.described.add(ns.id)
        return seg, recs, end

    def index_records(self, ns: Namespace, seg: int, recs: list, end: int, *, ttl: bool) -> int:
        """Point the index at records just made durable in ``seg``, in as few commits as the map has room for (one,
        but in a map far too small for the batch). Returns how many are indexed: fewer than all only when the map
        has no room left even after eviction."""
        done = 0
        while done < len(recs):
            touched = len(self.touched) if done == 0 else 0  # the first commit also writes pending access times
            n = self.room.commit_size(len(recs) - done + touched) - touched
            if n <= 0:
                if touched:
                    self.touched = {}  # access times are a hint: dropped rather than the pages
                    continue
                break
            chunk = recs[done : done + n]
            last = done + n == len(recs)
            with self.index.write() as txn:  # I2: records and their segment's accounting in one commit
                if ns.id not in self.known_ns:
                    txn.put(ns.id, ns.canonical, db=self.index.ns)
                    self.known_ns.add(ns.id)
                if ttl and not self.ttl_used:
                    txn.put(b"ttl_used", b"1", db=self.index.meta)
                    self.ttl_used = True
                # a commit's end covers its own records, trailers included (a format-2 record's span is its blob and
                # its trailer: an end short of the trailer made a commit split by the index-room policy look damaged
                # to verify and let dead-writer recovery truncate into the trailer -- tests/e2e/test_faults_cpu.py::
                # test_lmdb_map_full, 0.5.17 CI run); the tail past it is an orphan until the next commits
                self.index.put_pages(txn, seg, chunk, end=end if last else record_end(*chunk[-1]))
                if touched:
                    self.flush_touched(txn)
            self.room.last_txn_records = n + touched
            done += n
        return done

    def flush_touched(self, txn) -> None:
        touched, self.touched = self.touched, {}
        pages = self.index.pages
        for pk, t in touched.items():
            b = txn.get(pk, db=pages)
            if b is not None:
                txn.put(pk, Record.unpack(b)._replace(atime_ms=t).pack(), db=pages)
