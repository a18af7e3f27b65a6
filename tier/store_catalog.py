"""What a disk store's index holds besides the page read and write paths: listing (``keys``, ``namespaces``,
``contents`` for stats), deleting (``delete_many``, ``clear``), the promoter's score hints (``set_scores``) and small
notes kept with the store.

``DiskStore`` owns one (when its disk tier opened) and keeps the public methods, which answer "nothing here" while
the tier is off and turn a disk fault into its fault handling (tier off for ``retry_after_s``, I8). Every record
delete goes through ``Index.delete_page``, which changes the segment's accounting in the same transaction (I2).
Split from disk_store.py (issue 16).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .errors import ConfigError
from .index import Index, IndexRoom, Record, page_key
from .namespace import Namespace, key_bytes
from .page_writer import PageWriter

NOTE_PREFIX = b"note:"  # meta-table prefix of small values kept with the store (get_note / put_note)
NOTE_MAX_BYTES = 65536
SCORES_PER_TXN = 32  # score updates per index transaction (see set_scores)


class Contents(NamedTuple):
    """What the store holds now, from the segments' accounting (I2: it equals the sum over their records)."""

    entries: int
    live_bytes: int  # encoded bytes the index points at
    raw_bytes: int  # decoded size of those pages
    file_bytes: int  # bytes in segment files (live + dead awaiting compaction)
    segments: int


def check_note(name: str, value: bytes) -> None:
    if len(value) > NOTE_MAX_BYTES:
        raise ConfigError(f"store note {name!r} is {len(value)} bytes; at most {NOTE_MAX_BYTES} are allowed")


class StoreCatalog:
    def __init__(self, index: Index, room: IndexRoom, pages: PageWriter, write_lock: threading.RLock):
        self.index = index
        self.room = room
        self.pages = pages
        self.write_lock = write_lock

    def keys(self, ns: Namespace) -> list[bytes]:
        prefix = ns.id
        out = []
        with self.index.read() as txn:
            cur = txn.cursor(db=self.index.pages)
            if cur.set_range(prefix):
                for k in cur.iternext(values=False):
                    if not k.startswith(prefix):
                        break
                    out.append(bytes(k[len(prefix) + 1 :]))
        return out

    def namespaces(self) -> list[tuple[bytes, dict | None, int, int]]:
        per: dict[bytes, list[int]] = {}
        with self.index.read() as txn:
            for k, v in txn.cursor(db=self.index.pages):
                acc = per.setdefault(bytes(k[:16]), [0, 0])
                acc[0] += 1
                acc[1] += Record.unpack(v).length
            descs = {bytes(k): json.loads(v) for k, v in txn.cursor(db=self.index.ns)}
        return [(nid, descs.get(nid), c, b) for nid, (c, b) in sorted(per.items())]

    def contents(self, seg_path: Callable[[int], str]) -> Contents:
        with self.index.read() as txn:
            segs = self.index.segments(txn)
        file_bytes = 0
        for seg in segs:
            try:
                file_bytes += os.stat(seg_path(seg)).st_size
            except OSError:  # deleted by another process's compaction meanwhile
                pass
        return Contents(
            entries=sum(s.count for s in segs.values()),
            live_bytes=sum(s.live for s in segs.values()),
            raw_bytes=sum(s.raw_live for s in segs.values()),
            file_bytes=file_bytes,
            segments=len(segs),
        )

    def delete_many(self, ns: Namespace, keys: Sequence) -> int:
        with self.write_lock, self.index.write() as txn:  # I2: delete_page keeps the accounting in this commit
            return sum(self.index.delete_page(txn, page_key(ns.id, key_bytes(k))) is not None for k in keys)

    def clear(self, namespace_id: bytes | None) -> int:
        with self.write_lock, self.index.write() as txn:
            cur = txn.cursor(db=self.index.pages)
            prefix = namespace_id or b""
            doomed = []
            if cur.set_range(prefix):
                for k in cur.iternext(values=False):
                    if not k.startswith(prefix):
                        break
                    doomed.append(bytes(k))
            for pk in doomed:
                self.index.delete_page(txn, pk)  # I2
            if namespace_id is not None:
                txn.delete(namespace_id, db=self.index.ns)
            else:
                txn.drop(self.index.ns, delete=False)
        self.pages.forget(namespace_id)
        return len(doomed)

    def set_scores(self, ns: Namespace, keys: Sequence, scores: Sequence[float]) -> None:
        """OSError / lmdb.Error propagate: the store's fault handling takes them (a full map frees room, I7)."""
        with self.write_lock:
            # in small transactions: one transaction copies every leaf it touches, and a few thousand scattered
            # updates at once need room for a copy of the whole tree; small ones reuse what the last freed (I7).
            # They are a hint: where the map lacks even that room they go in smaller transactions, or not at
            # all -- never evicting pages for them
            pairs = list(zip(keys, scores))
            per_txn = self.room.commit_size(min(SCORES_PER_TXN, len(pairs)), evict=False)
            for i in range(0, len(pairs) if per_txn else 0, per_txn or 1):
                with self.index.write() as txn:
                    for k, s in pairs[i : i + per_txn]:
                        pk = page_key(ns.id, key_bytes(k))
                        b = txn.get(pk, db=self.index.pages)
                        if b is not None:
                            txn.put(pk, Record.unpack(b)._replace(score=float(s)).pack(), db=self.index.pages)
                self.room.last_txn_records = per_txn

    def get_note(self, name: str) -> bytes | None:
        with self.index.read() as txn:
            v = txn.get(NOTE_PREFIX + name.encode(), db=self.index.meta)
        return bytes(v) if v is not None else None

    def put_note(self, name: str, value: bytes) -> None:
        """OSError / lmdb.Error propagate to the store's fault handling."""
        with self.index.write() as txn:
            txn.put(NOTE_PREFIX + name.encode(), value, db=self.index.meta)
