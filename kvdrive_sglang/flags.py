"""``--kv-tier kvdrive`` and the ``--kvdrive-*`` options, expanded into SGLang's canonical hierarchical-cache flags.

SGLang's ServerArgs cannot gain fields from a plugin, so kvdrive's options never reach it: two hooks translate them
first, one per entry path, both through ``expand``:
- the CLI (``python -m sglang.launch_server`` / ``sglang serve``): AROUND ``prepare_server_args`` rewrites argv;
  an AFTER hook on ``ServerArgs.add_cli_args`` lists the options in ``--help``;
- the Python API (``sglang.Engine(kv_tier="kvdrive", kvdrive_dir=...)``): BEFORE ``ServerArgs.__init__`` rewrites
  the keyword arguments.
A canonical flag the user also set to something else is an error naming both; so is a ``--kvdrive-*`` option without
``--kv-tier kvdrive``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

from .tier.codecs import CODEC_NAMES
from .tier.errors import ConfigError, KvdriveError
from .tier.store_dir import check_store_dir

log = logging.getLogger("kvdrive.sglang")

KV_TIERS = ("kvdrive",)
STORAGE_MODULE = "kvdrive_sglang.storage_backend"
STORAGE_CLASS = "KvdriveStorage"
RADIX_BACKEND = "kvdrive"
GiB = 1 << 30
MIN_DISK_BYTES = 1 << 20
RELOAD_POLICIES = ("auto", "always")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvdrive")


@dataclass(frozen=True)
class KvdriveOptions:
    dir: str
    host_gb: float = 4.0  # kvdrive's compressed DRAM tier (SGLang's own host pool is sized by --hicache-ratio/size)
    disk_gb: float = 64.0
    codec: str = "zstd"
    encrypt: str | None = None  # encryption at rest: key file (absolute path) or "env" (KVDRIVE_KEYS)
    tenants: dict | None = None  # per-tenant policy: {"<salt>": {"ttl_s": ..., "share_as": ...}}
    reload: str = "auto"  # storage hits: "auto" reloads only where that beats recomputing (measured), "always" reloads
    promoter: dict | None = None  # PromoterConfig fields (half_life_s, promote_share, admit_min_reuse, ...)
    gil_switch_ms: float | None = None  # Python's GIL switch interval in the server (None: kvdrive's default 0.5 ms)


# our option -> (dest, type, default, help)
_OPTIONS = {
    "--kvdrive-dir": ("kvdrive_dir", str, None, "directory of kvdrive's persistent store (default: "
                      "$XDG_CACHE_HOME/kvdrive or ~/.cache/kvdrive); survives restarts"),
    "--kvdrive-host-gb": ("kvdrive_host_gb", float, KvdriveOptions.host_gb,
                          "compressed host-DRAM tier budget in GB, behind SGLang's host pool (0: none)"),
    "--kvdrive-disk-gb": ("kvdrive_disk_gb", float, KvdriveOptions.disk_gb, "disk store cap in GB"),
    "--kvdrive-codec": ("kvdrive_codec", str, KvdriveOptions.codec,
                        f"page codec: {', '.join(CODEC_NAMES)} (int8/fp8 are lossy: opt in)"),
    "--kvdrive-encrypt": ("kvdrive_encrypt", str, None,
                          "encrypt pages at rest (AES-256-GCM, a key per tenant): KEYFILE, a JSON object of tenant "
                          "(cache salt, @group, or \"\" for unsalted traffic) -> base64 key, mode 0600; or 'env' "
                          "to read that JSON from $KVDRIVE_KEYS. Deleting a tenant's key erases its stored pages"),
    "--kvdrive-tenants": ("kvdrive_tenants", str, None,
                          "per-tenant policy, a JSON object (or a JSON file) of cache salt -> {\"ttl_s\": seconds, "
                          "\"share_as\": group}; salts with the same share_as group share pages"),
    "--kvdrive-reload": ("kvdrive_reload", str, KvdriveOptions.reload,
                         "storage hits: 'auto' reloads a hit only where that beats recomputing its prefill, by the "
                         "costs this server measures; 'always' reloads every hit (benchmarks, tests)"),
    "--kvdrive-promoter": ("kvdrive_promoter", str, None,
                           "promoter settings, a JSON object of tier/promoter.py PromoterConfig fields, e.g. "
                           "'{\"half_life_s\": 300, \"promote_share\": 0.1}'"),
    "--kvdrive-gil-switch-ms": ("kvdrive_gil_switch_ms", float, 0.5,
                                "Python's GIL switch interval in the server process, ms (0: Python's own 5 ms); "
                                "short lets HiCache's I/O threads run beside the scheduler loop"),
}
_KWARGS = {"kv_tier"} | {dest for dest, *_ in _OPTIONS.values()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("kvdrive", "KV tiers below SGLang's host pool (kvdrive plugin)")
    g.add_argument("--kv-tier", choices=KV_TIERS, default=None,
                   help="kvdrive: compressed host-DRAM tier + persistent disk store under the radix cache")
    for flag, (dest, typ, default, help_) in _OPTIONS.items():
        g.add_argument(flag, dest=dest, type=typ, default=None, help=f"{help_} (default {default})"
                       if default is not None else help_)


def options_from(values: dict) -> KvdriveOptions:
    """Validate kvdrive's option values (from argv or Engine kwargs); ConfigError names the bad one."""
    d = values.get("kvdrive_dir") or default_dir()
    if not isinstance(d, (str, os.PathLike)):
        raise ConfigError(f"--kvdrive-dir must be a path, got {d!r}")
    out = {"dir": os.path.abspath(os.path.expanduser(os.fspath(d)))}
    for key, flag in (("host_gb", "--kvdrive-host-gb"), ("disk_gb", "--kvdrive-disk-gb")):
        v = values.get(f"kvdrive_{key}")
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag} must be a number of GB, got {v!r}") from None
        if not (v >= 0 if key == "host_gb" else v > 0) or v != v or v == float("inf"):
            raise ConfigError(f"{flag} must be {'>= 0' if key == 'host_gb' else '> 0'} GB, got {v!r}")
        if key == "disk_gb" and int(v * GiB) < MIN_DISK_BYTES:
            # a cap that rounds to 0 bytes passed here and then failed in the scheduler (found by fuzzing the flags)
            raise ConfigError(f"{flag} must be at least {MIN_DISK_BYTES / GiB:.6f} GB (1 MiB), got {v!r}")
        out[key] = v
    codec = values.get("kvdrive_codec")
    if codec is not None:
        if codec not in CODEC_NAMES:
            raise ConfigError(f"--kvdrive-codec {codec!r} is not one of {', '.join(CODEC_NAMES)}")
        out["codec"] = codec
    enc = values.get("kvdrive_encrypt")
    if enc is not None:
        from .tier.crypto import KeyRing

        out["encrypt"] = KeyRing(enc).source  # a missing, unsafe or malformed key source fails here
    rel = values.get("kvdrive_reload")
    if rel is not None:
        if rel not in RELOAD_POLICIES:
            raise ConfigError(f"--kvdrive-reload {rel!r} is not one of {', '.join(RELOAD_POLICIES)}")
        out["reload"] = rel
    ten = values.get("kvdrive_tenants")
    if ten is not None:
        out["tenants"] = _tenants_option(ten)
    prom = values.get("kvdrive_promoter")
    if prom is not None:
        out["promoter"] = _promoter_option(prom)
    gil = values.get("kvdrive_gil_switch_ms")
    if gil is not None:
        try:
            gil = float(gil)
        except (TypeError, ValueError):
            pass  # named by the check below
        out["gil_switch_ms"] = checked_gil_switch_ms(gil, "--kvdrive-gil-switch-ms")
    opts = KvdriveOptions(**out)
    check_store_dir(opts.dir, create=True)  # a bad directory fails here, in the launcher, with its own message
    return opts


