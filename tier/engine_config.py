"""TierEngine's settings: ``TierConfig`` and its checks, made when it is built (no I/O), so a bad setting is a
``ConfigError`` naming it before any store opens. Split from engine.py (issue 16); ``tier.engine`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .codec_choice import AUTO, DISK_CODECS
from .codecs import CODEC_NAMES, get_codec
from .disk_config import DiskStoreConfig, GiB, MiB
from .errors import ConfigError
from .replica_mirror import SHM_ROOT
from .tenants import Tenants
from .validate import integer, number

TIER_CODECS = (AUTO, *CODEC_NAMES)  # TierConfig.codec: "auto" chooses per tier by measurement (tier/codec_choice.py)
MAX_DECODE_THREADS = 1024
WRITE_POLICIES = ("write_through", "write_back", "selective")
MIRROR_MODES = ("off", "publish", "read")


@dataclass
class TierConfig:
    path: str | None = None  # disk store directory; None: DRAM tier only
    host_bytes: int = 4 * GiB  # compressed DRAM tier budget (encoded bytes)
    disk_bytes: int = 64 * GiB  # disk store cap (segment file bytes)
    # auto: chosen per tier by measuring this machine (tier/codec_choice.py: raw in DRAM where zstd decode is slower
    # than a reload must be and DRAM is not the constraint, zstd on disk); raw | zstd (lossless) | int8 | fp8 (lossy:
    # opt in): that codec in both tiers
    codec: str = AUTO
    disk_codec: str | None = None  # raw | zstd: the disk's own codec (lossless pages re-encoded); None: as codec/auto
    # the KV bandwidth of recomputing, GB/s (prefill tokens/s x KV bytes per token): a reload slower than this loses to
    # recompute. auto compares zstd decode with it; None: codec_choice.DEFAULT_RECOMPUTE_GBPS (an 8B model on a GPU)
    recompute_gbps: float | None = None
    decode_threads: int = 0  # threads decoding a batch of pages (zstd releases the GIL); 0: every usable core
    # write_through: every page also goes to disk at once (survives a crash); write_back: a page goes to disk when it
    # leaves the DRAM pool; selective: only pages the engine's ``admit`` callback calls worth keeping go to disk -- at
    # once if admitted when stored, else when they leave the pool if admitted by then (others are dropped there)
    write_policy: str = "write_through"
    writedown_queue_bytes: int = 256 * MiB  # pages waiting for the disk; over this, write-downs are dropped
    writedown_batch_bytes: int = 16 * MiB  # one group commit
    io_threads: int = 2  # for submit_get_many / submit_put_many
    maintain_interval_s: float = 30.0  # TTL expiry, capacity and compaction on the writer thread
    default_ttl_s: float | None = None
    disk: dict = field(default_factory=dict)  # further DiskStoreConfig fields (segment_bytes, io, ...)
    tenants: dict = field(default_factory=dict)  # per-tenant policy (ttl_s, share_as): see tier/tenants.py
    encrypt: str | None = None  # encryption at rest: key file path, or "env" (KVDRIVE_KEYS); see tier/crypto.py
    # stage_many: raw pages waiting for the encoder threads (a page over this is refused, never waited for); 0: no
    # staging, stage_many encodes on the caller's thread like put_many. 256 MiB: ~0.2 s of an 8B model's write-through
    # at several GB/s, ~0.2 s of encoding for two zstd threads
    staging_bytes: int = 256 * MiB
    encode_threads: int = 2  # encoder threads for staged pages (zstd releases the GIL)
    # a node-shared copy of the DRAM tier for ranks holding the same KV (MLA replicas; tier/replica_mirror.py):
    # "publish" (the writing rank), "read" (the others) or "off"; it lives under mirror_root (shared memory)
    mirror: str = "off"
    mirror_root: str = SHM_ROOT

    def __post_init__(self):
        zero_ok = ("host_bytes", "staging_bytes")
        for name in (
            "host_bytes",
            "disk_bytes",
            "writedown_queue_bytes",
            "writedown_batch_bytes",
            "io_threads",
            "staging_bytes",
            "encode_threads",
        ):
            integer(getattr(self, name), f"tier {name}", least=0 if name in zero_ok else 1)
        integer(self.decode_threads, "tier decode_threads", least=0, most=MAX_DECODE_THREADS)
        if self.mirror not in MIRROR_MODES:
            raise ConfigError(f"tier mirror {self.mirror!r} is not one of {', '.join(MIRROR_MODES)}")
        if self.mirror != "off" and self.path is None:
            raise ConfigError("tier mirror is named after the disk store: it needs a disk store path")
        if self.codec not in TIER_CODECS:
            raise ConfigError(f"tier codec {self.codec!r} is not one of {', '.join(TIER_CODECS)}")
        if self.disk_codec is not None:
            if self.disk_codec not in DISK_CODECS:
                raise ConfigError(
                    f"tier disk_codec {self.disk_codec!r} is not one of {', '.join(DISK_CODECS)} (lossless: the "
                    "write-down re-encodes pages to it); a lossy codec is set with codec, for both tiers"
                )
            if self.codec != AUTO and not get_codec(self.codec).lossless:
                raise ConfigError(
                    f"tier disk_codec {self.disk_codec!r} cannot apply: codec {self.codec} is lossy, and lossy pages "
                    "are never re-encoded; leave disk_codec unset"
                )
        if self.recompute_gbps is not None:
            number(self.recompute_gbps, "tier recompute_gbps", unit="GB/s")
        if self.write_policy not in WRITE_POLICIES:
            raise ConfigError(f"tier write_policy {self.write_policy!r} is not one of {', '.join(WRITE_POLICIES)}")
        if self.path is None and self.host_bytes == 0:
            raise ConfigError("tier has neither a disk path nor a DRAM budget: set path or host_bytes")
        number(self.maintain_interval_s, "tier maintain_interval_s")
        if not isinstance(self.disk, dict):
            raise ConfigError(f"tier disk options must be a dict of disk store settings, got {self.disk!r}")
        allowed = sorted({f.name for f in fields(DiskStoreConfig)} - {"path", "capacity_bytes", "default_ttl_s"})
        unknown = sorted(str(k) for k in self.disk if k not in allowed)
        if unknown:
            raise ConfigError(f"unknown tier disk option(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
        Tenants(self.tenants)  # ConfigError names a bad entry
        if self.encrypt is not None:
            if not isinstance(self.encrypt, str) or not self.encrypt:
                raise ConfigError(f"tier encrypt must be a key file path or 'env', got {self.encrypt!r}")
            if self.path is None:
                raise ConfigError("tier encrypt is encryption at rest: it needs a disk store path")
        # the disk store's own checks, now rather than when the engine opens it (no I/O happens here)
        DiskStoreConfig(
            path=self.path or ".", capacity_bytes=self.disk_bytes, default_ttl_s=self.default_ttl_s, **self.disk
        )
