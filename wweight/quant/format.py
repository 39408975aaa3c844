"""The storage format of the quantization family: :class:`QuantizedTensor` and its safetensors files.

Storage (:class:`QuantizedTensor`):

* ``codes``   uint8, the codes of the flattened tensor as one big-endian bitstream
  (``ceil(n / 8) * bits`` bytes: 8 codes fill exactly ``bits`` bytes, so 3/5/6/7-bit codes
  waste nothing; for 4 bits: two codes per byte, high nibble first, like bitsandbytes);
* ``scale`` / ``zero`` one per block in ``scale_dtype`` (float16 by default, float32 when a
  value does not fit float16); ``zero`` (the block minimum) is absent for symmetric codes;
* ``outlier_idx`` sorted flat indices (int32 below 2**31 elements, else int64) and
  ``outlier_val`` the exact values in the weight's dtype (sorted COO).

On disk (:func:`save_quantized` / :func:`load_quantized`): one safetensors file (never pickle),
the parts under ``{name}::<part>``, the metadata as JSON in the header.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Union

import torch

from .. import _dispatch

FORMAT_VERSION = "1"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def _int_field(field: str, v, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{field} must be an integer {rng}, got {v!r}")
    return v


def check_meta(meta) -> tuple:
    """``(shape, dtype, bits, block_size, symmetric)`` of a quantized tensor's metadata (the JSON of
    a file, or constructor arguments), each checked: the metadata comes from a file, and a wrong
    value would make dequantization read the codes with the wrong layout (silent garbage)."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"metadata must be an object, got {type(meta).__name__}")
    for f in ("shape", "dtype", "bits", "block_size", "symmetric"):
        if f not in meta:
            raise ValueError(f"metadata lacks field {f!r}")
    shape = meta["shape"]
    if isinstance(shape, torch.Size):
        shape = list(shape)
    if not isinstance(shape, (list, tuple)):
        raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
    shape = tuple(_int_field("shape", d, 0) for d in shape)
    dt = meta["dtype"]
    if isinstance(dt, str):
        if dt not in NAME_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(NAME_DTYPES)}, got {dt!r}")
        dt = NAME_DTYPES[dt]
    elif dt not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(NAME_DTYPES)}, got {dt!r}")
    bits = _int_field("bits", meta["bits"], 2, 8)
    bs = _int_field("block_size", meta["block_size"], 1)
    sym = meta["symmetric"]
    if not isinstance(sym, bool):
        raise ValueError(f"symmetric must be a bool, got {sym!r}")
    return shape, dt, bits, bs, sym


