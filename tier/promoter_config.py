"""The promoter's settings and result types: ``PromoterConfig``, the tiers it prices, ``Decision``, ``PrefixPlan``.

Split from promoter.py (issue 16) so the decisions module holds decisions; ``kvdrive_sglang.tier.promoter`` re-exports
every name here, so importers of ``promoter.PromoterConfig`` and ``promoter.TIERS`` keep working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ConfigError
from .validate import integer, number

# "queued": waiting for the disk, in memory; "staged": raw, waiting for an encoder (as TierEngine.tiers_of): both
# cost what DRAM does; "remote": the shared tier behind the disk (--kvdrive-remote, tier/remote/), its own cost
TIERS = ("gpu", "host", "dram", "queued", "staged", "disk", "remote")
LOSSY_CODECS = ("int8", "fp8")


@dataclass
class PromoterConfig:
    """Promoter settings. Bandwidths are GB/s (1e9 bytes/s) of decoded page bytes.

    The bandwidth and prefill defaults are assumptions, to be replaced by what the server measures:
    dram_gbps 2.0 (one core of lossless zstd decode, docs limits.md), disk_gbps 1.5 (NVMe reads of 256 KiB pages
    plus checksum and decode on one core), pcie_gbps 25 (PCIe 4.0 x16, effective), disk_latency_s 100 us (one
    NVMe read), prefill_tokens_per_s 10000 (an 8B-class model on one datacenter GPU, long prompts);
    remote_gbps 1.2 and remote_latency_s 1 ms (the shared tier: batched Mooncake gets over loopback TCP moved
    1.1-1.7 GB/s of objects here, ../shared/notes/mooncake-cpu.md; RDMA moves ~10x that: set them, or let the
    server measure its remote reads).
    """

    half_life_s: float = 120.0  # attention mass and recency halve over this long (bench: see promoter.py's doc)
    attention_floor: float = 1e-3  # heat of a page with no attention: its (decayed) recency
    admit_min_reuse: int = 2  # write down pages used at least this often...
    admit_min_value: float | None = None  # ...or whose value reaches this (None: reuse only)
    admit_continuations: bool = True  # ...or that a request continuing an earlier request's chain created
    dram_gbps: float = 2.0
    disk_gbps: float = 1.5
    pcie_gbps: float = 25.0
    disk_latency_s: float = 1e-4
    remote_gbps: float = 1.2  # decoded page bytes per second read through from the shared remote tier
    remote_latency_s: float = 1e-3  # one remote round trip (exists + get), paid on top of the local tiers' own
    prefill_tokens_per_s: float = 10000.0
    promote_share: float = 0.2  # share of the disk's read bandwidth spent bringing pages up ahead of demand (0: off)
    lossy_ok: bool = False  # allow a lossy codec on disk
    lossy_codec: str = "int8"
    max_tracked: int = 262144  # units with tracking state; beyond it the least recently observed are forgotten
    unit_tokens: int = 64  # pages under 16 tokens are tracked in runs of ceil(unit_tokens / page) (page_tracker.py)

    def __post_init__(self):
        for name in (
            "half_life_s",
            "attention_floor",
            "dram_gbps",
            "disk_gbps",
            "pcie_gbps",
            "prefill_tokens_per_s",
            "remote_gbps",
        ):
            number(getattr(self, name), f"promoter {name}")
        for name in ("disk_latency_s", "remote_latency_s"):
            number(getattr(self, name), f"promoter {name}", zero_ok=True)
        # a share of the disk's read bandwidth: "must be a number from 0 to 1"
        number(self.promote_share, "promoter promote_share", zero_ok=True, most=1)
        if self.admit_min_value is not None:
            number(self.admit_min_value, "promoter admit_min_value")
        for name in ("admit_min_reuse", "max_tracked", "unit_tokens"):
            integer(getattr(self, name), f"promoter {name}")
        for name in ("lossy_ok", "admit_continuations"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"promoter {name} must be True or False, got {getattr(self, name)!r}")
        if self.lossy_codec not in LOSSY_CODECS:
            raise ConfigError(f"promoter lossy_codec {self.lossy_codec!r} is not one of {', '.join(LOSSY_CODECS)}")

    def tier_gbps(self, tier: str) -> float:
        check_tier(tier)
        return {
            "gpu": math.inf,
            "host": math.inf,
            "dram": self.dram_gbps,
            "queued": self.dram_gbps,
            "staged": self.dram_gbps,
            "disk": self.disk_gbps,
            "remote": self.remote_gbps,
        }[tier]


class Decision(NamedTuple):
    action: str  # "reload" | "recompute"
    reload_s: float
    recompute_s: float


class PrefixPlan(NamedTuple):
    reload_pages: int  # reload the first this-many hit pages; recompute the rest of the hits
    reload_s: float  # modelled time of those reloads
    recompute_s: float  # modelled time of recomputing the hit pages not reloaded
    saved_s: float  # against recomputing every hit page


def check_tier(tier) -> None:
    if tier not in TIERS:
        raise ConfigError(f"tier {tier!r} is not one of {', '.join(TIERS)}")
