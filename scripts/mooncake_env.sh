#!/usr/bin/env bash
# Make Mooncake Store usable for kvdrive's remote tier (--kvdrive-remote mooncake://...) without root:
#
#   bash scripts/mooncake_env.sh [--python PY] [--libs DIR]
#
# 1. installs `mooncake-transfer-engine-non-cuda` (the CPU build; kvdrive's `[remote]` extra) into PY's environment
#    if it is missing (PY defaults to .venv/bin/python, else python3);
# 2. where the system has no libibverbs.so.1 (mooncake.store and the mooncake_master binary link it even for TCP),
#    fetches libibverbs1 and the libnl libraries it needs with `apt-get download` (no root) and unpacks them into DIR
#    (default: $KVDRIVE_MOONCAKE_LIBS, else ~/.cache/kvdrive/mooncake-libs). No RDMA provider package is needed.
#
# Prints one line for the shell: `export LD_LIBRARY_PATH=...` (nothing to add when the system has the library), so
#   eval "$(bash scripts/mooncake_env.sh)"
# lets mooncake_master start from this shell. Python needs no variable: kvdrive_sglang.tier.remote.mooncake loads the
# libraries from DIR itself before importing mooncake. With root, `apt-get install -y libibverbs1` does the same.
set -euo pipefail
cd "$(dirname "$0")/.."

py="" libs=${KVDRIVE_MOONCAKE_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/kvdrive/mooncake-libs}
while (($#)); do
    case $1 in
        --python) py=${2:?--python needs an interpreter}; shift 2 ;;
        --libs) libs=${2:?--libs needs a folder}; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        *) echo "mooncake_env.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ -z $py ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi

if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mooncake") is None)' 2>/dev/null; then
    echo "mooncake_env.sh: installing mooncake-transfer-engine-non-cuda into $("$py" -c 'import sys; print(sys.prefix)')" >&2
    # --no-deps: its requirements (requests, msgpack) are not needed by mooncake.store's client and master
    "$py" -m pip install -q --no-deps mooncake-transfer-engine-non-cuda >&2
fi

lib_dirs() { echo "$libs/usr/lib/x86_64-linux-gnu:$libs/lib/x86_64-linux-gnu"; }
if /sbin/ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; then
    exit 0  # the system has it
fi
if [[ ! -e $libs/usr/lib/x86_64-linux-gnu/libibverbs.so.1 ]]; then
    command -v apt-get >/dev/null || { echo "mooncake_env.sh: no libibverbs.so.1 and no apt-get to fetch it;" \
        "install libibverbs1 (rdma-core) with the system's package manager" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "mooncake_env.sh: fetching libibverbs1 libnl-3-200 libnl-route-3-200 into $libs" >&2
    (cd "$tmp" && apt-get download libibverbs1 libnl-3-200 libnl-route-3-200 >/dev/null 2>&1) || {
        echo "mooncake_env.sh: apt-get download failed (run apt-get update, or install libibverbs1 as root)" >&2
        exit 1; }
    mkdir -p "$libs"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$libs"; done
fi
echo "export LD_LIBRARY_PATH=$(lib_dirs)\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
