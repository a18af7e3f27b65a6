"""Run in a fresh process: load plugins through their real entry points, then expand --kv-tier cases.

    python -m tests.sglang.flag_cases DIR FILE      -> the fixed cases below
    python -m tests.sglang.flag_cases --argv CASES  -> each case of the JSON file CASES ({"case": name, "argv": [...]}
                                                       lists, appended to the base arguments): many in one process
    python -m tests.sglang.flag_cases --engine DIR  -> sglang.Engine(kv_tier=...) as a user calls it, first thing in
                                                       the process (SGLang loads the plugins inside Engine.__init__),
                                                       stopped right after Engine built its ServerArgs: needs
                                                       SGLANG_RUST_SERVER=1 (Engine refuses that setting next, before
                                                       it starts anything)
One JSON object per line: {"case", "ok", "fields" | "error", "exit"}
"""

import contextlib
import inspect
import io
import json
import os
import sys

if sys.argv[1] == "--engine":
    # before anything loads the plugins: the first Engine() call is the one that loads them
    from sglang.srt.entrypoints.engine import Engine
else:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.entrypoints.engine import Engine  # noqa: E402

from sglang.srt.server_args import prepare_server_args  # noqa: E402

FIELDS = (
    "enable_hierarchical_cache",
    "hicache_storage_backend",
    "hicache_storage_backend_extra_config",
    "radix_cache_backend",
    "hicache_io_backend",
    "hicache_mem_layout",
    "hicache_ratio",
)


def run(case, fn):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            sa = fn()
        out = {
            "case": case,
            "ok": True,
            "fields": {f: getattr(sa, f) for f in FIELDS},
            "type": f"{type(sa).__module__}.{type(sa).__qualname__}",
        }
    except SystemExit as e:
        out = {"case": case, "ok": False, "exit": e.code, "error": err.getvalue().strip().splitlines()[-1:]}
    except Exception as e:  # noqa: BLE001
        out = {"case": case, "ok": False, "exit": None, "error": [f"{type(e).__name__}: {e}"]}
    print(json.dumps(out), flush=True)


def engine_server_args(**kwargs):
    """The real Engine.__init__ up to its ServerArgs: SGLANG_RUST_SERVER makes it raise right after building them."""
    assert os.environ.get("SGLANG_RUST_SERVER") == "1", "set SGLANG_RUST_SERVER=1, or Engine starts a server"
    assert "SGLANG_RUST_SERVER" in inspect.getsource(Engine.__init__), "this SGLang's Engine would start a server"
    engine = Engine.__new__(Engine)
    try:
        engine.__init__(**kwargs)
    except ValueError as e:
        if "SGLANG_RUST_SERVER" not in str(e):
            raise
    return engine.server_args


base = ["--model-path", "dummy", "--device", "cpu"]
if sys.argv[1] == "--engine":
    d = sys.argv[2]
    run(
        "engine-first-call",
        lambda: engine_server_args(
            model_path="dummy", device="cpu", kv_tier="kvdrive", kvdrive_dir=d, kvdrive_host_gb=1, kvdrive_codec="raw"
        ),
    )
    run("engine-plain", lambda: engine_server_args(model_path="dummy", device="cpu"))
    run(
        "engine-first-conflict",
        lambda: engine_server_args(
            model_path="dummy", device="cpu", kv_tier="kvdrive", kvdrive_dir=d, radix_cache_backend="lmcache"
        ),
    )
    run(
        "engine-bad-codec",
        lambda: engine_server_args(
            model_path="dummy", device="cpu", kv_tier="kvdrive", kvdrive_dir=d, kvdrive_codec="lz4"
        ),
    )
    run("engine-option-without-tier", lambda: engine_server_args(model_path="dummy", device="cpu", kvdrive_dir=d))
    sys.exit(0)
if sys.argv[1] == "--argv":
    with open(sys.argv[2]) as f:
        for c in json.load(f):
            run(c["case"], lambda: prepare_server_args(base + c["argv"]))
    sys.exit(0)
d = sys.argv[1]
run(
    "cli",
    lambda: prepare_server_args(
        base
        + [
            "--kv-tier",
            "kvdrive",
            "--kvdrive-dir",
            d,
            "--kvdrive-host-gb",
            "2",
            "--kvdrive-disk-gb",
            "10",
            "--kvdrive-codec",
            "raw",
        ]
    ),
)
run(
    "cli-user-layout",
    lambda: prepare_server_args(
        base
        + [
            "--kv-tier",
            "kvdrive",
            "--kvdrive-dir",
            d,
            "--hicache-mem-layout",
            "page_first",
            "--enable-hierarchical-cache",
            "--radix-cache-backend",
            "kvdrive",
        ]
    ),
)
run("no-tier", lambda: prepare_server_args(base))
run(
    "conflict-backend",
    lambda: prepare_server_args(
        base + ["--kv-tier", "kvdrive", "--kvdrive-dir", d, "--hicache-storage-backend", "file"]
    ),
)
run(
    "conflict-radix",
    lambda: prepare_server_args(
        base + ["--kv-tier", "kvdrive", "--kvdrive-dir", d, "--radix-cache-backend", "lmcache"]
    ),
)
run(
    "conflict-disable-radix",
    lambda: prepare_server_args(base + ["--kv-tier", "kvdrive", "--kvdrive-dir", d, "--disable-radix-cache"]),
)
run("bad-tier", lambda: prepare_server_args(base + ["--kv-tier", "lmcache"]))
run("option-without-tier", lambda: prepare_server_args(base + ["--kvdrive-dir", d]))
run(
    "bad-codec",
    lambda: prepare_server_args(base + ["--kv-tier", "kvdrive", "--kvdrive-dir", d, "--kvdrive-codec", "lz4"]),
)
run(
    "bad-gb",
    lambda: prepare_server_args(base + ["--kv-tier", "kvdrive", "--kvdrive-dir", d, "--kvdrive-disk-gb", "-3"]),
)
run("dir-is-a-file", lambda: prepare_server_args(base + ["--kv-tier", "kvdrive", "--kvdrive-dir", sys.argv[2]]))
# what Engine.__init__ does with its keywords once the plugins are loaded: self.server_args_class(**kwargs)
run(
    "engine-kwargs",
    lambda: Engine.server_args_class(
        model_path="dummy", device="cpu", kv_tier="kvdrive", kvdrive_dir=d, kvdrive_host_gb=1
    ),
)
run(
    "engine-conflict",
    lambda: Engine.server_args_class(
        model_path="dummy", device="cpu", kv_tier="kvdrive", kvdrive_dir=d, hicache_storage_backend="file"
    ),
)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        prepare_server_args(["--help"])
    except SystemExit:
        pass
print(json.dumps({"case": "help", "ok": "--kv-tier" in buf.getvalue() and "--kvdrive-dir" in buf.getvalue()}))