def check_parts(shape, dtype, bits: int, block_size: int, symmetric: bool, parts: Mapping[str, tuple]) -> None:
    """The stored parts (``{part: (torch dtype, tensor shape)}``, ``zero`` absent when None) agree
    with the metadata: codes = packed_bytes(n, bits) uint8, scale (and zero, iff asymmetric) one
    float per block, outlier indices int32/int64 with one value per index in ``dtype``."""
    n = math.prod(shape)
    nb = -(-n // block_size)

    def part(name, dtypes, numel=None):
        if name not in parts:
            raise ValueError(f"{name} is missing")
        dt, shp = parts[name]
        if dt not in dtypes:
            raise ValueError(f"{name} has dtype {dt}, expected {' or '.join(map(str, dtypes))}")
        if len(shp) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(shp)}")
        if numel is not None and shp[0] != numel:
            raise ValueError(f"{name} has {shp[0]} elements, expected {numel} for shape {list(shape)}, "
                             f"bits={bits}, block_size={block_size}")
        return shp[0]

    part("codes", (torch.uint8,), -(-n // 8) * bits)
    part("scale", tuple(DTYPE_NAMES), nb)
    if symmetric and parts.get("zero") is not None:
        raise ValueError("zero is stored but symmetric=True (symmetric codes have no zero)")
    if not symmetric:
        if parts.get("zero") is None:
            raise ValueError("zero is missing but symmetric=False")
        part("zero", (parts["scale"][0],), nb)
    k = part("outlier_idx", (torch.int32, torch.int64) if n < 2 ** 31 else (torch.int64,))
    part("outlier_val", (dtype,), k)
    if k > n:
        raise ValueError(f"outlier_idx has {k} entries for {n} elements")


class QuantizedTensor:
    """A blockwise-quantized tensor: packed codes + per-block scale/zero + exact sparse outliers.

    Attributes: ``codes`` (uint8, packed), ``scale`` (``(num_blocks,)``), ``zero``
    (``(num_blocks,)`` or None when ``symmetric``), ``outlier_idx`` (``(K,)`` int32/int64 sorted
    flat indices), ``outlier_val`` (``(K,)`` original dtype), ``shape``, ``dtype``, ``bits``,
    ``block_size`` (elements per block of the flattened tensor), ``symmetric``.
    """

    def __init__(self, codes, scale, zero, outlier_idx, outlier_val, shape, dtype, bits, block_size, symmetric):
        """Checks every field against the others (:func:`check_meta`, :func:`check_parts`, outlier
        indices sorted and inside the tensor): a container whose parts disagree would otherwise
        dequantize to silent garbage or fail deep inside a kernel. ValueError names the field."""
        shape, dtype, bits, block_size, symmetric = check_meta(
            {"shape": shape, "dtype": dtype, "bits": bits, "block_size": block_size, "symmetric": symmetric})
        parts = {"codes": codes, "scale": scale, "zero": zero, "outlier_idx": outlier_idx, "outlier_val": outlier_val}
        for name, t in parts.items():
            if t is None and name == "zero":
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != codes.device:
                raise ValueError(f"{name} is on {t.device}, codes on {codes.device}")
        check_parts(shape, dtype, bits, block_size, symmetric,
                    {k: (t.dtype, tuple(t.shape)) for k, t in parts.items() if t is not None})
        n, k = math.prod(shape), outlier_idx.numel()
        if k:
            i = outlier_idx
            bad = (i[0] < 0) | (i[-1] >= n)
            if k > 1:
                bad = bad | (i[1:] <= i[:-1]).any()
            if bool(bad):
                raise ValueError(f"outlier_idx must be strictly increasing flat indices in [0, {n}) "
                                 f"(shape {list(shape)})")
        self.codes = codes
        self.scale = scale
        self.zero = zero
        self.outlier_idx = outlier_idx
        self.outlier_val = outlier_val
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.bits = bits
        self.block_size = block_size
        self.symmetric = symmetric

    # -- sizes -------------------------------------------------------------------------------
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return self.scale.numel()

    @property
    def num_outliers(self) -> int:
        return self.outlier_idx.numel()

    def _parts(self) -> List[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.outlier_idx, self.outlier_val) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, zeros, outlier indices and values)."""
        return sum(t.numel() * t.element_size() for t in self._parts())

    @property
    def bits_per_param(self) -> float:
        """True storage cost per element in bits, metadata (scales, zeros, outliers) included."""
        n = self.numel()
        return 8.0 * self.nbytes / n if n else 0.0

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device) -> "QuantizedTensor":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(mv(self.codes), mv(self.scale), mv(self.zero), mv(self.outlier_idx),
                               mv(self.outlier_val), self.shape, self.dtype, self.bits, self.block_size,
                               self.symmetric)

    def cpu(self) -> "QuantizedTensor":
        return self.to("cpu")

    def cuda(self, device=None) -> "QuantizedTensor":
        return self.to(device if device is not None else "cuda")

    def dequantize(self, backend: Optional[str] = None) -> torch.Tensor:
        """Dense tensor of ``shape`` / ``dtype`` on ``device``; outliers come back bit-exact.

        Runs the ``wweight::quant_dequantize`` op (registered by :mod:`wweight.quant.ops`, which
        imports this module; the container reaches the op by its name, not an import).
        """
        if self.numel() == 0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        op = _dispatch.named_op("wweight::quant_dequantize")
        return _dispatch.run_op(op, self.codes, self.scale, self.zero, self.outlier_idx, self.outlier_val,
                                list(self.shape), self.dtype, self.bits, self.block_size, backend)

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
                f"block_size={self.block_size}, symmetric={self.symmetric}, outliers={self.num_outliers}, "
                f"bits_per_param={self.bits_per_param:.3f}, device={self.device})")

    # -- (de)serialisation -------------------------------------------------------------------
    def meta(self) -> dict:
        return {"shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype], "bits": self.bits,
                "block_size": self.block_size, "symmetric": self.symmetric}

    def tensors(self, name: str) -> Dict[str, torch.Tensor]:
        """The stored tensors under the documented safetensors key names ``{name}::<part>``."""
        out = {f"{name}::codes": self.codes, f"{name}::scale": self.scale,
               f"{name}::outlier_idx": self.outlier_idx, f"{name}::outlier_val": self.outlier_val}
        if self.zero is not None:
            out[f"{name}::zero"] = self.zero
        return out

    @classmethod
    def from_tensors(cls, name: str, meta: dict, tensors: Mapping[str, torch.Tensor]) -> "QuantizedTensor":
        """The tensor ``name`` of a loaded file; ValueError names the tensor and the field."""
        try:
            shape, dtype, bits, bs, sym = check_meta(meta)
            part = {p: tensors.get(f"{name}::{p}") for p in ("codes", "scale", "zero", "outlier_idx", "outlier_val")}
            for p, t in part.items():
                if t is None and p != "zero":
                    raise ValueError(f"{p} is missing (no tensor {name}::{p})")
            return cls(part["codes"], part["scale"], part["zero"], part["outlier_idx"], part["outlier_val"],
                       shape, dtype, bits, bs, sym)
        except ValueError as e:
            raise ValueError(f"quantized tensor {name!r}: {e}") from None


def save_quantized(path: str, qsd: Mapping[str, Union[QuantizedTensor, torch.Tensor]],
                   metadata: Optional[Mapping[str, str]] = None) -> None:
    """One safetensors file (never pickle). A QuantizedTensor ``name`` is stored as the tensors
    ``name::codes`` (uint8), ``name::scale``, ``name::zero`` (asymmetric only),
    ``name::outlier_idx`` (int32/int64), ``name::outlier_val``; its shape/dtype/bits/block_size/
    symmetric live in the header metadata ``wweight.quant`` (JSON ``{name: {...}}``) next to
    ``wweight.quant.format`` = "1". Plain tensors are stored under their own names."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    meta: Dict[str, dict] = {}
    for name, v in qsd.items():
        if "::" in name:
            raise ValueError(f"qsd names must not contain '::' (reserved for QuantizedTensor parts), got {name!r}")
        if isinstance(v, QuantizedTensor):
            meta[name] = v.meta()
            for k, t in v.tensors(name).items():
                tensors[k] = t.detach().cpu().contiguous()
        elif isinstance(v, torch.Tensor):
            tensors[name] = v.detach().cpu().contiguous()
        else:
            raise TypeError(f"qsd[{name!r}] must be a QuantizedTensor or a torch.Tensor, got {type(v).__name__}")
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    header["wweight.quant.format"] = FORMAT_VERSION
    header["wweight.quant"] = json.dumps(meta, separators=(",", ":"))
    # safetensors refuses tensors that share storage; clone those (rare: tied weights)
    seen = {}
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.numel()) if t.numel() else None
        if key is not None and key in seen:
            tensors[k] = t.clone()
        elif key is not None:
            seen[key] = k
    save_file(tensors, os.fspath(path), metadata=header)


def load_quantized(path: str, device: Union[str, torch.device] = "cpu") -> Dict[str, Union[QuantizedTensor, torch.Tensor]]:
    """Read a file written by :func:`save_quantized`; returns ``{name: QuantizedTensor | Tensor}``."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        header = f.metadata() or {}
        if "wweight.quant" not in header:
            raise ValueError(f"{path} is not a wweight quantized safetensors file (no 'wweight.quant' metadata)")
        if header.get("wweight.quant.format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported wweight.quant.format {header.get('wweight.quant.format')!r}")
        try:
            meta = json.loads(header["wweight.quant"])
        except ValueError as e:
            raise ValueError(f"{path}: wweight.quant metadata is not JSON ({e})") from None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: wweight.quant metadata must be a JSON object")
    out: Dict[str, Union[QuantizedTensor, torch.Tensor]] = {}
    for k, t in tensors.items():
        if "::" not in k:
            out[k] = t
        elif k.partition("::")[0] not in meta:
            raise ValueError(f"{path}: tensor {k!r} belongs to no quantized tensor in the wweight.quant metadata")
    for name, m in meta.items():
        try:
            out[name] = QuantizedTensor.from_tensors(name, m, tensors)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return out
