"""kvdrive for SGLang: a compressed host-DRAM tier and a persistent LMDB-indexed disk store under the radix cache.

``kvdrive_sglang.tier`` is the storage engine (no SGLang import); ``kvdrive_sglang.kernels`` holds the GPU kernels
with their torch references. The SGLang adapters in this package are the only code that touches SGLang internals.
"""

__version__ = "0.1.0"
