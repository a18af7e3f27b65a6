"""RemoteTieredEngine: kvdrive's local tiers (staged -> DRAM -> queued -> disk) with a shared remote tier behind them.

    get_many     local tiers first; the misses are read from the remote tier in batches, each object verified
                 (tier/remote/envelope.py) and decoded into the caller's buffer, then promoted into the local tiers
                 as the verified blob itself, not re-encoded (a raw DRAM tier keeps the decoded page: a copy), into
                 the DRAM pool, and the disk where the write policy / promoter admits it
    exists_many  the leading run of pages held locally *or* remotely (SGLang's longest-prefix count)
    tiers_of     "remote" for pages only the remote tier holds
    write-behind every page the engine writes down to its disk is offered to the remote tier's queue
                 (tier/remote/write_behind.py): under the default selective policy, the pages the promoter admits

Remote calls are time-bounded and a fault turns the remote tier off for a retry window (tier/remote/guard.py): the
local tiers keep serving, and a page never comes from a remote object that fails its checks.

Remote objects live in the *remote namespace* of a page's local namespace: the same fields, with the model named by
an identity that holds across machines (tier/remote/model_ids.py), so two nodes with their own copy of one model
share pages, and two different models never do.

Built beside tier/engine.py rather than inside it: the engine's own methods are called as they are, and the write-down
is observed through the engine's ``on_written_down`` hook (each batch that landed on disk), so the engine needs no
remote code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from .. import clock
from ..buffers import byte_view
from ..codecs import decode_page, encode_page, peek_header
from ..costfit import Line, LinearFit
from ..engine import TierConfig, TierEngine, TierStats
from ..errors import CodecError, ConfigError
from ..namespace import Namespace, key_bytes
from . import SETTINGS_NOTE, ObjectId, RemoteSpec, RemoteTier, open_remote, settings_note
from .envelope import Reject, open_object
from .guard import CallGuard, Unavailable
from .model_ids import remote_namespace
from .write_behind import WriteBehind

log = logging.getLogger("kvdrive.tier")
REMOTE = "remote"  # tiers_of's name for the remote tier (tier/tiers.py Tier.REMOTE)


class RemoteStats(NamedTuple):
    url: str
    on: bool  # not inside a retry window now
    off_for_s: float  # left of the current retry window
    last_fault: str | None
    hits: int  # pages served from the remote tier (verified)
    promoted: int  # of those, put into the local tiers as the verified blob (no re-encode)
    not_promoted: int  # of those, not held locally: no room in the DRAM pool and not admitted to the disk, or unkeyed
    misses: int  # pages asked of it and not there
    rejected: dict  # Reject reason -> pages whose remote object failed its checks (served as misses)
    bytes_read: int  # remote object bytes read for hits
    bytes_written: int  # remote object bytes written
    written: int  # pages written
    present: int  # pages not written: already there
    queued_bytes: int  # write-behind queue
    dropped: dict  # write-behind pages dropped: full, off (fault window), unkeyed
    get_calls: int
    get_s: float
    exists_calls: int  # the read path's and the write-behind's
    exists_s: float
    put_calls: int  # write-behind puts that succeeded
    put_s: float
    faults: dict  # RemoteFault -> count
    refused: dict  # calls not made: off (retry window), busy (every worker held by a hung call)
    settings: dict


class RemoteTieredEngine(TierEngine):
    def __init__(self, config: TierConfig, spec: RemoteSpec, remote: RemoteTier | None = None):
        if config.path is None:
            raise ConfigError(
                "kvdrive remote tier: pages reach it behind the disk tier's write-down; it needs a disk store path"
            )
        self.remote = open_remote(spec) if remote is None else remote  # ConfigError: client library missing
        self.spec = spec
        super().__init__(config)
        opts = spec.options
        self.guard = CallGuard(spec.url, opts.retry_s)
        self.write_behind = WriteBehind(self.remote, self.guard, opts, self.keyring) if opts.write else None
        self._rc: Counter = Counter()
        self._rt: Counter = Counter()
        self._rejects: Counter = Counter()
        self._rlock = threading.Lock()
        self._remote_ns: dict[bytes, Namespace] = {}  # local namespace id -> its remote namespace
        # the read-through's cost as the promoter prices a tier: seconds = round trip + decoded bytes x per-byte, one
        # observation per batched get that brought pages (get, verify, decode), for Promoter.calibrate
        self._read_fit = LinearFit(window=256, min_samples=4)
        if self.write_behind is not None:
            self.on_written_down = self._offer_remote  # the pages the write-down landed on disk
        if config.mirror != "read":  # a rank reading another's tier writes nothing to the store
            self.put_note(SETTINGS_NOTE, settings_note(spec, self.remote.describe()))  # for `kvdrive stats`
        log.info(
            "kvdrive: remote tier %s behind the local tiers (%s)",
            spec.url,
            ", ".join(f"{k}={v}" for k, v in self.remote.describe().items()),
        )

    # --- read-through -----------------------------------------------------------------------------------------
    def get_many(self, ns: Namespace, keys: Sequence, outs: Sequence) -> list[bool]:
        result = super().get_many(ns, keys, outs)
        miss = [i for i, g in enumerate(result) if not g]
        if not miss or not self.guard.available(count=True):
            return result
        rns = self.remote_ns(ns)
        promote: list[tuple[bytes, bytes]] = []  # (key, verified blob)
        for part in self._chunks(miss, outs):
            t0 = time.perf_counter()
            objs = self._remote_get(rns, [keys[i] for i in part])
            if objs is None:
                break  # off now: the rest are misses
            got_bytes = 0
            for i, obj in zip(part, objs):
                if obj is None:
                    self._count(misses=1)
                    continue
                out_u8 = byte_view(outs[i], writable=True)
                key = key_bytes(keys[i])
                opened = open_object(obj, rns, key, out_u8.size, self.keyring)
                if opened.blob is not None:
                    try:
                        decode_page(opened.blob, outs[i], ns.kv_dtype)
                    except CodecError:
                        opened = opened._replace(blob=None, reject=Reject.BAD_PAGE)
                if opened.blob is None:
                    with self._rlock:
                        self._rejects[opened.reject.value] += 1
                    continue
                result[i] = True
                got_bytes += out_u8.size
                self._count(hits=1, bytes_read=len(obj))
                promote.append((key, self._local_blob(ns, opened.blob, out_u8)))
            if got_bytes:
                self._read_fit.add(got_bytes, time.perf_counter() - t0)
        if promote:
            self._promote(ns, promote)
        return result

    def remote_ns(self, ns: Namespace) -> Namespace:
        """The remote namespace of local namespace ``ns``: its fields with the cross-machine model identity
        (tier/remote/model_ids.py; ``model_id`` from the remote config where the server recorded none)."""
        r = self._remote_ns.get(ns.id)
        if r is None:
            r = self._remote_ns.setdefault(ns.id, remote_namespace(ns, self.spec.options.model_id))
        return r

    def exists_many(self, ns: Namespace, keys: Sequence) -> int:
        n = super().exists_many(ns, keys)
        if n == len(keys) or not self.guard.available(count=True):
            return n
        there = self._remote_exists(self.remote_ns(ns), keys[n:])
        if there is None:
            return n
        base = n
        while n < len(keys):
            # a page held remotely, or locally after a remote-only page (the local count stopped at its first miss)
            if not there[n - base] and super().tiers_of(ns, [keys[n]])[0] is None:
                break
            n += 1
        return n

    def tiers_of(self, ns: Namespace, keys: Sequence) -> list:
        out = super().tiers_of(ns, keys)
        missing = [i for i, t in enumerate(out) if t is None]
        if missing and self.guard.available(count=True):
            there = self._remote_exists(self.remote_ns(ns), [keys[i] for i in missing])
            for i, t in zip(missing, there or ()):
                if t:
                    out[i] = REMOTE
        return out

    # --- upkeep --------------------------------------------------------------------------------------------
    def clear(self, ns: Namespace | None = None) -> None:
        """Local tiers and this node's write-behind queue. The shared tier's copies stay: other nodes use them."""
        if self.write_behind is not None:
            self.write_behind.drop(self.remote_ns(ns).id if ns is not None else None)
        super().clear(ns)

    def flush(self, timeout: float | None = None) -> bool:
        """The local flush, then the write-behind queue to the remote tier (as long again)."""
        if not super().flush(timeout):
            return False
        return self.write_behind is None or self.write_behind.flush(60.0 if timeout is None else timeout)

    def stats(self) -> TierStats:
        s = super().stats()
        return s._replace(misses=s.misses - self._rc["hits"])  # a remote hit is no miss of the engine's

    def remote_cost(self) -> Line | None:
        """The measured read-through cost (fixed_s per batched get, per_unit_s per decoded byte), None until enough
        reads of different sizes were timed."""
        return self._read_fit.line()

    def remote_stats(self) -> RemoteStats:
        g, wb = self.guard, self.write_behind
        wc = wb.counts if wb is not None else Counter()
        wt = wb.times if wb is not None else Counter()
        with self._rlock:
            c, t, rej = dict(self._rc), dict(self._rt), dict(self._rejects)
        return RemoteStats(
            url=self.spec.url,
            on=g.available(),
            off_for_s=round(g.off_for_s(), 3),
            last_fault=g.last_fault(),
            hits=c.get("hits", 0),
            promoted=c.get("promoted", 0),
            not_promoted=c.get("not_promoted", 0),
            misses=c.get("misses", 0),
            rejected=rej,
            bytes_read=c.get("bytes_read", 0),
            bytes_written=wc["bytes_written"],
            written=wc["written"],
            present=wc["present"],
            queued_bytes=wb.queued_bytes() if wb is not None else 0,
            dropped={"full": wc["dropped_full"], "off": wc["dropped_off"], "unkeyed": wc["unkeyed"]},
            get_calls=c.get("get_calls", 0),
            get_s=t.get("get_s", 0.0),
            exists_calls=c.get("exists_calls", 0) + wc["exists_calls"],
            exists_s=t.get("exists_s", 0.0) + wt["exists_s"],
            put_calls=wc["put_calls"],
            put_s=wt["put_s"],
            faults=dict(g.faults),
            refused={"off": g.off, "busy": g.busy},
            settings=self.spec.describe() | {"client": self.remote.describe()},
        )

    def close(self, timeout: float = 120.0) -> None:
        if getattr(self, "_remote_closed", False):
            return
        self._remote_closed = True
        super().close(timeout)  # its flush writes down the rest: offered to the write-behind queue
        if self.write_behind is not None:
            self.write_behind.close(min(timeout, 30.0))
        self.guard.close("close", self.remote.close, min(timeout, 10.0))

    # --- internals -------------------------------------------------------------------------------------------
    def _local_blob(self, ns: Namespace, blob: bytes, page) -> bytes:
        """The blob a remote hit is kept as locally: the verified blob itself (it decoded into the caller's buffer;
        encoding that page again would cost a codec pass for the same page, and for a lossy blob, bloat it), except
        where this node keeps its DRAM tier raw (tier/codec_choice.py: zstd decode slower than the reload must be)
        and the blob is compressed: then the decoded page, as a raw blob (a copy, no codec pass), so DRAM hits on it
        cost what the tier was chosen for."""
        codec = self._codec_for(ns)
        if codec.name == "raw" and peek_header(blob).codec_name != "raw":
            return encode_page(page, ns.kv_dtype, codec, ns.head_dim)
        return blob

    def _promote(self, ns: Namespace, pages: list[tuple[bytes, bytes]]) -> None:
        """Remote hits into the local tiers as pages of this node (blobs from _local_blob): into the DRAM pool, and
        the disk if the write policy (the promoter's admission) wants it there -- what stage_many's encoder threads
        do with an encoded page (TierEngine._store_blob), TTL from now as put_many gives. Guarded by
        tests/tier/test_remote.py::test_remote_hits_enter_the_local_tiers_as_their_verified_blob."""
        if not self._keyed(ns, len(pages)):
            self._count(not_promoted=len(pages))
            return
        expires = clock.expires_at_ms(self.tenants.ttl_s(ns.tenant, self.config.default_ttl_s))
        held = sum(self._store_blob((ns.id, key), ns, blob, 0.0, expires) for key, blob in pages)
        self._count(promoted=held, not_promoted=len(pages) - held)

    def _offer_remote(self, ns: Namespace, keys: list, blobs: list) -> None:
        self.write_behind.offer(self.remote_ns(ns), keys, blobs)

    def _chunks(self, idx: list[int], outs) -> list[list[int]]:
        """Batches of at most ``batch_bytes`` of decoded pages (objects are smaller: compressed)."""
        limit, parts, cur, size = self.spec.options.batch_bytes, [], [], 0
        for i in idx:
            n = byte_view(outs[i]).size
            if cur and size + n > limit:
                parts.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        return parts + ([cur] if cur else [])

    def _remote_get(self, ns: Namespace, keys) -> list | None:
        ids = [ObjectId(ns.id, key_bytes(k)) for k in keys]
        t0 = time.perf_counter()
        try:
            return self.guard.call("get", lambda: self.remote.get(ids), self.spec.options.timeout_s)
        except Unavailable:
            return None
        finally:
            self._count(get_calls=1, get_s=time.perf_counter() - t0)

    def _remote_exists(self, ns: Namespace, keys) -> list[bool] | None:
        ids = [ObjectId(ns.id, key_bytes(k)) for k in keys]
        t0 = time.perf_counter()
        try:
            return self.guard.call("exists", lambda: self.remote.exists(ids), self.spec.options.timeout_s)
        except Unavailable:
            return None
        finally:
            self._count(exists_calls=1, exists_s=time.perf_counter() - t0)

    def _count(self, **kw) -> None:
        with self._rlock:
            for k, v in kw.items():
                (self._rt if k.endswith("_s") else self._rc)[k] += v
