"""``kvdrive``: inspect and maintain a kvdrive disk store from the shell.

    kvdrive stats  DIR [--json]                      what the store holds (safe while servers use it), and the
                                                     remote tier settings the last server recorded there
    kvdrive verify DIR                               re-read every page, drop the corrupt ones
    kvdrive gc     DIR [--live-ratio R]              expire TTL'd pages, compact sparse segments
    kvdrive clear  DIR [--namespace HEX ...] [--tenant NAME ...] [--yes]
                                                     drop pages (all, or some namespaces / tenants), then compact
    kvdrive repair DIR [--rebuild]                   repair a damaged store (what a server does when it opens one)

``stats`` takes the store lock shared, like a server, so it runs alongside them. ``verify``, ``gc`` and ``clear`` take
it exclusive: they refuse to run while any server (or other command) has the store open. No command ever creates a
store: a missing directory, or one that is not a kvdrive store of this format version, is an error; so is a damaged
store, for all but ``repair``, which takes the recovery ladder of tier/recovery.py by hand (rewrite a damaged stamp,
recreate missing directories, rebuild a damaged index from the segment files; if that fails, move the store aside to
DIR.damaged-<time> and start an empty one), then re-reads every page and drops those that fail their checks.

Exit status: 0 success; 1 ``verify`` found (and dropped) bad pages, ``repair`` repaired something, or ``clear`` was
declined at the prompt; 2 an error (one line on stderr, ``kvdrive: error: ...``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import lmdb

from .disk_store import DiskStats, DiskStore, DiskStoreConfig
from .errors import KvdriveError, StoreFormatError
from .recovery import RecoveryKind
from .remote import SETTINGS_NOTE, read_settings_note
from .store_dir import (
    FORMAT_FILE,
    FORMAT_VERSION,
    SEGMENT_DIR,
    DirState,
    StoreLock,
    check_store_dir,
    inspect_store_dir,
)
from .tenants import id_of_label
from .validate import fraction

PROG = "kvdrive"
EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

# Maintenance commands must never evict a live page: give the store a capacity no real disk reaches.
_NO_EVICTION_CAPACITY = 1 << 60
_MIN_SEGMENT = 64 << 10
_MAX_SEGMENT = 256 << 20


class CliError(Exception):
    """A usage problem found by the CLI itself (shown like a KvdriveError: one line, exit 2)."""


# --- formatting ---------------------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers).rstrip()] + [line(r).rstrip() for r in rows]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kvdrive-sglang")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a source tree)
        return "unknown"


# --- opening the store ----------------------------------------------------------------------------------------------
def _existing_store(path: str) -> str:
    """The store's absolute path; raises (StoreDirError / StoreFormatError) rather than create anything."""
    return check_store_dir(path, create=False)


