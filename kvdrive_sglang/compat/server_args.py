"""How ``--kv-tier kvdrive`` reaches SGLang's ServerArgs: one adapter per ServerArgs generation.

kvdrive cannot add fields to ServerArgs, so its options are translated into SGLang's own hierarchical-cache fields
before ServerArgs sees them (kvdrive_sglang/flags.py does the translating). Where that can happen depends on the
generation; the flag code only talks to :class:`ServerArgsAdapter`:

- ``dataclass`` (0.5.17 - 0.5.19: ServerArgs is a dataclass). All through SGLang's HookRegistry: AROUND
  ``server_args.prepare_server_args`` rewrites argv; AFTER ``ServerArgs.add_cli_args`` lists the options in
  ``--help``; BEFORE ``ServerArgs.__init__`` rewrites keyword arguments, which covers ``sglang.Engine(**kwargs)``
  (``Engine.__init__`` calls ``load_plugins()``, then ``self.server_args_class(**kwargs)``) and ``ServerArgs(...)``.
- ``struct`` (0.5.20 on: ServerArgs is a sealed ``msgspec`` Struct, server_args.py:551 in 0.5.23). The same two CLI
  hooks. A Struct is built without calling ``__init__`` or ``__new__`` (msgspec forbids defining either), so a hook
  there never runs and ``ServerArgs(kv_tier=...)`` stays a TypeError. For ``sglang.Engine(kv_tier=...)``,
  ``Engine.server_args_class`` -- the attribute Engine keeps so that forks can "override the server args"
  (entrypoints/engine.py:261-264), and the one thing ``Engine.__init__`` looks up after ``load_plugins()``
  (:286-297) -- becomes a ServerArgs subclass whose construction expands kvdrive's keywords and returns a plain
  ServerArgs. SGLang's resolution hooks (arg_groups/resolution_hooks.py:108, ``declare_resolution``) were no way
  in: they run on a built record, and only ever see ServerArgs fields.

The generation is chosen by feature (is ServerArgs a msgspec Struct?), not by version number. A release that moves
one of these seams changes this file only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

log = logging.getLogger("kvdrive.sglang")

PREPARE_SERVER_ARGS = "sglang.srt.server_args.prepare_server_args"
ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
SERVER_ARGS_INIT = "sglang.srt.server_args.ServerArgs.__init__"
ENGINE_MODULE = "sglang.srt.entrypoints.engine"


class FlagHooks(NamedTuple):
    """What kvdrive's flag code hands an adapter (HookRegistry signatures)."""

    around_prepare_server_args: Callable[..., Any]  # (original, argv, *args, **kwargs) -> ServerArgs
    after_add_cli_args: Callable[..., Any]  # (result, parser, *args, **kwargs) -> None
    expand_kwargs: Callable[[dict], dict]  # ServerArgs keywords -> with kvdrive's expanded (the same dict when it
    # holds none of kvdrive's); ConfigError for bad ones


class ServerArgsAdapter(Protocol):
    name: str  # "dataclass" | "struct"

    def install(self, hooks: FlagHooks) -> None:
        """Register the CLI hooks and the keyword path (call from the plugin, during ``load_plugins()``)."""

    def cli_parser(self):
        """An argparse parser holding SGLang's own server flags (what ``prepare_server_args`` parses)."""


def _register_cli_hooks(hooks: FlagHooks) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(PREPARE_SERVER_ARGS, hooks.around_prepare_server_args, HookType.AROUND)
    HookRegistry.register(ADD_CLI_ARGS, hooks.after_add_cli_args, HookType.AFTER)


def _cli_parser():
    import argparse

    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(p)
    return p


def _engine_class():
    import importlib

    return importlib.import_module(ENGINE_MODULE).Engine


class _DataclassGeneration:
    name = "dataclass"

    def install(self, hooks: FlagHooks) -> None:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        _register_cli_hooks(hooks)

        def before_init(self_, *args, **kwargs):
            expanded = hooks.expand_kwargs(kwargs)
            return None if expanded is kwargs else ((self_, *args), expanded)

        HookRegistry.register(SERVER_ARGS_INIT, before_init, HookType.BEFORE)

    cli_parser = staticmethod(_cli_parser)


class _StructGeneration:
    name = "struct"

    def install(self, hooks: FlagHooks) -> None:
        _register_cli_hooks(hooks)
        if ENGINE_MODULE not in sys.modules:
            import multiprocessing

            if multiprocessing.parent_process() is not None:
                return  # a scheduler / detokenizer process: no Engine is built here; leave its imports alone
            # else the launcher (which imports Engine anyway), or a program that loaded the plugins itself before
            # it builds an Engine: that Engine's load_plugins() is then a no-op, so the class is set up now
        # Not through HookRegistry, because none of its ways works here: a hook on Engine.__init__ is applied by
        # the load_plugins() call *inside* the first Engine.__init__, too late for that call; hooks on ServerArgs'
        # __init__/__new__ never run (msgspec); and a REPLACE hook on Engine.server_args_class would also rebind
        # ServerArgs in every loaded module (HookRegistry._propagate_patch rebinds each module's name for the
        # replaced object), breaking isinstance(..., ServerArgs) elsewhere (e.g. openai/serving_base.py). So we set
        # the one attribute Engine offers for this, on Engine only; every record built stays a plain ServerArgs.
        engine = _engine_class()
        current = engine.server_args_class
        if not getattr(current, "_kvdrive_expands", False):
            engine.server_args_class = _expanding_subclass(current, hooks.expand_kwargs)

    cli_parser = staticmethod(_cli_parser)


def _expanding_subclass(base: type, expand: Callable[[dict], dict]) -> type:
    """A subclass of the ServerArgs Struct ``base`` whose construction expands kvdrive's keywords and builds a
    ``base``. msgspec lets a Struct define neither ``__init__`` nor ``__new__``; the class call itself is the
    metaclass's, so that is where the keywords are taken."""
    meta = type(base)

    class ExpandingMeta(meta):
        def __call__(cls, *args, **kwargs):
            return base(*args, **expand(kwargs))

    return ExpandingMeta(
        "ServerArgs", (base,), {"__module__": __name__, "__qualname__": "ServerArgs", "_kvdrive_expands": True}
    )


_ADAPTERS = {"dataclass": _DataclassGeneration(), "struct": _StructGeneration()}


def _is_struct(cls) -> bool:
    try:
        import msgspec
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, msgspec.Struct)


def server_args_adapter() -> ServerArgsAdapter:
    """The adapter for the installed SGLang's ServerArgs."""
    from sglang.srt.server_args import ServerArgs

    return _ADAPTERS["struct" if _is_struct(ServerArgs) else "dataclass"]


def running_server_args():
    """The ServerArgs this process serves with, or None where SGLang published none (a storage backend built by
    hand). SGLang publishes them in each scheduler process: ``runtime_context.get_server_args()`` from 0.5.20
    (``server_args.get_global_server_args`` raises there), ``server_args.get_global_server_args()`` before."""
    try:
        from sglang.srt.runtime_context import get_server_args
    except ImportError:
        from sglang.srt.server_args import get_global_server_args as get_server_args
    try:
        return get_server_args()
    except Exception:  # noqa: BLE001 - not published in this process
        return None
