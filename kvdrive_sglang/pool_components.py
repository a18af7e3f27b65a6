"""SGLang's host pools other than the main KV pool ("components"): which kvdrive stores, and under which namespace.

Beside the target model's KV pool SGLang may hand a storage backend more pools:

- speculative decoding's **draft** KV pool. SGLang 0.5.17's generic path writes its pages through the per-key calls
  under component keys ``"<page key>.draft"`` (``HiCacheStorage._get_component_key``'s ``{key}.{pool}``); SGLang
  0.5.21+ registers it with ``register_mem_host_pool_v2(pool, PoolName.DRAFT)`` and moves it with the ``*_v2`` calls
  beside the KV pool. Draft pages are the draft model's KV, of the draft's geometry, so they get a namespace of
  their own (component, draft model, their own shape) under the *same tenant* as the target pages they belong to —
  a tenant's TTL, encryption and erasure cover its draft pages too (issue 15: they used to land in the default
  tenant's namespace with the target's geometry).
- hybrid and sparse-attention models' state pools (Mamba/SSM states, SWA windows, DSA indexer keys, DeepSeek-V4
  compressed regions), usually through a ``HostPoolGroup``. kvdrive does not store those yet; a server whose host
  pools include one runs with kvdrive's storage **off** (one warning naming the model type and the pool), so
  SGLang's own cache (GPU and host memory) keeps serving and nothing is half-stored: a KV page reloaded without its
  state pages would be a wrong prefix.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

DRAFT = "draft"
STORED_COMPONENTS = (DRAFT,)  # components kvdrive stores beside the main KV pool


def _pool_names() -> frozenset[str]:
    """Every pool name SGLang may use in a component key (its PoolName enum where it has one)."""
    try:
        from sglang.srt.mem_cache.hicache_storage import PoolName
    except ImportError:
        return frozenset({DRAFT})
    return frozenset(str(p.value) for p in PoolName) | {DRAFT}


_POOL_NAMES = _pool_names()


class ComponentKey(NamedTuple):
    key: str  # the page key (a target page's chain hash, tenant-tagged where salted)
    component: str  # "" for the main KV pool, else SGLang's pool name ("draft", ...)


def split_component(key) -> ComponentKey:
    """``"<key>.<pool>"`` -> (key, pool) for SGLang's pool names; any other key is the main KV pool's."""
    if type(key) is str:
        base, sep, pool = key.rpartition(".")
        if sep and base and pool in _POOL_NAMES:
            return ComponentKey(base, pool)
    return ComponentKey(key, "")


def pool_kind(pool) -> str | None:
    """``"mha"`` or ``"mla"`` for the host pools kvdrive stores (SGLang's MHA and MLA host pools, with the fields
    the namespace reads), else None."""
    if all(hasattr(pool, a) for a in ("kv_lora_rank", "qk_rope_head_dim", "layer_num", "page_size", "dtype")):
        return "mla"
    if all(hasattr(pool, a) for a in ("head_num", "head_dim", "layer_num", "page_size", "dtype")):
        return "mha"
    return None


def group_entries(pool) -> list[tuple[str, object]] | None:
    """A ``HostPoolGroup``'s (pool name, host pool) entries, anchor first; None for a single pool."""
    entries = getattr(pool, "entries", None)
    if entries is None or not hasattr(pool, "entry_map"):
        return None
    anchor = getattr(pool, "anchor_entry", None) or entries[0]
    ordered = [anchor] + [e for e in entries if e is not anchor]
    return [(str(getattr(e.name, "value", e.name)), e.host_pool) for e in ordered]


def unsupported(name: str, pool) -> str | None:
    """Why kvdrive cannot store host pool ``name`` (None: it can)."""
    kind = pool_kind(pool)
    if name not in ("", "kv") and name not in STORED_COMPONENTS:
        return f"SGLang's {name!r} host pool ({type(pool).__name__}) holds state kvdrive does not store yet"
    if kind is None:
        return f"SGLang's {name or 'kv'!r} host pool is a {type(pool).__name__}, which kvdrive cannot read as pages"
    return None


def model_kind(args) -> str:
    """The served model's type for a log line: ``model_type`` (architectures) from its config.json when the model
    path is a local directory, else the path."""
    path = getattr(args, "model_path", None)
    if not path:
        return "this model"
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        archs = ",".join(cfg.get("architectures") or [])
        return f"{cfg.get('model_type', '?')} ({archs})" if archs else str(cfg.get("model_type", path))
    except (OSError, ValueError, AttributeError):
        return str(path)
