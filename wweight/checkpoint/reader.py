"""Reading model directories: :class:`Checkpoint` (validated up front, one tensor at a time) and
the one compatibility check that merge and align share.

:class:`Checkpoint` opens a model directory in Hugging Face layout, read-only. It parses and
validates every shard header up front (truncated or corrupted files, index entries that point
outside the directory, symlinks that leave it) and then reads one tensor at a time: nothing but the
requested tensor is ever mapped or resident. Pickle checkpoints (``*.bin``) are refused.

How a tensor is read (:meth:`Checkpoint.read`): one of at least :data:`MAP_MIN_BYTES` is *mapped*
copy-on-write (``mmap`` ``MAP_PRIVATE``, readable and writable) from the page cache, so no byte is
copied and no fresh memory is zeroed for it; a write to the tensor copies the page it touches into
private memory, and the file is never modified. The mapping goes when the tensor is freed. Why: on
the 2-core CI machine, with a warm page cache, the ``pread`` copy into a buffer and the zeroing of
fresh buffers were a third of the CPU time of a 125M-parameter bf16 linear merge of 3 models;
mapping took it from 0.37-0.40 to 0.29-0.35 s and TIES from 1.13-1.15 to 0.85-0.86 s (medians,
alternating processes; the run after is ``benchmarks/results/checkpoint_cpu.md``). Smaller
tensors, page-locked reads for CUDA (``pin``), tensors whose offset is not a multiple of their
element size, and systems without ``mmap.MAP_PRIVATE`` are read with ``pread`` into a buffer. A
shard truncated after :class:`Checkpoint` validated it raises :class:`CheckpointError` when the
tensor is read; one truncated by another process *while* a mapped tensor is in use gets
``SIGBUS``, as with any ``mmap``-based reader (safetensors' ``safe_open``, ``torch.load(mmap=True)``).
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .. import _hub as hub
from .._ext import host_tensor
from .._pool import not_poolable
from .format import INDEX_NAME, SINGLE_NAME, CheckpointError, TensorInfo, inside, itemsize, read_header

#: tensors of at least this many bytes are mapped copy-on-write instead of read (see the module doc);
#: below it a mapping's system calls cost more than the copy saves
MAP_MIN_BYTES = 1 << 20
_CAN_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "PROT_WRITE")


def _map_tensor(fd: int, info: TensorInfo) -> torch.Tensor:
    """``info``'s bytes mapped copy-on-write as a tensor (the mapping lives as long as its storage).
    ``mmap`` checks the file size first: a file now shorter than its header says raises here."""
    a = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, info.start + info.nbytes - a, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=a)
    except ValueError:   # "mmap length is greater than file size"
        raise CheckpointError(f"{info.file}: file shrank since it was opened (truncated before byte "
                              f"{info.start + info.nbytes})") from None
    t = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start - a)
    return not_poolable(t.view(info.shape))


def _pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    done = 0
    n = len(buf)
    while done < n:
        k = os.preadv(fd, [buf[done:]], offset + done)
        if k <= 0:
            raise CheckpointError(f"{path}: file shrank while reading (truncated at {offset + done})")
        done += k


class TensorSource:
    """What the merge engine reads tensors from (:class:`Checkpoint`, and
    :class:`wweight.checkpoint.lora.LoraCheckpoint` on top of one): ``read(key)`` and ``close()``
    from the subclass; ``state_dict`` and the context-manager / finaliser behaviour here."""

    def read(self, key: str, *, pin: bool = False) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self, keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        return {k: self.read(k) for k in (self.keys if keys is None else keys)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


class Checkpoint(TensorSource):
    """A model directory in Hugging Face safetensors layout, opened read-only.

    ``Checkpoint(path)`` validates the layout and every shard header; :meth:`read` returns one
    tensor (writable, and nobody else's: a write never reaches the file, see the module doc).
    ``allow_symlinks=False`` refuses shards / config files that are symlinks resolving outside
    ``path`` (e.g. Hugging Face cache snapshots point into ``../../blobs``: pass the flag for those).
    """

    def __init__(self, path: str, *, what: str = "model", allow_symlinks: bool = False):
        try:   # a Hugging Face id resolves to its snapshot in the local cache (wweight/_hub.py)
            local, from_hub = hub.resolve(path, what)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        self.path = os.path.abspath(local)
        self.what = what
        # cache snapshots are symlinks into the cache's blobs/: expected for a resolved id
        self.allow_symlinks = allow_symlinks or from_hub
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{what} {path}: model directory not found")
        index = os.path.join(self.path, INDEX_NAME)
        weight_map: Optional[Dict[str, str]] = None
        if os.path.exists(index):
            self._check_file(index)
            try:
                with open(index, "r", encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not a mapping")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: corrupted shard index ({e})") from None
            names = sorted(set(weight_map.values()), key=lambda s: str(s))
            for fn in names:
                if (not isinstance(fn, str) or os.path.basename(fn) != fn or fn in ("", ".", "..")
                        or not fn.endswith(".safetensors")):
                    raise CheckpointError(f"{index}: shard name {fn!r} is not a .safetensors file in "
                                          "the model directory (paths are not followed)")
        elif os.path.exists(os.path.join(self.path, SINGLE_NAME)):
            names = [SINGLE_NAME]
        else:
            names = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not names:
                pickles = sorted(f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
                if pickles:
                    raise CheckpointError(f"{what} {path}: only pickle checkpoints ({pickles[0]}); wweight "
                                          "reads safetensors only (pickle can run code). Convert the model "
                                          "to safetensors first")
                raise CheckpointError(f"{what} {path}: no *.safetensors files")
        self.files = [os.path.join(self.path, n) for n in names]
        self.tensors: Dict[str, TensorInfo] = {}
        per_file: Dict[str, Dict[str, TensorInfo]] = {}
        for fp in self.files:
            if not os.path.exists(fp):
                raise CheckpointError(f"{what} {path}: shard {os.path.basename(fp)} listed in {INDEX_NAME} is missing")
            self._check_file(fp)
            per_file[fp], _ = read_header(fp)
        if weight_map is not None:
            for key, fn in weight_map.items():
                fp = os.path.join(self.path, fn)
                if key not in per_file[fp]:
                    raise CheckpointError(f"{fp}: key {key!r} listed in {INDEX_NAME} is not in the shard")
                self.tensors[key] = per_file[fp][key]
        else:
            for fp in self.files:
                for key, info in per_file[fp].items():
                    if key in self.tensors:
                        raise CheckpointError(f"{fp}: key {key!r} is also in {self.tensors[key].file}")
                    self.tensors[key] = info
        order = {fp: i for i, fp in enumerate(self.files)}
        # Read order = file order, then offset: sequential I/O on every shard.
        self.keys: List[str] = sorted(self.tensors, key=lambda k: (order[self.tensors[k].file], self.tensors[k].start))
        self.config: Optional[dict] = None
        cfg = os.path.join(self.path, "config.json")
        if os.path.exists(cfg):
            self._check_file(cfg)
            try:
                with open(cfg, "r", encoding="utf-8") as f:
                    self.config = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{cfg}: malformed JSON ({e})") from None
        self._fds: Dict[str, int] = {}

    def _check_file(self, fp: str) -> None:
        if not self.allow_symlinks and not inside(fp, self.path):
            raise CheckpointError(f"{fp}: is a symlink resolving outside {self.path}; refusing to follow "
                                  "it (pass --allow-symlinks, e.g. for Hugging Face cache snapshots)")
        if not os.path.isfile(fp):
            raise CheckpointError(f"{fp}: not a regular file")

    @property
    def architecture(self) -> Optional[str]:
        if self.config and isinstance(self.config.get("architectures"), list) and self.config["architectures"]:
            return str(self.config["architectures"][0])
        return None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _fd(self, fp: str) -> int:
        fd = self._fds.get(fp)
        if fd is None:
            fd = os.open(fp, os.O_RDONLY)
            self._fds[fp] = fd
        return fd

    def read(self, key: str, *, pin: bool = False, mapped: bool = True) -> torch.Tensor:
        """One tensor as a new, writable CPU tensor that nobody else holds: a copy-on-write mapping of
        the file (large tensors, see the module doc), else read with ``pread`` into a buffer
        (page-locked when ``pin``; a pooled buffer comes back only when unreferenced,
        :mod:`wweight._pool`). Writing to it never changes the file. ``mapped=False``: always a
        buffer, for a caller about to write the whole tensor in place (on a mapping, each 4 KB page
        would then fault and be copied on its own)."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"{self.what} {self.path}: no tensor {key!r}")
        if (_CAN_MAP and mapped and not pin and info.nbytes and info.nbytes >= MAP_MIN_BYTES
                and info.start % itemsize(info.dtype) == 0):
            return _map_tensor(self._fd(info.file), info)
        if pin:
            buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=True)
            out = buf.view(info.dtype).reshape(info.shape)
        else:   # a recycled buffer of the engine's pool, else a fresh one on huge pages (wweight/_pool.py)
            out = host_tensor(info.nbytes, info.dtype, info.shape)
            buf = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage(), 0, (info.nbytes,))
        if info.nbytes:
            _pread_into(self._fd(info.file), memoryview(buf.numpy()), info.start, info.file)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def load_checkpoint(path: str, *, allow_symlinks: bool = False) -> Dict[str, torch.Tensor]:
    """The whole state dict of a model directory (small models; the engine streams instead)."""
    with Checkpoint(path, allow_symlinks=allow_symlinks) as ck:
        return ck.state_dict()




