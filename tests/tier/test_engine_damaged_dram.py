"""A damaged page in the DRAM tier (or the write-down queue) is a miss and is dropped, never an exception into the
caller: SGLang's prefetch thread calls get_many, and an exception there takes the server down. Found by reading
TierEngine.get_many while wiring --kvdrive-gpu-decompress (issue 18); a wrong-size output buffer is still the
caller's mistake and raises."""

import numpy as np
import pytest

from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.errors import CodecError
from tests.helpers import make_ns, small_page


def _damage(engine, ns, key: bytes) -> None:
    pk = (ns.id, key)
    entry = engine.pool._map[pk]
    blob = bytearray(entry.blob)
    blob[-40:] = b"\xff" * 40  # the body: the header still names a page of this size
    entry.blob = bytes(blob)


def test_a_damaged_dram_page_is_a_dropped_miss(tmp_path):
    ns = make_ns()
    pages = [small_page(i) for i in range(3)]
    keys = [f"k{i}".encode() for i in range(3)]
    with TierEngine(TierConfig(path=None, host_bytes=1 << 20, codec="zstd")) as e:
        e.put_many(ns, keys, pages)
        _damage(e, ns, keys[1])
        outs = [np.empty_like(p) for p in pages]
        got = e.get_many(ns, keys, outs)
        assert got == [True, False, True]
        assert np.array_equal(outs[0], pages[0]) and np.array_equal(outs[2], pages[2])
        assert not e.pool.contains((ns.id, keys[1]))  # dropped: the next lookup is a clean miss
        assert e.exists_many(ns, keys) == 1
        assert e.stats().dram_corrupt_dropped == 1


def test_a_wrong_size_buffer_still_raises(tmp_path):
    ns = make_ns()
    with TierEngine(TierConfig(path=None, host_bytes=1 << 20, codec="zstd")) as e:
        e.put_many(ns, [b"k"], [small_page(0)])
        with pytest.raises(CodecError, match="k"):
            e.get_many(ns, [b"k"], [np.empty(small_page(0).nbytes // 2, np.uint8)])
