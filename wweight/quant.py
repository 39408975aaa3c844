"""Blockwise round-to-nearest quantization (2-8 bit) with outliers / super weights held out exactly.

Papers: Yu et al. 2024, "The Super Weight in Large Language Models" (arXiv:2411.07191): RTN on
contiguous blocks of the flattened weight becomes usable at large block sizes once the few
super weights / largest outliers are kept in full precision; Dettmers et al. 2023 (SpQR,
arXiv:2306.03078) and Kim et al. 2023 (SqueezeLLM, arXiv:2306.07629): dense low-bit codes plus
a sparse list of exact outliers. Speed peer: bitsandbytes' ``quantize_blockwise`` /
``quantize_4bit`` (absmax, blocks of 64, no outliers).

Storage (:class:`QuantizedTensor`):

* ``codes``   uint8, the codes of the flattened tensor as one big-endian bitstream
  (``ceil(n / 8) * bits`` bytes: 8 codes fill exactly ``bits`` bytes, so 3/5/6/7-bit codes
  waste nothing; for 4 bits: two codes per byte, high nibble first, like bitsandbytes);
* ``scale`` / ``zero`` one per block in ``scale_dtype`` (float16 by default, float32 when a
  value does not fit float16); ``zero`` (the block minimum) is absent for symmetric codes;
* ``outlier_idx`` sorted flat indices (int32 below 2**31 elements, else int64) and
  ``outlier_val`` the exact values in the weight's dtype (sorted COO).

The exact arithmetic is defined in :mod:`wweight.reference.quant`; every backend reproduces it
bit for bit (up to FMA contraction in the Triton GPU dequantizer).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _dispatch, _validate
from .cpu import quant as _cpu
from .reference import quant as _ref

__all__ = [
    "QuantizedTensor", "quantize", "dequantize", "quantize_state_dict", "dequantize_state_dict",
    "save_quantized", "load_quantized", "error_report", "find_super_weights", "known_super_weights",
    "dequant_matmul",
]

FORMAT_VERSION = "1"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------
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
        return dequantize(self, backend=backend)

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
                f"block_size={self.block_size}, symmetric={self.symmetric}, outliers={self.num_outliers}, "
                f"bits_per_param={self.bits_per_param:.3f}, device={self.device})")

    # -- (de)serialisation -------------------------------------------------------------------
    def meta(self) -> dict:
        return {"shape": list(self.shape), "dtype": _DTYPE_NAMES[self.dtype], "bits": self.bits,
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
                   _NAME_DTYPES[meta["dtype"]], meta["bits"], meta["block_size"], meta["symmetric"])


# --------------------------------------------------------------------------------------------
# Outlier selection
# --------------------------------------------------------------------------------------------
def _kth_largest_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest |x| (0-d): the sparse family's radix select (:func:`wweight.kth_largest_abs`);
    ``torch.kthvalue`` (k-th largest = (n-k+1)-th smallest) only if that is unavailable."""
    try:
        from .sparse import kth_largest_abs

        return kth_largest_abs(x, k)
    except NotImplementedError:  # pragma: no cover - the sparse op not built in this checkout
        a = x.reshape(-1).abs().float()
        return torch.kthvalue(a, a.numel() - k + 1).values


_SPEC_KEYS = ("fraction", "zscore", "coords")


def _coords_mask(w: torch.Tensor, coords) -> torch.Tensor:
    if not isinstance(coords, torch.Tensor):
        try:
            coords = torch.as_tensor(coords, dtype=torch.int64)
        except Exception:
            raise TypeError("outliers coordinates must be an (N, ndim) integer tensor") from None
    if coords.dtype.is_floating_point or coords.dtype == torch.bool or coords.is_complex():
        raise TypeError(f"outliers coordinates must be an integer tensor, got {coords.dtype}")
    nd = max(w.dim(), 1)
    if coords.dim() == 1 and coords.numel() == nd:
        coords = coords.view(1, nd)
    if coords.dim() != 2 or coords.shape[1] != nd:
        raise ValueError(f"outliers coordinates must have shape (N, {nd}) for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(coords.shape)}")
    c = coords.to(device="cpu", dtype=torch.int64)
    dims = torch.tensor(list(w.shape) if w.dim() else [1], dtype=torch.int64)
    bad = (c < 0) | (c >= dims)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"outliers coordinates out of range: {c[row].tolist()} for a weight of shape {tuple(w.shape)}")
    strides = torch.tensor(_contig_strides(dims.tolist()), dtype=torch.int64)
    flat = (c * strides).sum(1)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[flat] = True
    return mask.to(w.device)


