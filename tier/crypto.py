"""Encryption at rest: per-tenant AES-256-GCM keys (a key file or the KVDRIVE_KEYS variable) and the page envelope.

Key source: a JSON object mapping tenants to base64 32-byte keys, ``{"<salt>": "...", "@<group>": "...", "": "..."}``
(``""``: unsalted traffic; ``@G``: share_as group G, see tier/tenants.py). A key file must be a regular file owned by
this user and unreadable by anyone else (mode 0600 or stricter). ``refresh()`` re-reads it whenever its inode, size
or modification time change (one ``stat``): deleting a tenant's entry makes that tenant's pages on disk unreadable at
once (crypto-erase). A key file that becomes unreadable or malformed fails closed: no keys until it is fixed.

Envelope (what the disk store writes instead of the page blob): ``MAGIC | key fingerprint (8) | nonce (12) |
ciphertext + tag (16)``, authenticated with the page's namespace id and key as associated data, so a page copied to
another key, namespace or tenant, or altered in any byte, fails to open. Nonces are random (96 bits): safe for far
more pages than one key will ever seal (the 2^32 bound of NIST SP 800-38D).

PageSealer applies this to a disk store's pages: a store with a key ring seals every page it writes and serves only
sealed pages (I6 in docs/invariants.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError
from .tenants import id_of_label

log = logging.getLogger("kvdrive.tier")

ENV_VAR = "KVDRIVE_KEYS"
ENV_SOURCE = "env"  # --kvdrive-encrypt env: read the keys from KVDRIVE_KEYS
MAGIC = b"KVX1"
KEY_BYTES = 32
FP_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + FP_BYTES + NONCE_BYTES
OVERHEAD = HEADER_BYTES + TAG_BYTES
_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45: cipher straight into a caller's buffer


class SealError(Exception):
    """A sealed page cannot be opened. ``reason``: "no_key" (its tenant has no key now: keep it, a restored key
    reads it again), "stale_key" (sealed under a key this tenant no longer has) or "bad_tag" (altered or misplaced)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def fingerprint(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=FP_BYTES, person=b"kvdrive-keyfp").digest()


def is_envelope(blob) -> bool:
    return len(blob) >= OVERHEAD and bytes(blob[: len(MAGIC)]) == MAGIC


