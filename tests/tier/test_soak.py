"""The soak replay (bench/stress/soak.py) at test size: 20 s with reopens, checking the same invariants."""

import pytest

from bench.stress.soak import MiB, run


@pytest.mark.slow
def test_twenty_second_soak_stays_within_budgets(tmp_path):
    r = run(
        seconds=20,
        sample_s=1,
        host_bytes=4 * MiB,
        disk_bytes=24 * MiB,
        reopen_s=7,
        ttl_s=5,
        warmup_s=4,
        path=str(tmp_path),
        log=None,
    )
    c = r["counts"]
    assert c["requests"] > 100 and c["pages_got"] > 0 and c["reopens"] == 2, c
    assert r["maxes"]["pool_bytes"] > 0 and r["maxes"]["disk_file_bytes"] > 0  # the tiers were used
    assert r["verdict"] == {k: True for k in r["verdict"]}, (r["verdict"], r["maxes"], r["after_warmup"])
    # the samples saw real hits from the disk tier, not only DRAM
    assert sum(s["hits"][2] for s in r["samples"]) > 0
