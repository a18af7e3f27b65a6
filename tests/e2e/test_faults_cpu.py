"""Faults and crashes under a real ``sglang.launch_server`` (CPU, tiny generated Llama) serving from kvdrive.

1. Storage faults under one running server (``test_storage_faults``): EIO on read, EIO on write, ENOSPC, a read-only
   store, a segment file deleted, a segment file truncated. Injected into the server's own processes by a test-only
   ``sitecustomize`` (tests/e2e/faultinject) while a control file exists, for file descriptors under the store only;
   deletion and truncation are done to the files directly. Each fault: the prompt's pages must come back from storage
   (device and host pools flushed), every answer must equal the radix-only reference, the server log must carry
   kvdrive's line naming the fault, and once the fault is cleared the disk tier must write and serve again by itself
   (after ``retry_after_s``). At the end /metrics must count the faults per kind.
2. A full LMDB map, for real (``test_lmdb_map_full``): a tiny ``map_size`` fills while serving.
3. A second server on the same directory while the first runs (it shares safely), then ``kill -9`` of the first
   server's whole process group mid write-down and its restart on the same directory
   (``test_second_server_same_dir_then_kill_9``).

The servers run kvdrive with write-through and no kvdrive DRAM tier (``host_bytes`` 0), so every page SGLang stores goes
to the disk at once and every reload is a disk read: the faults cannot hide behind a memory tier. Figures (faults
injected, answers right / total, log lines, metric values, recovery times) go to ``faults.json`` beside the server
logs; bench/results/trust-faults.md reports them.

Running as root, ``chmod`` does not stop writes (root ignores permission bits), so the read-only store is EROFS
injected on every write path (open for writing, pwrite/pwritev, fdatasync, truncate) rather than a chmod.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest


def _sglang_installed() -> bool:
    try:
        return importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        return False


if not _sglang_installed():
    pytest.skip("sglang is not installed: the e2e server tests need the [sglang] extra", allow_module_level=True)

from kvdrive_sglang.flags import KvdriveOptions, canonical, flag_of
from kvdrive_sglang.tier.store_dir import INDEX_DIR
from tests.helpers import PinnedReader

from .common import (
    MAX_NEW,
    PAGE,
    PROMPT_TOKENS,
    at_least,
    grep_log,
    index_entries,
    kvdrive_cli,
    metric_text,
    server,
    stop,
    wait_for,
)
from .server import gpu_present

pytestmark = pytest.mark.e2e

FAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultinject")
RETRY_S = 3.0  # the disk tier's retry_after_s in these servers
PAGES = PROMPT_TOKENS // PAGE
FULL_STORAGE = PROMPT_TOKENS - PAGE  # storage tokens of a full reload (SGLang keeps the last page on the device)
RESULTS: dict = {}


def kvdrive_flags(store, *, disk: dict | None = None, host_bytes: int = 0) -> list[str]:
    """SGLang's flags for a kvdrive server: exactly what ``--kv-tier kvdrive`` expands to (flags.canonical), with
    disk-store options in the storage extra config, which ``--kvdrive-*`` flags do not reach."""
    fields = canonical(KvdriveOptions(dir=str(store)), gpu=gpu_present())
    extra = json.loads(fields["hicache_storage_backend_extra_config"])
    extra["kvdrive"].update(host_bytes=host_bytes, write_policy="write_through", reload="always", disk=dict(disk or {}))
    fields["hicache_storage_backend_extra_config"] = json.dumps(extra)
    out = []
    for field, value in fields.items():
        out += [flag_of(field)] if value is True else [flag_of(field), str(value)]
    return out


def record(name: str, **figures) -> None:
    RESULTS.setdefault(name, {}).update(figures)


@pytest.fixture(scope="module", autouse=True)
def _write_results(e2e_dir):
    yield
    path = e2e_dir / "faults.json"
    path.write_text(json.dumps(RESULTS, indent=2, sort_keys=True))
    print(f"\nfault figures: {path}\n{json.dumps(RESULTS, indent=1, sort_keys=True)}")


class Driver:
    """One kvdrive server and its store; requests checked against the radix-only reference."""

    def __init__(self, srv, store, ref_ids, prompts):
        self.srv, self.store, self.ref_ids, self.prompts = srv, store, ref_ids, prompts
        self.answers = self.right = 0

    def ask(self, i: int) -> dict:
        r = self.srv.generate(self.prompts[i], MAX_NEW)
        self.answers += 1
        self.right += r["ids"] == self.ref_ids[i]
        assert r["ids"] == self.ref_ids[i], f"prompt {i}: output differs from the radix-only server: {r}"
        return r

    def entries(self) -> int:
        # read in this process: polled dozens of times per test, where a `kvdrive stats` run cost ~0.5-1 s each
        # (common.index_entries; the command itself still reads these stores in `kvdrive verify` below)
        return index_entries(self.store)

    def store_prompt(self, i: int, timeout: float = 30) -> int:
        """Serve prompt i (new to the server) and wait until its pages are on disk; returns the store's entries."""
        before = self.entries()
        r = self.ask(i)
        assert r["cached"] < PAGE, r
        got = wait_for(lambda: at_least(self.entries(), before + PAGES), timeout) or self.entries()
        assert got >= before + PAGES, f"prompt {i}: store has {got} entries, want >= {before + PAGES}"
        return got

    def from_storage(self, i: int) -> dict:
        """Ask prompt i again with the device and host pools emptied: it can only come from storage (or compute)."""
        self.srv.flush_cache()
        return self.ask(i)


