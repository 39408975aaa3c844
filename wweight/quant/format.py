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

FORMAT_VERSION = "1"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class QuantizedTensor:
    """A blockwise-quantized tensor: packed codes + per-block scale/zero + exact sparse outliers.

    Attributes: ``codes`` (uint8, packed), ``scale`` (``(num_blocks,)``), ``zero``
    (``(num_blocks,)`` or None when ``symmetric``), ``outlier_idx`` (``(K,)`` int32/int64 sorted
    flat indices), ``outlier_val`` (``(K,)`` original dtype), ``shape``, ``dtype``, ``bits``,
    ``block_size`` (elements per block of the flattened tensor), ``symmetric``.
    """

    def __init__(self, codes, scale, zero, outlier_idx, outlier_val, shape, dtype, bits, block_size, symmetric):
        self.codes = codes
        self.scale = scale
        self.zero = zero
        self.outlier_idx = outlier_idx
        self.outlier_val = outlier_val
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.bits = int(bits)
        self.block_size = int(block_size)
        self.symmetric = bool(symmetric)

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
        imports this module; the container reaches the op through torch's registry, not an import).
        """
        if self.numel() == 0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return torch.ops.wweight.quant_dequantize(self.codes, self.scale, self.zero, self.outlier_idx,
                                                  self.outlier_val, list(self.shape), self.dtype, self.bits,
                                                  self.block_size, backend)

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
        return cls(tensors[f"{name}::codes"], tensors[f"{name}::scale"], tensors.get(f"{name}::zero"),
                   tensors[f"{name}::outlier_idx"], tensors[f"{name}::outlier_val"], meta["shape"],
                   NAME_DTYPES[meta["dtype"]], meta["bits"], meta["block_size"], meta["symmetric"])


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
        meta = json.loads(header["wweight.quant"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out: Dict[str, Union[QuantizedTensor, torch.Tensor]] = {}
    for k, t in tensors.items():
        if "::" not in k:
            out[k] = t
    for name, m in meta.items():
        out[name] = QuantizedTensor.from_tensors(name, m, tensors)
    return out