def check_compatible(ref: Checkpoint, others: Sequence[Checkpoint], *, dtypes: bool = True) -> None:
    """Same architecture, keys and shapes (and dtypes, with ``dtypes``) as ``ref``; the first mismatch
    is the error. Merges need equal dtypes (mergekit merges in the inputs' dtype); weight matching
    (align) compares values only, so a float32 model can be aligned onto a bfloat16 one."""
    for ck in others:
        if ck is ref:
            continue
        if ref.architecture and ck.architecture and ref.architecture != ck.architecture:
            raise CheckpointError(f"mismatched architectures: {ref.what} is {ref.architecture}, "
                                  f"{ck.what} is {ck.architecture}")
        for k in ref.keys:
            if k not in ck.tensors:
                raise CheckpointError(f"{ck.what}: missing tensor {k!r} (present in {ref.what})")
            a, b = ref.tensors[k], ck.tensors[k]
            if a.shape != b.shape:
                raise CheckpointError(f"{ck.what}: tensor {k!r} has shape {list(b.shape)}, "
                                      f"{ref.what} has {list(a.shape)}")
            if dtypes and a.dtype != b.dtype:
                raise CheckpointError(f"{ck.what}: tensor {k!r} has dtype {b.dtype}, {ref.what} has {a.dtype}")
        if len(ck.tensors) != len(ref.tensors):
            extra = next(k for k in ck.keys if k not in ref.tensors)
            raise CheckpointError(f"{ck.what}: extra tensor {extra!r} (not in {ref.what})")
