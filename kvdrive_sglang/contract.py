"""The radix-cache <-> storage-backend contract: what kvdrive's radix cache tells kvdrive's storage backend.

SGLang hands the radix cache its storage backend (``cache_controller.storage_backend``) and nothing more; kvdrive's
radix cache checks that backend against :class:`RadixReports` and, when it is kvdrive's, reports whole requests,
attention, host-pool spills and radix events to it. Any other backend (SGLang's file backend, a test store) gets
nothing but SGLang's own calls. The contract is the same for every SGLang version: the per-version adapters in
``kvdrive_sglang.compat`` call it, ``KvdriveStorage`` implements it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Protocol, runtime_checkable


class RadixEvent(str, Enum):
    """Radix-tree events, counted in tokens."""

    DEVICE_HIT = "device_hit"  # prompt tokens served from the GPU tree
    HOST_HIT = "host_hit"  # ... from SGLang's host pool
    STORAGE_HIT = "storage_hit"  # ... from the storage backend (kvdrive's tiers)
    EVICTED = "evicted"  # tokens evicted from the device tree
    WRITTEN_BACK = "written_back"  # device -> host copies
    LOADED_BACK = "loaded_back"  # host -> device copies


RADIX_EVENT_NAMES = tuple(e.value for e in RadixEvent)


@runtime_checkable
class RadixReports(Protocol):
    """What kvdrive's radix cache calls on its storage backend (implemented by ``KvdriveStorage``).

    Every call is statistics or a hint: the radix cache catches and logs a failure once and serves on. Optional:
    ``awaiting`` (awaiting_use.AwaitingUse), pages loaded for requests not yet run, which the eviction order keeps."""

    promoter: object  # tier.promoter.Promoter: group_score / access_score order the tree's evictions
    tenants: object  # tier.tenants.Tenants: the operator's share_as groups (storage-key prefixes)

    def expect_whole_requests(self) -> None:
        """From now on the radix cache reports every finished request: storage-level calls stop feeding the
        promoter."""

    def record_radix_event(self, kind: str, tokens: int) -> None:
        """Count ``tokens`` of radix event ``kind`` (a :class:`RadixEvent` value)."""

    def record_request(self, keys: list[str]) -> None:
        """A finished request's whole page chain, in prefix order: one access."""

    def record_attention(self, key_mass: dict[str, float]) -> None:
        """Per-page attention mass of a finished request."""

    def record_host_evicted(self, keys: list[str]) -> None:
        """Pages that just left SGLang's host pool: promotion candidates."""


@runtime_checkable
class RankClock(Protocol):
    """A promoter that can run on a clock the TP/PP ranks agree on."""

    def set_clock(self, clock: Callable[[], float]) -> None: ...
