#!/usr/bin/env bash
# The README's main command: install kvdrive + SGLang 0.5.23, the newest supported (CPU pins, scripts/install.sh), into
# .venv, then serve a generated long-document trace with a real SGLang server on CPU twice -- radix cache only, and
# --kv-tier kvdrive (then restarted on its store) -- and print TTFT and prompt tokens served per tier side by side.
# Extra arguments go to bench/e2e_bench.py (e.g. --preset cpu, --workdir DIR to keep the model, stores and server logs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python bench/e2e_bench.py "$@"
