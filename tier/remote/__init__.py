"""Remote tiers: a store shared by every node, behind kvdrive's local DRAM and disk tiers (kvdrive issue 19).

A remote tier is a plain transport of opaque objects named by (namespace id, page key): batched ``exists`` /
``get`` / ``put``, ``close``, ``describe``. It may block, fail or lie; everything that makes it safe lives above it
and is the same for every engine:

    envelope.py  what a remote object holds (page blob + namespace id + key + checksum; sealed under --kvdrive-encrypt)
                 and its verification before a page is served (a mismatch is a counted miss)
    guard.py     every call time-bounded on a worker thread; a fault turns the tier off for a retry window
    tiered.py    RemoteTieredEngine: read-through on a local miss (promoted into the local tiers), write-behind of
                 the pages the engine writes down, longest-prefix exists across local and remote tiers
    model_ids.py the model part of a remote namespace: an identity that holds across machines (two nodes with their
                 own copy of one model share pages; two models never do)

An engine is one more module with a class named in ``BACKENDS`` (Mooncake Store today: ``mooncake.py``; 3FS, NIXL or
an LMCache server later). Its module is imported only when its scheme is used, and its client library only when it
connects. No SGLang import here.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

from .. import validate
from ..errors import ConfigError, KvdriveError

MiB = 1 << 20
# scheme -> (module under tier.remote, class): the class has ``Config`` (a dataclass of its own settings, checked in
# __post_init__) and ``check_installed()``, and is built as ``cls(address, config, prefix=...)``
BACKENDS = {"mooncake": ("mooncake", "MooncakeRemote")}


class ObjectId(NamedTuple):
    """A remote object's name: the namespace id (16 bytes, tier/namespace.py) and the page key (bytes)."""

    ns_id: bytes
    key: bytes


class RemoteFault(str, enum.Enum):
    """Why a remote call failed; each turns the remote tier off for the retry window (counted per kind)."""

    SETUP = "setup"  # the client could not connect / mount (master down at start, bad address)
    UNREACHABLE = "unreachable"  # the master (or metadata service) did not answer: an RPC error
    TIMEOUT = "timeout"  # the call did not return within its time bound (a hung master or peer)
    TRANSFER = "transfer"  # the object is listed but its bytes could not be read (its holder died; evicted)
    PUT = "put"  # the store refused a write (no space, holder gone)
    ERROR = "error"  # anything else the client raised


class RemoteError(KvdriveError):
    """A remote call failed. ``partial``: what a batched get did return before the fault (None: nothing usable)."""

    def __init__(self, fault: RemoteFault, detail: str, partial: list | None = None):
        super().__init__(f"{fault.value}: {detail}")
        self.fault = fault
        self.detail = detail
        self.partial = partial


class RemoteTier(Protocol):
    """A remote object store (one client per process). Calls may block; RemoteTieredEngine bounds their time."""

    def exists(self, ids: Sequence[ObjectId]) -> list[bool]:
        """Whether each object is listed (its bytes may still fail to arrive). RemoteError on a fault."""

    def get(self, ids: Sequence[ObjectId]) -> list[bytes | None]:
        """Each object's bytes, None where absent. RemoteError on a fault (``partial`` may carry what arrived)."""

    def put(self, ids: Sequence[ObjectId], objects: Sequence[bytes]) -> None:
        """Store the objects (an existing name may keep its old bytes). RemoteError on a fault."""

    def close(self) -> None:
        """Leave the store (a node's own segment goes with it)."""

    def describe(self) -> dict:
        """The settings in effect, for logs and ``kvdrive stats``."""


def _positive(name: str, v, *, integer: bool = False) -> None:
    (validate.integer if integer else validate.number)(v, f"kvdrive remote {name}")


