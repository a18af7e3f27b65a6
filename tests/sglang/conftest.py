"""Fixtures shared by the tests that build SGLang's HiRadixCache on CPU."""

from __future__ import annotations

import importlib.util
import tempfile

import pytest


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as a TP=1 server has (HiRadixCache asks torch.distributed for the TP world size),
    kvdrive's radix-cache backend registered, and the parallel topology SGLang's scheduler process publishes."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed")
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_parallel

    from kvdrive_sglang import radix_backend

    created = False
    if not dist.is_initialized():
        with tempfile.NamedTemporaryFile(prefix="kvdrive-pg-", delete=False) as f:
            path = f.name
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
        created = True
    radix_backend.register()
    with get_parallel().override(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1):
        yield
    if created:
        dist.destroy_process_group()
