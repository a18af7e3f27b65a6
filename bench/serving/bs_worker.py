"""SGLang's bench_serving CLI, run once per job in one long-lived process (started by sglang_client.Worker).

``python -m sglang.bench_serving ARGS`` is ``sglang.benchmark.serving.cli_main()`` reading ``sys.argv``; this process
imports that module once and calls ``cli_main()`` with each job's ARGS, so its imports (SGLang, transformers: ~5 s
on 2 idle cores, 11 s on busy ones) are paid once per server rather than once per run -- 72 runs in the cpu preset.
Each job is one JSON line on stdin, ``{"id": N, "argv": [...]}``; everything bench_serving prints goes to stderr
(the runner's log), and one JSON line ``{"id": N, "rc": RC}`` per job goes to stdout when it is done.
"""

import json
import os
import sys
import traceback
from contextlib import redirect_stdout

control = os.fdopen(os.dup(sys.stdout.fileno()), "w")
sys.stdout = sys.stderr  # bench_serving's printout -> the log; stdout carries only the job replies
from sglang.benchmark.serving import cli_main  # noqa: E402

for line in sys.stdin:
    job = json.loads(line)
    sys.argv = ["sglang.bench_serving", *job["argv"]]
    rc = 0
    try:
        with redirect_stdout(sys.stderr):
            cli_main()
    except SystemExit as e:  # argparse errors and explicit exits
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001 - reported to the runner as this job's failure; the next job still runs
        traceback.print_exc()
        rc = 1
    sys.stderr.flush()
    control.write(json.dumps({"id": job["id"], "rc": rc}) + "\n")
    control.flush()
