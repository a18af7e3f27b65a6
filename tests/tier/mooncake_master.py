"""A real Mooncake Store master for tests (kvdrive issue 19), shared by tests/tier/test_remote.py and the SGLang-side
remote tests: each test gets its own master on free ports, killed at the end.

Mooncake comes from kvdrive's ``[remote]`` extra; where libibverbs is missing, scripts/mooncake_env.sh fetches it
without root (run here once if needed). Tests skip, saying why, only where neither can be had.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from kvdrive_sglang.tier.errors import ConfigError
from kvdrive_sglang.tier.remote.mooncake import import_store_class, libs_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- the Mooncake master ----------------------------------------------------------------------------------------
def mooncake_or_skip() -> None:
    try:
        import_store_class()
        return
    except ConfigError:
        pass
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "mooncake_env.sh"), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        import_store_class()
    except ConfigError as e:
        pytest.skip(
            f"Mooncake Store cannot be installed here ({e}); scripts/mooncake_env.sh said: {r.stderr.strip()[-300:]}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Master:
    """A mooncake_master on its own ports; ``client_ttl`` 2 s: a dead node's segment is dropped ~2 s after it dies."""

    def __init__(self, log_path: str):
        spec = importlib.util.find_spec("mooncake")
        self.binary = os.path.join(list(spec.submodule_search_locations)[0], "mooncake_master")
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        libs = libs_dir()
        ld = f"{libs}/usr/lib/x86_64-linux-gnu:{libs}/lib/x86_64-linux-gnu"
        self.env = dict(
            os.environ,
            LD_LIBRARY_PATH=ld + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else ""),
        )
        self.proc = None

    @property
    def url(self) -> str:
        return f"mooncake://127.0.0.1:{self.port}"

    def start(self) -> Master:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--rpc_address=127.0.0.1",
                f"--rpc_port={self.port}",
                "--metrics_host=127.0.0.1",
                f"--metrics_port={self.metrics_port}",
                "--rpc_thread_num=2",
                "--client_ttl=2",
                "--enable_http_metadata_server=false",
            ],
            env=self.env,
            stdout=open(self.log_path, "ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, open(self.log_path, errors="replace").read()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mooncake_master did not listen within 15 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
