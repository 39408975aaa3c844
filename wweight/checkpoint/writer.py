"""Writing model directories: planned shards at final offsets, side files, :func:`save_checkpoint`.

:func:`plan_shards` / :class:`ShardedWriter` write the output layout. Because every output
tensor's shape and dtype are known before compute, each shard's header is written first and the
file is preallocated (``posix_fallocate``: a full disk fails before any compute); tensors are then
written at their final offsets with ``pwrite`` in any order, from any thread or process. The bytes
depend only on the plan and the tensors, so a re-run, or a run split over ranks, is byte-identical.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .atomic import AtomicOutputDir, atomic_output
from .format import (INDEX_NAME, SINGLE_NAME, ST_NAMES, TOKENIZER_FILES, CheckpointError, header_bytes, human,
                     inside, itemsize, parse_size, write_json)

@dataclass
class Shard:
    filename: str
    keys: List[str]
    offsets: Dict[str, Tuple[int, int]]   # key -> absolute (start, end) in the file
    header: bytes
    size: int


def plan_shards(tensors: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], max_shard_size: int) -> List[Shard]:
    """Assign ``(key, dtype, shape)`` in order to shards of at most ``max_shard_size`` data bytes
    (a bigger tensor gets a shard of its own), Hugging Face names: ``model.safetensors`` or
    ``model-00001-of-0000N.safetensors``."""
    groups: List[List[Tuple[str, torch.dtype, Tuple[int, ...], int]]] = [[]]
    cur = 0
    for key, dt, shape in tensors:
        nb = math.prod(shape) * itemsize(dt)
        if groups[-1] and cur + nb > max_shard_size:
            groups.append([])
            cur = 0
        groups[-1].append((key, dt, tuple(shape), nb))
        cur += nb
    if not groups[-1]:
        groups.pop()
    n = len(groups)
    shards = []
    for i, g in enumerate(groups):
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        rel, off = [], 0
        for key, dt, shape, nb in g:
            rel.append((key, dt, shape, off, off + nb))
            off += nb
        header = header_bytes(rel)
        base = 8 + len(header)
        shards.append(Shard(name, [r[0] for r in rel], {r[0]: (base + r[3], base + r[4]) for r in rel},
                            header, base + off))
    return shards


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class ShardedWriter:
    """Writes planned shards in ``directory``: ``create=True`` preallocates each file and writes its
    header; :meth:`write` puts one tensor at its final offset (thread-safe, any order, any process)."""

    def __init__(self, directory: str, shards: Sequence[Shard], *, create: bool = True):
        self.directory = directory
        self.shards = list(shards)
        self.where: Dict[str, Tuple[Shard, int, int]] = {}
        for sh in self.shards:
            for k in sh.keys:
                s, t = sh.offsets[k]
                self.where[k] = (sh, s, t)
        self._fds: Dict[str, int] = {}
        self.written: set = set()
        if create:
            for sh in self.shards:
                fp = os.path.join(directory, sh.filename)
                fd = os.open(fp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds[sh.filename] = fd
                _preallocate(fd, sh.size, fp)
                os.pwrite(fd, struct.pack("<Q", len(sh.header)) + sh.header, 0)

    def _fd(self, sh: Shard) -> int:
        fd = self._fds.get(sh.filename)
        if fd is None:
            fd = os.open(os.path.join(self.directory, sh.filename), os.O_WRONLY)
            self._fds[sh.filename] = fd
        return fd

    def write(self, key: str, tensor: torch.Tensor) -> int:
        sh, s, t = self.where[key]
        mv = _tensor_bytes(tensor)
        if len(mv) != t - s:
            raise CheckpointError(f"internal: tensor {key!r} has {len(mv)} bytes, planned {t - s}")
        fd = self._fd(sh)
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], s + done)
        self.written.add(key)
        return len(mv)

    def close(self, *, fsync: bool = True) -> None:
        for fd in self._fds.values():
            if fsync:
                os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    def write_index(self) -> Optional[str]:
        """``model.safetensors.index.json`` when there is more than one shard."""
        if len(self.shards) <= 1:
            return None
        total = sum(sh.size - 8 - len(sh.header) for sh in self.shards)
        wm = {k: sh.filename for sh in self.shards for k in sh.keys}
        fp = os.path.join(self.directory, INDEX_NAME)
        write_json(fp, {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))})
        return fp


def _preallocate(fd: int, size: int, path: str) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: no space left on device for {human(size)}") from None
        os.ftruncate(fd, size)  # filesystem without fallocate support
    except AttributeError:  # pragma: no cover - not Linux
        os.ftruncate(fd, size)


_FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")


def set_config_dtype(cfg: dict, dtype: torch.dtype) -> None:
    """Record ``dtype`` in a config.json dict: ``torch_dtype`` always (as mergekit does) and
    transformers 5's ``dtype`` wherever it is present, top level and nested sub-configs
    (``text_config`` ...). transformers 5 reads ``dtype`` first, so a stale one loads the merged
    weights in the inputs' dtype."""
    name = str(dtype).replace("torch.", "")
    cfg["torch_dtype"] = name
    if "dtype" in cfg:
        cfg["dtype"] = name
    stack = [v for v in cfg.values() if isinstance(v, dict)]
    while stack:  # sub-configs: only keys that already name a floating dtype
        d = stack.pop()
        stack.extend(v for v in d.values() if isinstance(v, dict))
        for k in ("dtype", "torch_dtype"):
            if d.get(k) in _FLOAT_NAMES:
                d[k] = name


