"""The trace-replay core shared by bench/promoter_bench.py and bench/replay_bench.py (imported with bench/ on
sys.path, as the scripts run): gpu (SGLang's RadixCache as L1), tiers (HiCache's host pool and file backend),
core (one replay of one configuration, with its accounting)."""

from .core import Config, Replay
from .gpu import Gpu, PromoterStrategy, ReplayError
from .tiers import FileTier, HostTier, SyntheticPages

__all__ = ["Config", "Replay", "Gpu", "PromoterStrategy", "ReplayError", "FileTier", "HostTier", "SyntheticPages"]
