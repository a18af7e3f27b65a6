"""bench/replay_bench.py --nodes (bench/replay/fleet.py): N replicas round-robin, with and without the shared remote
tier (issue 19), on the smoke preset's docs trace. Checks the accounting, not the numbers: every prompt token is a
hit in one tier or prefilled, the shared tier is read only where it exists, and its objects pass their checks."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIERS = ("gpu", "host", "dram", "disk", "remote")


def test_fleet_replay_accounting(tmp_path):
    out = tmp_path / "fleet"
    res = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "replay_bench.py"),
            "--preset",
            "smoke",
            "--workloads",
            "docs",
            "--nodes",
            "2",
            "--calib-pages",
            "8",
            "--out",
            str(out),
            "--dir",
            str(tmp_path / "scratch"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "fleet.json").read_text())
    runs = report["workloads"]["docs"]["runs"]
    assert [(r["nodes"], r["shared_tier"]) for r in runs] == [(2, False), (2, True)]
    for r in runs:
        assert r["requests"] == report["workloads"]["docs"]["requests"]
        assert sum(r[f"hit_tokens_{t}"] for t in TIERS) + r["prefill_tokens"] == r["prompt_tokens"]
    local, shared = runs
    assert local["prompt_tokens"] == shared["prompt_tokens"]
    assert local["hit_tokens_remote"] == 0 and "remote" not in local["bytes"]
    # documents first seen by the other node are read from the shared tier: verified, never rejected
    assert shared["hit_tokens_remote"] > 0 and shared["remote"]["objects_written"] > 0
    assert shared["remote"]["rejected"] == 0 and shared["remote"]["faults"] == 0
    assert shared["bytes"]["remote"]["read"] > 0 and shared["bytes"]["remote"]["written"] > 0
    assert "| 2 | yes |" in (tmp_path / "fleet.md").read_text()