def copy_side_files(src: Optional[str], dst: str, *, config_src: Optional[str] = None,
                    torch_dtype: Optional[torch.dtype] = None, extra_config: Optional[dict] = None,
                    allow_symlinks: bool = False) -> List[str]:
    """Copy ``config.json`` (from ``config_src``, default ``src``; its dtype set to ``torch_dtype``,
    see :func:`set_config_dtype`) and the tokenizer / generation files from ``src`` into ``dst``."""
    copied = []
    csrc = config_src or src
    if csrc:
        fp = os.path.join(csrc, "config.json")
        if os.path.isfile(fp):
            if not allow_symlinks and not inside(fp, csrc):
                raise CheckpointError(f"{fp}: is a symlink resolving outside {csrc}; refusing to follow it")
            with open(fp, "r", encoding="utf-8") as f:
                cfg = json.load(f)
            if torch_dtype is not None:
                set_config_dtype(cfg, torch_dtype)
            if extra_config:
                cfg.update(extra_config)
            write_json(os.path.join(dst, "config.json"), cfg)
            copied.append("config.json")
    if src:
        for name in TOKENIZER_FILES:
            fp = os.path.join(src, name)
            if os.path.isfile(fp):
                if not allow_symlinks and not inside(fp, src):
                    raise CheckpointError(f"{fp}: is a symlink resolving outside {src}; refusing to follow it")
                shutil.copyfile(fp, os.path.join(dst, name))
                copied.append(name)
    return copied


def save_checkpoint(out_dir: str, state_dict: Mapping[str, torch.Tensor], *, config: Optional[dict] = None,
                    side_files_from: Optional[str] = None, max_shard_size="5GB", overwrite: bool = False,
                    inputs: Sequence[str] = (), fsync: bool = True, allow_symlinks: bool = False,
                    extra_files: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> List[str]:
    """Write ``state_dict`` (CPU or GPU tensors) atomically in Hugging Face layout; returns shard names.

    ``config`` is written as ``config.json`` (else it is copied from ``side_files_from``, whose
    tokenizer files are copied too). ``extra_files`` maps file names to small state dicts written
    beside the model with ``safetensors.torch.save_file`` (e.g. ``permutations.safetensors``).
    Every file ends up 0644 (set at commit, :mod:`.atomic`)."""
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError("state_dict must map str keys to tensors")
        if v.dtype not in ST_NAMES:
            raise TypeError(f"state_dict[{k!r}] has dtype {v.dtype}, which safetensors cannot store")
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=inputs)
    shards = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()],
                         parse_size(max_shard_size, "max_shard_size"))
    out.check_space(sum(s.size for s in shards))
    with atomic_output(out) as tmp:
        w = ShardedWriter(tmp, shards)
        for k, v in state_dict.items():
            w.write(k, v)
        w.close(fsync=fsync)
        w.write_index()
        copy_side_files(side_files_from, tmp, config_src=side_files_from, allow_symlinks=allow_symlinks)
        for fn, sd in (extra_files or {}).items():
            from safetensors.torch import save_file

            save_file(dict(sd), os.path.join(tmp, fn))
        if config is not None:
            write_json(os.path.join(tmp, "config.json"), config)
        out.commit()
    return [s.filename for s in shards]
