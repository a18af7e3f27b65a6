"""Run the Triton kernels on CPU under Triton's interpreter and compare them with the torch references.

    TRITON_INTERPRET=1 python -m tests.kernels.interpret_check

The environment variable must be set before Triton is imported (``triton.jit`` reads it when a kernel is
defined), so ``test_triton_interpret.py`` runs this in a subprocess. Interpreter limitations (Triton 3.6):
``tl.dot`` on bfloat16 operands multiplies their raw bits (the interpreter stores bf16 as uint16), so the
attention-mass kernels are checked with fp16 and fp32 here and with bf16 only on a GPU; float32 -> bfloat16 casts
truncate (the dequant kernel rounds on the bits itself, so that one is checked with bf16 too).
"""

from __future__ import annotations

import os
import sys
import time


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int(array)``, which NumPy >= 2.3
    refuses for its shape-(1,) arrays (``range(start, end, BLOCK)`` over loaded bounds fails). Take the element."""
    import numpy as np
    import triton.runtime.interpreter as interp

    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None:  # another Triton version: nothing to patch (if it has the same bug, the checks will say so)
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (before Triton is imported)", file=sys.stderr)
        return 2
    _patch_interpreter_index()
    import torch

    from tests.kernels import agreement, agreement_bplane

    checks = [
        ("page_copy", lambda: agreement.check_page_copy("cpu", small=True)),
        ("dequant", lambda: agreement.check_dequant("cpu", small=True)),
        (
            "attention_mass",
            lambda: agreement.check_attention_mass("cpu", dtypes=(torch.float16, torch.float32), small=True),
        ),
        ("bplane_decode", lambda: agreement_bplane.check_bplane("cpu", small=True)),
        ("compressed_load", lambda: agreement_bplane.check_compressed_load("cpu", small=True)),
    ]
    failed = 0
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            n = fn()
        except AssertionError as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        else:
            print(f"ok   {name}: {n} cases agree ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
