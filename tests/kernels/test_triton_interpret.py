"""The Triton kernels themselves, run on CPU by Triton's interpreter, agree with the torch references.

Without a GPU this is the only run the Triton code gets: the same agreement checks as ``test_gpu.py`` (bit-exact
scatter, dequantisation, bplane decode and the whole compressed load; attention mass within tolerance), in a
subprocess because ``TRITON_INTERPRET=1`` must be set before Triton is imported. It cannot show speed, and bf16
``tl.dot`` is left to the GPU (see ``interpret_check.py``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernels_agree_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-m", "tests.kernels.interpret_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("ok ") == 5
