"""Glue between torch tensors and the raw-pointer CUDA extension (``wweight._cuda``)."""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"CUDA kernels take float32/float16/bfloat16 tensors, got {t.dtype}") from None


def ptr(t: torch.Tensor) -> int:
    """Device address of a contiguous tensor (0 for an empty one)."""
    return t.data_ptr() if t.numel() else 0


def stream(t: torch.Tensor) -> int:
    """The raw handle of torch's current stream on ``t``'s device (kernels are ordered with torch's)."""
    return torch.cuda.current_stream(t.device).cuda_stream
