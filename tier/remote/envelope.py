"""What a remote object holds, and its check before a page from another node is served.

A remote store is shared by every node and trusted by none: another node's bug, a flipped bit in transit, an object
written under the wrong name or a peer planting bytes must each end as a counted miss, never as a wrong page.

    MAGIC "KVR1" | version u8 | flags u8 | key length u16 | namespace id (16) | payload length u32 |
    checksum (16: xxh3-128 of everything before it and the payload) | key | payload

The payload is kvdrive's page blob (tier/codecs.py: its header names codec, dtype, row length and decoded size) as
the DRAM tier holds it, i.e. compressed before it leaves the node. With encryption at rest (flag SEALED) it is the
blob sealed with the tenant's key (tier/crypto.py: AES-256-GCM, the namespace id and key as associated data), so the
shared store never holds a tenant's plaintext, and deleting the tenant's key makes every remote copy unreadable too
(crypto-erase). A node with encryption on serves sealed objects only (a plaintext object could have been planted; as
I6 in docs/invariants.md for the disk store), and one without it serves no sealed ones.

The checksum catches damage, not forgery: without encryption, any writer of the shared store can write a page it
computed; the namespace id and key bound into the object keep a page from serving another name. With encryption the
tag authenticates the page against anyone without the tenant's key.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import xxhash

from ..codecs import peek_header
from ..crypto import KeyRing, SealError
from ..errors import CodecError
from ..namespace import Namespace

MAGIC = b"KVR1"
VERSION = 1
SEALED = 0x01
HEAD = struct.Struct("<4sBBH16sI")  # magic, version, flags, key length, namespace id, payload length
SUM_BYTES = 16


class Reject(str, enum.Enum):
    """Why a remote object was not served (counted per reason)."""

    MALFORMED = "malformed"  # too short, wrong magic / version / flags, lengths that do not add up
    WRONG_NAME = "wrong_name"  # holds another namespace's or another key's page
    CHECKSUM = "checksum"  # bytes changed
    PLAINTEXT = "plaintext"  # not sealed, and this node encrypts (or sealed, and it does not)
    NO_KEY = "no_key"  # sealed for a tenant whose key this node does not hold (deleted: crypto-erase)
    STALE_KEY = "stale_key"  # sealed under a key the tenant no longer has
    BAD_TAG = "bad_tag"  # sealed bytes altered, or sealed for another name
    BAD_PAGE = "bad_page"  # the page blob's header does not fit this namespace's pages


class Opened(NamedTuple):
    blob: bytes | None  # the page blob, ready for decode_page; None: rejected
    reject: Reject | None


def _aad(ns_id: bytes, key: bytes) -> bytes:
    return ns_id + key


def pack(ns: Namespace, key: bytes, blob, keyring: KeyRing | None) -> bytes | None:
    """The remote object for page ``key`` of namespace ``ns``; None when encryption is on and its tenant has no key
    (nothing leaves the node)."""
    ns_id, tenant, flags = ns.id, ns.tenant, 0
    payload = bytes(blob)
    if keyring is not None:
        payload = keyring.seal(tenant, _aad(ns_id, key), payload)
        if payload is None:
            return None
        flags |= SEALED
    head = HEAD.pack(MAGIC, VERSION, flags, len(key), ns_id, len(payload))
    h = xxhash.xxh3_128()
    h.update(head)
    h.update(key)
    h.update(payload)
    return b"".join((head, h.digest(), key, payload))


def open_object(obj, ns: Namespace, key: bytes, page_nbytes: int | None, keyring: KeyRing | None) -> Opened:
    """The page blob inside remote object ``obj`` if it is page ``key`` of namespace ``ns``, intact, sealed iff this
    node encrypts, and a page of the namespace's dtype and row length (of ``page_nbytes`` decoded bytes, if given)."""
    ns_id, tenant = ns.id, ns.tenant
    mv = memoryview(obj).cast("B")
    if len(mv) < HEAD.size + SUM_BYTES:
        return Opened(None, Reject.MALFORMED)
    magic, version, flags, klen, oid, plen = HEAD.unpack_from(mv, 0)
    if magic != MAGIC or version != VERSION or flags & ~SEALED or len(mv) != HEAD.size + SUM_BYTES + klen + plen:
        return Opened(None, Reject.MALFORMED)
    body = HEAD.size + SUM_BYTES
    if oid != ns_id or mv[body : body + klen] != key:
        return Opened(None, Reject.WRONG_NAME)
    h = xxhash.xxh3_128()
    h.update(mv[: HEAD.size])
    h.update(mv[body:])
    if h.digest() != mv[HEAD.size : body]:
        return Opened(None, Reject.CHECKSUM)
    payload = mv[body + klen :]
    if bool(flags & SEALED) != (keyring is not None):
        return Opened(None, Reject.PLAINTEXT)
    if keyring is not None:
        try:
            blob = keyring.open(tenant, _aad(ns_id, key), payload)
        except SealError as e:
            return Opened(None, Reject(e.reason))
    else:
        blob = bytes(payload)
    try:
        header = peek_header(blob)
    except CodecError:
        return Opened(None, Reject.BAD_PAGE)
    if (
        header.dtype_name != ns.kv_dtype
        or header.row_len != ns.head_dim
        or (page_nbytes is not None and header.raw_nbytes != page_nbytes)
    ):
        return Opened(None, Reject.BAD_PAGE)
    return Opened(blob, None)
