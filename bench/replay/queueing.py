"""Time in the trace replay (issue 18): one GPU serving prefills in arrival order, and one disk whose device time
reads and background work (write-down, prefetch reads) share.

``FifoGpu``: requests arrive at their trace times and one GPU serves them one at a time, first come first served.
A request starts when it has arrived and the one before it has finished; its TTFT is the wait plus its service time
(reloads, then prefill: the reloads occupy the server, as they would if SGLang loaded a request's pages after
scheduling it -- SGLang's storage prefetch while a request waits in the queue is not modelled, which is pessimistic
for the tiered configurations). Decode is not modelled (prefill-bound serving, as the no-queue model).

``SharedDisk``: a fluid model of one disk device. Background work -- the bytes the write-down writes (stored bytes at
the device's write GB/s) and the promoter's prefetch reads (at its read GB/s) -- is queued as device-seconds at the
time it is issued and drains at the full device rate while no request reads. A request's read of the tier runs at
the tier's own rate (its decode over the cores used, capped by the device) while the device is free; while
background work is pending the read gets at most ``1 - write_share`` of the device's read GB/s (an I/O scheduler
sharing the device between a reader and a writer; ``write_share`` 0.5 by default) and the background work drains on
the device time the read leaves. So the bytes written in a window slow the reads in that window and after it, until
the backlog has drained. Not modelled: CPU contention between encode (writes) and decode (reads), and the page
cache (every disk read is cold).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


class QueueingError(ValueError):
    pass


@dataclass(frozen=True)
class Served:
    """One request through the FIFO GPU: when it started, how long it waited and was served, when it finished."""

    start_s: float
    wait_s: float
    service_s: float
    finish_s: float

    @property
    def ttft_s(self) -> float:
        return self.wait_s + self.service_s


class FifoGpu:
    """One GPU serving requests in arrival order (first come, first served)."""

    def __init__(self):
        self.free_at = float("-inf")
        self.first_arrival: float | None = None
        self.busy_s = 0.0

    def start(self, arrival_s: float) -> float:
        """When a request arriving at ``arrival_s`` starts (arrivals must come in trace order)."""
        if self.first_arrival is None:
            self.first_arrival = arrival_s
        return max(arrival_s, self.free_at)

    def finish(self, arrival_s: float, start_s: float, service_s: float) -> Served:
        """The request that started at ``start_s`` (from ``start``) was served for ``service_s``."""
        if service_s < 0 or start_s < arrival_s or start_s < self.free_at:
            raise QueueingError(f"request served for {service_s} s from {start_s}, arrived {arrival_s}")
        self.free_at = start_s + service_s
        self.busy_s += service_s
        return Served(start_s, start_s - arrival_s, service_s, self.free_at)

    @property
    def span_s(self) -> float:
        """From the first arrival to the last finish."""
        return 0.0 if self.first_arrival is None else self.free_at - self.first_arrival


@dataclass(frozen=True)
class DiskRead:
    """A request's read from the disk: its duration, and how much of it the background work added."""

    seconds: float
    contention_s: float


class SharedDisk:
    """One disk device shared by a request's reads and the background work (see the module docstring).

    ``read_gbps`` / ``write_gbps``: the device's own read and write GB/s (measured raw, not through a tier);
    ``write_share``: the device share background work keeps while a request reads."""

    def __init__(self, read_gbps: float, write_gbps: float, write_share: float = 0.5):
        if not read_gbps > 0 or not write_gbps > 0:
            raise QueueingError(f"disk device of {read_gbps} GB/s read, {write_gbps} GB/s write")
        if not 0 <= write_share < 1:
            raise QueueingError(f"write_share must be in [0, 1), got {write_share}")
        self.read_Bps = read_gbps * GB
        self.write_Bps = write_gbps * GB
        self.write_share = write_share
        self.t = 0.0  # the time up to which the device's state is known
        self.backlog_s = 0.0  # device-seconds of background work pending at self.t
        self.bytes_written = 0.0
        self.bytes_prefetched = 0.0
        self.contention_s = 0.0  # time requests' reads lost to background work, in all
        self.max_backlog_s = 0.0

    def _advance(self, t: float) -> None:
        """No request reads between self.t and t: background work drains at the full device rate."""
        if t > self.t:
            self.backlog_s = max(0.0, self.backlog_s - (t - self.t))
            self.t = t

    def _queue(self, t: float, device_s: float) -> None:
        self._advance(t)
        self.backlog_s += device_s
        self.max_backlog_s = max(self.max_backlog_s, self.backlog_s)

    def write(self, t: float, nbytes: float) -> None:
        """Background: ``nbytes`` (stored bytes) written down at ``t``."""
        if nbytes > 0:
            self.bytes_written += nbytes
            self._queue(t, nbytes / self.write_Bps)

    def prefetch(self, t: float, nbytes: float) -> None:
        """Background: ``nbytes`` (stored bytes) read off the device at ``t`` ahead of demand."""
        if nbytes > 0:
            self.bytes_prefetched += nbytes
            self._queue(t, nbytes / self.read_Bps)

    def read(self, t: float, nbytes: float, rate_gbps: float) -> DiskRead:
        """A request reads ``nbytes`` from ``t`` at the tier's own ``rate_gbps`` (decode over the cores it uses,
        at most the device's read GB/s): its duration with the pending background work sharing the device."""
        if nbytes <= 0:
            return DiskRead(0.0, 0.0)
        free = min(rate_gbps * GB, self.read_Bps)
        if not free > 0:
            raise QueueingError(f"disk read at {rate_gbps} GB/s")
        self._advance(t)
        start = max(t, self.t)
        alone = nbytes / free
        if self.backlog_s <= 0:
            self.t = start + alone
            return DiskRead(alone, 0.0)
        shared = min(free, self.read_Bps * (1.0 - self.write_share))
        drain = 1.0 - shared / self.read_Bps  # device-seconds of background work per second while the read runs
        if shared >= free:  # the read takes no more than the share it is left (decode-bound): not slowed
            self.backlog_s = max(0.0, self.backlog_s - drain * alone)
            self.t = start + alone
            return DiskRead(alone, 0.0)
        until_drained = self.backlog_s / drain
        if nbytes <= shared * until_drained:
            seconds = nbytes / shared
            self.backlog_s -= drain * seconds
        else:
            seconds = until_drained + (nbytes - shared * until_drained) / free
            self.backlog_s = 0.0
        self.t = start + seconds
        self.contention_s += seconds - alone
        return DiskRead(seconds, seconds - alone)
