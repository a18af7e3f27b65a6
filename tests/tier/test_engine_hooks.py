"""TierEngine's hooks for the remote tier (issue 19): on_written_down sees each batch of encoded pages that landed on
the disk (the write-behind used to wrap the disk store's put_many to see them)."""

import numpy as np

from kvdrive_sglang.tier.codecs import decode_page
from kvdrive_sglang.tier.engine import TierConfig, TierEngine
from kvdrive_sglang.tier.namespace import Namespace
from kvdrive_sglang.tier.synthetic import kv_page

SHAPE = dict(page_size=16, num_heads=2, head_dim=64)
NS = Namespace(model="tiny", kv_dtype="bfloat16", layout="mha", num_layers=2, **SHAPE)


def test_on_written_down_gets_each_page_that_landed_on_disk(tmp_path):
    pages = [kv_page(np.random.default_rng(i), **SHAPE) for i in range(6)]
    seen = []
    with TierEngine(
        TierConfig(path=str(tmp_path), host_bytes=1 << 20, disk_bytes=64 << 20, write_policy="write_through")
    ) as engine:
        engine.on_written_down = lambda ns, keys, blobs: seen.append((ns, list(keys), list(blobs)))
        assert all(engine.put_many(NS, [f"k{i}" for i in range(6)], pages))
        assert engine.flush(30)
        got = {k: b for ns, keys, blobs in seen for k, b in zip(keys, blobs) if ns == NS}
        assert sorted(got) == [f"k{i}".encode() for i in range(6)]
        for i, p in enumerate(pages):  # the encoded blobs, as stored: they decode to the pages
            out = np.empty_like(p)
            decode_page(got[f"k{i}".encode()], out, "bfloat16")
            assert np.array_equal(out, p)
        # a hook that raises is logged, never stops the write-down
        engine.on_written_down = lambda ns, keys, blobs: 1 / 0
        assert all(engine.put_many(NS, ["x"], [pages[0]]))
        assert engine.flush(30) and engine.tiers_of(NS, ["x"]) != [None]
