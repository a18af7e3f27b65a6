"""One adapter per SGLang API generation: everything in kvdrive that depends on which SGLang is installed.

kvdrive supports SGLang ``SUPPORTED_MIN`` through ``SUPPORTED_MAX`` from one codebase. SGLang's internals churn
between releases, but a few seams have stayed stable across that range and kvdrive leans on them only: the plugin
loader and its hook registry, the ``HiCacheStorage`` v1 batch API with the ``dynamic`` storage-backend loader, and
the radix-cache registry. What differs lives behind :class:`RadixAdapter`, one module per generation:

- ``hiradix`` (0.5.17 - 0.5.20): kvdrive's cache subclasses ``HiRadixCache``; SGLang names storage pages by an
  unsalted chain, so kvdrive salts salted requests' chains itself.
- ``unified`` (0.5.21 on, where ``HiRadixCache`` is gone): kvdrive's cache subclasses ``UnifiedRadixCache``, built
  by ``create_unified_radix_cache(ctx, cache_class=...)`` on SGLang's Python tree core (eviction order is Python
  there); SGLang salts storage keys itself, kvdrive only tags them with the tenant.

The generation is chosen by feature, not by version number, so a release in between picks the adapter whose seams it
has. Adding a release: install it, run the SGLang-facing tests (tests/sglang, tests/e2e) against it; if a seam moved,
change that generation's module or add one beside it and list it in ``_GENERATIONS``; then raise ``SUPPORTED_MAX``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from functools import lru_cache
from typing import Any, Protocol

from ..tier.errors import ConfigError

SUPPORTED_MIN = (0, 5, 17)
SUPPORTED_MAX = (0, 5, 23)


def _version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric release parts: "0.5.23" -> (0, 5, 23); "0.5.24rc1" -> (0, 5, 24); "dev" -> ()."""
    m = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        import sglang

        return str(getattr(sglang, "__version__", "unknown"))


def supported_range() -> str:
    return f"{'.'.join(map(str, SUPPORTED_MIN))} - {'.'.join(map(str, SUPPORTED_MAX))}"


def check_supported(version: str | None = None) -> str:
    """The installed SGLang's version when kvdrive supports it; ConfigError (one line) when it does not."""
    version = version or sglang_version()
    v = _version_tuple(version)[:3]
    if len(v) < 3 or not SUPPORTED_MIN <= v <= SUPPORTED_MAX:
        raise ConfigError(
            f"kvdrive supports SGLang {supported_range()}; this is SGLang {version}. kvdrive stays "
            "off (SGLang runs without it): install a supported SGLang, or a kvdrive release that "
            "supports this one"
        )
    return version


class RadixAdapter(Protocol):
    """What kvdrive needs from one SGLang generation's radix cache (see the module docstring)."""

    name: str  # the generation, e.g. "hiradix", "unified"
    key_scheme: str  # how storage keys are derived; part of every page's namespace (a store written under another
    # scheme is cleanly missed, never misread)

    def build_tree_cache(self, ctx: Any) -> Any:
        """The radix-cache factory registered as ``--radix-cache-backend kvdrive``: SGLang's default cache for
        ``ctx``, as kvdrive's subclass where that cache is the hierarchical one kvdrive extends."""

    def register_key_hooks(self) -> None:
        """Register this generation's storage-key hooks (beyond the tagged-prior hook every generation uses)."""

    def namespace_fields(self) -> dict[str, str]:
        """Namespace fields naming this generation's key scheme (``{}`` for the scheme stores had before
        generations were told apart, so they stay readable)."""

    def request_slot(self, req: Any) -> Any:
        """The request's row in SGLang's req-to-token pool (the attention capture's key)."""

    def wrap_host_transfers(self, host: Any, lazy: Any) -> None:
        """With --kvdrive-gpu-decompress: route ``host``'s host->device loads (and backups, direct reads) of slots
        ``lazy`` recorded through kvdrive_sglang/gpu_decompress.py (this generation's method names)."""


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _unified_has_cache_class() -> bool:
    """SGLang builds kvdrive's own UnifiedRadixCache subclass through its public factory (0.5.21 on)."""
    import inspect

    from sglang.srt.mem_cache import registry

    fn = getattr(registry, "create_unified_radix_cache", None)
    return fn is not None and "cache_class" in inspect.signature(fn).parameters


def _sglang_salts_storage_keys() -> bool:
    from sglang.srt.mem_cache import utils

    return hasattr(utils, "get_storage_hash_str") and hasattr(utils, "storage_namespace_seed")


# generation -> (module, test for "this SGLang has that generation's seams"), newest first
_GENERATIONS = (
    (
        "unified",
        lambda: (
            not _module_exists("sglang.srt.mem_cache.hiradix_cache")
            and _unified_has_cache_class()
            and _sglang_salts_storage_keys()
        ),
    ),
    ("hiradix", lambda: _module_exists("sglang.srt.mem_cache.hiradix_cache")),
)


@lru_cache(maxsize=1)
def radix_adapter() -> RadixAdapter:
    """The adapter for the installed SGLang (its radix-cache generation)."""
    for name, present in _GENERATIONS:
        if present():
            return importlib.import_module(f"{__name__}.{name}").ADAPTER
    raise ConfigError(
        f"kvdrive: SGLang {sglang_version()} has neither HiRadixCache nor a UnifiedRadixCache that "
        f"takes a cache class; kvdrive supports SGLang {supported_range()}"
    )
