"""``wweight quantize`` / ``dequantize``: whole checkpoints through the quantization family, shard by shard.

Output of :func:`run_quantize`: ``quantized-0000i-of-0000N.safetensors`` files in the quantization
family's documented layout (each one readable by :func:`wweight.load_quantized`),
``quantization.json`` (parameters and ``weight_map``), config.json and tokenizer files.
:func:`run_dequantize` turns that back into a plain Hugging Face checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import parse_dtype
from .. import quant as Q  # looked up at call time
from ..quant.format import check_meta, check_parts
from .atomic import AtomicOutputDir, atomic_output
from .format import DRY_RUN_NOTE, FLOATS, CheckpointError, human, inside, parse_size, read_header, write_json
from .reader import Checkpoint
from .writer import ShardedWriter, copy_side_files, plan_shards

_PARTS = ("codes", "scale", "zero", "outlier_idx", "outlier_val")

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
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if block_size not in ("row", "tensor") and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                                or block_size < 1):  # same choices as wweight.quantize
        raise ValueError(f"block_size must be a positive integer, 'row' or 'tensor', got {block_size!r}")
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
        return {"message": f"{msg}\n{DRY_RUN_NOTE}"}
    t0 = time.perf_counter()
    n = len(groups)
    weight_map: Dict[str, str] = {}
    q_bytes = 0
    try:
        with atomic_output(out) as tmp:
            for i, g in enumerate(groups):
                fn = "quantized.safetensors" if n == 1 else f"quantized-{i + 1:05d}-of-{n:05d}.safetensors"
                sd = {k: src.read(k).to(dev) for k in g.keys}
                qsd = Q.quantize_state_dict(sd, bits, block_size, outliers=out_spec, skip=list(skip or []))
                Q.save_quantized(os.path.join(tmp, fn), qsd)
                q_bytes += os.path.getsize(os.path.join(tmp, fn))
                weight_map.update({k: fn for k in g.keys})
                del sd, qsd
            write_json(os.path.join(tmp, QUANT_INDEX),
                       {"format": "wweight.quant", "bits": bits, "block_size": block_size, "outliers": outliers,
                        "skip": list(skip or []), "weight_map": weight_map})
            copy_side_files(src.path, tmp, allow_symlinks=allow_symlinks)
            if fsync:
                for fn in os.listdir(tmp):
                    with open(os.path.join(tmp, fn), "rb") as fh:
                        os.fsync(fh.fileno())
            out.commit()
    finally:
        src.close()
    return {"message": f"wweight: quantized {len(src.keys)} tensors to {bits} bits in "
                       f"{time.perf_counter() - t0:.2f} s ({human(src.nbytes)} -> {human(q_bytes)}) -> "
                       f"{os.path.abspath(out_dir)}", "bytes": q_bytes}


def run_dequantize(model_dir: str, out_dir: str, *, dtype=None, overwrite: bool = False, max_shard_size="5GB",
                   allow_symlinks: bool = False, fsync: bool = True) -> Dict[str, Any]:
    """Inverse of :func:`run_quantize`: a plain Hugging Face checkpoint, one quantized file at a time."""
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
        if not allow_symlinks and not inside(fp, src):
            raise CheckpointError(f"{fp}: is a symlink resolving outside {src}; refusing to follow it")
        hdr, meta = read_header(fp)
        try:
            qmeta = json.loads(meta.get("wweight.quant", "{}"))
            if not isinstance(qmeta, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise CheckpointError(f"{fp}: corrupted wweight.quant metadata ({e})") from None
        for k in [k for k, v in wm.items() if v == fn]:
            if k in qmeta:
                try:  # planned from the header alone; the values (outlier indices) are checked on load
                    shape, dt, bits, bs, sym = check_meta(qmeta[k])
                    check_parts(shape, dt, bits, bs, sym, {p: (hdr[f"{k}::{p}"].dtype, hdr[f"{k}::{p}"].shape)
                                                           for p in _PARTS if f"{k}::{p}" in hdr})
                except ValueError as e:
                    raise CheckpointError(f"{fp}: quantized tensor {k!r}: {e}") from None
                plan.append((k, out_dt or dt, shape))
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
    with atomic_output(out) as tmp:
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
    return {"message": f"wweight: dequantized {len(plan)} tensors in {time.perf_counter() - t0:.2f} s -> "
                       f"{os.path.abspath(out_dir)}"}
