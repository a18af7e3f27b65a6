"""SGLang plugin entry point (group ``sglang.srt.plugins``): called with no arguments in every SGLang process.

It registers what kvdrive adds, through SGLang's own extension points only (see patches/README.md), and only what
the server asked for (``activation.py``): every process gets the ``--kv-tier kvdrive`` flag expansion (the launcher
needs it to see the flag; a pass-through without it) and the ``kvdrive`` radix-cache backend's name in SGLang's
registry (an entry SGLang only calls when the server selects it). A server that selected kvdrive also gets the CPU
fallbacks (only without a GPU), the page-key hooks, the attention capture and the prefill cost meter; a server that
did not gets none of them (the CPU fallbacks alone with ``KVDRIVE_CPU_FALLBACKS=1``). SGLang logs and swallows a
plugin's exceptions, so each step logs what it did.
"""

from __future__ import annotations

import logging

log = logging.getLogger("kvdrive.sglang")

ALWAYS = (("flags", "install"), ("radix_backend", "register"))
SERVER = (
    ("cpu_fallbacks", "install"),
    ("radix_backend", "register_hash_hooks"),
    ("attention_capture", "install"),
    ("cost_meter", "install"),
)


def register() -> None:
    """Each step on its own: one failing (logged with its traceback) does not take the others down."""
    import importlib

    from . import activation
    from .compat import check_supported
    from .tier.errors import ConfigError

    try:
        version = check_supported()
    except ConfigError as e:
        log.error("%s", e)  # one line; SGLang then runs without any part of kvdrive
        return
    steps = list(ALWAYS)
    if activation.requested():
        steps += SERVER
    elif activation.cpu_fallbacks_requested():
        steps.append(("cpu_fallbacks", "install"))
    done = []
    for module, step in steps:
        try:
            getattr(importlib.import_module(f"{__package__}.{module}"), step)()
            done.append(f"{module}.{step}")
        except Exception:  # noqa: BLE001 - SGLang would swallow it silently; say which part is missing
            log.exception("kvdrive: plugin step %s.%s failed", module, step)
    if activation.requested():
        log.info("kvdrive: plugin registered on SGLang %s: %s", version, ", ".join(done) or "nothing")
    else:  # a server without kvdrive: SGLang's own code paths, one debug line
        log.debug(
            "kvdrive: plugin inert on SGLang %s (this server did not select kvdrive): %s",
            version,
            ", ".join(done) or "nothing",
        )