def _parse(text: str, where: str) -> dict[str, tuple[bytes, AESGCM]]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} must be a JSON object of tenant -> base64 key, got {type(obj).__name__}")
    keys: dict[str, tuple[bytes, AESGCM]] = {}
    for label, b64 in obj.items():
        if not isinstance(b64, str):
            raise ConfigError(f"{where}: key of tenant {label!r} must be a base64 string")
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: key of tenant {label!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{where}: key of tenant {label!r} is {len(key)} bytes; AES-256 keys are {KEY_BYTES}")
        keys[id_of_label(label)] = (fingerprint(key), AESGCM(key))
    return keys


def _read_key_file(path: str) -> tuple[str, tuple]:
    """The file's text and its identity (device, inode, size, mtime); ConfigError if unsafe or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise ConfigError(f"key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # checked on the open descriptor: no swap between the check and the read
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"key file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"key file {path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be readable "
                "or writable by group or others (chmod 600)"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
    finally:
        os.close(fd)
    return text, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class KeyRing:
    """Per-tenant data keys from ``source``: a key file path, or ``"env"`` for the KVDRIVE_KEYS variable.

    The first load fails with ConfigError naming the problem; later reloads (``refresh``) fail closed."""

    def __init__(self, source: str):
        if not isinstance(source, str) or not source:
            raise ConfigError(f"kvdrive encryption needs a key file path or {ENV_SOURCE!r}, got {source!r}")
        self.source = source if source == ENV_SOURCE else os.path.abspath(os.path.expanduser(source))
        self._lock = threading.Lock()
        self._sig = None
        self._keys: dict[str, tuple[bytes, AESGCM]] = {}
        self._load(first=True)

    def describe(self) -> str:
        return f"${ENV_VAR}" if self.source == ENV_SOURCE else f"key file {self.source}"

    def _current(self) -> tuple[str | None, object]:
        if self.source == ENV_SOURCE:
            text = os.environ.get(ENV_VAR)
            return text, text
        try:
            st = os.stat(self.source)
            return None, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None, None

    def _load(self, first: bool = False) -> set[str]:
        if self.source == ENV_SOURCE:
            text = os.environ.get(ENV_VAR)
            if text is None:
                raise ConfigError(f"--kvdrive-encrypt {ENV_SOURCE}: the {ENV_VAR} variable is not set")
            sig = text
        else:
            text, sig = _read_key_file(self.source)
        keys = _parse(text, self.describe())
        with self._lock:
            old, self._keys, self._sig = self._keys, keys, sig
        if first:
            log.info("kvdrive: encryption at rest on: %d tenant key(s) from %s", len(keys), self.describe())
        return {t for t, (fp, _) in old.items() if t not in keys or keys[t][0] != fp}

    def refresh(self) -> set[str]:
        """Re-read the keys if their source changed. Returns the tenant ids whose key went away or changed."""
        _, sig = self._current()
        if sig == self._sig:
            return set()
        try:
            changed = self._load()
        except ConfigError as e:
            with self._lock:
                changed, self._keys, self._sig = set(self._keys), {}, sig
            log.error("kvdrive: %s; no tenant keys until it is fixed (encrypted pages are misses)", e)
            return changed
        if changed:
            log.warning(
                "kvdrive: %s changed: key(s) of %d tenant(s) removed or replaced; their stored pages are "
                "unreadable from now on",
                self.describe(),
                len(changed),
            )
        return changed

    def has_key(self, tid: str) -> bool:
        return tid in self._keys

    def tenants(self) -> list[str]:
        return sorted(self._keys)

    def seal_into(self, tid: str, aad: bytes, blob, out) -> int | None:
        """Write the envelope of ``blob`` under tenant ``tid``'s key into ``out`` (at least len(blob) + OVERHEAD
        bytes); returns its length, or None when the tenant has no key. Writing into a caller's (reused) buffer
        spares a fresh allocation per page, whose first touch costs more than the cipher on some VMs."""
        entry = self._keys.get(tid)
        if entry is None:
            return None
        fp, aead = entry
        n = len(blob) + OVERHEAD
        mv = memoryview(out)
        nonce = os.urandom(NONCE_BYTES)
        mv[: len(MAGIC)] = MAGIC
        mv[len(MAGIC) : len(MAGIC) + FP_BYTES] = fp
        mv[len(MAGIC) + FP_BYTES : HEADER_BYTES] = nonce
        if _INTO:
            aead.encrypt_into(nonce, blob, aad, mv[HEADER_BYTES:n])
        else:  # cryptography before encrypt_into
            mv[HEADER_BYTES:n] = aead.encrypt(nonce, bytes(blob), aad)
        return n

    def seal(self, tid: str, aad: bytes, blob) -> bytes | None:
        """The envelope of ``blob`` under tenant ``tid``'s key; None when the tenant has no key."""
        buf = bytearray(len(blob) + OVERHEAD)
        return bytes(buf) if self.seal_into(tid, aad, blob, buf) is not None else None

    def open_into(self, tid: str, aad: bytes, envelope, out) -> int:
        """Decrypt ``envelope`` into ``out`` (at least len(envelope) - OVERHEAD bytes); returns the page blob's
        length. SealError says why not."""
        entry = self._keys.get(tid)
        if entry is None:
            raise SealError("no_key")
        fp, aead = entry
        mv = memoryview(envelope)
        if not is_envelope(mv):
            raise SealError("bad_tag")
        if bytes(mv[len(MAGIC) : len(MAGIC) + FP_BYTES]) != fp:
            raise SealError("stale_key")
        nonce = bytes(mv[len(MAGIC) + FP_BYTES : HEADER_BYTES])
        n = len(mv) - OVERHEAD
        try:
            if _INTO:
                aead.decrypt_into(nonce, mv[HEADER_BYTES:], aad, memoryview(out)[:n])
            else:
                memoryview(out)[:n] = aead.decrypt(nonce, mv[HEADER_BYTES:], aad)
        except InvalidTag:
            raise SealError("bad_tag") from None
        return n

    def open(self, tid: str, aad: bytes, envelope) -> bytes:
        """The page blob inside ``envelope``; SealError says why not."""
        buf = bytearray(max(len(envelope) - OVERHEAD, 0))
        self.open_into(tid, aad, envelope, buf)
        return bytes(buf)


