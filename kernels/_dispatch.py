"""Which implementation a dispatcher runs: the Triton kernel for CUDA tensors, the torch reference otherwise.

Triton is imported here only when a dispatcher is handed CUDA tensors (or is told ``impl="triton"``), so importing
``kvdrive_sglang.kernels`` never imports Triton and never fails where Triton is missing.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("kvdrive.kernels")

IMPLS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (checked once; a failure is logged once and the references run)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else at import
        log.warning(
            "kvdrive kernels: Triton is not importable (%s: %s); the torch references run instead", type(e).__name__, e
        )
        return False
    return True


def use_triton(impl: str, *tensors) -> bool:
    """Decide for one call. ``impl``: "auto" (Triton when every tensor is on a CUDA device and Triton imports,
    else the torch reference), "triton" (always; on CPU tensors this only works under ``TRITON_INTERPRET=1``),
    "torch" (always the reference)."""
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was asked for but Triton does not import here")
        return True
    if impl != "auto":
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    return all(t.is_cuda for t in tensors if t is not None) and triton_available()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
