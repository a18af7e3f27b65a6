"""Per-page attention mass, captured from SGLang's forward passes: the promoter's attention signal.

An AFTER hook on ``RadixAttention.forward`` sees each sampled layer's query (``layers``) on two kinds of pass:

``DECODE``  every ``every_steps``-th eager decode step: each request's one query over all its pages.
``EXTEND``  every extend (prefill, and chunked-prefill MIXED) pass of a request with a cached prefix: the last
            ``extend_rows`` query tokens of each request, each over its causal span (prefix + new tokens so far);
            only the mass on the *prefix* pages is kept, as those are the cached pages whose value we rank. Extend
            passes are never replayed from CUDA graphs, so a GPU server feeds the signal here even when every
            decode step runs in a graph (where no Python runs and nothing can be captured).

The mass is softmax weight summed over query heads, with the layer's own ``scaling``, ``logit_cap`` (tanh soft
cap) and, for an fp8 KV cache, ``k_scale_float``; the head geometry (``tp_q_head_num``, ``tp_k_head_num``,
``qk_head_dim``) is the layer's, so MLA (one 576-wide latent KV head, the query's rope part passed as ``q_rope``)
works too. Sliding-window layers, speculative verify / draft passes and CUDA-graph capture are never sampled.

The forward is never synchronised: the kernel runs on the current stream, its [rows, groups] float32 result and the
rows' req-pool slots are copied ``non_blocking`` into pinned host buffers with a recorded event (``PendingSample``),
and completed samples are folded into the per-request accumulators later, by ``harvest`` (at the next sampled hook
call, and in ``pop``). On CPU the same code runs with no event: a sample is complete at once but still waits for
``harvest``. A row's pages are summed on the device into at most ``max_groups`` groups of a power-of-two number of
pages (exact per page up to ``max_groups`` pages; past that a group's mass is spread evenly over its pages). On
CUDA the Triton kernel for a layer geometry is compiled once by a background warm-up before any sample runs it
(samples are skipped until then), so no request waits for a JIT. ``pop`` (kvdrive's radix cache, when a request
finishes) returns the request's float64 mass per page; samples still in flight for a popped slot are dropped.

Config: ``KVDRIVE_ATTENTION_EVERY`` (decode steps between samples, default 8; 0 turns capture off),
``KVDRIVE_ATTENTION_LAYERS`` (comma-separated layer ids; default: layer 1 and every 8th after it),
``KVDRIVE_ATTENTION_EXTEND_ROWS`` (query tokens per request on extend passes, default 4; 0: decode only).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

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
_FP8 = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


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


class PassKind(enum.Enum):
    DECODE = "decode"
    EXTEND = "extend"


def pass_kind(forward_mode) -> PassKind | None:
    """Which passes feed the signal: decode and extend / mixed (chunked prefill); never speculative verify or draft
    passes (their queries are draft tokens), idle, split-prefill or dLLM passes."""
    if forward_mode.is_decode():
        return PassKind.DECODE
    if forward_mode.name in ("EXTEND", "MIXED"):
        return PassKind.EXTEND
    return None


@dataclass
class SamplePlan:
    """The query rows of one forward pass (built once per pass from SGLang's host-side lengths, shared by its
    sampled layers): ``q_index`` picks the rows out of the pass's queries (None: all of them, decode), ``batch_index``
    their requests, ``lens`` each row's causal length, ``keep`` how many of its pages' mass to keep."""

    kind: PassKind
    q_index: torch.Tensor | None  # [R] on the device
    batch_index: torch.Tensor | None  # [R] on the device
    lens: torch.Tensor  # [R] on the device
    keep: list[int]  # host
    keep_mask: torch.Tensor | None  # [R, keep_pages] bool on the device (extend: only prefix pages)
    num_pages: int  # kernel output width (longest row)
    keep_pages: int  # max(keep)
    group: int  # pages per copied group


@dataclass
class PendingSample:
    """One sampled layer's result on its way to the host: complete when ``event`` (None on CPU) has completed."""

    seq: int
    event: object
    slots: torch.Tensor  # [R] int64, host
    mass: torch.Tensor  # [R, groups] float32, host
    keep: list[int]
    group: int

    def done(self) -> bool:
        return self.event is None or self.event.query()


