"""Whole-checkpoint engine: streaming sharded safetensors in, merged / aligned / quantized model out.

Pieces (all usable on their own):

* :class:`Checkpoint` opens a model directory in Hugging Face layout (``config.json`` plus
  ``model.safetensors`` or shards listed by ``model.safetensors.index.json``), read-only. It parses
  and validates every shard header up front (truncated or corrupted files, index entries that point
  outside the directory, symlinks that leave it) and then reads one tensor at a time with ``pread``
  straight into a (pinned, for CUDA) buffer: nothing but the requested tensor is ever resident, and
  the page cache, not a private mapping, holds the file. Pickle checkpoints (``*.bin``) are refused.
* :func:`plan_shards` / :class:`ShardedWriter` write the output layout. Because every output
  tensor's shape and dtype are known before compute, each shard's header is written first and the
  file is preallocated (``posix_fallocate``: a full disk fails before any compute); tensors are then
  written at their final offsets with ``pwrite`` in any order, from any thread or process. The bytes
  depend only on the plan and the tensors, so a re-run, or a run split over ranks, is byte-identical.
* :class:`AtomicOutputDir` writes into ``.<OUT_DIR>.wweight-tmp-<token>`` beside ``OUT_DIR`` and
  renames it into place at the end: an error, Ctrl-C or kill at any moment leaves nothing under
  ``OUT_DIR``. A non-empty ``OUT_DIR`` is refused unless ``overwrite=True``.
* :func:`plan_merge` validates a :class:`wweight.config.MergeConfig` against the models (present,
  same keys / shapes / dtypes / architecture, parameters in range, disk space) before any compute;
  :func:`run_merge` executes the plan: a reader thread prefetches the next tensors' inputs, the main
  thread merges on ``device`` (``wweight.merge_tensors``; iso methods on groups of keys through
  ``wweight.merge_state_dicts``), a writer thread writes results. Host memory in flight is bounded
  by ``memory_budget``: at most ``depth`` prefetched work items (all models' tensors of one key,
  or of one iso group), one computing and ``depth`` outputs being written, with
  ``depth = clamp(budget // (2 * largest item's input bytes), 1, 8)``; plus the merge op's own
  temporaries for one item. On CUDA the reads land in pinned buffers, host->device and
  device->host copies are issued ``non_blocking`` on the current stream and the writer thread
  waits on a CUDA event, so reading, compute and writing of different items overlap (no
  separate copy stream: untested on a GPU in this repository's CI).
* Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) the work items are split over ranks
  (largest first, to the least-loaded rank, deterministic) with ``torch.distributed`` (gloo for the
  few control messages; the tensors go through the shared output files), rank ``r`` computes on
  ``cuda:LOCAL_RANK``, and rank 0 commits. Output is byte-identical to the single-process run.

Merges follow mergekit's dtype rules (``mergekit/plan.py``): inputs are cast to the config's
``dtype`` (default: their own dtype), merged in it, and cast to ``out_dtype`` (default: ``dtype``).
DARE / DELLA masks are seeded per tensor from ``seed`` and the tensor's name (not from the order of
work), so the output does not depend on scheduling.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import uuid
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import ISO_METHODS, MergeConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")
_MAX_HEADER = 100 << 20  # the safetensors library's own limit

ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A bad model directory / shard / output directory; the message names the file and key."""


# ----------------------------------------------------------------------------------------------
# sizes


def parse_size(v, argname: str = "size") -> int:
    """``"5GB"`` -> 5e9, ``"512MiB"`` -> 2**29, ``"1.5G"``, or a plain byte count."""
    if isinstance(v, bool):
        raise ValueError(f"{argname} must be a size such as 5GB or 500MB, got {v!r}")
    if isinstance(v, (int, float)):
        n = v
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(v), re.IGNORECASE)
        if not m:
            raise ValueError(f"{argname} must be a size such as 5GB or 500MB, got {v!r}")
        scale = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
        n = float(m.group(1)) * ((1024 if m.group(3) else 1000) ** scale)
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"{argname} must be positive, got {v!r}")
    return int(n)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


