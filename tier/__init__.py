"""kvdrive storage engine: codecs, compressed host pool, LMDB-indexed segment store. No SGLang import.

The names most callers need; each module's docstring says what it is for (see docs/architecture.md).
"""
from .codecs import CODEC_NAMES, decode_page, encode_page, get_codec
from .disk_store import DiskStats, DiskStore, DiskStoreConfig, VerifyReport
from .engine import TierConfig, TierEngine, TierStats
from .errors import (CodecError, ConfigError, KvdriveError, StoreDirError, StoreError, StoreFormatError,
                     StoreLockedError)
from .host_pool import CompressedHostPool, HostPoolStats
from .namespace import Namespace

__all__ = [
    "CODEC_NAMES", "decode_page", "encode_page", "get_codec",
    "DiskStats", "DiskStore", "DiskStoreConfig", "VerifyReport",
    "TierConfig", "TierEngine", "TierStats",
    "CodecError", "ConfigError", "KvdriveError", "StoreDirError", "StoreError", "StoreFormatError", "StoreLockedError",
    "CompressedHostPool", "HostPoolStats", "Namespace",
]
