"""Importing the kernels package is free (no torch, no Triton) and CPU use never needs Triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import kvdrive_sglang.kernels as kernels


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_loads_neither_torch_nor_triton():
    r = run("""
        import sys
        import kvdrive_sglang.kernels as k
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton"))
        assert not loaded, loaded
        print(len(k.__all__))
    """)
    assert r.returncode == 0, r.stderr


def test_cpu_use_works_with_triton_unimportable():
    r = run("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from kvdrive_sglang.kernels import (bplane_decode, dequant_body, page_attention_mass, scatter_pages_layers,
                                            triton_available)
        src = torch.randn(32, 2, 4)
        scatter_pages_layers([src], [0, 2], 8, torch.zeros(1, 16, 2, 4))
        dequant_body(torch.zeros(2 * (4 + 8), dtype=torch.uint8), "fp8", 8)
        bplane_decode(torch.zeros(8, dtype=torch.uint8), torch.tensor([0]), 0)
        m = page_attention_mass(torch.randn(1, 2, 4), src, torch.arange(32)[None], torch.tensor([32]), 8)
        assert abs(m.sum().item() - 2) < 1e-4
        assert not triton_available()
        try:
            scatter_pages_layers([src], [1], 8, torch.zeros(1, 8, 2, 4), impl="triton")
        except RuntimeError as e:
            assert "Triton does not import" in str(e)
        else:
            raise AssertionError("impl='triton' without Triton must fail")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_exports():
    assert {
        "load_compressed",
        "bplane_decode",
        "scatter_pages_layers",
        "dequant_body",
        "page_attention_mass",
        "attention_lse",
    } <= set(kernels.__all__)
    assert set(kernels.__all__) <= set(dir(kernels))
    assert callable(kernels.page_attention_mass)
    with pytest.raises(AttributeError):
        kernels.no_such_kernel
