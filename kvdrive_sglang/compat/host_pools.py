"""Building one of SGLang's host KV pools from its device pool, on every supported SGLang (benchmarks and tests build
pools by hand; a server gets them from SGLang).

Up to 0.5.20 a host pool takes the device pool itself; from 0.5.21 it takes the device pool's buffer info and
capacity (what SGLang's own hybrid pool assembler hands it) and the layer range.
"""
from __future__ import annotations

import inspect
from typing import Any


def _takes_buffer_info(host_cls) -> bool:
    return "device_capacity_tokens" in inspect.signature(host_cls.__init__).parameters


def host_pool_args(host_cls, device_pool) -> tuple[tuple, dict]:
    """(leading positional arguments, extra keyword arguments) that name ``device_pool`` to ``host_cls``'s
    constructor on the installed SGLang; the caller adds the rest (ratio, size, page size, layout, ...)."""
    if not _takes_buffer_info(host_cls):
        return (device_pool,), {}
    return (device_pool.get_device_pool_infos()[0].buffer_info,), dict(
        device_capacity_tokens=device_pool.size, start_layer=device_pool.start_layer,
        end_layer=device_pool.end_layer)


def make_host_pool(host_cls, device_pool, *args: Any, **kwargs: Any):
    """``host_cls(<device_pool as this SGLang takes it>, *args, **kwargs)``."""
    lead, extra = host_pool_args(host_cls, device_pool)
    return host_cls(*lead, *args, **{**extra, **kwargs})
