"""bench/first_device.py --device cpu: the CPU dry run of the first-GPU-hour script, run once and its results held
to what must be true on CPU (real SGLang servers on CPU, real kvdrive stores; ~2-3 minutes on 2 cores).

Every step that can run on a CPU must pass; the ones that cannot (no CUDA device for the kernel GPU tests; MLA,
TP=2 and fp8 KV, see bench/e2e_bench.py CPU_UNSUPPORTED) must be skipped with their reason; and the results file
must be complete (commit, command, machine, date, every step with status, time and figures), so that the GPU run,
which nobody can rehearse, writes what its reader needs.
"""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "first_device.py")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="the dry run is for CPU-only machines (on a GPU run bench/first_device.py itself)",
    ),
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("first-device")
    out = tmp / "first-device-cpu"
    p = subprocess.run(
        [sys.executable, "-W", "ignore", SCRIPT, "--device", "cpu", "--out", str(out), "--workdir", str(tmp / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert os.path.exists(f"{out}.json"), (
        f"no results file (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    with open(f"{out}.json") as f:
        res = json.load(f)
    with open(f"{out}.md") as f:
        md = f.read()
    return p, res, md


def _steps(res):
    return {s["name"]: s for s in res["steps"]}


def test_results_file_is_complete(dry_run):
    from bench.first_device import STEPS, Status

    _, res, md = dry_run
    for key in ("commit", "command", "machine", "date", "device", "wall_s", "budget_s", "steps"):
        assert res.get(key), f"results lack {key}"
    assert res["device"] == "cpu" and "--device cpu" in res["command"]
    assert [s["name"] for s in res["steps"]] == [s.name for s in STEPS], "every step is recorded, in order"
    for s in res["steps"]:
        assert s["status"] in {x.value for x in Status}, s
        assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0, s
        assert f"| {s['name']} | {s['status']} |" in md, f"{s['name']} missing from the .md table"


def test_every_step_that_can_run_on_cpu_passed(dry_run):
    from bench.first_device import CPU_SKIPS

    p, res, _ = dry_run
    steps = _steps(res)
    failed = {n: s["detail"][:1500] for n, s in steps.items() if n not in CPU_SKIPS and s["status"] != "pass"}
    assert not failed, f"steps that must pass on CPU did not: {json.dumps(failed, indent=1)}\n{p.stderr[-2000:]}"
    for name in CPU_SKIPS:
        assert steps[name]["status"] == "skip" and steps[name]["detail"], f"{name}: skipped with a reason"
    assert p.returncode == 0, p.stderr[-2000:]


def test_requests_served_from_kvdrive_tiers_with_radix_outputs(dry_run):
    _, res, _ = dry_run
    figs = _steps(res)["requests"]["figures"]
    k = figs["kvdrive"]
    assert k["requests"] == 20 and figs["radix"]["requests"] == 20
    assert k["host_tokens"] + k["storage_tokens"] > 0, f"kvdrive's tiers served nothing: {figs}"
    assert figs["identical_outputs"] == "20/20", figs
    assert figs["store"].get("entries", 0) > 0, f"kvdrive's disk store is empty: {figs['store']}"


def test_server_start_used_only_the_gpu_defaults_flags(dry_run):
    """gpu-defaults: nothing beyond --kv-tier kvdrive and its store (the harness adds host, port, --max-total-tokens
    and, on CPU, --device cpu)."""
    _, res, _ = dry_run
    args = _steps(res)["server_start"]["figures"]["args"]
    assert args[:3] == ["--kv-tier", "kvdrive", "--kvdrive-dir"] and len(args) == 4, args
