import os

import pytest

from tests.helpers import make_ns


def _private_torch_extensions_dir() -> None:
    """SGLang JIT-builds a C++ hash module (hicache_hash_cpp) into torch's extensions folder, named after the Python
    and CUDA versions only: the CI machine runs the suite under two torch builds (SGLang 0.5.23's 2.14 and 0.5.17's
    2.11, both cu130), which would share one folder and load each other's .so; and SGLang 0.5.17 waits forever on a
    lock left there by a killed build. Each torch version gets its own folder for this test process and its
    children (set before anything builds)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # noqa: BLE001 - no torch: nothing builds extensions
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(base, "kvdrive-tests", f"torch-{torch_version}", "extensions")


_private_torch_extensions_dir()


def _fuzz_profile() -> None:
    """The fuzz suites (hypothesis) run derandomized -- the same examples on every run, so CI is reproducible -- unless
    ``KVDRIVE_FUZZ=random`` asks for fresh ones (a fuzzing session: ``KVDRIVE_FUZZ=random pytest tests -k fuzz``).
    Loaded before the test modules build their settings from it."""
    try:
        from hypothesis import settings
    except ImportError:
        return
    settings.register_profile("fixed", derandomize=True)
    settings.register_profile("random", derandomize=False)
    settings.load_profile("random" if os.environ.get("KVDRIVE_FUZZ") == "random" else "fixed")


_fuzz_profile()


@pytest.fixture
def ns():
    return make_ns()
