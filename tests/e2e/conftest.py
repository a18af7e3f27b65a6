"""e2e: real SGLang servers in subprocesses (see tests/e2e/server.py). Server start/stop times are collected in
``SERVER_TIMINGS`` and printed at the end of the run."""
from __future__ import annotations

SERVER_TIMINGS: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts real SGLang servers (CPU: ~20 s and ~2 GB per start)")


def pytest_terminal_summary(terminalreporter):
    if not SERVER_TIMINGS:
        return
    terminalreporter.write_sep("-", "e2e server timings")
    for t in SERVER_TIMINGS:
        terminalreporter.write_line(f"{t['name']:<28} start {t['start_s']:>6} s   stop {t['stop_s']!s:>5} s "
                                    f"({t['stop']})")
