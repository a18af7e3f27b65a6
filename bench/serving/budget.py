"""Equal host-DRAM budget: every HiCache configuration and kvdrive get the same bytes of host DRAM for KV.

HiCache (host-only and + file backend) puts the whole budget in SGLang's host pool (``--hicache-ratio``). kvdrive
splits it: a share ``pool_share`` stays SGLang's host pool (kvdrive runs on top of HiCache and needs it for staging),
the rest becomes kvdrive's compressed DRAM tier (``--kvdrive-host-gb``), which holds ~1.5x as many tokens per byte
with zstd. radix-only gets no host tier at all (the reference for cold prefill).

SGLang sizes a host pool as ``int(device_tokens * ratio)`` tokens rounded down to whole pages plus one padding page
(mem_cache/pool_host/base.py, 0.5.17-0.5.23); both sides get that page, and the runner also records the pool size
SGLang itself logs, so the split in the results is what the servers really allocated.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
HOST_POOL_LOG = re.compile(r"Allocating (\w+) hierarchical KV host pool: (\d+) tokens")


@dataclass(frozen=True)
class HostBudget:
    """What each configuration gets, in tokens of this model's KV and in bytes."""

    bytes_per_token: int  # K and V of every layer, in the model's dtype
    device_tokens: int  # SGLang's device KV pool (--max-total-tokens)
    host_ratio: float  # HiCache's host pool / device pool
    pool_share: float  # kvdrive: the share of the budget left as SGLang's host pool

    @property
    def host_tokens(self) -> int:
        return int(self.device_tokens * self.host_ratio)

    @property
    def host_bytes(self) -> int:
        return self.host_tokens * self.bytes_per_token

    @property
    def kvdrive_pool_ratio(self) -> float:
        return self.host_ratio * self.pool_share

    @property
    def kvdrive_dram_bytes(self) -> int:
        return self.host_bytes - int(self.device_tokens * self.kvdrive_pool_ratio) * self.bytes_per_token

    def args(self, config: str) -> list[str]:
        """Launch flags that give ``config`` its share of the budget (beyond e2e_bench.server_args' own)."""
        if config in ("hicache_host", "hicache_file"):
            return ["--hicache-ratio", f"{self.host_ratio:g}"]
        if config == "kvdrive":
            return [
                "--hicache-ratio",
                f"{self.kvdrive_pool_ratio:g}",
                "--kvdrive-host-gb",
                f"{self.kvdrive_dram_bytes / GiB:.9f}",
            ]
        return []

    def describe(self) -> dict:
        return {
            **asdict(self),
            "host_budget_tokens": self.host_tokens,
            "host_budget_bytes": self.host_bytes,
            "hicache_host_pool_bytes": self.host_bytes,
            "kvdrive_host_pool_bytes": self.host_bytes - self.kvdrive_dram_bytes,
            "kvdrive_dram_tier_bytes": self.kvdrive_dram_bytes,
        }

    def line(self) -> str:
        mib = 1 << 20
        pool = self.host_bytes - self.kvdrive_dram_bytes
        return (
            f"host-DRAM budget {self.host_bytes / mib:.2f} MiB ({self.host_tokens} tokens x {self.bytes_per_token} "
            f"B): HiCache's host pool {self.host_bytes / mib:.2f} MiB (--hicache-ratio {self.host_ratio:g}); kvdrive "
            f"SGLang host pool {pool / mib:.2f} MiB (--hicache-ratio {self.kvdrive_pool_ratio:g}) + compressed DRAM "
            f"tier {self.kvdrive_dram_bytes / mib:.2f} MiB (--kvdrive-host-gb); radix-only: none"
        )


def bytes_per_token(model_dir: str) -> int:
    """KV bytes per token of a Llama-style checkpoint: 2 (K, V) x layers x KV heads x head dim x dtype size."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{model_dir}: unknown torch_dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


def logged_host_pool_tokens(log_text: str) -> int | None:
    """The KV host pool size SGLang logged at start (tokens), or None (no host pool, or a version that logs none)."""
    sizes = [int(n) for label, n in HOST_POOL_LOG.findall(log_text) if label == "kv"]
    return sizes[-1] if sizes else None
