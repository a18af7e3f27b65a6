"""Coalesced disk reads (issue 18): a batch's records grouped into runs of neighbouring bytes, each run read with one
``preadv`` (iovecs: every record's header/body/trailer, straight into the caller's buffers where the page is raw),
then verified and decoded on the worker pool (tier/parallel.py).

A prefix's pages are written together (one group commit appends them back to back, blob then trailer), so a reload
of a prefix is a few long reads instead of one pread per page. Runs bridge small gaps (O_DIRECT padding between
commits, a namespace record) by reading them into a throwaway buffer, up to ``MAX_GAP`` bytes; a run stops at
``MAX_IOVECS`` iovecs (IOV_MAX: one syscall per run) or ``MAX_RUN_BYTES`` (so a batch still splits into several runs
that the pool reads in parallel).

Every check of the per-page path is made on each record of a run (I8: checksum, the trailer naming the page, the
header; ``raw_page_ok`` / ``blob_ok`` are shared with DiskStore's per-page reads). A run that reads short (a segment
gone or truncated) and a record that fails a check are handed back for the per-page path, whose verdict stands: a
damaged record in the middle of a run costs only itself.

Reads stay buffered (the page cache): a reload often follows its write or an earlier reload, and then the data is in
the cache. bench/reload_bench.py's io section (8 MiB reads of a 256 MiB file, this 2-core VM, under other load)
measured buffered 5.8-10.2 GB/s warm against O_DIRECT 1.3-2.8 GB/s (which never uses the cache), and cold 1.6-2.0
GB/s buffered against 1.0-2.7 GB/s O_DIRECT: O_DIRECT does not win, so it is not used for reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import NamedTuple

import numpy as np
import xxhash

from .buffers import byte_view, is_rows
from .codecs import HEADER, CodecError, get_codec, peek_header
from .crypto import is_envelope
from .dtypes import dtype_info
from .fileio import IOV_MAX
from .index import Record
from .parallel import parallel_for
from .segment_records import names_page, trailer_size

RAW_CODEC = get_codec("raw").code
MAX_GAP = 64 * 1024  # bytes between two records a run reads through (O_DIRECT padding is < 4 KiB)
MAX_IOVECS = IOV_MAX
MAX_RUN_BYTES = 8 * 1024 * 1024
# One throwaway buffer for gaps and unchecked trailers, shared by every read: nobody reads what lands in it, so
# concurrent reads into it are harmless.
_GAP = np.empty(MAX_GAP, dtype=np.uint8)


class ReadOutcome(Enum):
    """What reading one page into a caller's buffer came to (I8: damaged data is never served)."""

    OK = "ok"  # the page is in the buffer
    BAD = "bad"  # missing, short, damaged or failing authentication: drop the entry
    MISS = "miss"  # transient (an I/O fault) or no key now: keep the entry


class Dest(NamedTuple):
    """A caller's output buffer as the read path sees it."""

    target: np.ndarray  # its byte_view: flat, or [rows, row bytes] for a page spread over a host pool's slots
    parts: list  # writable flat uint8 pieces in byte order: preadv reads a raw page straight into them
    nbytes: int


def dest_of(out) -> Dest:
    """``out`` as a Dest, or CodecError: the caller's mistake, said before anything is read (a buffer that failed only
    once a page was decoded into it had the page dropped as damaged: tests/tier/test_fuzz.py's
    test_wrong_page_buffers_are_errors_and_never_drop_the_stored_page). A page in rows (a layer-first host pool's
    slot: one row per layer and K/V) is read into row by row."""
    view = byte_view(out, writable=True)
    parts = list(np.asarray(view)) if is_rows(view) else [view]
    return Dest(view, parts, view.size)


class Want(NamedTuple):
    """One record to read: into ``dest`` (a raw page, zero copy) or, with ``dest`` None, into a blob buffer."""

    rec: Record
    pk: bytes
    dest: Dest | None


def zero_copy(rec: Record, dest: Dest | None) -> bool:
    """Whether the record is a plain raw page that can be read straight into the caller's buffer."""
    return dest is not None and not rec.sealed and rec.codec == RAW_CODEC and rec.length - HEADER.size == dest.nbytes


def raw_page_ok(hdr, parts: Sequence, tail, rec: Record, pk: bytes, dtype: str) -> bool:
    """I8 for a raw page read in place (header, body in ``parts``, trailer): the checksum over header and body, the
    trailer naming the page (format 2), a raw header of the page's size and dtype."""
    h = xxhash.xxh3_64(hdr)
    for p in parts:
        h.update(p)
    if h.intdigest() != rec.checksum:
        return False
    if rec.framed and not names_page(tail, pk, rec.length, rec.checksum, rec.flags, rec.codec):
        return False
    try:
        hh = peek_header(hdr)
    except CodecError:
        return False
    return hh.codec == RAW_CODEC and hh.raw_nbytes == sum(len(p) for p in parts) and hh.dtype == dtype_info(dtype).code


def blob_ok(buf, tail, rec: Record, pk: bytes) -> bool:
    """I8 for a blob read whole: its checksum, the trailer naming the page (format 2, unsealed: a sealed page's
    envelope is bound to its namespace and key, and its tag is the stronger check), then an envelope or a page
    header."""
    if xxhash.xxh3_64_intdigest(buf) != rec.checksum:
        return False
    if named(rec) and not names_page(tail, pk, rec.length, rec.checksum, rec.flags, rec.codec):
        return False
    if rec.sealed:
        return is_envelope(buf)  # its contents are checked when a key opens it
    try:
        peek_header(buf)
    except CodecError:
        return False
    return True