def _format_version(path: str) -> int | None:
    try:
        with open(os.path.join(path, FORMAT_FILE), "rb") as f:
            return json.loads(f.read()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def _segment_bytes_of(path: str) -> int:
    """Segment size for segments a maintenance command writes: that of the store's existing segments (the servers'
    setting is not recorded on disk), so compaction does not leave one segment far larger than the others."""
    seg_dir = os.path.join(path, SEGMENT_DIR)
    sizes = []
    try:
        with os.scandir(seg_dir) as it:
            for e in it:
                if e.name.startswith("seg-") and e.name.endswith(".kvs"):
                    try:
                        sizes.append(e.stat().st_size)
                    except OSError:
                        pass
    except OSError:
        pass
    return max(_MIN_SEGMENT, min(_MAX_SEGMENT, max(sizes, default=_MAX_SEGMENT)))


def _open(path: str, mode: str, live_ratio: float = 0.5) -> DiskStore:
    path = _existing_store(path)
    cfg = DiskStoreConfig(
        path=path, capacity_bytes=_NO_EVICTION_CAPACITY, segment_bytes=_segment_bytes_of(path), gc_live_ratio=live_ratio
    )
    return DiskStore(cfg, lock_mode=mode, repair=False)


# --- commands -------------------------------------------------------------------------------------------------------
def _ns_row(nid: bytes, desc: dict | None, pages: int, nbytes: int) -> dict:
    d = desc or {}
    return {
        "id": nid.hex(),
        "short_id": nid[:8].hex(),
        "model": d.get("model"),
        "kv_dtype": d.get("kv_dtype"),
        "layout": d.get("layout"),
        "tp_rank": d.get("tp_rank"),
        "tp_size": d.get("tp_size"),
        "tenant": d.get("tenant"),
        "pages": pages,
        "bytes": nbytes,
    }


def cmd_stats(args) -> int:
    path = _existing_store(args.dir)
    version = _format_version(path)
    store = DiskStore(DiskStoreConfig(path=path), lock_mode="shared", repair=False)
    try:
        st: DiskStats = store.stats()
        nss = [_ns_row(*n) for n in store.namespaces()]
        remote = read_settings_note(store.get_note(SETTINGS_NOTE))
    finally:
        store.close()
    dead = max(0, st.file_bytes - st.live_bytes)
    out = {
        "path": path,
        "format_version": version,
        "entries": st.entries,
        "live_bytes": st.live_bytes,
        "raw_bytes": st.raw_bytes,
        "codec_ratio": round(st.raw_bytes / st.live_bytes, 4) if st.live_bytes else None,
        "file_bytes": st.file_bytes,
        "dead_bytes": dead,
        "dead_share": round(dead / st.file_bytes, 4) if st.file_bytes else 0.0,
        "segments": st.segments,
        "namespaces": nss,
        "remote": remote,  # the remote tier settings the last server on this store recorded (None: never)
    }
    if args.json:
        print(json.dumps(out))
        return EXIT_OK
    ratio = f"{out['codec_ratio']:.2f}x" if out["codec_ratio"] is not None else "-"
    print(f"store         {path}")
    print(f"format        version {version}")
    print(f"entries       {st.entries}")
    print(f"live bytes    {human_bytes(st.live_bytes)} (encoded)")
    print(f"raw bytes     {human_bytes(st.raw_bytes)} (decoded; codec ratio {ratio})")
    print(
        f"file bytes    {human_bytes(st.file_bytes)} in {st.segments} segment(s); "
        f"{human_bytes(dead)} dead ({out['dead_share']:.1%})" + (", reclaimable by `kvdrive gc`" if dead else "")
    )
    for line in _remote_lines(remote):
        print(line)
    print(f"namespaces    {len(nss)}")
    if nss:
        rows = [
            [
                n["short_id"],
                str(n["model"] if n["model"] is not None else "?"),
                str(n["kv_dtype"] or "?"),
                str(n["layout"] or "?"),
                f"{n['tp_rank']}/{n['tp_size']}" if n["tp_size"] is not None else "?",
                n["tenant"] if n["tenant"] else "-",
                str(n["pages"]),
                human_bytes(n["bytes"]),
            ]
            for n in nss
        ]
        print()
        for line in _table(["ID", "MODEL", "KV_DTYPE", "LAYOUT", "TP", "TENANT", "PAGES", "BYTES"], rows, {6, 7}):
            print(line)
    return EXIT_OK


def _remote_lines(remote: dict | None) -> list[str]:
    """``kvdrive stats``' view of the shared remote tier: the settings a server recorded when it opened this store
    (they live on its command line, not in the store; tier/remote settings_note)."""
    if remote is None:
        return ["remote        none recorded (no server with --kvdrive-remote has opened this store)"]
    rec = remote.get("recorded") or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["unix_s"])) if "unix_s" in rec else "?"
    by = f"as recorded {when} by {rec.get('host', '?')} pid {rec.get('pid', '?')}"
    if remote.get("url") is None:
        return [f"remote        none ({by}, a server without --kvdrive-remote)"]
    skip = {"url", "recorded", "client"}
    client = remote.get("client") or {}
    lines = [f"remote        {remote['url']} ({by})"]
    settings = {k: v for k, v in remote.items() if k not in skip} | {k: v for k, v in client.items() if k not in remote}
    lines += [f"  {k:<20} {v}" for k, v in sorted(settings.items())]
    return lines