def storage_tokens(r) -> int:
    return int(r["details"].get("storage", 0))


# ------------------------------------------------------------------------------------------------ storage faults
def test_storage_faults(tiny_model, all_prompts, reference, e2e_dir, ext_dir, tmp_path):
    store = e2e_dir / "faults_store"
    ctl, flog = tmp_path / "fault.ctl", tmp_path / "injected.log"
    env = {"KVDRIVE_FAULT_ROOT": str(store), "KVDRIVE_FAULT_CONTROL": str(ctl), "KVDRIVE_FAULT_LOG": str(flog)}
    args = kvdrive_flags(store, disk={"retry_after_s": RETRY_S}) + ["--enable-metrics"]
    srv = server(
        "faults", tiny_model, e2e_dir, ext_dir, args, env=env, max_total_tokens=1024, pythonpath=[FAULT_DIR]
    ).start()
    d = Driver(srv, store, reference["all_ids"], all_prompts)

    def injected() -> int:
        return len(flog.read_text().splitlines()) if flog.exists() else 0

    def fault_lines(kind: str, during: str) -> list[str]:
        return grep_log(srv, f"after {kind} during {during}")

    def run_fault(name, spec, kind, during, *, new_prompt, recover_prompt):
        """Arm ``spec``; serve (prompt ``new_prompt`` when writes fail, prompt 0 from storage when reads fail); check
        the log; clear; show the tier writes and serves again (prompt ``recover_prompt``)."""
        n0, a0, r0 = injected(), d.answers, d.right
        ctl.write_text(spec)
        t_armed = time.monotonic()
        if during == "read":
            r = d.from_storage(0)
            assert storage_tokens(r) == 0, f"{name}: pages were served from a disk that fails every read: {r}"
        else:
            before = d.entries()
            d.ask(new_prompt)
            lines = wait_for(lambda: fault_lines(kind, during), 30)
            assert d.entries() == before, f"{name}: pages reached the index although every write fails"
            r = d.from_storage(new_prompt)  # its pages were dropped: computed again, and right
            assert storage_tokens(r) == 0, r
        lines = wait_for(lambda: fault_lines(kind, during), 30)
        assert lines, f"{name}: no kvdrive log line names the fault\n{srv.log_tail(30)}"
        armed_s = time.monotonic() - t_armed
        # one line per episode, not one per page: at most one per retry window the fault stayed armed
        assert len(lines) <= 1 + int(armed_s / RETRY_S), lines
        ctl.unlink()
        t_clear = time.monotonic()
        time.sleep(RETRY_S)
        if during == "read":
            r = d.from_storage(0)
            assert storage_tokens(r) >= FULL_STORAGE, f"{name}: disk tier did not serve again after the fault: {r}"
        else:
            d.store_prompt(recover_prompt)
            r = d.from_storage(recover_prompt)
            assert storage_tokens(r) >= FULL_STORAGE, f"{name}: disk tier did not serve again after the fault: {r}"
        record(
            name,
            injected=spec,
            faults_injected=injected() - n0,
            answers=d.answers - a0,
            right=d.right - r0,
            log_line=lines[0].split("kvdrive: ", 1)[-1][:200],
            log_lines=len(lines),
            recovered=True,
            recovered_after_s=round(time.monotonic() - t_clear, 1),
            retry_after_s=RETRY_S,
        )
        assert injected() > n0, f"{name}: the injector never fired"

    try:
        # baseline: the prompt's pages reach the disk and come back from it
        d.store_prompt(0)
        r = d.from_storage(0)
        assert storage_tokens(r) >= FULL_STORAGE and r["details"].get("storage_backend") == "KvdriveStorage", r

        run_fault("eio_read", "EIO read", "eio", "read", new_prompt=None, recover_prompt=None)
        run_fault("eio_write", "EIO write", "eio", "write", new_prompt=1, recover_prompt=2)
        run_fault("enospc", "ENOSPC write", "enospc", "write", new_prompt=3, recover_prompt=4)
        run_fault("read_only", "EROFS write", "read_only", "write", new_prompt=5, recover_prompt=6)

        # a segment file deleted under the running server
        seg_dir = store / "segments"
        a0, r0 = d.answers, d.right
        d.store_prompt(7)
        deleted = sorted(os.listdir(seg_dir))
        for f in deleted:
            os.unlink(seg_dir / f)
        r = d.from_storage(7)  # right either way: read through a still-open descriptor, or computed again
        t_clear = time.monotonic()
        d.store_prompt(8)  # the writer notices its file is gone and starts a new segment
        lines = grep_log(srv, "was deleted while in use")
        assert len(lines) == 1, lines
        r8 = d.from_storage(8)
        assert storage_tokens(r8) >= FULL_STORAGE, r8
        record(
            "segment_deleted",
            injected=f"unlink {len(deleted)} segment file(s)",
            answers=d.answers - a0,
            right=d.right - r0,
            log_line=lines[0].split("kvdrive: ", 1)[-1][:200],
            log_lines=len(lines),
            served_from_storage_after_delete=storage_tokens(r),
            recovered=True,
            recovered_after_s=round(time.monotonic() - t_clear, 1),
        )

        # a segment file truncated under the running server (a torn tail): the lost pages are dropped, not served
        a0, r0 = d.answers, d.right
        d.store_prompt(9)
        sizes = {f: os.path.getsize(seg_dir / f) for f in os.listdir(seg_dir)}
        for f, n in sizes.items():
            os.truncate(seg_dir / f, n // 2)
        r = d.from_storage(9)
        assert storage_tokens(r) < FULL_STORAGE, f"pages past a truncated end were served: {r}"
        lines = wait_for(lambda: grep_log(srv, "corrupt or missing page(s)"), 10)
        assert lines, srv.log_tail(30)
        t_clear = time.monotonic()
        d.store_prompt(10)
        r10 = d.from_storage(10)
        assert storage_tokens(r10) >= FULL_STORAGE, r10
        record(
            "segment_truncated",
            injected=f"truncate {len(sizes)} segment file(s) to half",
            answers=d.answers - a0,
            right=d.right - r0,
            log_line=lines[0].split("kvdrive: ", 1)[-1][:200],
            log_lines=len(lines),
            recovered=True,
            recovered_after_s=round(time.monotonic() - t_clear, 1),
        )

        # the faults per kind reach /metrics (kvdrive's reporter feeds Prometheus every 10 s)
        want = {"eio": 2, "enospc": 1, "read_only": 1, "missing_file": 1}

        def counts():
            text = metric_text(srv)
            got = {
                k: sum(
                    float(ln.rsplit(" ", 1)[1])
                    for ln in text.splitlines()
                    if ln.startswith("kvdrive:disk_faults_total{") and f'kind="{k}"' in ln
                )
                for k in want
            }
            got["corrupt_dropped"] = sum(
                float(ln.rsplit(" ", 1)[1])
                for ln in text.splitlines()
                if ln.startswith("kvdrive:corrupt_pages_dropped_total{")
            )
            return got

        got = (
            wait_for(
                lambda: (lambda c: c if all(c[k] >= n for k, n in want.items()) and c["corrupt_dropped"] else None)(
                    counts()
                ),
                30,
            )
            or counts()
        )
        record("metrics", **got)
        for k, n in want.items():
            assert got[k] >= n, f"kvdrive:disk_faults_total{{kind={k!r}}} = {got[k]}, want >= {n}"
        assert got["corrupt_dropped"] > 0, got
    finally:
        if ctl.exists():
            ctl.unlink()
        stop(srv, "faults")
    record("storage_faults_total", answers=d.answers, right=d.right)
    # after the server: verify drops what the deletion and truncation lost, and a second pass finds the store clean
    first = kvdrive_cli("verify", str(store), check=False)
    assert first.returncode in (0, 1), first.stderr
    kvdrive_cli("verify", str(store))
    record("storage_faults_verify", first_rc=first.returncode, first=first.stdout.strip()[-300:])


# ------------------------------------------------------------------------------------------------ LMDB map full
MAP_SIZE = 192 << 10  # the index of about five prompts' pages


def settled(d: Driver, before: int, timeout: float = 15) -> int:
    """The store's entry count once the write-down of the prompt just asked is over: changed from ``before`` (pages
    stored, maybe others evicted) and then steady for a second."""
    wait_for(lambda: d.entries() != before, timeout)
    last = d.entries()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = d.entries()
        if now == last:
            break
        last = now
    return last


def test_lmdb_map_full(tiny_model, all_prompts, reference, e2e_dir, ext_dir):
    """1. A map too small for the index (192 KiB, about five prompts' pages) is not a fault: the store evicts its
    lowest-value pages before a commit could fail (by the promoter's value: the prompt being written, never reused
    yet, can be among them) and goes on storing and serving: the prompt after the eviction is served back from disk.
    2. A map that fills for real: another process holds a read transaction open (a hung tool, a backup), so LMDB can
    reuse no page freed since. Requests stay right, the fault is logged and counted; once the reader lets go the
    tier stores and serves again by itself after retry_after_s."""
    store = e2e_dir / "mapfull_store"
    args = kvdrive_flags(store, disk={"retry_after_s": RETRY_S, "map_size": MAP_SIZE}) + ["--enable-metrics"]
    srv = server("mapfull", tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024).start()
    d = Driver(srv, store, reference["all_ids"], all_prompts)
    reader = None
    try:
        # 1. too small: keeps working
        i, served, counts, evicting_from = 0, [], [], None
        while i < 9 and (evicting_from is None or i <= evicting_from + 1):  # one more prompt once it evicts
            before = d.entries()
            d.ask(i)
            counts.append(settled(d, before))
            served.append(storage_tokens(d.from_storage(i)))
            if evicting_from is None and grep_log(srv, "above 80% of its map"):
                evicting_from = i
            i += 1
        evictions = grep_log(srv, "above 80% of its map")
        record(
            "lmdb_map_too_small",
            map_size=MAP_SIZE,
            prompts=i,
            entries_after_each=counts,
            storage_tokens_each=served,
            eviction_line=evictions[0].split("kvdrive: ", 1)[-1][:200] if evictions else None,
            faults=grep_log(srv, "after map_full during")[:1],
        )
        assert evicting_from is not None, f"a {MAP_SIZE}-byte map never needed eviction in {i} prompts: {counts}"
        # every prompt before the map filled, and the one after the eviction, came back from disk in full
        assert all(t >= FULL_STORAGE for t in served[:evicting_from] + served[evicting_from + 1 :]), (served, counts)
        assert not grep_log(srv, "after map_full during"), "a map merely too small must not fault"

        # 2. full for real while a reader pins an old snapshot
        reader = PinnedReader(store / INDEX_DIR, MAP_SIZE)
        full_at = None
        while i < len(all_prompts) and full_at is None:
            d.ask(i)
            if wait_for(lambda: grep_log(srv, "after map_full during"), 10):
                full_at = i
            i += 1
        assert full_at is not None, f"the map never filled with a reader pinned: {d.entries()} entries"
        lines = grep_log(srv, "after map_full during")
        reader.release()
        t_free = time.monotonic()
        time.sleep(RETRY_S)
        recovered = None
        for j in range(i, len(all_prompts)):
            before = d.entries()
            d.ask(j)
            settled(d, before)
            # a write may land in another fault's off-window: ask again after each such window
            for _ in range(3):
                if storage_tokens(d.from_storage(j)) > 0:
                    recovered = round(time.monotonic() - t_free, 1)
                    break
                time.sleep(RETRY_S)
            if recovered is not None:
                break
        got = wait_for(
            lambda: int(
                sum(
                    float(ln.rsplit(" ", 1)[1])
                    for ln in metric_text(srv).splitlines()
                    if ln.startswith("kvdrive:disk_faults_total{") and 'kind="map_full"' in ln
                )
            ),
            30,
        )
        full_lines = grep_log(srv, "is full (map_size")
        record(
            "lmdb_map_full",
            injected="a read transaction held open by another process (192 KiB map)",
            answers=d.answers,
            right=d.right,
            full_after_prompts=full_at + 1 - len(served),
            log_line=lines[0].split("kvdrive: ", 1)[-1][:200],
            eviction_line=full_lines[0].split("kvdrive: ", 1)[-1][:200] if full_lines else None,
            metric_map_full=got,
            recovered=recovered is not None,
            recovered_after_s=recovered,
        )
        assert got and got >= 1, "kvdrive:disk_faults_total{kind='map_full'} missing"
        assert recovered is not None, "the disk tier never stored and served a page again after the reader let go"
    finally:
        if reader is not None:
            reader.release()
        stop(srv, "mapfull")
    kvdrive_cli("verify", str(store))


# ------------------------------------------------------------------------------------------------ two servers, kill -9
def test_second_server_same_dir_then_kill_9(tiny_model, all_prompts, reference, e2e_dir, ext_dir, tmp_path):
    """A second server started on the first one's directory by mistake shares the store safely: each writes a segment
    of its own and serves what the other wrote. Then SIGKILL to every process of the first server while its
    write-down is under way (a slow disk, injected into that server only: each write and fdatasync stalls 1 s); the
    second keeps serving; the first restarts on the same directory and serves right answers, with what was committed
    before the kill back from disk; after both stop ``kvdrive verify`` finds the store clean."""
    store = e2e_dir / "shared_store"
    ctl, flog = tmp_path / "fault.ctl", tmp_path / "injected.log"
    env = {"KVDRIVE_FAULT_ROOT": str(store), "KVDRIVE_FAULT_CONTROL": str(ctl), "KVDRIVE_FAULT_LOG": str(flog)}
    args = kvdrive_flags(store)
    ref = reference["all_ids"]
    # A and B stay up while another server starts beside them (B beside A, A2 beside B): --sleep-on-idle, or each
    # idles at 100% of one of CI's 2 cores and the start beside it took 2-4x as long (common.server). A2, which
    # nothing starts beside, keeps SGLang's default idle loop.
    a = server(
        "shared_a",
        tiny_model,
        e2e_dir,
        ext_dir,
        args,
        env=env,
        max_total_tokens=1024,
        pythonpath=[FAULT_DIR],
        sleep_on_idle=True,
    ).start()
    b = a2 = None
    try:
        da = Driver(a, store, ref, all_prompts)
        da.store_prompt(0)
        b = server("shared_b", tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024, sleep_on_idle=True).start()
        db = Driver(b, store, ref, all_prompts)
        rb = db.ask(0)  # written by A, never seen by B: from the shared disk
        db.store_prompt(1)
        ra = da.from_storage(1)  # written by B, read by A
        assert storage_tokens(rb) >= FULL_STORAGE, f"B did not read A's pages: {rb}"
        assert storage_tokens(ra) >= FULL_STORAGE, f"A did not read B's pages: {ra}"
        record(
            "second_server",
            answers=da.answers + db.answers,
            right=da.right + db.right,
            b_storage_tokens_of_a_prompt=storage_tokens(rb),
            a_storage_tokens_of_b_prompt=storage_tokens(ra),
        )

        # kill -9 of A mid write-down; B keeps serving
        def injected() -> int:
            return len(flog.read_text().splitlines()) if flog.exists() else 0

        before = da.entries()
        ctl.write_text("DELAY write 1.0")
        for i in range(2, 8):
            da.ask(i)  # answers do not wait for the disk: A's write-down falls behind
        # kill the moment A's next write begins: it is then inside a 1 s stall of its pwrite or fdatasync, and the
        # index commit that would point at those bytes comes only after both
        seen = injected()
        wait_for(lambda: injected() > seen, 30, interval=0.02)
        stalled = injected()
        stop(a, "shared_a", graceful=False)  # SIGKILL to the whole process group at once
        ctl.unlink()
        after_kill = db.entries()
        assert stalled > 0, "no write of A reached the disk while the slow disk was armed"
        assert after_kill < before + 6 * PAGES, (
            f"{after_kill - before} of A's last 6 x {PAGES} pages were committed: the kill did not land mid write-down"
        )
        b_after = [db.from_storage(i) for i in (0, 1)]  # B serves on, from the disk A shared
        db.store_prompt(8)  # ... and writes
        assert all(storage_tokens(r) >= FULL_STORAGE for r in b_after), b_after

        # A restarts on the same directory, B still running
        a2 = server("shared_a2", tiny_model, e2e_dir, ext_dir, args, max_total_tokens=1024).start()
        d2 = Driver(a2, store, ref, all_prompts)
        replay = [d2.ask(i) for i in (0, 1, *range(2, 9))]  # right answers, whatever the store kept
        assert storage_tokens(replay[0]) >= FULL_STORAGE, f"a prompt committed before the kill was lost: {replay[0]}"
    finally:
        if ctl.exists():
            ctl.unlink()
        for srv, name in ((a2, "shared_a2"), (b, "shared_b"), (a, "shared_a")):
            if srv is not None and srv.proc is not None:
                stop(srv, name)
    v = kvdrive_cli("verify", str(store))  # rc 0: nothing torn, mixed or pointing past a file's end
    record(
        "kill_9",
        writes_stalled_before_kill=stalled,
        pages_of_a_in_flight=6 * PAGES,
        pages_of_a_committed_before_kill=after_kill - before,
        b_answers_after_kill=3,
        restart_answers=d2.answers,
        restart_right=d2.right,
        restart_prompts_from_storage=sum(storage_tokens(r) >= FULL_STORAGE for r in replay),
        total_answers=da.answers + db.answers + d2.answers,
        total_right=da.right + db.right + d2.right,
        verify=v.stdout.strip()[-300:],
    )
