"""Helpers shared by the benchmarks in bench/ (run as scripts: ``python bench/<name>.py``)."""


def cpu_model(default: str = "unknown") -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else ``default``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


RESULTS_DIR = "bench/results"


def add_allow_dirty(ap) -> None:
    """The ``--allow-dirty`` option of every benchmark that writes results (see ``guard_results``)."""
    ap.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write results into bench/results/ from a tree with uncommitted changes (they then name a "
        "commit that is not what ran)",
    )


def code_changes(repo: str, extra: list[str] | None = None) -> str:
    """``git status --porcelain`` of ``repo`` less bench/results/: results written by an earlier run of the same
    commit (e.g. the demo before the cpu preset) change no code, so they neither make a tree dirty nor a commit
    "+uncommitted"."""
    import subprocess

    out = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", *(extra or [])], capture_output=True, text=True, timeout=10
    ).stdout
    return "\n".join(ln for ln in out.splitlines() if not ln[3:].startswith(RESULTS_DIR.rstrip("/") + "/")).strip()


def guard_results(path: str | None, repo: str, allow_dirty: bool = False) -> None:
    """Refuse (exit 2, one line) to write published results -- anything under ``bench/results/`` -- from a working
    tree with uncommitted changes, unless ``allow_dirty``: a results file names the commit it measured, and a dirty
    tree's figures belong to no commit. Results written elsewhere (temp dirs, tests) are not checked."""
    import os
    import subprocess
    import sys

    if not path or allow_dirty:
        return
    results = os.path.realpath(os.path.join(repo, RESULTS_DIR))
    if not os.path.realpath(path).startswith(results + os.sep):
        return
    try:
        dirty = code_changes(repo, ["--untracked-files=no"])
    except (OSError, subprocess.SubprocessError):
        return
    if dirty:
        print(
            f"bench: refusing to write {os.path.relpath(path, repo)} from a tree with uncommitted changes "
            f"(commit first, or pass --allow-dirty):\n{dirty}",
            file=sys.stderr,
        )
        raise SystemExit(2)


def write_json(path: str, res: dict) -> None:
    """A results dict to ``path`` as JSON (its folder made; values JSON cannot hold written as their str)."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)


def machine(repo: str) -> dict:
    """What a result ran on: CPU, cores, load average now (call it at the start of a run), versions, the exact command,
    the git revision of ``repo`` (+uncommitted) and the date."""
    import datetime
    import os
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:  # the tier-only benches (stress, soak) run without SGLang and torch
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    try:
        rev = subprocess.run(
            ["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        rev = rev + ("+uncommitted" if code_changes(repo) else "")
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    import shlex
    import sys

    return {
        "cpu": cpu_model(platform.processor() or ""),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sglang": installed("sglang"),
        "torch": installed("torch"),
        "git": rev,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal (at most 4 times a second), else one line
    per 10% (at most one per 2 s) and the last. Called with the count of finished items."""

    def __init__(self, label: str, total: int):
        import sys
        import time

        self.label, self.total = label, max(1, total)
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.monotonic()
        self.next_pct = 10

    def __call__(self, done: int) -> None:
        import time

        now = time.monotonic()
        pct = 100 * done // self.total
        if self.tty:
            if now - self.last < 0.25 and done < self.total:
                return
        elif (pct < self.next_pct or now - self.last < 2.0) and done < self.total:
            return
        self.last = now
        self.next_pct = pct // 10 * 10 + 10
        el = now - self.t0
        eta = el / done * (self.total - done) if done else 0.0
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        line = f"{self.label} [{bar}] {done}/{self.total} {pct:3d}% {el:6.0f} s elapsed, eta {eta:5.0f} s"
        self.stream.write(("\r" + line + ("\n" if done >= self.total else "")) if self.tty else line + "\n")
        self.stream.flush()


def read_generate_stream(req, timeout: float) -> tuple[dict | None, float | None, float]:
    """Send ``req`` (a streamed SGLang ``/generate``) and read its server-sent events: (the last chunk, or None when
    none came; seconds to the first chunk; seconds to the end). One reader for every client here (e2e_bench,
    bench/serving/agent.py)."""
    import json
    import time
    import urllib.request

    t0 = time.perf_counter()
    ttft, last = None, None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = json.loads(data)
    return last, ttft, time.perf_counter() - t0
