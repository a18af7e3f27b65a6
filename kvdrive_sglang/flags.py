"""``--kv-tier kvdrive`` and the ``--kvdrive-*`` options, expanded into SGLang's canonical hierarchical-cache flags.

SGLang's ServerArgs cannot gain fields from a plugin, so kvdrive's options never reach it: they are translated first,
on each entry path, by ``expand_argv`` (the CLI: ``python -m sglang.launch_server`` / ``sglang serve``) and
``expand_kwargs`` (the Python API: ``sglang.Engine(kv_tier="kvdrive", kvdrive_dir=...)``). Where SGLang lets a plugin
do that differs between SGLang releases: ``compat/server_args.py`` holds one adapter per ServerArgs generation.
kvdrive's own settings become one ``config.KvdriveSettings``, which travels to the storage backend inside SGLang's
storage extra config.

A canonical flag the user also set to something else is an error naming both; so is a ``--kvdrive-*`` option without
``--kv-tier kvdrive``. Bad input ends as one line: ``kvdrive: error: ...`` and exit status 2 on the CLI, a
ConfigError (a ValueError) from Engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import activation
from .config import (
    FLAG_DESTS,
    FLAGS,
    RELOAD_POLICIES,  # noqa: F401 - its old home: still importable here
    GiB,
    KvdriveSettings,
    checked_gil_switch_ms,  # noqa: F401 - its old home: still importable here
)
from .tier.errors import ConfigError, KvdriveError

log = logging.getLogger("kvdrive.sglang")

KV_TIERS = ("kvdrive",)
RADIX_BACKEND = "kvdrive"
_KWARGS = frozenset({"kv_tier"} | FLAG_DESTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("kvdrive", "KV tiers below SGLang's host pool (kvdrive plugin)")
    g.add_argument(
        "--kv-tier",
        choices=KV_TIERS,
        default=None,
        help="kvdrive: compressed host-DRAM tier + persistent disk store under the radix cache",
    )
    for f in FLAGS:
        g.add_argument(
            f.flag,
            dest=f.dest,
            type=str,
            default=None,
            help=f"{f.help} (default {f.shown_default})" if f.shown_default is not None else f.help,
        )


def options_from(values: dict) -> KvdriveSettings:
    """kvdrive's option values by destination (``kvdrive_host_gb``; from argv or Engine keywords) -> checked
    settings; ConfigError names the bad one."""
    return KvdriveSettings.from_flags(values)


def KvdriveOptions(
    *,
    dir: str,
    host_gb: float = KvdriveSettings.host_bytes / GiB,  # noqa: N802, A002
    disk_gb: float = KvdriveSettings.disk_bytes / GiB,
    **settings,
) -> KvdriveSettings:
    """Settings with the sizes in GB, as the flags give them (tests and tools; not checked: see KvdriveSettings)."""
    return KvdriveSettings(dir=dir, host_bytes=int(host_gb * GiB), disk_bytes=int(disk_gb * GiB), **settings)


def storage_extra_config(settings: KvdriveSettings) -> str:
    """``--hicache-storage-backend-extra-config``'s value for ``settings``."""
    return json.dumps(settings.to_extra_config())


CANONICAL_FIELDS = (
    "enable_hierarchical_cache",
    "hicache_storage_backend",
    "hicache_storage_backend_extra_config",
    "radix_cache_backend",
    "hicache_io_backend",
    "hicache_mem_layout",
)


def canonical(settings: KvdriveSettings, *, gpu: bool) -> dict:
    """SGLang ServerArgs fields that --kv-tier kvdrive sets."""
    fields = {
        "enable_hierarchical_cache": True,
        "hicache_storage_backend": "dynamic",
        "hicache_storage_backend_extra_config": storage_extra_config(settings),
        "radix_cache_backend": RADIX_BACKEND,
    }
    if not gpu:
        # SGLang's default 'kernel' I/O backend and page_first layout need sgl_kernel's CUDA copies; kvdrive's CPU
        # fallback is the per-layer torch copy of the 'direct' backend over the layer_first layout
        fields["hicache_io_backend"] = "direct"
        fields["hicache_mem_layout"] = "layer_first"
    elif settings.gpu_decompress:
        # the device-side decode writes a page layer by layer (kernels/compressed_load.py): it needs the host pool's
        # layer_first layout, not SGLang's GPU default page_first (a user's own --hicache-mem-layout still wins, and
        # then gpu_decompress.py decodes on the host with one warning)
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
            raise ConfigError(
                f"--kv-tier kvdrive sets {flag_of(field)} itself; remove your "
                f"{flag_of(field)} {given[field]!r} (kvdrive's storage backend and radix cache "
                "replace it)"
            )
    if given.get("disable_radix_cache"):
        raise ConfigError("--kv-tier kvdrive needs the radix cache; remove --disable-radix-cache")
    return out


def expand_kwargs(kwargs: dict, *, gpu: bool | None = None) -> dict:
    """Engine/ServerArgs keyword arguments with kvdrive's expanded into SGLang's (``kwargs`` itself when it holds
    none of kvdrive's)."""
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
    return merge(canonical(options_from(ours), gpu=_gpu() if gpu is None else gpu), rest)


def _given_fields(argv: list[str]) -> dict:
    """The canonical fields the user set on the command line (values as SGLang's parser reads them)."""
    from .compat.server_args import server_args_adapter

    p = server_args_adapter().cli_parser()
    unset = object()
    for action in p._actions:
        action.required = False  # only reading which flags were given; SGLang's own parse checks the rest
        action.default = unset  # a flag given with its default value is still given
    ns, _ = p.parse_known_args(argv)
    keys = set(CANONICAL_FIELDS) | {"disable_radix_cache"}
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, unset) is not unset}


def expand_argv(argv: list[str], *, gpu: bool) -> list[str]:
    """Command-line arguments with kvdrive's options replaced by SGLang's canonical flags."""
    p = argparse.ArgumentParser(prog="sglang serve", add_help=False)
    add_arguments(p)
    mine, rest = p.parse_known_args(argv)  # a bad --kv-tier exits here: "invalid choice: 'x' (choose from ...)"
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
    activation.mark(activation.argv_selects_kvdrive(argv))  # before SGLang spawns this server's processes
    result = original(argv, *args, **kwargs)
    if argv != given:  # logged after SGLang's parse, which is what sets up logging in the launcher
        log.info("kvdrive: --kv-tier kvdrive expanded to: %s", " ".join(argv))
    return result


def _after_add_cli_args(result, parser, *args, **kwargs):
    if not any(a.dest == "kv_tier" for a in parser._actions):
        add_arguments(parser)
    return result


def _expand_engine_kwargs(kwargs: dict) -> dict:
    try:
        out = expand_kwargs(kwargs)
    except KvdriveError as e:
        raise type(e)(str(e)) from None  # the caller's line and ours, not the whole chain of kvdrive's checks
    activation.mark(
        activation.selects_kvdrive(out.get("radix_cache_backend"), out.get("hicache_storage_backend_extra_config"))
    )
    return out


_installed = False


def install() -> None:
    """Register the expansion on every entry path the installed SGLang has (call from the plugin; SGLang applies
    HookRegistry hooks after all plugins ran)."""
    global _installed
    if _installed:
        return
    from .compat.server_args import FlagHooks, server_args_adapter

    adapter = server_args_adapter()
    adapter.install(
        FlagHooks(
            around_prepare_server_args=_around_prepare_server_args,
            after_add_cli_args=_after_add_cli_args,
            expand_kwargs=_expand_engine_kwargs,
        )
    )
    _installed = True  # (the plugin's one line names this step)
