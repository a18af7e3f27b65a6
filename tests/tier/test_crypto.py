"""Page sealing (tier/crypto.py) with real keys and real AES-GCM: the envelope, PageSealer's reasons and counts (I6)."""

import json
import logging
import os

import pytest

from kvdrive_sglang.tier.crypto import (
    OVERHEAD,
    KeyRing,
    PageSealer,
    SealError,
    is_envelope,
    new_key,
)
from kvdrive_sglang.tier.tenants import tenant_id

A, B = tenant_id("alice"), tenant_id("bob")


def ring(tmp_path, keys, name="keys"):
    path = tmp_path / name
    path.write_text(json.dumps(keys))
    os.chmod(path, 0o600)
    return KeyRing(str(path))


def test_batch_is_sealed_in_place_and_opens_under_its_page_key(tmp_path):
    sealer = PageSealer(ring(tmp_path, {"alice": new_key()}), store_path=str(tmp_path))
    blobs = [b"page-0" * 10, b"already-there", b"page-2" * 3]
    pkeys = [b"k0", b"k1", b"k2"]
    out = sealer.seal_batch(A, pkeys, blobs, [0, 2])
    assert out[1] is blobs[1]  # only the pages to write are sealed
    for i in (0, 2):
        assert is_envelope(out[i]) and len(out[i]) == len(blobs[i]) + OVERHEAD
        assert sealer.unseal(A, pkeys[i], bytes(out[i])) == (blobs[i], False)
        plain, drop = sealer.unseal(A, pkeys[i], bytes(out[i]), scratch=True)  # into this thread's reused buffer
        assert bytes(plain) == blobs[i] and not drop
    assert sealer.counts == {}


def test_failures_say_why_and_whether_to_drop(tmp_path, caplog):
    keys = {"alice": new_key(), "bob": new_key()}
    sealer = PageSealer(ring(tmp_path, keys), store_path=str(tmp_path))
    env = bytes(sealer.seal_batch(A, [b"k"], [b"blob" * 8], [0])[0])
    with caplog.at_level(logging.WARNING, logger="kvdrive.tier"):
        assert sealer.unseal(A, b"other-key", env) == (None, True)  # bound to its page key: misplaced
    assert [r for r in caplog.records if "failed authentication" in r.message]
    assert sealer.unseal(B, b"k", env) == (None, True)  # another tenant's key: stale for this envelope
    assert sealer.unseal(tenant_id("carol"), b"k", env) == (None, False)  # no key now: kept for a restored key
    assert sealer.counts == {"bad_tag": 1, "stale_key": 1, "no_key": 1}
    with pytest.raises(SealError) as e:
        sealer.keyring.open(A, b"k", env[:-1] + bytes([env[-1] ^ 1]))
    assert e.value.reason == "bad_tag"


def test_unkeyed_tenants_are_refused_with_one_log_line(tmp_path, caplog):
    sealer = PageSealer(ring(tmp_path, {"alice": new_key()}), store_path=str(tmp_path))
    assert sealer.has_key(A) and not sealer.has_key(B)
    assert sealer.seal_batch(B, [b"k"], [b"blob"], [0]) is None
    with caplog.at_level(logging.WARNING, logger="kvdrive.tier"):
        sealer.refuse_unkeyed(B, 3)
        sealer.refuse_unkeyed(B, 2)
    assert sealer.counts == {"unkeyed_refused": 5}
    assert len([r for r in caplog.records if "has no key for tenant" in r.message]) == 1


def test_read_buffer_is_per_thread_and_reused(tmp_path):
    import threading

    sealer = PageSealer(ring(tmp_path, {"alice": new_key()}), store_path=str(tmp_path))
    a = sealer.read_buffer(100)
    assert len(a) == 100 and sealer.read_buffer(50).base is a.base  # reused, not reallocated
    other = []
    t = threading.Thread(target=lambda: other.append(sealer.read_buffer(100)))
    t.start()
    t.join()
    assert other[0].base is not a.base