def cmd_verify(args) -> int:
    store = _open(args.dir, "exclusive")
    try:
        t0 = time.perf_counter()
        rep = store.verify()
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
    rate = f", {human_bytes(rep.bytes_checked / elapsed)}/s" if elapsed > 0 and rep.bytes_checked else ""
    print(f"checked {rep.checked} page(s), {human_bytes(rep.bytes_checked)} in {elapsed:.2f}s{rate}")
    print(f"ok {rep.ok}, bad {rep.bad}")
    if rep.bad:
        print(
            f"dropped {rep.bad} bad page(s) from the index (they will be recomputed on demand); "
            "run `kvdrive gc` to reclaim their space"
        )
        return EXIT_FOUND
    return EXIT_OK


def _compact_report(store: DiskStore, before: DiskStats, live_ratio: float | None = None) -> None:
    reclaimed = store.compact(live_ratio)
    after = store.stats()
    print(f"segments reclaimed {reclaimed} ({before.segments} -> {after.segments} segment(s))")
    print(
        f"file bytes {human_bytes(before.file_bytes)} -> {human_bytes(after.file_bytes)} "
        f"({human_bytes(max(0, before.file_bytes - after.file_bytes))} freed); "
        f"{after.entries} page(s), {human_bytes(after.live_bytes)} live"
    )


def cmd_gc(args) -> int:
    store = _open(args.dir, "exclusive", args.live_ratio)
    try:
        before = store.stats()
        expired = store.expire()
        print(f"expired {expired} page(s) past their TTL")
        _compact_report(store, before)
    finally:
        store.close()
    return EXIT_OK


def _match_namespaces(prefixes: list[str], present: list[tuple[bytes, dict | None, int, int]]) -> list[bytes]:
    chosen: list[bytes] = []
    for raw in prefixes:
        p = raw.strip().lower()
        p = p.removeprefix("0x")
        if not p or len(p) > 32 or any(c not in "0123456789abcdef" for c in p):
            raise CliError(
                f"--namespace {raw!r} is not a hex prefix of a namespace id (1 to 32 hex digits; see `kvdrive stats`)"
            )
        hits = [n for n in present if n[0].hex().startswith(p)]
        if not hits:
            have = ", ".join(n[0][:8].hex() for n in present) or "none"
            raise CliError(f"--namespace {raw} matches no namespace in this store (namespaces: {have})")
        if len(hits) > 1:
            listed = "; ".join(f"{n[0].hex()} ({(n[1] or {}).get('model', '?')}, {n[2]} pages)" for n in hits)
            raise CliError(f"--namespace {raw} matches {len(hits)} namespaces: {listed}; give a longer prefix")
        if hits[0][0] not in chosen:
            chosen.append(hits[0][0])
    return chosen


def _confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_clear(args) -> int:
    path = _existing_store(args.dir)
    if not args.namespace and not args.tenant and not args.yes and not _isatty(sys.stdin):
        raise CliError(
            "refusing to clear every page of the store without confirmation: stdin is not a terminal; "
            "pass --yes (or --namespace / --tenant to clear only some pages)"
        )
    store = _open(path, "exclusive", args.live_ratio)
    live_ratio = None
    try:
        before = store.stats()
        if args.namespace or args.tenant:
            present = store.namespaces()
            ids = _match_namespaces(args.namespace, present) if args.namespace else []
            removed = 0
            for nid in ids:
                n = store.clear(nid)
                removed += n
                desc = next((d for i, d, _, _ in present if i == nid), None) or {}
                print(f"namespace {nid[:8].hex()} ({desc.get('model', '?')}): removed {n} page(s)")
            for label in args.tenant or []:
                tid = id_of_label(label)
                mine = [(nid, d) for nid, d, _, _ in present if (d or {}).get("tenant") == tid and nid not in ids]
                n = sum(store.clear(nid) for nid, _ in mine)
                ids += [nid for nid, _ in mine]
                removed += n
                print(f"tenant {label!r} (id {tid or '-'}): removed {n} page(s) from {len(mine)} namespace(s)")
            if args.tenant:
                # a tenant's deletion must not leave its bytes in segment files: rewrite every segment holding any
                # dead bytes, not only sparse ones
                live_ratio = 1.0
        else:
            if not args.yes and not _confirm(f"remove all {before.entries} page(s) from store {path}?"):
                print("nothing removed")
                return EXIT_FOUND
            removed = store.clear(None)
        print(f"removed {removed} page(s)")
        _compact_report(store, before, live_ratio)
    finally:
        store.close()
    return EXIT_OK


