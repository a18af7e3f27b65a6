"""Views of caller buffers as flat byte arrays, without copying.

Callers hand numpy arrays, bytearrays, memoryviews or (when torch is installed) CPU tensors. The tier works on
flat uint8 numpy views of them; a buffer that cannot be viewed without a copy is an error, never a silent copy.
"""

from __future__ import annotations

import numpy as np

from .errors import CodecError


def byte_view(buf, *, writable: bool = False) -> np.ndarray:
    """A flat uint8 view of ``buf`` (no copy). Raises CodecError for non-contiguous or read-only-when-writing input."""
    if type(buf).__module__.startswith("torch"):
        if buf.device.type != "cpu":
            raise CodecError(f"page buffer is on {buf.device}; the tier reads and writes host (CPU) buffers only")
        if not buf.is_contiguous():
            raise CodecError("page buffer (torch tensor) is not contiguous")
        arr = buf.reshape(-1).view(__import__("torch").uint8).numpy()
    elif isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise CodecError(f"page buffer of shape {buf.shape} is not C-contiguous")
        arr = buf.reshape(-1).view(np.uint8)
    else:
        try:
            arr = np.frombuffer(buf, dtype=np.uint8) if not writable else np.asarray(memoryview(buf).cast("B"))
        except (TypeError, ValueError) as e:
            raise CodecError(f"page buffer of type {type(buf).__name__} is not a contiguous byte buffer: {e}") from None
    if writable and not arr.flags.writeable:
        raise CodecError("page output buffer is read-only")
    return arr