def _tenants_option(value) -> dict:
    """--kvdrive-tenants: a JSON object, inline or in a file; validated (ConfigError names the bad entry)."""
    from .tier.tenants import Tenants

    if isinstance(value, dict):
        obj = value
    else:
        text = str(value)
        if not text.lstrip().startswith("{"):
            try:
                with open(os.path.expanduser(text), encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(f"--kvdrive-tenants {value!r}: not a JSON object, and not a readable file "
                                  f"({e.strerror})") from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--kvdrive-tenants is not valid JSON ({e})") from None
    Tenants(obj)
    return obj


def checked_gil_switch_ms(ms, what: str) -> float:
    """A GIL switch interval in ms: a number from 0 (Python's own) to 100; ConfigError names ``what``."""
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not 0 <= ms <= 100:
        raise ConfigError(f"{what} must be a number of milliseconds from 0 to 100, got {ms!r}")
    return float(ms)


def _promoter_option(value) -> dict:
    """--kvdrive-promoter: a JSON object of PromoterConfig fields, checked here (ConfigError names the bad one)."""
    from .tier.promoter import PromoterConfig

    if isinstance(value, dict):
        obj = value
    else:
        try:
            obj = json.loads(str(value))
        except ValueError as e:
            raise ConfigError(f"--kvdrive-promoter is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"--kvdrive-promoter must be a JSON object of promoter settings, got {value!r}")
    try:
        PromoterConfig(**obj)
    except TypeError as e:
        raise ConfigError(f"--kvdrive-promoter: {e}") from None
    return obj


def storage_extra_config(opts: KvdriveOptions) -> str:
    section = {"dir": opts.dir, "host_bytes": int(opts.host_gb * GiB), "disk_bytes": int(opts.disk_gb * GiB),
               "codec": opts.codec}
    if opts.encrypt is not None:
        section["encrypt"] = opts.encrypt
    if opts.tenants:
        section["tenants"] = opts.tenants
    if opts.reload != "auto":
        section["reload"] = opts.reload
    if opts.promoter:
        section["promoter"] = opts.promoter
    if opts.gil_switch_ms is not None:
        section["gil_switch_ms"] = opts.gil_switch_ms
    return json.dumps({
        "backend_name": "kvdrive", "module_path": STORAGE_MODULE, "class_name": STORAGE_CLASS, "interface_v1": 1,
        "kvdrive": section,
    })


def canonical(opts: KvdriveOptions, *, gpu: bool) -> dict:
    """SGLang ServerArgs fields that --kv-tier kvdrive sets."""
    fields = {
        "enable_hierarchical_cache": True,
        "hicache_storage_backend": "dynamic",
        "hicache_storage_backend_extra_config": storage_extra_config(opts),
        "radix_cache_backend": RADIX_BACKEND,
    }
    if not gpu:
        # SGLang's default 'kernel' I/O backend and page_first layout need sgl_kernel's CUDA copies; kvdrive's CPU
        # fallback is the per-layer torch copy of the 'direct' backend over the layer_first layout
        fields["hicache_io_backend"] = "direct"
        fields["hicache_mem_layout"] = "layer_first"
    return fields


# fields the user may also set, to the same value; and fields whose value the user may choose over ours
_SAME_OK = {"enable_hierarchical_cache", "radix_cache_backend"}
_USER_WINS = {"hicache_io_backend", "hicache_mem_layout"}


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def merge(ours: dict, given: dict) -> dict:
    """Our canonical fields merged into what the user gave; a conflict is a ConfigError naming both flags."""
    out = dict(given)
    for field, value in ours.items():
        if field not in given or given[field] is None:
            out[field] = value
        elif field in _USER_WINS or (field in _SAME_OK and given[field] == value):
            continue
        elif field == "enable_hierarchical_cache" and given[field] is False:
            out[field] = value
        else:
            raise ConfigError(f"--kv-tier kvdrive sets {flag_of(field)} itself; remove your "
                              f"{flag_of(field)} {given[field]!r} (kvdrive's storage backend and radix cache "
                              "replace it)")
    if given.get("disable_radix_cache"):
        raise ConfigError("--kv-tier kvdrive needs the radix cache; remove --disable-radix-cache")
    return out


def expand_kwargs(kwargs: dict, *, gpu: bool) -> dict:
    """Engine/ServerArgs keyword arguments with kvdrive's expanded into SGLang's."""
    ours = {k: kwargs[k] for k in _KWARGS if k in kwargs}
    if not ours:
        return kwargs
    rest = {k: v for k, v in kwargs.items() if k not in _KWARGS}
    tier = ours.pop("kv_tier", None)
    if tier is None:
        if any(v is not None for v in ours.values()):
            named = sorted(k for k, v in ours.items() if v is not None)
            raise ConfigError(f"{', '.join(named)} need{'s' if len(named) == 1 else ''} kv_tier='kvdrive'")
        return rest
    if tier not in KV_TIERS:
        raise ConfigError(f"kv_tier {tier!r} is not one of: {', '.join(KV_TIERS)}")
    return merge(canonical(options_from(ours), gpu=gpu), rest)


def _given_fields(argv: list[str]) -> dict:
    """The canonical fields the user set on the command line (values as SGLang's parser reads them)."""
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(p)
    unset = object()
    for action in p._actions:
        action.required = False  # only reading which flags were given; SGLang's own parse checks the rest
        action.default = unset  # a flag given with its default value is still given
    ns, _ = p.parse_known_args(argv)
    keys = set(canonical(KvdriveOptions(dir="/"), gpu=False)) | {"disable_radix_cache"}
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, unset) is not unset}


