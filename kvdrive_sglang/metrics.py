"""kvdrive's per-tier figures: Prometheus metrics when SGLang runs with --enable-metrics, a periodic log line always.

Figures come from ``KvdriveStorage.tier_stats()``: hits per tier, bytes written/read, reload latency, codec ratio,
the codec per tier and why (tier/codec_choice.py), disk and DRAM usage, corrupt pages dropped, faults by kind, and
the radix-tree events; with --kvdrive-remote, the shared remote tier's hits, bytes, call latency, faults, rejected
objects and write-behind drops. Counters are fed by deltas, so they stay monotonic across the process's life; SGLang
runs Prometheus in multiprocess mode, which Counters support and the Gauges below declare (``mostrecent`` per rank
label).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("kvdrive.sglang")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_line(st: dict) -> str:
    h, d, hits, io = st["dram"], st["disk"] or {}, st["hits"], st["io"]

    def ratio(raw, stored) -> str:
        return f"x{raw / stored:.2f}" if stored else "-"

    parts = [
        f"DRAM {h['entries']} pages {_size(h['used_bytes'])}/{_size(h['capacity_bytes'])} "
        f"{ratio(h['raw_bytes'], h['used_bytes'])}"
    ]
    if d:
        parts.append(
            f"disk {d['entries']} pages {_size(d['file_bytes'])}/{_size(d['capacity_bytes'])} "
            f"{ratio(d['raw_bytes'], d['live_bytes'])}{'' if d['enabled'] else ' OFF'}"
        )
    codec = st.get("codec")  # CodecChoice._asdict(): the codec per tier, chosen by measurement or pinned
    if codec:
        shown = f"codec dram={codec['dram']} disk={codec['disk']}" if d else f"codec dram={codec['dram']}"
        parts.append(f"{shown} ({codec['reason']})")
    parts.append(f"hits DRAM {hits['dram'] + hits['queued']} disk {hits['disk']} miss {hits['miss']}")
    if d:
        parts.append(f"written {_size(d['bytes_written'])} read {_size(d['bytes_read'])}")
    if st.get("not_admitted_dropped") or st.get("writedown_dropped"):
        # pages that left the tiers without reaching the disk: not admitted (selective) while the disk was busy or
        # full, or a full queue
        parts.append(
            f"left DRAM unwritten {st.get('not_admitted_dropped', 0)} not admitted, "
            f"{st.get('writedown_dropped', 0)} queue full"
        )
    if st.get("not_admitted_spilled"):
        parts.append(f"written unadmitted on spare bandwidth {st['not_admitted_spilled']}")
    if io.get("promoted_pages"):
        parts.append(f"promoted disk->DRAM {io['promoted_pages']} pages")
    if "reload_ms_per_page" in st:
        parts.append(f"reload {st['reload_ms_per_page']:.2f} ms/page")
    if io.get("recompute_pages") or io.get("attention_pages"):
        parts.append(
            f"recompute-not-reload {io.get('recompute_pages', 0)} pages, "
            f"attention on {io.get('attention_pages', 0)} pages"
        )
    hooks = st.get("hooks")
    if hooks and hooks["forward_s"] > 0:
        parts.append(
            f"attention capture {hooks['capture_s'] * 1000:.0f} ms over {hooks['forwards']} forward passes "
            f"= {hooks['capture_s'] / hooks['forward_s']:.1%} of their host time"
        )
    costs = st.get("costs")
    if costs:  # what reload-vs-recompute runs on: (value, "measured" | "assumed")
        pre, fixed, disk = costs["prefill_tokens_per_s"], costs["reload_fixed_s"], costs["disk_gbps"]
        parts.append(
            f"prefill {pre[0]:.0f} tok/s ({pre[1]}), reload round trip {fixed[0] * 1000:.1f} ms "
            f"({fixed[1]}), disk {disk[0]:.2f} GB/s ({disk[1]})"
        )
    if d and (d["corrupt_dropped"] or d["faults"]):
        parts.append(f"corrupt dropped {d['corrupt_dropped']} faults {d['faults']}")
    if st.get("remote"):
        parts.append(_remote_part(st["remote"]))
    return "kvdrive: " + " | ".join(parts)


def _remote_part(r: dict) -> str:
    """The shared remote tier's part of the summary line (tier/remote/tiered.py RemoteStats)."""
    text = (
        f"remote hits {r['hits']} miss {r['misses']} read {_size(r['bytes_read'])} written {_size(r['bytes_written'])}"
    )
    if r["get_calls"]:
        text += f" get {1000 * r['get_s'] / r['get_calls']:.1f} ms/call"
    if sum(r["rejected"].values()):
        text += f" rejected {sum(r['rejected'].values())}"
    if sum(r["dropped"].values()):
        text += f" write-behind dropped {sum(r['dropped'].values())}"
    if r["faults"]:
        text += f" faults {dict(sorted(r['faults'].items()))}"
    if not r["on"]:
        text += f" OFF for {r['off_for_s']:.0f} s ({r['last_fault']})" if r["off_for_s"] else " OFF"
    return text


