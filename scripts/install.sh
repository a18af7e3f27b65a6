#!/usr/bin/env bash
# Install kvdrive with SGLang 0.5.17 and torch 2.11.0 (CPU-usable pins) into .venv; extra arguments are pip
# extras for kvdrive itself (e.g. "[dev]"). SGLang and torch go in without dependency resolution: a resolving install
# pulls a newer CUDA torch. Used by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --no-deps -r requirements/sglang-cpu-torch.txt -r requirements/sglang-cpu.txt \
    -r requirements/sglang-cpu-server.txt
.venv/bin/pip install -q -e ".${1:-}"
