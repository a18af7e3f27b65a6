"""Per-page attention mass, captured from SGLang's decode steps: the promoter's attention signal.

An AFTER hook on ``RadixAttention.forward`` sees each layer's query. On sampled steps (every ``every_steps``-th
decode step) and sampled layers (``layers``), it computes the softmax mass each KV page of each request received,
summed over query heads, and adds it to that request's per-page accumulator (keyed by its req-pool slot). On every
other layer and step the hook returns at once, so its cost is a few attribute reads. kvdrive's radix cache pops a
request's accumulator when the request finishes and hands it, mapped to page keys, to the storage backend.

Where SGLang replays decode through CUDA graphs no Python runs inside the graph, so masses are captured on eager
steps only (prefill-sized batches, ``--disable-cuda-graph``, CPU servers); the promoter falls back to reuse and
recency for pages it has no mass for.
Config: ``KVDRIVE_ATTENTION_EVERY`` (decode steps between samples, default 8; 0 turns capture off) and
``KVDRIVE_ATTENTION_LAYERS`` (comma-separated layer ids; default: layer 1 and every 8th after it).
"""
from __future__ import annotations

import logging
import os
import threading

import numpy as np
import torch

log = logging.getLogger("kvdrive.sglang")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        log.warning("kvdrive: %s=%r is not an integer; using %d", name, raw, default)
        return default
    return max(0, v)


_capture_flag = None  # SGLang's get_is_capture_mode, looked up once
_CUDA = torch.cuda.is_available()


def _graph_capture() -> bool:
    """Whether SGLang is capturing CUDA graphs now: its capture-mode flag (set around warm-ups and capture alike;
    ``model_executor/runner_utils/capture_mode.py`` on every supported SGLang), or a stream capturing on the GPU."""
    global _capture_flag
    if _capture_flag is None:
        try:
            from sglang.srt.model_executor.runner_utils.capture_mode import get_is_capture_mode as _capture_flag
        except ImportError:
            _capture_flag = bool  # bool() is False: only the stream check below
    return bool(_capture_flag()) or (_CUDA and torch.cuda.is_current_stream_capturing())


class AttentionCapture:
    def __init__(self, every_steps: int | None = None, layers: set[int] | None = None, max_requests: int = 4096):
        self.every = _env_int("KVDRIVE_ATTENTION_EVERY", 8) if every_steps is None else every_steps
        if layers is None:
            raw = os.environ.get("KVDRIVE_ATTENTION_LAYERS", "")
            layers = {int(x) for x in raw.split(",") if x.strip().isdigit()} or None
        self.layers = layers  # None: layer 1, 9, 17, ...
        self.max_requests = max_requests
        self._step = 0
        self._first_layer = None
        self._mass: dict[int, np.ndarray] = {}  # req-pool slot -> float64 mass per page
        self._lock = threading.Lock()
        self._disabled_reason = None
        self.samples = 0

    def sampled_layer(self, layer_id: int) -> bool:
        if self.layers is not None:
            return layer_id in self.layers
        return layer_id % 8 == 1

    def on_forward(self, layer, q, forward_batch, backend) -> None:
        """Called after each attention layer's forward. Cheap unless this is a sampled decode step and layer."""
        if not self.every or self._disabled_reason is not None:
            return
        if not forward_batch.forward_mode.is_decode():
            return
        lid = layer.layer_id
        if not self.sampled_layer(lid):
            return
        if _graph_capture():
            # SGLang is capturing CUDA graphs (the warm-up and captured forwards of each batch size): a sample
            # reads back to the host, which invalidates the capture and fails the server start; and these steps
            # are no requests', so they are not counted either
            return
        if self._first_layer is None or lid < self._first_layer:
            self._first_layer = lid
        if lid == self._first_layer:
            self._step += 1
        if self._step % self.every:
            return
        pools = (getattr(backend, "req_to_token_pool", None), getattr(backend, "token_to_kv_pool", None))
        if pools[0] is None or pools[1] is None:
            self._disabled_reason = f"attention backend {type(backend).__name__} exposes no KV pools"
            log.warning("kvdrive: attention capture off: %s", self._disabled_reason)
            return
        req_to_token, kv_pool = pools[0].req_to_token, pools[1]
        try:
            mass = page_mass(q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim), kv_pool.get_key_buffer(lid),
                             req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                             int(getattr(kv_pool, "page_size", 1)), float(layer.scaling))
        except Exception as e:  # noqa: BLE001 - the signal is optional; serving is not
            self._disabled_reason = f"{type(e).__name__}: {e}"
            log.warning("kvdrive: attention capture off after an error: %s", self._disabled_reason)
            return
        self.add(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist(), mass,
                 int(getattr(kv_pool, "page_size", 1)))

    def add(self, slots: list[int], seq_lens: list[int], mass: np.ndarray, page_size: int) -> None:
        """Add one step's [batch, pages] masses to each request's accumulator (trimmed to its own pages)."""
        with self._lock:
            self.samples += 1
            for i, slot in enumerate(slots):
                row = mass[i, :(int(seq_lens[i]) + page_size - 1) // page_size]
                acc = self._mass.get(slot)
                if acc is None or len(acc) < len(row):
                    grown = np.zeros(len(row), dtype=np.float64)
                    if acc is not None:
                        grown[:len(acc)] = acc
                    acc = grown
                acc[:len(row)] += row
                self._mass[slot] = acc
            while len(self._mass) > self.max_requests:  # slots whose requests never finished (aborted)
                self._mass.pop(next(iter(self._mass)))

    def pop(self, slot) -> np.ndarray | None:
        if slot is None:
            return None
        with self._lock:
            return self._mass.pop(int(slot), None)


def page_mass(q: torch.Tensor, k_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
              seq_lens: torch.Tensor, page_size: int, scale: float) -> np.ndarray:
    """Softmax mass per KV page for one decode step, summed over query heads: [batch, max_pages] float64.

    kvdrive's kernel: Triton on CUDA tensors, its torch reference otherwise."""
    from .kernels import page_attention_mass

    num_pages = (int(seq_lens.max()) + page_size - 1) // page_size if len(seq_lens) else 0
    out = page_attention_mass(q, k_buffer, req_to_token, seq_lens, page_size, scale=scale,
                              req_pool_indices=req_pool_indices, num_pages=num_pages)
    return out.detach().to("cpu", torch.float64).numpy()


CAPTURE = AttentionCapture()
_installed = False


def _after_attention_forward(result, layer, q, k, v, forward_batch, *args, **kwargs):
    try:
        from sglang.srt.layers.radix_attention import get_attn_backend
        CAPTURE.on_forward(layer, q, forward_batch, get_attn_backend())
    except Exception:  # noqa: BLE001 - never fail a forward pass for a statistic
        if CAPTURE._disabled_reason is None:
            CAPTURE._disabled_reason = "hook error"
            log.exception("kvdrive: attention capture off after an error")
    return None  # keep the original result


def install() -> None:
    global _installed
    if _installed or not CAPTURE.every:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.layers.radix_attention.RadixAttention.forward", _after_attention_forward,
                          HookType.AFTER)
    _installed = True
