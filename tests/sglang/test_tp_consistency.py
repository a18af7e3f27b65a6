"""Two TP ranks keep identical radix trees under the promoter's eviction order.

Each rank's attention capture sees only its own heads, and each rank reads its own clock; the eviction order decides
which KV every rank keeps, so it must come out the same on every rank or their trees (and the batches they build)
diverge. Two real processes in one gloo group each build kvdrive's radix cache over kvdrive's storage through SGLang's
registry (tests/sglang/tp_rank_worker.py: HiRadixCache's request API up to SGLang 0.5.20, SGLang's own scheduler code
over UnifiedRadixCache from 0.5.21) and serve the same prompts; rank 0 sees only the older prompt attended,
rank 1 only the newer one, and rank 1 runs 0.35 s behind at every step. Alone, rank 0 would keep the older prompt and
rank 1 the newer. Both must keep the same one: the older, whose attention summed over the ranks is the larger."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sglang")

from kvdrive_sglang.compat import radix_adapter  # noqa: E402
from kvdrive_sglang.tier.errors import ConfigError  # noqa: E402

try:  # the workers drive the installed SGLang's generation (tp_rank_worker.py picks it the same way)
    _GENERATION = radix_adapter().name
except ConfigError as e:  # an SGLang with neither generation's seams
    pytest.skip(str(e), allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_ranks_evict_alike_on_summed_attention_and_an_agreed_clock(tmp_path):
    init = tmp_path / "pg-init"
    outs = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    env = {
        **os.environ,
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "KVDRIVE_ATTENTION_EVERY": "8",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.sglang.tp_rank_worker",
                str(r),
                str(init),
                str(tmp_path / "store"),
                str(outs[r]),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    r0, r1 = (json.loads(o.read_text()) for o in outs)
    assert r0["promoter_eviction"] and r1["promoter_eviction"]  # value order, not LRU, with two ranks
    assert r0["clock"] == r1["clock"]  # one time for both, though their wall clocks differ by 0.35 s
    for name, per_page in (("older", 0.2), ("newer", 0.05)):  # each page's mass summed over the two ranks
        assert r0["mass"][name] == r1["mass"][name]  # (decayed since by the same agreed time: 120 s half-life)
        assert all(abs(m / per_page - 1) < 1e-3 for m in r0["mass"][name]), r0["mass"]
    assert r0["scores"] == r1["scores"]
    assert r0["evicted"] == r1["evicted"] >= 16
    assert r0["kept"] == r1["kept"] == {"older": 16, "newer": 0}, (r0["kept"], r1["kept"])
