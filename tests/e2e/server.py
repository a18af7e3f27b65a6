"""A real ``sglang.launch_server`` in a subprocess, for the end-to-end tests (CPU or GPU).

    with SGLangServer(model_path, ["--enable-hierarchical-cache"], env={...}, log_path=p) as srv:
        r = srv.generate("some prompt", max_new_tokens=8)   # {"ids", "cached", "details", ...}

The server runs in its own session (process group) so ``stop()`` reaches its scheduler/detokenizer children too, and
waits until the whole group is gone. Every wait is bounded; nothing outlives the ``with`` block. Loopback only.

On a CPU-only machine the subprocess gets ``SGLANG_USE_CPU_ENGINE=1``, offline Hugging Face flags, a private
``TORCH_EXTENSIONS_DIR`` (HiCache JIT-builds a C++ hash module on first use; on SGLang 0.5.17 a stale lock left in a
shared extensions folder makes that build -- and the server's warmup -- wait forever; 0.5.23 clears stale locks itself)
and the ``fixtures/`` folder on ``PYTHONPATH`` (an import-only ``sgl_kernel`` stub; never part of the package). The
same environment serves every supported SGLang (0.5.17 to 0.5.23); the server runs on ``sys.executable`` by default,
so each venv's test run starts its own SGLang. The CPU fallbacks SGLang's HiCache needs come from kvdrive's own plugin
(kvdrive_sglang/cpu_fallbacks.py): a kvdrive server gets them with its flag, every other CPU server through
``KVDRIVE_CPU_FALLBACKS=1`` (those alone, none of kvdrive's hooks).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
_private_ext_dir: str | None = None


def private_torch_extensions_dir() -> str:
    """One fresh torch-extensions folder per test process (created on first use, reused by every server after)."""
    global _private_ext_dir
    if _private_ext_dir is None:
        _private_ext_dir = tempfile.mkdtemp(prefix="kvdrive-e2e-torch-ext-")
    return _private_ext_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class ServerError(RuntimeError):
    pass


class SGLangServer:
    """Context manager around one ``python -m sglang.launch_server`` process group.

    ``extra_args``: more launch flags. ``env``: extra environment for the server (over the defaults below).
    ``log_path``: where stdout+stderr go (a temp file if None). ``max_total_tokens``: the device KV pool size.
    ``pythonpath``: folders put first on the server's PYTHONPATH, in every process of it (e.g. a test-only
    ``sitecustomize``; SGLang's spawned schedulers inherit the environment).
    """

    def __init__(
        self,
        model_path: str,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | None = None,
        *,
        max_total_tokens: int = 2048,
        startup_timeout: float = 240.0,
        request_timeout: float = 120.0,
        python: str = sys.executable,
        torch_extensions_dir: str | None = None,
        pythonpath: Iterable[str] = (),
    ):
        self.model_path = os.fspath(model_path)
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = log_path or tempfile.mkstemp(prefix="sglang-e2e-", suffix=".log")[1]
        self.max_total_tokens = max_total_tokens
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.python = python
        self.torch_extensions_dir = torch_extensions_dir
        self.pythonpath = [os.fspath(p) for p in pythonpath]
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python,
            "-W",
            "ignore",
            "-m",
            "sglang.launch_server",
            "--model-path",
            self.model_path,
            *([] if gpu_present() else ["--device", "cpu"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-total-tokens",
            str(self.max_total_tokens),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        # the server's launcher marks its own processes as kvdrive's (kvdrive_sglang/activation.py): never inherited
        e = {k: v for k, v in os.environ.items() if k != "KVDRIVE_SERVER"}
        e.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            TORCH_EXTENSIONS_DIR=self.torch_extensions_dir or private_torch_extensions_dir(),
        )
        front = list(self.pythonpath)
        if not gpu_present():
            e["SGLANG_USE_CPU_ENGINE"] = "1"
            front.append(FIXTURES)
            # SGLang itself runs on CPU only with kvdrive's CPU fallbacks (0.5.17's paged allocator launches Triton
            # kernels on any device; HiCache's host pools pin memory): asked for alone, the plugin installs them and
            # none of kvdrive's hooks (kvdrive_sglang/activation.py), so baselines stay SGLang's own code otherwise
            e["KVDRIVE_CPU_FALLBACKS"] = "1"
        if front:
            e["PYTHONPATH"] = os.pathsep.join(front + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
        e.update(self.extra_env)
        return e

    def start(self) -> SGLangServer:
        assert self.proc is None, "already started"
        self.port = free_port()
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
                cwd=os.path.dirname(os.path.abspath(self.log_path)),
            )
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"server exited with rc={self.proc.returncode} before it was ready "
                        f"(log {self.log_path}):\n{self.log_tail()}"
                    )
                if time.monotonic() - t0 > self.startup_timeout:
                    raise ServerError(
                        f"server not ready in {self.startup_timeout:.0f} s (log {self.log_path}):\n{self.log_tail()}"
                    )
                if self._healthy():
                    break
                time.sleep(0.25)
        except BaseException:
            self.stop(graceful=False)
            raise
        self.start_seconds = round(time.monotonic() - t0, 1)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health_generate", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """graceful: SIGTERM to the server's main process only; else SIGKILL at once. Then SIGKILL whatever is left
        of the process group and wait until none of it is left.

        SGLang 0.5.17's graceful path: the main process drains, sends the schedulers a ShutdownReq (HiRadixCache then
        detaches its storage backend, which calls the backend's close()), waits for them, then kills its process
        tree. SIGTERM to the whole group would bypass that: the scheduler dies of the signal first (no close()), and
        the main process takes it for a crash (SIGQUIT path, 5 s sleep before its diagnostics)."""
        p = self.proc
        if p is None:
            return
        t0 = time.monotonic()
        pgid = p.pid  # start_new_session=True: the server leads its own group
        if graceful and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(pgid, signal.SIGKILL)  # children left behind by a graceful stop, or all of them
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._group_alive(pgid):
            time.sleep(0.1)
        if self._group_alive(pgid):
            raise ServerError(f"process group {pgid} still alive {timeout:.0f} s after SIGKILL")
        self.stop_seconds = round(time.monotonic() - t0, 1)
        self.proc = None

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(graceful=True)

    # ------------------------------------------------------------------ requests
    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> HTTP {e.code}: {e.read()[:2000]!r}\n{self.log_tail()}") from e

    def generate(self, text: str, max_new_tokens: int = 8, temperature: float = 0.0) -> dict:
        """One /generate request. Returns ids (output token ids), cached (cached prompt tokens), details (cached
        tokens by tier: device/host/storage, zeros when absent), prompt_tokens, text and the raw meta_info."""
        r = self.post(
            "/generate",
            {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": temperature}},
        )
        m = r["meta_info"]
        raw = m.get("cached_tokens_details") or {}
        details = {"device": 0, "host": 0, "storage": 0, **raw}
        return {
            "ids": r["output_ids"],
            "cached": m["cached_tokens"],
            "details": details,
            "prompt_tokens": m.get("prompt_tokens"),
            "text": r.get("text"),
            "meta_info": m,
        }

    def flush_cache(self) -> None:
        urllib.request.urlopen(
            urllib.request.Request(f"{self.url}/flush_cache", b"", method="POST"), timeout=self.request_timeout
        ).read()

    # ------------------------------------------------------------------ diagnostics
    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])
