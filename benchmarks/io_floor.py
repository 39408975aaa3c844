"""The I/O floors of a whole-checkpoint merge (``benchmarks/bench_checkpoint.py``): what any engine
must at least spend reading its inputs and writing its output, warm page cache.

:func:`io_floor` copies every input byte with ``pread`` (an engine that reads into buffers);
:func:`mapped_floor` maps the inputs and loads each byte once (an engine that maps them, as
:class:`wweight.checkpoint.Checkpoint` does for tensors of 1 MB and more); :func:`st_floor` is the
floor of earlier runs (safetensors ``load_file`` / ``save_file``), which never read the lazily
mapped inputs.
"""
from __future__ import annotations

import glob
import os
import shutil
import time

import torch


def _read_all(dirs):
    from safetensors.torch import load_file

    n = 0
    for d in dirs:
        for fp in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            sd = load_file(fp)
            n += sum(v.numel() * v.element_size() for v in sd.values())
            del sd
    return n


def st_floor(inputs, out_dir):
    """The previous floor: ``safetensors.torch.load_file`` of every input shard, ``save_file`` of the
    base. Kept for comparison only: ``load_file`` maps the file lazily, so the models it "reads" are
    never touched (1 GB in 0.02 s here, against 0.34 s once every page is touched); the number is
    the time to write one model, not to read four."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    t0 = time.perf_counter()
    for d in inputs[1:]:
        for fp in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            del_sd = load_file(fp)
            del del_sd
    for fp in sorted(glob.glob(os.path.join(inputs[0], "*.safetensors"))):
        sd = load_file(fp)
        save_file(sd, os.path.join(out_dir, os.path.basename(fp)))
        del sd
    t = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    return t


def _shards(dirs):
    for d in dirs:
        yield from sorted(glob.glob(os.path.join(d, "*.safetensors")))


def _write_new(path, mv, out_bytes) -> int:
    """``out_bytes`` written to a new file at ``path`` from the reused buffer ``mv``; its open fd."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    off = 0
    while off < out_bytes:
        off += os.pwrite(fd, mv[:min(len(mv), out_bytes - off)], off)
    return fd


def io_floor(dirs, out_bytes, out_dir, *, chunk=64 << 20):
    """The I/O floor of a merge: (seconds to read every byte of the input shards in ``dirs`` and
    write ``out_bytes`` to a new file, no fsync; seconds to fsync that file). Reads are ``pread``
    into one reused buffer and the write is ``pwrite`` from it (no allocation, no page faults of
    fresh memory, no parsing): what any engine that copies its inputs must at least do with a warm
    page cache."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    mv = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    for fp in _shards(dirs):
        fd = os.open(fp, os.O_RDONLY)
        try:
            off = 0
            while True:
                k = os.preadv(fd, [mv], off)
                if k <= 0:
                    break
                off += k
        finally:
            os.close(fd)
    fd = _write_new(os.path.join(out_dir, "out.bin"), mv, out_bytes)
    try:
        t = time.perf_counter() - t0
        t1 = time.perf_counter()
        os.fsync(fd)
        ts = time.perf_counter() - t1
    finally:
        os.close(fd)
    shutil.rmtree(out_dir, ignore_errors=True)
    return t, ts


def mapped_floor(dirs, out_bytes, out_dir, *, chunk=64 << 20):
    """The floor of a reader that maps its inputs instead of copying them (as
    :class:`wweight.checkpoint.Checkpoint` does for tensors of 1 MB and more): seconds to map every
    input shard in ``dirs`` privately and load every byte once (a sum over it as int64, torch's
    threads, at memory speed: a merge kernel must load each input byte at least once), then ``pwrite``
    ``out_bytes`` to a new file from one reused buffer (no fsync). Lower than :func:`io_floor`, which
    copies every input byte with ``pread``: once inputs are mapped, that copy is no longer a cost
    every engine must pay."""
    import mmap

    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    mv = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    for fp in _shards(dirs):
        n = os.path.getsize(fp)
        with open(fp, "rb") as f:
            mm = mmap.mmap(f.fileno(), n, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        words = torch.frombuffer(mm, dtype=torch.int64, count=n // 8)
        int(words.sum())
        del words
        mm.close()
    os.close(_write_new(os.path.join(out_dir, "out.bin"), mv, out_bytes))
    t = time.perf_counter() - t0
    shutil.rmtree(out_dir, ignore_errors=True)
    return t
