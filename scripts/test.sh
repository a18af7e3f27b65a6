#!/usr/bin/env bash
# Install everything into .venv and run the whole test suite (the README's test command; .ci/run runs exactly this).
# SGLang 0.5.17 and torch 2.11.0 go in without dependency resolution: a resolving install pulls a newer CUDA torch.
# pytest exits 5 when it collects nothing; `set -e` turns that into a failed run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --no-deps -r requirements/sglang-cpu-torch.txt -r requirements/sglang-cpu.txt \
    -r requirements/sglang-cpu-server.txt
.venv/bin/pip install -q -e '.[dev]'
.venv/bin/python -m pytest -q -p no:warnings "$@"