def _contig_strides(shape: Sequence[int]) -> List[int]:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return st[::-1]


def _fraction_thr(w: torch.Tensor, f) -> float:
    f = _validate.number("outliers (fraction)", f, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    k = max(1, int(f * w.numel()))
    return float(_kth_largest_abs(w, k))


def _zscore_thr(w: torch.Tensor, z) -> float:
    z = _validate.number("outliers (zscore)", z, lo=0.0, lo_open=True)
    a = w.float().abs()
    t = (a.mean() + z * a.std()).to(torch.float32)
    # the paper code's rule is '|w| > t'; kernels test '|w| >= thr': thr = next float32 above t
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=torch.float32, device=t.device)))


def _outlier_plan(w: torch.Tensor, outliers) -> Tuple[float, Optional[torch.Tensor]]:
    """-> (threshold, mask): an element is an outlier iff float32 |w| >= threshold or mask[i]."""
    if outliers is None:
        return math.inf, None
    if isinstance(outliers, (list, dict)):
        if isinstance(outliers, dict):
            bad = [k for k in outliers if k not in _SPEC_KEYS]
            if bad:
                raise ValueError(f"outliers dict keys must be among {list(_SPEC_KEYS)}, got {bad}")
            items = []
            for k, v in outliers.items():
                if k == "fraction":
                    items.append((_fraction_thr(w, v), None))
                elif k == "zscore":
                    items.append((_zscore_thr(w, v), None))
                else:
                    items.append((math.inf, _coords_mask(w, v)))
        else:
            items = [_outlier_plan(w, o) for o in outliers]
        thr, mask = math.inf, None
        for t, m in items:
            thr = min(thr, t)
            if m is not None:
                mask = m if mask is None else (mask | m)
        return thr, mask
    if isinstance(outliers, torch.Tensor):
        if outliers.dtype.is_floating_point and outliers.numel() == 1:
            return _fraction_thr(w, outliers), None
        return math.inf, _coords_mask(w, outliers)
    if isinstance(outliers, bool) or not isinstance(outliers, (int, float)):
        raise TypeError("outliers must be None, a fraction in (0, 1), {'zscore': z}, an (N, ndim) integer "
                        f"tensor of coordinates, {{'coords': ...}}, or a list of these; got {type(outliers).__name__}")
    return _fraction_thr(w, outliers), None


