"""Mooncake Store (the distributed KV store SGLang's HiCache integrates) as kvdrive's remote tier.

    --kvdrive-remote mooncake://MASTER_HOST:PORT [--kvdrive-remote-config '{"protocol": "tcp", ...}']

Each kvdrive process is one Mooncake client: it contributes ``global_segment_size`` bytes of its memory to the
cluster store (objects are placed in any client's segment) and moves objects through a ``local_buffer_size``
transfer buffer. Objects are named ``<prefix>:<namespace id hex>:<blake2b-128 of the page key, hex>`` (a bounded
name; the whole key is inside the object and checked: tier/remote/envelope.py).

The client library (pip ``mooncake-transfer-engine-non-cuda``, kvdrive's ``[remote]`` extra) is imported when the
client first connects. It links ``libibverbs.so.1`` even for TCP: where the system lacks it,
``bash scripts/mooncake_env.sh`` unpacks it without root into ``MOONCAKE_LIBS`` (below), which is loaded from here
before the import, so no LD_LIBRARY_PATH is needed in the server. Failure modes of the store are in
../shared/notes/mooncake-cpu.md; the guard (tier/remote/guard.py) bounds every call made here.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from . import MiB, ObjectId, RemoteError, RemoteFault, _positive

PROTOCOLS = ("tcp", "rdma")
INSTALL_HINT = (
    "pip install 'kvdrive-sglang[remote]' (or: pip install mooncake-transfer-engine-non-cuda), then "
    "bash scripts/mooncake_env.sh where libibverbs.so.1 is missing (no root needed)"
)
LIBS_ENV = "KVDRIVE_MOONCAKE_LIBS"
# libibverbs and what it links, in load order (dependencies first): Debian's libibverbs1, libnl-3-200, libnl-route-3-200
_SYSTEM_LIBS = ("libnl-3.so.200", "libnl-route-3.so.200", "libibverbs.so.1")
_import_lock = threading.Lock()


def libs_dir() -> str:
    """Where scripts/mooncake_env.sh unpacks libibverbs (the same default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get(LIBS_ENV) or os.path.join(base, "kvdrive", "mooncake-libs")


def _load_local_libs() -> None:
    """Load libibverbs from libs_dir() (if unpacked there) so mooncake.store's link to it resolves."""
    root = libs_dir()
    for name in _SYSTEM_LIBS:
        found = sorted(glob.glob(os.path.join(root, "**", name), recursive=True))
        if found:
            ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)


def import_store_class():
    """mooncake.store.MooncakeDistributedStore; ConfigError naming the install command when it cannot load."""
    with _import_lock:
        try:
            from mooncake.store import MooncakeDistributedStore

            return MooncakeDistributedStore
        except ImportError as first:
            try:
                _load_local_libs()
                from mooncake.store import MooncakeDistributedStore

                return MooncakeDistributedStore
            except (ImportError, OSError):
                pass
            missing = (
                "the mooncake package is not installed"
                if "No module named 'mooncake" in str(first)
                else f"mooncake.store does not load ({first})"
            )
            raise ConfigError(f"kvdrive remote mooncake://: {missing}; install it with: {INSTALL_HINT}") from None


def object_name(prefix: str, oid: ObjectId) -> str:
    return f"{prefix}:{oid.ns_id.hex()}:{hashlib.blake2b(oid.key, digest_size=16).hexdigest()}"


