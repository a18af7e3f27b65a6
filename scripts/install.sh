#!/usr/bin/env bash
# Install kvdrive with a supported SGLang (default: the newest, 0.5.23) and its torch into a venv, from the CPU-usable
# pins in requirements/sglang-VERSION/. Used by scripts/test.sh and scripts/demo.sh.
#
#   bash scripts/install.sh [--sglang 0.5.17|0.5.23] [--venv DIR] [EXTRAS]
#
# EXTRAS: kvdrive's own pip extras, e.g. '[dev]' or 'dev,bench'. The venv defaults to .venv for 0.5.23 and to
# .venv-sglang-VERSION for any other version. SGLang, torch and SGLang's import closure go in with --no-deps (a resolving
# install pulls a CUDA build of a newer torch and SGLang's GPU-only dependencies); then kvdrive goes in editable.
# pip's complaints about the dependencies left out on purpose are filtered into one line; real errors still show and
# fail the script. A venv that already holds every pin (and this checkout's kvdrive with those extras) is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

NEWEST=0.5.23    # keep in step with README.md and pyproject.toml's sglang extra
sglang=$NEWEST venv="" extras=""
usage() { sed -n '5,6p' "$0" | sed 's/^# *//' >&2; }
while (($#)); do
    case $1 in
        --sglang) sglang=${2:?--sglang needs a version}; shift 2 ;;
        --sglang=*) sglang=${1#*=}; shift ;;
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        --venv=*) venv=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "install.sh: unknown option $1" >&2; usage; exit 2 ;;
        *) [[ -z $extras ]] || { echo "install.sh: one EXTRAS argument only (got '$extras' and '$1')" >&2; exit 2; }
           extras=$1; shift ;;
    esac
done

reqdir=requirements/sglang-$sglang
if [[ ! -d $reqdir ]]; then
    echo "install.sh: SGLang $sglang has no pins here ($reqdir/ is missing); supported:" \
         "$(cd requirements && ls -d sglang-*/ | sed 's/^sglang-//; s/\/$//' | paste -sd' ')" >&2
    exit 2
fi
reqs=("$reqdir"/*.txt)
[[ -n $venv ]] || { [[ $sglang == "$NEWEST" ]] && venv=.venv || venv=.venv-sglang-$sglang; }
extras=${extras#[}; extras=${extras%]}; extras=${extras// /}
if [[ ,$extras, == *,sglang,* ]]; then
    echo "install.sh: leave out the 'sglang' extra: it resolves SGLang's full (GPU) dependency set; this script" \
         "installs SGLang $sglang from $reqdir/ instead" >&2
    exit 2
fi

# A venv moved from elsewhere (or half-created) has scripts pointing at the wrong place: make it anew.
if [[ -e $venv ]] && ! "$venv/bin/python" -c '' 2>/dev/null; then
    echo "install.sh: $venv is not a working venv; re-creating it" >&2
    python3 -m venv --clear "$venv"
elif [[ ! -e $venv ]]; then
    python3 -m venv "$venv"
fi
py=$venv/bin/python

# state: "pins-ok|pins-missing N" and "kvdrive-ok|kvdrive-missing EXTRAS" (the extras to install: asked + stamped)
state() {
    "$py" - "$venv/.kvdrive-install" "$extras" "$PWD" "${reqs[@]}" <<'EOF'
import hashlib, importlib.metadata as md, sys
stamp, extras, root, reqs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
missing = 0
for f in reqs:
    for line in open(f):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, _, ver = line.partition("==")
        try:
            have = md.version(name.strip())
        except md.PackageNotFoundError:
            have = None
        if have is None or (have != ver.strip() and have.split("+")[0] != ver.strip()):
            missing += 1
print("pins-ok" if not missing else f"pins-missing {missing}")
key = hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest() + " " + root
want = {e for e in extras.split(",") if e}
try:
    old_key, old_extras = open(stamp).read().split("\n")[:2]
    have = {e for e in old_extras.split(",") if e} if old_key == key else None
except (OSError, ValueError):
    have = None
try:
    md.version("kvdrive-sglang")
except md.PackageNotFoundError:
    have = None
if have is not None and want <= have:
    print("kvdrive-ok")
else:
    print("kvdrive-missing " + ",".join(sorted(want | (have or set()))))
EOF
}

# pip, quiet: drop this machine's "Location ... is ignored" notes for absent local index pages, and the "X requires
# Y, which is not installed" lines for the packages pinned in $reqdir (their dependencies are left out on purpose).
# Anything else pip prints (errors, version conflicts) shows, on stderr; pip's exit status is kept.
quiet_pip() {
    local log rc=0
    log=$(mktemp)
    "$py" -m pip --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
    awk -v pins="$(sed 's/#.*//; s/==.*//' "${reqs[@]}" | tr -s ' \n' ' ')" '
        function norm(s) { s = tolower(s); gsub(/[-_.]+/, "-", s); return s }
        BEGIN { n = split(pins, p, " "); for (i = 1; i <= n; i++) pinned[norm(p[i])] = 1 }
        /^WARNING: Location .* is ignored: / { next }
        /^ERROR: pip.s dependency resolver does not currently take into account/ { header = $0; next }
        / requires .*, which is not installed\.$/ && (norm($1) in pinned) { next }
        { if (header != "") { print header; header = "" } print }' "$log" >&2
    rm -f "$log"
    return $rc
}

read -r pins pins_n < <(state | sed -n 1p) || true
if [[ $pins != pins-ok ]]; then
    quiet_pip install -q --no-deps "${reqs[@]/#/-r}"
    read -r pins pins_n < <(state | sed -n 1p) || true
    if [[ $pins != pins-ok ]]; then
        echo "install.sh: $venv still lacks $pins_n of the pins in $reqdir/ after installing them" >&2
        exit 1
    fi
    did_pins=1
fi
read -r kv kv_extras < <(state | sed -n 2p) || true
if [[ $kv != kvdrive-ok ]]; then
    quiet_pip install -q -e ".${kv_extras:+[$kv_extras]}"
    { sha256sum pyproject.toml | cut -d' ' -f1 | tr -d '\n'; echo " $PWD"; echo "${kv_extras:-}"; } >"$venv/.kvdrive-install"
    did_kvdrive=1
fi

versions=$("$py" -c 'import importlib.metadata as m; print("SGLang", m.version("sglang"), "+ torch", m.version("torch"))')
what="kvdrive-sglang${extras:+[$extras]}"
if [[ -z ${did_pins:-} && -z ${did_kvdrive:-} ]]; then
    echo "install.sh: $venv already has $versions (pins: $reqdir/) and $what; nothing to install"
else
    msg="install.sh: $venv: $versions"
    [[ -n ${did_pins:-} ]] && msg+=" installed without dependency resolution from $reqdir/ (CPU pins)" \
                           || msg+=" already there ($reqdir/)"
    [[ -n ${did_kvdrive:-} ]] && msg+=", $what editable"
    msg+="; SGLang's GPU-only and optional dependencies are left out on purpose ('$venv/bin/pip check' lists them)"
    echo "$msg"
fi