# --------------------------------------------------------------------------------------------
# CUDA glue
# --------------------------------------------------------------------------------------------
def _cuda_stats(x, bs, symmetric, thr, mask):
    from . import _cuda_util as U

    ext = _dispatch.cuda_extension()
    n = x.numel()
    nb = -(-n // bs)
    cols = 1024
    nchunks = -(-bs // cols) if bs > cols else 1
    pmin = torch.empty(nb * nchunks, device=x.device, dtype=torch.float32)
    pmax = torch.empty_like(pmin)
    m = mask.view(torch.uint8) if mask is not None else None
    ext.quant_stats(U.ptr(x), U.dtype_code(x), U.ptr(m) if m is not None else 0, U.ptr(pmin), U.ptr(pmax),
                    n, bs, nb, nchunks, float(thr) if math.isfinite(thr) else float("inf"), bool(symmetric),
                    U.stream(x))
    if symmetric:
        return None, None, pmax.view(nb, nchunks).amax(1)
    lo = pmin.view(nb, nchunks).amin(1)
    hi = pmax.view(nb, nchunks).amax(1)
    empty = lo > hi
    return lo.masked_fill_(empty, 0.0), hi.masked_fill_(empty, 0.0), None


CUDA_FUSED_MAX_BLOCK = 16384  # one warp per block: larger blocks go through the two-kernel path


def _cuda_fused(x, bs, bits, symmetric, thr, mask, clip, scale_dtype):
    from . import _cuda_util as U

    n = x.numel()
    nb = -(-n // bs)
    out = torch.empty(-(-n // 8) * bits, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=scale_dtype, device=x.device)
    zero = None if symmetric else torch.empty(nb, dtype=scale_dtype, device=x.device)
    m = mask.view(torch.uint8) if mask is not None else None
    _dispatch.cuda_extension().quant_fused(
        U.ptr(x), U.dtype_code(x), U.ptr(m) if m is not None else 0, U.ptr(scale),
        U.ptr(zero) if zero is not None else 0, U.DTYPE_CODES[scale_dtype], U.ptr(out), n, bs, bits,
        float(thr), float(clip) if clip is not None else -1.0, bool(symmetric), U.stream(x))
    return out, scale, zero


def _cuda_pack(x, bs, bits, scale, zero):
    from . import _cuda_util as U

    n = x.numel()
    out = torch.empty(-(-n // 8) * bits, dtype=torch.uint8, device=x.device)
    s32 = scale.float().contiguous()
    z32 = zero.float().contiguous() if zero is not None else None
    _dispatch.cuda_extension().quant_pack(U.ptr(x), U.dtype_code(x), U.ptr(s32), U.ptr(z32) if z32 is not None else 0,
                                          U.ptr(out), n, bs, bits, U.stream(x))
    return out


def _cuda_dequant(packed, scale, zero, n, dtype, bits, bs):
    from . import _cuda_util as U

    out = torch.empty(n, dtype=dtype, device=packed.device)
    s32 = scale.float().contiguous()
    z32 = zero.float().contiguous() if zero is not None else None
    _dispatch.cuda_extension().quant_dequant(U.ptr(packed), U.ptr(s32), U.ptr(z32) if z32 is not None else 0,
                                             U.ptr(out), U.dtype_code(out), n, bs, bits, U.stream(out))
    return out


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------
def _outlier_indices(x, thr, mask) -> torch.Tensor:
    """Sorted flat indices of ``|x| >= thr`` or ``mask`` (int64)."""
    if not math.isfinite(thr) and mask is None:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    m = x.float().abs() >= thr if math.isfinite(thr) else torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if mask is not None:
        m |= mask
    return torch.nonzero(m).view(-1)


def _run_quantize(x, mask, thr, bits, block_size, symmetric, clip, scale_dtype, be):
    """Flat contiguous x -> (codes, scale, zero or None, outlier flat indices int64)."""
    want_outliers = math.isfinite(thr) or mask is not None
    if be == "reference":
        m = None
        if want_outliers:
            m = x.float().abs() >= thr
            if mask is not None:
                m |= mask
        codes, scale, zero, idx, _ = _ref.quantize(x.cpu(), bits, block_size, symmetric,
                                                   None if m is None else m.cpu(), clip, scale_dtype)
        dev = x.device
        return codes.to(dev), scale.to(dev), None if zero is None else zero.to(dev), idx.to(dev)
    if be == "triton":
        from .kernels import quant as K

        if K.fused_ok(block_size, scale_dtype):  # one pass: stats, scale, codes, packing
            codes, scale, zero = K.quantize_fused(x, block_size, bits, symmetric, thr, mask, clip, scale_dtype)
            return codes, scale, zero, _outlier_indices(x, thr, mask)
    if (be == "cuda" and block_size % 8 == 0 and block_size <= CUDA_FUSED_MAX_BLOCK
            and scale_dtype in (torch.float16, torch.bfloat16, torch.float32)):
        codes, scale, zero = _cuda_fused(x, block_size, bits, symmetric, thr, mask, clip, scale_dtype)
        return codes, scale, zero, _outlier_indices(x, thr, mask)
    if be == "torch":
        lo, hi, amax, idx = _cpu.block_stats(x, block_size, bits, symmetric, thr, mask, want_outliers)
    else:
        if be == "triton":
            from .kernels import quant as K

            lo, hi, amax = K.block_stats(x, block_size, symmetric, thr, mask)
        else:
            lo, hi, amax = _cuda_stats(x, block_size, symmetric, thr, mask)
        idx = _outlier_indices(x, thr, mask)
    scale, zero = _cpu.finalize(lo, hi, amax, bits, symmetric, clip, scale_dtype)
    if be == "torch":
        codes = _cpu.quantize_pack(x, block_size, bits, scale, zero)
    elif be == "triton":
        from .kernels import quant as K

        codes = K.quantize_pack(x, block_size, bits, scale, zero)
    else:
        codes = _cuda_pack(x, block_size, bits, scale, zero)
    return codes, scale, zero, idx


@torch.library.custom_op("wweight::quant_quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, mask: Optional[torch.Tensor], thr: float, bits: int, block_size: int,
                 symmetric: bool, clip: float, scale_dtype: torch.dtype,
                 backend: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    be = _dispatch.resolve("quant_pack", x.device, backend, has_cuda=x.dtype != torch.float64)
    codes, scale, zero, idx = _run_quantize(x, mask, thr, bits, block_size, symmetric,
                                            None if clip <= 0 else clip, scale_dtype, be)
    if zero is None:
        zero = scale.new_empty(0)
    return codes, scale, zero, idx


@_quantize_op.register_fake
def _(x, mask, thr, bits, block_size, symmetric, clip, scale_dtype, backend):
    n = x.numel()
    nb = -(-n // block_size) if n else 0
    codes = x.new_empty((-(-n // 8) * bits,), dtype=torch.uint8)
    scale = x.new_empty((nb,), dtype=scale_dtype)
    zero = x.new_empty((0 if symmetric else nb,), dtype=scale_dtype)
    k = torch.library.get_ctx().new_dynamic_size()
    return codes, scale, zero, x.new_empty((k,), dtype=torch.int64)


def _run_dequant(codes, scale, zero, n, dtype, bits, block_size, be):
    if be == "reference":
        return _ref.dequantize(codes.cpu(), scale.cpu(), None if zero is None else zero.cpu(),
                               torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype), (n,), dtype,
                               bits, block_size).to(codes.device)
    if be == "torch":
        return _cpu.dequantize(codes, scale, zero, n, dtype, bits, block_size)
    if be == "triton":
        from .kernels import quant as K

        return K.dequantize(codes, scale, zero, n, dtype, bits, block_size)
    return _cuda_dequant(codes, scale, zero, n, dtype, bits, block_size)


@torch.library.custom_op("wweight::quant_dequantize", mutates_args=())
def _dequantize_op(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   outlier_idx: torch.Tensor, outlier_val: torch.Tensor, shape: List[int],
                   dtype: torch.dtype, bits: int, block_size: int, backend: Optional[str]) -> torch.Tensor:
    n = math.prod(shape)
    be = _dispatch.resolve("quant_dequant", codes.device, backend, has_cuda=dtype != torch.float64)
    out = _run_dequant(codes, scale, zero, n, dtype, bits, block_size, be)
    if outlier_idx.numel():
        # a second, tiny launch: K << n exact values overwrite their dequantized positions
        out.index_copy_(0, outlier_idx.long(), outlier_val.to(dtype))
    return out.view(shape)


@_dequantize_op.register_fake
def _(codes, scale, zero, outlier_idx, outlier_val, shape, dtype, bits, block_size, backend):
    return codes.new_empty(shape, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _block_size(w: torch.Tensor, block_size) -> int:
    n = max(w.numel(), 1)
    if block_size is None or block_size == "tensor":
        return n
    if block_size == "row":
        return max(w.shape[-1], 1) if w.dim() else 1
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive int, 'row' or 'tensor', got {block_size!r}")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    return min(block_size, n)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in 2..8, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return bits


def quantize(weight: torch.Tensor, bits: int = 4, block_size: Union[int, str, None] = 64,
             symmetric: bool = False, outliers=None, clip: Optional[float] = None, *,
             scale_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> QuantizedTensor:
    """Blockwise round-to-nearest quantization keeping outliers exact.

    Args:
        weight: any shape, float32/float16/bfloat16/float64, finite. Never modified.
        bits: code width, 2..8.
        block_size: elements per block of the row-major flattened tensor (the Super Weight
            paper's blocking; the last block may be shorter), or ``"row"`` (= ``shape[-1]``) or
            ``"tensor"`` / ``None`` (one block).
        symmetric: absmax codes ``[-2**(b-1), 2**(b-1)-1] * scale`` (no zero stored) instead of
            the default asymmetric min-max codes ``zero + [0, 2**b-1] * scale``.
        outliers: elements held out of the block statistics and stored exactly:
            ``None``; a fraction ``f`` in (0, 1) (the ``max(1, int(f*n))`` largest |w|, ties at
            the threshold included, threshold by an exact k-th largest select);
            ``{"zscore": z}`` (``|w| > mean|w| + z * std|w|`` over the tensor, the paper code's
            rule); an ``(N, weight.dim())`` integer tensor or ``{"coords": ...}`` of explicit
            coordinates (e.g. published super weights); or a list of these (union).
        clip: optional ratio in (0, 1] multiplying each block's min/max (absmax), values beyond
            are clamped to the end codes (a plain clipping knob; 1 / None = no clipping).
        scale_dtype: storage dtype of scale/zero; default float16, falling back to float32 for a
            tensor whose statistics overflow float16.
        backend: see :mod:`wweight._dispatch`.

    Returns:
        :class:`QuantizedTensor` on ``weight``'s device.
    """
    _validate.tensor("weight", weight)
    bits = _check_bits(bits)
    bs = _block_size(weight, block_size)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    clip_v = -1.0 if clip is None else _validate.number("clip", clip, lo=0.0, hi=1.0, lo_open=True)
    if scale_dtype is not None and scale_dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"scale_dtype must be a floating dtype, got {scale_dtype}")
    x = weight.detach().reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    n = x.numel()
    thr, mask = _outlier_plan(weight.detach(), outliers)
    if mask is not None:
        mask = mask.reshape(-1).to(x.device)
    sd = scale_dtype or torch.float16
    if n == 0:
        z = None if symmetric else torch.zeros(0, dtype=sd, device=x.device)
        return QuantizedTensor(torch.zeros(0, dtype=torch.uint8, device=x.device), torch.zeros(0, dtype=sd, device=x.device),
                               z, torch.zeros(0, dtype=torch.int32, device=x.device), weight.new_zeros(0),
                               weight.shape, weight.dtype, bits, bs, symmetric)
    be = _dispatch.resolve("quant_pack", x.device, backend, has_cuda=x.dtype != torch.float64)
    if be not in ("torch", "reference"):
        # GPU min/max (fminf) drop NaNs, so check up front; the torch path's statistics propagate
        # them instead, which makes the check below free there
        _validate.tensor("weight", weight, finite=True)
    codes, scale, zero, idx = _quantize_op(x, mask, thr, bits, bs, symmetric, clip_v, sd, backend)
    val = x[idx]

    def finite() -> bool:
        return (bool(torch.isfinite(scale).all()) and (symmetric or bool(torch.isfinite(zero).all()))
                and bool(torch.isfinite(val).all()))

    if not finite():
        # a NaN/Inf in the weight reaches either some block's statistics or the outlier values
        _validate.tensor("weight", weight, finite=True)
        if scale_dtype is not None and scale_dtype != torch.float32:
            raise ValueError(f"scale_dtype {scale_dtype} cannot represent this weight's block statistics; "
                             "use torch.float32")
        codes, scale, zero, idx = _quantize_op(x, mask, thr, bits, bs, symmetric, clip_v, torch.float32, backend)
        val = x[idx]
        if not finite():
            raise ValueError("weight: a block's value range overflows float32")
    idx_dtype = torch.int32 if n < 2 ** 31 else torch.int64
    return QuantizedTensor(codes, scale, None if symmetric else zero, idx.to(idx_dtype), val,
                           weight.shape, weight.dtype, bits, bs, symmetric)


def dequantize(q: QuantizedTensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Dense tensor of ``q.shape`` and ``q.dtype`` on ``q.device``; outliers come back bit-exact."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if q.numel() == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    return _dequantize_op(q.codes, q.scale, q.zero, q.outlier_idx, q.outlier_val, list(q.shape), q.dtype,
                          q.bits, q.block_size, backend)


def _skip(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def quantize_state_dict(sd: Mapping[str, torch.Tensor], bits: int = 4, block_size: Union[int, str, None] = 64, *,
                        outliers=None, super_weights: Optional[Mapping[str, torch.Tensor]] = None,
                        skip: Union[str, Sequence[str]] = (), min_ndim: int = 2, symmetric: bool = False,
                        clip: Optional[float] = None, scale_dtype: Optional[torch.dtype] = None,
                        backend: Optional[str] = None) -> Dict[str, Union[QuantizedTensor, torch.Tensor]]:
    """Quantize every floating tensor with ``ndim >= min_ndim`` whose name matches no ``skip``
    regular expression (``re.search``); other entries are returned unchanged (not copied).

    ``outliers`` applies to every quantized tensor; ``super_weights`` maps tensor names to
    ``(N, ndim)`` coordinates held out in addition (see :func:`known_super_weights`).
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"sd must be a mapping of names to tensors, got {type(sd).__name__}")
    patterns = [skip] if isinstance(skip, str) else list(skip)
    super_weights = dict(super_weights or {})
    unknown = [k for k in super_weights if k not in sd]
    if unknown:
        raise ValueError(f"super_weights names not in sd: {unknown[:5]}")
    out: Dict[str, Union[QuantizedTensor, torch.Tensor]] = {}
    for name, t in sd.items():
        if (isinstance(t, torch.Tensor) and t.dtype in _validate.FLOAT_DTYPES and t.dim() >= min_ndim
                and t.numel() and not _skip(name, patterns)):
            spec = outliers
            if name in super_weights:
                spec = [super_weights[name]] + ([] if outliers is None else (outliers if isinstance(outliers, list) else [outliers]))
            try:
                out[name] = quantize(t, bits, block_size, symmetric, spec, clip, scale_dtype=scale_dtype, backend=backend)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{name}: {e}") from None
        else:
            out[name] = t
    return out


def dequantize_state_dict(qsd: Mapping[str, Union[QuantizedTensor, torch.Tensor]], *,
                          backend: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_state_dict`: every QuantizedTensor dequantized, tensors passed through."""
    return {k: (dequantize(v, backend=backend) if isinstance(v, QuantizedTensor) else v) for k, v in qsd.items()}


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


def error_report(w: torch.Tensor, q: Union[QuantizedTensor, torch.Tensor]) -> Dict[str, float]:
    """Quantization error of ``q`` (a QuantizedTensor or its dequantized tensor) against ``w``.

    Returns ``mse``, ``max_abs_err``, ``sqnr_db`` (10 log10(sum w^2 / sum err^2); inf when
    exact), ``rel_fro_err`` (||w - q|| / ||w||), computed in float64, plus ``bits_per_param``
    when ``q`` is a QuantizedTensor.
    """
    _validate.tensor("w", w)
    extra = {}
    if isinstance(q, QuantizedTensor):
        extra["bits_per_param"] = q.bits_per_param
        q = dequantize(q)
    _validate.tensor("q", q)
    if q.shape != w.shape:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected {tuple(w.shape)} (the shape of w)")
    a = w.detach().to(torch.float64)
    e = q.detach().to(device=a.device, dtype=torch.float64) - a
    se = float((e * e).sum())
    sw = float((a * a).sum())
    n = max(a.numel(), 1)
    rep = {
        "mse": se / n,
        "max_abs_err": float(e.abs().max()) if e.numel() else 0.0,
        "sqnr_db": (10 * math.log10(sw / se)) if se > 0 and sw > 0 else (math.inf if se == 0 else -math.inf),
        "rel_fro_err": math.sqrt(se / sw) if sw > 0 else (0.0 if se == 0 else math.inf),
    }
    rep.update(extra)
    return rep


# --------------------------------------------------------------------------------------------
# Fused dequantize + matmul
# --------------------------------------------------------------------------------------------
def _dequant_at(codes, scale, zero, idx, bits: int, bs: int, dtype) -> torch.Tensor:
    """Dequantized values (float32, rounded to ``dtype``) of the flat positions ``idx``, read
    straight from the bitstream: code f starts at bit f*bits, inside bytes (f*bits >> 3, +1)."""
    idx = idx.long()
    bitpos = idx * bits
    byte = bitpos >> 3
    b0 = codes[byte].to(torch.int32)
    nxt = byte + 1
    b1 = torch.where(nxt < codes.numel(), codes[nxt.clamp(max=codes.numel() - 1)].to(torch.int32),
                     torch.zeros_like(b0))
    code = (((b0 << 8) | b1) >> (16 - bits - (bitpos & 7)).to(torch.int32)) & ((1 << bits) - 1)
    blk = idx // bs
    s = scale[blk].float()
    if zero is None:
        v = (code.float() - float(1 << (bits - 1))) * s
    else:
        v = code.float() * s + zero[blk].float()
    return v.to(dtype).float()


@torch.library.custom_op("wweight::quant_dequant_matmul", mutates_args=())
def _dq_matmul_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                  outlier_idx: torch.Tensor, outlier_val: torch.Tensor, n_out: int, k_in: int,
                  dtype: torch.dtype, bits: int, block_size: int, backend: Optional[str]) -> torch.Tensor:
    be = _dispatch.resolve("quant_dequant_matmul", x.device, backend, has_cuda=False,
                           has_triton=x.dtype == dtype and dtype != torch.float64)
    if be == "triton":
        if x.dtype != dtype or dtype == torch.float64:
            raise RuntimeError("quant_dequant_matmul: the Triton kernel needs x in the weight's dtype "
                               "(float32/float16/bfloat16)")
        from .kernels import quant as K

        y = K.dequant_matmul(x, codes, scale, zero, n_out, k_in, bits, block_size)
        if outlier_idx.numel():
            # exact outliers: y[:, n] += x[:, k] * (w[n, k] - w_hat[n, k]) for each of the K << n
            idx = outlier_idx.long()
            delta = outlier_val.float() - _dequant_at(codes, scale, zero, idx, bits, block_size, dtype)
            y.index_add_(1, idx // k_in, x[:, idx % k_in].float() * delta)
        return y.to(x.dtype)
    w = _dequantize_op(codes, scale, zero, outlier_idx, outlier_val, [n_out, k_in], dtype, bits, block_size,
                       be if be in ("torch", "reference") else None)
    return x @ w.to(x.dtype).t()


@_dq_matmul_op.register_fake
def _(x, codes, scale, zero, outlier_idx, outlier_val, n_out, k_in, dtype, bits, block_size, backend):
    return x.new_empty((x.shape[0], n_out))


def dequant_matmul(x: torch.Tensor, q: QuantizedTensor, bias: Optional[torch.Tensor] = None, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``x @ dequantize(q).T (+ bias)`` without materialising the dense weight on the Triton path
    (GPU): each tile of the packed weight is unpacked, scaled and fed to ``tl.dot``; the exact
    outliers are added afterwards as a sparse correction. Other backends dequantize then matmul.

    Args:
        x: ``(..., in_features)`` floating tensor on ``q``'s device (the Triton kernel needs
            ``x.dtype == q.dtype``).
        q: a 2-D QuantizedTensor of shape ``(out_features, in_features)`` (an ``nn.Linear`` weight).
        bias: optional ``(out_features,)``.
    Returns:
        ``(..., out_features)`` in ``x.dtype``.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if len(q.shape) != 2:
        raise ValueError(f"q must be 2-D (out_features, in_features), got shape {tuple(q.shape)}")
    _validate.tensor("x", x)
    n_out, k_in = q.shape
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"x must have shape (..., {k_in}) to multiply a weight of shape {tuple(q.shape)}, "
                         f"got {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device}, expected {q.device} (the device of q)")
    x2 = x.reshape(-1, k_in)
    y = _dq_matmul_op(x2, q.codes, q.scale, q.zero, q.outlier_idx, q.outlier_val, n_out, k_in, q.dtype, q.bits,
                      q.block_size, backend)
    if bias is not None:
        _validate.tensor("bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n_out)


# --------------------------------------------------------------------------------------------
# Super weights
# --------------------------------------------------------------------------------------------
def _layer_index(name: str, fallback: int) -> int:
    m = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m[0]) if m else fallback


@torch.no_grad()
def find_super_weights(model: torch.nn.Module, input_ids: torch.Tensor, threshold: float = 50.0, *,
                       module_pattern: str = r"mlp\.down_proj$", max_iters: int = 1,
                       forward_kwargs: Optional[dict] = None) -> List[dict]:
    """Super-weight detection of Yu et al. 2024 (Sec. 3.1): one forward pass, record every MLP
    down-projection's input and output activations; in a layer where the largest-|.| input
    channel and the largest-|.| output channel both exceed ``threshold``, the super weight is
    ``W[row = output channel, col = input channel]``.

    Args:
        model: any ``nn.Module``; the down-projections are the ``nn.Linear`` (or any module with
            a 2-D ``weight`` of shape (out, in)) whose qualified name matches ``module_pattern``
            (``re.search``; the default fits Llama / Mistral / OLMo / Phi-3 / Qwen MLPs;
            use e.g. ``r"ff_out$"`` for original OLMo, ``r"mlp\\.c_proj$"`` for GPT-2).
        input_ids: token ids passed as ``model(input_ids, **forward_kwargs)`` (one prompt).
        threshold: activation magnitude both spikes must exceed (the paper reads ~50 off its plots).
        max_iters: > 1 repeats the detection with the weights found so far zeroed (the paper's
            iterative search for further super weights); the model is restored afterwards.

    Returns:
        list of dicts ``{"layer", "module", "row", "col", "input_act", "output_act", "weight"}``
        ordered by layer (``layer`` is the first integer in the module name).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    threshold = _validate.number("threshold", threshold, lo=0.0, lo_open=True)
    pat = re.compile(module_pattern)
    mods = [(n, m) for n, m in model.named_modules()
            if pat.search(n) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    if not mods:
        raise ValueError(f"module_pattern {module_pattern!r} matches no module with a 2-D weight")
    found: List[dict] = []
    zeroed: List[Tuple[torch.Tensor, int, int, torch.Tensor]] = []
    try:
        for _ in range(max(1, int(max_iters))):
            rec: Dict[str, Tuple[float, int, float, int]] = {}

            def hook(name):
                def fn(mod, inp, out):
                    xi = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs()
                    yo = out.detach().reshape(-1, out.shape[-1]).abs()
                    ii = int(xi.argmax())
                    oi = int(yo.argmax())
                    rec[name] = (float(xi.reshape(-1)[ii]), ii % xi.shape[-1], float(yo.reshape(-1)[oi]), oi % yo.shape[-1])
                return fn

            handles = [m.register_forward_hook(hook(n)) for n, m in mods]
            try:
                model(input_ids, **(forward_kwargs or {}))
            finally:
                for h in handles:
                    h.remove()
            new = []
            for i, (n, m) in enumerate(mods):
                if n not in rec:
                    continue
                in_v, col, out_v, row = rec[n]
                if in_v > threshold and out_v > threshold:
                    key = (n, row, col)
                    if any((f["module"], f["row"], f["col"]) == key for f in found):
                        continue
                    new.append({"layer": _layer_index(n, i), "module": n, "row": row, "col": col,
                                "input_act": in_v, "output_act": out_v, "weight": float(m.weight[row, col])})
                    zeroed.append((m.weight, row, col, m.weight[row, col].clone()))
            if not new:
                break
            found.extend(new)
            if max_iters > 1:
                for wt, r, c, _ in zeroed:
                    wt[r, c] = 0
    finally:
        for wt, r, c, v in reversed(zeroed):
            wt[r, c] = v
    return sorted(found, key=lambda f: (f["layer"], f["row"], f["col"]))


def known_super_weights(model_name: Optional[str] = None, *, verified_only: bool = False):
    """Published super-weight coordinates shipped in ``wweight/data/super_weights.json``.

    With ``model_name`` (e.g. ``"huggyllama/llama-7b"``; case-insensitive, the part after the
    last '/' also matches) returns ``{state_dict_name: (N, 2) int64 tensor}`` ready for
    ``quantize_state_dict(super_weights=...)``; without it, the whole table as a dict.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "super_weights.json")
    with open(path) as f:
        table = json.load(f)
    models = table["models"]
    if model_name is None:
        return models
    key = None
    for k in models:
        if k.lower() == model_name.lower() or k.split("/")[-1].lower() == model_name.split("/")[-1].lower():
            key = k
            break
    if key is None:
        raise ValueError(f"model_name {model_name!r} has no published super weights here; known: {sorted(models)}")
    entry = models[key]
    if verified_only and not entry.get("verified"):
        raise ValueError(f"{key}: its coordinates are not verified against the paper's table")
    out: Dict[str, List[List[int]]] = {}
    for layer, row, col in entry["coords"]:
        out.setdefault(table["_weight_name"].format(layer=layer), []).append([row, col])
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}


def _selftest(op: str):
    """CUDA self-tests: compare the extension with the reference on a tiny input."""

    def run(device) -> bool:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(777, generator=g)
        w[5] = 40.0
        ok = True
        # (4, 64) and (5, 104) take the one-pass kernel, (3, 100) and (8, 777) the two-kernel path
        for bits, bs, sym in ((4, 64, False), (3, 100, True), (8, 777, False), (5, 104, True)):
            m = _ref.outlier_mask_fraction(w, 0.01)
            thr = float(torch.sort(w.abs(), descending=True).values[int(0.01 * 777) - 1])
            codes, scale, zero, idx, val = _ref.quantize(w, bits, bs, sym, m)
            x = w.to(device)
            if op == "quant_pack":
                lo, hi, amax = _cuda_stats(x, bs, sym, thr, None)
                s2, z2 = _cpu.finalize(lo, hi, amax, bits, sym, None, torch.float16)
                c2 = _cuda_pack(x, bs, bits, s2, z2)
                ok &= torch.equal(s2.cpu(), scale) and (zero is None or torch.equal(z2.cpu(), zero))
                ok &= torch.equal(c2.cpu(), codes)
                if bs % 8 == 0:
                    c3, s3, z3 = _cuda_fused(x, bs, bits, sym, thr, None, None, torch.float16)
                    ok &= torch.equal(s3.cpu(), scale) and (zero is None or torch.equal(z3.cpu(), zero))
                    ok &= torch.equal(c3.cpu(), codes)
            else:
                ref = _ref.dequantize(codes, scale, zero, torch.zeros(0, dtype=torch.int64), torch.zeros(0), (777,),
                                      torch.float32, bits, bs)
                out = _cuda_dequant(codes.to(device), scale.to(device), None if zero is None else zero.to(device),
                                    777, torch.float32, bits, bs)
                ok &= torch.equal(out.cpu(), ref)
        return bool(ok)

    return run


_dispatch.register_selftest("quant_pack", _selftest("quant_pack"))
_dispatch.register_selftest("quant_dequant", _selftest("quant_dequant"))