def named(rec: Record) -> bool:
    """Whether a read checks the record's trailer (format 2, unsealed)."""
    return rec.framed and not rec.sealed


def extent(rec: Record, pk: bytes) -> int:
    """The record's bytes in its segment: blob and (format 2) trailer."""
    return rec.length + (trailer_size(pk) if rec.framed else 0)


class _Slot:
    """One record's buffers in a run, and what its read came to."""

    __slots__ = ("blob", "hdr", "tail", "want")

    def __init__(self, want: Want):
        self.want = want
        self.hdr = self.blob = None
        self.tail = bytearray(trailer_size(want.pk) if named(want.rec) else 0)

    def iovecs(self) -> list:
        rec, out = self.want.rec, []
        if zero_copy(rec, self.want.dest):
            self.hdr = bytearray(HEADER.size)
            out = [self.hdr, *self.want.dest.parts]
        else:
            self.blob = np.empty(rec.length, dtype=np.uint8)  # every byte is read or the run is rejected
            out = [self.blob]
        if self.tail:
            out.append(self.tail)
        elif rec.framed:  # a sealed record's trailer: read through, not checked
            out.append(_GAP[: trailer_size(self.want.pk)])
        return out

    def verified(self, dtype: str) -> bool:
        rec = self.want.rec
        if self.hdr is not None:
            return raw_page_ok(self.hdr, self.want.dest.parts, self.tail, rec, self.want.pk, dtype)
        return blob_ok(self.blob, self.tail, rec, self.want.pk)


class Run(NamedTuple):
    seg: int
    off: int
    end: int
    members: list[int]  # indices into the wants, in file order


def plan_runs(wants: Sequence[Want]) -> list[Run]:
    """Runs of records in the same segment, in offset order, at most MAX_GAP apart, each within MAX_IOVECS iovecs
    and MAX_RUN_BYTES (a single record larger than that is a run of its own). Overlapping records (a key asked for
    twice) start a new run."""
    order = sorted(range(len(wants)), key=lambda k: (wants[k].rec.seg, wants[k].rec.off))
    runs: list[Run] = []
    cur: list[int] = []
    seg = start = end = iov = 0
    for k in order:
        w = wants[k]
        rec = w.rec
        n_iov = _iovec_count(w) + 1  # +1: a gap before it
        rec_end = rec.off + extent(rec, w.pk)
        joins = (
            cur
            and rec.seg == seg
            and end <= rec.off <= end + MAX_GAP
            and iov + n_iov <= MAX_IOVECS
            and rec_end - start <= MAX_RUN_BYTES
        )
        if not joins:
            if cur:
                runs.append(Run(seg, start, end, cur))
            cur, seg, start, iov = [], rec.seg, rec.off, 0
        cur.append(k)
        end, iov = rec_end, iov + n_iov
    if cur:
        runs.append(Run(seg, start, end, cur))
    return runs


def _iovec_count(w: Want) -> int:
    body = len(w.dest.parts) + 1 if zero_copy(w.rec, w.dest) else 1
    return body + (1 if w.rec.framed else 0)


class RunsRead(NamedTuple):
    """What ``read_runs`` did with a batch."""

    outcomes: list  # per want: its ReadOutcome, or None: to be read again one by one (run short, or a check failed)
    error: OSError | None  # the first I/O error of a run (its records are MISS: the caller turns the tier off)
    bytes_read: int  # blob bytes of the records that verified


# finish(k, got) -> ReadOutcome: called on the pool for each record that verified; ``got`` is True for a raw page read
# in place into its Dest, else the verified blob (a CodecError raised by it makes the record BAD)
Finish = Callable[[int, object], ReadOutcome]


def read_runs(fds, wants: Sequence[Want], dtype: str, finish: Finish, *, max_threads: int | None = None) -> RunsRead:
    """Read ``wants`` in runs on the worker pool (one preadv per run), then verify each record and ``finish`` it
    (decode, unseal) on the pool. ``fds``: SegmentFds (``pread(seg, off, bufs) -> bytes read | None``)."""
    runs = plan_runs(wants)
    slots: list[_Slot | None] = [None] * len(wants)
    status: list[object] = [None] * len(runs)  # True: read whole; False: short or missing; an OSError

    def read_one(r: int) -> None:
        run = runs[r]
        bufs, pos = [], run.off
        for k in run.members:
            w = wants[k]
            if w.rec.off > pos:
                bufs.append(_GAP[: w.rec.off - pos])
            slots[k] = _Slot(w)
            bufs += slots[k].iovecs()
            pos = w.rec.off + extent(w.rec, w.pk)
        try:
            n = fds.pread(run.seg, run.off, bufs)
        except OSError as e:
            status[r] = e
            return
        status[r] = n is not None and n == run.end - run.off

    parallel_for(read_one, len(runs), weights=[run.end - run.off for run in runs], max_threads=max_threads)
    outcomes: list[ReadOutcome | None] = [None] * len(wants)
    error, todo = None, []
    for run, st in zip(runs, status):
        if isinstance(st, OSError):
            error = error or st
            for k in run.members:
                outcomes[k] = ReadOutcome.MISS
        elif st:
            todo += run.members

    def check(j: int) -> None:
        k = todo[j]
        s = slots[k]
        if not s.verified(dtype):
            return  # None: the per-page path reads it again and has the last word
        try:
            outcomes[k] = finish(k, True if s.hdr is not None else s.blob)
        except CodecError:
            outcomes[k] = ReadOutcome.BAD

    parallel_for(check, len(todo), weights=[wants[k].rec.length for k in todo], max_threads=max_threads)
    nbytes = sum(wants[k].rec.length for k in todo if outcomes[k] is not None)
    return RunsRead(outcomes, error, nbytes)