def new_key() -> str:
    """A fresh random key, base64 (for key files)."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class PageSealer:
    """Seals and opens a disk store's pages under their tenant's key, counting refusals and failures per reason
    (``counts``: no_key, stale_key, bad_tag, unkeyed_refused). The index is not authenticated, so a store with a key
    ring serves sealed pages only: a plaintext entry could have been planted (I6)."""

    def __init__(self, keyring: KeyRing, *, store_path: str):
        self.keyring = keyring
        self.store_path = store_path
        self.counts: Counter = Counter()
        self._warned_unkeyed: set[str] = set()
        self._seal_buf = bytearray()  # envelopes of the batch being written (under the store's write lock)
        self._plain = threading.local()  # per reading thread: the envelope read and the page blob just decrypted

    def has_key(self, tid: str) -> bool:
        return self.keyring.has_key(tid)

    def seal_batch(self, tid: str, pkeys: list[bytes], blobs: Sequence, todo: list[int]) -> list | None:
        """``blobs`` with those at ``todo`` replaced by their envelopes (bound to their page keys), sealed into one
        buffer reused by every write (held under the write lock until the batch is durable; as large as the largest
        batch). None if the tenant has no key."""
        need = sum(len(blobs[i]) + OVERHEAD for i in todo)
        if len(self._seal_buf) < need:
            self._seal_buf = bytearray(need)
        mv, off, out = memoryview(self._seal_buf), 0, list(blobs)
        for i in todo:
            n = self.keyring.seal_into(tid, pkeys[i], blobs[i], mv[off:])
            if n is None:
                return None
            out[i] = mv[off : off + n]
            off += n
        return out

    def read_buffer(self, nbytes: int) -> np.ndarray:
        """This thread's reusable buffer for an envelope of ``nbytes`` (valid until its next call)."""
        env = getattr(self._plain, "env", None)
        if env is None or len(env) < nbytes:
            env = self._plain.env = np.empty(nbytes, dtype=np.uint8)
        return env[:nbytes]

    def unseal(self, tid: str, pk: bytes, envelope, scratch: bool = False) -> tuple[bytes | None, bool]:
        """(the page blob, or None; whether to drop the entry). With ``scratch`` the blob is a view of this thread's
        reusable buffer, valid until its next call. A tenant without a key keeps its entries (a restored key reads
        them again); pages sealed under a replaced key or failing authentication are dropped, like a checksum
        failure, so the page can be written again under the current key."""
        try:
            if not scratch:
                return self.keyring.open(tid, pk, envelope), False
            buf = getattr(self._plain, "buf", None)
            if buf is None or len(buf) < len(envelope):
                buf = self._plain.buf = bytearray(len(envelope))
            n = self.keyring.open_into(tid, pk, envelope, buf)
            return memoryview(buf)[:n], False
        except SealError as e:
            self.counts[e.reason] += 1
            if e.reason == "bad_tag":
                log.warning(
                    "kvdrive: a page of store %s failed authentication (altered or misplaced); dropped", self.store_path
                )
            return None, e.reason != "no_key"

    def refuse_unkeyed(self, tid: str, n: int) -> None:
        """With encryption on, a tenant without a key gets nothing written to disk (one log line per tenant)."""
        self.counts["unkeyed_refused"] += n
        if tid not in self._warned_unkeyed:
            self._warned_unkeyed.add(tid)
            log.warning(
                "kvdrive: %s has no key for tenant %s; its pages are not written to disk (further refusals "
                "are counted, not logged)",
                self.keyring.describe(),
                tid or "'' (unsalted)",
            )
