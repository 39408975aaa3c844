"""The safetensors / Hugging Face layout: names, dtypes, header parsing, sizes and the engine's error.

A safetensors file is an 8-byte little-endian header length, a JSON header (``{key: {dtype, shape,
data_offsets}}`` plus ``__metadata__``) and the tensor bytes; a model directory holds
``model.safetensors`` or shards listed by ``model.safetensors.index.json``, plus ``config.json``
and tokenizer files. Reading is :mod:`.reader`, writing :mod:`.writer`.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import torch

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


#: the last line of every dry run (merge, align, quantize)
DRY_RUN_NOTE = "dry run: validated, nothing written"


class CheckpointError(ValueError):
    """A bad model directory / shard / output directory; the message names the file and key."""


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


def _unique_pairs(pairs):
    """``object_pairs_hook`` for headers: JSON allows a key twice and ``json.loads`` keeps the last
    one silently, so two entries for one tensor would read as one; refuse instead."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _nonneg_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate one safetensors file's header: ({key: TensorInfo}, metadata).

    Checks what the safetensors library checks, because a header is untrusted input that decides
    which bytes each tensor reads: the header length (<= 100 MB, fits in the file), the JSON (an
    object, no key twice), every dtype (known) and shape (non-negative integers), byte size = dtype
    size x prod(shape), and that the data_offsets are ordered, non-overlapping and contiguous,
    covering the data section exactly (no hole, no shared bytes, no trailing bytes). A truncated
    file is reported as such. (safetensors has no checksum: flipped bits inside tensor data cannot
    be detected.)
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > size - 8 or n < 2:
                raise CheckpointError(f"{path}: corrupted or truncated safetensors file (header length "
                                      f"{n} does not fit in {size} bytes or exceeds {_MAX_HEADER})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        hdr = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
        if not isinstance(hdr, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({e})") from None
    meta = hdr.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header: __metadata__ is not an object")
    data_start = 8 + n
    data_len = size - data_start
    out: Dict[str, TensorInfo] = {}
    spans = []
    for key, e in hdr.items():
        bad = f"{path}: corrupted safetensors header: tensor {key!r}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{bad} is not an object")
        name = e.get("dtype")
        if not isinstance(name, str) or name not in ST_DTYPES:
            raise CheckpointError(f"{bad} has unknown dtype {name!r} (known: {', '.join(ST_DTYPES)})")
        dt = ST_DTYPES[name]
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(_nonneg_int(d) for d in shape):
            raise CheckpointError(f"{bad} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_nonneg_int(x) for x in offs):
            raise CheckpointError(f"{bad} has data_offsets {offs!r}, not two non-negative integers")
        s, t = offs
        shape = tuple(shape)
        if t < s or t - s != math.prod(shape) * itemsize(dt):
            raise CheckpointError(f"{bad} has byte range [{s}, {t}) for shape {list(shape)} {name} "
                                  f"({math.prod(shape) * itemsize(dt)} bytes)")
        if t > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file: key {key!r} needs "
                                  f"{data_start + t} bytes, the file has {size}")
        out[key] = TensorInfo(key, dt, shape, path, data_start + s, t - s)
        spans.append((s, t, key))
    end = 0
    for s, t, key in sorted(spans):
        if s != end:
            what = "overlaps the previous tensor" if s < end else f"leaves a hole [{end}, {s})"
            raise CheckpointError(f"{path}: corrupted safetensors header: tensor {key!r} at [{s}, {t}) "
                                  f"{what}; tensors must be contiguous and non-overlapping")
        end = t
    if end != data_len:
        raise CheckpointError(f"{path}: corrupted safetensors header: the tensors cover {end} data bytes, "
                              f"the file has {data_len} ({data_len - end} unaccounted bytes at the end)")
    return out, meta


def inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) inside the directory ``root``."""
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root




def header_bytes(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...], int, int]]) -> bytes:
    """The JSON header of ``(key, dtype, shape, start, end)`` entries, padded to 8 bytes as the
    safetensors writer does (the tensor data that follows is 8-byte aligned)."""
    hdr: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for key, dt, shape, s, t in entries:
        hdr[key] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [s, t]}
    raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    return raw + b" " * ((-len(raw)) % 8)


def itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON plus a final newline (config.json, indexes, quantization.json)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
