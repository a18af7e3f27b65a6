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
