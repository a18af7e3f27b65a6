"""Segment file I/O: short-I/O loops, IOV_MAX batching, O_DIRECT double-buffered appends, backend selection."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from kvdrive_sglang.tier.fileio import (
    ALIGN,
    PosixIO,
    Staging,
    direct_append,
    open_direct,
    select_io,
)


def chunks(rng, sizes):
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


def test_pwritev_preadv_many_odd_buffers(tmp_path):
    rng = np.random.default_rng(0)
    bufs = chunks(rng, rng.integers(1, 300, 2500))  # more buffers than IOV_MAX (1024)
    io = PosixIO()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        total = sum(len(b) for b in bufs)
        assert io.pwritev(fd, bufs, 7) == total
        outs = [np.empty_like(b) for b in bufs]
        assert io.preadv(fd, outs, 7) == total
        assert all(np.array_equal(a, b) for a, b in zip(bufs, outs))
        short = [np.empty(10, np.uint8), np.empty(total, np.uint8)]
        assert io.preadv(fd, short, 7) == total  # end of file: a short read, reported as such
    finally:
        os.close(fd)


@pytest.mark.parametrize("stage_kib", [8, 64, 1024])
def test_direct_append_stages_pads_and_keeps_bytes(tmp_path, stage_kib):
    path = str(tmp_path / "seg")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    dfd = open_direct(path)
    if dfd is None:
        pytest.skip("this file system refuses O_DIRECT")
    rng = np.random.default_rng(1)
    bufs = chunks(rng, [5000, 123, 70000, 1, 4096, 30000])
    staging = Staging(stage_kib << 10)
    seen = []
    with ThreadPoolExecutor(1) as pool:
        end, writes = direct_append(dfd, staging, bufs, 0, pool.submit, lambda i, b: seen.append(i))
        for w in writes:
            w.result()
        end2, writes = direct_append(dfd, staging, bufs[:2], end, pool.submit)
        for w in writes:
            w.result()
    os.fdatasync(fd)
    total = sum(len(b) for b in bufs)
    assert seen == list(range(len(bufs)))
    assert end % ALIGN == 0 and total <= end < total + ALIGN
    assert end2 % ALIGN == 0 and os.path.getsize(path) == end2
    data = np.fromfile(path, dtype=np.uint8)
    np.testing.assert_array_equal(data[:total], np.concatenate(bufs))
    assert not data[total:end].any()  # padding is zeros
    np.testing.assert_array_equal(data[end:end + 5123], np.concatenate(bufs[:2]))
    with pytest.raises(ValueError, match="unaligned"):
        direct_append(dfd, staging, bufs, 100, None)
    staging.close()
    os.close(dfd)
    os.close(fd)


def test_select_io_is_posix_without_a_gpu():
    try:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    except ImportError:
        pass
    assert select_io("auto").name == "posix" and select_io("posix").name == "posix"
    assert select_io("kvikio").name == "posix"  # asked for, not usable here: POSIX with a warning


@pytest.mark.gpu
def test_kvikio_reads_match_posix(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("kvikio")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    io = select_io("auto")
    assert io.name == "kvikio"
    data = np.random.default_rng(2).integers(0, 256, 1 << 20, dtype=np.uint8)
    path = str(tmp_path / "f")
    data.tofile(path)
    out = np.empty_like(data)
    fd = os.open(path, os.O_RDONLY)
    assert io.preadv(fd, [out], 0, path) == len(data)
    os.close(fd)
    np.testing.assert_array_equal(out, data)
