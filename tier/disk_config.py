"""The disk store's configuration (validated: a bad value is a ConfigError naming it), its stats and fault kinds."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import NamedTuple

import lmdb

from .errors import ConfigError
from .validate import fraction, integer, number

GiB = 1 << 30
MiB = 1 << 20
MAX_TTL_S = 100 * 365 * 86400  # expiry times are u64 milliseconds; a TTL past this is a mistake, not a wish


@dataclass
class DiskStoreConfig:
    path: str
    capacity_bytes: int = 64 * GiB
    segment_bytes: int = 256 * MiB  # capped at capacity/16 so eviction and compaction have room to work
    default_ttl_s: float | None = None  # None: pages never expire
    gc_live_ratio: float = 0.5  # compact sealed segments whose live share fell below this
    high_watermark: float = 0.95  # start evicting above this share of capacity...
    low_watermark: float = 0.80  # ...down to this share of live bytes
    map_size: int = 64 * GiB  # LMDB map: address space only (sparse file); ~300 B a page, so ~200M pages
    retry_after_s: float = 30.0  # a faulted disk tier tries again after this long
    # "posix" | "auto" (kvikio when it imports and a GPU is present) | "kvikio". POSIX by default: kvikio was not
    # measured faster for page-sized reads from host memory (issue 15)
    io: str = "posix"
    direct_io: bool = True  # O_DIRECT appends where the file system allows (buffered otherwise)
    staging_bytes: int = 16 * MiB  # the aligned buffer O_DIRECT appends go through
    fd_cache: int = 256

    def __post_init__(self):
        for name in ("capacity_bytes", "segment_bytes", "fd_cache"):
            integer(getattr(self, name), f"disk store {name}")
        # allocated up front (two halves): a huge one is a typo
        integer(self.staging_bytes, "disk store staging_bytes", below=(1 << 30) + 1)
        # address space reserved by LMDB's map: 64 TiB is ~10^11 pages
        integer(self.map_size, "disk store map_size", below=1 << 46)
        number(self.retry_after_s, "disk store retry_after_s", unit="seconds")  # NaN refused: it broke the store
        if self.default_ttl_s is not None:
            number(self.default_ttl_s, "disk store default_ttl_s", below=MAX_TTL_S, unit="seconds")
        for name in ("gc_live_ratio", "high_watermark", "low_watermark"):
            fraction(getattr(self, name), f"disk store {name}")
        if self.low_watermark >= self.high_watermark:
            raise ConfigError(
                f"disk store low_watermark ({self.low_watermark}) must be below high_watermark ({self.high_watermark})"
            )
        if self.io not in ("auto", "posix", "kvikio"):
            raise ConfigError(f"disk store io must be 'auto', 'posix' or 'kvikio', got {self.io!r}")
        self.segment_bytes = max(64 << 10, min(self.segment_bytes, self.capacity_bytes // 16))


class DiskStats(NamedTuple):
    enabled: bool
    entries: int
    live_bytes: int  # encoded bytes the index points at
    raw_bytes: int  # decoded size of those pages (raw_bytes / live_bytes = codec ratio)
    file_bytes: int  # bytes in segment files (live + dead awaiting compaction)
    capacity_bytes: int
    segments: int
    hits: int
    misses: int
    pages_written: int
    bytes_written: int
    bytes_read: int
    corrupt_dropped: int
    expired: int
    evicted: int
    segments_compacted: int
    rejected_full: int
    faults: dict
    sealed: dict = {}  # noqa: RUF012 - a NamedTuple default, never mutated. Encryption at rest: pages refused or missed per reason (no_key, stale_key, bad_tag, ...)
    # steps of the recovery ladder this store's open took, by kind (tier/recovery.py RecoveryKind): a damaged store
    # repaired, moved aside, or the disk tier off
    recoveries: dict = {}  # noqa: RUF012 - a NamedTuple default, never mutated


class VerifyReport(NamedTuple):
    checked: int
    ok: int
    bad: int  # failed checksum / header / missing bytes: dropped from the index
    bytes_checked: int
    io_errors: int = 0  # unreadable right now (EIO...): kept, since the bytes may be fine


def fault_kind(e: BaseException) -> str:
    if isinstance(e, lmdb.MapFullError):
        return "map_full"
    if isinstance(e, OSError):
        return {
            errno.ENOSPC: "enospc",
            errno.EDQUOT: "enospc",
            errno.EIO: "eio",
            errno.EROFS: "read_only",
            errno.EACCES: "read_only",
            errno.EPERM: "read_only",
            errno.ENOENT: "missing_file",
        }.get(e.errno, "io_error")
    return "index_error"
