"""Input checks shared by every op. Errors name the argument and what was expected."""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, x, *, floating: bool = True, dtypes: Optional[Sequence[torch.dtype]] = None,
           ndim: Optional[int] = None, finite: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if floating and dtypes is None and x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def same_as(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (the shape of {ref_name})")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {ref.dtype} (the dtype of {ref_name})")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device}, expected {ref.device} (the device of {ref_name})")


def number(name: str, v, *, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        else:
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def choice(name: str, v, options: Sequence) -> None:
    if v not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {v!r}")


def boolean(name: str, v) -> bool:
    """A real bool (numpy's too): ``"false"`` or 0/1 would be truthy surprises."""
    if type(v).__name__ not in ("bool", "bool_"):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


def same_keys(finetuned: Sequence[Mapping], ref: Mapping, ref_name: str) -> None:
    """Every state dict of ``finetuned`` has exactly ``ref``'s keys (ValueError naming ``finetuned[i]``)."""
    for i, sd in enumerate(finetuned):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            raise ValueError(f"finetuned[{i}] keys differ from the {ref_name}: missing {missing[:3]}, "
                             f"extra {extra[:3]}")