class TierMetrics:
    """Prometheus metrics for one rank's tiers. ``registry=None`` uses prometheus_client's default registry."""

    def __init__(self, labels: dict, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge

        reg = registry if registry is not None else REGISTRY
        self.labels = {k: str(v) for k, v in labels.items()}
        names = list(self.labels)

        def counter(name, doc, extra=()):
            return Counter(name, doc, names + list(extra), registry=reg)

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, names + list(extra), registry=reg, multiprocess_mode="mostrecent")

        self.hit_pages = counter("kvdrive:hit_pages", "KV pages served by a kvdrive tier", ["tier"])
        self.miss_pages = counter("kvdrive:miss_pages", "KV pages asked of kvdrive and not found")
        self.bytes = counter("kvdrive:bytes", "Bytes moved by kvdrive's disk tier", ["direction"])
        self.reload_seconds = counter("kvdrive:reload_seconds", "Seconds spent filling SGLang's host pool")
        self.reload_pages = counter("kvdrive:reload_pages", "Pages filled into SGLang's host pool")
        self.corrupt = counter("kvdrive:corrupt_pages_dropped", "Pages that failed their checksum (served as misses)")
        self.faults = counter("kvdrive:disk_faults", "Disk faults that turned the disk tier off for a while", ["kind"])
        # exported as kvdrive:store_recoveries_total{kind=stamp_rewritten|dirs_recreated|index_rebuilt|moved_aside|
        # tier_off}: the recovery ladder's steps when this rank opened a damaged store (tier/recovery.py)
        self.recoveries = counter("kvdrive:store_recoveries", "Steps taken to open a damaged kvdrive store", ["kind"])
        self.promoted = counter(
            "kvdrive:promoted_pages", "Pages brought up from disk into kvdrive's DRAM tier ahead of demand"
        )
        self.radix = counter("kvdrive:radix_tokens", "Radix-tree events reported by kvdrive's cache", ["event"])
        # the shared remote tier (--kvdrive-remote, tier/remote/): its hits are kvdrive:hit_pages{tier="remote"}
        self.remote_bytes = counter(
            "kvdrive:remote_bytes", "Object bytes moved to/from the shared remote tier", ["direction"]
        )
        self.remote_seconds = counter("kvdrive:remote_seconds", "Seconds spent in remote tier calls", ["op"])
        self.remote_calls = counter("kvdrive:remote_calls", "Remote tier calls made", ["op"])
        self.remote_faults = counter(
            "kvdrive:remote_faults", "Remote tier faults that turned it off for its retry window", ["kind"]
        )
        self.remote_rejected = counter(
            "kvdrive:remote_rejected_pages", "Remote objects that failed their checks (served as misses)", ["reason"]
        )
        self.remote_dropped = counter(
            "kvdrive:remote_dropped_pages",
            "Pages the write-behind dropped instead of writing to the remote tier",
            ["reason"],
        )
        self.remote_up = gauge("kvdrive:remote_up", "1 while the remote tier is on, 0 inside a fault's retry window")
        self.usage = gauge("kvdrive:usage_bytes", "Bytes held per tier", ["tier"])
        self.capacity = gauge("kvdrive:capacity_bytes", "Byte budget per tier", ["tier"])
        self.codec_ratio = gauge("kvdrive:codec_ratio", "Decoded / stored bytes per tier", ["tier"])
        self._last: dict = {}

    def _inc(self, metric, key, value, **labels):
        delta = value - self._last.get(key, 0)
        self._last[key] = value
        if delta > 0:
            metric.labels(**self.labels, **labels).inc(delta)

    def update(self, st: dict) -> None:
        h, d, hits, io = st["dram"], st["disk"], st["hits"], st["io"]
        self._inc(self.hit_pages, "hit_dram", hits["dram"] + hits["queued"], tier="dram")
        self._inc(self.hit_pages, "hit_disk", hits["disk"], tier="disk")
        self._inc(self.miss_pages, "miss", hits["miss"])
        self._inc(self.reload_seconds, "reload_s", io.get("get_seconds", 0.0))
        self._inc(self.reload_pages, "reload_pages", io.get("get_pages_ok", 0))
        self._inc(self.promoted, "promoted", io.get("promoted_pages", 0))
        for event, tokens in st["radix"].items():
            self._inc(self.radix, f"radix_{event}", tokens, event=event)
        self.usage.labels(**self.labels, tier="dram").set(h["used_bytes"])
        self.capacity.labels(**self.labels, tier="dram").set(h["capacity_bytes"])
        if h["used_bytes"]:
            self.codec_ratio.labels(**self.labels, tier="dram").set(h["raw_bytes"] / h["used_bytes"])
        self._inc(self.corrupt, "corrupt_dram", st.get("dram_corrupt_dropped", 0))
        if d:
            self._inc(self.bytes, "written", d["bytes_written"], direction="written")
            self._inc(self.bytes, "read", d["bytes_read"], direction="read")
            self._inc(self.corrupt, "corrupt", d["corrupt_dropped"])
            for kind, n in d["faults"].items():
                self._inc(self.faults, f"fault_{kind}", n, kind=kind)
            for kind, n in d.get("recoveries", {}).items():
                self._inc(self.recoveries, f"recovery_{kind}", n, kind=kind)
            self.usage.labels(**self.labels, tier="disk").set(d["file_bytes"])
            self.capacity.labels(**self.labels, tier="disk").set(d["capacity_bytes"])
            if d["live_bytes"]:
                self.codec_ratio.labels(**self.labels, tier="disk").set(d["raw_bytes"] / d["live_bytes"])
        if st.get("remote"):
            self._update_remote(st["remote"])

    def _update_remote(self, r: dict) -> None:
        self._inc(self.hit_pages, "hit_remote", r["hits"], tier="remote")
        self._inc(self.remote_bytes, "remote_read", r["bytes_read"], direction="read")
        self._inc(self.remote_bytes, "remote_written", r["bytes_written"], direction="written")
        for op in ("get", "exists", "put"):
            self._inc(self.remote_calls, f"remote_{op}_calls", r[f"{op}_calls"], op=op)
            self._inc(self.remote_seconds, f"remote_{op}_s", r[f"{op}_s"], op=op)
        for kind, n in r["faults"].items():
            self._inc(self.remote_faults, f"remote_fault_{kind}", n, kind=kind)
        for reason, n in r["rejected"].items():
            self._inc(self.remote_rejected, f"remote_reject_{reason}", n, reason=reason)
        for reason, n in r["dropped"].items():
            self._inc(self.remote_dropped, f"remote_drop_{reason}", n, reason=reason)
        self.remote_up.labels(**self.labels).set(1 if r["on"] else 0)
        self.usage.labels(**self.labels, tier="remote_queue").set(r["queued_bytes"])


class Reporter:
    """A daemon thread: every ``interval_s`` feed the metrics (if any); log a summary line when it changed."""

    def __init__(self, stats_fn, metrics: TierMetrics | None, interval_s: float = 10.0, log_every: int = 6):
        self._stats_fn, self._metrics = stats_fn, metrics
        self._interval, self._log_every = interval_s, log_every
        self._stop = threading.Event()
        self._last_line = None
        self._thread = threading.Thread(target=self._run, name="kvdrive-metrics", daemon=True)
        self._thread.start()

    def tick(self, *, log_now: bool) -> None:
        st = self._stats_fn()
        if self._metrics is not None:
            self._metrics.update(st)
        line = summary_line(st)
        if log_now and line != self._last_line:
            log.info(line)
            self._last_line = line

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._interval):
            n += 1
            try:
                self.tick(log_now=n % self._log_every == 0)
            except Exception:  # noqa: BLE001 - reporting must never take the server down
                log.exception("kvdrive: metrics update failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.tick(log_now=True)  # a last line: what the tiers held at shutdown
        except Exception:  # noqa: BLE001
            pass
