"""Whether this SGLang server asked for kvdrive. Installed but not asked for, kvdrive stays inert: SGLang runs its own
code paths, with none of kvdrive's hooks on its forward pass, page hashes or host pools.

SGLang runs the plugin in every process of a server, early, before the server's arguments are parsed, so a process
learns from its launcher whether kvdrive is wanted: the flag expansion (``flags.py``, which sees every server's
arguments in the launcher) sets ``KVDRIVE_SERVER=1`` in the launcher's environment when they select kvdrive
(``--kv-tier kvdrive``, or kvdrive's radix cache or storage backend named directly) and removes it otherwise, and
SGLang's scheduler processes inherit the environment when they are spawned. What runs in the launcher either way
is the expansion itself: a pass-through for a server without kvdrive.

``KVDRIVE_CPU_FALLBACKS=1`` asks for only the CPU fallbacks SGLang's HiCache needs to run on a machine without a GPU
(``cpu_fallbacks.py``: the HiCache baselines of the tests and benchmarks), and none of kvdrive's hooks.
"""

from __future__ import annotations

import os

SERVER_ENV = "KVDRIVE_SERVER"
CPU_FALLBACKS_ENV = "KVDRIVE_CPU_FALLBACKS"
_STORAGE_MODULE = "kvdrive_sglang.storage_backend"


def requested() -> bool:
    """Whether this process belongs to a server that selected kvdrive."""
    return os.environ.get(SERVER_ENV) == "1"


def cpu_fallbacks_requested() -> bool:
    """Whether this process should install the CPU fallbacks (a kvdrive server, or asked for on their own)."""
    return requested() or os.environ.get(CPU_FALLBACKS_ENV) == "1"


def mark(selected: bool) -> None:
    """Record for this launcher's server processes whether they run kvdrive (called by the flag expansion)."""
    if selected:
        os.environ[SERVER_ENV] = "1"
    else:
        os.environ.pop(SERVER_ENV, None)


def selects_kvdrive(radix_cache_backend, storage_extra_config) -> bool:
    """Whether a server's (expanded) arguments select kvdrive: its radix cache, or its storage backend."""
    return radix_cache_backend == "kvdrive" or _STORAGE_MODULE in str(storage_extra_config or "")


def argv_selects_kvdrive(argv: list[str]) -> bool:
    """``selects_kvdrive`` for a command line (after the expansion)."""
    radix = extra = None
    for i, a in enumerate(argv):
        for flag in ("--radix-cache-backend", "--hicache-storage-backend-extra-config"):
            if a == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(flag + "="):
                value = a.split("=", 1)[1]
            else:
                continue
            if flag == "--radix-cache-backend":
                radix = value
            else:
                extra = value
    return selects_kvdrive(radix, extra)