# ----------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    file: str        # absolute path of the shard
    start: int       # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate one safetensors file's header: ({key: TensorInfo}, metadata).

    Checks what a truncated, cut or corrupted file breaks: the header length, the JSON, every
    dtype / shape, that each tensor's byte range matches its shape and lies inside the file.
    (safetensors has no checksum: flipped bits inside tensor data cannot be detected.)
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > size - 8:
                raise CheckpointError(f"{path}: corrupted or truncated safetensors file (header length "
                                      f"{n} does not fit in {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        hdr = json.loads(raw.decode("utf-8"))
        if not isinstance(hdr, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    meta = hdr.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    out: Dict[str, TensorInfo] = {}
    for key, e in hdr.items():
        try:
            dt = ST_DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            s, t = (int(x) for x in e["data_offsets"])
        except Exception:
            raise CheckpointError(f"{path}: corrupted safetensors header entry for key {key!r}") from None
        itemsize = torch.empty((), dtype=dt).element_size()
        if any(d < 0 for d in shape) or t - s != math.prod(shape) * itemsize or s < 0:
            raise CheckpointError(f"{path}: corrupted safetensors header: key {key!r} has byte range "
                                  f"[{s}, {t}) for shape {list(shape)} {e['dtype']}")
        if t > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file: key {key!r} needs "
                                  f"{data_start + t} bytes, the file has {size}")
        out[key] = TensorInfo(key, dt, shape, path, data_start + s, t - s)
    return out, meta


def _pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    done = 0
    n = len(buf)
    while done < n:
        k = os.preadv(fd, [buf[done:]], offset + done)
        if k <= 0:
            raise CheckpointError(f"{path}: file shrank while reading (truncated at {offset + done})")
        done += k


def _inside(path: str, root: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root


class Checkpoint:
    """A model directory in Hugging Face safetensors layout, opened read-only.

    ``Checkpoint(path)`` validates the layout and every shard header; :meth:`read` returns one
    tensor (a fresh, writable copy: the files are never mapped writable or modified).
    ``allow_symlinks=False`` refuses shards / config files that are symlinks resolving outside
    ``path`` (e.g. Hugging Face cache snapshots point into ``../../blobs``: pass the flag for those).
    """

    def __init__(self, path: str, *, what: str = "model", allow_symlinks: bool = False):
        self.path = os.path.abspath(path)
        self.what = what
        self.allow_symlinks = allow_symlinks
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
        if not self.allow_symlinks and not _inside(fp, self.path):
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

    def read(self, key: str, *, pin: bool = False) -> torch.Tensor:
        """One tensor as a new CPU tensor (page-locked when ``pin``), read with ``pread``."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"{self.what} {self.path}: no tensor {key!r}")
        buf = torch.empty(info.nbytes, dtype=torch.uint8, pin_memory=pin)
        if info.nbytes:
            _pread_into(self._fd(info.file), memoryview(buf.numpy()), info.start, info.file)
        return buf.view(info.dtype).reshape(info.shape)

    def state_dict(self, keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        return {k: self.read(k) for k in (self.keys if keys is None else keys)}

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------------------------
# writing


@dataclass
class Shard:
    filename: str
    keys: List[str]
    offsets: Dict[str, Tuple[int, int]]   # key -> absolute (start, end) in the file
    header: bytes
    size: int


def _header_bytes(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...], int, int]]) -> bytes:
    hdr: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for key, dt, shape, s, t in entries:
        hdr[key] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [s, t]}
    raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    return raw + b" " * ((-len(raw)) % 8)  # 8-byte aligned data, as the safetensors writer does


def plan_shards(tensors: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], max_shard_size: int) -> List[Shard]:
    """Assign ``(key, dtype, shape)`` in order to shards of at most ``max_shard_size`` data bytes
    (a bigger tensor gets a shard of its own), Hugging Face names: ``model.safetensors`` or
    ``model-00001-of-0000N.safetensors``."""
    groups: List[List[Tuple[str, torch.dtype, Tuple[int, ...], int]]] = [[]]
    cur = 0
    for key, dt, shape in tensors:
        nb = math.prod(shape) * torch.empty((), dtype=dt).element_size()
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
        header = _header_bytes(rel)
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
        with open(fp, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}, f, indent=2)
            f.write("\n")
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


class AtomicOutputDir:
    """Output directory that appears complete or not at all.

    Files go to ``<parent>/.<name>.wweight-tmp-<token>``; :meth:`commit` renames it to ``OUT_DIR``
    (replacing an existing one only when ``overwrite``); :meth:`abort` deletes it. ``inputs`` are
    directories that must not overlap ``OUT_DIR`` (so ``--overwrite`` never deletes a model).
    """

    def __init__(self, out_dir: str, *, overwrite: bool = False, inputs: Sequence[str] = ()):
        self.out_dir = os.path.abspath(out_dir)
        self.overwrite = overwrite
        real = os.path.realpath(self.out_dir)
        for p in inputs:
            rp = os.path.realpath(p)
            if os.path.commonpath([real, rp]) in (real, rp):
                raise CheckpointError(f"OUT_DIR {out_dir} overlaps the input model {p}")
        if os.path.lexists(self.out_dir):
            if not os.path.isdir(self.out_dir):
                raise CheckpointError(f"OUT_DIR {out_dir} exists and is not a directory")
            if os.listdir(self.out_dir) and not overwrite:
                raise CheckpointError(f"OUT_DIR {out_dir} is not empty (pass --overwrite to replace it)")
        self.parent = os.path.dirname(self.out_dir)
        self.tmp: Optional[str] = None
        self.committed = False

    def check_space(self, nbytes: int) -> None:
        probe = self.parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free
        need = nbytes + (16 << 20)
        if free < need:
            raise CheckpointError(f"not enough disk space for OUT_DIR {self.out_dir}: need {human(need)}, "
                                  f"{human(free)} free on {probe}")

    def create(self, token: Optional[str] = None) -> str:
        os.makedirs(self.parent, exist_ok=True)
        token = token or uuid.uuid4().hex[:12]
        self.tmp = os.path.join(self.parent, f".{os.path.basename(self.out_dir)}.wweight-tmp-{token}")
        os.mkdir(self.tmp)
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None
        old = None
        if os.path.lexists(self.out_dir):
            if os.listdir(self.out_dir):
                if not self.overwrite:  # someone filled it while we computed
                    raise CheckpointError(f"OUT_DIR {self.out_dir} is not empty (pass --overwrite to replace it)")
                old = self.tmp + "-old"
                os.rename(self.out_dir, old)
            else:
                os.rmdir(self.out_dir)
        os.rename(self.tmp, self.out_dir)
        self.committed = True
        _fsync_dir(self.parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.tmp and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_side_files(src: Optional[str], dst: str, *, config_src: Optional[str] = None,
                    torch_dtype: Optional[torch.dtype] = None, extra_config: Optional[dict] = None,
                    allow_symlinks: bool = False) -> List[str]:
    """Copy ``config.json`` (from ``config_src``, default ``src``; ``torch_dtype`` updated as mergekit
    does) and the tokenizer / generation files from ``src`` into ``dst``."""
    copied = []
    csrc = config_src or src
    if csrc:
        fp = os.path.join(csrc, "config.json")
        if os.path.isfile(fp):
            if not allow_symlinks and not _inside(fp, csrc):
                raise CheckpointError(f"{fp}: is a symlink resolving outside {csrc}; refusing to follow it")
            with open(fp, "r", encoding="utf-8") as f:
                cfg = json.load(f)
            if torch_dtype is not None:
                cfg["torch_dtype"] = str(torch_dtype).replace("torch.", "")
            if extra_config:
                cfg.update(extra_config)
            with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2)
                f.write("\n")
            copied.append("config.json")
    if src:
        for name in TOKENIZER_FILES:
            fp = os.path.join(src, name)
            if os.path.isfile(fp):
                if not allow_symlinks and not _inside(fp, src):
                    raise CheckpointError(f"{fp}: is a symlink resolving outside {src}; refusing to follow it")
                shutil.copyfile(fp, os.path.join(dst, name))
                copied.append(name)
    return copied


@contextlib.contextmanager
def _cleanup_on_signal():
    """SIGTERM / SIGHUP become SystemExit so ``finally`` blocks remove the temporary directory."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = {}

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            with contextlib.suppress(Exception):
                prev[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in prev.items():
            with contextlib.suppress(Exception):
                signal.signal(s, h)


def save_checkpoint(out_dir: str, state_dict: Mapping[str, torch.Tensor], *, config: Optional[dict] = None,
                    side_files_from: Optional[str] = None, max_shard_size="5GB", overwrite: bool = False,
                    inputs: Sequence[str] = (), fsync: bool = True, allow_symlinks: bool = False,
                    extra_files: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> List[str]:
    """Write ``state_dict`` (CPU or GPU tensors) atomically in Hugging Face layout; returns shard names.

    ``config`` is written as ``config.json`` (else it is copied from ``side_files_from``, whose
    tokenizer files are copied too). ``extra_files`` maps file names to small state dicts written
    beside the model with ``safetensors.torch.save_file`` (e.g. ``permutations.safetensors``)."""
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError("state_dict must map str keys to tensors")
        if v.dtype not in ST_NAMES:
            raise TypeError(f"state_dict[{k!r}] has dtype {v.dtype}, which safetensors cannot store")
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=inputs)
    shards = plan_shards([(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()],
                         parse_size(max_shard_size, "max_shard_size"))
    out.check_space(sum(s.size for s in shards))
    with _cleanup_on_signal():
        try:
            tmp = out.create()
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
                with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2)
                    f.write("\n")
            out.commit()
        except OSError as e:
            raise _os_error(e) from None
        finally:
            out.abort()
    return [s.filename for s in shards]


def load_checkpoint(path: str, *, allow_symlinks: bool = False) -> Dict[str, torch.Tensor]:
    """The whole state dict of a model directory (small models; the engine streams instead)."""
    with Checkpoint(path, allow_symlinks=allow_symlinks) as ck:
        return ck.state_dict()


def _os_error(e: OSError) -> CheckpointError:
    if e.errno == errno.ENOSPC:
        return CheckpointError(f"no space left on device while writing {e.filename or 'the output'}")
    return CheckpointError(f"{e.filename or 'I/O error'}: {e.strerror or e}")


# ----------------------------------------------------------------------------------------------
# distributed (torchrun)


class _Dist:
    """Rank / world size and a gloo group for the few control messages (no tensors travel)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.group = None
        self._owns = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self._owns = True
                self.group = None
            elif dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
            self.rank = dist.get_rank()
            self.world = dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def any_failed(self, failed: bool) -> bool:
        if not self.active:
            return failed
        import torch.distributed as dist

        t = torch.tensor([1 if failed else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self):
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self):
        if self._owns:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def split_work(costs: Sequence[int], world: int) -> List[List[int]]:
    """Indices of work items per rank: largest first to the least-loaded rank (deterministic)."""
    loads = [0] * world
    out: List[List[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += costs[i]
    return [sorted(o) for o in out]


# ----------------------------------------------------------------------------------------------
# the merge plan


@dataclass
class WorkItem:
    keys: List[str]
    kind: str            # "merge" (one key, per-tensor method) | "group" (iso keys) | "copy" (non-float)
    in_bytes: int        # bytes read from all models
    out_bytes: int


@dataclass
class MergePlan:
    config: MergeConfig
    out_dir: str
    device: torch.device
    base: Optional[Checkpoint]
    models: List[Checkpoint]
    keys: List[str]
    compute_dtype: Dict[str, torch.dtype]
    out_dtype: Dict[str, torch.dtype]
    shards: List[Shard]
    items: List[WorkItem]
    memory_budget: int
    depth: int
    seed: int
    bytes_in: int
    bytes_out: int
    notes: List[str] = field(default_factory=list)

    @property
    def inputs(self) -> List[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.models

    def describe(self) -> str:
        c = self.config
        lines = [f"wweight merge plan ({c.source})",
                 f"  method        {c.method}",
                 f"  base_model    {self.base.path if self.base else '-'}"]
        for i, m in enumerate(self.models):
            params = ", ".join(f"{k}={v}" for k, v in c.models[i].parameters.items())
            lines.append(f"  model[{i}]      {m.path}" + (f"  ({params})" if params else ""))
        if c.parameters:
            lines.append("  parameters    " + ", ".join(f"{k}={v}" for k, v in c.parameters.items()))
        dts = sorted({str(d).replace('torch.', '') for d in self.compute_dtype.values()})
        odts = sorted({str(d).replace('torch.', '') for d in self.out_dtype.values()})
        lines += [
            f"  tensors       {len(self.keys)} ({sum(1 for i in self.items if i.kind == 'copy')} copied unmerged)",
            f"  compute dtype {', '.join(dts)}; output dtype {', '.join(odts)}",
            f"  read          {human(self.bytes_in)} from {len(self.inputs)} models",
            f"  write         {human(self.bytes_out)} in {len(self.shards)} shard(s) to {self.out_dir}",
            f"  device        {self.device}",
            f"  memory        budget {human(self.memory_budget)}, prefetch depth {self.depth} "
            f"work item(s), largest item {human(max((i.in_bytes for i in self.items), default=0))} of inputs",
            f"  seed          {self.seed}",
        ]
        if c.method in ISO_METHODS:
            lines.append(f"  iso groups    {len(self.items)} (keys batched per merge_state_dicts call)")
        lines += [f"  note          {n}" for n in self.notes]
        return "\n".join(lines)


def plan_merge(config: MergeConfig, out_dir: str, *, device="cpu", memory_budget="4GB",
               max_shard_size="5GB", overwrite: bool = False, seed: int = 0,
               allow_symlinks: bool = False, check_space: bool = True) -> MergePlan:
    """Validate everything a merge needs, before any compute, and lay out the work and the output."""
    dev = torch.device(device)
    budget = parse_size(memory_budget, "memory_budget")
    shard_max = parse_size(max_shard_size, "max_shard_size")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # linear: the base (when given) is one of config.models, an ordinary input
    base = (Checkpoint(config.base_model.path, what="base_model", allow_symlinks=allow_symlinks)
            if config.base_model and config.method != "linear" else None)
    models = [Checkpoint(m.path, what=f"models[{i}] ({m.name})", allow_symlinks=allow_symlinks)
              for i, m in enumerate(config.models)]
    ref = base or models[0]
    refname = ref.what
    ck_all = ([base] if base else []) + models
    # Same architecture, keys, shapes, dtypes everywhere; the first mismatch is the error.
    for ck in ck_all:
        if ck is ref:
            continue
        if ref.architecture and ck.architecture and ref.architecture != ck.architecture:
            raise CheckpointError(f"mismatched architectures: {refname} is {ref.architecture}, "
                                  f"{ck.what} is {ck.architecture}")
        for k in ref.keys:
            if k not in ck.tensors:
                raise CheckpointError(f"{ck.what}: missing tensor {k!r} (present in {refname})")
            a, b = ref.tensors[k], ck.tensors[k]
            if a.shape != b.shape:
                raise CheckpointError(f"{ck.what}: tensor {k!r} has shape {list(b.shape)}, "
                                      f"{refname} has {list(a.shape)}")
            if a.dtype != b.dtype:
                raise CheckpointError(f"{ck.what}: tensor {k!r} has dtype {b.dtype}, {refname} has {a.dtype}")
        if len(ck.tensors) != len(ref.tensors):
            extra = next(k for k in ck.keys if k not in ref.tensors)
            raise CheckpointError(f"{ck.what}: extra tensor {extra!r} (not in {refname})")
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=[ck.path for ck in ck_all])

    keys = list(ref.keys)
    compute: Dict[str, torch.dtype] = {}
    outdt: Dict[str, torch.dtype] = {}
    items: List[WorkItem] = []
    n_in = len(ck_all)
    iso_keys: List[str] = []
    for k in keys:
        info = ref.tensors[k]
        if info.dtype not in FLOATS:
            compute[k] = outdt[k] = info.dtype
            items.append(WorkItem([k], "copy", info.nbytes * n_in, info.nbytes))
            continue
        cd = config.dtype or info.dtype
        od = config.out_dtype or cd
        compute[k], outdt[k] = cd, od
        ob = info.numel * torch.empty((), dtype=od).element_size()
        if config.method in ISO_METHODS:
            iso_keys.append(k)
        else:
            items.append(WorkItem([k], "merge", info.nbytes * n_in, ob))
    if iso_keys:
        # Groups of keys for one merge_state_dicts call (batched SVDs), bounded by the budget:
        # inputs in compute dtype plus the SVD workspace (about 3x one model's group in fp32).
        budget_group = max(1, budget // 2)
        cur: List[str] = []
        cur_b = 0
        for k in iso_keys:
            info = ref.tensors[k]
            kb = info.numel * (torch.empty((), dtype=compute[k]).element_size() * n_in + 12)
            if cur and cur_b + kb > budget_group:
                items.append(_group_item(cur, ref, n_in, outdt))
                cur, cur_b = [], 0
            cur.append(k)
            cur_b += kb
        if cur:
            items.append(_group_item(cur, ref, n_in, outdt))
        # Keep key order: copies / groups interleave in the reference's file order.
        pos = {k: i for i, k in enumerate(keys)}
        items.sort(key=lambda it: pos[it.keys[0]])
    shards = plan_shards([(k, outdt[k], ref.tensors[k].shape) for k in keys], shard_max)
    bytes_out = sum(s.size for s in shards)
    if check_space:
        out.check_space(bytes_out)
    largest = max((i.in_bytes for i in items), default=1) or 1
    depth = max(1, min(8, budget // (2 * largest)))
    notes = []
    if largest > budget:
        notes.append(f"the largest work item ({human(largest)} of inputs) exceeds the memory budget; "
                     "it is processed alone")
    plan = MergePlan(config=config, out_dir=os.path.abspath(out_dir), device=dev, base=base, models=models,
                     keys=keys, compute_dtype=compute, out_dtype=outdt, shards=shards, items=items,
                     memory_budget=budget, depth=depth, seed=seed,
                     bytes_in=sum(ck.nbytes for ck in ck_all), bytes_out=bytes_out, notes=notes)
    plan._out = out  # type: ignore[attr-defined]
    return plan


def _group_item(keys, ref, n_in, outdt) -> WorkItem:
    inb = sum(ref.tensors[k].nbytes for k in keys) * n_in
    ob = sum(ref.tensors[k].numel * torch.empty((), dtype=outdt[k]).element_size() for k in keys)
    return WorkItem(list(keys), "group", inb, ob)


def key_seed(seed: int, key: str) -> int:
    """Per-tensor seed from the run seed and the tensor name (independent of work order / rank);
    the same function as :func:`wweight.merge.key_seed`, so CLI and Python API draw equal masks."""
    from .merge import key_seed as _ks

    return _ks(seed, key)


# ----------------------------------------------------------------------------------------------
# executing a plan


def _merge_api():
    from . import merge as _m  # resolved at call time: tests and late-landing modules patch it

    return _m


def _merge_one(plan: MergePlan, key: str, tensors: List[torch.Tensor], backend) -> torch.Tensor:
    cfg = plan.config
    m = _merge_api()
    if plan.base is not None:
        base, fts = tensors[0], tensors[1:]
    else:
        base, fts = None, tensors
    kw: Dict[str, Any] = {}
    models = cfg.models
    if cfg.method == "linear":
        kw["weights"] = [float(cfg.resolve("weight", key, e)) for e in models]
        kw["normalize"] = cfg.resolve("normalize", key)
        base = None
        fts = tensors[1:] if plan.base is not None else tensors
    else:
        kw["weights"] = [float(cfg.resolve("weight", key, e)) for e in models]
        kw["density"] = [float(cfg.resolve("density", key, e, 1.0)) for e in models]
        kw["gamma"] = [float(cfg.resolve("gamma", key, e, 0.01)) for e in models]
        kw["epsilon"] = [float(cfg.resolve("epsilon", key, e, 0.15)) for e in models]
        kw["lambda_"] = float(cfg.resolve("lambda", key, None, 1.0))
        kw["normalize"] = cfg.resolve("normalize", key)
        kw["rescale"] = cfg.resolve("rescale", key)
    return m.merge_tensors(cfg.method, base, fts, seed=key_seed(plan.seed, key), backend=backend, **kw)


def _merge_group(plan: MergePlan, keys: List[str], loaded: List[Dict[str, torch.Tensor]], backend) -> Dict[str, torch.Tensor]:
    cfg = plan.config
    m = _merge_api()
    kw = {k: v for k, v in cfg.parameters.items() if k != "alpha"}
    kw = {k: _scalar(v, keys[0]) for k, v in kw.items()}
    alpha = float(_scalar(cfg.parameters.get("alpha", 1.0), keys[0]))
    if backend is not None:
        kw["backend"] = backend
    return m.merge_state_dicts(cfg.method, loaded[0], loaded[1:], alpha=alpha, **kw)


def _scalar(v, key):
    from .config import _evaluate

    return _evaluate(v, key)


def run_merge(config: MergeConfig, out_dir: str, *, device="cpu", memory_budget="4GB",
              max_shard_size="5GB", overwrite: bool = False, seed: int = 0, backend: Optional[str] = None,
              dry_run: bool = False, progress: bool = True, allow_symlinks: bool = False,
              fsync: bool = True) -> Dict[str, Any]:
    """Validate, plan and run a merge into ``out_dir``; returns a summary dict (or the plan's).

    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (under torchrun ``"cuda"`` means this rank's
    ``cuda:LOCAL_RANK``). ``memory_budget``: host bytes of tensors in flight (see the module doc).
    """
    dist = _Dist()
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} requested but CUDA is not available")
            if dist.active and dev.index is None:
                dev = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
        plan = plan_merge(config, out_dir, device=dev, memory_budget=memory_budget,
                          max_shard_size=max_shard_size, overwrite=overwrite, seed=seed,
                          allow_symlinks=allow_symlinks)
        if dry_run:
            return {"plan": plan, "dry_run": True}
        return _execute(plan, dist, backend=backend, progress=progress, fsync=fsync)
    finally:
        dist.close()


def _execute(plan: MergePlan, dist: _Dist, *, backend, progress, fsync) -> Dict[str, Any]:
    out: AtomicOutputDir = plan._out  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    mine = split_work([it.in_bytes + it.out_bytes for it in plan.items], dist.world)[dist.rank]
    items = [plan.items[i] for i in mine]
    stats = {"read": 0, "written": 0, "tensors": 0}
    error: Optional[BaseException] = None

    with _cleanup_on_signal():
        try:
            token = dist.broadcast(uuid.uuid4().hex[:12] if dist.rank == 0 else None)
            if dist.rank == 0:
                tmp = out.create(token)
                failed = False
                try:
                    writer = ShardedWriter(tmp, plan.shards, create=True)
                except BaseException as e:
                    failed, error = True, e
                if dist.any_failed(failed):
                    raise error or CheckpointError("another rank failed")
            else:
                out.tmp = os.path.join(out.parent, f".{os.path.basename(out.out_dir)}.wweight-tmp-{token}")
                if dist.any_failed(False):
                    raise CheckpointError("rank 0 failed to create the output")
                writer = ShardedWriter(out.tmp, plan.shards, create=False)
            try:
                _pipeline(plan, items, writer, stats, backend=backend, progress=progress and dist.rank == 0)
                writer.close(fsync=fsync)
            except BaseException as e:  # noqa: BLE001 - reported below, after the other ranks agree
                error = e
                with contextlib.suppress(Exception):
                    writer.close(fsync=False)
            if dist.any_failed(error is not None):
                raise error or CheckpointError("another rank failed; nothing was written")
            commit_error: Optional[BaseException] = None
            if dist.rank == 0:
                try:
                    missing = [k for it in items for k in it.keys if k not in writer.written]
                    if missing and not dist.active:
                        raise CheckpointError(f"internal: tensor {missing[0]!r} was not written")
                    writer.write_index()
                    ref = plan.base or plan.models[0]
                    copy_side_files(plan.config.tokenizer_source, out.tmp, config_src=ref.path,
                                    torch_dtype=_common(plan.out_dtype.values()), allow_symlinks=ref.allow_symlinks)
                    if fsync:
                        _fsync_dir(out.tmp)
                    out.commit()
                except BaseException as e:  # noqa: BLE001 - let the other ranks leave the barrier first
                    commit_error = e
            if dist.any_failed(commit_error is not None):
                raise commit_error or CheckpointError("rank 0 failed to commit the output")
        except OSError as e:
            raise _os_error(e) from None
        finally:
            if dist.rank == 0:
                out.abort()
            for ck in plan.inputs:
                ck.close()
    secs = time.perf_counter() - t0
    summary = {"out_dir": plan.out_dir, "tensors": len(plan.keys), "tensors_this_rank": stats["tensors"],
               "shards": len(plan.shards), "bytes_read": plan.bytes_in, "bytes_written": plan.bytes_out,
               "seconds": secs, "rank": dist.rank, "world_size": dist.world}
    return summary


def _common(dts: Iterable[torch.dtype]) -> Optional[torch.dtype]:
    from collections import Counter

    floats = [d for d in dts if d in FLOATS]
    return Counter(floats).most_common(1)[0][0] if floats else None


def _pipeline(plan: MergePlan, items: List[WorkItem], writer: ShardedWriter, stats, *, backend, progress) -> None:
    """Reader thread -> compute (this thread) -> writer thread, ``plan.depth`` items ahead / behind."""
    dev = plan.device
    cuda = dev.type == "cuda"
    inputs = plan.inputs

    # The models' tensors of one item are read concurrently (pread releases the GIL): one thread
    # per input model, at most 4 - NVMe drives need several requests in flight to reach full speed.
    io_pool = ThreadPoolExecutor(max(1, min(4, len(inputs))), thread_name_prefix="wweight-io")

    def load(it: WorkItem):
        futs = [[io_pool.submit(ck.read, k, pin=cuda) for ck in inputs] for k in it.keys]
        return [[f.result() for f in row] for row in futs]

    def compute(it: WorkItem, data):
        outs: Dict[str, torch.Tensor] = {}
        if it.kind == "copy":
            k = it.keys[0]
            ts = data[0]
            for i, t in enumerate(ts[1:], 1):
                if not torch.equal(t, ts[0]):
                    raise CheckpointError(f"tensor {k!r} is not floating point ({ts[0].dtype}) and differs "
                                          f"between {inputs[0].what} and {inputs[i].what}; cannot merge it")
            outs[k] = ts[0]
            return outs
        cd = plan.compute_dtype
        moved = [[t.to(dev, non_blocking=True).to(cd[k]) for t in ts] for k, ts in zip(it.keys, data)]
        if it.kind == "merge":
            k = it.keys[0]
            outs[k] = _merge_one(plan, k, moved[0], backend)
        else:
            n = len(inputs)
            sds = [{k: moved[j][i] for j, k in enumerate(it.keys)} for i in range(n)]
            res = _merge_group(plan, it.keys, sds, backend)
            for k in it.keys:
                if k not in res:
                    raise CheckpointError(f"merge_state_dicts returned no tensor {k!r}")
                outs[k] = res[k]
        for k in list(outs):
            o = outs[k]
            o = o.to(plan.out_dtype[k])
            if cuda:
                host = torch.empty(o.shape, dtype=o.dtype, pin_memory=True)
                host.copy_(o, non_blocking=True)
                o = host
            outs[k] = o
        if cuda:
            ev = torch.cuda.Event()
            ev.record()
            return outs, ev
        return outs, None

    def write(it: WorkItem, result):
        outs, ev = result if isinstance(result, tuple) else (result, None)
        if ev is not None:
            ev.synchronize()
        n = 0
        for k in it.keys:
            n += writer.write(k, outs[k])
        return n

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(i.in_bytes + i.out_bytes for i in items), unit="B", unit_scale=True,
                   desc=f"wweight {plan.config.method}", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5, leave=False, disable=None)  # disable=None: no bar off a TTY
    t0 = time.perf_counter()
    loads: deque = deque()
    writes: deque = deque()
    it_iter = iter(items)
    done_tensors = 0

    def fill(pool):
        while len(loads) < plan.depth:
            try:
                nxt = next(it_iter)
            except StopIteration:
                return
            loads.append((nxt, pool.submit(load, nxt)))

    def retire(block_to: int):
        nonlocal done_tensors
        while writes and (len(writes) > block_to or writes[0][1].done()):
            it, fut = writes.popleft()
            fut.result()
            stats["written"] += it.out_bytes
            done_tensors += len(it.keys)
            if bar is not None:
                bar.update(it.in_bytes + it.out_bytes)
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{done_tensors / el:.1f} tensors/s", refresh=False)

    with ThreadPoolExecutor(1, thread_name_prefix="wweight-read") as rd, \
            ThreadPoolExecutor(1, thread_name_prefix="wweight-write") as wr:
        try:
            fill(rd)
            while loads:
                it, fut = loads.popleft()
                data = fut.result()
                fill(rd)
                stats["read"] += it.in_bytes
                with torch.no_grad():
                    result = compute(it, data)
                del data
                writes.append((it, wr.submit(write, it, result)))
                del result
                stats["tensors"] += len(it.keys)
                retire(plan.depth)
            retire(0)
        except BaseException:
            for _, f in list(loads) + list(writes):
                f.cancel()
            raise
        finally:
            io_pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()


# ----------------------------------------------------------------------------------------------
# align: Git Re-Basin weight matching of MODEL_B onto MODEL_A


def _check_same_tensors(ref: Checkpoint, other: Checkpoint) -> None:
    for k in ref.keys:
        if k not in other.tensors:
            raise CheckpointError(f"{other.what}: missing tensor {k!r} (present in {ref.what})")
        a, b = ref.tensors[k], other.tensors[k]
        if a.shape != b.shape:
            raise CheckpointError(f"{other.what}: tensor {k!r} has shape {list(b.shape)}, {ref.what} has {list(a.shape)}")
    if len(other.tensors) != len(ref.tensors):
        extra = next(k for k in other.keys if k not in ref.tensors)
        raise CheckpointError(f"{other.what}: extra tensor {extra!r} (not in {ref.what})")


_LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlamaModel", "MistralModel")
_GPT2_ARCHS = ("GPT2LMHeadModel", "GPT2Model")


def build_spec(name: str, ck: "Checkpoint"):
    """A :class:`wweight.PermutationSpec` for the checkpoint: ``auto`` (from config.json's
    ``architectures``), ``mlp`` / ``gpt2`` / ``llama`` (or a Hugging Face class name), or
    ``package.module:function`` called as ``function(config_dict, {key: shape})``."""
    from . import permute_specs as S

    cfg = ck.config or {}
    shapes = {k: ck.tensors[k].shape for k in ck.keys}
    arch = name
    if name == "auto":
        arch = ck.architecture
        if arch is None:
            raise CheckpointError(f"{ck.path}: config.json has no 'architectures'; name the spec "
                                  "(mlp, gpt2, llama or module:function)")
    if ":" in arch:
        import importlib

        mod, _, fn = arch.partition(":")
        try:
            spec = getattr(importlib.import_module(mod), fn)(cfg, shapes)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"spec {arch!r}: cannot load ({e})") from None
        return spec
    low = arch.lower()
    if low in ("mlp", ) or arch == "WWeightDigitsMLP":
        layers = [k[: -len(".weight")] for k in ck.keys if k.endswith(".weight") and len(shapes[k]) == 2]
        if not layers:
            raise CheckpointError(f"{ck.path}: no 2-D '*.weight' tensors for an MLP spec")
        return S.mlp_spec(layers, bias=all(f"{l}.bias" in shapes for l in layers))
    if low == "gpt2" or arch in _GPT2_ARCHS:
        try:
            n_layer, n_head, d = int(cfg["n_layer"]), int(cfg["n_head"]), int(cfg["n_embd"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{ck.path}: config.json lacks n_layer / n_head / n_embd for a GPT-2 spec") from None
        prefix = "transformer." if any(k.startswith("transformer.") for k in shapes) else ""
        return S.gpt2_spec(n_layer, n_head, d // n_head, prefix=prefix,
                           lm_head="lm_head.weight" if "lm_head.weight" in shapes else None)
    if low in ("llama", "mistral", "qwen2") or arch in _LLAMA_ARCHS:
        try:
            n_layer, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
            n_kv = int(cfg.get("num_key_value_heads") or n_head)
            hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_head)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{ck.path}: config.json lacks num_hidden_layers / num_attention_heads / "
                                  "hidden_size for a Llama spec") from None
        return S.llama_spec(n_layer, n_head, n_kv, hd,
                            lm_head="lm_head.weight" if "lm_head.weight" in shapes else None,
                            attention_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
                            mlp_bias="model.layers.0.mlp.gate_proj.bias" in shapes)
    raise CheckpointError(f"no permutation spec for architecture {arch!r} (known: mlp, gpt2, llama, "
                          f"{', '.join(_GPT2_ARCHS + _LLAMA_ARCHS)}; or pass module:function)")


def run_align(spec: str, model_a: str, model_b: str, out_dir: str, *, max_iter: int = 100, seed: int = 0,
              device="cpu", overwrite: bool = False, dry_run: bool = False, max_shard_size="5GB",
              allow_symlinks: bool = False, fsync: bool = True) -> Dict[str, Any]:
    """Weight matching of ``model_b`` onto ``model_a`` (``wweight.weight_matching``); writes the permuted
    ``model_b`` (same layout, config and tokenizer as ``model_b``) and ``permutations.safetensors``.

    Weight matching needs every weight of both models at once, so both are loaded whole (on
    ``device``): memory is two models, not a bounded stream."""
    from . import permute as P

    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    a = Checkpoint(model_a, what="MODEL_A", allow_symlinks=allow_symlinks)
    b = Checkpoint(model_b, what="MODEL_B", allow_symlinks=allow_symlinks)
    if a.architecture and b.architecture and a.architecture != b.architecture:
        raise CheckpointError(f"mismatched architectures: MODEL_A is {a.architecture}, MODEL_B is {b.architecture}")
    _check_same_tensors(a, b)
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=[a.path, b.path])
    sp = build_spec(spec, a)
    missing = [k for k in sp.axes_to_perm if k not in a.tensors]
    if missing:
        raise CheckpointError(f"spec {spec!r} names tensor {missing[0]!r}, which MODEL_A does not have")
    out.check_space(b.nbytes)
    dev = torch.device(device)
    msg = (f"align plan: {len(sp.perm_names)} permutations over {len(sp.axes_to_perm)} tensors "
           f"({spec} spec), MODEL_B {b.path} onto MODEL_A {a.path}, {human(a.nbytes + b.nbytes)} in memory on {dev}")
    if dry_run:
        return {"message": msg + "\ndry run: validated, nothing written"}
    t0 = time.perf_counter()
    pa = {k: a.read(k).to(dev) for k in a.keys}
    pb = {k: b.read(k).to(dev) for k in b.keys}
    perms = P.weight_matching(sp, pa, pb, max_iter=max_iter, seed=seed)
    pb2 = P.apply_permutation(sp, perms, pb)
    del pa
    sd = {k: pb2[k] for k in b.keys}
    save_checkpoint(out_dir, sd, side_files_from=b.path, max_shard_size=max_shard_size, overwrite=overwrite,
                    inputs=[a.path, b.path], fsync=fsync, allow_symlinks=allow_symlinks,
                    extra_files={"permutations.safetensors": {k: v.cpu().contiguous() for k, v in perms.items()}})
    return {"message": f"wweight: aligned MODEL_B onto MODEL_A ({len(perms)} permutations) in "
                       f"{time.perf_counter() - t0:.2f} s -> {os.path.abspath(out_dir)}",
            "perms": perms}


# ----------------------------------------------------------------------------------------------
# quantize / dequantize

QUANT_INDEX = "quantization.json"


def parse_outliers(v):
    """CLI ``--outliers``: ``none``, a fraction (``0.001``) or ``zscore:Z``."""
    if v is None or (isinstance(v, str) and v.lower() in ("none", "")):
        return None
    if isinstance(v, str) and v.lower().startswith("zscore:"):
        try:
            return {"zscore": float(v.split(":", 1)[1])}
        except ValueError:
            raise ValueError(f"--outliers zscore:Z needs a number, got {v!r}") from None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"--outliers must be none, a fraction in (0, 1) or zscore:Z, got {v!r}") from None
    if not 0.0 < f < 1.0:
        raise ValueError(f"--outliers fraction must be in (0, 1), got {v!r}")
    return f


def run_quantize(model_dir: str, out_dir: str, *, bits: int = 4, block_size: int = 64, outliers="none",
                 skip: Optional[Sequence[str]] = None, device="cpu", overwrite: bool = False,
                 dry_run: bool = False, max_shard_size="5GB", allow_symlinks: bool = False,
                 fsync: bool = True) -> Dict[str, Any]:
    """Quantize a checkpoint tensor group by tensor group (``wweight.quantize_state_dict``).

    Output: ``quantized-0000i-of-0000N.safetensors`` files in the quantization family's documented
    layout (each one readable by ``wweight.load_quantized``), ``quantization.json`` (parameters and
    ``weight_map``), config.json and tokenizer files. A group holds at most ``max_shard_size``
    bytes of input tensors, which bounds host memory."""
    from . import quant as Q

    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    out_spec = parse_outliers(outliers)
    src = Checkpoint(model_dir, what="MODEL_DIR", allow_symlinks=allow_symlinks)
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=[src.path])
    groups = plan_shards([(k, src.tensors[k].dtype, src.tensors[k].shape) for k in src.keys],
                         parse_size(max_shard_size, "max_shard_size"))
    out.check_space(src.nbytes)  # a quantized model is smaller than its input
    dev = torch.device(device)
    msg = (f"quantize plan: {len(src.keys)} tensors ({human(src.nbytes)}) of {src.path}, {bits}-bit blocks of "
           f"{block_size}, outliers {out_spec}, skip {list(skip or [])}, {len(groups)} file(s), device {dev}")
    if dry_run:
        return {"message": msg + "\ndry run: validated, nothing written"}
    t0 = time.perf_counter()
    n = len(groups)
    weight_map: Dict[str, str] = {}
    q_bytes = 0
    with _cleanup_on_signal():
        try:
            tmp = out.create()
            for i, g in enumerate(groups):
                fn = "quantized.safetensors" if n == 1 else f"quantized-{i + 1:05d}-of-{n:05d}.safetensors"
                sd = {k: src.read(k).to(dev) for k in g.keys}
                qsd = Q.quantize_state_dict(sd, bits, block_size, outliers=out_spec, skip=list(skip or []))
                Q.save_quantized(os.path.join(tmp, fn), qsd)
                q_bytes += os.path.getsize(os.path.join(tmp, fn))
                weight_map.update({k: fn for k in g.keys})
                del sd, qsd
            with open(os.path.join(tmp, QUANT_INDEX), "w", encoding="utf-8") as f:
                json.dump({"format": "wweight.quant", "bits": bits, "block_size": block_size,
                           "outliers": outliers, "skip": list(skip or []),
                           "weight_map": weight_map}, f, indent=2)
                f.write("\n")
            copy_side_files(src.path, tmp, allow_symlinks=allow_symlinks)
            if fsync:
                for fn in os.listdir(tmp):
                    with open(os.path.join(tmp, fn), "rb") as fh:
                        os.fsync(fh.fileno())
            out.commit()
        except OSError as e:
            raise _os_error(e) from None
        finally:
            out.abort()
            src.close()
    return {"message": f"wweight: quantized {len(src.keys)} tensors to {bits} bits in "
                       f"{time.perf_counter() - t0:.2f} s ({human(src.nbytes)} -> {human(q_bytes)}) -> "
                       f"{os.path.abspath(out_dir)}", "bytes": q_bytes}


def run_dequantize(model_dir: str, out_dir: str, *, dtype=None, overwrite: bool = False, max_shard_size="5GB",
                   allow_symlinks: bool = False, fsync: bool = True) -> Dict[str, Any]:
    """Inverse of :func:`run_quantize`: a plain Hugging Face checkpoint, one quantized file at a time."""
    from . import quant as Q
    from .config import parse_dtype

    src = os.path.abspath(model_dir)
    idx = os.path.join(src, QUANT_INDEX)
    if not os.path.isdir(src):
        raise CheckpointError(f"QUANTIZED_DIR {model_dir}: directory not found")
    if not os.path.isfile(idx):
        raise CheckpointError(f"{model_dir}: no {QUANT_INDEX} (not written by `wweight quantize`)")
    try:
        with open(idx, "r", encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{idx}: corrupted ({e})") from None
    files = list(dict.fromkeys(wm.values()))
    out_dt = parse_dtype(dtype, "dtype") if dtype is not None else None
    plan: List[Tuple[str, torch.dtype, Tuple[int, ...]]] = []
    for fn in files:
        if os.path.basename(fn) != fn or not fn.endswith(".safetensors"):
            raise CheckpointError(f"{idx}: file name {fn!r} is not a .safetensors file in the directory")
        fp = os.path.join(src, fn)
        if not os.path.isfile(fp):
            raise CheckpointError(f"{fp}: missing")
        if not allow_symlinks and not _inside(fp, src):
            raise CheckpointError(f"{fp}: is a symlink resolving outside {src}; refusing to follow it")
        hdr, meta = read_header(fp)
        qmeta = json.loads(meta.get("wweight.quant", "{}"))
        for k in [k for k, v in wm.items() if v == fn]:
            if k in qmeta:
                dt = Q._NAME_DTYPES[qmeta[k]["dtype"]]
                plan.append((k, out_dt or dt, tuple(qmeta[k]["shape"])))
            elif k in hdr:
                dt = hdr[k].dtype
                plan.append((k, out_dt if (out_dt and dt in FLOATS) else dt, hdr[k].shape))
            else:
                raise CheckpointError(f"{fp}: tensor {k!r} listed in {QUANT_INDEX} is missing")
    out = AtomicOutputDir(out_dir, overwrite=overwrite, inputs=[src])
    shards = plan_shards(plan, parse_size(max_shard_size, "max_shard_size"))
    out.check_space(sum(s.size for s in shards))
    want = {k: dt for k, dt, _ in plan}
    t0 = time.perf_counter()
    with _cleanup_on_signal():
        try:
            tmp = out.create()
            w = ShardedWriter(tmp, shards)
            for fn in files:
                sd = Q.dequantize_state_dict(Q.load_quantized(os.path.join(src, fn)))
                for k, v in sd.items():
                    w.write(k, v.to(want[k]))
                del sd
            w.close(fsync=fsync)
            w.write_index()
            copy_side_files(src, tmp, torch_dtype=out_dt, allow_symlinks=allow_symlinks)
            out.commit()
        except OSError as e:
            raise _os_error(e) from None
        finally:
            out.abort()
    return {"message": f"wweight: dequantized {len(plan)} tensors in {time.perf_counter() - t0:.2f} s -> "
                       f"{os.path.abspath(out_dir)}"}
