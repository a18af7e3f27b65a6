"""Namespaces: everything that makes two KV pages incompatible, folded into one 16-byte id.

A page is addressed by (namespace, key). Two pages whose namespaces differ in any field never satisfy each other's
lookups: peers have served wrong output when dtype, salt or rank was left out of their keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property

from .errors import ConfigError
from .validate import integer

KV_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2", "uint8", "int8")
LAYOUTS = ("mha", "mla")
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class Namespace:
    model: str  # model identity: name/path plus revision or a weights fingerprint
    kv_dtype: str
    layout: str  # "mha" (K and V per head) or "mla" (one latent per token)
    page_size: int  # tokens per page
    num_heads: int  # KV heads held by this rank (1 for MLA)
    head_dim: int  # elements per head row: the codec's quantisation group
    num_layers: int
    tp_rank: int = 0
    tp_size: int = 1
    tenant: str = ""  # tenant / cache salt: pages of different tenants never mix
    extra: tuple[tuple[str, str], ...] = field(default=())  # anything else that changes the bytes (pp rank, mem layout)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"namespace model must be a non-empty string, got {self.model!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"namespace kv_dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"namespace layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        for name in ("page_size", "num_heads", "head_dim", "num_layers", "tp_size"):
            integer(getattr(self, name), f"namespace {name}")
        integer(self.tp_rank, f"namespace tp_rank (of tp_size={self.tp_size})", least=0, below=self.tp_size)
        if not isinstance(self.tenant, str):
            raise ConfigError(f"namespace tenant must be a string, got {self.tenant!r}")
        try:
            extra = tuple(sorted((str(k), str(v)) for k, v in dict(self.extra).items()))
        except (TypeError, ValueError):
            raise ConfigError(f"namespace extra must be (name, value) pairs or a dict, got {self.extra!r}") from None
        object.__setattr__(self, "extra", extra)

    def describe(self) -> dict:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        return d

    @cached_property
    def canonical(self) -> bytes:
        return json.dumps(self.describe(), sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def id(self) -> bytes:
        """16-byte id: BLAKE2b of the canonical description, so any differing field gives a different id."""
        return hashlib.blake2b(self.canonical, digest_size=16, person=b"kvdrive-ns-v1").digest()

    @classmethod
    def from_canonical(cls, data: bytes) -> Namespace:
        d = json.loads(data)
        d["extra"] = tuple(d.get("extra", {}).items())
        return cls(**d)


def key_bytes(key) -> bytes:
    """Turn a caller's opaque key (str or bytes) into bytes; anything else is a clear error."""
    if isinstance(key, str):
        try:
            b = key.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates (e.g. from os.fsdecode of non-UTF-8 bytes)
            raise ConfigError(
                f"page key {key[:40]!r} is not valid Unicode text ({e.reason} at {e.start}); pass bytes instead"
            ) from None
    elif isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
    else:
        raise ConfigError(f"page key must be str or bytes, got {type(key).__name__}")
    if not b:
        raise ConfigError("page key must not be empty")
    if len(b) > MAX_KEY_BYTES:
        raise ConfigError(f"page key is {len(b)} bytes; at most {MAX_KEY_BYTES} are allowed")
    return b
