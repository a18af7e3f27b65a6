"""Test-only storage fault injection inside a running SGLang server (never part of the package).

The e2e fault tests put this folder first on a server's PYTHONPATH, so Python imports this module at start-up in every
process of the server (SGLang spawns its scheduler with multiprocessing "spawn": a fresh interpreter, same environment).
Nothing happens unless both variables are set:

    KVDRIVE_FAULT_ROOT     only file descriptors / paths under this directory are affected (the kvdrive store)
    KVDRIVE_FAULT_CONTROL  a file; while it exists it names the fault, e.g. "EIO read", "ENOSPC write", "EROFS write"
                           (errno name, then the operations it hits: read, write or read,write), or "DELAY write 0.3"
                           (each such call sleeps that many seconds first: a slow disk, to widen a crash window)
    KVDRIVE_FAULT_LOG      optional: one line per injected fault is appended here ("pid op errno path")

The wrapped calls are the system calls kvdrive's disk store makes (tier/fileio.py, tier/disk_store.py):
read: os.preadv, os.pread; write: os.pwrite, os.pwritev, os.fdatasync, os.fsync, os.ftruncate, os.truncate, and
os.open with a write or create flag. LMDB's own I/O happens in C and is not touched (a full map is made for real).
The tests create and remove the control file to start and clear a fault.
"""

import errno
import os
import time

_ROOT = os.environ.get("KVDRIVE_FAULT_ROOT")
_CTL = os.environ.get("KVDRIVE_FAULT_CONTROL")
_LOG = os.environ.get("KVDRIVE_FAULT_LOG")


def _install(root: str, ctl: str, log_path: str | None) -> None:
    root = os.path.realpath(root) + os.sep
    real = {
        name: getattr(os, name)
        for name in (
            "open",
            "close",
            "read",
            "write",
            "readlink",
            "preadv",
            "pread",
            "pwrite",
            "pwritev",
            "fdatasync",
            "fsync",
            "ftruncate",
            "truncate",
        )
    }

    def armed(op: str):
        """What to do to ``op`` right now: an errno to raise, a float (seconds to stall), or None."""
        try:
            fd = real["open"](ctl, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            spec = real["read"](fd, 256).decode(errors="replace").split()
        finally:
            real["close"](fd)
        if len(spec) < 2 or op not in spec[1].split(","):
            return None
        if spec[0] == "DELAY":
            return float(spec[2]) if len(spec) > 2 else None
        return getattr(errno, spec[0], None)

    def under_root(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def fd_under_root(fd) -> bool:
        try:
            return real["readlink"](f"/proc/self/fd/{int(fd)}").startswith(root)
        except (OSError, TypeError, ValueError):
            return False

    def fail(op: str, code, where) -> None:
        """Log the injection; raise OSError(code), or for a float stall that long and return."""
        if log_path:
            try:
                fd = real["open"](log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    what = f"DELAY{code}" if isinstance(code, float) else errno.errorcode.get(code, code)
                    real["write"](fd, f"{os.getpid()} {op} {what} {where}\n".encode())
                finally:
                    real["close"](fd)
            except OSError:
                pass
        if isinstance(code, float):
            time.sleep(code)
            return
        raise OSError(code, os.strerror(code), str(where))

    def on_fd(name: str, op: str):
        fn = real[name]

        def wrapper(fd, *args, **kwargs):
            code = armed(op)
            if code is not None and fd_under_root(fd):
                fail(op, code, real["readlink"](f"/proc/self/fd/{int(fd)}"))
            return fn(fd, *args, **kwargs)

        wrapper.__name__ = wrapper.__qualname__ = name
        return wrapper

    def wrapped_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and dir_fd is None:
            code = armed("write")
            if code is not None and under_root(path):
                fail("write", code, path)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def wrapped_truncate(path, length):
        if isinstance(path, int):
            return on_fd("ftruncate", "write")(path, length)
        code = armed("write")
        if code is not None and under_root(path):
            fail("write", code, path)
        return real["truncate"](path, length)

    for name in ("preadv", "pread"):
        setattr(os, name, on_fd(name, "read"))
    for name in ("pwrite", "pwritev", "fdatasync", "fsync", "ftruncate"):
        setattr(os, name, on_fd(name, "write"))
    os.open = wrapped_open
    os.truncate = wrapped_truncate


if _ROOT and _CTL:
    _install(_ROOT, _CTL, _LOG)
