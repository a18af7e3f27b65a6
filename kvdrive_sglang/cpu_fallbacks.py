"""Torch fallbacks that let SGLang's HiCache run on a CPU-only server (no CUDA, no sgl_kernel ops).

Installed by the plugin in every SGLang process, and only when no CUDA/ROCm device is present:
- host KV pools without pinned memory (pinning needs a CUDA driver);
- ``transfer_kv_direct`` (host<->device page copies; sgl_kernel's is imported only on CUDA/HIP) as indexed torch copies;
- the paged allocator's two Triton kernels (``--page-size`` > 1) as torch code, on SGLang versions without their own
  CPU path (up to 0.5.20).
These assign into SGLang's modules (they are the only places kvdrive does), only on machines where SGLang's own
code would fail.
On a GPU none of this is touched: SGLang's own kernels run.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch

log = logging.getLogger("kvdrive.sglang")
_installed = False


def gpu_present() -> bool:
    return torch.cuda.is_available()


def transfer_kv_direct(src_layers, dst_layers, src_indices, dst_indices, page_size):
    """Torch version of sgl_kernel.kvcacheio.transfer_kv_direct: copy token rows src[si] -> dst[di], layer by layer."""
    si = src_indices.to("cpu", torch.long)
    di = dst_indices.to("cpu", torch.long)
    for s, d in zip(src_layers, dst_layers):
        d[di] = s[si].to(d.device)


class _Grid:
    """Stands in for a Triton kernel handle: ``kernel[grid](*args)`` calls ``fn(*args)``."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def alloc_extend_torch(pre_lens, seq_lens, last_loc, free_pages, out, bs_upper, page_size):
    from sglang.srt.mem_cache.allocator.paged import alloc_extend_naive

    alloc_extend_naive(pre_lens, seq_lens, last_loc, free_pages, out, page_size, out.device)


def alloc_decode_torch(seq_lens, last_loc, free_pages, out, bs_upper, page_size):
    """Torch version of the paged allocator's decode kernel: a new page where a sequence crosses a page boundary."""
    need = (seq_lens + page_size - 1) // page_size - (seq_lens - 1 + page_size - 1) // page_size
    start = torch.cumsum(need, 0) - need
    for i in range(len(seq_lens)):
        out[i] = free_pages[start[i]] * page_size if need[i] else last_loc[i] + 1


def _unpinned(orig):
    """Wrap a host pool's __init__ so pin_memory is False however it was passed (by position or keyword)."""
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def __init__(*a, **k):
        bound = sig.bind(*a, **k)
        bound.arguments["pin_memory"] = False
        orig(*bound.args, **bound.kwargs)

    __init__._kvdrive_cpu = True
    return __init__


def installed() -> bool:
    return _installed


def install() -> bool:
    """Install the fallbacks when no GPU is present. Idempotent. Returns True when they are in place."""
    global _installed
    if _installed:
        return True
    if gpu_present():
        return False
    from sglang.srt.mem_cache.allocator import paged
    from sglang.srt.mem_cache.pool_host import mha, mla

    for mod in (mha, mla):
        if not hasattr(mod, "transfer_kv_direct"):
            mod.transfer_kv_direct = transfer_kv_direct
        for cls_name in [n for n in dir(mod) if n.endswith("PoolHost")]:
            cls = getattr(mod, cls_name)
            orig = cls.__init__
            if getattr(orig, "_kvdrive_cpu", False) or "pin_memory" not in orig.__code__.co_varnames:
                continue

            cls.__init__ = _unpinned(orig)
    if "use_triton_kernels" not in paged.PagedTokenToKVPoolAllocator.__init__.__code__.co_names:
        # SGLang up to 0.5.20 launches the paged allocator's Triton kernels on every device; later ones fall back to
        # their own torch code where Triton is unsupported (use_triton_kernels), and are left alone
        paged.alloc_extend_kernel = _Grid(alloc_extend_torch)
        paged.alloc_decode_kernel = _Grid(alloc_decode_torch)
    _installed = True
    log.info("kvdrive: no GPU found; CPU fallbacks for HiCache host pools and page copies installed")
    return True
