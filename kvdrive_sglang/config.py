"""kvdrive's settings under SGLang: one typed object, from the command line (or Engine keywords) to the storage backend.

A setting has one name from the launcher on: ``--kvdrive-host-gb 2`` (the flag spells its unit) becomes
``KvdriveSettings.host_bytes``; SGLang carries it to every scheduler process inside its storage backend's extra config,
``{"kvdrive": {"host_bytes": 2147483648, ...}}`` (``to_extra_config``; plain JSON, readable in SGLang's logged
server args); the storage backend reads it back with one call (``KvdriveSettings.from_extra_config``) and hands it on
as ``TierConfig.host_bytes``.

Both directions run one check (``_checked``): what the launcher accepts, the storage backend accepts too, and a bad
value fails in the launcher, before any server process starts. Only the name in the message differs: the flag for
flag values (``--kvdrive-codec 'lz4' is not one of ...``), ``kvdrive <key>`` for an extra config written by hand.
The launcher also checks what only it can check early: sizes given in GB, the key source (read), the store directory
(created).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .tier.engine_config import TIER_CODECS
from .tier.errors import ConfigError
from .tier.validate import number

GiB = 1 << 30
MIN_DISK_BYTES = 1 << 20
RELOAD_POLICIES = ("auto", "always")
# kvdrive's default GIL switch interval in the server process, ms, per device (0 leaves Python's own 5 ms).
# CPU servers: SGLang's scheduler loop holds the GIL whenever it runs Python (an idle CPU server spins at 100%), and a
# HiCache I/O thread that releases the GIL for a read, a decode or a copy may then wait a whole interval to get it
# back, many times per page: storage reloads measured ~9 ms per page at 5 ms against 0.5-1 ms at 0.5 ms beside a
# spinning thread (0.04-0.16 ms uncontended). A shorter interval only costs while another thread is runnable.
# GPU servers: the scheduler thread is launch-bound and every forced switch delays a launch; torch's op bindings
# release the GIL around each op anyway, which gives the I/O threads their turns without a shorter interval. No GPU
# has measured the trade yet (bench/gil_switch_bench.py is the probe), so a GPU server keeps Python's own interval:
# SGLang's behaviour there is unchanged. Set kvdrive gil_switch_ms to choose.
GIL_SWITCH_MS = {"cpu": 0.5, "cuda": 0.0}
SECTION = "kvdrive"  # the extra config's key for kvdrive's settings
STORAGE_MODULE = "kvdrive_sglang.storage_backend"
STORAGE_CLASS = "KvdriveStorage"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvdrive")


def checked_gil_switch_ms(ms, what: str) -> float:
    """A GIL switch interval in ms: a number from 0 (Python's own) to 100; ConfigError names ``what``."""
    return number(ms, what, zero_ok=True, most=100, unit="milliseconds")


@dataclass(frozen=True)
class KvdriveSettings:
    """Everything ``--kv-tier kvdrive`` configures below SGLang's host pool. Field names are the extra config's keys.

    Build one with ``from_flags`` (launcher) or ``from_extra_config`` (storage backend): both check it. Plain
    construction does not (tests and tools that write a config on purpose)."""

    dir: str  # the persistent store's directory (absolute when it came from the flags)
    host_bytes: int = 4 * GiB  # kvdrive's compressed DRAM tier (SGLang's own host pool: --hicache-ratio/size)
    disk_bytes: int = 64 * GiB  # disk store cap
    codec: str = "auto"  # auto: raw or zstd per tier, by measurement (tier/codec_choice.py); else both tiers'
    write_policy: str = "selective"  # only pages the promoter admits reach the disk (TierConfig.write_policy)
    ttl_s: float | None = None  # default page TTL on disk (TierConfig.default_ttl_s)
    disk: dict | None = None  # further disk store options (retry_after_s, map_size, ...), checked by TierConfig
    tenants: dict | None = None  # per-tenant policy: {"<salt>": {"ttl_s": ..., "share_as": ...}} (tier/tenants.py)
    encrypt: str | None = None  # encryption at rest: key file (absolute path) or "env" (KVDRIVE_KEYS; tier/crypto.py)
    promoter: dict | None = None  # PromoterConfig fields (half_life_s, promote_share, admit_min_reuse, ...)
    reload: str = "auto"  # storage hits: "auto" reloads only where that beats recomputing (measured), "always" does
    gil_switch_ms: float | None = None  # Python's GIL switch interval in the server (None: GIL_SWITCH_MS[device])
    remote: str | None = None  # a shared remote tier behind the local ones: mooncake://MASTER:PORT (tier/remote/)
    remote_config: dict | None = None  # its settings (tier/remote RemoteOptions and the engine's Config fields)
    gpu_decompress: bool = False  # bplane/int8/fp8 pages decoded on the GPU next to the copy (gpu_decompress.py)

    # --- what the storage backend builds from it ------------------------------------------------------------------
    def tier_config(self):
        from .tier.engine import TierConfig

        return TierConfig(
            path=self.dir,
            host_bytes=self.host_bytes,
            disk_bytes=self.disk_bytes,
            codec=self.codec,
            write_policy=self.write_policy,
            default_ttl_s=self.ttl_s,
            disk={} if self.disk is None else self.disk,
            tenants={} if self.tenants is None else self.tenants,
            encrypt=self.encrypt,
        )

    def remote_spec(self):
        """The checked remote tier (tier.remote.RemoteSpec), or None without --kvdrive-remote."""
        if self.remote is None:
            return None
        from .tier.remote import parse_remote

        return parse_remote(self.remote, self.remote_config)

    def promoter_config(self):
        from .tier.promoter import PromoterConfig

        return PromoterConfig(**(self.promoter or {}))

    def gil_switch_s(self, device: str = "cpu") -> float:
        """The GIL switch interval to set, s: the setting, else the default for ``device`` ("cpu", "cuda", ...;
        devices without a measured default get Python's own, 0)."""
        ms = self.gil_switch_ms if self.gil_switch_ms is not None else GIL_SWITCH_MS.get(device.split(":")[0], 0.0)
        return ms / 1000

    # --- SGLang's storage extra config ----------------------------------------------------------------------------
    def to_section(self) -> dict:
        """The ``kvdrive`` section: the store and its sizes always, every other setting only where it is not the
        default (a short, readable JSON object)."""
        out = {"dir": self.dir, "host_bytes": self.host_bytes, "disk_bytes": self.disk_bytes, "codec": self.codec}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in out and v is not None and v != {} and v != f.default:
                out[f.name] = v
        return out

    def to_extra_config(self) -> dict:
        """SGLang's ``--hicache-storage-backend-extra-config`` for the ``dynamic`` backend: which class to load, and
        kvdrive's section (json.dumps it for the flag)."""
        return {
            "backend_name": "kvdrive",
            "module_path": STORAGE_MODULE,
            "class_name": STORAGE_CLASS,
            "interface_v1": 1,
            SECTION: self.to_section(),
        }

    @classmethod
    def from_extra_config(cls, extra: Any) -> KvdriveSettings:
        """The storage backend's one call: SGLang's extra config (a dict) -> checked settings; ConfigError names
        the bad key."""
        section = extra.get(SECTION) if isinstance(extra, dict) else None
        if not isinstance(section, dict) or not section.get("dir"):
            raise ConfigError(
                "the kvdrive storage backend needs {'kvdrive': {'dir': ...}} in "
                "--hicache-storage-backend-extra-config; use --kv-tier kvdrive, which writes it"
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in section if k not in known)
        if unknown:
            raise ConfigError(f"unknown kvdrive storage option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return _checked(section, lambda key: f"kvdrive {key}")

    # --- kvdrive's flags (argv or Engine keywords) ----------------------------------------------------------------
    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> KvdriveSettings:
        """``--kvdrive-*`` values by destination (``kvdrive_host_gb``: argv strings or Engine keyword values; None
        or absent: not given) -> checked settings; ConfigError names the flag. Creates the store directory."""
        from .tier.store_dir import check_store_dir

        section = {"dir": _dir_flag(values.get(DIR_FLAG.dest))}
        for flag in FLAGS:
            v = values.get(flag.dest)
            if v is not None and flag is not DIR_FLAG:
                section[flag.key] = flag.parse(v, flag.flag)
        settings = _checked(section, lambda key: _FLAG_OF_KEY.get(key, f"kvdrive {key}"))
        check_store_dir(settings.dir, create=True)  # a bad directory fails here, in the launcher, with its own message
        if settings.remote is not None:
            from .tier.remote import check_available

            check_available(settings.remote_spec())  # a missing client library fails here, naming the install
        return settings


_OBJECTS = ("disk", "tenants", "promoter", "remote_config")


def _checked(section: Mapping[str, Any], name: Callable[[str], str]) -> KvdriveSettings:
    """The one check of kvdrive's settings (``section``: extra-config keys -> values; ``name(key)``: what a message
    calls that setting). JSON null leaves an optional setting unset."""
    codec = section.get("codec", KvdriveSettings.codec)
    if codec not in TIER_CODECS:
        raise ConfigError(f"{name('codec')} {codec!r} is not one of {', '.join(TIER_CODECS)}")
    reload = section.get("reload", KvdriveSettings.reload)
    if reload not in RELOAD_POLICIES:
        raise ConfigError(f"{name('reload')} {reload!r} is not one of {', '.join(RELOAD_POLICIES)}")
    if section.get("gil_switch_ms") is not None:
        checked_gil_switch_ms(section["gil_switch_ms"], name("gil_switch_ms"))
    promoter = section.get("promoter")
    if promoter is not None:
        from .tier.promoter import PromoterConfig

        if not isinstance(promoter, dict):
            raise ConfigError(f"{name('promoter')} must be a JSON object of promoter settings, got {promoter!r}")
        try:
            PromoterConfig(**promoter)  # its own ConfigErrors name the field ("promoter half_life_s must be ...")
        except TypeError as e:
            raise ConfigError(f"{name('promoter')}: {e}") from None
    if section.get("remote") is not None:
        from .tier.remote import parse_remote

        try:
            parse_remote(section["remote"], section.get("remote_config"))
        except ConfigError as e:  # "kvdrive remote ..." -> the flag's (or key's) name
            raise ConfigError(f"{name('remote')}: {e}") from None
    elif section.get("remote_config"):
        raise ConfigError(f"{name('remote_config')} is given without {name('remote')}")
    if section.get("gpu_decompress") is not None:
        _check_gpu_decompress(section["gpu_decompress"], name("gpu_decompress"))
    # an empty object is the default: one spelling, so settings read back from the extra config compare equal
    settings = KvdriveSettings(**{k: v for k, v in section.items() if not (k in _OBJECTS and v == {})})
    settings.tier_config()  # TierConfig's checks: sizes, write policy, TTL, disk options, tenant policy, encryption
    return settings


# --- the flags ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One ``--kvdrive-*`` option: the setting it gives (``key``) and how its value becomes that setting's."""

    flag: str
    key: str
    parse: Callable[[Any, str], Any]  # (value, flag) -> the setting's value; ConfigError names the flag
    shown_default: Any  # the default --help shows (None: none shown)
    help: str

    @property
    def dest(self) -> str:  # the argparse destination, and the Engine keyword: --kvdrive-host-gb -> kvdrive_host_gb
        return self.flag[2:].replace("-", "_")


def _dir_flag(value) -> str:
    d = value or default_dir()
    if not isinstance(d, (str, os.PathLike)):
        raise ConfigError(f"--kvdrive-dir must be a path, got {d!r}")
    return os.path.abspath(os.path.expanduser(os.fspath(d)))


def _gb(zero_ok: bool) -> Callable[[Any, str], int]:
    def parse(value, flag: str) -> int:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag} must be a number of GB, got {value!r}") from None
        number(v, flag, zero_ok=zero_ok, unit="GB")  # NaN and inf too
        if v * GiB == math.inf:  # 1e300 GB: no byte count (found by fuzzing the settings)
            raise ConfigError(f"{flag} must be a finite number of GB, got {v!r}")
        if not zero_ok and int(v * GiB) < MIN_DISK_BYTES:
            # a cap that rounds to 0 bytes passed here and then failed in the scheduler (found by fuzzing the flags)
            raise ConfigError(f"{flag} must be at least {MIN_DISK_BYTES / GiB:.6f} GB (1 MiB), got {v!r}")
        return int(v * GiB)

    return parse


def _as_is(value, flag: str):
    return value  # checked by _checked, by the flag's name


def _key_source(value, flag: str) -> str:
    from .tier.crypto import KeyRing

    return KeyRing(value).source  # a missing, unsafe or malformed key source fails here, in the launcher


def _tenants(value, flag: str):
    """A JSON object, inline or in a file (TierConfig checks its entries)."""
    if isinstance(value, dict):
        return value
    text = str(value)
    if not text.lstrip().startswith("{"):
        try:
            with open(os.path.expanduser(text), encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{flag} {value!r}: not a JSON object, and not a readable file ({e.strerror})") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{flag} is not valid JSON ({e})") from None


def _json(value, flag: str):
    if isinstance(value, dict):
        return value
    try:
        return json.loads(str(value))
    except ValueError as e:
        raise ConfigError(f"{flag} is not valid JSON ({e})") from None


def _on_off(value, flag: str):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{flag} must be on or off, got {value!r}")


def _check_gpu_decompress(value, what: str) -> None:
    """A bool, and (when on) a CUDA device here: the launcher refuses the flag on a CPU machine in one line (tests
    run the path on CPU through gpu_decompress.cpu_test_hook)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if value:
        from .gpu_decompress import check_device

        check_device(what)


def _ms(value, flag: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value  # named by checked_gil_switch_ms


DIR_FLAG = Flag(
    "--kvdrive-dir",
    "dir",
    _as_is,
    None,
    "directory of kvdrive's persistent store (default: $XDG_CACHE_HOME/kvdrive or ~/.cache/kvdrive); survives restarts",
)
FLAGS = (
    DIR_FLAG,
    Flag(
        "--kvdrive-host-gb",
        "host_bytes",
        _gb(zero_ok=True),
        KvdriveSettings.host_bytes / GiB,
        "compressed host-DRAM tier budget in GB, behind SGLang's host pool (0: none)",
    ),
    Flag(
        "--kvdrive-disk-gb", "disk_bytes", _gb(zero_ok=False), KvdriveSettings.disk_bytes / GiB, "disk store cap in GB"
    ),
    Flag(
        "--kvdrive-codec",
        "codec",
        _as_is,
        KvdriveSettings.codec,
        f"page codec: {', '.join(TIER_CODECS)}. auto: raw or zstd per tier, chosen at startup by measuring this "
        "machine's zstd decode against what a reload must beat (the choice and its reason are logged); any other: "
        "that codec in DRAM and on disk (int8/fp8 are lossy: opt in)",
    ),
    Flag(
        "--kvdrive-encrypt",
        "encrypt",
        _key_source,
        None,
        "encrypt pages at rest (AES-256-GCM, a key per tenant): KEYFILE, a JSON object of tenant (cache salt, @group, "
        "or \"\" for unsalted traffic) -> base64 key, mode 0600; or 'env' to read that JSON from $KVDRIVE_KEYS. "
        "Deleting a tenant's key erases its stored pages",
    ),
    Flag(
        "--kvdrive-tenants",
        "tenants",
        _tenants,
        None,
        'per-tenant policy, a JSON object (or a JSON file) of cache salt -> {"ttl_s": seconds, "share_as": '
        "group}; salts with the same share_as group share pages",
    ),
    Flag(
        "--kvdrive-reload",
        "reload",
        _as_is,
        KvdriveSettings.reload,
        "storage hits: 'auto' reloads a hit only where that beats recomputing its prefill, by the costs this server "
        "measures; 'always' reloads every hit (benchmarks, tests)",
    ),
    Flag(
        "--kvdrive-promoter",
        "promoter",
        _json,
        None,
        "promoter settings, a JSON object of tier/promoter.py PromoterConfig fields, e.g. "
        '\'{"half_life_s": 300, "promote_share": 0.1}\'',
    ),
    Flag(
        "--kvdrive-remote",
        "remote",
        _as_is,
        None,
        "a shared tier behind the local DRAM and disk tiers, for every node of a fleet: mooncake://MASTER_HOST:PORT "
        "(Mooncake Store; pip install 'kvdrive-sglang[remote]'). Local misses are read from it, pages the promoter "
        "admits are written to it in the background",
    ),
    Flag(
        "--kvdrive-remote-config",
        "remote_config",
        _json,
        None,
        "remote tier settings, a JSON object: protocol (tcp|rdma), device_name, local_hostname, metadata_server, "
        "global_segment_size, local_buffer_size (bytes), timeout_s, put_timeout_s, retry_s, queue_bytes, batch_bytes, "
        "prefix, write, model_id (names the model across machines: the operator asserts identical weights), "
        "model_hash_max_bytes (hash the model files up to this size when no model_id or hub commit names them)",
    ),
    Flag(
        "--kvdrive-gil-switch-ms",
        "gil_switch_ms",
        _ms,
        ", ".join(f"{ms:g} on {dev}" for dev, ms in GIL_SWITCH_MS.items()),
        "Python's GIL switch interval in the server process, ms (0: Python's own 5 ms); short lets HiCache's I/O "
        "threads run beside the scheduler loop",
    ),
    Flag(
        "--kvdrive-gpu-decompress",
        "gpu_decompress",
        _on_off,
        "off",
        "on|off. CUDA only: bplane, int8 and fp8 pages (--kvdrive-codec bplane|int8|fp8) stay compressed in SGLang's "
        "host pool until the GPU decodes them in the host-to-device copy: PCIe carries compressed bytes and no core "
        "decodes them at prefetch. Needs --hicache-mem-layout layer_first (other layouts decode on the host)",
    ),
)
_FLAG_OF_KEY = {f.key: f.flag for f in FLAGS}

FLAG_DESTS = frozenset(f.dest for f in FLAGS)
