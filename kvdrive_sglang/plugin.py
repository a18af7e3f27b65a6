"""SGLang plugin entry point (group ``sglang.srt.plugins``): called with no arguments in every SGLang process.

It registers everything kvdrive adds, through SGLang's own extension points only (see patches/README.md):
CPU fallbacks (only without a GPU), the ``--kv-tier kvdrive`` flag expansion, the ``kvdrive`` radix-cache backend.
SGLang logs and swallows a plugin's exceptions, so each step logs what it did.
"""
from __future__ import annotations

import logging

log = logging.getLogger("kvdrive.sglang")


def register() -> None:
    """Each step on its own: one failing (logged with its traceback) does not take the others down."""
    import importlib

    from .compat import check_supported
    from .tier.errors import ConfigError

    try:
        version = check_supported()
    except ConfigError as e:
        log.error("%s", e)  # one line; SGLang then runs without any part of kvdrive
        return
    done = []
    for module, step in (("cpu_fallbacks", "install"), ("flags", "install"), ("radix_backend", "register"),
                         ("attention_capture", "install"), ("cost_meter", "install")):
        try:
            getattr(importlib.import_module(f"{__package__}.{module}"), step)()
            done.append(module)
        except Exception:  # noqa: BLE001 - SGLang would swallow it silently; say which part is missing
            log.exception("kvdrive: plugin step %s.%s failed", module, step)
    log.info("kvdrive: plugin registered on SGLang %s: %s", version, ", ".join(done) or "nothing")
