"""Views of caller buffers as byte arrays, without copying.

Callers hand numpy arrays, bytearrays, memoryviews or (when torch is installed) CPU tensors. The tier works on
uint8 numpy views of them: flat for a contiguous buffer, or [rows, row bytes] for a page whose bytes lie in rows that
are each contiguous but not adjacent (a page of a layer-first SGLang host pool spans every layer's K and V: the
storage backend decodes straight into those slots, kvdrive_sglang/host_pages.py). A buffer that cannot be viewed
either way without a copy is an error, never a silent copy.
"""

from __future__ import annotations

import numpy as np

from .errors import CodecError


def byte_view(buf, *, writable: bool = False) -> np.ndarray:
    """A uint8 view of ``buf`` (no copy): flat (1-D) for a contiguous buffer, 2-D [rows, row bytes] for a 2-D array or
    tensor whose rows are each contiguous (see :func:`is_rows`). Raises CodecError for any other layout, and for
    read-only input when writing."""
    if type(buf).__module__.startswith("torch"):
        if buf.device.type != "cpu":
            raise CodecError(f"page buffer is on {buf.device}; the tier reads and writes host (CPU) buffers only")
        torch = __import__("torch")
        if buf.is_contiguous():
            arr = buf.reshape(-1).view(torch.uint8).numpy()
        elif buf.dim() == 2 and buf.stride(1) == 1:
            arr = _rows(buf.view(torch.uint8).numpy())
        else:
            raise CodecError(f"page buffer (torch tensor of shape {tuple(buf.shape)}) is not contiguous, nor in rows")
    elif isinstance(buf, np.ndarray):
        if buf.flags.c_contiguous:
            arr = buf.reshape(-1).view(np.uint8)
        elif buf.ndim == 2 and buf.strides[1] == buf.itemsize:
            arr = _rows(buf.view(np.uint8))
        else:
            raise CodecError(f"page buffer of shape {buf.shape} is not C-contiguous, nor in contiguous rows")
    else:
        try:
            arr = np.frombuffer(buf, dtype=np.uint8) if not writable else np.asarray(memoryview(buf).cast("B"))
        except (TypeError, ValueError) as e:
            raise CodecError(f"page buffer of type {type(buf).__name__} is not a contiguous byte buffer: {e}") from None
    if writable and not arr.flags.writeable:
        raise CodecError("page output buffer is read-only")
    return arr


def _rows(arr: np.ndarray) -> np.ndarray:
    # rows that overlap would make a decode's result depend on write order: refused
    if arr.shape[0] > 1 and abs(arr.strides[0]) < arr.shape[1]:
        raise CodecError(f"page buffer rows of {arr.shape[1]} bytes overlap (row stride {arr.strides[0]})")
    return arr


def is_rows(arr: np.ndarray) -> bool:
    """Whether a :func:`byte_view` is the 2-D [rows, row bytes] form (else it is flat)."""
    return arr.ndim == 2


def fill(out_u8: np.ndarray, src) -> None:
    """Copy the flat bytes ``src`` (a 1-D uint8 array of ``out_u8.size`` bytes) into a :func:`byte_view`, flat or in
    rows: one strided copy, no temporary."""
    out_u8[...] = src.reshape(out_u8.shape) if is_rows(out_u8) else src
