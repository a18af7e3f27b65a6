"""What reloads and prefills really cost on this server, measured while it serves: the promoter's cost inputs.

kvdrive must never make a request slower than no cache, and whether a reload beats recomputing depends on the
machine: an H100 prefills a 7B model at ~10k tokens/s, a CPU server at a few hundred. Assumed figures get it wrong
in both directions, so the promoter's reload-vs-recompute choice runs on measurements once there are enough:

``PREFILL``  an AROUND hook on ``ModelRunner.forward`` times the target model's extend (prefill, mixed) forward
             passes against their new tokens (not a draft model's passes, speculative verify, or a pass waiting for
             HiCache's load-back: see ``timed_pass``); the slope of the fitted line is the marginal prefill cost per
             token (the fixed part of a forward pass is paid with or without a cache hit). On CUDA the pass is
             timed with CUDA events read back later, when they have completed, so the hook never synchronises the
             GPU; on CPU with the wall clock.
             Linear in new tokens: a long prefix's attention makes real recompute dearer than the line says, so
             the error leans towards recomputing, never towards a slow reload.
``ReloadMeter``  (one per storage backend) the round trip of each storage reload: from SGLang's first
             ``batch_exists`` for a prefix to the end of its ``batch_get_v1``, against the pages it brought (prefetch
             thread hand-offs included). Its fitted fixed part is the per-reload overhead; per-tier read speeds come
             from the tier engine's own timings (see ``KvdriveStorage._calibrate``).

Nothing here blocks or raises into SGLang: a failing measurement is dropped, the first failure logged and all of them
counted (``PrefillMeter.failures``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque

from .tier.costfit import LinearFit

log = logging.getLogger("kvdrive.sglang")


def timed_pass(runner, forward_batch) -> int:
    """New tokens of a pass the prefill meter times, else 0: only the target model's own extend work (EXTEND, and
    MIXED chunked prefill whose decode rows are one new token each). Not a speculative draft model's runner
    (``is_draft_worker``), target-verify / draft-extend passes (draft tokens, not prefill), idle, split-prefill or
    dLLM passes, nor a pass that waits for HiCache's layer-wise load-back (the tp worker points the KV pool's
    ``layer_transfer_counter`` at a pending load: the pass's time is partly the host-to-device copy)."""
    if getattr(runner, "is_draft_worker", False):
        return 0
    if forward_batch.forward_mode.name not in ("EXTEND", "MIXED"):
        return 0
    counter = getattr(getattr(runner, "token_to_kv_pool", None), "layer_transfer_counter", None)
    if counter is not None and getattr(counter, "consumer_index", -1) >= 0:
        return 0
    return int(forward_batch.extend_num_tokens or 0)


class PrefillMeter:
    def __init__(self, window: int = 256):
        self.fit = LinearFit(window=window, min_samples=8, min_spread=2.0)
        self._pending: deque = deque(maxlen=64)  # (tokens, start event, end event) not yet completed on the GPU
        self._lock = threading.Lock()
        self.failures = 0  # measurements dropped after an error (the first one is logged)

    def _failed(self, where: str, e: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning(
                "kvdrive: prefill cost measurement failed %s (%s: %s); dropping it, and counting further "
                "failures in PREFILL.failures",
                where,
                type(e).__name__,
                e,
            )

    def around_forward(self, original, runner, forward_batch, *args, **kwargs):
        try:
            tokens = timed_pass(runner, forward_batch)
            cuda = str(getattr(runner, "device", "cpu")).startswith("cuda")
            if tokens and cuda:
                import torch

                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
        except Exception as e:  # noqa: BLE001 - a statistic must never fail a forward pass
            self._failed("before the pass", e)
            tokens = 0
        if not tokens:
            return original(runner, forward_batch, *args, **kwargs)
        t0 = time.perf_counter()
        out = original(runner, forward_batch, *args, **kwargs)
        try:
            if cuda:
                end.record()
                self._harvest()
                with self._lock:
                    self._pending.append((tokens, start, end))
            else:
                self.fit.add(tokens, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a statistic must never fail a forward pass
            self._failed("after the pass", e)
        return out

    def _harvest(self) -> None:
        """Completed CUDA timings into the fit (event.query() does not wait)."""
        with self._lock:
            while self._pending and self._pending[0][2].query():
                tokens, start, end = self._pending.popleft()
                self.fit.add(tokens, start.elapsed_time(end) / 1000.0)

    def seconds_per_token(self) -> float | None:
        self._harvest()  # GPU passes completed since the last extend pass count too
        line = self.fit.line()
        return line.per_unit_s if line is not None else None


class ReloadMeter:
    """Round trips of storage reloads, matched by the first key of a prefix: batch_exists starts one (the first call
    for a key chain), the batch_get_v1 that ends with its pages closes it."""

    def __init__(self, window: int = 128, max_open: int = 4096):
        self.fit = LinearFit(window=window, min_samples=4, min_spread=1.5)
        self._open: OrderedDict[str, float] = OrderedDict()
        self._max_open = max_open
        self._lock = threading.Lock()

    def exists_called(self, first_key: str, prefix_keys) -> None:
        if prefix_keys:  # a later batch of the same query: the round trip began with the first batch
            return
        with self._lock:
            self._open[first_key] = time.perf_counter()
            self._open.move_to_end(first_key)
            while len(self._open) > self._max_open:  # queries that found nothing worth getting
                self._open.popitem(last=False)

    def get_done(self, first_key: str, pages: int) -> None:
        with self._lock:
            t0 = self._open.pop(first_key, None)
        if t0 is not None and pages > 0:
            self.fit.add(pages, time.perf_counter() - t0)

    def fixed_seconds(self) -> float | None:
        line = self.fit.line()
        return line.fixed_s if line is not None else None


PREFILL = PrefillMeter()
_installed = False


# Host time of every forward pass this process ran (on a GPU: launch time, the pass runs on the device later), and
# how many: what kvdrive's hooks' own cost is a share of (attention_capture.HOOK_TIME)
FORWARDS = {"seconds": 0.0, "passes": 0}


def _around_forward(original, runner, forward_batch, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return PREFILL.around_forward(original, runner, forward_batch, *args, **kwargs)
    finally:
        FORWARDS["seconds"] += time.perf_counter() - t0
        FORWARDS["passes"] += 1


def install() -> None:
    global _installed
    if _installed:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.model_executor.model_runner.ModelRunner.forward", _around_forward, HookType.AROUND
    )
    _installed = True
