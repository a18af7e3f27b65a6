"""Self-describing segment records (segment format 2): each blob in a segment file is followed by a trailer that
says what it is, so the segment files alone suffice to rebuild the index (I11 in docs/invariants.md).

    ... | blob (``length`` bytes) | trailer: FIXED | key (``key_len`` bytes) | blob | trailer | ...

FIXED (50 bytes, little-endian): magic ``KVR2``, version, kind (PAGE or NAMESPACE), record flags (SEALED), codec,
key length, blob length, decoded bytes, xxh3_64 of the blob, created and expiry (ms since the epoch, 0 never), and a
32-bit xxh3 of everything before it plus the key. The key of a PAGE is its index page key (namespace id, tag byte,
the key or its blake2b: exactly what the index holds, for sealed namespaces too -- nothing the index does not already
show); a NAMESPACE record's key is the namespace id and its blob the namespace's canonical description.

Why a trailer and not a header: the blob's checksum is taken as it is staged for the write (overlapping the I/O), and
the trailer that carries it is staged right after. A blob's index Record points at the blob (as in format 1), so the
read path reads blob and trailer in one pread and checks the trailer names the page it was asked for: a damaged index
entry (a flipped key byte) can never serve another page's bytes (I8).

Format-1 segments (blobs back to back, no trailers) stay readable: their records lack the FRAMED flag. A rebuild
cannot recover their pages (nothing in the file names them); compaction rewrites them in format 2.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import NamedTuple

import xxhash

from .index import SEALED

MAGIC = b"KVR2"
VERSION = 2
# magic, version, kind, flags, codec, key length, blob length, decoded bytes, checksum, created, expires, check
FIXED = struct.Struct("<4sBBBBHIQQQQI")
_CHECK_AT = FIXED.size - 4
_MAX_KEY = 1024  # page keys are at most 16 + 1 + 400 bytes (longer keys are hashed): anything longer is damage
# The smallest page trailer (an empty key), for space estimates where the keys are not at hand: never more than a
# segment's real trailer bytes, so a segment holding dead bytes never looks fully live
MIN_PAGE_BYTES = FIXED.size + 16 + 1


class Kind(IntEnum):
    PAGE = 1
    NAMESPACE = 2


class Trailer(NamedTuple):
    kind: int
    flags: int
    codec: int
    key: bytes
    length: int  # blob bytes (the blob ends where the trailer starts)
    raw_nbytes: int
    checksum: int  # xxh3_64 of the blob
    created_ms: int
    expires_ms: int


def trailer_size(key: bytes) -> int:
    return FIXED.size + len(key)


def fill_trailer(
    out,
    kind: Kind,
    flags: int,
    codec: int,
    key: bytes,
    length: int,
    raw_nbytes: int,
    checksum: int,
    created_ms: int,
    expires_ms: int,
) -> None:
    """Write a trailer into ``out`` (a bytearray of trailer_size(key) bytes), in place: the write path allocates the
    buffers before the blobs' checksums are known and fills each as its blob is staged."""
    FIXED.pack_into(
        out,
        0,
        MAGIC,
        VERSION,
        int(kind),
        flags,
        codec,
        len(key),
        length,
        raw_nbytes,
        checksum,
        created_ms,
        expires_ms,
        0,
    )
    out[FIXED.size :] = key
    struct.pack_into("<I", out, _CHECK_AT, xxhash.xxh32_intdigest(bytes(out[:_CHECK_AT]) + key))


def trailer(
    kind: Kind, flags: int, codec: int, key: bytes, blob, raw_nbytes: int, created_ms: int, expires_ms: int
) -> bytearray:
    out = bytearray(trailer_size(key))
    fill_trailer(
        out, kind, flags, codec, key, len(blob), raw_nbytes, xxhash.xxh3_64_intdigest(blob), created_ms, expires_ms
    )
    return out


def parse_trailer(buf, at: int = 0) -> Trailer | None:
    """The trailer at ``buf[at:]`` if it is whole and its check holds; None otherwise (damage, or not a trailer)."""
    mv = memoryview(buf).cast("B")
    if len(mv) - at < FIXED.size:
        return None
    magic, version, kind, flags, codec, key_len, length, raw, csum, created, expires, check = FIXED.unpack_from(mv, at)
    if magic != MAGIC or version != VERSION or kind not in (Kind.PAGE, Kind.NAMESPACE) or key_len > _MAX_KEY:
        return None
    end = at + FIXED.size + key_len
    if end > len(mv):
        return None
    key = bytes(mv[at + FIXED.size : end])
    if xxhash.xxh32_intdigest(bytes(mv[at : at + _CHECK_AT]) + key) != check:
        return None
    return Trailer(kind, flags, codec, key, length, raw, csum, created, expires)


class Found(NamedTuple):
    """A record found by ``scan``: ``blob_off`` where its blob starts in the file; ``intact``: the blob's checksum
    holds (a record whose trailer is whole but whose blob is damaged is reported, not served)."""

    blob_off: int
    trailer: Trailer
    intact: bool


def scan(buf) -> Iterator[Found]:
    """Every record of a segment file's bytes whose trailer is whole, in file order. Damaged stretches, O_DIRECT
    padding and format-1 blobs are skipped by searching for the next trailer magic; a candidate counts only if its
    32-bit check holds (a payload that happens to contain the magic does not), and its blob only if its xxh3_64 does."""
    mv = memoryview(buf).cast("B")
    data = bytes(mv) if not isinstance(buf, (bytes, bytearray)) else buf
    pos = 0
    while True:
        at = data.find(MAGIC, pos)
        if at < 0:
            return
        t = parse_trailer(mv, at)
        if t is None or t.length > at:
            pos = at + 1
            continue
        blob_off = at - t.length
        intact = xxhash.xxh3_64_intdigest(mv[blob_off:at]) == t.checksum
        yield Found(blob_off, t, intact)
        pos = at + trailer_size(t.key)


def names_page(tail, key: bytes, length: int, checksum: int, flags: int, codec: int) -> bool:
    """Whether the trailer bytes ``tail`` (read right after a blob) are whole and name this page: its key, length,
    checksum, codec and sealing (I8: a damaged index entry that points at another page's bytes is a miss)."""
    t = parse_trailer(tail)
    return (
        t is not None
        and t.kind == Kind.PAGE
        and t.key == key
        and t.length == length
        and t.checksum == checksum
        and t.codec == codec
        and (t.flags ^ flags) & SEALED == 0
    )