def cmd_repair(args) -> int:
    check = inspect_store_dir(args.dir)  # refuses what is not a kvdrive store, like every command
    path = check.path
    recreated = False
    if check.state is DirState.NEW:
        if not (os.path.isdir(path) and os.listdir(path)):
            check_store_dir(path, create=False)  # raises: missing, or empty
        # only kvdrive's lock files are left (stamp, index and segments gone): a store with nothing to keep, made
        # whole again as a server would (bench/stress/damage_stress.py found repair calling it "not a store")
        check_store_dir(path, create=True)
        recreated = True
        print("store_recreated: only its lock files were left; it starts empty")
    if check.state is DirState.OTHER_VERSION:
        raise StoreFormatError(check.problem)  # another kvdrive's store: not ours to rewrite
    StoreLock(path, "exclusive").release()  # refuse, with who holds it, while a server or command uses the store
    cfg = DiskStoreConfig(path=path, capacity_bytes=_NO_EVICTION_CAPACITY, segment_bytes=_segment_bytes_of(path))
    store = DiskStore(cfg, lock_mode="exclusive", repair=True, rebuild=args.rebuild)
    try:
        for r in store.recoveries:
            print(f"{r.kind.value}: {r.detail}")
        if store.off_reason is not None:
            raise CliError(f"could not repair store {path}: {store.off_reason}")
        rep = store.verify()
    finally:
        store.close()
    moved = any(r.kind is RecoveryKind.MOVED_ASIDE for r in store.recoveries)
    print(
        f"kept {rep.ok} page(s), dropped {rep.bad} damaged page(s)"
        + (f", {rep.io_errors} unreadable now (kept)" if rep.io_errors else "")
        + ("; the old store was moved aside (see above): this one starts empty" if moved else "")
    )
    if not store.recoveries and not rep.bad and not recreated:
        print("the store was intact")
        return EXIT_OK
    return EXIT_FOUND


def _isatty(f) -> bool:
    try:
        return bool(f is not None and f.isatty())
    except (AttributeError, ValueError, OSError):
        return False