def route_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (what other clients reach our segment by)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(host), port))  # no packet is sent: only picks the route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class MooncakeConfig:
    """Mooncake client settings (keys of --kvdrive-remote-config; SGLang's MOONCAKE_* settings by the same names)."""

    protocol: str = "tcp"  # "rdma" on a cluster with RDMA NICs (then name them in device_name)
    device_name: str = ""  # RDMA devices, e.g. "mlx5_0,mlx5_1"
    local_hostname: str = ""  # the address other clients reach this one at ("": the route to the master)
    metadata_server: str = "P2PHANDSHAKE"  # or "http://HOST:PORT/metadata" (the master's HTTP metadata server)
    global_segment_size: int = 1024 * MiB  # memory this process lends the cluster store (0: none, a pure client)
    local_buffer_size: int = 64 * MiB  # transfer buffer: a batched put/get moves through it

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"kvdrive remote protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        for name in ("device_name", "local_hostname", "metadata_server"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"kvdrive remote {name} must be a string, got {getattr(self, name)!r}")
        if not self.metadata_server:
            raise ConfigError("kvdrive remote metadata_server must be P2PHANDSHAKE or the metadata server's URL")
        if self.global_segment_size != 0:
            _positive("global_segment_size", self.global_segment_size, integer=True)
        _positive("local_buffer_size", self.local_buffer_size, integer=True)


class MooncakeRemote:
    """One Mooncake Store client (RemoteTier). Connects on its first call; calls may block (the guard bounds them)."""

    Config = MooncakeConfig

    def __init__(self, address: str, config: MooncakeConfig, prefix: str = "kvdrive"):
        import_store_class()  # a missing package or library fails at start, naming the install command
        self.address = address
        self.config = config
        self.prefix = prefix
        self._store = None
        self._lock = threading.Lock()

    @staticmethod
    def check_installed() -> None:
        import_store_class()

    def describe(self) -> dict:
        c = self.config
        return {
            "engine": "mooncake",
            "master": self.address,
            "protocol": c.protocol,
            "device_name": c.device_name,
            "local_hostname": c.local_hostname or "(route to master)",
            "metadata_server": c.metadata_server,
            "global_segment_size": c.global_segment_size,
            "local_buffer_size": c.local_buffer_size,
        }

    def _client(self):
        with self._lock:
            if self._store is not None:
                return self._store
            cls = import_store_class()
            host, _, port = self.address.rpartition(":")
            c = self.config
            local = c.local_hostname or route_address(host.strip("[]"), int(port))
            store = cls()
            rc = store.setup(
                local,
                c.metadata_server,
                c.global_segment_size,
                c.local_buffer_size,
                c.protocol,
                c.device_name,
                self.address,
            )
            if rc != 0:
                raise RemoteError(RemoteFault.SETUP, f"setup with master {self.address} returned {rc}")
            self._store = store
            return store

    def exists(self, ids: Sequence[ObjectId]) -> list[bool]:
        codes = self._client().batch_is_exist([object_name(self.prefix, i) for i in ids])
        if any(c < 0 for c in codes):
            raise RemoteError(RemoteFault.UNREACHABLE, f"batch_is_exist returned {min(codes)}")
        return [c == 1 for c in codes]

    def get(self, ids: Sequence[ObjectId]) -> list[bytes | None]:
        store = self._client()
        names = [object_name(self.prefix, i) for i in ids]
        got: list[bytes | None] = [b if b else None for b in store.get_batch(names)]
        # get returns b"" for a miss and for an error alike: a name still listed whose bytes did not come is a
        # transfer fault (its holder died: listed for up to the master's client_ttl while reads fail; or evicted)
        empty = [i for i, b in enumerate(got) if b is None]
        if empty:
            codes = store.batch_is_exist([names[i] for i in empty])
            if any(c != 0 for c in codes):
                raise RemoteError(
                    RemoteFault.TRANSFER,
                    f"{sum(c == 1 for c in codes)} listed object(s) could not be read",
                    partial=got,
                )
        return got

    def put(self, ids: Sequence[ObjectId], objects: Sequence[bytes]) -> None:
        rc = self._client().put_batch([object_name(self.prefix, i) for i in ids], list(objects))
        if rc != 0:
            kind = RemoteFault.UNREACHABLE if rc <= -900 else RemoteFault.PUT
            raise RemoteError(kind, f"put_batch of {len(ids)} object(s) returned {rc}")

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
