"""Blockwise round-to-nearest quantization (2-8 bit) with outliers / super weights held out exactly.

Papers: Yu et al. 2024, "The Super Weight in Large Language Models" (arXiv:2411.07191): RTN on
contiguous blocks of the flattened weight becomes usable at large block sizes once the few
super weights / largest outliers are kept in full precision; Dettmers et al. 2023 (SpQR,
arXiv:2306.03078) and Kim et al. 2023 (SqueezeLLM, arXiv:2306.07629): dense low-bit codes plus
a sparse list of exact outliers. Speed peer: bitsandbytes' ``quantize_blockwise`` /
``quantize_4bit`` (absmax, blocks of 64, no outliers).

This module is the contract: validation, the ``torch.library`` ops and the dispatch to
``wweight/backends/<backend>/quant.py`` (storage format: :mod:`wweight.quant.format`). The exact
arithmetic is defined in :mod:`wweight.reference.quant`; every backend reproduces it bit for bit
(up to FMA contraction in the Triton GPU dequantizer).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from .. import _dispatch, _validate
from ..reference import quant as _ref
from .format import QuantizedTensor
from .outliers import outlier_plan
from .scales import FP16_TINY, fp16_loses

__all__ = ["quantize", "dequantize", "dequant_matmul"]


# --------------------------------------------------------------------------------------------
# torch.library ops

def _run_quantize(x, mask, thr, bits, block_size, symmetric, clip, scale_dtype, be):
    """Flat contiguous x -> (codes, scale, zero or None, outlier flat indices int64)."""
    if be == "reference":
        m = None
        if math.isfinite(thr) or mask is not None:
            m = x.float().abs() >= thr
            if mask is not None:
                m |= mask
        codes, scale, zero, idx, _ = _ref.quantize(x.cpu(), bits, block_size, symmetric,
                                                   None if m is None else m.cpu(), clip, scale_dtype)
        dev = x.device
        return codes.to(dev), scale.to(dev), None if zero is None else zero.to(dev), idx.to(dev)
    return _dispatch.backend_module("quant", be).quantize(x, mask, thr, bits, block_size, symmetric, clip,
                                                          scale_dtype)


@torch.library.custom_op("wweight::quant_quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, mask: Optional[torch.Tensor], thr: float, bits: int, block_size: int,
                 symmetric: bool, clip: float, scale_dtype: torch.dtype,
                 backend: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    be = _dispatch.resolve("quant_pack", x.device, backend, family="quant", has_cuda=x.dtype != torch.float64,
                            has_cpu=True)
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
    return _dispatch.backend_module("quant", be).dequantize(codes, scale, zero, n, dtype, bits, block_size)


@torch.library.custom_op("wweight::quant_dequantize", mutates_args=())
def _dequantize_op(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   outlier_idx: torch.Tensor, outlier_val: torch.Tensor, shape: List[int],
                   dtype: torch.dtype, bits: int, block_size: int, backend: Optional[str]) -> torch.Tensor:
    n = math.prod(shape)
    be = _dispatch.resolve("quant_dequant", codes.device, backend, family="quant", has_cuda=dtype != torch.float64,
                         has_cpu=True)
    out = _run_dequant(codes, scale, zero, n, dtype, bits, block_size, be)
    if outlier_idx.numel():
        # a second, tiny launch: K << n exact values overwrite their dequantized positions
        out.index_copy_(0, outlier_idx.long(), outlier_val.to(dtype))
    return out.view(shape)


@_dequantize_op.register_fake
def _(codes, scale, zero, outlier_idx, outlier_val, shape, dtype, bits, block_size, backend):
    return codes.new_empty(shape, dtype=dtype)


_dispatch.register_op("wweight::quant_dequantize", _dequantize_op)   # QuantizedTensor.dequantize's


# --------------------------------------------------------------------------------------------
# Public API

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
            tensor whose statistics overflow float16 or whose scales underflow it (tiny weights:
            a block would collapse to a constant); a forced float16 that cannot hold them raises.
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
    thr, mask = outlier_plan(weight.detach(), outliers)
    if mask is not None:
        mask = mask.reshape(-1).to(x.device)
    sd = scale_dtype or torch.float16
    if n == 0:
        z = None if symmetric else torch.zeros(0, dtype=sd, device=x.device)
        return QuantizedTensor(torch.zeros(0, dtype=torch.uint8, device=x.device), torch.zeros(0, dtype=sd, device=x.device),
                               z, torch.zeros(0, dtype=torch.int32, device=x.device), weight.new_zeros(0),
                               weight.shape, weight.dtype, bits, bs, symmetric)
    be = _dispatch.resolve("quant_pack", x.device, backend, family="quant", has_cuda=x.dtype != torch.float64,
                            has_cpu=True)
    if be == "triton":
        # Triton's GPU min/max drop NaNs, so check up front, in one read-only pass (aminmax
        # propagates NaN and shows +-Inf; isfinite().all() wrote and re-read a bool copy). The
        # torch path's and the CUDA kernels' statistics propagate NaN into the block's scale
        # (csrc/quant_elem.cuh, Stats), which makes the O(blocks) check below free there.
        lo, hi = torch.aminmax(x)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            _validate.tensor("weight", weight, finite=True)
    codes, scale, zero, idx = _dispatch.run_op(_quantize_op, x, mask, thr, bits, bs, symmetric, clip_v, sd,
                                               backend)
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
        codes, scale, zero, idx = _dispatch.run_op(_quantize_op, x, mask, thr, bits, bs, symmetric, clip_v,
                                                   torch.float32, backend)
        val = x[idx]
        if not finite():
            raise ValueError("weight: a block's value range overflows float32")
    if scale.dtype == torch.float16 and bool((scale < FP16_TINY).any()):
        # zero or subnormal float16 scales: constant blocks, or tiny weights whose scale underflowed
        c2, s2, z2, i2 = _dispatch.run_op(_quantize_op, x, mask, thr, bits, bs, symmetric, clip_v, torch.float32,
                                          backend)
        if fp16_loses(s2):
            if scale_dtype is not None:
                raise ValueError(f"scale_dtype {scale_dtype} cannot represent this weight's block scales "
                                 f"(smallest nonzero scale {float(s2[s2 > 0].min()):.3g} is below float16's "
                                 f"normal range {FP16_TINY:.3g}: the blocks would collapse or lose their "
                                 "range); use torch.float32 or leave scale_dtype unset")
            codes, scale, zero, idx = c2, s2, z2, i2
            val = x[idx]
    idx_dtype = torch.int32 if n < 2 ** 31 else torch.int64
    return QuantizedTensor(codes, scale, None if symmetric else zero, idx.to(idx_dtype), val,
                           weight.shape, weight.dtype, bits, bs, symmetric)


def dequantize(q: QuantizedTensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Dense tensor of ``q.shape`` and ``q.dtype`` on ``q.device``; outliers come back bit-exact."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    return q.dequantize(backend)


# --------------------------------------------------------------------------------------------
# Fused dequantize + matmul

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
    be = _dispatch.resolve("quant_dequant_matmul", x.device, backend, family="quant", has_cuda=False,
                           has_triton=x.dtype == dtype and dtype != torch.float64)
    if be == "triton":
        if x.dtype != dtype or dtype == torch.float64:
            raise RuntimeError("quant_dequant_matmul: the Triton kernel needs x in the weight's dtype "
                               "(float32/float16/bfloat16)")
        y = _dispatch.backend_module("quant", "triton").dequant_matmul(x, codes, scale, zero, n_out, k_in, bits, block_size)
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
    y = _dispatch.run_op(_dq_matmul_op, x2, q.codes, q.scale, q.zero, q.outlier_idx, q.outlier_val, n_out, k_in,
                         q.dtype, q.bits, q.block_size, backend)
    if bias is not None:
        _validate.tensor("bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n_out)


