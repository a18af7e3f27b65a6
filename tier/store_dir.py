"""The store directory: its layout, format-version stamp, permissions and the process lock.

    DIR/KVDRIVE_FORMAT   json stamp {"format": "kvdrive-store", "version": N}, written atomically before anything else
    DIR/store.lock       flock: servers hold it shared (many processes, e.g. TP ranks, may share one store);
                         maintenance commands (gc, verify, clear, repair) hold it exclusive
    DIR/open.lock        flock held while a process checks (and if need be repairs) the store before using it
    DIR/index/           LMDB environment: the index only (payloads never live in LMDB)
    DIR/segments/        append-only segment files seg-XXXXXXXX.kvs

Directories are created 0700 and files 0600: KV pages are users' prompts in another form.

``inspect_store_dir`` tells a store from what is not one without writing anything (DirState): a directory holding
only kvdrive's entries whose stamp is missing or damaged is a DAMAGED store (tier/recovery.py repairs it); one
holding anything else without a good stamp is refused, as is a stamp alone that is not kvdrive's.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from enum import Enum
from typing import NamedTuple

from .errors import StoreDirError, StoreFormatError, StoreLockedError

FORMAT_NAME = "kvdrive-store"
FORMAT_VERSION = 1
FORMAT_FILE = "KVDRIVE_FORMAT"
LOCK_FILE = "store.lock"
INDEX_DIR = "index"
SEGMENT_DIR = "segments"
GC_LOCK_FILE = "gc.lock"
OPEN_LOCK_FILE = "open.lock"
_OWN_ENTRIES = {FORMAT_FILE, LOCK_FILE, INDEX_DIR, SEGMENT_DIR, GC_LOCK_FILE, OPEN_LOCK_FILE}
_LOCK_ENTRIES = {LOCK_FILE, GC_LOCK_FILE, OPEN_LOCK_FILE}

DIR_MODE = 0o700
FILE_MODE = 0o600


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp_text() -> bytes:
    return json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}).encode()


def _read_stamp(path: str) -> dict:
    stamp_path = os.path.join(path, FORMAT_FILE)
    try:
        with open(stamp_path, "rb") as f:
            stamp = json.loads(f.read())
        if not isinstance(stamp, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - reported with json's own ValueErrors
    except (OSError, ValueError) as e:
        raise StoreFormatError(
            f"{stamp_path} is unreadable or damaged ({e}); this is not a usable kvdrive store"
        ) from None
    if stamp.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{path} is not a kvdrive store ({FORMAT_FILE} names format {stamp.get('format')!r})")
    if stamp.get("version") != FORMAT_VERSION:
        raise StoreFormatError(_other_version(path, stamp.get("version")))
    return stamp


def _other_version(path: str, version) -> str:
    return (
        f"store {path} has format version {version!r}; this kvdrive reads version {FORMAT_VERSION}. "
        f"Point kvdrive at a new directory, or remove this one (rm -r {path}) to start afresh"
    )


class DirState(Enum):
    NEW = "new"  # missing, empty or only lock files: a store may be created here
    STORE = "store"  # a store of this format version (its stamp is good; its index and segments may still be damaged)
    DAMAGED = "damaged"  # only kvdrive's entries, with a missing or damaged stamp: a store to repair
    OTHER_VERSION = "other_version"  # kvdrive's entries and a good stamp of another format version: left alone


class DirCheck(NamedTuple):
    path: str  # absolute
    state: DirState
    problem: str  # what is wrong (DAMAGED, OTHER_VERSION); "" otherwise
    version: object = None  # the version an OTHER_VERSION stamp names


def _checked_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise StoreDirError(f"store directory must be a path, got {path!r}")
    if "\0" in os.fspath(path):  # the OS would refuse it with a bare "embedded null byte"
        raise StoreDirError(f"store directory {path!r} contains a NUL character")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreDirError(f"store path {path} exists and is not a directory")
    if os.path.exists(path):
        st = os.stat(path)
        if st.st_uid != os.geteuid():
            raise StoreDirError(
                f"store directory {path} is owned by uid {st.st_uid}, not by this user "
                f"({os.geteuid()}); refusing to share a KV store across users"
            )
    return path


def inspect_store_dir(path) -> DirCheck:
    """What ``path`` is (DirState), writing nothing. Raises StoreDirError for a path that cannot be a store directory
    and StoreFormatError for a directory that is not a kvdrive store (foreign entries without a good stamp, or a
    stamp alone that is not kvdrive's): the only directories kvdrive refuses."""
    path = _checked_path(path)
    if not os.path.exists(path):
        return DirCheck(path, DirState.NEW, "")
    try:
        names = set(os.listdir(path))
    except OSError as e:
        raise StoreDirError(f"cannot list store directory {path}: {e.strerror}") from None
    foreign = sorted(n for n in names if n not in _OWN_ENTRIES and not n.endswith(".tmp"))
    # recognisably a store: kvdrive's own layout beyond the stamp (a stamp is written before anything else)
    ours = not foreign and bool(names & (_OWN_ENTRIES - {FORMAT_FILE}))
    if FORMAT_FILE not in names:
        if foreign:
            raise StoreFormatError(
                f"{path} is not empty and is not a kvdrive store (it holds {', '.join(foreign[:3])}...); "
                "refusing to write into it. Use an empty or new directory"
            )
        if names & {INDEX_DIR, SEGMENT_DIR}:
            return DirCheck(path, DirState.DAMAGED, f"{FORMAT_FILE} is missing")
        return DirCheck(path, DirState.NEW, "")
    try:
        stamp = _read_stamp(path)
    except StoreFormatError as e:
        if not ours:
            raise
        try:
            with open(os.path.join(path, FORMAT_FILE), "rb") as f:
                got = json.loads(f.read())
        except (OSError, ValueError):
            got = None
        if (
            isinstance(got, dict)
            and got.get("format") == FORMAT_NAME
            and type(got.get("version")) is int
            and set(got) == {"format", "version"}
        ):
            return DirCheck(path, DirState.OTHER_VERSION, str(e), got["version"])
        return DirCheck(path, DirState.DAMAGED, str(e).split("; this is not a usable")[0])
    if set(stamp) != {"format", "version"} and ours:
        return DirCheck(path, DirState.DAMAGED, f"{FORMAT_FILE} holds unexpected fields {sorted(stamp)}")
    return DirCheck(path, DirState.STORE, "")


def rewrite_stamp(path: str) -> None:
    """Write the format stamp afresh (repairing a damaged one); atomic, so safe while servers use the store."""
    _write_stamp(path)


def _write_stamp(path: str) -> None:
    tmp = os.path.join(path, f"{FORMAT_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, _stamp_text())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(path, FORMAT_FILE))  # atomic: concurrent creators write identical stamps
    _fsync_dir(path)


def check_store_dir(path: str, *, create: bool) -> str:
    """Validate (and with ``create``, initialise a new) store directory. Returns its absolute path.

    ``create`` (the launcher, a server): a new directory gets its stamp and layout; a DAMAGED or OTHER_VERSION one
    passes untouched (the store repairs itself, or runs with its disk tier off, when a server opens it: one log line
    and a metric each, tier/recovery.py). Without ``create`` (the ``kvdrive`` commands) only a good store passes: a
    damaged one names ``kvdrive repair``."""
    check = inspect_store_dir(path)
    path = check.path
    if not create:
        if check.state is DirState.NEW:
            raise (
                StoreDirError(f"store directory {path} does not exist")
                if not os.path.exists(path)
                else StoreFormatError(f"{path} is not a kvdrive store (no {FORMAT_FILE})")
            )
        if check.state is DirState.OTHER_VERSION:
            raise StoreFormatError(_other_version(path, check.version))
        if check.state is DirState.DAMAGED:
            raise StoreFormatError(f"store {path} is damaged ({check.problem}); `kvdrive repair {path}` repairs it")
        return path
    if not os.path.exists(path):
        try:
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        except OSError as e:
            raise StoreDirError(f"cannot create store directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StoreDirError(f"store directory {path} is not writable by this process")
    if check.state is DirState.NEW:
        try:
            if not os.path.exists(os.path.join(path, FORMAT_FILE)):
                _write_stamp(path)
            for sub in (INDEX_DIR, SEGMENT_DIR):
                os.makedirs(os.path.join(path, sub), mode=DIR_MODE, exist_ok=True)
        except OSError as e:
            raise StoreDirError(f"cannot initialise store directory {path}: {e.strerror}") from None
    return path


def _lock_holders(lock_path: str) -> list[int]:
    """PIDs holding a flock on ``lock_path`` (Linux /proc/locks; best effort, empty where unavailable)."""
    try:
        ino = os.stat(lock_path).st_ino
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (blocked waiters carry "->")
        if len(parts) >= 6 and parts[1] == "FLOCK" and "->" not in parts:
            try:
                if int(parts[5].split(":")[-1]) == ino:
                    pids.append(int(parts[4]))
            except ValueError:
                continue
    return sorted({p for p in pids if p != os.getpid()})


class StoreLock:
    """The store-wide flock. ``shared`` for serving processes, ``exclusive`` for maintenance commands."""

    def __init__(self, path: str, mode: str):
        if mode not in ("shared", "exclusive"):
            raise ValueError(f"lock mode must be 'shared' or 'exclusive', got {mode!r}")
        lock_path = os.path.join(path, LOCK_FILE)
        try:
            self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:
            raise StoreDirError(f"cannot open {lock_path}: {e.strerror}") from None
        op = fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX
        try:
            fcntl.flock(self._fd, op | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreDirError(f"cannot lock {lock_path}: {e.strerror}") from None
            holders = _lock_holders(lock_path)
            who = f" (pid {', '.join(map(str, holders))})" if holders else ""
            if mode == "shared":
                raise StoreLockedError(
                    f"store {path} is locked by a maintenance command (kvdrive gc/verify/clear)"
                    f"{who}; wait for it to finish"
                ) from None
            raise StoreLockedError(
                f"store {path} is in use by another process{who}; stop the server(s) using it "
                "before running this command"
            ) from None
        self.mode = mode

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1
