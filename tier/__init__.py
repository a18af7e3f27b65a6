"""kvdrive storage engine: codecs, compressed DRAM pool, LMDB-indexed segment store. No SGLang import.

The names most callers need; each module's docstring says what it is for (see docs/architecture.md).
"""

from .codecs import CODEC_NAMES, decode_page, encode_page, get_codec
from .disk_store import DiskStats, DiskStore, DiskStoreConfig, VerifyReport
from .dram_pool import DramPool, DramPoolStats
from .engine import TierConfig, TierEngine, TierStats
from .errors import CodecError, ConfigError, KvdriveError, StoreDirError, StoreError, StoreFormatError, StoreLockedError
from .namespace import Namespace
from .tiers import Tier

__all__ = [
    "CODEC_NAMES",
    "decode_page",
    "encode_page",
    "get_codec",
    "DiskStats",
    "DiskStore",
    "DiskStoreConfig",
    "VerifyReport",
    "DramPool",
    "DramPoolStats",
    "TierConfig",
    "TierEngine",
    "TierStats",
    "Tier",
    "CodecError",
    "ConfigError",
    "KvdriveError",
    "StoreDirError",
    "StoreError",
    "StoreFormatError",
    "StoreLockedError",
    "Namespace",
]
