"""The tiers a KV page can sit in, by one name each: kvdrive's vocabulary for stats, metrics, logs and the promoter.

    GPU     SGLang's device KV pool
    HOST    SGLang's own (uncompressed) host pool: HiCache's L2
    DRAM    kvdrive's compressed DRAM pool (tier/dram_pool.py)
    STAGED  raw pages acknowledged by stage_many, waiting for an encoder (tier/staging.py); read like DRAM
    QUEUED  encoded pages waiting in the write-down queue for the disk; in memory, read like DRAM
    DISK    the LMDB-indexed segment store (tier/disk_store.py)
    REMOTE  a store shared by every node, behind the disk (tier/remote/, issue 19)

``Tier`` is a ``str`` enum whose values are the strings kvdrive has always used ("dram", "disk", ...): a member equals
its string, hashes like it and prints as it, so code and stats that compare, key or log by the plain strings keep
working (the promoter's cost tables are keyed by them).
"""

from __future__ import annotations

from enum import Enum


class Tier(str, Enum):
    GPU = "gpu"
    HOST = "host"
    DRAM = "dram"
    STAGED = "staged"
    QUEUED = "queued"
    DISK = "disk"
    REMOTE = "remote"

    # str() and format() give the value on every Python from 3.10 on ("dram", not "Tier.DRAM"): logs and metric
    # labels show the tier as users know it (3.12 changed format() of mixed-in enums to follow __str__)
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# The tiers kvdrive itself holds pages in (TierEngine.tiers_of answers with these, or None)
KVDRIVE_TIERS = (Tier.STAGED, Tier.DRAM, Tier.QUEUED, Tier.DISK)
