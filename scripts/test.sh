#!/usr/bin/env bash
# Install everything into .venv and run the whole test suite (the README's test command; .ci/run runs exactly this).
# pytest exits 5 when it collects nothing; `set -e` turns that into a failed run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh '[dev]'
.venv/bin/python -m pytest -q -p no:warnings "$@"
