#!/usr/bin/env bash
# bash bench/first_device.sh [WHEELDIR]   -- on the lent GPU machine, repo root as cwd (the device tool's run).
# The environment ../shared/gpu/gpu-e2e-run.sh sets up (its SGLang 0.5.17 wheelhouse over /opt/torch's torch 2.11
# cu130; nothing outside the machine reachable), kvdrive laid out next to it, then bench/first_device.py.
# Results: bench/results/gpu-first-device.{json,md} (+ -logs/ when a step failed), copied to $OUT to come back.
set -uo pipefail
cd "$(dirname "$0")/.."
WH=${1:-.wheelhouse}
SITE=${SITE:-/tmp/site}
PYBIN=${PYBIN:-/opt/torch/.venv/bin}
export PATH="$PYBIN:$PATH"   # python3 + ninja (tvm-ffi's JIT runs the `ninja` executable)
if ! command -v nvcc >/dev/null; then export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"; fi
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export TVM_FFI_CACHE_DIR=${TVM_FFI_CACHE_DIR:-/tmp/tvm-ffi-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}

if [[ ! -d $SITE/sglang ]]; then
    [[ -d $WH ]] || { echo "no SGLang in $SITE and no wheelhouse at $WH (../shared/gpu/README.md)"; exit 10; }
    rm -rf "$SITE"   # pip --target does not replace packages already in the target dir
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WH"/*.whl || exit 10
fi
# kvdrive as pyproject.toml installs it: tier/ and kernels/ importable as kvdrive_sglang.tier / .kernels (symlinks in
# this disposable copy of the tree, removed on exit), and a dist-info carrying its SGLang plugin entry point (SGLang
# finds plugins through installed metadata). By hand because a pip build needs setuptools, which the machine may
# lack, and nothing can be downloaded there.
KV=/tmp/kvdrive-dist
rm -rf "$KV" && mkdir -p "$KV/kvdrive_sglang-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: kvdrive-sglang\nVersion: 0.1.0\n' >"$KV/kvdrive_sglang-0.1.0.dist-info/METADATA"
printf '[sglang.srt.plugins]\nkvdrive = kvdrive_sglang.plugin:register\n' \
    >"$KV/kvdrive_sglang-0.1.0.dist-info/entry_points.txt"
if [[ ! -e kvdrive_sglang/tier ]]; then
    ln -s ../tier kvdrive_sglang/tier && ln -s ../kernels kvdrive_sglang/kernels
    trap "rm -f '$PWD/kvdrive_sglang/tier' '$PWD/kvdrive_sglang/kernels'" EXIT
fi
export PYTHONPATH="$PWD:$KV:$SITE${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"

# kvdrive's own dependencies and the kernel tests' pytest: said up front, not as a traceback in the middle of the run
python3 - <<'EOF' || exit 11
import importlib
missing = []
for mod in ("numpy", "lmdb", "zstandard", "xxhash", "cryptography", "pytest", "sglang", "kvdrive_sglang.plugin"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod} ({type(e).__name__}: {e})")
print("missing on this machine (add the wheels to the wheelhouse):", "; ".join(missing) if missing else "nothing")
raise SystemExit(1 if [m for m in missing if not m.startswith("pytest")] else 0)  # pytest: only kernel_tests fails
EOF

rc=0
python3 bench/first_device.py --device cuda "${@:2}" || rc=$?
if [[ -n ${OUT:-} ]]; then cp -r bench/results/gpu-first-device* "$OUT/" 2>/dev/null; fi
exit "$rc"