@dataclass(frozen=True)
class RemoteOptions:
    """Settings of the remote tier common to every engine (keys of --kvdrive-remote-config beside the engine's)."""

    timeout_s: float = 1.0  # bound of an exists/get call (on SGLang's prefetch / load path)
    put_timeout_s: float = 5.0  # bound of a write-behind put (off the request path)
    retry_s: float = 30.0  # how long a fault turns the remote tier off
    queue_bytes: int = 64 * MiB  # pages waiting for write-behind; over it a page is dropped (counted), never waited for
    batch_bytes: int = 8 * MiB  # one batched put (must fit the client's transfer buffer)
    prefix: str = "kvdrive"  # object names start with it: one cluster store can hold several fleets apart
    write: bool = True  # False: read the shared tier, never write it
    # the model's identity across machines (tier/remote/model_ids.py, kvdrive_sglang/model_identity.py): the operator
    # asserts that every node giving this id serves identical weights; None: derived (hub commit, content hash)
    model_id: str | None = None
    model_hash_max_bytes: int = 2 << 30  # hash a model's files whole up to this size at startup (0: never)

    def __post_init__(self):
        for name in ("timeout_s", "put_timeout_s", "retry_s"):
            _positive(name, getattr(self, name))
        for name in ("queue_bytes", "batch_bytes"):
            _positive(name, getattr(self, name), integer=True)
        if not isinstance(self.prefix, str) or not self.prefix or not self.prefix.isprintable() or " " in self.prefix:
            raise ConfigError(f"kvdrive remote prefix must be a non-empty printable word, got {self.prefix!r}")
        if not isinstance(self.write, bool):
            raise ConfigError(f"kvdrive remote write must be true or false, got {self.write!r}")
        if self.model_id is not None and (
            not isinstance(self.model_id, str) or not self.model_id.strip() or not self.model_id.isprintable()
        ):
            raise ConfigError(f"kvdrive remote model_id must be a non-empty printable string, got {self.model_id!r}")
        validate.integer(self.model_hash_max_bytes, "kvdrive remote model_hash_max_bytes", least=0)


class RemoteSpec(NamedTuple):
    """A checked ``--kvdrive-remote URL`` with its ``--kvdrive-remote-config``: the engine, where, and settings."""

    url: str
    scheme: str
    address: str  # "host:port"
    options: RemoteOptions
    backend_config: Any  # the engine's Config dataclass

    def describe(self) -> dict:
        return {"url": self.url, **dataclasses.asdict(self.options), **dataclasses.asdict(self.backend_config)}


def backend_class(scheme: str):
    if scheme not in BACKENDS:
        raise ConfigError(
            f"kvdrive remote: unknown engine {scheme!r} in the URL; known: "
            f"{', '.join(s + '://HOST:PORT' for s in BACKENDS)}"
        )
    module, cls = BACKENDS[scheme]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def parse_remote(url: str, config: Mapping | None = None) -> RemoteSpec:
    """Check ``--kvdrive-remote`` and ``--kvdrive-remote-config`` (no connection, no client import): ConfigError
    names a bad URL or key."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"kvdrive remote must be a URL such as mooncake://MASTER_HOST:PORT, got {url!r}")
    parts = urlsplit(url)
    cls = backend_class(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"kvdrive remote {url!r} must be {parts.scheme}://HOST:PORT (the master's address)")
    config = {} if config is None else config
    if not isinstance(config, Mapping):
        raise ConfigError(f"kvdrive remote config must be a JSON object, got {config!r}")
    common = {f.name for f in dataclasses.fields(RemoteOptions)}
    own = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(str(k) for k in config if k not in common | own)
    if unknown:
        raise ConfigError(
            f"unknown kvdrive remote option(s) {', '.join(unknown)}; known: {', '.join(sorted(common | own))}"
        )
    options = RemoteOptions(**{k: v for k, v in config.items() if k in common})
    backend_config = cls.Config(**{k: v for k, v in config.items() if k in own})
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return RemoteSpec(url, parts.scheme, f"{host}:{port}", options, backend_config)


def open_remote(spec: RemoteSpec) -> RemoteTier:
    """The engine's client for ``spec`` (it connects on its first call; a missing client library is a ConfigError
    naming the install command, raised here)."""
    cls = backend_class(spec.scheme)
    return cls(spec.address, spec.backend_config, prefix=spec.options.prefix)


def check_available(spec: RemoteSpec) -> None:
    """ConfigError (naming the install command) when the engine's client library cannot be loaded here."""
    backend_class(spec.scheme).check_installed()


# --- the settings a server used, kept with its store for ``kvdrive stats`` ----------------------------------------
# The CLI reads a store directory offline, and the remote settings live on the server's command line: so the server
# records them in the store's notes (DiskStore put_note) when it opens, and the CLI shows the last record.
SETTINGS_NOTE = "remote_settings"


def settings_note(spec: RemoteSpec | None, client: Mapping | None = None) -> bytes:
    """The note a server keeps: its remote settings (None: it runs without a remote tier), when and by whom."""
    body = {"url": None} if spec is None else spec.describe() | ({"client": dict(client)} if client else {})
    body["recorded"] = {"unix_s": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid()}
    return json.dumps(body, sort_keys=True, default=str).encode()


def read_settings_note(raw: bytes | None) -> dict | None:
    """The recorded settings (``url`` None: the last server ran without a remote tier); None if none or unreadable
    (a note is a hint: a damaged one is shown as absent, never an error)."""
    if raw is None:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) and "url" in body else None