# --- argument parsing -----------------------------------------------------------------------------------------------
def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    # argparse says "argument --live-ratio: " first
    return fraction(v, "the live share", error=argparse.ArgumentTypeError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and maintain a kvdrive disk store (the persistent KV-cache tier). "
        "No command creates a store. stats runs alongside servers using the store; verify, gc and clear "
        "need it to themselves (stop the servers first).",
        epilog="exit status: 0 ok; 1 verify dropped bad pages / clear declined; 2 error",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()} (store format {FORMAT_VERSION})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dir_help = "the store directory (as given to the server's kvdrive path)"

    s = sub.add_parser(
        "stats",
        help="show what the store holds (safe while servers use it)",
        description="Show the store's entries, live / decoded / file bytes, codec ratio, dead space "
        "and a per-namespace table. Takes the store lock shared, so it runs while "
        "servers have the store open.",
    )
    s.add_argument("dir", metavar="DIR", help=dir_help)
    s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    s.set_defaults(func=cmd_stats)

    v = sub.add_parser(
        "verify",
        help="re-read every page; drop corrupt ones (exit 1 if any)",
        description="Re-read every page, check its checksum and header, and drop bad entries from the "
        "index (they become misses, recomputed on demand). Exit 0 when all pages are good, "
        "1 when bad pages were found and dropped. Needs the store to itself.",
    )
    v.add_argument("dir", metavar="DIR", help=dir_help)
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser(
        "gc",
        help="expire TTL'd pages and compact sparse segments (never evicts live pages)",
        description="Drop pages past their TTL, then rewrite the live pages of sparse segments and "
        "delete those segments, giving their space back. Never evicts a live page. Needs "
        "the store to itself.",
    )
    g.add_argument("dir", metavar="DIR", help=dir_help)
    g.add_argument(
        "--live-ratio",
        type=_ratio,
        default=0.5,
        metavar="R",
        help="compact segments whose live share is below R, in (0, 1] (default 0.5; 1 compacts every "
        "segment holding any dead bytes)",
    )
    g.set_defaults(func=cmd_gc)

    c = sub.add_parser(
        "clear",
        help="drop all pages, or those of some namespaces, then compact",
        description="Drop every page of the store (asks first; --yes skips the question and is "
        "required when stdin is not a terminal), or with --namespace only the pages of "
        "the namespaces whose id starts with the given hex prefix (see `kvdrive stats`), "
        "or with --tenant only those of a tenant. "
        "Then compacts so the space comes back. Needs the store to itself.",
    )
    c.add_argument("dir", metavar="DIR", help=dir_help)
    c.add_argument(
        "--namespace",
        action="append",
        metavar="HEXPREFIX",
        help="clear only the namespace whose id starts with HEXPREFIX (must match exactly one); repeatable",
    )
    c.add_argument(
        "--tenant",
        action="append",
        metavar="NAME",
        help="clear only the pages of tenant NAME: a cache salt, @GROUP for a share_as group, or '' for "
        "unsalted traffic; then rewrite every segment holding dead bytes, so none of the tenant's "
        "bytes stay in segment files; repeatable",
    )
    c.add_argument("--yes", "-y", action="store_true", help="do not ask before clearing every page")
    c.add_argument(
        "--live-ratio",
        type=_ratio,
        default=0.5,
        metavar="R",
        help="after clearing, compact segments whose live share is below R (default 0.5)",
    )
    c.set_defaults(func=cmd_clear)

    r = sub.add_parser(
        "repair",
        help="repair a damaged store (exit 1 if anything was repaired or dropped)",
        description="Take the recovery ladder a server takes when it opens a damaged store: rewrite a "
        "damaged format stamp, recreate missing directories, rebuild a damaged index from "
        "the segment files; if that fails, move the store aside to DIR.damaged-<time> "
        "(kept) and start an empty one. Then re-read every page and drop those that fail "
        "their checks. Prints what it kept, dropped and rebuilt. Needs the store to itself.",
    )
    r.add_argument("dir", metavar="DIR", help=dir_help)
    r.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the index from the segment files even if it checks out (pages of segments written "
        "before kvdrive's segment format 2 are then lost)",
    )
    r.set_defaults(func=cmd_repair)
    return p


# --- entry point ----------------------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be swapped after setup, e.g. under test capture)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record):
        s = super().format(record)
        # the store's messages carry their own "kvdrive: " prefix: don't print it twice
        return s.replace("kvdrive: kvdrive: ", "kvdrive: ", 1)


def _setup_logging() -> None:
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("kvdrive: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # no-op if the host already configured logging


def _error(msg: str) -> int:
    print(f"{PROG}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # -h, --version, usage errors: argparse has printed its text
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    try:
        return args.func(args)
    except (KvdriveError, CliError) as e:
        return _error(str(e))
    except OSError as e:  # an I/O problem the store did not turn into one of its own errors
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return _error(f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except lmdb.Error as e:  # a damaged or unreadable index
        return _error(f"store index: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
