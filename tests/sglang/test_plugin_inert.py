"""Installed but not asked for, kvdrive is inert (issue 17): a server without ``--kv-tier kvdrive`` runs SGLang's own
code paths. Each case loads SGLang's plugins the way every SGLang process does (``load_plugins``, through the
package's entry point) in a fresh interpreter, then reads SGLang's HookRegistry and host pool classes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("sglang")

LAUNCHER_MARK = "-- kvdrive probe: launcher phase --"  # on the probe's stderr: what follows is the launcher's log
PROBE = f"LAUNCHER_MARK = {LAUNCHER_MARK!r}\n" + textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    load_plugins()
    ours = sorted({t for t, hooks in HookRegistry._hooks.items()
                   for _, h, _ in hooks if getattr(h, "__module__", "").startswith("kvdrive_sglang")})
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    fallbacks = getattr(MHATokenToKVPoolHost.__init__, "_kvdrive_cpu", False)
    launched = []
    print(LAUNCHER_MARK, file=sys.stderr, flush=True)
    for argv in json.loads(sys.argv[1]) if len(sys.argv) > 1 else []:
        # the launcher's path: SGLang parses a command line, kvdrive's expansion runs around it
        from sglang.srt.server_args import prepare_server_args
        try:  # SGLang may go on to read the (absent) model's config: the mark is set before its parse
            prepare_server_args(["--model-path", "m", "--device", "cpu", *argv])
        except (Exception, SystemExit):
            pass
        launched.append(os.environ.get("KVDRIVE_SERVER"))
    print(json.dumps({"hooks": ours, "cpu_fallbacks": fallbacks, "launched": launched}))
""")
HOT_PATH = ("RadixAttention.forward", "ModelRunner.forward", "get_hash_str")
# One launcher, servers in turn (test_the_launcher_tells_its_server_processes): each command line and the mark its
# server's processes must read
LAUNCHES = [
    (["--kv-tier", "kvdrive", "--kvdrive-dir", "/tmp/kvdrive-inert-probe"], "1"),
    ([], None),
    (["--radix-cache-backend", "kvdrive", "--enable-hierarchical-cache"], "1"),
    (["--enable-hierarchical-cache"], None),
]


def probe(env_extra: dict, argvs: list[list[str]] | None = None) -> tuple[dict, str]:
    """Run PROBE in a fresh interpreter. Returns its JSON and its log (stderr) up to the launcher phase."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVDRIVE_")}
    # offline, as every test server runs (tests/e2e/server.py): on SGLang 0.5.17 parsing a launch command for a model
    # path that is no local folder asks the Hugging Face hub about it, with retries and back-off (about 20 s a
    # command line on a machine without network; test_the_launcher_tells_its_server_processes took 99 s)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(env_extra)
    args = [sys.executable, "-c", PROBE] + ([json.dumps(argvs)] if argvs is not None else [])
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert LAUNCHER_MARK in p.stderr, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr.split(LAUNCHER_MARK, 1)[0]


@pytest.fixture(scope="module")
def plain_launcher():
    """A process of a server without kvdrive, which then (its hooks and log read first) parses LAUNCHES' command
    lines as a launcher would: one SGLang import for both tests that need exactly this process."""
    return probe({}, [argv for argv, _ in LAUNCHES])


def test_a_server_without_kvdrive_gets_no_hook_and_one_debug_line(plain_launcher):
    out, log = plain_launcher
    hot = [t for t in out["hooks"] if any(t.endswith(h) for h in HOT_PATH)]
    assert hot == [], f"kvdrive hooks on SGLang's hot path of a server without kvdrive: {hot}"
    # what remains is the launcher's flag expansion (a pass-through without the flag)
    assert out["hooks"] and all("server_args" in t or "ServerArgs" in t or "engine" in t for t in out["hooks"]), out[
        "hooks"
    ]
    assert out["cpu_fallbacks"] is False
    ours = [ln for ln in log.splitlines() if ":kvdrive" in ln]
    assert len(ours) == 1 and ours[0].startswith("DEBUG") and "inert" in ours[0], ours


def test_a_kvdrive_server_process_gets_its_hooks():
    out, _ = probe({"KVDRIVE_SERVER": "1"})
    for target in HOT_PATH:
        assert any(t.endswith(target) for t in out["hooks"]), (target, out["hooks"])


def test_cpu_fallbacks_alone_for_hicache_baselines():
    out, _ = probe({"KVDRIVE_CPU_FALLBACKS": "1"})
    gpu = (
        subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
        ).stdout.strip()
        == "True"
    )
    assert out["cpu_fallbacks"] is (not gpu)
    assert not [t for t in out["hooks"] if any(t.endswith(h) for h in HOT_PATH)]


def test_the_launcher_tells_its_server_processes(plain_launcher):
    """Each command line sets or clears the mark its server's processes read (one launcher, servers in turn)."""
    out, _ = plain_launcher
    assert out["launched"] == [want for _, want in LAUNCHES]
