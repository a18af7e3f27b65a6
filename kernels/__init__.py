"""GPU kernels (Triton) for kvdrive, each beside a plain-torch reference that tests compare against.

The kernels (page gather/scatter, dequantise-on-load, per-page attention mass) arrive with the promoter work; the
storage engine in ``kvdrive_sglang.tier`` does not depend on them.
"""
