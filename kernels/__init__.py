"""GPU kernels (Triton) for kvdrive, each beside a plain-torch reference that CPU runs and tests compare against.

- ``compressed_load``: reload kvdrive page blobs into the device KV pool with PCIe carrying them compressed
  (``load_compressed``, ``CompressedLoader``, ``LoadResult``, ``MissReason``): checksums and headers checked on the
  host, one pinned staging copy, decode on the device, scatter into the pool. Flag-gated in the serving path
  (docs/architecture.md, "Compressed to the GPU"). It drives the three kernels below.
- ``bplane_decode``: decode of ``tier.bplane`` page bodies, one program per 4 KiB block (``bplane_decode``),
  bit-identical to the numpy codec.
- ``dequant``: dequantise-on-load of the int8 / fp8 (e4m3fn) page bodies of ``tier.codecs`` (``dequant_body``);
  bit-identical to ``tier.codecs.decode_page`` for the page's own dtype.
- ``page_copy``: page scatter from contiguous staging into SGLang's paged per-layer KV buffers
  (``[num_slots, heads, head_dim]``), all layers in one launch (``scatter_pages_layers``). Bit-exact for every dtype.
- ``attention_mass``: per-page softmax mass of a decode step from q, the paged K buffer and SGLang's
  ``req_to_token`` table, optionally reusing the attention backend's LSE (``page_attention_mass``).

Each dispatcher runs the Triton kernel when its tensors are on a CUDA device and the torch reference (``*_ref``)
otherwise; ``impl="torch"`` / ``impl="triton"`` forces one. Triton is imported only when a Triton kernel is about to
run, and torch only when one of the names below is first used: importing this package costs nothing and works
without either. The storage engine in ``kvdrive_sglang.tier`` does not depend on it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "compressed_load": ("load_compressed", "check_blob", "CompressedLoader", "LoadResult", "MissReason"),
    "bplane_decode": ("bplane_decode", "bplane_decode_ref"),
    "page_copy": ("scatter_pages_layers", "scatter_pages_layers_ref", "page_slots"),
    "dequant": ("dequant_body", "split_lossy_body", "dequant_body_ref", "dequant_rows_ref"),
    "attention_mass": ("page_attention_mass", "page_attention_mass_ref", "attention_lse", "attention_lse_ref"),
    "_dispatch": ("triton_available",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