class AttentionCapture:
    def __init__(
        self,
        every_steps: int | None = None,
        layers: set[int] | None = None,
        max_requests: int = 4096,
        extend_rows: int | None = None,
        max_groups: int = 4096,
        max_pending: int = 256,
        warm_up: bool | None = None,
    ):
        self.every = _env_int("KVDRIVE_ATTENTION_EVERY", 8) if every_steps is None else every_steps
        if layers is None:
            raw = os.environ.get("KVDRIVE_ATTENTION_LAYERS", "")
            layers = {int(x) for x in raw.split(",") if x.strip().isdigit()} or None
        self.layers = layers  # None: layer 1, 9, 17, ...
        self.extend_rows = _env_int("KVDRIVE_ATTENTION_EXTEND_ROWS", 4) if extend_rows is None else extend_rows
        self.max_requests = max_requests
        self.max_groups = max(1, max_groups)
        self.max_pending = max_pending
        self.warm_up = _CUDA if warm_up is None else warm_up  # only a Triton kernel needs compiling
        self._warm = KernelWarmup()
        self._step = 0
        self._first_layer = None
        self._mass: dict[int, np.ndarray] = {}  # req-pool slot -> float64 mass per page
        self._pending: deque[PendingSample] = deque()
        self._popped: dict[int, int] = {}  # slot -> launch seq at its pop: older samples of it are dropped
        self._seq = 0
        self._plan_for = None  # the forward batch _plan was built for
        self._plan: SamplePlan | None = None
        self._lock = threading.Lock()
        self._disabled_reason = None
        self.launched = 0
        self.samples = 0  # folded into the accumulators
        self.skipped = 0  # queue full or kernel still warming up

    def sampled_layer(self, layer_id: int) -> bool:
        if self.layers is not None:
            return layer_id in self.layers
        return layer_id % 8 == 1

    def _disable(self, reason: str) -> None:
        self._disabled_reason = reason
        log.warning("kvdrive: attention capture off: %s", reason)

    # ------------------------------------------------------------------------------------------------ forward side

    def on_forward(self, layer, q, forward_batch, backend, q_rope=None) -> None:
        """Called after each attention layer's forward. Cheap unless this is a sampled pass and layer; launches the
        sample's device work and its copy to the host, and never waits for either."""
        if not self.every or self._disabled_reason is not None:
            return
        kind = pass_kind(forward_batch.forward_mode)
        if kind is None or (kind is PassKind.EXTEND and not self.extend_rows):
            return
        lid = layer.layer_id
        if not self.sampled_layer(lid) or (getattr(layer, "sliding_window_size", -1) or -1) > 0:
            return
        if _graph_capture():
            # SGLang is capturing CUDA graphs (the warm-up and captured forwards of each batch size): a sample
            # reads back to the host, which invalidates the capture and fails the server start; and these steps
            # are no requests', so they are not counted either
            return
        if kind is PassKind.DECODE:
            if getattr(forward_batch, "spec_info", None) is not None:  # a draft model's decode steps
                return
            if self._first_layer is None or lid < self._first_layer:
                self._first_layer = lid
            if lid == self._first_layer:
                self._step += 1
            if self._step % self.every:
                return
        self.harvest()
        pools = (getattr(backend, "req_to_token_pool", None), getattr(backend, "token_to_kv_pool", None))
        if pools[0] is None or pools[1] is None:
            self._disable(f"attention backend {type(backend).__name__} exposes no KV pools")
            return
        if len(self._pending) >= self.max_pending:  # the device is far behind: skip rather than queue more
            self.skipped += 1
            return
        try:
            self._launch(kind, layer, q, q_rope, forward_batch, pools[0].req_to_token, pools[1])
        except Exception as e:  # noqa: BLE001 - the signal is optional; serving is not
            self._disable(f"{type(e).__name__}: {e}")

    def _plan_pass(self, kind: PassKind, forward_batch, page_size: int) -> SamplePlan | None:
        if self._plan_for is forward_batch:
            return self._plan
        plan = build_plan(kind, forward_batch, page_size, self.extend_rows, self.max_groups)
        self._plan_for, self._plan = forward_batch, plan
        return plan

    def _launch(self, kind, layer, q, q_rope, forward_batch, req_to_token, kv_pool) -> None:
        page_size = int(getattr(kv_pool, "page_size", 1))
        plan = self._plan_pass(kind, forward_batch, page_size)
        if plan is None:
            return
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        k_buffer = kv_pool.get_key_buffer(layer.layer_id)
        q = layer_queries(q, q_rope, hq, d)
        if k_buffer.dim() != 3 or k_buffer.shape[1:] != (hkv, d):
            raise ValueError(
                f"layer {layer.layer_id}: key buffer {tuple(k_buffer.shape)} is not [slots, {hkv}, "
                f"{d}] (tp_k_head_num, qk_head_dim)"
            )
        rpi = forward_batch.req_pool_indices
        if plan.q_index is not None:
            q = q[plan.q_index]
        elif q.shape[0] < len(plan.keep):
            raise ValueError(f"decode pass of {len(plan.keep)} requests has {q.shape[0]} query rows")
        else:
            q = q[: len(plan.keep)]  # rows past the batch are padding
        rows_rpi = rpi[plan.batch_index] if plan.batch_index is not None else rpi
        cap = float(getattr(layer, "logit_cap", 0.0) or 0.0)
        if str(getattr(layer, "logit_capping_method", "tanh") or "tanh") != "tanh":
            cap = 0.0
        k_scale = getattr(layer, "k_scale_float", None) if k_buffer.dtype in _FP8 else None
        if self.warm_up and not self._warm.ready(
            q, k_buffer, req_to_token, plan.lens, rows_rpi, page_size, k_scale, cap
        ):
            self.skipped += 1  # the kernel for this geometry is still compiling off the request path
            return
        mass = _kernel(
            q.contiguous(),
            k_buffer,
            req_to_token,
            plan.lens,
            page_size,
            scale=float(layer.scaling),
            req_pool_indices=rows_rpi,
            num_pages=plan.num_pages,
            k_scale=k_scale,
            logit_cap=cap,
        )
        grouped = group_pages(mass, plan)
        self._enqueue(grouped, rows_rpi, plan)

    def _enqueue(self, grouped: torch.Tensor, rows_rpi: torch.Tensor, plan: SamplePlan) -> None:
        if grouped.is_cuda:
            mass_h = torch.empty(grouped.shape, dtype=torch.float32, pin_memory=True)
            slots_h = torch.empty(rows_rpi.shape, dtype=torch.int64, pin_memory=True)
            mass_h.copy_(grouped, non_blocking=True)
            slots_h.copy_(rows_rpi.to(torch.int64), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # CPU: nothing to wait for, but folded only at harvest like a device sample
            mass_h, slots_h, event = grouped, rows_rpi.to(torch.int64), None
        with self._lock:
            self._seq += 1
            self._pending.append(PendingSample(self._seq, event, slots_h, mass_h, plan.keep, plan.group))
            self.launched += 1

    # ------------------------------------------------------------------------------------------------ host side

    def harvest(self) -> int:
        """Fold completed samples (oldest first; ``event.query()`` does not wait) into the accumulators."""
        n = 0
        with self._lock:
            while self._pending and self._pending[0].done():
                self._fold(self._pending.popleft())
                n += 1
            if not self._pending:
                self._popped.clear()  # no sample older than a pop is left
        return n

    def _fold(self, s: PendingSample) -> None:
        slots = s.slots.numpy()
        mass = s.mass.numpy().astype(np.float64)
        for i, keep in enumerate(s.keep):
            slot = int(slots[i])
            if keep <= 0 or self._popped.get(slot, -1) >= s.seq:
                continue  # its request finished (and was popped) before this sample completed
            row = expand_groups(mass[i], s.group, keep)
            acc = self._mass.get(slot)
            if acc is None or len(acc) < keep:
                grown = np.zeros(keep, dtype=np.float64)
                if acc is not None:
                    grown[: len(acc)] = acc
                acc = grown
            acc[:keep] += row
            self._mass[slot] = acc
        self.samples += 1
        while len(self._mass) > self.max_requests:  # slots whose requests never finished (aborted)
            self._mass.pop(next(iter(self._mass)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pop(self, slot) -> np.ndarray | None:
        """The finished request's mass per page (float64), after folding every completed sample. A sample of it
        still in flight (a later pass already launched) is dropped when it completes: the slot may be reused."""
        if slot is None:
            return None
        self.harvest()
        with self._lock:
            if self._pending:
                self._popped[int(slot)] = self._seq
            return self._mass.pop(int(slot), None)


def layer_queries(q: torch.Tensor, q_rope: torch.Tensor | None, hq: int, d: int) -> torch.Tensor:
    """The layer's queries as ``[tokens, q_heads, qk_head_dim]``; MLA backends pass the rope part separately
    (``q_rope``), to be joined after the latent part as in the key buffer."""
    if q_rope is not None and q.numel() // max(1, q.shape[0]) != hq * d:
        q = torch.cat([q.reshape(q.shape[0], hq, -1), q_rope.reshape(q_rope.shape[0], hq, -1)], dim=-1)
    if q.numel() % (hq * d):
        raise ValueError(f"query {tuple(q.shape)} is not a multiple of [q_heads {hq}, qk_head_dim {d}]")
    return q.reshape(-1, hq, d)


def build_plan(kind: PassKind, forward_batch, page_size: int, extend_rows: int, max_groups: int) -> SamplePlan | None:
    """The pass's sampled query rows from SGLang's host-side lengths (``seq_lens_cpu``, ``extend_*_lens_cpu``):
    reading its device tensors here would synchronise the forward. None: nothing to sample."""
    device = forward_batch.req_pool_indices.device
    if kind is PassKind.DECODE:
        lens_cpu = forward_batch.seq_lens_cpu
        if lens_cpu is None:
            raise ValueError("the decode batch carries no host copy of seq_lens (seq_lens_cpu)")
        keep = [-(-int(n) // page_size) for n in lens_cpu.tolist()]
        if not keep or max(keep) == 0:
            return None
        return SamplePlan(
            kind, None, None, forward_batch.seq_lens, keep, None, max(keep), max(keep), _group(max(keep), max_groups)
        )
    prefix, ext = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
    if prefix is None or ext is None:
        raise ValueError("the extend batch carries no host copy of its prefix / extend lengths")
    q_index, batch_index, lens, keep = [], [], [], []
    start = 0
    for b, (pre, new) in enumerate(zip(prefix, ext)):
        pre, new = int(pre), int(new)
        cached = pre // page_size  # whole cached pages: the ones in the tree
        for j in range(min(extend_rows, new) if cached else 0):  # the last query tokens, each over its causal span
            q_index.append(start + new - 1 - j)
            batch_index.append(b)
            lens.append(pre + new - j)
            keep.append(cached)
        start += new
    if not keep:
        return None
    keep_pages = max(keep)
    pin = device.type == "cuda"

    def dev(values, dtype):
        return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)

    keep_t = dev(keep, torch.int32)
    keep_mask = torch.arange(keep_pages, device=device)[None, :] < keep_t[:, None]
    return SamplePlan(
        kind,
        dev(q_index, torch.int64),
        dev(batch_index, torch.int64),
        dev(lens, forward_batch.seq_lens.dtype),
        keep,
        keep_mask,
        max(-(-n // page_size) for n in lens),
        keep_pages,
        _group(keep_pages, max_groups),
    )


def _group(pages: int, max_groups: int) -> int:
    g = 1
    while -(-pages // g) > max_groups:
        g *= 2
    return g


def group_pages(mass: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
    """[rows, pages] -> [rows, groups]: the kept pages only (extend: the prefix), summed in groups of
    ``plan.group`` pages on the device, so the copy to the host stays bounded however long the sequences."""
    mass = mass[:, : plan.keep_pages]
    if plan.keep_mask is not None:
        mass = mass * plan.keep_mask
    if plan.group > 1:
        n = -(-plan.keep_pages // plan.group) * plan.group
        mass = torch.nn.functional.pad(mass, (0, n - plan.keep_pages)).view(mass.shape[0], -1, plan.group).sum(-1)
    return mass.float()


def expand_groups(row: np.ndarray, group: int, keep: int) -> np.ndarray:
    """A copied row back to ``keep`` pages: each group's mass spread evenly over its pages (exact when group is 1)."""
    if group == 1:
        return row[:keep]
    n = -(-keep // group)
    counts = np.minimum(group, keep - np.arange(n) * group)
    return np.repeat(row[:n] / counts, group)[:keep]


def _kernel(*args, **kwargs) -> torch.Tensor:
    """kvdrive's mass kernel: Triton on CUDA tensors, its torch reference otherwise."""
    from .kernels import page_attention_mass

    return page_attention_mass(*args, **kwargs)


class KernelWarmup:
    """Compiles the Triton mass kernels for a layer geometry on a background thread and stream, on small inputs of
    the same dtypes and strides (the kernels do not specialise on the lengths), so a request never waits for the
    JIT: until a geometry is ready its samples are skipped."""

    def __init__(self):
        self._state: dict[tuple, str] = {}  # geometry -> "warming" | "ready" | "failed"
        self._lock = threading.Lock()

    def ready(self, q, k_buffer, req_to_token, lens, rpi, page_size, k_scale, cap) -> bool:
        key = (
            tuple(q.shape[1:]),
            q.dtype,
            tuple(k_buffer.shape[1:]),
            tuple(k_buffer.stride()),
            k_buffer.dtype,
            req_to_token.dtype,
            req_to_token.stride(0),
            lens.dtype,
            rpi.dtype,
            page_size,
            k_scale is not None,
            cap > 0,
            q.device,
        )
        with self._lock:
            state = self._state.get(key)
            if state is None:
                self._state[key] = "warming"
                spec = (
                    q.shape[1:],
                    q.dtype,
                    k_buffer.shape[1:],
                    k_buffer.dtype,
                    req_to_token.dtype,
                    req_to_token.shape[1],
                    lens.dtype,
                    rpi.dtype,
                    page_size,
                    k_scale,
                    cap,
                    q.device,
                )
                threading.Thread(
                    target=self._compile, args=(key, spec), daemon=True, name="kvdrive-attention-warmup"
                ).start()
        return state == "ready"

    def _compile(self, key, spec) -> None:
        (hq, d), qdt, kshape, kdt, rdt, width, ldt, pdt, page_size, k_scale, cap, device = spec
        try:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                q = torch.zeros(3, hq, d, dtype=torch.float32, device=device).to(qdt)
                k = torch.zeros(64, *kshape, dtype=torch.float32, device=device).to(kdt)
                r2t = torch.zeros(2, width, dtype=rdt, device=device)
                longest = min(33, width)  # a few tiles, within the table (test_samples_wait_for_the_kernels_warm_up)
                lens = torch.tensor([min(5, width), 1, longest], dtype=ldt, device=device)
                rpi = torch.tensor([0, 1, 1], dtype=pdt, device=device)
                _kernel(
                    q,
                    k,
                    r2t,
                    lens,
                    page_size,
                    scale=1.0,
                    req_pool_indices=rpi,
                    num_pages=-(-longest // page_size),
                    k_scale=k_scale,
                    logit_cap=cap,
                )
            if stream is not None:
                stream.synchronize()  # this thread only
            state = "ready"
        except Exception as e:  # noqa: BLE001 - a geometry the kernel cannot run is left unsampled
            log.warning("kvdrive: attention mass kernel warm-up failed for %s: %s: %s", key, type(e).__name__, e)
            state = "failed"
        with self._lock:
            self._state[key] = state


CAPTURE = AttentionCapture()
_installed = False


# Host time spent in the hook, all calls (sampled or not): the capture's own overhead, which the storage backend
# reports beside the forward passes' host time (cost_meter.FORWARDS) in its summary line and stats
HOOK_TIME = {"seconds": 0.0, "calls": 0}


def _after_attention_forward(result, layer, q, k, v, forward_batch, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        from sglang.srt.layers.radix_attention import get_attn_backend

        CAPTURE.on_forward(layer, q, forward_batch, get_attn_backend(), q_rope=kwargs.get("q_rope"))
    except Exception:  # never fail a forward pass for a statistic
        if CAPTURE._disabled_reason is None:
            CAPTURE._disabled_reason = "hook error"
            log.exception("kvdrive: attention capture off after an error")
    HOOK_TIME["seconds"] += time.perf_counter() - t0
    HOOK_TIME["calls"] += 1
    # returns None: SGLang keeps the original result


def install() -> None:
    global _installed
    if _installed or not CAPTURE.every:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.layers.radix_attention.RadixAttention.forward", _after_attention_forward, HookType.AFTER
    )
    _installed = True