def expand_argv(argv: list[str], *, gpu: bool) -> list[str]:
    """Command-line arguments with kvdrive's options replaced by SGLang's canonical flags."""
    p = argparse.ArgumentParser(prog="sglang serve", add_help=False)
    add_arguments(p)
    try:
        mine, rest = p.parse_known_args(argv)
    except SystemExit:
        raise  # argparse already printed e.g. "--kv-tier: invalid choice: 'x' (choose from 'kvdrive')"
    values = {k: v for k, v in vars(mine).items() if v is not None}
    tier = values.pop("kv_tier", None)
    if tier is None:
        if values:
            named = [flag_of(k) for k in sorted(values)]
            raise ConfigError(f"{', '.join(named)} need{'s' if len(named) == 1 else ''} --kv-tier kvdrive")
        return list(argv)
    given = _given_fields(rest)
    merged = merge(canonical(options_from(values), gpu=gpu), given)
    added = []
    for field, value in merged.items():
        if field in given:
            continue  # already on the command line, unchanged
        if value is True:
            added.append(flag_of(field))
        elif value is not False:
            added += [flag_of(field), str(value)]
    return list(rest) + added


def _gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _fail(e: KvdriveError):
    print(f"kvdrive: error: {e}", file=sys.stderr)
    raise SystemExit(2)


def _around_prepare_server_args(original, argv, *args, **kwargs):
    given = list(argv)
    try:
        argv = expand_argv(given, gpu=_gpu())
    except KvdriveError as e:
        _fail(e)
    result = original(argv, *args, **kwargs)
    if argv != given:  # logged after SGLang's parse, which is what sets up logging in the launcher
        log.info("kvdrive: --kv-tier kvdrive expanded to: %s", " ".join(argv))
    return result


def _after_add_cli_args(result, parser, *args, **kwargs):
    if not any(a.dest == "kv_tier" for a in parser._actions):
        add_arguments(parser)
    return result


def _before_server_args_init(self, *args, **kwargs):
    if not (_KWARGS & kwargs.keys()):
        return None
    return (self, *args), expand_kwargs(kwargs, gpu=_gpu())


_installed = False


def install() -> None:
    """Register the hooks (call from the plugin; SGLang applies them after all plugins ran)."""
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.prepare_server_args", _around_prepare_server_args,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.__init__", _before_server_args_init, HookType.BEFORE)
    _installed = True
